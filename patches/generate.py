"""Generates the upstream patch series: ``python -m patches.generate [--out DIR]``.

Rebuilds the v2.14.1 files the series touch from the installed wheel
(patches/base.py) in a scratch git repository, applies each patch of
patches/manifest.py as one commit, checks the result the way the build would
read it (Python compiles, torchgen accepts the yaml), and writes each series
with ``git format-patch`` into DIR/<series>/ (default: patches/).

Output is deterministic: fixed author, committer and dates, zeroed commit ids,
full blob ids and no git version signature, so regenerating an unchanged
repository leaves patches/ byte-identical. The author (and committer) is
``PATCH_AUTHOR="Name <email>"`` from the environment when set (the person who
submits the stack), else the fixed default below, which the committed series use.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

from . import base, manifest
from .errors import PatchError

AUTHOR = "torch-moe-ops <torch-moe-ops@users.noreply.github.com>"
AUTHOR_ENV = "PATCH_AUTHOR"
DATE = "2026-11-24T00:00:00+00:00"
PATCHES_DIR = os.path.dirname(os.path.abspath(__file__))


def author() -> tuple[str, str]:
    """(name, email) of the series' commits: $PATCH_AUTHOR, else AUTHOR."""
    value = os.environ.get(AUTHOR_ENV) or AUTHOR
    match = re.fullmatch(r"([^<>]*[^<>\s])\s+<([^<>\s]+@[^<>\s]+)>", value.strip())
    if match is None:
        raise PatchError(AUTHOR_ENV, None, f"expected 'Name <email>', got {value!r}")
    return match.group(1), match.group(2)


def git_env() -> dict:
    """Environment that makes git ignore the user's configuration and stamp
    every commit with the same identity (author()) and date."""
    name, email = author()
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    for who in ("AUTHOR", "COMMITTER"):
        env.update({f"GIT_{who}_NAME": name, f"GIT_{who}_EMAIL": email, f"GIT_{who}_DATE": DATE})
    return env


def git(repo: str, *args: str) -> str:
    result = subprocess.run(["git", "-C", repo, *args], env=git_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise PatchError(repo, None, f"git {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result.stdout


def init_base_repo(root: str) -> None:
    """A git repository at root holding the base tree as its one commit."""
    base.build_base_tree(root)
    git(root, "init", "--quiet", "--initial-branch=main")
    git(root, "add", "--all")
    git(root, "commit", "--quiet", "--message", f"PyTorch v{base.UPSTREAM_VERSION} (files the series touch)")


def commit_message(patch: manifest.Patch) -> str:
    return patch.text


def _in_tree(message: str, root: str) -> str:
    """Error text with scratch paths turned back into in-tree paths."""
    return message.replace(root.rstrip("/") + "/", "")


def validate(root: str, paths: list[str]) -> None:
    """Reads the changed files the way the build does."""
    # Imported here: torchgen's autograd package is only needed to generate.
    from torchgen.gen import parse_native_yaml
    from torchgen.packaged.autograd.load_derivatives import load_derivatives

    native = os.path.join(root, "aten/src/ATen/native/native_functions.yaml")
    tags = os.path.join(root, "aten/src/ATen/native/tags.yaml")
    for path in paths:
        full = os.path.join(root, path)
        if path.endswith(".py"):
            with open(full, encoding="utf-8") as f:
                source = f.read()
            try:
                compile(source, path, "exec")
            except SyntaxError as e:
                raise PatchError(path, e.lineno, f"patched file does not compile: {e.msg}") from None
        try:
            if path.endswith(("native_functions.yaml", "tags.yaml")):
                parse_native_yaml(native, tags)
            elif path.endswith("derivatives.yaml"):
                load_derivatives(full, native, tags)
        except Exception as e:  # torchgen raises bare AssertionErrors and the like
            raise PatchError(path, None, f"torchgen rejects the patched file:\n{_in_tree(str(e), root)}") from None


def stage(root: str) -> dict[str, tuple[str, str]]:
    """Applies every series to a fresh base repository at root, one commit per
    patch. Returns, per series, the commits it starts after and ends at."""
    manifest.check_coverage()
    init_base_repo(root)
    ranges = {}
    for series in manifest.SERIES:
        start = git(root, "rev-parse", "HEAD").strip()
        for patch in series.patches:
            touched = []
            for change in patch.changes:
                full = os.path.join(root, change.path)
                text = None
                if os.path.exists(full):
                    with open(full, encoding="utf-8", newline="") as f:
                        text = f.read()
                new = change.apply(text)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "w", encoding="utf-8", newline="") as f:
                    f.write(new)
                touched.append(change.path)
            validate(root, touched)
            git(root, "add", "--all")
            git(root, "commit", "--quiet", "--message", commit_message(patch))
        ranges[series.name] = (start, git(root, "rev-parse", "HEAD").strip())
    return ranges


def generate(out_dir: str) -> list[str]:
    """Writes every series into out_dir/<series>/; returns the files written."""
    written = []
    with tempfile.TemporaryDirectory(prefix="moe-patches-") as root:
        ranges = stage(root)
        for name, (start, end) in ranges.items():
            dest = os.path.join(out_dir, name)
            os.makedirs(dest, exist_ok=True)
            for stale in glob.glob(os.path.join(dest, "*.patch")):
                os.remove(stale)
            out = git(root, "format-patch", "--zero-commit", "--no-signature", "--full-index", "--no-renames",
                      "--output-directory", dest, f"{start}..{end}")
            written += out.split()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patches.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=PATCHES_DIR, help="directory for the series (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        for path in generate(args.out):
            print(os.path.relpath(path))
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

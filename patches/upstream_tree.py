"""Upstream paths in the directories the series touches: patches/upstream_tree.txt.

A new file of the series must not land on a path upstream already has, nor on
one that differs from it only in case (it would clash in a macOS or Windows
checkout). PyTorch's source tree is not at hand, so the list is built from what
is, and says which source gave each path:

``wheel PATH``
    A file that the torch wheel the series target (the version recorded in the
    file) ships from those directories, mapped back to its in-tree path: the
    Python modules, the ATen and torch/csrc headers, torchgen's packaged
    native_functions.yaml, tags.yaml, derivatives.yaml and templates. A few are
    build outputs the wheel ships next to the sources (``torch/version.py``); a
    new file must not take those paths either.
``binary PATH``
    A source file compiled into the wheel's libraries (the ``__FILE__`` of their
    error messages). With the ``wheel`` lines, exact for v2.14.1 but not
    complete: a .cpp/.cu file that leaves no trace in the binaries is missing.
``source PATH``
    An upstream file the wheel neither ships nor compiles (a test file),
    which a patch edits through the stand-in ``base.py`` builds from its
    lines as read in pytorch/pytorch (``UPSTREAM_EXCERPTS`` names the
    commit); written from that table.
``absent PATH``
    A new file of the series, looked up by exact path in every version of
    pytorch/pytorch stored in the source index used to write this list (the
    newest is 2.11.0a0, commit f3b72801a6bc917d98d6b392c6d223f91348989f;
    v2.14.1 itself is not stored there) and found in none, or found only in
    a version newer than v2.14.1: test/test_matmul.py, which pytorch#185251
    creates after it (stored at ceeabedfeec671d6223ae049cb5a71273323bea3,
    CUDA-only grouped GEMM tests). A new file needs
    such a look-up (or a check of the path at the v2.14.1 tag on GitHub) before
    it is added here, since the wheel cannot show every source file.

``python -m patches.upstream_tree`` rewrites the directories and the ``wheel``
and ``binary`` lines from the installed wheel (reading its libraries takes a
minute or two) and keeps the ``absent`` lines. test_patches.py checks that the
directories and the ``wheel`` lines are current, and that no new file of the
series collides with a listed path.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import torch
import torchgen

from . import manifest

LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream_tree.txt")

TORCH_DIR = os.path.dirname(torch.__file__)
TORCHGEN_DIR = os.path.dirname(torchgen.__file__)
INCLUDE = os.path.join(TORCH_DIR, "include")

HEADER = """\
# Upstream PyTorch paths in the directories the upstream patch series touches,
# written by `python -m patches.upstream_tree` (patches/upstream_tree.py says
# what each source covers). `dir`: the directories; `wheel`: files the torch
# wheel named below ships; `binary`: further sources compiled into its
# libraries (their __FILE__ strings); `source`: test files the series edits,
# read in pytorch/pytorch (patches/base.py UPSTREAM_EXCERPTS); `absent`: the
# series' new files, looked up by exact path in pytorch/pytorch (source
# index; newest stored version
# 2.11.0a0 at f3b72801a6bc917d98d6b392c6d223f91348989f, v2.14.1 not stored)
# and found in no stored version, except test/test_matmul.py: pytorch#185251
# creates it after v2.14.1 (stored at ceeabedfeec671d6223ae049cb5a71273323bea3).
"""

_BINARY_SUFFIXES = (".so", ".pyd", ".dll", ".dylib")
_SOURCE_PATH = re.compile(rb"(?<![\w.+-])(?:aten/src|torch/csrc|tools|torch)/[A-Za-z0-9_/.+-]+?"
                          rb"\.(?:cpp|cu|cuh|h|hpp|c|py|yaml)\b")


def touched_dirs() -> list[str]:
    """The in-tree directories of every path a change of the manifest writes."""
    return sorted({os.path.dirname(c.path) for s in manifest.SERIES for p in s.patches for c in p.changes})


def _wheel_dir(tree_dir: str) -> list[str]:
    """Where the wheel ships the files of the in-tree directory tree_dir."""
    if tree_dir.startswith("aten/src/"):
        dirs = [os.path.join(INCLUDE, tree_dir[len("aten/src/"):])]
        if tree_dir == "aten/src/ATen/native":
            dirs.append(os.path.join(TORCHGEN_DIR, "packaged", "ATen", "native"))
        return dirs
    if tree_dir.startswith("torch/csrc"):
        return [os.path.join(INCLUDE, tree_dir)]
    if tree_dir.startswith("tools/autograd"):
        return [os.path.join(TORCHGEN_DIR, "packaged", "autograd", tree_dir[len("tools/autograd"):].lstrip("/"))]
    if tree_dir == "torch" or tree_dir.startswith("torch/"):
        return [os.path.join(TORCH_DIR, tree_dir[len("torch"):].lstrip("/"))]
    return []


def _libraries() -> list[str]:
    libs = []
    for d in (os.path.join(TORCH_DIR, "lib"), TORCH_DIR):
        if os.path.isdir(d):
            libs += [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(_BINARY_SUFFIXES)]
    return libs


def wheel_paths(dirs: list[str]) -> list[str]:
    """In-tree paths in dirs (not below them) of the files the installed wheel ships."""
    found = set()
    for tree_dir in dirs:
        for wheel_dir in _wheel_dir(tree_dir):
            if not os.path.isdir(wheel_dir):
                continue
            for name in os.listdir(wheel_dir):
                if os.path.isfile(os.path.join(wheel_dir, name)) and not name.endswith(_BINARY_SUFFIXES + (".pyc",)):
                    found.add(f"{tree_dir}/{name}")
    return sorted(found)


def binary_paths(dirs: list[str]) -> list[str]:
    """In-tree paths in dirs (not below them) of sources compiled into the
    installed wheel's libraries (reads them all: a minute or two)."""
    found = set()
    wanted = set(dirs)
    for lib in _libraries():
        with open(lib, "rb") as f:
            data = f.read()
        for match in _SOURCE_PATH.finditer(data):
            path = match.group().decode()
            if os.path.dirname(path) in wanted:
                found.add(path)
    return sorted(found)


@dataclasses.dataclass
class UpstreamTree:
    torch_version: str
    dirs: list[str]
    wheel: list[str]
    binary: list[str]
    absent: list[str]
    source: list[str] = dataclasses.field(default_factory=list)

    def upstream(self) -> list[str]:
        return sorted(set(self.wheel) | set(self.binary) | set(self.source))

    def format(self) -> str:
        lines = [HEADER, f"torch {self.torch_version}\n"]
        lines += [f"dir {d}\n" for d in self.dirs]
        lines += [f"wheel {p}\n" for p in self.wheel]
        lines += [f"binary {p}\n" for p in sorted(set(self.binary) - set(self.wheel))]
        lines += [f"source {p}\n" for p in self.source]
        lines += [f"absent {p}\n" for p in self.absent]
        return "".join(lines)


def load(path: str = LIST) -> UpstreamTree:
    tree = UpstreamTree("", [], [], [], [])
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            kind, _, value = line.partition(" ")
            if kind == "torch":
                tree.torch_version = value
            elif kind in ("dir", "wheel", "binary", "absent", "source"):
                getattr(tree, "dirs" if kind == "dir" else kind).append(value)
            else:
                from .errors import PatchError
                raise PatchError(os.path.relpath(path, manifest.REPO_ROOT), number, f"unknown line kind {kind!r}")
    return tree


def current(absent: list[str]) -> UpstreamTree:
    dirs = touched_dirs()
    from .base import UPSTREAM_EXCERPTS

    return UpstreamTree(torch.__version__, dirs, wheel_paths(dirs), binary_paths(dirs), sorted(absent),
                        sorted(UPSTREAM_EXCERPTS))


def collisions(new_paths: list[str], upstream_paths: list[str]) -> list[tuple[str, str]]:
    """(new path, upstream path) pairs equal up to case."""
    upstream = {}
    for p in upstream_paths:
        upstream.setdefault(p.lower(), p)
    return [(p, upstream[p.lower()]) for p in new_paths if p.lower() in upstream]


def main() -> int:
    absent = load().absent if os.path.exists(LIST) else []
    tree = current(absent)
    with open(LIST, "w", encoding="utf-8") as f:
        f.write(tree.format())
    print(f"{os.path.relpath(LIST)}: {len(tree.dirs)} directories, {len(tree.upstream())} paths from torch "
          f"{tree.torch_version}, {len(tree.absent)} new paths looked up")
    return 0


if __name__ == "__main__":
    sys.exit(main())

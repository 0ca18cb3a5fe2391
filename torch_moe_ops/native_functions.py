"""The declaration of every moe_ops op (native_functions.yaml beside this file).

Read by setup.py (csrc/library.cpp's schemas and C++ registrations are
generated from it into the build tree), the upstream patch generator
(patches/) and the tests, never at import of the package. PyYAML is a test and
generator dependency (requirements.txt), not one of the package or the build:
the registrations are read without it (_registration_entries), since
`pip install --no-build-isolation` builds where only torch is installed.
Standalone, with no torch and no package import:

    python torch_moe_ops/native_functions.py registrations   # print the generated C++ header
    python torch_moe_ops/native_functions.py readme          # rewrite README.md's table of ops
    python torch_moe_ops/native_functions.py readme --check  # exit 1 (with a diff) if it is stale
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_functions.yaml")

FAMILIES = ("grouped_mm", "experts", "routing", "fp8")
_KEYS = {"func", "family", "readme", "dispatch", "upstream", "not_upstreamed", "backward_of",
         "benchmarked_through", "cpu_only", "cuda_tested"}
_UPSTREAM_KEYS = {"name", "extends", "derivatives", "dispatch"}


# A dispatch value "py:<module>" says the kernel at that key is registered
# from Python, by that module, rather than by csrc/library.cpp.
PY = "py:"


# cuda_tested: generic says the CUDA kernel computes what the CPU kernel does,
# in device-generic ATen code: test/test_cuda_entries.py runs it through the
# dispatcher's CUDA slot on CPU tensors over every OpInfo sample and error input.
CUDA_TESTED_GENERIC = "generic"


class DeclarationError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Upstream:
    name: str                   # the aten op, e.g. "_moe_permute"
    extends: tuple[str, ...]    # dispatch keys added to upstream's existing entry; () for a new op
    derivatives: str | None     # derivatives.yaml formula lines, unindented
    # key -> the C++ kernel the series registers upstream where this build
    # registers another: a Python one (py:<module>), e.g. the CUDA entry a
    # Triton kernel stands in for here, or a project-only C++ entry that wraps
    # it (csrc/moe/)
    dispatch: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Op:
    func: str
    family: str
    dispatch: dict[str, str]
    upstream: Upstream | None = None
    not_upstreamed: str | None = None
    backward_of: str | None = None
    benchmarked_through: str | None = None
    cpu_only: str | None = None
    readme: str | None = None
    cuda_tested: str | None = None

    @property
    def name(self) -> str:
        return self.func.split("(", 1)[0]

    @property
    def qualname(self) -> str:
        return f"moe_ops::{self.name}"

    @property
    def has_own_cuda_kernel(self) -> bool:
        """A CUDA kernel of its own, not the CPU kernel registered for CUDA too."""
        return bool(self.dispatch.get("CUDA")) and self.dispatch.get("CUDA") != self.dispatch.get("CPU")

    @property
    def ops_module(self) -> str:
        return f"torch_moe_ops/ops/{self.family}.py"

    def upstream_func(self) -> str:
        """The schema under its aten name (the arguments are ours)."""
        return self.upstream.name + self.func[len(self.name):]

    def cpp_dispatch(self) -> dict[str, str]:
        """The keys csrc/library.cpp registers (at::native functions), not
        those registered from Python (``py:<module>``)."""
        return {k: v for k, v in self.dispatch.items() if not v.startswith(PY)}

    def upstream_dispatch(self) -> dict[str, str]:
        """The dispatch the series gives the aten op: every C++ key of ours
        for a new op, the keys it extends upstream's entry with otherwise;
        and upstream.dispatch's (C++ kernels standing for Python ones or
        project-only wrappers here)."""
        keys = self.upstream.extends or tuple(self.cpp_dispatch())
        return {**{k: self.dispatch[k] for k in keys}, **self.upstream.dispatch}


def _op(entry: dict, index: int) -> Op:
    where = f"{PATH}: entry {index + 1}"
    unknown = set(entry) - _KEYS
    if unknown:
        raise DeclarationError(f"{where}: unknown keys {sorted(unknown)}")
    func = entry.get("func")
    if not isinstance(func, str) or not re.match(r"^\w+\(", func):
        raise DeclarationError(f"{where}: func must be a schema, got {func!r}")
    where = f"{PATH}: {func.split('(', 1)[0]}"
    if entry.get("backward_of") is None and not isinstance(entry.get("readme"), str):
        raise DeclarationError(f"{where}: needs readme (its row in README.md's table of ops), got {entry.get('readme')!r}")
    if entry.get("backward_of") is not None and "readme" in entry:
        raise DeclarationError(f"{where}: a backward_of op has no README row (drop readme)")
    if entry.get("family") not in FAMILIES:
        raise DeclarationError(f"{where}: family must be one of {FAMILIES}, got {entry.get('family')!r}")
    dispatch = entry.get("dispatch") or {}
    if "CPU" not in dispatch:
        raise DeclarationError(f"{where}: dispatch has no CPU kernel")
    if "CUDA" not in dispatch and not entry.get("cpu_only"):
        raise DeclarationError(f"{where}: dispatch has no CUDA kernel and no cpu_only reason")
    if ("CUDA" in dispatch) != isinstance(entry.get("cuda_tested"), str):
        raise DeclarationError(f"{where}: cuda_tested (where the CUDA kernel is tested without a GPU, or "
                               f"{CUDA_TESTED_GENERIC!r}) goes with a CUDA dispatch, and only with one")
    upstream = entry.get("upstream")
    if (upstream is None) == (entry.get("not_upstreamed") is None):
        raise DeclarationError(f"{where}: needs exactly one of upstream and not_upstreamed")
    if upstream is not None:
        if set(upstream) - _UPSTREAM_KEYS or "name" not in upstream:
            raise DeclarationError(f"{where}: upstream takes {sorted(_UPSTREAM_KEYS)} and needs a name")
        extends = tuple(upstream.get("extends", ()))
        if set(extends) - set(dispatch) or any(dispatch[k].startswith(PY) for k in extends):
            raise DeclarationError(f"{where}: upstream extends keys {extends} that dispatch has no C++ kernel for")
        up_dispatch = dict(upstream.get("dispatch") or {})
        if any(dispatch.get(k) in (None, v) for k, v in up_dispatch.items()):
            raise DeclarationError(f"{where}: upstream dispatch {up_dispatch} names keys that dispatch has no "
                                   "kernel for, or the kernel dispatch has (a kernel of ours goes upstream as it is)")
        upstream = Upstream(upstream["name"], extends, upstream.get("derivatives"), up_dispatch)
    return Op(func=func, family=entry["family"], dispatch=dict(dispatch), upstream=upstream,
              not_upstreamed=entry.get("not_upstreamed"), backward_of=entry.get("backward_of"),
              benchmarked_through=entry.get("benchmarked_through"), cpu_only=entry.get("cpu_only"),
              readme=entry.get("readme"), cuda_tested=entry.get("cuda_tested"))


@functools.cache
def load() -> tuple[Op, ...]:
    import yaml

    with open(PATH, encoding="utf-8") as f:
        entries = yaml.safe_load(f)
    ops = tuple(_op(entry, i) for i, entry in enumerate(entries))
    names = [op.name for op in ops]
    if len(set(names)) != len(names):
        raise DeclarationError(f"{PATH}: an op is declared twice: {names}")
    for op in ops:
        if op.backward_of is not None and op.backward_of not in names:
            raise DeclarationError(f"{PATH}: {op.name}: backward_of names no declared op: {op.backward_of}")
    return ops


def ops(family: str | None = None) -> list[Op]:
    return [op for op in load() if family is None or op.family == family]


def op(name: str) -> Op:
    (found,) = [o for o in load() if o.name == name]
    return found


def public_ops(family: str | None = None) -> list[Op]:
    """The ops users call (each has its OpInfo, benchmark and README row)."""
    return [o for o in ops(family) if o.backward_of is None]


def upstreamed(family: str | None = None) -> list[Op]:
    return [o for o in ops(family) if o.upstream is not None]


def upstream_names() -> dict[str, str]:
    """moe_ops name -> aten name, for every op that goes upstream."""
    return {o.name: o.upstream.name for o in upstreamed()}


def families() -> list[str]:
    """The families that have ops, in FAMILIES' order."""
    return [f for f in FAMILIES if ops(f)]


# ---------------------------------------------------------------------------
# csrc/library.cpp's registrations, generated from the declaration (as torchgen
# generates ATen's RegisterCPU.cpp etc. from native_functions.yaml). setup.py
# writes the header into the build tree before compiling; .ci/cached_build
# keys the build on this file and the yaml.

REGISTRATIONS_HEADER = "torch_moe_ops/RegisterMoeOps.h"
# The dispatch keys library.cpp has a TORCH_LIBRARY_IMPL block for, and the
# macro a key's kernels are compiled under (None: always).
CPP_KEYS = {"CPU": None, "CUDA": "TORCH_MOE_OPS_WITH_CUDA"}


def _cpp_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _registration_entries() -> list[tuple[str, dict[str, str]]]:
    """(func, dispatch) of every entry, read without PyYAML: only the
    `- func: <schema>` lines and the `  dispatch:` block's `    KEY: value`
    lines (test_op_pieces checks the result against load()). Anything else
    in those places is an error rather than a guess."""
    entries: list[tuple[str, dict[str, str]]] = []
    in_dispatch = False
    with open(PATH, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            body = line.rstrip("\n")
            if not body.strip() or body.lstrip().startswith("#"):
                continue
            indent = len(body) - len(body.lstrip(" "))
            if body.startswith("-"):
                m = re.fullmatch(r"- func: (\w+\(.*\) -> \S.*)", body)
                if m is None:
                    raise DeclarationError(f"{PATH}:{n}: an entry must start with `- func: <schema>` "
                                           f"(unquoted, on one line), got {body!r}")
                entries.append((m[1], {}))
                in_dispatch = False
            elif indent == 2:
                in_dispatch = body == "  dispatch:"
            elif in_dispatch:
                m = re.fullmatch(r"    (\w+): ([\w.:]+)", body)
                if m is None or not entries:
                    raise DeclarationError(f"{PATH}:{n}: dispatch takes plain `KEY: function` lines "
                                           f"indented by 4, got {body!r}")
                entries[-1][1][m[1]] = m[2]
    return entries


def registrations_header() -> str:
    """The C++ header csrc/library.cpp includes: define_schemas(m) for its
    TORCH_LIBRARY block and register_<KEY>(m) for each TORCH_LIBRARY_IMPL.
    Needs no PyYAML (setup.py runs it)."""
    ops = [Op(func=func, family="", dispatch=dispatch) for func, dispatch in _registration_entries()]
    for o in ops:
        other = set(o.cpp_dispatch()) - set(CPP_KEYS)
        if other:
            raise DeclarationError(f"{PATH}: {o.name}: csrc/library.cpp registers C++ kernels at "
                                   f"{sorted(CPP_KEYS)} only, not {sorted(other)} (use py:<module> there)")
    lines = [
        "// Generated from torch_moe_ops/native_functions.yaml by torch_moe_ops/native_functions.py",
        "// (run by setup.py into the build tree). Do not edit: edit the yaml.",
        "#pragma once",
        "",
        "#include <torch/library.h>",
        "",
        "namespace torch_moe_ops::generated {",
        "",
        "inline void define_schemas(torch::Library& m) {",
        *(f"  m.def({_cpp_string(o.func)});" for o in ops),
        "}",
    ]
    for key, macro in CPP_KEYS.items():
        body = [f"  m.impl({_cpp_string(o.name)}, &at::native::{o.cpp_dispatch()[key]});"
                for o in ops if key in o.cpp_dispatch()]
        lines += ["", *([f"#if defined({macro})"] if macro else []),
                  f"inline void register_{key}(torch::Library& m) {{", *body, "}",
                  *([f"#endif  // {macro}"] if macro else [])]
    lines += ["", "}  // namespace torch_moe_ops::generated", ""]
    return "\n".join(lines)


def write_registrations_header(include_dir: str) -> str:
    """Writes registrations_header() under include_dir (only when it changed,
    so that ninja does not recompile library.cpp for nothing); its path."""
    path = os.path.join(include_dir, REGISTRATIONS_HEADER)
    text = registrations_header()
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------
# README.md's table of ops, generated between these markers (test_op_pieces
# fails when it is stale).

README = os.path.join(os.path.dirname(os.path.dirname(PATH)), "README.md")
README_BEGIN = "<!-- ops-table: generated from torch_moe_ops/native_functions.yaml " \
               "by `python torch_moe_ops/native_functions.py readme` -->\n"
README_END = "<!-- /ops-table -->"


def _arguments(func: str) -> list[str]:
    """The arguments of a schema, as written ("Tensor? offs=None", "*")."""
    depth, start, out = 0, func.index("(") + 1, []
    for i in range(start, len(func)):
        c = func[i]
        if c in "([":
            depth += 1
        elif c in ")]" and depth:
            depth -= 1
        elif c == ")" or (c == "," and depth == 0):
            out.append(func[start:i].strip())
            start = i + 1
            if c == ")":
                return [a for a in out if a]
    raise DeclarationError(f"{PATH}: unbalanced schema {func!r}")


def call_signature(op: Op) -> str:
    """How Python calls the op: moe_ops::name(arg, arg=default, ...)."""
    names = [a if a == "*" else a.split(" ", 1)[1] for a in _arguments(op.func)]
    return f"moe_ops::{op.name}({', '.join(names)})"


def readme_table() -> str:
    rows = [f"| `{call_signature(o)}` | {' '.join(o.readme.split())} |" for o in public_ops()]
    return "\n".join(["| op | what it does |", "|---|---|", *rows]) + "\n"


def render_readme(text: str) -> str:
    """text (README.md) with its table of ops regenerated."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise DeclarationError(f"{README}: no {README_BEGIN.strip()} ... {README_END} block")
    return text[:begin + len(README_BEGIN)] + readme_table() + text[end:]


def _main(argv: list[str]) -> int:
    import argparse
    import difflib
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["registrations", "readme"])
    parser.add_argument("--check", action="store_true", help="readme: exit 1 if README.md is stale")
    args = parser.parse_args(argv)
    if args.what == "registrations":
        sys.stdout.write(registrations_header())
        return 0
    with open(README, encoding="utf-8") as f:
        text = f.read()
    rendered = render_readme(text)
    if args.check:
        if rendered != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True),
                                                       "README.md", "README.md (rendered)"))
            print("README.md's table of ops is stale: run `python torch_moe_ops/native_functions.py readme`")
            return 1
        return 0
    if rendered != text:
        with open(README, "w", encoding="utf-8") as f:
            f.write(rendered)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))

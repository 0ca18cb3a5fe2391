"""Compiles what the series carries, as a PyTorch build with the series would.

``python -m patches.generate`` checks that the patched files parse; the tests
run the patched Python against this package's kernels. What neither shows is
that the carried C++ builds *in-tree*, where the ATen operator headers are
generated from the patched ``native_functions.yaml`` and the entry points must
have the signatures that yaml gives them, and that the derivative formulas
compile as the autograd code generated from ``derivatives.yaml``. This module
proves that much without a PyTorch source tree (test/test_patches.py runs it;
``python -m patches.proof`` runs it by hand):

1. ATen headers: the wheel's torchgen, with its packaged templates, generates
   the operator headers (``ATen/ops/*.h``, ``Functions.h``, ``NativeFunctions.h``,
   ``RedispatchFunctions.h``, ...) for the patched yaml. Those that differ from
   the wheel's form an overlay put before the wheel's include directory. Every
   header of an op the series does not touch must come out byte-identical to
   the wheel's (less the wheel's install guard): the generator reproduces the
   v2.14.1 build, so the overlay is what that build would generate with the
   series.
2. Autograd: torchgen's autograd generator writes ``Functions.h``/``Functions.cpp``
   (the backward nodes, i.e. the formulas' code) for the derivatives the series
   adds or changes, and ``VariableType`` (the autograd kernels that save what the
   formulas use) for those ops and the new ones.
3. Compile: every carried C++ file, as ATen compiles it (``native/cpu/`` once
   per CPU capability; ``native/cuda/*.cpp`` with the CUDA headers;
   ``native/cuda/*.cu`` with nvcc), with upstream's warning flags as errors
   (``torch_compile_options`` in cmake/public/utils.cmake, a WERROR build), and
   the generated autograd code: ``g++ -fsyntax-only`` (nvcc ``--cuda``, to PTX
   only). The TU of each carried entry-point file ends with a check, per kernel
   that the yaml names and the file mentions, that ``at::native::<kernel>`` has
   exactly the signature torchgen declares for it, and then includes the
   generated ``<op>_native.h`` headers, so a declaration that disagrees with
   them does not compile either.
4. aten names: GeneratedAten resolves the ``aten.<name>`` of the patched meta
   functions and OpInfos against the ops the patched yaml generates (a
   misspelt name raises), with their generated schemas; an op the series adds
   or changes runs here by the moe_ops kernel of the same schema.

Results are cached under ``~/.cache/torch-moe-ops/patchproof`` (override with
``TORCH_MOE_OPS_CACHE``) per unit, as ccache's direct mode does: keyed by the
unit's text, flags, compiler, the torch version and the names of the files
under its include roots, a unit is found compiled while every file the
compiler read for it (its -MD list) has the content it had then. A change to
one carried file recompiles the units that read it, not the series.

Out of reach here: object code, linking (a kernel declared but never defined
compiles), ATen's exact per-file flags, and running any of it in-tree; see
patches/README.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import torchgen
import yaml

from torch_moe_ops import native_functions

from . import manifest
from .errors import PatchError

TORCH_DIR = os.path.dirname(torch.__file__)
TORCHGEN_DIR = os.path.dirname(torchgen.__file__)
TORCH_INCLUDE = os.path.join(TORCH_DIR, "include")
ATEN_TEMPLATES = os.path.join(TORCHGEN_DIR, "packaged", "ATen", "templates")
AUTOGRAD_TEMPLATES = os.path.join(TORCHGEN_DIR, "packaged", "autograd", "templates")

NATIVE_YAML = "aten/src/ATen/native/native_functions.yaml"
TAGS_YAML = "aten/src/ATen/native/tags.yaml"
DERIVATIVES_YAML = "tools/autograd/derivatives.yaml"
AUTOGRAD_TEMPLATES_IN_TREE = "tools/autograd/templates"
GENERATED_AUTOGRAD = "torch/csrc/autograd/generated"
FUNCTIONS_MANUAL_CPP = "torch/csrc/autograd/FunctionsManual.cpp"
FUNCTIONS_MANUAL_H = "torch/csrc/autograd/FunctionsManual.h"

# The wheel wraps every installed header in this guard; torchgen does not write it.
_GUARD_OPEN = "#if !defined(TORCH_STABLE_ONLY) && !defined(TORCH_TARGET_VERSION)\n"
_GUARD_CLOSE = ('\n#else\n#error "This file should not be included when either TORCH_STABLE_ONLY or '
                'TORCH_TARGET_VERSION is defined."\n#endif  // !defined(TORCH_STABLE_ONLY) && '
                '!defined(TORCH_TARGET_VERSION)\n')

# ATen compiles native/cpu/ once per CPU capability, each with its macros and
# ISA flags (cmake/Codegen.cmake), so every branch of a DispatchStub
# registration is compiled.
CPU_CAPABILITY_BUILDS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}

# How ATen compiles its sources: per-operator headers, the DispatchStub slots
# of the x86 builds, OpenMP (at::parallel_for).
CXX_FLAGS = ["-std=c++20", "-fsyntax-only", "-fopenmp", "-DAT_PER_OPERATOR_HEADERS",
             "-DHAVE_AVX512_CPU_DEFINITION", "-DHAVE_AVX2_CPU_DEFINITION"]
# torch_compile_options (cmake/public/utils.cmake) for GCC, with WERROR=1 as in
# upstream CI. Warnings of the wheel's and the generated headers are not ours:
# those directories are -isystem.
WARNING_FLAGS = ["-Wall", "-Wextra", "-Wdeprecated", "-Wunused", "-Wno-unused-parameter",
                 "-Wno-missing-field-initializers", "-Wno-array-bounds", "-Wno-unknown-pragmas",
                 "-Wno-strict-overflow", "-Wno-strict-aliasing", "-Wredundant-move", "-Wno-interference-size",
                 "-Werror"]
# One architecture, PTX only: enough to type-check host and device code.
NVCC_FLAGS = ["-std=c++20", "--cuda", "-o", os.devnull, "-gencode=arch=compute_90a,code=compute_90a",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "-DAT_PER_OPERATOR_HEADERS",
              "-DHAVE_AVX512_CPU_DEFINITION", "-DHAVE_AVX2_CPU_DEFINITION", "-x", "cu"]

# aten op the series adds or changes -> the moe_ops op whose kernels it carries
# (the declaration's upstream names). The generated aten schema must be that
# op's (argument names aside).
MOE_OPS = {aten: op for op, aten in native_functions.upstream_names().items()}


def cache_dir(*parts: str) -> str:
    root = os.environ.get("TORCH_MOE_OPS_CACHE") or os.path.expanduser("~/.cache/torch-moe-ops")
    return os.path.join(root, "patchproof", *parts)


def prune(directory: str, keep: int = 8) -> None:
    """Keeps the keep most recently used entries of a cache directory."""
    try:
        entries = sorted((os.path.join(directory, n) for n in os.listdir(directory)), key=os.path.getmtime)
    except OSError:
        return
    for path in entries[:-keep]:
        # compile_all's threads prune the same directory: another may have removed it already.
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _sha(*texts: str | bytes) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t if isinstance(t, bytes) else t.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------
# What the series changes in the yaml.

def yaml_paths(tree: str) -> tuple[str, str, str]:
    """The tree's native_functions.yaml, tags.yaml and derivatives.yaml at
    paths named by their content. torchgen caches what it parses by path for
    the life of the process, so a file that changes at the same path (the
    generator patches the yaml in place) would be read stale."""
    texts = [_read(os.path.join(tree, p)) for p in (NATIVE_YAML, TAGS_YAML, DERIVATIVES_YAML)]
    root = cache_dir("yaml", _sha("yaml/1", *texts))
    paths = tuple(os.path.join(root, os.path.basename(p)) for p in (NATIVE_YAML, TAGS_YAML, DERIVATIVES_YAML))
    if not all(os.path.isfile(p) for p in paths):
        os.makedirs(root, exist_ok=True)
        for path, text in zip(paths, texts):
            with tempfile.NamedTemporaryFile("w", dir=root, delete=False) as f:
                f.write(text)
            os.replace(f.name, path)
        prune(os.path.dirname(root), keep=16)
    return paths


def parse(tree: str):
    """torchgen's parse of the tree's native_functions.yaml."""
    from torchgen.gen import parse_native_yaml
    native, tags, _ = yaml_paths(tree)
    return parse_native_yaml(native, tags)


def parse_base():
    """torchgen's parse of v2.14.1's native_functions.yaml (the wheel's)."""
    from torchgen.gen import parse_native_yaml
    from .base import WHEEL_PATHS
    return parse_native_yaml(WHEEL_PATHS[NATIVE_YAML], WHEEL_PATHS[TAGS_YAML])


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel as the patched yaml declares it, where v2.14.1's does not."""

    op: str        # the aten overload, e.g. "_moe_permute"
    key: str       # its dispatch key, e.g. "CPU"
    name: str      # at::native::<name>
    decl: str      # the declaration torchgen writes in ATen/ops/<root>_native.h
    ptr_type: str  # the C++ type of &at::native::<name>
    root: str      # the op's root name (its ATen/ops/<root>*.h headers)
    # A structured kernel (the out= overload of a structured op) is the impl of
    # struct structured_<name>, which the generated <root>_native.h declares:
    # the carried file defining TORCH_IMPL_FUNC(<name>) is checked by compiling
    # that definition against the declaration, not by a static_assert.
    structured: bool = False


def _kernels(parsed) -> dict[tuple[str, str], tuple]:
    from torchgen.api.types import kernel_signature
    from torchgen.context import native_function_manager

    out = {}
    for f in parsed.native_functions:
        for key, index in parsed.backend_indices.items():
            metadata = index.get_kernel(f)
            if metadata is None:
                continue
            with native_function_manager(f):
                sig = kernel_signature(f, index)
                out[(str(f.func.name), str(key))] = (metadata, sig.decl(name=metadata.kernel), sig.ptr_type(),
                                                     f.root_name)
    return out


def series_kernels(base, patched) -> list[Kernel]:
    """Every (op, dispatch key) whose kernel the series adds, renames or
    declares differently (a schema change)."""
    old = _kernels(base)
    kernels = []
    for (op, key), (metadata, decl, ptr_type, root) in sorted(_kernels(patched).items()):
        previous = old.get((op, key))
        if previous is not None and (previous[0].kernel, previous[1]) == (metadata.kernel, decl):
            continue
        kernels.append(Kernel(op, key, metadata.kernel, decl, ptr_type, root, bool(metadata.structured)))
    return kernels


def series_roots(base, patched) -> set[str]:
    """Root names of the ops whose ATen headers the series changes: new ops and
    ops whose kernels it changes."""
    old = {str(f.func.name) for f in base.native_functions}
    roots = {f.root_name for f in patched.native_functions if str(f.func.name) not in old}
    return roots | {k.root for k in series_kernels(base, patched)}


def generated_ops(parsed) -> dict[str, dict[str, object]]:
    """aten op name -> {overload name ("default" for none) -> torchgen FunctionSchema}."""
    ops: dict[str, dict[str, object]] = {}
    for f in parsed.native_functions:
        ops.setdefault(str(f.func.name.name), {})[f.func.name.overload_name or "default"] = f.func
    return ops


# ---------------------------------------------------------------------------
# aten names in the patched Python resolve to generated ops.

def _default(value: object) -> object:
    """A schema default, comparable across torch's and torchgen's spelling
    ("1." and "1.0", '"softmax"' and "'softmax'")."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        return text.strip("'\"")


def schema_mismatch(generated, impl_schema) -> str | None:
    """Why the torchgen schema generated differs from the torch schema
    impl_schema in types, defaults, keyword-only arguments or returns (names
    of positional arguments may differ: they are passed by position); None if
    they agree."""
    from torchgen.model import FunctionSchema

    ours = FunctionSchema.parse(str(impl_schema).split("::", 1)[-1])
    def args(s):
        return [(str(a.type), _default(a.default), kwarg_only, a.name if kwarg_only else None)
                for kwarg_only, group in ((False, s.arguments.flat_positional), (True, s.arguments.flat_kwarg_only))
                for a in group]
    if args(generated) != args(ours):
        return f"arguments differ: {args(generated)} != {args(ours)}"
    if [str(r.type) for r in generated.returns] != [str(r.type) for r in ours.returns]:
        return f"returns differ: {[str(r.type) for r in generated.returns]} != {[str(r.type) for r in ours.returns]}"
    return None


class GeneratedOverload:
    """An overload the patched yaml generates, run by this package's kernel of
    the same schema."""

    def __init__(self, op: str, overload: str, schema, impl):
        mismatch = schema_mismatch(schema, impl._schema)
        if mismatch:
            raise AssertionError(f"aten::{schema} (patched native_functions.yaml) and {impl._schema}, whose "
                                 f"kernels the series carries, differ: {mismatch}")
        self.op, self.overload, self.schema, self.impl = op, overload, schema, impl
        self.__name__ = f"{op}.{overload}"

    def __call__(self, *args, **kwargs):
        return self.impl(*args, **kwargs)

    def __repr__(self) -> str:
        return f"aten.{self.op}.{self.overload} (generated; runs {self.impl})"


class GeneratedOp:
    """An op of the patched yaml that the series adds or changes (MOE_OPS)."""

    def __init__(self, name: str, schemas: dict, impl):
        self.name, self.schemas, self.impl = name, schemas, impl
        self.__name__ = name

    def overloads(self) -> list[str]:
        return list(self.schemas)

    def __getattr__(self, overload: str) -> GeneratedOverload:
        if overload.startswith("__") or overload not in self.schemas:
            raise AttributeError(f"aten.{self.name}.{overload}: the patched native_functions.yaml gives "
                                 f"aten::{self.name} the overloads {sorted(self.schemas)}")
        return GeneratedOverload(self.name, overload, self.schemas[overload], getattr(self.impl, overload))

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)

    def __repr__(self) -> str:
        return f"aten.{self.name} (generated)"


class GeneratedAten:
    """``torch.ops.aten`` as a build with the series has it. A name resolves to
    an op of the patched native_functions.yaml or raises AttributeError: an op
    the series adds or changes is a GeneratedOp (its generated schemas, run
    here by the moe_ops kernel of the same schema, MOE_OPS), any other op is
    the wheel's."""

    def __init__(self, tree: str):
        self._ops = generated_ops(parse(tree))
        self._new = set(self._ops) - set(generated_ops(parse_base()))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in self._ops:
            import difflib
            close = difflib.get_close_matches(name, list(self._ops), n=1)
            raise AttributeError(f"aten.{name}: the patched native_functions.yaml defines no such op"
                                 + (f" (aten.{close[0]}?)" if close else ""))
        if name in MOE_OPS:
            return GeneratedOp(name, self._ops[name], getattr(torch.ops.moe_ops, MOE_OPS[name]))
        if name in self._new:
            raise AttributeError(f"aten.{name}: the series adds it, but no op of "
                                 "torch_moe_ops/native_functions.yaml has it as its upstream name")
        return getattr(torch.ops.aten, name)


def torchgen_schemas(op) -> list:
    """torchgen schemas of what register_meta receives: an op or overload of
    GeneratedAten (or of the wheel), or a list of them."""
    from torchgen.model import FunctionSchema

    if isinstance(op, (list, tuple)):
        return [s for o in op for s in torchgen_schemas(o)]
    if isinstance(op, GeneratedOverload):
        return [op.schema]
    if isinstance(op, GeneratedOp):
        return list(op.schemas.values())
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [FunctionSchema.parse(str(getattr(op, o)._schema).split("::", 1)[-1]) for o in op.overloads()]
    if isinstance(op, torch._ops.OpOverload):
        return [FunctionSchema.parse(str(op._schema).split("::", 1)[-1])]
    raise TypeError(f"register_meta of {op!r}: not an aten op")


def meta_signature_mismatch(fn, schema) -> str | None:
    """Why fn cannot take a call of schema (all positional arguments by
    position and keyword-only ones by name, or only the required ones)."""
    import inspect

    positional = schema.arguments.flat_positional
    keyword = list(schema.arguments.flat_kwarg_only) + list(schema.arguments.out)
    signature = inspect.signature(fn)
    for args, kwargs in (
            ([a.name for a in positional], {a.name: a.name for a in keyword}),
            ([a.name for a in positional if a.default is None],
             {a.name: a.name for a in keyword if a.default is None})):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            return f"{fn.__name__}{signature} cannot take aten::{schema}: {e}"
    return None


# ---------------------------------------------------------------------------
# 1. ATen headers.

def _strip_guard(text: str) -> str:
    if text.startswith(_GUARD_OPEN) and text.endswith(_GUARD_CLOSE):
        return text[len(_GUARD_OPEN):-len(_GUARD_CLOSE)]
    return text


def _wheel_header(rel: str) -> str | None:
    """The wheel's copy of the generated header ATen/<rel>, guard removed."""
    candidates = [os.path.join(TORCH_INCLUDE, "ATen", rel)]
    if rel == "core/enum_tag.h":
        candidates.insert(0, os.path.join(TORCH_INCLUDE, "torch", "headeronly", "core", "enum_tag.h"))
    for path in candidates:
        if os.path.isfile(path):
            return _strip_guard(_read(path))
    return None


def _owned_by(rel: str, roots: set[str]) -> bool:
    """Whether the generated header ATen/<rel> may differ from the wheel's:
    the aggregate headers (they list every op) and the per-operator headers of
    the ops the series changes."""
    if not rel.startswith("ops/"):
        return True
    name = rel[len("ops/"):-len(".h")]
    for root in roots:
        if name == root or (name.startswith(root + "_")
                            and re.fullmatch(r"_ops|_native|_meta|_[a-z0-9]+_dispatch", name[len(root):])):
            return True
    return False


def aten_headers(tree: str) -> str:
    """The include directory of the ATen headers the patched yaml generates
    that differ from the wheel's (put it before the wheel's include directory)."""
    native, tags = (_read(os.path.join(tree, p)) for p in (NATIVE_YAML, TAGS_YAML))
    key = _sha("aten-headers/1", native, tags, torch.__version__, TORCHGEN_DIR)
    dest = cache_dir("aten-headers", key)
    if os.path.isfile(os.path.join(dest, ".complete")):
        os.utime(dest)
        return dest
    roots = series_roots(parse_base(), parse(tree))
    with tempfile.TemporaryDirectory(prefix="moe-aten-headers-") as tmp:
        src = os.path.join(tmp, "src")
        os.makedirs(os.path.join(src, "native"))
        shutil.copyfile(os.path.join(tree, NATIVE_YAML), os.path.join(src, "native", "native_functions.yaml"))
        shutil.copyfile(os.path.join(tree, TAGS_YAML), os.path.join(src, "native", "tags.yaml"))
        os.symlink(ATEN_TEMPLATES, os.path.join(src, "templates"))
        out = os.path.join(tmp, "out")
        result = subprocess.run(
            [sys.executable, "-m", "torchgen.gen", "--source-path", src, "--install-dir", out,
             "--aoti-install-dir", os.path.join(tmp, "aoti"), "--per-operator-headers", "--generate", "headers"],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise PatchError(NATIVE_YAML, None, "torchgen cannot generate the ATen headers:\n"
                             + result.stderr[-4000:].replace(src + "/", ""))
        overlay, unexpected = [], []
        for dirpath, _, files in os.walk(out):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), out)
                text = _read(os.path.join(out, rel))
                if text == _wheel_header(rel):
                    continue
                (overlay if _owned_by(rel, roots) else unexpected).append(rel)
        if unexpected:
            raise PatchError(NATIVE_YAML, None, "torchgen generates these headers differently from the torch "
                             f"wheel although the series does not touch their ops: {sorted(unexpected)[:20]}; "
                             "the generator does not reproduce the v2.14.1 build, so its headers prove nothing")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=key + ".", dir=os.path.dirname(dest))
        for rel in overlay:
            target = os.path.join(staging, "ATen", rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(out, rel), target)
        with open(os.path.join(staging, "overlay.txt"), "w") as f:
            f.write("".join(f"ATen/{rel}\n" for rel in sorted(overlay)))
        open(os.path.join(staging, ".complete"), "w").close()
        try:
            os.rename(staging, dest)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    prune(os.path.dirname(dest))
    return dest


def overlay_files(overlay: str) -> list[str]:
    return _read(os.path.join(overlay, "overlay.txt")).split()


# ---------------------------------------------------------------------------
# 2. Autograd code.

def _derivative_entries(text: str) -> dict[str, dict]:
    """op name (with overload) -> its derivatives.yaml entry."""
    return {entry["name"].split("(", 1)[0]: entry for entry in yaml.safe_load(text)}


def series_derivatives(tree: str) -> set[str]:
    """The derivatives.yaml entries the series adds or changes (op names)."""
    from .base import WHEEL_PATHS
    old = _derivative_entries(_read(WHEEL_PATHS[DERIVATIVES_YAML]))
    new = _derivative_entries(_read(os.path.join(tree, DERIVATIVES_YAML)))
    return {name for name, entry in new.items() if old.get(name) != entry}


def autograd_sources(tree: str, out_root: str, derivatives: set[str] | None = None) -> list[str]:
    """Generates into out_root/torch/csrc/autograd/generated/ the autograd code
    of the series' derivatives (Functions.h/.cpp) and ops (VariableType.h,
    VariableTypeEverything.cpp); returns the .cpp files, relative to out_root."""
    from torchgen.api import cpp
    from torchgen.api.autograd import match_differentiability_info
    from torchgen.packaged.autograd.gen_autograd_functions import gen_autograd_functions_lib
    from torchgen.packaged.autograd.gen_variable_type import gen_variable_type
    from torchgen.packaged.autograd.load_derivatives import load_derivatives

    native, tags, derivatives_yaml = yaml_paths(tree)
    derivatives = series_derivatives(tree) if derivatives is None else derivatives
    try:
        infos, used_keys = load_derivatives(derivatives_yaml, native, tags)
    except Exception as e:  # torchgen raises bare AssertionErrors and the like
        raise PatchError(DERIVATIVES_YAML, None, f"torchgen rejects it: {e}") from None
    selected = {schema: by_key for schema, by_key in infos.items() if str(schema.name) in derivatives}
    missing = derivatives - {str(schema.name) for schema in selected}
    if missing:
        raise PatchError(DERIVATIVES_YAML, None, f"no differentiability info for {sorted(missing)}")

    # The templates as the tree has them (a series may patch them).
    templates = os.path.join(out_root, "templates")
    shutil.copytree(AUTOGRAD_TEMPLATES, templates, dirs_exist_ok=True)
    shutil.copytree(os.path.join(tree, AUTOGRAD_TEMPLATES_IN_TREE), templates, dirs_exist_ok=True)
    out = os.path.join(out_root, GENERATED_AUTOGRAD)
    os.makedirs(out, exist_ok=True)
    gen_autograd_functions_lib(out, selected, templates)

    new_ops = set(generated_ops(parse(tree))) - set(generated_ops(parse_base()))
    ops = {name.split(".")[0] for name in derivatives} | new_ops
    fns = sorted((f for f in parse(tree).native_functions if str(f.func.name.name) in ops),
                 key=lambda f: cpp.name(f.func))
    gen_variable_type(out, native, tags, match_differentiability_info(fns, infos), templates, used_keys)
    return [f"{GENERATED_AUTOGRAD}/Functions.cpp", f"{GENERATED_AUTOGRAD}/VariableTypeEverything.cpp"]


# ---------------------------------------------------------------------------
# 3. Compile.

def carried_files() -> list[str]:
    """In-tree paths of the C++ files the series adds (Copy changes)."""
    return sorted({c.path for s in manifest.SERIES for p in s.patches for c in p.changes
                   if isinstance(c, manifest.Copy) and c.path.endswith(CXX_SOURCES)})


CXX_SOURCES = (".h", ".cpp", ".cu", ".cuh")


def intermediate_versions() -> dict[str, dict[str, str]]:
    """The carried C++ as the PRs leave it where that is not the series' end
    state (a file a stack grows over several PRs: Copy's undefine / edits /
    update): patch message -> {in-tree path: text} of every carried C++ file
    the series holds after that patch, for the patches after which some file
    differs from its last version."""
    states: list[tuple[str, dict[str, str]]] = []
    state: dict[str, str] = {}
    for series in manifest.SERIES:
        for patch in series.patches:
            for c in patch.changes:
                if isinstance(c, manifest.Copy) and c.path.endswith(CXX_SOURCES):
                    state[c.path] = c.apply(state.get(c.path))
            states.append((patch.message, dict(state)))
    return {message: files for message, files in states
            if any(text != state[path] for path, text in files.items())}


@functools.lru_cache(maxsize=None)
def cuda_toolkit() -> str | None:
    """A CUDA toolkit (nvcc and the CUDA headers), as setup.py finds one."""
    from torch.utils import cpp_extension

    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for home in [explicit] if explicit else [cpp_extension.CUDA_HOME, "/usr/local/cuda"]:
        if home and all(os.path.isfile(os.path.join(home, f))
                        for f in ("bin/nvcc", "include/cuda_runtime.h", "include/crt/host_defines.h")):
            return home
    return None


def cuda_includes() -> list[str]:
    """The CUDA headers torch's CUDA headers need: the toolkit's and the nvidia
    wheels' (cusparse.h, ...)."""
    dirs = []
    toolkit = cuda_toolkit()
    for base in sys.path:
        path = os.path.join(base, "nvidia", "cu13", "include")
        if os.path.isdir(path) and path not in dirs:
            dirs.append(path)
    if toolkit:
        dirs.append(os.path.join(toolkit, "include"))
    return dirs


@dataclasses.dataclass
class Unit:
    """One translation unit: name (the in-tree path, with a capability or a
    note), its text, and how to compile it."""

    name: str
    source: str
    compiler: str           # "g++" or "nvcc"
    flags: list[str]
    kernels: list[Kernel] = dataclasses.field(default_factory=list)  # signatures it checks
    skip: str | None = None  # why it cannot be compiled here


@dataclasses.dataclass
class Result:
    unit: Unit
    ok: bool
    output: str = ""
    cached: bool = False
    seconds: float = 0.0

    def report(self) -> str:
        checks = "".join(f"\n  {k.op} [{k.key}]: {k.decl};" for k in self.unit.kernels)
        return (f"{self.unit.name} does not compile as the in-tree build would"
                + (f" (it also checks that these kernels have the signatures torchgen declares:{checks})"
                   if checks else "")
                + f":\n{self.output[-6000:]}")


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\s*\(", text) is not None


def _defines(text: str, k: Kernel) -> bool:
    """Whether text may define kernel k: mentions it, or, structured, defines TORCH_IMPL_FUNC(name)."""
    if k.structured:
        return re.search(rf"\bTORCH_IMPL_FUNC\(\s*{re.escape(k.name)}\s*\)", text) is not None
    return _mentions(text, k.name)


def signature_checks(kernels: list[Kernel], roots: set[str]) -> str:
    """Appended to an entry-point TU: each kernel has the declared signature
    (before the generated declarations are visible, so the message is ours),
    then the generated <root>_native.h headers, which must agree with every
    declaration the file made."""
    lines = ["", "// patches/proof.py: the kernels native_functions.yaml names, as torchgen declares them.",
             "#include <type_traits>"]
    for k in (k for k in kernels if not k.structured):
        message = (f"native_functions.yaml: the {k.key} kernel of aten::{k.op} is declared "
                   f"'{k.decl}' in ATen/ops/{k.root}_native.h; at::native::{k.name} here does not match it")
        lines.append(f"static_assert(std::is_same_v<decltype(&at::native::{k.name}), {k.ptr_type}>, "
                     f"{json.dumps(message)});")
    lines += [f"#include <ATen/ops/{root}_native.h>" for root in sorted(roots)]
    return "\n".join(lines) + "\n"


def units(tree: str, overlay: str, autograd_root: str | None, kernels: list[Kernel], roots: set[str],
          sources: list[str] | None = None) -> list[Unit]:
    """The translation units of the carried files (sources: in-tree paths,
    default carried_files()) and of the generated autograd code."""
    includes = ["-I", os.path.join(tree, "aten", "src"), "-I", tree, "-isystem", overlay,
                "-isystem", TORCH_INCLUDE, "-isystem", os.path.join(TORCH_INCLUDE, "torch", "csrc", "api", "include")]
    toolkit = cuda_toolkit()
    no_cuda = None if toolkit else "no CUDA toolkit (set CUDA_HOME): the CUDA sources cannot be compiled here"
    cuda = [flag for d in cuda_includes() for flag in ("-isystem", d)]
    out = []
    for path in sources if sources is not None else carried_files():
        full = os.path.join(tree, path)
        text = _read(full)
        head = f'#include "{full}"\n'
        mine = [k for k in kernels if _defines(text, k)]
        checks = signature_checks(mine, roots)
        if path.endswith((".h", ".cuh")):
            continue  # compiled where they are included; see headers_not_compiled()
        if "/native/cpu/" in path:
            for capability, isa in sorted(CPU_CAPABILITY_BUILDS.items()):
                out.append(Unit(f"{path} [{capability}]", head, "g++",
                                CXX_FLAGS + WARNING_FLAGS + [f"-DCPU_CAPABILITY={capability}",
                                                             f"-DCPU_CAPABILITY_{capability}"] + isa + includes))
        elif "/native/cuda/" in path and path.endswith(".cu"):
            nvcc = os.path.join(toolkit, "bin", "nvcc") if toolkit else "nvcc"
            out.append(Unit(path, head + checks, nvcc, NVCC_FLAGS + includes + cuda, mine, skip=no_cuda))
        elif "/native/cuda/" in path:
            out.append(Unit(path, head + checks, "g++", CXX_FLAGS + WARNING_FLAGS + includes + cuda, mine,
                            skip=no_cuda))
        elif path.startswith("aten/src/ATen/native/") and path.endswith(".cpp"):
            out.append(Unit(path, head + checks, "g++", CXX_FLAGS + WARNING_FLAGS + includes, mine))
        else:
            raise PatchError(path, None, "patches/proof.py does not know how ATen compiles this file")
    if autograd_root is not None:
        generated = ["-I", autograd_root]
        # The derivative helpers the series adds to FunctionsManual.cpp, in its
        # stand-in (patches/base.py STAND_INS), against the patched header.
        out.append(Unit(f"{FUNCTIONS_MANUAL_CPP} (the series' helpers, in the stand-in of the file)",
                        f'#include "{os.path.join(tree, FUNCTIONS_MANUAL_CPP)}"\n', "g++",
                        CXX_FLAGS + WARNING_FLAGS + generated + includes))
        for rel, what in ((f"{GENERATED_AUTOGRAD}/Functions.cpp", "formulas"),
                          (f"{GENERATED_AUTOGRAD}/VariableTypeEverything.cpp", "autograd kernels")):
            out.append(Unit(f"{rel} (generated: the series' {what})",
                            f'#include "{os.path.join(autograd_root, rel)}"\n', "g++",
                            CXX_FLAGS + WARNING_FLAGS + generated + includes))
    return out


def intermediate_units(tree: str, overlay: str, scratch: str) -> list[Unit]:
    """Units of the C++ files as earlier PRs leave them (intermediate_versions):
    each PR's files are written under scratch/<patch>/ and found first on the
    include path; a .cpp is compiled where it, or a header it includes, differs
    from the series' end state. Named "<patch>: <path> [...]"."""
    out = []
    final = {path: _read(os.path.join(tree, path)) for path in carried_files()}
    for message, files in intermediate_versions().items():
        root = os.path.join(scratch, "intermediate", message.replace("/", "_").removesuffix(".txt"))
        for path, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
            with open(os.path.join(root, path), "w", encoding="utf-8") as f:
                f.write(text)
        changed = {p for p, text in files.items() if text != final[p]}
        headers = [p.split("aten/src/", 1)[-1] for p in changed if p.endswith((".h", ".cuh"))]
        sources = [p for p in files if not p.endswith((".h", ".cuh"))
                   and (p in changed or any(f"<{h}>" in files[p] or f'"{h}"' in files[p] for h in headers))]
        staged = units(root, overlay, None, [], set(), sources)
        for unit in staged:
            unit.name = f"{message}: {unit.name}"
        out += staged
    return out


def headers_not_compiled(tree: str, autograd_root: str | None) -> list[str]:
    """Carried headers that no compiled unit includes."""
    texts = [_read(os.path.join(tree, p)) for p in carried_files() if not p.endswith((".h", ".cuh"))]
    if autograd_root is not None:
        texts.append(_read(os.path.join(autograd_root, GENERATED_AUTOGRAD, "Functions.cpp")))
    headers = [p for p in carried_files() if p.endswith((".h", ".cuh"))]

    def included(path: str) -> bool:
        rel = path.split("aten/src/", 1)[-1]
        return any(f"<{rel}>" in t or f'"{rel}"' in t for t in texts)

    # Headers reach a unit through other headers too: include them until no
    # more are reached.
    reached: set[str] = set()
    while True:
        new = [h for h in headers if h not in reached and included(h)]
        if not new:
            return [h for h in headers if h not in reached]
        reached.update(new)
        texts += [_read(os.path.join(tree, h)) for h in new]


@functools.lru_cache(maxsize=None)
def _compiler_id(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    except OSError:
        return compiler + ": not found"
    return (shutil.which(compiler) or compiler) + "\n" + result.stdout.strip()


def inputs_digest() -> str:
    """What every unit depends on beyond the files it reads: the torch wheel and
    the generator (the files are in each unit's manifest, compile_unit)."""
    return _sha("inputs/2", torch.__version__, TORCH_DIR, TORCHGEN_DIR)


# sha of a file's bytes, by (path, mtime, size): a unit's manifest lists ~1500
# files, mostly the wheel's headers, and the 264 units share them.
_FILE_SHAS: dict[tuple[str, int, int], str] = {}


def _file_sha(path: str) -> str | None:
    try:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        if key not in _FILE_SHAS:
            with open(path, "rb") as f:
                _FILE_SHAS[key] = hashlib.sha256(f.read()).hexdigest()[:24]
        return _FILE_SHAS[key]
    except OSError:
        return None


def layout_digest(placeholders: dict[str, str]) -> str:
    """The names of the files under the placeholder roots (the tree, the
    overlay, the autograd scratch): a file added where the include path finds
    it first would change what a unit reads without changing any file its
    manifest lists. Not tools/: torchgen's inputs, which some runs copy
    templates into (no unit includes from it), and not .git or __pycache__."""
    names = []
    for root, name in sorted(placeholders.items(), key=lambda kv: kv[1]):
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in (".git", "__pycache__")
                             and not (d == root and x == "tools"))
            names += [name + os.path.join(d, f)[len(root):] for f in sorted(files)]
    return _sha("layout/1", *names)


def _dependencies(depfile: str) -> list[str]:
    """The prerequisites of a make-style depfile (the compiler's -MD output)."""
    with open(depfile) as f:
        text = f.read().replace("\\\n", " ")
    return text.split(":", 1)[1].split() if ":" in text else []


def compile_unit(unit: Unit, tree: str, digest: str, placeholders: dict[str, str],
                 layout: str | None = None) -> Result:
    """Compiles a unit, or finds it compiled: the cache holds, per unit (its
    text, flags, compiler, digest and the layout of its roots), a manifest of
    every file the compiler read and its content. A change to one carried file
    recompiles only the units that read it."""
    if unit.skip:
        return Result(unit, False, unit.skip)
    placeholders = {tree: "<tree>", **placeholders}
    # Longest root first: the autograd scratch holds the intermediate trees.
    roots = sorted(placeholders.items(), key=lambda kv: -len(kv[0]))

    def normal(text: str) -> str:
        for path, name in roots:
            text = text.replace(path, name)
        return text

    def actual(path: str) -> str:
        for root, name in roots:
            if path.startswith(name):
                return root + path[len(name):]
        return path

    key = _sha("compile/2", digest, _compiler_id(unit.compiler), normal(json.dumps(unit.flags)),
               normal(unit.source), layout or layout_digest(placeholders))
    manifest_path = cache_dir("compiled", key)
    try:
        with open(manifest_path) as f:
            recorded = json.load(f)["read"]
    except (OSError, ValueError, KeyError):
        recorded = None
    if recorded is not None and all(_file_sha(actual(p)) == sha for p, sha in recorded.items()):
        os.utime(manifest_path)
        return Result(unit, True, cached=True)
    import time
    start = time.monotonic()
    suffix = ".cu" if unit.compiler.endswith("nvcc") else ".cpp"
    with tempfile.TemporaryDirectory(prefix="moe-proof-") as tmp:
        path = os.path.join(tmp, "unit" + suffix)
        depfile = os.path.join(tmp, "unit.d")
        with open(path, "w") as f:
            f.write(unit.source)
        try:
            result = subprocess.run([unit.compiler, *unit.flags, "-MD", "-MF", depfile, path],
                                    capture_output=True, text=True)
        except OSError as e:
            return Result(unit, False, f"{unit.compiler}: {e}")
        seconds = time.monotonic() - start
        output = normal(result.stderr + result.stdout).replace(path, "<unit>")
        if result.returncode != 0:
            return Result(unit, False, output, seconds=seconds)
        read = {}
        for dep in _dependencies(depfile):
            dep = os.path.normpath(os.path.join(os.getcwd(), dep))
            if dep != path:
                read[normal(dep)] = _file_sha(dep)
    if not read or None in read.values():
        return Result(unit, False, output + "\npatches/proof.py: the compiler wrote no usable dependency list",
                      seconds=seconds)
    os.makedirs(os.path.dirname(manifest_path), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(manifest_path), delete=False) as f:
        json.dump({"unit": unit.name, "read": read}, f)
    os.replace(f.name, manifest_path)
    prune(os.path.dirname(manifest_path), keep=2000)
    return Result(unit, True, output, seconds=seconds)


def compile_all(unit_list: list[Unit], tree: str, jobs: int | None = None,
                placeholders: dict[str, str] | None = None) -> dict[str, Result]:
    """Compiles the units, jobs at a time (default: $MAX_JOBS, else 1)."""
    jobs = jobs or int(os.environ.get("MAX_JOBS") or 1)
    digest = inputs_digest()
    placeholders = {tree: "<tree>", **(placeholders or {})}
    layout = layout_digest(placeholders)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = pool.map(lambda u: compile_unit(u, tree, digest, placeholders, layout), unit_list)
        return {r.unit.name: r for r in results}


def check_kernels_covered(kernels: list[Kernel], unit_list: list[Unit]) -> list[Kernel]:
    """Kernels that no unit checks (no carried file mentions them)."""
    checked = {(k.op, k.key) for u in unit_list for k in u.kernels}
    return [k for k in kernels if (k.op, k.key) not in checked]


@dataclasses.dataclass
class Proof:
    overlay: str
    autograd_root: str
    kernels: list[Kernel]
    roots: set[str]
    units: list[Unit]
    results: dict[str, Result]


def prove(tree: str, scratch: str, jobs: int | None = None) -> Proof:
    """Everything above, on a tree with the series applied; scratch: an empty
    directory for the generated autograd code."""
    base, patched = parse_base(), parse(tree)
    kernels, roots = series_kernels(base, patched), series_roots(base, patched)
    overlay = aten_headers(tree)
    autograd_sources(tree, scratch)
    unit_list = units(tree, overlay, scratch, kernels, roots) + intermediate_units(tree, overlay, scratch)
    results = compile_all(unit_list, tree, jobs, {overlay: "<aten-headers>", scratch: "<autograd>"})
    return Proof(overlay, scratch, kernels, roots, unit_list, results)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    from . import generate

    parser = argparse.ArgumentParser(prog="python -m patches.proof", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: $MAX_JOBS or 1)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moe-proof-tree-") as root, \
            tempfile.TemporaryDirectory(prefix="moe-proof-autograd-") as scratch:
        try:
            generate.stage(root)
            proof = prove(root, scratch, args.jobs)
        except PatchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        failed = 0
        for name, r in proof.results.items():
            status = "skip" if r.unit.skip else ("ok" if r.ok else "FAIL")
            print(f"{status:5} {'(cached)' if r.cached else f'{r.seconds:5.1f} s':9} {name}")
            if not r.ok and not r.unit.skip:
                failed += 1
                print(r.report(), file=sys.stderr)
        for k in check_kernels_covered(proof.kernels, proof.units):
            failed += 1
            print(f"FAIL  {k.op} [{k.key}]: no carried file defines at::native::{k.name}", file=sys.stderr)
        for h in headers_not_compiled(root, scratch):
            failed += 1
            print(f"FAIL  {h}: no compiled file includes it", file=sys.stderr)
    print(f"{len(proof.results)} units, {failed} failed, {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The Triton API our kernels and benchmarks/gpu/run.py use, and the API of an
installed Triton, as names: test/test_triton_compat.py checks the first against
test/data/triton_3_6_api.json, the second taken from Triton 3.6 (the Triton of
the GPU box we know of: torch 2.11 + triton 3.6, nothing installable there).

Used names, from the sources' syntax trees (nothing is imported):

* every attribute chain rooted at ``triton`` or ``tl`` (``triton.language``)
  and every ``from triton... import name``, as qualified names
  (``triton.language.math.div_rn``), each prefix included;
* the keyword arguments of calls to those names (``tl.dot(...,
  input_precision=)``), as ``name(keyword)``;
* inside @triton.jit functions, the attributes and methods used on values
  (``x.to(tl.float32, bitcast=True)``, ``desc.load``, ``ptr.dtype.element_ty``),
  as ``.attr`` and ``.method(keyword)``: Triton's tensor, dtype and tensor
  descriptor classes must have them.

Regenerate the list from a Triton installation (here: PyPI's triton==3.6.0
wheel unpacked with ``pip install --no-deps --target DIR``)::

    PYTHONPATH=DIR python test/triton_api.py --source "..." > test/data/triton_3_6_api.json
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What must run on the GPU box: the kernels and their launchers, the AOT report's tooling, the benchmark.
SOURCES = sorted((ROOT / "torch_moe_ops" / "triton").glob("*.py")) + [ROOT / "benchmarks" / "gpu" / "run.py"]

# Modules whose public names are recorded (the ones the sources reach, and their parents).
MODULES = ["triton", "triton.language", "triton.language.math", "triton.language.core", "triton.language.standard",
           "triton.testing", "triton.runtime", "triton.runtime.jit", "triton.runtime.interpreter",
           "triton.runtime.autotuner", "triton.compiler", "triton.backends", "triton.backends.compiler",
           "triton.knobs"]
# Objects whose attributes are recorded too (triton.knobs.cache.scope, JITFunction.__call__, ...).
DESCEND = ["triton.knobs.cache", "triton.knobs.nvidia", "triton.Config", "triton.runtime.jit.JITFunction",
           "triton.runtime.interpreter.InterpretedFunction", "triton.runtime.autotuner.Autotuner"]
# Classes of the values a kernel holds: tensors, dtypes (pointers, blocks), tensor descriptors.
VALUE_CLASSES = ["triton.language.core.tensor", "triton.language.core.dtype", "triton.language.core.pointer_type",
                 "triton.language.core.block_type", "triton.language.core.tensor_descriptor",
                 "triton.language.core.tensor_descriptor_base"]


# ------------------------------------------------------------------ used names


def _chain(node) -> list | None:
    """['tl', 'math', 'erf'] for tl.math.erf; None if not rooted at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def _is_jit(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if _chain(target) in (["triton", "jit"],):
            return True
    return False


def used_names(path: Path) -> dict:
    """{used name: [line numbers]} of one source file (see the module's docstring)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}  # local name -> qualified module or object
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "triton" or a.name.startswith("triton."):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases["triton"] = "triton"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "triton":
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    # This package's own modules (from . import grouped_mm as gm): their helpers are not Triton's.
    own = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
           for a in node.names}
    used: dict = {}

    def add(name, line):
        used.setdefault(name, []).append(line)

    def qualify(chain):
        if chain and chain[0] in aliases:
            return [aliases[chain[0]]] + chain[1:]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "triton":
            for a in node.names:
                add(f"{node.module}.{a.name}", node.lineno)
        elif isinstance(node, ast.Attribute):
            q = qualify(_chain(node))
            if q:
                name = ".".join(q)
                parts = name.split(".")
                for i in range(2, len(parts) + 1):
                    add(".".join(parts[:i]), node.lineno)
        if isinstance(node, ast.Call):
            q = qualify(_chain(node.func)) if isinstance(node.func, (ast.Attribute, ast.Name)) else None
            if q:
                for kw in node.keywords:
                    if kw.arg:
                        add(f"{'.'.join(q)}({kw.arg})", node.lineno)
    # Attributes and methods of values inside @triton.jit functions.
    for fn in ast.walk(tree):
        if not (isinstance(fn, ast.FunctionDef) and _is_jit(fn)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute):
                chain = _chain(node)
                if chain is not None and (chain[0] in aliases or chain[0] in own):
                    continue
                add(f".{node.attr}", node.lineno)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                chain = _chain(node.func)
                if chain is not None and (chain[0] in aliases or chain[0] in own):
                    continue
                for kw in node.keywords:
                    if kw.arg:
                        add(f".{node.func.attr}({kw.arg})", node.lineno)
    return used


def all_used_names(paths=SOURCES) -> dict:
    """{used name: ["path:line", ...]} over the sources."""
    out: dict = {}
    for path in paths:
        for name, lines in used_names(path).items():
            out.setdefault(name, []).extend(f"{path.relative_to(ROOT)}:{n}" for n in lines)
    return out


# ------------------------------------------------------------------ an installed Triton's names


def _params(obj) -> list | None:
    """Parameter names (``*args``, ``**kwargs`` marked), None if unknown."""
    fn = getattr(obj, "fn", obj)  # JITFunction (tl.max and the like) wraps a Python function
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    mark = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [mark.get(p.kind, "") + p.name for p in params]


def _resolve(qualified: str):
    parts = qualified.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(qualified)


def installed_api() -> dict:
    """{qualified name: its parameters or None} of the installed Triton's
    MODULES (one level of attributes, and the attributes of their classes,
    e.g. triton.knobs.cache.scope), plus ``.attr``: [] / ``.method``:
    parameters for every attribute of VALUE_CLASSES."""
    names: dict = {}
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        names[mod_name] = None
        for attr in dir(mod):
            if attr.startswith("__") and attr not in ("__version__", "__file__"):
                continue
            obj = getattr(mod, attr)
            names[f"{mod_name}.{attr}"] = _params(obj) if callable(obj) else None
    # One level further for the objects of the API whose attributes the sources use.
    for qualified in DESCEND:
        obj = _resolve(qualified)
        for sub in dir(obj):
            if sub.startswith("_") and sub != "__call__":
                continue
            try:
                val = inspect.getattr_static(obj, sub)
            except AttributeError:
                val = None
            names[f"{qualified}.{sub}"] = _params(val) if callable(val) else None
    for cls_name in VALUE_CLASSES:
        try:
            cls = _resolve(cls_name)
        except (ImportError, AttributeError):
            continue
        for attr in dir(cls):
            val = inspect.getattr_static(cls, attr)
            params = _params(val) if callable(val) else None
            key = f".{attr}"
            names[key] = sorted(set(names.get(key) or []) | set(params or [])) if key in names or params else None
    # Instance attributes set in __init__ (tensor.dtype, .shape; pointer_type.element_ty; ...).
    for cls_name in VALUE_CLASSES:
        try:
            cls = _resolve(cls_name)
        except (ImportError, AttributeError):
            continue
        try:
            src = inspect.getsource(cls.__init__)
        except (TypeError, OSError):
            continue
        for node in ast.walk(ast.parse("class _:\n" + "".join("    " + l for l in src.splitlines(True)))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.setdefault(f".{node.attr}", None)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="where the installed Triton came from (recorded)")
    args = parser.parse_args()
    import triton

    json.dump({"triton": triton.__version__, "source": args.source,
               "generated_by": "test/triton_api.py", "names": dict(sorted(installed_api().items()))},
              sys.stdout, indent=0, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

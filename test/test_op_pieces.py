"""Every moe_ops op has all of its pieces, or a stated reason for a missing one,
and is what its declaration (torch_moe_ops/native_functions.yaml) says.

An op users call needs: a CPU kernel; a CUDA kernel in a CUDA build; a fake
kernel in its family's ops module; autograd where its OpInfo says it is
differentiable; an OpInfo with error inputs in its family's OpInfo module
(test_ops runs the generic checks on it); an entry in the upstream series
(the core series' native_functions.yaml dispatches its CPU kernel, the very
function library.cpp registers) or the reason it stays here; a benchmark; a
row in README.md's table of ops. Adding an op without one of them fails here,
naming the op and the piece.

The declaration is the one list of ops: csrc/library.cpp's TORCH_LIBRARY
block must define exactly its schemas and its TORCH_LIBRARY_IMPL blocks
register exactly its dispatch, and the dispatcher must hold exactly its ops.
"""

import importlib
import pathlib
import re

import pytest
import torch

import torch_moe_ops
from torch_moe_ops import native_functions

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "torch_moe_ops/csrc/library.cpp"
OPS = native_functions.load()


def _family_op_db(family):
    return importlib.import_module(f"opinfo_{family}").op_db


OPINFOS = {info.name.split(".", 1)[1]: (family, info)
           for family in native_functions.families() for info in _family_op_db(family)}


def _registered_ops():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_ops::"))


def _cpp_strings(text):
    """The value of adjacent C++ string literals ("a" "b" -> ab), unescaped."""
    return "".join(bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r'"((?:[^"\\]|\\.)*)"', text))


def _library_defs():
    """The schemas of library.cpp's TORCH_LIBRARY(moe_ops, m) block."""
    text = LIBRARY.read_text()
    (block,) = re.findall(r"^TORCH_LIBRARY\(moe_ops, m\) \{(.*?)^\}", text, re.S | re.M)
    return [_cpp_strings(args) for args in re.findall(r"m\.def\((.*?)\);", block, re.S)]


def _library_impls(key):
    """op -> the at::native function library.cpp registers at key."""
    text = LIBRARY.read_text()
    blocks = re.findall(rf"^TORCH_LIBRARY_IMPL\(moe_ops, {key}, m\) \{{(.*?)^\}}", text, re.S | re.M)
    return {op: fn.rsplit("::", 1)[-1] for block in blocks for op, fn in re.findall(r'm\.impl\("(\w+)", &([\w:]+)\)', block)}


def test_library_defines_the_declared_schemas():
    assert sorted(_library_defs()) == sorted(op.func for op in OPS), (
        "csrc/library.cpp's TORCH_LIBRARY block and torch_moe_ops/native_functions.yaml differ")


@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_library_registers_the_declared_dispatch(key):
    declared = {op.name: op.cpp_dispatch()[key] for op in OPS if key in op.cpp_dispatch()}
    assert _library_impls(key) == declared


def test_dispatcher_holds_the_declared_ops():
    assert _registered_ops() == sorted(op.name for op in OPS)
    for op in OPS:
        registered = getattr(torch.ops.moe_ops, op.name).default._schema
        assert registered == torch._C.parse_schema(op.qualname + op.func[len(op.name):]), op.name
        # Kernels registered from Python: the module named registers one at that key.
        for key, value in op.dispatch.items():
            if value.startswith(native_functions.PY) and (key != "CUDA" or torch_moe_ops._C.WITH_CUDA):
                importlib.import_module(value[len(native_functions.PY):])
                assert torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, key), (op.name, key, value)


def test_opinfo_modules_hold_their_families_ops():
    """Each family's OpInfo module has exactly the family's public ops."""
    for family in native_functions.families():
        names = [info.name.split(".", 1)[1] for info in _family_op_db(family)]
        assert sorted(names) == sorted(op.name for op in native_functions.public_ops(family)), family


def test_declaration_errors_are_caught(tmp_path, monkeypatch):
    """A typo in the declaration fails at load, naming the op."""
    text = pathlib.Path(native_functions.PATH).read_text()
    bad = tmp_path / "native_functions.yaml"
    bad.write_text(text.replace("  family: routing\n", "  famliy: routing\n", 1))
    monkeypatch.setattr(native_functions, "PATH", str(bad))
    native_functions.load.cache_clear()
    try:
        with pytest.raises(native_functions.DeclarationError, match=r"router_topk|entry \d+: unknown keys \['famliy'\]"):
            native_functions.load()
    finally:
        native_functions.load.cache_clear()


@pytest.mark.parametrize("op", [op.name for op in native_functions.public_ops()])
def test_op_has_every_piece(op):
    decl = native_functions.op(op)
    name = decl.qualname
    missing = []
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if not has(name, "CPU"):
        missing.append("CPU kernel")
    if torch_moe_ops._C.WITH_CUDA and not has(name, "CUDA"):
        missing.append("CUDA kernel (a CUDA build)")
    entry = torch._library.simple_registry.singleton.find(name)
    if entry.fake_impl.kernel is None:
        missing.append("fake kernel (register_fake)")
    elif not entry.fake_impl.kernel.source.rsplit(":", 1)[0].endswith(decl.ops_module):
        missing.append(f"fake kernel in {decl.ops_module} (it is at {entry.fake_impl.kernel.source})")
    family, opinfo = OPINFOS.get(op, (None, None))
    if opinfo is None:
        missing.append(f"OpInfo (test/opinfo_{decl.family}.py)")
    else:
        if opinfo.error_inputs_func is None:
            missing.append("error inputs in its OpInfo")
        if opinfo.supports_autograd and not has(name, "Autograd"):
            missing.append("autograd (register_autograd), which its OpInfo claims")
    if decl.upstream is not None:
        kernel = decl.dispatch["CPU"]
        series = "".join(p.read_text() for p in sorted((ROOT / "patches/core").glob("*.patch")))
        # A dispatch line the series adds whose keys include CPU ("CPU:" or "CPU, CUDA:").
        dispatch = re.compile(rf"^\+    [\w, ]*\bCPU\b[\w, ]*: {kernel}$", re.M)
        if not dispatch.search(series):
            missing.append(f"upstream entry (core series dispatching CPU: {kernel}); regenerate patches/")
    if decl.benchmarked_through is None:
        benches = [p.name for p in (ROOT / "benchmarks").glob("bench_*.py") if re.search(rf"\b{op}\b", p.read_text())]
        if not benches:
            missing.append("benchmark (benchmarks/bench_*.py) or a benchmarked_through reason")
    readme = (ROOT / "README.md").read_text()
    if f"| `moe_ops::{op}(" not in readme:
        missing.append("row in README.md's table of ops")
    assert not missing, f"{op} lacks: {', '.join(missing)}"

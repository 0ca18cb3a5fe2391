"""Every moe_ops op has all of its pieces, or a stated reason for a missing one.

An op users call needs: a CPU kernel; a CUDA kernel in a CUDA build; a fake
kernel; autograd where its OpInfo says it is differentiable; an OpInfo with
error inputs (test_ops runs the generic checks on it); an entry in the
upstream series (the core series' native_functions.yaml dispatches its CPU
kernel, the very function library.cpp registers) or the reason it stays here;
a benchmark; a row in README.md's table of ops. Adding an op without one of
them fails here, naming the op and the piece.
"""

import pathlib
import re

import pytest
import torch

import torch_moe_ops

from opinfo import op_db as grouped_mm_op_db
from opinfo_experts import op_db as experts_op_db
from opinfo_fp8 import op_db as fp8_op_db
from opinfo_routing import op_db as routing_op_db

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPINFOS = {op.name.split(".", 1)[1]: op for op in grouped_mm_op_db + experts_op_db + routing_op_db + fp8_op_db}

# Ops reached only as another op's backward: their pieces are checked through
# that op (test_ops.test_every_op_has_an_opinfo proves the gradients reach them).
INTERNAL = {"expert_mlp_backward", "unpermute_backward"}

# Ops that stay out of the upstream series, and why.
NOT_UPSTREAMED = {
    "expert_mlp": "a layer-level composition of ops that do go upstream (patches/manifest.py NOT_UPSTREAMED)",
    "grouped_mm_gather": "its kernels are carried by core/0001 (GroupedMM.{h,cpp}); the schema, meta function and "
                         "OpInfo are left to a follow-up (core/0001's message)",
}

# Ops timed inside another op's benchmark rather than on their own.
BENCHMARKED_THROUGH = {
    "grouped_mm_gather": "bench_moe_layer.py: every expert GEMM of the fused experts (expert_mlp) is one",
}


def _public_ops():
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_ops::"))
    return [n for n in names if n not in INTERNAL]


def _cpu_kernel_functions():
    """op -> the C++ function library.cpp registers as its CPU kernel."""
    text = (ROOT / "torch_moe_ops/csrc/library.cpp").read_text()
    block = re.search(r"TORCH_LIBRARY_IMPL\(moe_ops, CPU, m\) \{(.*?)\n\}", text, re.S).group(1)
    return {op: fn.rsplit("::", 1)[-1] for op, fn in re.findall(r'm\.impl\("(\w+)", &([\w:]+)\)', block)}


def test_internal_ops_exist():
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_ops::")}
    assert INTERNAL <= names, INTERNAL - names


@pytest.mark.parametrize("op", _public_ops())
def test_op_has_every_piece(op):
    name = f"moe_ops::{op}"
    missing = []
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if not has(name, "CPU"):
        missing.append("CPU kernel")
    if torch_moe_ops._C.WITH_CUDA and not has(name, "CUDA"):
        missing.append("CUDA kernel (a CUDA build)")
    entry = torch._library.simple_registry.singleton.find(name)
    if entry.fake_impl.kernel is None:
        missing.append("fake kernel (register_fake)")
    opinfo = OPINFOS.get(op)
    if opinfo is None:
        missing.append("OpInfo")
    else:
        if opinfo.error_inputs_func is None:
            missing.append("error inputs in its OpInfo")
        if opinfo.supports_autograd and not has(name, "Autograd"):
            missing.append("autograd (register_autograd), which its OpInfo claims")
    if op not in NOT_UPSTREAMED:
        kernel = _cpu_kernel_functions().get(op)
        series = "".join(p.read_text() for p in sorted((ROOT / "patches/core").glob("*.patch")))
        # A dispatch line the series adds whose keys include CPU ("CPU:" or "CPU, CUDA:").
        dispatch = re.compile(rf"^\+    [\w, ]*\bCPU\b[\w, ]*: {kernel}$", re.M)
        if kernel is None or not dispatch.search(series):
            missing.append(f"upstream entry (core series dispatching CPU: {kernel}) or a NOT_UPSTREAMED reason")
    if op not in BENCHMARKED_THROUGH:
        benches = [p.name for p in (ROOT / "benchmarks").glob("bench_*.py") if re.search(rf"\b{op}\b", p.read_text())]
        if not benches:
            missing.append("benchmark (benchmarks/bench_*.py)")
    readme = (ROOT / "README.md").read_text()
    if f"| `moe_ops::{op}(" not in readme:
        missing.append("row in README.md's table of ops")
    assert not missing, f"{op} lacks: {', '.join(missing)}"


def test_reasons_name_real_ops():
    ops = set(_public_ops())
    assert set(NOT_UPSTREAMED) <= ops and set(BENCHMARKED_THROUGH) <= ops

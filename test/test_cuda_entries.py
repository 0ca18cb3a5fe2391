"""The CUDA entries of moe_ops that are device-generic ATen code or Triton
kernels, run on CPU tensors through the dispatcher's CUDA slot.

``op._op_dk(DispatchKey.CUDA, ...)`` calls the kernel registered at the CUDA
key whatever the device of the tensors, so a CUDA build (CI's) runs these
entries here, with no GPU, and they must give what the CPU kernels give: the
same dtypes, shapes and strides, the same errors for the shared checks, values
within the float64 reference's bound (bitwise where the code is the CPU's).
The ATen ops they call dispatch on the tensors, so on CPU tensors those run
their CPU kernels; what a GPU adds is listed in CUDA_ENTRIES below.

grouped_mm, grouped_mm_gather, expert_mlp, expert_mlp_backward and
scaled_grouped_mm have Triton kernels at the CUDA key (torch_moe_ops/triton/cuda.py, registered whenever
Triton is installed, even in a build without CUDA sources): on CPU tensors
they run in Triton's interpreter, here in float32 and float16 only (the
interpreter's bfloat16 products are wrong: numpy has no bfloat16; the
kernels' float64 path is tested in test_triton_*.py) against per-element
float64 bounds. What only a GPU adds for them: the compiled kernels'
numerics (wgmma, tf32 off), TMA, the autotuner, the device-side asserts as
asserts on the device, timing.

In a build without CUDA (TORCH_MOE_OPS_CUDA=0) no C++ kernel is registered at
the CUDA key and those slot tests skip, saying so. grouped_mm's C++ CUDA entry,
the one the core series carries upstream (native/cuda/GroupedMM.cpp), is not
registered here (the Triton kernel has the slot): test_grouped_mm_contract.py
runs it on CPU tensors.
"""

import importlib

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._C import DispatchKey

import torch_moe_ops
from torch_moe_ops import native_functions

from opinfo_grouped_mm import op_db as grouped_mm_op_db
from opinfo_experts import expert_mlp_opinfo, grouped_mm_gather_opinfo
from opinfo_experts import gathered
from test_grouped_mm import assert_close_to_float64, grouped_problem_tensors, grouped_problems
from test_triton_experts import assert_within, check_backward, expert_mlp_error_bounds
from test_triton_grouped_mm import assert_close_to_reference

requires_cuda_build = pytest.mark.skipif(
    not torch_moe_ops.cuda_kernels_built(),
    reason="CPU-only build (TORCH_MOE_OPS_CUDA=0): no kernel is registered at the CUDA key to call")
requires_triton_kernels = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::grouped_mm", "CUDA"),
    reason="Triton is not installed: the grouped GEMMs and fused experts have no CUDA kernel to call")
# The Triton kernels in the interpreter: no bfloat16 (its products are wrong there).
INTERPRETED_DTYPES = (torch.float32, torch.float16)
TRITON_OPS = ("moe_ops::grouped_mm", "moe_ops::grouped_mm_gather", "moe_ops::expert_mlp",
              "moe_ops::expert_mlp_backward", "moe_ops::scaled_grouped_mm")

# Every moe_ops op with a CUDA kernel, and where that kernel is tested
# without a GPU (the declaration's cuda_tested); test_every_cuda_entry_is_accounted_for
# holds the dispatcher to it.
CUDA_ENTRIES = {op.qualname: op.cuda_tested for op in native_functions.ops() if "CUDA" in op.dispatch}
GENERIC = [op.name for op in native_functions.ops() if op.cuda_tested == native_functions.CUDA_TESTED_GENERIC]


def cuda_entry(op):
    """op's kernel at the CUDA key, called on whatever tensors it is given."""
    return lambda *args, **kwargs: op._op_dk(DispatchKey.CUDA, *args, **kwargs)


def _call(fn, s):
    return fn(s.input, *s.args, **s.kwargs)


@requires_cuda_build
def test_every_cuda_entry_is_accounted_for():
    with_cuda = {name for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("moe_ops::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")}
    assert with_cuda == set(CUDA_ENTRIES)


def _bytes(t):
    return t.detach().flatten().view(torch.uint8)


@requires_cuda_build
@pytest.mark.parametrize("name", GENERIC)
def test_generic_cuda_entry_is_the_cpu_kernel(name):
    """An entry declared `cuda_tested: generic` (device-generic ATen code
    computing what the CPU kernel does), on CPU tensors through the CUDA slot:
    over every OpInfo sample in every dtype, the CPU kernel's dtypes, shapes,
    strides and bytes; on every error input, its error (a `*_values` input may
    instead trip a device-side assert, a RuntimeError). What a GPU adds: the
    ATen ops it calls run their CUDA kernels, and the asserts run on the device."""
    decl = native_functions.op(name)
    (info,) = [i for i in importlib.import_module(f"opinfo_{decl.family}").op_db if i.name == f"moe_ops.{name}"]
    op = getattr(torch.ops.moe_ops, name).default
    entry = cuda_entry(op)
    checked = 0
    for dtype in sorted(info.dtypes, key=str):
        for s in info.sample_inputs("cpu", dtype):
            expected, actual = _call(op, s), _call(entry, s)
            expected = expected if isinstance(expected, tuple) else (expected,)
            actual = actual if isinstance(actual, tuple) else (actual,)
            for e, a in zip(expected, actual, strict=True):
                assert (a.dtype, a.shape, a.stride()) == (e.dtype, e.shape, e.stride()), (s.name, dtype)
                assert torch.equal(_bytes(a), _bytes(e)), (s.name, dtype)
            checked += 1
    assert checked
    for ei in info.error_inputs("cpu"):
        s = ei.sample_input
        types = (ei.error_type, RuntimeError) if s.name.endswith("_values") else ei.error_type
        with pytest.raises(types, match=ei.error_regex if types is ei.error_type else None):
            _call(entry, s)


@requires_triton_kernels
def test_triton_kernels_are_the_cuda_kernels():
    """The five ops' CUDA kernels are the Python ones registered from
    torch_moe_ops/triton/cuda.py (no C++ kernel left at the key: a C++ one
    registered as well would have been overridden, with a warning), and each
    runs the Triton function: bitwise its result (the interpreter is
    deterministic)."""
    from torch_moe_ops.triton import cuda as tcuda
    from torch_moe_ops.triton import triton_grouped_mm

    assert {f"moe_ops::{op}" for op in tcuda.REGISTERED} == set(TRITON_OPS)
    for name in TRITON_OPS:
        table = torch._C._dispatch_dump_table(name)
        cuda_line = next(line for line in table.splitlines() if line.startswith("CUDA:"))
        assert "torch_moe_ops/triton/cuda.py" in cuda_line, cuda_line
        assert "CUDA (inactive)" not in torch._C._dispatch_dump(name), "a C++ CUDA kernel is still registered"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(21, 24, generator=g), torch.randn(3, 24, 20, generator=g)
    offs = torch.tensor([5, 5, 19], dtype=torch.int32)
    assert torch.equal(cuda_entry(torch.ops.moe_ops.grouped_mm.default)(a, b, offs), triton_grouped_mm(a, b, offs))


# ---------------------------------------------------------- grouped_mm(_gather)

GROUPED = [*grouped_mm_op_db, grouped_mm_gather_opinfo]


@requires_triton_kernels
@pytest.mark.parametrize("op", GROUPED, ids=lambda op: op.name)
def test_grouped_entry_matches_cpu(op):
    """Every OpInfo sample (bias, out_dtype, every layout, empty groups, zero
    tokens, rows past offs[-1], -1 gather entries, strided operands) in fp32
    and fp16: the CPU kernel's dtype, shape and strides, and values within the
    per-element float64 bound of an fp32 accumulation (the Triton kernel sums
    in another order than the CPU kernel, so the bound, not the bits)."""
    for dtype in INTERPRETED_DTYPES:
        for s in op.sample_inputs("cpu", dtype):
            out = _call(cuda_entry(op.op), s)
            cpu = _call(op.op, s)
            msg = f"{s.name} ({dtype})"
            assert (out.dtype, out.shape, out.stride()) == (cpu.dtype, cpu.shape, cpu.stride()), msg
            kw = s.kwargs
            if op is grouped_mm_gather_opinfo:
                mat_b, offs = s.args
                a_index, b_index = kw.get("a_index"), kw.get("b_index")
                a, b = gathered(s.input, a_index, 1 if mat_b.dim() == 2 else 0), gathered(mat_b, b_index, 0)
            else:
                a, b, offs = s.input, s.args[0], kw.get("offs")
            assert_close_to_reference(out, a, b, offs, kw.get("bias"), kw.get("out_dtype"))


@requires_triton_kernels
@settings(max_examples=15, deadline=None)
@given(grouped_problems(), st.integers(0, 2**31 - 1))
def test_property_grouped_mm_entry(problem, seed):
    """test_grouped_mm's property through the CUDA slot (the Triton kernel):
    every layout, groups of any size (none, empty, all tokens in one), rows or
    columns past offs[-1], transposed operands, bias; fp32 accumulation of
    <= 70 products of values in [-1, 1]. Few examples: test_triton_grouped_mm
    draws many more for the kernel itself."""
    a, b, offs, bias = grouped_problem_tensors(problem, seed)
    out = cuda_entry(torch.ops.moe_ops.grouped_mm.default)(a, b, offs, bias)
    assert_close_to_float64(out, a, b, offs, bias)


# The values of offs and of the gather indices are checked on the device
# (_assert_async: no host sync, so the message cannot name the entry); on CPU
# tensors the assert raises at once.
ASYNC_VALUE_ERRORS = {
    "offs_values": r"grouped_mm: offs must be non-negative, non-decreasing and at most the grouped dimension",
    "index_values": r"grouped_mm_gather: [ab]_index has an entry out of range \[-1, \d+\)",
    "routing_values": r"expert_mlp: (src_rows must be -1 or token \* top_k \+ slot in \[0, tokens \* top_k\)|"
                      r"dst_rows must be -1 or a row in \[0, src_rows.size\(0\)\)|offs must be non-decreasing|"
                      r"src_rows and dst_rows must be inverse maps)",
}


@requires_triton_kernels
@pytest.mark.parametrize("op", [*GROUPED, expert_mlp_opinfo], ids=lambda op: op.name)
def test_entry_error_inputs(op):
    """Shape, dtype and argument errors are the shared checks' (the CPU
    messages); bad values fail the device-side asserts."""
    seen = set()
    for ei in op.error_inputs("cpu"):
        s = ei.sample_input
        if s.name in ASYNC_VALUE_ERRORS:
            seen.add(s.name)
            with pytest.raises(RuntimeError, match=ASYNC_VALUE_ERRORS[s.name]):
                _call(cuda_entry(op.op), s)
        else:
            with pytest.raises(ei.error_type, match=ei.error_regex):
                _call(cuda_entry(op.op), s)
    assert seen, "the OpInfo has value errors; the device-side asserts must be reached"


@requires_triton_kernels
def test_gather_entry_reads_zeros_for_minus_one():
    """-1 entries read zeros, also where the row or column a clamped index
    would read holds inf or NaN (0 * inf is NaN: an entry once multiplied
    the selected row by 0); and an empty source with every entry -1."""
    g = torch.Generator().manual_seed(0)
    gather = cuda_entry(torch.ops.moe_ops.grouped_mm_gather.default)
    a = torch.randn(4, 3, generator=g)
    a[0] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    b = torch.randn(2, 3, 5, generator=g)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    index = torch.tensor([1, -1, 2, -1])
    out = gather(a, b, offs, index)
    assert out[[1, 3]].eq(0).all() and out.isfinite().all()
    assert_close_to_reference(out, gathered(a, index, 0), b, offs, None, None)
    # 2D x 2D, K gathered: columns of A and rows of B read through one index.
    a2, b2 = torch.randn(3, 4, generator=g), torch.randn(4, 5, generator=g)
    a2[:, 0], b2[0] = float("nan"), float("inf")
    out2 = gather(a2, b2, offs, index, index)
    assert out2.isfinite().all()
    assert_close_to_reference(out2, gathered(a2, index, 1), gathered(b2, index, 0), offs, None, None)
    empty = gather(torch.zeros(0, 3), b, offs, torch.tensor([-1, -1, -1, -1]))
    assert empty.shape == (4, 5) and empty.eq(0).all()


# ------------------------------------------------------------------ expert_mlp


@requires_triton_kernels
def test_expert_mlp_entry_matches_cpu():
    """Every OpInfo sample through the CUDA slots (the Triton kernels), in
    fp32: forward and every gradient in the CPU kernels' dtypes, shapes and
    strides, within the per-element float64 bounds test_triton_experts
    derives (the kernels' arithmetic differs from the CPU composition's: no
    rounding of the down projection's rows, other summation orders)."""
    fwd, bwd = torch.ops.moe_ops.expert_mlp.default, torch.ops.moe_ops.expert_mlp_backward.default
    dtype = torch.float32
    for s in expert_mlp_opinfo.sample_inputs("cpu", dtype):
        args, kw = (s.input, *s.args), s.kwargs
        out, h = _call(cuda_entry(fwd), s)
        ref_out, ref_h = _call(fwd, s)
        for mine, theirs in ((out, ref_out), (h, ref_h)):
            assert (mine.dtype, mine.shape, mine.stride()) == (theirs.dtype, theirs.shape, theirs.stride()), s.name
        exact_out, exact_h, tol_out, tol_h = expert_mlp_error_bounds(*args, **kw)
        assert_within(h, exact_h, tol_h, f"{s.name}: h")
        assert_within(out, exact_out, tol_out, f"{s.name}: out")
        # check_backward's grad_out (seed 0), through the CUDA slot of the backward.
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        grads = cuda_entry(bwd)(grad, *args, kw.get("gate_up_bias"), kw.get("down_bias"), h, kw["activation"],
                                kw.get("gate_up_interleaved", False), kw.get("swiglu_alpha", 1.702),
                                kw.get("swiglu_limit", 7.0), [True, True, True, True])
        check_backward(args, kw, seed=0, got=grads)


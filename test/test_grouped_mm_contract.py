"""One contract for grouped_mm on every device: what the CPU kernel accepts, the
CUDA entry carried upstream (native/cuda/GroupedMM.cpp: at::native::grouped_mm_cuda,
_grouped_mm's CUDA kernel in the core series) accepts, with the same results, and
rejects with the same error type and message; the meta function checks what both
check, no more and no less; the backward traces with symbolic shapes.

In this build the CUDA slot of moe_ops::grouped_mm is the Triton kernel
(test_cuda_entries.py); the C++ entry that goes upstream is reached through the
test op moe_ops_testing::grouped_mm_cuda_entry_on_host, in CUDA builds (CI's).
On CPU tensors it takes its device-generic fallback, whose ATen calls then run
their CPU kernels; so everything of the entry but the fast path runs here.

What only a GPU can verify: the fast path (upstream's CUTLASS grouped GEMM,
at::cuda::detail::bf16bf16_grouped_mm, on sm_90 / sm_100 for bfloat16 without
bias), the zeroing of the rows it leaves unwritten (whose kernel body runs on the
host in test_cuda_entries.py), its device-side check of offs, and the fallback's
ATen calls running their CUDA kernels (cuBLAS).
"""

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings, strategies as st

import torch_moe_ops
from torch_moe_ops import _checks
from torch_moe_ops.reference import torch_grouped_mm

from opinfo_grouped_mm import grouped_mm_opinfo
from test_grouped_mm import grouped_problem_tensors, grouped_problems

requires_cuda_build = pytest.mark.skipif(
    not torch_moe_ops.cuda_kernels_built(),
    reason="CPU-only build (TORCH_MOE_OPS_CUDA=0): grouped_mm's C++ CUDA entry is not compiled")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Unit roundoff of the accumulation (float32; float64 for float64) and of the output.
U_ACC = {torch.float64: 2.0**-53}
U_OUT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _entry(*args, **kwargs):
    return torch.ops.moe_ops_testing.grouped_mm_cuda_entry_on_host(*args, **kwargs)


def _cpu(*args, **kwargs):
    return torch.ops.moe_ops.grouped_mm(*args, **kwargs)


def _abs(t):
    return None if t is None else t.abs()


def assert_within_bound(out, a, b, offs, bias=None, out_dtype=None):
    """Per element, the standard bound of a dot product accumulated in
    float32 (float64 for float64) with unit roundoff u, K products and sums,
    the bias add: (K + 2) u (|A||B| + |bias|), plus one rounding to the output
    dtype. Elements no group covers have magnitude 0: exactly zero."""
    out_dtype = out_dtype or a.dtype
    ref = torch_grouped_mm(a, b, offs, bias, torch.float64)
    magnitude = torch_grouped_mm(_abs(a), _abs(b), offs, _abs(bias), torch.float64)
    acc = (a.shape[-1] + 2) * U_ACC.get(a.dtype, 2.0**-24) * magnitude
    tol = 1.01 * (acc + U_OUT[out_dtype] * (ref.abs() + acc))
    assert out.dtype == out_dtype and out.shape == ref.shape
    err = (out.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} elements off: err {err[bad].max().item():.3g} "
                           f"> tol {tol[bad].min().item():.3g}")


@requires_cuda_build
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_entry_takes_what_the_cpu_kernel_takes(dtype):
    """Every OpInfo sample (four layouts, empty groups, zero tokens, rows and
    columns past offs[-1], transposed and strided operands, bias, float32
    output of 16-bit inputs) in every dtype, float64 included: the CPU
    kernel's dtype, shape and strides, values within the float64 bound."""
    samples = list(grouped_mm_opinfo.sample_inputs("cpu", dtype))
    assert {"2d3d_bias", "3d2d_bias", "2d2d_a_transposed_bias", "3d3d_b_transposed_bias",
            "2d3d_rows_past_offs", "2d3d_zero_tokens"} <= {s.name for s in samples}
    if dtype in (torch.float16, torch.bfloat16):
        assert "2d3d_out_fp32" in {s.name for s in samples}
    for s in samples:
        out = _entry(s.input, *s.args, **s.kwargs)
        cpu = _cpu(s.input, *s.args, **s.kwargs)
        assert (out.dtype, out.shape, out.stride()) == (cpu.dtype, cpu.shape, cpu.stride()), s.name
        kw = s.kwargs
        assert_within_bound(out, s.input, s.args[0], kw.get("offs"), kw.get("bias"), kw.get("out_dtype"))


@requires_cuda_build
def test_cuda_entry_zeroes_what_no_group_covers():
    """Rows (2D x 3D) and columns (3D x 2D) past offs[-1] are zero, never
    memory left as allocated (a freed block of NaNs of the output's size is
    what the allocator likely hands out); an empty K slice (2D x 2D) gives
    its bias."""
    def poison(*size):
        block = torch.full(size, float("nan"))
        del block

    a, b = torch.full((7, 4), float("nan")), torch.ones(2, 4, 3)
    poison(7, 3)
    a[:5] = 1
    out = _entry(a, b, torch.tensor([2, 5], dtype=torch.int32))
    assert torch.equal(out[5:], torch.zeros(2, 3)) and torch.equal(out[:5], torch.full((5, 3), 4.0))
    a3, b2 = torch.ones(2, 3, 4), torch.full((4, 6), float("nan"))
    b2[:, :4] = 1
    poison(3, 6)
    out = _entry(a3, b2, torch.tensor([1, 4], dtype=torch.int32))
    assert torch.equal(out[:, 4:], torch.zeros(3, 2)) and torch.equal(out[:, :4], torch.full((3, 4), 4.0))
    bias = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = _entry(torch.ones(3, 4), torch.ones(4, 2), torch.tensor([0, 4], dtype=torch.int32), bias)
    assert torch.equal(out[0], bias[0].expand(3, 2)) and torch.equal(out[1], torch.full((3, 2), 4.0) + bias[1])


@requires_cuda_build
@settings(max_examples=60, deadline=None)
@given(grouped_problems(), st.integers(0, 2**31 - 1), st.sampled_from(DTYPES))
def test_property_cuda_entry(problem, seed, dtype):
    """test_grouped_mm's property through the CUDA entry: every layout, groups
    of any size (none, empty, all tokens in one), rows or columns past
    offs[-1], transposed operands, bias, in every dtype."""
    a, b, offs, bias = grouped_problem_tensors(problem, seed)
    a, b = a.to(dtype), b.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    out = _entry(a, b, offs, bias)
    cpu = _cpu(a, b, offs, bias)
    assert (out.dtype, out.shape, out.stride()) == (cpu.dtype, cpu.shape, cpu.stride())
    assert_within_bound(out, a, b, offs, bias)


@requires_cuda_build
def test_cuda_entry_errors_are_the_cpu_kernels():
    """Every error input, the values of offs included (the fallback reads
    offs on the host, so it raises the CPU kernel's ValueError; the fast path
    checks them with a device-side assert instead, which only a GPU runs):
    the same error type and the same message as the CPU kernel."""
    n = 0
    for ei in grouped_mm_opinfo.error_inputs("cpu"):
        s = ei.sample_input
        with pytest.raises(ei.error_type, match=ei.error_regex) as cpu:
            _cpu(s.input, *s.args, **s.kwargs)
        with pytest.raises(ei.error_type) as entry:
            _entry(s.input, *s.args, **s.kwargs)
        assert type(entry.value) is type(cpu.value) and str(entry.value) == str(cpu.value), s.name
        n += 1
    assert n >= 20


def test_cuda_fast_path_choice():
    """The CUDA entry runs upstream's fast grouped GEMM only on what it
    computes as the CPU kernel would (bfloat16 in and out, no bias) and can
    read (16-byte strides and data, unit-stride offs), on the devices it is
    built for; the fallback takes the rest."""
    fast = torch.ops.moe_ops_testing.grouped_mm_cuda_fast_path_on_host
    bf = torch.bfloat16
    offs = torch.tensor([8, 16], dtype=torch.int32)
    a, b = torch.zeros(16, 32, dtype=bf), torch.zeros(2, 32, 24, dtype=bf)
    assert fast(a, b, offs)
    assert fast(a, b.transpose(-2, -1).contiguous().transpose(-2, -1), offs)  # column-major B
    assert fast(torch.zeros(2, 8, 32, dtype=bf), b)  # 3D x 3D
    assert not fast(a, b, offs, device_ok=False)  # another GPU
    assert not fast(a.float(), b.float(), offs)
    assert not fast(a.half(), b.half(), offs)
    assert not fast(a.double(), b.double(), offs)
    assert not fast(a, b, offs, torch.zeros(2, 24, dtype=bf))  # bias
    assert not fast(a, b, offs, None, torch.float32)  # float32 output
    assert not fast(torch.zeros(16, 36, dtype=bf)[:, :30], torch.zeros(2, 30, 24, dtype=bf), offs)  # 72-byte rows
    assert not fast(torch.zeros(16 * 32 + 1, dtype=bf)[1:].view(16, 32), b, offs)  # data 2 bytes off 16
    assert not fast(torch.zeros(16, 32, dtype=bf)[:, ::2], torch.zeros(2, 16, 24, dtype=bf), offs)  # neither major
    assert not fast(torch.zeros(2, 8, 36, dtype=bf)[:, :, :32], b)  # 3-D: rows of 72 bytes
    assert not fast(a, b, torch.tensor([8, 0, 16, 0], dtype=torch.int32)[::2])  # strided offs
    with pytest.raises(ValueError, match="contraction sizes differ"):
        fast(a, torch.zeros(2, 31, 24, dtype=bf), offs)


# ------------------------------------------------------------------ the meta


def _upstream_meta_accepts(*args, **kwargs) -> bool:
    from torch._meta_registrations import meta_grouped_mm

    try:
        meta_grouped_mm(*args, **kwargs)
    except RuntimeError:
        return False
    return True


@requires_cuda_build
def test_meta_never_weaker_than_the_kernels():
    """Every input upstream's meta function (v2.14.1's, for the kernels it
    described) rejects either our meta rejects too, with the kernels' error,
    or both our kernels, the CPU one and the CUDA entry, compute: float32,
    float64, bias, float32 output, odd strides, float16 without cuBLASLt's
    grouped GEMM, strided offs. Upstream's CUDA-only constraints are gone with
    upstream's CUDA kernel; keeping them in the meta would make torch.compile
    reject what eager runs."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s, dtype=torch.float32: (torch.rand(*s, generator=g) * 2 - 1).to(dtype)  # noqa: E731
    offs = torch.tensor([3, 3, 7], dtype=torch.int32)
    cases = {
        "float32": (rand(7, 8), rand(3, 8, 5), offs),
        "float64": (rand(7, 8, dtype=torch.float64), rand(3, 8, 5, dtype=torch.float64), offs),
        "float16": (rand(7, 8, dtype=torch.float16), rand(3, 8, 5, dtype=torch.float16), offs),
        "bias": (rand(7, 8, dtype=torch.bfloat16), rand(3, 8, 8, dtype=torch.bfloat16), offs,
                 rand(3, 8, dtype=torch.bfloat16)),
        "out_float32": (rand(7, 8, dtype=torch.bfloat16), rand(3, 8, 8, dtype=torch.bfloat16), offs, None,
                        torch.float32),
        "odd_strides": (rand(7, 5, dtype=torch.bfloat16), rand(3, 5, 3, dtype=torch.bfloat16), offs),
        "strided_offs": (rand(7, 8, dtype=torch.bfloat16), rand(3, 8, 8, dtype=torch.bfloat16),
                         torch.tensor([3, 0, 3, 0, 7, 0], dtype=torch.int32)[::2]),
    }
    for name, args in cases.items():
        assert not _upstream_meta_accepts(*args), f"{name}: v2.14.1's meta accepts it; not a case"
        shape = torch._subclasses.fake_tensor.FakeTensorMode()
        with shape:
            fake = torch.ops.moe_ops.grouped_mm(*(shape.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                                  for t in args))
        for out in (_cpu(*args), _entry(*args)):
            assert (out.dtype, out.shape, out.stride()) == (fake.dtype, fake.shape, fake.stride()), name
            assert_within_bound(out, *args)
    # Where upstream's meta and ours both reject, ours raises the kernels' error.
    a, b = rand(7, 8), rand(3, 8, 5)
    for args, regex in (((a.int(), b.int(), offs), "mat_a must be float32, float16, bfloat16 or float64"),
                        ((a, b, offs.long()), "offs must be int32"),
                        ((a, b), "offs is required"),
                        ((a, rand(3, 9, 5), offs), "contraction sizes differ")):
        assert not _upstream_meta_accepts(*args)
        full = (*args, *([None] * (5 - len(args))))  # (mat_a, mat_b, offs, bias, out_dtype)
        for fn in (_checks.check_grouped_mm_inputs, _cpu, _entry):
            with pytest.raises(ValueError, match=regex):
                fn(*full)


def test_out_strides_pad_on_cuda_but_not_rocm(monkeypatch):
    """CUDA outputs have their last dimension padded to 16 bytes, as
    upstream's TMA kernels allocate them; ROCm's grouped GEMMs allocate
    contiguous ones. Upstream's meta tells the two by torch.version.cuda (a
    ROCm build has the "cuda" device type too): so does ours."""
    size = [5, 3]
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert _checks.grouped_mm_out_strides(size, torch.bfloat16, torch.device("cuda")) == [8, 1]
    assert _checks.grouped_mm_out_strides([2, 5, 3], torch.float32, torch.device("cuda")) == [20, 4, 1]
    assert _checks.grouped_mm_out_strides(size, torch.bfloat16, torch.device("cpu")) == [3, 1]
    monkeypatch.setattr(torch.version, "cuda", None)  # a ROCm build
    assert _checks.grouped_mm_out_strides(size, torch.bfloat16, torch.device("cuda")) == [3, 1]


# ------------------------------------------------------ backward, symbolic


@pytest.mark.parametrize("layout", ["2d3d", "3d2d", "2d2d", "3d3d"])
def test_backward_compiles_with_dynamic_shapes(layout):
    """The backward under torch.compile(dynamic=True): every layout with bias
    and a transposed (K-major) weight, gradients of all three inputs equal to
    eager's bits (the same kernels run), and no recompile when the grouped
    dimension changes size."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def f(a, b, offs, bias):
        return torch.ops.moe_ops.grouped_mm(a, b, offs, bias)

    cf = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    for total in (9, 14, 23):
        sizes = [total // 3, 0, total - total // 3]
        offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
        G, K, N, M = 3, 6, 5, 4
        if layout == "2d3d":
            a, b, n_out = rand(total + 1, K), rand(G, N, K).transpose(-2, -1), N
        elif layout == "3d2d":
            a, b, n_out = rand(G, M, K), rand(K, total), total
        elif layout == "2d2d":
            a, b, n_out = rand(M, total), rand(total, N), N
        else:
            a, b, n_out, offs = rand(G, total, K), rand(G, N, K).transpose(-2, -1), N, None
        bias = rand(G, n_out)
        leaves = [t.detach().clone().requires_grad_() for t in (a, b, bias)]
        eager = [t.detach().clone().requires_grad_() for t in (a, b, bias)]
        grad = rand(*f(a, b, offs, bias).shape)
        cf(leaves[0], leaves[1], offs, leaves[2]).backward(grad)
        f(eager[0], eager[1], offs, eager[2]).backward(grad)
        for mine, theirs, name in zip(leaves, eager, ("mat_a", "mat_b", "bias")):
            assert mine.grad.stride() == theirs.grad.stride(), name
            # mat_a's and mat_b's gradients are the same kernels' bits; the
            # bias's is a sum Inductor may order otherwise (float32, <= 23 terms).
            tol = dict(rtol=0, atol=0) if name != "bias" else dict(rtol=23 * 2.0**-24, atol=23 * 2.0**-24)
            torch.testing.assert_close(mine.grad, theirs.grad, **tol, msg=f"{layout} {name} {total}")
    assert counter.frame_count == 1, f"{layout}: recompiled for a new size"

"""The brgemm engine of the CPU grouped mm kernel (native/cpu/GroupedMMBrgemm.h).

The kernel runs it only where cpublas::could_pack holds (AMX-BF16 /
AMX-FP16), for bfloat16 and float16. This machine has no AMX, so what runs
here is the engine itself, one group at a time, through the test-only op
torch.ops.moe_ops_testing.grouped_mm_brgemm:

* with the "reference" primitives (a scalar model of cpublas::pack /
  brgemm: B packed in pairs along K), in bfloat16, float16 and float32:
  the staging of strided, transposed and expanded weights, gathered rows
  (index -1 reads zeros), odd K padded to the pairs, tiles of 64 columns
  with their remainders, the bias and the output dtype in the epilogue;
* with ATen's own cpublas::brgemm in float32 (which needs no packing and
  runs on any x86 CPU): the engine's calls (M, N, K, leading dimensions,
  add_C) as ATen's brgemm reads them.

Only an AMX machine can verify the packed bfloat16 / float16 calls
(cpublas::pack's layout as brgemm reads it) and their speed; here they are
refused by the op with a message naming could_pack, which the test checks.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_moe_ops  # noqa: F401

brgemm = torch.ops.moe_ops_testing.grouped_mm_brgemm
could_pack = torch.ops.moe_ops_testing.brgemm_could_pack


def _weights(k, n, dtype, layout, gen):
    """A (K, N) operand in one of the storage orders the engine stages."""
    if layout == "kn":
        return torch.randn(k, n, generator=gen).to(dtype)
    if layout == "nk":  # (E, out, in) weights: a transposed view
        return torch.randn(n, k, generator=gen).to(dtype).t()
    if layout == "sliced":  # a column slice with a storage offset, rows longer than N
        return torch.randn(k, n + 5, generator=gen).to(dtype)[:, 3:3 + n]
    return torch.randn(1, n, generator=gen).to(dtype).expand(k, n)  # stride 0 along K


def _tokens(rows, k, dtype, layout, gen):
    if layout == "row":
        return torch.randn(rows, k, generator=gen).to(dtype)
    return torch.randn(k, rows, generator=gen).to(dtype).t()  # column-major


def _check(out, a, b, bias, index, out_dtype):
    """Against float64: fp32 sums of K products of the same inputs, within
    K * 2^-24 * sum |a||b| (sequential float32 accumulation), plus one
    rounding to the output dtype (half an ulp: 2^-8 bf16, 2^-11 fp16)."""
    a64 = a.double()
    if index is not None:
        a64 = torch.cat([a64, a64.new_zeros(1, a64.shape[1])])[index]  # -1 -> the zero row
    ref = a64 @ b.double() + (0 if bias is None else bias.double())
    mag = a64.abs() @ b.double().abs() + (0 if bias is None else bias.double().abs())
    k = a.shape[1]
    ulp = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[out.dtype]
    bound = (k + 1) * 2**-24 * mag + ulp * ref.abs() + 1e-30
    err = (out.double() - ref).abs()
    assert out.shape == ref.shape and out.dtype == out_dtype
    assert (err <= bound).all(), f"max error {err.max().item()} over bound at {(err / bound).argmax().item()}"


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 70),
    k=st.integers(0, 37),  # odd K: padded to the pairs
    n=st.sampled_from([1, 17, 64, 65, 130]),  # one partial tile .. two full + a remainder
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    b_layout=st.sampled_from(["kn", "nk", "sliced", "expanded"]),
    a_layout=st.sampled_from(["row", "col", "gathered"]),
    with_bias=st.booleans(),
    fp32_out=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_primitives(m, k, n, dtype, b_layout, a_layout, with_bias, fp32_out, seed):
    gen = torch.Generator().manual_seed(seed)
    b = _weights(k, n, dtype, b_layout, gen)
    index = None
    if a_layout == "gathered":  # rows of a token table, -1 for padding rows
        table = _tokens(max(m, 1) + 3, k, dtype, "row", gen)
        index = torch.randint(-1, table.shape[0], (m,), generator=gen)
        a = table
    else:
        a = _tokens(m, k, dtype, a_layout, gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    out_dtype = torch.float32 if fp32_out else dtype
    out = brgemm(a, b, bias, index, out_dtype, "reference")
    _check(out, a, b, bias, index, out_dtype)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 70),
    k=st.integers(0, 300),
    n=st.sampled_from([1, 17, 64, 65, 130]),
    b_layout=st.sampled_from(["kn", "nk", "sliced", "expanded"]),
    a_layout=st.sampled_from(["row", "col", "gathered"]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_aten_brgemm_float32(m, k, n, b_layout, a_layout, with_bias, seed):
    """ATen's cpublas::brgemm as the engine calls it (float32: no packing)."""
    gen = torch.Generator().manual_seed(seed)
    b = _weights(k, n, torch.float32, b_layout, gen)
    index = torch.randint(-1, m + 3, (m,), generator=gen) if a_layout == "gathered" else None
    a = _tokens(m + 3 if index is not None else m, k, torch.float32, "row" if index is not None else a_layout, gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    out = brgemm(a, b, bias, index, None, "cpublas")
    _check(out, a, b, bias, index, torch.float32)
    # The same call twice: the same bits.
    assert torch.equal(out, brgemm(a, b, bias, index, None, "cpublas"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aten_brgemm_packed(dtype):
    """The packed path: run and checked on AMX machines; elsewhere the op
    refuses it, naming could_pack (only an AMX machine verifies it)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 33, generator=gen).to(dtype), torch.randn(70, 33, generator=gen).to(dtype).t()
    if not could_pack(dtype):
        with pytest.raises(RuntimeError, match=r"could_pack\(.*\) is false on this CPU"):
            brgemm(a, b, None, None, None, "cpublas")
        return
    out = brgemm(a, b, None, None, torch.float32, "cpublas")
    _check(out, a, b, None, None, torch.float32)


def test_reference_matches_aten_float32_bits():
    """In float32 the reference model and ATen's brgemm sum the same
    products; their results agree to the accumulation bound, which makes the
    reference a model of the call, not only of the math."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(33, 41, generator=gen), torch.randn(100, 41, generator=gen).t()
    ref, aten = brgemm(a, b, None, None, None, "reference"), brgemm(a, b, None, None, None, "cpublas")
    torch.testing.assert_close(aten, ref, rtol=41 * 2**-23, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    ((torch.ones(2, 3), torch.ones(4, 5)), r"mat_a \[2, 3\] and mat_b \[4, 5\] differ in K"),
    ((torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)),
     "must both be float32, bfloat16 or float16, got Double"),
    ((torch.ones(2, 3), torch.ones(3, 5), torch.ones(4)), r"bias must be a contiguous float32 \(5,\)"),
    ((torch.ones(2, 3), torch.ones(3, 5), None, torch.tensor([0, 2])), r"a_index\[1\]=2 is out of range"),
    ((torch.ones(2, 3), torch.ones(3, 5), None, None, torch.bfloat16), "out_dtype must be Float or float32"),
    ((torch.ones(2, 3), torch.ones(3, 5), None, None, None, "mkl"), r"primitives must be .* got \"mkl\""),
])
def test_errors(args, match):
    with pytest.raises((ValueError, IndexError), match=match):
        brgemm(*args)

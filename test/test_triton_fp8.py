"""The Triton fp8 kernels (torch_moe_ops/triton/fp8.py) in Triton's interpreter,
on CPU tensors: ``triton_quantize_fp8`` bit for bit against
``moe_ops.quantize_fp8`` (whose own tests hold it to the plain-torch reference),
``triton_scaled_grouped_mm`` against the float64 reference
``torch_scaled_grouped_mm`` within a derived bound, on the OpInfo samples of
test/opinfo_fp8.py (every recipe and layout, both float8 formats, empty groups,
zero tokens, rows past offs[-1], weights stored (G, N, K) and (G, K, N), MX
scales swizzled and blocked per group) and on hypothesis examples.

As test_triton_grouped_mm.py: the kernels run through ``InterpretedFunction``
(no ``TRITON_INTERPRET=1`` needed; the module passes with it too). The
interpreter computes fp8 ``tl.dot`` exactly (each fp8 product is exact in
fp32, the sums are numpy's fp32 sums), so fp8 GEMMs are checked with float32
outputs. Its float32 -> bfloat16 conversion is not round-to-nearest-even (nor
its float32 -> float8 conversion: the quantiser encodes float8 with integer
operations on every device for that reason), so bfloat16 outputs are checked
against the float32 ones within one bfloat16 ulp, not bitwise.

What only a GPU can verify: the precision of QGMMA's accumulation within a K
step (fewer bits than fp32; the kernel promotes to fp32 every K step, so the
bound below would take the tensor core's unit roundoff for BLOCK_K terms),
the autotuner's choice, TMA, races, timing. test_triton_aot.py checks what
ptxas says about the sm_90a build.
"""

from __future__ import annotations

import operator
import re

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_moe_ops  # noqa: F401  (moe_ops)
from torch_moe_ops.reference import torch_quantize_fp8, torch_scaled_grouped_mm, torch_swizzle_mx_scale
from torch_moe_ops.triton import fp8 as tf8
from torch_moe_ops.triton import triton_quantize_fp8, triton_scaled_grouped_mm

from opinfo_fp8 import (
    _offs,
    error_inputs_quantize_fp8,
    error_inputs_scaled_grouped_mm,
    quantize_cases,
    scaled_grouped_mm_cases,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
E4M3, E5M2, E8M0 = torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu
U32 = 2.0**-24


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so that NaNs compare and -0 differs from +0."""
    return t.reshape(-1).contiguous().view(torch.uint8)


def assert_same_bits(got, want, what=""):
    (d, s), (dw, sw) = got, want
    assert d.dtype == dw.dtype and d.shape == dw.shape and d.is_contiguous(), what
    assert s.dtype == sw.dtype and s.shape == sw.shape, what
    assert torch.equal(_bits(d), _bits(dw)), f"{what}: data bits differ at {(_bits(d) != _bits(dw)).nonzero()[:5]}"
    assert torch.equal(_bits(s), _bits(sw)), f"{what}: scale bits differ"


def _op_quantize(x, recipe, float8_dtype=None, offs=None, swizzle=False):
    return torch.ops.moe_ops.quantize_fp8(x, recipe, float8_dtype, offs, swizzle)


# ------------------------------------------------------------------ quantize_fp8


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_opinfo_samples_bitwise(device):
    """Every quantize_fp8 OpInfo sample (every recipe, 2-D and 3-D, e5m2, zero
    rows and columns, a transposed weight, MX swizzled, per-group offs with an
    empty group and columns past offs[-1], values over 40 binades), float32 in:
    the same data and scale bits as moe_ops.quantize_fp8."""
    cases = list(quantize_cases(device, torch.float32))
    assert len({recipe for _, _, recipe, _ in cases}) == 5
    for name, x, recipe, kw in cases:
        assert_same_bits(triton_quantize_fp8(x, recipe, **kw), _op_quantize(x, recipe, **kw), name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quantize_16bit_inputs_bitwise(dtype):
    """bfloat16 and float16 inputs (loads widened to fp32; no 16-bit arithmetic)."""
    for name, x, recipe, kw in quantize_cases("cpu", dtype):
        if name.endswith(("_2d", "_e5m2", "_offs")):
            assert_same_bits(triton_quantize_fp8(x, recipe, **kw), _op_quantize(x, recipe, **kw), name)


def test_quantize_special_values_bitwise():
    """NaN and inf (their blocks dequantise to NaN: NaN or inf scales), -0.0,
    float8 denormals and ties (round to nearest even at 2^-10 etc.), values at
    and past the saturation bound, an all-zero block (amax clamped to 1e-12),
    float32 denormals (MX's smallest scale, 2^-127), both formats."""
    tiny = torch.tensor([2.0**-10, 3 * 2.0**-10, -(2.0**-17), 2.0**-149, 1e-40, -0.0, 0.0, 1.0])
    rows = [
        torch.tensor([float("nan"), 1.0, -2.0, 3.0, 0.5, -0.25, 7.0, 8.0]),
        torch.tensor([float("inf"), 1.0, -2.0, 3.0, 0.5, -0.25, 7.0, 8.0]),
        torch.tensor([-float("inf"), -0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        torch.zeros(8),
        tiny,
        tiny * 2.0**-100,
        torch.tensor([448.0, 464.0, 480.0, -57344.0, 61440.0, 1e38, -3e38, 0.1]),
        torch.tensor([1.0 + 2.0**-4, 1.0 + 3 * 2.0**-4, 1.0 + 2.0**-3, 1.0 + 2.0**-2 + 2.0**-4, 2.0, 2.5, 3.5, 7.5]),
    ]
    x = torch.stack(rows).repeat(1, 5)  # (8, 40): MX blocks of 32 and a partial one
    for recipe in ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx"):
        for f8 in (E4M3, E5M2):
            assert_same_bits(triton_quantize_fp8(x, recipe, f8), _op_quantize(x, recipe, f8), f"{recipe} {f8}")
            if recipe != "tensorwise":  # per row: finite rows keep finite scales
                assert_same_bits(triton_quantize_fp8(x[3:], recipe, f8), _op_quantize(x[3:], recipe, f8), recipe)


@st.composite
def quantize_problems(draw):
    """Random shapes (zero rows or columns, partial blocks, several 128-row
    blocks), 2-D or 3-D, transposed (column-major) or sliced inputs, both
    formats, per-group offs (empty groups, columns past offs[-1]; MX on 32-blocks)
    and MX swizzling."""
    recipe = draw(st.sampled_from(["tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx"]))
    batch = draw(st.sampled_from([None, 1, 2]))
    rows = draw(st.integers(0, 140 if recipe == "blockwise_128x128" else 20))
    cols = draw(st.integers(0, 150))
    f8 = draw(st.sampled_from([E4M3, E5M2]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    kw = dict(float8_dtype=f8)
    if batch is None and recipe in ("tensorwise", "rowwise", "mx") and draw(st.booleans()):
        ends = sorted(draw(st.lists(st.integers(0, cols), min_size=0, max_size=4)))
        if recipe == "mx":
            ends = [min(e // 32 * 32, cols) for e in ends]
        kw["offs"] = ends
    elif recipe == "mx" and draw(st.booleans()):
        kw["swizzle"] = True
    return recipe, batch, rows, cols, layout, kw


@settings(max_examples=12, deadline=None)
@given(quantize_problems(), st.integers(0, 2**31 - 1))
def test_quantize_property_bitwise(problem, seed):
    recipe, batch, rows, cols, layout, kw = problem
    g = torch.Generator().manual_seed(seed)
    shape = ((batch,) if batch else ()) + (rows, cols)
    base = torch.randn(shape, generator=g) * torch.logspace(-12, 12, max(cols, 1), base=2.0)[:cols]
    if layout == "transposed":
        x = base.transpose(-2, -1).contiguous().transpose(-2, -1)
    elif layout == "sliced":
        x = torch.cat([base, base], -1)[..., ::2] if cols else base
    else:
        x = base
    if "offs" in kw:
        kw["offs"] = _offs(kw["offs"], "cpu")
    assert_same_bits(triton_quantize_fp8(x, recipe, **kw), _op_quantize(x, recipe, **kw), str(problem))


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_rejects_what_the_op_rejects(device):
    """The error inputs of moe_ops.quantize_fp8, same errors and messages."""
    for e in error_inputs_quantize_fp8(None, device):
        s = e.sample_input
        with pytest.raises(e.error_type, match=e.error_regex):
            triton_quantize_fp8(s.input, *s.args, **s.kwargs)


# ------------------------------------------------------------------ scaled_grouped_mm


def _abs_f8(t: torch.Tensor) -> torch.Tensor:
    """|t| for a float8 tensor (its sign bit cleared: torch has no float8 abs)."""
    return (t.view(torch.uint8) & 0x7F).view(t.dtype)


def assert_close_to_reference(out, args, kw, block_k: int):
    """Elementwise |out - ref| <= tol. Each fp8 product is exact in fp32; a K
    step's BLOCK_K products are summed in fp32 (BLOCK_K - 1 roundings), scaled
    (blockwise, mx: two roundings) and added into the accumulator (one), the
    rowwise scales (two) and bias (one) applied after: at most
    K + 3 ceil(K / BLOCK_K) + 3 roundings of unit roundoff 2^-24, each bounded by
    the same sum over |a| |b| |sa| |sb| + |bias| (the reference on absolute
    values); then the rounding to float32 (or, for bfloat16, see below)."""
    mat_a, mat_b, scale_a, scale_b = args
    ref = torch_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, **{**kw, "out_dtype": torch.float64})
    mag_kw = {**kw, "out_dtype": torch.float64}
    if kw.get("bias") is not None:
        mag_kw["bias"] = kw["bias"].abs()
    sa = scale_a.abs() if scale_a.dtype == torch.float32 else scale_a
    sb = scale_b.abs() if scale_b.dtype == torch.float32 else scale_b
    magnitude = torch_scaled_grouped_mm(_abs_f8(mat_a), _abs_f8(mat_b), sa, sb, **mag_kw)
    K = mat_a.shape[-1]
    acc_err = (K + 3 * -(-K // block_k) + 3) * U32 * magnitude
    tol = 1.01 * (acc_err + U32 * (ref.abs() + acc_err))
    assert out.shape == ref.shape and out.is_contiguous()
    err = (out.double() - ref).abs()
    bad = ~(err <= tol)  # NaN is bad
    assert not bad.any(), (f"{int(bad.sum())} elements off, worst at {tuple(bad.nonzero()[0].tolist())}: "
                           f"err {err[bad].max().item():.3g} > tol {tol[bad].min().item():.3g}")


def assert_bf16_matches_fp32(out_bf16, out_fp32):
    """The interpreter rounds float32 -> bfloat16 by its own rule (not always to
    nearest even): within one bfloat16 ulp, 2^-7 relative (exact zeros stay zero)."""
    assert out_bf16.dtype == torch.bfloat16 and out_bf16.shape == out_fp32.shape
    err = (out_bf16.double() - out_fp32.double()).abs()
    assert bool((err <= 2.0**-7 * out_fp32.double().abs()).all())


CONFIG_32 = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_opinfo_samples(device):
    """Every scaled_grouped_mm OpInfo sample with float32 out (four layouts
    rowwise; MX 2D x 3D, 3D x 3D, 2D x 2D with plain, swizzled and per-group
    blocked scales; DeepSeek-V3 blockwise 2D x 3D and 3D x 3D, K and N past one
    128-block; e4m3 and e5m2; bias; zero tokens, empty groups, rows past offs[-1];
    weights column- and row-major), 32-wide tiles (the interpreter's time)."""
    cases = list(scaled_grouped_mm_cases(device, torch.float32))
    names = {n for n, _, _ in cases}
    assert {"2d3d_blockwise_e4m3", "3d3d_blockwise_e5m2", "2d2d_wgrad_mx", "3d2d", "2d3d_mx_swizzled_b",
            "2d3d_zero_tokens", "2d3d_b_row_major_rowwise_e4m3"} <= names
    for name, args, kw in cases:
        out = triton_scaled_grouped_mm(*args, **kw, config=CONFIG_32 if device == "cpu" else None)
        assert out.dtype == torch.float32, name
        assert_close_to_reference(out, args, kw, 32)


def test_scaled_bfloat16_out():
    """bfloat16 output (the op's default) on one sample per recipe: the float32
    result rounded (see assert_bf16_matches_fp32); a float32 bias with it."""
    cases = {n: (a, kw) for n, a, kw in scaled_grouped_mm_cases("cpu", torch.bfloat16)}
    for name in ("2d3d_bias_rowwise_e4m3", "2d3d_bias_mx_e4m3", "3d3d_blockwise_e4m3", "2d2d_wgrad"):
        args, kw = cases[name]
        out = triton_scaled_grouped_mm(*args, **kw, config=CONFIG_32)
        ref32 = triton_scaled_grouped_mm(*args, **{**kw, "out_dtype": torch.float32}, config=CONFIG_32)
        assert_bf16_matches_fp32(out, ref32)
    args, kw = cases["2d3d_rowwise_e4m3"]  # out_dtype omitted: bfloat16
    assert triton_scaled_grouped_mm(*args, offs=kw["offs"], config=CONFIG_32).dtype == torch.bfloat16


def _weights(G, K, N, recipe, f8, k_major, generator):
    """(G, K, N) weights quantised per output column (blocks along K of B^T)."""
    w = torch.randn(G, N, K, generator=generator) * 2
    d, s = torch_quantize_fp8(w, {"rowwise": "rowwise", "mx": "mx", "blockwise": "blockwise_128x128"}[recipe], f8)
    d = d.transpose(-2, -1)
    return (d if k_major else d.contiguous()), s


def _multi_tile_case(recipe, k_major=True, seed=0):
    """Groups spanning several 16-row tiles, K = 80 ragged against the
    interpreter's 16-deep K steps and 32-blocks (blockwise: K = 160, past one
    128-block); N = 48, three 16-wide tiles (ragged N is in the property test)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [0, 37, 2, 21]
    G, K, N = len(sizes), 160 if recipe == "blockwise" else 80, 48  # rows of 48 bytes: TMA can read (G, K, N)
    M = sum(sizes) + 5
    ends = torch.tensor(sizes).cumsum(0).tolist()
    a = torch.randn(M, K, generator=g)
    ar = {"rowwise": "rowwise", "mx": "mx", "blockwise": "blockwise_1x128"}[recipe]
    ad, as_ = torch_quantize_fp8(a, ar)
    offs = _offs(ends, "cpu")
    if recipe == "mx":
        as_ = torch_swizzle_mx_scale(as_, offs, 0)
    bd, bs = _weights(G, K, N, recipe, E4M3, k_major, g)
    bias = torch.randn(G, N, generator=g)
    return (ad, bd, as_, bs), dict(offs=offs, bias=bias, out_dtype=torch.float32)


@pytest.mark.parametrize("recipe,tma,k_major", [
    ("rowwise", False, False), ("rowwise", True, False), ("rowwise", True, True),
    ("blockwise", False, False), ("blockwise", True, True), ("mx", False, False), ("mx", True, True)],
    ids=["rowwise-b_kn", "rowwise-b_kn-tma", "rowwise-b_nk-tma", "blockwise-b_kn", "blockwise-b_nk-tma", "mx-b_kn",
         "mx-b_nk-tma"])
def test_persistent_schedule_independent_of_grid(recipe, tma, k_major):
    """Weights stored (G, K, N) and (G, N, K), by pointers or through a TMA
    descriptor (emulated bounds: zeros past each group's K and N). Every tile is
    computed whole by one program: the bits do not depend on the number of
    persistent programs (1; 40, more than tiles), which also moves the
    device-side cursor of MX's per-group blocked scale of A."""
    args, kw = _multi_tile_case(recipe, k_major)
    assert tf8._prepare_scaled(*args, kw["offs"], kw["bias"], None, kw["out_dtype"], tma=tma)[1]["B_DESC"] == (
        0 if not tma else 2 if k_major else 1)
    outs = [triton_scaled_grouped_mm(*args, **kw, num_programs=p, tma=tma) for p in (1, 40)]
    assert_close_to_reference(outs[0], args, kw, 16)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@st.composite
def scaled_problems(draw):
    """Random recipes and layouts (rowwise: all four; blockwise: 2D x 3D and
    3D x 3D; mx: 2D x 3D, 3D x 3D with plain or swizzled scales, 2D x 2D), group
    sizes with empty groups, skew and rows past offs[-1] (zero tokens too), K
    and N ragged against the tiles, both formats (and e4m3 x e5m2), both weight storage orders,
    bias, the grid size."""
    recipe = draw(st.sampled_from(["rowwise", "blockwise", "mx"]))
    layouts = {"rowwise": ["2d3d", "3d2d", "2d2d", "3d3d"], "blockwise": ["2d3d", "3d3d"],
               "mx": ["2d3d", "3d3d", "2d2d"]}[recipe]
    layout = draw(st.sampled_from(layouts))
    G = draw(st.integers(1, 4))
    unit = 32 if (recipe == "mx" and layout == "2d2d") else 1  # MX groups of K hold whole 32-blocks
    sizes = [unit * draw(st.integers(0, 40 // unit if unit == 1 else 2)) for _ in range(G)]
    if draw(st.booleans()):
        total, sizes = sum(sizes), [0] * G
        sizes[draw(st.integers(0, G - 1))] = total
    extra = draw(st.integers(0, 3)) if unit == 1 else 0
    k = draw(st.integers(1, 150 if recipe == "blockwise" else 70))
    n = draw(st.integers(1, 40))
    m = draw(st.integers(1, 20))
    formats = draw(st.sampled_from([(E4M3, E4M3), (E5M2, E5M2), (E4M3, E5M2)]))  # the op allows mixing
    return (recipe, layout, sizes, extra, m, k, n, formats, draw(st.booleans()),
            draw(st.booleans()), draw(st.booleans()), draw(st.integers(1, 5)))


def _build(problem, seed):
    """Operands and scales of a scaled_problems example, quantised by the reference."""
    recipe, layout, sizes, extra, m, k, n, (fa, fb), k_major, with_bias, swizzle, _ = problem
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 3  # noqa: E731
    G, total = len(sizes), sum(sizes)
    offs = _offs(torch.tensor(sizes).cumsum(0).tolist(), "cpu") if layout != "3d3d" else None
    qa = lambda x, r, **kw: torch_quantize_fp8(x, r, fa, **kw)  # noqa: E731
    q = lambda x, r, **kw: torch_quantize_fp8(x, r, fb, **kw)  # noqa: E731  (B)
    ra, rb = {"rowwise": ("rowwise", "rowwise"), "blockwise": ("blockwise_1x128", "blockwise_128x128"),
              "mx": ("mx", "mx")}[recipe]
    n_out = n
    if layout == "2d3d":
        ad, sa = qa(rnd(total + extra, k), ra)
        if recipe == "mx":
            sa = torch_swizzle_mx_scale(sa, offs, 0)
        bd, sb = q(rnd(G, n, k), rb, swizzle=swizzle and recipe == "mx")
        bd = bd.transpose(-2, -1)
    elif layout == "3d3d":
        ad, sa = qa(rnd(G, m, k), ra, swizzle=swizzle and recipe == "mx")
        bd, sb = q(rnd(G, n, k), rb, swizzle=swizzle and recipe == "mx")
        bd = bd.transpose(-2, -1)
    elif layout == "3d2d":  # rowwise: offs splits N
        ad, sa = qa(rnd(G, m, k), ra)
        n_out = total + extra
        bd, sb = q(rnd(n_out, k), rb)
        bd = bd.t()
    else:  # 2d2d: offs splits K = the tokens
        kk = total + extra
        if recipe == "rowwise":
            ad, sa = qa(rnd(m, kk), ra, offs=offs)
            bd, sb = q(rnd(n, kk), rb, offs=offs)
            sa, sb = sa.flatten(), sb.flatten()
        else:
            ad, sa = qa(rnd(m, kk), ra, offs=offs)
            bd, sb = q(rnd(n, kk), rb, offs=offs)
            sa, sb = torch_swizzle_mx_scale(sa, offs, 1), torch_swizzle_mx_scale(sb, offs, 1)
        bd = bd.t()
    if not k_major and bd.dim() == 3:
        bd = bd.contiguous()
    bias = rnd(G, n_out) if with_bias else None
    return (ad, bd, sa, sb), dict(offs=offs, bias=bias, out_dtype=torch.float32)


SCALED_EXAMPLES: list = []


@settings(max_examples=16, deadline=None)
@given(scaled_problems(), st.integers(0, 2**31 - 1))
def test_scaled_property_matches_reference(problem, seed):
    args, kw = _build(problem, seed)
    SCALED_EXAMPLES.append(problem[:2])
    out = triton_scaled_grouped_mm(*args, **kw, num_programs=problem[-1])
    assert_close_to_reference(out, args, kw, 16)


def test_scaled_property_examples_cover_the_recipes():
    """The examples above (derandomised: the same on every run) reach every recipe."""
    if not SCALED_EXAMPLES:
        test_scaled_property_matches_reference()
    assert {r for r, _ in SCALED_EXAMPLES} == {"rowwise", "blockwise", "mx"}, SCALED_EXAMPLES


@pytest.mark.parametrize("recipe,quantize_out,f8,layout", [
    ("blockwise", "blockwise_1x128", E4M3, "2d3d"), ("rowwise", "mx", E5M2, "2d3d"), ("mx", "mx", E4M3, "2d3d"),
    ("rowwise", "blockwise_1x128", E5M2, "3d3d")],
    ids=["blockwise-to-1x128-e4m3", "rowwise-to-mx-e5m2", "mx-to-mx-e4m3", "rowwise-3d3d-to-1x128-e5m2"])
def test_quantize_out_is_quantize_fp8_of_the_output(recipe, quantize_out, f8, layout):
    """The epilogue's quantisation for the next GEMM: bit for bit
    moe_ops.quantize_fp8 of the float32 output the same call computes (same
    tiles, so the same accumulator bits), with output columns over 40 binades
    (blocks of different scales), a partial last block (N = 150), an empty
    group and rows past offs[-1] (zeros: the smallest scale)."""
    args, kw = _multi_tile_case(recipe, seed=3)
    ad, bd, as_, bs = args
    if layout == "3d3d":
        ad, as_ = torch_quantize_fp8(torch.randn(4, 9, ad.shape[1]), "rowwise")
        kw = dict(out_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 150, ad.shape[-1], generator=g) * torch.logspace(-20, 20, 150, base=2.0).view(1, -1, 1)
    bd, bs = torch_quantize_fp8(w, {"rowwise": "rowwise", "blockwise": "blockwise_128x128", "mx": "mx"}[recipe])
    kw = {**kw, "bias": torch.randn(4, 150, generator=g) if layout == "2d3d" else None}
    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 128 if quantize_out != "mx" else 32, "BLOCK_K": 16})
    args = (ad, bd.transpose(1, 2), as_, bs)
    data, scale = triton_scaled_grouped_mm(*args, **kw, quantize_out=quantize_out, quantize_dtype=f8, config=config)
    out32 = triton_scaled_grouped_mm(*args, **{**kw, "out_dtype": torch.float32}, config=config)
    assert_close_to_reference(out32, args, {**kw, "out_dtype": torch.float32}, 16)
    assert_same_bits((data, scale), _op_quantize(out32, quantize_out, f8), f"{recipe} -> {quantize_out}")


def test_quantize_out_rejects():
    args, kw = _multi_tile_case("mx")
    with pytest.raises(ValueError, match="quantize_out must be None, 'blockwise_1x128' or 'mx', got 'rowwise'"):
        triton_scaled_grouped_mm(*args, **kw, quantize_out="rowwise")
    with pytest.raises(NotImplementedError, match="quantize_out='blockwise_1x128' with mx scales"):
        triton_scaled_grouped_mm(*args, **kw, quantize_out="blockwise_1x128")
    wgrad = {n: (a, k) for n, a, k in scaled_grouped_mm_cases("cpu", torch.float32)}["2d2d_wgrad"]
    with pytest.raises(ValueError, match="quantize_out needs 2D x 3D or 3D x 3D operands"):
        triton_scaled_grouped_mm(*wgrad[0], **wgrad[1], quantize_out="mx")


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_rejects_what_the_op_rejects(device):
    """The error inputs of moe_ops.scaled_grouped_mm, same errors and messages
    (the checks on offs's values too, on CPU tensors)."""
    for e in error_inputs_scaled_grouped_mm(None, device):
        s = e.sample_input
        with pytest.raises(e.error_type, match=e.error_regex):
            triton_scaled_grouped_mm(s.input, *s.args, **s.kwargs)


# ------------------------------------------------------------------ torch.library


def test_triton_ops_eager_and_traced():
    """moe_ops_triton::scaled_grouped_mm and ::quantize_fp8: eager on CPU is the
    interpreted kernel; both trace with fake tensors under torch.compile; the
    interpreted custom ops pass opcheck's schema and fake-tensor tests. Their
    signatures are those of the moe_ops ops, so wiring them is one line."""
    args, kw = _multi_tile_case("mx")
    eager = torch.ops.moe_ops_triton.scaled_grouped_mm(*args, **kw)
    assert torch.equal(eager, triton_scaled_grouped_mm(*args, **kw))
    compiled = torch.compile(torch.ops.moe_ops_triton.scaled_grouped_mm, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args, **kw), eager)
    full = (*args, kw["offs"], kw["bias"], None, kw["out_dtype"], False)
    # Not test_schema: its mutation check compares float8 inputs with an op CPU float8 lacks (mul).
    torch.library.opcheck(torch.ops.moe_ops_triton.scaled_grouped_mm_interpreted.default, full,
                          test_utils=("test_faketensor",))
    x = torch.randn(6, 70).mul(torch.logspace(-3, 3, 70))
    for recipe, kwq in (("mx", dict(swizzle=True)), ("rowwise", dict(offs=_offs([20, 20, 64], "cpu")))):
        got = torch.ops.moe_ops_triton.quantize_fp8(x, recipe, None, **kwq)
        assert_same_bits(got, _op_quantize(x, recipe, **kwq), recipe)
        traced = torch.compile(torch.ops.moe_ops_triton.quantize_fp8, backend="aot_eager", fullgraph=True)
        assert_same_bits(traced(x, recipe, None, **kwq), got, recipe)
        torch.library.opcheck(torch.ops.moe_ops_triton.quantize_fp8_interpreted.default,
                              (x, recipe, None, kwq.get("offs"), kwq.get("swizzle", False)),
                              test_utils=("test_schema", "test_faketensor"))
    schema = lambda op: str(op.default._schema).split("(", 1)[1].split(" -> ")[0]  # arguments  # noqa: E731
    assert schema(torch.ops.moe_ops_triton.scaled_grouped_mm) == schema(torch.ops.moe_ops.scaled_grouped_mm)
    assert schema(torch.ops.moe_ops_triton.quantize_fp8) == schema(torch.ops.moe_ops.quantize_fp8)


@pytest.mark.skipif(not isinstance(tf8.scaled_grouped_mm_kernel, triton.runtime.JITFunction),
                    reason="TRITON_INTERPRET=1 makes the kernel an interpreted function: nothing to trace")
def test_triton_op_traces_into_the_kernel_on_cuda(monkeypatch):
    """With fake CUDA tensors (no GPU), functionalising moe_ops_triton::scaled_grouped_mm
    (blockwise, TMA weights) and ::quantize_fp8 yields the Triton kernels
    themselves (triton_kernel_wrapper_functional), not opaque calls."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_moe_ops.triton import grouped_mm as tgm

    monkeypatch.setattr(tgm, "_num_sms", lambda index: 132)
    monkeypatch.setattr(tgm, "_capability", lambda index: (9, 0))
    wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
    with FakeTensorMode():
        a = torch.empty(250, 256, device="cuda", dtype=E4M3)
        b = torch.empty(4, 128, 256, device="cuda", dtype=E4M3).transpose(1, 2)
        sa = torch.empty(250, 2, device="cuda")
        sb = torch.empty(4, 1, 2, device="cuda")
        offs = torch.empty(4, device="cuda", dtype=torch.int32)
        graph = make_fx(dispatch_functionalize(torch.ops.moe_ops_triton.scaled_grouped_mm))(a, b, sa, sb, offs)
        x = torch.empty(250, 256, device="cuda", dtype=torch.bfloat16)
        qgraph = make_fx(dispatch_functionalize(
            lambda t: torch.ops.moe_ops_triton.quantize_fp8(t, "blockwise_1x128")))(x)
    (node,) = [n for n in graph.graph.nodes if n.target is wrapper]
    assert kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn is tf8.scaled_grouped_mm_kernel
    kw = node.kwargs["kwargs"]
    assert kw["SCALE"] == tf8.SCALE_BLOCKWISE and kw["B_DESC"] == 2 and kw["stride_bk"] == 1
    ret = graph.graph.output_node().args[0]
    assert ret.target is operator.getitem and ret.args == (node, "out_ptr")
    (qnode,) = [n for n in qgraph.graph.nodes if n.target is wrapper]
    assert kernel_side_table.get_kernel(qnode.kwargs["kernel_idx"]).fn is tf8.quantize_fp8_kernel


def test_autotuner_configs_are_the_compiled_ones():
    """The configs the autotuners may pick are those test_triton_aot compiles;
    rowwise and blockwise K steps lie within one 128-block, MX's within one 32-block."""
    from torch_moe_ops.triton.grouped_mm import LAYOUT_2D2D, LAYOUT_2D3D, LAYOUT_3D3D

    for scale in (tf8.SCALE_ROWWISE, tf8.SCALE_BLOCKWISE, tf8.SCALE_MX):
        for layout in (LAYOUT_2D3D, LAYOUT_3D3D, LAYOUT_2D2D):
            assert tf8._autotuned(scale, layout).configs == tf8.configs_for(scale, layout)
    assert tf8.configs_for(tf8.SCALE_BLOCKWISE, LAYOUT_2D3D) == tf8.CONFIGS_FP8
    assert tf8.configs_for(tf8.SCALE_ROWWISE, LAYOUT_2D2D) == tf8.CONFIGS_FP8_2D2D
    assert tf8.configs_for(tf8.SCALE_MX, LAYOUT_2D2D) == tf8.CONFIGS_MX
    assert all(128 % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_K"] % 32 == 0
               for c in tf8.CONFIGS_FP8 + tf8.CONFIGS_FP8_2D2D)
    assert all(c.kwargs["BLOCK_K"] == 32 for c in tf8.CONFIGS_MX)


# ------------------------------------------------------------------ the blocked mx scale's size on the device


def test_device_blocked_scale_bytes_are_the_cpu_checks():
    """triton/cuda.py's mx_blocked_bytes_needed (tensor arithmetic on offs, no
    host sync: what the CUDA kernel's device assert compares) gives the bytes
    the CPU check computes by enumerating every scale element
    (fp8._blocked_bytes_read), for groups of rows (2D x 3D) and of K
    (2D x 2D): empty groups, groups of 1 row, 31/32/33 and 127/128/129 rows,
    partial 4-column blocks, columns past offs[-1], no rows."""
    from torch_moe_ops.triton import cuda

    import random

    rng = random.Random(0)
    cases = [(0, 1, 1, [1]), (0, 129, 3, [31, 32, 33, 129]), (0, 300, 5, [0, 127, 128, 128, 300]),
             (1, 1, 0, [0]), (1, 0, 4, [32, 128]), (1, 129, 5, [0, 32, 33, 160]), (1, 256, 9, [96, 96, 280])]
    for _ in range(150):
        dim, groups = rng.randint(0, 1), rng.randint(1, 6)
        if dim == 0:
            rows, s = rng.randint(0, 400), rng.randint(0, 9)
            ends = sorted(rng.randint(0, rows) for _ in range(groups))
        else:
            rows, k = rng.randint(0, 300), rng.randint(0, 500)
            s = -(-k // 32)
            ends = sorted(rng.choice([rng.randint(0, k // 32) * 32, k]) for _ in range(groups))
        cases.append((dim, rows, s, ends))
    for dim, rows, s, ends in cases:
        want = tf8._blocked_bytes_read(rows, s, ends, dim)
        got = cuda.mx_blocked_bytes_needed(torch.tensor(ends, dtype=torch.int32), rows, s, dim)
        assert got.dim() == 0 and int(got) == want, (dim, rows, s, ends, int(got), want)


def test_device_assert_of_a_short_blocked_scale():
    """The CUDA kernel's check (device-side asserts; on CPU tensors
    torch._assert_async raises at once): a blocked mx scale one byte short of
    what offs's groups read fails with the CPU check's message (less the
    count, which only offs's values give), for 2D x 3D's scale_a and 2D x 2D's
    scale_a and scale_b; the exact size passes."""
    from torch_moe_ops import _checks
    from torch_moe_ops.triton import cuda

    offs = torch.tensor([40, 40, 200], dtype=torch.int32)
    a, b = torch.zeros(200, 64).to(E4M3), torch.zeros(3, 64, 48).to(E4M3)
    need = tf8._blocked_bytes_read(200, 2, offs.tolist(), 0)
    sb = torch.zeros(3, 48, 2, dtype=torch.uint8).view(E8M0)
    for short in (True, False):
        sa = torch.zeros(need - short, dtype=torch.uint8).view(E8M0).view(-1, 1)
        if short:
            with pytest.raises(RuntimeError, match=re.escape(_checks.mx_blocked_scale_message(sa))):
                cuda.assert_mx_blocked_scales(a, b, sa, sb, offs)
            with pytest.raises(ValueError, match=re.escape(_checks.mx_blocked_scale_message(sa, need))):
                tf8._check_offs_values(a, b, sa, sb, offs, tf8.SCALE_MX, "2d3d")
        else:
            cuda.assert_mx_blocked_scales(a, b, sa, sb, offs)
    # 2D x 2D (the weight gradient): both operands' scales blocked per group of K.
    koffs = torch.tensor([64, 64, 160], dtype=torch.int32)
    a2, b2 = torch.zeros(130, 160).to(E4M3), torch.zeros(160, 40).to(E4M3)
    need_a = tf8._blocked_bytes_read(130, 5, koffs.tolist(), 1)
    need_b = tf8._blocked_bytes_read(40, 5, koffs.tolist(), 1)
    ok_a = torch.zeros(need_a, 1, dtype=torch.uint8).view(E8M0)
    ok_b = torch.zeros(need_b, 1, dtype=torch.uint8).view(E8M0)
    cuda.assert_mx_blocked_scales(a2, b2, ok_a, ok_b, koffs)
    for sa, sb, short in ((ok_a[:-1], ok_b, ok_a[:-1]), (ok_a, ok_b[:-1], ok_b[:-1])):
        with pytest.raises(RuntimeError, match=re.escape(_checks.mx_blocked_scale_message(short))):
            cuda.assert_mx_blocked_scales(a2, b2, sa, sb, koffs)

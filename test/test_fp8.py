"""Tests of the fp8 ops: moe_ops::quantize_fp8, moe_ops::dequantize_fp8 and
moe_ops::scaled_grouped_mm.

quantize_fp8 is exact arithmetic (an amax, a division, a multiply by the
block's q, a clamp and one rounding), so data and scale are compared bit for
bit with the plain-torch reference (torch_moe_ops/reference.py), whose
rounding is torch's own float -> float8 conversion. Independently of that
reference: the rounding agrees with torch's conversion on every float8 value
and every midpoint between two of them, and the e8m0 edge cases are checked
against bytes worked out by hand. dequantize_fp8 is one multiply and one
rounding per element: compared exactly (NaN payloads aside). scaled_grouped_mm
sums in float32: compared with a float64 reference within a bound derived from
the float32 summation (assert_scaled_mm_close).

The OpInfos live in test/opinfo_fp8.py.
"""

import importlib.util

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings, strategies as st
from torch._C import DispatchKey
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.common_device_type import OpDTypes, onlyCPU, ops
from torch.testing._internal.common_utils import TestCase, run_tests

import torch_moe_ops
from torch_moe_ops.reference import (
    FP8_RECIPES,
    torch_dequantize_fp8,
    torch_grouped_mm,
    torch_quantize_fp8,
    torch_scaled_grouped_mm,
    torch_swizzle_mx_scale,
)

from common import assert_same_bits_at_thread_counts
from _cpu import cpu_flags
from _device import instantiate_cpu_and_cuda
from opinfo_fp8 import (SCALED_MM_DTYPES, _quantize_weight, _scaled_grouped_mm_rowwise_operands, make_fp8_op_db,
                        op_db as fp8_op_db)

E8M0 = torch.float8_e8m0fnu


def _bytes(t):
    """The bytes of a tensor, for bitwise comparison (NaN == NaN, -0 != +0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def float8_weights_decoded_in_gemm():
    """Whether scaled_grouped_mm's rowwise 2D x 3D and 3D x 3D products run
    on grouped mm's broadcast engine with the float8 weights decoded in its
    packing (grouped_mm_float8_weights_stub): its AVX512 build, on a CPU with
    AVX512_BF16 and without AMX (whose bfloat16 runs brgemm tiles). Elsewhere
    the kernel converts the weights to bfloat16 tiles first."""
    flags = cpu_flags()
    return ("avx512_bf16" in flags and "amx_tile" not in flags
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


def _call(op, s):
    return op(s.input, *s.args, **s.kwargs)


def _fake(mode, v):
    return mode.from_tensor(v) if isinstance(v, torch.Tensor) else v


def _as_tuple(x):
    return x if isinstance(x, (tuple, list)) else (x,)


def _assert_same(out, ref, msg="", strides=False):
    """float8 and e8m0 outputs bitwise; the others exactly, NaN equal to NaN
    (the vector and scalar fp32 -> fp16 conversions keep different NaN
    payloads); with strides=True, strided alike too."""
    for o, r in zip(_as_tuple(out), _as_tuple(ref), strict=True):
        assert (o.shape, o.dtype) == (r.shape, r.dtype), msg
        assert not strides or o.stride() == r.stride(), msg
        if o.dtype.itemsize == 1:
            assert torch.equal(_bytes(o), _bytes(r)), msg
        else:
            torch.testing.assert_close(o, r, atol=0, rtol=0, equal_nan=True, msg=msg)


def _abs_fp8(t):
    """|t| of a float8 tensor (clear the sign bits), same strides."""
    return (t.view(torch.uint8) & 0x7F).view(t.dtype)


def assert_scaled_mm_close(out, mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, out_dtype=None,
                           interpreted=False, **_):
    """out within float32-accumulation rounding of the float64 reference.

    The kernel sums products in float32, in some order: each partial sum
    rounds with relative error <= 2^-24, so |err| <= K * 2^-24 * sum_k |a_k b_k|
    (the same reference on absolute values). The products are exact for
    rowwise and MX (float8 -> bfloat16 is exact, MX scales are powers of two);
    blockwise tiles round each scaled element to float32 once, <= 2 * 2^-24
    more per product. Then two scale multiplies, the bias add and the final
    rounding, <= 3 * 2^-24 more relative, plus half an ulp of out_dtype
    (2^-9 relative for bfloat16; taken as 2^-8 to cover the float32 error
    carried into it). The rowwise arithmetic is the same in the kernel and in
    the whole-operand ATen computation of the upstream series' first PR of the
    op (moe_ops_testing.scaled_grouped_mm_dequantised), so the bound holds
    for both (a multiply and add the compiler fuses round once, not twice).
    interpreted: out is the Triton kernel's in Triton's
    interpreter (the CUDA slot on CPU tensors), whose float32 -> bfloat16
    conversion is not round-to-nearest-even: up to a whole bfloat16 ulp
    (2^-7 relative) instead of half. On a GPU the conversion rounds."""
    ref = torch_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs, bias, None, torch.float64)
    def abs_scale(t):  # e8m0 scales are positive (or NaN)
        return t.abs() if t.dtype == torch.float32 else t

    absprod = torch_scaled_grouped_mm(_abs_fp8(mat_a), _abs_fp8(mat_b), abs_scale(scale_a), abs_scale(scale_b), offs,
                                      None, None, torch.float64)
    k = mat_a.shape[-1]
    bf16_rel = 2.0 ** -7 if interpreted else 2.0 ** -8
    out_rel = bf16_rel if (out_dtype or torch.bfloat16) == torch.bfloat16 else 2.0 ** -24
    bound = (k + 5) * 2.0 ** -24 * absprod.abs() + out_rel * ref.abs() + 2 * 2.0 ** -24 * (
        bias.double().abs().max() if bias is not None and bias.numel() else 0)
    err = (out.double() - ref).abs()
    assert out.dtype == (out_dtype or torch.bfloat16) and out.shape == ref.shape
    assert bool((err <= bound).all()), f"max err {err.max()} (bound there {bound.view(-1)[err.argmax()]})"


class TestFp8(TestCase):
    @ops(fp8_op_db)
    def test_matches_reference(self, device, dtype, op):
        for s in op.sample_inputs(device, dtype):
            if op.name.endswith("scaled_grouped_mm"):
                assert_scaled_mm_close(_call(op, s), s.input, *s.args, **s.kwargs)
            else:
                _assert_same(_call(op, s), op.ref(s.input, *s.args, **s.kwargs), msg=s.name)

    @onlyCPU
    def test_bits_independent_of_thread_count(self, device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(3, 700, 384, generator=g) * 10).bfloat16()

        def run():
            outs = []
            for recipe in FP8_RECIPES:
                d, s = torch.ops.moe_ops.quantize_fp8(x, recipe)
                outs += [d, s, torch.ops.moe_ops.dequantize_fp8(d, s, recipe)]
            return outs

        assert_same_bits_at_thread_counts(run, equal=lambda a, b: torch.equal(_bytes(a), _bytes(b)))

    @onlyCPU
    def test_scaled_grouped_mm_bits_independent_of_thread_count(self, device):
        """Chunks, tiles and the K blocking depend on the shapes only."""
        g = torch.Generator().manual_seed(1)
        offs = torch.tensor([0, 300, 700, 1500], dtype=torch.int32)
        x, w = torch.randn(1500, 384, generator=g), torch.randn(4, 320, 384, generator=g)
        cases = []
        for ra, rb in (("rowwise", "rowwise"), ("mx", "mx"), ("blockwise_1x128", "blockwise_128x128")):
            xd, xs = torch.ops.moe_ops.quantize_fp8(x, ra)
            wd, ws = torch.ops.moe_ops.quantize_fp8(w, rb)
            if ra == "mx":
                xs = torch.ops.moe_ops.swizzle_mx_scale(xs, offs, 0)
            cases.append((xd, wd.transpose(-2, -1), xs, ws, offs))
        assert_same_bits_at_thread_counts(
            lambda: [torch.ops.moe_ops.scaled_grouped_mm(*c, out_dtype=torch.float32) for c in cases])

    def test_compile_dynamic_no_recompile(self, device):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

        def roundtrip(x, w):
            xd, xs = torch.ops.moe_ops.quantize_fp8(x, "rowwise")
            wd, ws = torch.ops.moe_ops.quantize_fp8(w, "mx", swizzle=True)
            return (torch.ops.moe_ops.dequantize_fp8(xd, xs, "rowwise", torch.bfloat16),
                    torch.ops.moe_ops.dequantize_fp8(wd, ws, "mx", None, None, True))

        compiled = torch.compile(roundtrip, backend=counter, fullgraph=True, dynamic=True)
        w = torch.randn(4, 40, 64, device=device)
        for tokens in (10, 17, 33):
            x = torch.randn(tokens, 64, device=device)
            for a, b in zip(compiled(x, w), roundtrip(x, w), strict=True):
                self.assertEqual(a, b, atol=0, rtol=0)
        self.assertEqual(counter.frame_count, 1, msg="recompiled for new token counts")

    def test_compile_scaled_grouped_mm(self, device):
        """quantize -> scaled_grouped_mm, the fp8 MoE forward, one frame for three token counts."""
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

        def forward(x, w, offs):
            xd, xs = torch.ops.moe_ops.quantize_fp8(x, "rowwise")
            wd, ws = torch.ops.moe_ops.quantize_fp8(w.transpose(-2, -1), "rowwise")
            return torch.ops.moe_ops.scaled_grouped_mm(xd, wd.transpose(-2, -1), xs, ws, offs)

        compiled = torch.compile(forward, backend=counter, fullgraph=True, dynamic=True)
        w = torch.randn(3, 64, 48, device=device)
        for tokens in (10, 17, 33):
            x = torch.randn(tokens, 64, device=device)
            offs = torch.tensor([tokens // 3, tokens // 2, tokens], dtype=torch.int32, device=device)
            self.assertEqual(compiled(x, w, offs), forward(x, w, offs), atol=0, rtol=0)
        self.assertEqual(counter.frame_count, 1, msg="recompiled for new token counts")


instantiate_cpu_and_cuda(TestFp8, globals(), gpu_adds=(
    "upstream's scaled grouped GEMM (e4m3 rowwise on sm_90+, MX on sm_100) and the ATen ops on the device; "
    "the entries' device-generic code runs on CPU tensors here (entry=cuda_entry)"))


# ----------------------------------------------- rounding, independent of the reference


@pytest.mark.parametrize("f8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_matches_torch_conversion(f8, dtype):
    """Every float8 value, every midpoint between neighbours (ties to even), and
    points just either side of them: tensorwise with amax = max gives q = 1, so
    the data must be torch's own x.to(f8) of the input."""
    fmax = torch.finfo(f8).max
    values = torch.arange(256, dtype=torch.uint8).view(f8).float()
    values = values[values.isfinite() & (values.abs() <= fmax)].unique()
    mids = (values[1:] + values[:-1]) / 2  # exact in float32
    ulp = torch.finfo(torch.float32).eps
    x = torch.cat([values, mids, mids * (1 + ulp), mids * (1 - ulp), torch.tensor([fmax])])
    x = x.to(dtype)
    data, scale = torch.ops.moe_ops.quantize_fp8(x.view(1, -1), "tensorwise", f8)
    assert scale.item() == 1.0
    assert torch.equal(_bytes(data.view(-1)), _bytes(x.float().to(f8)))


def _e8m0(byte):
    return torch.tensor([byte], dtype=torch.uint8).view(E8M0)


def test_mx_edge_cases_e4m3():
    """OCP MX scale = 2^(floor(log2(amax)) - 8) for e4m3, bytes worked out by hand."""
    x = torch.zeros(6, 32)
    x[0, :3] = torch.tensor([480.0, 1.0, -0.5])  # floor(log2 480) = 8: scale 2^0, 480 saturates to 448
    x[1, 0] = 1.0                                    # scale 2^-8; 1.0 -> 256 = 0x78
    x[2] = 0.0                                       # zero block: smallest scale 2^-127 (byte 0), data 0
    x[3, :2] = torch.tensor([float("inf"), 1.0])     # inf: NaN scale (0xFF), block dequantises to NaN
    x[4, :2] = torch.tensor([float("nan"), 1.0])     # NaN likewise
    x[5, :2] = torch.tensor([1e-40, -3e-41])         # float32 denormals: exponent field 0 -> scale 2^-127
    data, scale = torch.ops.moe_ops.quantize_fp8(x, "mx")
    sbytes = _bytes(scale).view(6, 1)[:, 0].tolist()
    assert sbytes == [127, 127 - 8, 0, 255, 255, 0]
    d = _bytes(data).view(6, 32)
    assert d[0, :3].tolist() == [0x7E, 0x38, 0xB0]   # 448, 1.0, -0.5
    assert d[1, 0].item() == 0x78 and d[2].eq(0).all()
    assert d[3].eq(0x7F).all() and d[4].eq(0x7F).all()  # x * NaN: every element NaN
    # 1e-40 * 2^127 = 0.01701 = 2^-6 * 1.089: nearest e4m3 is 2^-6 * 1.125, exponent 1, mantissa 001.
    assert d[5, 0].item() == 0x09
    out = torch.ops.moe_ops.dequantize_fp8(data, scale, "mx")
    assert out[3].isnan().all() and out[4].isnan().all()
    assert out[0, 0].item() == 448.0 and out[1, 0].item() == 1.0 and out[2].eq(0).all()
    for got, ref in zip((data, scale), torch_quantize_fp8(x, "mx")):
        assert torch.equal(_bytes(got), _bytes(ref))


def test_mx_edge_cases_e5m2_and_largest():
    x = torch.zeros(3, 32)
    x[0, 0] = 57344.0 * 2                          # floor(log2 114688) = 16: scale 2^(16 - 15) = 2^1
    x[1, 0] = torch.finfo(torch.float32).max       # exponent 127: scale 2^112, finite
    x[2, 0] = 2.0 ** -140                          # denormal amax: clamped to the smallest scale
    data, scale = torch.ops.moe_ops.quantize_fp8(x, "mx", torch.float8_e5m2)
    assert _bytes(scale).tolist() == [128, 127 + 112, 0]
    out = torch.ops.moe_ops.dequantize_fp8(data, scale, "mx")
    assert out[0, 0].item() == 114688.0
    # FLT_MAX * 2^-112 = 65535.99 would round up to 2^16, past the e5m2 max: it saturates to 57344 first.
    assert out[1, 0].item() == 1.75 * 2.0 ** 127
    assert out[2, 0].item() == 2.0 ** -140


def test_float_recipe_edge_cases():
    """q = fp8_max / max(amax, 1e-12), scale = 1 / q: an all-zero row gets a
    finite scale; inf gives q = 0 (scale inf) and the row dequantises to NaN."""
    x = torch.zeros(3, 8)
    x[0, :2] = torch.tensor([896.0, -1.0])  # q = 0.5: scale 2, data [448, -0.5]
    x[2, :2] = torch.tensor([float("inf"), 3.0])
    data, scale = torch.ops.moe_ops.quantize_fp8(x, "rowwise")
    assert scale[0].item() == 2.0
    q = torch.tensor(448.0) / torch.tensor(1e-12)
    assert scale[1] == torch.tensor(1.0) / q
    assert scale[2].item() == float("inf")
    assert _bytes(data[0, :2]).tolist() == [0x7E, 0xB0]
    assert _bytes(data[1]).eq(0).all()
    out = torch.ops.moe_ops.dequantize_fp8(data, scale, "rowwise")
    assert out[2].isnan().all() and out[1].eq(0).all()


def test_swizzle_layout_by_hand():
    """Element (r, c) of the scale grid sits at byte 16 * (r % 32) + 4 * ((r % 128) // 32) + c % 4 of its
    128 x 4 tile; tiles row-major over (row tile, column tile)."""
    x = torch.zeros(130, 32 * 5)
    for r in range(130):
        for c in range(5):
            x[r, 32 * c] = 2.0 ** ((r * 5 + c) % 50 - 20)  # a distinct scale per (r, c) within a tile
    _, grid = torch.ops.moe_ops.quantize_fp8(x, "mx")
    _, swz = torch.ops.moe_ops.quantize_fp8(x, "mx", swizzle=True)
    assert swz.shape == (256, 8)
    flat = _bytes(swz)
    g = _bytes(grid).view(130, 5)
    for r in range(130):
        for c in range(5):
            tile = (r // 128) * 2 + c // 4
            assert flat[tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4] == g[r, c]
    assert int(flat.count_nonzero()) == 130 * 5  # padding is zero bytes; every real scale is non-zero here


# The CUDA entries of the three ops (native/cuda/MoEQuantize.cpp, which runs
# the fallbacks of native/MoEQuantize.cpp, and MoEScaledGroupedMM.cpp) are
# device-generic ATen code, except that rowwise scaled_grouped_mm on sm_90+
# CUDA tensors goes to upstream's kernel. Called through the dispatcher's CUDA
# slot with CPU tensors they run here, so CI proves them without a GPU: the
# same checks, the CPU kernels' bytes (for the quantisation ops, also that the
# patch series' core/0006, whose CPU entry computes through the fallback, gives
# the bytes of the kernel core/0006.1 brings).
requires_cuda_build = pytest.mark.skipif(not torch_moe_ops.cuda_kernels_built(), reason="CPU-only build")


def _cuda_entry(name):
    op = getattr(torch.ops.moe_ops, name).default
    return lambda *args, **kwargs: op._op_dk(DispatchKey.CUDA, *args, **kwargs)


ENTRIES = {
    "cpu": lambda name: getattr(torch.ops.moe_ops, name).default,
    "cuda_entry": _cuda_entry,
}
entry_params = pytest.mark.parametrize(
    "entry", ["cpu", pytest.param("cuda_entry", marks=requires_cuda_build)])



# ------------------------------------------------------ hypothesis properties


@st.composite
def fp8_problems(draw):
    recipe = draw(st.sampled_from(FP8_RECIPES))
    three_d = draw(st.booleans())
    rows = draw(st.integers(0, 140))
    cols = draw(st.integers(0, 300))
    batch = draw(st.integers(1, 3)) if three_d else None
    offs = None
    if not three_d and recipe in ("tensorwise", "rowwise", "mx") and draw(st.booleans()):
        step = 32 if recipe == "mx" else 1
        cuts = sorted(draw(st.lists(st.integers(0, cols // step), max_size=5)))
        offs = [c * step for c in cuts]
    swizzle = recipe == "mx" and offs is None and draw(st.booleans())
    return recipe, batch, rows, cols, offs, swizzle


@settings(max_examples=120, deadline=None)
@given(fp8_problems(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]), st.integers(-30, 10), st.integers(0, 2**31 - 1))
@entry_params
def test_property_quantize_matches_reference(entry, problem, dtype, f8, log_scale, seed):
    recipe, batch, rows, cols, offs, swizzle = problem
    g = torch.Generator().manual_seed(seed)
    shape = (rows, cols) if batch is None else (batch, rows, cols)
    x = torch.randn(shape, generator=g) * 2.0 ** log_scale
    if x.numel() and seed % 3 == 0:  # sprinkle the specials
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (3,), generator=g)
        flat[idx] = torch.tensor([0.0, float("inf"), float("nan")])[: len(idx)]
    x = x.to(dtype)
    o = torch.tensor(offs, dtype=torch.int32) if offs is not None else None
    data, scale = ENTRIES[entry]("quantize_fp8")(x, recipe, f8, o, swizzle)
    rdata, rscale = torch_quantize_fp8(x, recipe, f8, o, swizzle)
    assert data.dtype == rdata.dtype and scale.dtype == rscale.dtype and scale.shape == rscale.shape
    assert torch.equal(_bytes(data), _bytes(rdata))
    assert torch.equal(_bytes(scale), _bytes(rscale))
    out = ENTRIES[entry]("dequantize_fp8")(data, scale, recipe, dtype, o, swizzle)
    torch.testing.assert_close(out, torch_dequantize_fp8(data, scale, recipe, dtype, o, swizzle), atol=0, rtol=0,
                               equal_nan=True)


@pytest.mark.parametrize("recipe,f8,bound", [
    # Relative error of one element after a round trip, for elements within
    # the block's top binade: half an fp8 ulp, 2^-4 (e4m3) or 2^-3 (e5m2),
    # plus float32 rounding of q and 1/q (~2^-23 each).
    ("rowwise", torch.float8_e4m3fn, 2.0 ** -4 + 2.0 ** -21),
    ("blockwise_1x128", torch.float8_e4m3fn, 2.0 ** -4 + 2.0 ** -21),
    ("mx", torch.float8_e4m3fn, 2.0 ** -4),
    ("mx", torch.float8_e5m2, 2.0 ** -3),
])
def test_roundtrip_error_bound(recipe, f8, bound):
    g = torch.Generator().manual_seed(0)
    # [1, 1.75): the MX scale 2^(floor(log2 amax) - emax) maps it to [2^emax, max] without saturation.
    x = torch.rand(64, 256, generator=g) * 0.75 + 1.0
    data, scale = torch.ops.moe_ops.quantize_fp8(x, recipe, f8)
    back = torch.ops.moe_ops.dequantize_fp8(data, scale, recipe)
    rel = ((back - x).abs() / x).max().item()
    assert rel <= bound
    assert rel > bound / 8  # the test can fail: the data really was rounded to fp8


@st.composite
def scaled_problems(draw):
    layout = draw(st.sampled_from(["2d3d", "3d3d", "3d2d", "2d2d"]))
    recipes = {"2d3d": ["rowwise", "mx", "blockwise"], "3d3d": ["rowwise", "mx", "blockwise"], "3d2d": ["rowwise"],
               "2d2d": ["rowwise", "mx"]}[layout]
    recipe = draw(st.sampled_from(recipes))
    groups = draw(st.integers(1, 5))
    big = recipe == "blockwise" and draw(st.booleans())  # past one 128-block in K and N
    m, k = draw(st.integers(0, 40)), draw(st.integers(0, 300 if big else 100))
    n = draw(st.integers(1, 300 if big else 40))
    sizes = draw(st.lists(st.integers(0, 12), min_size=groups, max_size=groups))
    if layout == "2d2d" and recipe == "mx":  # token groups of whole 32-blocks
        sizes = [32 * (s_ % 3) for s_ in sizes]
    return layout, recipe, groups, m, k, n, sizes


@settings(max_examples=80, deadline=None)
@given(scaled_problems(), st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]),
       st.sampled_from([torch.bfloat16, torch.float32]), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
@entry_params
def test_property_scaled_grouped_mm(entry, problem, f8, out_dtype, with_bias, k_major, seed):
    """Every layout and recipe against the float64 reference, weights in both
    storage orders, groups of any size (including empty)."""
    layout, recipe, groups, m, k, n, sizes = problem
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    total = int(ends[-1])

    a_recipe, b_recipe = ("blockwise_1x128", "blockwise_128x128") if recipe == "blockwise" else (recipe, recipe)
    swizzle = recipe == "mx" and seed % 2 == 1  # MX scales of 3-D operands in upstream's blocked layout

    def right(w):  # (.., K, N) quantised per column; column-major (k_major) or row-major data
        d, s_ = torch_quantize_fp8(w.transpose(-2, -1).contiguous(), b_recipe, f8, None, swizzle and w.dim() == 3)
        return (d.transpose(-2, -1) if k_major else d.transpose(-2, -1).contiguous()), s_

    offs = ends
    if layout == "2d3d":
        a, sa = torch_quantize_fp8(torch.randn(total + 2, k, generator=g), a_recipe, f8)
        if recipe == "mx":  # 2-D operand: blocked per group of rows
            sa = torch_swizzle_mx_scale(sa, ends, 0)
        b, sb = right(torch.randn(groups, k, n, generator=g))
    elif layout == "3d3d":
        a, sa = torch_quantize_fp8(torch.randn(groups, m, k, generator=g), a_recipe, f8, None, swizzle)
        b, sb = right(torch.randn(groups, k, n, generator=g))
        offs = None
    elif layout == "3d2d":
        a, sa = torch_quantize_fp8(torch.randn(groups, m, k, generator=g), recipe, f8)
        b, sb = right(torch.randn(k, total + 1, generator=g))
    else:  # 2d2d: groups along K; rowwise: per-group scales of A's rows and B's columns
        a, sa = torch_quantize_fp8(torch.randn(m, total + 3, generator=g), recipe, f8, ends)
        bt, sb = torch_quantize_fp8(torch.randn(n, total + 3, generator=g), recipe, f8, ends)
        b = bt.t()
        if recipe == "rowwise":
            sa, sb = sa.flatten(), sb.flatten()
        else:  # blocked per group of K
            sa, sb = torch_swizzle_mx_scale(sa, ends, 1), torch_swizzle_mx_scale(sb, ends, 1)
    n_out = b.shape[-1]
    bias = torch.randn(groups, n_out, generator=g) if with_bias else None
    out = ENTRIES[entry]("scaled_grouped_mm")(a, b, sa, sb, offs, bias, None, out_dtype)
    assert_scaled_mm_close(out, a, b, sa, sb, offs, bias, out_dtype, interpreted=entry == "cuda_entry")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 12), st.lists(st.integers(0, 150), max_size=6), st.sampled_from([0, 1]),
       st.integers(0, 2**31 - 1))
@entry_params
def test_property_swizzle_mx_scale(entry, rows, blocks, sizes, dim, seed):
    """Per-group blocked MX scales: bitwise the reference's bytes, and
    scaled_grouped_mm reads them back to the plain grid (a 2D x 3D or 2D x 2D
    product equal to the one from the plain grid dequantised)."""
    g = torch.Generator().manual_seed(seed)
    cols = 32 * blocks
    x = torch.randn(rows, cols, generator=g) * 2.0 ** torch.randint(-20, 20, (rows, cols), generator=g)
    _, scale = torch_quantize_fp8(x, "mx")
    if dim == 0:
        ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0).clamp_max(rows)
    else:
        ends = (torch.tensor(sizes, dtype=torch.int64) // 32 * 32).cumsum(0).clamp_max(cols)
    offs = ends.to(torch.int32)
    out = ENTRIES[entry]("swizzle_mx_scale")(scale, offs, dim)
    ref = torch_swizzle_mx_scale(scale, offs, dim)
    assert out.shape == ref.shape and torch.equal(_bytes(out), _bytes(ref))


@pytest.mark.parametrize("f8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("k_major", [False, True])
def test_scaled_grouped_mm_decodes_every_byte(f8, k_major):
    """Each of the 256 float8 codes (NaN, infinity, denormals among them)
    lands exactly: the weight is diagonal with the codes on its diagonal (a
    263-long run, past eight 32-lane steps, with a 7-lane tail, in either
    storage order) and the tokens are ones, so out[i, j] is code j's value
    (NaN where it is NaN) plus exact zeros, in float32 with unit scales
    (-0 plus +0 is +0, so 0x80 shows as 0). The AVX-512 build decodes
    unscaled runs by byte arithmetic (MoEFp8Avx512.h), routes of their own
    beside the float32 one the scaled recipes take: in the conversion, or
    where the GEMM decodes the weights (float8_weights_decoded_in_gemm) in
    its packing, (K, N) weights among the first row block's products and
    (N, K) weights transposed as codes (K and columns in whole blocks) or
    column by column at the edges (the last 7 columns, the last 7 of K)."""
    n = 263
    codes = (torch.arange(n) % 256).to(torch.uint8)
    diag = torch.diag(codes)
    w = diag.view(f8)[None]  # (1, K, N)
    w = w.transpose(-2, -1).contiguous().transpose(-2, -1) if k_major else w
    ones = torch.ones(3, n).to(f8)
    offs = torch.tensor([3], dtype=torch.int32)
    out = torch_moe_ops.scaled_grouped_mm(ones, w, torch.ones(3), torch.ones(1, n), offs, out_dtype=torch.float32)
    want = codes.view(f8).float().expand(3, n)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    # A NaN code of either sign becomes bfloat16's one NaN, 0x7FC0, as c10::BFloat16(float) rounds
    # NaN, whichever route decodes it; the float32 product carries it out as 0x7FC00000.
    assert set(out[out.isnan()].view(torch.int32).tolist()) <= {0x7FC00000}


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the float8 decoders are in the AVX512 build of the kernels only")
@pytest.mark.parametrize("f8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("decoder", ["byte_arithmetic", "byte_tables"])
def test_fp8_decoders_every_code(f8, decoder):
    """Both float8 -> bfloat16 decoders of MoEFp8Avx512.h, on every code
    (NaN, infinity, denormals and both zeros among them): each kernel picks
    one by the CPU (byte tables where it has AVX512_VBMI), so the engine's
    tests run only that one here; moe_ops_testing.fp8_decode runs either.
    Their words (run: 64 codes a step, a 7-code masked tail) and their low
    and high bytes are exactly torch's float8 -> bfloat16 conversion, NaN
    0x7FC0 whatever its sign."""
    if decoder == "byte_tables" and "avx512vbmi" not in cpu_flags():
        pytest.skip("decoder byte_tables needs AVX512_VBMI, which this CPU lacks")
    g = torch.Generator().manual_seed(7)
    codes = torch.cat([torch.arange(256), torch.randint(0, 256, (263,), generator=g)]).to(torch.uint8)
    words, halves = torch.ops.moe_ops_testing.fp8_decode(codes, f8 == torch.float8_e5m2, decoder)
    want = codes.view(f8).to(torch.bfloat16).view(torch.int16)
    assert torch.equal(words, want)
    assert torch.equal(halves[0], (want & 0xFF).to(torch.uint8))
    assert torch.equal(halves[1], ((want >> 8) & 0xFF).to(torch.uint8))
    assert set(want[codes.view(f8).float().isnan()].tolist()) <= {0x7FC0}


@pytest.mark.parametrize("k_major", [False, True])
def test_scaled_grouped_mm_mx_weight_scale_per_element(k_major):
    """MX weights stored (K, N) give each element of a run along N a scale of
    its own (the AVX-512 build gathers 16 codes into a vector; stored
    (N, K) the scale is one per 16 lanes). Weights all 1.0 under distinct
    e8m0 codes per column and 32-block of K, tokens all 1.0 under code 127:
    out[m, n] = 32 * (2^(s[n, 0] - 127) + 2^(s[n, 1] - 127)), exact in float32
    (every partial sum spans < 24 bits: codes 15 apart at most), NaN where a
    code is 0xFF. N = 37 crosses two 16-lane steps and a tail."""
    g = torch.Generator().manual_seed(5)
    m, k, n = 3, 64, 37
    codes = torch.randint(115, 131, (1, n, k // 32), generator=g, dtype=torch.uint8)  # partial sums exact
    codes[0, 20, 1] = 0xFF
    one = torch.ones(()).to(torch.float8_e4m3fn)
    w = one.expand(1, n, k).contiguous().transpose(-2, -1)  # (1, K, N) view of (1, N, K)
    w = w if k_major else w.contiguous()
    a = one.expand(m, k).contiguous()
    offs = torch.tensor([m], dtype=torch.int32)
    sa = torch_moe_ops.swizzle_mx_scale(torch.full((m, k // 32), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu),
                                        offs, 0)
    sb = codes.view(torch.float8_e8m0fnu)
    out = torch_moe_ops.scaled_grouped_mm(a, w, sa, sb, offs, out_dtype=torch.float32)
    want = 32 * (2.0 ** (codes[0].double() - 127)).sum(1)
    want[20] = float("nan")
    torch.testing.assert_close(out.double(), want.expand(m, n), rtol=0, atol=0, equal_nan=True)


def test_scaled_grouped_mm_is_dequantise_then_grouped_mm():
    """The MoE forward shape: equal to the exact (float64 reference) product
    of the operands dequantised by the reference, up to float32 accumulation:
    K * 2^-24 * sum|a b| for the sums, plus 5 * 2^-24 * sum|a b| for rounding
    the dequantised operands (2 ulps a product) and applying the scales after
    the sum (3 ulps). Nothing on the reference side runs our kernels."""
    g = torch.Generator().manual_seed(3)
    offs = torch.tensor([100, 100, 260, 300], dtype=torch.int32)
    x, w = torch.randn(300, 256, generator=g), torch.randn(4, 256, 192, generator=g)
    for ra, rb in (("rowwise", "rowwise"), ("mx", "mx"), ("blockwise_1x128", "blockwise_128x128")):
        xd, xs = torch_moe_ops.quantize_fp8(x, ra)
        wd, ws = torch_moe_ops.quantize_fp8(w.transpose(-2, -1), rb)
        blocked = torch_moe_ops.swizzle_mx_scale(xs, offs, 0) if ra == "mx" else xs
        out = torch_moe_ops.scaled_grouped_mm(xd, wd.transpose(-2, -1), blocked, ws, offs, out_dtype=torch.float32)
        xf = torch_dequantize_fp8(xd, xs, ra)
        wf = torch_dequantize_fp8(wd, ws, rb).transpose(-2, -1)
        exact = torch_grouped_mm(xf, wf, offs, out_dtype=torch.float64)
        absprod = torch_grouped_mm(xf.abs(), wf.abs(), offs, out_dtype=torch.float64)
        assert bool(((out.double() - exact).abs() <= (256 + 5) * 2.0 ** -24 * absprod).all()), ra



@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["2d3d", "3d3d"]), st.lists(st.integers(0, 40), min_size=1, max_size=5),
       st.one_of(st.sampled_from([64, 256, 320, 512]), st.integers(1, 600)),
       st.one_of(st.sampled_from([16, 64, 80, 272]), st.integers(1, 300)),
       st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]), st.sampled_from([torch.bfloat16, torch.float32]),
       st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_scaled_grouped_mm_rowwise_weights_in_both_orders(layout, sizes, k, n, f8, out_dtype, with_bias, a_k_major,
                                                          seed):
    """Rowwise float8 weights stored (K, N) and (N, K), at sizes that cross
    the kernels' blocks (256 K, 64 and 256 columns, 6 rows) and their edges
    (K or N not a multiple of 16 or 64), tokens row- or column-major: each
    within the float64 bound, and both orders the same bits where the weights
    are decoded in the GEMM's packing (float8_weights_decoded_in_gemm). There
    the two orders' packing routes differ ((K, N): decoded among the first row
    block's products, (N, K): transposed as codes, then decoded) and must land
    the same K pairs; a converting kernel runs (N, K) tiles on other engines,
    whose K order differs."""
    g = torch.Generator().manual_seed(seed)
    groups = len(sizes)
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32) if layout == "2d3d" else None
    shape = (int(offs[-1]) + 1, k) if layout == "2d3d" else (groups, max(sizes), k)
    a, sa = torch_quantize_fp8(torch.randn(shape, generator=g), "rowwise", f8)
    if a_k_major:
        a = a.transpose(-2, -1).contiguous().transpose(-2, -1)
    w = torch.randn(groups, k, n, generator=g)
    b_nk, sb = _quantize_weight(w, "rowwise", f8)
    b_kn = b_nk.contiguous()
    bias = torch.randn(groups, n, generator=g) if with_bias else None
    outs = []
    for b in (b_kn, b_nk):
        out = torch.ops.moe_ops.scaled_grouped_mm(a, b, sa, sb, offs, bias, None, out_dtype)
        assert_scaled_mm_close(out, a, b, sa, sb, offs, bias, out_dtype)
        outs.append(out)
    if float8_weights_decoded_in_gemm():
        assert torch.equal(_bytes(outs[0]), _bytes(outs[1]))


@pytest.mark.parametrize("layout", ["2d3d", "3d3d"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_scaled_grouped_mm_rowwise_large_groups(layout, out_dtype):
    """Groups of hundreds of rows, no bias, bfloat16 out: the sizes at which
    bfloat16 grouped mm leaves its micro-kernels for at::mm with (N, K)
    weights. Float8 weights decoded in the GEMM (float8_weights_decoded_in_gemm)
    must stay on the broadcast engine, the only one that reads them: within
    the float64 bound, both storage orders the same bits."""
    g = torch.Generator().manual_seed(4)
    k, n = 288, 272  # at::mm takes groups whose smallest dimension averages 256 or more
    offs = torch.tensor([300, 300, 920], dtype=torch.int32) if layout == "2d3d" else None
    a, sa = torch_quantize_fp8(torch.randn((920, k) if layout == "2d3d" else (3, 300, k), generator=g), "rowwise")
    b_nk, sb = _quantize_weight(torch.randn(3, k, n, generator=g), "rowwise")
    outs = []
    for b in (b_nk.contiguous(), b_nk):
        out = torch.ops.moe_ops.scaled_grouped_mm(a, b, sa, sb, offs, None, None, out_dtype)
        assert_scaled_mm_close(out, a, b, sa, sb, offs, None, out_dtype)
        outs.append(out)
    if float8_weights_decoded_in_gemm():
        assert torch.equal(_bytes(outs[0]), _bytes(outs[1]))


def _dequantised_entry_cases():
    """The OpInfo's rowwise samples in the layouts core/0006c1 takes (2D x 3D,
    3D x 3D: empty groups, rows past offs[-1], zero tokens, both weight storage
    orders, bias), and an A that neither dimension keeps contiguous."""
    g = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(shape, generator=g) * 3

    for name, args, kw, _ in _scaled_grouped_mm_rowwise_operands(rnd):
        if args[1].dim() == 3:
            yield name, args, kw
            if "bias" in kw:
                yield name + "_no_bias", args, {k: v for k, v in kw.items() if k != "bias"}
    ad, as_ = torch_quantize_fp8(rnd(30, 80), "rowwise")
    strided = torch.zeros(30, 80, 2).to(ad.dtype)
    strided[..., 1] = ad
    bd, bs = _quantize_weight(rnd(4, 80, 24), "rowwise")
    yield "2d3d_strided_a", (strided[..., 1], bd, as_, bs), dict(offs=torch.tensor([5, 5, 17, 26], dtype=torch.int32))


@pytest.mark.parametrize("out_dtype", SCALED_MM_DTYPES)
def test_dequantised_entry_matches_reference_and_kernel(out_dtype):
    """moe_ops_testing.scaled_grouped_mm_dequantised runs the code of core/0006c1's
    CPU entry (patches/fp8_stages.ENTRY_DEQUANTISED carries it there) before
    core/0006c1a's kernel replaces it. On that PR's samples it is within the
    bound the OpInfo test holds the kernel to (assert_scaled_mm_close: exact
    products, float32 sums, two scale multiplies and the bias add, one
    rounding; the arithmetic of both). Without a bias it gives the kernel's
    bits where both sum in the same K order and the same two multiplies
    follow: weights stored (K, N), which both multiply on the broadcast
    engine, whether the kernel converts them to bfloat16 tiles first or
    decodes them in the engine's packing; (N, K) weights only where the
    kernel converts them (float8_weights_decoded_in_gemm), since the entry's
    grouped mm then runs these small groups on the inner-product engine,
    whose K order differs. With a bias the kernel's compiler may fuse the
    second multiply and the add (one rounding fewer), so there only the
    bound holds."""
    op = torch.ops.moe_ops_testing.scaled_grouped_mm_dequantised
    seen_bias = 0
    for name, (a, b, sa, sb), kw in _dequantised_entry_cases():
        offs, bias = kw.get("offs"), kw.get("bias")
        out = op(a, b, sa, sb, offs, bias, out_dtype)
        assert_scaled_mm_close(out, a, b, sa, sb, offs, bias, out_dtype)
        kernel = torch.ops.moe_ops.scaled_grouped_mm(a, b, sa, sb, offs, bias, None, out_dtype)
        if bias is None and (b.stride(-1) == 1 or not float8_weights_decoded_in_gemm()):
            assert torch.equal(_bytes(out), _bytes(kernel)), name
        seen_bias += bias is not None
    assert seen_bias > 0
    a2, b2 = torch.zeros(6, 64).to(torch.float8_e4m3fn), torch.zeros(64, 8).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="rowwise scales in the 2D x 3D and 3D x 3D layouts only, got scale_a of "
                                         "dtype Float and mat_b of sizes \\[64, 8\\]"):
        op(a2, b2, torch.ones(12), torch.ones(16), torch.tensor([32, 64], dtype=torch.int32))


def _sqnr_db(x, ref):
    x, ref = x.detach(), ref.detach().double()
    return float(10 * torch.log10(ref.pow(2).sum() / (x.double() - ref).pow(2).sum()))


def _training_problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor([40, 40, 100, 128], dtype=torch.int32)
    a = torch.randn(130, 256, generator=g).to(dtype).requires_grad_()  # 2 rows past offs[-1]
    # Weights stored (G, N, K), used transposed, as transformers stores them.
    b = (torch.randn(4, 192, 256, generator=g) * 0.05).to(dtype).transpose(-2, -1).requires_grad_()
    go = torch.randn(130, 192, generator=g).to(dtype)
    return a, b, offs, go


@pytest.mark.parametrize("recipe", ["rowwise", "mx"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_grouped_mm_against_float64(recipe, dtype):
    """Forward and both gradients near the float64 grouped mm. Rounding one
    normal operand to e4m3 (3 mantissa bits, round to nearest) leaves a
    relative error uniform in +-2^-4 of an ulp's binade, ~31 dB; two operands
    ~28 dB. 24 dB leaves room for the block maxima that saturate (MX) and for
    bfloat16 output rounding; a wrong scale or layout gives < 10 dB. With "mx"
    the weight gradient is computed in high precision: > 40 dB."""
    a, b, offs, go = _training_problem(dtype)
    out = torch_moe_ops.fp8_grouped_mm(a, b, offs, recipe)
    ga, gb = torch.autograd.grad(out, (a, b), go)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    ref = torch_grouped_mm(a64, b64, offs)  # float64 loop of mm, not our kernel
    ra, rb = torch.autograd.grad(ref, (a64, b64), go.double())
    assert out.dtype == ga.dtype == gb.dtype == dtype and gb.shape == b.shape
    assert _sqnr_db(out, ref) > 24 and _sqnr_db(ga[:128], ra[:128]) > 24
    assert ga[128:].eq(0).all()  # rows past offs[-1] take no gradient
    assert _sqnr_db(gb, rb) > (24 if recipe == "rowwise" else 40)


def test_fp8_grouped_mm_mx_wgrad_in_fp8():
    """MX weight gradient as a scaled 2D x 2D GEMM: token groups of whole
    32-blocks (as permute(..., alignment=32) makes them), one empty; the same
    SQNR bound as the other float8 GEMMs. Misaligned groups are an error."""
    g = torch.Generator().manual_seed(5)
    offs = torch.tensor([64, 64, 160, 192], dtype=torch.int32)
    a = torch.randn(200, 256, generator=g).bfloat16().requires_grad_()
    b = (torch.randn(4, 96, 256, generator=g) * 0.05).bfloat16().transpose(-2, -1).requires_grad_()
    go = torch.randn(200, 96, generator=g).bfloat16()
    (gb,) = torch.autograd.grad(torch_moe_ops.fp8_grouped_mm(a, b, offs, "mx", wgrad="fp8"), (b,), go)
    b64 = b.detach().double().requires_grad_()
    (rb,) = torch.autograd.grad(torch_grouped_mm(a.detach().double(), b64, offs), (b64,), go.double())
    assert _sqnr_db(gb, rb) > 24
    bad = torch.tensor([60, 64, 160, 192], dtype=torch.int32)
    out = torch_moe_ops.fp8_grouped_mm(a, b, bad, "mx", wgrad="fp8")
    with pytest.raises(ValueError, match=r"offs\[g\] must be a multiple of 32 .* got offs\[0\]=60"):
        torch.autograd.grad(out, (b,), go)


def test_fp8_grouped_mm_backward_is_the_documented_gemms():
    """The rowwise backward is exactly: dgrad = scaled_grouped_mm of grad and
    B quantised along N, wgrad = the 2D x 2D scaled_grouped_mm of A^T and
    grad^T quantised per group of tokens (bitwise: the same ops)."""
    a, b, offs, go = _training_problem(torch.bfloat16, 1)
    out = torch_moe_ops.fp8_grouped_mm(a, b, offs, "rowwise")
    ga, gb = torch.autograd.grad(out, (a, b), go)
    q, mm = torch_moe_ops.quantize_fp8, torch_moe_ops.scaled_grouped_mm
    g_d, g_s = q(go, "rowwise")
    b_d, b_s = q(b.detach(), "rowwise")
    assert torch.equal(ga, mm(g_d, b_d.transpose(-2, -1), g_s, b_s, offs))
    at_d, at_s = q(a.detach().t(), "rowwise", offs=offs)
    gt_d, gt_s = q(go.t(), "rowwise", offs=offs)
    wgrad = mm(at_d, gt_d.t(), at_s.flatten(), gt_s.flatten(), offs, out_dtype=torch.float32)
    assert torch.equal(gb, wgrad.to(torch.bfloat16))


@pytest.mark.parametrize("recipe, wgrad", [("rowwise", "fp8"), ("mx", "fp8"), ("mx", "hp")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_grouped_mm_states_its_recipes_on_v2(recipe, wgrad, dtype):
    """The training GEMMs run scaled_grouped_mm_v2 with their recipes stated (RowWise, or BlockWise1x32
    with the 2-D operands' scales SWIZZLE_32_4_4 and the weight's NO_SWIZZLE), never v1, and give v1's
    bits: the forward, dgrad and wgrad are each recomputed here with v1 on the same quantised operands."""
    from common import MoeOpsCalls

    g = torch.Generator().manual_seed(9)
    offs = torch.tensor([64, 64, 160, 192], dtype=torch.int32)  # whole 32-blocks: MX's float8 wgrad
    a = torch.randn(200, 96, generator=g).to(dtype).requires_grad_()
    b = (torch.randn(4, 48, 96, generator=g) * 0.05).to(dtype).transpose(-2, -1).requires_grad_()
    go = torch.randn(200, 48, generator=g).to(dtype)
    from torch_moe_ops.ops import fp8 as fp8_ops

    hp = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    out = torch_moe_ops.fp8_grouped_mm(a, b, offs, recipe, wgrad=wgrad)
    # (the custom op's forward runs inside the dispatch mode's handler, unseen by it: called directly here)
    with MoeOpsCalls() as forward:
        assert torch.equal(fp8_ops._fp8_grouped_mm_forward(a.detach(), b.detach(), offs, recipe, hp, True), out)
    with MoeOpsCalls() as backward:
        ga, gb = torch.autograd.grad(out, (a, b), go)
    assert "scaled_grouped_mm" not in forward.names + backward.names
    assert forward.names.count("scaled_grouped_mm_v2") == 1
    assert backward.names.count("scaled_grouped_mm_v2") == (2 if wgrad == "fp8" else 1)
    q, v1, swz = torch_moe_ops.quantize_fp8, torch_moe_ops.scaled_grouped_mm, torch_moe_ops.swizzle_mx_scale

    def blocked(s, dim):
        return swz(s, offs, dim) if recipe == "mx" else s

    a_d, a_s = q(a.detach(), recipe)
    bt_d, b_s = q(b.detach().transpose(-2, -1), recipe)
    assert torch.equal(out, v1(a_d, bt_d.transpose(-2, -1), blocked(a_s, 0), b_s, offs, out_dtype=hp))
    g_d, g_s = q(go, recipe)
    b_d, bs2 = q(b.detach(), recipe)
    assert torch.equal(ga, v1(g_d, b_d.transpose(-2, -1), blocked(g_s, 0), bs2, offs, out_dtype=hp).to(dtype))
    if wgrad == "fp8":
        at_d, at_s = q(a.detach().t(), recipe, offs=offs)
        gt_d, gt_s = q(go.t(), recipe, offs=offs)
        if recipe == "rowwise":
            at_s, gt_s = at_s.flatten(), gt_s.flatten()
        else:
            at_s, gt_s = swz(at_s, offs, 1), swz(gt_s, offs, 1)
        assert torch.equal(gb, v1(at_d, gt_d.t(), at_s, gt_s, offs, out_dtype=torch.float32).to(dtype))


def test_fp8_grouped_mm_opcheck():
    """The custom op behind fp8_grouped_mm (its gradient a register_autograd
    formula, as every op's): its fake kernel (the same composition on fake
    tensors) matches eager in shape, strides and dtype, and its autograd
    registration traces, rowwise with the float8 weight gradient and mx with
    the high-precision one."""
    a, b, offs, _ = _training_problem(torch.bfloat16, 3)
    for recipe, wgrad_fp8 in (("rowwise", True), ("mx", False)):
        torch.library.opcheck(torch.ops.moe_ops_training.fp8_grouped_mm.default,
                              (a, b, offs, recipe, torch.bfloat16, wgrad_fp8))


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise_1x128", "bogus"])
def test_fp8_grouped_mm_op_names_a_bad_recipe(recipe):
    """The op itself (torch.ops.moe_ops_training.fp8_grouped_mm, not the
    wrapper) checks the recipe: a recipe quantize_fp8 knows but the training
    GEMMs do not ran into a bare KeyError, in eager and in fake mode."""
    a, b, offs, _ = _training_problem(torch.bfloat16, 3)
    op = torch.ops.moe_ops_training.fp8_grouped_mm
    regex = rf"fp8_grouped_mm: recipe must be 'rowwise' or 'mx', got '{recipe}'"
    with pytest.raises(ValueError, match=regex):
        op(a, b, offs, recipe, torch.bfloat16, True)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=regex):
        op(mode.from_tensor(a), mode.from_tensor(b), mode.from_tensor(offs), recipe, torch.bfloat16, True)


def test_fp8_grouped_mm_compiles():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    a, b, offs, go = _training_problem(torch.bfloat16, 2)

    def step(a, b, offs):
        return torch_moe_ops.fp8_grouped_mm(a, b, offs, "rowwise").float().square().sum()

    loss = torch.compile(step, backend=counter, fullgraph=True)(a, b, offs)
    grads = torch.autograd.grad(loss, (a, b))
    ref_loss = step(a, b, offs)
    ref_grads = torch.autograd.grad(ref_loss, (a, b))
    # Same kernels on the same bits; inductor may sum the loss in another order.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for x, y in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(x, y, rtol=2 ** -7, atol=0)
    assert counter.frame_count == 1


cuda_entry_db = make_fp8_op_db(lambda op: f"moe_ops.{op}", _cuda_entry)


@requires_cuda_build
@pytest.mark.parametrize("op", cuda_entry_db, ids=lambda op: op.name)
def test_cuda_entry_matches_cpu_kernel(op):
    """Every OpInfo sample, in every dtype the op takes, through the CUDA entry:
    quantize and dequantize give the CPU kernel's bytes and strides;
    scaled_grouped_mm is within the float32-summation bound of the float64
    reference, and strided alike."""
    cpu_kernel = getattr(torch.ops.moe_ops, op.name.split(".")[1]).default
    for dtype in sorted(op.dtypes, key=str):
        for s in op.sample_inputs("cpu", dtype):
            out = _call(op, s)
            ref = cpu_kernel(s.input, *s.args, **s.kwargs)
            msg = f"{s.name} ({dtype})"
            if op.name.endswith("scaled_grouped_mm"):
                assert_scaled_mm_close(out, s.input, *s.args, **s.kwargs, interpreted=True)
                assert (out.shape, out.stride()) == (ref.shape, ref.stride()), msg
            else:
                _assert_same(out, ref, msg, strides=True)


@requires_cuda_build
@pytest.mark.parametrize("op", cuda_entry_db, ids=lambda op: op.name)
def test_cuda_entry_error_inputs(op):
    """The shape and dtype errors are the shared checks' (the same messages);
    bad offs values are caught on the device (_assert_async, no host sync),
    which on CPU tensors raises at once."""
    for ei in op.error_inputs("cpu"):
        s = ei.sample_input
        if s.name == "offs_values":
            # scaled_grouped_mm's entry multiplies with grouped_mm through the dispatcher: on CUDA tensors its
            # Triton kernel's device assert ("offs must be ..."), on these CPU tensors its CPU kernel's check.
            with pytest.raises((RuntimeError, ValueError),
                               match="offs must be|whole 32-element blocks|fewer than|exceeds the grouped dimension"):
                _call(op, s)
        else:
            with pytest.raises(ei.error_type, match=ei.error_regex):
                _call(op, s)


@requires_cuda_build
def test_cuda_entry_rejects_bad_offs_values():
    x = torch.randn(4, 96)
    for offs, recipe in (([40, 30], "rowwise"), ([32, 97], "tensorwise"), ([-1, 96], "rowwise"), ([48, 96], "mx")):
        o = torch.tensor(offs, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="quantize_fp8: offs must be non-decreasing in \\[0, C=96\\]"):
            _cuda_entry("quantize_fp8")(x, recipe, None, o)
        data = torch.zeros(4, 96, dtype=torch.float8_e4m3fn)
        scale = torch.ones(2, 4) if recipe == "rowwise" else torch.ones(2) if recipe == "tensorwise" else (
            torch.ones(4, 3).to(E8M0))
        with pytest.raises(RuntimeError, match="dequantize_fp8: offs must be non-decreasing"):
            _cuda_entry("dequantize_fp8")(data, scale, recipe, None, o)


def test_fp8_ops_registered_on_cpu_and_cuda():
    """CPU kernels always; the C++ CUDA entries in a CUDA build, and
    scaled_grouped_mm's Triton kernel wherever Triton is installed (so none of
    the fp8 ops is in CPU_ONLY_OPS of test_grouped_mm.py)."""
    for name in ("moe_ops::quantize_fp8", "moe_ops::dequantize_fp8"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == torch_moe_ops.cuda_kernels_built(), name
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::scaled_grouped_mm", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::scaled_grouped_mm", "CUDA") == (
        importlib.util.find_spec("triton") is not None)


if __name__ == "__main__":
    run_tests()

"""OpInfo of ``moe_ops.scaled_grouped_mm_v2``, the schema of ``aten::_scaled_grouped_mm_v2``:
``scaled_grouped_mm`` with the recipe stated by ``ScalingType`` / ``SwizzleType`` values.

Its samples are every ``scaled_grouped_mm`` sample (test/opinfo_fp8.py: the four layouts,
rowwise, MX plain and swizzled, blockwise, both float8 formats, empty groups, rows past
``offs[-1]``, bias) with the recipe each one is in stated explicitly, plus the spellings of the
same call v2 allows (``contraction_dim`` given, ``use_fast_accum``, ``NO_SWIZZLE`` spelt out);
its ref dequantises in float64 as the stated recipe says. Error inputs cover every rejected
recipe pairing, every malformed recipe / swizzle / scale list, and every scale that does not fit
the recipe stated.

A second OpInfo, ``scaled_grouped_mm_v2_opinfos`` (variant "structured" here), is the one upstream
runs (definitions/fp8.py, patches/manifest.py): in-tree the op is structured, and its meta function
checks every call on every device before the kernel, so its samples and error inputs are cut to what
that function passes on (bfloat16 output, no bias, K and N multiples of 16, mat_b column-major;
test_scaled_grouped_mm_v2.py shows v2.14.1's takes every one of them).
"""

from __future__ import annotations

import functools
from functools import partial

import torch
from torch.nn.functional import ScalingType, SwizzleType
from torch.testing._internal.opinfo.core import ErrorInput, OpInfo, SampleInput

from torch_moe_ops.reference import torch_quantize_fp8, torch_scaled_grouped_mm_v2, torch_swizzle_mx_scale

from opinfo_fp8 import _f8_tag, _fp8_opinfo, _offs, _quantize_weight

# at::blas::ScalingType and SwizzleType (ATen/BlasBackend.h), as the schema takes them: their values.
TENSORWISE = ScalingType.TensorWise.value
ROWWISE = ScalingType.RowWise.value
BLOCKWISE_1X16 = ScalingType.BlockWise1x16.value
BLOCKWISE_1X32 = ScalingType.BlockWise1x32.value
BLOCKWISE_1X128 = ScalingType.BlockWise1x128.value
BLOCKWISE_128X128 = ScalingType.BlockWise128x128.value
NO_SWIZZLE = SwizzleType.NO_SWIZZLE.value
SWIZZLE_32_4_4 = SwizzleType.SWIZZLE_32_4_4.value
SCALED_MM_DTYPES = (torch.bfloat16, torch.float32)


def v2_recipes(name, mat_a, mat_b):
    """(recipe_a, swizzle_a, recipe_b, swizzle_b) of the scaled_grouped_mm sample ``name`` (opinfo_fp8's
    _scaled_grouped_mm_operands): stated from how that sample was quantised, which its name says."""
    if "blockwise" in name:
        return [BLOCKWISE_1X128], [], [BLOCKWISE_128X128], []
    if "mx" not in name:
        return [ROWWISE], [], [ROWWISE], []
    # MX: 2-D operands' scales are blocked per group (the 32_4_4 swizzle group by group); of the 3-D
    # operands, those quantised with swizzle=True.
    swizzled_b = name in ("2d3d_mx_swizzled_b", "3d3d_mx_swizzled")
    swizzle_a = SWIZZLE_32_4_4 if mat_a.dim() == 2 or name == "3d3d_mx_swizzled" else NO_SWIZZLE
    swizzle_b = SWIZZLE_32_4_4 if mat_b.dim() == 2 or swizzled_b else NO_SWIZZLE
    return [BLOCKWISE_1X32], [swizzle_a], [BLOCKWISE_1X32], [swizzle_b]


def v2_args(name, args, kw):
    """The v1 sample (args, kwargs) as v2's (args, kwargs)."""
    mat_a, mat_b, scale_a, scale_b = args
    ra, swa, rb, swb = v2_recipes(name, mat_a, mat_b)
    kw = {k: v for k, v in kw.items() if k in ("offs", "bias", "out_dtype")}
    return [mat_a, mat_b, [scale_a], ra, swa, [scale_b], rb, swb], kw


def scaled_grouped_mm_v2_cases(device, dtype):
    """(name, v2 args, v2 kwargs, v1 args, v1 kwargs) of every sample."""
    from opinfo_fp8 import scaled_grouped_mm_cases

    for name, args, kw in scaled_grouped_mm_cases(device, dtype):
        v2, v2kw = v2_args(name, args, kw)
        yield name, v2, v2kw, args, kw
        if name in ("2d3d_rowwise_e4m3", "3d3d_mx_e5m2", "2d2d_wgrad", "3d3d_blockwise_e4m3"):
            # The same call spelt as v2 also allows: K's dimensions given, fast accumulation asked
            # (float32 accumulation on CPU regardless), NO_SWIZZLE spelt out where nothing is swizzled.
            swz = lambda s: s if s else [NO_SWIZZLE]  # noqa: E731
            for suffix, kw_extra, swizzles in (("_contraction_dim", dict(contraction_dim=[-1, -2], use_fast_accum=True),
                                                swz),
                                               ("_contraction_dim_positive",
                                                dict(contraction_dim=[args[0].dim() - 1, args[1].dim() - 2]),
                                                lambda s: s)):
                a2, k2, a1, k1 = _own(v2), _own(v2kw), _own(args), _own(kw)  # each sample owns its tensors
                a2 = a2[:4] + [swizzles(a2[4])] + a2[5:7] + [swizzles(a2[7])]
                yield name + suffix, a2, dict(k2, **kw_extra), a1, k1


def _own(x):
    """A copy of x's tensors (clone keeps the strides of these dense tensors)."""
    if isinstance(x, dict):
        return {k: _own(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_own(v) for v in x]
    return x.clone() if isinstance(x, torch.Tensor) else x


def sample_inputs_scaled_grouped_mm_v2(op_info, device, dtype, requires_grad, **kwargs):
    for name, args, kw, _, _ in scaled_grouped_mm_v2_cases(device, dtype):
        yield SampleInput(args[0], args=tuple(args[1:]), kwargs=kw, name=name)


def error_inputs_scaled_grouped_mm_v2(op_info, device, **kwargs):
    """The structured OpInfo's error inputs (the kernel's refusals), and the calls the structured meta
    function refuses before the kernel in-tree, which the in-repo op checks itself: operands and
    out_dtype, contraction_dim, offs, bias."""
    yield from error_inputs_scaled_grouped_mm_v2_structured(op_info, device)
    a, b, a3, b2, offs, ones = _scaled_grouped_mm_v2_error_operands(device)
    M, N, G = 6, 16, 2
    sa, sb, R = ones(M), ones(G, N), [ROWWISE]

    def e(regex, *args, offs=offs, **kw):
        return _v2_err(regex, *args, offs=offs, **kw)

    op = "scaled_grouped_mm_v2"
    yield e(rf"{op}: contraction sizes differ: mat_a \[6, 32\] has K=32 but mat_b \[2, 64, 16\] has K=64", a[:, :32],
            b, [sa], R, [], [sb], R, [])
    yield e(r"scaled_grouped_mm: out_dtype must be bfloat16 or float32, got Half", a, b, [sa], R, [], [sb], R, [],
            out_dtype=torch.float16)
    yield e(rf"{op}: contraction_dim must be \[\] or \[-1, -2\] \(K last in mat_a, first in mat_b\), got "
            r"contraction_dim=\[0, 1\]", a, b, [sa], R, [], [sb], R, [], contraction_dim=[0, 1])
    yield e(rf"{op}: contraction_dim must be .*, got contraction_dim=\[-1\]", a, b, [sa], R, [], [sb], R, [],
            contraction_dim=[-1])
    yield e(rf"{op}: offs is required when mat_a or mat_b is 2-D", a, b, [sa], R, [], [sb], R, [], offs=None)
    yield e(r"scaled_grouped_mm: bias must have shape \(G, N\) = \(2, 16\), got \[16\]", a, b, [sa], R, [], [sb], R,
            [], bias=ones(N))


# -- The OpInfo upstream runs (definitions/fp8.py). In-tree, _scaled_grouped_mm_v2 is structured: its
# meta function (TORCH_META_FUNC(_scaled_grouped_mm_v2)) checks every call on every device before the
# kernel runs, as the CUDA kernels need: mat_a row-major and mat_b column-major, K and N multiples of 16,
# no bias, a bfloat16 output, contraction_dim [] or [-1, -2] (of a 3-D operand), offs exactly when an
# operand is 2-D. So its samples are scaled_grouped_mm's recipes and layouts (test/opinfo_fp8.py) at
# sizes within those checks, and its error inputs the kernel's own refusals of calls that pass them.
def _scaled_grouped_mm_v2_structured_operands(rnd):
    """(name, args, kwargs) of the samples, on the CPU, from rnd(*shape): _scaled_grouped_mm's recipes and
    layouts within what the structured meta function checks on every device before the kernel runs
    (mat_a row-major, mat_b column-major, K and N multiples of 16, no bias, offs exactly when an operand
    is 2-D). K, N, M, G = 80, 32, 30, 4 and offs [5, 5, 17, 26] (an empty group, rows past offs[-1])
    unless said; blockwise K, N = 208, 144 (a partial last block of each); weights stored (G, N, K)."""
    K, N, M, G = 80, 32, 30, 4
    offs = _offs([5, 5, 17, 26], "cpu")
    R, MX, S, P = [ROWWISE], [BLOCKWISE_1X32], [SWIZZLE_32_4_4], [NO_SWIZZLE]
    for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        tag = _f8_tag(f8)
        ad, as_ = torch_quantize_fp8(rnd(M, K), "rowwise", f8)
        bd, bs = _quantize_weight(rnd(G, K, N), "rowwise", f8)
        yield f"2d3d_rowwise_{tag}", (ad, bd, [as_], R, [], [bs], R, []), dict(offs=offs)
        a3, a3s = torch_quantize_fp8(rnd(G, 7, K), "rowwise", f8)
        yield f"3d3d_rowwise_{tag}", (a3, bd, [a3s], R, [], [bs], R, []), {}
        # MX: the 2-D operand's scale blocked per group (swizzle_mx_scale), the 3-D operands' plain.
        ad, as_ = torch_quantize_fp8(rnd(M, K), "mx", f8)
        as_ = torch_swizzle_mx_scale(as_, offs, 0)
        bd, bs = _quantize_weight(rnd(G, K, N), "mx", f8)
        yield f"2d3d_mx_{tag}", (ad, bd, [as_], MX, S, [bs], MX, P), dict(offs=offs)
        a3, a3s = torch_quantize_fp8(rnd(G, 7, K), "mx", f8)
        yield f"3d3d_mx_{tag}", (a3, bd, [a3s], MX, P, [bs], MX, P), {}
        # DeepSeek-V3's 1x128 activations and 128x128 weights.
        ad, as_ = torch_quantize_fp8(rnd(M, 208), "blockwise_1x128", f8)
        bd, bs = _quantize_weight(rnd(G, 208, 144), "blockwise_128x128", f8)
        BA, BB = [BLOCKWISE_1X128], [BLOCKWISE_128X128]
        yield f"2d3d_blockwise_{tag}", (ad, bd, [as_], BA, [], [bs], BB, []), dict(offs=offs)
        a3, a3s = torch_quantize_fp8(rnd(G, 5, 208), "blockwise_1x128", f8)
        yield f"3d3d_blockwise_{tag}", (a3, bd, [a3s], BA, [], [bs], BB, []), {}
    ad, as_ = torch_quantize_fp8(rnd(0, K), "rowwise")
    bd, bs = _quantize_weight(rnd(G, K, N), "rowwise")
    yield "2d3d_zero_tokens", (ad, bd, [as_], R, [], [bs], R, []), dict(offs=_offs([0, 0, 0, 0], "cpu"))
    # 3D x 2D: groups along N (columns past offs[-1]).
    a3, a3s = torch_quantize_fp8(rnd(G, 7, K), "rowwise")
    b2, b2s = _quantize_weight(rnd(K, 48), "rowwise")
    yield "3d2d", (a3, b2, [a3s], R, [], [b2s], R, []), dict(offs=_offs([6, 6, 20, 41], "cpu"))
    # The weight gradient: groups along the tokens (K of this product), per-group scales.
    tok = _offs([10, 10, 22, 28], "cpu")
    god, gos = torch_quantize_fp8(rnd(32, N).t().contiguous(), "rowwise", None, tok)  # (N, 32), scale (G, N)
    xd, xs = torch_quantize_fp8(rnd(32, K).t().contiguous(), "rowwise", None, tok)    # (K, 32), scale (G, K)
    yield "2d2d_wgrad", (god, xd.t(), [gos.flatten()], R, [], [xs.flatten()], R, []), dict(offs=tok)
    tok = _offs([64, 64, 128, 160], "cpu")  # whole 32-blocks per group
    god, gos = torch_quantize_fp8(rnd(176, N).t().contiguous(), "mx", None, tok)
    xd, xs = torch_quantize_fp8(rnd(176, K).t().contiguous(), "mx", None, tok)
    gos, xs = torch_swizzle_mx_scale(gos, tok, 1), torch_swizzle_mx_scale(xs, tok, 1)
    yield "2d2d_wgrad_mx", (god, xd.t(), [gos], MX, S, [xs], MX, S), dict(offs=tok)
    # MX scales of the 3-D operands swizzled (SWIZZLE_32_4_4), as upstream's kernels read them.
    wd, ws = torch_quantize_fp8(rnd(G, N, K), "mx", None, None, True)
    ad, as_ = torch_quantize_fp8(rnd(M, K), "mx")
    yield "2d3d_mx_swizzled_b", (ad, wd.transpose(-2, -1), [torch_swizzle_mx_scale(as_, offs, 0)], MX, S, [ws], MX,
                                 S), dict(offs=offs)
    a3, a3s = torch_quantize_fp8(rnd(G, 7, K), "mx", None, None, True)
    yield "3d3d_mx_swizzled", (a3, wd.transpose(-2, -1), [a3s], MX, S, [ws], MX, S), {}


@functools.cache
def _scaled_grouped_mm_v2_structured_samples(device):
    """The structured samples quantised by the reference (slow): once per device, copied per sample."""
    g = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(shape, generator=g) * 3

    return [(name, [[t.to(device) for t in x] if isinstance(x, list) and x and isinstance(x[0], torch.Tensor)
                    else x.to(device) if isinstance(x, torch.Tensor) else x for x in args],
             {k: v.to(device) for k, v in kw.items()})
            for name, args, kw in _scaled_grouped_mm_v2_structured_operands(rnd)]


def sample_inputs_scaled_grouped_mm_v2_structured(op_info, device, dtype, requires_grad, **kwargs):
    def own(x):  # each sample owns its tensors (clone keeps the strides of these dense tensors)
        return [own(t) for t in x] if isinstance(x, list) else x.clone() if isinstance(x, torch.Tensor) else x

    for name, args, kw in _scaled_grouped_mm_v2_structured_samples(str(device)):
        args, kw = own(args), {k: own(v) for k, v in kw.items()}
        yield SampleInput(args[0], args=tuple(args[1:]), kwargs=dict(kw, out_dtype=dtype), name=name)
        if name in ("2d3d_rowwise_e4m3", "3d3d_mx_e5m2", "2d2d_wgrad", "3d3d_blockwise_e4m3"):
            # K's dimensions given, fast accumulation asked (float32 accumulation on CPU regardless).
            args, kw = own(args), {k: own(v) for k, v in kw.items()}
            yield SampleInput(args[0], args=tuple(args[1:]), kwargs=dict(kw, out_dtype=dtype, contraction_dim=[-1, -2],
                                                                         use_fast_accum=True),
                              name=name + "_contraction_dim")


def _scaled_grouped_mm_v2_error_operands(device):
    """mat_a (6, 64), mat_b (2, 64, 16) stored (G, N, K), a 3-D mat_a (2, 6, 64), a 2-D mat_b (64, 16)
    stored (N, K), offs: operands the structured meta function passes on to the kernel."""
    f8 = torch.float8_e4m3fn
    M, K, N, G = 6, 64, 16, 2
    a = torch.zeros(M, K, device=device).to(f8)
    b = torch.zeros(G, N, K, device=device).to(f8).transpose(-2, -1)
    a3 = torch.zeros(G, M, K, device=device).to(f8)
    b2 = torch.zeros(N, K, device=device).to(f8).t()
    return a, b, a3, b2, _offs([2, 6], device), partial(torch.ones, device=device)


def _v2_err(regex, mat_a, mat_b, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b, name="", **kw):
    return ErrorInput(SampleInput(mat_a, args=(mat_b, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b),
                                  kwargs=kw, name=name), error_type=ValueError, error_regex=regex)


def error_inputs_scaled_grouped_mm_v2_structured(op_info, device, **kwargs):
    """The CPU kernel's refusals of calls the structured meta function passes on: every rejected recipe
    pairing, malformed recipe / swizzle / scale list, and scale that does not fit the recipe stated."""
    a, b, a3, b2, offs, ones = _scaled_grouped_mm_v2_error_operands(device)
    M, N, G = 6, 16, 2
    e8 = torch.float8_e8m0fnu
    sa, sb = ones(M), ones(G, N)
    # MX: mat_a's scale blocked per group (at least M rows, not the plain (M, 2)); mat_b's plain and swizzled.
    sa_mx, sb_mx, sb_mx_swz = ones(M, 4).to(e8), ones(G, N, 2).to(e8), ones(G, 128 * 4).to(e8)
    sa_bw, sb_bw = ones(M, 1), ones(G, 1, 1)  # blockwise: 1x128 of mat_a, 128x128 of mat_b^T
    R, S1, MX = [ROWWISE], [SWIZZLE_32_4_4], [BLOCKWISE_1X32]
    offs3 = _offs([3, 8], device)

    def e(regex, *args, offs=offs, **kw):
        return _v2_err(regex, *args, offs=offs, **kw)

    op = "scaled_grouped_mm_v2"
    yield e(rf"{op}: mat_a must be Float8_e4m3fn or Float8_e5m2, got BFloat16", a.bfloat16(), b, [sa], R, [], [sb],
            R, [])
    # Malformed recipe and swizzle lists.
    yield e(rf"{op}: recipe_a must hold one ScalingType \(one scale per operand on CPU\), got recipe_a=\[\]", a, b,
            [sa], [], [], [sb], R, [])
    yield e(rf"{op}: recipe_b must hold one ScalingType \(one scale per operand on CPU\), got recipe_b=\[1, 1\]", a,
            b, [sa], R, [], [sb], [1, 1], [])
    yield e(rf"{op}: recipe_a=\[6\] is not a ScalingType \(0 TensorWise .. 5 BlockWise128x128\)", a, b, [sa], [6],
            [], [sb], R, [])
    yield e(rf"{op}: recipe_b=\[-1\] is not a ScalingType", a, b, [sa], R, [], [sb], [-1], [])
    yield e(rf"{op}: swizzle_a must hold at most one SwizzleType \(one scale per operand on CPU\), got "
            r"swizzle_a=\[0, 0\]", a, b, [sa], R, [0, 0], [sb], R, [])
    yield e(rf"{op}: swizzle_b=\[2\] is not a SwizzleType \(0 NO_SWIZZLE, 1 SWIZZLE_32_4_4\)", a, b, [sa], R, [],
            [sb], R, [2])
    yield e(rf"{op}: scale_a must hold one tensor for recipe_a=\[1\] \(RowWise\), got 0", a, b, [], R, [], [sb], R, [])
    yield e(rf"{op}: scale_b must hold one tensor for recipe_b=\[1\] \(RowWise\), got 2", a, b, [sa], R, [], [sb, sb],
            R, [])
    # Recipe pairings the CPU kernel does not take, each refused by value.
    for ra, rb, names in ((TENSORWISE, TENSORWISE, "TensorWise.*TensorWise"),
                          (ROWWISE, TENSORWISE, "RowWise.*TensorWise"),
                          (BLOCKWISE_1X16, BLOCKWISE_1X16, "BlockWise1x16.*BlockWise1x16"),
                          (BLOCKWISE_1X32, ROWWISE, "BlockWise1x32.*RowWise"),
                          (ROWWISE, BLOCKWISE_1X32, "RowWise.*BlockWise1x32"),
                          (BLOCKWISE_128X128, BLOCKWISE_1X128, "BlockWise128x128.*BlockWise1x128"),
                          (BLOCKWISE_1X128, BLOCKWISE_1X128, "BlockWise1x128.*BlockWise1x128"),
                          (BLOCKWISE_1X128, ROWWISE, "BlockWise1x128.*RowWise")):
        yield e(rf"{op}: recipe_a=\[{ra}\] \({names.split('.*')[0]}\) x recipe_b=\[{rb}\] \({names.split('.*')[1]}\) "
                r"is not supported on CPU; the CPU kernel takes RowWise x RowWise", a, b, [sa], [ra], [], [sb], [rb],
                [], name=f"recipes_{ra}_{rb}")
    # RowWise x RowWise: never swizzled, float32, rowwise shapes (not told from them).
    yield e(rf"{op}: RowWise scales are never swizzled: swizzle_a and swizzle_b must be \[\] or \[0\] \(NO_SWIZZLE\), "
            r"got swizzle_a=\[\] and swizzle_b=\[1\]", a, b, [sa], R, [], [sb], R, S1)
    yield e(rf"{op}: scale_a must be Float for recipe_a=\[1\] \(RowWise\), got Float8_e8m0fnu", a, b, [sa_mx], R, [],
            [sb], R, [])
    yield e(rf"{op}: scale_b must be Float for recipe_b=\[1\] \(RowWise\), got BFloat16", a, b, [sa], R, [],
            [sb.bfloat16()], R, [])
    # A blockwise-shaped scale stated RowWise is read as a wrong rowwise one (v1 would have taken it as blockwise).
    yield e(r"scaled_grouped_mm: scale_a must have shape \[6\] for rowwise scaling of these operands, got \[6, 1\]",
            a, b, [sa_bw], R, [], [sb_bw], R, [])
    yield e(r"scaled_grouped_mm: scale_b must have shape \[16\] for rowwise scaling of these operands, got \[2, 16\]",
            a3, b2, [ones(G, M)], R, [], [sb], R, [], offs=offs3)
    # BlockWise1x32 x BlockWise1x32 (MXFP8).
    yield e(rf"{op}: scale_a must be Float8_e8m0fnu for recipe_a=\[3\] \(BlockWise1x32\), got Float", a, b, [sa], MX,
            S1, [sb_mx], MX, [])
    yield e(rf"{op}: scale_b must be Float8_e8m0fnu for recipe_b=\[3\] \(BlockWise1x32\), got Float", a, b, [sa_mx],
            MX, S1, [sb], MX, [])
    yield e(rf"{op}: recipe_a=\[3\] x recipe_b=\[3\] \(BlockWise1x32, MXFP8\) supports 2D x 3D, 3D x 3D and 2D x 2D "
            r"operands, got mat_a \[2, 6, 64\] and mat_b \[64, 16\]", a3, b2, [ones(G, M, 2).to(e8)], MX, [],
            [ones(N, 4).to(e8)], MX, S1, offs=offs3)
    yield e(rf"{op}: recipe_a=\[3\] \(BlockWise1x32\) of a 2-D mat_a takes its scale blocked per group "
            r"\(swizzle_mx_scale\): swizzle_a must be \[1\] \(SWIZZLE_32_4_4\), got swizzle_a=\[\]", a, b, [sa_mx],
            MX, [], [sb_mx], MX, [])
    yield e(rf"{op}: recipe_b=\[3\] \(BlockWise1x32\) of a 2-D mat_b takes its scale blocked per group "
            r"\(swizzle_mx_scale\): swizzle_b must be \[1\] \(SWIZZLE_32_4_4\), got swizzle_b=\[0\]", a, b2,
            [ones(M, 4).to(e8)], MX, S1, [ones(N, 4).to(e8)], MX, [NO_SWIZZLE], name="2d2d")
    # The swizzle stated, not the scale's rank, says which grid a 3-D operand's scale is in.
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 16, 2\] for mx scaling of these operands, got "
            r"\[2, 512\]", a, b, [sa_mx], MX, S1, [sb_mx_swz], MX, [NO_SWIZZLE])
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 512\] for mx \(swizzled\) scaling of these operands, "
            r"got \[2, 16, 2\]", a, b, [sa_mx], MX, S1, [sb_mx], MX, S1)
    yield e(r"scaled_grouped_mm: scale_a must have shape \[2, 6, 2\] for mx scaling of these operands, got \[2, 512\]",
            a3, b, [ones(G, 128 * 4).to(e8)], MX, [], [sb_mx], MX, [], offs=None)
    yield e(r"scaled_grouped_mm: scale_a has the shape of the plain mx scale grid of mat_a, \[6, 2\]", a, b,
            [ones(M, 2).to(e8)], MX, S1, [sb_mx], MX, [])
    # BlockWise1x128 x BlockWise128x128.
    BA, BB = [BLOCKWISE_1X128], [BLOCKWISE_128X128]
    yield e(rf"{op}: BlockWise1x128 x BlockWise128x128 scales are never swizzled: swizzle_a and swizzle_b must be "
            r"\[\] or \[0\] \(NO_SWIZZLE\), got swizzle_a=\[1\] and swizzle_b=\[\]", a, b, [sa_bw], BA, S1, [sb_bw],
            BB, [])
    yield e(rf"{op}: recipe_a=\[4\] \(BlockWise1x128\) x recipe_b=\[5\] \(BlockWise128x128\) supports 2D x 3D and "
            r"3D x 3D operands, got mat_a \[6, 64\] and mat_b \[64, 16\]", a, b2, [sa_bw], BA, [], [sb_bw], BB, [])
    yield e(rf"{op}: scale_b must be Float for recipe_b=\[5\] \(BlockWise128x128\), got Float8_e8m0fnu", a, b,
            [sa_bw], BA, [], [sb_mx], BB, [])
    # A rowwise-shaped scale stated blockwise is read as a wrong blockwise one (v1 would have taken it as rowwise).
    yield e(r"scaled_grouped_mm: scale_a must have shape \[6, 1\] for blockwise \(1x128 x 128x128\) scaling of these "
            r"operands, got \[6\]", a, b, [sa], BA, [], [sb], BB, [])
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 1, 1\] for blockwise \(1x128 x 128x128\) scaling of "
            r"these operands, got \[2, 16\]", a, b, [sa_bw], BA, [], [sb], BB, [])
    if torch.device(device).type == "cpu":  # offs's values: read on the host
        yield e(r"scaled_grouped_mm: offs must be non-decreasing in \[0, M \(mat_a.size\(0\)\)=6\], got offs\[1\]=7 "
                r"after offs\[0\]=2", a, b, [sa], R, [], [sb], R, [], offs=_offs([2, 7], device), name="offs_values")


def scaled_grouped_mm_v2_opinfos(name_of, op_of, cuda_tested_elsewhere=()) -> list[OpInfo]:
    """scaled_grouped_mm_v2, the recipes stated by ScalingType / SwizzleType: RowWise x RowWise (the four
    layouts), BlockWise1x32 x BlockWise1x32 (MXFP8; 3-D operands' scales plain or SWIZZLE_32_4_4) and
    BlockWise1x128 x BlockWise128x128, both float8 formats, empty groups, rows past ``offs[-1]``, zero tokens;
    its ref dequantises in float64 as the stated recipe says. Within what the structured meta function
    takes on every device, so bfloat16 only. Upstream's CUDA kernels are narrower (e4m3 only, RowWise x
    RowWise and MXFP8 with offsets, SWIZZLE_32_4_4 scales): name it in cuda_tested_elsewhere to skip CUDA."""
    return [_fp8_opinfo(name_of("scaled_grouped_mm_v2"), op_of("scaled_grouped_mm_v2"), torch_scaled_grouped_mm_v2,
                        (torch.bfloat16,), sample_inputs_scaled_grouped_mm_v2_structured,
                        error_inputs_scaled_grouped_mm_v2_structured, "scaled_grouped_mm_v2" in cuda_tested_elsewhere)]


def make_scaled_grouped_mm_v2_opinfo(name, op) -> OpInfo:
    return OpInfo(name, op=op, ref=torch_scaled_grouped_mm_v2, dtypes=SCALED_MM_DTYPES,
                  sample_inputs_func=sample_inputs_scaled_grouped_mm_v2,
                  error_inputs_func=error_inputs_scaled_grouped_mm_v2, supports_out=False, supports_autograd=False,
                  supports_forward_ad=False, supports_fwgrad_bwgrad=False)


def _structured_opinfo() -> OpInfo:
    """The samples and error inputs of the OpInfo upstream runs, on our op: a variant of its own here,
    with a float32 output too (upstream's claims bfloat16 alone: its meta function refuses the rest)."""
    info = _fp8_opinfo("moe_ops.scaled_grouped_mm_v2", torch.ops.moe_ops.scaled_grouped_mm_v2.default,
                       torch_scaled_grouped_mm_v2, SCALED_MM_DTYPES, sample_inputs_scaled_grouped_mm_v2_structured,
                       error_inputs_scaled_grouped_mm_v2_structured)
    info.variant_test_name = "structured"
    return info


op_db = [make_scaled_grouped_mm_v2_opinfo("moe_ops.scaled_grouped_mm_v2",
                                          torch.ops.moe_ops.scaled_grouped_mm_v2.default), _structured_opinfo()]

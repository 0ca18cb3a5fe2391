"""OpInfo of ``moe_ops.scaled_grouped_mm_v2``, the schema of ``aten::_scaled_grouped_mm_v2``:
``scaled_grouped_mm`` with the recipe stated by ``ScalingType`` / ``SwizzleType`` values.

Its samples are every ``scaled_grouped_mm`` sample (test/opinfo_fp8.py: the four layouts,
rowwise, MX plain and swizzled, blockwise, both float8 formats, empty groups, rows past
``offs[-1]``, bias) with the recipe each one is in stated explicitly, plus the spellings of the
same call v2 allows (``contraction_dim`` given, ``use_fast_accum``, ``NO_SWIZZLE`` spelt out);
its ref dequantises in float64 as the stated recipe says. Error inputs cover every rejected
recipe pairing, every malformed recipe / swizzle / scale list, and every scale that does not fit
the recipe stated.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.testing._internal.opinfo.core import ErrorInput, OpInfo, SampleInput

from torch_moe_ops.reference import torch_scaled_grouped_mm_v2

# at::blas::ScalingType and SwizzleType (ATen/BlasBackend.h; torch.nn.functional.ScalingType / SwizzleType).
TENSORWISE, ROWWISE, BLOCKWISE_1X16, BLOCKWISE_1X32, BLOCKWISE_1X128, BLOCKWISE_128X128 = range(6)
NO_SWIZZLE, SWIZZLE_32_4_4 = 0, 1
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
    f8, e8 = torch.float8_e4m3fn, torch.float8_e8m0fnu
    M, K, N, G = 6, 64, 8, 2
    a = torch.zeros(M, K, device=device).to(f8)
    b = torch.zeros(G, N, K, device=device).to(f8).transpose(-2, -1)
    a3 = torch.zeros(G, M, K, device=device).to(f8)
    b2 = torch.zeros(K, N, device=device).to(f8)
    offs = torch.tensor([2, 6], dtype=torch.int32, device=device)
    ones = partial(torch.ones, device=device)
    sa, sb = ones(M), ones(G, N)
    # MX: mat_a's scale blocked per group (at least M rows, not the plain (M, 2)); mat_b's plain and swizzled.
    sa_mx, sb_mx, sb_mx_swz = ones(M, 4).to(e8), ones(G, N, 2).to(e8), ones(G, 128 * 4).to(e8)
    sa_bw, sb_bw = ones(M, 1), ones(G, 1, 1)  # blockwise: 1x128 of mat_a, 128x128 of mat_b^T
    R, S1 = [ROWWISE], [SWIZZLE_32_4_4]
    MX = [BLOCKWISE_1X32]

    def e(regex, mat_a, mat_b, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b, offs=offs, name="",
          **kw):
        return ErrorInput(SampleInput(mat_a, args=(mat_b, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b),
                                      kwargs=dict(kw, offs=offs), name=name),
                          error_type=ValueError, error_regex=regex)

    op = "scaled_grouped_mm_v2"
    # Operands and out_dtype: the shared checks, under v2's name.
    yield e(rf"{op}: mat_a must be Float8_e4m3fn or Float8_e5m2, got BFloat16", a.bfloat16(), b, [sa], R, [], [sb],
            R, [])
    yield e(rf"{op}: contraction sizes differ: mat_a \[6, 32\] has K=32 but mat_b \[2, 64, 8\] has K=64", a[:, :32],
            b, [sa], R, [], [sb], R, [])
    yield e(r"scaled_grouped_mm: out_dtype must be bfloat16 or float32, got Half", a, b, [sa], R, [], [sb], R, [],
            out_dtype=torch.float16)
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
    yield e(rf"{op}: contraction_dim must be \[\] or \[-1, -2\] \(K last in mat_a, first in mat_b\), got "
            r"contraction_dim=\[0, 1\]", a, b, [sa], R, [], [sb], R, [], contraction_dim=[0, 1])
    yield e(rf"{op}: contraction_dim must be .*, got contraction_dim=\[-1\]", a, b, [sa], R, [], [sb], R, [],
            contraction_dim=[-1])
    yield e(rf"{op}: offs is required when mat_a or mat_b is 2-D", a, b, [sa], R, [], [sb], R, [], offs=None)
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
    yield e(r"scaled_grouped_mm: scale_b must have shape \[8\] for rowwise scaling of these operands, got \[2, 8\]",
            a3, b2, [ones(G, M)], R, [], [sb], R, [], offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
    # BlockWise1x32 x BlockWise1x32 (MXFP8).
    yield e(rf"{op}: scale_a must be Float8_e8m0fnu for recipe_a=\[3\] \(BlockWise1x32\), got Float", a, b, [sa], MX,
            S1, [sb_mx], MX, [])
    yield e(rf"{op}: scale_b must be Float8_e8m0fnu for recipe_b=\[3\] \(BlockWise1x32\), got Float", a, b, [sa_mx],
            MX, S1, [sb], MX, [])
    yield e(rf"{op}: recipe_a=\[3\] x recipe_b=\[3\] \(BlockWise1x32, MXFP8\) supports 2D x 3D, 3D x 3D and 2D x 2D "
            r"operands, got mat_a \[2, 6, 64\] and mat_b \[64, 8\]", a3, b2, [ones(G, M, 2).to(e8)], MX, [],
            [ones(N, 4).to(e8)], MX, S1, offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
    yield e(rf"{op}: recipe_a=\[3\] \(BlockWise1x32\) of a 2-D mat_a takes its scale blocked per group "
            r"\(swizzle_mx_scale\): swizzle_a must be \[1\] \(SWIZZLE_32_4_4\), got swizzle_a=\[\]", a, b, [sa_mx],
            MX, [], [sb_mx], MX, [])
    yield e(rf"{op}: recipe_b=\[3\] \(BlockWise1x32\) of a 2-D mat_b takes its scale blocked per group "
            r"\(swizzle_mx_scale\): swizzle_b must be \[1\] \(SWIZZLE_32_4_4\), got swizzle_b=\[0\]", a, b2,
            [ones(M, 4).to(e8)], MX, S1, [ones(N, 4).to(e8)], MX, [NO_SWIZZLE], name="2d2d")
    # The swizzle stated, not the scale's rank, says which grid a 3-D operand's scale is in.
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 8, 2\] for mx scaling of these operands, got "
            r"\[2, 512\]", a, b, [sa_mx], MX, S1, [sb_mx_swz], MX, [NO_SWIZZLE])
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 512\] for mx \(swizzled\) scaling of these operands, "
            r"got \[2, 8, 2\]", a, b, [sa_mx], MX, S1, [sb_mx], MX, S1)
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
            r"3D x 3D operands, got mat_a \[6, 64\] and mat_b \[64, 8\]", a, b2, [sa_bw], BA, [], [sb_bw], BB, [])
    yield e(rf"{op}: scale_b must be Float for recipe_b=\[5\] \(BlockWise128x128\), got Float8_e8m0fnu", a, b,
            [sa_bw], BA, [], [sb_mx], BB, [])
    # A rowwise-shaped scale stated blockwise is read as a wrong blockwise one (v1 would have taken it as rowwise).
    yield e(r"scaled_grouped_mm: scale_a must have shape \[6, 1\] for blockwise \(1x128 x 128x128\) scaling of these "
            r"operands, got \[6\]", a, b, [sa], BA, [], [sb], BB, [])
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 1, 1\] for blockwise \(1x128 x 128x128\) scaling of "
            r"these operands, got \[2, 8\]", a, b, [sa_bw], BA, [], [sb], BB, [])
    # The checks after the recipe's: bias, then offs values (CPU only: read on the host).
    yield e(r"scaled_grouped_mm: bias must have shape \(G, N\) = \(2, 8\), got \[8\]", a, b, [sa], R, [], [sb], R, [],
            bias=ones(N))
    if torch.device(device).type == "cpu":
        yield e(r"scaled_grouped_mm: offs must be non-decreasing in \[0, M \(mat_a.size\(0\)\)=6\], got offs\[1\]=7 "
                r"after offs\[0\]=2", a,
                b, [sa], R, [], [sb], R, [], offs=torch.tensor([2, 7], dtype=torch.int32, device=device),
                name="offs_values")


def make_scaled_grouped_mm_v2_opinfo(name, op) -> OpInfo:
    return OpInfo(name, op=op, ref=torch_scaled_grouped_mm_v2, dtypes=SCALED_MM_DTYPES,
                  sample_inputs_func=sample_inputs_scaled_grouped_mm_v2,
                  error_inputs_func=error_inputs_scaled_grouped_mm_v2, supports_out=False, supports_autograd=False,
                  supports_forward_ad=False, supports_fwgrad_bwgrad=False)


op_db = [make_scaled_grouped_mm_v2_opinfo("moe_ops.scaled_grouped_mm_v2",
                                          torch.ops.moe_ops.scaled_grouped_mm_v2.default)]

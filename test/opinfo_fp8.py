"""OpInfos of the fp8 ops ``moe_ops.quantize_fp8``, ``moe_ops.dequantize_fp8``,
``moe_ops.scaled_grouped_mm`` and ``moe_ops.swizzle_mx_scale``.

One builder per op (``quantize_fp8_opinfos``, ``dequantize_fp8_opinfos``,
``swizzle_mx_scale_opinfos``, ``scaled_grouped_mm_opinfos``), each with its
samples, error inputs and plain-torch ref, so that each op's PR carries its
own (patches/manifest.py). Error inputs cover every rejected argument.

The OpInfo's dtype is the floating dtype: the input of quantize_fp8 and the
out_dtype of dequantize_fp8 and scaled_grouped_mm; for swizzle_mx_scale it is
the dtype of the scale, float8_e8m0fnu.
"""

from __future__ import annotations

import functools
import unittest
from functools import partial

import torch
from torch.testing import make_tensor
from torch.testing._internal.opinfo.core import DecorateInfo, ErrorInput, OpInfo, SampleInput

from torch_moe_ops.reference import (
    FP8_RECIPES,
    torch_dequantize_fp8,
    torch_quantize_fp8,
    torch_scaled_grouped_mm,
    torch_swizzle_mx_scale,
)

FP8_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALED_MM_DTYPES = (torch.bfloat16, torch.float32)


def _offs(ends, device):
    return torch.tensor(ends, dtype=torch.int32, device=device)


def _spread(shape, device, dtype, seed=0):
    """Normal values times a per-column magnitude from 2^-20 to 2^10 (so blocks
    get different scales), within the range of every float dtype tested."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if shape[-1] > 0:
        x = x * torch.logspace(-20, 10, shape[-1], base=2.0)
    return x.to(device=device, dtype=dtype)


def quantize_cases(device, dtype):
    """(name, x, recipe, kwargs) for every sample of quantize_fp8."""
    for recipe in FP8_RECIPES:
        yield f"{recipe}_2d", _spread((5, 300), device, dtype), recipe, {}
        yield f"{recipe}_3d", _spread((3, 130, 70), device, dtype, 1), recipe, {}
        yield f"{recipe}_e5m2", _spread((4, 96), device, dtype, 2), recipe, dict(float8_dtype=torch.float8_e5m2)
        yield f"{recipe}_zero_rows", _spread((0, 40), device, dtype), recipe, {}
        yield f"{recipe}_zero_cols", _spread((6, 0), device, dtype), recipe, {}
        # A weight (G, K, N) quantised per output column: blocks along K.
        w = _spread((2, 64, 40), device, dtype, 3)
        yield f"{recipe}_weight_transposed", w.transpose(-2, -1), recipe, {}
    # Rows enough for the CPU kernel to split them across threads (its tasks
    # hold ~32K elements), the tensorwise amax reduced over every task's rows.
    for recipe in ("tensorwise", "rowwise"):
        yield f"{recipe}_rows_across_threads", _spread((300, 128), device, dtype, 7), recipe, {}
    # Per-group operands of the 2D x 2D grouped GEMM: groups along C (tokens).
    x = partial(_spread, (7, 200), device, dtype, 6)
    yield "tensorwise_offs", x(), "tensorwise", dict(offs=_offs([50, 50, 130], device))
    yield "rowwise_offs", x(), "rowwise", dict(offs=_offs([10, 10, 64, 199], device))
    yield "rowwise_offs_no_groups", x(), "rowwise", dict(offs=_offs([], device))
    # mx: groups of whole 32-element blocks; the blocked (swizzled) scale layout.
    yield "mx_offs", x(), "mx", dict(offs=_offs([32, 32, 96, 200], device))
    yield "mx_swizzle_2d", _spread((130, 200), device, dtype, 4), "mx", dict(swizzle=True)
    yield "mx_swizzle_3d", _spread((2, 40, 96), device, dtype, 5), "mx", dict(swizzle=True)


def sample_inputs_quantize_fp8(op_info, device, dtype, requires_grad, **kwargs):
    for name, x, recipe, kw in quantize_cases(device, dtype):
        yield SampleInput(x, args=(recipe,), kwargs=kw, name=name)


@functools.cache
def _dequantize_cases(device):
    """(name, data, scale, recipe, kwargs): quantize_cases quantised by the
    reference. The reference quantiser is slow and the samples of every dtype
    read the same data: made once per device (each sample gets copies)."""
    cases = []
    for name, x, recipe, kw in quantize_cases(device, torch.float32):
        data, scale = torch_quantize_fp8(x.cpu(), recipe, **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                             for k, v in kw.items()})
        kw = {k: v for k, v in kw.items() if k != "float8_dtype"}
        cases.append((name, data.to(device), scale.to(device), recipe, kw))
    return cases


def sample_inputs_dequantize_fp8(op_info, device, dtype, requires_grad, **kwargs):
    for name, data, scale, recipe, kw in _dequantize_cases(str(device)):
        kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        yield SampleInput(data.clone(), args=(scale.clone(), recipe), kwargs=dict(out_dtype=dtype, **kw), name=name)


def _err(regex, *args, name="", **kw):
    return ErrorInput(SampleInput(args[0], args=args[1:], kwargs=kw, name=name), error_type=ValueError,
                      error_regex=regex)


def error_inputs_quantize_fp8(op_info, device, **kwargs):
    x = make_tensor((4, 64), device=device, dtype=torch.float32)
    offs = _offs([32, 64], device)
    cpu = torch.device(device).type == "cpu"  # values of offs: checked by the kernels, not by fake kernels
    e = _err
    yield e(r"quantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' "
            r"or 'mx', got 'rowise'", x, "rowise")
    yield e(r"quantize_fp8: x must be float32, bfloat16 or float16, got Double", x.double(), "rowwise")
    yield e(r"quantize_fp8: float8_dtype must be Float8_e4m3fn or Float8_e5m2, got BFloat16", x, "rowwise",
            float8_dtype=torch.bfloat16)
    yield e(r"quantize_fp8: x must be 2-D or 3-D, got 1-D with sizes \[64\]", x[0], "rowwise")
    yield e(r"quantize_fp8: x must be 2-D or 3-D, got 4-D", x.view(1, 1, 4, 64), "rowwise")
    yield e(r"quantize_fp8: swizzle=True needs recipe 'mx', got 'rowwise'", x, "rowwise", swizzle=True)
    yield e(r"quantize_fp8: offs needs a 2-D x, got x of sizes \[1, 4, 64\]", x.view(1, 4, 64), "rowwise",
            offs=offs)
    yield e(r"quantize_fp8: offs must be 1-D, got 2-D with sizes \[1, 2\]", x, "rowwise", offs=offs.view(1, 2))
    yield e(r"quantize_fp8: offs must be int32, got Long", x, "rowwise", offs=offs.long())
    if cpu:
        yield e(r"quantize_fp8: offs must be non-decreasing in \[0, C=64\], got offs\[1\]=16 after offs\[0\]=32",
                x, "rowwise", offs=_offs([32, 16], device), name="offs_values")
        yield e(r"quantize_fp8: offs must be non-decreasing in \[0, C=64\], got offs\[0\]=65", x, "tensorwise",
                offs=_offs([65], device), name="offs_values")
    # blockwise
    yield e(r"quantize_fp8: offs is supported with recipes 'tensorwise', 'rowwise' and 'mx', got "
            r"'blockwise_128x128'", x, "blockwise_128x128", offs=offs)
    # mx
    yield e(r"quantize_fp8: swizzle=True does not take offs", x, "mx", offs=offs, swizzle=True)
    if cpu:
        yield e(r"quantize_fp8: with recipe 'mx' every group must hold whole 32-element blocks: offs\[g\] must "
                r"be a multiple of 32 or C=64, got offs\[0\]=40", x, "mx", offs=_offs([40, 64], device),
                name="offs_values")


def error_inputs_dequantize_fp8(op_info, device, **kwargs):
    x = make_tensor((4, 64), device=device, dtype=torch.float32)
    d, s = torch_quantize_fp8(x.cpu(), "rowwise")
    d, s = d.to(device), s.to(device)
    offs = _offs([32, 64], device)
    e = _err
    yield e(r"dequantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' "
            r"or 'mx', got 'MX'", d, s, "MX")
    yield e(r"dequantize_fp8: data must be Float8_e4m3fn or Float8_e5m2, got Float", x, s, "rowwise")
    yield e(r"dequantize_fp8: data must be 2-D or 3-D, got 1-D with sizes \[64\]", d[0], s, "rowwise")
    yield e(r"dequantize_fp8: scale must be Float for recipe 'rowwise', got Float8_e8m0fnu", d,
            s.to(torch.float8_e8m0fnu), "rowwise")
    yield e(r"dequantize_fp8: scale must have shape \[4\] for data of sizes \[4, 64\] and recipe 'rowwise', "
            r"got \[4, 1\]", d, s.view(4, 1), "rowwise")
    yield e(r"dequantize_fp8: scale must have shape \[2, 4\] for data of sizes \[4, 64\] and recipe 'rowwise', "
            r"got \[4\]", d, s, "rowwise", offs=offs)
    yield e(r"dequantize_fp8: scale must have shape \[\] for data of sizes \[4, 64\] and recipe 'tensorwise', "
            r"got \[4\]", d, s, "tensorwise")
    yield e(r"dequantize_fp8: out_dtype must be float32, bfloat16 or float16, got Double", d, s, "rowwise",
            out_dtype=torch.float64)
    yield e(r"dequantize_fp8: offs must be int32, got Long", d, s, "rowwise", offs=offs.long())
    # blockwise
    yield e(r"dequantize_fp8: scale must have shape \[1, 1\] for data of sizes \[4, 64\] and recipe "
            r"'blockwise_128x128', got \[4\]", d, s, "blockwise_128x128")
    # mx
    dm, sm = (t.to(device) for t in torch_quantize_fp8(x.cpu(), "mx"))
    yield e(r"dequantize_fp8: scale must be Float8_e8m0fnu for recipe 'mx', got Float", dm, sm.float(), "mx")
    yield e(r"dequantize_fp8: scale must have shape \[4, 2\] for data of sizes \[4, 64\] and recipe 'mx', "
            r"got \[4, 1\]", dm, sm[:, :1], "mx")
    yield e(r"dequantize_fp8: scale must have shape \[128, 4\] for data of sizes \[4, 64\] and recipe 'mx' "
            r"\(swizzled\), got \[4, 2\]", dm, sm, "mx", swizzle=True)


def _quantize_weight(w, recipe, f8=None, offs=None, k_major=True):
    """w (.., K, N) quantised per output column (blocks along K) through its
    transpose; the data comes back column-major (k_major) or row-major."""
    d, s = torch_quantize_fp8(w.transpose(-2, -1).contiguous(), recipe, f8, offs)
    d = d.transpose(-2, -1)
    return (d if k_major else d.contiguous()), s


def _f8_tag(f8):
    return "e4m3" if f8 == torch.float8_e4m3fn else "e5m2"


# Each recipe's samples: (name, args, kwargs, bias_in_out_dtype), on the CPU,
# from rnd(*shape) (seeded normal values); K, N, M, G = 80, 24, 30, 4 and
# offs [5, 5, 17, 26] (an empty group, rows past offs[-1]) unless said.
def _scaled_grouped_mm_rowwise_operands(rnd):
    """Rowwise scales, the four layouts."""
    K, N, M, G = 80, 24, 30, 4
    offs = _offs([5, 5, 17, 26], "cpu")
    for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        tag = f"rowwise_{_f8_tag(f8)}"
        ad, as_ = torch_quantize_fp8(rnd(M, K), "rowwise", f8)
        bd, bs = _quantize_weight(rnd(G, K, N), "rowwise", f8)
        bias = rnd(G, N)
        yield f"2d3d_{tag}", (ad, bd, as_, bs), dict(offs=offs), False
        yield f"2d3d_bias_{tag}", (ad, bd, as_, bs), dict(offs=offs, bias=bias), False
        brm, brs = _quantize_weight(rnd(G, K, N), "rowwise", f8, k_major=False)
        yield f"2d3d_b_row_major_{tag}", (ad, brm, as_, brs), dict(offs=offs), False
        a3, a3s = torch_quantize_fp8(rnd(G, 7, K), "rowwise", f8)
        yield f"3d3d_{tag}", (a3, bd, a3s, bs), dict(bias=bias), True
    ad, as_ = torch_quantize_fp8(rnd(0, K), "rowwise")
    bd, bs = _quantize_weight(rnd(G, K, N), "rowwise")
    yield "2d3d_zero_tokens", (ad, bd, as_, bs), dict(offs=_offs([0, 0, 0, 0], "cpu")), False
    # 3D x 2D (offs over N) and 2D x 2D (offs over K: the weight gradient).
    a3, a3s = torch_quantize_fp8(rnd(G, 7, K), "rowwise")
    b2, b2s = _quantize_weight(rnd(K, 29), "rowwise")
    yield "3d2d", (a3, b2, a3s, b2s), dict(offs=_offs([6, 6, 20, 27], "cpu"), bias=rnd(G, 29)), False
    # wgrad = grad_out^T @ x over each group's tokens: per-group rowwise scales along the tokens.
    tok = _offs([10, 10, 22, 28], "cpu")
    god, gos = torch_quantize_fp8(rnd(M, N).t().contiguous(), "rowwise", None, tok)  # (N, M), scale (G, N)
    xd, xs = torch_quantize_fp8(rnd(M, K).t().contiguous(), "rowwise", None, tok)    # (K, M), scale (G, K)
    yield "2d2d_wgrad", (god, xd.t(), gos.flatten(), xs.flatten()), dict(offs=tok), False


def _scaled_grouped_mm_blockwise_operands(rnd):
    """DeepSeek-V3's recipe: 1x128 activations, 128x128 weights; K and N past one block."""
    K, N, M, G = 200, 150, 30, 4
    offs = _offs([5, 5, 17, 26], "cpu")
    for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        tag = _f8_tag(f8)
        ad, as_ = torch_quantize_fp8(rnd(M, K), "blockwise_1x128", f8)
        bd, bs = _quantize_weight(rnd(G, K, N), "blockwise_128x128", f8)
        yield f"2d3d_blockwise_{tag}", (ad, bd, as_, bs), dict(offs=offs, bias=rnd(G, N)), False
        a3, a3s = torch_quantize_fp8(rnd(G, 5, K), "blockwise_1x128", f8)
        yield f"3d3d_blockwise_{tag}", (a3, bd, a3s, bs), {}, False


def _scaled_grouped_mm_mx_operands(rnd):
    """MX scales: 2D x 3D, 3D x 3D (plain and swizzled scales) and 2D x 2D;
    a 2-D operand's scale blocked per group (swizzle_mx_scale)."""
    K, N, M, G = 80, 24, 30, 4
    offs = _offs([5, 5, 17, 26], "cpu")
    for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        tag = f"mx_{_f8_tag(f8)}"
        ad, as_ = torch_quantize_fp8(rnd(M, K), "mx", f8)
        as_ = torch_swizzle_mx_scale(as_, offs, 0)  # a 2-D operand's MX scale goes blocked per group of rows
        bd, bs = _quantize_weight(rnd(G, K, N), "mx", f8)
        bias = rnd(G, N)
        yield f"2d3d_{tag}", (ad, bd, as_, bs), dict(offs=offs), False
        yield f"2d3d_bias_{tag}", (ad, bd, as_, bs), dict(offs=offs, bias=bias), False
        brm, brs = _quantize_weight(rnd(G, K, N), "mx", f8, k_major=False)
        yield f"2d3d_b_row_major_{tag}", (ad, brm, as_, brs), dict(offs=offs), False
        a3, a3s = torch_quantize_fp8(rnd(G, 7, K), "mx", f8)
        yield f"3d3d_{tag}", (a3, bd, a3s, bs), dict(bias=bias), True
    # MX scales of the 3-D operands in the swizzled layout upstream's kernels read.
    wd, ws = torch_quantize_fp8(rnd(G, N, K), "mx", None, None, True)
    ad, as_ = torch_quantize_fp8(rnd(M, K), "mx")
    as_ = torch_swizzle_mx_scale(as_, offs, 0)
    yield "2d3d_mx_swizzled_b", (ad, wd.transpose(-2, -1), as_, ws), dict(offs=offs), False
    a3, a3s = torch_quantize_fp8(rnd(G, 7, K), "mx", None, None, True)
    yield "3d3d_mx_swizzled", (a3, wd.transpose(-2, -1), a3s, ws), {}, False
    # Weight gradient: token groups of whole 32-blocks (an empty one, tokens past offs[-1]).
    tok = _offs([64, 64, 128, 160], "cpu")
    god, gos = torch_quantize_fp8(rnd(170, N).t().contiguous(), "mx", None, tok)  # (N, 170), scale (N, 6)
    xd, xs = torch_quantize_fp8(rnd(170, K).t().contiguous(), "mx", None, tok)    # (K, 170), scale (K, 6)
    gos, xs = torch_swizzle_mx_scale(gos, tok, 1), torch_swizzle_mx_scale(xs, tok, 1)  # blocked per group of K
    yield "2d2d_wgrad_mx", (god, xd.t(), gos, xs), dict(offs=tok), False
    # A blocked scale shaped as upstream's tests build it: the groups' blocks
    # cut to exactly their bytes, (sum_g round_up(M_g, 128) * 4 / S, S) for S = 4.
    K4 = 128
    ad, as_ = torch_quantize_fp8(rnd(M, K4), "mx")
    blocked = torch_swizzle_mx_scale(as_, offs, 0)[:3 * 128]  # groups of 5, 12 and 9 rows: 3 x 128 rows
    bd, bs = _quantize_weight(rnd(G, K4, N), "mx")
    yield "2d3d_mx_exact_blocked_a", (ad, bd, blocked, bs), dict(offs=offs), False


@functools.cache
def _scaled_grouped_mm_operands(device):
    """(name, args, kwargs, bias_in_out_dtype) of the scaled_grouped_mm samples
    of every recipe but their out_dtype, quantised by the reference. The
    reference quantiser is slow and the samples of every dtype read the same
    operands: made once per device (each sample gets copies)."""
    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(shape, generator=g) * 3

    cases = []
    for recipe_operands in (
        _scaled_grouped_mm_rowwise_operands,
        _scaled_grouped_mm_blockwise_operands,
        _scaled_grouped_mm_mx_operands,
    ):
        for name, args, kw, bias_in_out_dtype in recipe_operands(rnd):
            cases.append((name, [t.to(device) for t in args], {k: v.to(device) for k, v in kw.items()},
                          bias_in_out_dtype))
    return cases


def scaled_grouped_mm_cases(device, dtype):
    """(name, args, kwargs) of scaled_grouped_mm samples, quantised by the
    reference: biases in float32, those of 3D x 3D in the output dtype. Each
    case owns its tensors (clone keeps the strides of these dense tensors)."""
    for name, args, kw, bias_in_out_dtype in _scaled_grouped_mm_operands(str(device)):
        kw = {k: v.clone() for k, v in kw.items()}
        if bias_in_out_dtype:
            kw["bias"] = kw["bias"].to(dtype)
        yield name, [t.clone() for t in args], dict(kw, out_dtype=dtype)


def sample_inputs_scaled_grouped_mm(op_info, device, dtype, requires_grad, **kwargs):
    for name, args, kw in scaled_grouped_mm_cases(device, dtype):
        yield SampleInput(args[0], args=tuple(args[1:]), kwargs=kw, name=name)


def _scaled_grouped_mm_error_operands(device):
    """mat_a (6, 64), mat_b (2, 64, 8) stored (G, N, K), a 3-D mat_a (2, 6, 64), a 2-D mat_b (64, 8), offs."""
    f8 = torch.float8_e4m3fn
    M, K, N, G = 6, 64, 8, 2
    a = torch.zeros(M, K, device=device).to(f8)
    b = torch.zeros(G, N, K, device=device).to(f8).transpose(-2, -1)
    a3 = torch.zeros(G, M, K, device=device).to(f8)
    b2 = torch.zeros(K, N, device=device).to(f8)
    return a, b, a3, b2, _offs([2, 6], device), partial(torch.ones, device=device)


def _scaled_grouped_mm_rowwise_errors(device):
    """The operands, out_dtype, offs and bias, and rowwise scales: every check but the block-scaled recipes'."""
    a, b, a3, b2, offs, ones = _scaled_grouped_mm_error_operands(device)
    M, N, G = 6, 8, 2
    sa, sb = ones(M), ones(G, N)
    e = _err
    yield e(r"scaled_grouped_mm: mat_a must be 2-D or 3-D, got 1-D with sizes \[64\]", a[0], b, sa, sb, offs)
    yield e(r"scaled_grouped_mm: mat_a must be Float8_e4m3fn or Float8_e5m2, got BFloat16", a.bfloat16(), b, sa, sb,
            offs)
    yield e(r"scaled_grouped_mm: mat_b must be Float8_e4m3fn or Float8_e5m2, got Float", a, b.float(), sa, sb, offs)
    yield e(r"scaled_grouped_mm: contraction sizes differ: mat_a \[6, 32\] has K=32 but mat_b \[2, 64, 8\] has "
            r"K=64", a[:, :32], b, sa, sb, offs)
    yield e(r"scaled_grouped_mm: scale_result is not supported, got a tensor of sizes \[1\]", a, b, sa, sb, offs,
            scale_result=ones(1))
    yield e(r"scaled_grouped_mm: out_dtype must be bfloat16 or float32, got Half", a, b, sa, sb, offs,
            out_dtype=torch.float16)
    yield e(r"scaled_grouped_mm: offs is required when mat_a or mat_b is 2-D \(mat_a \[6, 64\], mat_b "
            r"\[2, 64, 8\]\)", a, b, sa, sb)
    yield e(r"scaled_grouped_mm: offs must be None when mat_a and mat_b are both 3-D", a3, b, ones(G, M), sb, offs)
    yield e(r"scaled_grouped_mm: offs must be int32, got Long", a, b, sa, sb, offs.long())
    yield e(r"scaled_grouped_mm: offs has 3 groups but mat_b \[2, 64, 8\] has 2", a, b, sa, sb,
            _offs([1, 2, 3], device))
    # Rowwise scale shapes, every layout.
    yield e(r"scaled_grouped_mm: scale_a must have shape \[6\] for rowwise scaling of these operands, got \[5\]",
            a, b, sa[:5], sb, offs)
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 8\] for rowwise scaling of these operands, got \[8\]",
            a, b, sa, sb[0], offs)
    yield e(r"scaled_grouped_mm: scale_a must have shape \[2, 6\] for rowwise scaling of these operands, got \[6\]",
            a3, b, sa, sb)
    yield e(r"scaled_grouped_mm: scale_b must have shape \[8\] for rowwise scaling of these operands, got \[2, 8\]",
            a3, b2, ones(G, M), sb, _offs([3, 8], device))
    # 2D x 2D: mat_a (8, 64), mat_b (64, 6), groups along K: scale_a (G * 8,), scale_b (G * 6,).
    yield e(r"scaled_grouped_mm: scale_a must have shape \[16\] for rowwise scaling of these operands, got \[8\]",
            b2.t().contiguous(), a.t(), ones(N), ones(G * M), _offs([30, 64], device))
    # Scale dtypes (the recipes in the message are those the kernel takes).
    yield e(r"scaled_grouped_mm: scale_a and scale_b must both be float32 \(rowwise.*, got Float and "
            r"Float8_e8m0fnu", a, b, sa, ones(G, N, 2).to(torch.float8_e8m0fnu), offs)
    yield e(r"scaled_grouped_mm: scale_a and scale_b must both be float32 \(rowwise.*, got BFloat16 and BFloat16",
            a, b, sa.bfloat16(), sb.bfloat16(), offs)
    yield e(r"scaled_grouped_mm: bias must have shape \(G, N\) = \(2, 8\), got \[8\]", a, b, sa, sb, offs,
            bias=ones(N))
    yield e(r"scaled_grouped_mm: bias must be float32 or the output dtype \(BFloat16\), got Half", a, b, sa, sb,
            offs, bias=ones(G, N).half())
    if torch.device(device).type == "cpu":
        yield e(r"scaled_grouped_mm: offs must be non-decreasing in \[0, M \(mat_a.size\(0\)\)=6\], got "
                r"offs\[1\]=7 after offs\[0\]=2", a, b, sa, sb, _offs([2, 7], device), name="offs_values")


def _scaled_grouped_mm_blockwise_errors(device):
    """Blockwise (scale_a of mat_a's rank): 1x128 x 128x128 grids, K = 64 -> 1 block, N = 8 -> 1 block."""
    a, b, a3, _, offs, ones = _scaled_grouped_mm_error_operands(device)
    M, N, G = 6, 8, 2
    e = _err
    yield e(r"scaled_grouped_mm: scale_a must have shape \[6, 1\] for blockwise \(1x128 x 128x128\) scaling of "
            r"these operands, got \[6, 2\]", a, b, ones(M, 2), ones(G, 1, 1), offs)
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 1, 1\] for blockwise \(1x128 x 128x128\) scaling "
            r"of these operands, got \[2, 8\]", a, b, ones(M, 1), ones(G, N), offs)
    yield e(r"scaled_grouped_mm: scale_a must have shape \[2, 6, 1\] for blockwise \(1x128 x 128x128\) scaling "
            r"of these operands, got \[2, 6, 2\]", a3, b, ones(G, M, 2), ones(G, 1, 1))


def _scaled_grouped_mm_mx_errors(device):
    """MX scale shapes: blocked per group (2-D operands), plain or swizzled (3-D operands)."""
    a, b, a3, b2, offs, ones = _scaled_grouped_mm_error_operands(device)
    M, N, G = 6, 8, 2
    e8 = torch.float8_e8m0fnu
    # scale_a of the 2-D mat_a: blocked per group; (M, 4) holds bytes as a blocked scale may, and is not the
    # plain grid's shape (M, ceil(K/32)) = (6, 2), which is refused (its own error input below).
    sa_mx, sb_mx = ones(M, 4).to(e8), ones(G, N, 2).to(e8)
    e = _err
    yield e(r"scaled_grouped_mm: scale_a must be the mx scale of mat_a blocked per group \(swizzle_mx_scale\(scale, "
            r"offs, dim=0\)\): 2-D with at least 6 rows, got \[5, 4\]", a, b, sa_mx[:5], sb_mx, offs)
    yield e(r"scaled_grouped_mm: scale_a must be the mx scale of mat_a blocked per group \(swizzle_mx_scale\(scale, "
            r"offs, dim=0\)\): 2-D with at least 6 rows, got \[6, 4, 1\]", a, b, sa_mx.unsqueeze(-1), sb_mx, offs)
    yield e(r"scaled_grouped_mm: scale_a has the shape of the plain mx scale grid of mat_a, \[6, 2\]; 2-D operands "
            r"take their scales blocked per group \(swizzle_mx_scale\(scale, offs, dim=0\)\), which at this shape "
            r"cannot be told from the plain grid", a, b, ones(M, 2).to(e8), sb_mx, offs)
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 8, 2\] for mx scaling of these operands, got "
            r"\[2, 4, 2\]", a, b, sa_mx, sb_mx[:, :4], offs)
    yield e(r"scaled_grouped_mm: scale_a must have shape \[2, 6, 2\] for mx scaling of these operands, got "
            r"\[1, 6, 2\]", a3, b, ones(1, M, 2).to(e8), sb_mx)
    # Swizzled MX scales of 3-D operands: (G, round_up(rows, 128) * round_up(ceil(K/32), 4)).
    yield e(r"scaled_grouped_mm: scale_b must have shape \[2, 512\] for mx \(swizzled\) scaling of these "
            r"operands, got \[2, 16\]", a, b, sa_mx, ones(G, 16).to(e8), offs)
    yield e(r"scaled_grouped_mm: scale_a must have shape \[2, 512\] for mx \(swizzled\) scaling of these "
            r"operands, got \[2, 12\]", a3, b, ones(G, 12).to(e8), sb_mx)
    yield e(r"scaled_grouped_mm: mx scaling supports 2D x 3D, 3D x 3D and 2D x 2D operands, got mat_a "
            r"\[2, 6, 64\] and mat_b \[64, 8\]", a3, b2, ones(G, M, 2).to(e8), ones(N, 2).to(e8), _offs([3, 8], device))
    # 2D x 2D mx: mat_a (8, 64), mat_b (64, 6): scale_a (8, 2), scale_b (6, 2).
    yield e(r"scaled_grouped_mm: scale_b must be the mx scale of mat_b\^T blocked per group \(swizzle_mx_scale\("
            r"scale, offs, dim=1\)\): 2-D with at least 6 rows, got \[5, 2\]",
            b2.t().contiguous(), a.t(), ones(N, 6).to(e8), ones(5, 2).to(e8), _offs([32, 64], device))
    yield e(r"scaled_grouped_mm: scale_b has the shape of the plain mx scale grid of mat_b\^T, \[6, 2\]",
            b2.t().contiguous(), a.t(), ones(N, 6).to(e8), ones(M, 2).to(e8), _offs([32, 64], device))
    if torch.device(device).type == "cpu":
        yield e(r"scaled_grouped_mm: with mx scales every group of K must hold whole 32-element blocks: offs\[g\] "
                r"must be a multiple of 32 or K=64, got offs\[0\]=30", b2.t().contiguous(), a.t(), ones(N, 6).to(e8),
                ones(M, 6).to(e8), _offs([30, 64], device), name="offs_values")
        # Groups of 2 and 4 rows: two 128-row blocks of 4 columns, 1024 bytes.
        yield e(r"scaled_grouped_mm: the blocked mx scale of sizes \[6, 4\] holds 24 bytes, fewer than the groups "
                r"of offs need \(562\)", a, b, sa_mx, sb_mx, offs, name="offs_values")


def error_inputs_scaled_grouped_mm(op_info, device, **kwargs):
    for recipe_errors in (
        _scaled_grouped_mm_rowwise_errors,
        _scaled_grouped_mm_blockwise_errors,
        _scaled_grouped_mm_mx_errors,
    ):
        yield from recipe_errors(device)


def swizzle_cases(device, dtype):
    """(name, scale, offs, dim): MX scale grids of 2-D operands and their groups.
    The op moves bytes, so the scales are random finite ones (bytes 0..254),
    which show any misplaced byte. The grids are float8_e8m0fnu, the op's
    dtype; asked for another dtype, they are converted to it (the op must
    refuse them)."""
    def grid(rows, k, seed):
        """The (rows, ceil(k / 32)) grid of a (rows, k) operand."""
        g = torch.Generator().manual_seed(seed)
        scale = torch.randint(0, 255, (rows, -(-k // 32)), generator=g, dtype=torch.uint8)
        return scale.view(torch.float8_e8m0fnu).to(device, dtype)

    # Groups of rows (2D x 3D tokens): an empty group, rows past offs[-1], a group past 128 rows.
    yield "rows", grid(300, 200, 8), _offs([10, 10, 140, 290], device), 0
    yield "rows_no_groups", grid(7, 64, 9), _offs([], device), 0
    yield "rows_zero_tokens", grid(0, 64, 10), _offs([0, 0], device), 0
    # Groups along K on 32-element blocks (2D x 2D), a partial last block.
    yield "cols", grid(7, 250, 11), _offs([32, 32, 96, 250], device), 1
    yield "cols_past_128_rows", grid(130, 300, 12), _offs([64, 192], device), 1
    yield "cols_no_groups", grid(40, 64, 13), _offs([], device), 1


def sample_inputs_swizzle_mx_scale(op_info, device, dtype, requires_grad, **kwargs):
    for name, scale, offs, dim in swizzle_cases(device, dtype):
        yield SampleInput(scale, args=(offs, dim), name=name)


def error_inputs_swizzle_mx_scale(op_info, device, **kwargs):
    e8 = torch.float8_e8m0fnu
    scale = torch.ones(6, 4, device=device).to(e8)
    offs = _offs([2, 6], device)
    e = _err
    yield e(r"swizzle_mx_scale: scale must be Float8_e8m0fnu, got Float", scale.float(), offs, 0)
    yield e(r"swizzle_mx_scale: scale must be the 2-D \(R, S\) grid of a 2-D operand, got sizes \[2, 6, 4\]",
            scale.expand(2, 6, 4), offs, 0)
    yield e(r"swizzle_mx_scale: dim must be 0 or 1, got 2", scale, offs, 2)
    yield e(r"swizzle_mx_scale: offs must be 1-D, got 2-D with sizes \[1, 2\]", scale, offs[None], 0)
    yield e(r"swizzle_mx_scale: offs must be int32, got Long", scale, offs.long(), 0)
    if torch.device(device).type == "cpu":
        yield e(r"swizzle_mx_scale: offs must be non-decreasing in \[0, R=6\], got offs\[1\]=7 after offs\[0\]=2",
                scale, _offs([2, 7], device), 0, name="offs_values")
        yield e(r"swizzle_mx_scale: with groups along K every group must hold whole 32-element blocks: offs\[g\] "
                r"must be a multiple of 32 or end in the last block, got offs\[0\]=40", scale, _offs([40, 128], device),
                1, name="offs_values")


def _fp8_opinfo(name, op, ref, dtypes, sample_inputs_func, error_inputs_func, cuda_skip=False,
                float8_inputs=True) -> OpInfo:
    """An fp8 op's OpInfo: no autograd, no out=; cuda_skip for an op whose CUDA
    kernel is narrower than these samples and tested in its own files.
    SchemaCheckMode compares inputs before and after the call with
    torch.allclose, which float8 lacks: ops taking float8 skip that test."""
    skips = ()
    if cuda_skip:
        skips = (DecorateInfo(unittest.skip("CUDA: a narrower kernel, tested in test_scaled_matmul_cuda.py"),
                              device_type="cuda"),)
    if float8_inputs:
        skips += (DecorateInfo(unittest.skip("torch.allclose lacks float8"), "TestSchemaCheckModeOpInfo",
                               "test_schema_correctness"),)
    return OpInfo(name, op=op, ref=ref, dtypes=dtypes, sample_inputs_func=sample_inputs_func,
                  error_inputs_func=error_inputs_func, supports_out=False, supports_autograd=False,
                  supports_forward_ad=False, supports_fwgrad_bwgrad=False, skips=skips)


def quantize_fp8_opinfos(name_of, op_of, cuda_tested_elsewhere=()) -> list[OpInfo]:
    """quantize_fp8. Samples cover every recipe on 2-D and 3-D operands, sizes
    that are not multiples of the blocks (partial last blocks), zero rows and
    zero columns, a transposed (column-major) weight quantised per output
    column, both float8 formats, per-group (offs) operands with empty groups
    and columns past ``offs[-1]``, the swizzled MX scale layout, and values
    spanning 40 binades so that blocks differ in scale. The ref is a
    plain-torch implementation of the op, which uses torch's own float ->
    float8 conversion. name_of and op_of map each op's name ("quantize_fp8",
    ...) to the OpInfo's name and the op it calls; the ops in
    cuda_tested_elsewhere skip CUDA."""
    return [_fp8_opinfo(name_of("quantize_fp8"), op_of("quantize_fp8"), torch_quantize_fp8, FP8_DTYPES,
                        sample_inputs_quantize_fp8, error_inputs_quantize_fp8,
                        "quantize_fp8" in cuda_tested_elsewhere, float8_inputs=False)]


def dequantize_fp8_opinfos(name_of, op_of, cuda_tested_elsewhere=()) -> list[OpInfo]:
    """dequantize_fp8: quantize_fp8's samples quantised by its reference,
    dequantised to every floating dtype, against a plain-torch reference
    (float32 products rounded once)."""
    return [_fp8_opinfo(name_of("dequantize_fp8"), op_of("dequantize_fp8"), torch_dequantize_fp8, FP8_DTYPES,
                        sample_inputs_dequantize_fp8, error_inputs_dequantize_fp8,
                        "dequantize_fp8" in cuda_tested_elsewhere)]


def scaled_grouped_mm_opinfos(name_of, op_of, cuda_tested_elsewhere=()) -> list[OpInfo]:
    """scaled_grouped_mm. Samples and error inputs come one function per
    recipe (``_scaled_grouped_mm_<recipe>_operands``, ``_<recipe>_errors``):
    both float8 formats, empty groups, rows past ``offs[-1]``, weights stored
    (G, N, K) (column-major, as upstream wants) and (G, K, N), bias in float32
    and bfloat16; its ref dequantises in float64. Upstream's CUDA kernel is
    narrower (e4m3 only, no bias, no float32 output, no MX or blockwise scales
    on sm_90): name it in cuda_tested_elsewhere to skip CUDA."""
    return [_fp8_opinfo(name_of("scaled_grouped_mm"), op_of("scaled_grouped_mm"), torch_scaled_grouped_mm,
                        SCALED_MM_DTYPES, sample_inputs_scaled_grouped_mm, error_inputs_scaled_grouped_mm,
                        "scaled_grouped_mm" in cuda_tested_elsewhere)]


def swizzle_mx_scale_opinfos(name_of, op_of, cuda_tested_elsewhere=()) -> list[OpInfo]:
    """swizzle_mx_scale: scale grids of groups of rows and of groups along K,
    empty groups, rows or columns past ``offs[-1]``, zero rows; its ref moves
    the bytes one group at a time."""
    return [_fp8_opinfo(name_of("swizzle_mx_scale"), op_of("swizzle_mx_scale"), torch_swizzle_mx_scale,
                        (torch.float8_e8m0fnu,), sample_inputs_swizzle_mx_scale, error_inputs_swizzle_mx_scale,
                        "swizzle_mx_scale" in cuda_tested_elsewhere)]


def make_fp8_op_db(name_of, op_of, cuda_tested_elsewhere=()) -> list[OpInfo]:
    """The OpInfos of every fp8 op, in the declaration's order."""
    return [*quantize_fp8_opinfos(name_of, op_of, cuda_tested_elsewhere),
            *dequantize_fp8_opinfos(name_of, op_of, cuda_tested_elsewhere),
            *scaled_grouped_mm_opinfos(name_of, op_of, cuda_tested_elsewhere),
            *swizzle_mx_scale_opinfos(name_of, op_of, cuda_tested_elsewhere)]


op_db = make_fp8_op_db(lambda op: f"moe_ops.{op}", lambda op: getattr(torch.ops.moe_ops, op).default)

"""OpInfos of the fp8 ops ``moe_ops.quantize_fp8`` and ``moe_ops.dequantize_fp8``.

Samples cover every recipe on 2-D and 3-D operands, sizes that are not
multiples of the blocks (partial last blocks), zero rows and zero columns, a
transposed (column-major) weight quantised per output column, both float8
formats, the swizzled MX scale layout, per-group (offs) operands with empty
groups and columns past ``offs[-1]``, and values spanning 40 binades so that
blocks differ in scale. Error inputs cover every rejected argument. The refs
are the plain-torch references of ``torch_moe_ops/reference.py``, which use
torch's own float -> float8 conversion.

The OpInfo's dtype is the floating dtype: the input of quantize_fp8 and the
out_dtype of dequantize_fp8.
"""

from __future__ import annotations

import torch
from torch.testing import make_tensor
from torch.testing._internal.opinfo.core import ErrorInput, OpInfo, SampleInput

from torch_moe_ops.reference import FP8_RECIPES, torch_dequantize_fp8, torch_quantize_fp8

FP8_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    yield "mx_swizzle_2d", _spread((130, 200), device, dtype, 4), "mx", dict(swizzle=True)
    yield "mx_swizzle_3d", _spread((2, 40, 96), device, dtype, 5), "mx", dict(swizzle=True)
    # Per-group operands of the 2D x 2D grouped GEMM: groups along C (tokens).
    x = _spread((7, 200), device, dtype, 6)
    yield "tensorwise_offs", x, "tensorwise", dict(offs=_offs([50, 50, 130], device))
    yield "rowwise_offs", x, "rowwise", dict(offs=_offs([10, 10, 64, 199], device))
    yield "rowwise_offs_no_groups", x, "rowwise", dict(offs=_offs([], device))
    yield "mx_offs", x, "mx", dict(offs=_offs([32, 32, 96, 200], device))


def sample_inputs_quantize_fp8(op_info, device, dtype, requires_grad, **kwargs):
    for name, x, recipe, kw in quantize_cases(device, dtype):
        yield SampleInput(x, args=(recipe,), kwargs=kw, name=name)


def sample_inputs_dequantize_fp8(op_info, device, dtype, requires_grad, **kwargs):
    for name, x, recipe, kw in quantize_cases(device, torch.float32):
        data, scale = torch_quantize_fp8(x.cpu(), recipe, **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                             for k, v in kw.items()})
        kw = {k: v for k, v in kw.items() if k != "float8_dtype"}
        yield SampleInput(data.to(device), args=(scale.to(device), recipe), kwargs=dict(out_dtype=dtype, **kw),
                          name=name)


def _err(regex, *args, name="", **kw):
    return ErrorInput(SampleInput(args[0], args=args[1:], kwargs=kw, name=name), error_type=ValueError,
                      error_regex=regex)


def error_inputs_quantize_fp8(op_info, device, **kwargs):
    x = make_tensor((4, 64), device=device, dtype=torch.float32)
    offs = _offs([32, 64], device)
    e = _err
    yield e(r"quantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' "
            r"or 'mx', got 'rowise'", x, "rowise")
    yield e(r"quantize_fp8: x must be float32, bfloat16 or float16, got Double", x.double(), "mx")
    yield e(r"quantize_fp8: float8_dtype must be Float8_e4m3fn or Float8_e5m2, got BFloat16", x, "mx",
            float8_dtype=torch.bfloat16)
    yield e(r"quantize_fp8: x must be 2-D or 3-D, got 1-D with sizes \[64\]", x[0], "rowwise")
    yield e(r"quantize_fp8: x must be 2-D or 3-D, got 4-D", x.view(1, 1, 4, 64), "rowwise")
    yield e(r"quantize_fp8: swizzle=True needs recipe 'mx', got 'blockwise_1x128'", x, "blockwise_1x128",
            swizzle=True)
    yield e(r"quantize_fp8: offs needs a 2-D x, got x of sizes \[1, 4, 64\]", x.view(1, 4, 64), "rowwise",
            offs=offs)
    yield e(r"quantize_fp8: offs is supported with recipes 'tensorwise', 'rowwise' and 'mx', got "
            r"'blockwise_128x128'", x, "blockwise_128x128", offs=offs)
    yield e(r"quantize_fp8: swizzle=True does not take offs", x, "mx", offs=offs, swizzle=True)
    yield e(r"quantize_fp8: offs must be 1-D, got 2-D with sizes \[1, 2\]", x, "rowwise", offs=offs.view(1, 2))
    yield e(r"quantize_fp8: offs must be int32, got Long", x, "rowwise", offs=offs.long())
    if torch.device(device).type == "cpu":
        # Values of offs: checked by the kernels, not by fake kernels.
        yield e(r"quantize_fp8: offs must be non-decreasing in \[0, C=64\], got offs\[1\]=16 after offs\[0\]=32",
                x, "rowwise", offs=_offs([32, 16], device), name="offs_values")
        yield e(r"quantize_fp8: offs must be non-decreasing in \[0, C=64\], got offs\[0\]=65", x, "tensorwise",
                offs=_offs([65], device), name="offs_values")
        yield e(r"quantize_fp8: with recipe 'mx' every group must hold whole 32-element blocks: offs\[g\] must "
                r"be a multiple of 32 or C=64, got offs\[0\]=40", x, "mx", offs=_offs([40, 64], device),
                name="offs_values")


def error_inputs_dequantize_fp8(op_info, device, **kwargs):
    x = make_tensor((4, 64), device=device, dtype=torch.float32)
    d, s = torch_quantize_fp8(x.cpu(), "rowwise")
    d, s = d.to(device), s.to(device)
    dm, sm = (t.to(device) for t in torch_quantize_fp8(x.cpu(), "mx"))
    offs = _offs([32, 64], device)
    e = _err
    yield e(r"dequantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' "
            r"or 'mx', got 'MX'", dm, sm, "MX")
    yield e(r"dequantize_fp8: data must be Float8_e4m3fn or Float8_e5m2, got Float", x, s, "rowwise")
    yield e(r"dequantize_fp8: data must be 2-D or 3-D, got 1-D with sizes \[64\]", d[0], s, "rowwise")
    yield e(r"dequantize_fp8: scale must be Float8_e8m0fnu for recipe 'mx', got Float", dm, sm.float(), "mx")
    yield e(r"dequantize_fp8: scale must be Float for recipe 'rowwise', got Float8_e8m0fnu", d,
            s.to(torch.float8_e8m0fnu), "rowwise")
    yield e(r"dequantize_fp8: scale must have shape \[4\] for data of sizes \[4, 64\] and recipe 'rowwise', "
            r"got \[4, 1\]", d, s.view(4, 1), "rowwise")
    yield e(r"dequantize_fp8: scale must have shape \[4, 2\] for data of sizes \[4, 64\] and recipe 'mx', "
            r"got \[4, 1\]", dm, sm[:, :1], "mx")
    yield e(r"dequantize_fp8: scale must have shape \[128, 4\] for data of sizes \[4, 64\] and recipe 'mx' "
            r"\(swizzled\), got \[4, 2\]", dm, sm, "mx", swizzle=True)
    yield e(r"dequantize_fp8: scale must have shape \[2, 4\] for data of sizes \[4, 64\] and recipe 'rowwise', "
            r"got \[4\]", d, s, "rowwise", offs=offs)
    yield e(r"dequantize_fp8: scale must have shape \[\] for data of sizes \[4, 64\] and recipe 'tensorwise', "
            r"got \[4\]", d, s, "tensorwise")
    yield e(r"dequantize_fp8: scale must have shape \[1, 1\] for data of sizes \[4, 64\] and recipe "
            r"'blockwise_128x128', got \[4\]", d, s, "blockwise_128x128")
    yield e(r"dequantize_fp8: out_dtype must be float32, bfloat16 or float16, got Double", d, s, "rowwise",
            out_dtype=torch.float64)
    yield e(r"dequantize_fp8: offs must be int32, got Long", d, s, "rowwise", offs=offs.long())


def make_fp8_op_db(name_of, op_of) -> list[OpInfo]:
    """OpInfos of quantize_fp8 and dequantize_fp8; name_of and op_of map
    "quantize_fp8", "dequantize_fp8" to the OpInfo's name and the op it calls."""

    def opinfo(op, sample_fn, error_fn, ref):
        return OpInfo(name_of(op), op=op_of(op), ref=ref, dtypes=FP8_DTYPES, sample_inputs_func=sample_fn,
                      error_inputs_func=error_fn, supports_out=False, supports_autograd=False,
                      supports_forward_ad=False, supports_fwgrad_bwgrad=False)

    return [
        opinfo("quantize_fp8", sample_inputs_quantize_fp8, error_inputs_quantize_fp8, torch_quantize_fp8),
        opinfo("dequantize_fp8", sample_inputs_dequantize_fp8, error_inputs_dequantize_fp8, torch_dequantize_fp8),
    ]


op_db = make_fp8_op_db(lambda op: f"moe_ops.{op}", lambda op: getattr(torch.ops.moe_ops, op).default)

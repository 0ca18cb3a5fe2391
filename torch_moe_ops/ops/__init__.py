"""Public Python API of the ops: thin wrappers over ``torch.ops.moe_ops``, with
their fake kernels and autograd formulas."""

import torch_moe_ops as _pkg

if _pkg._C is None:
    raise ImportError(f"torch_moe_ops.ops: {_pkg._C_MISSING}")

from .experts import fused_experts, grouped_mm_gather  # noqa: E402
from .fp8 import dequantize_fp8, fp8_grouped_mm, quantize_fp8, scaled_grouped_mm, swizzle_mx_scale  # noqa: E402
from .grouped_mm import grouped_mm  # noqa: E402
from .routing import permute, router_topk, unpermute  # noqa: E402

__all__ = ["dequantize_fp8", "fp8_grouped_mm", "fused_experts", "grouped_mm", "grouped_mm_gather", "permute",
           "quantize_fp8", "router_topk", "scaled_grouped_mm", "swizzle_mx_scale", "unpermute"]

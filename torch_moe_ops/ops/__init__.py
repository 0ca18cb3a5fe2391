"""Public Python API of the ops: thin wrappers over ``torch.ops.moe_ops``, with
their fake kernels and autograd formulas."""

from .experts import fused_experts, grouped_mm_gather
from .fp8 import dequantize_fp8, fp8_grouped_mm, quantize_fp8, scaled_grouped_mm, swizzle_mx_scale
from .grouped_mm import grouped_mm
from .routing import permute, router_topk, unpermute

__all__ = ["dequantize_fp8", "fp8_grouped_mm", "fused_experts", "grouped_mm", "grouped_mm_gather", "permute",
           "quantize_fp8", "router_topk", "scaled_grouped_mm", "swizzle_mx_scale", "unpermute"]

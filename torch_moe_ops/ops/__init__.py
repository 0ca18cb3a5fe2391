"""Public Python API of the ops: thin wrappers over ``torch.ops.moe_ops``, with
their fake kernels and autograd formulas."""

from .experts import fused_experts, grouped_mm_gather
from .grouped_mm import grouped_mm
from .routing import permute, router_topk, unpermute

__all__ = ["fused_experts", "grouped_mm", "grouped_mm_gather", "permute", "router_topk", "unpermute"]

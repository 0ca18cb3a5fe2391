"""Public Python API of the ops: thin wrappers over ``torch.ops.moe_ops``, with
their fake kernels and autograd formulas."""

from .grouped_mm import grouped_mm
from .routing import permute, router_topk, unpermute

__all__ = ["grouped_mm", "permute", "router_topk", "unpermute"]

"""Distributed MoE: DTensor sharding strategies and expert parallelism.

Importable as ``torch_moe_ops.distributed``. Parallelism stays out of the
model code in ``torch_moe_ops.nn``. Importing this package registers the
DTensor sharding strategies of every ``moe_ops`` op (grouped_mm_strategy.py,
strategies.py).
"""

from . import grouped_mm_strategy, strategies

__all__ = ["grouped_mm_strategy", "strategies"]

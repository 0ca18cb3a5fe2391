"""Distributed MoE: DTensor sharding strategies and expert parallelism.

Importable as ``torch_moe_ops.distributed``. Parallelism stays out of the
model code in ``torch_moe_ops.nn``. Importing this package registers the
DTensor sharding strategies of the ``moe_ops`` ops.
"""

from . import grouped_mm_strategy

__all__ = ["grouped_mm_strategy"]

"""Distributed MoE: DTensor sharding strategies and expert parallelism.

Importable as ``torch_moe_ops.distributed``. Parallelism stays out of the
model code in ``torch_moe_ops.nn``. Importing this package registers the
DTensor sharding strategies of every ``moe_ops`` op (grouped_mm_strategy.py,
scaled_grouped_mm_strategy.py, moe_strategy.py,
strategies.py); ``ExpertParallel`` (expert_parallel.py) is the ParallelStyle
that shards an MoE's experts and dispatches tokens by all-to-all;
``TensorParallelExperts`` shards each expert's intermediate dimension;
``ExpertTensorParallel`` does both on a 2-D (EP, TP) mesh.
"""

from . import grouped_mm_strategy, moe_strategy, scaled_grouped_mm_strategy, strategies
from .expert_parallel import ExpertParallel, ExpertTensorParallel, TensorParallelExperts

__all__ = ["ExpertParallel", "ExpertTensorParallel", "TensorParallelExperts", "grouped_mm_strategy", "moe_strategy",
           "scaled_grouped_mm_strategy", "strategies"]

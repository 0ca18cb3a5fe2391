"""DTensor sharding strategy for grouped_mm.

The patch series turns this module into upstream's strategy for
``aten._grouped_mm`` (patches/manifest.py rewrites the op and the names of the
checks), so it is written against DTensor's own registry and helpers only.

Placements, per mesh dimension, as ``[out, mat_a, mat_b, offs, bias]``:

* everything replicated (always valid);
* 3D x 3D: the expert/batch dimension G sharded on both operands, the output
  and bias (each rank runs its own experts);
* N sharded, where no group boundary runs along N (every layout but 3D x 2D,
  whose offs splits N): mat_b's last dimension -> the output's last dimension,
  with bias sharded along N too;
* K sharded on both operands -> a Partial (sum) output, where no group boundary
  runs along K (every layout but 2D x 2D, whose offs splits K) and there is no
  bias (each rank would add it again).

offs is always replicated: every rank needs every group boundary.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, PlacementList, StrategyType
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from torch_moe_ops import _checks

__all__ = ["grouped_mm_strategy"]


def _meta_stand_in(strategy: OpStrategy | None) -> torch.Tensor | None:
    """A meta tensor with the global shape, strides and dtype of a DTensor
    argument, so that the fake kernel's checks run on it unchanged."""
    if strategy is None:
        return None
    meta = strategy.tensor_meta
    return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")


@register_op_strategy(torch.ops.moe_ops.grouped_mm.default)
def grouped_mm_strategy(op_schema: OpSchema) -> StrategyType:
    mesh = op_schema.get_mesh_from_args()
    # Arguments in schema order, whether passed positionally, by keyword or
    # left out (None).
    names = [arg.name for arg in op_schema.op._schema.arguments]
    args = list(op_schema.args_schema) + [None] * (len(names) - len(op_schema.args_schema))
    for i, name in enumerate(names):
        if name in op_schema.kwargs_schema:
            args[i] = op_schema.kwargs_schema[name]
    a_strategy, b_strategy, offs_strategy, bias_strategy, out_dtype = args
    mat_a, mat_b = _meta_stand_in(a_strategy), _meta_stand_in(b_strategy)
    offs, bias = _meta_stand_in(offs_strategy), _meta_stand_in(bias_strategy)
    # Reject what the kernels reject, with their messages, before any
    # redistribution is planned.
    _checks.check_grouped_mm_inputs(mat_a, mat_b, offs, bias, out_dtype)

    layout = _checks.grouped_mm_layout(mat_a, mat_b)
    out_ndim = len(_checks.grouped_mm_out_size(mat_a, mat_b, offs))
    has_offs, has_bias = offs is not None, bias is not None

    def placements(out, a, b, offs_p, bias_p) -> list:
        """One PlacementList; None for the optional tensors that are absent."""
        return [out, a, b, offs_p if has_offs else None, bias_p if has_bias else None]

    strategies: list[PlacementList] = [placements(Replicate(), Replicate(), Replicate(), Replicate(), Replicate())]
    if layout == "3d3d":
        strategies.append(placements(Shard(0), Shard(0), Shard(0), None, Shard(0)))
    if layout != "3d2d":
        strategies.append(
            placements(Shard(out_ndim - 1), Replicate(), Shard(mat_b.dim() - 1), Replicate(), Shard(1)))
    if layout != "2d2d" and not has_bias:
        strategies.append(
            placements(Partial(), Shard(mat_a.dim() - 1), Shard(mat_b.dim() - 2), Replicate(), None))
    return expand_to_full_mesh_op_strategy(mesh, op_schema, strategies, input_index=1)

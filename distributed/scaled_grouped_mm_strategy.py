"""DTensor sharding strategy for scaled_grouped_mm, as upstream writes it.

The patch series adds ``scaled_grouped_mm_single_dim_strategy`` to
torch/distributed/tensor/_ops/_matrix_ops.py after upstream's
``grouped_mm_single_dim_strategy`` (distributed/0003: v2.14.1 has no strategy
for ``aten._scaled_grouped_mm``), the op and the checks' names rewritten. So
the function stands alone: DTensor's registry and helpers, the meta
function's checks, its arguments read by position (upstream names the first
two ``self`` and ``mat2``). The refusal of placements no rule keeps is this
project's (placement_guard.py, installed by strategies.py), not upstream's.

Per mesh dimension, besides everything replicated, grouped_mm's shardings
with the scales following their operand:

* rowwise, 2D x 3D: N (``mat_b`` S(2), ``scale_b`` S(1)); K (scales
  replicated, Partial output: each rank's partial product over its K slice
  is scaled by the same per-row and per-column factors).
* rowwise, 3D x 2D: M (``mat_a`` S(1), ``scale_a`` S(1)); K.
* rowwise, 3D x 3D: G (every operand and scale S(0)), M, N, K.
* blockwise and mx, 3D x 3D: G; M where ``scale_a`` is 3-D (blockwise,
  plain mx: rows are not blocked); N where ``scale_b`` is a plain mx (G, N,
  K/32) scale.

Not sharded: 2D x 2D's flattened per-group rowwise scales, K or N through
128- or 32-blocks, the swizzled layouts; no Partial operands (a sum of float8
data is not float8 data). The bias follows the output as in grouped_mm
(Partial with a K split).
"""

from __future__ import annotations

import torch
from torch._ops import OpOverload
from torch.distributed.tensor._dtensor_spec import TensorMeta
from torch.distributed.tensor._op_schema import ArgsType, KwargsType, RuntimeSchemaInfo
from torch.distributed.tensor._ops.single_dim_strategy import _ShardingPlaceholder, register_single_dim_strategy
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate

from torch_moe_ops import _checks

__all__ = ["scaled_grouped_mm_single_dim_strategy", "scaled_grouped_mm_v2_single_dim_strategy"]


@register_single_dim_strategy(
    torch.ops.moe_ops.scaled_grouped_mm.default,
    # out_dtype is in the sharding cache's key: the checks depend on it.
    schema_info=RuntimeSchemaInfo(static_argnum=7, static_kwargkey=["out_dtype", "use_fast_accum"]),
)
def scaled_grouped_mm_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> list[list[Placement | _ShardingPlaceholder | None]]:
    def arg(index: int, name: str):
        return args_schema[index] if index < len(args_schema) else kwargs_schema.get(name)

    def meta(m: TensorMeta | None) -> torch.Tensor | None:
        if m is None:
            return None
        return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")

    names = ["mat_a", "mat_b", "scale_a", "scale_b", "offs", "bias", "scale_result"]
    metas = {name: arg(i, name) for i, name in enumerate(names)}
    tensors = {name: meta(m) for name, m in metas.items()}
    # Reject what the kernels reject, with their messages (the meta
    # function's checks), before any redistribution is planned.
    recipe, _ = _checks.check_scaled_grouped_mm_inputs(*tensors.values(), arg(7, "out_dtype"))
    layout = _checks.grouped_mm_layout(tensors["mat_a"], tensors["mat_b"])

    def rule(output: Placement | _ShardingPlaceholder, **placements) -> list:
        """The output, then every tensor input given (Replicate unless named)."""
        return [output, *(placements.get(n, Replicate()) for n in names if metas[n] is not None)]

    def shard(dim: int) -> _ShardingPlaceholder:
        return _ShardingPlaceholder(dim)

    k_a, k_b = len(metas["mat_a"].shape) - 1, len(metas["mat_b"].shape) - 2
    experts = rule(shard(0), mat_a=shard(0), mat_b=shard(0), scale_a=shard(0), scale_b=shard(0), bias=shard(0))
    if recipe == "rowwise":
        # Rowwise scales are per row of A and column of B: each rank's
        # partial product over its K slice is scaled by the same factors.
        k_split = rule(Partial(), mat_a=shard(k_a), mat_b=shard(k_b), bias=Partial())
        if layout == "2d3d":
            return [rule(shard(1), mat_b=shard(2), scale_b=shard(1), bias=shard(1)), k_split]
        if layout == "3d2d":
            return [rule(shard(0), mat_a=shard(1), scale_a=shard(1)), k_split]
        if layout == "3d3d":
            return [
                experts,
                rule(shard(1), mat_a=shard(1), scale_a=shard(1)),
                rule(shard(2), mat_b=shard(2), scale_b=shard(1), bias=shard(1)),
                k_split,
            ]
        return []  # 2D x 2D: the scales are flattened per group, (G * M,) and (G * N,)
    strategies = []
    if layout == "3d3d":
        strategies.append(experts)
        if len(metas["scale_a"].shape) == 3:  # blockwise (G, M, K/128) or plain mx (G, M, K/32): rows not blocked
            strategies.append(rule(shard(1), mat_a=shard(1), scale_a=shard(1)))
        if recipe == "mx" and len(metas["scale_b"].shape) == 3:  # plain mx (G, N, K/32): columns of B not blocked
            strategies.append(rule(shard(2), mat_b=shard(2), scale_b=shard(1), bias=shard(1)))
    return strategies


@register_single_dim_strategy(
    torch.ops.moe_ops.scaled_grouped_mm_v2.default,
    # The recipes, swizzles, out_dtype and contraction_dim are in the sharding
    # cache's key; the scale lists are flattened into the tensor inputs.
    schema_info=RuntimeSchemaInfo(
        static_argnum=3,
        static_kwargkey=["recipe_a", "swizzle_a", "recipe_b", "swizzle_b", "out_dtype", "contraction_dim",
                         "use_fast_accum"],
        needs_pytree=True,
    ),
)
def scaled_grouped_mm_v2_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> list[list[Placement | _ShardingPlaceholder | None]]:
    # The v2 schema states the recipe that v1 tells from the scales; once its
    # checks pass, the scales have v1's shapes for that recipe, one tensor per
    # operand, and the tensor inputs flatten in v1's order (mat_a, mat_b,
    # scale_a[0], scale_b[0], offs, bias): v1's rules apply as they are.
    def arg(index: int, name: str, default=None):
        if index < len(args_schema):
            return args_schema[index]
        return kwargs_schema.get(name, default)

    def meta(m: TensorMeta | None) -> torch.Tensor | None:
        if m is None:
            return None
        return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")

    mat_a, mat_b, scale_a, scale_b = arg(0, "self"), arg(1, "mat2"), arg(2, "scale_a"), arg(5, "scale_b")
    offs, bias, out_dtype = arg(8, "offs"), arg(9, "bias"), arg(10, "out_dtype")
    _checks.check_scaled_grouped_mm_v2_inputs(
        meta(mat_a), meta(mat_b), [meta(s) for s in scale_a], arg(3, "recipe_a"), arg(4, "swizzle_a", []),
        [meta(s) for s in scale_b], arg(6, "recipe_b"), arg(7, "swizzle_b", []), meta(offs), meta(bias), out_dtype,
        arg(11, "contraction_dim", []))
    return scaled_grouped_mm_single_dim_strategy(
        op, (mat_a, mat_b, scale_a[0], scale_b[0], offs, bias, None, out_dtype), {})

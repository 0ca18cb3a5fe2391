"""DTensor sharding strategy for grouped_mm.

The patch series turns this module into upstream's strategy for
``aten._grouped_mm`` (patches/manifest.py rewrites the op and the names of the
checks), so it is written against DTensor's own registry and helpers only.

Placements offered, per mesh dimension (everything replicated is always one),
with ``G`` the groups (experts), ``M`` ``K`` ``N`` the GEMM dimensions; a
dimension that ``offs`` splits into groups is never sharded (a group boundary
would fall between ranks):

======  =================================  ======================  ===============
layout  mat_a, mat_b                       offs splits             shardings
======  =================================  ======================  ===============
2D x 3D (M, K), (G, K, N) -> (M, N)        M                       N, K
3D x 2D (G, M, K), (K, N) -> (M, N)        N                       M, K
2D x 2D (M, K), (K, N) -> (G, M, N)        K                       M, N
3D x 3D (G, M, K), (G, K, N) -> (G, M, N)  (no offs)               G, M, N, K
======  =================================  ======================  ===============

N sharding shards bias along N; G sharding shards it along G; K sharding
gives a Partial (sum) output and takes no bias (each rank would add it).
offs is always replicated: every rank needs every group boundary.

A placement no strategy keeps is refused with an error naming the argument,
its placement and why, instead of letting DTensor redistribute it: a Shard
input turned Replicate is a silent all-gather of the tensor. In particular
the experts of the 2D layouts (mat_b Shard(0) in 2D x 3D, mat_a Shard(0) in
3D x 2D) cannot be sharded in DTensor's global view: each rank would need the
rows (columns) and offs of its own experts only, which a Shard of the global
tensors does not give; that is expert parallelism's all-to-all dispatch.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor._op_schema import (
    OpSchema,
    OpStrategy,
    PlacementList,
    RuntimeSchemaInfo,
    StrategyType,
)
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from torch_moe_ops import _checks

__all__ = ["grouped_mm_strategy"]


def _meta_stand_in(strategy: OpStrategy | None) -> torch.Tensor | None:
    """A meta tensor with the global shape, strides and dtype of a DTensor
    argument, so that the fake kernel's checks run on it unchanged."""
    if not isinstance(strategy, OpStrategy):
        return None
    meta = strategy.tensor_meta
    return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")


def _schema_args(op_schema: OpSchema, names: tuple[str, ...] | None = None) -> dict:
    """The op's arguments by name in schema order, whether passed positionally,
    by keyword or left to their default: OpStrategy for tensors (None when
    absent), the values of the others. names: the strategy's own names for
    the arguments, by position, where the op's schema may name them otherwise
    (aten._grouped_mm's self and mat2 are grouped_mm's mat_a and mat_b)."""
    arguments = op_schema.op._schema.arguments
    out = {}
    for i, arg in enumerate(arguments):
        name = names[i] if names is not None else arg.name
        if arg.name in op_schema.kwargs_schema:
            out[name] = op_schema.kwargs_schema[arg.name]
        elif i < len(op_schema.args_schema):
            out[name] = op_schema.args_schema[i]
        else:
            out[name] = arg.default_value if arg.has_default_value() else None
    return out


def _static_schema_info(op: torch._ops.OpOverload) -> RuntimeSchemaInfo:
    """Every non-tensor argument is part of the sharding cache's key (the
    strategies and checks depend on out_dtype, recipe, activation...)."""
    arguments = op._schema.arguments
    tensor = [isinstance(a.type, torch.TensorType) or "Tensor" in str(a.type) for a in arguments]
    first_static = next((i for i, t in enumerate(tensor) if not t), len(arguments))
    return RuntimeSchemaInfo(static_argnum=first_static,
                             static_kwargkey=[a.name for a, t in zip(arguments, tensor) if not t])


def _placement_str(p) -> str:
    return f"Shard({p.dim})" if isinstance(p, Shard) else type(p).__name__ + "()"


def expand_or_refuse(
    op_name: str,
    op_schema: OpSchema,
    strategies: list[tuple[list, dict]],
    why_not: dict,
    dims: dict,
    names: tuple[str, ...] | None = None,
) -> StrategyType:
    """The full-mesh strategy of an op from its single-mesh-dimension ones.

    strategies: ``(output placements, {input name: placement})``; inputs not
    named are Replicate, absent optional tensors are dropped. why_not:
    ``{(input name, Shard dim): reason}`` for the shardings refused. dims:
    ``{input name: names of its dimensions}`` for the messages. names: as
    for _schema_args.

    Before DTensor plans any redistribution, each mesh dimension's current
    Shard placements must all be kept by one strategy; else a ValueError
    names the argument, its placement and the reason.
    """
    mesh = op_schema.get_mesh_from_args()
    args = _schema_args(op_schema, names)
    # The order in which expand_to_full_mesh_op_strategy reads the inputs:
    # positional tensors, then keyword tensors.
    schema_names = [a.name for a in op_schema.op._schema.arguments]
    arg_names = list(names) if names is not None else schema_names
    own_name = dict(zip(schema_names, arg_names))
    order = [arg_names[i] for i, v in enumerate(op_schema.args_schema) if isinstance(v, OpStrategy)]
    order += [own_name[k] for k, v in op_schema.kwargs_schema.items() if isinstance(v, OpStrategy)]

    current = {}
    for name in order:
        specs = args[name].strategies
        if len(specs) == 1:  # eager: the input's own placement
            current[name] = specs[0].output_spec.placements
    for mesh_dim in range(mesh.ndim):
        sharded = {n: p[mesh_dim] for n, p in current.items() if isinstance(p[mesh_dim], Shard)}
        if not sharded or any(all(s[1].get(n, Replicate()) == p for n, p in sharded.items()) for s in strategies):
            continue
        for name, p in sharded.items():
            if not any(s[1].get(name, Replicate()) == p for s in strategies):
                dim_names = dims.get(name, ())
                what = f" (its {dim_names[p.dim]} dimension)" if p.dim < len(dim_names) else ""
                reason = why_not.get((name, p.dim), "no sharding of this op keeps it")
                raise ValueError(
                    f"{op_name}: {name} placed {_placement_str(p)}{what} on mesh dimension {mesh_dim} cannot be "
                    f"honoured: {reason}. Redistribute it explicitly (e.g. to Replicate()) if that is what you want.")
        placed = ", ".join(f"{n} {_placement_str(p)}" for n, p in sharded.items())
        raise ValueError(
            f"{op_name}: no sharding of this op keeps {placed} together on mesh dimension {mesh_dim}. Redistribute "
            "them explicitly to placements the op accepts.")

    single: list[PlacementList] = []
    for outputs, inputs in strategies:
        single.append(list(outputs) + [inputs.get(name, Replicate()) for name in order])
    return expand_to_full_mesh_op_strategy(mesh, op_schema, single, input_index=len(strategies[0][0]))


_GROUPED_MM_DIMS = {
    "2d3d": {"mat_a": ("M (rows, grouped by offs)", "K"), "mat_b": ("G (experts)", "K", "N"),
             "bias": ("G (experts)", "N")},
    "3d2d": {"mat_a": ("G (experts)", "M", "K"), "mat_b": ("K", "N (columns, grouped by offs)"),
             "bias": ("G (experts)", "N")},
    "2d2d": {"mat_a": ("M", "K (grouped by offs)"), "mat_b": ("K (grouped by offs)", "N"),
             "bias": ("G (groups)", "N")},
    "3d3d": {"mat_a": ("G (experts)", "M", "K"), "mat_b": ("G (experts)", "K", "N"), "bias": ("G (experts)", "N")},
}

_EXPERTS_NEED_DISPATCH = (
    "each rank would need the {what} of its own experts and their offs, which a Shard of the global tensors does "
    "not give; dispatch the tokens to the experts' ranks first (expert parallelism's all-to-all)")
_GROUP_BOUNDARIES = "offs splits this dimension into groups, so a group boundary would fall between ranks"
_BIAS_TWICE = ("with K sharded the output is a Partial sum and every rank would add the bias; drop the bias from "
               "the sharded product and add it after the reduction")


_GROUPED_MM = torch.ops.moe_ops.grouped_mm.default
_GROUPED_MM_ARGS = ("mat_a", "mat_b", "offs", "bias", "out_dtype")


@register_op_strategy(_GROUPED_MM, schema_info=_static_schema_info(_GROUPED_MM))
def grouped_mm_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema, _GROUPED_MM_ARGS)
    mat_a, mat_b = _meta_stand_in(args["mat_a"]), _meta_stand_in(args["mat_b"])
    offs, bias = _meta_stand_in(args["offs"]), _meta_stand_in(args["bias"])
    # Reject what the kernels reject, with their messages, before any
    # redistribution is planned.
    _checks.check_grouped_mm_inputs(mat_a, mat_b, offs, bias, args["out_dtype"])

    layout = _checks.grouped_mm_layout(mat_a, mat_b)
    has_bias = bias is not None
    R = Replicate()
    strategies = [([R], {})]
    why_not = {("offs", 0): "every rank needs every group boundary"}
    k_a, k_b = mat_a.dim() - 1, mat_b.dim() - 2
    if has_bias:
        why_not[("mat_a", k_a)] = why_not[("mat_b", k_b)] = _BIAS_TWICE
    if layout == "2d3d":
        strategies.append(([Shard(1)], {"mat_b": Shard(2), "bias": Shard(1)}))
        why_not[("mat_a", 0)] = _GROUP_BOUNDARIES
        why_not[("mat_b", 0)] = why_not[("bias", 0)] = _EXPERTS_NEED_DISPATCH.format(what="rows of mat_a")
    elif layout == "3d2d":
        strategies.append(([Shard(0)], {"mat_a": Shard(1)}))
        why_not[("mat_b", 1)] = _GROUP_BOUNDARIES
        why_not[("mat_a", 0)] = why_not[("bias", 0)] = _EXPERTS_NEED_DISPATCH.format(what="columns of mat_b")
        why_not[("bias", 1)] = _GROUP_BOUNDARIES
    elif layout == "2d2d":
        strategies.append(([Shard(1)], {"mat_a": Shard(0)}))
        strategies.append(([Shard(2)], {"mat_b": Shard(1), "bias": Shard(1)}))
        why_not[("mat_a", 1)] = why_not[("mat_b", 0)] = _GROUP_BOUNDARIES
        why_not[("bias", 0)] = "every group's output reads all of mat_a and mat_b along K, split by offs"
    else:
        strategies.append(([Shard(0)], {"mat_a": Shard(0), "mat_b": Shard(0), "bias": Shard(0)}))
        strategies.append(([Shard(1)], {"mat_a": Shard(1)}))
        strategies.append(([Shard(2)], {"mat_b": Shard(2), "bias": Shard(1)}))
    if layout != "2d2d" and not has_bias:
        strategies.append(([Partial()], {"mat_a": Shard(k_a), "mat_b": Shard(k_b)}))
    return expand_or_refuse("grouped_mm", op_schema, strategies, why_not, _GROUPED_MM_DIMS[layout], _GROUPED_MM_ARGS)

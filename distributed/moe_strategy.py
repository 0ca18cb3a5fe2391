"""DTensor sharding strategies of the MoE routing ops (router_topk, permute,
unpermute, unpermute_backward) and the fp8 quantisation ops (quantize_fp8,
dequantize_fp8, swizzle_mx_scale), as upstream writes them
(``register_single_dim_strategy``).

The patch series turns this module, whole, into upstream's
torch/distributed/tensor/_ops/_moe_ops.py (distributed/0002): the ops
become the aten ops of the core series and the checks the meta function's
helpers (compile series). So this module uses DTensor's registry and helpers
only, and reads its arguments by position as upstream's strategies do. The
refusal of placements no rule keeps is this project's, not upstream's (upstream
DTensor redistributes implicitly): strategies.py installs it beside these
rules (placement_guard.py), and the patch carries the rules without it.

Per mesh dimension, besides everything replicated (S a sharding of any
layout, Shard or _StridedShard):

* ``router_topk``: tokens: ``logits`` S(0) -> weights and expert ids S(0),
  ``counts`` Partial (a sum over tokens); ``bias`` replicated.
* ``permute``: hidden: ``tokens`` S(1) -> ``permuted`` S(1); a Partial
  ``tokens`` (permute is linear in it) -> ``permuted`` Partial. Tokens are
  never sharded: the rows are sorted by expert over all tokens.
* ``unpermute``: hidden (S(1)); tokens (``dst_rows``, ``weights`` S(0) ->
  output S(0)); a Partial ``permuted`` -> Partial output.
  ``unpermute_backward`` mirrors it (tokens sharded -> Partial
  ``grad_permuted``).
* ``quantize_fp8`` / ``dequantize_fp8``: along rows (and the batch of 3-D
  inputs) for the recipes whose blocks lie within a row: rowwise,
  blockwise_1x128, mx (not swizzled); the scale follows the data. No Partial:
  a sum of float8 data is not float8 data.
* ``swizzle_mx_scale``: replicated only.
"""

from __future__ import annotations

import torch
from torch._ops import OpOverload
from torch.distributed.tensor._dtensor_spec import TensorMeta
from torch.distributed.tensor._op_schema import ArgsType, KwargsType, RuntimeSchemaInfo
from torch.distributed.tensor._ops.single_dim_strategy import _ShardingPlaceholder, register_single_dim_strategy
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate

from torch_moe_ops import _checks

__all__ = [
    "dequantize_fp8_single_dim_strategy",
    "moe_permute_single_dim_strategy",
    "moe_router_topk_single_dim_strategy",
    "moe_unpermute_backward_single_dim_strategy",
    "moe_unpermute_single_dim_strategy",
    "quantize_fp8_single_dim_strategy",
    "swizzle_mx_scale_single_dim_strategy",
]

_Strategies = list[list[Placement | _ShardingPlaceholder | None]]


def _arg(args_schema: ArgsType, kwargs_schema: KwargsType, index: int, name: str, default=None):
    """An argument given by position or keyword, else its schema default
    (DTensor passes only the arguments the caller gave)."""
    if index < len(args_schema):
        return args_schema[index]
    return kwargs_schema.get(name, default)


def _meta(m: TensorMeta | None) -> torch.Tensor | None:
    """A meta tensor of a DTensor argument's global shape, strides and dtype,
    on which the meta function's checks run unchanged."""
    if m is None:
        return None
    return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")


def _rule(outputs: list, inputs: list) -> list:
    """One rule: the outputs' placements, then those of the tensor inputs
    given; inputs is [(TensorMeta or None, placement)] in schema order, an
    optional input that is None taking no placement."""
    return [*outputs, *(p for m, p in inputs if m is not None)]


# ------------------------------------------------------------------- routing


@register_single_dim_strategy(
    torch.ops.moe_ops.router_topk.default,
    # The checks read k, score_func and the groups; all are in the cache's key.
    schema_info=RuntimeSchemaInfo(
        static_argnum=1,
        static_kwargkey=["k", "score_func", "n_group", "topk_group", "renormalize", "scaling_factor"],
    ),
)
def moe_router_topk_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> _Strategies:
    logits, bias = args_schema[0], _arg(args_schema, kwargs_schema, 3, "bias")
    _checks.check_router_topk_inputs(
        _meta(logits),
        _arg(args_schema, kwargs_schema, 1, "k"),
        _arg(args_schema, kwargs_schema, 2, "score_func", "softmax"),
        _meta(bias),
        _arg(args_schema, kwargs_schema, 4, "n_group", 1),
        _arg(args_schema, kwargs_schema, 5, "topk_group", 1),
    )
    # Each token's selection is its own (the top-k and the normalisation run
    # over the experts of one row); counts is a sum over the tokens.
    shard = _ShardingPlaceholder(0)
    return [_rule([shard, shard, Partial()], [(logits, shard), (bias, Replicate())])]


@register_single_dim_strategy(
    torch.ops.moe_ops.permute.default,
    schema_info=RuntimeSchemaInfo(
        static_argnum=2, static_kwargkey=["num_experts", "alignment", "first_expert", "num_local_experts"]
    ),
)
def moe_permute_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> _Strategies:
    tokens, expert_ids = args_schema[0], args_schema[1]
    _checks.check_permute_inputs(
        _meta(tokens),
        _meta(expert_ids),
        _arg(args_schema, kwargs_schema, 2, "num_experts"),
        _arg(args_schema, kwargs_schema, 3, "alignment", 1),
        _arg(args_schema, kwargs_schema, 4, "first_expert", 0),
        _arg(args_schema, kwargs_schema, 5, "num_local_experts"),
    )
    # permuted is tokens' rows moved (and zero padding): linear in tokens, and
    # each row's hidden slice stays on its rank. The routing outputs
    # (dst_rows, src_rows, offs) depend on expert_ids only: replicated.
    replicate = Replicate()
    return [
        [_ShardingPlaceholder(1), replicate, replicate, replicate, _ShardingPlaceholder(1), replicate],
        [Partial(), replicate, replicate, replicate, Partial(), replicate],
    ]


@register_single_dim_strategy(torch.ops.moe_ops.unpermute.default, schema_info=RuntimeSchemaInfo(static_argnum=3))
def moe_unpermute_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> _Strategies:
    permuted, dst_rows = args_schema[0], args_schema[1]
    weights = _arg(args_schema, kwargs_schema, 2, "weights")
    _checks.check_unpermute_inputs(_meta(permuted), _meta(dst_rows), _meta(weights))
    hidden, tokens = _ShardingPlaceholder(1), _ShardingPlaceholder(0)
    return [
        _rule([hidden], [(permuted, hidden), (dst_rows, Replicate()), (weights, Replicate())]),
        # dst_rows name rows of the whole permuted tensor: it stays replicated.
        _rule([tokens], [(permuted, Replicate()), (dst_rows, tokens), (weights, tokens)]),
        _rule([Partial()], [(permuted, Partial()), (dst_rows, Replicate()), (weights, Replicate())]),
    ]


@register_single_dim_strategy(
    torch.ops.moe_ops.unpermute_backward.default,
    schema_info=RuntimeSchemaInfo(static_argnum=2, static_kwargkey=["num_rows"]),
)
def moe_unpermute_backward_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> _Strategies:
    grad_output, dst_rows = args_schema[0], args_schema[1]
    num_rows = _arg(args_schema, kwargs_schema, 2, "num_rows")
    weights = _arg(args_schema, kwargs_schema, 3, "weights")
    permuted = _arg(args_schema, kwargs_schema, 4, "permuted")
    _checks.check_unpermute_backward_inputs(_meta(grad_output), _meta(dst_rows), num_rows, _meta(weights),
                                            _meta(permuted))
    replicate, hidden, tokens = Replicate(), _ShardingPlaceholder(1), _ShardingPlaceholder(0)

    def grad_weights(p):
        # A (0,) placeholder when permuted is not given.
        return p if permuted is not None else replicate

    def inputs(grad_output_p, dst_rows_p, weights_p, permuted_p) -> list:
        return [(grad_output, grad_output_p), (dst_rows, dst_rows_p), (weights, weights_p), (permuted, permuted_p)]

    return [
        # grad_weights = <grad_output, permuted rows> sums over the hidden size.
        _rule([hidden, grad_weights(Partial())], inputs(hidden, replicate, replicate, hidden)),
        # Each row of permuted belongs to one (token, slot): the rows of other
        # ranks' tokens are zero in a rank's result.
        _rule([Partial(), grad_weights(tokens)], inputs(tokens, tokens, tokens, replicate)),
        _rule([Partial(), grad_weights(Partial())], inputs(Partial(), replicate, replicate, replicate)),
    ]


# ---------------------------------------------------------------- fp8 quantisation

_ROW_RECIPES = ("rowwise", "blockwise_1x128", "mx")


def _fp8_row_strategies(recipe: str, ndim: int, has_offs: bool, swizzle: bool) -> list:
    """[(data placement, scale placement)] for the data's dimensions whose
    shards keep every scale block within a rank."""
    if swizzle:  # the swizzled layout interleaves rows of 128 and scale columns of 4
        return []
    out = []
    if ndim == 3:
        out.append((_ShardingPlaceholder(0), _ShardingPlaceholder(0)))  # the batch: every recipe's scale leads with it
    if recipe in _ROW_RECIPES:
        row = ndim - 2
        if has_offs:  # 2-D x grouped along its columns: rowwise scale (G, R), mx (R, C/32)
            out.append((_ShardingPlaceholder(0), _ShardingPlaceholder(1 if recipe == "rowwise" else 0)))
        else:
            out.append((_ShardingPlaceholder(row), _ShardingPlaceholder(row)))
    return out


@register_single_dim_strategy(
    torch.ops.moe_ops.quantize_fp8.default,
    schema_info=RuntimeSchemaInfo(static_argnum=1, static_kwargkey=["recipe", "float8_dtype", "swizzle"]),
)
def quantize_fp8_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> _Strategies:
    x = args_schema[0]
    recipe = _arg(args_schema, kwargs_schema, 1, "recipe")
    offs = _arg(args_schema, kwargs_schema, 3, "offs")
    swizzle = _arg(args_schema, kwargs_schema, 4, "swizzle", False)
    _checks.check_quantize_fp8_inputs(_meta(x), recipe, _arg(args_schema, kwargs_schema, 2, "float8_dtype"),
                                      _meta(offs), swizzle)
    # offs (group boundaries of the columns) is needed whole by every rank.
    return [
        _rule([data, scale], [(x, data), (offs, Replicate())])
        for data, scale in _fp8_row_strategies(recipe, len(x.shape), offs is not None, swizzle)
    ]


@register_single_dim_strategy(
    torch.ops.moe_ops.dequantize_fp8.default,
    schema_info=RuntimeSchemaInfo(static_argnum=2, static_kwargkey=["recipe", "out_dtype", "swizzle"]),
)
def dequantize_fp8_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> _Strategies:
    data, scale = args_schema[0], args_schema[1]
    recipe = _arg(args_schema, kwargs_schema, 2, "recipe")
    offs = _arg(args_schema, kwargs_schema, 4, "offs")
    swizzle = _arg(args_schema, kwargs_schema, 5, "swizzle", False)
    _checks.check_dequantize_fp8_inputs(_meta(data), _meta(scale), recipe,
                                        _arg(args_schema, kwargs_schema, 3, "out_dtype"), _meta(offs), swizzle)
    return [
        _rule([data_p], [(data, data_p), (scale, scale_p), (offs, Replicate())])
        for data_p, scale_p in _fp8_row_strategies(recipe, len(data.shape), offs is not None, swizzle)
    ]


@register_single_dim_strategy(
    torch.ops.moe_ops.swizzle_mx_scale.default,
    schema_info=RuntimeSchemaInfo(static_argnum=2, static_kwargkey=["dim"]),
)
def swizzle_mx_scale_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> _Strategies:
    _checks.check_swizzle_mx_scale_inputs(
        _meta(args_schema[0]), _meta(args_schema[1]), _arg(args_schema, kwargs_schema, 2, "dim")
    )
    # Replicated only: the blocked layout moves every group's scales by the
    # sizes of the groups before it.
    return []

"""DTensor sharding strategies of the moe_ops ops other than grouped_mm
(grouped_mm_strategy.py), on DTensor's registry.

Per mesh dimension, besides everything replicated:

* ``scaled_grouped_mm``: grouped_mm's shardings, the scales following their
  operand: rowwise in 2D x 3D (N: ``scale_b`` along N; K: scales replicated,
  Partial output), 3D x 3D (G, M, N, K) and 3D x 2D (M, K); blockwise and mx
  in 3D x 3D along G (and M for blockwise and plain mx scales). The rest (2D x
  2D's flattened per-group scales, K blocks of 32 or 128, swizzled layouts)
  is refused.
* ``grouped_mm_gather``: 2D x 3D N and K (Partial); 2D x 2D M and N. The
  indices and offs are replicated (they name rows of the whole operand).
* ``router_topk``: tokens: ``logits`` Shard(0) -> weights and expert ids
  Shard(0), ``counts`` Partial (a sum over tokens).
* ``permute``: hidden: ``tokens`` Shard(1) -> ``permuted`` Shard(1); a Partial
  ``tokens`` (permute is linear in it) -> ``permuted`` Partial.
* ``unpermute``: hidden (Shard(1)); tokens (``dst_rows``, ``weights``
  Shard(0) -> output Shard(0)); a Partial ``permuted`` -> Partial output.
  ``unpermute_backward`` mirrors it (tokens sharded -> Partial
  ``grad_permuted``).
* ``expert_mlp`` (and its backward): the experts' intermediate dimension I
  (tensor parallel experts): ``gate_up_proj`` Shard(2), ``down_proj``
  Shard(1), ``gate_up_bias`` Shard(1) -> Partial output, ``h`` Shard(1); for
  non-gated activations, or gated ones with ``gate_up_interleaved`` and I
  divisible by the mesh size (gate and up columns must land on the same rank).
* ``quantize_fp8`` / ``dequantize_fp8``: along rows (and the batch of 3-D
  inputs) for the recipes whose blocks lie within a row: rowwise,
  blockwise_1x128, mx (not swizzled); the scale follows the data.
* ``swizzle_mx_scale``: replicated only.

A sharded input no strategy keeps raises an error naming it (see
``expand_or_refuse``): tokens sharded into permute or expert_mlp, or the
experts of expert_mlp sharded, need expert parallelism's all-to-all, not a
silent all-gather.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor._op_schema import OpSchema, StrategyType
from torch.distributed.tensor._ops.utils import register_op_strategy
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from torch_moe_ops import _checks

from .grouped_mm_strategy import (
    _BIAS_TWICE,
    _EXPERTS_NEED_DISPATCH,
    _GROUP_BOUNDARIES,
    _GROUPED_MM_DIMS,
    _meta_stand_in,
    _schema_args,
    _static_schema_info,
    expand_or_refuse,
)

__all__ = []

R = Replicate()
ops = torch.ops.moe_ops


def _register(op):
    return register_op_strategy(op, schema_info=_static_schema_info(op))


def _metas(args: dict, names) -> list:
    return [_meta_stand_in(args[n]) for n in names]


_INDEX_REPLICATED = "indices and offs name rows of the whole operands, so every rank needs all of them"
_TOKENS_NEED_DISPATCH = ("the rows are sorted by expert over all tokens, so a rank's tokens do not make a shard of "
                         "the output; dispatch the tokens to the experts' ranks instead (expert parallelism's "
                         "all-to-all)")


# ------------------------------------------------------------ scaled_grouped_mm


@_register(ops.scaled_grouped_mm.default)
def scaled_grouped_mm_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result = _metas(
        args, ["mat_a", "mat_b", "scale_a", "scale_b", "offs", "bias", "scale_result"])
    recipe, _ = _checks.check_scaled_grouped_mm_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result,
                                                      args["out_dtype"])
    layout = _checks.grouped_mm_layout(mat_a, mat_b)
    has_bias = bias is not None
    strategies = [([R], {})]
    why_not = {("offs", 0): "every rank needs every group boundary"}
    k_a, k_b = mat_a.dim() - 1, mat_b.dim() - 2
    scales_follow = ("scale_a and scale_b follow their operand, and a {recipe} scale cannot be split with it this "
                     "way").format(recipe=recipe)
    if recipe == "rowwise":
        if has_bias:
            why_not[("mat_a", k_a)] = why_not[("mat_b", k_b)] = _BIAS_TWICE
        if layout == "2d3d":
            strategies.append(([Shard(1)], {"mat_b": Shard(2), "scale_b": Shard(1), "bias": Shard(1)}))
            why_not[("mat_a", 0)] = why_not[("scale_a", 0)] = _GROUP_BOUNDARIES
            why_not[("mat_b", 0)] = _EXPERTS_NEED_DISPATCH.format(what="rows of mat_a")
        elif layout == "3d2d":
            strategies.append(([Shard(0)], {"mat_a": Shard(1), "scale_a": Shard(1)}))
            why_not[("mat_b", 1)] = _GROUP_BOUNDARIES
            why_not[("mat_a", 0)] = _EXPERTS_NEED_DISPATCH.format(what="columns of mat_b")
        elif layout == "3d3d":
            strategies.append(([Shard(0)], {"mat_a": Shard(0), "mat_b": Shard(0), "scale_a": Shard(0),
                                            "scale_b": Shard(0), "bias": Shard(0)}))
            strategies.append(([Shard(1)], {"mat_a": Shard(1), "scale_a": Shard(1)}))
            strategies.append(([Shard(2)], {"mat_b": Shard(2), "scale_b": Shard(1), "bias": Shard(1)}))
        else:
            for name, dim in [("mat_a", 0), ("mat_b", 1), ("scale_a", 0), ("scale_b", 0)]:
                why_not[(name, dim)] = ("2D x 2D rowwise scales are flattened per group, (G * M,) and (G * N,), so "
                                        "they cannot follow a shard of M or N")
            why_not[("mat_a", 1)] = why_not[("mat_b", 0)] = _GROUP_BOUNDARIES
        if layout != "2d2d" and not has_bias:
            # Rowwise scales are per row of A and column of B: each rank's
            # partial product over its K slice is scaled by the same factors.
            strategies.append(([Partial()], {"mat_a": Shard(k_a), "mat_b": Shard(k_b)}))
    else:
        if layout == "3d3d":
            strategies.append(([Shard(0)], {"mat_a": Shard(0), "mat_b": Shard(0), "scale_a": Shard(0),
                                            "scale_b": Shard(0), "bias": Shard(0)}))
            if scale_a.dim() == 3:  # blockwise (G, M, K/128) or plain mx (G, M, K/32): rows are not blocked
                strategies.append(([Shard(1)], {"mat_a": Shard(1), "scale_a": Shard(1)}))
        for name, p_dim in [("mat_a", k_a), ("mat_b", k_b)]:
            why_not[(name, p_dim)] = (f"{recipe} scales have blocks along K, which a shard of K would cut or "
                                      "misalign")
        why_not.setdefault(("mat_b", mat_b.dim() - 1), scales_follow)
        why_not[("mat_b", 0)] = (_EXPERTS_NEED_DISPATCH.format(what="rows of mat_a") if layout == "2d3d"
                                 else scales_follow)
    dims = dict(_GROUPED_MM_DIMS[layout])
    return expand_or_refuse("scaled_grouped_mm", op_schema, strategies, why_not, dims)


# ------------------------------------------------------------ grouped_mm_gather


@_register(ops.grouped_mm_gather.default)
def grouped_mm_gather_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    mat_a, mat_b, offs, a_index, b_index, bias = _metas(args, ["mat_a", "mat_b", "offs", "a_index", "b_index", "bias"])
    _checks.check_grouped_mm_gather_inputs(mat_a, mat_b, offs, a_index, b_index, bias, args["out_dtype"])
    has_bias = bias is not None
    strategies = [([R], {})]
    why_not = {(n, 0): _INDEX_REPLICATED for n in ("offs", "a_index", "b_index")}
    if mat_b.dim() == 3:  # rows of A gathered: (T, K) x (G, K, N) -> (M, N)
        strategies.append(([Shard(1)], {"mat_b": Shard(2), "bias": Shard(1)}))
        if not has_bias:
            strategies.append(([Partial()], {"mat_a": Shard(1), "mat_b": Shard(1)}))
        else:
            why_not[("mat_a", 1)] = why_not[("mat_b", 1)] = _BIAS_TWICE
        why_not[("mat_a", 0)] = "a_index reads rows of the whole mat_a; " + _INDEX_REPLICATED
        why_not[("mat_b", 0)] = _EXPERTS_NEED_DISPATCH.format(what="gathered rows")
        dims = {"mat_a": ("T (tokens, read through a_index)", "K"), "mat_b": ("G (experts)", "K", "N"),
                "bias": ("G (experts)", "N")}
    else:  # K gathered: (M, T) x (T', N) -> (G, M, N)
        strategies.append(([Shard(1)], {"mat_a": Shard(0)}))
        strategies.append(([Shard(2)], {"mat_b": Shard(1), "bias": Shard(1)}))
        why_not[("mat_a", 1)] = why_not[("mat_b", 0)] = "the indices read the whole K; " + _INDEX_REPLICATED
        dims = {"mat_a": ("M", "K (read through a_index)"), "mat_b": ("K (read through b_index)", "N"),
                "bias": ("G (groups)", "N")}
    return expand_or_refuse("grouped_mm_gather", op_schema, strategies, why_not, dims)


# ------------------------------------------------------------------- routing


@_register(ops.router_topk.default)
def router_topk_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    logits, bias = _metas(args, ["logits", "bias"])
    _checks.check_router_topk_inputs(logits, args["k"], args["score_func"], bias, args["n_group"],
                                     args["topk_group"])
    strategies = [([R, R, R], {}), ([Shard(0), Shard(0), Partial()], {"logits": Shard(0)})]
    why_not = {("logits", 1): "the top-k and the score normalisation run over all experts of a token",
               ("bias", 0): "the selection of every token reads every expert's bias"}
    dims = {"logits": ("T (tokens)", "E (experts)"), "bias": ("E (experts)",)}
    return expand_or_refuse("router_topk", op_schema, strategies, why_not, dims)


@_register(ops.permute.default)
def permute_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    tokens, expert_ids = _metas(args, ["tokens", "expert_ids"])
    _checks.check_permute_inputs(tokens, expert_ids, args["num_experts"], args["alignment"], args["first_expert"],
                                 args["num_local_experts"])
    strategies = [([R, R, R, R], {}), ([Shard(1), R, R, R], {"tokens": Shard(1)}),
                  ([Partial(), R, R, R], {"tokens": Partial()})]
    why_not = {("tokens", 0): _TOKENS_NEED_DISPATCH, ("expert_ids", 0): _TOKENS_NEED_DISPATCH,
               ("expert_ids", 1): "each row's slots are numbered over all its top_k slots"}
    dims = {"tokens": ("T (tokens)", "H (hidden)"), "expert_ids": ("T (tokens)", "top_k")}
    return expand_or_refuse("permute", op_schema, strategies, why_not, dims)


_UNPERMUTE_DIMS = {"permuted": ("R (expert-sorted rows)", "H (hidden)"), "dst_rows": ("T (tokens)", "top_k"),
                   "weights": ("T (tokens)", "top_k"), "grad_output": ("T (tokens)", "H (hidden)")}
_ROWS_OF_ALL = "dst_rows name rows of the whole permuted tensor, so every rank needs all its rows"


@_register(ops.unpermute.default)
def unpermute_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    permuted, dst_rows, weights = _metas(args, ["permuted", "dst_rows", "weights"])
    _checks.check_unpermute_inputs(permuted, dst_rows, weights)
    strategies = [([R], {}), ([Shard(1)], {"permuted": Shard(1)}),
                  ([Shard(0)], {"dst_rows": Shard(0), "weights": Shard(0)}),
                  ([Partial()], {"permuted": Partial()})]
    why_not = {("permuted", 0): _ROWS_OF_ALL, ("dst_rows", 1): "a token's slots are summed together",
               ("weights", 1): "a token's slots are summed together"}
    return expand_or_refuse("unpermute", op_schema, strategies, why_not, _UNPERMUTE_DIMS)


@_register(ops.unpermute_backward.default)
def unpermute_backward_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    has_perm = args["permuted"] is not None
    # grad_weights is a (0,) placeholder when permuted is not given.
    gw = lambda p: p if has_perm else R  # noqa: E731
    strategies = [([R, R], {}),
                  # grad_weights = <grad_output, permuted rows> sums over H.
                  ([Shard(1), gw(Partial())], {"grad_output": Shard(1), "permuted": Shard(1)}),
                  # Each row of permuted belongs to one (token, slot): the
                  # rows of other ranks' tokens are zero in a rank's result.
                  ([Partial(), gw(Shard(0))], {"grad_output": Shard(0), "dst_rows": Shard(0), "weights": Shard(0)}),
                  ([Partial(), gw(Partial())], {"grad_output": Partial()})]
    why_not = {("permuted", 0): _ROWS_OF_ALL}
    return expand_or_refuse("unpermute_backward", op_schema, strategies, why_not, _UNPERMUTE_DIMS)


# ---------------------------------------------------------------- expert_mlp


def _expert_mlp_tp(op_schema: OpSchema, args: dict, gate_up_proj, down_proj) -> tuple[bool, str]:
    """Whether I (the intermediate dimension) can be sharded, and why not."""
    activation, interleaved = args["activation"], args["gate_up_interleaved"]
    if args["down_bias"] is not None:
        return False, ("with I sharded the output is a Partial sum and every rank would add down_bias; add it "
                       "after the reduction")
    if activation not in _checks.GATED_ACTIVATIONS:
        return True, ""
    if not interleaved:
        return False, (f'the gated activation "{activation}" pairs column i of the gate half with column i of the '
                       "up half of N1 = 2I, which a Shard of N1 puts on different ranks; store gate and up "
                       "interleaved (gate_up_interleaved=True)")
    mesh = op_schema.get_mesh_from_args()
    inter = down_proj.shape[1]
    if inter % mesh.size() != 0:
        return False, (f"with gate_up_interleaved the (gate, up) pairs stay on one rank only when I={inter} is "
                       f"divisible by the mesh size {mesh.size()}")
    return True, ""


_EXPERT_MLP_DIMS = {"tokens": ("T (tokens)", "H (hidden)"), "dst_rows": ("T (tokens)", "top_k"),
                    "weights": ("T (tokens)", "top_k"), "src_rows": ("R (rows)",), "offs": ("E (experts)",),
                    "gate_up_proj": ("E (experts)", "H (hidden)", "N1 (gate/up)"),
                    "down_proj": ("E (experts)", "I (intermediate)", "H (hidden)"),
                    "gate_up_bias": ("E (experts)", "N1 (gate/up)"), "down_bias": ("E (experts)", "H (hidden)"),
                    "h": ("R (rows)", "N1 (gate/up)"), "grad_out": ("T (tokens)", "H (hidden)")}


def _expert_mlp_why_not(tp_reason: str) -> dict:
    experts = _EXPERTS_NEED_DISPATCH.format(what="tokens")
    why_not = {(n, 0): experts for n in ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias", "offs")}
    why_not.update({(n, 0): _TOKENS_NEED_DISPATCH for n in ("tokens", "dst_rows", "weights", "src_rows", "grad_out",
                                                            "h")})
    why_not.update({("gate_up_proj", 1): "H is the up-projection's contraction and the down-projection's output",
                    ("down_proj", 2): "H is the up-projection's contraction and the down-projection's output",
                    ("tokens", 1): "H is the up-projection's contraction and the down-projection's output"})
    if tp_reason:
        for key in [("gate_up_proj", 2), ("down_proj", 1), ("gate_up_bias", 1), ("h", 1)]:
            why_not[key] = tp_reason
    return why_not


@_register(ops.expert_mlp.default)
def expert_mlp_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    names = ["tokens", "src_rows", "offs", "dst_rows", "weights", "gate_up_proj", "down_proj", "gate_up_bias",
             "down_bias"]
    metas = dict(zip(names, _metas(args, names)))
    _checks.check_expert_mlp_inputs(*metas.values(), args["activation"], args["gate_up_interleaved"])
    strategies = [([R, R], {})]
    tp, reason = _expert_mlp_tp(op_schema, args, metas["gate_up_proj"], metas["down_proj"])
    if tp:
        strategies.append(([Partial(), Shard(1)],
                           {"gate_up_proj": Shard(2), "down_proj": Shard(1), "gate_up_bias": Shard(1)}))
    return expand_or_refuse("expert_mlp", op_schema, strategies, _expert_mlp_why_not(reason), _EXPERT_MLP_DIMS)


@_register(ops.expert_mlp_backward.default)
def expert_mlp_backward_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    names = ["tokens", "src_rows", "offs", "dst_rows", "weights", "gate_up_proj", "down_proj", "gate_up_bias",
             "down_bias"]
    metas = dict(zip(names, _metas(args, names)))
    _checks.check_expert_mlp_inputs(*metas.values(), args["activation"], args["gate_up_interleaved"])
    need_tokens, need_weights, need_gate_up, need_down = args["output_mask"]
    has = lambda n: args[n] is not None  # noqa: E731
    # Outputs not asked for are (0,) placeholders: replicated.
    on = lambda cond, p: p if cond else R  # noqa: E731
    strategies = [([R] * 6, {})]
    tp, reason = _expert_mlp_tp(op_schema, args, metas["gate_up_proj"], metas["down_proj"])
    if tp:
        # Every gradient but the weights' is linear in the I slices: tokens and
        # routing weights get Partial sums, the sharded weights their shards.
        strategies.append(([on(need_tokens, Partial()), on(need_weights and has("weights"), Partial()),
                            on(need_gate_up, Shard(2)), on(need_down, Shard(1)),
                            on(need_gate_up and has("gate_up_bias"), Shard(1)), R],
                           {"gate_up_proj": Shard(2), "down_proj": Shard(1), "gate_up_bias": Shard(1),
                            "h": Shard(1)}))
    return expand_or_refuse("expert_mlp_backward", op_schema, strategies, _expert_mlp_why_not(reason),
                            _EXPERT_MLP_DIMS)


# ---------------------------------------------------------------- fp8 quantisation

_ROW_RECIPES = ("rowwise", "blockwise_1x128", "mx")


def _fp8_row_strategies(recipe: str, ndim: int, has_offs: bool, swizzle: bool) -> list:
    """[(data placement, scale placement)] for the data's dimensions whose
    shards keep every scale block within a rank."""
    if swizzle:
        return []
    out = []
    if ndim == 3:
        out.append((Shard(0), Shard(0)))  # the batch: every recipe's scale leads with it
    if recipe in _ROW_RECIPES:
        row = ndim - 2
        if has_offs:  # 2-D x grouped along C: rowwise scale (G, R), mx (R, C/32)
            out.append((Shard(0), Shard(1) if recipe == "rowwise" else Shard(0)))
        else:
            out.append((Shard(row), Shard(row)))
    return out


def _fp8_why_not(op: str, data_name: str, recipe: str, ndim: int, swizzle: bool) -> dict:
    if swizzle:
        reason = "the swizzled scale layout interleaves rows of 128 and scale columns of 4"
    elif recipe == "tensorwise":
        reason = "a tensorwise scale is the amax over the whole (batch entry of the) tensor"
    else:
        reason = f"{recipe} scale blocks run along this dimension"
    why_not = {(data_name, d): reason for d in range(ndim)}
    why_not.update({("scale", d): reason for d in range(ndim)})
    why_not[(data_name, ndim - 1)] = why_not[("scale", ndim - 1)] = (
        f"{recipe} scale blocks run along the last dimension" if recipe != "tensorwise" else reason)
    why_not[("offs", 0)] = "every rank needs every group boundary"
    return why_not


@_register(ops.quantize_fp8.default)
def quantize_fp8_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    x, offs = _metas(args, ["x", "offs"])
    recipe, swizzle = args["recipe"], args["swizzle"]
    _checks.check_quantize_fp8_inputs(x, recipe, args["float8_dtype"], offs, swizzle)
    strategies = [([R, R], {})]
    for data_p, scale_p in _fp8_row_strategies(recipe, x.dim(), offs is not None, swizzle):
        strategies.append(([data_p, scale_p], {"x": data_p}))
    return expand_or_refuse("quantize_fp8", op_schema, strategies, _fp8_why_not("quantize_fp8", "x", recipe, x.dim(),
                                                                               swizzle), {})


@_register(ops.dequantize_fp8.default)
def dequantize_fp8_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    data, scale, offs = _metas(args, ["data", "scale", "offs"])
    recipe, swizzle = args["recipe"], args["swizzle"]
    _checks.check_dequantize_fp8_inputs(data, scale, recipe, args["out_dtype"], offs, swizzle)
    strategies = [([R], {})]
    for data_p, scale_p in _fp8_row_strategies(recipe, data.dim(), offs is not None, swizzle):
        strategies.append(([data_p], {"data": data_p, "scale": scale_p}))
    return expand_or_refuse("dequantize_fp8", op_schema, strategies,
                            _fp8_why_not("dequantize_fp8", "data", recipe, data.dim(), swizzle), {})


@_register(ops.swizzle_mx_scale.default)
def swizzle_mx_scale_strategy(op_schema: OpSchema) -> StrategyType:
    args = _schema_args(op_schema)
    scale, offs = _metas(args, ["scale", "offs"])
    _checks.check_swizzle_mx_scale_inputs(scale, offs, args["dim"])
    reason = "the blocked layout moves every group's scales by the sizes of the groups before it"
    why_not = {("scale", 0): reason, ("scale", 1): reason, ("offs", 0): "every rank needs every group boundary"}
    return expand_or_refuse("swizzle_mx_scale", op_schema, [([R], {})], why_not, {})

"""DTensor sharding strategies of the moe_ops ops that stay in this project
(grouped_mm_gather, expert_mlp and its backward), and the refusal of
placements no rule keeps, for every op (placement_guard.py).

The strategies of the ops that go upstream are written as upstream writes
them, each in the module the patch series carries: grouped_mm_strategy.py
(grouped_mm), scaled_grouped_mm_strategy.py, moe_strategy.py (routing and
fp8 quantisation ops). This module imports them, so that every rule is
registered before the guard wraps it.

Per mesh dimension, besides everything replicated (S a sharding of any
layout, Shard or _StridedShard, where every layout is correct; Shard where
only contiguous chunks are):

* ``grouped_mm_gather``: 2D x 3D N and K (Partial); 2D x 2D M and N; a
  Partial operand gives a Partial output (the gather is linear). Indices and
  offs replicated (they name rows of the whole operands).
* ``expert_mlp`` (and its backward): the experts' intermediate dimension I
  (tensor parallel experts): ``gate_up_proj`` Shard(2), ``down_proj``
  Shard(1), ``gate_up_bias`` Shard(1), ``down_bias`` Partial -> Partial
  output, ``h`` Shard(1); for non-gated activations, or gated ones with
  ``gate_up_interleaved`` when the shards split I evenly (a full-mesh filter:
  each (gate, up) column pair must land on one rank).

Each op's ``_explain_*`` gives the reasons of the refusals: tokens sharded
into permute or expert_mlp, or the experts of the 2D grouped GEMMs or of
expert_mlp sharded, need expert parallelism's all-to-all, not a silent
all-gather.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor._ops.single_dim_strategy import _ShardingPlaceholder, register_single_dim_strategy
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from torch_moe_ops import _checks

# Registered on import, before the guard wraps them.
from . import grouped_mm_strategy, moe_strategy, scaled_grouped_mm_strategy  # noqa: F401
from .placement_guard import guard_placements, meta_tensor, named_args, static_schema_info

__all__ = []

R = Replicate()
P = Partial()
S = _ShardingPlaceholder
ops = torch.ops.moe_ops


def _register(op, **kwargs):
    return register_single_dim_strategy(op, schema_info=static_schema_info(op), **kwargs)


def _args(op, args_schema, kwargs_schema, tensors) -> tuple[dict, dict]:
    """(every argument by name, meta tensors of the tensor ones named)."""
    args = named_args(op, args_schema, kwargs_schema)
    return args, {n: meta_tensor(args[n]) for n in tensors}


class _Rule:
    """Builds one rule: outputs, then the tensor inputs present, in schema
    order; inputs not named are Replicate."""

    def __init__(self, args: dict, inputs: list[str]):
        self.inputs = [n for n in inputs if args[n] is not None]

    def __call__(self, outputs: list, **placements) -> list:
        return list(outputs) + [placements.get(n, R) for n in self.inputs]


_EXPERTS_NEED_DISPATCH = (
    "each rank would need the {what} of its own experts and their offs, which a Shard of the global tensors does "
    "not give; dispatch the tokens to the experts' ranks first (expert parallelism's all-to-all)")
_GROUP_BOUNDARIES = "offs splits this dimension into groups, so a group boundary would fall between ranks"
_BIAS_TWICE = ("with K sharded, or an operand Partial, the output is a Partial sum and every rank would add the "
               "bias; place the bias Partial() too (e.g. DTensor.from_local with the bias on one rank and zeros on "
               "the others) or add it after the reduction")
_OFFS_REPLICATED = "every rank needs every group boundary"
_INDEX_REPLICATED = "indices and offs name rows of the whole operands, so every rank needs all of them"
_TOKENS_NEED_DISPATCH = ("the rows are sorted by expert over all tokens, so a rank's tokens do not make a shard of "
                         "the output; dispatch the tokens to the experts' ranks instead (expert parallelism's "
                         "all-to-all)")


# ---------------------------------------------------------------- grouped_mm

_GROUPED_MM_DIMS = {
    "2d3d": {"mat_a": ("M (rows, grouped by offs)", "K"), "mat_b": ("G (experts)", "K", "N"),
             "bias": ("G (experts)", "N")},
    "3d2d": {"mat_a": ("G (experts)", "M", "K"), "mat_b": ("K", "N (columns, grouped by offs)"),
             "bias": ("G (experts)", "N")},
    "2d2d": {"mat_a": ("M", "K (grouped by offs)"), "mat_b": ("K (grouped by offs)", "N"),
             "bias": ("G (groups)", "N")},
    "3d3d": {"mat_a": ("G (experts)", "M", "K"), "mat_b": ("G (experts)", "K", "N"), "bias": ("G (experts)", "N")},
}


def _grouped_mm_why_not(layout: str) -> dict:
    why_not = {("offs", 0): _OFFS_REPLICATED, ("bias", "partial"): _BIAS_TWICE}
    if layout == "2d3d":
        why_not[("mat_a", 0)] = _GROUP_BOUNDARIES
        why_not[("mat_b", 0)] = why_not[("bias", 0)] = _EXPERTS_NEED_DISPATCH.format(what="rows of mat_a")
    elif layout == "3d2d":
        why_not[("mat_b", 1)] = why_not[("bias", 1)] = _GROUP_BOUNDARIES
        why_not[("mat_a", 0)] = why_not[("bias", 0)] = _EXPERTS_NEED_DISPATCH.format(what="columns of mat_b")
    elif layout == "2d2d":
        why_not[("mat_a", 1)] = why_not[("mat_b", 0)] = _GROUP_BOUNDARIES
        why_not[("bias", 0)] = "every group's output reads all of mat_a and mat_b along K, split by offs"
    return why_not


def _explain_grouped_mm(args: dict):
    layout = f"{len(args['mat_a'].shape)}d{len(args['mat_b'].shape)}d"
    return _grouped_mm_why_not(layout), _GROUPED_MM_DIMS[layout]


# ------------------------------------------------------------ scaled_grouped_mm

_SCALED_INPUTS = ["mat_a", "mat_b", "scale_a", "scale_b", "offs", "bias", "scale_result"]


def _explain_scaled_grouped_mm(args: dict):
    m = {n: meta_tensor(args[n]) for n in _SCALED_INPUTS}
    recipe, _ = _checks.check_scaled_grouped_mm_inputs(*(m[n] for n in _SCALED_INPUTS), args["out_dtype"])
    layout = _checks.grouped_mm_layout(m["mat_a"], m["mat_b"])
    why_not = _grouped_mm_why_not(layout)
    k_a, k_b = m["mat_a"].dim() - 1, m["mat_b"].dim() - 2
    follow = (f"scale_a and scale_b follow their operand, and a {recipe} scale cannot be split with it this way")
    if recipe == "rowwise":
        why_not[("scale_a", 0)] = why_not.get(("mat_a", 0), follow)
        if layout == "2d2d":
            for name, dim in [("mat_a", 0), ("mat_b", 1), ("scale_a", 0), ("scale_b", 0)]:
                why_not[(name, dim)] = ("2D x 2D rowwise scales are flattened per group, (G * M,) and (G * N,), so "
                                        "they cannot follow a shard of M or N")
    else:
        for name, dim in [("mat_a", k_a), ("mat_b", k_b)]:
            why_not[(name, dim)] = f"{recipe} scales have blocks along K, which a shard of K would cut or misalign"
        why_not.setdefault(("mat_b", m["mat_b"].dim() - 1), follow)
        if layout != "2d3d":
            why_not[("mat_b", 0)] = follow
    return why_not, _GROUPED_MM_DIMS[layout]


def _explain_scaled_grouped_mm_v2(args: dict):
    """v1's reasons (its rules are v2's, see scaled_grouped_mm_v2_single_dim_strategy), the scales named as
    the elements of v2's scale lists."""
    v1 = dict(mat_a=args["self"], mat_b=args["mat2"], scale_a=args["scale_a"][0], scale_b=args["scale_b"][0],
              offs=args["offs"], bias=args["bias"], scale_result=None, out_dtype=args["out_dtype"])
    why_not, dims = _explain_scaled_grouped_mm(v1)
    listed = {"scale_a": "scale_a[0]", "scale_b": "scale_b[0]"}
    why_not = {(listed.get(name, name), dim): reason for (name, dim), reason in why_not.items()}
    return why_not, {listed.get(name, name): d for name, d in dims.items()}


# ------------------------------------------------------------ grouped_mm_gather

_GATHER_INPUTS = ["mat_a", "mat_b", "offs", "a_index", "b_index", "bias"]


@_register(ops.grouped_mm_gather.default)
def grouped_mm_gather_single_dim_strategy(op, args_schema, kwargs_schema):
    args, m = _args(op, args_schema, kwargs_schema, _GATHER_INPUTS)
    _checks.check_grouped_mm_gather_inputs(*(m[n] for n in _GATHER_INPUTS), args["out_dtype"])
    rule = _Rule(args, _GATHER_INPUTS)
    # The gather is linear (a -1 index reads zeros): as grouped_mm, a Partial
    # operand gives a Partial output, the bias Partial with it.
    strategies = [rule([P], mat_a=P, bias=P), rule([P], mat_b=P, bias=P)]
    if m["mat_b"].dim() == 3:  # rows of A gathered: (T, K) x (G, K, N) -> (M, N)
        strategies += [rule([S(1)], mat_b=S(2), bias=S(1)), rule([P], mat_a=S(1), mat_b=S(1), bias=P)]
    else:  # K gathered: (M, T) x (T', N) -> (G, M, N)
        strategies += [rule([S(1)], mat_a=S(0)), rule([S(2)], mat_b=S(1), bias=S(1))]
    return strategies


def _explain_grouped_mm_gather(args: dict):
    why_not = {(n, 0): _INDEX_REPLICATED for n in ("offs", "a_index", "b_index")}
    why_not[("bias", "partial")] = _BIAS_TWICE
    if len(args["mat_b"].shape) == 3:
        why_not[("mat_a", 0)] = "a_index reads rows of the whole mat_a; " + _INDEX_REPLICATED
        why_not[("mat_b", 0)] = _EXPERTS_NEED_DISPATCH.format(what="gathered rows")
        dims = {"mat_a": ("T (tokens, read through a_index)", "K"), "mat_b": ("G (experts)", "K", "N"),
                "bias": ("G (experts)", "N")}
    else:
        why_not[("mat_a", 1)] = why_not[("mat_b", 0)] = "the indices read the whole K; " + _INDEX_REPLICATED
        dims = {"mat_a": ("M", "K (read through a_index)"), "mat_b": ("K (read through b_index)", "N"),
                "bias": ("G (groups)", "N")}
    return why_not, dims


# ------------------------------------------------------------------- routing


def _explain_router_topk(args: dict):
    why_not = {("logits", 1): "the top-k and the score normalisation run over all experts of a token",
               ("bias", 0): "the selection of every token reads every expert's bias"}
    return why_not, {"logits": ("T (tokens)", "E (experts)"), "bias": ("E (experts)",)}


def _explain_permute(args: dict):
    why_not = {("tokens", 0): _TOKENS_NEED_DISPATCH, ("expert_ids", 0): _TOKENS_NEED_DISPATCH,
               ("expert_ids", 1): "each row's slots are numbered over all its top_k slots"}
    return why_not, {"tokens": ("T (tokens)", "H (hidden)"), "expert_ids": ("T (tokens)", "top_k")}


_UNPERMUTE_DIMS = {"permuted": ("R (expert-sorted rows)", "H (hidden)"), "dst_rows": ("T (tokens)", "top_k"),
                   "weights": ("T (tokens)", "top_k"), "grad_output": ("T (tokens)", "H (hidden)")}
_ROWS_OF_ALL = "dst_rows name rows of the whole permuted tensor, so every rank needs all its rows"


def _explain_unpermute(args: dict):
    why_not = {("permuted", 0): _ROWS_OF_ALL, ("dst_rows", 1): "a token's slots are summed together",
               ("weights", 1): "a token's slots are summed together"}
    return why_not, _UNPERMUTE_DIMS


# ---------------------------------------------------------------- expert_mlp

_EXPERT_MLP_INPUTS = ["tokens", "src_rows", "offs", "dst_rows", "weights", "gate_up_proj", "down_proj",
                      "gate_up_bias", "down_bias"]


def _expert_mlp_i_reason(args: dict) -> str:
    """Why I cannot be sharded at all for these arguments ("" if it can)."""
    activation = args["activation"]
    if activation in _checks.GATED_ACTIVATIONS and not args["gate_up_interleaved"]:
        return (f'the gated activation "{activation}" pairs column i of the gate half with column i of the up half '
                "of N1 = 2I, which a Shard of N1 puts on different ranks; store gate and up interleaved "
                "(gate_up_interleaved=True)")
    return ""


def _expert_mlp_pairs_on_one_rank(mesh, op_schema, input_specs, output_specs) -> bool:
    """With gate_up_interleaved, each rank's slice of I must be whole (gate, up)
    column pairs: I must divide evenly among the shards of down_proj's I."""
    args = named_args(op_schema.op, op_schema.args_meta, op_schema.kwargs_meta)
    if args["activation"] not in _checks.GATED_ACTIVATIONS:
        return True
    names = [a.name for a in op_schema.op._schema.arguments]
    present = [n for i, n in enumerate(names) if i < len(op_schema.args_schema)
               and hasattr(op_schema.args_schema[i], "strategies")]
    present += [n for n, v in op_schema.kwargs_schema.items() if hasattr(v, "strategies")]
    down = input_specs[present.index("down_proj")]
    shards = 1
    for mesh_dim, p in enumerate(down.placements):
        if isinstance(p, Shard) and p.dim == 1:
            shards *= mesh.size(mesh_dim)
    return down.tensor_meta.shape[1] % shards == 0


def _expert_mlp_rules(args: dict, outputs: list, names: list, backward: bool) -> list:
    """The I-sharded rule(s): concrete Shards, since the (gate, up) pairs stay
    together in contiguous chunks only."""
    if _expert_mlp_i_reason(args):
        return []
    rule = _Rule(args, names)
    tp = dict(gate_up_proj=Shard(2), down_proj=Shard(1), gate_up_bias=Shard(1), down_bias=P)
    if backward:
        # down_bias stays Partial: the routing weights' gradient adds
        # <grad_out, down_bias[e]> to a Partial sum, once over the ranks.
        tp["h"] = Shard(1)
    return [rule(outputs, **tp)]


@_register(ops.expert_mlp.default, full_mesh_strategy_filter=_expert_mlp_pairs_on_one_rank)
def expert_mlp_single_dim_strategy(op, args_schema, kwargs_schema):
    args, m = _args(op, args_schema, kwargs_schema, _EXPERT_MLP_INPUTS)
    _checks.check_expert_mlp_inputs(*(m[n] for n in _EXPERT_MLP_INPUTS), args["activation"],
                                    args["gate_up_interleaved"])
    # I sharded: the down projection sums over I, so the output is a Partial
    # sum (down_bias Partial, added once); h, the up projection's output, is
    # sharded along its columns.
    return _expert_mlp_rules(args, [P, Shard(1)], _EXPERT_MLP_INPUTS, backward=False)


@_register(ops.expert_mlp_backward.default, full_mesh_strategy_filter=_expert_mlp_pairs_on_one_rank)
def expert_mlp_backward_single_dim_strategy(op, args_schema, kwargs_schema):
    names = ["grad_out"] + _EXPERT_MLP_INPUTS + ["h"]
    args, m = _args(op, args_schema, kwargs_schema, names)
    _checks.check_expert_mlp_inputs(*(m[n] for n in _EXPERT_MLP_INPUTS), args["activation"],
                                    args["gate_up_interleaved"])
    need_tokens, need_weights, need_gate_up, need_down = args["output_mask"]
    # Outputs not asked for are (0,) placeholders: replicated.
    on = lambda cond, p: p if cond else R  # noqa: E731
    # The gradients are sums over the I slices (tokens, routing weights:
    # Partial) or the slices' own (the sharded weights); down_bias's gradient
    # does not depend on I: every rank has all of it.
    outputs = [on(need_tokens, P), on(need_weights and args["weights"] is not None, P), on(need_gate_up, Shard(2)),
               on(need_down, Shard(1)), on(need_gate_up and args["gate_up_bias"] is not None, Shard(1)), R]
    return _expert_mlp_rules(args, outputs, names, backward=True)


def _explain_expert_mlp(args: dict):
    experts = _EXPERTS_NEED_DISPATCH.format(what="tokens")
    why_not = {(n, 0): experts for n in ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias", "offs")}
    why_not.update({(n, 0): _TOKENS_NEED_DISPATCH for n in ("tokens", "dst_rows", "weights", "src_rows", "grad_out",
                                                            "h")})
    h_reason = "H is the up-projection's contraction and the down-projection's output"
    why_not.update({("gate_up_proj", 1): h_reason, ("down_proj", 2): h_reason, ("tokens", 1): h_reason,
                    ("down_bias", "partial"): ("with I sharded the output is a Partial sum and every rank would add "
                                               "down_bias; place it Partial() too or add it after the reduction")})
    reason = _expert_mlp_i_reason(args)
    if reason:
        for key in [("gate_up_proj", 2), ("down_proj", 1), ("gate_up_bias", 1), ("h", 1)]:
            why_not[key] = reason
    dims = {"tokens": ("T (tokens)", "H (hidden)"), "dst_rows": ("T (tokens)", "top_k"),
            "weights": ("T (tokens)", "top_k"), "src_rows": ("R (rows)",), "offs": ("E (experts)",),
            "gate_up_proj": ("E (experts)", "H (hidden)", "N1 (gate/up)"),
            "down_proj": ("E (experts)", "I (intermediate)", "H (hidden)"),
            "gate_up_bias": ("E (experts)", "N1 (gate/up)"), "down_bias": ("E (experts)", "H (hidden)"),
            "h": ("R (rows)", "N1 (gate/up)"), "grad_out": ("T (tokens)", "H (hidden)")}
    return why_not, dims


# ---------------------------------------------------------------- fp8 quantisation

def _explain_fp8(data_name: str):
    def explain(args: dict):
        recipe, swizzle = args["recipe"], args["swizzle"]
        ndim = len(args[data_name].shape)
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
        why_not[("offs", 0)] = _OFFS_REPLICATED
        return why_not, {}
    return explain


def _explain_swizzle_mx_scale(args: dict):
    reason = "the blocked layout moves every group's scales by the sizes of the groups before it"
    return {("scale", 0): reason, ("scale", 1): reason, ("offs", 0): _OFFS_REPLICATED}, {}


def _explain_unpermute_backward(args: dict):
    return {("permuted", 0): _ROWS_OF_ALL}, _UNPERMUTE_DIMS


for _op, _explain in [
    (ops.grouped_mm.default, _explain_grouped_mm),
    (ops.scaled_grouped_mm.default, _explain_scaled_grouped_mm),
    (ops.scaled_grouped_mm_v2.default, _explain_scaled_grouped_mm_v2),
    (ops.grouped_mm_gather.default, _explain_grouped_mm_gather),
    (ops.router_topk.default, _explain_router_topk),
    (ops.permute.default, _explain_permute),
    (ops.unpermute.default, _explain_unpermute),
    (ops.unpermute_backward.default, _explain_unpermute_backward),
    (ops.expert_mlp.default, _explain_expert_mlp),
    (ops.expert_mlp_backward.default, _explain_expert_mlp),
    (ops.quantize_fp8.default, _explain_fp8("x")),
    (ops.dequantize_fp8.default, _explain_fp8("data")),
    (ops.swizzle_mx_scale.default, _explain_swizzle_mx_scale),
]:
    # v2's schema names its operands self and mat2; its errors name them mat_a and mat_b.
    guard_placements(_op, _explain, {"self": "mat_a", "mat2": "mat_b"} if _op == ops.scaled_grouped_mm_v2.default
                     else None)

"""DeepSeek-V3's group-limited selection, for the router rewrite (router.py): the experts of the
topk_group best groups (a group ranked by the sum of its two best choice keys) stay eligible, the
others are masked to -inf before the top-k. The router's matcher reads it off the choice it selects on
and passes n_group and topk_group to ``moe_ops::router_topk``; without a match the router is
ungrouped (n_group = 1).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch.fx as fx

from . import _fx
from ._fx import arg, getitem_users, is_op


def match_group_limit(choice: fx.Node, experts: int) -> Optional[tuple]:
    """DeepSeek-V3's group-limited selection (transformers' DeepseekV3TopkRouter):
    group_scores = choice.view(-1, G, E / G).topk(2, -1)[0].sum(-1); keep = topk(group_scores, topk_group)[1];
    mask = zeros_like(group_scores).scatter_(1, keep, 1) broadcast to the experts;
    choice.masked_fill(~mask.bool(), -inf). -> (choice, G, topk_group, region). Masking with anything
    but -inf (older code used 0) is not the op's rule and does not match."""
    if not (is_op(choice, "masked_fill") or (choice.op == "call_method" and choice.target == "masked_fill")):
        return None
    if len(choice.args) != 3 or choice.args[2] != float("-inf"):
        return None
    base, inv = choice.args[0], choice.args[1]
    if not (isinstance(inv, fx.Node) and inv.op == "call_function" and inv.target is operator.invert):
        return None
    as_bool = inv.args[0]
    if not (isinstance(as_bool, fx.Node) and as_bool.op == "call_method" and as_bool.target == "bool"):
        return None
    mask = as_bool.args[0]
    if not ((is_op(mask, "reshape") or is_op(mask, "view")) and tuple(mask.args[1:]) == (-1, experts)):
        return None
    exp = mask.args[0]
    if not is_op(exp, "expand") or len(exp.args) != 4:
        return None
    n_group, size = exp.args[2], exp.args[3]
    if not (isinstance(n_group, int) and isinstance(size, int) and n_group * size == experts and size >= 2):
        return None
    uns = exp.args[0]
    if not (is_op(uns, "unsqueeze") and arg(uns, 1, "dim") == -1):
        return None
    gm = uns.args[0]
    if not is_op(gm, "zeros_like") or len(gm.args) != 1 or gm.kwargs:
        return None
    writes = [u for u in gm.users if u is not uns]
    if len(writes) != 1 or not (writes[0].op == "call_method" and writes[0].target == "scatter_"
                                and len(writes[0].args) == 4 and writes[0].args[1] == 1 and writes[0].args[3] == 1):
        return None
    sc = writes[0]
    keep = sc.args[2]
    if not (is_op(keep, "getitem") and keep.args[1] == 1 and is_op(keep.args[0], "topk")):
        return None
    tk_g = keep.args[0]
    gscores = tk_g.args[0]
    topk_group = arg(tk_g, 1, "k")
    if gscores is not gm.args[0] or not isinstance(topk_group, int) or not arg(tk_g, 3, "largest", True) \
            or not _fx.is_last_dim(arg(tk_g, 2, "dim", -1), 2):
        return None
    if not (is_op(gscores, "sum") and _fx.is_last_dim(arg(gscores, 1, "dim"), 3)
            and not arg(gscores, 2, "keepdim", False)):
        return None
    top2 = gscores.args[0]
    if not (is_op(top2, "getitem") and top2.args[1] == 0 and is_op(top2.args[0], "topk")):
        return None
    tk2 = top2.args[0]
    if arg(tk2, 1, "k") != 2 or not _fx.is_last_dim(arg(tk2, 2, "dim", -1), 3) or not arg(tk2, 3, "largest", True):
        return None
    grouped = tk2.args[0]
    if not ((is_op(grouped, "view") or is_op(grouped, "reshape")) and grouped.args[0] is base
            and tuple(grouped.args[1:]) == (-1, n_group, size)):
        return None
    region = [choice, inv, as_bool, mask, exp, uns, gm, sc, keep, tk_g, gscores, top2, tk2, grouped]
    if any(len(n.users) != 1 for n in (inv, as_bool, mask, exp, uns, keep, top2, grouped)) or len(gscores.users) != 2:
        return None
    if getitem_users(tk2) is None or getitem_users(tk_g) is None:
        return None
    return base, n_group, topk_group, region

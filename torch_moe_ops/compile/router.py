"""Router rewrite (pre-grad): a stock router's score function and top-k -> ``moe_ops::router_topk``.

scores = softmax(logits, -1) | sigmoid(logits); choice = scores [+ bias] [group-limited as DeepSeek-V3];
ids = topk(choice, k)[1]; weights = topk[0] (no bias) | scores.gather(-1, ids); [weights / (sum + eps)];
[* scale] becomes one op call whose weights and ids replace the stock ones. It runs on Dynamo's graph,
before AOT autograd, so the op's own backward (the weights' gradient through the score function) comes
with it. It applies only where the op computes what the stock code does: scores in fp32 (or fp64),
-inf for masked groups, an epsilon that vanishes in fp32. Exact ties are the exception no graph can
rule out: the op takes the lower expert id, where torch.topk leaves the order of equal values
unspecified. Tied experts score the same, so the weights are eager's but the ids can differ; all-zero
logits (a padding token's zero hidden state, a zero-initialised router) tie every expert.
With 16-bit scores (a bf16 gate outside an fp32 autocast region, e.g. torchtitan on CPU, where an
fp32 autocast is a no-op) the stock top-k selects on rounded scores and breaks their ties by index,
where the op selects on the fp32 scores: the two pick different experts, so the router is left alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from . import _fx
from ._fx import arg, count, dtype, getitem_users, is_op, only_user, safe_match, val
from .group_limit import match_group_limit

# The renormalisation's epsilon is exact when it vanishes in the sum's fp32
# rounding: eps < half an ulp of the sum, i.e. sum > eps * 2^24. A top-k sum of
# softmax scores is >= k / E; of sigmoid scores it is smaller only when every
# chosen logit is below about -28 (for eps = 1e-20).
_MAX_EPS = 1e-12


def _run_router(logits, k, score_func, bias, renormalize, scale, n_group=1, topk_group=1):
    experts = logits.shape[-1]
    if bias is not None and bias.dtype not in (torch.float32, logits.dtype):
        bias = bias.float()  # a bf16 buffer (a model cast with .to(bf16)) added to fp32 scores: exact in fp32
    weights, ids, _ = torch.ops.moe_ops.router_topk.default(logits.reshape(-1, experts), k, score_func, bias,
                                                            n_group, topk_group, renormalize, scale)
    batch = logits.shape[:-1]
    return weights.reshape(*batch, k), ids.long().reshape(*batch, k)


def _renorm(w: fx.Node) -> Optional[tuple[fx.Node, list]]:
    """w / (w.sum(-1, keepdim=True) [+ eps]), also in place: (the quotient, its region)."""
    users = list(w.users)
    if len(users) != 2:
        return None
    total = next((u for u in users if is_op(u, "sum")), None)
    div = next((u for u in users if is_op(u, "truediv") or is_op(u, "itruediv")), None)
    if total is None or div is None or div.args[0] is not w:
        return None
    if not (_fx.is_last_dim(arg(total, 1, "dim"), val(w).dim()) and arg(total, 2, "keepdim", False)):
        return None
    denom, region = total, [total, div]
    if div.args[1] is not total:
        add = div.args[1]
        if not (is_op(add, "add") and total in add.args and list(total.users) == [add]):
            return None
        eps = add.args[1] if add.args[0] is total else add.args[0]
        if not isinstance(eps, (int, float)) or not 0 <= eps <= _MAX_EPS:
            return None
        denom = add
        region.append(add)
    if list(denom.users) != [div]:
        return None
    return div, region


def match_router(tk: fx.Node) -> Optional[dict]:
    """scores = softmax(logits, -1) | sigmoid(logits); choice = scores [+ bias];
    ids = topk(choice, k, -1)[1]; w = topk[0] (no bias) | scores.gather(-1, ids);
    [w = w / (w.sum(-1, keepdim=True) + eps)]; [w = w * scale]."""
    if not is_op(tk, "topk"):
        return None
    choice, k = tk.args[0], arg(tk, 1, "k")
    if not isinstance(k, int) or not isinstance(choice, fx.Node) or not arg(tk, 3, "largest", True):
        return None
    vc = val(choice)
    if not isinstance(vc, torch.Tensor) or not _fx.is_last_dim(arg(tk, 2, "dim", -1), vc.dim()):
        return None
    n_group, topk_group, group_region = 1, 1, []
    group = match_group_limit(choice, vc.shape[-1])
    if group is not None:
        choice, n_group, topk_group, group_region = group
    scores, bias = choice, None
    if is_op(choice, "add") and len(choice.args) == 2:
        a, b = choice.args
        scores, bias = (a, b) if (is_op(a, "softmax") or is_op(a, "sigmoid")) else (b, a)
        vb = val(bias)
        if not (isinstance(vb, torch.Tensor) and vb.dim() == 1 and vb.shape[0] == vc.shape[-1]
                and vb.is_floating_point() and torch.promote_types(vb.dtype, vc.dtype) == vc.dtype) \
                or "alpha" in choice.kwargs:
            return None
    if is_op(scores, "softmax"):
        score_func = "softmax"
        if not _fx.is_last_dim(arg(scores, 1, "dim"), vc.dim()):
            return None
    elif is_op(scores, "sigmoid"):
        score_func = "sigmoid"
    else:
        return None
    logits = scores.args[0]
    vl = val(logits)
    if not (isinstance(vl, torch.Tensor) and vl.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)):
        return None
    wide = torch.float64 if vl.dtype == torch.float64 else torch.float32
    # The op scores in fp32 (fp64): exact for fp32/fp64 scores, not for 16-bit ones.
    if dtype(scores) != wide:
        return None
    parts = getitem_users(tk)
    if parts is None or 1 not in parts:
        return None
    ids = parts[1]
    region = [tk, ids] + group_region
    if bias is None and 0 in parts and not group_region:
        w = parts[0]
        region.append(w)
    else:
        if 0 in parts and parts[0].users:
            return None
        gathers = [u for u in ids.users if is_op(u, "gather") and u.args[0] is scores and arg(u, 2, "index") is ids]
        if len(gathers) != 1 or not _fx.is_last_dim(arg(gathers[0], 1, "dim"), vc.dim()):
            return None
        w = gathers[0]
        region += [parts[0]] if 0 in parts else []
        region.append(w)
    renormalize, scale = False, 1.0
    r = _renorm(w)
    if r is not None:
        w, more = r
        region += more
        renormalize = True
    u = only_user(w)
    if u is not None and is_op(u, "mul") and len(u.args) == 2 and w in u.args:
        c = u.args[1] if u.args[0] is w else u.args[0]
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            w, scale = u, float(c)
            region.append(u)
    if dtype(w) != wide:
        return None
    # Intermediates of the weights are used only inside (scores and choice may be used elsewhere).
    inside = set(region)
    for n in region:
        if n is not w and n is not ids and any(u not in inside for u in n.users):
            return None
    return dict(region=region, tk=tk, ids=ids, weights=w, logits=logits, k=k, score_func=score_func, bias=bias,
                renormalize=renormalize, scale=scale, n_group=n_group, topk_group=topk_group)


def rewrite_routers(graph: fx.Graph) -> int:
    import operator
    fired = 0
    for node in list(graph.nodes):
        if node not in graph.nodes or not is_op(node, "topk"):
            continue
        m = safe_match(match_router, node)
        if m is None:
            continue
        new = _fx.insert_call(graph, m["tk"], _run_router,
                              (m["logits"], m["k"], m["score_func"], m["bias"], m["renormalize"], m["scale"],
                               m["n_group"], m["topk_group"]), {},
                              [m["logits"]])
        with graph.inserting_after(new):
            w = graph.call_function(operator.getitem, (new, 0))
        with graph.inserting_after(w):
            ids = graph.call_function(operator.getitem, (new, 1))
        for i, n in enumerate((w, ids)):
            if "example_value" in new.meta:
                n.meta["example_value"] = new.meta["example_value"][i]
        m["weights"].replace_all_uses_with(w)
        m["ids"].replace_all_uses_with(ids)
        _fx.erase_dead(graph, m["region"])
        count("router_topk")
        fired += 1
    return fired

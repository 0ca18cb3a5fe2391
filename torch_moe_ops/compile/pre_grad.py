"""Pre-grad rewrites: stock MoE code in Dynamo's graph -> our ops with their own backward.

These run on the torch-level graph before AOT autograd, so a replacement
brings its registered autograd formula with it: the experts block becomes
``moe_ops::expert_mlp``, which saves only its inputs, the routing and the
up-projection output (no ``T * k * H`` activation), and the router becomes
``moe_ops::router_topk``. A post-grad rewrite could not do that: by then the
partitioner has already chosen what the stock code saves.

Each matcher walks from an anchor node and checks every node of the region
it would replace; it gives up (returns None) on the first thing that is not
exactly the stock computation: other users of an intermediate, a real dtype
conversion, a bias or norm, an activation the op does not implement, shapes
that do not agree.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from . import _fx
from ._fx import COUNTER, arg, count, dtype, getitem_users, only_user, safe_match, val
from .router import rewrite_routers

__all__ = ["COUNTER", "run", "safe_match"]


# ------------------------------------------------------------------ helpers

# Function spellings of the ops only these rewrites read (the router's, and those _fx's helpers read, are in
# _fx._FUNCTIONS; a Tensor method is matched by its name).
_FUNCTIONS: dict[str, tuple] = {
    "sort": (torch.sort,),
    "argsort": (torch.argsort,),
    "histc": (torch.histc,),
    "cumsum": (torch.cumsum,),
    "transpose": (torch.transpose,),
    "chunk": (torch.chunk,),
    "silu": (torch.nn.functional.silu,),
    "gelu": (torch.nn.functional.gelu,),
    "relu": (torch.nn.functional.relu, torch.relu),
    "empty_like": (torch.empty_like,),
    "arange": (torch.arange,),
    "scatter_add": (torch.scatter_add,),
    "floordiv": (operator.floordiv,),
    "grouped_mm": tuple(f for f in (getattr(torch, "_grouped_mm", None),
                                    getattr(torch.nn.functional, "grouped_mm", None)) if f is not None),
}


def is_op(node, name: str) -> bool:
    """_fx.is_op, with these rewrites' spellings too."""
    if isinstance(node, fx.Node) and node.op == "call_function" and name in _FUNCTIONS:
        return node.target in _FUNCTIONS[name]
    return _fx.is_op(node, name)


def skip_noop_to(node: Any) -> Any:
    """The input of a chain of dtype conversions that change nothing (``x.to(x.dtype)``,
    ``x.bfloat16()`` on bf16); ``node`` itself otherwise."""
    while isinstance(node, fx.Node) and (is_op(node, "to") or is_op(node, "bfloat16") or is_op(node, "float")
                                         or is_op(node, "type_as")):
        src = node.args[0]
        if not isinstance(src, fx.Node) or dtype(src) is None or dtype(src) != dtype(node):
            return node
        if is_op(node, "to") and (len(node.args) > 2 or set(node.kwargs) - {"dtype"}):
            return node  # device moves, copy=, memory_format=: not a plain cast
        node = src
    return node


def _is_transformers_fallback(node: fx.Node) -> bool:
    # transformers' own grouped GEMM (used under compile for non-bf16 weights): same contract as _grouped_mm.
    return node.op == "call_function" and str(node.target) in (
        "transformers.grouped_mm_fallback", "transformers.grouped_mm_fallback.default")


def grouped_mm_args(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(A, B, offs) of a 2D x 3D grouped GEMM with no bias and the inputs' dtype out."""
    if not (is_op(node, "grouped_mm") or _is_transformers_fallback(node)):
        return None
    a, b = arg(node, 0, "mat_a", arg(node, 0, "input")), arg(node, 1, "mat_b", arg(node, 1, "weight"))
    offs = arg(node, 2, "offs")
    if arg(node, 3, "bias") is not None or arg(node, 4, "out_dtype") not in (None, dtype(a)):
        return None
    va, vb = val(a), val(b)
    if not (isinstance(offs, fx.Node) and isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return None
    if va.dim() != 2 or vb.dim() != 3 or va.dtype != vb.dtype or dtype(offs) != torch.int32:
        return None
    return a, b, offs


def _activation_of(node: fx.Node) -> Optional[str]:
    if is_op(node, "silu") and not node.kwargs.get("inplace", False):
        return "silu"
    if is_op(node, "gelu") and arg(node, 1, "approximate", "none") == "none":
        return "gelu"
    if is_op(node, "relu") and not node.kwargs.get("inplace", False):
        return "relu"
    return None


def _through_noop_casts(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follows single users that are dtype conversions to the same dtype."""
    seen = []
    while True:
        u = only_user(node)
        if u is None or skip_noop_to(u) is not node or u is node:
            return node, seen
        seen.append(u)
        node = u


def _flat(node, of: fx.Node) -> bool:
    """node is of.reshape(-1) / of.view(-1)."""
    return ((is_op(node, "reshape") or is_op(node, "view")) and node.args[0] is of
            and tuple(node.args[1:]) in ((-1,), ((-1,),)))


# ------------------------------------------------------------ (c) experts block

def _run_experts(hidden, expert_ids, weights, gate_up, down, activation, out_dtype):
    from ..ops.experts import fused_experts
    out = fused_experts(hidden, expert_ids, weights, gate_up, down, activation=activation)
    return out if out.dtype == out_dtype else out.to(out_dtype)


class _SeparateGateUpExperts(torch.autograd.Function):
    """expert_mlp on gate and up weights held apart (torchtitan's w1 and w3): the op reads them side by
    side, so the forward concatenates them, and so does the backward again rather than keeping the
    concatenation (a copy of both weights) alive from the forward to the backward."""

    @staticmethod
    def forward(ctx, tokens, src_rows, offs, dst_rows, weights, gate, up, down):
        gate_up = torch.cat([gate, up], dim=-1)
        out, h = torch.ops.moe_ops.expert_mlp.default(tokens, src_rows, offs, dst_rows, weights, gate_up, down,
                                                      None, None, "swiglu", False, 1.702, 7.0)
        ctx.save_for_backward(tokens, src_rows, offs, dst_rows, weights, gate, up, down, h)
        return out

    @staticmethod
    def backward(ctx, grad):
        tokens, src_rows, offs, dst_rows, weights, gate, up, down, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[4], need[5] or need[6], need[7]]
        # The same concatenation as the forward's, spelt with another dim argument: AOT autograd's CSE
        # would otherwise merge the two and the partitioner would save the forward's copy after all.
        gate_up = torch.cat([gate, up], dim=gate.dim() - 1)
        g_tokens, g_weights, g_gate_up, g_down, _, _ = torch.ops.moe_ops.expert_mlp_backward.default(
            grad.to(tokens.dtype), tokens, src_rows, offs, dst_rows, weights, gate_up, down, None, None, h,
            "swiglu", False, 1.702, 7.0, mask)
        inter = gate.shape[-1]
        return (g_tokens if need[0] else None, None, None, None, g_weights if need[4] else None,
                g_gate_up[..., :inter] if need[5] else None, g_gate_up[..., inter:] if need[6] else None,
                g_down if need[7] else None)


def _run_experts_separate_gate_up(hidden, expert_ids, weights, gate, up, down, out_dtype):
    from ..ops.routing import permute
    _, dst_rows, src_rows, offs = permute(hidden.detach()[:, :0], expert_ids, gate.shape[0])
    out = _SeparateGateUpExperts.apply(hidden, src_rows, offs, dst_rows, weights, gate, up, down)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _gated_activation(h: fx.Node, region: list) -> Optional[tuple[str, fx.Node]]:
    """transformers' act_fn(gate) * up on h.chunk(2, -1), or act_fn(h): (activation, output)."""
    c = only_user(h)
    if c is None:
        return None
    if is_op(c, "chunk") and arg(c, 1, "chunks") == 2 and _fx.is_last_dim(arg(c, 2, "dim", 0), 2):
        parts = getitem_users(c)
        if parts is None or set(parts) != {0, 1}:
            return None
        gate, up = parts[0], parts[1]
        act = only_user(gate)
        name = _activation_of(act) if act is not None else None
        gated = {"silu": "swiglu", "gelu": "geglu"}.get(name)
        prod = only_user(act) if act is not None else None
        if gated is None or prod is None or not is_op(prod, "mul") or set(prod.args) != {act, up} \
                or list(up.users) != [prod]:
            return None
        region += [c, gate, up, act, prod]
        return gated, prod
    name = _activation_of(c)
    if name is None:
        return None
    region.append(c)
    return name, c


def match_transformers_experts(g1: fx.Node) -> Optional[dict]:
    """transformers 5's ``grouped_mm_experts_forward`` (integrations/moe.py), from its first grouped GEMM:

    sort(top_k_index.reshape(-1)) -> hidden[perm // k] -> grouped_mm(gate_up) -> act -> grouped_mm(down)
    -> * top_k_weights.reshape(-1)[perm] -> [inverse perm] -> view(T, k, H).sum(1)
    """
    m = grouped_mm_args(g1)
    if m is None:
        return None
    a1, b1, offs = m
    region: list[fx.Node] = [g1]
    xg = skip_noop_to(a1)
    if xg is not a1:
        region.append(a1)
    if not (is_op(xg, "getitem") and isinstance(xg.args[1], fx.Node)):
        return None
    hidden, fd = xg.args
    if not (is_op(fd, "floordiv") and isinstance(fd.args[1], int)):
        return None
    perm, k = fd.args
    if not (is_op(perm, "getitem") and perm.args[1] == 1 and is_op(perm.args[0], "sort")):
        return None
    sort = perm.args[0]
    if not _fx.is_last_dim(arg(sort, 1, "dim", -1), 1) or arg(sort, 2, "descending", False):
        return None
    eids = sort.args[0]
    if not (isinstance(eids, fx.Node) and (is_op(eids, "reshape") or is_op(eids, "view"))):
        return None
    topk_index = eids.args[0]
    if not _flat(eids, topk_index):
        return None
    vi, vh = val(topk_index), val(hidden)
    if not (isinstance(vi, torch.Tensor) and vi.dim() == 2 and vi.shape[1] == k and not vi.is_floating_point()
            and vi.dtype in (torch.int32, torch.int64) and isinstance(vh, torch.Tensor) and vh.dim() == 2):
        return None
    if vh.dtype != dtype(g1) or vh.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    region += [xg, fd, perm, sort, eids]
    # offsets = cumsum(histc(sorted ids as float/int, bins=E, min=0, max=E-1), 0, int32)
    num_experts = val(b1).shape[0]
    if not (is_op(offs, "cumsum") and _fx.is_last_dim(arg(offs, 1, "dim"), 1) and dtype(offs) == torch.int32):
        return None
    hist = offs.args[0]
    if not (is_op(hist, "histc") and arg(hist, 1, "bins") == num_experts and arg(hist, 2, "min") == 0
            and arg(hist, 3, "max") == num_experts - 1):
        return None
    src = hist.args[0]
    sorted_ids = src.args[0] if (is_op(src, "float") or is_op(src, "int") or is_op(src, "to")) else src
    if not (is_op(sorted_ids, "getitem") and sorted_ids.args[0] is sort and sorted_ids.args[1] == 0):
        return None
    region += [offs, hist, src, sorted_ids]
    # activation, then the down projection on the same offsets
    act = _gated_activation(g1, region)
    if act is None:
        return None
    activation, h = act
    h, casts = _through_noop_casts(h)
    region += casts
    g2 = only_user(h)
    m2 = grouped_mm_args(g2) if g2 is not None else None
    if m2 is None or m2[0] is not h or m2[2] is not offs:
        return None
    b2 = m2[1]
    region.append(g2)
    # * weights in sorted order
    mul = only_user(g2)
    if mul is None or not is_op(mul, "mul") or len(mul.args) != 2 or g2 not in mul.args:
        return None
    uns = mul.args[1] if mul.args[0] is g2 else mul.args[0]
    if not (is_op(uns, "unsqueeze") and _fx.is_last_dim(arg(uns, 1, "dim"), 2)):
        return None
    wg = uns.args[0]
    if not (is_op(wg, "getitem") and wg.args[1] is perm and isinstance(wg.args[0], fx.Node)):
        return None
    sw = wg.args[0]
    topk_weights = sw.args[0] if isinstance(sw, fx.Node) and sw.args else None
    if not _flat(sw, topk_weights) or not isinstance(val(topk_weights), torch.Tensor) \
            or tuple(val(topk_weights).shape) != tuple(vi.shape) \
            or dtype(topk_weights) not in (torch.float32, vh.dtype):
        return None
    region += [mul, uns, wg, sw]
    # inverse permutation: inv = empty_like(perm); inv[perm] = arange(S); weighted[inv]
    back = only_user(mul)
    if not (back is not None and is_op(back, "getitem") and back.args[0] is mul):
        return None
    inv = back.args[1]
    if not is_op(inv, "empty_like") or inv.args[0] is not perm:
        return None
    writes = [u for u in inv.users if u is not back]
    if len(writes) != 1 or not is_op(writes[0], "setitem") or writes[0].args[:2] != (inv, perm):
        return None
    ar = writes[0].args[2]
    if not (is_op(ar, "arange") and len(ar.args) == 1):
        return None
    region += [back, inv, writes[0], ar]
    view = only_user(back)
    if not (view is not None and (is_op(view, "view") or is_op(view, "reshape")) and val(view) is not None
            and val(view).dim() == 3 and val(view).shape[1] == k):
        return None
    total = only_user(view)
    if not (total is not None and is_op(total, "sum") and arg(total, 1, "dim") in (1, -2, (1,), [1])
            and not arg(total, 2, "keepdim", False)):
        return None
    region += [view, total]
    out = total
    cast = only_user(total)
    if cast is not None and (is_op(cast, "to") or is_op(cast, "type_as") or is_op(cast, "bfloat16")) \
            and len(cast.args) <= 2 and not (set(cast.kwargs) - {"dtype"}):
        region.append(cast)
        out = cast
    # Every intermediate is used only inside the region (the region's output aside).
    inside = set(region)
    for n in region:
        if n is not out and any(u not in inside for u in n.users):
            return None
    return dict(region=region, out=out, hidden=hidden, expert_ids=topk_index, weights=topk_weights,
                gate_up=b1, down=b2, activation=activation)


def rewrite_transformers_experts(graph: fx.Graph) -> int:
    fired = 0
    for node in list(graph.nodes):
        if node.graph is not graph or node not in graph.nodes:
            continue
        m = safe_match(match_transformers_experts, node) \
            if (is_op(node, "grouped_mm") or _is_transformers_fallback(node)) else None
        if m is None:
            continue
        out = m["out"]
        new = _fx.insert_call(graph, out, _run_experts,
                              (m["hidden"], m["expert_ids"], m["weights"], m["gate_up"], m["down"], m["activation"],
                               dtype(out)), {}, [m["hidden"], m["gate_up"]])
        out.replace_all_uses_with(new)
        _fx.erase_dead(graph, m["region"])
        count("expert_mlp")
        fired += 1
    return fired


def _is_scatter_add(node: fx.Node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and str(node.target) in (
            "torchtitan.deterministic_scatter_add.default", "torchtitan.deterministic_scatter_add"):
        return True
    return is_op(node, "scatter_add") and arg(node, 1, "dim") == 0


def _view_root(node):
    """The tensor a chain of view / reshape nodes starts from."""
    while isinstance(node, fx.Node) and (is_op(node, "view") or is_op(node, "reshape")):
        node = node.args[0]
    return node


def match_torchtitan_experts(sa: fx.Node) -> Optional[dict]:
    """torchtitan 0.3.0's LocalTokenDispatcher.dispatch -> GroupedExperts -> combine, from the combine's
    scatter_add:

    order = argsort(ids.view(-1), stable=True); s = scores.view(-1)[order]; tok = order // k;
    x = x_TD[tok]; h = silu(gmm(x, w1^T)) * gmm(x, w3^T); y = gmm(h, w2^T);
    out = scatter_add(zeros_like(x_TD), 0, tok.reshape(-1, 1).expand(-1, D), (y.float() * s.reshape(-1, 1)).to(dt))

    with offsets = cumsum(counts, 0, int32) and counts = zeros_like(., bool).scatter_(-1, ids, True).sum((0, 1)).
    """
    if not _is_scatter_add(sa):
        return None
    if sa.op == "call_function" and "torchtitan" in str(sa.target):
        zeros, index, src = sa.args[:3]
    else:
        zeros, index, src = sa.args[0], arg(sa, 2, "index"), arg(sa, 3, "src")
    region: list[fx.Node] = [sa]
    if not (is_op(zeros, "zeros_like") and len(zeros.args) == 1 and not zeros.kwargs):
        return None
    x_td = zeros.args[0]
    vx = val(x_td)
    if not (isinstance(vx, torch.Tensor) and vx.dim() == 2 and vx.dtype in (torch.bfloat16, torch.float16,
                                                                                torch.float32)):
        return None
    # index: tok.reshape(-1, 1).expand(-1, D)
    if not (is_op(index, "expand") and tuple(index.args[1:]) in ((-1, vx.shape[1]),)):
        return None
    col = index.args[0]
    if not ((is_op(col, "reshape") or is_op(col, "view")) and tuple(col.args[1:]) == (-1, 1)):
        return None
    tok = col.args[0]
    if not (is_op(tok, "floordiv") and isinstance(tok.args[1], int)):
        return None
    order, k = tok.args
    if not (is_op(order, "argsort") and arg(order, 1, "dim", -1) in (-1, 0) and order.kwargs.get("stable", False)
            and not arg(order, 2, "descending", False)):
        return None
    flat_ids = order.args[0]
    if not (is_op(flat_ids, "view") or is_op(flat_ids, "reshape")) or tuple(flat_ids.args[1:]) != (-1,):
        return None
    ids_tk = flat_ids.args[0]
    vi = val(ids_tk)
    if not (isinstance(vi, torch.Tensor) and vi.dim() == 2 and vi.shape[1] == k
            and vi.dtype in (torch.int32, torch.int64)):
        return None
    region += [zeros, index, col, tok, order, flat_ids]
    # src: (y.to(float32) * s.reshape(-1, 1)).to(dt)
    cast = src
    if not (is_op(cast, "to") and dtype(cast) == vx.dtype and len(cast.args) == 2 and not cast.kwargs):
        return None
    mul = cast.args[0]
    if not (is_op(mul, "mul") and len(mul.args) == 2):
        return None
    up, sr = mul.args
    if not (is_op(sr, "reshape") or is_op(sr, "view")) or tuple(sr.args[1:]) != (-1, 1):
        return None
    s_sorted = sr.args[0]
    if not (is_op(s_sorted, "getitem") and s_sorted.args[1] is order):
        return None
    flat_s = s_sorted.args[0]
    if not (is_op(flat_s, "view") or is_op(flat_s, "reshape")) or tuple(flat_s.args[1:]) != (-1,):
        return None
    scores_tk = flat_s.args[0]
    vs = val(scores_tk)
    if not (isinstance(vs, torch.Tensor) and tuple(vs.shape) == tuple(vi.shape)
            and vs.dtype in (torch.float32, vx.dtype)):
        return None
    if not (is_op(up, "to") and dtype(up) == torch.float32 and len(up.args) == 2 and not up.kwargs):
        return None
    region += [cast, mul, sr, s_sorted, flat_s, up]
    y = skip_noop_to(up.args[0])
    if y is not up.args[0]:
        region.append(up.args[0])
    m2 = grouped_mm_args(y)
    if m2 is None:
        return None
    h, b2, offs = m2
    region.append(y)
    # h = silu(gmm(x, w1^T)) * gmm(x, w3^T), x = x_TD[tok] (through no-op casts)
    if not (is_op(h, "mul") and len(h.args) == 2):
        return None
    act = next((a for a in h.args if is_op(a, "silu") and not a.kwargs.get("inplace", False)), None)
    if act is None:
        return None
    g3 = h.args[1] if h.args[0] is act else h.args[0]
    g1 = act.args[0]
    m1, m3 = grouped_mm_args(g1), grouped_mm_args(g3)
    if m1 is None or m3 is None or m1[2] is not offs or m3[2] is not offs:
        return None
    region += [h, act, g1, g3]
    routed = None
    for a in (m1[0], m3[0]):
        r = skip_noop_to(a)
        if r is not a:
            region.append(a)
        if routed is not None and r is not routed:
            return None
        routed = r
    if not (is_op(routed, "getitem") and routed.args[0] is x_td and routed.args[1] is tok):
        return None
    region.append(routed)
    if dtype(y) != vx.dtype or dtype(g1) != vx.dtype:
        return None
    # offsets: cumsum of the per-expert counts of the same ids
    num_experts = val(m1[1]).shape[0]
    if not (is_op(offs, "cumsum") and arg(offs, 1, "dim") == 0 and dtype(offs) == torch.int32):
        return None
    counts = offs.args[0]
    dims = arg(counts, 1, "dim")
    if not (is_op(counts, "sum") and isinstance(dims, (tuple, list)) and tuple(dims) in ((0, 1), (0,))):
        return None
    routing_map = counts.args[0]
    scatter = routing_map
    if not (isinstance(scatter, fx.Node) and scatter.op == "call_method" and scatter.target == "scatter_"
            and len(scatter.args) == 4 and scatter.args[3] is True and not scatter.kwargs
            and isinstance(val(scatter), torch.Tensor) and _fx.is_last_dim(scatter.args[1], val(scatter).dim())):
        return None
    base = scatter.args[0]
    if not (is_op(base, "zeros_like") and base.kwargs.get("dtype") == torch.bool
            and val(base).shape[-1] == num_experts
            and tuple(dims) == tuple(range(val(base).dim() - 1))):
        return None
    if _view_root(scatter.args[2]) is not _view_root(ids_tk):
        return None
    region.append(offs)
    inside = set(region)
    for n in region:
        if n is not sa and any(u not in inside for u in n.users):
            return None
    return dict(region=region, out=sa, hidden=x_td, expert_ids=ids_tk, weights=scores_tk,
                gate=m1[1], up=m3[1], down=b2)


def rewrite_torchtitan_experts(graph: fx.Graph) -> int:
    fired = 0
    for node in list(graph.nodes):
        if node not in graph.nodes or not _is_scatter_add(node):
            continue
        m = safe_match(match_torchtitan_experts, node)
        if m is None:
            continue
        out = m["out"]
        new = _fx.insert_call(graph, out, _run_experts_separate_gate_up,
                              (m["hidden"], m["expert_ids"], m["weights"], m["gate"], m["up"], m["down"],
                               dtype(out)), {}, [m["hidden"], m["gate"]])
        out.replace_all_uses_with(new)
        _fx.erase_dead(graph, m["region"])
        count("expert_mlp")
        fired += 1
    return fired


def run(graph: fx.Graph) -> None:
    """Every pre-grad rewrite, the experts block first (its match starts from
    the router's outputs, which the router rewrite replaces)."""
    changed = rewrite_transformers_experts(graph)
    changed += rewrite_torchtitan_experts(graph)
    changed += rewrite_routers(graph)
    if changed:
        graph.lint()

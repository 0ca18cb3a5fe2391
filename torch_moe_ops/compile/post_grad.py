"""Post-grad rewrites: aten graphs after AOT autograd's partitioning, written with
Inductor's pattern matcher (the forward and backward graphs are rewritten on
their own, so a replacement needs no backward of its own):

* (a) ``_grouped_mm(x[idx], w, offs)`` -> ``moe_ops::grouped_mm_gather(x, w, offs, idx)``: the
  gathered copy of the tokens is never made. Fires only where nothing else reads the gathered rows
  (under autograd the partitioner saves them for the weight gradient, so it fires in inference and
  in graphs whose weights need no gradient), and only where ``idx`` provably holds no negative
  index (aten reads row -1 as the last row, the op reads zeros): ``idx`` must be the indices of a
  ``sort``, optionally floor-divided by the top-k, over ``rows(x) * k`` elements.
* (b) ``zeros(T, H).index_add(0, perm // k, y * w.view(-1)[perm][:, None])`` (or the
  ``scatter_add`` spelling), ``y`` a grouped GEMM's output and ``perm`` a sort of the ``T * k``
  expert ids -> ``moe_ops::unpermute(y, inverse(perm).view(T, k), w)``: each token's ``k`` rows
  summed in fp32 in slot order and rounded once, where the stock code rounds every weighted row
  and every addition to the output dtype (so results differ within that rounding: the rewrite is
  the more accurate one). Fires only when the output, ``y`` and the product share a dtype.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import (
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

from .pre_grad import COUNTER, safe_match

aten = torch.ops.aten
_PATTERNS = PatternMatcherPass(pass_name="torch_moe_ops_post_grad")


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _known(expr) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return bool(statically_known_true(expr))


def _sort_indices(perm) -> bool:
    """perm is the indices output of a sort over a 1-D tensor: a permutation of range(numel)."""
    import operator
    if not (isinstance(perm, fx.Node) and perm.target is operator.getitem and perm.args[1] == 1):
        return False
    sort = perm.args[0]
    if not (isinstance(sort, fx.Node) and sort.target in (aten.sort.default, aten.sort.stable)):
        return False
    v = _val(sort.args[0])
    return isinstance(v, torch.Tensor) and v.dim() == 1


def _token_index(idx, rows) -> tuple | None:
    """(perm, k) if idx is perm // k (or perm, k = 1) with perm a sort's indices over rows * k elements."""
    k = 1
    perm = idx
    if isinstance(idx, fx.Node) and idx.target in (aten.div.Tensor_mode, aten.floor_divide.default):
        if idx.target is aten.div.Tensor_mode and idx.kwargs.get("rounding_mode") != "floor":
            return None
        perm, k = idx.args[0], idx.args[1]
        k = _val(k)
        if isinstance(k, torch.Tensor) or k is None:
            return None
    if not _sort_indices(perm):
        return None
    if not _known(_val(perm).numel() == rows * k) or not _known(k >= 1):
        return None
    return perm, k


def _plain_grouped_mm(node) -> bool:
    return (isinstance(node, fx.Node) and node.target is aten._grouped_mm.default and len(node.args) == 3
            and not node.kwargs)


# ------------------------------------------------------------ (a) gather -> GEMM

def _gather_check(match: Match) -> bool:
    return bool(safe_match(_gather_check_unsafe, match))


def _gather_check_unsafe(match: Match) -> bool:
    x, idx, w, offs = (match.kwargs[n] for n in ("x", "idx", "w", "offs"))
    vx, vi, vw, vo = _val(x), _val(idx), _val(w), _val(offs)
    if not all(isinstance(v, torch.Tensor) for v in (vx, vi, vw, vo)):
        return False
    if vx.dim() != 2 or vw.dim() != 3 or vi.dim() != 1 or vi.dtype != torch.int64 or vo.dtype != torch.int32:
        return False
    if vx.dtype != vw.dtype or vx.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return False
    return _token_index(idx, vx.shape[0]) is not None


@register_graph_pattern(
    CallFunction(aten._grouped_mm.default, CallFunction(aten.index.Tensor, KeywordArg("x"), [KeywordArg("idx")],
                                                        _users=1),
                 KeywordArg("w"), KeywordArg("offs")),
    pass_dict=_PATTERNS, extra_check=_gather_check)
def _gather_into_grouped_mm(match: Match, x, idx, w, offs):
    def repl(x, idx, w, offs):
        return torch.ops.moe_ops.grouped_mm_gather.default(x, w, offs, idx, None, None, None)
    match.replace_by_example(repl, [x, idx, w, offs])
    torch._dynamo.utils.counters[COUNTER]["grouped_mm_gather"] += 1


# ------------------------------------------------------------ (b) weighted scatter -> combine

def _combine_check(match: Match) -> bool:
    return bool(safe_match(_combine_check_unsafe, match))


def _combine_check_unsafe(match: Match) -> bool:
    zeros, idx, y, wflat, perm = (match.kwargs[n] for n in ("zeros", "idx", "y", "wflat", "perm"))
    vz, vy, vwf = _val(zeros), _val(y), _val(wflat)
    if not all(isinstance(v, torch.Tensor) for v in (vz, vy, vwf)):
        return False
    if not (isinstance(zeros, fx.Node) and zeros.target is aten.full.default and zeros.args[1] == 0):
        return False
    if not (_plain_grouped_mm(y) or (isinstance(y, fx.Node) and y.target in (
            torch.ops.moe_ops.grouped_mm_gather.default, torch.ops.moe_ops.grouped_mm.default))):
        return False
    if vz.dim() != 2 or vy.dim() != 2 or vz.dtype != vy.dtype or vwf.dim() != 1:
        return False
    if vy.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return False
    # The product must not promote (stock code would then keep a wider output than unpermute's).
    if torch.promote_types(vy.dtype, vwf.dtype) != vy.dtype or vwf.dtype not in (torch.float32, vy.dtype):
        return False
    if not _known(vz.shape[1] == vy.shape[1]):
        return False
    tk = _token_index(idx, vz.shape[0])
    if tk is None or tk[0] is not perm:
        return False
    # w.view(-1) of a (T, k) tensor, so that the op gets the weights in (token, slot) order.
    if not (isinstance(wflat, fx.Node) and wflat.target in (aten.reshape.default, aten.view.default)
            and list(wflat.args[1]) == [-1]):
        return False
    vw = _val(wflat.args[0])
    return isinstance(vw, torch.Tensor) and vw.dim() == 2 and _known(vw.shape[0] == vz.shape[0])


def _combine_repl(zeros, idx, y, wflat, perm):
    tokens = zeros.shape[0]
    rows = perm.shape[0]
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(rows, device=perm.device))
    dst_rows = inverse.view(tokens, rows // tokens)
    return torch.ops.moe_ops.unpermute.default(y, dst_rows, wflat.view(tokens, rows // tokens))


def _weighted(y_first: bool):
    w = CallFunction(aten.unsqueeze.default,
                     CallFunction(aten.index.Tensor, KeywordArg("wflat"), [KeywordArg("perm")]), -1)
    y = KeywordArg("y")
    return CallFunction(aten.mul.Tensor, *((y, w) if y_first else (w, y)), _users=1)


def _register_combine():
    for y_first in (True, False):
        index_add = CallFunction(aten.index_add.default, KeywordArg("zeros"), 0, KeywordArg("idx"),
                                 _weighted(y_first))
        scatter_add = CallFunction(aten.scatter_add.default, KeywordArg("zeros"), 0,
                                   CallFunction(aten.expand.default,
                                                CallFunction(aten.unsqueeze.default, KeywordArg("idx"), -1),
                                                KeywordArg("expand_size")),
                                   _weighted(y_first))
        for pattern in (index_add, scatter_add):
            @register_graph_pattern(pattern, pass_dict=_PATTERNS, extra_check=_combine_check)
            def _combine(match: Match, zeros, idx, y, wflat, perm, expand_size=None):
                match.replace_by_example(_combine_repl, [zeros, idx, y, wflat, perm])
                torch._dynamo.utils.counters[COUNTER]["unpermute"] += 1


_register_combine()


def run(graph: fx.Graph) -> None:
    _PATTERNS.apply(graph)

"""Combine rewrite (post-grad): the weighted scatter of a grouped GEMM's rows back to their tokens ->
``moe_ops::unpermute``.

``zeros(T, H).index_add(0, perm // k, y * w.view(-1)[perm][:, None])`` (or the ``scatter_add``
spelling), ``y`` a grouped GEMM's output and ``perm`` a sort of the ``T * k`` expert ids, becomes
``unpermute(y, inverse(perm).view(T, k), w)``: each token's ``k`` rows summed in fp32 in slot order
and rounded once, where the stock code rounds every weighted row and every addition to the output
dtype (so results differ within that rounding: the rewrite is the more accurate one, and it does not
depend on the order of the scatter's atomic additions). Fires only when the output, ``y`` and the
product share a dtype. It is written with Inductor's pattern matcher on the aten graphs after
partitioning; the forward and backward graphs are rewritten on their own, so the replacement needs
no backward of its own.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import (
    CallFunction,
    KeywordArg,
    Match,
    MULTIPLE,
    PatternMatcherPass,
    register_graph_pattern,
)

from ._fx import count, safe_match

aten = torch.ops.aten
PATTERNS = PatternMatcherPass(pass_name="moe_combine")

# Grouped GEMMs besides aten._grouped_mm(a, b, offs) whose output rows the combine takes.
GROUPED_GEMMS: set = set()


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _known(expr) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return bool(statically_known_true(expr))


def _sort_indices(perm) -> bool:
    """perm is the indices output of a sort over a 1-D tensor: a permutation of range(numel)."""
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


def _combine_check(match: Match) -> bool:
    return bool(safe_match(_combine_check_unsafe, match))


def _combine_check_unsafe(match: Match) -> bool:
    zeros, idx, y, wflat, perm = (match.kwargs[n] for n in ("zeros", "idx", "y", "wflat", "perm"))
    vz, vy, vwf = _val(zeros), _val(y), _val(wflat)
    if not all(isinstance(v, torch.Tensor) for v in (vz, vy, vwf)):
        return False
    if not (isinstance(zeros, fx.Node) and zeros.target is aten.full.default and zeros.args[1] == 0):
        return False
    if not (_plain_grouped_mm(y) or (isinstance(y, fx.Node) and y.target in GROUPED_GEMMS)):
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


def _combine_repl(y, wflat, w, perm):
    # (T, k) from the weights' own shape: T may be 0, where k = rows // T cannot be recovered.
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.shape[0], device=perm.device))
    return torch.ops.moe_ops.unpermute.default(y, inverse.view(w.shape), wflat.view(w.shape))


def _weighted(y_first: bool):
    # The sorted weights may have other users (under autograd the backward reads them): they stay, only the
    # product and the scatter are replaced.
    w = CallFunction(aten.unsqueeze.default,
                     CallFunction(aten.index.Tensor, KeywordArg("wflat"), [KeywordArg("perm")], _users=MULTIPLE), -1,
                     _users=MULTIPLE)
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
            @register_graph_pattern(pattern, pass_dict=PATTERNS, extra_check=_combine_check)
            def _combine(match: Match, zeros, idx, y, wflat, perm, expand_size=None):
                match.replace_by_example(_combine_repl, [y, wflat, wflat.args[0], perm])
                count("unpermute")


_register_combine()


def run(graph: fx.Graph) -> None:
    PATTERNS.apply(graph)

"""Post-grad rewrites: aten graphs after AOT autograd's partitioning, written with
Inductor's pattern matcher (the forward and backward graphs are rewritten on
their own, so a replacement needs no backward of its own):

* (a) ``_grouped_mm(x[idx], w, offs)`` -> ``moe_ops::grouped_mm_gather(x, w, offs, idx)``: the
  gathered copy of the tokens is never made. Fires only where nothing else reads the gathered rows
  (under autograd the partitioner saves them for the weight gradient, so it fires in inference and
  in graphs whose weights need no gradient), and only where ``idx`` provably holds no negative
  index (aten reads row -1 as the last row, the op reads zeros): ``idx`` must be the indices of a
  ``sort``, optionally floor-divided by the top-k, over ``rows(x) * k`` elements.
* (b) the weighted ``index_add`` / ``scatter_add`` of a grouped GEMM's rows -> ``moe_ops::unpermute``
  (combine.py: it targets only ops that go upstream, and is carried by the Compile series as
  ``torch/_inductor/fx_passes/moe_combine.py``); the gathered GEMM of (a) counts as a grouped GEMM
  there.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import (
    CallFunction,
    KeywordArg,
    Match,
    register_graph_pattern,
)

from . import combine
from ._fx import count, safe_match
from .combine import _token_index, _val

aten = torch.ops.aten
# The gather patterns join the combine's pass: one sweep over the graph runs both.
combine.GROUPED_GEMMS.update({torch.ops.moe_ops.grouped_mm_gather.default, torch.ops.moe_ops.grouped_mm.default})


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
    pass_dict=combine.PATTERNS, extra_check=_gather_check)
def _gather_into_grouped_mm(match: Match, x, idx, w, offs):
    def repl(x, idx, w, offs):
        return torch.ops.moe_ops.grouped_mm_gather.default(x, w, offs, idx, None, None, None)
    match.replace_by_example(repl, [x, idx, w, offs])
    count("grouped_mm_gather")


def run(graph: fx.Graph) -> None:
    combine.run(graph)

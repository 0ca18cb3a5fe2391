"""Plain-torch references for the ops, used by tests and benchmarks.

Each loops over groups with ``torch.mm`` in a wide accumulation type and
rounds once, which is the contract the kernels follow.
"""

from __future__ import annotations

from typing import Optional

import torch


def torch_grouped_mm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    acc_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference grouped mm: per-group ``mm`` in ``acc_dtype``, elements no group covers are zero."""
    out_dtype = out_dtype or mat_a.dtype
    a = mat_a.to(acc_dtype)
    b = mat_b.to(acc_dtype)
    bb = bias.to(acc_dtype) if bias is not None else None
    layout = f"{mat_a.dim()}d{mat_b.dim()}d"
    ends = offs.tolist() if offs is not None else []
    starts = [0] + ends[:-1]
    if layout == "2d3d":
        out = a.new_zeros(a.shape[0], b.shape[2])
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[s:e] = a[s:e] @ b[g] + (bb[g] if bb is not None else 0)
    elif layout == "3d2d":
        out = a.new_zeros(a.shape[1], b.shape[1])
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[:, s:e] = a[g] @ b[:, s:e] + (bb[g, s:e] if bb is not None else 0)
    elif layout == "2d2d":
        out = a.new_zeros(len(ends), a.shape[0], b.shape[1])
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[g] = a[:, s:e] @ b[s:e] + (bb[g] if bb is not None else 0)
    else:
        out = torch.bmm(a, b) + (bb.unsqueeze(1) if bb is not None else 0)
    return out.to(out_dtype)

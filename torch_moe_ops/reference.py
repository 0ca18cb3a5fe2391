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


def _routing_acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_router_topk(
    logits: torch.Tensor,
    k: int,
    score_func: str = "softmax",
    bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference router: the contract of ``moe_ops::router_topk`` in plain torch.

    Stable descending sorts give the tie rule (the lower expert id first).
    Scores are computed in float32 (float64 for float64 logits), as the kernel does.
    """
    acc = _routing_acc(logits.dtype)
    tokens, experts = logits.shape
    x = logits.to(acc)
    if score_func == "softmax":
        scores = torch.softmax(x, dim=-1)
    elif score_func == "sigmoid":
        scores = torch.sigmoid(x)
    else:  # softmax_after_topk: select on the logits
        scores = x
    key = scores + bias.to(acc) if bias is not None else scores
    key = torch.nan_to_num(key, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if n_group > 1:
        group_size = experts // n_group
        grouped = key.view(tokens, n_group, group_size)
        group_key = grouped.topk(min(2, group_size), dim=-1).values.sum(-1)
        keep = torch.sort(group_key, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        mask = torch.zeros(tokens, n_group, dtype=torch.bool, device=logits.device).scatter(1, keep, True)
        key = key.masked_fill(~mask.repeat_interleave(group_size, dim=1), float("-inf"))
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = scores.gather(1, ids)
    if score_func == "softmax_after_topk":
        weights = torch.softmax(weights, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * scaling_factor
    counts = torch.bincount(ids.flatten(), minlength=experts).to(torch.int32)
    return weights, ids.to(torch.int32), counts


def torch_permute(
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    alignment: int = 1,
    first_expert: int = 0,
    num_local_experts: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference permute: a stable argsort by local expert (dropped ids last),
    group starts rounded up to ``alignment``; same outputs as ``moe_ops::permute``."""
    num_tokens, top_k = expert_ids.shape
    num_local = num_experts - first_expert if num_local_experts is None else num_local_experts
    rows = num_tokens * top_k + num_local * (alignment - 1)
    device = tokens.device
    local = expert_ids.flatten().long() - first_expert
    kept = (local >= 0) & (local < num_local)
    group = torch.where(kept, local, num_local)  # dropped pairs sort last
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(local[kept], minlength=num_local)
    padded = (counts + alignment - 1) // alignment * alignment
    ends = padded.cumsum(0)
    starts = ends - padded
    sorted_group = group[order]
    sorted_kept = kept[order]
    first_of_group = (counts.cumsum(0) - counts)[sorted_group.clamp(max=num_local - 1)]
    rank = torch.arange(order.numel(), device=device) - first_of_group
    dest = starts[sorted_group.clamp(max=num_local - 1)] + rank
    order, dest = order[sorted_kept], dest[sorted_kept]
    dst_rows = torch.full((num_tokens * top_k,), -1, dtype=torch.int64, device=device)
    dst_rows[order] = dest
    src_rows = torch.full((rows,), -1, dtype=torch.int64, device=device)
    src_rows[dest] = order
    permuted = tokens.new_zeros(rows, tokens.shape[1])
    permuted[dest] = tokens[order // top_k]
    return permuted, dst_rows.view(num_tokens, top_k), src_rows, ends.to(torch.int32)


def torch_unpermute(
    permuted: torch.Tensor, dst_rows: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Reference combine: float32 (float64) accumulation in slot order, one rounding."""
    acc = _routing_acc(permuted.dtype)
    out = permuted.new_zeros(dst_rows.shape[0], permuted.shape[1], dtype=acc)
    for j in range(dst_rows.shape[1]):
        rows = dst_rows[:, j]
        term = permuted[rows.clamp(min=0)].to(acc)
        if weights is not None:
            term = term * weights[:, j : j + 1].to(acc)
        out = out + torch.where((rows >= 0).unsqueeze(1), term, 0)
    return out.to(permuted.dtype)

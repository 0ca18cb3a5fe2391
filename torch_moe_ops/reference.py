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
        # +inf + -inf: a NaN group key ranks as -inf, as a NaN expert key does.
        group_key = group_key.masked_fill(group_key.isnan(), float("-inf"))
        keep = torch.sort(group_key, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        mask = torch.zeros(tokens, n_group, dtype=torch.bool, device=logits.device).scatter(1, keep, True)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    if n_group > 1:
        # Only the kept groups' experts are eligible: they go first, in key order. (Masking the
        # others' keys with -inf would let them tie with a -inf key inside a kept group.)
        eligible = mask.repeat_interleave(group_size, dim=1).gather(1, order)
        order = order.gather(1, torch.sort(eligible.to(torch.int8), dim=-1, descending=True, stable=True).indices)
    ids = order[:, :k]
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
    # A gather, which every dtype has (index_put is missing for some): row -1 of
    # the tokens and a zero row is that zero row, for padding.
    padded_tokens = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])])
    permuted = padded_tokens[src_rows.div(top_k, rounding_mode="floor")]
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


# ------------------------------------------------------------------ expert MLP
# The contract of moe_ops::expert_mlp (csrc/moe/ExpertMLP.h).


def _expert_activation(h: torch.Tensor, activation: str, interleaved: bool, alpha: float, limit: float):
    """act(h) from the definitions; gated activations split h into gate and up halves."""
    if activation == "silu":
        return h * torch.sigmoid(h)
    if activation == "gelu":
        return 0.5 * h * (1 + torch.erf(h / 2**0.5))
    if activation == "relu":
        return h.clamp(min=0)
    inter = h.shape[1] // 2
    gate, up = (h[:, 0::2], h[:, 1::2]) if interleaved else (h[:, :inter], h[:, inter:])
    if activation == "swiglu":
        return gate * torch.sigmoid(gate) * up
    if activation == "geglu":
        return 0.5 * gate * (1 + torch.erf(gate / 2**0.5)) * up
    g = gate.clamp(max=limit)  # swiglu_clamped (gpt-oss)
    return (up.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)


def torch_expert_mlp(
    tokens: torch.Tensor,
    src_rows: torch.Tensor,
    offs: torch.Tensor,
    dst_rows: torch.Tensor,
    weights: Optional[torch.Tensor],
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    activation: str = "swiglu",
    gate_up_interleaved: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference experts: every step in float64, ``out`` and ``h`` rounded once to the tokens' dtype.
    (The op also stores the activation in the tokens' dtype: in float16 it can overflow there and
    not here.)

    Row ``r`` of ``h`` is token ``src_rows[r] // k`` (zeros for padding, -1)
    through its group's ``gate_up_proj``; rows past ``offs[-1]`` are zero."""
    f64 = torch.float64
    rows = src_rows.div(dst_rows.shape[1], rounding_mode="floor")
    x = torch.cat([tokens.to(f64), tokens.new_zeros(1, tokens.shape[1], dtype=f64)])[rows]  # -1: the zero row
    h = torch_grouped_mm(x, gate_up_proj, offs, gate_up_bias, f64)
    a = _expert_activation(h, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit)
    y = torch_grouped_mm(a, down_proj, offs, down_bias, f64)
    out = torch_unpermute(y, dst_rows, weights)
    return out.to(tokens.dtype), h.to(tokens.dtype)


# ------------------------------------------------------------------ fp8 quantisation
# The contract of moe_ops::quantize_fp8 / dequantize_fp8 (csrc/ATen/native/MoEQuantize.h),
# written with torch's own float -> float8 conversion on scaled, clamped values.

FP8_RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx")
_FP8_BLOCK = {"tensorwise": (0, 0), "rowwise": (1, 0), "blockwise_1x128": (1, 128),
              "blockwise_128x128": (128, 128), "mx": (1, 32)}
_FP8_EMAX = {torch.float8_e4m3fn: 8, torch.float8_e5m2: 15}


def _fp8_blocks(rows: int, cols: int, recipe: str, offs: Optional[torch.Tensor]):
    """Row blocks [(r0, r1)] and column segments [(c0, c1)] of one matrix."""
    br, bc = _FP8_BLOCK[recipe]
    if offs is not None and recipe != "mx":
        ends = offs.tolist()
        segs = list(zip([0] + ends[:-1], ends))
    elif bc:
        segs = [(c, min(c + bc, cols)) for c in range(0, cols, bc)]
    else:
        segs = [(0, cols)]
    if br == 0:
        rblocks = [(0, rows)]
    else:
        rblocks = [(r, min(r + br, rows)) for r in range(0, rows, br)]
    return rblocks, segs


def _fp8_swizzle(grid: torch.Tensor) -> torch.Tensor:
    """(R, S) scale grid -> the blocked 32_4_4 layout, (round_up(R, 128), round_up(S, 4))."""
    rows, cols = grid.shape
    rp, sp = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = grid.new_zeros(rp, sp)
    padded[:rows, :cols] = grid
    tiles = padded.view(rp // 128, 128, sp // 4, 4).permute(0, 2, 1, 3)  # (row tile, col tile, 128, 4)
    tiles = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)                  # row 32 i + j -> [j][i]
    return tiles.reshape(rp, sp)


def torch_quantize_fp8(
    x: torch.Tensor,
    recipe: str,
    float8_dtype: Optional[torch.dtype] = None,
    offs: Optional[torch.Tensor] = None,
    swizzle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantisation: per block amax in float32, then ``(x * q).clamp(...).to(float8)``.

    Loops over blocks, so it is slow and independent of the kernel's structure.
    """
    f8 = float8_dtype or torch.float8_e4m3fn
    fmax = torch.finfo(f8).max
    xs = x.float() if x.dim() == 3 else x.float().unsqueeze(0)
    nb, rows, cols = xs.shape
    rblocks, segs = _fp8_blocks(rows, cols, recipe, offs)
    q = torch.empty(nb, len(rblocks), len(segs))
    scale = torch.empty(nb, len(rblocks), len(segs), dtype=torch.float8_e8m0fnu if recipe == "mx" else torch.float32)
    for b in range(nb):
        for i, (r0, r1) in enumerate(rblocks):
            for j, (c0, c1) in enumerate(segs):
                blk = xs[b, r0:r1, c0:c1]
                amax = blk.abs().amax() if blk.numel() else torch.tensor(0.0)
                if recipe == "mx":
                    if not bool(torch.isfinite(amax)):
                        q[b, i, j] = float("nan")
                        scale[b, i, j] = torch.tensor(255, dtype=torch.uint8).view(torch.float8_e8m0fnu)
                    else:
                        # floor(log2(amax)) from the float32 exponent field.
                        e = int((amax.view(torch.int32) >> 23) & 0xFF) - 127 - _FP8_EMAX[f8]
                        e = min(max(e, -127), 127)
                        q[b, i, j] = 2.0 ** -e
                        scale[b, i, j] = torch.tensor(e + 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
                else:
                    qq = torch.div(torch.tensor(fmax, dtype=torch.float32), amax.clamp_min(1e-12))
                    q[b, i, j] = qq
                    scale[b, i, j] = torch.reciprocal(qq)
    # q of every element (columns past the last group are set to +0 below).
    qe = torch.zeros(nb, rows, cols)
    for i, (r0, r1) in enumerate(rblocks):
        for j, (c0, c1) in enumerate(segs):
            qe[:, r0:r1, c0:c1] = q[:, i, j, None, None]
    y = (xs * qe).clamp(-fmax, fmax)
    y = torch.where(y.isnan(), float("nan"), y)  # one NaN byte (0x7F), whatever the sign
    if offs is not None and recipe != "mx":
        y[:, :, segs[-1][1] if segs else 0:] = 0.0  # no group: +0
    data = y.to(f8).reshape(x.shape)
    scale = _fp8_scale_layout(scale, x.dim(), recipe, offs, swizzle)
    return data, scale


def _fp8_scale_layout(grid: torch.Tensor, dim: int, recipe: str, offs, swizzle: bool) -> torch.Tensor:
    """(B, row blocks, segments) grid -> the documented scale shape."""
    nb = grid.shape[0]
    if offs is not None and recipe == "tensorwise":
        return grid[0, 0]
    if offs is not None and recipe == "rowwise":
        return grid[0].t().contiguous()
    if recipe == "tensorwise":
        out = grid[:, 0, 0]
    elif recipe == "rowwise":
        out = grid[:, :, 0]
    elif swizzle:
        bits = grid.view(torch.uint8)
        out = torch.stack([_fp8_swizzle(bits[b]) for b in range(nb)]).view(torch.float8_e8m0fnu)
        if dim == 3:
            out = out.reshape(nb, -1)
    else:
        out = grid
    return out[0] if dim == 2 else out


def torch_dequantize_fp8(
    data: torch.Tensor,
    scale: torch.Tensor,
    recipe: str,
    out_dtype: Optional[torch.dtype] = None,
    offs: Optional[torch.Tensor] = None,
    swizzle: bool = False,
) -> torch.Tensor:
    """Reference dequantisation: ``float(data) * scale`` in float32, rounded once to out_dtype."""
    ds = data if data.dim() == 3 else data.unsqueeze(0)
    nb, rows, cols = ds.shape
    rblocks, segs = _fp8_blocks(rows, cols, recipe, offs)
    grid = _fp8_scale_grid(scale.float(), nb, rows, len(rblocks), len(segs), data.dim(), recipe, offs, swizzle)
    se = torch.zeros(nb, rows, cols)
    for i, (r0, r1) in enumerate(rblocks):
        for j, (c0, c1) in enumerate(segs):
            se[:, r0:r1, c0:c1] = grid[:, i, j, None, None]
    out = ds.float() * se
    if offs is not None and recipe != "mx":
        out[:, :, segs[-1][1] if segs else 0:] = 0
    return out.reshape(data.shape).to(out_dtype or torch.float32)


def _fp8_scale_grid(scale, nb, rows, nrb, nseg, dim, recipe, offs, swizzle) -> torch.Tensor:
    """The inverse of _fp8_scale_layout: scale -> (B, row blocks, segments)."""
    if offs is not None and recipe == "tensorwise":
        return scale.view(1, 1, nseg)
    if offs is not None and recipe == "rowwise":
        return scale.t().reshape(1, rows, nseg)
    s = scale if dim == 3 else scale.unsqueeze(0)
    if recipe == "tensorwise":
        return s.reshape(nb, 1, 1)
    if recipe == "rowwise":
        return s.reshape(nb, rows, 1)
    if swizzle:
        return _fp8_unswizzle(s, rows, nseg)
    return s


def _fp8_unswizzle(s: torch.Tensor, rows: int, nseg: int) -> torch.Tensor:
    """Swizzled scales (B, ...) of (rows, nseg) grids -> the grids (B, rows, nseg)."""
    nb = s.shape[0]
    rp, sp = -(-rows // 128) * 128, -(-nseg // 4) * 4
    flat = s.reshape(nb, rp // 128, sp // 4, 32, 4, 4)   # [tile r][tile c][j][i][c]
    grid = flat.permute(0, 1, 4, 3, 2, 5).reshape(nb, rp, sp)
    return grid[:, :rows, :nseg]


def torch_swizzle_mx_scale(scale: torch.Tensor, offs: torch.Tensor, dim: int) -> torch.Tensor:
    """Reference per-group blocked MX scales: each group's part of the (R, S) grid
    through ``_fp8_swizzle`` on its own, the groups' bytes one after the other."""
    rows, s = scale.shape
    ends = offs.tolist()
    bits = scale.view(torch.uint8)
    if dim == 0:
        out = torch.zeros(rows + 128 * len(ends), -(-s // 4) * 4, dtype=torch.uint8)
    else:
        out = torch.zeros(-(-rows // 128) * 128, s + 4 * len(ends), dtype=torch.uint8)
    flat = out.view(-1)
    pos, start = 0, 0
    for end in ends:
        part = bits[start:end] if dim == 0 else bits[:, -(-start // 32):-(-end // 32)]
        if part.numel():
            blk = _fp8_swizzle(part).reshape(-1)
            flat[pos:pos + blk.numel()] = blk
            pos += blk.numel()
        start = end
    return out.view(torch.float8_e8m0fnu)


def _fp8_unswizzle_groups(scale: torch.Tensor, rows: int, s: int, offs: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of torch_swizzle_mx_scale: the plain (rows, s) grid; no group: 1.0."""
    flat = scale.contiguous().view(torch.uint8).reshape(-1)
    out = torch.full((rows, s), 127, dtype=torch.uint8)
    pos, start = 0, 0
    for end in offs.tolist():
        r0, r1, c0, c1 = (start, end, 0, s) if dim == 0 else (0, rows, -(-start // 32), -(-end // 32))
        if r1 > r0 and c1 > c0:
            n = (-(-(r1 - r0) // 128) * 128) * (-(-(c1 - c0) // 4) * 4)
            out[r0:r1, c0:c1] = _fp8_unswizzle(flat[pos:pos + n].view(1, n), r1 - r0, c1 - c0)[0]
            pos += n
        start = end
    return out.view(torch.float8_e8m0fnu)


def torch_scaled_grouped_mm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    offs: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale_result: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    use_fast_accum: bool = False,
    acc_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference scaled grouped mm: dequantise in ``acc_dtype``, ``torch_grouped_mm``, round once."""
    out_dtype = out_dtype or torch.bfloat16
    a, b = mat_a.to(acc_dtype), mat_b.to(acc_dtype)
    sa, sb = scale_a.to(acc_dtype), scale_b.to(acc_dtype)
    layout = f"{mat_a.dim()}d{mat_b.dim()}d"
    k = a.shape[-1]
    n = b.shape[-1]
    if scale_a.dtype == torch.float8_e8m0fnu:  # 1x32 blocks along K
        s = -(-k // 32)
        if mat_a.dim() == 3 and scale_a.dim() == 2:  # swizzled
            sa = _fp8_unswizzle(sa, a.shape[1], s)
        if mat_b.dim() == 3 and scale_b.dim() == 2:
            sb = _fp8_unswizzle(sb, n, s)
        dim = 1 if layout == "2d2d" else 0  # 2-D operands: blocked per group of rows (2D x 3D) or of K (2D x 2D)
        if mat_a.dim() == 2:
            sa = _fp8_unswizzle_groups(scale_a, a.shape[0], s, offs, dim).to(acc_dtype)
        if mat_b.dim() == 2:
            sb = _fp8_unswizzle_groups(scale_b, n, s, offs, dim).to(acc_dtype)
        a = a * sa.repeat_interleave(32, -1)[..., :k]
        b = b * sb.repeat_interleave(32, -1)[..., :k].transpose(-2, -1)
    elif layout in ("2d3d", "3d3d") and scale_a.dim() == mat_a.dim():  # 1x128 (A) and 128x128 (B^T) blocks
        a = a * sa.repeat_interleave(128, -1)[..., :k]
        sbe = sb.repeat_interleave(128, -2)[..., :n, :].repeat_interleave(128, -1)[..., :k]  # (G, N, K)
        b = b * sbe.transpose(-2, -1)
    elif layout == "2d2d":  # per group: row scales of A and column scales of B, applied after the product
        out = torch_grouped_mm(a, b, offs, None, acc_dtype, acc_dtype)
        groups, m, n = out.shape
        out = out * sa.view(groups, m, 1) * sb.view(groups, 1, n)
        if bias is not None:
            out = out + bias.to(acc_dtype).unsqueeze(1)
        return out.to(out_dtype)
    elif layout == "2d3d":
        a, b = a * sa[:, None], b * sb[:, None, :]
    elif layout == "3d3d":
        a, b = a * sa[:, :, None], b * sb[:, None, :]
    else:  # 3d2d
        a, b = a * sa[:, :, None], b * sb[None, :]
    return torch_grouped_mm(a, b, offs, bias, acc_dtype, acc_dtype).to(out_dtype)


def torch_scaled_grouped_mm_v2(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    scale_a: list,
    recipe_a: list,
    swizzle_a: list,
    scale_b: list,
    recipe_b: list,
    swizzle_b: list,
    offs: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    contraction_dim: list = (),
    use_fast_accum: bool = False,
    acc_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference of ``_scaled_grouped_mm_v2``: the operands dequantised in ``acc_dtype`` as the stated
    recipes say (ScalingType 1 RowWise, 3 BlockWise1x32, 4 / 5 BlockWise1x128 / BlockWise128x128;
    SwizzleType 1 SWIZZLE_32_4_4), ``torch_grouped_mm``, rounded once."""
    (sa,), (sb,), (ra,), (rb,) = scale_a, scale_b, recipe_a, recipe_b
    swa, swb = bool(len(swizzle_a) and swizzle_a[0]), bool(len(swizzle_b) and swizzle_b[0])
    if (ra, rb) != (3, 3):
        # RowWise x RowWise or BlockWise1x128 x BlockWise128x128: scales never swizzled; the v1
        # reference reads these two from the rank of scale_a, which the stated recipe fixes.
        blockwise = (ra, rb) == (4, 5)
        if not (blockwise or (ra, rb) == (1, 1)) or swa or swb or (sa.dim() == mat_a.dim()) != blockwise:
            raise ValueError(f"torch_scaled_grouped_mm_v2: no reference for recipes {ra} x {rb}, swizzles "
                             f"{list(swizzle_a)} x {list(swizzle_b)} with scale_a of rank {sa.dim()}")
        return torch_scaled_grouped_mm(mat_a, mat_b, sa, sb, offs, bias, None, out_dtype, acc_dtype=acc_dtype)
    out_dtype = out_dtype or torch.bfloat16
    k, layout = mat_a.shape[-1], f"{mat_a.dim()}d{mat_b.dim()}d"
    s = -(-k // 32)

    def grid(scale, mat, rows, swizzled):  # the (.., rows, S) grid of 1x32 blocks along K
        if mat.dim() == 2:  # blocked per group: of rows (2D x 3D) or of K (2D x 2D)
            return _fp8_unswizzle_groups(scale, rows, s, offs, 1 if layout == "2d2d" else 0).to(acc_dtype)
        return (_fp8_unswizzle(scale.to(acc_dtype), rows, s) if swizzled else scale.to(acc_dtype))

    ga = grid(sa, mat_a, mat_a.shape[-2], swa)
    gb = grid(sb, mat_b, mat_b.shape[-1], swb)
    a = mat_a.to(acc_dtype) * ga.repeat_interleave(32, -1)[..., :k]
    b = mat_b.to(acc_dtype) * gb.repeat_interleave(32, -1)[..., :k].transpose(-2, -1)
    return torch_grouped_mm(a, b, offs, bias, acc_dtype, acc_dtype).to(out_dtype)

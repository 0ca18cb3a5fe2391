"""Fused experts in Triton: ``moe_ops::expert_mlp`` and its backward (issue 16
item 2, SonicMoE's design), no atomics anywhere. The forward in three launches:

1. ``expert_gemm_kernel`` with ``STAGE=0``: row ``r`` of the tokens gathered by
   ``src_rows[r] // top_k`` in the A load (-1: a zero row), times the expert's
   ``gate_up_proj``, plus ``gate_up_bias``. Gated activations keep two
   accumulators per tile, the gate and the up columns of the same output
   columns (``n`` and ``I + n``, or ``2n`` and ``2n + 1`` interleaved), so the
   activation runs in the epilogue. It stores ``h (R, N1)``, the
   pre-activation rounded to the tokens' dtype (expert_mlp's ``h``: what the
   backward keeps), and ``a = act(h) (R, I)`` computed in fp32 *from the stored
   h* (as ``moe_ops.expert_mlp`` and its backward do), rounded once.
2. ``expert_gemm_kernel`` with ``STAGE=1``: ``a`` times the expert's
   ``down_proj`` plus ``down_bias``, scaled in fp32 by the routing weight of
   the row's slot, stored in fp32 to row ``src_rows[r]`` (slot order
   ``token * top_k + j``) of a ``(T * top_k, H)`` buffer; padding rows store
   nothing.
3. ``combine_kernel``: ``out[t] = sum_j Y[t * top_k + j]`` over the slots
   with ``dst_rows[t, j] >= 0``, in slot order in fp32, one rounding: the
   same order as ``moe_ops.unpermute``, so the bits do not depend on the
   schedule (each slot row is written by exactly one tile).

The backward (``triton_expert_mlp_backward``, from the inputs, the routing
and h only): ``STAGE=2`` of the same kernel, ``g = grad_out[token] @ down^T``
with the activation's derivative in the epilogue (dSwiGLU etc. from h),
storing dh, ``w * act(h)`` and per-tile partial sums of the routing weights'
gradient; then ``grouped_mm_kernel`` for ``dh @ gate_up^T`` (combined per
token in slot order by ``combine_kernel``) and for the weight gradients as
variable-K (2D x 2D) grouped GEMMs reading tokens and grad_out through the
index. ``moe_ops_triton::expert_mlp`` is differentiable through it.

Against ``moe_ops.expert_mlp`` (the composition in csrc/moe/ExpertMLP.cpp) the only
numerical difference is that the down projection's rows are not rounded to
the dtype before the weighted sum (fp32 all the way to the one final
rounding), closer to the float64 reference.

Schedule and loads as ``grouped_mm_kernel`` (2D x 3D only): persistent
programs over the tiles of every group counted from ``offs`` on the device,
the rows past ``offs[-1]`` one more tail group (no K: h = 0, a = act(0) = 0,
Y = 0 for them), M-fastest within a group; the weights by TMA on sm_90+
when aligned (split gate/up only: interleaved columns are pointer loads,
a TMA box cannot stride by 2 in its inner dimension).

The fp8 forward (``triton_expert_mlp_fp8``, ``moe_ops_triton::expert_mlp_fp8``;
inference, or the forward of fp8 training): stage 0 with ``QUANT`` stores act
as float8 data and scales instead of act (and h only if asked), so neither
reaches memory in 16 or 32 bits: act rounded to the tokens' dtype (what the
unfused path stores) and quantised as ``quantize_fp8`` does, in 1x128 or mx
(1x32) blocks of the tile (BLOCK_N a multiple of the block: one pass; mx scales
written in ``swizzle_mx_scale``'s per-group blocked layout, at the group's
byte offset that the schedule's cursor carries) or rowwise (the row's amax
needs every N tile: a program owns a block of rows and sweeps its N tiles
twice, the gate/up GEMM computed twice). The down GEMM is
``fp8.scaled_grouped_mm_kernel`` on those rows (fp32 out, the down bias), and
the combine weights each token's rows in slot order.

Routing values (src_rows and dst_rows inverse maps, offs non-decreasing)
are not checked here (no host sync, no device asserts): the shapes and dtypes
are checked as ``moe_ops.expert_mlp`` checks them.

Helpers (``_mainloop``, ``_gate_up_tile``, grouped_mm.py's schedule) are
@triton.jit functions: the interpreted launches route their calls to the
interpreter (``grouped_mm._interpreting``).

What only a GPU can verify: the compiled kernels' numerics (wgmma order,
fast ``exp``/``erf``), the autotuner's choice, TMA's zero fill (emulated by the
interpreter), races, and whether fp32 for Y (8 bytes per element written and
read) is the right trade against 16-bit Y; timing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _checks
from .._autograd import register_autograd
from . import fp8 as f8
from . import grouped_mm as gm

# Activation codes (constexpr ACTIVATION); < 3 are gated.
ACTIVATIONS = {"swiglu": 0, "geglu": 1, "swiglu_clamped": 2, "silu": 3, "gelu": 4, "relu": 5}


@triton.jit
def _columns(offs_n, N, GLU: tl.constexpr, INTERLEAVED: tl.constexpr):
    """h's columns of the gate (or only) and up halves of output columns offs_n."""
    if GLU and INTERLEAVED:
        return 2 * offs_n, 2 * offs_n + 1
    elif GLU:
        return offs_n, offs_n + N
    else:
        return offs_n, offs_n


@triton.jit
def _mainloop(a_ptr, b_ptr, b_desc, a_rows, row_ok, cols_g, cols_u, mask_n, g, n0, N, k_hi,
              stride_am, stride_ak, stride_bg, stride_bk, stride_bn,
              TWO: tl.constexpr, B_DESC: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K loop: A's rows a_rows (row_ok: else zeros) times B's columns cols_g
    and, TWO (a gated gate/up GEMM), cols_u into a second accumulator."""
    g64 = tl.cast(g, tl.int64)  # g is a Python int in the interpreter
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_base = b_ptr + g64 * stride_bg + offs_k[:, None].to(tl.int64) * stride_bk
    bg_ptrs = b_base + cols_g[None, :].to(tl.int64) * stride_bn
    bu_ptrs = b_base + cols_u[None, :].to(tl.int64) * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
    for k in range(0, k_hi, BLOCK_K):
        k_ok = (k + offs_k) < k_hi
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # The gate tile's columns past I read up columns through the descriptor: never stored.
        b = gm._load_b(b_desc, bg_ptrs, k_ok[:, None] & mask_n[None, :], g, k, n0, B_DESC, BLOCK_K, BLOCK_N)
        # out_dtype: Triton 3.6 asserts that an fp64 accumulator is out_dtype's (float32 by default).
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        if TWO:  # the up columns: N further in (G, K, N1), or by pointers when interleaved
            bu = gm._load_b(b_desc, bu_ptrs, k_ok[:, None] & mask_n[None, :], g, k, n0 + N, B_DESC, BLOCK_K,
                            BLOCK_N)
            acc_u = tl.dot(a, bu, acc_u, input_precision=INPUT_PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        bg_ptrs += BLOCK_K * stride_bk
        bu_ptrs += BLOCK_K * stride_bk
    return acc, acc_u


@triton.jit
def _activation(x, up, alpha, limit, ACTIVATION: tl.constexpr):
    """act(gate x, up) (gated) or act(x), in x's precision."""
    if ACTIVATION == 0:  # swiglu: silu(gate) * up
        return x / (1.0 + tl.exp(-x)) * up
    elif ACTIVATION == 1:  # geglu: gelu(gate) * up (erf form)
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476)) * up
    elif ACTIVATION == 2:  # gpt-oss: (clamp(up, -limit, limit) + 1) * gate' * sigmoid(alpha * gate'), gate' <= limit
        xc = tl.minimum(x, limit)
        uc = tl.minimum(tl.maximum(up, -limit), limit)
        return (uc + 1.0) * (xc / (1.0 + tl.exp(-alpha * xc)))
    elif ACTIVATION == 3:
        return x / (1.0 + tl.exp(-x))
    elif ACTIVATION == 4:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _gate_up_tile(a_ptr, b_ptr, b_desc, bias_ptr, h_ptr, a_rows, row_ok, offs_m, mask_m, n0, g, G, N, k_hi,
                  stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_biasg, stride_biasn,
                  stride_hm, stride_hn, alpha, limit,
                  STORE_H: tl.constexpr, ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, B_DESC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Stage 0 for output columns n0 + [0, BLOCK_N) of rows offs_m: the gate/up
    GEMM (two accumulators when gated), the bias, h rounded to the tokens' dtype
    (stored if STORE_H) and act computed in fp32 from that rounded h, as the
    backward will read it. Returns (act, offs_n, mask_n)."""
    ACC: tl.constexpr = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    GLU: tl.constexpr = ACTIVATION < 3
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols_g, cols_u = _columns(offs_n, N, GLU, INTERLEAVED)
    acc, acc_u = _mainloop(a_ptr, b_ptr, b_desc, a_rows, row_ok, cols_g, cols_u, mask_n, g, n0, N, k_hi,
                           stride_am, stride_ak, stride_bg, stride_bk, stride_bn, GLU, B_DESC, INPUT_PRECISION, ACC,
                           BLOCK_M, BLOCK_N, BLOCK_K)
    g64 = tl.cast(g, tl.int64)
    bias_ok = mask_n & (g < G)
    if HAS_BIAS:
        bias_base = bias_ptr + g64 * stride_biasg
        bias_g = tl.load(bias_base + cols_g.to(tl.int64) * stride_biasn, mask=bias_ok, other=0.0)
        acc += bias_g.to(ACC)[None, :]
        if GLU:
            bias_u = tl.load(bias_base + cols_u.to(tl.int64) * stride_biasn, mask=bias_ok, other=0.0)
            acc_u += bias_u.to(ACC)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    h_row = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm
    h_g = acc.to(h_ptr.dtype.element_ty)
    if STORE_H:
        tl.store(h_row + cols_g[None, :].to(tl.int64) * stride_hn, h_g, mask=mask)
    x = h_g.to(ACC)
    up = x
    if GLU:
        h_u = acc_u.to(h_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_row + cols_u[None, :].to(tl.int64) * stride_hn, h_u, mask=mask)
        up = h_u.to(ACC)
    return _activation(x, up, alpha, limit, ACTIVATION), offs_n, mask_n


@triton.jit(do_not_specialize=["G", "M", "top_k", "num_programs"])
def expert_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, offs_ptr, src_ptr, w_ptr, h_ptr, out_ptr, aux_ptr, dw_ptr,
    G, M, N, K, NB, top_k,
    stride_am, stride_ak,
    stride_bg, stride_bk, stride_bn,
    stride_biasg, stride_biasn,
    stride_wt, stride_wk,
    stride_hm, stride_hn,
    stride_om, stride_on,
    stride_xm, stride_xn,
    stride_dwm,
    qs_ptr, stride_qsm, stride_qsn,
    alpha, limit,
    num_programs,
    STAGE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    B_DESC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr,  # stage 0: act stored as 16/32-bit (0) or float8: rowwise (1), 1x128 (2), mx (3)
    STORE_H: tl.constexpr,  # stage 0: store h (the backward's operand)
    MANT: tl.constexpr, BIAS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr,
    FP8_MAX: tl.constexpr, EMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # STAGE 0: a_ptr tokens (T, H), b_ptr gate_up (G, H, NB = N1), N output columns (I gated, N1 not),
    #   h_ptr h (R, N1), out_ptr act (R, N). STAGE 1: a_ptr act (R, I), b_ptr down (G, I, NB = H),
    #   out_ptr the fp32 slot rows (T * top_k, H). STAGE 2 (backward): a_ptr grad_out (T, H) gathered
    #   as in stage 0, b_ptr down^T (G, H, NB = I), N = I (gated) or N1; h_ptr h (R, N1) read, out_ptr
    #   dh (R, N1), aux_ptr w * act(h) (R, N), dw_ptr (R, N tiles) fp32 partial sums of g * act(h).
    #   M = R, the rows offs splits. Schedule and B's loads by grouped_mm's shared helpers.
    #   QUANT > 0 (stage 0): out_ptr the float8 bits of act (R, N), qs_ptr its scales (rowwise (R,);
    #   1x128 (R, cdiv(N, 128)); mx: e8m0 bytes blocked per group of rows, swizzle_mx_scale's layout).
    pid = tl.program_id(0)
    # Accumulators and epilogue arithmetic: fp32, fp64 for fp64 inputs.
    ACC: tl.constexpr = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    GLU: tl.constexpr = ACTIVATION < 3
    b_desc = gm._b_descriptor(b_ptr, G, K, NB, stride_bg, stride_bk, stride_bn, B_DESC, BLOCK_K, BLOCK_N)
    # Rowwise float8 act needs the whole row's amax before the first store: a program owns
    # a block of rows (one tile per row block) and sweeps its N tiles twice, the first
    # time for the amax only (the gate/up GEMM computed twice: see triton_expert_mlp_fp8).
    ROWWISE: tl.constexpr = STAGE == 0 and QUANT == 1
    if ROWWISE:
        NS = BLOCK_N
    else:
        NS = N
    total = gm._tile_count(offs_ptr, G, M, NS, 0, BLOCK_M, BLOCK_N)  # 2D x 3D; group G: the rows past offs[-1]
    g = -1
    lo = 0
    hi = 0
    seen = 0
    group_tiles = 0
    pad = 0  # rows of the groups before g, each rounded up to 128 (the mx scale blocked per group of rows)
    SP = ((N + 31) // 32 + 3) // 4 * 4  # mx: the padded width of act's scale grid
    for tile in range(pid, total, num_programs):
        g, lo, hi, seen, group_tiles, pad = gm._advance(tile, g, lo, hi, seen, group_tiles, pad, offs_ptr, G, M,
                                                        NS, 0, BLOCK_M, BLOCK_N)
        offs_m, offs_n, mask_m, mask_n, m_lo, n0, n_hi, k_lo, k_hi, tn = gm._tile_ranges(
            tile, g, lo, hi, seen, G, M, NS, K, 0, BLOCK_M, BLOCK_N)
        g64 = tl.cast(g, tl.int64)
        src = tl.load(src_ptr + offs_m, mask=mask_m, other=-1)
        src_ok = src >= 0
        if STAGE != 1:  # the gather: token src // top_k, a zero row for padding
            row_ok = src_ok
            a_rows = (tl.where(src_ok, src, 0) // top_k).to(tl.int64)
        else:
            row_ok = mask_m
            a_rows = offs_m.to(tl.int64)
        rows64 = offs_m[:, None].to(tl.int64)
        if ROWWISE:
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for n0r in range(0, N, BLOCK_N):
                act, offs_n, mask_n = _gate_up_tile(
                    a_ptr, b_ptr, b_desc, bias_ptr, h_ptr, a_rows, row_ok, offs_m, mask_m, n0r, g, G, N, k_hi,
                    stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_biasg, stride_biasn, stride_hm,
                    stride_hn, alpha, limit, False, ACTIVATION, INTERLEAVED, HAS_BIAS, B_DESC, INPUT_PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_K)
                v = tl.where(mask_n[None, :], act.to(a_ptr.dtype.element_ty).to(tl.float32), 0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
                nan = tl.maximum(nan, tl.max((v != v).to(tl.int32), axis=1))
            q, stored = f8._fp8_block_scale(tl.where(nan > 0, float("nan"), amax), False, FP8_MAX, EMAX)
            tl.store(qs_ptr + offs_m.to(tl.int64) * stride_qsm, stored, mask=mask_m)
            for n0r in range(0, N, BLOCK_N):
                act, offs_n, mask_n = _gate_up_tile(
                    a_ptr, b_ptr, b_desc, bias_ptr, h_ptr, a_rows, row_ok, offs_m, mask_m, n0r, g, G, N, k_hi,
                    stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_biasg, stride_biasn, stride_hm,
                    stride_hn, alpha, limit, STORE_H, ACTIVATION, INTERLEAVED, HAS_BIAS, B_DESC, INPUT_PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_K)
                v = act.to(a_ptr.dtype.element_ty).to(tl.float32)
                bits = f8._fp8_saturated_bits(v * q[:, None], FP8_MAX, MANT, BIAS, MIN_NORMAL, MAGIC)
                tl.store(out_ptr + rows64 * stride_om + offs_n[None, :].to(tl.int64) * stride_on, bits,
                         mask=mask_m[:, None] & mask_n[None, :])
        elif STAGE == 0:
            act, offs_n, mask_n = _gate_up_tile(
                a_ptr, b_ptr, b_desc, bias_ptr, h_ptr, a_rows, row_ok, offs_m, mask_m, n0, g, G, N, k_hi,
                stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_biasg, stride_biasn, stride_hm,
                stride_hn, alpha, limit, STORE_H, ACTIVATION, INTERLEAVED, HAS_BIAS, B_DESC, INPUT_PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_K)
            mask = mask_m[:, None] & mask_n[None, :]
            out_ptrs = out_ptr + rows64 * stride_om + offs_n[None, :].to(tl.int64) * stride_on
            if QUANT == 0:
                tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                # act rounded to the tokens' dtype (what the unfused path stores), quantised in
                # 1 x QB blocks of its rows: a tile holds whole blocks (BLOCK_N % QB == 0).
                QB: tl.constexpr = 128 if QUANT == 2 else 32
                NBQ: tl.constexpr = BLOCK_N // QB
                bits, stored = f8._quantize_row_blocks(act.to(a_ptr.dtype.element_ty).to(tl.float32), mask_n, QB,
                                                       QUANT == 3, MANT, BIAS, MIN_NORMAL, MAGIC, FP8_MAX, EMAX,
                                                       BLOCK_M, BLOCK_N)
                tl.store(out_ptrs, bits, mask=mask)
                blocks = tn * NBQ + tl.arange(0, NBQ)
                s_mask = mask_m[:, None] & (blocks * QB < N)[None, :]
                if QUANT == 3:  # group g's blocks start at byte pad * SP; rows past offs[-1] have none
                    s_off = (tl.cast(pad, tl.int64) * SP
                             + f8._swizzled((offs_m - lo)[:, None], blocks[None, :], SP).to(tl.int64))
                    s_mask = s_mask & (g < G)
                else:
                    s_off = rows64 * stride_qsm + blocks[None, :].to(tl.int64) * stride_qsn
                tl.store(qs_ptr + s_off, stored, mask=s_mask)
        else:
            mask = mask_m[:, None] & mask_n[None, :]
            hcols_g, hcols_u = _columns(offs_n, N, GLU, INTERLEAVED)
            acc, acc_u = _mainloop(a_ptr, b_ptr, b_desc, a_rows, row_ok, offs_n, offs_n, mask_n, g, n0, N, k_hi,
                                   stride_am, stride_ak, stride_bg, stride_bk, stride_bn, False, B_DESC,
                                   INPUT_PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + g64 * stride_biasg + offs_n.to(tl.int64) * stride_biasn,
                               mask=mask_n & (g < G), other=0.0)
                acc += bias.to(ACC)[None, :]
            if STAGE == 1:
                slot = tl.where(src_ok, src, 0).to(tl.int64)
                if HAS_WEIGHTS:  # the routing weight of slot (token, j), in fp32
                    w = tl.load(w_ptr + (slot // top_k) * stride_wt + (slot % top_k) * stride_wk, mask=src_ok,
                                other=0.0)
                    acc = acc * w.to(ACC)[:, None]
                tl.store(out_ptr + slot[:, None] * stride_om + offs_n[None, :].to(tl.int64) * stride_on, acc,
                         mask=src_ok[:, None] & mask_n[None, :])
            else:
                # Backward: acc = g = grad_out[token] @ down^T, the gradient of act(h) before the routing weight.
                slot = tl.where(src_ok, src, 0).to(tl.int64)
                if HAS_WEIGHTS:
                    w = tl.load(w_ptr + (slot // top_k) * stride_wt + (slot % top_k) * stride_wk, mask=src_ok,
                                other=0.0).to(ACC)[:, None]
                    da = acc * w
                else:
                    da = acc
                h_row = h_ptr + rows64 * stride_hm
                x = tl.load(h_row + hcols_g[None, :].to(tl.int64) * stride_hn, mask=mask, other=0.0).to(ACC)
                if GLU:
                    up = tl.load(h_row + hcols_u[None, :].to(tl.int64) * stride_hn, mask=mask, other=0.0).to(ACC)
                    if ACTIVATION == 0:
                        sg = 1.0 / (1.0 + tl.exp(-x))
                        f = x * sg
                        df = sg * (1.0 + x * (1.0 - sg))
                        up_f = up
                        d_up = da * f
                    elif ACTIVATION == 1:
                        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
                        f = x * cdf
                        df = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
                        up_f = up
                        d_up = da * f
                    else:  # clamps pass the gradient strictly inside, as torch.clamp's backward
                        # (selected: an inf or NaN da outside gives 0, not inf * 0; ExpertMLP.cpp)
                        xc = tl.minimum(x, limit)
                        sg = 1.0 / (1.0 + tl.exp(-alpha * xc))
                        f = xc * sg
                        df = sg + xc * alpha * sg * (1.0 - sg)
                        up_f = tl.minimum(tl.maximum(up, -limit), limit) + 1.0
                        d_up = tl.where((up > -limit) & (up < limit), da * f, 0.0)
                    act = f * up_f
                    d_gate = da * up_f * df
                    if ACTIVATION == 2:
                        d_gate = tl.where(x < limit, d_gate, 0.0)
                    dh_row = out_ptr + rows64 * stride_om
                    tl.store(dh_row + hcols_g[None, :].to(tl.int64) * stride_on, d_gate.to(out_ptr.dtype.element_ty),
                             mask=mask)
                    tl.store(dh_row + hcols_u[None, :].to(tl.int64) * stride_on, d_up.to(out_ptr.dtype.element_ty),
                             mask=mask)
                else:
                    if ACTIVATION == 3:
                        sg = 1.0 / (1.0 + tl.exp(-x))
                        act = x * sg
                        dh = da * (sg * (1.0 + x * (1.0 - sg)))
                    elif ACTIVATION == 4:
                        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
                        act = x * cdf
                        dh = da * (cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327)
                    else:
                        act = tl.maximum(x, 0.0)
                        dh = tl.where(x > 0.0, da, 0.0)
                    tl.store(out_ptr + rows64 * stride_om + offs_n[None, :].to(tl.int64) * stride_on,
                             dh.to(out_ptr.dtype.element_ty), mask=mask)
                if HAS_WEIGHTS:
                    aw = act * w
                    # This tile's share of the routing weight's gradient, sum_n g * act(h): one partial per
                    # (row, N tile), summed by the caller in tile order (no atomics). The row sums as an exact
                    # fp32 product with a (BLOCK_N, 16) matrix of ones, column 0 stored.
                    ones = tl.full((BLOCK_N, 16), 1.0, ACC)
                    part = tl.dot(tl.where(mask, acc * act, 0.0), ones, input_precision="ieee", out_dtype=ACC)
                    col = tl.arange(0, 16)
                    tl.store(dw_ptr + offs_m[:, None].to(tl.int64) * stride_dwm + tn + col[None, :] * 0, part,
                             mask=mask_m[:, None] & (col == 0)[None, :])
                else:
                    aw = act
                tl.store(aux_ptr + rows64 * stride_xm + offs_n[None, :].to(tl.int64) * stride_xn,
                         aw.to(aux_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def combine_kernel(
    y_ptr, dst_ptr, out_ptr, w_ptr,
    T, H, top_k,
    stride_dt, stride_dk,
    stride_ym,
    stride_om, stride_on,
    stride_wt, stride_wk,
    BY_DST: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum over j = 0, 1, ... of the slot rows y[t * top_k + j] (BY_DST:
    the rows y[dst_rows[t, j]]; HAS_WEIGHTS: each times its routing weight
    w[t, j], in fp32) with dst_rows[t, j] >= 0, in fp32 (fp64 for fp64 rows) in
    that order, one rounding."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask_h = offs_h < H
    t64 = offs_t.to(tl.int64)
    ACC: tl.constexpr = tl.float64 if y_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.full((BLOCK_T, BLOCK_H), 0.0, ACC)
    for j in range(0, top_k):
        d = tl.load(dst_ptr + t64 * stride_dt + j * stride_dk, mask=mask_t, other=-1)
        if BY_DST:
            slot = tl.where(d >= 0, d, 0).to(tl.int64)
        else:
            slot = t64 * top_k + j
        y = tl.load(y_ptr + slot[:, None] * stride_ym + offs_h[None, :], mask=(d >= 0)[:, None] & mask_h[None, :],
                    other=0.0)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + t64 * stride_wt + j * stride_wk, mask=mask_t & (d >= 0), other=0.0)
            y = y * w.to(ACC)[:, None]
        acc += y
    tl.store(out_ptr + t64[:, None] * stride_om + offs_h[None, :].to(tl.int64) * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_h[None, :])


# Autotuner configurations, every one compiled for sm_90a by test_triton_aot.py.
# Gate/up tiles (gated ones hold two accumulators; every one evaluates the
# activation in the epilogue): half the N width of grouped_mm's tiles. With
# 128x128 tiles the erf epilogue of gelu took 254 registers.
CONFIGS_16BIT_GATE_UP = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
CONFIGS_16BIT = gm.CONFIGS_16BIT
# The backward's dgrad: one accumulator but the heaviest epilogue (h's two halves, act, its
# derivative, three stores and the row sums): 64-wide tiles held 255 registers and spilled
# 440 bytes for the interleaved clamped swiglu; 32-wide tiles do not.
CONFIGS_16BIT_DGRAD = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
CONFIGS_FP32_GATE_UP = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
CONFIGS_FP32 = gm.CONFIGS_FP32
# Gate/up with act quantised in 1x128 blocks (QUANT 2): a tile holds whole blocks, so 128 wide;
# 64 rows on two warpgroups keep the two accumulators at 64 registers a thread. Rowwise and
# mx (whole 32-blocks in 64- and 32-wide tiles) take the gate/up configurations.
CONFIGS_16BIT_GATE_UP_1X128 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
CONFIGS_FP32_GATE_UP_1X128 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
# fp64 (tests, gradcheck on a GPU): every stage, one small tile, correctness only.
CONFIGS_FP64 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
]
COMBINE_CONFIG = triton.Config({"BLOCK_T": 4, "BLOCK_H": 512}, num_warps=4, num_stages=1)
INTERPRETER_CONFIG = gm.INTERPRETER_CONFIG
INTERPRETER_COMBINE_CONFIG = triton.Config({"BLOCK_T": 4, "BLOCK_H": 16}, num_warps=4, num_stages=1)
INTERPRETER_PROGRAMS = gm.INTERPRETER_PROGRAMS

_AUTOTUNE_KEY = ["N", "K", "STAGE", "ACTIVATION", "INTERLEAVED", "HAS_BIAS", "HAS_WEIGHTS", "B_DESC",
                 "INPUT_PRECISION", "QUANT", "STORE_H"]
# act's float8 recipes in the gate/up epilogue (constexpr QUANT) and their block width (0: the row).
QUANT_RECIPES = {"rowwise": 1, "blockwise_1x128": 2, "mx": 3}
_QUANT_BLOCK = {1: 0, 2: 128, 3: 32}


def configs_for(dtype: torch.dtype, stage: int, quant: int = 0) -> list:
    """The configurations the autotuner may pick for a GEMM of ``dtype`` in
    ``stage`` (0: gate/up, 1: down, 2: the backward's dgrad); ``quant``: act's
    float8 recipe in the gate/up epilogue (QUANT_RECIPES' codes)."""
    if dtype == torch.float64:
        return CONFIGS_FP64
    if quant == 2:
        return CONFIGS_FP32_GATE_UP_1X128 if dtype == torch.float32 else CONFIGS_16BIT_GATE_UP_1X128
    if dtype == torch.float32:
        return CONFIGS_FP32 if stage == 1 else CONFIGS_FP32_GATE_UP
    return (CONFIGS_16BIT_GATE_UP, CONFIGS_16BIT, CONFIGS_16BIT_DGRAD)[stage]


def _autotuned(dtype: torch.dtype, stage: int, quant: int = 0):
    """The autotuned kernel for a stage (and act's float8 recipe); float16 and
    bfloat16 share one (the same configurations)."""
    return _autotuned_kernel(torch.bfloat16 if dtype == torch.float16 else dtype, stage, quant)


@functools.lru_cache(maxsize=None)
def _autotuned_kernel(dtype: torch.dtype, stage: int, quant: int):
    return triton.autotune(configs=configs_for(dtype, stage, quant), key=_AUTOTUNE_KEY)(expert_gemm_kernel)


def interpreter_config(quant: int = 0) -> triton.Config:
    """The interpreter's gate/up tile: whole 1x128 / mx blocks when act is quantised in blocks."""
    block = _QUANT_BLOCK.get(quant, 0)
    if not block:
        return INTERPRETER_CONFIG
    return triton.Config({**INTERPRETER_CONFIG.kwargs, "BLOCK_N": block}, num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)
def _interpreted(kernel_name: str):
    from triton.runtime.interpreter import InterpretedFunction

    kernel = {"gemm": expert_gemm_kernel, "combine": combine_kernel}[kernel_name]
    return InterpretedFunction(kernel.fn if hasattr(kernel, "fn") else kernel)


def _b_desc(w: torch.Tensor, stage: int, gated: bool, interleaved: bool, tma: Optional[bool]) -> int:
    if tma is False or w.numel() == 0 or (stage == 0 and gated and interleaved):
        return 0
    if tma is None and (w.device.type != "cuda" or gm._capability(w.device.index or 0)[0] < 9):
        return 0
    order = 1 if gm._tma_ok(w, 2) else 2 if gm._tma_ok(w, 1) else 0
    if tma and order == 0:
        raise ValueError("triton_expert_mlp: tma=True needs weights 16-byte aligned with a unit stride in K or N")
    return order


def _check(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
           activation, gate_up_interleaved):
    _checks.check_expert_mlp_inputs(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                                    gate_up_bias, down_bias, activation, gate_up_interleaved)


def stage_args(stage: int, tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
               down_bias, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, h, act, slot_rows,
               tma=None, grad_out=None, dh=None, dw=None) -> dict:
    """The GEMM kernel's arguments for one stage (0: gate/up, 1: down, 2: the
    backward's dgrad of act(h); there ``act`` receives w * act(h)), but for
    num_programs and INPUT_PRECISION."""
    code = ACTIVATIONS[activation]
    gated = code < 3
    aux = dw_ = None
    if stage == 0:
        a, b, bias, out = tokens, gate_up_proj, gate_up_bias, act
        N = down_proj.shape[1]
    elif stage == 1:
        a, b, bias, out = act, down_proj, down_bias, slot_rows
        N = down_proj.shape[2]
    else:
        a, b, bias, out, aux, dw_ = grad_out, down_proj.transpose(-2, -1), None, dh, act, dw
        N = down_proj.shape[1]
    aux = aux if aux is not None else out
    dw_ = dw_ if dw_ is not None else a
    return dict(
        a_ptr=a, b_ptr=b, bias_ptr=bias if bias is not None else a, offs_ptr=offs, src_ptr=src_rows,
        w_ptr=weights if weights is not None else a, h_ptr=h, out_ptr=out, aux_ptr=aux, dw_ptr=dw_,
        G=offs.shape[0], M=src_rows.shape[0], N=N, K=a.shape[1], NB=b.shape[2], top_k=dst_rows.shape[1],
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_bg=b.stride(0), stride_bk=b.stride(1), stride_bn=b.stride(2),
        stride_biasg=bias.stride(0) if bias is not None else 0, stride_biasn=bias.stride(1) if bias is not None else 0,
        stride_wt=weights.stride(0) if weights is not None else 0,
        stride_wk=weights.stride(1) if weights is not None else 0,
        stride_hm=h.stride(0), stride_hn=h.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
        stride_xm=aux.stride(0), stride_xn=aux.stride(1), stride_dwm=dw_.stride(0) if dw_.dim() else 0,
        qs_ptr=a, stride_qsm=0, stride_qsn=0,
        alpha=float(swiglu_alpha), limit=float(swiglu_limit),
        STAGE=stage, ACTIVATION=code, INTERLEAVED=bool(gate_up_interleaved) and gated,
        HAS_BIAS=bias is not None, HAS_WEIGHTS=stage != 0 and weights is not None,
        B_DESC=_b_desc(b, stage, gated, gate_up_interleaved, tma),
        QUANT=0, STORE_H=True, **_fp8_format(torch.float8_e4m3fn),
    )


def _fp8_format(float8_dtype) -> dict:
    f = f8._FP8[float8_dtype]
    return dict(MANT=f[0], BIAS=f[1], MIN_NORMAL=f[2], MAGIC=f[3], FP8_MAX=f[4], EMAX=f[5])


def combine_args(slot_rows, dst_rows, out, by_dst=False, weights=None) -> dict:
    assert slot_rows.stride(1) == 1
    return dict(y_ptr=slot_rows, dst_ptr=dst_rows, out_ptr=out, w_ptr=weights if weights is not None else slot_rows,
                T=out.shape[0], H=out.shape[1],
                top_k=dst_rows.shape[1], stride_dt=dst_rows.stride(0), stride_dk=dst_rows.stride(1),
                stride_ym=slot_rows.stride(0), stride_om=out.stride(0), stride_on=out.stride(1),
                stride_wt=weights.stride(0) if weights is not None else 0,
                stride_wk=weights.stride(1) if weights is not None else 0,
                BY_DST=by_dst, HAS_WEIGHTS=weights is not None)


def _allocate(tokens, src_rows, dst_rows, gate_up_proj, down_proj):
    R, n1, inter = src_rows.shape[0], gate_up_proj.shape[2], down_proj.shape[1]
    h = tokens.new_empty((R, n1))
    act = tokens.new_empty((R, inter))
    slot_rows = tokens.new_empty((tokens.shape[0] * dst_rows.shape[1], tokens.shape[1]), dtype=_acc(tokens.dtype))
    out = tokens.new_empty(tokens.shape)
    return out, h, act, slot_rows


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulator dtype for inputs of dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _meta(config: triton.Config) -> dict:
    """A fixed config's launch arguments (wrap_triton refuses num_ctas and the like)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _run_gemm(args, allow_tf32, config, num_programs, wrap):
    dtype = args["a_ptr"].dtype
    args["INPUT_PRECISION"] = "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"
    M, N = args["M"], args["N"]
    if M == 0 or N == 0:
        return
    interpret = args["a_ptr"].device.type != "cuda"
    if args["B_DESC"] and not interpret:
        gm._set_tma_allocator()
    if num_programs is None:
        num_programs = INTERPRETER_PROGRAMS if interpret else gm._num_sms(args["a_ptr"].device.index or 0)

    stage, quant = args["STAGE"], args["QUANT"]
    rowwise = stage == 0 and quant == 1

    def nprog(meta):
        # Rowwise float8 act: one tile per block of rows (it sweeps the row's N tiles itself).
        n = meta["BLOCK_N"] if rowwise else N
        bound = gm._tile_bound(gm.LAYOUT_2D3D, M, n, args["K"], args["G"], meta["BLOCK_M"], meta["BLOCK_N"])
        return max(1, min(num_programs, bound))

    if interpret or config is not None:
        config = config or interpreter_config(quant if stage == 0 else 0)
        block = _QUANT_BLOCK.get(quant, 0) if stage == 0 else 0
        if block and config.kwargs["BLOCK_N"] % block:
            raise ValueError(f"triton_expert_mlp_fp8: act quantised in 1 x {block} blocks needs BLOCK_N a multiple "
                             f"of {block}, got config {config.kwargs}")
        p = nprog(config.kwargs)
        kernel = _interpreted("gemm") if interpret else wrap(expert_gemm_kernel)
        with gm._interpreting() if interpret else contextlib.nullcontext():
            kernel[(p,)](**args, num_programs=p, **_meta(config))
    else:
        quant = quant if stage == 0 else 0
        smallest = min(configs_for(dtype, stage, quant), key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        p = nprog(smallest.kwargs)
        wrap(_autotuned(dtype, stage, quant))[(p,)](**args, num_programs=p)


def _run_combine(args, wrap):
    T, H = args["T"], args["H"]
    if T == 0 or H == 0:
        return
    interpret = args["out_ptr"].device.type != "cuda"
    config = INTERPRETER_COMBINE_CONFIG if interpret else COMBINE_CONFIG
    grid = (triton.cdiv(T, config.kwargs["BLOCK_T"]), triton.cdiv(H, config.kwargs["BLOCK_H"]))
    kernel = _interpreted("combine") if interpret else wrap(combine_kernel)
    with gm._interpreting() if interpret else contextlib.nullcontext():
        kernel[grid](**args, **_meta(config))


def triton_expert_mlp(
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
    *,
    allow_tf32: bool = False,
    configs: Optional[tuple] = None,
    num_programs: Optional[int] = None,
    tma: Optional[bool] = None,
    _wrap=lambda k: k,
) -> tuple:
    """``moe_ops.expert_mlp``'s forward by the Triton kernels (interpreted for
    CPU tensors): ``(out (T, H), h (R, N1))``, same inputs and outputs.

    ``configs``: a (gate/up, down) pair of fixed tile configurations (default:
    autotuned on CUDA, ``INTERPRETER_CONFIG`` on CPU); ``num_programs`` the
    persistent grid of both GEMMs; ``tma`` the weights' loads (default: TMA on
    sm_90+ when aligned). Not differentiable itself: ``moe_ops_triton::expert_mlp``
    is, through ``triton_expert_mlp_backward``. Transient memory: ``a (R, I)``
    in the dtype and the fp32 slot rows ``(T * top_k, H)``."""
    _check(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
           gate_up_interleaved)
    out, h, act, slot_rows = _allocate(tokens, src_rows, dst_rows, gate_up_proj, down_proj)
    common = (tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
              gate_up_interleaved, swiglu_alpha, swiglu_limit, h, act, slot_rows)
    config0, config1 = configs or (None, None)
    _run_gemm(stage_args(0, *common, tma=tma), allow_tf32, config0, num_programs, _wrap)
    if tokens.shape[0]:
        _run_gemm(stage_args(1, *common, tma=tma), allow_tf32, config1, num_programs, _wrap)
        _run_combine(combine_args(slot_rows, dst_rows, out), _wrap)
    return out, h


def _check_fp8(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
               activation, gate_up_interleaved, recipe, float8_dtype) -> torch.dtype:
    """expert_mlp's checks with the down projection in float8 (its scales are
    checked by scaled_grouped_mm's checks, where the down GEMM is prepared)."""
    torch._check_value(recipe in QUANT_RECIPES, lambda: (
        f"triton_expert_mlp_fp8: recipe must be 'rowwise', 'blockwise_1x128' or 'mx', got '{recipe}'"))
    f8dt = float8_dtype or torch.float8_e4m3fn
    torch._check_value(f8dt in f8._FP8, lambda: (
        f"triton_expert_mlp_fp8: float8_dtype must be Float8_e4m3fn or Float8_e5m2, got {f8dt}"))
    torch._check_value(tokens.dtype in (torch.float32, torch.float16, torch.bfloat16), lambda: (
        f"triton_expert_mlp_fp8: tokens must be Float, Half or BFloat16, got {_checks._c10(tokens.dtype)}"))
    torch._check_value(down_proj.dtype in f8._FP8, lambda: (
        f"triton_expert_mlp_fp8: down_proj must be Float8_e4m3fn or Float8_e5m2, got {down_proj.dtype}"))
    # The shapes as expert_mlp checks them, down_proj's dtype aside (a stand-in of the tokens' dtype).
    stand_in = tokens.new_zeros(()).expand(down_proj.shape) if down_proj.dim() == 3 else down_proj
    _check(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, stand_in, gate_up_bias, down_bias, activation,
           gate_up_interleaved)
    return f8dt


def _gate_up_fp8(tokens, src_rows, offs, dst_rows, gate_up_proj, inter, gate_up_bias, activation, gate_up_interleaved,
                 swiglu_alpha, swiglu_limit, recipe, f8dt, keep_h, config, num_programs, tma, wrap):
    """The gate/up GEMM with act stored in float8 (its epilogue quantises it):
    (data (R, I), scale, h (R, N1) or None)."""
    R, G = src_rows.shape[0], offs.shape[0]
    quant = QUANT_RECIPES[recipe]
    data = tokens.new_empty((R, inter), dtype=f8dt)
    if recipe == "rowwise":
        scale = tokens.new_empty((R,), dtype=torch.float32)
        qs, q_strides = scale, (1, 0)
    elif recipe == "blockwise_1x128":
        scale = tokens.new_empty((R, triton.cdiv(inter, 128)), dtype=torch.float32)
        qs, q_strides = scale, tuple(scale.stride())
    else:  # blocked per group of rows (swizzle_mx_scale(scale, offs, 0)): zero padding, which no program writes
        size = _checks.swizzle_mx_scale_size(R, triton.cdiv(inter, 32), G, 0)
        qs = tokens.new_zeros(size, dtype=torch.uint8)
        scale, q_strides = qs.view(torch.float8_e8m0fnu), (0, 0)
    h = tokens.new_empty((R, gate_up_proj.shape[2])) if keep_h else None
    # down_proj only lends its shape to the stage's arguments (N = I).
    shape_only = tokens.new_zeros(()).expand(G, inter, tokens.shape[1])
    args = stage_args(0, tokens, src_rows, offs, dst_rows, None, gate_up_proj, shape_only, gate_up_bias, None,
                      activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, h if keep_h else tokens,
                      data.view(torch.uint8), None, tma=tma)
    args.update(qs_ptr=qs, stride_qsm=q_strides[0], stride_qsn=q_strides[1], QUANT=quant, STORE_H=keep_h,
                **_fp8_format(f8dt))
    if isinstance(config, str) and config == "args":  # aot.py: the arguments only
        return args
    _run_gemm(args, False, config, num_programs, wrap)
    return data, scale, h


def triton_expert_mlp_fp8(
    tokens: torch.Tensor,
    src_rows: torch.Tensor,
    offs: torch.Tensor,
    dst_rows: torch.Tensor,
    weights: Optional[torch.Tensor],
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    down_scale: torch.Tensor,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    activation: str = "swiglu",
    gate_up_interleaved: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    recipe: str = "blockwise_1x128",
    float8_dtype: Optional[torch.dtype] = None,
    *,
    keep_h: bool = False,
    configs: Optional[tuple] = None,
    num_programs: Optional[int] = None,
    tma: Optional[bool] = None,
    _wrap=lambda k: k,
):
    """The experts' forward with the down GEMM in float8 (inference, or the
    forward of fp8 training): ``out (T, H)`` in the tokens' dtype (``(out, h)``
    with ``keep_h``).

    The gate/up GEMM (tokens' dtype, as ``triton_expert_mlp``) quantises act =
    act(h) in its epilogue, so act never reaches memory in 16 or 32 bits (nor
    does h unless ``keep_h``): act is rounded to the tokens' dtype, as the
    unfused path stores it, and quantised as ``quantize_fp8(act, recipe,
    float8_dtype)`` would (the same bits; mx scales written in the blocked
    per-group layout ``swizzle_mx_scale(scale, offs, 0)``, which the down GEMM
    reads). The down GEMM is ``scaled_grouped_mm_kernel`` on those rows and
    ``down_proj`` (float8 ``(E, I, H)``, either storage order) with
    ``down_scale`` in ``scaled_grouped_mm``'s layout for the recipe (rowwise:
    ``(E, H)``; blockwise_1x128: 128x128 blocks ``(E, cdiv(H, 128), cdiv(I,
    128))``; mx: e8m0 ``(E, H, cdiv(I, 32))`` plain or swizzled), plus
    ``down_bias``, in fp32; the combine weights each token's rows in fp32 in
    slot order and rounds once.

    ``recipe="rowwise"`` needs the whole row's amax before any of it is
    stored, which no single tile has: a program then owns a block of rows and
    computes its gate/up GEMM twice (once for the amax), twice the gate/up
    FLOPs; ``blockwise_1x128`` and ``mx`` blocks lie within one tile, one pass.
    ``configs``: a (gate/up, down) pair of fixed configurations."""
    f8dt = _check_fp8(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                      activation, gate_up_interleaved, recipe, float8_dtype)
    config0, config1 = configs or (None, None)
    data, scale, h = _gate_up_fp8(tokens, src_rows, offs, dst_rows, gate_up_proj, down_proj.shape[1], gate_up_bias,
                                  activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, recipe, f8dt, keep_h,
                                  config0, num_programs, tma, _wrap)
    y, args = f8._prepare_scaled(data, down_proj, scale, down_scale, offs, None, None, torch.float32, tma)
    if down_bias is not None:
        args.update(bias_ptr=down_bias, stride_biasg=down_bias.stride(0), stride_biasn=down_bias.stride(1),
                    HAS_BIAS=True)
    f8._launch_scaled(y, args, config1, num_programs, _wrap)
    out = tokens.new_empty(tokens.shape)
    _run_combine(combine_args(y, dst_rows, out, by_dst=True, weights=weights), _wrap)
    return (out, h) if keep_h else out


def _k_major(w: torch.Tensor) -> bool:
    return w.stride(-2) == 1 and w.stride(-1) != 1 and w.shape[-1] > 1


def triton_expert_mlp_backward(
    grad_out: torch.Tensor,
    tokens: torch.Tensor,
    src_rows: torch.Tensor,
    offs: torch.Tensor,
    dst_rows: torch.Tensor,
    weights: Optional[torch.Tensor],
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: Optional[torch.Tensor],
    down_bias: Optional[torch.Tensor],
    h: torch.Tensor,
    activation: str = "swiglu",
    gate_up_interleaved: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    output_mask: tuple = (True, True, True, True),
    *,
    num_programs: Optional[int] = None,
    tma: Optional[bool] = None,
    _wrap=lambda k: k,
) -> tuple:
    """``moe_ops.expert_mlp_backward`` by Triton kernels: (grad tokens, grad
    weights, grad gate_up_proj, grad down_proj, grad gate_up_bias, grad
    down_bias), an empty tensor for each one ``output_mask`` does not ask for.

    From the inputs, the routing and h only. One fused kernel,
    ``expert_gemm_kernel`` with ``STAGE=2``: ``g = grad_out[token] @ down^T``
    (the token rows gathered in the A load), and in its epilogue act(h) and
    its derivative from h: it stores ``dh`` (the dSwiGLU etc.), ``w * act(h)``
    (the down weights' gradient operand) and per-tile partial sums of
    ``g . act(h)`` (the routing weights' gradient; summed over tiles in
    order by torch, no atomics). Then the existing grouped GEMM kernel:
    ``dh @ gate_up^T`` and the combine of each token's rows in slot order
    (grad tokens); the weight gradients as variable-K (2D x 2D) grouped GEMMs
    reading the tokens and grad_out rows through the index; the biases'
    gradients as 1-row 2D x 2D grouped GEMMs. Weight gradients in the
    weight's own layout (a transposed view stays one), as expert_mlp_backward.
    """
    from .grouped_mm import triton_grouped_mm, triton_grouped_mm_gather

    _check(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
           gate_up_interleaved)
    _checks.check_expert_mlp_backward_inputs(grad_out, tokens, src_rows, gate_up_proj, h)
    need_tokens, need_weights, need_gate_up, need_down = output_mask
    need_weights = need_weights and weights is not None
    none = lambda: tokens.new_empty((0,))  # noqa: E731
    if not any((need_tokens, need_weights, need_gate_up, need_down)):
        return tuple(none() for _ in range(6))
    dtype = tokens.dtype
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
    acc = _acc(dtype)
    R, top_k, inter = src_rows.shape[0], dst_rows.shape[1], down_proj.shape[1]
    rows = src_rows.div(top_k, rounding_mode="floor")
    dh = tokens.new_empty(h.shape)
    aw = tokens.new_empty((R, inter))
    smallest_n = min(c.kwargs["BLOCK_N"] for c in configs_for(dtype, 2) + [INTERPRETER_CONFIG])
    dw = torch.zeros((R, triton.cdiv(inter, smallest_n) if need_weights else 1), dtype=acc,
                     device=tokens.device)
    args = stage_args(2, tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                      activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, h, aw, None, tma=tma,
                      grad_out=grad_out, dh=dh, dw=dw)
    args["HAS_WEIGHTS"] = weights is not None
    _run_gemm(args, False, None, num_programs, _wrap)
    grads = [none() for _ in range(6)]
    mm = functools.partial(triton_grouped_mm, num_programs=num_programs, _wrap=_wrap)
    mm_gather = functools.partial(triton_grouped_mm_gather, num_programs=num_programs, _wrap=_wrap)
    if need_tokens:
        dx = mm(dh, gate_up_proj.transpose(-2, -1), offs)
        grad_tokens = tokens.new_empty(tokens.shape)
        _run_combine(combine_args(dx, dst_rows, grad_tokens, by_dst=True), _wrap)
        grads[0] = grad_tokens
    if need_weights:
        d_row = dw.sum(1)
        if down_bias is not None:  # + <grad_out[token], down_bias[e]>; zero for padding and rows past offs[-1]
            d_row = d_row + mm_gather(grad_out, down_bias.unsqueeze(-1), offs, rows,
                                                     out_dtype=wide).squeeze(1).to(acc)
        flat = dst_rows.reshape(-1)
        padded = torch.cat([d_row, d_row.new_zeros(1)])
        grads[1] = padded[torch.where(flat >= 0, flat, R)].view(dst_rows.shape).to(weights.dtype)
    if need_gate_up:
        if _k_major(gate_up_proj):
            grads[2] = mm_gather(dh.t(), tokens, offs, None, rows).transpose(-2, -1)
        else:
            grads[2] = mm_gather(tokens.t(), dh, offs, rows)
        if gate_up_bias is not None:
            ones = dh.new_ones((1, R))
            grads[4] = mm(ones, dh, offs, out_dtype=wide).squeeze(1).to(gate_up_bias.dtype)
    if need_down:
        if _k_major(down_proj):
            grads[3] = mm_gather(grad_out.t(), aw, offs, rows).transpose(-2, -1)
        else:
            grads[3] = mm_gather(aw.t(), grad_out, offs, None, rows)
        if down_bias is not None:
            if weights is not None:
                flat_w = torch.cat([weights.reshape(-1).to(acc), weights.new_zeros(1, dtype=acc)])
                w_rows = flat_w[torch.where(src_rows >= 0, src_rows, flat_w.shape[0] - 1)]
            else:
                w_rows = (src_rows >= 0).to(acc)
            grads[5] = mm_gather(w_rows.to(dtype).unsqueeze(0), grad_out, offs, None, rows,
                                                out_dtype=wide).squeeze(1).to(down_bias.dtype)
    return tuple(grads)


# ----------------------------------------------------------- torch.library
# As moe_ops_triton::grouped_mm: a triton_op (torch.compile traces into the
# three kernels); CPU tensors go to an opaque custom op running the interpreter.

@torch.library.custom_op("moe_ops_triton::expert_mlp_interpreted", mutates_args=())
def _expert_mlp_interpreted(tokens: torch.Tensor, src_rows: torch.Tensor, offs: torch.Tensor, dst_rows: torch.Tensor,
                            weights: Optional[torch.Tensor], gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                            gate_up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor], activation: str,
                            gate_up_interleaved: bool, swiglu_alpha: float,
                            swiglu_limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_expert_mlp(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
                             down_bias, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit)


@_expert_mlp_interpreted.register_fake
def _(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
      gate_up_interleaved, swiglu_alpha, swiglu_limit):
    _check(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
           gate_up_interleaved)
    out, h, _, _ = _allocate(tokens, src_rows, dst_rows, gate_up_proj, down_proj)
    return out, h


@torch.library.triton_op("moe_ops_triton::expert_mlp", mutates_args=())
def _expert_mlp_op(tokens: torch.Tensor, src_rows: torch.Tensor, offs: torch.Tensor, dst_rows: torch.Tensor,
                   weights: Optional[torch.Tensor], gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   gate_up_bias: Optional[torch.Tensor] = None, down_bias: Optional[torch.Tensor] = None,
                   activation: str = "swiglu", gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702,
                   swiglu_limit: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    args = (tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
            gate_up_interleaved, swiglu_alpha, swiglu_limit)
    if tokens.device.type != "cuda":
        return torch.ops.moe_ops_triton.expert_mlp_interpreted(*args)
    return triton_expert_mlp(*args, _wrap=torch.library.wrap_triton)


@torch.library.custom_op("moe_ops_triton::expert_mlp_backward_interpreted", mutates_args=())
def _expert_mlp_backward_interpreted(
        grad_out: torch.Tensor, tokens: torch.Tensor, src_rows: torch.Tensor, offs: torch.Tensor,
        dst_rows: torch.Tensor, weights: Optional[torch.Tensor], gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
        gate_up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor], h: torch.Tensor, activation: str,
        gate_up_interleaved: bool, swiglu_alpha: float, swiglu_limit: float,
        output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    return triton_expert_mlp_backward(grad_out, tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                                      gate_up_bias, down_bias, h, activation, gate_up_interleaved, swiglu_alpha,
                                      swiglu_limit, tuple(output_mask))


def _backward_fake(*args):
    from ..ops.experts import _expert_mlp_backward_fake

    return _expert_mlp_backward_fake(*args)


_expert_mlp_backward_interpreted.register_fake(_backward_fake)


@torch.library.triton_op("moe_ops_triton::expert_mlp_backward", mutates_args=())
def _expert_mlp_backward_op(
        grad_out: torch.Tensor, tokens: torch.Tensor, src_rows: torch.Tensor, offs: torch.Tensor,
        dst_rows: torch.Tensor, weights: Optional[torch.Tensor], gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
        gate_up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor], h: torch.Tensor, activation: str,
        gate_up_interleaved: bool, swiglu_alpha: float, swiglu_limit: float,
        output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    args = (grad_out, tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h,
            activation, gate_up_interleaved, swiglu_alpha, swiglu_limit)
    if tokens.device.type != "cuda":
        return torch.ops.moe_ops_triton.expert_mlp_backward_interpreted(*args, output_mask)
    return triton_expert_mlp_backward(*args, tuple(output_mask), _wrap=torch.library.wrap_triton)


def _autograd_backward(ctx, grad_out, grad_h):
    """moe_ops.expert_mlp's autograd (ops/experts.py: same saved set, inputs,
    routing and h), its backward by moe_ops_triton::expert_mlp_backward."""
    from ..ops import experts as ops_experts

    tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h = ctx.saved_tensors
    if grad_out is None or not any(ctx.mask):
        return (None,) * 13
    g = torch.ops.moe_ops_triton.expert_mlp_backward(
        grad_out.to(tokens.dtype), tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
        down_bias, h, *ctx.args, ctx.mask)
    need = ctx.needs_input_grad
    pick = lambda v, i: v if need[i] else None  # noqa: E731
    oe = ops_experts
    return (pick(g[0], oe._TOKENS), None, None, None,
            pick(g[1], oe._WEIGHTS) if weights is not None else None,
            pick(g[2], oe._GATE_UP), pick(g[3], oe._DOWN),
            pick(g[4], oe._GATE_UP_BIAS) if gate_up_bias is not None else None,
            pick(g[5], oe._DOWN_BIAS) if down_bias is not None else None,
            None, None, None, None)


def _autograd_setup_context(ctx, inputs, output):
    from ..ops.experts import _setup_context

    _setup_context(ctx, inputs, output)


register_autograd("moe_ops_triton::expert_mlp", _autograd_backward, setup_context=_autograd_setup_context)


@torch.library.custom_op("moe_ops_triton::expert_mlp_fp8_interpreted", mutates_args=())
def _expert_mlp_fp8_interpreted(tokens: torch.Tensor, src_rows: torch.Tensor, offs: torch.Tensor,
                                dst_rows: torch.Tensor, weights: Optional[torch.Tensor], gate_up_proj: torch.Tensor,
                                down_proj: torch.Tensor, down_scale: torch.Tensor, gate_up_bias: Optional[torch.Tensor],
                                down_bias: Optional[torch.Tensor], activation: str, gate_up_interleaved: bool,
                                swiglu_alpha: float, swiglu_limit: float, recipe: str,
                                float8_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return triton_expert_mlp_fp8(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, down_scale,
                                 gate_up_bias, down_bias, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                                 recipe, float8_dtype)


@_expert_mlp_fp8_interpreted.register_fake
def _(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, down_scale, gate_up_bias, down_bias,
      activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, recipe, float8_dtype):
    _check_fp8(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
               activation, gate_up_interleaved, recipe, float8_dtype)
    return tokens.new_empty(tokens.shape)


@torch.library.triton_op("moe_ops_triton::expert_mlp_fp8", mutates_args=())
def _expert_mlp_fp8_op(tokens: torch.Tensor, src_rows: torch.Tensor, offs: torch.Tensor, dst_rows: torch.Tensor,
                       weights: Optional[torch.Tensor], gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                       down_scale: torch.Tensor, gate_up_bias: Optional[torch.Tensor] = None,
                       down_bias: Optional[torch.Tensor] = None, activation: str = "swiglu",
                       gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                       recipe: str = "blockwise_1x128", float8_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """triton_expert_mlp_fp8 (the forward only: not differentiable), traced by
    torch.compile into its kernels on CUDA tensors."""
    args = (tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, down_scale, gate_up_bias, down_bias,
            activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, recipe, float8_dtype)
    if tokens.device.type != "cuda":
        return torch.ops.moe_ops_triton.expert_mlp_fp8_interpreted(*args)
    return triton_expert_mlp_fp8(*args, _wrap=torch.library.wrap_triton)

"""fp8 in Triton: ``moe_ops::scaled_grouped_mm`` and ``moe_ops::quantize_fp8``
(issue 16 item 3), for every recipe those ops define (``ops/fp8.py``,
``csrc/ATen/native/MoEQuantize.h`` and ``MoEScaledGroupedMM.h`` hold the
contract; ``reference.py`` restates it in plain torch).

``scaled_grouped_mm_kernel``: the persistent grouped GEMM of ``grouped_mm.py``
(same tile schedule over groups read from ``offs`` on the device, the same four
layouts, tail group for rows/columns past ``offs[-1]``, weights by TMA on
sm_90 when aligned) on float8 operands, with the scales of three recipes:

* rowwise (four layouts): one scale per row of A and per column of B, applied
  to the fp32 accumulator in the epilogue, ``(acc * sa) * sb + bias``, as the
  C++ kernels do;
* blockwise, DeepSeek-V3's recipe (2D x 3D, 3D x 3D): 1x128 blocks of A and
  128x128 blocks of B^T. A scale changes every 128 K, so it is applied in the
  main loop: each K step's product ``tl.dot(a, b)`` starts from a fresh
  accumulator and is added, times ``sa[m, kb] * sb[n // 128, kb]``, into the
  fp32 accumulator;
* mx (2D x 3D, 3D x 3D, 2D x 2D), 1x32 blocks with e8m0 scales, emulated on
  Hopper (no block-scaled MMA before sm_100) by the same per-block scaling with
  K steps of 32; the scales are read in upstream's layouts directly (3-D
  operands: plain or swizzled 32_4_4; 2-D operands: blocked per group, the
  group's byte offset computed on the device from ``offs``), so nothing is
  unswizzled on the host.

Fused quantisation (``quantize_out``, 2D x 3D and 3D x 3D): the epilogue can
store the output already quantised for the GEMM that consumes it, in 1x128
(DeepSeek-V3's activations) or MX 1x32 blocks with their scales, e.g. an
expert's gate/up output kept in float8 for its backward: a tile holds whole
blocks of a row (N is not split by offs), so the amax needs no other tile, and
the bits are those of ``quantize_fp8`` on the float32 output. Rowwise and
tensorwise output scales would need the whole row: not fusable in one pass.
The same block quantiser (``_quantize_row_blocks``) serves the fused experts'
gate/up epilogue (``experts.triton_expert_mlp_fp8``), whose act feeds this
kernel's fp8 down GEMM.

Accumulation: on sm_90 Triton lets an fp8 ``tl.dot`` accumulate the whole K in
the tensor core's accumulator (``max_num_imprecise_acc`` defaults to 2^30),
whose fp8 adds keep fewer bits than fp32. Every recipe here (rowwise too, so
``use_fast_accum`` is ignored as the op documents) promotes instead as DeepGEMM
does: each K step (BLOCK_K = 128 on the GPU configs: 4 wgmma k32 per tile row
block; 32 for mx) is a fresh ``tl.dot`` added into an fp32 register
accumulator, so at most BLOCK_K products are summed at the tensor core's
precision.

``quantize_fp8_kernel``: per block amax (a NaN anywhere in the block makes it
NaN, as the C++ kernel does; Triton's max drops NaN), the multiplier
``q = fp8_max / max(amax, 1e-12)`` and scale ``1 / q`` with correctly rounded
divisions (``div_rn``: Triton's ``/`` is approximate on the GPU), or MX's
power-of-two scale from amax's exponent field, then ``clamp(x * q)``
encoded to float8 with integer operations (round to nearest even, NaN -> 0x7F):
the bits of ``moe_ops.quantize_fp8``'s CPU kernel, on every device. The
hardware conversion would be the same on sm_90, but the interpreter's fp32 ->
e5m2 conversion truncates and mishandles NaN, and the tests must run the code
the GPU runs. One program per (row tile, column block, batch): rows are walked
in BLOCK_R chunks over the block's rows (1 row: rowwise, 1x128, mx; 128:
128x128; every row: tensorwise, one program per matrix or group, the one
recipe a single program serialises), columns in BLOCK_C chunks over the
block's columns, twice (amax, then quantise; the second read mostly hits L2).

On CPU tensors both run in Triton's interpreter (``InterpretedFunction``, as
``grouped_mm.py``); the kernels call Triton's ``tl.max``, grouped_mm.py's
shared schedule helpers and helpers of their own, which the interpreter runs
when ``JITFunction.__call__`` is routed to it for the launch
(``grouped_mm._interpreting``). ``torch.ops.moe_ops_triton.scaled_grouped_mm``
and ``quantize_fp8`` are the same functions as ``triton_op``s, with the
signatures of ``torch.ops.moe_ops.scaled_grouped_mm`` and ``quantize_fp8``.

Checks: the ops' own (``_checks``, same messages); the values of ``offs``
(ordering, MX's 32-element groups of K, the blocked scales' size) only on CPU
tensors, with the CPU kernels' messages: on CUDA nothing is read back (no host
sync; ``triton/cuda.py``'s checks of the op's CUDA kernel assert them on the
device: offs, MX's 32-element groups of K and the blocked scales' size).

What only a GPU can verify: the numerics of QGMMA's imprecise accumulation
within a K step, the autotuner's choice, TMA zero fill, races, timing.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _checks
from . import grouped_mm as gm

# Scale recipes of the GEMM (constexpr SCALE) and scale layouts (SA_LAYOUT, SB_LAYOUT).
SCALE_ROWWISE, SCALE_BLOCKWISE, SCALE_MX = 0, 1, 2
SL_PLAIN, SL_SWIZZLED, SL_BLOCKED_ROWS, SL_BLOCKED_K = 0, 1, 2, 3

_FP8 = {  # mantissa bits, exponent bias, fp32 bits of the smallest normal, denormal magic, max, MX emax
    torch.float8_e4m3fn: (3, 7, 121 << 23, 141 << 23, 448.0, 8),
    torch.float8_e5m2: (2, 15, 113 << 23, 134 << 23, 57344.0, 15),
}


_interpreting = gm._interpreting


@triton.jit
def _swizzled(r, s, SP):
    """Byte of element (r, s) of a scale grid in the blocked 32_4_4 layout whose
    padded width is SP (MoEQuantize.h: fp8_swizzled_offset)."""
    return ((r // 128) * (SP // 4) + s // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + s % 4


@triton.jit
def _e8m0_to_f32(byte):
    """2^(byte - 127); 0 is the denormal 2^-127, 255 NaN."""
    b = byte.to(tl.int32)
    bits = tl.where(b == 0, 0x00400000, b << 23)
    bits = tl.where(b == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


# ------------------------------------------------------------------ scaled grouped GEMM


@triton.jit(do_not_specialize=["G", "M", "num_programs"])
def scaled_grouped_mm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, out_ptr, bias_ptr, offs_ptr, qs_ptr,
    G, M, N, K,
    stride_ag, stride_am, stride_ak,
    stride_bg, stride_bk, stride_bn,
    stride_og, stride_om, stride_on,
    stride_sag, stride_sam, stride_sak,
    stride_sbg, stride_sbn, stride_sbk,
    stride_biasg, stride_biasn,
    stride_qsg, stride_qsm, stride_qsn,
    num_programs,
    LAYOUT: tl.constexpr,
    SCALE: tl.constexpr,
    SA_LAYOUT: tl.constexpr,
    SB_LAYOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    B_DESC: tl.constexpr,
    QUANT_OUT: tl.constexpr,  # 0, or the output quantised in 1 x QUANT_OUT blocks (128: blockwise_1x128, 32: mx)
    Q_MX: tl.constexpr,
    MANT: tl.constexpr, BIAS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr,
    FP8_MAX: tl.constexpr, EMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Schedule as grouped_mm_kernel (see there): tiles counted from offs on the
    # device, programs take tiles pid, pid + P, ...; M-fastest within a group.
    pid = tl.program_id(0)
    SCALE_K: tl.constexpr = 128 if SCALE == 1 else 32  # K extent of a scale block (blockwise, mx)
    tl.static_assert(SCALE == 0 or SCALE_K % BLOCK_K == 0, "a K step must lie within one scale block")
    b_desc = gm._b_descriptor(b_ptr, G, K, N, stride_bg, stride_bk, stride_bn, B_DESC, BLOCK_K, BLOCK_N)
    total = gm._tile_count(offs_ptr, G, M, N, LAYOUT, BLOCK_M, BLOCK_N)
    # MX: padded width of the scale grids (ceil(K/32) rounded up to 4 columns).
    SP = ((K + 31) // 32 + 3) // 4 * 4
    g = -1
    lo = 0
    hi = 0
    seen = 0
    group_tiles = 0
    pad = 0  # 2D x 3D: rows of the groups before g, each rounded up to 128 (mx: A's scale blocked per group)
    for tile in range(pid, total, num_programs):
        g, lo, hi, seen, group_tiles, pad = gm._advance(tile, g, lo, hi, seen, group_tiles, pad, offs_ptr, G, M, N,
                                                        LAYOUT, BLOCK_M, BLOCK_N)
        offs_m, offs_n, mask_m, mask_n, m_lo, n0, n_hi, k_lo, k_hi, tn = gm._tile_ranges(
            tile, g, lo, hi, seen, G, M, N, K, LAYOUT, BLOCK_M, BLOCK_N)
        g64 = tl.cast(g, tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        # K steps start on a BLOCK_K multiple (2D x 2D: below the group's first
        # token, masked), so that the compiler knows the loads' alignment and
        # vectorises them: byte loads at offs-dependent offsets cost a 64-bit
        # address each (ptxas spilled 1.3 KB for that). mx groups start on 32-blocks.
        k_first = k_lo // BLOCK_K * BLOCK_K
        a_ptrs = (a_ptr + g64 * stride_ag + offs_m[:, None].to(tl.int64) * stride_am
                  + (k_first + offs_k)[None, :].to(tl.int64) * stride_ak)
        b_ptrs = (b_ptr + g64 * stride_bg + offs_n[None, :].to(tl.int64) * stride_bn
                  + (k_first + offs_k)[:, None].to(tl.int64) * stride_bk)
        # Scale rows: A's rows m; B's columns n (mx: rows of B^T) or their 128-blocks (blockwise).
        sa_rows = offs_m.to(tl.int64)
        sb_rows = (offs_n // 128 if SCALE == 1 else offs_n).to(tl.int64)
        if SCALE == 2 and LAYOUT == 2:
            # 2D x 2D mx: groups along K, each group's scale columns blocked on their own,
            # at byte round_up(rows, 128) * (padded widths of the groups before).
            k_group = 0
            for h in range(0, g):
                h_lo = tl.load(offs_ptr + h - 1, mask=h > 0, other=0)
                h_hi = tl.load(offs_ptr + h)
                k_group += ((h_hi + 31) // 32 - h_lo // 32 + 3) // 4 * 4
            sp_group = ((hi + 31) // 32 - lo // 32 + 3) // 4 * 4
            sa_base = sa_ptr + k_group.to(tl.int64) * ((M + 127) // 128 * 128)
            sb_base = sb_ptr + k_group.to(tl.int64) * ((N + 127) // 128 * 128)
        elif SCALE == 2 and LAYOUT == 0 and SA_LAYOUT == 2:
            sa_base = sa_ptr + pad * SP  # group g's byte offset in A's scale blocked per group of rows
            sb_base = sb_ptr + g64 * stride_sbg
            sa_rows = (offs_m - m_lo).to(tl.int64)  # row within the group's blocks
        else:
            sa_base = sa_ptr + g64 * stride_sag
            sb_base = sb_ptr + g64 * stride_sbg
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_first, k_hi, BLOCK_K):
            k_ok = ((k + offs_k) < k_hi) & ((k + offs_k) >= k_lo)
            a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
            b = gm._load_b(b_desc, b_ptrs, k_ok[:, None] & mask_n[None, :], g, k, n0, B_DESC, BLOCK_K, BLOCK_N)
            # A fresh accumulator per K step, promoted into fp32 (see the module's docstring).
            part = tl.dot(a, b)
            if SCALE == 0:
                acc += part
            else:
                kb = k // SCALE_K
                if SCALE == 1:
                    sa = tl.load(sa_base + sa_rows * stride_sam + kb * stride_sak, mask=mask_m, other=0.0)
                    sb = tl.load(sb_base + sb_rows * stride_sbn + kb * stride_sbk, mask=mask_n, other=0.0)
                else:
                    if SA_LAYOUT == 0:
                        sa_off = sa_rows * stride_sam + kb * stride_sak
                    elif SA_LAYOUT == 3:
                        sa_off = _swizzled(sa_rows, kb - lo // 32, sp_group)
                    else:
                        sa_off = _swizzled(sa_rows, kb, SP)
                    if SB_LAYOUT == 0:
                        sb_off = sb_rows * stride_sbn + kb * stride_sbk
                    elif SB_LAYOUT == 3:
                        sb_off = _swizzled(sb_rows, kb - lo // 32, sp_group)
                    else:
                        sb_off = _swizzled(sb_rows, kb, SP)
                    sa = _e8m0_to_f32(tl.load(sa_base + sa_off, mask=mask_m, other=127))
                    sb = _e8m0_to_f32(tl.load(sb_base + sb_off, mask=mask_n, other=127))
                acc += part * sa[:, None] * sb[None, :]
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        covered = g < G
        if SCALE == 0:
            sa = tl.load(sa_ptr + g64 * stride_sag + offs_m.to(tl.int64) * stride_sam, mask=mask_m & covered,
                         other=0.0)
            sb = tl.load(sb_ptr + g64 * stride_sbg + offs_n.to(tl.int64) * stride_sbn, mask=mask_n & covered,
                         other=0.0)
            acc = acc * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + g64 * stride_biasg + offs_n.to(tl.int64) * stride_biasn,
                           mask=mask_n & covered, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        # Rows (columns) past offs[-1] are zeros whatever their scales hold.
        acc = tl.where(covered, acc, 0.0)
        out_ptrs = (out_ptr + g64 * stride_og + offs_m[:, None].to(tl.int64) * stride_om
                    + offs_n[None, :].to(tl.int64) * stride_on)
        if QUANT_OUT > 0:
            # The output quantised for the next GEMM, as quantize_fp8 would quantise
            # the float32 result: a tile holds whole 1 x QUANT_OUT blocks (N is not
            # split by offs in 2D x 3D and 3D x 3D), so amax needs no other tile.
            NB: tl.constexpr = BLOCK_N // QUANT_OUT
            bits, stored = _quantize_row_blocks(acc, mask_n, QUANT_OUT, Q_MX, MANT, BIAS, MIN_NORMAL, MAGIC, FP8_MAX,
                                                EMAX, BLOCK_M, BLOCK_N)
            tl.store(out_ptrs, bits, mask=mask_m[:, None] & mask_n[None, :])
            blocks = tn * NB + tl.arange(0, NB)
            qs_ptrs = (qs_ptr + g64 * stride_qsg + offs_m[:, None].to(tl.int64) * stride_qsm
                       + blocks[None, :].to(tl.int64) * stride_qsn)
            tl.store(qs_ptrs, stored, mask=mask_m[:, None] & (blocks * QUANT_OUT < n_hi)[None, :])
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# GPU configurations, every one compiled for sm_90a by test/test_triton_aot.py
# (0 bytes of spill each). Rowwise and blockwise: K steps of 128 (one blockwise
# scale block; 4 wgmma k32 between promotions). 2D x 2D loads through registers
# (no cp.async: K starts at offs), so its 64-row tile takes 8 warps (4 spilled
# 3.4 KB). mx: K steps of 32, one scale block each; a 128 x 128 tile spilled
# in 3D x 3D (the two fp32 accumulators and the scales' addresses), hence
# 8192-element tiles on one warpgroup.
CONFIGS_FP8 = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
]
CONFIGS_FP8_2D2D = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=4),
]
CONFIGS_MX = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=6),
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)
INTERPRETER_PROGRAMS = 3

_AUTOTUNE_KEY = ["N", "K", "LAYOUT", "SCALE", "SA_LAYOUT", "SB_LAYOUT", "HAS_BIAS", "B_DESC", "QUANT_OUT", "Q_MX"]
_autotuned_fp8 = triton.autotune(configs=CONFIGS_FP8, key=_AUTOTUNE_KEY)(scaled_grouped_mm_kernel)
_autotuned_fp8_2d2d = triton.autotune(configs=CONFIGS_FP8_2D2D, key=_AUTOTUNE_KEY)(scaled_grouped_mm_kernel)
_autotuned_mx = triton.autotune(configs=CONFIGS_MX, key=_AUTOTUNE_KEY)(scaled_grouped_mm_kernel)

_RECIPES = {"rowwise": SCALE_ROWWISE, "blockwise (1x128 x 128x128)": SCALE_BLOCKWISE, "mx": SCALE_MX}


def configs_for(scale: int, layout: int) -> list:
    """The configurations the autotuner may pick for a scale recipe (SCALE_*) and layout (grouped_mm.LAYOUT_*)."""
    if scale == SCALE_MX:
        return CONFIGS_MX
    return CONFIGS_FP8_2D2D if layout == gm.LAYOUT_2D2D else CONFIGS_FP8


def _autotuned(scale: int, layout: int):
    if scale == SCALE_MX:
        return _autotuned_mx
    return _autotuned_fp8_2d2d if layout == gm.LAYOUT_2D2D else _autotuned_fp8


@functools.lru_cache(maxsize=None)
def _interpreted(name: str):
    from triton.runtime.interpreter import InterpretedFunction

    kernel = {"gemm": scaled_grouped_mm_kernel, "quantize": quantize_fp8_kernel}[name]
    return InterpretedFunction(kernel.fn if hasattr(kernel, "fn") else kernel)


def _check_offs_values(mat_a, mat_b, scale_a, scale_b, offs, recipe: int, layout: str) -> None:
    """The value checks of the CPU kernel (MoEScaledGroupedMM.cpp), same messages,
    on CPU tensors only: on CUDA they would cost a host sync. The blocked scale's
    size check keeps the kernel's reads inside it."""
    if offs is None or offs.device.type != "cpu":
        return
    split_name, split = {"2d3d": ("M (mat_a.size(0))", mat_a.shape[0]), "3d2d": ("N (mat_b.size(1))", mat_b.shape[1]),
                         "2d2d": ("K (mat_a.size(1))", mat_a.shape[1])}[layout]
    prev = 0
    for g, end in enumerate(offs.tolist()):
        if not prev <= end <= split:
            after = f" after offs[{g - 1}]={prev}" if g else ""
            raise ValueError(f"scaled_grouped_mm: offs must be non-decreasing in [0, {split_name}={split}], got "
                             f"offs[{g}]={end}{after}")
        if recipe == SCALE_MX and layout == "2d2d" and end % 32 and end != split:
            raise ValueError("scaled_grouped_mm: with mx scales every group of K must hold whole 32-element blocks: "
                             f"offs[g] must be a multiple of 32 or K={split}, got offs[{g}]={end}")
        prev = end
    if recipe == SCALE_MX and layout in ("2d3d", "2d2d"):
        s = -(-mat_a.shape[-1] // 32)
        ends = offs.tolist()
        blocked = [(scale_a, mat_a.shape[0])] + ([(scale_b, mat_b.shape[1])] if layout == "2d2d" else [])
        for scale, rows in blocked:
            need = _blocked_bytes_read(rows, s, ends, 0 if layout == "2d3d" else 1)
            if scale.numel() < need:
                raise ValueError(_checks.mx_blocked_scale_message(scale, need))


def _blocked_bytes_read(rows: int, s: int, ends: list, dim: int) -> int:
    """1 + the last byte the kernel reads of a scale blocked per group
    (swizzle_mx_scale's layout; MoESwizzleMXScale.cpp's unswizzle_mx_scale checks the same)."""
    def last(r: int, c: int, sp: int) -> int:  # the largest swizzled offset within (r, c)
        ri, ci = torch.arange(r).view(-1, 1), torch.arange(c).view(1, -1)
        return int((((ri // 128) * (sp // 4) + ci // 4) * 512 + (ri % 32) * 16 + ((ri % 128) // 32) * 4
                    + ci % 4).max())

    need, base, start = 0, 0, 0
    for end in ends:
        if dim == 0:
            r, c, sp = end - start, s, -(-s // 4) * 4
            step = -(-r // 128) * 128 * sp
        else:
            c0, c1 = start // 32, -(-end // 32)
            r, c, sp = rows, c1 - c0, -(-(c1 - c0) // 4) * 4
            step = -(-rows // 128) * 128 * sp
        if r > 0 and c > 0:
            need = max(need, base + last(r, c, sp) + 1)
        base += step
        start = end
    return need


def _scale_view(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 scales as their bytes (Triton has no e8m0 pointer type)."""
    return scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale


_QUANT_OUT = {"blockwise_1x128": 128, "mx": 32}


def _check_quantize_out(quantize_out, quantize_dtype, layout_name, recipe) -> None:
    if quantize_out is None:
        return
    if quantize_out not in _QUANT_OUT:
        raise ValueError(f"triton_scaled_grouped_mm: quantize_out must be None, 'blockwise_1x128' or 'mx', got "
                         f"'{quantize_out}'")
    if layout_name not in ("2d3d", "3d3d"):
        raise ValueError("triton_scaled_grouped_mm: quantize_out needs 2D x 3D or 3D x 3D operands (N not split by "
                         f"offs), got {layout_name}")
    if quantize_out == "blockwise_1x128" and recipe == SCALE_MX:
        raise NotImplementedError("triton_scaled_grouped_mm: quantize_out='blockwise_1x128' with mx scales: the mx "
                                  "configurations' 64-column tiles hold no whole 128-block")
    if quantize_dtype not in (None, torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"triton_scaled_grouped_mm: quantize_dtype must be Float8_e4m3fn or Float8_e5m2, got "
                         f"{quantize_dtype}")


def _prepare_scaled(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, tma=None,
                    quantize_out=None, quantize_dtype=None):
    recipe_name, out_t = _checks.check_scaled_grouped_mm_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias,
                                                                scale_result, out_dtype)
    recipe = _RECIPES[recipe_name]
    layout_name = _checks.grouped_mm_layout(mat_a, mat_b)
    layout = gm._LAYOUTS[layout_name]
    _check_quantize_out(quantize_out, quantize_dtype, layout_name, recipe)
    _check_offs_values(mat_a, mat_b, scale_a, scale_b, offs, recipe, layout_name)
    size = _checks.grouped_mm_out_size(mat_a, mat_b, offs)
    f8 = quantize_dtype or torch.float8_e4m3fn
    fmt = _FP8[f8]
    qblock = _QUANT_OUT.get(quantize_out, 0)
    if qblock:
        out = mat_a.new_empty(size, dtype=f8)
        qsize = size[:-1] + [triton.cdiv(size[-1], qblock)]
        qscale = mat_a.new_empty(qsize, dtype=_checks.fp8_scale_dtype(quantize_out))
        qs = _scale_view(qscale)
        q_strides = (qs.stride(0) if qs.dim() == 3 else 0, qs.stride(-2), qs.stride(-1))
    else:
        out = mat_a.new_empty(size, dtype=out_t)  # contiguous, as the op's fake kernel promises
        qscale = None
        q_strides = (0, 0, 0)
    G = _checks.grouped_mm_num_groups(mat_a, offs)
    a3, b3, o3 = mat_a.dim() == 3, mat_b.dim() == 3, out.dim() == 3
    sa, sb = _scale_view(scale_a), _scale_view(scale_b)
    sa_layout = sb_layout = SL_PLAIN
    # Scale strides (g, row, k block); rowwise has no k block.
    if recipe == SCALE_ROWWISE:
        if layout == gm.LAYOUT_2D2D:  # (G * M,), (G * N,): group-major
            s_a = (size[1], 1, 0)
            s_b = (size[2], 1, 0)
        else:
            s_a = (sa.stride(0), sa.stride(1), 0) if sa.dim() == 2 else (0, sa.stride(0), 0)
            s_b = (sb.stride(0), sb.stride(1), 0) if sb.dim() == 2 else (0, sb.stride(0), 0)
    elif recipe == SCALE_BLOCKWISE:
        s_a = tuple(sa.stride()) if sa.dim() == 3 else (0,) + tuple(sa.stride())
        s_b = tuple(sb.stride())
    else:
        if layout == gm.LAYOUT_2D2D:
            sa_layout = sb_layout = SL_BLOCKED_K
            sa, sb = sa.contiguous(), sb.contiguous()
            s_a = s_b = (0, 0, 0)
        else:
            if layout == gm.LAYOUT_2D3D:
                sa_layout, sa = SL_BLOCKED_ROWS, sa.contiguous()
                s_a = (0, 0, 0)
            elif sa.dim() == 2:  # swizzled (G, bytes): a group's bytes contiguous
                sa = sa.contiguous()
                sa_layout, s_a = SL_SWIZZLED, (sa.stride(0), 0, 0)
            else:
                s_a = tuple(sa.stride())
            if sb.dim() == 2:
                sb = sb.contiguous()
                sb_layout, s_b = SL_SWIZZLED, (sb.stride(0), 0, 0)
            else:
                s_b = tuple(sb.stride())
    args = dict(
        a_ptr=mat_a, b_ptr=mat_b, sa_ptr=sa, sb_ptr=sb, out_ptr=out.view(torch.uint8) if qblock else out,
        bias_ptr=bias if bias is not None else sa,
        offs_ptr=offs if offs is not None else sa,
        qs_ptr=_scale_view(qscale) if qblock else sa,
        G=G, M=size[-2], N=size[-1], K=mat_a.shape[-1],
        stride_ag=mat_a.stride(0) if a3 else 0, stride_am=mat_a.stride(-2), stride_ak=mat_a.stride(-1),
        stride_bg=mat_b.stride(0) if b3 else 0, stride_bk=mat_b.stride(-2), stride_bn=mat_b.stride(-1),
        stride_og=out.stride(0) if o3 else 0, stride_om=out.stride(-2), stride_on=out.stride(-1),
        stride_sag=s_a[0], stride_sam=s_a[1], stride_sak=s_a[2],
        stride_sbg=s_b[0], stride_sbn=s_b[1], stride_sbk=s_b[2],
        stride_biasg=bias.stride(0) if bias is not None else 0,
        stride_biasn=bias.stride(1) if bias is not None else 0,
        stride_qsg=q_strides[0], stride_qsm=q_strides[1], stride_qsn=q_strides[2],
        QUANT_OUT=qblock, Q_MX=quantize_out == "mx",
        MANT=fmt[0], BIAS=fmt[1], MIN_NORMAL=fmt[2], MAGIC=fmt[3], FP8_MAX=fmt[4], EMAX=fmt[5],
        LAYOUT=layout, SCALE=recipe, SA_LAYOUT=sa_layout, SB_LAYOUT=sb_layout, HAS_BIAS=bias is not None,
        B_DESC=_b_desc(mat_b, layout, tma) if mat_b.numel() else 0,
    )
    if qblock:
        return (out, qscale), args
    return out, args


def _b_desc(mat_b: torch.Tensor, layout: int, tma: Optional[bool]) -> int:
    """grouped_mm's choice (TMA on sm_90+ for 3-D weights it can address), this op's message."""
    if tma and layout in (gm.LAYOUT_2D3D, gm.LAYOUT_3D3D) and not (gm._tma_ok(mat_b, 2) or gm._tma_ok(mat_b, 1)):
        raise ValueError("triton_scaled_grouped_mm: tma=True needs mat_b 16-byte aligned with a unit stride in K or N"
                         f", got strides {tuple(mat_b.stride())} of a float8 tensor")
    return gm._b_desc(mat_b, layout, tma)


def _meta(config: triton.Config) -> dict:
    """A config's launch arguments (wrap_triton refuses num_ctas and the like)."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _launch_scaled(result, args, config, num_programs, wrap=lambda k: k):
    out = result[0] if isinstance(result, tuple) else result
    if out.numel() == 0:
        return result
    layout, M, N, K, G = (args[k] for k in ("LAYOUT", "M", "N", "K", "G"))
    interpret = out.device.type != "cuda"
    if args["B_DESC"] and not interpret:
        gm._set_tma_allocator()
    if num_programs is None:
        num_programs = INTERPRETER_PROGRAMS if interpret else gm._num_sms(out.device.index or 0)

    def nprog(meta):
        return max(1, min(num_programs, gm._tile_bound(layout, M, N, K, G, meta["BLOCK_M"], meta["BLOCK_N"])))

    if interpret:
        if config is None and args["QUANT_OUT"]:  # tiles of whole output blocks
            config = triton.Config({**INTERPRETER_CONFIG.kwargs, "BLOCK_N": args["QUANT_OUT"]})
        config = config or INTERPRETER_CONFIG
        if args["QUANT_OUT"] and config.kwargs["BLOCK_N"] % args["QUANT_OUT"]:
            raise ValueError(f"triton_scaled_grouped_mm: quantize_out needs BLOCK_N a multiple of "
                             f"{args['QUANT_OUT']}, got config {config.kwargs}")
        p = nprog(config.kwargs)
        with _interpreting():
            _interpreted("gemm")[(p,)](**args, num_programs=p, **config.all_kwargs())
    elif config is not None:
        p = nprog(config.kwargs)
        wrap(scaled_grouped_mm_kernel)[(p,)](**args, num_programs=p, **_meta(config))
    else:
        configs = configs_for(args["SCALE"], layout)
        kernel = _autotuned(args["SCALE"], layout)
        p = nprog(min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]).kwargs)
        wrap(kernel)[(p,)](**args, num_programs=p)
    return result


def triton_scaled_grouped_mm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    offs: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale_result: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    use_fast_accum: bool = False,
    *,
    config: Optional[triton.Config] = None,
    num_programs: Optional[int] = None,
    tma: Optional[bool] = None,
    quantize_out: Optional[str] = None,
    quantize_dtype: Optional[torch.dtype] = None,
    _wrap=lambda k: k,
):
    """``moe_ops.scaled_grouped_mm`` by the Triton kernel (interpreted for CPU
    tensors): same arguments, checks, scale layouts and output (contiguous,
    bfloat16 by default or float32). ``use_fast_accum`` is ignored, as by the
    op: the accumulation is promoted to fp32 every K step. ``config``,
    ``num_programs`` and ``tma`` are those of ``triton_grouped_mm``.

    ``quantize_out`` (``"blockwise_1x128"`` or ``"mx"``; 2D x 3D and 3D x 3D)
    quantises the output in the epilogue for the GEMM that consumes it, and
    returns ``(data, scale)``: bit for bit ``quantize_fp8(out, quantize_out,
    quantize_dtype)`` of the float32 output this call computes with
    ``out_dtype=float32`` (and the same config and grid), without writing it."""
    del use_fast_accum
    out, args = _prepare_scaled(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, tma,
                                quantize_out, quantize_dtype)
    return _launch_scaled(out, args, config, num_programs, _wrap)


# ------------------------------------------------------------------ quantisation


@triton.jit
def _fp8_bits(v, MANT: tl.constexpr, BIAS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr):
    """fp32 (clamped to the format's range, or NaN) -> float8 bits, round to
    nearest even, NaN -> 0x7F: MoEQuantizeKernel.cpp's fp8_encode."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # Denormals: adding the float whose ulp is the smallest denormal rounds to it.
    magic = tl.full(v.shape, MAGIC, tl.int32).to(tl.float32, bitcast=True)
    sub = (a.to(tl.float32, bitcast=True) + magic).to(tl.int32, bitcast=True) - MAGIC
    SHIFT: tl.constexpr = 23 - MANT
    normal = (a - ((127 - BIAS) << 23) + ((1 << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1)) >> SHIFT
    r = tl.where(a < MIN_NORMAL, sub, normal) | sign
    return tl.where(a > 0x7F800000, 0x7F, r).to(tl.uint8)


@triton.jit
def _fp8_block_scale(amax, MX: tl.constexpr, FP8_MAX: tl.constexpr, EMAX: tl.constexpr):
    """(multiplier q, stored dequantisation scale) of blocks whose absolute
    maximum is amax (NaN for a block holding a NaN): MX's power of two from
    amax's exponent field (e8m0 bits; NaN/inf: 255), else fp8_max / max(amax,
    1e-12) and its inverse with correctly rounded divisions."""
    if MX:
        finite = amax <= 3.4028234663852886e38  # false for NaN and inf
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - EMAX
        e = tl.minimum(tl.maximum(e, -127), 127)
        q = tl.where(finite, ((127 - e) << 23).to(tl.float32, bitcast=True), float("nan"))
        stored = tl.where(finite, e + 127, 255).to(tl.uint8)
    else:
        a = tl.where(amax < 1e-12, 1e-12, amax)  # NaN stays NaN
        q = tl.math.div_rn(tl.zeros_like(a) + FP8_MAX, a)
        stored = tl.math.div_rn(tl.zeros_like(a) + 1.0, q)
    return q, stored


@triton.jit
def _fp8_saturated_bits(y, FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr,
                        MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr):
    """x * q clamped to the format's range (NaN passes: comparisons are false) and encoded."""
    y = tl.where(y < -FP8_MAX, -FP8_MAX, y)
    y = tl.where(y > FP8_MAX, FP8_MAX, y)
    return _fp8_bits(y, MANT, BIAS, MIN_NORMAL, MAGIC)


@triton.jit
def _quantize_row_blocks(x, keep, QB: tl.constexpr, MX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr,
                         MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr, FP8_MAX: tl.constexpr, EMAX: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A (BLOCK_M, BLOCK_N) fp32 tile quantised in 1 x QB blocks of its rows, as
    quantize_fp8 quantises them (the columns where ``keep`` is false are not
    part of any block: the partial last block): (float8 bits (BLOCK_M,
    BLOCK_N), stored scales (BLOCK_M, BLOCK_N // QB))."""
    NB: tl.constexpr = BLOCK_N // QB
    v = tl.reshape(tl.where(keep[None, :], x, 0.0), (BLOCK_M, NB, QB))
    amax = tl.max(tl.abs(v), axis=2)
    nan = tl.max((v != v).to(tl.int32), axis=2)  # Triton's max drops NaN
    amax = tl.where(nan > 0, float("nan"), amax)
    q, stored = _fp8_block_scale(amax, MX, FP8_MAX, EMAX)
    bits = _fp8_saturated_bits(v * q[:, :, None], FP8_MAX, MANT, BIAS, MIN_NORMAL, MAGIC)
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)), stored


@triton.jit(do_not_specialize=["R", "C", "G"])
def quantize_fp8_kernel(
    x_ptr, data_ptr, scale_ptr, offs_ptr,
    R, C, G,
    stride_xb, stride_xr, stride_xc,
    stride_db, stride_dr,
    stride_sb, stride_sr, stride_sc,
    ROW_SPAN: tl.constexpr,   # rows per block: 1, 128, or 0 (every row: tensorwise)
    COL_BLOCK: tl.constexpr,  # columns per block: 32, 128, or 0 (the row, or the offs group)
    HAS_OFFS: tl.constexpr,
    MX: tl.constexpr,
    SWIZZLE: tl.constexpr,
    MANT: tl.constexpr, BIAS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr,
    FP8_MAX: tl.constexpr, EMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pr = tl.program_id(0)
    seg = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    covered = seg >= 0  # False for the columns past offs[-1]
    if COL_BLOCK > 0:
        c_lo = seg * COL_BLOCK
        c_hi = tl.minimum(c_lo + COL_BLOCK, C)
    elif HAS_OFFS:  # group seg of the columns; seg == G: the columns past offs[-1] (zeros, no scale)
        c_lo = tl.load(offs_ptr + seg - 1, mask=seg > 0, other=0)
        c_hi = tl.load(offs_ptr + seg, mask=seg < G, other=C)
        covered = seg < G
    else:
        c_lo = 0
        c_hi = C
    if ROW_SPAN == 1:
        r_lo = pr * BLOCK_R
        r_hi = tl.minimum(r_lo + BLOCK_R, R)
    elif ROW_SPAN == 0:
        r_lo = 0
        r_hi = R
    else:
        r_lo = pr * ROW_SPAN
        r_hi = tl.minimum(r_lo + ROW_SPAN, R)
    x_base = x_ptr + b64 * stride_xb
    d_base = data_ptr + b64 * stride_db
    # Pass 1: amax per row of the chunk (NaN tracked apart: Triton's max drops it).
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    nan = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < r_hi
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = r_ok[:, None] & (cols < c_hi)[None, :]
            v = tl.load(x_base + rows[:, None].to(tl.int64) * stride_xr + cols[None, :].to(tl.int64) * stride_xc,
                        mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
            nan = tl.maximum(nan, tl.max((v != v).to(tl.int32), axis=1))
    if ROW_SPAN != 1:  # one block spans the rows: its amax over every chunk
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32) + tl.max(amax, axis=0)
        nan = tl.zeros((BLOCK_R,), dtype=tl.int32) + tl.max(nan, axis=0)
    amax = tl.where(nan > 0, float("nan"), amax)
    # Multiplier q and the stored (dequantisation) scale.
    q, stored = _fp8_block_scale(amax, MX, FP8_MAX, EMAX)
    rows = r_lo + tl.arange(0, BLOCK_R)
    if ROW_SPAN == 1:
        if SWIZZLE:
            s_off = b64 * stride_sb + _swizzled(rows.to(tl.int64), seg, stride_sr)  # stride_sr: padded width
        else:
            s_off = b64 * stride_sb + rows.to(tl.int64) * stride_sr + seg * stride_sc
        s_mask = rows < r_hi
    else:  # one scale for the block: its first lane stores it
        s_off = b64 * stride_sb + pr * stride_sr + seg * stride_sc + tl.arange(0, BLOCK_R) * 0
        s_mask = tl.arange(0, BLOCK_R) == 0
    tl.store(scale_ptr + s_off, stored, mask=s_mask & covered)
    # Pass 2: quantise.
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < r_hi
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = r_ok[:, None] & (cols < c_hi)[None, :]
            v = tl.load(x_base + rows[:, None].to(tl.int64) * stride_xr + cols[None, :].to(tl.int64) * stride_xc,
                        mask=m, other=0.0).to(tl.float32)
            bits = _fp8_saturated_bits(v * q[:, None], FP8_MAX, MANT, BIAS, MIN_NORMAL, MAGIC)
            bits = tl.where(covered, bits, 0).to(tl.uint8)
            tl.store(d_base + rows[:, None].to(tl.int64) * stride_dr + cols[None, :], bits, mask=m)


# (ROW_SPAN, COL_BLOCK) per recipe, and the chunk sizes: (BLOCK_R, BLOCK_C, num_warps) on the GPU.
_QUANT_BLOCKS = {"tensorwise": (0, 0), "rowwise": (1, 0), "blockwise_1x128": (1, 128),
                 "blockwise_128x128": (128, 128), "mx": (1, 32)}
QUANT_CONFIGS = {
    "tensorwise": triton.Config({"BLOCK_R": 8, "BLOCK_C": 256}, num_warps=4),  # 16 rows spilled with offs
    "rowwise": triton.Config({"BLOCK_R": 16, "BLOCK_C": 256}, num_warps=4),
    "blockwise_1x128": triton.Config({"BLOCK_R": 32, "BLOCK_C": 128}, num_warps=4),
    "blockwise_128x128": triton.Config({"BLOCK_R": 32, "BLOCK_C": 128}, num_warps=4),
    "mx": triton.Config({"BLOCK_R": 64, "BLOCK_C": 32}, num_warps=4),
}
# Interpreter: small chunks, so that the loops over chunks take several steps.
QUANT_INTERPRETER_CONFIGS = {
    "tensorwise": triton.Config({"BLOCK_R": 8, "BLOCK_C": 64}),
    "rowwise": triton.Config({"BLOCK_R": 8, "BLOCK_C": 64}),
    "blockwise_1x128": triton.Config({"BLOCK_R": 8, "BLOCK_C": 128}),
    "blockwise_128x128": triton.Config({"BLOCK_R": 64, "BLOCK_C": 128}),
    "mx": triton.Config({"BLOCK_R": 16, "BLOCK_C": 32}),
}


def _check_quantize_offs_values(x, recipe, offs) -> None:
    """MoEQuantize.h's fp8_check_offsets_cpu, on CPU tensors (a host sync elsewhere)."""
    if offs is None or offs.device.type != "cpu":
        return
    cols, prev = x.shape[-1], 0
    for g, end in enumerate(offs.tolist()):
        if not prev <= end <= cols:
            after = f" after offs[{g - 1}]={prev}" if g else ""
            raise ValueError(f"quantize_fp8: offs must be non-decreasing in [0, C={cols}], got offs[{g}]={end}{after}")
        if recipe == "mx" and end % 32 and end != cols:
            raise ValueError("quantize_fp8: with recipe 'mx' every group must hold whole 32-element blocks: offs[g] "
                             f"must be a multiple of 32 or C={cols}, got offs[{g}]={end}")
        prev = end


def _prepare_quantize(x, recipe, float8_dtype=None, offs=None, swizzle=False):
    f8 = _checks.check_quantize_fp8_inputs(x, recipe, float8_dtype, offs, swizzle)
    _check_quantize_offs_values(x, recipe, offs)
    groups = offs.shape[0] if offs is not None else None
    scale_size = _checks.fp8_scale_size(x.shape, recipe, groups, swizzle)
    scale_dtype = _checks.fp8_scale_dtype(recipe)
    data = x.new_empty(x.shape, dtype=f8)
    # The swizzled layout's padding bytes are zeros, which no program writes.
    if swizzle:
        scale = x.new_zeros(scale_size, dtype=torch.uint8).view(scale_dtype)
    else:
        scale = x.new_empty(scale_size, dtype=scale_dtype)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    nb, rows, cols = x3.shape
    row_span, col_block = _QUANT_BLOCKS[recipe]
    grouped = offs is not None and recipe != "mx"
    s = _scale_view(scale)
    # Scale strides (batch, row or row block, column block or group).
    if grouped:
        ss = (0, 0, 1) if recipe == "tensorwise" else (0, 1, rows)  # (G,) or (G, R)
    elif recipe == "tensorwise":
        ss = (1 if x.dim() == 3 else 0, 0, 0)
    elif recipe == "rowwise":
        ss = (rows if x.dim() == 3 else 0, 1, 0)
    elif swizzle:  # stride_sr carries the padded width; batches of (round_up(R, 128) * width) bytes
        sp = -(-(-(-cols // 32)) // 4) * 4
        ss = (-(-rows // 128) * 128 * sp if x.dim() == 3 else 0, sp, 0)
    else:
        st = s.stride() if x.dim() == 3 else (0,) + tuple(s.stride())
        ss = tuple(st)
    nseg = (triton.cdiv(cols, col_block) if col_block else (offs.shape[0] + 1 if grouped else 1))
    f = _FP8[f8]
    args = dict(
        x_ptr=x3, data_ptr=data.view(torch.uint8), scale_ptr=s, offs_ptr=offs if offs is not None else x3,
        R=rows, C=cols, G=offs.shape[0] if offs is not None else 0,
        stride_xb=x3.stride(0), stride_xr=x3.stride(1), stride_xc=x3.stride(2),
        stride_db=rows * cols, stride_dr=cols,
        stride_sb=ss[0], stride_sr=ss[1], stride_sc=ss[2],
        ROW_SPAN=row_span, COL_BLOCK=col_block, HAS_OFFS=grouped, MX=recipe == "mx", SWIZZLE=swizzle,
        MANT=f[0], BIAS=f[1], MIN_NORMAL=f[2], MAGIC=f[3], FP8_MAX=f[4], EMAX=f[5],
    )
    row_programs = 1 if row_span == 0 else None  # per config for row_span 1, else cdiv(R, 128)
    return data, scale, args, (row_programs, nseg, nb)


def _launch_quantize(data, scale, args, grid, recipe, config, wrap=lambda k: k):
    interpret = data.device.type != "cuda"
    config = config or (QUANT_INTERPRETER_CONFIGS if interpret else QUANT_CONFIGS)[recipe]
    row_span = args["ROW_SPAN"]
    rows = args["R"]
    row_programs = grid[0] if grid[0] is not None else (
        triton.cdiv(rows, config.kwargs["BLOCK_R"]) if row_span == 1 else triton.cdiv(rows, row_span))
    full = (row_programs, grid[1], grid[2])
    if 0 in full:
        return data, scale
    if interpret:
        with _interpreting():
            _interpreted("quantize")[full](**args, **config.all_kwargs())
    else:
        wrap(quantize_fp8_kernel)[full](**args, **_meta(config))
    return data, scale


def triton_quantize_fp8(
    x: torch.Tensor,
    recipe: str,
    float8_dtype: Optional[torch.dtype] = None,
    offs: Optional[torch.Tensor] = None,
    swizzle: bool = False,
    *,
    config: Optional[triton.Config] = None,
    _wrap=lambda k: k,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_ops.quantize_fp8`` by the Triton kernel (interpreted for CPU
    tensors): the same ``(data, scale)``, bit for bit, for every recipe, both
    float8 formats, per-group ``offs`` and the swizzled MX layout. ``config``
    fixes ``BLOCK_R``/``BLOCK_C``/``num_warps`` (default per recipe)."""
    data, scale, args, grid = _prepare_quantize(x, recipe, float8_dtype, offs, swizzle)
    return _launch_quantize(data, scale, args, grid, recipe, config, _wrap)


# ----------------------------------------------------------- torch.library
# As grouped_mm.py: triton_ops that torch.compile traces into (wrap_triton), and
# opaque custom ops running the interpreter for CPU tensors (tests only).


@torch.library.custom_op("moe_ops_triton::scaled_grouped_mm_interpreted", mutates_args=())
def _scaled_grouped_mm_interpreted(mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: torch.Tensor,
                                   scale_b: torch.Tensor, offs: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                   scale_result: Optional[torch.Tensor], out_dtype: Optional[torch.dtype],
                                   use_fast_accum: bool) -> torch.Tensor:
    return triton_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype,
                                    use_fast_accum)


@_scaled_grouped_mm_interpreted.register_fake
def _(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum):
    _, out_t = _checks.check_scaled_grouped_mm_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result,
                                                      out_dtype)
    return mat_a.new_empty(_checks.grouped_mm_out_size(mat_a, mat_b, offs), dtype=out_t)


@torch.library.triton_op("moe_ops_triton::scaled_grouped_mm", mutates_args=())
def _scaled_grouped_mm_op(mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                          offs: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                          scale_result: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                          use_fast_accum: bool = False) -> torch.Tensor:
    if mat_a.device.type != "cuda":
        return torch.ops.moe_ops_triton.scaled_grouped_mm_interpreted(mat_a, mat_b, scale_a, scale_b, offs, bias,
                                                                      scale_result, out_dtype, use_fast_accum)
    out, args = _prepare_scaled(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype)
    return _launch_scaled(out, args, None, None, wrap=torch.library.wrap_triton)


@torch.library.custom_op("moe_ops_triton::quantize_fp8_interpreted", mutates_args=())
def _quantize_fp8_interpreted(x: torch.Tensor, recipe: str, float8_dtype: Optional[torch.dtype],
                              offs: Optional[torch.Tensor], swizzle: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_quantize_fp8(x, recipe, float8_dtype, offs, swizzle)


def _quantize_fake(x, recipe, float8_dtype=None, offs=None, swizzle=False):
    f8 = _checks.check_quantize_fp8_inputs(x, recipe, float8_dtype, offs, swizzle)
    groups = offs.shape[0] if offs is not None else None
    size = _checks.fp8_scale_size(x.shape, recipe, groups, swizzle)
    return x.new_empty(x.shape, dtype=f8), x.new_empty(size, dtype=_checks.fp8_scale_dtype(recipe))


_quantize_fp8_interpreted.register_fake(_quantize_fake)


@torch.library.triton_op("moe_ops_triton::quantize_fp8", mutates_args=())
def _quantize_fp8_op(x: torch.Tensor, recipe: str, float8_dtype: Optional[torch.dtype] = None,
                     offs: Optional[torch.Tensor] = None, swizzle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type != "cuda":
        return torch.ops.moe_ops_triton.quantize_fp8_interpreted(x, recipe, float8_dtype, offs, swizzle)
    data, scale, args, grid = _prepare_quantize(x, recipe, float8_dtype, offs, swizzle)
    return _launch_quantize(data, scale, args, grid, recipe, None, wrap=torch.library.wrap_triton)

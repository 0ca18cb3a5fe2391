"""Persistent grouped GEMM in Triton: ``moe_ops::grouped_mm`` and
``moe_ops::grouped_mm_gather`` (operands read through indices in the loads).

One kernel serves the four layouts of ``torch._grouped_mm``. Per group ``g`` the
problem is ``out[g][M_lo:M_hi, N_lo:N_hi] = A[g][M, K_lo:K_hi] @ B[g][K_lo:K_hi, N]
(+ bias[g])``, where the range ``offs[g-1]:offs[g]`` is read on the device and
splits M (2D x 3D), N (3D x 2D) or K (2D x 2D); 3D x 3D splits nothing. A 2-D
operand has group stride 0. Rows (2D x 3D) or columns (3D x 2D) past ``offs[-1]``
are one more "tail" group with an empty K range, so the kernel writes their zeros
and the output needs no memset.

Schedule: a persistent grid of ``min(#SMs, tile bound)`` programs. Every program
walks the groups in order, counting their tiles (from ``offs``, on the device:
no host sync), and takes tiles ``pid, pid + P, pid + 2P, ...`` of that global
numbering. Within a group tiles run M-fastest, so programs that run at the same
time share the weight tile B[g][:, n-block] (the large operand of an MoE layer).

Loads: A (and B in 3D x 2D / 2D x 2D, or with an index) by pointers with masks
through the strides, pipelined with cp.async when the strides are 16-byte
multiples. 3-D weights (2D x 3D, 3D x 3D) by TMA on sm_90+ when their strides
allow it: a device-side descriptor (``tl.make_tensor_descriptor``, 128 bytes of
global scratch per program, hence ``triton.set_allocator``) over the (G, K, N)
or the (G, N, K) storage, whose per-group bounds zero-fill past K and N;
otherwise pointers, so either storage order works everywhere. A is not read by
TMA: group boundaries cut its tiles (rows of the next group would be read and
masked anyway) and the gather needs per-row addresses (Hopper has no TMA
gather). Stores are pointer stores (a TMA store would overwrite the next
group's rows).

The schedule and B's load setup are @triton.jit helpers shared with the
fused experts' and the fp8 GEMM kernels (``_tile_count``, ``_advance``,
``_tile_ranges``, ``_b_descriptor``, ``_load_b``); interpreted launches route
their calls to the interpreter (``_interpreting``).

Accumulation is fp32 (``tl.dot``: wgmma on sm_90 for fp16/bf16). fp32 inputs
use the exact (``ieee``) product unless ``allow_tf32=True``. fp64 inputs (the
ops take them: gradcheck) accumulate in fp64, DMMA or FMA as Triton lowers them;
no speed is claimed for them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _checks

# Layout codes (constexpr LAYOUT).
LAYOUT_2D3D, LAYOUT_3D2D, LAYOUT_2D2D, LAYOUT_3D3D = 0, 1, 2, 3
_LAYOUTS = {"2d3d": LAYOUT_2D3D, "3d2d": LAYOUT_3D2D, "2d2d": LAYOUT_2D2D, "3d3d": LAYOUT_3D3D}



# ------------------------------------------------------------- shared @triton.jit helpers
# The persistent tile schedule and the weights' load setup of every GEMM kernel
# here (grouped_mm_kernel; experts.expert_gemm_kernel; fp8.scaled_grouped_mm_kernel).
# In Triton's interpreter (CPU tensors) they are JITFunctions called from an
# interpreted kernel: the launchers route those calls to the interpreter
# (``_interpreting``).


@triton.jit
def _split_extents(M, N, LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(tiles per group of the dims offs does not split, extent of the split dim)."""
    if LAYOUT == 0:
        return (N + BLOCK_N - 1) // BLOCK_N, M
    elif LAYOUT == 1:
        return (M + BLOCK_M - 1) // BLOCK_M, N
    else:
        return ((M + BLOCK_M - 1) // BLOCK_M) * ((N + BLOCK_N - 1) // BLOCK_N), 0


@triton.jit
def _tile_count(offs_ptr, G, M, N, LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The number of tiles, from offs on the device (no host sync). 2D x 3D and
    3D x 2D have one more group, g = G: the rows/columns past offs[-1] (zeros)."""
    fixed, split_total = _split_extents(M, N, LAYOUT, BLOCK_M, BLOCK_N)
    SPLIT_BLOCK: tl.constexpr = BLOCK_M if LAYOUT == 0 else BLOCK_N
    if LAYOUT == 0 or LAYOUT == 1:
        total = 0
        for g in range(0, G + 1):
            lo = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
            hi = tl.load(offs_ptr + g, mask=g < G, other=split_total)
            total += (hi - lo + SPLIT_BLOCK - 1) // SPLIT_BLOCK * fixed
    else:
        total = G * fixed
    return total


@triton.jit
def _advance(tile, g, lo, hi, seen, group_tiles, pad, offs_ptr, G, M, N,
             LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The group cursor moved to the group of ``tile``: (g, its range lo:hi of the
    split dim, the tiles before it, its tiles, pad). Tiles come in increasing
    order, so the cursor only moves forward (a while loop in a for loop: Triton
    pipelines the K loop (num_stages) only inside scf.for). ``pad``: the rows of
    the groups before g, each rounded up to 128 (2D x 3D: where a scale blocked
    per group of rows puts group g)."""
    fixed, split_total = _split_extents(M, N, LAYOUT, BLOCK_M, BLOCK_N)
    SPLIT_BLOCK: tl.constexpr = BLOCK_M if LAYOUT == 0 else BLOCK_N
    if LAYOUT == 0 or LAYOUT == 1:
        while tile >= seen + group_tiles:
            seen += group_tiles
            pad += (hi - lo + 127) // 128 * 128
            g += 1
            lo = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
            hi = tl.load(offs_ptr + g, mask=g < G, other=split_total)
            group_tiles = (hi - lo + SPLIT_BLOCK - 1) // SPLIT_BLOCK * fixed
    else:
        g = tile // fixed
        seen = g * fixed
        if LAYOUT == 2:
            lo = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
            hi = tl.load(offs_ptr + g)
    return g, lo, hi, seen, group_tiles, pad


@triton.jit
def _tile_ranges(tile, g, lo, hi, seen, G, M, N, K,
                 LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows, columns and K range of ``tile`` of group g (M-fastest within a group:
    programs running together share B's n-block): (offs_m, offs_n, mask_m,
    mask_n, m_lo, n0 (the tile's first column), n_hi, k_lo, k_hi, tn)."""
    m_lo = 0
    m_hi = M
    n_lo = 0
    n_hi = N
    k_lo = 0
    k_hi = K
    if LAYOUT == 0:  # 2D x 3D: offs splits M; group G (rows past offs[-1]) has no K
        m_lo = lo
        m_hi = hi
        k_hi = tl.where(g < G, K, 0)
    elif LAYOUT == 1:  # 3D x 2D: offs splits N
        n_lo = lo
        n_hi = hi
        k_hi = tl.where(g < G, K, 0)
    elif LAYOUT == 2:  # 2D x 2D: offs splits K
        k_lo = lo
        k_hi = hi
    num_m = (m_hi - m_lo + BLOCK_M - 1) // BLOCK_M
    local = tile - seen
    tm = local % num_m
    tn = local // num_m
    offs_m = m_lo + tm * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = n_lo + tn * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < m_hi, offs_n < n_hi, m_lo, n0, n_hi, k_lo, k_hi, tn


@triton.jit
def _b_descriptor(b_ptr, G, K, NB, stride_bg, stride_bk, stride_bn,
                  B_DESC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """B_DESC 1 / 2: a device-side TMA descriptor over the 3-D weights stored
    (G, K, NB) / (G, NB, K), whose per-group bounds zero-fill past K and NB;
    0: b_ptr itself (pointer loads)."""
    if B_DESC == 1:
        return tl.make_tensor_descriptor(b_ptr, shape=[G, K, NB], strides=[stride_bg, stride_bk, 1],
                                         block_shape=[1, BLOCK_K, BLOCK_N])
    elif B_DESC == 2:
        return tl.make_tensor_descriptor(b_ptr, shape=[G, NB, K], strides=[stride_bg, stride_bn, 1],
                                         block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        return b_ptr


@triton.jit
def _load_b(b_desc, b_ptrs, mask, g, k, n0, B_DESC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """B's (BLOCK_K, BLOCK_N) tile at K offset k and column n0: through the
    descriptor (B_DESC 1 / 2) or the pointers with mask (0)."""
    if B_DESC == 1:
        return b_desc.load([g, k, n0]).reshape(BLOCK_K, BLOCK_N)
    elif B_DESC == 2:
        return tl.trans(b_desc.load([g, n0, k]).reshape(BLOCK_N, BLOCK_K))
    else:
        return tl.load(b_ptrs, mask=mask, other=0.0)


# M (tokens), G and the grid change from call to call: not specialised on (a
# value of 1 or a multiple of 16 would otherwise compile another kernel).
@triton.jit(do_not_specialize=["G", "M", "num_programs"])
def grouped_mm_kernel(
    a_ptr, b_ptr, out_ptr, bias_ptr, offs_ptr, a_index_ptr, b_index_ptr,
    G, M, N, K,
    stride_ag, stride_am, stride_ak,
    stride_bg, stride_bk, stride_bn,
    stride_og, stride_om, stride_on,
    stride_biasg, stride_biasn,
    num_programs,
    LAYOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_A_INDEX: tl.constexpr,
    HAS_B_INDEX: tl.constexpr,
    B_DESC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # M, N: extents of the output's last two dims (N of 3D x 2D spans every group);
    # K: the contraction extent (2D x 2D: all groups' K). Schedule and B's
    # descriptor by the shared helpers above.
    pid = tl.program_id(0)
    # The accumulator: fp32, fp64 for fp64 inputs.
    ACC: tl.constexpr = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    b_desc = _b_descriptor(b_ptr, G, K, N, stride_bg, stride_bk, stride_bn, B_DESC, BLOCK_K, BLOCK_N)
    total = _tile_count(offs_ptr, G, M, N, LAYOUT, BLOCK_M, BLOCK_N)
    # Tiles pid, pid + P, ... of that numbering.
    g = -1
    lo = 0
    hi = 0
    seen = 0
    group_tiles = 0
    pad = 0
    for tile in range(pid, total, num_programs):
        g, lo, hi, seen, group_tiles, pad = _advance(tile, g, lo, hi, seen, group_tiles, pad, offs_ptr, G, M, N,
                                                     LAYOUT, BLOCK_M, BLOCK_N)
        offs_m, offs_n, mask_m, mask_n, m_lo, n0, n_hi, k_lo, k_hi, tn = _tile_ranges(
            tile, g, lo, hi, seen, G, M, N, K, LAYOUT, BLOCK_M, BLOCK_N)
        g64 = tl.cast(g, tl.int64)  # g is a Python int in the interpreter
        # a_index gathers rows of A (2D x 3D) or its K columns (2D x 2D), b_index
        # the K rows of B (2D x 2D); -1 reads zeros.
        GATHER_ROWS: tl.constexpr = HAS_A_INDEX and LAYOUT == 0
        GATHER_A_K: tl.constexpr = HAS_A_INDEX and LAYOUT == 2
        if GATHER_ROWS:
            rows = tl.load(a_index_ptr + offs_m, mask=mask_m, other=-1)
            row_ok = rows >= 0  # -1 gathers a zero row
            a_rows = tl.where(row_ok, rows, 0).to(tl.int64)
        else:
            row_ok = mask_m
            a_rows = offs_m.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        a_base = a_ptr + g64 * stride_ag + a_rows[:, None] * stride_am
        b_base = b_ptr + g64 * stride_bg + offs_n[None, :].to(tl.int64) * stride_bn
        a_ptrs = a_base + (k_lo + offs_k)[None, :].to(tl.int64) * stride_ak
        b_ptrs = b_base + (k_lo + offs_k)[:, None].to(tl.int64) * stride_bk
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + offs_k
            k_ok = kk < k_hi
            if GATHER_A_K:
                ka = tl.load(a_index_ptr + kk, mask=k_ok, other=-1)
                a = tl.load(a_base + tl.where(ka >= 0, ka, 0).to(tl.int64)[None, :] * stride_ak,
                            mask=row_ok[:, None] & (ka >= 0)[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_B_INDEX:
                kb = tl.load(b_index_ptr + kk, mask=k_ok, other=-1)
                b = tl.load(b_base + tl.where(kb >= 0, kb, 0).to(tl.int64)[:, None] * stride_bk,
                            mask=(kb >= 0)[:, None] & mask_n[None, :], other=0.0)
            else:
                b = _load_b(b_desc, b_ptrs, k_ok[:, None] & mask_n[None, :], g, k, n0, B_DESC, BLOCK_K, BLOCK_N)
            # out_dtype: Triton 3.6 asserts that an fp64 accumulator is out_dtype's (float32 by default).
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if HAS_BIAS:
            bias = tl.load(bias_ptr + g64 * stride_biasg + offs_n.to(tl.int64) * stride_biasn,
                           mask=mask_n & (g < G), other=0.0)
            acc += bias.to(ACC)[None, :]
        out_ptrs = (out_ptr + g64 * stride_og + offs_m[:, None].to(tl.int64) * stride_om
                    + offs_n[None, :].to(tl.int64) * stride_on)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Autotuner configurations: short on purpose, every one is compiled for sm_90a
# by the tests (test/test_triton_grouped_mm.py) and listed in
# benchmarks/gpu/kernels.json with its registers, spills and shared memory.
CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
# fp32: 8 warps; with 4 warps ptxas spills 8 bytes for the exact (FFMA) product.
CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
# fp64 (tests, gradcheck on a GPU): one small tile, correctness only.
CONFIGS_FP64 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
]
# The interpreter runs one program at a time in numpy: small tiles, a few
# programs (so the persistent loop takes several tiles per program).
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)
INTERPRETER_PROGRAMS = 3

# Tuned once per (layout, N, K, dtypes, ...); not per M, which changes every step.
_AUTOTUNE_KEY = ["N", "K", "LAYOUT", "HAS_BIAS", "HAS_A_INDEX", "HAS_B_INDEX", "B_DESC", "INPUT_PRECISION"]
_autotuned_16bit = triton.autotune(configs=CONFIGS_16BIT, key=_AUTOTUNE_KEY)(grouped_mm_kernel)
_autotuned_fp32 = triton.autotune(configs=CONFIGS_FP32, key=_AUTOTUNE_KEY)(grouped_mm_kernel)
_autotuned_fp64 = triton.autotune(configs=CONFIGS_FP64, key=_AUTOTUNE_KEY)(grouped_mm_kernel)


def configs_for(dtype: torch.dtype) -> list:
    """The configurations the autotuner may pick for inputs of ``dtype``."""
    return {torch.float32: CONFIGS_FP32, torch.float64: CONFIGS_FP64}.get(dtype, CONFIGS_16BIT)


@contextlib.contextmanager
def _interpreting():
    """Route calls of @triton.jit functions (the shared helpers above, Triton's
    ``tl.max`` and the like) to the interpreter while an interpreted kernel
    runs. Without TRITON_INTERPRET=1 they are JITFunctions, which refuse a call
    from Python."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted_helper(self.fn, InterpretedFunction)(*args,
                                                                                                          **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = saved


@functools.lru_cache(maxsize=None)
def _interpreted_helper(fn, interpreted_function):
    return interpreted_function(fn)  # made once: its constructor reads and parses the source


@functools.lru_cache(maxsize=None)
def _interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    fn = grouped_mm_kernel.fn if hasattr(grouped_mm_kernel, "fn") else grouped_mm_kernel
    return InterpretedFunction(fn)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tile_bound(layout: int, M: int, N: int, K: int, G: int, bm: int, bn: int) -> int:
    """An upper bound on the number of tiles, from shapes only (no look at offs)."""
    cdiv = triton.cdiv
    if layout == LAYOUT_2D3D:  # sum_g cdiv(M_g, bm) <= cdiv(M, bm) + groups (tail included)
        return (cdiv(M, bm) + G + 1) * cdiv(N, bn)
    if layout == LAYOUT_3D2D:
        return cdiv(M, bm) * (cdiv(N, bn) + G + 1)
    return G * cdiv(M, bm) * cdiv(N, bn)


def _tma_ok(t: torch.Tensor, contiguous_dim: int) -> bool:
    """A TMA descriptor needs a 16-byte aligned base, unit stride in its last
    dimension and 16-byte multiples for the other strides. The base is judged
    by the storage offset (storages are allocated aligned), so that fake tensors
    under torch.compile decide as the real ones will."""
    size = t.element_size()
    return ((t.storage_offset() * size) % 16 == 0 and t.stride(contiguous_dim) == 1
            and all((t.stride(d) * size) % 16 == 0 for d in range(t.dim()) if d != contiguous_dim))


def _b_desc(mat_b: torch.Tensor, layout: int, tma: Optional[bool]) -> int:
    """0 (pointer loads), 1 (descriptor over (G, K, N)) or 2 (over (G, N, K)).
    ``tma=None`` chooses TMA on sm_90+ when the weights' strides allow it."""
    if tma is False or layout not in (LAYOUT_2D3D, LAYOUT_3D3D):
        return 0
    if tma is None:
        if mat_b.device.type != "cuda" or _capability(mat_b.device.index or 0)[0] < 9:
            return 0
    order = 1 if _tma_ok(mat_b, 2) else 2 if _tma_ok(mat_b, 1) else 0
    if tma and order == 0:
        raise ValueError("triton_grouped_mm: tma=True needs mat_b 16-byte aligned with a unit stride in K or N")
    return order


def _prepare(mat_a, mat_b, offs, bias, out_dtype, a_index=None, b_index=None, gather=False, tma=None):
    """Checks (the fake kernels' own), output allocation and the kernel's arguments."""
    if gather:
        a_shape, b_shape, out_dtype = _checks.check_grouped_mm_gather_inputs(
            mat_a, mat_b, offs, a_index, b_index, bias, out_dtype)
    else:
        a_shape, b_shape = mat_a, mat_b
        out_dtype = _checks.check_grouped_mm_inputs(mat_a, mat_b, offs, bias, out_dtype)
    layout = _LAYOUTS[_checks.grouped_mm_layout(mat_a, mat_b)]
    size = _checks.grouped_mm_out_size(a_shape, b_shape, offs)
    out = mat_a.new_empty_strided(size, _checks.grouped_mm_out_strides(size, out_dtype, mat_a.device),
                                  dtype=out_dtype)
    G = _checks.grouped_mm_num_groups(mat_a, offs)
    a3, b3, o3 = mat_a.dim() == 3, mat_b.dim() == 3, out.dim() == 3
    M, N = size[-2], size[-1]
    K = a_shape.shape[-1]  # gathered K for 2D x 2D with an index
    args = dict(
        a_ptr=mat_a, b_ptr=mat_b, out_ptr=out,
        # Absent operands point at mat_a (never read): not at out, whose aliases
        # would confuse the functionalisation of the kernel under torch.compile.
        bias_ptr=bias if bias is not None else mat_a,
        offs_ptr=offs if offs is not None else mat_a,
        a_index_ptr=a_index if a_index is not None else mat_a,
        b_index_ptr=b_index if b_index is not None else mat_a,
        G=G, M=M, N=N, K=K,
        stride_ag=mat_a.stride(0) if a3 else 0, stride_am=mat_a.stride(-2), stride_ak=mat_a.stride(-1),
        stride_bg=mat_b.stride(0) if b3 else 0, stride_bk=mat_b.stride(-2), stride_bn=mat_b.stride(-1),
        stride_og=out.stride(0) if o3 else 0, stride_om=out.stride(-2), stride_on=out.stride(-1),
        stride_biasg=bias.stride(0) if bias is not None else 0,
        stride_biasn=bias.stride(1) if bias is not None else 0,
        LAYOUT=layout, HAS_BIAS=bias is not None, HAS_A_INDEX=a_index is not None,
        HAS_B_INDEX=b_index is not None,
        B_DESC=_b_desc(mat_b, layout, tma) if b_index is None and mat_b.numel() else 0,
    )
    return out, args


@functools.lru_cache(maxsize=None)
def _set_tma_allocator():
    """Device-side TMA descriptors live in global scratch memory that Triton
    asks the launcher for (128 bytes per program)."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _launch(out, args, allow_tf32, config, num_programs, wrap=lambda k: k):
    dtype = args["a_ptr"].dtype
    args["INPUT_PRECISION"] = "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"
    if out.numel() == 0:
        return out
    layout, M, N, K, G = (args[k] for k in ("LAYOUT", "M", "N", "K", "G"))
    interpret = out.device.type != "cuda"
    if args["B_DESC"] and not interpret:
        _set_tma_allocator()
    if interpret:
        config = config or INTERPRETER_CONFIG
    if num_programs is None:
        num_programs = INTERPRETER_PROGRAMS if interpret else _num_sms(out.device.index or 0)

    def grid(meta):
        bound = _tile_bound(layout, M, N, K, G, meta["BLOCK_M"], meta["BLOCK_N"])
        return (max(1, min(num_programs, bound)),)

    # Every program strides by the launched grid size.
    def launch(kernel, **meta):
        nprog = grid({**args, **meta})[0]
        kernel[(nprog,)](**args, num_programs=nprog, **meta)

    if interpret:
        with _interpreting():
            launch(_interpreted(), **config.all_kwargs())
    elif config is not None:
        launch(wrap(grouped_mm_kernel), **config.all_kwargs())
    else:
        kernel = {torch.float32: _autotuned_fp32, torch.float64: _autotuned_fp64}.get(dtype, _autotuned_16bit)
        # The autotuner picks BLOCK_M/BLOCK_N, so num_programs is bounded inside the kernel
        # arguments from the smallest tile of its configurations.
        smallest = min(configs_for(dtype), key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        nprog = grid(smallest.kwargs)[0]
        wrap(kernel)[(nprog,)](**args, num_programs=nprog)
    return out


def triton_grouped_mm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    *,
    allow_tf32: bool = False,
    config: Optional[triton.Config] = None,
    num_programs: Optional[int] = None,
    tma: Optional[bool] = None,
    _wrap=lambda k: k,
) -> torch.Tensor:
    """``moe_ops.grouped_mm`` by the Triton kernel (interpreted for CPU tensors).

    ``config`` fixes the tile configuration (default: autotuned on CUDA,
    ``INTERPRETER_CONFIG`` on CPU); ``num_programs`` the persistent grid
    (default: the number of SMs, ``INTERPRETER_PROGRAMS`` on CPU); ``tma`` the
    weights' loads (default: TMA on sm_90+ for 3-D weights with 16-byte aligned
    strides, 2D x 3D and 3D x 3D). Not differentiable (the autograd formulas
    are those of ``moe_ops.grouped_mm``).
    """
    out, args = _prepare(mat_a, mat_b, offs, bias, out_dtype, tma=tma)
    return _launch(out, args, allow_tf32, config, num_programs, wrap=_wrap)


def triton_grouped_mm_gather(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: torch.Tensor,
    a_index: Optional[torch.Tensor] = None,
    b_index: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    *,
    allow_tf32: bool = False,
    config: Optional[triton.Config] = None,
    num_programs: Optional[int] = None,
    tma: Optional[bool] = None,
    _wrap=lambda k: k,
) -> torch.Tensor:
    """``moe_ops.grouped_mm_gather``, the operands read through the indices in
    the loads (-1 reads zeros): 2D x 3D, row ``i`` of A is ``mat_a[a_index[i]]``;
    2D x 2D, column ``k`` of A is ``mat_a[:, a_index[k]]`` and row ``k`` of B is
    ``mat_b[b_index[k]]`` (offs splits the gathered K)."""
    out, args = _prepare(mat_a, mat_b, offs, bias, out_dtype, a_index, b_index, gather=True, tma=tma)
    return _launch(out, args, allow_tf32, config, num_programs, wrap=_wrap)


# ----------------------------------------------------------- torch.library
# moe_ops_triton::grouped_mm: the same computation as a triton_op, so that
# torch.compile traces into the kernel (wrap_triton) instead of an opaque call.
# CPU tensors go to an opaque custom op that runs the interpreter (tests only).


@torch.library.custom_op("moe_ops_triton::grouped_mm_interpreted", mutates_args=())
def _grouped_mm_interpreted(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return triton_grouped_mm(mat_a, mat_b, offs, bias, out_dtype)


@_grouped_mm_interpreted.register_fake
def _(mat_a, mat_b, offs, bias, out_dtype):
    out, _ = _prepare(mat_a, mat_b, offs, bias, out_dtype)
    return out


@torch.library.triton_op("moe_ops_triton::grouped_mm", mutates_args=())
def _grouped_mm_op(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if mat_a.device.type != "cuda":
        return torch.ops.moe_ops_triton.grouped_mm_interpreted(mat_a, mat_b, offs, bias, out_dtype)
    out, args = _prepare(mat_a, mat_b, offs, bias, out_dtype)
    return _launch(out, args, False, None, None, wrap=torch.library.wrap_triton)


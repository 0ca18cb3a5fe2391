"""moe_ops::quantize_fp8 and moe_ops::dequantize_fp8: wrappers and fake kernels.

The recipes, scale shapes and numerics are specified once, in
``csrc/ATen/native/MoEQuantize.h``; ``torch_moe_ops.reference`` has them in
plain torch. In short, for ``x`` of shape ``(R, C)`` or ``(B, R, C)`` with
blocks along the last dimension ``C``:

=====================  ==========  ==============================  ================
recipe                 block       scale (2-D x)                   scale dtype
=====================  ==========  ==============================  ================
``tensorwise``         R x C       ``()`` (``(B,)`` for 3-D)        float32
``rowwise``            1 x C       ``(R,)``                        float32
``blockwise_1x128``    1 x 128     ``(R, ceil(C/128))``            float32
``blockwise_128x128``  128 x 128   ``(ceil(R/128), ceil(C/128))``  float32
``mx``                 1 x 32      ``(R, ceil(C/32))``             float8_e8m0fnu
=====================  ==========  ==============================  ================

``scale`` is the dequantisation scale (``x ~= data.float() * scale``), the
operand scale ``torch._scaled_grouped_mm`` takes. To scale a weight ``(G, K, N)``
per output column, quantise its transpose ``w.transpose(-2, -1)`` (blocks along
K) and transpose the data back: it is then column-major, as scaled GEMMs want.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from .._autograd import refuse_forward_ad, register_not_differentiable

# The public wrappers (torch_moe_ops.ops and torch_moe_ops re-export them).
__all__ = ["dequantize_fp8", "fp8_grouped_mm", "quantize_fp8", "scaled_grouped_mm", "swizzle_mx_scale"]

_quantize = torch.ops.moe_ops.quantize_fp8.default
_dequantize = torch.ops.moe_ops.dequantize_fp8.default


def quantize_fp8(
    x: torch.Tensor,
    recipe: str,
    float8_dtype: Optional[torch.dtype] = None,
    offs: Optional[torch.Tensor] = None,
    swizzle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to float8 (``float8_e4m3fn`` by default, or ``float8_e5m2``).

    Returns ``(data, scale)``: ``data`` has ``x``'s shape (contiguous), ``scale``
    the recipe's shape. Values saturate at the format's max and round to
    nearest even; a block holding NaN or inf dequantises to NaN.

    ``offs`` (2-D ``x``): int32 cumulative group ends along ``C``, for the
    operands of the 2D x 2D (weight-gradient) grouped GEMM, where ``C`` is the
    token dimension: ``tensorwise`` gives one scale per group ``(G,)``,
    ``rowwise`` one per row and group ``(G, R)``; ``mx`` keeps its blocks and
    requires groups of whole 32-element blocks. Elements past ``offs[-1]``
    quantise to zero.

    ``swizzle`` (``mx``): the scale in the blocked layout of upstream's CUDA MX
    kernels, ``(round_up(R, 128), round_up(ceil(C/32), 4))``
    (``(B, round_up(R, 128) * round_up(ceil(C/32), 4))`` for 3-D ``x``).
    """
    return _quantize(x, recipe, float8_dtype, offs, swizzle)


def dequantize_fp8(
    data: torch.Tensor,
    scale: torch.Tensor,
    recipe: str,
    out_dtype: Optional[torch.dtype] = None,
    offs: Optional[torch.Tensor] = None,
    swizzle: bool = False,
) -> torch.Tensor:
    """``data.float() * scale`` per block, rounded once to ``out_dtype`` (float32 by default).

    The inverse of :func:`quantize_fp8` with the same ``recipe``, ``offs`` and ``swizzle``.
    """
    return _dequantize(data, scale, recipe, out_dtype, offs, swizzle)


@torch.library.register_fake("moe_ops::quantize_fp8")
def _quantize_fp8_fake(x, recipe, float8_dtype=None, offs=None, swizzle=False):
    f8 = _checks.check_quantize_fp8_inputs(x, recipe, float8_dtype, offs, swizzle)
    groups = offs.shape[0] if offs is not None else None
    scale_size = _checks.fp8_scale_size(x.shape, recipe, groups, swizzle)
    return x.new_empty(x.shape, dtype=f8), x.new_empty(scale_size, dtype=_checks.fp8_scale_dtype(recipe))


@torch.library.register_fake("moe_ops::dequantize_fp8")
def _dequantize_fp8_fake(data, scale, recipe, out_dtype=None, offs=None, swizzle=False):
    out = _checks.check_dequantize_fp8_inputs(data, scale, recipe, out_dtype, offs, swizzle)
    return data.new_empty(data.shape, dtype=out)


_swizzle_mx_scale = torch.ops.moe_ops.swizzle_mx_scale.default


def swizzle_mx_scale(scale: torch.Tensor, offs: torch.Tensor, dim: int) -> torch.Tensor:
    """MX scales of a 2-D grouped operand in the layout upstream's CUDA MX grouped
    GEMMs read, which :func:`scaled_grouped_mm` takes for 2-D operands.

    ``scale`` is the plain ``(R, S)`` grid ``quantize_fp8(x, "mx")`` returns for
    ``x (R, C)``; ``offs`` the int32 group ends along ``x``'s dimension ``dim``:
    ``0`` for the tokens of the 2D x 3D forward (groups of rows), ``1`` for the
    2D x 2D weight gradient (groups along ``C``, on multiples of 32). Each
    group's part of the grid is blocked (32_4_4) on its own, the groups one
    after the other. The shape, ``(R + 128 G, round_up(S, 4))`` (dim 0) or
    ``(round_up(R, 128), S + 4 G)`` (dim 1), bounds the bytes used, which
    depend on ``offs``; unused bytes are zero.
    """
    return _swizzle_mx_scale(scale, offs, dim)


@torch.library.register_fake("moe_ops::swizzle_mx_scale")
def _swizzle_mx_scale_fake(scale, offs, dim):
    _checks.check_swizzle_mx_scale_inputs(scale, offs, dim)
    return scale.new_empty(_checks.swizzle_mx_scale_size(scale.shape[0], scale.shape[1], offs.shape[0], dim))


_scaled_grouped_mm = torch.ops.moe_ops.scaled_grouped_mm.default


def scaled_grouped_mm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    offs: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale_result: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """``torch._scaled_grouped_mm`` on CPU and CUDA, for every recipe on both.

    The grouped mm of the dequantised operands (``grouped_mm``'s four layouts),
    accumulated in float32, rounded once to ``out_dtype`` (bfloat16 by default,
    or float32). Scales, as :func:`quantize_fp8` returns them:

    * rowwise float32, upstream's shapes: ``scale_a (M,)`` / ``(G, M)`` (3-D
      ``mat_a``) / ``(G * M,)`` (2D x 2D); ``scale_b (G, N)`` / ``(N,)`` (2-D
      ``mat_b`` in 3D x 2D) / ``(G * N,)`` (2D x 2D);
    * mx float8_e8m0fnu (2D x 3D, 3D x 3D, 2D x 2D), in upstream's layouts: a
      3-D operand's scale plain, ``(G, rows, ceil(K/32))``, or swizzled
      (``quantize_fp8(..., swizzle=True)``), ``(G, round_up(rows, 128) *
      round_up(ceil(K/32), 4))``, with ``rows`` = N for ``mat_b`` (the scale of
      ``quantize_fp8(w.transpose(-2, -1), "mx")``); a 2-D operand's scale
      blocked per group (:func:`swizzle_mx_scale`): ``mat_a`` of 2D x 3D with
      ``dim=0``, ``mat_a`` and ``mat_b^T`` of 2D x 2D with ``dim=1`` (whose
      ``offs`` must fall on multiples of 32).
    * blockwise float32, DeepSeek-V3's recipe (2D x 3D, 3D x 3D): ``scale_a
      (M, ceil(K/128))`` or ``(G, M, ceil(K/128))`` (1x128 blocks),
      ``scale_b (G, ceil(N/128), ceil(K/128))`` (128x128 blocks of the
      ``(N, K)`` weight: ``quantize_fp8(w.transpose(-2, -1), "blockwise_128x128")``).
      These run on float32 tiles (the scales are arbitrary floats per K block).

    ``bias`` is ``(G, N_out)``; ``scale_result`` must be None; ``use_fast_accum``
    is accepted and ignored (always float32 accumulation).
    """
    return _scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum)


@torch.library.register_fake("moe_ops::scaled_grouped_mm")
def _scaled_grouped_mm_fake(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None,
                            out_dtype=None, use_fast_accum=False):
    _, out_t = _checks.check_scaled_grouped_mm_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result,
                                                      out_dtype)
    return mat_a.new_empty(_checks.grouped_mm_out_size(mat_a, mat_b, offs), dtype=out_t)


@torch.library.register_fake("moe_ops::scaled_grouped_mm_v2")
def _scaled_grouped_mm_v2_fake(self, mat2, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b, offs=None,
                               bias=None, out_dtype=None, contraction_dim=(), use_fast_accum=False):
    _, out_t = _checks.check_scaled_grouped_mm_v2_inputs(self, mat2, scale_a, recipe_a, swizzle_a, scale_b, recipe_b,
                                                         swizzle_b, offs, bias, out_dtype, contraction_dim)
    return self.new_empty(_checks.grouped_mm_out_size(self, mat2, offs), dtype=out_t)


# The CUDA kernel of scaled_grouped_mm_v2 is the CPU one's: the stated recipe checked (the same
# checks and messages), then scaled_grouped_mm's CUDA kernel on the one scale of each operand.
def _scaled_grouped_mm_v2_cuda(self, mat2, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b, offs=None,
                               bias=None, out_dtype=None, contraction_dim=(), use_fast_accum=False):
    _checks.check_scaled_grouped_mm_v2_inputs(self, mat2, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b,
                                              offs, bias, out_dtype, contraction_dim)
    return _scaled_grouped_mm(self, mat2, scale_a[0], scale_b[0], offs, bias, None, out_dtype, use_fast_accum)


_LIB = torch.library.Library("moe_ops", "IMPL")  # noqa: TOR901 (kept alive by this module)
_LIB.impl("scaled_grouped_mm_v2", _scaled_grouped_mm_v2_cuda, "CUDA")

# No derivatives (as upstream's _scaled_grouped_mm): a backward or a forward
# tangent that reaches a float input (a scale, the values being quantised) raises.
for _name in ("quantize_fp8", "dequantize_fp8", "scaled_grouped_mm", "scaled_grouped_mm_v2", "swizzle_mx_scale"):
    register_not_differentiable(f"moe_ops::{_name}")


# ------------------------------------------------------------------ training: fp8_grouped_mm

FP8_TRAINING_RECIPES = ("rowwise", "mx")

_scaled_grouped_mm_v2 = torch.ops.moe_ops.scaled_grouped_mm_v2.default
# The training GEMMs' recipes as v2 states them: ScalingType values per operand.
_V2_SCALING = {"rowwise": _checks.SCALING_TYPES.index("RowWise"), "mx": _checks.SCALING_TYPES.index("BlockWise1x32")}


def _training_gemm(recipe: str, a_d: torch.Tensor, b_d: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor,
                   offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """One training GEMM on scaled_grouped_mm_v2, its recipe stated rather than told from the scales:
    RowWise x RowWise (never swizzled), or BlockWise1x32 x BlockWise1x32 with the 2-D operands' scales
    blocked per group (SWIZZLE_32_4_4) and the 3-D weight's the plain grid (NO_SWIZZLE). v2 checks the
    stated recipe, then runs v1's kernel on the same arguments: the same bits."""
    code = [_V2_SCALING[recipe]]
    if recipe == "mx":
        swizzle_a = [_checks.SWIZZLE_32_4_4]  # mat_a is 2-D in every training GEMM
        swizzle_b = [_checks.SWIZZLE_32_4_4 if b_d.dim() == 2 else _checks.NO_SWIZZLE]
    else:
        swizzle_a = swizzle_b = []
    return _scaled_grouped_mm_v2(a_d, b_d, [a_s], code, swizzle_a, [b_s], code, swizzle_b, offs, None, out_dtype, [],
                                 False)


def _check_training_operands(a: torch.Tensor, b: torch.Tensor, recipe: str) -> None:
    # Plain raises: the conditions are static (recipe, ranks, dtypes), which
    # torch.compile evaluates at trace time. Both the wrapper and the op (called
    # as torch.ops.moe_ops_training.fp8_grouped_mm) check.
    if recipe not in FP8_TRAINING_RECIPES:
        raise ValueError(f"fp8_grouped_mm: recipe must be 'rowwise' or 'mx', got '{recipe}'")
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"fp8_grouped_mm: a must be 2-D and b 3-D, got a {list(a.shape)} and b {list(b.shape)}")
    if a.dtype not in (torch.bfloat16, torch.float32) or b.dtype != a.dtype:
        raise ValueError(f"fp8_grouped_mm: a and b must both be bfloat16 or both float32, got {a.dtype} and {b.dtype}")


# A custom op (not moe_ops: it is composed in Python of moe_ops kernels, and
# moe_ops holds exactly the schemas native_functions.yaml declares), so that its
# gradient is a register_autograd formula as every other op's.
def _fp8_grouped_mm_forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, recipe: str,
                            out_dtype: torch.dtype, wgrad_fp8: bool) -> torch.Tensor:
    """out = A @ B[g] per group of rows, every GEMM in float8 (torchao's MoE training recipe).

    forward  out    = scaled_grouped_mm_v2(q(A) along K,        q(B) along K per column n)      2D x 3D
    dgrad    grad_A = scaled_grouped_mm_v2(q(grad) along N,     q(B^T) along N per column k)    2D x 3D
    wgrad    grad_B = scaled_grouped_mm_v2(q(A^T) per group along tokens, q(grad^T) likewise)   2D x 2D
    The operands are re-quantised along each GEMM's own contraction dimension,
    so every scale block lies within one reduction (and, for wgrad, one group).
    The high-precision A and B are saved, not their float8 copies: the backward
    quantises along other axes. wgrad_fp8=False computes the weight gradient in
    high precision instead (torchao's wgrad_with_hp).
    """
    _check_training_operands(a, b, recipe)
    # custom_op's autograd kernel drops forward tangents as register_autograd's
    # does (_autograd.py); the tensors reach this body as the caller passed them.
    refuse_forward_ad("moe_ops_training::fp8_grouped_mm", (("a", a), ("b", b)))
    a_d, a_s = _quantize(a, recipe, None, None, False)
    if recipe == "mx":  # 2-D operands' MX scales go blocked per group (upstream's layout)
        a_s = _swizzle_mx_scale(a_s, offs, 0)
    bt_d, b_s = _quantize(b.transpose(-2, -1), recipe, None, None, False)
    return _training_gemm(recipe, a_d, bt_d.transpose(-2, -1), a_s, b_s, offs, out_dtype)


_fp8_grouped_mm = torch.library.custom_op("moe_ops_training::fp8_grouped_mm", mutates_args=())(_fp8_grouped_mm_forward)
# The same composition on fake tensors: every op in it has its fake kernel.
_fp8_grouped_mm.register_fake(_fp8_grouped_mm_forward)


def _fp8_grouped_mm_setup_context(ctx, inputs, output):
    a, b, offs, recipe, _, wgrad_fp8 = inputs
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None, offs)
    ctx.recipe = recipe
    ctx.wgrad_fp8 = wgrad_fp8
    ctx.dtypes = (a.dtype, b.dtype)


def _fp8_grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    recipe = ctx.recipe
    a_dtype, b_dtype = ctx.dtypes
    grad = grad.to(a_dtype)
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        g_d, g_s = _quantize(grad, recipe, None, None, False)            # (M, N), along N
        if recipe == "mx":
            g_s = _swizzle_mx_scale(g_s, offs, 0)
        b_d, b_s = _quantize(b, recipe, None, None, False)               # (G, K, N), along N per k
        grad_a = _training_gemm(recipe, g_d, b_d.transpose(-2, -1), g_s, b_s, offs, _out_dtype(a_dtype)).to(a_dtype)
    if ctx.needs_input_grad[1]:
        if ctx.wgrad_fp8:
            # Blocks along the tokens, never across two experts' tokens.
            at_d, at_s = _quantize(a.t(), recipe, None, offs, False)     # (K, M); rowwise (G, K), mx (K, M/32)
            gt_d, gt_s = _quantize(grad.t(), recipe, None, offs, False)  # (N, M); rowwise (G, N), mx (N, M/32)
            if recipe == "rowwise":
                at_s, gt_s = at_s.flatten(), gt_s.flatten()
            else:
                at_s, gt_s = _swizzle_mx_scale(at_s, offs, 1), _swizzle_mx_scale(gt_s, offs, 1)
            grad_b = _training_gemm(recipe, at_d, gt_d.t(), at_s, gt_s, offs, torch.float32)
        else:
            out_dtype = torch.float32 if grad.dtype in (torch.bfloat16, torch.float16) else None
            grad_b = torch.ops.moe_ops.grouped_mm(a.t(), grad, offs, None, out_dtype)
        grad_b = grad_b.to(b_dtype)
    return grad_a, grad_b, None, None, None, None


_fp8_grouped_mm.register_autograd(_fp8_grouped_mm_backward, setup_context=_fp8_grouped_mm_setup_context)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def fp8_grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor,
    recipe: str = "rowwise",
    wgrad: str = "auto",
) -> torch.Tensor:
    """Differentiable ``grouped_mm(a, b, offs)`` (2D x 3D: rows ``offs[g-1]:offs[g]`` of
    ``a (M, K)`` times ``b[g] (K, N)``) with the forward and both backward GEMMs in
    float8_e4m3fn, as torchao's MoE training does.

    ``recipe``: ``"rowwise"`` (float32 scales per row / column of each GEMM's
    operands; the weight gradient's per group of tokens) or ``"mx"`` (1x32
    blocks with e8m0 scales). ``wgrad``: ``"fp8"`` (the weight gradient as a
    scaled 2D x 2D GEMM over each expert's tokens), ``"hp"`` (in high
    precision, torchao's ``wgrad_with_hp``) or ``"auto"``: ``"fp8"`` for
    rowwise, ``"hp"`` for mx, whose float8 weight gradient needs every
    expert's token count to be a multiple of 32 (``permute(..., alignment=32)``;
    checked by the kernels on the values of ``offs``). The output has ``a``'s
    dtype (bfloat16 from bfloat16 inputs, float32 from float32).
    """
    _check_training_operands(a, b, recipe)
    if wgrad not in ("auto", "fp8", "hp"):
        raise ValueError(f"fp8_grouped_mm: wgrad must be 'auto', 'fp8' or 'hp', got '{wgrad}'")
    wgrad_fp8 = wgrad == "fp8" or (wgrad == "auto" and recipe == "rowwise")
    return _fp8_grouped_mm(a, b, offs, recipe, _out_dtype(a.dtype), wgrad_fp8)

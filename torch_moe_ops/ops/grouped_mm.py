"""moe_ops::grouped_mm: wrapper, fake kernel and autograd.

The backward of a grouped matmul is grouped matmuls in the other layouts, so
it calls the op itself and stays traceable under torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from .._autograd import register_autograd

# The public wrappers (torch_moe_ops.ops and torch_moe_ops re-export them).
__all__ = ["grouped_mm"]

_op = torch.ops.moe_ops.grouped_mm.default


def grouped_mm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Grouped matrix multiply, semantics of ``torch._grouped_mm`` plus bias and fp32 output.

    Layouts (``offs`` holds int32 cumulative group ends):

    * ``mat_a (M, K)``, ``mat_b (G, K, N)``: rows ``offs[g-1]:offs[g]`` use expert ``g`` -> ``(M, N)``
    * ``mat_a (G, M, K)``, ``mat_b (K, N)``: columns ``offs[g-1]:offs[g]`` use ``mat_a[g]`` -> ``(M, N)``
    * ``mat_a (M, K)``, ``mat_b (K, N)``: contraction slice per group -> ``(G, M, N)``
    * ``mat_a (G, M, K)``, ``mat_b (G, K, N)``, no offs: batched -> ``(G, M, N)``

    ``bias`` is ``(G, N_out)``. ``out_dtype=torch.float32`` returns the fp32
    accumulator for 16-bit inputs. Elements that no group covers are zero.
    """
    return _op(mat_a, mat_b, offs, bias, out_dtype)


@torch.library.register_fake("moe_ops::grouped_mm")
def _grouped_mm_fake(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    out_dtype = _checks.check_grouped_mm_inputs(mat_a, mat_b, offs, bias, out_dtype)
    size = _checks.grouped_mm_out_size(mat_a, mat_b, offs)
    strides = _checks.grouped_mm_out_strides(size, out_dtype, mat_a.device)
    return mat_a.new_empty_strided(size, strides, dtype=out_dtype)


def _k_major(mat_b: torch.Tensor) -> bool:
    """Weights stored (..., N, K) and passed as a transposed view, as
    transformers stores them."""
    return mat_b.stride(-2) == 1 and mat_b.stride(-1) != 1 and mat_b.shape[-1] > 1


def _setup_context(ctx, inputs, output):
    mat_a, mat_b, offs, bias, out_dtype = inputs
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(mat_a if need_b else None, mat_b if need_a else None, offs)
    ctx.layout = _checks.grouped_mm_layout(mat_a, mat_b)
    ctx.b_k_major = _k_major(mat_b)
    ctx.in_dtype = mat_a.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # needs_input_grad only spans the arguments actually passed.
    ctx.need_bias = bias is not None and bias.requires_grad


def _bias_grad(grad: torch.Tensor, offs: Optional[torch.Tensor], layout: str, dtype: torch.dtype) -> torch.Tensor:
    """Per-group column sums of grad, accumulated in fp32 (fp64 for fp64) in a fixed order (eager
    ATen's; a compiled backward sums 3D x 2D's in Inductor's order, ~1 ulp from eager's)."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if layout == "2d3d":
        # Row sums per group are a 2D x 2D grouped mm with a row of ones.
        ones = grad.new_ones((1, grad.shape[0]))
        out_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else None
        return _op(ones, grad, offs, None, out_dtype).squeeze(1).to(dtype)
    if layout == "3d2d":
        # Group g owns columns offs[g-1]:offs[g]. The column indices are made
        # from offs (new_ones), so that they are DTensors when offs is one.
        col_sum = grad.sum(0, dtype=acc)
        cols = offs.new_ones(grad.shape[1]).cumsum(0) - 1
        starts = torch.cat([offs.new_zeros(1), offs[:-1]])
        mask = (cols.unsqueeze(0) >= starts.unsqueeze(1)) & (cols.unsqueeze(0) < offs.unsqueeze(1))
        return torch.where(mask, col_sum.unsqueeze(0), 0).to(dtype)
    return grad.sum(1, dtype=acc).to(dtype)  # (G, M, N) outputs


def _backward(ctx, grad):
    mat_a, mat_b, offs = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g = grad.to(ctx.in_dtype)
    grad_a = grad_b = grad_bias = None
    layout = ctx.layout
    if layout == "2d3d":    # out[rows_g] = A[rows_g] @ B[g]
        if need_a:
            grad_a = _op(g, mat_b.transpose(-2, -1), offs)            # 2D x 3D
        if need_b:
            # In mat_b's own layout, so that autograd need not copy the
            # gradient of a transposed weight view into the weight's layout.
            if ctx.b_k_major:
                grad_b = _op(g.t(), mat_a, offs).transpose(-2, -1)    # 2D x 2D over M, (G, N, K)
            else:
                grad_b = _op(mat_a.t(), g, offs)                      # 2D x 2D over M
    elif layout == "3d2d":  # out[:, cols_g] = A[g] @ B[:, cols_g]
        if need_a:
            grad_a = _op(g, mat_b.t(), offs)                          # 2D x 2D over N
        if need_b:
            grad_b = _op(mat_a.transpose(-2, -1), g, offs)            # 3D x 2D
    elif layout == "2d2d":  # out[g] = A[:, ks_g] @ B[ks_g, :]
        if need_a:
            grad_a = _op(g, mat_b.t(), offs)                          # 3D x 2D over K
        if need_b:
            grad_b = _op(mat_a.t(), g, offs)                          # 2D x 3D over K
    else:                   # batched
        if need_a:
            grad_a = _op(g, mat_b.transpose(-2, -1))
        if need_b:
            if ctx.b_k_major:
                grad_b = _op(g.transpose(-2, -1), mat_a).transpose(-2, -1)
            else:
                grad_b = _op(mat_a.transpose(-2, -1), g)
    if ctx.need_bias:
        grad_bias = _bias_grad(grad, offs, layout, ctx.bias_dtype)
    return grad_a, grad_b, None, grad_bias, None


register_autograd("moe_ops::grouped_mm", _backward, setup_context=_setup_context)


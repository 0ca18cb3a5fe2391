"""moe_ops::grouped_mm_gather and moe_ops::expert_mlp: the routed experts of
an MoE layer as one op, with a memory-lean backward
(csrc/moe/ExpertMLP.h has the math), on a grouped GEMM that reads the
tokens in place.

    out = fused_experts(tokens, expert_ids, weights, gate_up_proj, down_proj)

runs, for every (token, slot), ``weight * down(act(gate_up(token)))`` and sums
each token's k rows in fp32 in slot order. Autograd keeps the inputs, the
routing and the up-projection output ``h (T * k, N1)``; nothing of size
``T * k * H`` is kept (transformers' grouped_mm path keeps the permuted tokens,
the activation, its gate and up halves and the down-projection output).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from .._autograd import register_autograd
from .grouped_mm import _bias_grad
from .routing import _unpermute_backward, permute

# The public wrappers (torch_moe_ops.ops and torch_moe_ops re-export them).
__all__ = ["fused_experts", "grouped_mm_gather"]

_gather_op = torch.ops.moe_ops.grouped_mm_gather.default


def grouped_mm_gather(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: torch.Tensor,
    a_index: Optional[torch.Tensor] = None,
    b_index: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """:func:`grouped_mm` whose grouped dimension (the one ``offs`` splits) is read through an index.

    * ``mat_a (T, K)``, ``mat_b (G, K, N)``, ``a_index (M,)``: row ``i`` of the grouped A is
      ``mat_a[a_index[i]]`` -> ``(M, N)``: an MoE layer's up-projection straight from its tokens.
    * ``mat_a (M, T)``, ``mat_b (T', N)``, ``a_index (K,)`` and/or ``b_index (K,)``: column ``k`` of
      A is ``mat_a[:, a_index[k]]``, row ``k`` of B is ``mat_b[b_index[k]]`` -> ``(G, M, N)``: weight
      gradients from the tokens (or their gradients) in place.

    int64 indices; ``-1`` reads zeros. The kernel gathers while packing its
    tiles: no gathered copy is made on CPU. Differentiable in ``mat_a``,
    ``mat_b`` and ``bias``; a row or column read by several indices gets the
    sum of their gradients (fp32, index order, one rounding).
    """
    return _gather_op(mat_a, mat_b, offs, a_index, b_index, bias, out_dtype)


@torch.library.register_fake("moe_ops::grouped_mm_gather")
def _grouped_mm_gather_fake(mat_a, mat_b, offs, a_index=None, b_index=None, bias=None, out_dtype=None):
    a, b, out_dtype = _checks.check_grouped_mm_gather_inputs(mat_a, mat_b, offs, a_index, b_index, bias, out_dtype)
    size = _checks.grouped_mm_out_size(a, b, offs)
    strides = _checks.grouped_mm_out_strides(size, out_dtype, mat_a.device)
    return mat_a.new_empty_strided(size, strides, dtype=out_dtype)


def _wide(t: torch.Tensor) -> Optional[torch.dtype]:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None


def _scatter_rows(rows: torch.Tensor, index: Optional[torch.Tensor], size: int, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum of rows[i] over i with index[i] == t (zero for -1), in
    index order and rounded once: unpermute's backward with one slot per row,
    deterministic on every device. No index: the rows as they are."""
    if index is None:
        return rows.to(dtype)
    return _unpermute_backward(rows, index.reshape(-1, 1), size, None, None)[0].to(dtype)


def _gather_setup_context(ctx, inputs, output):
    mat_a, mat_b, offs, a_index, b_index, bias, out_dtype = inputs
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(mat_a if need_b else None, mat_b if need_a else None, offs, a_index, b_index)
    ctx.shapes = (mat_a.shape, mat_b.shape)
    ctx.dtypes = (mat_a.dtype, bias.dtype if bias is not None else None)
    ctx.need_bias = bias is not None and bias.requires_grad


def _gather_backward(ctx, grad):
    """out = gathered(A) @ gathered(B) per group; the gradients of the
    gathered operands are grouped mms read through the same indices, then
    summed back onto the rows (columns) the indices name."""
    mat_a, mat_b, offs, a_index, b_index = ctx.saved_tensors
    (a_shape, b_shape), (dtype, bias_dtype) = ctx.shapes, ctx.dtypes
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g = grad.to(dtype)
    grad_a = grad_b = grad_bias = None
    if len(b_shape) == 3:  # 2D x 3D: out[i] = A[a_index[i]] @ B[g(i)]
        if need_a:
            rows = torch.ops.moe_ops.grouped_mm(g, mat_b.transpose(-2, -1), offs, None, _wide(g))
            grad_a = _scatter_rows(rows, a_index, a_shape[0], dtype)
        if need_b:
            grad_b = _gather_op(mat_a.t(), g, offs, a_index, None, None, None)
    else:  # 2D x 2D: out[g] = A[:, a_index[k]] @ B[b_index[k], :] over the k of group g
        if need_a:
            # Column k of A's gradient, grad[g(k)] @ B[b_index[k]], as row k of a (K, M) 2D x 3D product.
            if b_index is not None:
                cols = _gather_op(mat_b, g.transpose(-2, -1), offs, b_index, None, None, _wide(g))
            else:
                cols = torch.ops.moe_ops.grouped_mm(mat_b, g.transpose(-2, -1), offs, None, _wide(g))
            grad_a = _scatter_rows(cols, a_index, a_shape[1], dtype).t()
        if need_b:
            # Row k of B's gradient, A[:, a_index[k]] @ grad[g(k)], (K, N).
            if a_index is not None:
                rows = _gather_op(mat_a.t(), g, offs, a_index, None, None, _wide(g))
            else:
                rows = torch.ops.moe_ops.grouped_mm(mat_a.t(), g, offs, None, _wide(g))
            grad_b = _scatter_rows(rows, b_index, b_shape[0], dtype)
    if ctx.need_bias:
        # The bias is added after the gather: grouped_mm's own bias gradient.
        grad_bias = _bias_grad(grad, offs, "2d3d" if len(b_shape) == 3 else "2d2d", bias_dtype)
    return grad_a, grad_b, None, None, None, grad_bias, None


register_autograd("moe_ops::grouped_mm_gather", _gather_backward, setup_context=_gather_setup_context)


# ------------------------------------------------------------------ expert_mlp

_op = torch.ops.moe_ops.expert_mlp.default
_backward_op = torch.ops.moe_ops.expert_mlp_backward.default


def fused_experts(
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: Optional[torch.Tensor],
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    activation: str = "swiglu",
    gate_up_interleaved: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """The routed experts on ``tokens (T, H)`` with routing ``expert_ids (T, k)`` and
    ``weights (T, k)`` (float32 or the tokens' dtype; None for plain sums).

    Weights in grouped_mm's orientation, any strides: ``gate_up_proj (E, H, N1)``,
    ``down_proj (E, I, H)``; transformers' ``(E, N1, H)`` / ``(E, H, I)`` parameters are
    passed as ``.transpose(-2, -1)`` views and get their gradients in their own layout.
    ``N1 = 2I`` for gated activations (``"swiglu"``, ``"geglu"``, ``"swiglu_clamped"``:
    gpt-oss's clamped, ``sigmoid(alpha * gate)``-gated, ``(up + 1)``; gate then up, or
    alternating with ``gate_up_interleaved``), ``I`` for ``"silu"``, ``"gelu"``, ``"relu"``.
    Optional biases ``(E, N1)`` and ``(E, H)``. Returns ``(T, H)`` in the tokens' dtype.

    Rounding: ``h``, the activation and each row's down projection are stored in the tokens' dtype,
    as a torch composition in that dtype stores them; the GEMMs' sums and the activation are computed
    in float32 (float64 for float64), and each token's k rows are summed in float32 in slot order and
    rounded once. So in float16 an activation past 65504 is inf, as in plain torch.
    """
    # Routing only: a zero-width view moves no token bytes through permute.
    _, dst_rows, src_rows, offs = permute(tokens.detach()[:, :0], expert_ids, gate_up_proj.shape[0])
    out, _ = _op(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                 activation, gate_up_interleaved, swiglu_alpha, swiglu_limit)
    return out


@torch.library.register_fake("moe_ops::expert_mlp")
def _expert_mlp_fake(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias=None,
                     down_bias=None, activation="swiglu", gate_up_interleaved=False, swiglu_alpha=1.702,
                     swiglu_limit=7.0):
    _checks.check_expert_mlp_inputs(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                                    gate_up_bias, down_bias, activation, gate_up_interleaved)
    return tokens.new_empty(tokens.shape), tokens.new_empty((src_rows.shape[0], gate_up_proj.shape[2]))


def _like_strides(w: torch.Tensor) -> torch.Tensor:
    """An empty tensor with the strides the backward gives w's gradient: transformers'
    layout (a transposed view) keeps its layout, anything else is contiguous."""
    k_major = w.stride(-2) == 1 and w.stride(-1) != 1 and w.shape[-1] > 1
    if k_major:
        return w.new_empty((w.shape[0], w.shape[2], w.shape[1])).transpose(-2, -1)
    return w.new_empty(w.shape)


@torch.library.register_fake("moe_ops::expert_mlp_backward")
def _expert_mlp_backward_fake(grad_out, tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                              gate_up_bias, down_bias, h, activation, gate_up_interleaved, swiglu_alpha,
                              swiglu_limit, output_mask):
    _checks.check_expert_mlp_inputs(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                                    gate_up_bias, down_bias, activation, gate_up_interleaved)
    _checks.check_expert_mlp_backward_inputs(grad_out, tokens, src_rows, gate_up_proj, h)
    need_tokens, need_weights, need_gate_up, need_down = output_mask
    none = lambda: tokens.new_empty((0,))  # noqa: E731  (distinct tensors: outputs never alias)
    return (
        tokens.new_empty(tokens.shape) if need_tokens else none(),
        weights.new_empty(weights.shape) if need_weights and weights is not None else none(),
        _like_strides(gate_up_proj) if need_gate_up else none(),
        _like_strides(down_proj) if need_down else none(),
        gate_up_bias.new_empty(gate_up_bias.shape) if need_gate_up and gate_up_bias is not None else none(),
        down_bias.new_empty(down_bias.shape) if need_down and down_bias is not None else none(),
    )


# Argument positions of expert_mlp's differentiable inputs.
_TOKENS, _WEIGHTS, _GATE_UP, _DOWN, _GATE_UP_BIAS, _DOWN_BIAS = 0, 4, 5, 6, 7, 8


def _setup_context(ctx, inputs, output):
    (tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
     interleaved, alpha, limit) = inputs
    _, h = output
    # h is returned only so that the backward can keep it: not a function of
    # the inputs to differentiate through (a loss on it gets no gradient, so
    # autograd refuses it instead of returning zeros).
    ctx.mark_non_differentiable(h)
    # The lean set: inputs, routing and h; no activation of size T * k * H.
    ctx.save_for_backward(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
                          down_bias, h)
    ctx.args = (activation, interleaved, alpha, limit)
    need = ctx.needs_input_grad
    ctx.mask = [need[_TOKENS], weights is not None and need[_WEIGHTS],
                need[_GATE_UP] or (gate_up_bias is not None and need[_GATE_UP_BIAS]),
                need[_DOWN] or (down_bias is not None and need[_DOWN_BIAS])]


def _backward(ctx, grad_out, grad_h):
    tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h = ctx.saved_tensors
    if grad_out is None or not any(ctx.mask):
        return (None,) * 13
    g_tokens, g_weights, g_gate_up, g_down, g_gate_up_bias, g_down_bias = _backward_op(
        grad_out.to(tokens.dtype), tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
        down_bias, h, *ctx.args, ctx.mask)
    need = ctx.needs_input_grad
    pick = lambda g, i: g if need[i] else None  # noqa: E731
    return (pick(g_tokens, _TOKENS), None, None, None,
            pick(g_weights, _WEIGHTS) if weights is not None else None,
            pick(g_gate_up, _GATE_UP), pick(g_down, _DOWN),
            pick(g_gate_up_bias, _GATE_UP_BIAS) if gate_up_bias is not None else None,
            pick(g_down_bias, _DOWN_BIAS) if down_bias is not None else None,
            None, None, None, None)


register_autograd("moe_ops::expert_mlp", _backward, setup_context=_setup_context)


def _double_backward(ctx, *grads):
    # Without an autograd kernel of its own, expert_mlp_backward ran under
    # autograd's fallthrough: the ATen calls inside its float64 path recorded
    # a partial graph, so a second derivative came back None, partly right or
    # failing on an inner op ("derivative for aten::silu_backward is not
    # implemented"). One clear error instead (the upstream series' generated
    # autograd, with no derivative for _moe_expert_mlp_backward, raises too).
    raise RuntimeError(
        "moe_ops::expert_mlp (fused_experts) has no double backward: its backward, "
        "moe_ops::expert_mlp_backward, is not differentiable. For higher-order gradients compose "
        "permute, grouped_mm, the activation in torch and unpermute, which are.")


register_autograd("moe_ops::expert_mlp_backward", _double_backward)

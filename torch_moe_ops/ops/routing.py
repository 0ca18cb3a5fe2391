"""moe_ops::router_topk, moe_ops::permute, moe_ops::unpermute: wrappers, fake
kernels and autograd.

The token flow of an MoE layer::

    weights, ids, counts = router_topk(logits, k)                    # (T, k) fp32, (T, k) int32, (E,) int32
    x, dst_rows, src_rows, offs = permute(tokens, ids, E)            # (R, H) expert-sorted, offs for grouped_mm
    y = grouped_mm(x, w_experts, offs)                               # (R, N)
    out = unpermute(y, dst_rows, weights)                            # (T, N)

Every output shape is a function of the input shapes only (permute sizes its
output for the worst case), so the whole flow compiles with
``fullgraph=True, dynamic=True`` and no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from .._autograd import register_autograd

# The public wrappers (torch_moe_ops.ops and torch_moe_ops re-export them).
__all__ = ["permute", "router_topk", "unpermute"]

_router_topk = torch.ops.moe_ops.router_topk.default
_permute = torch.ops.moe_ops.permute.default
_unpermute = torch.ops.moe_ops.unpermute.default
_unpermute_backward = torch.ops.moe_ops.unpermute_backward.default


def router_topk(
    logits: torch.Tensor,
    k: int,
    score_func: str = "softmax",
    bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k expert selection from router logits ``(T, E)``.

    ``score_func``: ``"softmax"`` or ``"sigmoid"`` over the experts, or
    ``"softmax_after_topk"`` (gpt-oss: select on the logits, softmax over the
    k chosen). ``bias`` ``(E,)`` is added to the scores for the selection only
    (aux-loss-free balancing); the weights are the unbiased scores. With
    ``n_group > 1`` (DeepSeek-V3) the experts form ``n_group`` equal groups,
    only the ``topk_group`` groups with the largest sum of their two best
    selection scores are eligible. ``renormalize`` divides the k weights by
    their sum; then they are multiplied by ``scaling_factor``.

    Experts are ordered by selection score, ties to the lower id. Returns
    weights ``(T, k)`` float32 (float64 for float64 logits), expert ids
    ``(T, k)`` int32 and tokens per expert ``(E,)`` int32. Differentiable in
    ``logits`` (through the weights).
    """
    return _router_topk(logits, k, score_func, bias, n_group, topk_group, renormalize, scaling_factor)


def permute(
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    alignment: int = 1,
    first_expert: int = 0,
    num_local_experts: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts the ``(token, slot)`` rows of ``tokens (T, H)`` by expert.

    Only experts ``[first_expert, first_expert + L)`` are kept (``L =
    num_local_experts``, default all from ``first_expert``); other ids are
    dropped. Within an expert rows keep ``(token, slot)`` order. Each group
    starts on a multiple of ``alignment`` (a power of two <= 128); padding rows
    are zero.

    Returns

    * ``permuted (R, H)``, ``R = T * k + L * (alignment - 1)``: the worst case,
      so the shape never depends on the routing. Rows ``[offs[-1], R)`` are
      unused and zero.
    * ``dst_rows (T, k)`` int64: the row of each ``(token, slot)``, -1 if dropped
      (``(dst_rows < 0).sum()`` counts the dropped ones).
    * ``src_rows (R,)`` int64: ``token * k + slot`` of each row, -1 for padding
      and unused rows.
    * ``offs (L,)`` int32: group ends, the ``offs`` of ``grouped_mm``.

    Differentiable in ``tokens``.
    """
    return _permute(tokens, expert_ids, num_experts, alignment, first_expert, num_local_experts)


def unpermute(
    permuted: torch.Tensor, dst_rows: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Inverse of :func:`permute`: ``out[t] = sum_j weights[t, j] * permuted[dst_rows[t, j]]``.

    Dropped slots (``dst_rows == -1``) contribute nothing. Accumulates in
    float32 (float64 for float64) in slot order and rounds once to the dtype
    of ``permuted``: deterministic, no atomics. ``weights`` is float32 or the
    dtype of ``permuted``. Differentiable in ``permuted`` and ``weights``, to
    any order (its backward, ``moe_ops::unpermute_backward``, is itself
    differentiable).
    """
    return _unpermute(permuted, dst_rows, weights)


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("moe_ops::router_topk")
def _router_topk_fake(
    logits, k, score_func="softmax", bias=None, n_group=1, topk_group=1, renormalize=False, scaling_factor=1.0
):
    _checks.check_router_topk_inputs(logits, k, score_func, bias, n_group, topk_group)
    tokens, experts = logits.shape
    weights = logits.new_empty((tokens, k), dtype=_checks.router_topk_weights_dtype(logits.dtype))
    return weights, logits.new_empty((tokens, k), dtype=torch.int32), logits.new_empty((experts,), dtype=torch.int32)


@torch.library.register_fake("moe_ops::permute")
def _permute_fake(tokens, expert_ids, num_experts, alignment=1, first_expert=0, num_local_experts=None):
    _checks.check_permute_inputs(tokens, expert_ids, num_experts, alignment, first_expert, num_local_experts)
    num_local = _checks.permute_num_local(num_experts, first_expert, num_local_experts)
    rows = _checks.permute_num_rows(tokens.shape[0], expert_ids.shape[1], num_local, alignment)
    return (
        tokens.new_empty((rows, tokens.shape[1])),
        expert_ids.new_empty(expert_ids.shape, dtype=torch.int64),
        expert_ids.new_empty((rows,), dtype=torch.int64),
        expert_ids.new_empty((num_local,), dtype=torch.int32),
    )


@torch.library.register_fake("moe_ops::unpermute")
def _unpermute_fake(permuted, dst_rows, weights=None):
    _checks.check_unpermute_inputs(permuted, dst_rows, weights)
    return permuted.new_empty((dst_rows.shape[0], permuted.shape[1]))


@torch.library.register_fake("moe_ops::unpermute_backward")
def _unpermute_backward_fake(grad_output, dst_rows, num_rows, weights=None, permuted=None):
    _checks.check_unpermute_backward_inputs(grad_output, dst_rows, num_rows, weights, permuted)
    grad_permuted = grad_output.new_empty((num_rows, grad_output.shape[1]))
    if permuted is None:
        return grad_permuted, grad_output.new_empty((0,), dtype=torch.float32)
    w_dtype = weights.dtype if weights is not None else torch.float32
    return grad_permuted, grad_output.new_empty(dst_rows.shape, dtype=w_dtype)


# -------------------------------------------------------------------- autograd


def _router_topk_setup_context(ctx, inputs, output):
    logits, k, score_func, bias, n_group, topk_group, renormalize, scaling_factor = inputs
    _, expert_ids, _ = output
    ctx.save_for_backward(logits if ctx.needs_input_grad[0] else None, expert_ids)
    ctx.score_func = score_func
    ctx.renormalize = renormalize
    ctx.scaling_factor = scaling_factor


def _router_topk_backward(ctx, grad_weights, grad_ids, grad_counts):
    """The weights are a smooth function of the logits once the expert ids are
    fixed (selection is piecewise constant), so the gradient is that of
    gather(score(logits), ids) -> renormalize -> scale. Computed in the
    weights' precision; the scatters write distinct ids per row, so they are
    deterministic."""
    logits, ids = ctx.saved_tensors
    if logits is None or grad_weights is None:
        return (None,) * 8
    acc = _checks.router_topk_weights_dtype(logits.dtype)
    x = logits.to(acc)
    ids = ids.long()
    g = grad_weights.to(acc) * ctx.scaling_factor
    if ctx.score_func == "softmax_after_topk":
        v = torch.softmax(x.gather(1, ids), dim=-1)
    else:
        s = torch.softmax(x, dim=-1) if ctx.score_func == "softmax" else torch.sigmoid(x)
        v = s.gather(1, ids)
    if ctx.renormalize:
        total = v.sum(-1, keepdim=True)
        w = v / total
        g = (g - (g * w).sum(-1, keepdim=True)) / total
    if ctx.score_func == "softmax_after_topk":
        d_sel = v * (g - (g * v).sum(-1, keepdim=True))
        d_x = torch.zeros_like(x).scatter(1, ids, d_sel)
    else:
        d_s = torch.zeros_like(x).scatter(1, ids, g)
        if ctx.score_func == "softmax":
            d_x = s * (d_s - (d_s * s).sum(-1, keepdim=True))
        else:
            d_x = d_s * s * (1 - s)
    return d_x.to(logits.dtype), None, None, None, None, None, None, None


register_autograd(
    "moe_ops::router_topk", _router_topk_backward, setup_context=_router_topk_setup_context)


def _permute_setup_context(ctx, inputs, output):
    _, dst_rows, _, _ = output
    ctx.save_for_backward(dst_rows)


def _permute_backward(ctx, grad_permuted, grad_dst, grad_src, grad_offs):
    # Each token's gradient is the sum of its k rows' gradients: unpermute
    # without weights (fp32 accumulation in slot order, one rounding).
    (dst_rows,) = ctx.saved_tensors
    if grad_permuted is None:
        return (None,) * 6
    return _unpermute(grad_permuted, dst_rows, None), None, None, None, None, None


register_autograd("moe_ops::permute", _permute_backward, setup_context=_permute_setup_context)


def _unpermute_setup_context(ctx, inputs, output):
    permuted, dst_rows, weights = inputs
    need_permuted = ctx.needs_input_grad[0]
    need_weights = weights is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(dst_rows, weights if need_permuted else None, permuted if need_weights else None)
    ctx.num_rows = permuted.shape[0]
    ctx.need_permuted = need_permuted


def _unpermute_autograd_backward(ctx, grad):
    dst_rows, weights, permuted = ctx.saved_tensors
    grad_permuted, grad_weights = _unpermute_backward(grad, dst_rows, ctx.num_rows, weights, permuted)
    return (grad_permuted if ctx.need_permuted else None), None, (grad_weights if permuted is not None else None)


register_autograd(
    "moe_ops::unpermute", _unpermute_autograd_backward, setup_context=_unpermute_setup_context)


def _unpermute_backward_setup_context(ctx, inputs, output):
    grad_output, dst_rows, num_rows, weights, permuted = inputs
    ctx.save_for_backward(grad_output, dst_rows, weights, permuted)
    ctx.num_rows = num_rows


def _unpermute_backward_autograd_backward(ctx, h_permuted, grad_grad_weights):
    """unpermute's double backward. unpermute_backward is bilinear: with
    g = grad_output, P = permuted, w = weights (ones when None),

        grad_permuted[r]   = sum over (t, j) with dst_rows[t, j] = r of w[t, j] * g[t]
        grad_weights[t, j] = <g[t], P[dst_rows[t, j]]>

    so for incoming gradients hP of grad_permuted and hw of grad_weights

        d grad_output[t] = sum_j w[t, j] * hP[dst_rows[t, j]] + hw[t, j] * P[dst_rows[t, j]]
                         = unpermute(hP, dst_rows, w) + unpermute(P, dst_rows, hw)
        d weights[t, j]  = <g[t], hP[dst_rows[t, j]]>      (unpermute_backward's grad_weights, P := hP)
        d permuted[r]    = sum over dst_rows[t, j] = r of hw[t, j] * g[t]
                                                          (its grad_permuted, w := hw)

    each the op itself, so higher orders follow. Without this registration
    autograd took unpermute_backward as a constant: a second derivative came
    back None or zero, with only a warning."""
    grad_output, dst_rows, weights, permuted = ctx.saved_tensors
    # grad_weights is an empty placeholder when permuted was not given.
    h_weights = grad_grad_weights if permuted is not None else None
    d_grad = d_weights = d_permuted = None
    if ctx.needs_input_grad[0]:
        if h_permuted is not None:
            d_grad = _unpermute(h_permuted, dst_rows, weights)
        if h_weights is not None:
            term = _unpermute(permuted, dst_rows, h_weights)
            d_grad = term if d_grad is None else d_grad + term
    if weights is not None and ctx.needs_input_grad[3] and h_permuted is not None:
        d_weights = _unpermute_backward(grad_output, dst_rows, ctx.num_rows, weights, h_permuted)[1]
    if permuted is not None and ctx.needs_input_grad[4] and h_weights is not None:
        d_permuted = _unpermute_backward(grad_output, dst_rows, ctx.num_rows, h_weights, None)[0]
    return d_grad, None, None, d_weights, d_permuted


register_autograd(
    "moe_ops::unpermute_backward", _unpermute_backward_autograd_backward,
    setup_context=_unpermute_backward_setup_context)

"""Autograd registration shared by the op families (ops/, triton/): torch.library's backward
formula, and a refusal of forward-mode AD.

torch.library's autograd kernel (torch 2.14) has no forward-mode rule, and it
runs the op below autograd whenever no input requires grad: an input's forward
tangent (torch.autograd.forward_ad, torch.func.jvp, jacfwd, hessian) is then
dropped without a word, forward_ad reading None and torch.func a zero tangent.
torch's own ops without a forward formula raise instead (torch._grouped_mm:
"Trying to use forward AD with _grouped_mm that does not support it"), and so
do ours, naming the argument.

The float8 ops have no derivative at all. Without an autograd kernel, autograd's
fallback let a gradient reach their float inputs (a scale, the values being
quantised) as None, with only a warning; torch's generated autograd gives an
op without a formula a node that raises ("derivative for
aten::_scaled_grouped_mm is not implemented"), and register_not_differentiable
does the same.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
# What torch.library.register_autograd registers; built here so that the
# refusal can run before it (the public function keeps no handle on it).
from torch._library.autograd import Info, make_autograd_impl

# One registration library per namespace, kept alive with the module.
_LIBRARIES: dict[str, torch.library.Library] = {}


REVERSE_MODE_HINT = ("Use reverse mode (torch.autograd.grad, .backward()), or the plain-torch references in "
                     "torch_moe_ops.reference, which support forward AD.")


def refuse_forward_ad(op_name: str, named_args, hint: str = REVERSE_MODE_HINT) -> None:
    """Raise if any (name, value) tensor carries a forward tangent at the
    current dual level. Under torch.func.jvp the op's autograd kernel runs
    first at the jvp layer, where the tangent is visible; that call raises."""
    # No dual level, no tangent: one read instead of unpack_dual on every
    # tensor (~1 us each, on every call of every op; the level is what
    # unpack_dual itself reads, and torch.func.jvp enters one).
    if fwAD._current_level < 0:
        return
    for name, value in named_args:
        tensors = value if isinstance(value, (list, tuple)) else [value]  # Tensor[] (scaled_grouped_mm_v2's scales)
        if any(isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors):
            raise NotImplementedError(
                f"{op_name}: forward-mode AD is not supported: {name} has a forward tangent "
                "(torch.autograd.forward_ad, torch.func.jvp/jacfwd/hessian), and the op has no forward formula, "
                f"so its outputs' tangents would be missing. {hint}")


def register_autograd(qualname: str, backward: Callable, setup_context: Optional[Callable] = None,
                      forward_ad_hint: str = REVERSE_MODE_HINT) -> None:
    """torch.library.register_autograd(qualname, backward, setup_context=...),
    refusing inputs that carry a forward tangent."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    arg_names = [a.name for a in op._schema.arguments]
    autograd_kernel = make_autograd_impl(op, Info(backward, setup_context))

    def kernel(keyset, *args, **kwargs):
        refuse_forward_ad(qualname, zip(arg_names, args), forward_ad_hint)
        return autograd_kernel(keyset, *args, **kwargs)

    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    _LIBRARIES[namespace].impl(name, kernel, "Autograd", with_keyset=True)


def register_not_differentiable(qualname: str) -> None:
    """An autograd kernel for an op without a derivative: the forward runs
    (outputs require grad when an input does), a backward that reaches it and
    a forward tangent raise."""

    why = ("its float8 arithmetic has none (the float8 training GEMM with gradients is "
           "moe_ops_training::fp8_grouped_mm, torch_moe_ops.fp8_grouped_mm)")

    def backward(ctx, *grads):
        raise NotImplementedError(f"the derivative for {qualname} is not implemented: {why}")

    register_autograd(qualname, backward, forward_ad_hint=f"It has no derivative: {why}.")

"""transformers' experts interface, served by the moe_ops.

    import torch_moe_ops.integrations.transformers as moe_tf
    moe_tf.register()
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="torch_moe_ops")

Every experts module that transformers (>= 5) builds with
``use_experts_implementation`` then runs on our ops, the same weights in place
(either weight layout, read through views):

* ``"torch_moe_ops"``: the fused experts (:func:`torch_moe_ops.ops.fused_experts`:
  tokens gathered inside the GEMM, only the up-projection output kept for the
  backward) whenever the module's gate is one the op implements (the default
  ``act_fn(gate) * up`` with SiLU or exact GELU, gpt-oss's clamped SwiGLU, or a
  plain SiLU / GELU / ReLU) and there is no post-expert norm; otherwise the
  unfused composition below.
* ``"torch_moe_ops_unfused"``: permute -> grouped_mm -> the module's own gate
  or activation -> grouped_mm -> unpermute, for any module.

Both combine each token's k rows in fp32 in a fixed order.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import fused_experts, grouped_mm, permute, unpermute

NAME = "torch_moe_ops"
UNFUSED_NAME = "torch_moe_ops_unfused"


def _weight(module: torch.nn.Module, name: str) -> torch.Tensor:
    """(E, in, out) view of an expert weight stored as (E, out, in) unless
    the module says it is transposed."""
    w = getattr(module, name)
    return w if module.is_transposed else w.transpose(-2, -1)


def _routing_weights(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if top_k_weights.shape != top_k_index.shape:  # (tokens, num_experts) routing weights
        top_k_weights = top_k_weights.gather(1, top_k_index)
    if top_k_weights.dtype not in (torch.float32, dtype):
        top_k_weights = top_k_weights.float()
    return top_k_weights


def _check_not_expert_parallel(module: torch.nn.Module) -> None:
    if getattr(module, "_is_expert_parallel", False):
        raise NotImplementedError("torch_moe_ops experts: expert parallelism goes through "
                                  "torch_moe_ops.distributed, not transformers' sentinel ids")


def fused_activation(module: torch.nn.Module) -> Optional[dict]:
    """expert_mlp's activation arguments for this module, or None if its gate is not one the op implements."""
    if module.has_post_expert_norm:
        return None
    act_fn = getattr(module, "act_fn", None)
    if module.has_gate:
        apply_gate = getattr(type(module), "_apply_gate", None)
        if type(module).__name__ == "GptOssExperts" and not module.is_concatenated:
            return dict(activation="swiglu_clamped", gate_up_interleaved=True,
                        swiglu_alpha=float(module.alpha), swiglu_limit=float(module.limit))
        from transformers.integrations.moe import _default_apply_gate
        if apply_gate is not _default_apply_gate or not module.is_concatenated:
            return None
        name = _activation_name(act_fn)
        gated = {"silu": "swiglu", "gelu": "geglu"}.get(name)
        return dict(activation=gated) if gated else None
    name = _activation_name(act_fn)
    return dict(activation=name) if name else None


def _activation_name(act_fn) -> Optional[str]:
    from transformers.activations import GELUActivation, SiLUActivation
    if isinstance(act_fn, (SiLUActivation, torch.nn.SiLU)):
        return "silu"
    if isinstance(act_fn, torch.nn.ReLU):
        return "relu"
    if isinstance(act_fn, GELUActivation) and act_fn.act is torch.nn.functional.gelu:
        return "gelu"
    if isinstance(act_fn, torch.nn.GELU) and act_fn.approximate == "none":
        return "gelu"
    return None


def moe_ops_experts_unfused_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    _check_not_expert_parallel(self)
    rows, dst_rows, _, offs = permute(hidden_states, top_k_index, self.num_experts)
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up_bias = getattr(self, f"{up_name}_bias") if self.has_bias else None
    h = grouped_mm(rows, _weight(self, up_name), offs, up_bias)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    down_bias = self.down_proj_bias if self.has_bias else None
    y = grouped_mm(h.to(rows.dtype), _weight(self, "down_proj"), offs, down_bias)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    weights = _routing_weights(top_k_index, top_k_weights, y.dtype)
    return unpermute(y, dst_rows, weights).to(hidden_states.dtype)


def moe_ops_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    _check_not_expert_parallel(self)
    activation = fused_activation(self)
    if activation is None:
        return moe_ops_experts_unfused_forward(self, hidden_states, top_k_index, top_k_weights)
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    weights = _routing_weights(top_k_index, top_k_weights, hidden_states.dtype)
    return fused_experts(
        hidden_states, top_k_index, weights, _weight(self, up_name), _weight(self, "down_proj"),
        getattr(self, f"{up_name}_bias") if self.has_bias else None,
        self.down_proj_bias if self.has_bias else None,
        **activation)


def register() -> None:
    """Adds ``"torch_moe_ops"`` (and ``"torch_moe_ops_unfused"``) to transformers' experts implementations."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, moe_ops_experts_forward)
    ExpertsInterface.register(UNFUSED_NAME, moe_ops_experts_unfused_forward)

"""transformers' experts interface, served by the moe_ops.

    import torch_moe_ops.integrations.transformers as moe_tf
    moe_tf.register()
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="torch_moe_ops")

Every experts module that transformers (>= 5) builds with
``use_experts_implementation`` then runs permute -> grouped_mm -> its own gate
or activation -> grouped_mm -> unpermute: the same weights in place (either
weight layout, read through views), biases inside the grouped mm, and a
combine that accumulates each token's k rows in fp32 in a fixed order.
"""

from __future__ import annotations

import torch

from ..ops import grouped_mm, permute, unpermute

NAME = "torch_moe_ops"


def _weight(module: torch.nn.Module, name: str) -> torch.Tensor:
    """(E, in, out) view of an expert weight stored as (E, out, in) unless
    the module says it is transposed."""
    w = getattr(module, name)
    return w if module.is_transposed else w.transpose(-2, -1)


def moe_ops_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("torch_moe_ops experts: expert parallelism goes through "
                                  "torch_moe_ops.distributed, not transformers' sentinel ids")
    if top_k_weights.shape != top_k_index.shape:  # (tokens, num_experts) routing weights
        top_k_weights = top_k_weights.gather(1, top_k_index)
    rows, dst_rows, _, offs = permute(hidden_states, top_k_index, self.num_experts)
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up_bias = getattr(self, f"{up_name}_bias") if self.has_bias else None
    h = grouped_mm(rows, _weight(self, up_name), offs, up_bias)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    down_bias = self.down_proj_bias if self.has_bias else None
    y = grouped_mm(h.to(rows.dtype), _weight(self, "down_proj"), offs, down_bias)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    if top_k_weights.dtype not in (torch.float32, y.dtype):
        top_k_weights = top_k_weights.float()
    return unpermute(y, dst_rows, top_k_weights).to(hidden_states.dtype)


def register() -> None:
    """Adds ``"torch_moe_ops"`` to transformers' experts implementations."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, moe_ops_experts_forward)

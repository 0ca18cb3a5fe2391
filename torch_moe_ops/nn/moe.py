"""An MoE layer on the moe_ops: router, routed experts, optional shared expert.

The experts run as one fused op (``experts_impl="fused"``, the default)::

    out = fused_experts(x, ids, weights, gate_up_proj^T, down_proj^T, ...)

which keeps only x, the routing and the up-projection output for the
backward, or (``experts_impl="unfused"``, the simple reference kept beside
it) as the composition of the ops::

    weights, ids, counts = router_topk(x @ router_weight.T, ...)
    rows, dst_rows, _, offs = permute(x, ids, E)
    h = act(grouped_mm(rows, gate_up_proj^T, offs, gate_up_bias))
    out = unpermute(grouped_mm(h, down_proj^T, offs, down_bias), dst_rows, weights)

Weights use transformers' layout (``gate_up_proj (E, 2I, H)``, ``down_proj
(E, H, I)``) and are read through transposed views: grouped_mm takes any
strides, so nothing is copied. Parallelism stays outside this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import shapes
from ..ops import fp8_grouped_mm, fused_experts, grouped_mm, permute, router_topk, unpermute

ACTIVATIONS = ("swiglu", "geglu", "swiglu_clamped", "silu", "gelu", "relu")
GATED = ("swiglu", "geglu", "swiglu_clamped")


@dataclass
class MoEConfig:
    """What distinguishes the MoE layers of Mixtral, Qwen3-MoE, OLMoE,
    DeepSeek-V3 / Kimi-K2, gpt-oss and Llama 4.

    score_func: "softmax" (Mixtral, Qwen3, OLMoE), "sigmoid" (DeepSeek-V3,
        Llama 4) or "softmax_after_topk" (gpt-oss).
    n_group, topk_group: DeepSeek-V3's grouped top-k.
    score_bias: a per-expert bias added to the scores for the selection only
        (aux-loss-free balancing); a buffer, updated by the training loop.
    renormalize, scaling_factor: the k weights divided by their sum, then scaled.
    activation: "swiglu" (silu(gate) * up), "geglu", "swiglu_clamped" (gpt-oss:
        clamped, sigmoid(alpha * gate) gated, (up + 1)), or non-gated "silu",
        "gelu", "relu".
    gate_up_interleaved: gate and up alternate along 2I (gpt-oss) instead of
        being its two halves.
    expert_bias: per-expert biases on both projections (gpt-oss).
    shared_intermediate: width of a shared SwiGLU expert every token passes
        through (DeepSeek-V3, Llama 4); 0 for none.
    aux_loss: also return the Switch load-balancing loss.
    experts_impl: "fused" (moe_ops::expert_mlp: memory-lean backward) or
        "unfused" (permute / grouped_mm / activation / grouped_mm / unpermute).
    fp8_recipe: None, or "rowwise" / "mx" to train the expert GEMMs in float8
        (fp8_grouped_mm: forward, input gradient and, for rowwise, weight
        gradient as scaled grouped GEMMs, torchao's MoE recipe); takes the
        unfused path; no expert biases yet.
    """

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    score_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    score_bias: bool = False
    renormalize: bool = False
    scaling_factor: float = 1.0
    activation: str = "swiglu"
    gate_up_interleaved: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    shared_intermediate: int = 0
    aux_loss: bool = False
    experts_impl: Literal["fused", "unfused"] = "fused"
    fp8_recipe: Optional[Literal["rowwise", "mx"]] = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.experts_impl not in ("fused", "unfused"):
            raise ValueError(f"MoEConfig: experts_impl must be 'fused' or 'unfused', got {self.experts_impl!r}")
        if self.fp8_recipe not in (None, "rowwise", "mx"):
            raise ValueError(f"MoEConfig: fp8_recipe must be None, 'rowwise' or 'mx', got {self.fp8_recipe!r}")
        if self.fp8_recipe is not None and self.expert_bias:
            raise ValueError("MoEConfig: fp8_recipe does not support expert_bias yet (fp8_grouped_mm has no bias)")
        if self.gate_up_interleaved and self.activation not in GATED:
            raise ValueError(f"MoEConfig: gate_up_interleaved needs a gated activation, got {self.activation!r}")

    @classmethod
    def from_shapes(cls, model: str | dict, scale: int = 1, **overrides) -> "MoEConfig":
        """From a model of the shape table (``torch_moe_ops.shapes``), by name
        or as its entry, widths divided by scale."""
        entry = shapes.model(model) if isinstance(model, str) else model
        activation = entry.get("activation", "swiglu")
        fields = dict(
            hidden=entry["hidden"] // scale,
            intermediate=entry["expert_intermediate"] // scale,
            num_experts=entry["experts"],
            top_k=entry["top_k"],
            score_func=entry.get("score", "softmax"),
            n_group=entry.get("n_group", 1),
            topk_group=entry.get("topk_group", 1),
            score_bias=entry.get("score_bias", False),
            renormalize=entry.get("renormalize", False),
            scaling_factor=entry.get("routed_scaling_factor", 1.0),
            activation="swiglu_clamped" if activation.startswith("swiglu_clamped") else activation,
            gate_up_interleaved=entry.get("gate_up_interleaved", False),
            expert_bias=entry.get("expert_bias", False),
            shared_intermediate=entry.get("shared_experts", 0) * entry["expert_intermediate"] // scale,
        )
        fields.update(overrides)
        return cls(**fields)


def expert_activation(h: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """The experts' activation on the up-projection output (R, 2I or I)."""
    if config.activation not in GATED:
        return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[config.activation](h)
    if config.gate_up_interleaved:
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if config.activation == "swiglu":
        return F.silu(gate) * up
    if config.activation == "geglu":
        return F.gelu(gate) * up
    gate = gate.clamp(max=config.swiglu_limit)
    up = up.clamp(-config.swiglu_limit, config.swiglu_limit)
    return (up + 1) * (gate * torch.sigmoid(config.swiglu_alpha * gate))


class MoE(nn.Module):
    """Router + routed experts (+ a shared expert), for tokens ``(..., H)``.

    ``forward`` returns ``(out, counts)``, or ``(out, counts, aux_loss)`` with
    ``config.aux_loss``; ``counts (E,)`` int32 is the number of tokens each
    expert received.
    """

    def __init__(self, config: MoEConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        e, h, i = config.num_experts, config.hidden, config.intermediate
        up_width = 2 * i if config.activation in GATED else i
        self.router_weight = nn.Parameter(torch.empty(e, h, **factory))
        self.gate_up_proj = nn.Parameter(torch.empty(e, up_width, h, **factory))
        self.down_proj = nn.Parameter(torch.empty(e, h, i, **factory))
        if config.expert_bias:
            self.gate_up_bias = nn.Parameter(torch.empty(e, up_width, **factory))
            self.down_bias = nn.Parameter(torch.empty(e, h, **factory))
        else:
            self.register_parameter("gate_up_bias", None)
            self.register_parameter("down_bias", None)
        # Selection-only bias: updated by the balancing rule, not by gradients.
        self.register_buffer("score_bias", torch.zeros(e, device=device, dtype=torch.float32)
                             if config.score_bias else None)
        if config.shared_intermediate > 0:
            s = config.shared_intermediate
            self.shared_gate_up = nn.Parameter(torch.empty(2 * s, h, **factory))
            self.shared_down = nn.Parameter(torch.empty(h, s, **factory))
        else:
            self.register_parameter("shared_gate_up", None)
            self.register_parameter("shared_down", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            fan_in = p.shape[-1]
            bound = 1 / math.sqrt(fan_in)
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -bound, bound)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The routed experts on tokens (T, H) with their (T, k) routing."""
        c = self.config
        if c.experts_impl == "fused" and c.fp8_recipe is None:
            return fused_experts(x, expert_ids, weights, self.gate_up_proj.transpose(-2, -1),
                                 self.down_proj.transpose(-2, -1), self.gate_up_bias, self.down_bias, c.activation,
                                 c.gate_up_interleaved, c.swiglu_alpha, c.swiglu_limit)
        rows, dst_rows, _, offs = permute(x, expert_ids, c.num_experts)

        def mm(a, w, bias):
            if c.fp8_recipe is None:
                return grouped_mm(a, w, offs, bias)
            return fp8_grouped_mm(a, w, offs, c.fp8_recipe)  # MoEConfig rejects biases with fp8

        h = mm(rows, self.gate_up_proj.transpose(-2, -1), self.gate_up_bias)
        y = mm(expert_activation(h, c), self.down_proj.transpose(-2, -1), self.down_bias)
        return unpermute(y, dst_rows, weights)

    def forward(self, x: torch.Tensor):
        c = self.config
        shape = x.shape
        # reshape alone would take any multiple of hidden elements as tokens.
        if x.dim() == 0 or x.shape[-1] != c.hidden:
            raise ValueError(f"MoE: x must end in hidden={c.hidden} (config.hidden), got x of sizes {list(shape)}")
        x = x.reshape(-1, c.hidden)
        logits = F.linear(x, self.router_weight)
        weights, expert_ids, counts = router_topk(logits, c.top_k, c.score_func, self.score_bias, c.n_group,
                                                  c.topk_group, c.renormalize, c.scaling_factor)
        out = self.experts(x, weights, expert_ids)
        if self.shared_gate_up is not None:
            gate, up = F.linear(x, self.shared_gate_up).chunk(2, dim=-1)
            out = out + F.linear(F.silu(gate) * up, self.shared_down)
        out = out.reshape(shape)
        if not c.aux_loss:
            return out, counts
        return out, counts, load_balancing_loss(logits, counts, c)


def load_balancing_loss(logits: torch.Tensor, counts: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """Switch Transformer's loss, E * sum_e f_e * P_e: f_e the fraction of
    (token, slot) pairs routed to e (no gradient), P_e the mean router
    probability of e (softmax, or sigmoid scores normalised per token)."""
    # No branch on the token count, in Python or symbolic: torch.export kept
    # only the T > 0 branch (0 tokens then gave 0/0 = NaN), an unbacked T could
    # not be guarded, and sym_max(T, 1) simplifies to T while tracing (a
    # dynamic size is assumed >= 2). The divisors are clamped as tensors, at
    # run time: with T = 0 both sums are empty and the loss is 0.
    tokens = logits.shape[0]
    x = logits.float()
    if config.score_func == "sigmoid":
        probs = torch.sigmoid(x)
        probs = probs / probs.sum(-1, keepdim=True)
    else:
        probs = torch.softmax(x, dim=-1)
    fraction = counts.float() / x.new_full((), tokens * config.top_k).clamp_min(1)
    mean_probs = probs.sum(0) / x.new_full((), tokens).clamp_min(1)
    return config.num_experts * (fraction * mean_probs).sum()

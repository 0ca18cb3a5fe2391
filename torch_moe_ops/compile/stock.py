"""Stock MoE layers, model code unchanged, at scaled-down shapes of public models:
what the compile passes' tests and ``benchmarks/bench_compile.py`` run.

transformers 5 models come from their configs with the ``"grouped_mm"`` experts
implementation; torchtitan's MoE layer from its ``MoE.Config``. Widths are
those of ``torch_moe_ops.shapes`` divided by ``shrink`` (experts and top-k
kept), so that they run on a CPU.
"""

from __future__ import annotations

import torch

from .. import shapes

# transformers config class and its names for the MoE fields, per model of torch_moe_ops.shapes.
_TRANSFORMERS = {
    "qwen3-30b-a3b": "qwen3_moe",
    "olmoe-1b-7b": "olmoe",
    "deepseek-v3": "deepseek_v3",
}


def _init(module: torch.nn.Module, seed: int) -> None:
    # Deterministic weights of a trained model's scale (the configs' init leaves some at zero).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * fan_in ** -0.5)


def transformers_config(name: str, shrink: int = 1, layers: int = 1, vocab: int = 256):
    """The transformers config of model ``name`` with widths / shrink (heads kept small)."""
    import transformers
    s = shapes.model(name)
    hidden, inter = s["hidden"] // shrink, s["expert_intermediate"] // shrink
    heads = 4
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, num_experts_per_tok=s["top_k"], max_position_embeddings=4096)
    kind = _TRANSFORMERS[name]
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=hidden // heads, intermediate_size=4 * inter,
                                           moe_intermediate_size=inter, num_experts=s["experts"],
                                           norm_topk_prob=s["renormalize"], decoder_sparse_step=1)
    if kind == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=inter, num_experts=s["experts"],
                                        norm_topk_prob=s["renormalize"])
    return transformers.DeepseekV3Config(
        **common, intermediate_size=4 * inter, moe_intermediate_size=inter, n_routed_experts=s["experts"],
        n_shared_experts=s["shared_experts"], n_group=s["n_group"], topk_group=s["topk_group"],
        routed_scaling_factor=s["routed_scaling_factor"], norm_topk_prob=s["renormalize"], first_k_dense_replace=0,
        kv_lora_rank=hidden // 4, q_lora_rank=hidden // 2, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16)


def transformers_model(name: str, shrink: int = 1, layers: int = 1, dtype=torch.bfloat16, seed: int = 0,
                       vocab: int = 256) -> torch.nn.Module:
    """A causal LM of model ``name``'s architecture, ``"grouped_mm"`` experts, deterministic weights."""
    import transformers
    cfg = transformers_config(name, shrink, layers, vocab)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm",
                                                          attn_implementation="sdpa")
    _init(model, seed)
    return model.to(dtype)


def moe_block(model: torch.nn.Module) -> torch.nn.Module:
    """The first layer's sparse MoE block of a transformers causal LM."""
    return model.model.layers[0].mlp


def torchtitan_moe(name: str, shrink: int = 1, dtype=torch.bfloat16, seed: int = 0, score_func=None,
                   route_norm=None, route_scale: float = 1.0) -> torch.nn.Module:
    """torchtitan 0.3.0's MoE layer (router, local dispatch, GroupedExperts, combine) at model ``name``'s
    scaled shapes, no shared expert. ``route_scale`` is 1 by default: under ``dynamic=True`` Dynamo
    turns a float module attribute into a tensor read with ``.item()``, a host read of torchtitan's own."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    s = shapes.model(name)
    dim, hid, experts, k = s["hidden"] // shrink, s["expert_intermediate"] // shrink, s["experts"], s["top_k"]
    cfg = MoE.Config(
        num_experts=experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=dim, hidden_dim=hid, num_experts=experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=experts, top_k=k)),
        router=TokenChoiceTopKRouter.Config(
            num_experts=experts, gate=Linear.Config(in_features=dim, out_features=experts), top_k=k,
            score_func=score_func or s["score"], route_norm=s["renormalize"] if route_norm is None else route_norm,
            route_scale=route_scale),
        load_balance_coeff=None)
    moe = cfg.build()
    _init(moe, seed)
    return moe.to(dtype)

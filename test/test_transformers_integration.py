"""torch_moe_ops as transformers' experts implementation: tiny random models
built from configs (no downloads), logits and gradients against "eager".

In float64 the two paths differ only in summation order (a token's k expert
rows, and BLAS blocking), so they agree to 1e-10 relative.
"""

import copy

import pytest
import torch
import transformers

import torch_moe_ops.integrations.transformers as moe_transformers

from common import MoeOpsCalls, assert_rows_close

moe_transformers.register()

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64)

CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                                     num_experts=8, num_experts_per_tok=4, norm_topk_prob=True),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=6,
                                                  num_experts_per_tok=2),
    "olmoe": lambda: transformers.OlmoeConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"},
                                              intermediate_size=16, num_experts=8, num_experts_per_tok=3),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{k: v for k, v in COMMON.items() if k not in ("head_dim", "num_key_value_heads")}, num_key_value_heads=4,
        intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=0, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "gpt_oss": lambda: transformers.GptOssConfig(**COMMON, intermediate_size=16, num_local_experts=8,
                                                 num_experts_per_tok=3, sliding_window=8,
                                                 layer_types=["sliding_attention", "full_attention"]),
}


def build(name, implementation, dtype):
    config = CONFIGS[name]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                          experts_implementation=implementation, dtype=dtype)
    with torch.no_grad():  # biases start at zero; make them count
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.1)
    return model


IMPLEMENTATIONS = {moe_transformers.NAME: moe_transformers.moe_ops_experts_forward,
                   moe_transformers.UNFUSED_NAME: moe_transformers.moe_ops_experts_unfused_forward}

# The moe_ops kernels each implementation must dispatch to, forward and
# backward, and those it must not (the fused path never runs the unfused one).
KERNELS = {moe_transformers.NAME: ({"permute", "expert_mlp", "expert_mlp_backward"}, {"grouped_mm", "unpermute"}),
           moe_transformers.UNFUSED_NAME: ({"permute", "grouped_mm", "unpermute", "unpermute_backward"},
                                           {"expert_mlp"})}


def assert_kernels_ran(calls: MoeOpsCalls, implementation: str):
    required, excluded = KERNELS[implementation]
    ran = set(calls.names)
    assert required <= ran, f"{implementation}: {sorted(required - ran)} never ran (ran: {sorted(ran)})"
    assert not (excluded & ran), f"{implementation}: {sorted(excluded & ran)} ran"


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_gradients_match_eager(name, implementation):
    ours = build(name, implementation, torch.float64)
    eager = build(name, "eager", torch.float64)
    eager.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    # The experts must really run through our kernels, forward and backward
    # (a fallback to eager would make this test pass trivially).
    with MoeOpsCalls() as calls:
        out = ours(ids, labels=ids)
        out.loss.backward()
    assert_kernels_ran(calls, implementation)
    ref = eager(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-12)
    ref.loss.backward()
    grads = dict(eager.named_parameters())
    for pname, p in ours.named_parameters():
        if p.grad is None:
            assert grads[pname].grad is None, pname
            continue
        torch.testing.assert_close(p.grad, grads[pname].grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{pname}: {m}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_model_takes_the_fused_path(name):
    """The models' gates are ones expert_mlp implements, so "torch_moe_ops"
    runs them fused rather than falling back to the unfused composition."""
    model = build(name, moe_transformers.NAME, torch.float32)
    experts = [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]
    assert experts
    for m in experts:
        assert moe_transformers.fused_activation(m) is not None, type(m).__name__


def test_unknown_gate_falls_back_to_unfused():
    """A module whose gate expert_mlp does not implement still runs, through
    the module's own gate in the unfused composition."""
    model = build("qwen3_moe", moe_transformers.NAME, torch.float64)
    eager = build("qwen3_moe", "eager", torch.float64)
    eager.load_state_dict(model.state_dict())
    for m in list(model.modules()) + list(eager.modules()):
        if hasattr(m, "has_gate") and hasattr(m, "down_proj"):
            m.act_fn = torch.nn.Tanh()
    assert all(moe_transformers.fused_activation(m) is None for m in model.modules() if hasattr(m, "has_gate"))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with MoeOpsCalls() as calls:
        logits = model(ids).logits
    # Forward only: the unfused kernels, not expert_mlp.
    assert {"permute", "grouped_mm", "unpermute"} <= set(calls.names) and "expert_mlp" not in calls.names, calls.names
    torch.testing.assert_close(logits, eager(ids).logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_bf16_matches_eager_bf16(name):
    """bf16 end to end against eager in bf16 with the same weights. Ours
    accumulates each token's k rows in fp32 and rounds once, eager adds
    bf16 rows; through two layers that is a few bf16 ulps of the logits."""
    ours = build(name, "torch_moe_ops", torch.bfloat16)
    eager = build(name, "eager", torch.bfloat16)
    eager.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    with MoeOpsCalls() as calls:
        a = ours(ids).logits.float()
    assert "expert_mlp" in calls.names, calls.names
    b = eager(ids).logits.float()
    assert a.dtype == b.dtype and a.shape == b.shape
    # Per element, against each token's logit row (its largest element).
    assert_rows_close(a, b, torch.bfloat16, 4, name)

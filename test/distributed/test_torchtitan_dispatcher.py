"""MoeOpsTokenDispatcher in torchtitan's MoE layer, one process (no EP mesh;
EP = 2 on gloo is torchtitan_cases.py, run by test_gloo.py): outputs and
gradients of the same layer with torchtitan's own dispatcher, the capacity
mode's drops, the configuration switch (a torchtitan override on a real
model config) and the errors.

float32 layers; torchtitan's GroupedExperts computes in bfloat16 on both
sides. Both dispatchers hand each expert the same rows in the same order
(permute keeps (token, slot) order within an expert, torchtitan sorts with a
stable argsort), so the experts' outputs and weight gradients are bitwise
equal. The combine: torchtitan multiplies each row by its score in float32
and scatter-adds the products to zero in expert order, unpermute adds the
same products to zero in slot order (mul then add, no FMA): with top_k <= 2
the sums are the same bitwise (one addition commutes); with top_k = 3 they
are a reassociation of 3 terms. The routing scores' gradient is a D-term dot
product reduced in another order, and the router's and x's gradients follow
from it. Where not bitwise: |err| <= D * 2^-24 * max|ref| (D = 16; measured
~1 * 2^-24 * max|ref|).
"""

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")

from torchtitan.config.override import OverrideConfig, apply_overrides, parse_cli_imports  # noqa: E402
from torchtitan.models.common.config_utils import (  # noqa: E402
    make_ffn_config,
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
    make_token_dispatcher_config,
)
from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher  # noqa: E402

from torch_moe_ops.distributed.torchtitan import MoeOpsTokenDispatcher  # noqa: E402

from expert_parallel_cases import _NoHostReads  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported")

E, D, F = 8, 16, 8
OVERRIDE = "torch_moe_ops.distributed.torchtitan.moe_ops_token_dispatcher"


def _config(top_k, dispatcher=None, shared=False):
    normal = lambda p: nn.init.normal_(p, std=0.5)  # noqa: E731
    init = {name: normal for name in ("w1_EFD", "w2_EDF", "w3_EFD")}
    cfg = make_moe_config(
        num_experts=E,
        router=make_router_config(dim=D, num_experts=E, gate_param_init={"weight": nn.init.normal_}, top_k=top_k,
                                  score_func="softmax"),
        routed_experts=make_routed_experts_config(dim=D, hidden_dim=F, num_experts=E, top_k=top_k, param_init=init,
                                                  comm_backend="standard"),
        shared_experts=make_ffn_config(dim=D, hidden_dim=F, w1_param_init={"weight": normal},
                                       w2w3_param_init={"weight": normal}) if shared else None)
    if dispatcher is not None:
        cfg.routed_experts.token_dispatcher = dispatcher
    return cfg


def _layers(top_k, dispatcher, bias=None, shared=False, wrap=None):
    torch.manual_seed(0)
    ref = _config(top_k, shared=shared).build()
    ref.init_states()
    if bias is not None:
        ref.expert_bias_E.copy_(bias)
    ours = _config(top_k, dispatcher, shared=shared).build()
    ours.load_state_dict(ref.state_dict())
    if wrap is not None:
        ref.routed_experts.token_dispatcher = wrap(ref.routed_experts.token_dispatcher)
    return ref, ours


def _run(layer, x, g):
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _bound(ref):
    return dict(rtol=0.0, atol=D * 2.0 ** -24 * float(ref.abs().max()))


def _compare(ref_layer, layer, x, g, exact_out):
    out_ref, xg_ref, grads_ref = _run(ref_layer, x, g)
    out, xg, grads = _run(layer, x, g)
    if exact_out:
        assert torch.equal(out, out_ref), (out - out_ref).abs().max()
    else:
        torch.testing.assert_close(out, out_ref, **_bound(out_ref))
    torch.testing.assert_close(xg, xg_ref, **_bound(xg_ref))
    for name, g_ref in grads_ref.items():
        if "inner_experts" in name:
            assert torch.equal(grads[name], g_ref), (name, (grads[name] - g_ref).abs().max())
        else:  # the router (through the scores' gradient) and the shared expert
            torch.testing.assert_close(grads[name], g_ref, **_bound(g_ref), msg=lambda m: f"grad of {name}: {m}")
    return out


def _routing_bias(routing):
    bias = torch.zeros(E)
    if routing == "skewed":
        bias[:3] = torch.tensor([0.3, 0.2, 0.1])  # expert_bias_E shifts the choice, not the scores
    elif routing == "two experts":
        bias[:3] = 10.0  # top_k <= 3 experts out of 0..2: the others get no token
    return bias


@pytest.mark.parametrize("mode", ["splits", "capacity"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "two experts"])
def test_same_as_torchtitan_local_dispatcher(routing, top_k, mode):
    """Ours (splits; capacity with room for every slot, C = T) against
    LocalTokenDispatcher; ragged groups (B * L = 14 tokens), empty experts."""
    dispatcher = MoeOpsTokenDispatcher.Config(num_experts=E, top_k=top_k, mode=mode, capacity_factor=E / top_k)
    ref, ours = _layers(top_k, dispatcher, _routing_bias(routing), shared=routing == "skewed")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, D, generator=gen)
    g = torch.randn(2, 7, D, generator=gen)
    _compare(ref, ours, x, g, exact_out=top_k <= 2)
    if mode == "capacity":
        assert int(ours.routed_experts.token_dispatcher.dropped) == 0
    counts = ours.tokens_per_expert_E
    if routing == "two experts":
        assert counts[3:].sum() == 0 and counts[:3].sum() == 14 * top_k, counts


@pytest.mark.parametrize("mode", ["splits", "capacity"])
def test_pad_multiple(mode):
    """pad_multiple = 16 (what float8 grouped GEMMs want): every group handed
    to the experts is a multiple of 16 rows, the extra rows zero; the layer's
    outputs and gradients are those of torchtitan's unpadded layer, bitwise
    as above (a zero row adds exact zeros to the weight gradients)."""
    dispatcher = MoeOpsTokenDispatcher.Config(num_experts=E, top_k=2, mode=mode, capacity_factor=E / 2,
                                              pad_multiple=16)
    ref, ours = _layers(2, dispatcher, _routing_bias("skewed"))
    seen = []
    inner = ours.routed_experts.inner_experts
    inner.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach(), args[1])))
    x, g = torch.randn(2, 7, D), torch.randn(2, 7, D)
    _compare(ref, ours, x, g, exact_out=True)
    rows, counts = seen[0]
    assert (counts % 16 == 0).all() and int(counts.sum()) <= rows.shape[0], counts
    assert int((rows.abs().sum(1) != 0).sum()) == 14 * 2  # the real rows; the padding is zero
    if mode == "capacity":
        assert int(ours.routed_experts.token_dispatcher.dropped) == 0


def test_non_contiguous_tokens_and_zero_tokens():
    """x sliced out of a wider tensor (torchtitan views it as (T, D)); a batch
    of zero tokens gives an empty output and zero expert gradients."""
    ref, ours = _layers(2, MoeOpsTokenDispatcher.Config(num_experts=E, top_k=2))
    wide = torch.randn(2, 6, 2 * D)
    x = wide[:, :, ::2]
    assert not x.is_contiguous()
    g = torch.randn(2, 6, D)
    _compare(ref, ours, x, g, exact_out=True)
    ours.zero_grad()
    out, xg, grads = _run(ours, torch.randn(1, 0, D), torch.randn(1, 0, D))
    assert out.shape == (1, 0, D) and xg.shape == (1, 0, D)
    for name, grad in grads.items():
        assert grad is None or not grad.any(), name


def _capacity_keep(ids, cap):
    keep = torch.ones(ids.shape, dtype=torch.bool)
    seen = [0] * E
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            keep[t, j] = seen[e] < cap
            seen[e] += 1
    return keep


def test_capacity_drops():
    """C = ceil(1.0 * 14 * 2 / 8) = 4 rows per expert, skewed routing: the
    slots beyond an expert's first 4 (token order) add nothing. Reference:
    torchtitan's layer whose dropped slots score 0 (x * 1.0 and x + 0 * y are
    exact, so bitwise as above). No host read, forward or backward."""
    keeps = []

    class ZeroDropped:
        def __init__(self, inner):
            self.inner = inner

        def dispatch(self, x, scores, ids, counts):
            keeps.append(_capacity_keep(ids, 4))
            return self.inner.dispatch(x, scores * keeps[-1].to(scores.dtype), ids, counts)

        def combine(self, *args):
            return self.inner.combine(*args)

    bias = torch.zeros(E)
    bias[:2] = torch.tensor([0.4, 0.2])
    dispatcher = MoeOpsTokenDispatcher.Config(num_experts=E, top_k=2, mode="capacity", capacity_factor=1.0)
    ref, ours = _layers(2, dispatcher, bias, wrap=ZeroDropped)
    x, g = torch.randn(2, 7, D), torch.randn(2, 7, D)
    _compare(ref, ours, x, g, exact_out=True)
    dropped = int((~keeps[0]).sum())
    assert dropped > 0 and int(ours.routed_experts.token_dispatcher.dropped) == dropped
    with _NoHostReads():
        _run(ours, x, g)


def test_bfloat16_layer():
    """A bfloat16 layer: torchtitan rounds each weighted row to bfloat16 and
    adds in bfloat16 (k + 1 roundings), unpermute adds in float32 and rounds
    once: they differ by at most (k + 1) * 2^-8 * max|out| (k = 2). The
    expert weight gradients remain bitwise equal (same rows, scores and
    upstream gradient; the scores are bfloat16 here: CPU autocast has no
    float32, so the router runs in the layer's dtype)."""
    ref, ours = _layers(2, MoeOpsTokenDispatcher.Config(num_experts=E, top_k=2))
    ref.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    x, g = torch.randn(2, 7, D, dtype=torch.bfloat16), torch.randn(2, 7, D, dtype=torch.bfloat16)
    out_ref = _run(ref, x, g)[0]
    out = _run(ours, x, g)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=0.0,
                               atol=3 * 2.0 ** -8 * float(out_ref.abs().max()))
    assert not torch.equal(out, out_ref), "one rounding instead of k + 1 should show somewhere"


def test_capacity_compiles_fullgraph():
    """The capacity mode's dispatch, a grouped GEMM on its rows and its
    combine trace as one graph (torch.compile(fullgraph=True): no graph
    break, no data-dependent shape) and give the eager numbers, drops
    included. Without an EP mesh; with one, the collectives are funcol's
    traceable all_to_all_single with sizes fixed by T."""
    dispatcher = MoeOpsTokenDispatcher.Config(num_experts=E, top_k=2, mode="capacity", capacity_factor=1.0).build()
    weight = torch.randn(E, D, D)

    def layer(x, scores, ids):
        rows, counts, meta = dispatcher.dispatch(x, scores, ids, None)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        y = torch._grouped_mm(rows.bfloat16(), weight.bfloat16(), offs=offs).float()
        return dispatcher.combine(y, meta, x)

    gen = torch.Generator().manual_seed(0)
    x, scores = torch.randn(14, D, generator=gen), torch.rand(14, 2, generator=gen)
    ids = torch.randint(0, 3, (14, 2), generator=gen)  # 3 experts: some overflow C = 4
    eager = layer(x, scores, ids)
    assert int(dispatcher.dropped) > 0
    assert torch.equal(torch.compile(layer, fullgraph=True)(x, scores, ids), eager)


def test_override_switches_a_model_config():
    """The configuration switch: torchtitan's override, parsed from the
    command-line form, turns every standard dispatcher of a real model config
    (qwen3's debug MoE model) into ours with the given options. (The trainer
    applies the same apply_overrides to its whole config; its config registry
    is not imported here: it pulls in datasets, which nothing else needs.)"""
    from torchtitan.models.qwen3 import model_registry

    model = model_registry("debugmodel_moe").model
    override = OverrideConfig(imports=parse_cli_imports([f'{OVERRIDE}={{"mode": "capacity", "capacity_factor": 2.0}}']))
    lines = apply_overrides(override, model)
    found = list(model.traverse(MoeOpsTokenDispatcher.Config))
    assert len(found) == len(lines) > 0, lines
    for _, cfg, _, _ in found:
        assert (cfg.mode, cfg.capacity_factor, cfg.fp8_dispatch) == ("capacity", 2.0, None)
        assert cfg.num_experts == model.layers[0].moe.num_experts


def test_override_on_a_layer_config():
    """The override on a bare MoE config (LocalTokenDispatcher) builds a
    layer with our dispatcher, equal to the original layer."""
    cfg = _config(2, LocalTokenDispatcher.Config(num_experts=E, top_k=2))
    apply_overrides(OverrideConfig(imports=[OVERRIDE]), cfg)
    assert type(cfg.routed_experts.token_dispatcher) is MoeOpsTokenDispatcher.Config
    torch.manual_seed(0)
    ref = _config(2).build()
    ref.init_states()
    ours = cfg.build()
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours.routed_experts.token_dispatcher, MoeOpsTokenDispatcher)
    _compare(ref, ours, torch.randn(2, 7, D), torch.randn(2, 7, D), exact_out=True)


def test_override_keeps_torchao_padding():
    """torchtitan's float8 / MX converters replace the standard dispatcher by
    TorchAOTokenDispatcher (padded groups); the override keeps its padding."""
    from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

    cfg = _config(2, TorchAOTokenDispatcher.Config(num_experts=E, top_k=2, pad_multiple=32))
    apply_overrides(OverrideConfig(imports=[(OVERRIDE, {"mode": "capacity"})]), cfg)
    new = cfg.routed_experts.token_dispatcher
    assert type(new) is MoeOpsTokenDispatcher.Config and (new.pad_multiple, new.mode) == (32, "capacity")


def test_errors():
    ok = dict(num_experts=E, top_k=2)
    for kw, match in [
        (dict(mode="dense"), r"MoeOpsTokenDispatcher: mode must be 'splits' or 'capacity', got 'dense'"),
        (dict(capacity_factor=0.0), r"MoeOpsTokenDispatcher: capacity_factor must be > 0, got 0.0"),
        (dict(fp8_dispatch="e5m2"), r"MoeOpsTokenDispatcher: fp8_dispatch must be None, 'rowwise' or 'mx', "
                                    r"got 'e5m2'"),
        (dict(top_k=9), r"MoeOpsTokenDispatcher: top_k must be an int in \[1, num_experts=8\], got 9"),
        (dict(pad_multiple=24), r"MoeOpsTokenDispatcher: pad_multiple must be None or a power of two in "
                                r"\[1, 128\], got 24"),
    ]:
        with pytest.raises(ValueError, match=match):
            MoeOpsTokenDispatcher.Config(**{**ok, **kw}).build()
    dispatcher = MoeOpsTokenDispatcher.Config(**ok).build()
    x = torch.randn(5, D)
    with pytest.raises(ValueError, match=r"topk_expert_ids_TK must have sizes \(T, top_k\) = \(5, 2\), got \(5, 3\)"):
        dispatcher.dispatch(x, torch.rand(5, 3), torch.zeros(5, 3, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"topk_scores_TK must have the sizes of topk_expert_ids_TK \(5, 2\), "
                                         r"got \(5, 1\)"):
        dispatcher.dispatch(x, torch.rand(5, 1), torch.zeros(5, 2, dtype=torch.long), None)
    # The override refuses the backend-specific dispatchers instead of
    # dropping their buffer sizes.
    deepep = make_token_dispatcher_config(num_experts=E, top_k=2, comm_backend="deepep", hidden_dim=D,
                                          num_max_tokens_per_rank=16)
    cfg = _config(2, deepep)
    with pytest.raises(ValueError, match=r"moe_ops_token_dispatcher: replaces LocalTokenDispatcher, "
                                         r"AllToAllTokenDispatcher and TorchAOTokenDispatcher configs .*got "
                                         r"DeepEPTokenDispatcher.Config"):
        apply_overrides(OverrideConfig(imports=[OVERRIDE]), cfg)
    with pytest.raises(ValueError, match=r"MoeOpsTokenDispatcher: capacity_factor must be > 0, got -1"):
        apply_overrides(OverrideConfig(imports=[(OVERRIDE, {"capacity_factor": -1})]), _config(2))


def test_deepep_cannot_run_on_this_machine():
    """What only a GPU machine can compare against: torchtitan's DeepEP
    dispatcher needs DeepEP v2 (CUDA/NVSHMEM kernels), not installable here;
    HybridEP's ops are CUDA-only custom ops on the same library; MinimalAsyncEP
    refuses any symmetric-memory backend but CUDA. If DeepEP appears in the
    environment, this fails: then compare against it too."""
    cfg = make_token_dispatcher_config(num_experts=E, top_k=2, comm_backend="deepep", hidden_dim=D,
                                       num_max_tokens_per_rank=16)
    with pytest.raises(ImportError, match=r"DeepEP v2 \(>= 2.0.0, ElasticBuffer\) is required"):
        cfg.build()

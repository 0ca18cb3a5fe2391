"""ExpertParallel on real processes (gloo, EP = 2 and 4; run by test_gloo.py)
against the single-process MoE: outputs, the input's and the router's
gradients (each rank's tokens; the router's summed over ranks, as data
parallelism would) and the experts' gradients (DTensor shards,
full_tensor()).

Routings: uniform (random router), skewed (a selection bias favouring a few
experts), all-to-one-rank (every token picks two experts of rank 0, so the
other ranks receive zero rows), and a rank that has no tokens at all.

float64. The experts see the same rows in the same order as in one process
(peers arrive in rank order, each peer's rows in (token, slot) order, which is
the single-process order of an expert's rows), and the combine is the same
weighted sum in slot order; what may differ is the blocking of the grouped
GEMMs over groups of other sizes, a reassociation within K * 2^-53 relative
(K <= 16 here), so rtol = 1e-12.
"""

import datetime
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode

import torch_moe_ops  # noqa: F401
from torch_moe_ops.distributed import ExpertParallel, ExpertTensorParallel, TensorParallelExperts
from torch_moe_ops.nn import MoE, MoEConfig

E = 8
TOL = dict(rtol=1e-12, atol=1e-14)


def _case(mesh, name, config, bias=None, tokens_per_rank=None, dtype=torch.float64, tol=TOL, style=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = MoE(config, dtype=dtype)
    if bias is not None:
        ref.score_bias.copy_(bias)
    ep = MoE(config, dtype=dtype)
    ep.load_state_dict(ref.state_dict())
    parallelize_module(ep, mesh, style or ExpertParallel())
    assert isinstance(ep.gate_up_proj, DTensor) and ep.gate_up_proj.placements == (Shard(0),), name
    assert ep.gate_up_proj.to_local().shape[0] == E // world, name

    sizes = tokens_per_rank or [6] * world
    x_full = torch.randn(sum(sizes), config.hidden, dtype=dtype)
    g_full = torch.randn_like(x_full)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])

    x_ref = x_full.clone().requires_grad_()
    out_ref, counts_ref = ref(x_ref)[:2]
    (out_ref * g_full).sum().backward()

    x = x_full[rows].clone().requires_grad_()
    out, counts = ep(x)[:2]
    (out * g_full[rows]).sum().backward()

    torch.testing.assert_close(out, out_ref[rows], **tol, msg=lambda m: f"{name}, output: {m}")
    dist.all_reduce(counts)
    assert torch.equal(counts, counts_ref), f"{name}: counts {counts} vs {counts_ref}"
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **tol, msg=lambda m: f"{name}, grad of x: {m}")
    for pname, p_ref in ref.named_parameters():
        p = getattr(ep, pname)
        if isinstance(p, DTensor):
            grad = p.grad.full_tensor()
        else:  # data-parallel parameter: the local tokens' part, summed over ranks
            grad = p.grad.clone()
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_ref.grad, **tol, msg=lambda m: f"{name}, grad of {pname}: {m}")
    if style is not None and style.dispatch == "capacity":
        assert int(ep.ep_dropped) == 0, f"{name}: {int(ep.ep_dropped)} slots dropped"
    return counts_ref


def _check_routings():
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    base = dict(hidden=8, intermediate=6, num_experts=E, top_k=2)
    _case(mesh, "uniform, fused", MoEConfig(**base))
    _case(mesh, "uniform, unfused, expert biases, shared expert",
          MoEConfig(**base, experts_impl="unfused", expert_bias=True, shared_intermediate=4))
    skew = torch.zeros(E)
    skew[:3] = torch.tensor([1.0, 0.6, 0.3])
    counts = _case(mesh, "skewed", MoEConfig(**base, score_bias=True, score_func="sigmoid"), bias=skew)
    assert counts[:3].sum() > counts[3:].sum(), counts
    to_rank0 = torch.zeros(E)
    to_rank0[:2] = 100.0  # experts 0 and 1: both on rank 0, whatever the EP size
    counts = _case(mesh, "all to one rank", MoEConfig(**base, score_bias=True), bias=to_rank0)
    assert counts[2:].sum() == 0, counts
    _case(mesh, "a rank without tokens", MoEConfig(**base), tokens_per_rank=[5] * (world - 1) + [0])
    # float8 experts (float32 model): each expert quantises the same rows as
    # in one process, so only float32 reassociation remains (the router's
    # gradient summed over ranks in another order): K * 2^-24 ~ 1e-6.
    _case(mesh, "fp8 rowwise experts", MoEConfig(**base, fp8_recipe="rowwise"), dtype=torch.float32,
          tol=dict(rtol=1e-5, atol=1e-5))


def _check_capacity():
    """The capacity mode: without drops (capacity_factor = E / top_k: C = T,
    room for every token) it is the splits mode's layer; with drops it is the
    single-process layer whose dropped slots (beyond the first C of an expert
    from a rank, in token order) have weight 0; it reads no tensor data on the
    host (the splits mode does, once, and is caught by the same checker)."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    base = dict(hidden=8, intermediate=6, num_experts=E, top_k=2)
    roomy = ExpertParallel(dispatch="capacity", capacity_factor=E / 2)
    _case(mesh, "capacity, uniform", MoEConfig(**base), style=roomy)
    to_rank0 = torch.zeros(E)
    to_rank0[:2] = 100.0
    _case(mesh, "capacity, all to one rank", MoEConfig(**base, score_bias=True), bias=to_rank0, style=roomy)

    # Drops: C = ceil(1.0 * 6 * 2 / 8) = 2 rows per (rank, expert), skewed routing.
    rank = dist.get_rank()
    cfg = MoEConfig(**base, score_bias=True)
    skew = torch.zeros(E)
    skew[:3] = torch.tensor([1.0, 0.6, 0.3])
    torch.manual_seed(0)
    ref = MoE(cfg, dtype=torch.float64)
    ref.score_bias.copy_(skew)
    ep = MoE(cfg, dtype=torch.float64)
    ep.load_state_dict(ref.state_dict())
    parallelize_module(ep, mesh, ExpertParallel(dispatch="capacity", capacity_factor=1.0))
    T, cap = 6, 2
    x_full = torch.randn(T * world, cfg.hidden, dtype=torch.float64)
    g_full = torch.randn_like(x_full)
    x_ref = x_full.clone().requires_grad_()
    dropped_ref, loss = 0, 0
    for r in range(world):  # each rank's tokens, its own capacity
        xr = x_ref[T * r:T * (r + 1)]
        weights, ids, _ = torch_moe_ops.router_topk(torch.nn.functional.linear(xr, ref.router_weight), cfg.top_k,
                                                    cfg.score_func, ref.score_bias)
        keep = torch.ones(ids.shape, dtype=torch.bool)
        seen = [0] * E
        for t in range(T):
            for j in range(cfg.top_k):
                e = int(ids[t, j])
                keep[t, j] = seen[e] < cap
                seen[e] += 1
        dropped_ref += int((~keep).sum())
        out_r = ref.experts(xr, weights * keep, ids)
        if r == rank:
            out_ref = out_r.detach()
        loss = loss + (out_r * g_full[T * r:T * (r + 1)]).sum()
    loss.backward()
    assert dropped_ref > 0, "the skew must overflow some expert's capacity"
    rows = slice(T * rank, T * (rank + 1))
    x = x_full[rows].clone().requires_grad_()
    out = ep(x)[0]
    (out * g_full[rows]).sum().backward()
    dropped = ep.ep_dropped.clone()
    dist.all_reduce(dropped)
    assert int(dropped) == dropped_ref, (int(dropped), dropped_ref)
    name = "capacity with drops"
    torch.testing.assert_close(out, out_ref, **TOL, msg=lambda m: f"{name}, output: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **TOL, msg=lambda m: f"{name}, grad of x: {m}")
    for pname, p_ref in ref.named_parameters():
        p = getattr(ep, pname)
        grad = p.grad.full_tensor() if isinstance(p, DTensor) else p.grad.clone()
        if not isinstance(p, DTensor):
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=lambda m: f"{name}, grad of {pname}: {m}")

    # No host reads: forward and backward under a mode that fails on them.
    x = x_full[rows].clone().requires_grad_()
    with _NoHostReads():
        out = ep(x)[0]
        out.sum().backward()
    splits = MoE(cfg, dtype=torch.float64)
    parallelize_module(splits, mesh, ExpertParallel())
    with pytest.raises(AssertionError, match="host read: tolist"), _NoHostReads():
        splits(x_full[rows])


class _NoHostReads(TorchDispatchMode):
    """Fails on a read of tensor data by the host: ops tagged
    data_dependent_output (item, _local_scalar_dense) or dynamic_output_shape
    (nonzero, masked_select, ...), and Tensor.tolist / item, which CPU tensors
    serve without the dispatcher."""

    def __enter__(self):
        self._saved = torch.Tensor.tolist, torch.Tensor.item

        def refuse(name):
            def fn(*args, **kwargs):
                raise AssertionError(f"host read: {name}")
            return fn
        torch.Tensor.tolist, torch.Tensor.item = refuse("tolist"), refuse("item")
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.item = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def _check_fp8_dispatch():
    """fp8 dispatch (rowwise, mx) in a float32 layer: the experts receive the
    quantise-dequantised token rows, everything else stays float32, the
    quantisation's gradient is the identity (straight through). Reference:
    the single-process layer whose experts read x + (qdq(x) - x).detach().
    The expert inputs are then the same numbers, so only float32
    reassociation differs (rtol = atol = 1e-5). The dispatch's bytes, measured
    on the tensors sent, are <= 0.53x those of bfloat16 rows (H = 128)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    cfg = MoEConfig(hidden=128, intermediate=32, num_experts=E, top_k=2)
    T = 6
    for recipe in ("rowwise", "mx"):
        torch.manual_seed(0)
        ref = MoE(cfg)
        ep = MoE(cfg)
        ep.load_state_dict(ref.state_dict())
        parallelize_module(ep, mesh, ExpertParallel(fp8_dispatch=recipe))
        x_full = torch.randn(T * world, cfg.hidden)
        g_full = torch.randn_like(x_full)
        x_ref = x_full.clone().requires_grad_()
        qdq = torch_moe_ops.dequantize_fp8(*torch_moe_ops.quantize_fp8(x_ref.detach(), recipe), recipe)
        weights, ids, _ = torch_moe_ops.router_topk(torch.nn.functional.linear(x_ref, ref.router_weight), cfg.top_k)
        out_ref = ref.experts(x_ref + (qdq - x_ref).detach(), weights, ids)
        (out_ref * g_full).sum().backward()
        rows = slice(T * rank, T * (rank + 1))
        x = x_full[rows].clone().requires_grad_()
        out = ep(x)[0]
        (out * g_full[rows]).sum().backward()
        name, tol = f"fp8 dispatch {recipe}", dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, out_ref[rows], **tol, msg=lambda m: f"{name}, output: {m}")
        torch.testing.assert_close(x.grad, x_ref.grad[rows], **tol, msg=lambda m: f"{name}, grad of x: {m}")
        for pname, p_ref in ref.named_parameters():
            p = getattr(ep, pname)
            grad = p.grad.full_tensor() if isinstance(p, DTensor) else p.grad.clone()
            if not isinstance(p, DTensor):
                dist.all_reduce(grad)
            torch.testing.assert_close(grad, p_ref.grad, **tol, msg=lambda m: f"{name}, grad of {pname}: {m}")
        bf16_bytes = T * cfg.top_k * cfg.hidden * 2
        assert ep.ep_dispatch_bytes <= 0.53 * bf16_bytes, (recipe, ep.ep_dispatch_bytes, bf16_bytes)


def _check_overlap():
    """chunks=3: the single-process layer's outputs and gradients; and with
    rank 1's experts of chunk 0 slowed by 1 s (so rank 0's combine of chunk
    0 cannot finish before rank 1 sends it), rank 0 starts chunk 1's experts
    right after issuing chunk 0's combine, long before that combine finishes."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    base = dict(hidden=8, intermediate=6, num_experts=E, top_k=2)
    _case(mesh, "overlap, 3 chunks", MoEConfig(**base), style=ExpertParallel(chunks=3),
          tokens_per_rank=[7] * world)

    import torch_moe_ops.distributed.expert_parallel as ep_module

    torch.manual_seed(0)
    ep = MoE(MoEConfig(**base), dtype=torch.float64)
    parallelize_module(ep, mesh, ExpertParallel(chunks=2))
    original, calls = ep_module._local_experts, []

    def slowed(*args):
        calls.append(None)
        if rank == 1 and len(calls) == 1:
            time.sleep(1.0)
        return original(*args)

    ep_module._local_experts = slowed
    try:
        ep(torch.randn(8, 8, dtype=torch.float64))
    finally:
        ep_module._local_experts = original
    if rank == 0:
        at = {(event, chunk): t for event, chunk, t in ep.ep_trace}
        done = at[("experts_end", 0)]  # chunk 0's combine is issued here
        # Margins for a loaded machine: chunk 0's experts take ~50 ms here.
        assert at[("experts_start", 1)] - done < 0.3, ep.ep_trace
        assert at[("combine_done", 0)] - done > 0.5, ep.ep_trace


def _check_dead_peer():
    """A peer that stops calling the layer (as if it had died): the other
    fails within its process group's timeout (2 s here) with an error that
    says so. On a separate group, so that the default one stays usable."""
    rank = dist.get_rank()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    mesh = DeviceMesh.from_group(group, "cpu")
    ep = MoE(MoEConfig(hidden=8, intermediate=4, num_experts=E, top_k=2), dtype=torch.float64)
    parallelize_module(ep, mesh, ExpertParallel())
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"ExpertParallel: the exchange of token counts with the "
                                               r"expert-parallel peers \(ranks \[0, 1\]\) failed or timed out: a "
                                               r"peer has died"):
            ep(torch.randn(4, 8, dtype=torch.float64))
        assert time.monotonic() - start < 30


def _check_errors():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with pytest.raises(ValueError, match=r"ExpertParallel: num_experts=6 must be divisible by the expert-parallel "
                                         r"size 4"):
        parallelize_module(MoE(MoEConfig(hidden=4, intermediate=4, num_experts=6, top_k=1)), mesh, ExpertParallel())
    with pytest.raises(TypeError, match="ExpertParallel: module must be a torch_moe_ops.nn.MoE or a transformers "
                                        "experts module, got Linear"):
        parallelize_module(torch.nn.Linear(2, 2), mesh, ExpertParallel())


def _check_disagreeing_ranks():
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # The last rank has another top_k and hidden size: every rank fails alike
    # (none is left waiting in a collective), naming what differs.
    cfg = MoEConfig(hidden=8 if rank < 3 else 4, intermediate=4, num_experts=8, top_k=2 if rank < 3 else 1)
    with pytest.raises(ValueError, match=r"ExpertParallel: the MoE layer differs between the ranks of the mesh in "
                                         r"hidden, top_k \(rank 0: hidden=8, top_k=2; .*rank 3: hidden=4, top_k=1\)"):
        parallelize_module(MoE(cfg), mesh, ExpertParallel())
    with pytest.raises(ValueError, match=r"differs between the ranks of the mesh in dtype \(.*rank 1: dtype=float64"):
        parallelize_module(MoE(MoEConfig(hidden=4, intermediate=4, num_experts=8, top_k=1),
                               dtype=torch.float64 if rank == 1 else torch.float32), mesh, ExpertParallel())
    same = MoEConfig(hidden=4, intermediate=4, num_experts=8, top_k=1)
    with pytest.raises(ValueError, match=r"in module \(rank 0: module=MoE; rank 1: module=MoE; rank 2: module=Linear"):
        parallelize_module(torch.nn.Linear(2, 2) if rank == 2 else MoE(same), mesh, ExpertParallel())


def _check_tensor_parallel():
    """TensorParallelExperts: every rank has all tokens; each expert's I is
    split. The I slices' partial sums add in another order: float64
    reassociation over I <= 8 terms, rtol 1e-12. Every gradient is the full
    one on every rank (the experts' as DTensor shards)."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    base = dict(hidden=8, intermediate=8, num_experts=4, top_k=2)
    for name, cfg in [("silu", MoEConfig(**base, activation="silu")),
                      ("swiglu interleaved, shared expert",
                       MoEConfig(**base, gate_up_interleaved=True, shared_intermediate=4))]:
        torch.manual_seed(0)
        ref = MoE(cfg, dtype=torch.float64)
        tp = MoE(cfg, dtype=torch.float64)
        tp.load_state_dict(ref.state_dict())
        parallelize_module(tp, mesh, TensorParallelExperts())
        assert tp.gate_up_proj.placements == (Shard(1),) and tp.down_proj.placements == (Shard(2),), name
        x_full = torch.randn(10, cfg.hidden, dtype=torch.float64)
        g = torch.randn_like(x_full)
        x_ref, x = x_full.clone().requires_grad_(), x_full.clone().requires_grad_()
        out_ref = ref(x_ref)[0]
        (out_ref * g).sum().backward()
        out = tp(x)[0]
        (out * g).sum().backward()
        name = f"tensor parallel {name}"
        torch.testing.assert_close(out, out_ref, **TOL, msg=lambda m: f"{name}, output: {m}")
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL, msg=lambda m: f"{name}, grad of x: {m}")
        for pname, p_ref in ref.named_parameters():
            p = getattr(tp, pname)
            grad = p.grad.full_tensor() if isinstance(p, DTensor) else p.grad
            torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=lambda m: f"{name}, grad of {pname}: {m}")
    with pytest.raises(ValueError, match=r"TensorParallelExperts: the gated activation 'swiglu' needs "
                                         r"gate_up_interleaved=True"):
        parallelize_module(MoE(MoEConfig(**base)), mesh, TensorParallelExperts())
    with pytest.raises(ValueError, match=r"TensorParallelExperts: expert_bias=True is not supported"):
        parallelize_module(MoE(MoEConfig(**base, activation="silu", expert_bias=True)), mesh, TensorParallelExperts())


def _check_expert_tensor_parallel():
    """ExpertTensorParallel on a 2 x 2 (EP, TP) mesh: TP peers hold the same
    tokens, EP ranks their own. Same references and tolerance as above (the
    I slices add in another order); the router's gradient is summed over EP."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "tp"))
    ep_rank = mesh.get_local_rank("ep")
    base = dict(hidden=8, intermediate=8, num_experts=8, top_k=2)
    skew = torch.zeros(E)
    skew[:2] = 100.0  # every token to experts 0 and 1: EP rank 1 receives nothing
    for name, cfg, bias in [("silu", MoEConfig(**base, activation="silu"), None),
                            ("swiglu interleaved, all to one EP rank",
                             MoEConfig(**base, gate_up_interleaved=True, score_bias=True), skew)]:
        torch.manual_seed(0)
        ref = MoE(cfg, dtype=torch.float64)
        if bias is not None:
            ref.score_bias.copy_(bias)
        etp = MoE(cfg, dtype=torch.float64)
        etp.load_state_dict(ref.state_dict())
        parallelize_module(etp, mesh, ExpertTensorParallel())
        assert etp.gate_up_proj.placements == (Shard(0), Shard(1)), name
        x_full = torch.randn(12, cfg.hidden, dtype=torch.float64)
        g = torch.randn_like(x_full)
        rows = slice(6 * ep_rank, 6 * ep_rank + 6)
        x_ref, x = x_full.clone().requires_grad_(), x_full[rows].clone().requires_grad_()
        out_ref = ref(x_ref)[0]
        (out_ref * g).sum().backward()
        out = etp(x)[0]
        (out * g[rows]).sum().backward()
        name = f"expert x tensor parallel {name}"
        torch.testing.assert_close(out, out_ref[rows], **TOL, msg=lambda m: f"{name}, output: {m}")
        torch.testing.assert_close(x.grad, x_ref.grad[rows], **TOL, msg=lambda m: f"{name}, grad of x: {m}")
        for pname, p_ref in ref.named_parameters():
            p = getattr(etp, pname)
            if isinstance(p, DTensor):
                grad = p.grad.full_tensor()
            else:
                grad = p.grad.clone()
                dist.all_reduce(grad, group=mesh.get_group("ep"))
            torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=lambda m: f"{name}, grad of {pname}: {m}")
    with pytest.raises(ValueError, match=r"ExpertTensorParallel: intermediate=5 must be divisible by the "
                                         r"tensor-parallel size 2"):
        parallelize_module(MoE(MoEConfig(**{**base, "intermediate": 5}, activation="silu")), mesh,
                           ExpertTensorParallel())


def _check_transformers():
    """ExpertParallel on the experts of a tiny transformers Qwen3-MoE (built
    from a config, torch_moe_ops' experts implementation), the batch split
    over the ranks: logits and every gradient of the single-process model.
    float64; attention and the rest run per sample, so only BLAS blocking and
    the order of the router's gradient sum differ (the integration test's
    tolerances, rtol 1e-9)."""
    import transformers

    import torch_moe_ops.integrations.transformers as moe_tf

    moe_tf.register()
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    config = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                         intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                                         num_experts_per_tok=4, norm_topk_prob=True)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=moe_tf.NAME,
                                                        dtype=torch.float64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=moe_tf.NAME,
                                                          dtype=torch.float64)
    model.load_state_dict(ref.state_dict())
    experts = [name for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert len(experts) == 2, experts
    for name in experts:
        parallelize_module(model.get_submodule(name), mesh, ExpertParallel())
    ids = torch.randint(0, 97, (2 * world, 7), generator=torch.Generator().manual_seed(1))
    g = torch.randn(2 * world, 7, 97, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = slice(2 * rank, 2 * rank + 2)
    logits_ref = ref(ids).logits
    (logits_ref * g).sum().backward()
    logits = model(ids[rows]).logits
    (logits * g[rows]).sum().backward()
    tol = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logits, logits_ref[rows], **tol, msg=lambda m: f"transformers logits: {m}")
    sharded = 0
    for pname, p_ref in ref.named_parameters():
        p = model.get_parameter(pname)
        if isinstance(p, DTensor):
            sharded += 1
            grad = p.grad.full_tensor()
        else:
            grad = p.grad.clone()
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_ref.grad, **tol, msg=lambda m: f"transformers, grad of {pname}: {m}")
    assert sharded == 4, sharded  # gate_up_proj and down_proj of both layers


def check_expert_parallel():
    _check_routings()
    _check_tensor_parallel()
    _check_capacity()
    _check_fp8_dispatch()
    if dist.get_world_size() == 2:  # transformers' import costs ~10 s per process
        _check_overlap()
        _check_dead_peer()
        _check_transformers()
    if dist.get_world_size() == 4:
        _check_errors()
        _check_disagreeing_ranks()
        _check_expert_tensor_parallel()


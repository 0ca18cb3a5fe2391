"""torchtitan's MoE layer with MoeOpsTokenDispatcher under torchtitan's own
expert parallelism (EP = 2 on gloo; run by test_gloo.py), against the same
layer with torchtitan's AllToAllTokenDispatcher and against the
single-process layer (LocalTokenDispatcher), outputs and gradients.

The layers are parallelized the way torchtitan's trainer does it:
``ParallelDims(dp_shard=2, ep=2)``, ``set_moe_sharding_config`` (the experts
Shard(0) over ``ep``, the tokens data parallel) and ``Module.parallelize``,
which wires the EP mesh into the dispatcher. Both SPMD backends run:
``full_dtensor`` (inputs and parameters DTensors) and ``spmd_types``
(torchtitan 0.3.0's default; plain local tensors; once more with its global
type checking on).
torchtitan picks its device with ``torch.cuda.is_available() or "cuda"``,
so the test points its ParallelDims at "cpu".

Exactness (float32 layer, top_k = 2; the experts compute in bfloat16 as
torchtitan's GroupedExperts does): every dispatcher hands each expert the same
rows in the same order (peers in rank order, each peer's rows in (token,
slot) order, which is also the single-process order), so the expert outputs
and the experts' weight gradients are bitwise equal; a token's output adds
its two weighted rows to zero in either order, equal bitwise too. What
differs is the routing scores' gradient, a dot product over D reduced in
another order (unpermute's backward against torchtitan's mul backward), and
what flows from it into the router and x: there |err| <= D * 2^-24 * max|ref|
(a D-term float32 reassociation, propagated linearly).

On gloo torchtitan's own AllToAllTokenDispatcher runs only under
``full_dtensor``: under ``spmd_types`` its token exchange is
``spmd_types.all_to_all``, which for uneven splits calls
``torch.distributed.all_to_all`` on lists of tensors of different sizes, and
ProcessGroupGloo::alltoall takes only equal sizes ("invalid tensor size").
Our dispatcher uses ``all_to_all_single`` with split sizes, which gloo runs.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

E, K, D, F = 8, 2, 16, 8
B, L = 2, 5  # per rank


def _imports():
    # ParallelDims gives its size-1 mesh axes the "fake" process-group
    # backend, registered by this import (torchtitan's model modules make it).
    import torch.testing._internal.distributed.fake_pg  # noqa: F401
    import torchtitan.distributed.parallel_dims as parallel_dims_module

    parallel_dims_module.device_type = "cpu"  # torchtitan defaults to "cuda" when no accelerator is found
    return parallel_dims_module


def _config(dispatcher=None, dim=D, top_k=K):
    from torchtitan.models.common.config_utils import make_moe_config, make_routed_experts_config, make_router_config

    init = {name: (lambda p: nn.init.normal_(p, std=0.5)) for name in ("w1_EFD", "w2_EDF", "w3_EFD")}
    cfg = make_moe_config(
        num_experts=E,
        router=make_router_config(dim=dim, num_experts=E, gate_param_init={"weight": nn.init.normal_}, top_k=top_k,
                                  score_func="softmax"),
        routed_experts=make_routed_experts_config(dim=dim, hidden_dim=F, num_experts=E, top_k=top_k,
                                                  param_init=init, comm_backend="standard"))
    if dispatcher is not None:
        cfg.routed_experts.token_dispatcher = dispatcher
    return cfg


def _parallel_layer(cfg, state, pd):
    import spmd_types as spmd
    from torchtitan.models.common.moe_sharding import set_moe_sharding_config

    set_moe_sharding_config(cfg, enable_ep=True, enable_sp=False,
                            expert_param_layout={"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)})
    layer = cfg.build()
    layer.load_state_dict(state)
    layer.parallelize(pd)
    return layer


def _run(layer, x_local, g_local, pd, backend, typecheck=False):
    """Forward and backward of a parallelized layer on this rank's tokens:
    (output, grad of x, {param: full gradient}). typecheck: under
    spmd_types' global type checking (torchtitan's debug.spmd_typechecking)."""
    from torchtitan.distributed.utils import get_spmd_context

    x = x_local.clone().requires_grad_()
    xin = x
    if backend == "full_dtensor":
        from torchtitan.distributed.full_dtensor import _DENSE_STORAGE_AXES

        xin = DTensor.from_local(x, pd.get_activated_mesh(_DENSE_STORAGE_AXES), [Shard(0)])
    with get_spmd_context(parallel_dims=pd, spmd_typechecking=typecheck)():
        out = layer(xin)
        out = out.to_local() if isinstance(out, DTensor) else out
        out.backward(g_local)
    grads = {}
    for name, p in layer.named_parameters():
        if isinstance(p, DTensor):
            grad = p.grad.full_tensor()
        else:
            grad = p.grad.clone()
            if "inner_experts" in name:  # a local shard: rank r's experts
                every = [torch.empty_like(grad) for _ in range(dist.get_world_size())]
                dist.all_gather(every, grad)
                grad = torch.cat(every)
            else:  # data parallel: the local tokens' part, summed over ranks
                dist.all_reduce(grad)
        grads[name] = grad
    return out.detach(), x.grad, grads


def _reference(cfg, state, x_full, g_full, wrap=None):
    """The single-process layer (LocalTokenDispatcher) on every rank's
    tokens; wrap(dispatcher) may replace its dispatcher."""
    layer = cfg.build()
    layer.load_state_dict(state)
    if wrap is not None:
        layer.routed_experts.token_dispatcher = wrap(layer.routed_experts.token_dispatcher)
    x = x_full.clone().requires_grad_()
    out = layer(x)
    (out * g_full).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _bound(ref, dim=D):
    return dict(rtol=0.0, atol=dim * 2.0 ** -24 * float(ref.abs().max()))


def _compare(name, got, ref, rows, exact_out=True, dim=D):
    out, xg, grads = got
    out_ref, xg_ref, grads_ref = ref
    if exact_out:
        assert torch.equal(out, out_ref[rows]), f"{name}: output differs, max {(out - out_ref[rows]).abs().max()}"
    else:
        torch.testing.assert_close(out, out_ref[rows], **_bound(out_ref, dim), msg=lambda m: f"{name}, output: {m}")
    torch.testing.assert_close(xg, xg_ref[rows], **_bound(xg_ref, dim), msg=lambda m: f"{name}, grad of x: {m}")
    for pname, g_ref in grads_ref.items():
        if "inner_experts" in pname:
            assert torch.equal(grads[pname], g_ref), \
                f"{name}: grad of {pname} differs, max {(grads[pname] - g_ref).abs().max()}"
        else:
            torch.testing.assert_close(grads[pname], g_ref, **_bound(g_ref, dim),
                                       msg=lambda m: f"{name}, grad of {pname}: {m}")


def _routings():
    skew = torch.zeros(E)
    skew[:3] = torch.tensor([0.3, 0.2, 0.1])  # expert_bias_E shifts the softmax scores used for the choice
    to_rank0 = torch.zeros(E)
    to_rank0[:2] = 10.0  # experts 0 and 1 (both on rank 0): rank 1 receives no rows
    return [("uniform", None), ("skewed", skew), ("all to one rank", to_rank0)]


def _inputs(seed, dim=D):
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    x_full = torch.randn(B * world, L, dim, generator=gen)
    g_full = torch.randn(B * world, L, dim, generator=gen)
    rank = dist.get_rank()
    return x_full, g_full, slice(B * rank, B * (rank + 1))


def _state(bias, dim=D, top_k=K):
    torch.manual_seed(0)
    layer = _config(dim=dim, top_k=top_k).build()
    layer.init_states()
    if bias is not None:
        layer.expert_bias_E.copy_(bias)
    return layer.state_dict()


def _dropping(keep_of):
    """A reference dispatcher wrapper: the scores of the slots that the
    capacity mode drops are 0 (x * 1.0 and x + 0 * y are exact)."""
    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def dispatch(self, x, scores, ids, counts):
            return self.inner.dispatch(x, scores * keep_of(ids).to(scores.dtype), ids, counts)

        def combine(self, *args):
            return self.inner.combine(*args)
    return Wrapped


def _capacity_keep(ids, tokens_per_rank, cap):
    """(T, k) bool: a (token, slot) is kept when it is among the first cap of
    its expert from its own rank's tokens, in (token, slot) order."""
    keep = torch.ones(ids.shape, dtype=torch.bool)
    for start in range(0, ids.shape[0], tokens_per_rank):
        seen = [0] * E
        for t in range(start, start + tokens_per_rank):
            for j in range(ids.shape[1]):
                e = int(ids[t, j])
                keep[t, j] = seen[e] < cap
                seen[e] += 1
    return keep


def _ours(**kw):
    from torch_moe_ops.distributed.torchtitan import MoeOpsTokenDispatcher

    return MoeOpsTokenDispatcher.Config(num_experts=E, top_k=K, **kw)


_REFERENCES = {}


def _check_routings(backend, pd):
    """Every routing: ours (splits) against the single-process layer and,
    under full_dtensor, against torchtitan's AllToAllTokenDispatcher."""
    from torch_moe_ops.distributed.torchtitan import MoeOpsTokenDispatcher

    for i, (routing, bias) in enumerate(_routings()):
        state = _state(bias)
        x_full, g_full, rows = _inputs(i)
        if routing not in _REFERENCES:  # the same for both backends
            _REFERENCES[routing] = _reference(_config(), state, x_full, g_full)
        ref = _REFERENCES[routing]
        layer = _parallel_layer(_config(_ours()), state, pd)
        assert isinstance(layer.routed_experts.token_dispatcher, MoeOpsTokenDispatcher)
        assert layer.routed_experts.token_dispatcher.ep_mesh.size() == 2
        got = _run(layer, x_full[rows], g_full[rows], pd, backend)
        _compare(f"{backend}, {routing}, ours vs single process", got, ref, rows)
        if backend == "full_dtensor":
            titan = _run(_parallel_layer(_config(), state, pd), x_full[rows], g_full[rows], pd, backend)
            assert torch.equal(got[0], titan[0]), f"{routing}: ours vs torchtitan's AllToAllTokenDispatcher output"
            for pname in ref[2]:
                if "inner_experts" in pname:
                    assert torch.equal(got[2][pname], titan[2][pname]), f"{routing}: grad of {pname}"
            if routing == "skewed":
                # Received groups padded to 16 rows (zero rows): the same numbers.
                padded = _run(_parallel_layer(_config(_ours(pad_multiple=16)), state, pd), x_full[rows],
                              g_full[rows], pd, backend)
                assert torch.equal(padded[0], got[0]) and torch.equal(padded[1], got[1]), routing
                for pname, grad in got[2].items():
                    assert torch.equal(padded[2][pname], grad), (routing, "pad_multiple=16", pname)
        elif routing == "uniform":
            # Our ops pass spmd_types' type checking (forward and backward),
            # same numbers (the parameter gradients accumulate: a + a = 2a).
            got_typed = _run(layer, x_full[rows], g_full[rows], pd, backend, typecheck=True)
            assert torch.equal(got_typed[0], got[0]) and torch.equal(got_typed[1], got[1]), routing
            for pname, grad in got[2].items():
                if "inner_experts" in pname:
                    assert torch.equal(got_typed[2][pname], 2 * grad), pname
        elif routing == "all to one rank":
            # Roomy capacity (C = T: no drop) is the splits mode's layer, bitwise.
            roomy = _parallel_layer(_config(_ours(mode="capacity", capacity_factor=E / K)), state, pd)
            got_cap = _run(roomy, x_full[rows], g_full[rows], pd, backend)
            assert int(roomy.routed_experts.token_dispatcher.dropped) == 0, routing
            for a, b, what in zip(got_cap, got, ("output", "grad of x")):
                assert torch.equal(a, b), f"{backend}, {routing}: roomy capacity vs splits, {what}"


def _check_torchtitan_fails_on_gloo(pd):
    """torchtitan's own dispatcher under spmd_types on gloo (see the module
    docstring): if this starts passing, compare against it here too."""
    state = _state(None)
    x_full, g_full, rows = _inputs(0)
    with pytest.raises(RuntimeError, match="ProcessGroupGloo::alltoall: invalid tensor size"):
        _run(_parallel_layer(_config(), state, pd), x_full[rows], g_full[rows], pd, "spmd_types")


def _check_capacity_drops(backend, pd):
    """C = ceil(1.0 * T * k / E) = 3 rows per (rank, expert) for T = 10
    tokens, skewed routing. Reference: the single-process layer whose dropped
    slots score 0. Then: the capacity path reads nothing on the host, forward
    or backward (nor does the parallelized layer around it)."""
    from expert_parallel_cases import _NoHostReads

    tokens = B * L
    cap = -(-tokens * K // E)
    skew = torch.zeros(E)
    skew[:2] = torch.tensor([0.4, 0.2])
    state = _state(skew)
    x_full, g_full, rows = _inputs(7)
    layer = _parallel_layer(_config(_ours(mode="capacity", capacity_factor=1.0)), state, pd)
    got = _run(layer, x_full[rows], g_full[rows], pd, backend)
    dropped = layer.routed_experts.token_dispatcher.dropped.clone()
    dist.all_reduce(dropped)
    keeps = []

    def keep_of(ids):
        keeps.append(_capacity_keep(ids, tokens, cap))
        return keeps[-1]

    ref = _reference(_config(), state, x_full, g_full, wrap=_dropping(keep_of))
    dropped_ref = int((~keeps[0]).sum())
    assert dropped_ref > 0, "the skew must overflow some expert's capacity"
    assert int(dropped) == dropped_ref, (int(dropped), dropped_ref)
    _compare(f"{backend}, capacity with drops", got, ref, rows)
    with _NoHostReads():
        _run(layer, x_full[rows], g_full[rows], pd, backend)


def _check_fp8_dispatch(backend, pd):
    """H = 128 (with D = 16 the rowwise scales would be 1/4 of the bytes):
    the experts receive the quantise-dequantised rows, straight through.
    Reference: the single-process layer whose experts read
    rows + (qdq(rows) - rows).detach(); the same rows give the same scales,
    so the same bitwise equalities hold. The bytes sent, measured, are
    <= 0.53x those of the same rows in bfloat16."""
    import torch_moe_ops

    dim = 128
    state = _state(None, dim=dim)
    x_full, g_full, rows = _inputs(3, dim=dim)
    for recipe, mode in (("rowwise", "splits"), ("mx", "splits"), ("rowwise", "capacity")):
        # capacity: room for every slot (C = T); the zero padding rows quantise to zero.
        extra = dict(mode="capacity", capacity_factor=E / K) if mode == "capacity" else {}
        layer = _parallel_layer(_config(_ours(fp8_dispatch=recipe, **extra), dim=dim), state, pd)
        got = _run(layer, x_full[rows], g_full[rows], pd, backend)

        class Fp8:
            def __init__(self, inner):
                self.inner = inner

            def dispatch(self, *args):
                routed, counts, meta = self.inner.dispatch(*args)
                qdq = torch_moe_ops.dequantize_fp8(*torch_moe_ops.quantize_fp8(routed.detach(), recipe), recipe)
                return routed + (qdq - routed).detach(), counts, meta

            def combine(self, *args):
                return self.inner.combine(*args)

        ref = _reference(_config(dim=dim), state, x_full, g_full, wrap=Fp8)
        _compare(f"{backend}, fp8 dispatch {recipe}, {mode}", got, ref, rows, dim=dim)
        sent = layer.routed_experts.token_dispatcher.dispatch_bytes
        rows_sent = B * L * K if mode == "splits" else E * B * L  # capacity: E buffers of C = T rows
        assert sent <= 0.53 * rows_sent * dim * 2, (recipe, mode, sent, rows_sent)


def _check_disagreeing_ranks(pd):
    """A rank whose dispatcher differs fails, with every other rank, when
    torchtitan wires the EP mesh (parallelize), not in a collective later."""
    from torch_moe_ops.distributed.torchtitan import MoeOpsTokenDispatcher

    rank = dist.get_rank()
    cfg = _config(MoeOpsTokenDispatcher.Config(num_experts=E, top_k=K, mode="capacity" if rank == 1 else "splits"))
    with pytest.raises(ValueError, match=r"MoeOpsTokenDispatcher: the dispatcher differs between the "
                                         r"expert-parallel ranks in mode \(rank 0: mode='splits'; rank 1: "
                                         r"mode='capacity'\)"):
        _parallel_layer(cfg, _state(None), pd)


def check_torchtitan_dispatcher():
    parallel_dims_module = _imports()
    world = dist.get_world_size()
    from torchtitan.distributed import utils as dist_utils

    # The checks are spread over the two backends to keep the test short:
    # the dispatcher's code is the same under both (plain local tensors).
    for backend in ("full_dtensor", "spmd_types"):
        dist_utils.set_spmd_backend(backend)
        pd = parallel_dims_module.ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=world,
                                               world_size=world, spmd_backend=backend)
        pd.build_mesh()
        _check_routings(backend, pd)
        if backend == "full_dtensor":
            _check_fp8_dispatch(backend, pd)
        else:
            _check_torchtitan_fails_on_gloo(pd)
            _check_capacity_drops(backend, pd)
    _check_disagreeing_ranks(pd)

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
from torch_moe_ops.distributed.expert_parallel import dispatch_combine
from torch_moe_ops.distributed.traffic import AllToAllBytes
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

    # No host reads: forward and backward under a mode that fails on them,
    # also with fp8 payloads and in chunks (the pipeline's own backward).
    _NoHostReads.check_itself()
    x = x_full[rows].clone().requires_grad_()
    with _NoHostReads():
        out = ep(x)[0]
        out.sum().backward()
    for style in (ExpertParallel(dispatch="capacity", fp8_dispatch="mx"),
                  ExpertParallel(dispatch="capacity", fp8_dispatch="rowwise", chunks=2),
                  ExpertParallel(dispatch="capacity", chunks=3)):
        m = MoE(MoEConfig(hidden=64, intermediate=6, num_experts=E, top_k=2))
        parallelize_module(m, mesh, style)
        x = torch.randn(6, 64, requires_grad=True)
        with _NoHostReads():
            m(x)[0].sum().backward()
        assert x.grad.abs().sum() > 0
    splits = MoE(cfg, dtype=torch.float64)
    parallelize_module(splits, mesh, ExpertParallel())
    with pytest.raises(AssertionError, match="host read: tolist"), _NoHostReads():
        splits(x_full[rows])


class _NoHostReads(TorchDispatchMode):
    """Fails on a read of tensor data by the host: ops tagged
    data_dependent_output (item, _local_scalar_dense) or dynamic_output_shape
    (nonzero, masked_select, ...), and Tensor.tolist / item / __bool__ /
    __int__ / __float__ / __index__, which CPU tensors serve without the
    dispatcher."""

    READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self.READS}

        def refuse(name):
            def fn(*args, **kwargs):
                raise AssertionError(f"host read: {name}")
            return fn
        for name in self.READS:
            setattr(torch.Tensor, name, refuse(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)

    @staticmethod
    def check_itself():
        """The checker catches each kind of read it claims to."""
        t = torch.tensor([1.0, 0.0])
        reads = {"_local_scalar_dense": lambda: torch.ops.aten._local_scalar_dense(t[0]), "item": lambda: t[0].item(),
                 "tolist": lambda: t.tolist(), "nonzero": t.nonzero, "bool": lambda: bool(t[0]),
                 "int": lambda: int(t[0]), "index": lambda: [0, 1][t[0].long()]}
        for name, read in reads.items():
            with pytest.raises(AssertionError, match="host read"), _NoHostReads():
                read()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def _fp8_case(mesh, name, style, bias=None, tokens_per_rank=None):
    """One fp8-dispatch layer (float32) against the single-process layer whose
    experts read x + (qdq(x) - x).detach(): the quantise-dequantised token
    rows, the quantisation's gradient the identity (straight through). Each
    row quantises alone (rowwise: its own scale; mx: blocks of 32 along H),
    so the experts get the same numbers as in the reference and only float32
    reassociation differs (rtol = atol = 1e-5)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = MoEConfig(hidden=128, intermediate=32, num_experts=E, top_k=2, score_bias=bias is not None)
    torch.manual_seed(0)
    ref = MoE(cfg)
    if bias is not None:
        ref.score_bias.copy_(bias)
    ep = MoE(cfg)
    ep.load_state_dict(ref.state_dict())
    parallelize_module(ep, mesh, style)
    sizes = tokens_per_rank or [6] * world
    x_full = torch.randn(sum(sizes), cfg.hidden)
    g_full = torch.randn_like(x_full)
    x_ref = x_full.clone().requires_grad_()
    qdq = torch_moe_ops.dequantize_fp8(*torch_moe_ops.quantize_fp8(x_ref.detach(), style.fp8_dispatch),
                                       style.fp8_dispatch)
    weights, ids, _ = torch_moe_ops.router_topk(torch.nn.functional.linear(x_ref, ref.router_weight), cfg.top_k,
                                                cfg.score_func, ref.score_bias)
    out_ref = ref.experts(x_ref + (qdq - x_ref).detach(), weights, ids)
    (out_ref * g_full).sum().backward()
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    x = x_full[rows].clone().requires_grad_()
    out = ep(x)[0]
    (out * g_full[rows]).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_ref[rows], **tol, msg=lambda m: f"{name}, output: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **tol, msg=lambda m: f"{name}, grad of x: {m}")
    for pname, p_ref in ref.named_parameters():
        p = getattr(ep, pname)
        grad = p.grad.full_tensor() if isinstance(p, DTensor) else p.grad.clone()
        if not isinstance(p, DTensor):
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_ref.grad, **tol, msg=lambda m: f"{name}, grad of {pname}: {m}")
    if style.dispatch == "capacity":
        assert int(ep.ep_dropped) == 0, f"{name}: {int(ep.ep_dropped)} slots dropped"


def _routing_biases():
    skew = torch.zeros(E)
    skew[:3] = torch.tensor([1.0, 0.6, 0.3])
    to_rank0 = torch.zeros(E)
    to_rank0[:2] = 100.0  # experts 0 and 1: both on rank 0, whatever the EP size
    return {"uniform": None, "skewed": skew, "all to one rank": to_rank0}


def _check_fp8_dispatch():
    """fp8 dispatch: every recipe, mode, chunking and routing, and a rank
    without tokens, each at least once (a covering set, not the product:
    at 4 ranks on 2 cores each case costs ~3 s, mostly the reference and the
    gathers of gradients; the capacity mode needs the same T on every rank)."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    roomy = dict(dispatch="capacity", capacity_factor=E / 2)  # C = T: no drops
    biases = _routing_biases()
    for recipe, mode, chunks, routing in [("rowwise", "splits", 1, "uniform"), ("mx", "splits", 2, "skewed"),
                                          ("mx", "splits", 1, "all to one rank"), ("mx", "capacity", 1, "uniform"),
                                          ("rowwise", "capacity", 1, "skewed"),
                                          ("rowwise", "capacity", 2, "all to one rank")]:
        _fp8_case(mesh, f"fp8 {recipe}, {mode}, {chunks} chunk(s), {routing}",
                  ExpertParallel(fp8_dispatch=recipe, chunks=chunks, **(roomy if mode == "capacity" else {})),
                  bias=biases[routing])
    _fp8_case(mesh, "fp8 rowwise, 2 chunks, a rank without tokens", ExpertParallel(fp8_dispatch="rowwise", chunks=2),
              tokens_per_rank=[5] * (world - 1) + [0])
    _check_fp8_bytes(mesh)


def _balanced_ids(tokens, top_k, num_experts):
    """Token t's slot j goes to expert (t * k + j) mod E: with T * k a multiple
    of E every expert gets T * k / E rows from every rank, so exactly
    (EP - 1) / EP of a rank's rows leave it."""
    return (torch.arange(tokens * top_k) % num_experts).view(tokens, top_k)


def dispatch_bytes(traffic, chunks):
    """The forward's bytes to peers: dispatch (every payload all-to-all but the
    last `chunks`, which are the combines) and combine; the token counts'
    exchange (int64) apart."""
    payload = [c for c in traffic.calls if c.dtype != torch.int64]
    return (sum(c.bytes_to_peers for c in payload[:-chunks]), sum(c.bytes_to_peers for c in payload[-chunks:]))


def _check_fp8_bytes(mesh):
    """fp8 dispatch sends <= 0.53x the bytes of bfloat16, measured on the
    all-to-alls' own arguments (AllToAllBytes), and the bfloat16 dispatch and
    combine send exactly T * k * H * 2 * (EP - 1) / EP bytes each under a
    balanced routing. H = 128: a row is 128 bytes of data and 4 of scales
    (rowwise: one float32; mx: four e8m0 bytes), 132 / 256 = 0.516."""
    world = dist.get_world_size()
    T, k, H = 8, 2, 128
    x = torch.randn(T, H, dtype=torch.bfloat16)
    ids, w = _balanced_ids(T, k, E), torch.ones(T, k)
    # _Fp8Dispatch in both modes, and the pipeline's packed rows.
    for mode, chunks in (("splits", 1), ("capacity", 1), ("capacity", 2)):
        sent = {}
        for recipe in (None, "rowwise", "mx"):
            with torch.no_grad(), AllToAllBytes() as traffic:
                dispatch_combine(x, ids, w, E, mesh, lambda rows, local_ids: rows, mode=mode, capacity_factor=1.0,
                                 fp8_dispatch=recipe, chunks=chunks)
            sent[recipe] = dispatch_bytes(traffic, chunks)
        analytic = T * k * H * 2 * (world - 1) // world
        assert sent[None] == (analytic, analytic), (mode, chunks, sent[None], analytic)
        for recipe in ("rowwise", "mx"):
            assert sent[recipe][1] == analytic, (mode, chunks, recipe, sent[recipe])  # the combine stays bf16
            assert sent[recipe][0] == T * k * (H + 4) * (world - 1) // world, (mode, chunks, recipe, sent[recipe])
            assert sent[recipe][0] <= 0.53 * sent[None][0], (mode, chunks, recipe, sent)


def _check_overlap():
    """chunks > 1: the single-process layer's outputs and gradients (both
    modes, every routing, a rank without tokens; 7 tokens per rank: chunks
    of unequal sizes). The capacity mode gets the skewed routing with room for
    every token: with a capacity per chunk, drops would depend on the
    chunking."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    base = dict(hidden=8, intermediate=6, num_experts=E, top_k=2)
    biases = _routing_biases()
    for name, routing, style in [("3 chunks", "uniform", ExpertParallel(chunks=3)),
                                 ("capacity, 2 chunks", "skewed",
                                  ExpertParallel(dispatch="capacity", capacity_factor=E / 2, chunks=2)),
                                 ("2 chunks", "all to one rank", ExpertParallel(chunks=2))]:
        bias = biases[routing]
        _case(mesh, f"overlap, {name}, {routing}", MoEConfig(**base, score_bias=bias is not None), bias=bias,
              style=style, tokens_per_rank=[7] * world)
    _case(mesh, "overlap, unfused, expert biases, shared expert, a rank without tokens",
          MoEConfig(**base, experts_impl="unfused", expert_bias=True, shared_intermediate=4),
          style=ExpertParallel(chunks=2), tokens_per_rank=[5] * (world - 1) + [0])


class _SlowAllToAll:
    """Stands in for the pipeline's transport (expert_parallel._start_all_to_all):
    every all-to-all runs on one worker thread, in the order issued (the same
    on every rank, so the ranks' collectives match), each after `delay`
    seconds, and its completion is appended to the layer's trace as
    ("<kind>_arrived", chunk, time) when the data has arrived: what the caller saw
    as in flight really was."""

    def __init__(self, trace_of, delay):
        import queue
        import threading

        self.trace_of, self.delay, self.jobs = trace_of, delay, queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            args, what, done, error = job
            try:
                time.sleep(self.delay)
                dist.all_to_all_single(*args[:4], group=args[4])
                self.trace_of().append((f"{what[0]}_arrived", what[1], time.perf_counter()))
            except Exception as e:  # handed to the waiter
                error.append(e)
            done.set()

    def __call__(self, out, rows, out_sizes, in_sizes, group, what):
        import threading

        done, error = threading.Event(), []
        self.jobs.put(((out, rows, out_sizes, in_sizes, group), what, done, error))

        class Work:
            def wait(self_):
                done.wait()
                if error:
                    raise error[0]
                return True
        return Work()

    def stop(self):
        self.jobs.put(None)
        self.thread.join()


def _check_overlap_order(mesh):
    """With every all-to-all slowed (0.15 s each, on one transport thread),
    the order of events proves the overlap; no wall-time threshold. Forward:
    chunk 1's experts start before chunk 0's combine has arrived. Backward:
    chunk 1's expert gradients start before chunk 0's dispatch gradient has
    arrived. A schedule that waited for each all-to-all where it issued it
    would put every arrival before the next chunk's GEMMs."""
    import torch_moe_ops.distributed.expert_parallel as ep_module

    torch.manual_seed(0)
    ep = MoE(MoEConfig(hidden=8, intermediate=6, num_experts=E, top_k=2), dtype=torch.float64)
    parallelize_module(ep, mesh, ExpertParallel(chunks=2))
    slow = _SlowAllToAll(lambda: ep.ep_trace, delay=0.15)
    original = ep_module._start_all_to_all
    ep_module._start_all_to_all = slow
    try:
        x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
        ep(x)[0].sum().backward()
    finally:
        ep_module._start_all_to_all = original
        slow.stop()
    order = [e[:2] for e in ep.ep_trace]
    at = order.index
    assert at(("experts_start", 1)) < at(("combine_arrived", 0)), order
    assert at(("experts_grad_start", 1)) < at(("dispatch_grad_arrived", 0)), order
    # and the schedule as documented: every dispatch issued before the first experts
    assert at(("dispatch_issued", 1)) < at(("experts_start", 0)), order
    assert at(("combine_grad_issued", 1)) < at(("experts_grad_start", 0)), order


def _check_dead_peer():
    """A peer that stops calling the layer (as if it hung): the other fails
    within its process group's timeout (2 s here) with an error that says
    so. On a separate group, so that the default one stays usable."""
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


def check_peer_dies(mode, chunks):
    """The last thing of a run (the harness skips its final barrier): rank 1
    exits (os._exit, no goodbye to the process group) between a forward and
    its backward. Rank 0 fails with ExpertParallel's error in the backward
    (the unchunked layer's combine gradient; the chunked pipeline's backward
    has its own wait), then in the forward of a layer with the given
    dispatch, each within the group's timeout (2 s) or sooner (gloo sees the
    closed connection), never gloo's bare error."""
    import os

    rank = dist.get_rank()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    mesh = DeviceMesh.from_group(group, "cpu")
    layers = []
    for style in (ExpertParallel(), ExpertParallel(dispatch=mode, chunks=chunks)):
        torch.manual_seed(0)
        layers.append(MoE(MoEConfig(hidden=8, intermediate=4, num_experts=E, top_k=2), dtype=torch.float64))
        parallelize_module(layers[-1], mesh, style)
    out = layers[0](torch.randn(4, 8, dtype=torch.float64, requires_grad=True))[0]
    dist.barrier(group)
    if rank == 1:
        os._exit(0)
    time.sleep(0.5)  # let it go
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ExpertParallel: the backward of the combine all-to-all with the "
                                           r"expert-parallel peers \(ranks \[0, 1\]\) failed or timed out: a peer "
                                           r"has died"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match=r"ExpertParallel: the exchange of token counts with the expert-parallel "
                                           r"peers \(ranks \[0, 1\]\) failed or timed out: a peer has died"):
        layers[1](torch.randn(4, 8, dtype=torch.float64))
    took = time.monotonic() - start
    assert took < 30, took
    return "skip_barrier"


def _check_errors():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with pytest.raises(ValueError, match=r"ExpertParallel: chunks must be an int >= 1, got 0"):
        ExpertParallel(chunks=0)
    with pytest.raises(ValueError, match=r"ExpertParallel: fp8_dispatch must be None, 'rowwise' or 'mx', got "
                                         r"'tensorwise'"):
        ExpertParallel(fp8_dispatch="tensorwise")
    with pytest.raises(ValueError, match=r"ExpertParallel: num_experts=6 must be divisible by the expert-parallel "
                                         r"size 4"):
        parallelize_module(MoE(MoEConfig(hidden=4, intermediate=4, num_experts=6, top_k=1)), mesh, ExpertParallel())
    with pytest.raises(TypeError, match="ExpertParallel: module must be a torch_moe_ops.nn.MoE or a transformers "
                                        "experts module, got Linear"):
        parallelize_module(torch.nn.Linear(2, 2), mesh, ExpertParallel())


def _check_disagreeing_ranks():
    """A rank whose layer or dispatch settings differ: every rank fails alike
    at parallelize_module (one all_gather_object: bounded time, none is left
    waiting in a collective), naming what differs and each rank's value."""
    rank, world = dist.get_rank(), dist.get_world_size()
    last = world - 1
    mesh = init_device_mesh("cpu", (world,))
    start = time.monotonic()
    cfg = MoEConfig(hidden=8 if rank < last else 4, intermediate=4, num_experts=8, top_k=2 if rank < last else 1)
    with pytest.raises(ValueError, match=rf"ExpertParallel: the MoE layer differs between the ranks of the mesh in "
                                         rf"hidden, top_k \(rank 0: hidden=8, top_k=2; .*rank {last}: hidden=4, "
                                         rf"top_k=1\)"):
        parallelize_module(MoE(cfg), mesh, ExpertParallel())
    with pytest.raises(ValueError, match=rf"in num_experts \(rank 0: num_experts=8; .*rank {last}: num_experts=4\)"):
        parallelize_module(MoE(MoEConfig(hidden=4, intermediate=4, num_experts=8 if rank < last else 4, top_k=1)),
                           mesh, ExpertParallel())
    with pytest.raises(ValueError, match=r"differs between the ranks of the mesh in dtype \(.*rank 1: dtype=float64"):
        parallelize_module(MoE(MoEConfig(hidden=4, intermediate=4, num_experts=8, top_k=1),
                               dtype=torch.float64 if rank == 1 else torch.float32), mesh, ExpertParallel())
    same = MoEConfig(hidden=4, intermediate=4, num_experts=8, top_k=1)
    with pytest.raises(ValueError, match=rf"in chunks, fp8_dispatch \(rank 0: chunks=1, fp8_dispatch=None; .*"
                                         rf"rank {last}: chunks=2, fp8_dispatch=mx\)"):
        parallelize_module(MoE(same), mesh, ExpertParallel(fp8_dispatch="mx", chunks=2) if rank == last
                           else ExpertParallel())
    with pytest.raises(ValueError, match=r"in capacity_factor, dispatch \(rank 0: capacity_factor=1.25, "
                                         r"dispatch=splits; rank 1: capacity_factor=2.0, dispatch=capacity"):
        parallelize_module(MoE(same), mesh, ExpertParallel("capacity", 2.0) if rank == 1 else ExpertParallel())
    with pytest.raises(ValueError, match=r"in module \(rank 0: module=MoE; rank 1: module=Linear"):
        parallelize_module(torch.nn.Linear(2, 2) if rank == 1 else MoE(same), mesh, ExpertParallel())
    assert time.monotonic() - start < 60


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
    base = dict(hidden=8, intermediate=8, num_experts=8, top_k=2)
    skew = torch.zeros(E)
    skew[:2] = 100.0  # every token to experts 0 and 1: EP rank 1 receives nothing
    for name, cfg, bias in [("silu", MoEConfig(**base, activation="silu"), None),
                            ("swiglu interleaved, all to one EP rank",
                             MoEConfig(**base, gate_up_interleaved=True, score_bias=True), skew)]:
        _etp_case(mesh, name, cfg, ExpertTensorParallel(), bias)
    with pytest.raises(ValueError, match=r"ExpertTensorParallel: intermediate=5 must be divisible by the "
                                         r"tensor-parallel size 2"):
        parallelize_module(MoE(MoEConfig(**{**base, "intermediate": 5}, activation="silu")), mesh,
                           ExpertTensorParallel())


def _etp_case(mesh, name, cfg, style, bias=None):
    """One ExpertTensorParallel layer with dispatch options on an (EP, TP)
    mesh against the single-process layer: outputs and every gradient. Each EP
    rank has 6 tokens (the capacity mode needs the same T everywhere), its TP
    peers the same ones. float64 without fp8 (TOL, as above: the I slices and
    the grouped GEMMs' blocks add in another order). With fp8_dispatch the
    reference experts read x + (qdq(x) - x).detach(), as in _fp8_case, and the
    model is float32: each row quantises alone, so only float32 reassociation
    differs (rtol = atol = 1e-5)."""
    fp8 = style.fp8_dispatch
    dtype, tol = (torch.float32, dict(rtol=1e-5, atol=1e-5)) if fp8 else (torch.float64, TOL)
    ep_size, ep_rank = mesh.size(0), mesh.get_local_rank(0)
    torch.manual_seed(0)
    ref = MoE(cfg, dtype=dtype)
    if bias is not None:
        ref.score_bias.copy_(bias)
    etp = MoE(cfg, dtype=dtype)
    etp.load_state_dict(ref.state_dict())
    parallelize_module(etp, mesh, style)
    assert etp.gate_up_proj.placements == (Shard(0), Shard(1)), name
    x_full = torch.randn(6 * ep_size, cfg.hidden, dtype=dtype)
    g = torch.randn_like(x_full)
    rows = slice(6 * ep_rank, 6 * ep_rank + 6)
    x_ref, x = x_full.clone().requires_grad_(), x_full[rows].clone().requires_grad_()
    if fp8:
        qdq = torch_moe_ops.dequantize_fp8(*torch_moe_ops.quantize_fp8(x_ref.detach(), fp8), fp8)
        weights, ids, _ = torch_moe_ops.router_topk(torch.nn.functional.linear(x_ref, ref.router_weight), cfg.top_k,
                                                    cfg.score_func, ref.score_bias)
        out_ref = ref.experts(x_ref + (qdq - x_ref).detach(), weights, ids)
    else:
        out_ref = ref(x_ref)[0]
    (out_ref * g).sum().backward()
    out = etp(x)[0]
    (out * g[rows]).sum().backward()
    name = f"expert x tensor parallel {tuple(mesh.shape)}, {name}"
    torch.testing.assert_close(out, out_ref[rows], **tol, msg=lambda m: f"{name}, output: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **tol, msg=lambda m: f"{name}, grad of x: {m}")
    for pname, p_ref in ref.named_parameters():
        p = getattr(etp, pname)
        if isinstance(p, DTensor):
            grad = p.grad.full_tensor()
        else:  # the router: each EP rank's tokens' part (the same on its TP peers), summed over EP
            grad = p.grad.clone()
            dist.all_reduce(grad, group=mesh.get_group(0))
        torch.testing.assert_close(grad, p_ref.grad, **tol, msg=lambda m: f"{name}, grad of {pname}: {m}")
    if style.dispatch == "capacity":
        assert int(etp.ep_dropped) == 0, f"{name}: {int(etp.ep_dropped)} slots dropped"


def _check_expert_tensor_parallel_dispatch():
    """ExpertTensorParallel with ExpertParallel's dispatch options (capacity
    mode, fp8 payloads, chunks), a covering set: on (EP, TP) = (2, 1) and
    (1, 2) at 2 ranks, (2, 2) at 4."""
    world = dist.get_world_size()
    roomy = dict(dispatch="capacity", capacity_factor=E / 2)  # C = T: no drops
    silu = MoEConfig(hidden=8, intermediate=8, num_experts=E, top_k=2, activation="silu")
    swiglu = MoEConfig(hidden=8, intermediate=8, num_experts=E, top_k=2, gate_up_interleaved=True, score_bias=True)
    fp8 = MoEConfig(hidden=32, intermediate=8, num_experts=E, top_k=2, activation="silu", score_bias=True)
    to_ep0 = torch.zeros(E)
    to_ep0[:2] = 100.0  # experts 0 and 1: EP rank 0 receives every row, EP rank 1 none
    skew = _routing_biases()["skewed"]
    shapes = [(2, 1), (1, 2)] if world == 2 else [(2, 2)]
    for shape in shapes:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("ep", "tp"))
        _etp_case(mesh, "capacity, silu", silu, ExpertTensorParallel(**roomy))
        _etp_case(mesh, "capacity, 2 chunks, swiglu, all to one EP rank", swiglu,
                  ExpertTensorParallel(**roomy, chunks=2), bias=to_ep0)
        _etp_case(mesh, "splits, 3 chunks, swiglu, skewed", swiglu, ExpertTensorParallel(chunks=3), bias=skew)
        _etp_case(mesh, "fp8 rowwise, splits, skewed", fp8, ExpertTensorParallel(fp8_dispatch="rowwise"), bias=skew)
        _etp_case(mesh, "fp8 mx, capacity, 2 chunks", fp8,
                  ExpertTensorParallel(fp8_dispatch="mx", chunks=2, **roomy), bias=torch.zeros(E))
    with pytest.raises(ValueError, match=r"ExpertTensorParallel: chunks must be an int >= 1, got 0"):
        ExpertTensorParallel(chunks=0)
    with pytest.raises(ValueError, match=r"ExpertTensorParallel: dispatch must be 'splits' or 'capacity', got "
                                         r"'exact'"):
        ExpertTensorParallel(dispatch="exact")


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
    _check_overlap()
    _check_disagreeing_ranks()
    if dist.get_world_size() == 2:  # transformers' import costs ~10 s per process
        _check_overlap_order(init_device_mesh("cpu", (2,)))
        _check_dead_peer()
        _check_transformers()
    if dist.get_world_size() == 4:
        _check_errors()
        _check_expert_tensor_parallel()
    _check_expert_tensor_parallel_dispatch()

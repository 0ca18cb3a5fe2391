"""Expert parallelism for ``torch_moe_ops.nn.MoE`` as a ParallelStyle.

    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(moe, ep_mesh, ExpertParallel())     # ep_mesh: 1-D DeviceMesh

The routed experts' weights become DTensors sharded along the experts
(``Shard(0)``: rank r owns experts ``[r * E / EP, (r + 1) * E / EP)``); the
router and the shared expert stay plain, data-parallel parameters (their
gradients are the local tokens' contributions, reduced by the data-parallel
wrapper as usual). Each rank routes its own tokens, then the style's experts
step (replacing ``moe.experts`` on the instance; the model code is unchanged):

1. ``permute`` sorts the rank's (token, slot) rows by expert; the tokens per
   expert, ``counts (E,)``, are exchanged with an all-to-all (async), so each
   rank learns how many rows it receives from every peer for each of its
   experts;
2. dispatch: ``all_to_all_single`` of the rows with those split sizes (the
   ``splits`` mode; its one host sync, marked below, reads the send and receive
   sizes just before the all-to-all, as Megatron-Core does);
3. the local experts run on the received rows (``permute`` by local expert,
   the fused or unfused experts of the module's config) with weights 1;
4. combine: the reverse ``all_to_all_single``, then ``unpermute`` with the
   routing weights on the token's own rank (weighted sum in fp32, slot order).

Both all-to-alls are differentiable: the backward sends the gradients back
the same way. In eager they are ``dist.all_to_all_single`` waited for with a
clear error when a peer has died or stopped calling the layer, in the forward
and in the backward alike; under torch.compile, the traceable functional
collectives (``torch.distributed._functional_collectives``).
"""

from __future__ import annotations

import math
import time
import types
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from torch_moe_ops import _checks
from torch_moe_ops.nn.moe import MoE, expert_activation
from torch_moe_ops.ops import (
    dequantize_fp8,
    fp8_grouped_mm,
    fused_experts,
    grouped_mm,
    permute,
    quantize_fp8,
    unpermute,
)

__all__ = ["ExpertParallel", "ExpertTensorParallel", "TensorParallelExperts", "dispatch_combine"]

_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


class _TokenDispatch:
    """The token dispatch options of the expert-parallel styles (ExpertParallel,
    ExpertTensorParallel): ``dispatch`` ("splits" or "capacity"),
    ``capacity_factor``, ``fp8_dispatch`` (None, "rowwise" or "mx") and
    ``chunks``; see dispatch_combine."""

    def __init__(self, dispatch: str = "splits", capacity_factor: float = 1.25,
                 fp8_dispatch: Optional[str] = None, chunks: int = 1) -> None:
        style = type(self).__name__
        if dispatch not in ("splits", "capacity"):
            raise ValueError(f"{style}: dispatch must be 'splits' or 'capacity', got {dispatch!r}")
        if not capacity_factor > 0:
            raise ValueError(f"{style}: capacity_factor must be > 0, got {capacity_factor}")
        if fp8_dispatch not in (None, "rowwise", "mx"):
            raise ValueError(f"{style}: fp8_dispatch must be None, 'rowwise' or 'mx', got {fp8_dispatch!r}")
        if not (isinstance(chunks, int) and chunks >= 1):
            raise ValueError(f"{style}: chunks must be an int >= 1, got {chunks!r}")
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor
        self.fp8_dispatch = fp8_dispatch
        self.chunks = chunks

    def _dispatch_settings(self) -> dict:
        """As compared between the ranks: ranks that disagree on them would send
        buffers of different sizes, or different numbers of all-to-alls."""
        return dict(dispatch=self.dispatch, capacity_factor=self.capacity_factor, fp8_dispatch=self.fp8_dispatch,
                    chunks=self.chunks)

    def _dispatch_kwargs(self) -> dict:
        """dispatch_combine's keyword arguments."""
        return dict(mode=self.dispatch, capacity_factor=self.capacity_factor, fp8_dispatch=self.fp8_dispatch,
                    chunks=self.chunks)


class ExpertParallel(_TokenDispatch, ParallelStyle):
    """Shards an ``MoE``'s routed experts over a 1-D device mesh and dispatches
    tokens to them by all-to-all (see the module docstring).

    Also applies to a transformers experts module (``model.model.layers[i].mlp.experts``
    of a model built with ``use_experts_implementation``): its expert weights
    (and biases) become Shard(0) DTensors and its forward runs the same
    dispatch and combine around torch_moe_ops' experts implementation
    (integrations/transformers.py) on the local experts.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # First, before anything a rank could refuse alone: every rank must
        # shard the same layer, else the all-to-alls would hang or mix tensors.
        # The dispatch settings too (_TokenDispatch._dispatch_settings).
        _check_same_on_every_rank(module, device_mesh, "ExpertParallel", self._dispatch_settings())
        if not isinstance(module, MoE) and not _is_transformers_experts(module):
            raise TypeError("ExpertParallel: module must be a torch_moe_ops.nn.MoE or a transformers experts "
                            f"module, got {type(module).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"ExpertParallel: device_mesh must be 1-D (the expert-parallel ranks), got a "
                             f"{device_mesh.ndim}-D mesh of shape {tuple(device_mesh.shape)}")
        module._ep_dispatch = self._dispatch_kwargs()
        if not isinstance(module, MoE):
            return _apply_to_transformers_experts(module, device_mesh, self.src_data_rank)
        ep = device_mesh.size()
        experts = module.config.num_experts
        if experts % ep != 0:
            raise ValueError(f"ExpertParallel: num_experts={experts} must be divisible by the expert-parallel size "
                             f"{ep}")
        for name in _EXPERT_PARAMS:
            p = getattr(module, name)
            if p is None or isinstance(p, DTensor):
                continue
            dt = distribute_tensor(p.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        module._ep_mesh = device_mesh
        module.experts = types.MethodType(_expert_parallel_experts, module)
        return module


def _describe(module: nn.Module) -> dict:
    if not isinstance(module, MoE):
        return {"module": type(module).__name__}
    c = module.config
    return {"module": type(module).__name__, "num_experts": c.num_experts, "hidden": c.hidden,
            "intermediate": c.intermediate, "top_k": c.top_k, "activation": c.activation,
            "experts_impl": c.experts_impl, "fp8_recipe": c.fp8_recipe, "expert_bias": c.expert_bias,
            "dtype": str(module.gate_up_proj.dtype).replace("torch.", "")}


def _check_same_on_every_rank(module: nn.Module, mesh: DeviceMesh, style: str,
                              settings: Optional[dict] = None) -> None:
    """One all_gather_object over the mesh (its group if 1-D, the world's if
    it spans the world); every rank raises the same error when the layers
    differ (bounded time, no rank left waiting). A multi-dimensional mesh
    over part of the world is not checked."""
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif mesh.size() == dist.get_world_size():
        group = None
    else:
        return
    mine = {**_describe(module), **(settings or {})}
    every = [None] * mesh.size()
    dist.all_gather_object(every, mine, group=group)
    differ = sorted({k for d in every for k in d if d.get(k) != every[0].get(k)})
    if differ:
        per_rank = "; ".join(f"rank {r}: " + ", ".join(f"{k}={d.get(k)}" for k in differ) for r, d in enumerate(every))
        raise ValueError(f"{style}: the MoE layer differs between the ranks of the mesh in {', '.join(differ)} "
                         f"({per_rank}); every rank of the mesh must apply it to the same layer")


def _check_tensor_parallel_config(style: str, c, tp: int, even: bool) -> None:
    """What the I-sharded expert_mlp needs (see TensorParallelExperts)."""
    if c.experts_impl != "fused" or c.fp8_recipe is not None:
        raise ValueError(f"{style}: needs the fused experts (experts_impl='fused', fp8_recipe=None), "
                         f"got experts_impl={c.experts_impl!r}, fp8_recipe={c.fp8_recipe!r}")
    if c.expert_bias:
        raise ValueError(f"{style}: expert_bias=True is not supported: with I sharded each rank computes a partial "
                         "sum, and every rank would add down_bias")
    gated = c.activation in ("swiglu", "geglu", "swiglu_clamped")
    if gated and not c.gate_up_interleaved:
        raise ValueError(f"{style}: the gated activation {c.activation!r} needs gate_up_interleaved=True: with gate "
                         "and up as the two halves of N1, a shard of N1 puts a gate column and its up column on "
                         "different ranks")
    if (gated or even) and c.intermediate % tp != 0:
        raise ValueError(f"{style}: intermediate={c.intermediate} must be divisible by the tensor-parallel size {tp}")


def _local(p):
    return p.to_local() if isinstance(p, DTensor) else p


def _local_experts(module: MoE, rows: torch.Tensor, local_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """The rank's experts on rows (R, H) routed by local_ids (R, 1), weight 1:
    the computation of MoE.experts on the local shards of the weights."""
    c = module.config
    gate_up, down = _local(module.gate_up_proj).transpose(-2, -1), _local(module.down_proj).transpose(-2, -1)
    gate_up_bias, down_bias = _local(module.gate_up_bias), _local(module.down_bias)
    tp_mesh = getattr(module, "_tp_mesh", None)
    if tp_mesh is not None:  # ExpertTensorParallel: the TP peers received the same rows
        rep = [Replicate()]
        as_dtensor = lambda t, p: DTensor.from_local(t, tp_mesh, p, run_check=False)  # noqa: E731
        out = fused_experts(as_dtensor(rows, rep), as_dtensor(local_ids, rep), None, as_dtensor(gate_up, [Shard(2)]),
                            as_dtensor(down, [Shard(1)]), None, None, c.activation, c.gate_up_interleaved,
                            c.swiglu_alpha, c.swiglu_limit)
        return out.redistribute(tp_mesh, rep).to_local()
    if c.experts_impl == "fused" and c.fp8_recipe is None:
        return fused_experts(rows, local_ids, None, gate_up, down, gate_up_bias, down_bias, c.activation,
                             c.gate_up_interleaved, c.swiglu_alpha, c.swiglu_limit)
    permuted, dst_rows, _, offs = permute(rows, local_ids, num_local)

    def mm(a, w, bias):
        if c.fp8_recipe is None:
            return grouped_mm(a, w, offs, bias)
        return fp8_grouped_mm(a, w, offs, c.fp8_recipe)

    h = mm(permuted, gate_up, gate_up_bias)
    return unpermute(mm(expert_activation(h, c), down, down_bias), dst_rows, None)


def _expert_parallel_experts(module: MoE, x: torch.Tensor, weights: torch.Tensor,
                             expert_ids: torch.Tensor) -> torch.Tensor:
    """MoE.experts under expert parallelism: dispatch, local experts, combine."""
    num_local = module.config.num_experts // module._ep_mesh.size()
    return dispatch_combine(x, expert_ids, weights, module.config.num_experts, module._ep_mesh,
                            lambda rows, local_ids: _local_experts(module, rows, local_ids, num_local),
                            stats=module, **getattr(module, "_ep_dispatch", {}))


def dispatch_combine(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                     mesh: DeviceMesh, local_experts, mode: str = "splits", capacity_factor: float = 1.25,
                     stats=None, fp8_dispatch: Optional[str] = None, chunks: int = 1) -> torch.Tensor:
    """Expert parallelism's token flow over a 1-D mesh.

    ``x (T, H)`` this rank's tokens, ``expert_ids (T, k)`` their experts among
    ``num_experts`` (rank r owns ``[r * L, (r + 1) * L)``), ``weights (T, k)``
    the routing weights. ``local_experts(rows (R, H), local_ids (R, 1))``
    computes this rank's experts on the rows it receives, unweighted. Returns
    ``(T, H)``: every token's weighted sum of its experts' outputs.

    ``mode="splits"``: exact split sizes, exchanged first (one host sync).
    ``mode="capacity"``: no host sync and shapes that depend only on ``T``
    (CUDA graphs, ``torch.compile(fullgraph=True)``): each rank sends every
    expert a buffer of ``C = ceil(capacity_factor * T * k / num_experts)``
    rows (zero-padded); a token's slot beyond its expert's C rows from this
    rank (in token order) is dropped: it adds nothing to the token's output.
    Every rank must pass the same T. The number of dropped slots, a tensor,
    is left in ``stats.ep_dropped`` when stats is given.

    ``chunks > 1`` (either mode, with or without fp8): the tokens go in that
    many chunks (``x.tensor_split``). In the forward every chunk's dispatch is
    issued first, then chunk i's experts run while the later chunks'
    dispatches and the earlier chunks' combines are in flight; in the
    backward every chunk's combine gradient is issued first, then chunk i's
    expert gradients run while the other chunks' all-to-alls are in flight
    (async work handles of ``dist.all_to_all_single``, see ``_Pipeline``).
    ``stats.ep_trace`` records ``(event, chunk, time.perf_counter())``:
    ``dispatch_issued``, ``experts_start``, ``experts_end``, ``combine_issued``,
    ``combine_done``, then in the backward ``combine_grad_issued``,
    ``experts_grad_start``, ``experts_grad_end``, ``dispatch_grad_issued``,
    ``dispatch_grad_done``. The experts' gradients are taken by a nested
    ``torch.autograd.backward`` (as reentrant checkpointing does): they
    accumulate into the parameters' ``.grad`` even under
    ``torch.autograd.grad``, and double backward is not supported.

    ``fp8_dispatch`` (``"rowwise"`` or ``"mx"``, either mode): the dispatch
    sends each row as float8_e4m3fn data and its scales (``quantize_fp8``),
    dequantised on arrival to x's dtype; the combine and the backward stay in
    x's dtype, the quantisation passed straight through (its gradient taken
    as the identity), as DeepEP's fp8 dispatch. The bytes the dispatch sent
    (data and scales) are left in ``stats.ep_dispatch_bytes`` (one chunk);
    ``distributed/traffic.py`` measures every all-to-all's bytes on the
    collectives themselves.
    """
    if chunks > 1:
        return _pipelined_dispatch_combine(x, expert_ids, weights, num_experts, mesh, local_experts, mode,
                                           capacity_factor, stats, fp8_dispatch, chunks)
    if mode == "capacity":
        return _capacity_dispatch_combine(x, expert_ids, weights, num_experts, mesh, local_experts, capacity_factor,
                                          stats, fp8_dispatch)
    group = mesh.get_group()
    ep = mesh.size()
    num_local = num_experts // ep
    tokens, top_k = expert_ids.shape

    # Rows sorted by expert: rank r's experts' rows are one contiguous run.
    permuted, dst_rows, _, offs = permute(x, expert_ids, num_experts)
    recv_counts, send_sizes, recv_sizes = exchange_split_sizes(offs, mesh, num_local)
    received = sum(recv_sizes)

    if fp8_dispatch is None:
        dispatched = _all_to_all(permuted, recv_sizes, send_sizes, group, "dispatch")
        sent = permuted.numel() * permuted.element_size()
    else:
        dispatched, sent = _Fp8Dispatch.apply(permuted, fp8_dispatch, recv_sizes, send_sizes, group)
    if stats is not None:
        stats.ep_dispatch_bytes = sent
    # The received rows come by peer, each peer's by local expert.
    local_expert = torch.arange(num_local, device=x.device).repeat(ep)
    local_ids = torch.repeat_interleave(local_expert, recv_counts, output_size=received).view(-1, 1)
    y = local_experts(dispatched, local_ids)
    combined = _all_to_all(y, send_sizes, recv_sizes, group, "combine")
    return unpermute(combined, dst_rows, weights)


def exchange_split_sizes(offs: torch.Tensor, mesh: DeviceMesh, num_local: int) -> tuple[torch.Tensor, list, list]:
    """The `splits` mode's exchange, for rows sorted by global expert (permute's
    ``offs``, E = EP * num_local groups): ``recv_counts (EP * L,)``, the rows
    each peer sends to each local expert, and the row counts this rank sends to
    and receives from each peer, as Python ints."""
    group, ep = mesh.get_group(), mesh.size()
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
    recv_counts = torch.empty_like(counts)
    exchange = dist.all_to_all_single(recv_counts, counts, group=group, async_op=True)
    send_splits = counts.view(ep, num_local).sum(1)
    _wait_for_peers(exchange, mesh)
    recv_splits = recv_counts.view(ep, num_local).sum(1)
    # NOTE: host sync: the all-to-all takes its split sizes as Python ints (the
    # `splits` dispatch mode); one read of both, just before the all-to-all.
    sizes = torch.cat([send_splits, recv_splits]).tolist()
    return recv_counts, sizes[:ep], sizes[ep:]


def _wait_for_peers(work, mesh, what: str = "the exchange of token counts") -> None:
    """Waits for a collective with the expert-parallel peers (a DeviceMesh or
    its process group), first of all every step's exchange of token counts: a
    peer that died (or never calls the layer) shows up here, as the process
    group's timeout, with a message that says so instead of gloo's or NCCL's
    bare one."""
    try:
        work.wait()
    except RuntimeError as e:
        if isinstance(mesh, DeviceMesh):
            ranks = mesh.mesh.flatten().tolist()
        else:
            ranks = dist.get_process_group_ranks(mesh)
        raise RuntimeError(f"ExpertParallel: {what} with the expert-parallel peers (ranks {ranks}) failed or timed "
                           f"out: a peer has died or is not running this layer (process group error: {e})") from e


def _exchange(rows: torch.Tensor, out_sizes: list, in_sizes: list, group, what: str,
              backward: bool = False) -> torch.Tensor:
    """all_to_all_single of rows (sent in_sizes, received out_sizes), waited
    for with _wait_for_peers' error. Under torch.compile, the functional
    collective (traceable; its errors are the process group's own)."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_to_all_single(rows.contiguous(), out_sizes, in_sizes, group))
    rows = rows.contiguous()
    out = rows.new_empty((sum(out_sizes), *rows.shape[1:]))
    work = dist.all_to_all_single(out, rows, out_sizes, in_sizes, group=group, async_op=True)
    _wait_for_peers(work, group, f"the {'backward of the ' if backward else ''}{what} all-to-all")
    return out


class _AllToAll(torch.autograd.Function):
    """A differentiable _exchange: the backward sends the gradient back the
    same way, so that a peer that dies between the forward and the backward
    gives the others the same clear error as in the forward (the functional
    collective's own backward would raise the process group's bare one)."""

    @staticmethod
    def forward(ctx, rows, out_sizes, in_sizes, group, what):
        ctx.args = (out_sizes, in_sizes, group, what)
        return _exchange(rows, out_sizes, in_sizes, group, what)

    @staticmethod
    def backward(ctx, grad):
        out_sizes, in_sizes, group, what = ctx.args
        return _exchange(grad, in_sizes, out_sizes, group, what, backward=True), None, None, None, None


def _all_to_all(rows: torch.Tensor, out_sizes: list, in_sizes: list, group, what: str) -> torch.Tensor:
    """The payload all-to-all of the unchunked dispatch and combine,
    differentiable; the functional collective under torch.compile."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_to_all_single_autograd(rows, out_sizes, in_sizes, group))
    return _AllToAll.apply(rows, out_sizes, in_sizes, group, what)


def _splits_plans(xs, ids, num_experts: int, mesh: DeviceMesh) -> list:
    """The splits mode's per-chunk plans: rows sorted by expert, exact split
    sizes (every chunk's counts exchanged first, then one host read)."""
    group = mesh.get_group()
    ep = mesh.size()
    num_local = num_experts // ep
    pending = []
    for xc, ids_c in zip(xs, ids):
        permuted, dst_rows, _, offs = permute(xc, ids_c, num_experts)
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
        recv_counts = torch.empty_like(counts)
        work = dist.all_to_all_single(recv_counts, counts, group=group, async_op=True)
        pending.append((permuted, dst_rows, counts, recv_counts, work))
    for *_, work in pending:
        _wait_for_peers(work, mesh)
    # NOTE: host sync: one read of every chunk's send and receive sizes.
    sizes = torch.cat([torch.cat([c.view(ep, num_local).sum(1), r.view(ep, num_local).sum(1)])
                       for _, _, c, r, _ in pending]).tolist()
    local_expert = torch.arange(num_local, device=xs[0].device).repeat(ep)
    plans = []
    for i, (permuted, dst_rows, _, recv_counts, _) in enumerate(pending):
        send, recv = sizes[2 * ep * i:2 * ep * i + ep], sizes[2 * ep * i + ep:2 * ep * (i + 1)]
        local_ids = torch.repeat_interleave(local_expert, recv_counts, output_size=sum(recv)).view(-1, 1)
        plans.append(types.SimpleNamespace(send=permuted, send_sizes=send, recv_sizes=recv, local_ids=local_ids,
                                           rows=dst_rows, valid=None))
    return plans


def _pipelined_dispatch_combine(x, expert_ids, weights, num_experts, mesh, local_experts, mode, capacity_factor,
                                stats, fp8_dispatch, chunks):
    """dispatch_combine in chunks, every payload all-to-all async, forward
    and backward (see _Pipeline). chunks=1 is the same schedule without
    overlap (the benchmark's baseline)."""
    xs, ids = x.tensor_split(chunks), expert_ids.tensor_split(chunks)
    if mode == "capacity":
        plans = [_capacity_plan(xc, ids_c, num_experts, mesh, capacity_factor) for xc, ids_c in zip(xs, ids)]
        for plan in plans:
            plan.valid = _capacity_valid(plan, mesh)
    else:
        plans = _splits_plans(xs, ids, num_experts, mesh)
    trace: list = []
    if stats is not None:  # before the all-to-alls: a test's transport hook appends to it
        stats.ep_trace = trace
    grad = torch.is_grad_enabled()
    run = types.SimpleNamespace(plans=plans, mesh=mesh, recipe=fp8_dispatch, local_experts=local_experts,
                                trace=trace, hidden=x.shape[1], dtype=x.dtype, grad=grad)
    # The experts' parameters are not inputs of the Function: an input that
    # requires grad keeps its node in the graph even when x does not.
    anchor = x.new_empty(0, requires_grad=grad)
    backs = _Pipeline.apply(run, anchor, *[plan.send for plan in plans])
    outs = [unpermute(back, plan.rows, w) for back, plan, w in zip(backs, plans, weights.tensor_split(chunks))]
    if stats is not None and mode == "capacity":
        stats.ep_dropped = torch.stack([plan.dropped for plan in plans]).sum()
    return torch.cat(outs)


def _start_all_to_all(out, rows, out_sizes, in_sizes, group, what):
    """One async all-to-all of rows, the pipeline's only payload transport
    (tests wrap it to slow it down); what = (kind, chunk)."""
    return dist.all_to_all_single(out, rows, out_sizes, in_sizes, group=group, async_op=True)


def _finish(work, mesh: DeviceMesh, what) -> None:
    _wait_for_peers(work, mesh, f"the {what[0]} all-to-all of chunk {what[1]}")


def _event(trace: list, name: str, chunk: int) -> None:
    trace.append((name, chunk, time.perf_counter()))


def _encode(rows: torch.Tensor, recipe: Optional[str]) -> torch.Tensor:
    """Rows as sent: as they are, or (recipe) one uint8 row per token, its
    float8 data then its scales' bytes (gloo has no float8; one all-to-all
    carries both)."""
    if recipe is None:
        return rows.contiguous()
    data, scale = quantize_fp8(rows, recipe)
    scale_cols = 1 if recipe == "rowwise" else -(-rows.shape[1] // 32)
    return torch.cat([data.view(torch.uint8), scale.reshape(rows.shape[0], scale_cols).view(torch.uint8)], dim=1)


def _decode(buf: torch.Tensor, recipe: Optional[str], hidden: int, dtype: torch.dtype) -> torch.Tensor:
    if recipe is None:
        return buf
    data = buf[:, :hidden].contiguous().view(torch.float8_e4m3fn)
    scale = buf[:, hidden:].contiguous().view(_checks.fp8_scale_dtype(recipe))
    if recipe == "rowwise":
        scale = scale.view(-1)
    return dequantize_fp8(data, scale, recipe, dtype)


class _Pipeline(torch.autograd.Function):
    """Dispatch, experts and combine of every chunk, scheduled by hand.

    Forward: issue every chunk's dispatch; then for each chunk wait for its
    rows, run its experts (a graph of their own, built here on the received
    rows as leaves) and issue its combine; wait for the combines. Backward:
    issue every chunk's combine gradient; then for each chunk wait for it,
    backpropagate through its experts (nested autograd.backward: the
    parameters' gradients accumulate, the rows' gradient is read off the
    leaf) and issue its dispatch gradient; wait for those. So one chunk's
    all-to-alls travel while another chunk's expert GEMMs (or their
    gradients) run. The autograd engine alone would not give this order: it
    runs ready nodes by creation order and each collective's wait is a node
    of its own next to the GEMMs that need it.

    fp8 payloads: the dispatch sends _encode's bytes; its gradient travels in
    x's dtype (straight through the quantisation)."""

    @staticmethod
    def forward(ctx, run, anchor, *sends):
        group, trace = run.mesh.get_group(), run.trace
        inflight = []
        for i, (plan, send) in enumerate(zip(run.plans, sends)):
            payload = _encode(send, run.recipe)
            buf = payload.new_empty((sum(plan.recv_sizes), payload.shape[1]))
            inflight.append((buf, _start_all_to_all(buf, payload, plan.recv_sizes, plan.send_sizes, group,
                                                    ("dispatch", i))))
            _event(trace, "dispatch_issued", i)
        rows, ys, combines = [], [], []
        for i, (plan, (buf, work)) in enumerate(zip(run.plans, inflight)):
            _finish(work, run.mesh, ("dispatch", i))
            r = _decode(buf, run.recipe, run.hidden, run.dtype).detach().requires_grad_(run.grad)
            _event(trace, "experts_start", i)
            with torch.set_grad_enabled(run.grad):
                y = run.local_experts(r, plan.local_ids)
                if plan.valid is not None:
                    y = y * plan.valid.unsqueeze(1).to(y.dtype)
            _event(trace, "experts_end", i)
            out = y.new_empty((sum(plan.send_sizes), y.shape[1]))
            combines.append((out, _start_all_to_all(out, y.detach().contiguous(), plan.send_sizes, plan.recv_sizes,
                                                    group, ("combine", i))))
            _event(trace, "combine_issued", i)
            rows.append(r)
            ys.append(y)
        for i, (_, work) in enumerate(combines):
            _finish(work, run.mesh, ("combine", i))
            _event(trace, "combine_done", i)
        ctx.run, ctx.rows, ctx.ys = run, rows, ys
        return tuple(out for out, _ in combines)

    @staticmethod
    def backward(ctx, *grads):
        run = ctx.run
        group, trace = run.mesh.get_group(), run.trace
        if ctx.ys is None:
            raise RuntimeError("ExpertParallel: the chunked dispatch (chunks > 1) backpropagates once: its experts' "
                               "graphs are freed by the first backward (retain_graph is not supported)")
        inflight = []
        for i, (plan, g, y) in enumerate(zip(run.plans, grads, ctx.ys)):
            g = y.new_zeros((sum(plan.send_sizes), y.shape[1])) if g is None else g.contiguous()
            buf = g.new_empty((sum(plan.recv_sizes), g.shape[1]))
            inflight.append((buf, _start_all_to_all(buf, g, plan.recv_sizes, plan.send_sizes, group,
                                                    ("combine_grad", i))))
            _event(trace, "combine_grad_issued", i)
        backs = []
        for i, (plan, r, y, (buf, work)) in enumerate(zip(run.plans, ctx.rows, ctx.ys, inflight)):
            _finish(work, run.mesh, ("combine_grad", i))
            _event(trace, "experts_grad_start", i)
            if y.requires_grad:
                with torch.enable_grad():
                    torch.autograd.backward(y, buf)
            g_rows = r.grad if r.grad is not None else torch.zeros_like(r)
            _event(trace, "experts_grad_end", i)
            out = g_rows.new_empty((sum(plan.send_sizes), g_rows.shape[1]))
            backs.append((out, _start_all_to_all(out, g_rows.contiguous(), plan.send_sizes, plan.recv_sizes, group,
                                                 ("dispatch_grad", i))))
            _event(trace, "dispatch_grad_issued", i)
        for i, (_, work) in enumerate(backs):
            _finish(work, run.mesh, ("dispatch_grad", i))
            _event(trace, "dispatch_grad_done", i)
        ctx.rows = ctx.ys = None
        return (None, None, *[out for out, _ in backs])


class _Fp8Dispatch(torch.autograd.Function):
    """all_to_all_single of rows (R, H) as float8 data + scales, dequantised
    on arrival; the backward sends the gradient back in its own dtype
    (straight through the quantisation)."""

    @staticmethod
    def forward(ctx, rows, recipe, recv_sizes, send_sizes, group):
        data, scale = quantize_fp8(rows, recipe)
        # Sent as bytes (gloo has no float8); the scales of a row travel with it.
        scale_2d = scale.reshape(rows.shape[0], 1 if recipe == "rowwise" else -(-rows.shape[1] // 32))
        data_in = _exchange(data.view(torch.uint8), recv_sizes, send_sizes, group, "dispatch").view(data.dtype)
        scale_in = _exchange(scale_2d.view(torch.uint8), recv_sizes, send_sizes, group, "dispatch")
        scale_in = scale_in.view(scale.dtype)
        if recipe == "rowwise":
            scale_in = scale_in.view(-1)
        ctx.sizes, ctx.group = (recv_sizes, send_sizes), group
        sent = data.numel() * data.element_size() + scale.numel() * scale.element_size()
        return dequantize_fp8(data_in, scale_in, recipe, rows.dtype), sent

    @staticmethod
    def backward(ctx, grad, _):
        recv_sizes, send_sizes = ctx.sizes
        back = _exchange(grad, send_sizes, recv_sizes, ctx.group, "dispatch", backward=True)
        return back, None, None, None, None


def _capacity_plan(x, expert_ids, num_experts, mesh, capacity_factor):
    """The capacity mode's buffers for x (T, H): every expert C rows from
    this rank (zero-padded, equal splits), no tensor data read on the host.
    The counts' exchange is left in flight (_capacity_valid waits)."""
    group = mesh.get_group()
    ep = mesh.size()
    num_local = num_experts // ep
    tokens, top_k = expert_ids.shape
    cap = max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))
    # Routing only (a zero-width view moves no bytes): each (token, slot)'s row
    # in the expert-sorted order, hence its position among its expert's rows.
    _, dst_rows, _, offs = permute(x.detach()[:, :0], expert_ids, num_experts)
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
    recv_counts = torch.empty_like(counts)
    exchange = dist.all_to_all_single(recv_counts, counts, group=group, async_op=True)
    ids = expert_ids.long()
    starts = offs.long() - counts
    pos = dst_rows - starts.index_select(0, ids.flatten()).view_as(ids)
    keep = pos < cap
    slot = torch.where(keep, ids * cap + pos, num_experts * cap)  # the last row collects the dropped
    send = x.new_zeros((num_experts * cap + 1, x.shape[1])).index_copy(
        0, slot.flatten(), x.repeat_interleave(top_k, dim=0))[:-1]
    sizes = [num_local * cap] * ep
    # Received rows: [peer][local expert][c], valid while c < that count.
    local_ids = torch.arange(num_local, device=x.device).repeat_interleave(cap).repeat(ep).view(-1, 1)
    c = torch.arange(cap, device=x.device).repeat(ep * num_local)
    return types.SimpleNamespace(send=send, send_sizes=sizes, recv_sizes=sizes, local_ids=local_ids,
                                 rows=torch.where(keep, slot, -1), dropped=(~keep).sum(), cap=cap, c=c,
                                 recv_counts=recv_counts, exchange=exchange, valid=None)


def _capacity_valid(plan, mesh: DeviceMesh) -> torch.Tensor:
    _wait_for_peers(plan.exchange, mesh)
    return plan.c < plan.recv_counts.repeat_interleave(plan.cap)


def _capacity_dispatch_combine(x, expert_ids, weights, num_experts, mesh, local_experts, capacity_factor, stats,
                               fp8_dispatch=None):
    """dispatch_combine's ``capacity`` mode: fixed-size buffers, equal splits,
    no tensor data read on the host."""
    group = mesh.get_group()
    plan = _capacity_plan(x, expert_ids, num_experts, mesh, capacity_factor)
    sizes = plan.send_sizes
    if fp8_dispatch is None:
        received = _all_to_all(plan.send, sizes, sizes, group, "dispatch")
        sent = plan.send.numel() * plan.send.element_size()
    else:
        received, sent = _Fp8Dispatch.apply(plan.send, fp8_dispatch, sizes, sizes, group)
    valid = _capacity_valid(plan, mesh)
    y = local_experts(received, plan.local_ids)
    y = y * valid.unsqueeze(1).to(y.dtype)
    combined = _all_to_all(y, sizes, sizes, group, "combine")
    if stats is not None:
        stats.ep_dropped = plan.dropped
        stats.ep_dispatch_bytes = sent
    return unpermute(combined, plan.rows, weights)


# ------------------------------------------------- transformers' experts modules


def _is_transformers_experts(module: nn.Module) -> bool:
    """An experts module of transformers (>= 5): use_experts_implementation's
    interface (num_experts, has_gate, has_bias, is_transposed, down_proj)."""
    return all(hasattr(module, a) for a in ("num_experts", "has_gate", "has_bias", "is_transposed", "down_proj"))


def _transformers_expert_params(module: nn.Module) -> list:
    up = "gate_up_proj" if module.has_gate else "up_proj"
    names = [up, "down_proj"]
    if module.has_bias:
        names += [f"{up}_bias", "down_proj_bias"]
    return names


def _apply_to_transformers_experts(module: nn.Module, mesh: DeviceMesh, src_data_rank) -> nn.Module:
    ep = mesh.size()
    if module.num_experts % ep != 0:
        raise ValueError(f"ExpertParallel: num_experts={module.num_experts} must be divisible by the "
                         f"expert-parallel size {ep}")
    for name in _transformers_expert_params(module):
        p = module._parameters[name]
        if not isinstance(p, DTensor):
            dt = distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=src_data_rank)
            module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
    module._ep_mesh = mesh
    module.forward = types.MethodType(_transformers_expert_parallel_forward, module)
    return module


def _transformers_expert_parallel_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts module's forward under expert parallelism: our dispatch and
    combine around torch_moe_ops' experts implementation of transformers
    (fused when the module's gate allows), run on the local experts."""
    from torch_moe_ops.integrations import transformers as moe_tf

    mesh = self._ep_mesh
    num_experts = self.num_experts
    num_local = num_experts // mesh.size()
    names = _transformers_expert_params(self)

    def local_experts(rows, local_ids):
        # The module's own computation (its gate, activation, norm) on the
        # local shards: for the call, its parameters are the local tensors
        # (views of the DTensors, so gradients reach them) and num_experts L.
        saved = {n: self._parameters[n] for n in names}
        try:
            for n in names:
                self._parameters[n] = saved[n].to_local()
            self.num_experts = num_local
            ones = rows.new_ones((rows.shape[0], 1), dtype=torch.float32)
            return moe_tf.moe_ops_experts_forward(self, rows, local_ids, ones)
        finally:
            self._parameters.update(saved)
            self.num_experts = num_experts

    weights = moe_tf._routing_weights(top_k_index, top_k_weights, hidden_states.dtype)
    out = dispatch_combine(hidden_states, top_k_index, weights, num_experts, mesh, local_experts, stats=self,
                           **self._ep_dispatch)
    return out.to(hidden_states.dtype)


class TensorParallelExperts(ParallelStyle):
    """Tensor parallelism inside an ``MoE``'s experts over a 1-D device mesh
    (every rank holds every token and every expert, a slice of each expert's
    intermediate dimension I): ``gate_up_proj (E, N1, H)`` Shard(1),
    ``down_proj (E, H, I)`` Shard(2). The experts run as one ``expert_mlp`` on
    DTensors (its I-sharded strategy: ``h`` sharded, output Partial), reduced
    by one all-reduce; the router and shared expert stay replicated (plain).

    Needs the fused experts, no expert biases (every rank would add
    ``down_bias`` to its partial sum), and a non-gated activation or a gated
    one with ``gate_up_interleaved`` and I divisible by the mesh size (a
    rank's gate and up columns must pair up). The tokens given to the layer
    must be the same on every rank.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_same_on_every_rank(module, device_mesh, "TensorParallelExperts")
        if not isinstance(module, MoE):
            raise TypeError(f"TensorParallelExperts: module must be a torch_moe_ops.nn.MoE, got "
                            f"{type(module).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"TensorParallelExperts: device_mesh must be 1-D, got a {device_mesh.ndim}-D mesh of "
                             f"shape {tuple(device_mesh.shape)}")
        _check_tensor_parallel_config("TensorParallelExperts", module.config, device_mesh.size(), even=False)
        for name, dim in (("gate_up_proj", 1), ("down_proj", 2)):
            p = getattr(module, name)
            if not isinstance(p, DTensor):
                dt = distribute_tensor(p.detach(), device_mesh, [Shard(dim)], src_data_rank=self.src_data_rank)
                module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        module._tp_mesh = device_mesh
        module.experts = types.MethodType(_tensor_parallel_experts, module)
        return module


def _tensor_parallel_experts(module: MoE, x: torch.Tensor, weights: torch.Tensor,
                             expert_ids: torch.Tensor) -> torch.Tensor:
    """MoE.experts on replicated DTensors of the (same on every rank) tokens
    and routing: the I-sharded expert_mlp gives a Partial sum, all-reduced.
    The backward all-reduces the gradients of x and of the routing weights
    (Partial sums over I) when they leave the DTensors."""
    mesh, rep = module._tp_mesh, [Replicate()]
    as_dtensor = lambda t: DTensor.from_local(t, mesh, rep, run_check=False)  # noqa: E731
    out = MoE.experts(module, as_dtensor(x), as_dtensor(weights), as_dtensor(expert_ids))
    return out.redistribute(mesh, rep).to_local()


class ExpertTensorParallel(_TokenDispatch, ParallelStyle):
    """Expert and tensor parallelism on a 2-D mesh with named dimensions
    ``(EP, TP)``: experts Shard(0) over EP and each expert's I over TP
    (``gate_up_proj`` ``[Shard(0), Shard(1)]``, ``down_proj``
    ``[Shard(0), Shard(2)]``). The ranks of a TP group hold the same tokens;
    tokens are dispatched over the EP dimension as in ExpertParallel, then
    every TP peer runs its I slice of the received rows (the I-sharded
    expert_mlp), all-reduced over TP before the combine. The constraints of
    TensorParallelExperts apply, and I must be divisible by the TP size.

    The dispatch options are ExpertParallel's (``dispatch``,
    ``capacity_factor``, ``fp8_dispatch``, ``chunks``), over the EP dimension:
    the TP peers of an EP rank send and receive the same buffers.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_same_on_every_rank(module, device_mesh, "ExpertTensorParallel", self._dispatch_settings())
        if not isinstance(module, MoE):
            raise TypeError(f"ExpertTensorParallel: module must be a torch_moe_ops.nn.MoE, got "
                            f"{type(module).__name__}")
        names = device_mesh.mesh_dim_names
        if device_mesh.ndim != 2 or names is None:
            raise ValueError("ExpertTensorParallel: device_mesh must be 2-D (EP, TP) with mesh_dim_names, got shape "
                             f"{tuple(device_mesh.shape)} and mesh_dim_names={names}")
        ep, tp = device_mesh.size(0), device_mesh.size(1)
        c = module.config
        if c.num_experts % ep != 0:
            raise ValueError(f"ExpertTensorParallel: num_experts={c.num_experts} must be divisible by the "
                             f"expert-parallel size {ep}")
        _check_tensor_parallel_config("ExpertTensorParallel", c, tp, even=True)
        for name, dim in (("gate_up_proj", 1), ("down_proj", 2)):
            p = getattr(module, name)
            dt = distribute_tensor(p.detach(), device_mesh, [Shard(0), Shard(dim)], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        module._ep_mesh, module._tp_mesh = device_mesh[names[0]], device_mesh[names[1]]
        module._ep_dispatch = self._dispatch_kwargs()
        module.experts = types.MethodType(_expert_parallel_experts, module)
        return module

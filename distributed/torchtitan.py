"""A torchtitan token dispatcher backed by torch_moe_ops (torchtitan 0.3.0).

torchtitan's MoE layer (``torchtitan.models.common.moe.RoutedExperts``) calls
``token_dispatcher.dispatch`` (tokens to expert-major rows, across the
expert-parallel ranks), its ``GroupedExperts`` on those rows, then
``token_dispatcher.combine`` (rows back to their tokens, weighted by the
routing scores). ``MoeOpsTokenDispatcher`` is a drop-in dispatcher whose
reorderings are ``moe_ops.permute`` / ``moe_ops.unpermute`` and whose
transport is ours (expert_parallel.py): ``all_to_all_single`` with exchanged
split sizes (``splits``), or fixed-size per-rank buffers with no host sync
(``capacity``), optionally with float8 payloads (``fp8_dispatch``).

Switch by configuration, either in the model config::

    routed_experts.token_dispatcher = MoeOpsTokenDispatcher.Config(num_experts=E, top_k=k)

or, without touching the model's config code, with torchtitan's override
mechanism (``--override.imports`` on the command line)::

    --override.imports 'torch_moe_ops.distributed.torchtitan.moe_ops_token_dispatcher={"mode": "capacity"}'

which replaces every ``LocalTokenDispatcher`` / ``AllToAllTokenDispatcher``
config of the model (those of ``comm_backend="standard"``), and the
``TorchAOTokenDispatcher`` that torchtitan's float8 / MX converters put in
their place (its ``pad_multiple`` kept).

Importing this module imports torchtitan (it is not imported by
``torch_moe_ops.distributed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.config.override import override
from torchtitan.models.common.token_dispatcher import (
    AllToAllTokenDispatcher,
    BaseEPTokenDispatcher,
    LocalTokenDispatcher,
    TorchAOTokenDispatcher,
)

from torch_moe_ops.ops import permute, unpermute

from .expert_parallel import _Fp8Dispatch, exchange_split_sizes

__all__ = ["MoeOpsDispatchMetadata", "MoeOpsTokenDispatcher", "moe_ops_token_dispatcher"]


@dataclass(frozen=True, kw_only=True)
class MoeOpsDispatchMetadata:
    """What ``combine`` needs from ``dispatch``.

    ``dst_rows (T, k)``: each (token, slot)'s row among the rows this rank
    sent (expert-sorted; ``-1`` if dropped by the capacity mode);
    ``weights (T, k)``: the routing scores. With expert parallelism:
    ``local_dst_rows (R, 1)``, each received row's place among the
    expert-major rows given to the experts (splits); the split sizes of the
    all-to-alls; ``capacity`` (rows per (rank, expert)) in capacity mode.
    """

    dst_rows: torch.Tensor
    weights: torch.Tensor
    local_dst_rows: Optional[torch.Tensor] = None
    send_sizes: Optional[list] = None
    recv_sizes: Optional[list] = None
    capacity: Optional[int] = None


class MoeOpsTokenDispatcher(BaseEPTokenDispatcher):
    """torchtitan token dispatcher on torch_moe_ops' routing ops and expert
    parallelism.

    Without an EP mesh (EP = 1) ``dispatch`` is one ``permute`` (rows in
    (token, slot) order within each expert, the order of torchtitan's stable
    argsort) and ``combine`` one ``unpermute`` (each token's weighted sum in
    float32, slot order, one rounding), replacing torchtitan's index gather,
    score multiply and scatter_add.

    With an EP mesh (wired by ``RoutedExperts.parallelize``; rank r owns
    experts ``[r * E / EP, (r + 1) * E / EP)``):

    * ``mode="splits"``: the per-expert counts are exchanged (async), the
      send/receive sizes read on the host once just before the token
      all-to-all (torchtitan's own dispatcher syncs at the same point), the
      received rows put in expert-major order by a ``permute`` over the local
      experts; ``combine`` reverses both. Exact, no token dropped.
    * ``mode="capacity"``: each rank sends every expert
      ``C = ceil(capacity_factor * T * k / E)`` rows (zero-padded), so every
      shape depends on T only and nothing is read on the host (CUDA graphs,
      ``torch.compile(fullgraph=True)``). The experts run on ``EP * C`` rows
      per local expert (the padding included: the counts handed to the
      experts are ``EP * C`` each). A (token, slot) beyond its expert's first
      C rows from this rank (token order) is dropped: it adds nothing to the
      token's output; ``dropped`` holds the count of the last call (a
      tensor). Every rank must pass the same T (torchtitan pads the sequence
      so that it does). Applies without an EP mesh too (same drops, static
      shapes).
    * ``fp8_dispatch="rowwise" | "mx"``: the token all-to-all sends float8
      data and scales, dequantised on arrival; combine and backward stay in
      the layer's dtype (straight through). Only the all-to-all is affected:
      without an EP mesh nothing is sent and nothing is quantised.
      ``dispatch_bytes`` holds the bytes sent by the last call.
    * ``pad_multiple`` (a power of two <= 128, e.g. 16 for float8 and 32 for
      MXFP8 grouped GEMMs, what TorchAOTokenDispatcher pads to): every
      expert's group of rows given to the experts starts and ends on a
      multiple of it, zero rows filling the gaps (``permute``'s alignment; in
      capacity mode C is rounded up to a multiple of it). The padding rows are
      never read back.

    The chunked overlap of ``ExpertParallel(chunks=...)`` does not fit this
    interface: torchtitan calls the experts once, between ``dispatch`` and
    ``combine``, so the dispatcher cannot interleave chunks with them.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseEPTokenDispatcher.Config):
        mode: Literal["splits", "capacity"] = "splits"
        capacity_factor: float = 1.25
        fp8_dispatch: Optional[Literal["rowwise", "mx"]] = None
        pad_multiple: Optional[int] = None

    def __init__(self, config: Config):
        super().__init__(config)
        name = "MoeOpsTokenDispatcher"
        if not (isinstance(config.num_experts, int) and config.num_experts >= 1):
            raise ValueError(f"{name}: num_experts must be an int >= 1, got {config.num_experts!r}")
        if not (isinstance(config.top_k, int) and 1 <= config.top_k <= config.num_experts):
            raise ValueError(f"{name}: top_k must be an int in [1, num_experts={config.num_experts}], got "
                             f"{config.top_k!r}")
        if config.mode not in ("splits", "capacity"):
            raise ValueError(f"{name}: mode must be 'splits' or 'capacity', got {config.mode!r}")
        if not (isinstance(config.capacity_factor, (int, float)) and config.capacity_factor > 0):
            raise ValueError(f"{name}: capacity_factor must be > 0, got {config.capacity_factor!r}")
        if config.fp8_dispatch not in (None, "rowwise", "mx"):
            raise ValueError(f"{name}: fp8_dispatch must be None, 'rowwise' or 'mx', got {config.fp8_dispatch!r}")
        pad = config.pad_multiple
        if pad is not None and not (isinstance(pad, int) and 1 <= pad <= 128 and pad & (pad - 1) == 0):
            raise ValueError(f"{name}: pad_multiple must be None or a power of two in [1, 128], got {pad!r}")
        self.pad_multiple = 1 if pad is None else pad
        self.mode = config.mode
        self.capacity_factor = float(config.capacity_factor)
        self.fp8_dispatch = config.fp8_dispatch
        self.dropped: Optional[torch.Tensor] = None
        self.dispatch_bytes: Optional[int] = None

    def wire_meshes(self, *, ep_mesh: DeviceMesh | None) -> None:
        if ep_mesh is not None:
            if ep_mesh.ndim != 1:
                raise ValueError(f"MoeOpsTokenDispatcher: ep_mesh must be 1-D, got a {ep_mesh.ndim}-D mesh of shape "
                                 f"{tuple(ep_mesh.shape)}")
            if self.num_experts % ep_mesh.size() != 0:
                raise ValueError(f"MoeOpsTokenDispatcher: num_experts={self.num_experts} must be divisible by the "
                                 f"expert-parallel size {ep_mesh.size()}")
            self._check_same_on_every_rank(ep_mesh)
        super().wire_meshes(ep_mesh=ep_mesh)

    def _check_same_on_every_rank(self, mesh: DeviceMesh) -> None:
        """Ranks whose dispatchers disagree would exchange mismatched buffers
        (a hang or garbage); one all_gather_object at wiring time makes every
        rank fail alike, naming what differs."""
        mine = {"num_experts": self.num_experts, "top_k": self.top_k, "mode": self.mode,
                "capacity_factor": self.capacity_factor, "fp8_dispatch": self.fp8_dispatch,
                "pad_multiple": self.pad_multiple}
        every = [None] * mesh.size()
        dist.all_gather_object(every, mine, group=mesh.get_group())
        differ = [k for k in mine if any(d[k] != every[0][k] for d in every)]
        if differ:
            per_rank = "; ".join(f"rank {r}: " + ", ".join(f"{k}={d[k]!r}" for k in differ)
                                 for r, d in enumerate(every))
            raise ValueError(f"MoeOpsTokenDispatcher: the dispatcher differs between the expert-parallel ranks in "
                             f"{', '.join(differ)} ({per_rank}); every rank must configure the same one")

    # ------------------------------------------------------------ dispatch

    def dispatch(self, x_TD: torch.Tensor, topk_scores_TK: torch.Tensor, topk_expert_ids_TK: torch.Tensor,
                 num_local_tokens_per_expert_E: torch.Tensor):
        """Returns ``(rows (R, D) expert-major for the local experts, tokens
        per local expert (e,) int64, metadata)``. The router's counts
        ``num_local_tokens_per_expert_E`` are not needed: permute counts."""
        del num_local_tokens_per_expert_E
        self._check_routing(x_TD, topk_scores_TK, topk_expert_ids_TK)
        if self.mode == "capacity":
            return self._capacity_dispatch(x_TD, topk_scores_TK, topk_expert_ids_TK)
        if self.ep_mesh is None:
            permuted, dst_rows, _, offs = permute(x_TD, topk_expert_ids_TK, self.num_experts, self.pad_multiple)
            return permuted, self._group_sizes(offs), MoeOpsDispatchMetadata(dst_rows=dst_rows,
                                                                             weights=topk_scores_TK)
        permuted, dst_rows, _, offs = permute(x_TD, topk_expert_ids_TK, self.num_experts)
        mesh = self.ep_mesh
        group, ep = mesh.get_group(), mesh.size()
        num_local = self.num_experts // ep
        # recv_counts[p * L + e]: rows peer p sends to this rank's expert e (one host sync, marked there).
        recv_counts, send_sizes, recv_sizes = exchange_split_sizes(offs, mesh, num_local)
        received = sum(recv_sizes)
        if self.fp8_dispatch is None:
            rows = funcol.all_to_all_single_autograd(permuted, recv_sizes, send_sizes, group)
            self.dispatch_bytes = permuted.numel() * permuted.element_size()
        else:
            rows, self.dispatch_bytes = _Fp8Dispatch.apply(permuted, self.fp8_dispatch, recv_sizes, send_sizes, group)
        # Received: [peer][local expert][rows]; the experts want
        # [local expert][peer][rows], torchtitan's order (each peer's rows in
        # its (token, slot) order, peers in rank order).
        local_ids = torch.repeat_interleave(torch.arange(num_local, device=x_TD.device).repeat(ep), recv_counts,
                                            output_size=received).view(-1, 1)
        expert_rows, local_dst_rows, _, local_offs = permute(funcol.wait_tensor(rows), local_ids, num_local,
                                                             self.pad_multiple)
        local_counts = self._group_sizes(local_offs)
        meta = MoeOpsDispatchMetadata(dst_rows=dst_rows, weights=topk_scores_TK, local_dst_rows=local_dst_rows,
                                      send_sizes=send_sizes, recv_sizes=recv_sizes)
        return expert_rows, local_counts, meta

    def _capacity_dispatch(self, x, weights, expert_ids):
        tokens, top_k = expert_ids.shape
        num_experts = self.num_experts
        ep = 1 if self.ep_mesh is None else self.ep_mesh.size()
        num_local = num_experts // ep
        cap = max(1, math.ceil(self.capacity_factor * tokens * top_k / num_experts))
        cap = -(-cap // self.pad_multiple) * self.pad_multiple
        # Routing only (a zero-width view moves no bytes): each (token, slot)'s
        # row in the expert-sorted order, hence its rank among its expert's rows.
        _, dst_rows, _, offs = permute(x.detach()[:, :0], expert_ids, num_experts)
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
        ids = expert_ids.long()
        starts = offs.long() - counts
        pos = dst_rows - starts.index_select(0, ids.flatten()).view_as(ids)
        keep = pos < cap
        # Buffer [expert][c]; one extra last row collects the dropped slots.
        slot = torch.where(keep, ids * cap + pos, num_experts * cap)
        send = x.new_zeros((num_experts * cap + 1, x.shape[1])).index_copy(
            0, slot.flatten(), x.repeat_interleave(top_k, dim=0))[:-1]
        self.dropped = (~keep).sum()
        if self.ep_mesh is None:
            received = send
        else:
            group = self.ep_mesh.get_group()
            sizes = [num_local * cap] * ep
            if self.fp8_dispatch is None:
                received = funcol.wait_tensor(funcol.all_to_all_single_autograd(send, sizes, sizes, group))
                self.dispatch_bytes = send.numel() * send.element_size()
            else:
                received, self.dispatch_bytes = _Fp8Dispatch.apply(send, self.fp8_dispatch, sizes, sizes, group)
        # [peer][local expert][c] -> [local expert][peer][c]: a fixed
        # permutation. Padding rows are zero and never read back by combine.
        rows = received.view(ep, num_local, cap, -1).transpose(0, 1).reshape(ep * num_local * cap, -1)
        local_counts = torch.full((num_local,), ep * cap, dtype=torch.int64, device=x.device)
        meta = MoeOpsDispatchMetadata(dst_rows=torch.where(keep, slot, -1), weights=weights, capacity=cap)
        return rows, local_counts, meta

    def _group_sizes(self, offs):
        """The rows per expert handed to the experts: from one aligned group
        start to the next (the real rows and the zero padding after them),
        so that their cumulative sum gives every group's true start."""
        pad = self.pad_multiple
        ends = offs.long() if pad == 1 else (offs.long() + pad - 1) // pad * pad
        return torch.diff(ends, prepend=ends.new_zeros(1))

    def _check_routing(self, x, scores, ids):
        name = "MoeOpsTokenDispatcher.dispatch"
        if x.dim() != 2:
            raise ValueError(f"{name}: x_TD must be 2-D (tokens, dim), got sizes {tuple(x.shape)}")
        if ids.shape != (x.shape[0], self.top_k):
            raise ValueError(f"{name}: topk_expert_ids_TK must have sizes (T, top_k) = ({x.shape[0]}, {self.top_k}), "
                             f"got {tuple(ids.shape)}")
        if scores.shape != ids.shape:
            raise ValueError(f"{name}: topk_scores_TK must have the sizes of topk_expert_ids_TK {tuple(ids.shape)}, "
                             f"got {tuple(scores.shape)}")

    # ------------------------------------------------------------- combine

    def combine(self, routed_output_RD: torch.Tensor, metadata: MoeOpsDispatchMetadata,
                x_TD: torch.Tensor) -> torch.Tensor:
        """``(T, D)``: each token's routing-score-weighted sum of its experts'
        outputs (float32 accumulation, slot order), in x_TD's dtype."""
        y = routed_output_RD
        if metadata.capacity is not None:
            ep = 1 if self.ep_mesh is None else self.ep_mesh.size()
            num_local = self.num_experts // ep
            y = y.view(num_local, ep, metadata.capacity, -1).transpose(0, 1).reshape(y.shape)
            if self.ep_mesh is not None:
                sizes = [num_local * metadata.capacity] * ep
                y = funcol.wait_tensor(funcol.all_to_all_single_autograd(y, sizes, sizes, self.ep_mesh.get_group()))
        elif metadata.local_dst_rows is not None:
            # Back to the received order (one row per slot: a copy), then home.
            y = unpermute(y, metadata.local_dst_rows)
            y = funcol.wait_tensor(funcol.all_to_all_single_autograd(y, metadata.send_sizes, metadata.recv_sizes,
                                                                     self.ep_mesh.get_group()))
        return unpermute(y, metadata.dst_rows, metadata.weights).to(x_TD.dtype)


@override(target=LocalTokenDispatcher.Config,
          description="torch_moe_ops token dispatcher (moe_ops permute/unpermute, all_to_all_single expert "
                      "parallelism, splits or capacity mode)")
def moe_ops_token_dispatcher(cfg: LocalTokenDispatcher.Config, *, mode: str = "splits", capacity_factor: float = 1.25,
                             fp8_dispatch: Optional[str] = None,
                             pad_multiple: Optional[int] = None) -> MoeOpsTokenDispatcher.Config:
    """torchtitan override: every standard token dispatcher config
    (LocalTokenDispatcher, AllToAllTokenDispatcher, and TorchAOTokenDispatcher,
    which torchtitan's float8 / MX converters put in their place, its
    pad_multiple kept unless given) becomes a MoeOpsTokenDispatcher with the
    given options. The backend-specific dispatchers (DeepEP, HybridEP,
    MinimalAsyncEP) are refused rather than silently replaced: their configs
    carry buffer sizes and backend options that this dispatcher would ignore."""
    if type(cfg) not in (LocalTokenDispatcher.Config, AllToAllTokenDispatcher.Config, TorchAOTokenDispatcher.Config,
                         MoeOpsTokenDispatcher.Config):
        raise ValueError(f"moe_ops_token_dispatcher: replaces LocalTokenDispatcher, AllToAllTokenDispatcher and "
                         f"TorchAOTokenDispatcher configs (comm_backend='standard'), got {type(cfg).__qualname__}; "
                         f"configure the model with comm_backend='standard' or narrow the override's target")
    if pad_multiple is None:
        pad_multiple = getattr(cfg, "pad_multiple", None)
    new = MoeOpsTokenDispatcher.Config(num_experts=cfg.num_experts, top_k=cfg.top_k, mode=mode,
                                       capacity_factor=capacity_factor, fp8_dispatch=fp8_dispatch,
                                       pad_multiple=pad_multiple)
    MoeOpsTokenDispatcher(new)  # the options' errors now, at config time, not at model build
    return new

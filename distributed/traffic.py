"""What the all-to-alls of expert parallelism put on the wire, measured.

``AllToAllBytes`` is a TorchDispatchMode that sees every all_to_all_single as
it is called (c10d's ``alltoall_base_``, behind ``dist.all_to_all_single``,
and the functional collective ``_c10d_functional.all_to_all_single``) and
records the tensor handed to the transport: its dtype, its row size and how
many of its rows go to the other ranks of the group and to this rank itself.
The numbers come from the collectives' own arguments, not from a formula of
the caller's, so a test or a benchmark can compare them with one.

    with AllToAllBytes() as traffic:
        out = moe(x)
    traffic.sent()          # bytes this rank sent to its peers
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["AllToAll", "AllToAllBytes"]


@dataclass(frozen=True)
class AllToAll:
    op: str                 # "alltoall_base_" or "functional"
    dtype: torch.dtype
    row_bytes: int          # bytes of one row (dim 0) of the input
    rows_to_peers: int
    rows_to_self: int

    @property
    def bytes_to_peers(self) -> int:
        return self.rows_to_peers * self.row_bytes


class AllToAllBytes(TorchDispatchMode):
    """Records every all_to_all_single called under it (see the module
    docstring) in ``self.calls``, in call order."""

    def __init__(self):
        super().__init__()
        self.calls: list[AllToAll] = []

    def sent(self, dtype=None) -> int:
        """Bytes sent to the other ranks, by every call (or those whose input
        had ``dtype``)."""
        return sum(c.bytes_to_peers for c in self.calls if dtype is None or c.dtype == dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.c10d.alltoall_base_.default:
            _, inp, boxed, _, in_splits = args[:5]
            group = dist.ProcessGroup.unbox(boxed)
            self._record("alltoall_base_", inp, list(in_splits), group.rank(), group.size())
        elif func is torch.ops._c10d_functional.all_to_all_single.default:
            inp, _, in_splits, group_name = args[:4]
            group = dist.distributed_c10d._resolve_process_group(group_name)
            self._record("functional", inp, list(in_splits), group.rank(), group.size())
        return func(*args, **kwargs)

    def _record(self, op, inp, in_splits, rank, size):
        rows = inp.shape[0]
        if not in_splits:  # equal splits
            in_splits = [rows // size] * size
        row_bytes = math.prod(inp.shape[1:]) * inp.element_size()
        self.calls.append(AllToAll(op, inp.dtype, row_bytes, sum(in_splits) - in_splits[rank], in_splits[rank]))

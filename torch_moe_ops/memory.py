"""The large-output cache: CPU memory that the MoE layer's backward reuses.

An expert layer's weight gradients are hundreds of MB. A training step frees
them (``zero_grad(set_to_none=True)``) and the next one allocates them again at
the same sizes; glibc maps such blocks afresh every time, so each step writes
its gradients into new pages that the kernel faults in and zeroes (22-40 ms of a
Qwen3 layer's ~190 ms step on a 2-core Zen 4, benchmarks/README.md). CUDA's
caching allocator keeps such blocks; c10's CPU allocator does not. The outputs
of ``grouped_mm`` and ``grouped_mm_gather`` and ``expert_mlp``'s CPU workspaces
are therefore allocated from a bounded cache (``csrc/moe/LargeOutputCache.h``)
that keeps a freed block for the next request of exactly its size.

Policy: blocks of at least ``min_block_bytes`` (32 MiB: below it the heap reuses
memory itself) are cached; at most ``limit_bytes`` (2 GiB) are held free, the
oldest released first when a new one does not fit; an allocation that fails
empties the cache and tries once more. ``TORCH_MOE_OPS_CPU_CACHE_MB`` sets the
limit at startup in MiB (0: no cache); :func:`set_cpu_cache_limit` changes it.
Nothing else allocates from it: every other op allocates as ATen does, as
does ``torch._grouped_mm`` with the core series (its CPU kernel is
``grouped_mm``'s; the cache is this extension's CPU entry around it).
"""

from __future__ import annotations

from typing import Optional

from . import _C

__all__ = ["cpu_cache_stats", "empty_cpu_cache", "set_cpu_cache_limit"]


def cpu_cache_stats() -> dict[str, int]:
    """Counters and settings: ``hits`` (requests served from a held block),
    ``misses`` (cacheable requests that allocated), ``in_use_bytes`` (its
    blocks that tensors hold now), ``cached_bytes`` and
    ``cached_blocks`` (held free now), ``limit_bytes``, ``min_block_bytes``."""
    return _C._cpu_cache_stats()


def empty_cpu_cache() -> None:
    """Frees every block the cache holds (the memory in use stays in use)."""
    _C._cpu_cache_empty()


def set_cpu_cache_limit(limit_bytes: int, min_block_bytes: Optional[int] = None) -> None:
    """At most ``limit_bytes`` held free (0 turns the cache off and frees what
    it holds; a lowered limit frees the oldest blocks beyond it); blocks below
    ``min_block_bytes`` (unchanged if None) are not cached."""
    if min_block_bytes is None:
        min_block_bytes = cpu_cache_stats()["min_block_bytes"]
    _C._cpu_cache_configure(int(limit_bytes), int(min_block_bytes))

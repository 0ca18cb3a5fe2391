"""torch.compile lowerings: Inductor graph passes that turn stock MoE code into our ops.

    import torch_moe_ops.compile
    torch_moe_ops.compile.enable()          # or: with torch_moe_ops.compile.enabled(): ...
    model = torch.compile(model)            # transformers / torchtitan model code unchanged
    # or for one model only: torch.compile(model, options=torch_moe_ops.compile.options())

Pre-grad (Dynamo's torch-level graph, before AOT autograd; the replacement
brings its own backward):

* (c) transformers 5's ``"grouped_mm"`` experts block and torchtitan's
  dispatch -> GroupedExperts -> combine -> ``moe_ops::expert_mlp`` (memory-lean
  backward: saves the up-projection output, nothing of size ``T * k * H``);
* (d) router softmax / sigmoid (+ bias) + topk (+ gather, renormalise, scale)
  -> ``moe_ops::router_topk``.

Post-grad (aten graphs after partitioning; the replacement need not bring a
backward, the forward and backward graphs are rewritten on their own):

* (a) a row gather feeding a grouped GEMM -> ``moe_ops::grouped_mm_gather``;
* (b) a grouped GEMM whose rows are weighted and scattered back with
  ``index_add`` / ``scatter_add`` -> ``moe_ops::unpermute``'s combine.

Off unless enabled: see README.md ("torch.compile lowerings") for why importing
torch_moe_ops does not turn them on. Each rewrite bumps
``torch._dynamo.utils.counters["torch_moe_ops"][<op>]``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ._fx import COUNTER

__all__ = ["enable", "disable", "enabled", "is_enabled", "options", "COUNTER"]

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(1)
def _source_hash() -> bytes:
    # The cache key of a compiled graph covers the passes' code: editing them recompiles.
    files = sorted(os.path.join(_HERE, f) for f in os.listdir(_HERE) if f.endswith(".py"))
    return get_hash_for_files(tuple(files))


class PreGradPass(CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        from .pre_grad import run
        run(graph)

    def uuid(self) -> bytes:
        return b"torch_moe_ops.pre_grad:" + _source_hash()


class PostGradPass(CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        from .post_grad import run
        run(graph)

    def uuid(self) -> bytes:
        return b"torch_moe_ops.post_grad:" + _source_hash()


_PRE, _POST = PreGradPass(), PostGradPass()
_SLOTS = (("pre_grad_custom_pass", _PRE), ("post_grad_custom_post_pass", _POST))


def _passes(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def options() -> dict:
    """The passes as ``torch.compile`` options, for one compiled callable only:
    ``torch.compile(model, options=torch_moe_ops.compile.options())``."""
    return {slot: p for slot, p in _SLOTS}


def enable() -> None:
    """Adds the passes to Inductor's config (next to any custom passes already set); idempotent."""
    for slot, p in _SLOTS:
        current = _passes(getattr(inductor_config, slot))
        if not any(isinstance(c, type(p)) for c in current):
            current.append(p)
        setattr(inductor_config, slot, current[0] if len(current) == 1 else current)


def disable() -> None:
    """Removes the passes (and only them) from Inductor's config."""
    for slot, p in _SLOTS:
        rest = [c for c in _passes(getattr(inductor_config, slot)) if not isinstance(c, type(p))]
        setattr(inductor_config, slot, None if not rest else rest[0] if len(rest) == 1 else rest)


def is_enabled() -> bool:
    return all(any(isinstance(c, type(p)) for c in _passes(getattr(inductor_config, slot))) for slot, p in _SLOTS)


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """The passes on for a block (graphs compiled inside keep them), as they were after it."""
    saved = {slot: getattr(inductor_config, slot) for slot, _ in _SLOTS}
    enable()
    try:
        yield
    finally:
        for slot, value in saved.items():
            setattr(inductor_config, slot, value)

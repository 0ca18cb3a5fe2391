"""The MoE layer shapes of public models, shipped inside the package.

``data/moe_shapes.json`` holds each model's MoE layer as its published config
gives it (widths, experts, top-k, routing, activation; ``source`` names the
config) and the SonicMoE paper's benchmark points. Tests, benchmarks, the demo
and ``MoEConfig.from_shapes`` all read it through this module, so a clone or
an installed wheel needs nothing beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

PATH = Path(__file__).parent / "data" / "moe_shapes.json"


def load() -> dict:
    """The whole table: ``models``, ``sonicmoe_benchmarks``, ``alignment``.
    Read on every call (a few kB), so a caller may change what it gets."""
    return json.loads(PATH.read_text())


def models() -> dict[str, dict]:
    """Model name -> its MoE layer (``hidden``, ``expert_intermediate``,
    ``experts``, ``top_k``, routing and activation fields, ``source``)."""
    return load()["models"]


def model(name: str) -> dict:
    table = models()
    if name not in table:
        raise KeyError(f"torch_moe_ops.shapes: no model {name!r}, expected one of {', '.join(table)}")
    return table[name]

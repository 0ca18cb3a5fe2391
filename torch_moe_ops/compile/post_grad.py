"""Post-grad rewrites (aten IR, forward and backward graphs on their own)."""

from __future__ import annotations

import torch.fx as fx


def run(graph: fx.Graph) -> None:
    return None

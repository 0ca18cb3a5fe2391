"""torch-moe-ops: fast, deterministic Mixture-of-Experts ops for PyTorch.

Importing this package loads the C++ extension (which defines every
``torch.ops.moe_ops`` schema and its CPU/CUDA kernels) and registers the
Python fake kernels and autograd formulas.
"""

import torch

from . import _C  # noqa: F401  (registers torch.ops.moe_ops)
from . import nn, ops
from .ops import *  # noqa: F403  (every family's public wrappers)

__all__ = [*ops.__all__, "nn", "ops", "cuda_kernels_built"]


def cuda_kernels_built() -> bool:
    """Whether this build of _C compiled and registered the CUDA kernels."""
    return bool(_C.WITH_CUDA)

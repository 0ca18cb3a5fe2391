"""torch-moe-ops: fast, deterministic Mixture-of-Experts ops for PyTorch.

Importing this package loads the C++ extension (which defines every
``torch.ops.moe_ops`` schema and its CPU/CUDA kernels), registers the Python
fake kernels and autograd formulas, and makes the Triton kernels
(``torch_moe_ops.triton``) the CUDA kernels of the grouped GEMMs and the fused
experts.

Without the extension (a checkout that was never built, e.g. on a GPU machine
with another torch and no compiler), the package still imports: the Triton
kernels (``torch_moe_ops.triton``), the plain-torch references
(``torch_moe_ops.reference``) and the shape table (``torch_moe_ops.shapes``)
work on their own; the ops (``torch.ops.moe_ops``, ``torch_moe_ops.ops``,
``torch_moe_ops.nn``) need the extension and say so.
"""

import importlib.util

import torch

# Only a missing extension is tolerated: one that is there but fails to load raises.
if importlib.util.find_spec(f"{__name__}._C") is not None:
    from . import _C  # registers torch.ops.moe_ops
else:
    _C = None
    _C_MISSING = ("torch_moe_ops._C (the C++ extension defining torch.ops.moe_ops) is not built in this checkout; "
                  "build it (make build, or pip install --no-build-isolation -e .) to use the ops. Without it "
                  "torch_moe_ops.triton, torch_moe_ops.reference and torch_moe_ops.shapes work.")


if _C is not None:
    from . import memory, nn, ops
    from .memory import cpu_cache_stats, empty_cpu_cache, set_cpu_cache_limit
    from .ops import *  # noqa: F403  (every family's public wrappers)

    __all__ = [*ops.__all__, *memory.__all__, "memory", "nn", "ops", "cuda_kernels_built"]

    # A torch without Triton (CPU wheels): the grouped GEMMs and experts have no CUDA kernel.
    if importlib.util.find_spec("triton") is not None:
        from .triton import cuda as _triton_cuda

        _triton_cuda.register_all()
else:
    __all__ = ["memory", "nn", "ops", "cuda_kernels_built"]

    def __getattr__(name):
        # The ops and the layers (`nn`, `ops`, the wrappers) need _C. Another submodule not imported
        # yet is an AttributeError, so that `from torch_moe_ops import reference` imports it.
        wrapper = not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is None
        if name in ("memory", "nn", "ops") or wrapper:
            raise ImportError(f"torch_moe_ops.{name}: {_C_MISSING}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cuda_kernels_built() -> bool:
    """Whether this build of _C compiled and registered the CUDA kernels."""
    return _C is not None and bool(_C.WITH_CUDA)

"""Public Python API of the ops: thin wrappers over ``torch.ops.moe_ops``, with
their fake kernels and autograd formulas, one module per family; each module's
``__all__`` names its public wrappers."""

import torch_moe_ops as _pkg

if _pkg._C is None:
    raise ImportError(f"torch_moe_ops.ops: {_pkg._C_MISSING}")

from . import experts as _experts, fp8 as _fp8, grouped_mm as _grouped_mm, routing as _routing  # noqa: E402
from .experts import *  # noqa: E402,F403
from .fp8 import *  # noqa: E402,F403
from .grouped_mm import *  # noqa: E402,F403
from .routing import *  # noqa: E402,F403

__all__ = sorted(_experts.__all__ + _fp8.__all__ + _grouped_mm.__all__ + _routing.__all__)

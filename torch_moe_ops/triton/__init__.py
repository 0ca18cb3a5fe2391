"""Triton kernels for the MoE path (issue 16), beside the plain-torch references.

Each ``triton_<op>`` function here computes what ``torch.ops.moe_ops.<op>`` does
(reference: ``torch_moe_ops.reference.torch_<op>``). On CUDA tensors it launches
the compiled (autotuned) Triton kernel; on CPU tensors it runs the same kernel in
Triton's interpreter, which is how this GPU-less project tests the kernels'
indexing, masking and scheduling. ``torch.ops.moe_ops_triton.<op>`` are the same
functions registered with ``torch.library.triton_op``, so torch.compile sees the
Triton kernels. ``cuda.py`` makes them the CUDA kernels of ``moe_ops::grouped_mm``,
``grouped_mm_gather``, ``expert_mlp``, ``expert_mlp_backward`` and
``scaled_grouped_mm`` (torch.compile sees the Triton kernels there too);
``import torch_moe_ops`` registers them. ``triton_expert_mlp_fp8``
(``moe_ops_triton::expert_mlp_fp8``) has no ``moe_ops`` op: the fused experts'
forward whose gate/up epilogue stores act in float8 for an fp8 down GEMM.

Nothing here needs the compiled extension (``torch_moe_ops._C``): on a machine
where it is not built, ``torch_moe_ops.triton`` and ``torch_moe_ops.reference``
still import and run (benchmarks/gpu/run.py relies on it).

A separate subpackage, not ``ops/``: ``ops/`` holds the public ops' wrappers,
fake kernels and autograd; this holds kernels that can be timed and swapped in
on their own (as torchao keeps ``triton_*`` kernels beside ``torch_*`` ones).
"""

import importlib

# The kernels' modules import on first use: defining their triton_ops loads
# torch._inductor, seconds that `import torch_moe_ops` (which imports cuda.py)
# should not pay.
_LAZY = {"triton_expert_mlp": "experts", "triton_expert_mlp_backward": "experts",
         "triton_expert_mlp_fp8": "experts", "triton_grouped_mm": "grouped_mm",
         "triton_grouped_mm_gather": "grouped_mm", "triton_quantize_fp8": "fp8", "triton_scaled_grouped_mm": "fp8"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

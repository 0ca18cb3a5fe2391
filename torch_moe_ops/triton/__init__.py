"""Triton kernels for the MoE path (issue 16), beside the plain-torch references.

Each ``triton_<op>`` function here computes what ``torch.ops.moe_ops.<op>`` does
(reference: ``torch_moe_ops.reference.torch_<op>``). On CUDA tensors it launches
the compiled (autotuned) Triton kernel; on CPU tensors it runs the same kernel in
Triton's interpreter, which is how this GPU-less project tests the kernels'
indexing, masking and scheduling. ``torch.ops.moe_ops_triton.<op>`` are the same
functions registered with ``torch.library.triton_op``, so torch.compile sees the
Triton kernels. The ``moe_ops`` ops' CUDA slot is still the C++ entry.

A separate subpackage, not ``ops/``: ``ops/`` holds the public ops' wrappers,
fake kernels and autograd; this holds kernels that can be timed and swapped in
on their own (as torchao keeps ``triton_*`` kernels beside ``torch_*`` ones).
"""

from .experts import triton_expert_mlp, triton_expert_mlp_backward
from .fp8 import triton_quantize_fp8, triton_scaled_grouped_mm
from .grouped_mm import triton_grouped_mm, triton_grouped_mm_gather

__all__ = ["triton_expert_mlp", "triton_expert_mlp_backward", "triton_grouped_mm", "triton_grouped_mm_gather",
           "triton_quantize_fp8", "triton_scaled_grouped_mm"]

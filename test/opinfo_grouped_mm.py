"""OpInfo for grouped_mm, usable for ``moe_ops.grouped_mm`` and, through the
upstream patch series, for ``torch._grouped_mm``.

``make_grouped_mm_opinfo(name, op)`` returns an ``OpInfo`` whose samples cover
all four layouts, empty groups, zero tokens, rows past ``offs[-1]``, transposed
and non-contiguous operands, bias and fp32 output; whose error inputs cover
every rejected argument; and whose ``ref`` is the float64 loop reference.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.testing import make_tensor
from torch.testing._internal.common_dtype import floating_types_and
from torch.testing._internal.opinfo.core import ErrorInput, OpInfo, SampleInput

from torch_moe_ops.reference import torch_grouped_mm


def _offs(sizes, device):
    """int32 cumulative group ends for the given group sizes."""
    ends, total = [], 0
    for s in sizes:
        total += s
        ends.append(total)
    return torch.tensor(ends, dtype=torch.int32, device=device)


def _transposed(t):
    """Same values, column-major in the last two dims."""
    return t.transpose(-2, -1).contiguous().transpose(-2, -1)


def sample_inputs_grouped_mm(op_info, device, dtype, requires_grad, **kwargs):
    make = partial(make_tensor, device=device, dtype=dtype, low=-1, high=1)
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    K, N = 12, 10
    group_sizes = [3, 0, 5, 2]  # an empty group, uneven sizes
    G = len(group_sizes)
    M = sum(group_sizes)

    def sample(a, b, offs=None, bias=None, out_dtype=None, name=""):
        leaves = [a, b] + ([bias] if bias is not None else [])
        for t in leaves:
            t.requires_grad_(requires_grad)
        kw = {"offs": offs}
        if bias is not None:
            kw["bias"] = bias
        if out_dtype is not None:
            kw["out_dtype"] = out_dtype
        return SampleInput(a, args=(b,), kwargs=kw, name=name)

    # 2D x 3D: tokens sorted by expert (the MoE forward).
    offs = partial(_offs, group_sizes, device)
    yield sample(make((M, K)), make((G, K, N)), offs(), name="2d3d")
    yield sample(make((M + 3, K)), make((G, K, N)), offs(), name="2d3d_rows_past_offs")
    yield sample(make((M, K)), _transposed(make((G, K, N))), offs(), name="2d3d_b_transposed")
    yield sample(make((M, 2 * K))[:, ::2], make((G, K, N)), offs(), name="2d3d_a_strided")
    yield sample(make((M, K)), make((G, K, N)), offs(), bias=make((G, N)), name="2d3d_bias")
    yield sample(make((0, K)), make((G, K, N)), _offs([0] * G, device), name="2d3d_zero_tokens")
    yield sample(make((M, 7)), make((G, 7, 5)), offs(), name="2d3d_odd_sizes")
    if sixteen_bit:
        yield sample(make((M, K)), make((G, K, N)), offs(), bias=make((G, N)), out_dtype=torch.float32,
                     name="2d3d_out_fp32")
    # 3D x 2D: offs splits N.
    n_sizes = [4, 0, 3, 2]
    yield sample(make((G, 6, K)), make((K, sum(n_sizes) + 2)), _offs(n_sizes, device), name="3d2d")
    yield sample(make((G, 6, K)), make((K, sum(n_sizes))), _offs(n_sizes, device),
                 bias=make((G, sum(n_sizes))), name="3d2d_bias")
    # 2D x 2D: offs splits K (the weight gradient of 2D x 3D).
    k_sizes = [5, 0, 4, 3]
    Kt = sum(k_sizes)
    yield sample(make((7, Kt)), make((Kt, N)), _offs(k_sizes, device), name="2d2d")
    yield sample(_transposed(make((7, Kt))), make((Kt, N)), _offs(k_sizes, device), bias=make((G, N)),
                 name="2d2d_a_transposed_bias")
    # 3D x 3D: batched.
    yield sample(make((G, 5, K)), make((G, K, N)), name="3d3d")
    yield sample(make((G, 5, K)), _transposed(make((G, K, N))), bias=make((G, N)), name="3d3d_b_transposed_bias")


def error_inputs_grouped_mm(op_info, device, **kwargs):
    make = partial(make_tensor, device=device, dtype=torch.float32)
    offs = _offs([2, 3], device)
    a, b = make((5, 4)), make((2, 4, 3))

    def err(a, b, regex, error_type=ValueError, name="", **kw):
        return ErrorInput(SampleInput(a, args=(b,), kwargs=kw, name=name), error_type=error_type, error_regex=regex)

    yield err(make((5,)), b, r"mat_a must be 2-D or 3-D, got 1-D", offs=offs)
    yield err(a, make((2, 2, 4, 3)), r"mat_b must be 2-D or 3-D, got 4-D", offs=offs)
    yield err(a.to(torch.int32), b.to(torch.int32), r"mat_a must be float32, float16, bfloat16 or float64, got Int",
              offs=offs)
    yield err(a, b.double(), r"mat_b must have the dtype of mat_a \(Float\), got Double", offs=offs)
    yield err(a, make((2, 5, 3)), r"contraction sizes differ: .* has K=4 .* has K=5", offs=offs)
    yield err(a, b, r"offs is required when mat_a or mat_b is 2-D")
    yield err(make((2, 5, 4)), b, r"offs must be None when mat_a and mat_b are both 3-D", offs=offs)
    yield err(a, b, r"offs must be int32, got Long", offs=offs.long())
    yield err(a, b, r"offs must be 1-D, got 2-D", offs=offs.view(1, 2))
    yield err(a, make((3, 4, 3)), r"offs has 2 groups but mat_b \[3, 4, 3\] has 3", offs=offs)
    yield err(make((3, 5, 4)), make((4, 6)), r"offs has 2 groups but mat_a \[3, 5, 4\] has 3", offs=offs)
    yield err(a, b, r"bias must have shape \(G, N\) = \(2, 3\), got \[3\]", offs=offs, bias=make((3,)))
    yield err(a, b, r"bias must have the input dtype \(Float\) or the output dtype \(Float\), got Double",
              offs=offs, bias=make((2, 3)).double())
    yield err(a, b, r"out_dtype must be the input dtype \(Float\) or float32 for float16/bfloat16 inputs, "
              r"got out_dtype=BFloat16", offs=offs, out_dtype=torch.bfloat16)
    yield err(a.half(), b.half(), r"out_dtype must be the input dtype \(Half\) or float32 .* got out_dtype=Double",
              offs=offs, out_dtype=torch.float64)
    if torch.device(device).type == "cpu":
        # The values of offs are checked where they can be read without a
        # device sync; CUDA checks them with a device-side assert instead.
        # Fake kernels cannot check them at all: these are named "offs_values".
        err = partial(err, name="offs_values")
        yield err(a, b, r"offs must be non-decreasing and non-negative, got offs\[1\]=1 < offs\[0\]=3",
                  offs=torch.tensor([3, 1], dtype=torch.int32, device=device))
        yield err(a, b, r"offs must be non-decreasing and non-negative, got offs\[0\]=-1 < 0",
                  offs=torch.tensor([-1, 5], dtype=torch.int32, device=device))
        yield err(a, b, r"offs\[-1\]=6 exceeds the grouped dimension M \(mat_a.size\(0\)\)=5",
                  offs=torch.tensor([2, 6], dtype=torch.int32, device=device))
        yield err(make((2, 5, 4)), make((4, 6)), r"offs\[-1\]=7 exceeds the grouped dimension N \(mat_b.size\(1\)\)=6",
                  offs=torch.tensor([3, 7], dtype=torch.int32, device=device))
        yield err(make((5, 4)), make((4, 6)), r"offs\[-1\]=9 exceeds the grouped dimension K \(mat_a.size\(1\)\)=4",
                  offs=torch.tensor([3, 9], dtype=torch.int32, device=device))


def reference_grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    return torch_grouped_mm(mat_a, mat_b, offs, bias, out_dtype)


def make_grouped_mm_opinfo(name: str, op) -> OpInfo:
    """Every device takes the same inputs: the CPU kernel, and the CUDA
    kernel (here the Triton one; upstream the CUDA entry the core series
    carries, native/cuda/GroupedMM.cpp)."""
    return OpInfo(
        name,
        op=op,
        ref=reference_grouped_mm,
        dtypes=floating_types_and(torch.float16, torch.bfloat16),
        sample_inputs_func=sample_inputs_grouped_mm,
        error_inputs_func=error_inputs_grouped_mm,
        supports_out=False,
        supports_autograd=True,
        supports_forward_ad=False,
        supports_fwgrad_bwgrad=False,
    )


grouped_mm_opinfo = make_grouped_mm_opinfo("moe_ops.grouped_mm", torch.ops.moe_ops.grouped_mm.default)
op_db = [grouped_mm_opinfo]

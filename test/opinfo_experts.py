"""OpInfo for grouped_mm_gather: samples with gathered rows and columns,
-1 (zero) entries, repeated and unsorted indices, empty groups, zero tokens,
rows past offs[-1], transposed and strided operands, bias and fp32 output; an
error input for every check; the reference materialises the gathered operand
and runs the float64 loop reference of grouped_mm.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.testing import make_tensor
from torch.testing._internal.common_dtype import floating_types_and
from torch.testing._internal.opinfo.core import ErrorInput, OpInfo, SampleInput

from torch_moe_ops.reference import torch_grouped_mm

from opinfo import _offs, _transposed


def gathered(mat: torch.Tensor, index, dim: int) -> torch.Tensor:
    """mat with dimension dim read through index (-1 reads zeros)."""
    if index is None:
        return mat
    if mat.shape[dim] == 0:  # every entry is -1
        size = list(mat.shape)
        size[dim] = index.shape[0]
        return mat.new_zeros(size)
    picked = mat.index_select(dim, index.clamp(min=0))
    keep = (index >= 0).to(mat.dtype)
    return picked * (keep.unsqueeze(1) if dim == 0 else keep.unsqueeze(0))


def torch_grouped_mm_gather(mat_a, mat_b, offs, a_index=None, b_index=None, bias=None, out_dtype=None):
    a = gathered(mat_a, a_index, 1 if mat_b.dim() == 2 else 0)
    b = gathered(mat_b, b_index, 0)
    return torch_grouped_mm(a, b, offs, bias, out_dtype)


def _index(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


def sample_inputs_grouped_mm_gather(op_info, device, dtype, requires_grad, **kwargs):
    make = partial(make_tensor, device=device, dtype=dtype, low=-1, high=1)
    T, K, N = 9, 12, 10
    group_sizes = [3, 0, 5, 2]
    G, M = len(group_sizes), sum(group_sizes)

    def offs():
        return _offs(group_sizes, device)

    def rows():
        """Unsorted, repeated, with padding (-1): an MoE layer's rows."""
        return _index([4, -1, 0, 8, 8, 2, -1, 7, 1, 3], device)

    def sample(a, b, offs, name, **kw):
        return SampleInput(a, args=(b, offs), kwargs=kw, name=name)

    # 2D x 3D, a_index: tokens -> expert rows.
    yield sample(make((T, K)), make((G, K, N)), offs(), "2d3d", a_index=rows())
    yield sample(make((T, K)), make((G, K, N)), offs(), "2d3d_rows_past_offs", a_index=torch.cat([rows(), rows()[:3]]))
    yield sample(make((T, K)), _transposed(make((G, K, N))), offs(), "2d3d_b_transposed", a_index=rows())
    yield sample(make((T, 2 * K))[:, ::2], make((G, K, N)), offs(), "2d3d_a_strided", a_index=rows())
    yield sample(make((T, K)), make((G, K, N)), offs(), "2d3d_bias", a_index=rows(), bias=make((G, N)))
    yield sample(make((0, K)), make((G, K, N)), _offs([1, 0, 1, 0], device), "2d3d_zero_tokens",
                 a_index=_index([-1, -1], device))
    yield sample(make((T, K)), make((G, K, N)), _offs([0] * G, device), "2d3d_zero_rows",
                 a_index=_index([], device))
    if dtype in (torch.float16, torch.bfloat16):
        yield sample(make((T, K)), make((G, K, N)), offs(), "2d3d_out_fp32", a_index=rows(), out_dtype=torch.float32)
    # 2D x 2D: the contraction (rows of the layer) gathered.
    yield sample(make((7, M)), make((T, N)), offs(), "2d2d_b_index", b_index=rows())
    yield sample(_transposed(make((7, M))), make((T, N)), offs(), "2d2d_b_index_a_transposed", b_index=rows(),
                 bias=make((G, N)))
    yield sample(make((T, 7)).t(), make((M, N)), offs(), "2d2d_a_index", a_index=rows())
    both = rows()
    yield sample(make((T, 7)).t(), make((T, N)), offs(), "2d2d_both", a_index=both, b_index=both)


def error_inputs_grouped_mm_gather(op_info, device, **kwargs):
    make = partial(make_tensor, device=device, dtype=torch.float32)
    offs = _offs([2, 3], device)
    a, b = make((4, 6)), make((2, 6, 3))
    rows = _index([0, 1, 2, 3, -1], device)

    def err(a, b, regex, name="", **kw):
        return ErrorInput(SampleInput(a, args=(b, offs), kwargs=kw, name=name), error_type=ValueError,
                          error_regex=regex)

    yield err(a, b, r"a_index or b_index must be given")
    yield err(make((2, 4, 6)), b, r"needs mat_a 2-D and mat_b 3-D .* got mat_a \[2, 4, 6\]", a_index=rows)
    yield err(a, b, r"b_index needs mat_b 2-D \(the 2D x 2D layout\), got mat_b \[2, 6, 3\]", b_index=rows)
    yield err(a, b, r"a_index must be int64, got Int", a_index=rows.int())
    yield err(a, b, r"a_index must be 1-D, got 2-D", a_index=rows.view(1, 5))
    yield err(a, make((2, 5, 3)), r"contraction sizes differ: .* has K=6 .* has K=5", a_index=rows)
    yield err(make((3, 5)), make((4, 3)), r"contraction sizes differ: mat_a \[3, 5\] has K=5 but mat_b \[4, 3\] has K=4",
              b_index=rows[:4])
    if torch.device(device).type == "cpu":
        # Values are checked where they can be read without a device sync.
        yield err(a, b, r"offs\[-1\]=5 exceeds the grouped dimension M", a_index=rows[:4], name="offs_values")
        err = partial(err, name="index_values")
        yield err(a, b, r"a_index\[1\]=4 is out of range \[-1, 4\)", a_index=_index([0, 4, 1, 2, 3], device))
        yield err(a, b, r"a_index\[0\]=-2 is out of range \[-1, 4\)", a_index=_index([-2, 0, 1, 2, 3], device))
        yield err(make((3, 5)), make((4, 3)), r"b_index\[4\]=9 is out of range \[-1, 4\)",
                  b_index=_index([0, 1, 2, 3, 9], device))


grouped_mm_gather_opinfo = OpInfo(
    "moe_ops.grouped_mm_gather",
    op=torch.ops.moe_ops.grouped_mm_gather.default,
    ref=torch_grouped_mm_gather,
    dtypes=floating_types_and(torch.float16, torch.bfloat16),
    sample_inputs_func=sample_inputs_grouped_mm_gather,
    error_inputs_func=error_inputs_grouped_mm_gather,
    supports_out=False,
    supports_autograd=False,
)
op_db = [grouped_mm_gather_opinfo]

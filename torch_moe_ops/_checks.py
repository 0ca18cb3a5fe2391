"""Input validation shared by fake kernels and DTensor strategies.

Restates the C++ checks of ``csrc/native/GroupedMM.h`` one for one, with the
same messages, so that an error surfaces identically in eager, under
``torch.compile`` (fake tensors) and in sharding propagation. Only checks that
need tensor values (the contents of ``offs``) are left to the kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def grouped_mm_layout(mat_a: torch.Tensor, mat_b: torch.Tensor) -> str:
    """One of ``"2d3d"``, ``"3d2d"``, ``"2d2d"``, ``"3d3d"``."""
    return f"{mat_a.dim()}d{mat_b.dim()}d"


def grouped_mm_out_dtype(mat_a: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    in_dtype = mat_a.dtype
    out = in_dtype if out_dtype is None else out_dtype
    torch._check_value(
        out == in_dtype or (out == torch.float32 and in_dtype in (torch.float16, torch.bfloat16)),
        lambda: f"grouped_mm: out_dtype must be the input dtype ({_c10(in_dtype)}) or float32 for "
        f"float16/bfloat16 inputs, got out_dtype={_c10(out)}",
    )
    return out


def grouped_mm_num_groups(mat_a: torch.Tensor, offs: Optional[torch.Tensor]) -> int:
    return offs.shape[0] if offs is not None else mat_a.shape[0]


def grouped_mm_out_size(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Optional[torch.Tensor]) -> list:
    layout = grouped_mm_layout(mat_a, mat_b)
    if layout == "2d3d":
        return [mat_a.shape[0], mat_b.shape[2]]
    if layout == "3d2d":
        return [mat_a.shape[1], mat_b.shape[1]]
    if layout == "2d2d":
        return [offs.shape[0], mat_a.shape[0], mat_b.shape[1]]
    return [mat_a.shape[0], mat_a.shape[1], mat_b.shape[2]]


def grouped_mm_out_strides(size: list, dtype: torch.dtype, device: torch.device) -> list:
    """Contiguous on CPU; on CUDA the last dimension is padded to 16 bytes, as
    upstream's TMA-based kernels allocate it."""
    padded = list(size)
    if device.type == "cuda":
        align = 16 // dtype.itemsize
        padded[-1] = (padded[-1] + align - 1) // align * align
    strides = [1] * len(padded)
    for i in range(len(padded) - 2, -1, -1):
        strides[i] = strides[i + 1] * padded[i + 1]
    return strides


def _c10(dtype: torch.dtype) -> str:
    """The C++ spelling of a dtype, so Python and C++ messages match."""
    return {
        torch.float32: "Float",
        torch.float16: "Half",
        torch.bfloat16: "BFloat16",
        torch.float64: "Double",
        torch.int32: "Int",
        torch.int64: "Long",
    }.get(dtype, str(dtype).replace("torch.", ""))


def _sizes(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_grouped_mm_inputs(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype],
) -> torch.dtype:
    """Validates everything but the values of offs; returns the output dtype."""
    chk = torch._check_value
    chk(mat_a.dim() in (2, 3),
        lambda: f"grouped_mm: mat_a must be 2-D or 3-D, got {mat_a.dim()}-D with sizes {_sizes(mat_a)}")
    chk(mat_b.dim() in (2, 3),
        lambda: f"grouped_mm: mat_b must be 2-D or 3-D, got {mat_b.dim()}-D with sizes {_sizes(mat_b)}")
    chk(mat_a.dtype in GROUPED_MM_DTYPES,
        lambda: f"grouped_mm: mat_a must be float32, float16, bfloat16 or float64, got {_c10(mat_a.dtype)}")
    chk(mat_b.dtype == mat_a.dtype,
        lambda: f"grouped_mm: mat_b must have the dtype of mat_a ({_c10(mat_a.dtype)}), got {_c10(mat_b.dtype)}")
    chk(mat_b.device == mat_a.device,
        lambda: f"grouped_mm: mat_b must be on the device of mat_a ({mat_a.device}), got {mat_b.device}")
    chk(mat_a.shape[-1] == mat_b.shape[-2],
        lambda: f"grouped_mm: contraction sizes differ: mat_a {_sizes(mat_a)} has K={mat_a.shape[-1]} "
        f"but mat_b {_sizes(mat_b)} has K={mat_b.shape[-2]}")
    out_dtype = grouped_mm_out_dtype(mat_a, out_dtype)

    layout = grouped_mm_layout(mat_a, mat_b)
    if layout == "3d3d":
        chk(offs is None,
            lambda: "grouped_mm: offs must be None when mat_a and mat_b are both 3-D, "
            f"got offs of sizes {_sizes(offs)}")
        chk(mat_a.shape[0] == mat_b.shape[0],
            lambda: f"grouped_mm: batch sizes differ: mat_a {_sizes(mat_a)}, mat_b {_sizes(mat_b)}")
    else:
        chk(offs is not None,
            lambda: f"grouped_mm: offs is required when mat_a or mat_b is 2-D (mat_a {_sizes(mat_a)}, "
            f"mat_b {_sizes(mat_b)})")
        chk(offs.dim() == 1,
            lambda: f"grouped_mm: offs must be 1-D, got {offs.dim()}-D with sizes {_sizes(offs)}")
        chk(offs.dtype == torch.int32, lambda: f"grouped_mm: offs must be int32, got {_c10(offs.dtype)}")
        chk(offs.device == mat_a.device,
            lambda: f"grouped_mm: offs must be on the device of mat_a ({mat_a.device}), got {offs.device}")
        if layout == "2d3d":
            chk(offs.shape[0] == mat_b.shape[0],
                lambda: f"grouped_mm: offs has {offs.shape[0]} groups but mat_b {_sizes(mat_b)} "
                f"has {mat_b.shape[0]}")
        elif layout == "3d2d":
            chk(offs.shape[0] == mat_a.shape[0],
                lambda: f"grouped_mm: offs has {offs.shape[0]} groups but mat_a {_sizes(mat_a)} "
                f"has {mat_a.shape[0]}")

    if bias is not None:
        groups = grouped_mm_num_groups(mat_a, offs)
        n_out = grouped_mm_out_size(mat_a, mat_b, offs)[-1]
        chk(bias.dim() == 2 and bias.shape[0] == groups and bias.shape[1] == n_out,
            lambda: f"grouped_mm: bias must have shape (G, N) = ({groups}, {n_out}), got {_sizes(bias)}")
        chk(bias.dtype in (mat_a.dtype, out_dtype),
            lambda: f"grouped_mm: bias must have the input dtype ({_c10(mat_a.dtype)}) or the output dtype "
            f"({_c10(out_dtype)}), got {_c10(bias.dtype)}")
        chk(bias.device == mat_a.device,
            lambda: f"grouped_mm: bias must be on the device of mat_a ({mat_a.device}), got {bias.device}")
    return out_dtype

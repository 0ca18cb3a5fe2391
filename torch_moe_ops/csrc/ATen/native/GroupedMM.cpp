// CPU entry points of grouped_mm and grouped_mm_gather: validate, allocate,
// run the kernel.

#include <ATen/native/GroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>

namespace at::native {

DEFINE_DISPATCH(grouped_mm_stub);

namespace {

// mat_a / mat_b are the caller's tensors; a_index / b_index (validated) say
// which of their rows or columns form the grouped dimension, and a_shape /
// b_shape are the operands as the kernel sees them (mat_a / mat_b when
// nothing is gathered, else the checks' stand-ins: one row or column per
// index).
Tensor grouped_mm_cpu_impl(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype,
    const std::optional<Tensor>& a_index,
    const std::optional<Tensor>& b_index,
    const Tensor& a_shape,
    const Tensor& b_shape) {
  const auto layout = grouped_mm_layout(a_shape, b_shape);
  int64_t covered = 0;
  if (offs.has_value()) {
    const int64_t split = grouped_mm_split_size(a_shape, b_shape);
    grouped_mm_check_offsets_cpu(*offs, split, grouped_mm_split_name(layout));
    covered = offs->size(0) > 0 ? offs->const_data_ptr<int32_t>()[(offs->size(0) - 1) * offs->stride(0)] : 0;
  }

  const auto out_t = grouped_mm_out_dtype(mat_a, out_dtype);
  const auto size = grouped_mm_out_size(a_shape, b_shape, offs);
  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, out_t, mat_a.device()),
                                 mat_a.options().dtype(out_t));
  // Rows (2D x 3D) or columns (3D x 2D) that no group covers are zero, never
  // uninitialised memory.
  if (layout == GroupedMMLayout::k2d3d && covered < out.size(0)) {
    out.narrow(0, covered, out.size(0) - covered).zero_();
  } else if (layout == GroupedMMLayout::k3d2d && covered < out.size(1)) {
    out.narrow(1, covered, out.size(1) - covered).zero_();
  }
  if (out.numel() > 0) {
    grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, a_index, b_index, out);
  }
  return out;
}

} // namespace

Tensor grouped_mm_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);
  return grouped_mm_cpu_impl(mat_a, mat_b, offs, bias, out_dtype, std::nullopt, std::nullopt, mat_a, mat_b);
}

Tensor grouped_mm_gather_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const Tensor& offs,
    const std::optional<Tensor>& a_index,
    const std::optional<Tensor>& b_index,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  const auto [a_shape, b_shape] = grouped_mm_gather_check_inputs(mat_a, mat_b, offs, a_index, b_index, bias,
                                                                 out_dtype);
  std::optional<Tensor> a_idx, b_idx;
  if (a_index.has_value()) {
    a_idx = a_index->contiguous();
    grouped_mm_check_index_cpu(*a_idx, mat_a.size(grouped_mm_gather_dim(true, mat_a, mat_b)), "a_index");
  }
  if (b_index.has_value()) {
    b_idx = b_index->contiguous();
    grouped_mm_check_index_cpu(*b_idx, mat_b.size(0), "b_index");
  }
  return grouped_mm_cpu_impl(mat_a, mat_b, offs, bias, out_dtype, a_idx, b_idx, a_shape, b_shape);
}

} // namespace at::native

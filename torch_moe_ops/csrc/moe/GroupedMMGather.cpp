// CPU entry point of moe_ops::grouped_mm_gather: validate, allocate, run
// ATen's grouped mm kernel with the indices.

#include <moe/GroupedMMGather.h>
#include <moe/LargeOutputCache.h>

namespace at::native {

namespace {

// grouped_mm_empty_cpu's output, its storage from the large-output cache: an
// MoE layer's weight gradients (2D x 2D) and activations (2D x 3D) are freed
// and allocated again at the same sizes every training step.
Tensor grouped_mm_gather_empty(const Tensor& a_shape, const Tensor& b_shape, const Tensor& offs, ScalarType dtype) {
  const auto layout = grouped_mm_layout(a_shape, b_shape);
  grouped_mm_check_offsets_cpu(offs, grouped_mm_split_size(a_shape, b_shape), grouped_mm_split_name(layout));
  const auto size = grouped_mm_out_size(a_shape, b_shape, offs);
  Tensor out = torch_moe_ops::empty_strided_cached(size, grouped_mm_out_strides(size, dtype, kCPU), dtype);
  // Rows past offs[-1] belong to no group: zeros, never the memory's old bytes.
  const int64_t covered = offs.size(0) > 0 ? offs.const_data_ptr<int32_t>()[(offs.size(0) - 1) * offs.stride(0)] : 0;
  if (layout == GroupedMMLayout::k2d3d && covered < out.size(0)) {
    out.narrow(0, covered, out.size(0) - covered).zero_();
  }
  return out;
}

} // namespace

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
  Tensor out = grouped_mm_gather_empty(a_shape, b_shape, offs, grouped_mm_out_dtype(mat_a, out_dtype));
  if (out.numel() > 0) {
    grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, a_idx, b_idx, out);
  }
  return out;
}

} // namespace at::native

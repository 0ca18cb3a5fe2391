// CPU entry point of moe_ops::grouped_mm_gather: validate, allocate, run
// ATen's grouped mm kernel with the indices.

#include <moe/GroupedMMCached.h>
#include <moe/GroupedMMGather.h>

namespace at::native {

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
  // From the large-output cache: an MoE layer's weight gradients (2D x 2D) and
  // activations (2D x 3D) are allocated again at the same sizes every step.
  Tensor out = grouped_mm_empty_cached(a_shape, b_shape, offs, grouped_mm_out_dtype(mat_a, out_dtype));
  if (out.numel() > 0) {
    grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, a_idx, b_idx, out);
  }
  return out;
}

} // namespace at::native

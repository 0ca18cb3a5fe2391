// moe_ops::grouped_mm's CPU entry: grouped_mm_cpu's checks and kernel, the
// output from the large-output cache (GroupedMMCached.h).

#include <moe/GroupedMMCached.h>
#include <moe/LargeOutputCache.h>

namespace at::native {

Tensor grouped_mm_empty_cached(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    ScalarType out_dtype) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const int64_t covered = offs.has_value()
      ? grouped_mm_check_offsets_cpu(*offs, grouped_mm_split_size(mat_a, mat_b), grouped_mm_split_name(layout))
      : 0;
  const auto size = grouped_mm_out_size(mat_a, mat_b, offs);
  Tensor out = torch_moe_ops::empty_strided_cached(size, grouped_mm_out_strides(size, out_dtype, kCPU), out_dtype);
  // What no group covers is zero, never the bytes a reused block held.
  grouped_mm_zero_past_cpu(out, layout, covered);
  return out;
}

Tensor grouped_mm_cached_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);
  Tensor out = grouped_mm_empty_cached(mat_a, mat_b, offs, grouped_mm_out_dtype(mat_a, out_dtype));
  if (out.numel() > 0) {
    grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, std::nullopt, std::nullopt, out);
  }
  return out;
}

} // namespace at::native

// CPU entry point of scaled_grouped_mm_v2: check the stated recipe, run the
// kernel scaled_grouped_mm runs.

#include <ATen/native/MoEScaledGroupedMMv2.h>

namespace at::native {

Tensor scaled_grouped_mm_v2_cpu(
    const Tensor& mat_a, const Tensor& mat_b, c10::ArrayRef<Tensor> scale_a, c10::IntArrayRef recipe_a,
    c10::IntArrayRef swizzle_a, c10::ArrayRef<Tensor> scale_b, c10::IntArrayRef recipe_b, c10::IntArrayRef swizzle_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype,
    c10::IntArrayRef contraction_dim, bool use_fast_accum) {
  (void)use_fast_accum;  // always float32 accumulation on CPU
  const auto recipe = scaled_grouped_mm_v2_check_inputs(mat_a, mat_b, scale_a, recipe_a, swizzle_a, scale_b, recipe_b,
                                                        swizzle_b, offs, bias, out_dtype, contraction_dim);
  return scaled_grouped_mm_cpu_run(mat_a, mat_b, scale_a[0], scale_b[0], offs, bias, out_dtype, recipe);
}

} // namespace at::native

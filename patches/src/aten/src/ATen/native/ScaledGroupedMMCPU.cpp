// CPU kernel of _scaled_grouped_mm_v2. Structured: its meta function
// (TORCH_META_FUNC(_scaled_grouped_mm_v2)) has checked the operands, as it
// does for CUDA, and allocated out. Here the recipes stated by ScalingType /
// SwizzleType are checked pair by pair (MoEScaledGroupedMM.h) and run by the
// CPU scaled grouped GEMM that _scaled_grouped_mm's CPU kernel runs.

#include <ATen/native/MoEScaledGroupedMMv2.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_grouped_mm_v2_native.h>

#include <optional>
#include <vector>

namespace at::native {

TORCH_IMPL_FUNC(scaled_grouped_mm_v2_cpu)(
    const Tensor& self, const Tensor& mat2, const ITensorListRef& scale_a, IntArrayRef recipe_a,
    IntArrayRef swizzle_a, const ITensorListRef& scale_b, IntArrayRef recipe_b, IntArrayRef swizzle_b,
    OptionalTensorRef offs, OptionalTensorRef bias, std::optional<ScalarType> out_dtype, IntArrayRef contraction_dim,
    bool use_fast_accum, const Tensor& out) {
  std::vector<Tensor> sa, sb;
  for (const Tensor& t : scale_a) {
    sa.push_back(t);
  }
  for (const Tensor& t : scale_b) {
    sb.push_back(t);
  }
  const auto optional = [](OptionalTensorRef t) { return t.has_value() ? std::optional<Tensor>(*t) : std::nullopt; };
  const Tensor result = scaled_grouped_mm_v2_cpu(self, mat2, sa, recipe_a, swizzle_a, sb, recipe_b, swizzle_b,
      optional(offs), optional(bias), out_dtype, contraction_dim, use_fast_accum);
  // The kernel writes a fresh contiguous tensor; out has the meta function's
  // strides (rows padded to 16 bytes, as the CUDA kernels want them).
  out.copy_(result);
}

} // namespace at::native

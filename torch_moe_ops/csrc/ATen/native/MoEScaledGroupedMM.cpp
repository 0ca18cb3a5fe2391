// CPU entry point of scaled_grouped_mm: validate, allocate, run the kernel.

#include <ATen/native/MoEScaledGroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/native/MoEQuantize.h>
#include <ATen/native/MoESwizzleMXScale.h>

#include <string>

namespace at::native {

DEFINE_DISPATCH(scaled_grouped_mm_stub);
DEFINE_DISPATCH(grouped_mm_float8_weights_stub);

Tensor scaled_grouped_mm_cpu_run(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype,
    ScaledGroupedMMRecipe recipe) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  if (offs.has_value()) {
    const int64_t split = grouped_mm_split_size(mat_a, mat_b);
    const int32_t* o = offs->const_data_ptr<int32_t>();
    int64_t prev = 0;
    for (int64_t g = 0; g < offs->size(0); ++g) {
      const int64_t end = o[g * offs->stride(0)];
      TORCH_CHECK_VALUE(end >= prev && end <= split,
          "scaled_grouped_mm: offs must be non-decreasing in [0, ", grouped_mm_split_name(layout), "=", split,
          "], got offs[", g, "]=", end,
          g == 0 ? std::string() : " after offs[" + std::to_string(g - 1) + "]=" + std::to_string(prev));
      TORCH_CHECK_VALUE(recipe != ScaledGroupedMMRecipe::kMX || layout != GroupedMMLayout::k2d2d || end % 32 == 0 ||
                            end == split,
          "scaled_grouped_mm: with mx scales every group of K must hold whole 32-element blocks: offs[g] must be "
          "a multiple of 32 or K=", split, ", got offs[", g, "]=", end);
      prev = end;
    }
  }
  const auto size = grouped_mm_out_size(mat_a, mat_b, offs);
  // Zeroed: rows (2D x 3D) or columns (3D x 2D) that no group covers stay 0.
  Tensor out = at::empty(size, mat_a.options().dtype(scaled_grouped_mm_out_dtype(out_dtype))).zero_();
  if (out.numel() > 0) {
    const int64_t s = (mat_a.size(-1) + 31) / 32;
    const bool mx = recipe == ScaledGroupedMMRecipe::kMX;
    Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
    if (mx) {
      const int64_t dim = layout == GroupedMMLayout::k2d2d ? 1 : 0;
      if (mat_a.dim() == 2) {
        sa = unswizzle_mx_scale(scale_a, mat_a.size(0), s, *offs, dim);
      } else if (scale_a.dim() == 2) {
        sa = fp8_unswizzle_scale(scale_a, scale_a.size(0), mat_a.size(1), s).contiguous();
      }
      if (mat_b.dim() == 2) {
        sb = unswizzle_mx_scale(scale_b, mat_b.size(1), s, *offs, dim);
      } else if (scale_b.dim() == 2) {
        sb = fp8_unswizzle_scale(scale_b, scale_b.size(0), mat_b.size(2), s).contiguous();
      }
    }
    scaled_grouped_mm_stub(kCPU, mat_a, mat_b, sa, sb, offs, bias, recipe, out);
  }
  return out;
}

Tensor scaled_grouped_mm_cpu(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, const std::optional<Tensor>& scale_result,
    std::optional<ScalarType> out_dtype, bool use_fast_accum) {
  (void)use_fast_accum;  // always float32 accumulation on CPU
  const auto recipe =
      scaled_grouped_mm_check_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype);
  return scaled_grouped_mm_cpu_run(mat_a, mat_b, scale_a, scale_b, offs, bias, out_dtype, recipe);
}

} // namespace at::native

// CPU entry points of quantize_fp8 and dequantize_fp8: validate, allocate,
// run the kernels; and the unswizzling of their swizzled MX scales.

#include <ATen/native/MoEQuantize.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace at::native {

DEFINE_DISPATCH(quantize_fp8_stub);
DEFINE_DISPATCH(dequantize_fp8_stub);

std::tuple<Tensor, Tensor> quantize_fp8_cpu(
    const Tensor& x, c10::string_view recipe_name, std::optional<ScalarType> float8_dtype,
    const std::optional<Tensor>& offs, bool swizzle) {
  quantize_fp8_check_inputs(x, recipe_name, float8_dtype, offs, swizzle);
  const auto recipe = fp8_recipe("quantize_fp8", recipe_name);
  if (offs.has_value()) {
    fp8_check_offsets_cpu("quantize_fp8", *offs, x.size(-1), recipe);
  }
  Tensor data = at::empty(x.sizes(), x.options().dtype(float8_dtype.value_or(kFloat8_e4m3fn)));
  const auto scale_size = fp8_scale_size(x.sizes(), recipe, offs.has_value() ? offs->size(0) : -1, swizzle);
  Tensor scale = at::empty(scale_size, x.options().dtype(fp8_scale_dtype(recipe)));
  // The kernel reads rows; a transposed operand (B^T of a weight) is copied
  // once here, which costs less than the strided reads would.
  quantize_fp8_stub(kCPU, x.contiguous(), recipe, offs, swizzle, data, scale);
  return {data, scale};
}

Tensor dequantize_fp8_cpu(
    const Tensor& data, const Tensor& scale, c10::string_view recipe_name, std::optional<ScalarType> out_dtype,
    const std::optional<Tensor>& offs, bool swizzle) {
  dequantize_fp8_check_inputs(data, scale, recipe_name, out_dtype, offs, swizzle);
  const auto recipe = fp8_recipe("dequantize_fp8", recipe_name);
  if (offs.has_value()) {
    fp8_check_offsets_cpu("dequantize_fp8", *offs, data.size(-1), recipe);
  }
  Tensor out = at::empty(data.sizes(), data.options().dtype(dequantize_fp8_out_dtype(out_dtype)));
  dequantize_fp8_stub(kCPU, data.contiguous(), scale.contiguous(), recipe, offs, swizzle, out);
  return out;
}

Tensor fp8_unswizzle_scale(const Tensor& scale, int64_t nb, int64_t rows, int64_t s) {
  const int64_t rp = fp8_round_up(rows, 128), sp = fp8_round_up(s, 4);
  // [t][u][j][i][c] -> row 128 t + 32 i + j, column 4 u + c (fp8_swizzled_offset)
  return scale.reshape({nb, rp / 128, sp / 4, 32, 4, 4}).permute({0, 1, 4, 3, 2, 5}).reshape({nb, rp, sp})
      .narrow(1, 0, rows).narrow(2, 0, s);
}

} // namespace at::native

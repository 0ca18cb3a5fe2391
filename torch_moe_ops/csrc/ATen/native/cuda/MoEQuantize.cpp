// CUDA entry points of quantize_fp8 and dequantize_fp8 (the recipes and their
// numerics are specified in ATen/native/MoEQuantize.h): the device-generic
// fallbacks of native/MoEQuantize.cpp, with offs validated on the device
// (_assert_async: no host sync).
//
// Written as ATen operations for one reason: they can then be proven on a
// machine without a GPU. test_fp8 runs these entries on CPU tensors (through
// the dispatcher's CUDA slot) and compares them with the CPU kernel bit for
// bit. A fused kernel comes with a GPU to measure it on.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEQuantize.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>

#include <string>

namespace at::native {
namespace {

void fp8_check_offsets_async(const char* op, const Tensor& offs, int64_t cols, Fp8Recipe recipe) {
  if (offs.numel() == 0) return;
  const Tensor o = offs.to(kLong);
  Tensor ok = grouped_mm_offs_ok(o, cols);
  if (recipe == Fp8Recipe::kMX) {
    ok = ok.logical_and(o.remainder(32).eq(0).logical_or(o.eq(cols)).all());
  }
  at::_assert_async(ok, std::string(op) + ": offs must be non-decreasing in [0, C=" + std::to_string(cols) + "]" +
                            (recipe == Fp8Recipe::kMX ? " and multiples of 32 (or C) with recipe 'mx'" : ""));
}

} // namespace

std::tuple<Tensor, Tensor> quantize_fp8_cuda(
    const Tensor& x, c10::string_view recipe_name, std::optional<ScalarType> float8_dtype,
    const std::optional<Tensor>& offs, bool swizzle) {
  quantize_fp8_check_inputs(x, recipe_name, float8_dtype, offs, swizzle);
  const auto recipe = fp8_recipe("quantize_fp8", recipe_name);
  if (offs.has_value()) {
    fp8_check_offsets_async("quantize_fp8", *offs, x.size(-1), recipe);
  }
  return quantize_fp8_fallback(x, recipe, float8_dtype.value_or(kFloat8_e4m3fn), offs, swizzle);
}

Tensor dequantize_fp8_cuda(
    const Tensor& data, const Tensor& scale, c10::string_view recipe_name, std::optional<ScalarType> out_dtype,
    const std::optional<Tensor>& offs, bool swizzle) {
  dequantize_fp8_check_inputs(data, scale, recipe_name, out_dtype, offs, swizzle);
  const auto recipe = fp8_recipe("dequantize_fp8", recipe_name);
  if (offs.has_value()) {
    fp8_check_offsets_async("dequantize_fp8", *offs, data.size(-1), recipe);
  }
  return dequantize_fp8_fallback(data, scale, recipe, dequantize_fp8_out_dtype(out_dtype), offs, swizzle);
}

} // namespace at::native

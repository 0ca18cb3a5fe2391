#pragma once

// Shared validation and output allocation for the CPU kernel of
// _scaled_grouped_mm (upstream's schema and semantics):
//
//   out = sum_k dequant(mat_a)[m, k] * dequant(mat_b)[k, n] (+ bias), per group
//
// in the four layouts of grouped_mm (GroupedMM.h), with float8_e4m3fn or
// float8_e5m2 operands and out_dtype bfloat16 (default, as upstream) or
// float32. Its Python meta function (the CPU branch) restates these checks one
// for one, with the same messages; keep the two in step.
//
// Scales (the dequantisation scales _quantize_fp8 returns):
//   rowwise, float32 (upstream's shapes):
//     2D x 3D  scale_a (M,)      scale_b (G, N)
//     3D x 3D  scale_a (G, M)    scale_b (G, N)
//     3D x 2D  scale_a (G, M)    scale_b (N,)
//     2D x 2D  scale_a (G * M,)  scale_b (G * N,)   (one scale per row and group,
//              group-major: quantize_fp8(..., "rowwise", offs=offs) flattened)
//   mx, float8_e8m0fnu, 1x32 blocks along K (2D x 3D, 3D x 3D, 2D x 2D), as
//     upstream's CUDA MX kernels take them, S = ceil(K/32):
//     3-D operands: the plain (G, rows, S) grid or its swizzled form,
//     (G, round_up(rows, 128) * round_up(S, 4)) (quantize_fp8(...,
//     swizzle=True); for mat_b, of mat_b.transpose(-2, -1), rows = N);
//     2-D operands: blocked per group (swizzle_mx_scale, MoESwizzleMXScale.h):
//     mat_a of 2D x 3D with groups of rows (dim 0), mat_a and mat_b^T of
//     2D x 2D with groups along K (dim 1), where every offs must be a
//     multiple of 32 (or K) so that no block straddles two groups. Any 2-D
//     shape with at least rows rows that holds the groups' bytes is taken,
//     as upstream does, except the plain grid's (rows, S), which would be
//     read as blocked bytes it is not. The entries unswizzle the scales (1/32 of the
//     operand) before the kernel.
//   blockwise, float32, DeepSeek-V3's recipe (2D x 3D and 3D x 3D): 1x128
//     blocks of mat_a, scale_a (M, ceil(K/128)) or (G, M, ceil(K/128)), and
//     128x128 blocks of the (N, K) weight, scale_b (G, ceil(N/128), ceil(K/128))
//     (quantize_fp8(mat_b.transpose(-2, -1), "blockwise_128x128")). Told from
//     rowwise by the rank of scale_a (one more dimension than rowwise's).
// scale_result must be None and use_fast_accum is ignored: the CPU kernel
// always accumulates in float32. bias is (G, N_out) in float32 or out_dtype.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEQuantize.h>

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

namespace at::native {

enum class ScaledGroupedMMRecipe { kRowwise, kMX, kBlockwise };

inline bool scaled_grouped_mm_fp8(ScalarType t) {
  return t == kFloat8_e4m3fn || t == kFloat8_e5m2;
}

inline ScalarType scaled_grouped_mm_out_dtype(std::optional<ScalarType> out_dtype) {
  const auto out = out_dtype.value_or(kBFloat16);
  TORCH_CHECK_VALUE(out == kBFloat16 || out == kFloat,
      "scaled_grouped_mm: out_dtype must be bfloat16 or float32, got ", out);
  return out;
}

inline void scaled_grouped_mm_check_scale(
    const char* name, const Tensor& scale, c10::IntArrayRef want, const char* recipe) {
  TORCH_CHECK_VALUE(scale.sizes() == want,
      "scaled_grouped_mm: ", name, " must have shape ", want, " for ", recipe, " scaling of these operands, got ",
      scale.sizes());
}

// The checks every recipe shares (operands, layout, out_dtype); returns the
// output dtype.
inline ScalarType scaled_grouped_mm_check_operands(
    const char* op, const Tensor& mat_a, const Tensor& mat_b, std::optional<ScalarType> out_dtype) {
  grouped_mm_check_dims(op, mat_a, mat_b);
  TORCH_CHECK_VALUE(scaled_grouped_mm_fp8(mat_a.scalar_type()),
      op, ": mat_a must be Float8_e4m3fn or Float8_e5m2, got ", mat_a.scalar_type());
  TORCH_CHECK_VALUE(scaled_grouped_mm_fp8(mat_b.scalar_type()),
      op, ": mat_b must be Float8_e4m3fn or Float8_e5m2, got ", mat_b.scalar_type());
  grouped_mm_check_contraction(op, mat_a, mat_b);
  return scaled_grouped_mm_out_dtype(out_dtype);
}

// The scale shapes of each recipe (the header comment), once the recipe is
// known: from the scales' dtypes and ranks in _scaled_grouped_mm, from
// recipe_a / recipe_b / swizzle_a / swizzle_b in _scaled_grouped_mm_v2.
inline void scaled_grouped_mm_check_rowwise_scales(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b, int64_t groups) {
  const int64_t m = mat_a.size(-2), n = mat_b.size(-1);
  const char* what = "rowwise";
  switch (grouped_mm_layout(mat_a, mat_b)) {
    case GroupedMMLayout::k2d3d:
      scaled_grouped_mm_check_scale("scale_a", scale_a, {m}, what);
      scaled_grouped_mm_check_scale("scale_b", scale_b, {groups, n}, what);
      break;
    case GroupedMMLayout::k3d3d:
      scaled_grouped_mm_check_scale("scale_a", scale_a, {groups, m}, what);
      scaled_grouped_mm_check_scale("scale_b", scale_b, {groups, n}, what);
      break;
    case GroupedMMLayout::k3d2d:
      scaled_grouped_mm_check_scale("scale_a", scale_a, {groups, m}, what);
      scaled_grouped_mm_check_scale("scale_b", scale_b, {n}, what);
      break;
    case GroupedMMLayout::k2d2d:
      scaled_grouped_mm_check_scale("scale_a", scale_a, {groups * m}, what);
      scaled_grouped_mm_check_scale("scale_b", scale_b, {groups * n}, what);
      break;
  }
}

// Blockwise: 2D x 3D and 3D x 3D only (the caller checks the layout).
inline void scaled_grouped_mm_check_blockwise_scales(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b, int64_t groups) {
  const int64_t m = mat_a.size(-2), n = mat_b.size(-1), k = mat_a.size(-1);
  const int64_t kb = (k + 127) / 128, nb = (n + 127) / 128;
  const char* what = "blockwise (1x128 x 128x128)";
  if (mat_a.dim() == 2) {
    scaled_grouped_mm_check_scale("scale_a", scale_a, {m, kb}, what);
  } else {
    scaled_grouped_mm_check_scale("scale_a", scale_a, {groups, m, kb}, what);
  }
  scaled_grouped_mm_check_scale("scale_b", scale_b, {groups, nb, kb}, what);
}

// 2-D operands: the per-group blocked layout (swizzle_mx_scale), whose byte
// count depends on offs: here its rank and rows, as upstream checks; the
// bytes against offs's values where those are read.
inline void scaled_grouped_mm_check_mx_blocked_scale(
    const char* name, const Tensor& scale, const char* operand, int64_t rows, int64_t s, int64_t dim) {
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) >= rows,
      "scaled_grouped_mm: ", name, " must be the mx scale of ", operand, " blocked per group "
      "(swizzle_mx_scale(scale, offs, dim=", dim, ")): 2-D with at least ", rows, " rows, got ", scale.sizes());
  // Upstream takes any 2-D shape that holds the blocked bytes, so a plain
  // grid, always (rows, S), can pass for a blocked one and be read wrongly:
  // that shape is refused, since its bytes could be either.
  TORCH_CHECK_VALUE(!(scale.size(0) == rows && scale.size(1) == s),
      "scaled_grouped_mm: ", name, " has the shape of the plain mx scale grid of ", operand, ", [", rows, ", ", s,
      "]; 2-D operands take their scales blocked per group (swizzle_mx_scale(scale, offs, dim=", dim,
      ")), which at this shape cannot be told from the plain grid");
}

// A 3-D operand's mx scale: the plain (G, rows, S) grid or, swizzled, the
// (G, round_up(rows, 128) * round_up(S, 4)) one.
inline void scaled_grouped_mm_check_mx_3d_scale(
    const char* name, const Tensor& scale, int64_t groups, int64_t rows, int64_t s, bool swizzled) {
  if (swizzled) {
    scaled_grouped_mm_check_scale(name, scale, {groups, fp8_round_up(rows, 128) * fp8_round_up(s, 4)},
        "mx (swizzled)");
  } else {
    scaled_grouped_mm_check_scale(name, scale, {groups, rows, s}, "mx");
  }
}

inline void scaled_grouped_mm_check_mx_scales(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b, int64_t groups,
    bool swizzled_a, bool swizzled_b) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  TORCH_CHECK_VALUE(layout != GroupedMMLayout::k3d2d,
      "scaled_grouped_mm: mx scaling supports 2D x 3D, 3D x 3D and 2D x 2D operands, got mat_a ", mat_a.sizes(),
      " and mat_b ", mat_b.sizes());
  const int64_t m = mat_a.size(-2), n = mat_b.size(-1), s = (mat_a.size(-1) + 31) / 32;
  if (layout == GroupedMMLayout::k2d2d) {  // groups along K: offs must fall on 32-blocks (checked on values)
    scaled_grouped_mm_check_mx_blocked_scale("scale_a", scale_a, "mat_a", m, s, 1);
    scaled_grouped_mm_check_mx_blocked_scale("scale_b", scale_b, "mat_b^T", n, s, 1);
    return;
  }
  if (layout == GroupedMMLayout::k2d3d) {
    scaled_grouped_mm_check_mx_blocked_scale("scale_a", scale_a, "mat_a", m, s, 0);
  } else {
    scaled_grouped_mm_check_mx_3d_scale("scale_a", scale_a, groups, m, s, swizzled_a);
  }
  scaled_grouped_mm_check_mx_3d_scale("scale_b", scale_b, groups, n, s, swizzled_b);
}

// bias and the scales' device, after the recipe's checks.
inline void scaled_grouped_mm_check_bias_and_devices(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, int64_t groups, ScalarType out_t) {
  TORCH_CHECK_VALUE(scale_a.device() == mat_a.device() && scale_b.device() == mat_a.device(),
      "scaled_grouped_mm: scale_a and scale_b must be on the device of mat_a (", mat_a.device(), "), got ",
      scale_a.device(), " and ", scale_b.device());
  if (bias.has_value()) {
    const int64_t n_out = grouped_mm_out_size(mat_a, mat_b, offs).back();
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == groups && bias->size(1) == n_out,
        "scaled_grouped_mm: bias must have shape (G, N) = (", groups, ", ", n_out, "), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == kFloat || bias->scalar_type() == out_t,
        "scaled_grouped_mm: bias must be float32 or the output dtype (", out_t, "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == mat_a.device(),
        "scaled_grouped_mm: bias must be on the device of mat_a (", mat_a.device(), "), got ", bias->device());
  }
}

// _scaled_grouped_mm: the recipe told from the scales' dtypes and ranks.
inline ScaledGroupedMMRecipe scaled_grouped_mm_check_inputs(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const Tensor& scale_a,
    const Tensor& scale_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    const std::optional<Tensor>& scale_result,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_dims("scaled_grouped_mm", mat_a, mat_b);
  TORCH_CHECK_VALUE(scaled_grouped_mm_fp8(mat_a.scalar_type()),
      "scaled_grouped_mm: mat_a must be Float8_e4m3fn or Float8_e5m2, got ", mat_a.scalar_type());
  TORCH_CHECK_VALUE(scaled_grouped_mm_fp8(mat_b.scalar_type()),
      "scaled_grouped_mm: mat_b must be Float8_e4m3fn or Float8_e5m2, got ", mat_b.scalar_type());
  grouped_mm_check_contraction("scaled_grouped_mm", mat_a, mat_b);
  TORCH_CHECK_VALUE(!scale_result.has_value(),
      "scaled_grouped_mm: scale_result is not supported, got a tensor of sizes ", scale_result->sizes());
  const auto out_t = scaled_grouped_mm_out_dtype(out_dtype);

  grouped_mm_check_layout("scaled_grouped_mm", mat_a, mat_b, offs);
  const auto layout = grouped_mm_layout(mat_a, mat_b);

  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);
  ScaledGroupedMMRecipe recipe;
  const bool k_fixed = layout == GroupedMMLayout::k2d3d || layout == GroupedMMLayout::k3d3d;
  if (scale_a.scalar_type() == kFloat && scale_b.scalar_type() == kFloat && k_fixed &&
      scale_a.dim() == mat_a.dim()) {
    recipe = ScaledGroupedMMRecipe::kBlockwise;
    scaled_grouped_mm_check_blockwise_scales(mat_a, mat_b, scale_a, scale_b, groups);
  } else if (scale_a.scalar_type() == kFloat && scale_b.scalar_type() == kFloat) {
    recipe = ScaledGroupedMMRecipe::kRowwise;
    scaled_grouped_mm_check_rowwise_scales(mat_a, mat_b, scale_a, scale_b, groups);
  } else {
    TORCH_CHECK_VALUE(scale_a.scalar_type() == kFloat8_e8m0fnu && scale_b.scalar_type() == kFloat8_e8m0fnu,
        "scaled_grouped_mm: scale_a and scale_b must both be float32 (rowwise, blockwise) or both Float8_e8m0fnu "
        "(mx), got ",
        scale_a.scalar_type(), " and ", scale_b.scalar_type());
    recipe = ScaledGroupedMMRecipe::kMX;
    // 3-D operands: the rank of the scale tells plain from swizzled.
    scaled_grouped_mm_check_mx_scales(mat_a, mat_b, scale_a, scale_b, groups, scale_a.dim() == 2,
                                      scale_b.dim() == 2);
  }
  scaled_grouped_mm_check_bias_and_devices(mat_a, mat_b, scale_a, scale_b, offs, bias, groups, out_t);
  return recipe;
}

// CPU kernel (native/cpu/MoEScaledGroupedMMKernel.cpp): writes every element
// of out, a fresh contiguous tensor.
using scaled_grouped_mm_fn = void (*)(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, ScaledGroupedMMRecipe recipe,
    const Tensor& out);
DECLARE_DISPATCH(scaled_grouped_mm_fn, scaled_grouped_mm_stub);

// The rowwise recipe's 2D x 3D and 3D x 3D products on grouped_mm's CPU
// kernel (cpu/GroupedMMKernel.cpp): out = mat_a (bfloat16, the float8 tokens
// converted) x mat_b (the float8 weights as they are, any strides), scaled
// by scale_a's rows and scale_b's columns, plus bias, rounded once to out's
// dtype; the weights are decoded into the bfloat16 engine's packed blocks,
// the scales applied as it stores its accumulators. scale_a / scale_b /
// bias contiguous float32; out contiguous, its rows past offs[-1] left as
// they are. Returns false, having written nothing, where that engine does
// not run bfloat16 as vdpbf16ps K pairs (no AVX512_BF16; AMX, where brgemm
// does; the builds below AVX512): the caller converts the weights itself.
using grouped_mm_float8_weights_fn = bool (*)(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, const Tensor& out);
DECLARE_DISPATCH(grouped_mm_float8_weights_fn, grouped_mm_float8_weights_stub);

Tensor scaled_grouped_mm_cpu(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, const std::optional<Tensor>& scale_result,
    std::optional<ScalarType> out_dtype, bool use_fast_accum);

// The CPU kernel once the inputs are checked and the recipe known, for both
// entries (_scaled_grouped_mm, _scaled_grouped_mm_v2): the same kernel on the
// same arguments, so the two agree bit for bit wherever both take a call.
Tensor scaled_grouped_mm_cpu_run(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype,
    ScaledGroupedMMRecipe recipe);

} // namespace at::native

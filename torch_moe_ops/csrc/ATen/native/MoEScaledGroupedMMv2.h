#pragma once

// _scaled_grouped_mm_v2 on CPU: the recipe stated by at::blas::ScalingType and
// SwizzleType values (ATen/BlasBackend.h), checked pair by pair, then the
// scale shapes of that recipe and the rest checked as _scaled_grouped_mm's
// (MoEScaledGroupedMM.h, the checks both entries share) and the same kernel
// run. Its Python meta function (the CPU branch) restates these checks one for
// one, with the same messages; keep the two in step.

#include <ATen/native/MoEScaledGroupedMM.h>

#include <ATen/BlasBackend.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>

namespace at::native {

// _scaled_grouped_mm_v2: the recipe is stated, by at::blas::ScalingType and
// SwizzleType values (ATen/BlasBackend.h), never inferred. The CPU kernel
// takes one scale per operand in exactly these (recipe_a, recipe_b) pairs:
//   RowWise x RowWise                   rowwise, float32 scales, no swizzle;
//   BlockWise1x32 x BlockWise1x32       mx, Float8_e8m0fnu scales: 2-D
//       operands' scales blocked per group, so SWIZZLE_32_4_4; 3-D operands'
//       NO_SWIZZLE (the plain grid) or SWIZZLE_32_4_4;
//   BlockWise1x128 x BlockWise128x128   DeepSeek-V3 blockwise, float32, no
//       swizzle, 2D x 3D and 3D x 3D.
// TensorWise, BlockWise1x16 (NVFP4) and every other pairing are refused by
// value. An empty swizzle list means NO_SWIZZLE (F.scaled_grouped_mm passes
// [] for None); contraction_dim is [] or (-1, -2), the only contraction the
// four layouts have.
inline const char* scaled_grouped_mm_v2_recipe_name(int64_t v) {
  switch (v) {
    case static_cast<int64_t>(blas::ScalingType::TensorWise): return "TensorWise";
    case static_cast<int64_t>(blas::ScalingType::RowWise): return "RowWise";
    case static_cast<int64_t>(blas::ScalingType::BlockWise1x16): return "BlockWise1x16";
    case static_cast<int64_t>(blas::ScalingType::BlockWise1x32): return "BlockWise1x32";
    case static_cast<int64_t>(blas::ScalingType::BlockWise1x128): return "BlockWise1x128";
    case static_cast<int64_t>(blas::ScalingType::BlockWise128x128): return "BlockWise128x128";
    default: return nullptr;
  }
}

inline blas::ScalingType scaled_grouped_mm_v2_recipe(const char* name, c10::IntArrayRef recipe) {
  TORCH_CHECK_VALUE(recipe.size() == 1,
      "scaled_grouped_mm_v2: ", name, " must hold one ScalingType (one scale per operand on CPU), got ", name,
      "=", recipe);
  TORCH_CHECK_VALUE(scaled_grouped_mm_v2_recipe_name(recipe[0]) != nullptr,
      "scaled_grouped_mm_v2: ", name, "=", recipe, " is not a ScalingType (0 TensorWise .. 5 BlockWise128x128)");
  return static_cast<blas::ScalingType>(recipe[0]);
}

// Whether the scale is swizzled (SWIZZLE_32_4_4).
inline bool scaled_grouped_mm_v2_swizzle(const char* name, c10::IntArrayRef swizzle) {
  TORCH_CHECK_VALUE(swizzle.size() <= 1,
      "scaled_grouped_mm_v2: ", name, " must hold at most one SwizzleType (one scale per operand on CPU), got ",
      name, "=", swizzle);
  if (swizzle.empty()) {
    return false;
  }
  TORCH_CHECK_VALUE(swizzle[0] == static_cast<int64_t>(blas::SwizzleType::NO_SWIZZLE) ||
                        swizzle[0] == static_cast<int64_t>(blas::SwizzleType::SWIZZLE_32_4_4),
      "scaled_grouped_mm_v2: ", name, "=", swizzle, " is not a SwizzleType (0 NO_SWIZZLE, 1 SWIZZLE_32_4_4)");
  return swizzle[0] == static_cast<int64_t>(blas::SwizzleType::SWIZZLE_32_4_4);
}

inline void scaled_grouped_mm_v2_check_scale_dtype(
    const char* name, const Tensor& scale, ScalarType want, const char* recipe) {
  TORCH_CHECK_VALUE(scale.scalar_type() == want,
      "scaled_grouped_mm_v2: ", name, " must be ", want, " for ", recipe, ", got ", scale.scalar_type());
}

inline ScaledGroupedMMRecipe scaled_grouped_mm_v2_check_inputs(
    const Tensor& mat_a, const Tensor& mat_b,
    c10::ArrayRef<Tensor> scale_a, c10::IntArrayRef recipe_a, c10::IntArrayRef swizzle_a,
    c10::ArrayRef<Tensor> scale_b, c10::IntArrayRef recipe_b, c10::IntArrayRef swizzle_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype,
    c10::IntArrayRef contraction_dim) {
  const auto out_t = scaled_grouped_mm_check_operands("scaled_grouped_mm_v2", mat_a, mat_b, out_dtype);
  const auto ra = scaled_grouped_mm_v2_recipe("recipe_a", recipe_a);
  const auto rb = scaled_grouped_mm_v2_recipe("recipe_b", recipe_b);
  const bool swa = scaled_grouped_mm_v2_swizzle("swizzle_a", swizzle_a);
  const bool swb = scaled_grouped_mm_v2_swizzle("swizzle_b", swizzle_b);
  TORCH_CHECK_VALUE(scale_a.size() == 1,
      "scaled_grouped_mm_v2: scale_a must hold one tensor for recipe_a=", recipe_a, " (",
      scaled_grouped_mm_v2_recipe_name(recipe_a[0]), "), got ", scale_a.size());
  TORCH_CHECK_VALUE(scale_b.size() == 1,
      "scaled_grouped_mm_v2: scale_b must hold one tensor for recipe_b=", recipe_b, " (",
      scaled_grouped_mm_v2_recipe_name(recipe_b[0]), "), got ", scale_b.size());
  if (!contraction_dim.empty()) {
    const bool k_last = contraction_dim.size() == 2 &&
        (contraction_dim[0] == -1 || contraction_dim[0] == mat_a.dim() - 1) &&
        (contraction_dim[1] == -2 || contraction_dim[1] == mat_b.dim() - 2);
    TORCH_CHECK_VALUE(k_last,
        "scaled_grouped_mm_v2: contraction_dim must be [] or [-1, -2] (K last in mat_a, first in mat_b), got "
        "contraction_dim=", contraction_dim);
  }
  grouped_mm_check_layout("scaled_grouped_mm_v2", mat_a, mat_b, offs);
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);
  const Tensor& sa = scale_a[0];
  const Tensor& sb = scale_b[0];
  using blas::ScalingType;
  ScaledGroupedMMRecipe recipe;
  const auto refuse_swizzle = [&](const char* recipe_name) {
    TORCH_CHECK_VALUE(!swa && !swb,
        "scaled_grouped_mm_v2: ", recipe_name, " scales are never swizzled: swizzle_a and swizzle_b must be [] or "
        "[0] (NO_SWIZZLE), got swizzle_a=", swizzle_a, " and swizzle_b=", swizzle_b);
  };
  if (ra == ScalingType::RowWise && rb == ScalingType::RowWise) {
    recipe = ScaledGroupedMMRecipe::kRowwise;
    refuse_swizzle("RowWise");
    scaled_grouped_mm_v2_check_scale_dtype("scale_a", sa, kFloat, "recipe_a=[1] (RowWise)");
    scaled_grouped_mm_v2_check_scale_dtype("scale_b", sb, kFloat, "recipe_b=[1] (RowWise)");
    scaled_grouped_mm_check_rowwise_scales(mat_a, mat_b, sa, sb, groups);
  } else if (ra == ScalingType::BlockWise1x32 && rb == ScalingType::BlockWise1x32) {
    recipe = ScaledGroupedMMRecipe::kMX;
    scaled_grouped_mm_v2_check_scale_dtype("scale_a", sa, kFloat8_e8m0fnu, "recipe_a=[3] (BlockWise1x32)");
    scaled_grouped_mm_v2_check_scale_dtype("scale_b", sb, kFloat8_e8m0fnu, "recipe_b=[3] (BlockWise1x32)");
    TORCH_CHECK_VALUE(layout != GroupedMMLayout::k3d2d,
        "scaled_grouped_mm_v2: recipe_a=[3] x recipe_b=[3] (BlockWise1x32, MXFP8) supports 2D x 3D, 3D x 3D and "
        "2D x 2D operands, got mat_a ", mat_a.sizes(), " and mat_b ", mat_b.sizes());
    // A 2-D operand's scale is blocked per group: the 32_4_4 swizzle, group by group.
    TORCH_CHECK_VALUE(mat_a.dim() == 3 || swa,
        "scaled_grouped_mm_v2: recipe_a=[3] (BlockWise1x32) of a 2-D mat_a takes its scale blocked per group "
        "(swizzle_mx_scale): swizzle_a must be [1] (SWIZZLE_32_4_4), got swizzle_a=", swizzle_a);
    TORCH_CHECK_VALUE(mat_b.dim() == 3 || swb,
        "scaled_grouped_mm_v2: recipe_b=[3] (BlockWise1x32) of a 2-D mat_b takes its scale blocked per group "
        "(swizzle_mx_scale): swizzle_b must be [1] (SWIZZLE_32_4_4), got swizzle_b=", swizzle_b);
    scaled_grouped_mm_check_mx_scales(mat_a, mat_b, sa, sb, groups, swa, swb);
  } else if (ra == ScalingType::BlockWise1x128 && rb == ScalingType::BlockWise128x128) {
    recipe = ScaledGroupedMMRecipe::kBlockwise;
    refuse_swizzle("BlockWise1x128 x BlockWise128x128");
    TORCH_CHECK_VALUE(layout == GroupedMMLayout::k2d3d || layout == GroupedMMLayout::k3d3d,
        "scaled_grouped_mm_v2: recipe_a=[4] (BlockWise1x128) x recipe_b=[5] (BlockWise128x128) supports 2D x 3D "
        "and 3D x 3D operands, got mat_a ", mat_a.sizes(), " and mat_b ", mat_b.sizes());
    scaled_grouped_mm_v2_check_scale_dtype("scale_a", sa, kFloat, "recipe_a=[4] (BlockWise1x128)");
    scaled_grouped_mm_v2_check_scale_dtype("scale_b", sb, kFloat, "recipe_b=[5] (BlockWise128x128)");
    scaled_grouped_mm_check_blockwise_scales(mat_a, mat_b, sa, sb, groups);
  } else {
    TORCH_CHECK_VALUE(false,
        "scaled_grouped_mm_v2: recipe_a=", recipe_a, " (", scaled_grouped_mm_v2_recipe_name(recipe_a[0]),
        ") x recipe_b=", recipe_b, " (", scaled_grouped_mm_v2_recipe_name(recipe_b[0]),
        ") is not supported on CPU; the CPU kernel takes RowWise x RowWise ([1] x [1]), BlockWise1x32 x "
        "BlockWise1x32 ([3] x [3], MXFP8) and BlockWise1x128 x BlockWise128x128 ([4] x [5])");
  }
  scaled_grouped_mm_check_bias_and_devices(mat_a, mat_b, sa, sb, offs, bias, groups, out_t);
  return recipe;
}

Tensor scaled_grouped_mm_v2_cpu(
    const Tensor& mat_a, const Tensor& mat_b, c10::ArrayRef<Tensor> scale_a, c10::IntArrayRef recipe_a,
    c10::IntArrayRef swizzle_a, c10::ArrayRef<Tensor> scale_b, c10::IntArrayRef recipe_b, c10::IntArrayRef swizzle_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype,
    c10::IntArrayRef contraction_dim, bool use_fast_accum);

} // namespace at::native

#pragma once

// _swizzle_mx_scale and the per-group blocked MX scale layout it writes (and
// _scaled_grouped_mm's CPU entry reads back): validation, output size and the
// byte index of each scale, device-generic ATen code (MoESwizzleMXScale.cpp).
// The swizzled layout of one grid is fp8_swizzled_offset's (MoEQuantize.h).

#include <ATen/native/MoEQuantize.h>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <utility>
#include <vector>

namespace at::native {

// swizzle_mx_scale: MX scales of a 2-D grouped operand in the layout
// upstream's CUDA MX grouped GEMMs read (_scaled_grouped_mm, 2D x 3D and
// 2D x 2D): each group's part of the plain (R, S) scale grid of data (R, C)
// is blocked (32_4_4, as quantize_fp8's swizzle) on its own, groups one after the
// other. offs holds the int32 group ends along data dimension dim:
//   dim 0 (2D x 3D, groups of rows): group g is rows [offs[g-1], offs[g]),
//     padded to (round_up(M_g, 128), round_up(S, 4)), at byte
//     round_up(S, 4) * sum_{h<g} round_up(M_h, 128);
//   dim 1 (2D x 2D, groups along C = K, on 32-element block bounds): group g
//     is scale columns [offs[g-1] / 32, ceil(offs[g] / 32)), padded to
//     (round_up(R, 128), round_up(S_g, 4)), at byte round_up(R, 128) *
//     sum_{h<g} round_up(S_h, 4).
// The result's shape is a bound that depends on shapes alone, (R + 128 G,
// round_up(S, 4)) for dim 0 and (round_up(R, 128), S + 4 G) for dim 1; bytes
// no group uses are zero. Rows (dim 0) or columns (dim 1) past offs[-1]
// belong to no group and are not stored.
inline std::vector<int64_t> swizzle_mx_scale_size(int64_t rows, int64_t s, int64_t groups, int64_t dim) {
  if (dim == 0) return {rows + 128 * groups, fp8_round_up(s, 4)};
  return {fp8_round_up(rows, 128), s + 4 * groups};
}

inline void swizzle_mx_scale_check_inputs(const Tensor& scale, const Tensor& offs, int64_t dim) {
  TORCH_CHECK_VALUE(scale.scalar_type() == kFloat8_e8m0fnu,
      "swizzle_mx_scale: scale must be Float8_e8m0fnu, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.dim() == 2,
      "swizzle_mx_scale: scale must be the 2-D (R, S) grid of a 2-D operand, got sizes ", scale.sizes());
  TORCH_CHECK_VALUE(dim == 0 || dim == 1, "swizzle_mx_scale: dim must be 0 or 1, got ", dim);
  TORCH_CHECK_VALUE(offs.dim() == 1,
      "swizzle_mx_scale: offs must be 1-D, got ", offs.dim(), "-D with sizes ", offs.sizes());
  TORCH_CHECK_VALUE(offs.scalar_type() == kInt, "swizzle_mx_scale: offs must be int32, got ", offs.scalar_type());
  TORCH_CHECK_VALUE(offs.device() == scale.device(),
      "swizzle_mx_scale: offs must be on the device of scale (", scale.device(), "), got ", offs.device());
}

// Byte offset in the per-group blocked layout of each element of the plain
// (R, S) grid, and whether a group holds it: int64 (R, S), bool (R, S).
// ATen operations on offs's device, no host sync; offs values are assumed
// valid (swizzle_mx_scale_check_offsets).
std::pair<Tensor, Tensor> swizzle_mx_scale_index(int64_t rows, int64_t s, const Tensor& offs, int64_t dim);

// offs values: non-decreasing, within the grouped extent (R, or C = 32 S for
// dim 1, where they must fall on 32-element blocks or end in the last one).
// Checked with their values on CPU, with _assert_async elsewhere.
void swizzle_mx_scale_check_offsets(const char* op, const Tensor& offs, int64_t rows, int64_t s, int64_t dim);

// The plain (R, S) grid back from a blocked scale (any 2-D shape holding the
// bytes, as upstream accepts); elements of no group read 1.0 (0x7F).
Tensor unswizzle_mx_scale(const Tensor& blocked, int64_t rows, int64_t s, const Tensor& offs, int64_t dim);

Tensor swizzle_mx_scale(const Tensor& scale, const Tensor& offs, int64_t dim);

} // namespace at::native

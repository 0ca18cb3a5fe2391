#pragma once

// Project-only (csrc/moe/, outside the ATen mirror the upstream series copies;
// why: patches/manifest.py NOT_UPSTREAMED). Its kernel is ATen's grouped mm
// kernel (grouped_mm_stub of ATen/native/GroupedMM.h), given the indices.
//
// moe_ops::grouped_mm_gather: grouped_mm whose grouped dimension (the one offs
// splits) is read through an index, so that an MoE layer never materialises
// an expert-sorted copy of its tokens or of their gradients:
//   2D x 3D, a_index (M,): row i of the grouped A is mat_a[a_index[i]]
//   2D x 2D, a_index (K,): column k of A is mat_a[:, a_index[k]]
//   2D x 2D, b_index (K,): row k of B is mat_b[b_index[k]]
// (in 2D x 2D either or both). An index of -1 reads zeros (permute's padding
// rows). Shapes, offs, bias and out_dtype follow grouped_mm on the gathered
// operands.

#include <ATen/native/GroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <utility>

namespace at::native {

// Size of the dimension of mat that an index replaces.
inline int64_t grouped_mm_gather_dim(bool is_a, const Tensor& mat_a, const Tensor& mat_b) {
  return is_a && mat_b.dim() == 2 ? 1 : 0;
}

// A stride-0 stand-in with the shape of the gathered operand, for the checks.
inline Tensor grouped_mm_gathered_shape(const Tensor& mat, const std::optional<Tensor>& index, int64_t dim) {
  if (!index.has_value()) {
    return mat;
  }
  auto size = mat.sizes().vec();
  size[dim] = index->size(0);
  return at::empty({1, 1}, mat.options()).expand(size);
}

inline void grouped_mm_gather_check_index(const Tensor& index, const Tensor& mat_a, const char* name) {
  TORCH_CHECK_VALUE(index.dim() == 1, "grouped_mm_gather: ", name, " must be 1-D, got ", index.dim(),
      "-D with sizes ", index.sizes());
  TORCH_CHECK_VALUE(index.scalar_type() == kLong, "grouped_mm_gather: ", name, " must be int64, got ",
      index.scalar_type());
  TORCH_CHECK_VALUE(index.device() == mat_a.device(), "grouped_mm_gather: ", name,
      " must be on the device of mat_a (", mat_a.device(), "), got ", index.device());
}

// Returns the stand-ins of the gathered operands (A, B), for the caller's
// shape computations.
inline std::pair<Tensor, Tensor> grouped_mm_gather_check_inputs(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const Tensor& offs,
    const std::optional<Tensor>& a_index,
    const std::optional<Tensor>& b_index,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(a_index.has_value() || b_index.has_value(),
      "grouped_mm_gather: a_index or b_index must be given (else call grouped_mm)");
  TORCH_CHECK_VALUE(mat_a.dim() == 2 && (mat_b.dim() == 3 || mat_b.dim() == 2),
      "grouped_mm_gather: needs mat_a 2-D and mat_b 3-D (rows of A gathered) or 2-D (K gathered), got mat_a ",
      mat_a.sizes(), " and mat_b ", mat_b.sizes());
  TORCH_CHECK_VALUE(!b_index.has_value() || mat_b.dim() == 2,
      "grouped_mm_gather: b_index needs mat_b 2-D (the 2D x 2D layout), got mat_b ", mat_b.sizes());
  if (a_index.has_value()) {
    grouped_mm_gather_check_index(*a_index, mat_a, "a_index");
  }
  if (b_index.has_value()) {
    grouped_mm_gather_check_index(*b_index, mat_a, "b_index");
  }
  Tensor a = grouped_mm_gathered_shape(mat_a, a_index, grouped_mm_gather_dim(true, mat_a, mat_b));
  Tensor b = grouped_mm_gathered_shape(mat_b, b_index, 0);
  grouped_mm_check_inputs(a, b, offs, bias, out_dtype);
  return {std::move(a), std::move(b)};
}

// Checks the values of a CPU index: -1 <= index[i] < size.
inline void grouped_mm_check_index_cpu(const Tensor& index, int64_t size, const char* name) {
  const int64_t* data = index.const_data_ptr<int64_t>();
  const int64_t stride = index.stride(0);
  for (int64_t i = 0; i < index.size(0); ++i) {
    const int64_t r = data[i * stride];
    TORCH_CHECK_VALUE(r >= -1 && r < size, "grouped_mm_gather: ", name, "[", i, "]=", r,
        " is out of range [-1, ", size, ")");
  }
}

Tensor grouped_mm_gather_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const Tensor& offs,
    const std::optional<Tensor>& a_index,
    const std::optional<Tensor>& b_index,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype);

} // namespace at::native

#pragma once

// Shared validation and output allocation for the grouped mm (_grouped_mm),
// used by every backend (CPU, CUDA). Its Python meta function restates these
// checks one for one, with the same messages; keep the two in step.
//
// Layouts (G = number of groups, offs = int32 cumulative group ends):
//   2D x 3D  mat_a (M, K),    mat_b (G, K, N), offs splits M  -> out (M, N)
//   3D x 2D  mat_a (G, M, K), mat_b (K, N),    offs splits N  -> out (M, N)
//   2D x 2D  mat_a (M, K),    mat_b (K, N),    offs splits K  -> out (G, M, N)
//   3D x 3D  mat_a (G, M, K), mat_b (G, K, N), no offs        -> out (G, M, N)
// Output elements that no group covers (rows/columns past offs[-1]) are zero.
// bias, when given, is (G, N_out) with N_out = out.size(-1); in 3D x 2D the
// group g adds bias[g, n] to the columns n it owns.

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <c10/core/ScalarType.h>
#include <c10/util/SmallVector.h>

#include <optional>

namespace at::native {

enum class GroupedMMLayout { k2d3d, k3d2d, k2d2d, k3d3d };

inline GroupedMMLayout grouped_mm_layout(const Tensor& mat_a, const Tensor& mat_b) {
  const bool a_2d = mat_a.dim() == 2;
  const bool b_2d = mat_b.dim() == 2;
  if (a_2d) {
    return b_2d ? GroupedMMLayout::k2d2d : GroupedMMLayout::k2d3d;
  }
  return b_2d ? GroupedMMLayout::k3d2d : GroupedMMLayout::k3d3d;
}

inline bool grouped_mm_supported_dtype(ScalarType t) {
  return t == kFloat || t == kHalf || t == kBFloat16 || t == kDouble;
}

// Output dtype: the input dtype, or float32 for 16-bit inputs (the kernels
// accumulate in fp32 and round once).
inline ScalarType grouped_mm_out_dtype(const Tensor& mat_a, std::optional<ScalarType> out_dtype) {
  const auto in = mat_a.scalar_type();
  const auto out = out_dtype.value_or(in);
  TORCH_CHECK_VALUE(
      out == in || (out == kFloat && (in == kHalf || in == kBFloat16)),
      "grouped_mm: out_dtype must be the input dtype (", in,
      ") or float32 for float16/bfloat16 inputs, got out_dtype=", out);
  return out;
}

// Number of groups G.
inline int64_t grouped_mm_num_groups(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs) {
  if (offs.has_value()) {
    return offs->size(0);
  }
  return mat_a.size(0);
}

// Extent of the dimension that offs splits (M, N or K); 0 for 3D x 3D.
inline int64_t grouped_mm_split_size(const Tensor& mat_a, const Tensor& mat_b) {
  switch (grouped_mm_layout(mat_a, mat_b)) {
    case GroupedMMLayout::k2d3d: return mat_a.size(0);
    case GroupedMMLayout::k3d2d: return mat_b.size(1);
    case GroupedMMLayout::k2d2d: return mat_a.size(1);
    case GroupedMMLayout::k3d3d: return 0;
  }
  return 0;
}

inline c10::SmallVector<int64_t, 3> grouped_mm_out_size(
    const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs) {
  switch (grouped_mm_layout(mat_a, mat_b)) {
    case GroupedMMLayout::k2d3d: return {mat_a.size(0), mat_b.size(2)};
    case GroupedMMLayout::k3d2d: return {mat_a.size(1), mat_b.size(1)};
    case GroupedMMLayout::k2d2d: return {offs->size(0), mat_a.size(0), mat_b.size(1)};
    case GroupedMMLayout::k3d3d: return {mat_a.size(0), mat_a.size(1), mat_b.size(2)};
  }
  return {};
}

// Output strides: contiguous on CPU and ROCm; on CUDA the last dimension is
// padded to 16 bytes, the layout upstream's TMA-based kernels allocate. The
// meta function mirrors this (ROCm told apart by torch.version.cuda).
inline c10::SmallVector<int64_t, 3> grouped_mm_out_strides(
    c10::IntArrayRef size, ScalarType dtype, c10::Device device) {
  c10::SmallVector<int64_t, 3> padded(size.begin(), size.end());
#ifndef USE_ROCM
  if (device.is_cuda()) {
#else
  if (false) {
#endif
    const int64_t align = 16 / static_cast<int64_t>(c10::elementSize(dtype));
    padded.back() = (padded.back() + align - 1) / align * align;
  }
  c10::SmallVector<int64_t, 3> strides(padded.size(), 1);
  for (int64_t i = static_cast<int64_t>(padded.size()) - 2; i >= 0; --i) {
    strides[i] = strides[i + 1] * padded[i + 1];
  }
  return strides;
}

// Shape checks shared by the grouped GEMMs (grouped_mm, scaled_grouped_mm):
// op names the operator in the messages.
inline void grouped_mm_check_dims(const char* op, const Tensor& mat_a, const Tensor& mat_b) {
  TORCH_CHECK_VALUE(mat_a.dim() == 2 || mat_a.dim() == 3,
      op, ": mat_a must be 2-D or 3-D, got ", mat_a.dim(), "-D with sizes ", mat_a.sizes());
  TORCH_CHECK_VALUE(mat_b.dim() == 2 || mat_b.dim() == 3,
      op, ": mat_b must be 2-D or 3-D, got ", mat_b.dim(), "-D with sizes ", mat_b.sizes());
}

inline void grouped_mm_check_contraction(const char* op, const Tensor& mat_a, const Tensor& mat_b) {
  TORCH_CHECK_VALUE(mat_b.device() == mat_a.device(),
      op, ": mat_b must be on the device of mat_a (", mat_a.device(), "), got ", mat_b.device());
  TORCH_CHECK_VALUE(mat_a.size(-1) == mat_b.size(-2),
      op, ": contraction sizes differ: mat_a ", mat_a.sizes(), " has K=", mat_a.size(-1),
      " but mat_b ", mat_b.sizes(), " has K=", mat_b.size(-2));
}

// 3D x 3D: a batch of G products, no offs.
inline void grouped_mm_check_3d3d(
    const char* op, const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs) {
  TORCH_CHECK_VALUE(!offs.has_value(),
      op, ": offs must be None when mat_a and mat_b are both 3-D, got offs of sizes ", offs->sizes());
  TORCH_CHECK_VALUE(mat_a.size(0) == mat_b.size(0),
      op, ": batch sizes differ: mat_a ", mat_a.sizes(), ", mat_b ", mat_b.sizes());
}

// offs against the layout: None for 3D x 3D, else int32, 1-D, one entry per group.
inline void grouped_mm_check_layout(
    const char* op, const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  if (layout == GroupedMMLayout::k3d3d) {
    grouped_mm_check_3d3d(op, mat_a, mat_b, offs);
    return;
  }
  TORCH_CHECK_VALUE(offs.has_value(),
      op, ": offs is required when mat_a or mat_b is 2-D (mat_a ", mat_a.sizes(), ", mat_b ", mat_b.sizes(), ")");
  TORCH_CHECK_VALUE(offs->dim() == 1, op, ": offs must be 1-D, got ", offs->dim(), "-D with sizes ", offs->sizes());
  TORCH_CHECK_VALUE(offs->scalar_type() == kInt, op, ": offs must be int32, got ", offs->scalar_type());
  TORCH_CHECK_VALUE(offs->device() == mat_a.device(),
      op, ": offs must be on the device of mat_a (", mat_a.device(), "), got ", offs->device());
  if (layout == GroupedMMLayout::k2d3d) {
    TORCH_CHECK_VALUE(offs->size(0) == mat_b.size(0),
        op, ": offs has ", offs->size(0), " groups but mat_b ", mat_b.sizes(), " has ", mat_b.size(0));
  } else if (layout == GroupedMMLayout::k3d2d) {
    TORCH_CHECK_VALUE(offs->size(0) == mat_a.size(0),
        op, ": offs has ", offs->size(0), " groups but mat_a ", mat_a.sizes(), " has ", mat_a.size(0));
  }
}

// bias, when given: (G, N_out), in the input or the output dtype, on the
// device of mat_a (after the checks of the operands and offs).
inline void grouped_mm_check_bias(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  if (!bias.has_value()) {
    return;
  }
  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);
  const int64_t n_out = grouped_mm_out_size(mat_a, mat_b, offs).back();
  TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == groups && bias->size(1) == n_out,
      "grouped_mm: bias must have shape (G, N) = (", groups, ", ", n_out, "), got ", bias->sizes());
  const auto out_t = grouped_mm_out_dtype(mat_a, out_dtype);
  TORCH_CHECK_VALUE(bias->scalar_type() == mat_a.scalar_type() || bias->scalar_type() == out_t,
      "grouped_mm: bias must have the input dtype (", mat_a.scalar_type(), ") or the output dtype (",
      out_t, "), got ", bias->scalar_type());
  TORCH_CHECK_VALUE(bias->device() == mat_a.device(),
      "grouped_mm: bias must be on the device of mat_a (", mat_a.device(), "), got ", bias->device());
}

// Checks everything that does not need the values of offs. Every message
// names the argument and the value received.
inline void grouped_mm_check_inputs(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_dims("grouped_mm", mat_a, mat_b);
  TORCH_CHECK_VALUE(grouped_mm_supported_dtype(mat_a.scalar_type()),
      "grouped_mm: mat_a must be float32, float16, bfloat16 or float64, got ", mat_a.scalar_type());
  TORCH_CHECK_VALUE(mat_b.scalar_type() == mat_a.scalar_type(),
      "grouped_mm: mat_b must have the dtype of mat_a (", mat_a.scalar_type(), "), got ", mat_b.scalar_type());
  grouped_mm_check_contraction("grouped_mm", mat_a, mat_b);
  grouped_mm_out_dtype(mat_a, out_dtype);
  grouped_mm_check_layout("grouped_mm", mat_a, mat_b, offs);
  grouped_mm_check_bias(mat_a, mat_b, offs, bias, out_dtype);
}

// Checks the values of a CPU offs tensor: 0 <= offs[0] <= offs[1] <= ... <=
// split_size; op names the operator the caller called. Returns offs[-1] (0
// for no groups), the extent the groups cover.
inline int64_t grouped_mm_check_offsets_cpu(
    const Tensor& offs, int64_t split_size, const char* split_name, const char* op = "grouped_mm") {
  const int64_t groups = offs.size(0);
  const auto stride = offs.stride(0);
  const int32_t* data = offs.const_data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t end = data[g * stride];
    TORCH_CHECK_VALUE(end >= prev,
        op, ": offs must be non-decreasing and non-negative, got offs[", g, "]=", end,
        g == 0 ? std::string(" < 0") : " < offs[" + std::to_string(g - 1) + "]=" + std::to_string(prev));
    prev = end;
  }
  TORCH_CHECK_VALUE(prev <= split_size,
      op, ": offs[-1]=", prev, " exceeds the grouped dimension ", split_name, "=", split_size);
  return prev;
}

inline const char* grouped_mm_split_name(GroupedMMLayout layout) {
  switch (layout) {
    case GroupedMMLayout::k2d3d: return "M (mat_a.size(0))";
    case GroupedMMLayout::k3d2d: return "N (mat_b.size(1))";
    case GroupedMMLayout::k2d2d: return "K (mat_a.size(1))";
    case GroupedMMLayout::k3d3d: return "none";
  }
  return "";
}

// The group of every index 0 .. size-1 along the grouped dimension: g where
// offs[g-1] <= i < offs[g], and G = offs.size(0) past offs[-1]. int64, on
// offs's device, no host sync (ATen operations on offs as it is).
inline Tensor grouped_mm_group_index(const Tensor& offs, int64_t size) {
  const Tensor o = offs.to(kLong);
  return at::searchsorted(o, at::arange(size, o.options()), /*out_int32=*/false, /*right=*/true);
}

// Whether int64 offs (of any device) are non-negative, non-decreasing and at
// most extent: a 0-dim bool tensor, for _assert_async where offs live on a GPU
// (a host check would sync).
inline Tensor grouped_mm_offs_ok(const Tensor& offs, int64_t extent) {
  return offs.ge(0).all().logical_and(offs.diff().ge(0).all()).logical_and(offs.le(extent).all());
}

// CPU kernel (native/cpu/GroupedMMKernel.cpp): writes every element of out
// that a group covers (out is fresh, contiguous in its last dimension; see
// grouped_mm_empty_cpu). Inputs may have any strides, including 0.
// a_index / b_index, when given, are contiguous int64 indices (-1 reads zeros)
// through which the grouped dimension of mat_a / mat_b is read: the row i of
// a 2D x 3D mat_a is mat_a[a_index[i]], in 2D x 2D the column k of mat_a is
// mat_a[:, a_index[k]] and the row k of mat_b is mat_b[b_index[k]]. _grouped_mm
// passes nullopt; a caller that routes tokens to groups can thus multiply them
// without first copying them into group order.
using grouped_mm_fn = void (*)(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    const std::optional<Tensor>& a_index,
    const std::optional<Tensor>& b_index,
    const Tensor& out);
DECLARE_DISPATCH(grouped_mm_fn, grouped_mm_stub);

// Zeroes the rows (2D x 3D) or columns (3D x 2D) of a CPU grouped mm's out at
// or past covered (offs[-1], as grouped_mm_check_offsets_cpu returns it),
// which no group covers and grouped_mm_stub does not write.
inline void grouped_mm_zero_past_cpu(const Tensor& out, GroupedMMLayout layout, int64_t covered) {
  if (layout == GroupedMMLayout::k2d3d && covered < out.size(0)) {
    out.narrow(0, covered, out.size(0) - covered).zero_();
  } else if (layout == GroupedMMLayout::k3d2d && covered < out.size(1)) {
    out.narrow(1, covered, out.size(1) - covered).zero_();
  }
}

// The output of a CPU grouped mm of mat_a and mat_b (tensors of the operands'
// shapes, dtype and device), after checking the values of offs: rows (2D x
// 3D) or columns (3D x 2D) that no group covers are zero, the rest is left for
// grouped_mm_stub to write.
Tensor grouped_mm_empty_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    ScalarType out_dtype);

// Zeroes the rows (2D x 3D) or columns (3D x 2D) of out at or past offs[-1],
// which no group covers, comparing offs[-1] on its device (no host sync).
void grouped_mm_zero_uncovered(const Tensor& out, GroupedMMLayout layout, const std::optional<Tensor>& offs);

// The device-generic grouped mm, for validated inputs: one mm / addmm per
// group on the operands' device in float32 (float64 for float64) rounded once,
// uncovered elements zeroed, grouped_mm_cpu's output layout. It reads offs on
// the host (a sync, as upstream's fallback) and checks it with the CPU errors.
// The CUDA entry runs it where upstream's grouped GEMM does not apply.
Tensor grouped_mm_fallback(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype);

Tensor grouped_mm_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype);

} // namespace at::native

#pragma once

// _grouped_mm's CUDA entry (cuda/GroupedMM.cpp) and the choice it makes
// between upstream's fast grouped GEMM and a device-generic fallback, which
// together keep the contract of the CPU kernel (native/GroupedMM.h).

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace at::native {

// Whether an operand's last two dimensions are a layout upstream's CUDA
// grouped GEMM (at::cuda::detail::bf16bf16_grouped_mm, TMA loads) reads:
// row- or column-major with the leading stride, and for a 3-D operand the
// batch stride, a multiple of 16 bytes, and the data 16-byte aligned.
inline bool grouped_mm_tma_layout(const Tensor& mat) {
  const int64_t align = 16 / static_cast<int64_t>(mat.element_size());
  const int64_t d = mat.dim() - 1;
  const auto st = mat.strides();
  const auto sz = mat.sizes();
  if (reinterpret_cast<uintptr_t>(mat.const_data_ptr()) % 16 != 0 || (mat.dim() == 3 && st[0] % align != 0)) {
    return false;
  }
  if (st[d - 1] == 1 && st[d] >= std::max<int64_t>(1, sz[d - 1])) {
    return st[d] % align == 0;
  }
  if (st[d] == 1 && st[d - 1] >= std::max<int64_t>(1, sz[d])) {
    return st[d - 1] % align == 0;
  }
  return false;
}

// Whether grouped_mm_cuda runs upstream's fast grouped GEMM (else
// grouped_mm_fallback, native/GroupedMM.cpp) on validated inputs: bfloat16
// in and out, no bias, TMA-readable operands, unit-stride offs, on a device
// that kernel is built for (device_ok). Metadata only, so a CPU build tests it.
inline bool grouped_mm_cuda_fast_path(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype,
    bool device_ok) {
  return device_ok && mat_a.scalar_type() == kBFloat16 && out_dtype.value_or(kBFloat16) == kBFloat16 &&
      !bias.has_value() && (!offs.has_value() || offs->stride(0) == 1) && grouped_mm_tma_layout(mat_a) &&
      grouped_mm_tma_layout(mat_b);
}

// The CUDA kernel of _grouped_mm: the shared checks, then the fast kernel
// (offs checked on the device, uncovered rows zeroed) or the fallback.
Tensor grouped_mm_cuda(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype);

} // namespace at::native

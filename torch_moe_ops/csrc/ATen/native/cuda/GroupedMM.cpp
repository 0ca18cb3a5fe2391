// CUDA entry of _grouped_mm: the checks grouped_mm_cpu runs (GroupedMM.h:
// the same errors, types and messages), then upstream's CUTLASS grouped GEMM
// (at::cuda::detail::bf16bf16_grouped_mm) where it applies, with the output
// elements no group covers zeroed after it (it leaves them unwritten), or
// else the device-generic loop of ATen matmuls (grouped_mm_fallback,
// native/GroupedMM.cpp) that does everything the CPU kernel does (float64,
// float16, bias, float32 output, any strides). Only the fast path needs a GPU:
// the rest is device-generic ATen code, which the tests run on CPU tensors.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/cuda/GroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/cuda/GroupMM.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty_strided.h>

namespace at::native {

Tensor grouped_mm_cuda(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);
  bool device_ok = false;
  if (mat_a.is_cuda()) {
    // The devices upstream's CUTLASS grouped GEMM is built for.
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    device_ok = (prop->major == 9 && prop->minor == 0) || prop->major == 10;
  }
  if (!grouped_mm_cuda_fast_path(mat_a, mat_b, offs, bias, out_dtype, device_ok)) {
    return grouped_mm_fallback(mat_a, mat_b, offs, bias, out_dtype);
  }
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const auto size = grouped_mm_out_size(mat_a, mat_b, offs);
  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, kBFloat16, mat_a.device()),
                                 mat_a.options().dtype(kBFloat16));
  if (offs.has_value() && offs->numel() > 0) {
    // The CPU kernel's value check, on the device: no host sync.
    at::_assert_async(grouped_mm_offs_ok(offs->to(kLong), grouped_mm_split_size(mat_a, mat_b)),
        "grouped_mm: offs must be non-negative, non-decreasing and at most the grouped dimension");
  }
  if (out.numel() == 0) {
    return out;
  }
  if (layout == GroupedMMLayout::k2d2d) {
    // A group with an empty K slice owns a zero block, which nothing says the
    // grouped kernel writes (upstream zero-fills it on ROCm): one memset.
    out.zero_();
  }
  at::cuda::detail::bf16bf16_grouped_mm(mat_a, mat_b, offs, std::nullopt, out);
  grouped_mm_zero_uncovered(out, layout, offs);
  return out;
}

} // namespace at::native

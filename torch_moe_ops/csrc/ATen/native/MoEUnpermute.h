#pragma once

// _moe_unpermute: checks, shared by every backend (CPU, CUDA); the meta
// function restates them one for one, with the same messages.
//
//   unpermute(permuted (R, H), dst_rows (T, k), weights (T, k)?) -> (T, H)

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/native/MoERouting.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

namespace at::native {

inline void unpermute_check_inputs(
    const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights) {
  TORCH_CHECK_VALUE(permuted.dim() == 2,
      "unpermute: permuted must be 2-D (rows, hidden), got ", permuted.dim(), "-D with sizes ", permuted.sizes());
  TORCH_CHECK_VALUE(routing_float_dtype(permuted.scalar_type()),
      "unpermute: permuted must be float32, float16, bfloat16 or float64, got ", permuted.scalar_type());
  TORCH_CHECK_VALUE(dst_rows.dim() == 2,
      "unpermute: dst_rows must be 2-D (tokens, top_k), got ", dst_rows.dim(), "-D with sizes ", dst_rows.sizes());
  TORCH_CHECK_VALUE(dst_rows.scalar_type() == kLong, "unpermute: dst_rows must be int64, got ", dst_rows.scalar_type());
  TORCH_CHECK_VALUE(dst_rows.device() == permuted.device(),
      "unpermute: dst_rows must be on the device of permuted (", permuted.device(), "), got ", dst_rows.device());
  if (weights.has_value()) {
    TORCH_CHECK_VALUE(weights->sizes() == dst_rows.sizes(),
        "unpermute: weights must have the shape of dst_rows ", dst_rows.sizes(), ", got ", weights->sizes());
    TORCH_CHECK_VALUE(weights->scalar_type() == kFloat || weights->scalar_type() == permuted.scalar_type(),
        "unpermute: weights must be float32 or the dtype of permuted (", permuted.scalar_type(), "), got ",
        weights->scalar_type());
    TORCH_CHECK_VALUE(weights->device() == permuted.device(),
        "unpermute: weights must be on the device of permuted (", permuted.device(), "), got ", weights->device());
  }
}

// Entry points: CPU in MoEUnpermute.cpp; CUDA in cuda/MoEUnpermute.cu,
// declared for every build as ATen declares its CUDA entries.
Tensor moe_unpermute_cpu(const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights);
Tensor moe_unpermute_cuda(const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights);

// The CPU kernel (cpu/MoEUnpermuteKernel.cpp). out is fresh and contiguous
// and fully written by the kernel; dst_rows and weights are contiguous,
// permuted's rows are.
using moe_unpermute_fn = void (*)(
    const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights, const Tensor& out);
DECLARE_DISPATCH(moe_unpermute_fn, moe_unpermute_stub);

} // namespace at::native

#pragma once

// _moe_unpermute_backward, the backward of _moe_unpermute: checks, shared by
// every backend (CPU, CUDA); the meta function restates them one for one,
// with the same messages.
//
//   unpermute_backward(grad_output (T, H), dst_rows (T, k), num_rows R,
//       weights (T, k)?, permuted (R, H)?) -> grad_permuted (R, H),
//       grad_weights (T, k) ((0,) when permuted is not given)

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/native/MoERouting.h>
#include <ATen/native/MoEUnpermute.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

namespace at::native {

// unpermute's backward takes the forward's inputs (permuted only when the
// weights need a gradient): the forward's checks, and grad_output must be a
// gradient of unpermute's output, one row per token, hidden wide.
inline void unpermute_backward_check_inputs(
    const Tensor& grad_output, const Tensor& dst_rows, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted) {
  TORCH_CHECK_VALUE(dst_rows.dim() == 2,
      "unpermute_backward: dst_rows must be 2-D (tokens, top_k), got ", dst_rows.dim(), "-D with sizes ",
      dst_rows.sizes());
  TORCH_CHECK_VALUE(dst_rows.scalar_type() == kLong,
      "unpermute_backward: dst_rows must be int64, got ", dst_rows.scalar_type());
  TORCH_CHECK_VALUE(grad_output.dim() == 2 && grad_output.size(0) == dst_rows.size(0),
      "unpermute_backward: grad_output must be 2-D with one row per token (", dst_rows.size(0), "), got sizes ",
      grad_output.sizes());
  TORCH_CHECK_VALUE(routing_float_dtype(grad_output.scalar_type()),
      "unpermute_backward: grad_output must be float32, float16, bfloat16 or float64, got ",
      grad_output.scalar_type());
  TORCH_CHECK_VALUE(dst_rows.device() == grad_output.device(),
      "unpermute_backward: dst_rows must be on the device of grad_output (", grad_output.device(), "), got ",
      dst_rows.device());
  TORCH_CHECK_VALUE(num_rows >= 0, "unpermute_backward: num_rows must be >= 0, got ", num_rows);
  if (permuted.has_value()) {
    unpermute_check_inputs(*permuted, dst_rows, weights);
    TORCH_CHECK_VALUE(permuted->size(0) == num_rows,
        "unpermute_backward: num_rows must be permuted's row count (", permuted->size(0), "), got ", num_rows);
    TORCH_CHECK_VALUE(grad_output.size(1) == permuted->size(1),
        "unpermute_backward: grad_output must be as wide as permuted (", permuted->size(1), "), got sizes ",
        grad_output.sizes());
    TORCH_CHECK_VALUE(grad_output.scalar_type() == permuted->scalar_type(),
        "unpermute_backward: grad_output must have permuted's dtype (", permuted->scalar_type(), "), got ",
        grad_output.scalar_type());
  }
}

// Entry points: CPU in MoEUnpermuteBackward.cpp; CUDA in cuda/MoEUnpermute.cu,
// declared for every build as ATen declares its CUDA entries.
std::tuple<Tensor, Tensor> moe_unpermute_backward_cpu(
    const Tensor& grad_output, const Tensor& dst_rows, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted);
std::tuple<Tensor, Tensor> moe_unpermute_backward_cuda(
    const Tensor& grad_output, const Tensor& dst_rows, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted);

// The CPU kernel (cpu/MoEUnpermuteBackwardKernel.cpp). Outputs are fresh and
// contiguous (grad_permuted zeroed: the kernel writes the rows dst_rows
// names); inputs are contiguous.
using moe_unpermute_backward_fn = void (*)(
    const Tensor& grad_output, const Tensor& dst_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted, const Tensor& grad_permuted, const Tensor& grad_weights);
DECLARE_DISPATCH(moe_unpermute_backward_fn, moe_unpermute_backward_stub);

} // namespace at::native

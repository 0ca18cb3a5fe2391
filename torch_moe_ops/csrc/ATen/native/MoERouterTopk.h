#pragma once

// _moe_router_topk: checks and output dtypes, shared by every backend (CPU,
// CUDA); the meta function restates them one for one, with the same messages.
//
//   router_topk(logits (T, E), k, ...) -> weights (T, k) float32 (float64 for
//       float64 logits), expert_ids (T, k) int32, counts (E,) int32

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/native/MoERouting.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace at::native {

enum class RouterScore { kSoftmax, kSigmoid, kSoftmaxAfterTopk };

inline RouterScore router_topk_score(std::string_view score_func) {
  if (score_func == "softmax") return RouterScore::kSoftmax;
  if (score_func == "sigmoid") return RouterScore::kSigmoid;
  TORCH_CHECK_VALUE(score_func == "softmax_after_topk",
      "router_topk: score_func must be 'softmax', 'sigmoid' or 'softmax_after_topk', got '", score_func, "'");
  return RouterScore::kSoftmaxAfterTopk;
}

// Routing weights are float32: the combine (unpermute) accumulates in float32
// anyway, and rounding the weights to bf16 first would add an error no model
// wants. float64 logits keep float64 so gradcheck sees the exact function.
inline ScalarType router_topk_weights_dtype(ScalarType logits) {
  return logits == kDouble ? kDouble : kFloat;
}

inline void router_topk_check_inputs(
    const Tensor& logits,
    int64_t k,
    std::string_view score_func,
    const std::optional<Tensor>& bias,
    int64_t n_group,
    int64_t topk_group) {
  router_topk_score(score_func);
  TORCH_CHECK_VALUE(logits.dim() == 2,
      "router_topk: logits must be 2-D (tokens, experts), got ", logits.dim(), "-D with sizes ", logits.sizes());
  TORCH_CHECK_VALUE(routing_float_dtype(logits.scalar_type()),
      "router_topk: logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  const int64_t experts = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= experts,
      "router_topk: k must be in [1, num_experts=", experts, "], got k=", k);
  TORCH_CHECK_VALUE(n_group >= 1 && experts % n_group == 0,
      "router_topk: n_group must be >= 1 and divide num_experts=", experts, ", got n_group=", n_group);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group,
      "router_topk: topk_group must be in [1, n_group=", n_group, "], got topk_group=", topk_group);
  TORCH_CHECK_VALUE(k <= topk_group * (experts / n_group),
      "router_topk: k=", k, " exceeds the experts of the selected groups, topk_group * num_experts / n_group = ",
      topk_group * (experts / n_group));
  // The group mask is one 64-bit word per token (CUDA keeps it in a register).
  TORCH_CHECK_VALUE(n_group <= 64, "router_topk: n_group must be at most 64, got n_group=", n_group);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == experts,
        "router_topk: bias must have shape (num_experts,) = (", experts, "), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == kFloat || bias->scalar_type() == logits.scalar_type(),
        "router_topk: bias must be float32 or the logits dtype (", logits.scalar_type(), "), got ",
        bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == logits.device(),
        "router_topk: bias must be on the device of logits (", logits.device(), "), got ", bias->device());
  }
}

// Entry points: CPU in MoERouterTopk.cpp; CUDA in cuda/MoERouterTopk.cu,
// declared for every build as ATen declares its CUDA entries.
std::tuple<Tensor, Tensor, Tensor> moe_router_topk_cpu(
    const Tensor& logits, int64_t k, c10::string_view score_func, const std::optional<Tensor>& bias,
    int64_t n_group, int64_t topk_group, bool renormalize, double scaling_factor);
std::tuple<Tensor, Tensor, Tensor> moe_router_topk_cuda(
    const Tensor& logits, int64_t k, c10::string_view score_func, const std::optional<Tensor>& bias,
    int64_t n_group, int64_t topk_group, bool renormalize, double scaling_factor);

// The CPU kernel (cpu/MoERouterTopkKernel.cpp). Outputs are fresh, contiguous
// and fully written by the kernel; inputs are contiguous.
using moe_router_topk_fn = void (*)(
    const Tensor& logits, int64_t k, RouterScore score, const std::optional<Tensor>& bias, int64_t n_group,
    int64_t topk_group, bool renormalize, double scaling_factor, const Tensor& weights, const Tensor& expert_ids,
    const Tensor& counts);
DECLARE_DISPATCH(moe_router_topk_fn, moe_router_topk_stub);

} // namespace at::native

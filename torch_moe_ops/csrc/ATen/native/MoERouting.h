#pragma once

// Shared validation and output sizes for the MoE routing ops, used by every
// backend (CPU, CUDA). The Python meta functions restate these checks one for
// one, with the same messages; keep the two in step.
//
//   router_topk(logits (T, E), k, ...) -> weights (T, k) float32 (float64 for
//       float64 logits), expert_ids (T, k) int32, counts (E,) int32
//   permute(tokens (T, H), expert_ids (T, k), ...) -> permuted (R, H),
//       dst_rows (T, k) int64, src_rows (R,) int64, offs (L,) int32
//   unpermute(permuted (R, H), dst_rows (T, k), weights (T, k)?) -> (T, H)
//
// permute's row count R is a function of the shapes only (no host sync, no
// data-dependent shapes under torch.compile): the worst case
// R = T * k + L * (alignment - 1), L = number of local experts. Rows in
// [offs[-1], R) are unused and zero.

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <limits>
#include <optional>
#include <string_view>

namespace at::native {

// ---------------------------------------------------------------- router_topk

enum class RouterScore { kSoftmax, kSigmoid, kSoftmaxAfterTopk };

inline RouterScore router_topk_score(std::string_view score_func) {
  if (score_func == "softmax") return RouterScore::kSoftmax;
  if (score_func == "sigmoid") return RouterScore::kSigmoid;
  TORCH_CHECK_VALUE(score_func == "softmax_after_topk",
      "router_topk: score_func must be 'softmax', 'sigmoid' or 'softmax_after_topk', got '", score_func, "'");
  return RouterScore::kSoftmaxAfterTopk;
}

inline bool routing_float_dtype(ScalarType t) {
  return t == kFloat || t == kHalf || t == kBFloat16 || t == kDouble;
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

// -------------------------------------------------------------------- permute

// Group starts are aligned to one of these row counts: 16-byte bf16 strides,
// fp8 rowwise (16), MXFP8 (32), DeepGEMM's contiguous layout (128).
inline bool permute_alignment_ok(int64_t alignment) {
  return alignment >= 1 && alignment <= 128 && (alignment & (alignment - 1)) == 0;
}

// Number of local experts L.
inline int64_t permute_num_local(int64_t num_experts, int64_t first_expert, std::optional<int64_t> num_local) {
  return num_local.value_or(num_experts - first_expert);
}

// Worst-case number of permuted rows: every (token, slot) local, and every
// local group padded by alignment - 1 rows.
inline int64_t permute_num_rows(int64_t tokens, int64_t top_k, int64_t num_local, int64_t alignment) {
  return tokens * top_k + num_local * (alignment - 1);
}

inline void permute_check_inputs(
    const Tensor& tokens,
    const Tensor& expert_ids,
    int64_t num_experts,
    int64_t alignment,
    int64_t first_expert,
    std::optional<int64_t> num_local_experts) {
  TORCH_CHECK_VALUE(tokens.dim() == 2,
      "permute: tokens must be 2-D (tokens, hidden), got ", tokens.dim(), "-D with sizes ", tokens.sizes());
  TORCH_CHECK_VALUE(expert_ids.dim() == 2,
      "permute: expert_ids must be 2-D (tokens, top_k), got ", expert_ids.dim(), "-D with sizes ",
      expert_ids.sizes());
  TORCH_CHECK_VALUE(expert_ids.scalar_type() == kInt || expert_ids.scalar_type() == kLong,
      "permute: expert_ids must be int32 or int64, got ", expert_ids.scalar_type());
  TORCH_CHECK_VALUE(expert_ids.size(0) == tokens.size(0),
      "permute: expert_ids must have one row per token (", tokens.size(0), "), got sizes ", expert_ids.sizes());
  TORCH_CHECK_VALUE(expert_ids.device() == tokens.device(),
      "permute: expert_ids must be on the device of tokens (", tokens.device(), "), got ", expert_ids.device());
  // Expert ids are int32 (router_topk's output) and every local expert has
  // an int32 entry in offs: counts past int32 cannot be honoured.
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(),
      "permute: num_experts must be in [1, 2^31 - 1], got num_experts=", num_experts);
  TORCH_CHECK_VALUE(permute_alignment_ok(alignment),
      "permute: alignment must be a power of two in [1, 128], got alignment=", alignment);
  TORCH_CHECK_VALUE(first_expert >= 0 && first_expert < num_experts,
      "permute: first_expert must be in [0, num_experts=", num_experts, "), got first_expert=", first_expert);
  const int64_t num_local = permute_num_local(num_experts, first_expert, num_local_experts);
  // Compared with num_experts - first_expert, never first_expert + num_local, which can overflow.
  TORCH_CHECK_VALUE(num_local >= 1 && num_local <= num_experts - first_expert,
      "permute: num_local_experts must be in [1, num_experts - first_expert = ", num_experts - first_expert,
      "], got num_local_experts=", num_local);
  // offs is int32, the layout grouped_mm takes. Sizes are bounded first, so
  // the row count below cannot overflow int64.
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
  const int64_t tokens_n = tokens.size(0), top_k = expert_ids.size(1);
  const bool fits = top_k == 0 || tokens_n <= kMaxRows / top_k;
  const int64_t rows = fits ? permute_num_rows(tokens_n, top_k, num_local, alignment) : -1;
  TORCH_CHECK_VALUE(fits && rows <= kMaxRows,
      "permute: the permuted row count tokens * top_k + num_local_experts * (alignment - 1) = ", tokens_n, " * ",
      top_k, " + ", num_local, " * ", alignment - 1, " exceeds the int32 offsets (2^31 - 1)");
}

// ------------------------------------------------------------------ unpermute

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

// Entry points (CPU in MoERouting.cpp, CUDA in cuda/MoERouting.cu).

std::tuple<Tensor, Tensor, Tensor> moe_router_topk_cpu(
    const Tensor& logits, int64_t k, c10::string_view score_func, const std::optional<Tensor>& bias,
    int64_t n_group, int64_t topk_group, bool renormalize, double scaling_factor);
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_cpu(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    std::optional<int64_t> num_local_experts);
Tensor moe_unpermute_cpu(const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights);
std::tuple<Tensor, Tensor> moe_unpermute_backward_cpu(
    const Tensor& grad_output, const Tensor& dst_rows, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted);

// CPU kernels (cpu/MoERoutingKernel.cpp). Outputs are fresh, contiguous and
// fully written by the kernel; inputs are contiguous.
using moe_router_topk_fn = void (*)(
    const Tensor& logits, int64_t k, RouterScore score, const std::optional<Tensor>& bias, int64_t n_group,
    int64_t topk_group, bool renormalize, double scaling_factor, const Tensor& weights, const Tensor& expert_ids,
    const Tensor& counts);
using moe_permute_fn = void (*)(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    const Tensor& permuted, const Tensor& dst_rows, const Tensor& src_rows, const Tensor& offs);
using moe_unpermute_fn = void (*)(
    const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights, const Tensor& out);
using moe_unpermute_backward_fn = void (*)(
    const Tensor& grad_output, const Tensor& dst_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted, const Tensor& grad_permuted, const Tensor& grad_weights);
DECLARE_DISPATCH(moe_router_topk_fn, moe_router_topk_stub);
DECLARE_DISPATCH(moe_permute_fn, moe_permute_stub);
DECLARE_DISPATCH(moe_unpermute_fn, moe_unpermute_stub);
DECLARE_DISPATCH(moe_unpermute_backward_fn, moe_unpermute_backward_stub);

// The CUDA kernels (cuda/MoERouting.cu), declared for every build as ATen
// declares its CUDA entries.
std::tuple<Tensor, Tensor, Tensor> moe_router_topk_cuda(
    const Tensor& logits, int64_t k, c10::string_view score_func, const std::optional<Tensor>& bias,
    int64_t n_group, int64_t topk_group, bool renormalize, double scaling_factor);
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_cuda(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    std::optional<int64_t> num_local_experts);
Tensor moe_unpermute_cuda(const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights);
std::tuple<Tensor, Tensor> moe_unpermute_backward_cuda(
    const Tensor& grad_output, const Tensor& dst_rows, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted);

} // namespace at::native

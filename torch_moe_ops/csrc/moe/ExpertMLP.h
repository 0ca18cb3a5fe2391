#pragma once

// Project-only (csrc/moe/, outside the ATen mirror the upstream series copies):
// the fused experts stay here, the ops they compose go upstream (why:
// patches/manifest.py NOT_UPSTREAMED).
//
// moe_ops::expert_mlp: the routed experts of an MoE layer in one op, built
// for the memory of training (SonicMoE's design):
//
//   h   = tokens[token_of(row)] @ gate_up_proj[e] (+ gate_up_bias[e])   (R, N1)   kept for backward
//   a   = act(h)                                                       (R, I)    recomputed in backward
//   y   = a @ down_proj[e] (+ down_bias[e])                            (R, H)    never kept
//   out = sum over a token's k rows of weight * y, fp32, slot order     (T, H)
//
// The token gather happens inside the GEMM's A-tile packing
// (grouped_mm_gather), so no expert-sorted copy of the tokens exists; the
// backward needs only tokens, the routing and h. The gradient of the routing
// weights is <grad_out[t], y[r]> = <grad_out[t] @ down_proj[e]^T, a[r]> (+ the
// down bias term), so y is never kept or recomputed.
//
// Routing comes from permute: src_rows (R,) = token * k + slot (-1 for
// padding), offs (E,) group ends, dst_rows (T, k) the row of each slot.
// Weights are in grouped_mm's orientation, any strides (transformers' layout
// is a transposed view): gate_up_proj (E, H, N1), down_proj (E, I, H), with
// N1 = 2I for gated activations (gate then up, or interleaved) and I otherwise.

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

namespace at::native {

enum class ExpertActivation { kSwiGLU, kGeGLU, kSwiGLUClamped, kSiLU, kGeLU, kReLU };

inline ExpertActivation expert_activation_from_name(std::string_view name) {
  if (name == "swiglu") return ExpertActivation::kSwiGLU;
  if (name == "geglu") return ExpertActivation::kGeGLU;
  if (name == "swiglu_clamped") return ExpertActivation::kSwiGLUClamped;
  if (name == "silu") return ExpertActivation::kSiLU;
  if (name == "gelu") return ExpertActivation::kGeLU;
  if (name == "relu") return ExpertActivation::kReLU;
  TORCH_CHECK_VALUE(false,
      "expert_mlp: activation must be one of swiglu, geglu, swiglu_clamped, silu, gelu, relu, got \"", name, "\"");
}

inline bool expert_activation_gated(ExpertActivation act) {
  return act == ExpertActivation::kSwiGLU || act == ExpertActivation::kGeGLU ||
      act == ExpertActivation::kSwiGLUClamped;
}

inline bool expert_mlp_dtype_ok(ScalarType t) {
  return t == kFloat || t == kHalf || t == kBFloat16 || t == kDouble;
}

// Everything that does not need tensor values (the routing's values are
// checked where they are read, under expert_mlp's name).
inline void expert_mlp_check_inputs(
    const Tensor& tokens,
    const Tensor& src_rows,
    const Tensor& offs,
    const Tensor& dst_rows,
    const std::optional<Tensor>& weights,
    const Tensor& gate_up_proj,
    const Tensor& down_proj,
    const std::optional<Tensor>& gate_up_bias,
    const std::optional<Tensor>& down_bias,
    std::string_view activation,
    bool gate_up_interleaved) {
  const auto act = expert_activation_from_name(activation);
  TORCH_CHECK_VALUE(!gate_up_interleaved || expert_activation_gated(act),
      "expert_mlp: gate_up_interleaved needs a gated activation, got \"", activation, "\"");
  TORCH_CHECK_VALUE(tokens.dim() == 2, "expert_mlp: tokens must be 2-D (tokens, hidden), got ", tokens.dim(),
      "-D with sizes ", tokens.sizes());
  TORCH_CHECK_VALUE(expert_mlp_dtype_ok(tokens.scalar_type()),
      "expert_mlp: tokens must be float32, float16, bfloat16 or float64, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(src_rows.dim() == 1 && src_rows.scalar_type() == kLong,
      "expert_mlp: src_rows must be 1-D int64 (permute's src_rows), got ", src_rows.dim(), "-D ",
      src_rows.scalar_type());
  TORCH_CHECK_VALUE(dst_rows.dim() == 2 && dst_rows.scalar_type() == kLong && dst_rows.size(0) == tokens.size(0),
      "expert_mlp: dst_rows must be int64 (tokens, top_k) with tokens=", tokens.size(0), ", got ",
      dst_rows.scalar_type(), " of sizes ", dst_rows.sizes());
  TORCH_CHECK_VALUE(dst_rows.size(1) > 0, "expert_mlp: dst_rows must have top_k >= 1, got sizes ", dst_rows.sizes());
  TORCH_CHECK_VALUE(gate_up_proj.dim() == 3 && down_proj.dim() == 3,
      "expert_mlp: gate_up_proj (E, H, N1) and down_proj (E, I, H) must be 3-D, got ", gate_up_proj.sizes(),
      " and ", down_proj.sizes());
  const int64_t experts = gate_up_proj.size(0);
  const int64_t hidden = tokens.size(1);
  const int64_t inter = down_proj.size(1);
  TORCH_CHECK_VALUE(gate_up_proj.size(1) == hidden && down_proj.size(2) == hidden,
      "expert_mlp: gate_up_proj must be (E, H, N1) and down_proj (E, I, H) with H=", hidden, " (tokens ",
      tokens.sizes(), "), got ", gate_up_proj.sizes(), " and ", down_proj.sizes());
  TORCH_CHECK_VALUE(down_proj.size(0) == experts && offs.dim() == 1 && offs.size(0) == experts,
      "expert_mlp: gate_up_proj, down_proj and offs must agree on the number of experts, got ",
      gate_up_proj.sizes(), ", ", down_proj.sizes(), " and offs of sizes ", offs.sizes());
  TORCH_CHECK_VALUE(offs.scalar_type() == kInt, "expert_mlp: offs must be int32, got ", offs.scalar_type());
  const int64_t n1 = expert_activation_gated(act) ? 2 * inter : inter;
  TORCH_CHECK_VALUE(gate_up_proj.size(2) == n1,
      "expert_mlp: gate_up_proj must have N1=", n1, " columns for activation \"", activation, "\" with I=", inter,
      " (down_proj ", down_proj.sizes(), "), got ", gate_up_proj.sizes());
  TORCH_CHECK_VALUE(gate_up_proj.scalar_type() == tokens.scalar_type() &&
      down_proj.scalar_type() == tokens.scalar_type(),
      "expert_mlp: gate_up_proj and down_proj must have the dtype of tokens (", tokens.scalar_type(), "), got ",
      gate_up_proj.scalar_type(), " and ", down_proj.scalar_type());
  if (weights.has_value()) {
    TORCH_CHECK_VALUE(weights->sizes() == dst_rows.sizes(),
        "expert_mlp: weights must have the shape of dst_rows ", dst_rows.sizes(), ", got ", weights->sizes());
    TORCH_CHECK_VALUE(weights->scalar_type() == kFloat || weights->scalar_type() == tokens.scalar_type(),
        "expert_mlp: weights must be float32 or the dtype of tokens (", tokens.scalar_type(), "), got ",
        weights->scalar_type());
  }
  if (gate_up_bias.has_value()) {
    TORCH_CHECK_VALUE(gate_up_bias->dim() == 2 && gate_up_bias->size(0) == experts && gate_up_bias->size(1) == n1,
        "expert_mlp: gate_up_bias must be (E, N1) = (", experts, ", ", n1, "), got ", gate_up_bias->sizes());
    TORCH_CHECK_VALUE(gate_up_bias->scalar_type() == tokens.scalar_type(),
        "expert_mlp: gate_up_bias must have the dtype of tokens (", tokens.scalar_type(), "), got ",
        gate_up_bias->scalar_type());
  }
  if (down_bias.has_value()) {
    TORCH_CHECK_VALUE(down_bias->dim() == 2 && down_bias->size(0) == experts && down_bias->size(1) == hidden,
        "expert_mlp: down_bias must be (E, H) = (", experts, ", ", hidden, "), got ", down_bias->sizes());
    TORCH_CHECK_VALUE(down_bias->scalar_type() == tokens.scalar_type(),
        "expert_mlp: down_bias must have the dtype of tokens (", tokens.scalar_type(), "), got ",
        down_bias->scalar_type());
  }
  for (const Tensor* t : {&src_rows, &offs, &dst_rows, &gate_up_proj, &down_proj}) {
    TORCH_CHECK_VALUE(t->device() == tokens.device(), "expert_mlp: every input must be on the device of tokens (",
        tokens.device(), "), got one on ", t->device());
  }
  for (const auto* t : {&weights, &gate_up_bias, &down_bias}) {
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device() == tokens.device(),
        "expert_mlp: every input must be on the device of tokens (", tokens.device(), "), got one on ",
        (*t)->device());
  }
}

// Forward: (out (T, H), h (R, N1)).
std::tuple<Tensor, Tensor> expert_mlp(
    const Tensor& tokens,
    const Tensor& src_rows,
    const Tensor& offs,
    const Tensor& dst_rows,
    const std::optional<Tensor>& weights,
    const Tensor& gate_up_proj,
    const Tensor& down_proj,
    const std::optional<Tensor>& gate_up_bias,
    const std::optional<Tensor>& down_bias,
    c10::string_view activation,
    bool gate_up_interleaved,
    double swiglu_alpha,
    double swiglu_limit);

// Backward from what the forward kept. output_mask: tokens, weights,
// gate_up (and its bias), down (and its bias); gradients not asked for come
// back as empty tensors. Returns grad tokens, weights, gate_up_proj,
// down_proj, gate_up_bias, down_bias (the weight gradients in the strides of
// transformers' layout when the weights are given as its transposed views).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> expert_mlp_backward(
    const Tensor& grad_out,
    const Tensor& tokens,
    const Tensor& src_rows,
    const Tensor& offs,
    const Tensor& dst_rows,
    const std::optional<Tensor>& weights,
    const Tensor& gate_up_proj,
    const Tensor& down_proj,
    const std::optional<Tensor>& gate_up_bias,
    const std::optional<Tensor>& down_bias,
    const Tensor& h,
    c10::string_view activation,
    bool gate_up_interleaved,
    double swiglu_alpha,
    double swiglu_limit,
    std::array<bool, 4> output_mask);

} // namespace at::native

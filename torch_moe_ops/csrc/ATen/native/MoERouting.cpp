// CPU entry points of the routing ops: validate, allocate, run the kernels.

#include <ATen/native/MoERouting.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

namespace at::native {

DEFINE_DISPATCH(moe_router_topk_stub);
DEFINE_DISPATCH(moe_permute_stub);
DEFINE_DISPATCH(moe_unpermute_stub);
DEFINE_DISPATCH(moe_unpermute_backward_stub);

std::tuple<Tensor, Tensor, Tensor> moe_router_topk_cpu(
    const Tensor& logits, int64_t k, c10::string_view score_func, const std::optional<Tensor>& bias,
    int64_t n_group, int64_t topk_group, bool renormalize, double scaling_factor) {
  router_topk_check_inputs(logits, k, score_func, bias, n_group, topk_group);
  const int64_t tokens = logits.size(0);
  const int64_t experts = logits.size(1);
  Tensor weights = at::empty({tokens, k}, logits.options().dtype(router_topk_weights_dtype(logits.scalar_type())));
  Tensor expert_ids = at::empty({tokens, k}, logits.options().dtype(kInt));
  Tensor counts = at::empty({experts}, logits.options().dtype(kInt));
  std::optional<Tensor> bias_c = bias.has_value() ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
  moe_router_topk_stub(kCPU, logits.contiguous(), k, router_topk_score(score_func), bias_c, n_group, topk_group,
                         renormalize, scaling_factor, weights, expert_ids, counts);
  return {weights, expert_ids, counts};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_cpu(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    std::optional<int64_t> num_local_experts) {
  permute_check_inputs(tokens, expert_ids, num_experts, alignment, first_expert, num_local_experts);
  const int64_t num_local = permute_num_local(num_experts, first_expert, num_local_experts);
  const int64_t rows = permute_num_rows(tokens.size(0), expert_ids.size(1), num_local, alignment);
  // Every element of the outputs is written by the kernel (padding and unused
  // rows are zeroed there, in the same pass as the copy): no zero-fill here.
  Tensor permuted = at::empty({rows, tokens.size(1)}, tokens.options());
  Tensor dst_rows = at::empty(expert_ids.sizes(), expert_ids.options().dtype(kLong));
  Tensor src_rows = at::empty({rows}, expert_ids.options().dtype(kLong));
  Tensor offs = at::empty({num_local}, expert_ids.options().dtype(kInt));
  // The kernel copies whole rows: a row-strided tokens view is read in place,
  // anything else is made row-contiguous once.
  const Tensor tokens_c = tokens.stride(1) == 1 ? tokens : tokens.contiguous();
  moe_permute_stub(kCPU, tokens_c, expert_ids.contiguous(), num_experts, alignment, first_expert, permuted, dst_rows,
                     src_rows, offs);
  return {permuted, dst_rows, src_rows, offs};
}

Tensor moe_unpermute_cpu(const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights) {
  unpermute_check_inputs(permuted, dst_rows, weights);
  Tensor out = at::empty({dst_rows.size(0), permuted.size(1)}, permuted.options());
  std::optional<Tensor> weights_c = weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
  const Tensor permuted_c = permuted.stride(1) == 1 ? permuted : permuted.contiguous();
  moe_unpermute_stub(kCPU, permuted_c, dst_rows.contiguous(), weights_c, out);
  return out;
}

std::tuple<Tensor, Tensor> moe_unpermute_backward_cpu(
    const Tensor& grad_output, const Tensor& dst_rows, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted) {
  unpermute_backward_check_inputs(grad_output, dst_rows, num_rows, weights, permuted);
  const Tensor grad_c = grad_output.contiguous();
  // Rows no (token, slot) maps to (padding, unused tail) get a zero gradient;
  // the kernel writes every mapped row once.
  Tensor grad_permuted = at::zeros({num_rows, grad_output.size(1)}, grad_output.options());
  Tensor grad_weights;
  if (permuted.has_value()) {
    const auto w_dtype = weights.has_value() ? weights->scalar_type() : kFloat;
    grad_weights = at::empty(dst_rows.sizes(), grad_output.options().dtype(w_dtype));
  } else {
    grad_weights = at::empty({0}, grad_output.options().dtype(kFloat));
  }
  std::optional<Tensor> weights_c = weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
  std::optional<Tensor> permuted_c =
      permuted.has_value() ? std::optional<Tensor>(permuted->contiguous()) : std::nullopt;
  moe_unpermute_backward_stub(kCPU, grad_c, dst_rows.contiguous(), weights_c, permuted_c, grad_permuted, grad_weights);
  return {grad_permuted, grad_weights};
}

} // namespace at::native

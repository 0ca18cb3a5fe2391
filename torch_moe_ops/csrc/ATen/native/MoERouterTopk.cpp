// CPU entry point of _moe_router_topk: validate, allocate, run the kernel.

#include <ATen/native/MoERouterTopk.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace at::native {

DEFINE_DISPATCH(moe_router_topk_stub);

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

} // namespace at::native

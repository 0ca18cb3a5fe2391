// CUDA entry point and kernel of _moe_router_topk: a token per thread
// (grid-stride), top-k by insertion over the experts. No host syncs; the
// counts are integer atomics, so they do not depend on the order. The kernel
// is a shell around its body in cuda/MoERouterTopk.cuh, which the CPU build
// compiles too: test/test_routing_device_logic.py runs it over the whole
// launch grid on the host against the CPU kernel.

#include <ATen/native/MoERouterTopk.h>
#include <ATen/native/cuda/MoERouterTopk.cuh>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

namespace at::native {
namespace {

using namespace moe_cuda;

template <typename scalar_t, typename acc_t, typename bias_t>
__global__ void router_topk_kernel(RouterTopkArgs<scalar_t, acc_t, bias_t> args, int32_t* counts) {
  router_topk_thread(this_thread(), args, [counts](int32_t e) { atomicAdd(counts + e, 1); });
}

} // namespace

std::tuple<Tensor, Tensor, Tensor> moe_router_topk_cuda(
    const Tensor& logits_in, int64_t k, c10::string_view score_func, const std::optional<Tensor>& bias,
    int64_t n_group, int64_t topk_group, bool renormalize, double scaling_factor) {
  router_topk_check_inputs(logits_in, k, score_func, bias, n_group, topk_group);
  const Tensor logits = logits_in.contiguous();
  const int64_t tokens = logits.size(0);
  const int64_t experts = logits.size(1);
  Tensor weights = at::empty({tokens, k}, logits.options().dtype(router_topk_weights_dtype(logits.scalar_type())));
  Tensor ids = at::empty({tokens, k}, logits.options().dtype(kInt));
  Tensor counts = at::zeros({experts}, logits.options().dtype(kInt));
  if (tokens == 0) return {weights, ids, counts};
  const auto kind = router_topk_score(score_func);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  const Launch grid = router_topk_launch(tokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, logits.scalar_type(), "moe_router_topk_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto launch = [&](const auto* bias_ptr) {
      using bias_t = std::remove_cv_t<std::remove_pointer_t<decltype(bias_ptr)>>;
      const RouterTopkArgs<scalar_t, acc_t, bias_t> args{
          logits.const_data_ptr<scalar_t>(), tokens, experts, k, kind, bias_ptr, n_group, topk_group, renormalize,
          static_cast<acc_t>(scaling_factor), weights.mutable_data_ptr<acc_t>(), ids.mutable_data_ptr<int32_t>()};
      router_topk_kernel<<<grid.blocks, grid.threads, 0, stream>>>(args, counts.mutable_data_ptr<int32_t>());
    };
    if (!bias_c.defined()) launch(static_cast<const float*>(nullptr));
    else if (bias_c.scalar_type() == kFloat) launch(bias_c.const_data_ptr<float>());
    else launch(bias_c.const_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids, counts};
}

} // namespace at::native

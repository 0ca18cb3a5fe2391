// CUDA entry points and kernels of _moe_unpermute and its backward, with no
// host syncs and no atomics on data: unpermute is one block per token,
// threads across the hidden dimension, summing the token's rows in slot order
// (deterministic); the backward sums each row's gradient over the slots that
// read it, in slot order, and the weights' gradient as a fixed-order block
// reduction. The kernels are shells around the bodies in
// cuda/MoEUnpermute.cuh, which the CPU build compiles too:
// test/test_routing_device_logic.py runs them over the whole launch grid on
// the host against the CPU kernels.

#include <ATen/native/MoEUnpermute.h>
#include <ATen/native/MoEUnpermuteBackward.h>
#include <ATen/native/cuda/MoEUnpermute.cuh>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

namespace at::native {
namespace {

using namespace moe_cuda;

template <typename scalar_t, typename acc_t>
WeightReader<scalar_t, acc_t> weight_reader(const std::optional<Tensor>& weights) {
  WeightReader<scalar_t, acc_t> r{nullptr, nullptr};
  if (weights.has_value()) {
    if (weights->scalar_type() == kFloat) r.f32 = weights->const_data_ptr<float>();
    else r.same = weights->const_data_ptr<scalar_t>();
  }
  return r;
}

template <typename scalar_t, typename acc_t>
__global__ void unpermute_kernel(
    const scalar_t* in, int64_t in_stride, int64_t rows, const int64_t* dst, int64_t top_k, int64_t hidden,
    WeightReader<scalar_t, acc_t> w, bool weighted, scalar_t* out) {
  const bool ok = unpermute_thread(this_thread(), in, in_stride, rows, dst, top_k, hidden, w, weighted, out);
  CUDA_KERNEL_ASSERT(ok && "unpermute: dst_rows must be -1 or a row of permuted");
}

template <typename scalar_t, typename acc_t>
__global__ void unpermute_backward_rows_kernel(
    const scalar_t* g, const int64_t* sorted_rows, const int64_t* slot_of, int64_t n, int64_t rows,
    int64_t top_k, int64_t hidden, WeightReader<scalar_t, acc_t> w, bool weighted, scalar_t* gp) {
  const bool ok =
      unpermute_backward_rows_thread(this_thread(), g, sorted_rows, slot_of, n, rows, top_k, hidden, w, weighted, gp);
  CUDA_KERNEL_ASSERT(ok && "unpermute_backward: dst_rows must be -1 or a row of permuted");
}

// The weight gradient <grad_output[t], permuted[r]> as a block reduction in
// a fixed tree order.
template <typename scalar_t, typename acc_t, typename w_out_t>
__global__ void unpermute_backward_weights_kernel(
    const scalar_t* g, const int64_t* dst, int64_t top_k, int64_t hidden, const scalar_t* x, w_out_t* gw) {
  __shared__ acc_t partial[kThreads];
  const ThreadPos pos = this_thread();
  partial[pos.thread] = unpermute_backward_weights_partial<scalar_t, acc_t>(pos, g, dst, top_k, hidden, x);
  __syncthreads();
  for (int64_t s = pos.threads / 2; s > 0; s /= 2) {
    block_tree_reduce_step(pos, partial, s);
    __syncthreads();
  }
  if (pos.thread == 0) gw[pos.block] = static_cast<w_out_t>(partial[0]);
}

} // namespace

Tensor moe_unpermute_cuda(const Tensor& permuted_in, const Tensor& dst_rows_in, const std::optional<Tensor>& weights) {
  unpermute_check_inputs(permuted_in, dst_rows_in, weights);
  const Tensor permuted = permuted_in.stride(1) == 1 ? permuted_in : permuted_in.contiguous();
  const Tensor dst_rows = dst_rows_in.contiguous();
  const std::optional<Tensor> weights_c =
      weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
  const int64_t tokens = dst_rows.size(0);
  const int64_t hidden = permuted.size(1);
  Tensor out = at::empty({tokens, hidden}, permuted.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, permuted.scalar_type(), "moe_unpermute_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Launch grid = unpermute_launch(tokens);
    unpermute_kernel<scalar_t, acc_t><<<grid.blocks, grid.threads, 0, stream>>>(
        permuted.const_data_ptr<scalar_t>(), permuted.stride(0), permuted.size(0),
        dst_rows.const_data_ptr<int64_t>(), dst_rows.size(1), hidden, weight_reader<scalar_t, acc_t>(weights_c),
        weights_c.has_value(), out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<Tensor, Tensor> moe_unpermute_backward_cuda(
    const Tensor& grad_output_in, const Tensor& dst_rows_in, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted_in) {
  unpermute_backward_check_inputs(grad_output_in, dst_rows_in, num_rows, weights, permuted_in);
  const Tensor grad_output = grad_output_in.contiguous();
  const Tensor dst_rows = dst_rows_in.contiguous();
  const std::optional<Tensor> weights_c =
      weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
  // Rows no (token, slot) maps to get a zero gradient.
  Tensor grad_permuted = at::zeros({num_rows, grad_output.size(1)}, grad_output.options());
  Tensor permuted, grad_weights;
  if (permuted_in.has_value()) {
    permuted = permuted_in->contiguous();
    grad_weights = at::empty(dst_rows.sizes(),
                             grad_output.options().dtype(weights.has_value() ? weights->scalar_type() : kFloat));
  } else {
    grad_weights = at::empty({0}, grad_output.options().dtype(kFloat));
  }
  if (dst_rows.numel() == 0) return {grad_permuted, grad_weights};
  // Slots in the order of the rows they read (stable: slot order within a row).
  const auto [sorted_rows, slot_of] = at::sort(dst_rows.view({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int64_t n = dst_rows.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  const Launch grid = unpermute_backward_launch(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, grad_output.scalar_type(), "moe_unpermute_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    unpermute_backward_rows_kernel<scalar_t, acc_t><<<grid.blocks, grid.threads, 0, stream>>>(
        grad_output.const_data_ptr<scalar_t>(), sorted_rows.const_data_ptr<int64_t>(),
        slot_of.const_data_ptr<int64_t>(), n, num_rows, dst_rows.size(1), grad_output.size(1),
        weight_reader<scalar_t, acc_t>(weights_c), weights_c.has_value(), grad_permuted.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto launch = [&](auto* gw) {
      using w_out_t = std::remove_pointer_t<decltype(gw)>;
      unpermute_backward_weights_kernel<scalar_t, acc_t, w_out_t><<<grid.blocks, grid.threads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), dst_rows.const_data_ptr<int64_t>(), dst_rows.size(1),
          grad_output.size(1), permuted.const_data_ptr<scalar_t>(), gw);
    };
    if (!permuted.defined()) return;
    if (grad_weights.scalar_type() == kFloat) launch(grad_weights.mutable_data_ptr<float>());
    else launch(grad_weights.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_permuted, grad_weights};
}

} // namespace at::native

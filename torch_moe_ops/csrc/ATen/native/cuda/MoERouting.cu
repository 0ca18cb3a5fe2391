// CUDA entry points and kernels of the routing ops.
//
// No host syncs: permute's output size comes from the shapes (see
// MoERouting.h), its offsets are computed on the device, and expert ids are
// checked with a device-side assert. Results are deterministic: the permute
// ranks are computed per chunk of (token, slot) pairs in order, and the
// combine is a per-token gather in slot order (no atomics on data).
//
//   router_topk: a token per thread (grid-stride), top-k by insertion over
//     the experts.
//   permute: (1) per-chunk histograms, (2) one block scans experts x chunks
//     into group starts and offs, (3) per-chunk row assignment in (token,
//     slot) order, (4) a row gather over destination rows that also zeroes
//     padding and unused rows: every output row is written once.
//   unpermute: one block per token, threads across the hidden dimension.
//
// The kernels are shells around the bodies in cuda/MoERouting.cuh, which the
// CPU build compiles too: test/test_routing_device_logic.py runs them over
// the whole launch grid on the host against the CPU kernels.

#include <ATen/native/MoERouting.h>
#include <ATen/native/cuda/MoERouting.cuh>

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

template <typename scalar_t, typename acc_t, typename bias_t>
__global__ void router_topk_kernel(RouterTopkArgs<scalar_t, acc_t, bias_t> args, int32_t* counts) {
  router_topk_thread(this_thread(), args, [counts](int32_t e) { atomicAdd(counts + e, 1); });
}

__global__ void fill_minus_one_kernel(int64_t* p, int64_t n) {
  fill_minus_one_thread(this_thread(), p, n);
}

template <typename index_t>
__global__ void permute_histogram_kernel(
    const index_t* ids, int64_t pairs, int64_t num_experts, int64_t first_expert, int64_t num_local,
    int32_t* hist /* chunks x L */) {
  const int64_t bad = permute_histogram_thread(this_thread(), ids, pairs, num_experts, first_expert, num_local, hist);
  CUDA_KERNEL_ASSERT(bad < 0 && "permute: expert_ids must be in [0, num_experts)");
}

__global__ void permute_scan_kernel(
    int32_t* hist, int64_t chunks, int64_t num_local, int64_t alignment, int32_t* offs, int32_t* group_start) {
  const ThreadPos pos = this_thread();
  permute_scan_counts_thread(pos, hist, chunks, num_local, offs);
  __syncthreads();
  permute_scan_place_thread(pos, num_local, alignment, offs, group_start);
}

template <typename index_t>
__global__ void permute_assign_kernel(
    const index_t* ids, int64_t pairs, int64_t first_expert, int64_t num_local, const int32_t* hist,
    const int32_t* group_start, int64_t* dst, int64_t* src) {
  permute_assign_thread(this_thread(), ids, pairs, first_expert, num_local, hist, group_start, dst, src);
}

__global__ void permute_gather_kernel(
    const char* tokens, int64_t in_stride_bytes, int64_t row_bytes, int64_t top_k, const int64_t* src, char* out,
    int64_t rows) {
  permute_gather_thread(this_thread(), tokens, in_stride_bytes, row_bytes, top_k, src, out, rows);
}

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

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_cuda(
    const Tensor& tokens_in, const Tensor& expert_ids_in, int64_t num_experts, int64_t alignment,
    int64_t first_expert, std::optional<int64_t> num_local_experts) {
  permute_check_inputs(tokens_in, expert_ids_in, num_experts, alignment, first_expert, num_local_experts);
  const Tensor tokens = tokens_in.stride(1) == 1 ? tokens_in : tokens_in.contiguous();
  const Tensor expert_ids = expert_ids_in.contiguous();
  const int64_t num_local = permute_num_local(num_experts, first_expert, num_local_experts);
  const int64_t top_k = expert_ids.size(1);
  const int64_t pairs = expert_ids.numel();
  const int64_t rows = permute_num_rows(tokens.size(0), top_k, num_local, alignment);
  Tensor permuted = at::empty({rows, tokens.size(1)}, tokens.options());
  Tensor dst_rows = at::empty(expert_ids.sizes(), expert_ids.options().dtype(kLong));
  Tensor src_rows = at::empty({rows}, expert_ids.options().dtype(kLong));
  Tensor offs = at::empty({num_local}, expert_ids.options().dtype(kInt));
  const int64_t chunks = permute_num_chunks(pairs);
  Tensor hist = at::zeros({chunks, num_local}, expert_ids.options().dtype(kInt));
  Tensor group_start = at::empty({num_local}, expert_ids.options().dtype(kInt));
  auto stream = at::cuda::getCurrentCUDAStream();

  if (rows > 0) {
    const Launch fill = fill_minus_one_launch(rows);
    fill_minus_one_kernel<<<fill.blocks, fill.threads, 0, stream>>>(src_rows.mutable_data_ptr<int64_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_permute_cuda", [&] {
    const index_t* ids = expert_ids.const_data_ptr<index_t>();
    const Launch per_chunk = permute_chunks_launch(pairs), scan = permute_scan_launch();
    permute_histogram_kernel<index_t><<<per_chunk.blocks, per_chunk.threads, 0, stream>>>(
        ids, pairs, num_experts, first_expert, num_local, hist.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    permute_scan_kernel<<<scan.blocks, scan.threads, 0, stream>>>(
        hist.mutable_data_ptr<int32_t>(), chunks, num_local, alignment, offs.mutable_data_ptr<int32_t>(),
        group_start.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    permute_assign_kernel<index_t><<<per_chunk.blocks, per_chunk.threads, 0, stream>>>(
        ids, pairs, first_expert, num_local, hist.const_data_ptr<int32_t>(), group_start.const_data_ptr<int32_t>(),
        dst_rows.mutable_data_ptr<int64_t>(), src_rows.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (rows > 0 && tokens.size(1) > 0) {
    const Launch gather = permute_gather_launch(rows);
    permute_gather_kernel<<<gather.blocks, gather.threads, 0, stream>>>(
        static_cast<const char*>(tokens.const_data_ptr()), tokens.stride(0) * tokens.element_size(),
        tokens.size(1) * tokens.element_size(), top_k, src_rows.const_data_ptr<int64_t>(),
        static_cast<char*>(permuted.mutable_data_ptr()), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {permuted, dst_rows, src_rows, offs};
}

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

// Test-only ops, torch.ops.moe_ops_testing.*: the CUDA kernels of the routing
// ops, run on the CPU; grouped_mm's CUDA entry (its fallback) and its choice
// of kernel, on CPU tensors.
//
// Each routing op mirrors its CUDA entry (native/cuda/MoE{RouterTopk,Permute,Unpermute}.cu):
// the same checks, allocations, arguments and launch sequence, with every
// launch replaced by a walk over its grid, block by block and thread by
// thread, calling the kernel's body (native/cuda/*.cuh, compiled here by the
// host compiler). Phases that the kernel separates with __syncthreads run one
// after another over the whole block; atomicAdd becomes an increment. What
// the walk proves and what it cannot is stated in
// test/test_routing_device_logic.py.
//
// max_blocks caps the grid of the grid-stride kernels below what the entry
// uses (kMaxGridBlocks), so that small inputs reach their stride loops. Not
// part of the moe_ops library and not carried upstream.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEPermute.h>
#include <ATen/native/MoERouterTopk.h>
#include <ATen/native/MoEUnpermute.h>
#include <ATen/native/MoEUnpermuteBackward.h>
#include <ATen/native/cuda/GroupedMM.h>
#include <ATen/native/cuda/MoEPermute.cuh>
#include <ATen/native/cuda/MoERouterTopk.cuh>
#include <ATen/native/cuda/MoEUnpermute.cuh>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace at::native {
namespace {

using namespace moe_cuda;

// Every thread of a launch, in order.
template <typename Fn>
void for_each_thread(Launch grid, Fn&& fn) {
  for (int64_t b = 0; b < grid.blocks; ++b) {
    for (int64_t t = 0; t < grid.threads; ++t) {
      fn(ThreadPos{b, grid.threads, t, grid.blocks});
    }
  }
}

// Every thread of one block, in order.
template <typename Fn>
void for_each_thread_of_block(Launch grid, int64_t b, Fn&& fn) {
  for (int64_t t = 0; t < grid.threads; ++t) {
    fn(ThreadPos{b, grid.threads, t, grid.blocks});
  }
}

void check_max_blocks(int64_t max_blocks) {
  TORCH_CHECK_VALUE(max_blocks >= 1 && max_blocks <= kMaxGridBlocks,
      "moe_ops_testing: max_blocks must be in [1, ", kMaxGridBlocks, "], got max_blocks=", max_blocks);
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

// The assert message of a dst_rows entry outside [-1, rows), where the
// device's CUDA_KERNEL_ASSERT would fire.
[[noreturn]] void bad_dst_row(const char* op) {
  TORCH_CHECK_VALUE(false, op, ": dst_rows must be -1 or a row of permuted (a kernel assert on the device)");
}

std::tuple<Tensor, Tensor, Tensor> router_topk_on_host(
    const Tensor& logits_in, int64_t k, c10::string_view score_func, const std::optional<Tensor>& bias,
    int64_t n_group, int64_t topk_group, bool renormalize, double scaling_factor, int64_t max_blocks) {
  check_max_blocks(max_blocks);
  router_topk_check_inputs(logits_in, k, score_func, bias, n_group, topk_group);
  const Tensor logits = logits_in.contiguous();
  const int64_t tokens = logits.size(0);
  const int64_t experts = logits.size(1);
  Tensor weights = at::empty({tokens, k}, logits.options().dtype(router_topk_weights_dtype(logits.scalar_type())));
  Tensor ids = at::empty({tokens, k}, logits.options().dtype(kInt));
  Tensor counts = at::zeros({experts}, logits.options().dtype(kInt));
  if (tokens == 0) return {weights, ids, counts};
  const auto kind = router_topk_score(score_func);
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  const Launch grid = router_topk_launch(tokens, max_blocks);
  int32_t* c = counts.mutable_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, logits.scalar_type(), "router_topk_on_host", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto launch = [&](const auto* bias_ptr) {
      using bias_t = std::remove_cv_t<std::remove_pointer_t<decltype(bias_ptr)>>;
      const RouterTopkArgs<scalar_t, acc_t, bias_t> args{
          logits.const_data_ptr<scalar_t>(), tokens, experts, k, kind, bias_ptr, n_group, topk_group, renormalize,
          static_cast<acc_t>(scaling_factor), weights.mutable_data_ptr<acc_t>(), ids.mutable_data_ptr<int32_t>()};
      for_each_thread(grid, [&](ThreadPos pos) { router_topk_thread(pos, args, [c](int32_t e) { ++c[e]; }); });
    };
    if (!bias_c.defined()) launch(static_cast<const float*>(nullptr));
    else if (bias_c.scalar_type() == kFloat) launch(bias_c.const_data_ptr<float>());
    else launch(bias_c.const_data_ptr<scalar_t>());
  });
  return {weights, ids, counts};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> permute_on_host(
    const Tensor& tokens_in, const Tensor& expert_ids_in, int64_t num_experts, int64_t alignment,
    int64_t first_expert, std::optional<int64_t> num_local_experts, int64_t max_blocks) {
  check_max_blocks(max_blocks);
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

  if (rows > 0) {
    int64_t* src = src_rows.mutable_data_ptr<int64_t>();
    for_each_thread(fill_minus_one_launch(rows, max_blocks), [&](ThreadPos pos) { fill_minus_one_thread(pos, src, rows); });
  }
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "permute_on_host", [&] {
    const index_t* ids = expert_ids.const_data_ptr<index_t>();
    const Launch per_chunk = permute_chunks_launch(pairs), scan = permute_scan_launch();
    int32_t* h = hist.mutable_data_ptr<int32_t>();
    int64_t bad = -1;
    for_each_thread(per_chunk, [&](ThreadPos pos) {
      const int64_t b = permute_histogram_thread(pos, ids, pairs, num_experts, first_expert, num_local, h);
      if (bad < 0) bad = b;
    });
    TORCH_CHECK_VALUE(bad < 0, "permute: expert_ids must be in [0, num_experts=", num_experts, "), got expert_ids[",
                      bad / top_k, ", ", bad % top_k, "]=", static_cast<int64_t>(ids[std::max<int64_t>(bad, 0)]));
    int32_t* o = offs.mutable_data_ptr<int32_t>();
    int32_t* gs = group_start.mutable_data_ptr<int32_t>();
    for_each_thread_of_block(scan, 0, [&](ThreadPos pos) { permute_scan_counts_thread(pos, h, chunks, num_local, o); });
    // __syncthreads()
    for_each_thread_of_block(scan, 0, [&](ThreadPos pos) { permute_scan_place_thread(pos, num_local, alignment, o, gs); });
    int64_t* dst = dst_rows.mutable_data_ptr<int64_t>();
    int64_t* src = src_rows.mutable_data_ptr<int64_t>();
    for_each_thread(per_chunk, [&](ThreadPos pos) {
      permute_assign_thread(pos, ids, pairs, first_expert, num_local, h, gs, dst, src);
    });
  });
  if (rows > 0 && tokens.size(1) > 0) {
    const char* in = static_cast<const char*>(tokens.const_data_ptr());
    char* out = static_cast<char*>(permuted.mutable_data_ptr());
    const int64_t in_stride_bytes = tokens.stride(0) * tokens.element_size();
    const int64_t row_bytes = tokens.size(1) * tokens.element_size();
    const int64_t* src = src_rows.const_data_ptr<int64_t>();
    for_each_thread(permute_gather_launch(rows, max_blocks), [&](ThreadPos pos) {
      permute_gather_thread(pos, in, in_stride_bytes, row_bytes, top_k, src, out, rows);
    });
  }
  return {permuted, dst_rows, src_rows, offs};
}

Tensor unpermute_on_host(const Tensor& permuted_in, const Tensor& dst_rows_in, const std::optional<Tensor>& weights) {
  unpermute_check_inputs(permuted_in, dst_rows_in, weights);
  const Tensor permuted = permuted_in.stride(1) == 1 ? permuted_in : permuted_in.contiguous();
  const Tensor dst_rows = dst_rows_in.contiguous();
  const std::optional<Tensor> weights_c =
      weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
  const int64_t tokens = dst_rows.size(0);
  const int64_t hidden = permuted.size(1);
  Tensor out = at::empty({tokens, hidden}, permuted.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, permuted.scalar_type(), "unpermute_on_host", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = weight_reader<scalar_t, acc_t>(weights_c);
    bool ok = true;
    for_each_thread(unpermute_launch(tokens), [&](ThreadPos pos) {
      ok &= unpermute_thread(pos, permuted.const_data_ptr<scalar_t>(), permuted.stride(0), permuted.size(0),
                             dst_rows.const_data_ptr<int64_t>(), dst_rows.size(1), hidden, w, weights_c.has_value(),
                             out.mutable_data_ptr<scalar_t>());
    });
    if (!ok) bad_dst_row("unpermute");
  });
  return out;
}

std::tuple<Tensor, Tensor> unpermute_backward_on_host(
    const Tensor& grad_output_in, const Tensor& dst_rows_in, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted_in) {
  unpermute_backward_check_inputs(grad_output_in, dst_rows_in, num_rows, weights, permuted_in);
  const Tensor grad_output = grad_output_in.contiguous();
  const Tensor dst_rows = dst_rows_in.contiguous();
  const std::optional<Tensor> weights_c =
      weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
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
  const auto [sorted_rows, slot_of] = at::sort(dst_rows.view({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int64_t n = dst_rows.numel();
  const Launch grid = unpermute_backward_launch(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, grad_output.scalar_type(), "unpermute_backward_on_host", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    const int64_t top_k = dst_rows.size(1), hidden = grad_output.size(1);
    bool ok = true;
    for_each_thread(grid, [&](ThreadPos pos) {
      ok &= unpermute_backward_rows_thread(pos, g, sorted_rows.const_data_ptr<int64_t>(),
                                           slot_of.const_data_ptr<int64_t>(), n, num_rows, top_k, hidden,
                                           weight_reader<scalar_t, acc_t>(weights_c), weights_c.has_value(),
                                           grad_permuted.mutable_data_ptr<scalar_t>());
    });
    if (!ok) bad_dst_row("unpermute_backward");
    if (!permuted.defined()) return;
    const auto run = [&](auto* gw) {
      using w_out_t = std::remove_pointer_t<decltype(gw)>;
      std::vector<acc_t> partial(grid.threads);  // the block's shared memory
      for (int64_t b = 0; b < grid.blocks; ++b) {
        for_each_thread_of_block(grid, b, [&](ThreadPos pos) {
          partial[pos.thread] = unpermute_backward_weights_partial<scalar_t, acc_t>(
              pos, g, dst_rows.const_data_ptr<int64_t>(), top_k, hidden, permuted.const_data_ptr<scalar_t>());
        });
        for (int64_t s = grid.threads / 2; s > 0; s /= 2) {  // a __syncthreads() after each level
          for_each_thread_of_block(grid, b, [&](ThreadPos pos) { block_tree_reduce_step(pos, partial.data(), s); });
        }
        gw[b] = static_cast<w_out_t>(partial[0]);
      }
    };
    if (grad_weights.scalar_type() == kFloat) run(grad_weights.mutable_data_ptr<float>());
    else run(grad_weights.mutable_data_ptr<scalar_t>());
  });
  return {grad_permuted, grad_weights};
}

// grouped_mm's CUDA entry's choice between upstream's fast kernel and the
// fallback, device_ok standing for the device query.
bool grouped_mm_cuda_fast_path_on_host(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs,
                                       const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype,
                                       bool device_ok) {
  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);
  return grouped_mm_cuda_fast_path(mat_a, mat_b, offs, bias, out_dtype, device_ok);
}

#ifdef TORCH_MOE_OPS_WITH_CUDA
// grouped_mm's CUDA entry (native/cuda/GroupedMM.cpp) itself: on CPU tensors
// it takes the fallback, whose ATen calls run on the CPU.
Tensor grouped_mm_cuda_entry_on_host(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs,
                                     const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype) {
  return grouped_mm_cuda(mat_a, mat_b, offs, bias, out_dtype);
}
#endif

} // namespace
} // namespace at::native

TORCH_LIBRARY(moe_ops_testing, m) {
  m.def(
      "router_topk_on_host(Tensor logits, int k, str score_func=\"softmax\", Tensor? bias=None, int n_group=1, "
      "int topk_group=1, bool renormalize=False, float scaling_factor=1.0, int max_blocks=65535) -> "
      "(Tensor weights, Tensor expert_ids, Tensor counts)");
  m.def(
      "permute_on_host(Tensor tokens, Tensor expert_ids, int num_experts, int alignment=1, int first_expert=0, "
      "int? num_local_experts=None, int max_blocks=65535) -> (Tensor permuted, Tensor dst_rows, Tensor src_rows, "
      "Tensor offs)");
  m.def("unpermute_on_host(Tensor permuted, Tensor dst_rows, Tensor? weights=None) -> Tensor");
  m.def(
      "unpermute_backward_on_host(Tensor grad_output, Tensor dst_rows, SymInt num_rows, Tensor? weights=None, "
      "Tensor? permuted=None) -> (Tensor grad_permuted, Tensor grad_weights)");
  m.def(
      "grouped_mm_cuda_fast_path_on_host(Tensor mat_a, Tensor mat_b, Tensor? offs=None, Tensor? bias=None, "
      "ScalarType? out_dtype=None, bool device_ok=True) -> bool");
#ifdef TORCH_MOE_OPS_WITH_CUDA
  m.def(
      "grouped_mm_cuda_entry_on_host(Tensor mat_a, Tensor mat_b, Tensor? offs=None, Tensor? bias=None, "
      "ScalarType? out_dtype=None) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(moe_ops_testing, CPU, m) {
  m.impl("router_topk_on_host", &at::native::router_topk_on_host);
  m.impl("permute_on_host", &at::native::permute_on_host);
  m.impl("unpermute_on_host", &at::native::unpermute_on_host);
  m.impl("unpermute_backward_on_host", &at::native::unpermute_backward_on_host);
  m.impl("grouped_mm_cuda_fast_path_on_host", &at::native::grouped_mm_cuda_fast_path_on_host);
#ifdef TORCH_MOE_OPS_WITH_CUDA
  m.impl("grouped_mm_cuda_entry_on_host", &at::native::grouped_mm_cuda_entry_on_host);
#endif
}

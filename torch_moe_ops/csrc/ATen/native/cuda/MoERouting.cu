// CUDA entry points and kernels of the routing ops.
//
// No host syncs: permute's output size comes from the shapes (see
// MoERouting.h), its offsets are computed on the device, and expert ids are
// checked with a device-side assert. Results are deterministic: the permute
// ranks are computed per chunk of (token, slot) pairs in order, and the
// combine is a per-token gather in slot order (no atomics on data).
//
//   router_topk: one thread per token, top-k by insertion over the experts.
//   permute: (1) per-chunk histograms, (2) one block scans experts x chunks
//     into group starts and offs, (3) per-chunk row assignment in (token,
//     slot) order, (4) a row gather over destination rows that also zeroes
//     padding and unused rows: every output row is written once.
//   unpermute: one block per token, threads across the hidden dimension.

#include <ATen/native/MoERouting.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <cuda/std/limits>

namespace at::native {
namespace {

constexpr int kThreads = 256;
// (token, slot) pairs per permute chunk: one thread assigns a chunk's rows in
// order, so chunks stay short.
constexpr int64_t kChunk = 64;

int64_t blocks_for(int64_t n, int64_t threads = kThreads) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535));
}

template <typename acc_t>
__device__ inline bool ranks_before(acc_t key_a, int64_t a, acc_t key_b, int64_t b) {
  return key_a > key_b || (key_a == key_b && a < b);
}

template <typename acc_t>
__device__ inline void topk_insert(int32_t* ids, acc_t* keys, int64_t& size, int64_t cap, int64_t e, acc_t key) {
  if (size == cap && !ranks_before(key, e, keys[cap - 1], static_cast<int64_t>(ids[cap - 1]))) {
    return;
  }
  int64_t pos = size < cap ? size++ : cap - 1;
  while (pos > 0 && ranks_before(key, e, keys[pos - 1], static_cast<int64_t>(ids[pos - 1]))) {
    ids[pos] = ids[pos - 1];
    keys[pos] = keys[pos - 1];
    --pos;
  }
  ids[pos] = static_cast<int32_t>(e);
  keys[pos] = key;
}

template <typename scalar_t, typename acc_t>
__device__ inline acc_t router_score(const scalar_t* row, int64_t e, RouterScore kind, acc_t mx, acc_t inv_sum) {
  const acc_t x = static_cast<acc_t>(row[e]);
  if (kind == RouterScore::kSoftmax) return ::exp(x - mx) * inv_sum;
  if (kind == RouterScore::kSigmoid) return acc_t(1) / (acc_t(1) + ::exp(-x));
  return x;
}

// One thread per token. The selected ids and keys live in the output rows
// (weights holds the keys until the weights are computed), so no per-thread
// arrays sized by k are needed.
template <typename scalar_t, typename acc_t, typename bias_t>
__global__ void router_topk_kernel(
    const scalar_t* logits, int64_t tokens, int64_t experts, int64_t k, RouterScore kind, const bias_t* bias,
    int64_t n_group, int64_t topk_group, bool renormalize, acc_t scaling_factor, acc_t* weights, int32_t* ids,
    int32_t* counts) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  const scalar_t* row = logits + t * experts;
  const acc_t neg_inf = -::cuda::std::numeric_limits<acc_t>::infinity();
  acc_t mx = neg_inf, inv_sum = 1;
  if (kind == RouterScore::kSoftmax) {
    for (int64_t e = 0; e < experts; ++e) mx = ::max(mx, static_cast<acc_t>(row[e]));
    acc_t sum = 0;
    for (int64_t e = 0; e < experts; ++e) sum += ::exp(static_cast<acc_t>(row[e]) - mx);
    inv_sum = acc_t(1) / sum;
  }
  auto key_of = [&](int64_t e) {
    acc_t v = router_score<scalar_t, acc_t>(row, e, kind, mx, inv_sum);
    if (bias != nullptr) v += static_cast<acc_t>(bias[e]);
    return isnan(v) ? neg_inf : v;
  };
  const int64_t group_size = experts / n_group;
  acc_t* w = weights + t * k;
  int32_t* sel = ids + t * k;
  uint64_t group_mask = ~uint64_t(0);
  if (n_group > 1) {
    // Group ranking reuses the token's output row: topk_group <= k is not
    // guaranteed, so it runs in a second, group-sized pass over the keys.
    group_mask = 0;
    for (int64_t g = 0; g < n_group; ++g) {
      auto group_key = [&](int64_t gg) {
        acc_t first = neg_inf, second = neg_inf;
        for (int64_t e = gg * group_size; e < (gg + 1) * group_size; ++e) {
          const acc_t v = key_of(e);
          if (v > first) { second = first; first = v; } else if (v > second) { second = v; }
        }
        return group_size > 1 ? first + second : first;
      };
      const acc_t mine = group_key(g);
      int64_t better = 0;
      for (int64_t h = 0; h < n_group && better < topk_group; ++h) {
        if (h != g && ranks_before(group_key(h), h, mine, g)) ++better;
      }
      if (better < topk_group) group_mask |= uint64_t(1) << g;
    }
  }
  int64_t found = 0;
  for (int64_t e = 0; e < experts; ++e) {
    if ((group_mask >> (e / group_size)) & 1) topk_insert(sel, w, found, k, e, key_of(e));
  }
  for (int64_t j = 0; j < k; ++j) {
    w[j] = router_score<scalar_t, acc_t>(row, sel[j], kind, mx, inv_sum);
  }
  if (kind == RouterScore::kSoftmaxAfterTopk) {
    acc_t m = neg_inf, sum = 0;
    for (int64_t j = 0; j < k; ++j) m = ::max(m, w[j]);
    for (int64_t j = 0; j < k; ++j) { w[j] = ::exp(w[j] - m); sum += w[j]; }
    for (int64_t j = 0; j < k; ++j) w[j] /= sum;
  }
  if (renormalize) {
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += w[j];
    for (int64_t j = 0; j < k; ++j) w[j] /= sum;
  }
  for (int64_t j = 0; j < k; ++j) {
    w[j] *= scaling_factor;
    atomicAdd(counts + sel[j], 1);  // integer: the total is order-independent
  }
}

template <typename index_t>
__global__ void permute_histogram_kernel(
    const index_t* ids, int64_t pairs, int64_t num_experts, int64_t first_expert, int64_t num_local,
    int32_t* hist /* chunks x L */) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c * kChunk >= pairs) return;
  const int64_t end = ::min(pairs, (c + 1) * kChunk);
  for (int64_t i = c * kChunk; i < end; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts && "permute: expert_ids must be in [0, num_experts)");
    const int64_t local = e - first_expert;
    if (local >= 0 && local < num_local) ++hist[c * num_local + local];
  }
}

// One block: thread e turns expert e's per-chunk counts into each chunk's
// offset inside the group (exclusive prefix) and keeps the group's count;
// thread 0 then places the groups one after another, aligned.
__global__ void permute_scan_kernel(
    int32_t* hist, int64_t chunks, int64_t num_local, int64_t alignment, int32_t* offs, int32_t* group_start) {
  for (int64_t e = threadIdx.x; e < num_local; e += blockDim.x) {
    int32_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = hist[c * num_local + e];
      hist[c * num_local + e] = running;
      running += n;
    }
    offs[e] = running;  // the group's count until thread 0 rewrites it
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t start = 0;
    for (int64_t e = 0; e < num_local; ++e) {
      const int64_t end = (start + offs[e] + alignment - 1) / alignment * alignment;
      group_start[e] = static_cast<int32_t>(start);
      offs[e] = static_cast<int32_t>(end);
      start = end;
    }
  }
}

template <typename index_t>
__global__ void permute_assign_kernel(
    const index_t* ids, int64_t pairs, int64_t first_expert, int64_t num_local, const int32_t* hist,
    const int32_t* group_start, int64_t* dst, int64_t* src) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c * kChunk >= pairs) return;
  const int64_t end = ::min(pairs, (c + 1) * kChunk);
  // Rows already taken in each group by this chunk: a short scan back over
  // the chunk keeps the per-thread state O(1).
  for (int64_t i = c * kChunk; i < end; ++i) {
    const int64_t local = static_cast<int64_t>(ids[i]) - first_expert;
    if (local < 0 || local >= num_local) {
      dst[i] = -1;
      continue;
    }
    int64_t rank = 0;
    for (int64_t p = c * kChunk; p < i; ++p) rank += (static_cast<int64_t>(ids[p]) - first_expert == local);
    const int64_t r = static_cast<int64_t>(group_start[local]) + hist[c * num_local + local] + rank;
    dst[i] = r;
    src[r] = i;
  }
}

// One block per destination row: copy the source token row or write zeros.
__global__ void permute_gather_kernel(
    const char* tokens, int64_t in_stride_bytes, int64_t row_bytes, int64_t top_k, const int64_t* src, char* out,
    int64_t rows) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t s = src[r];
    char* o = out + r * row_bytes;
    const char* in = s >= 0 ? tokens + (s / top_k) * in_stride_bytes : nullptr;
    // 16-byte moves when both rows allow it, bytes otherwise.
    const bool vec = row_bytes % 16 == 0 && in_stride_bytes % 16 == 0 &&
        reinterpret_cast<uintptr_t>(tokens) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
    if (vec) {
      const int64_t n = row_bytes / 16;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        reinterpret_cast<uint4*>(o)[i] = in != nullptr ? reinterpret_cast<const uint4*>(in)[i] : make_uint4(0, 0, 0, 0);
      }
    } else {
      for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) o[i] = in != nullptr ? in[i] : char(0);
    }
  }
}

__global__ void fill_minus_one_kernel(int64_t* p, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = -1;
  }
}

template <typename scalar_t, typename acc_t>
struct WeightReader {
  const float* f32;
  const scalar_t* same;
  __device__ acc_t operator()(int64_t i) const {
    return f32 != nullptr ? static_cast<acc_t>(f32[i]) : static_cast<acc_t>(same[i]);
  }
};

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
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    acc_t acc = 0;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t r = dst[t * top_k + j];
      CUDA_KERNEL_ASSERT(r >= -1 && r < rows && "unpermute: dst_rows must be -1 or a row of permuted");
      if (r < 0) continue;
      const acc_t x = static_cast<acc_t>(in[r * in_stride + h]);
      acc += weighted ? w(t * top_k + j) * x : x;
    }
    out[t * hidden + h] = static_cast<scalar_t>(acc);
  }
}

// One block per run of equal rows in the stably sorted dst_rows: the row's
// gradient is the sum over the slots that read it, in slot order, rounded
// once (permute reads each row at most once; any other index may repeat
// rows, and a write per slot would then race).
template <typename scalar_t, typename acc_t>
__global__ void unpermute_backward_rows_kernel(
    const scalar_t* g, const int64_t* sorted_rows, const int64_t* slot_of, int64_t n, int64_t rows,
    int64_t top_k, int64_t hidden, WeightReader<scalar_t, acc_t> w, bool weighted, scalar_t* gp) {
  const int64_t p = blockIdx.x;
  const int64_t r = sorted_rows[p];
  CUDA_KERNEL_ASSERT(r >= -1 && r < rows && "unpermute_backward: dst_rows must be -1 or a row of permuted");
  if (r < 0 || (p > 0 && sorted_rows[p - 1] == r)) return;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    acc_t acc = 0;
    for (int64_t q = p; q < n && sorted_rows[q] == r; ++q) {
      const int64_t i = slot_of[q];
      const acc_t gv = static_cast<acc_t>(g[(i / top_k) * hidden + h]);
      acc += weighted ? w(i) * gv : gv;
    }
    gp[r * hidden + h] = static_cast<scalar_t>(acc);
  }
}

// One block per (token, slot): the weight gradient <grad_output[t],
// permuted[r]> as a block reduction in a fixed tree order.
template <typename scalar_t, typename acc_t, typename w_out_t>
__global__ void unpermute_backward_weights_kernel(
    const scalar_t* g, const int64_t* dst, int64_t top_k, int64_t hidden, const scalar_t* x, w_out_t* gw) {
  __shared__ acc_t partial[kThreads];
  const int64_t i = blockIdx.x;
  const int64_t t = i / top_k;
  const int64_t r = dst[i];
  acc_t dot = 0;
  if (r >= 0) {
    for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
      dot += static_cast<acc_t>(g[t * hidden + h]) * static_cast<acc_t>(x[r * hidden + h]);
    }
  }
  partial[threadIdx.x] = dot;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) gw[i] = static_cast<w_out_t>(partial[0]);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, logits.scalar_type(), "moe_router_topk_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto launch = [&](const auto* bias_ptr) {
      router_topk_kernel<scalar_t, acc_t><<<blocks_for(tokens, 128), 128, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), tokens, experts, k, kind, bias_ptr, n_group, topk_group, renormalize,
          static_cast<acc_t>(scaling_factor), weights.mutable_data_ptr<acc_t>(), ids.mutable_data_ptr<int32_t>(),
          counts.mutable_data_ptr<int32_t>());
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
  const int64_t chunks = std::max<int64_t>(1, (pairs + kChunk - 1) / kChunk);
  Tensor hist = at::zeros({chunks, num_local}, expert_ids.options().dtype(kInt));
  Tensor group_start = at::empty({num_local}, expert_ids.options().dtype(kInt));
  auto stream = at::cuda::getCurrentCUDAStream();

  if (rows > 0) {
    fill_minus_one_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(src_rows.mutable_data_ptr<int64_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_permute_cuda", [&] {
    const index_t* ids = expert_ids.const_data_ptr<index_t>();
    const int64_t blocks = (chunks + kThreads - 1) / kThreads;
    permute_histogram_kernel<index_t><<<blocks, kThreads, 0, stream>>>(
        ids, pairs, num_experts, first_expert, num_local, hist.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    permute_scan_kernel<<<1, 1024, 0, stream>>>(hist.mutable_data_ptr<int32_t>(), chunks, num_local, alignment,
                                                offs.mutable_data_ptr<int32_t>(),
                                                group_start.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    permute_assign_kernel<index_t><<<blocks, kThreads, 0, stream>>>(
        ids, pairs, first_expert, num_local, hist.const_data_ptr<int32_t>(), group_start.const_data_ptr<int32_t>(),
        dst_rows.mutable_data_ptr<int64_t>(), src_rows.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (rows > 0 && tokens.size(1) > 0) {
    permute_gather_kernel<<<std::min<int64_t>(rows, 65535), kThreads, 0, stream>>>(
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
    unpermute_kernel<scalar_t, acc_t><<<tokens, kThreads, 0, stream>>>(
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
  TORCH_CHECK_VALUE(grad_output_in.dim() == 2 && grad_output_in.size(0) == dst_rows_in.size(0),
      "unpermute_backward: grad_output must be 2-D with one row per token (", dst_rows_in.size(0), "), got sizes ",
      grad_output_in.sizes());
  const Tensor grad_output = grad_output_in.contiguous();
  const Tensor dst_rows = dst_rows_in.contiguous();
  const std::optional<Tensor> weights_c =
      weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
  // Rows no (token, slot) maps to get a zero gradient.
  Tensor grad_permuted = at::zeros({num_rows, grad_output.size(1)}, grad_output.options());
  Tensor permuted, grad_weights;
  if (permuted_in.has_value()) {
    unpermute_check_inputs(*permuted_in, dst_rows, weights);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, grad_output.scalar_type(), "moe_unpermute_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    unpermute_backward_rows_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
        grad_output.const_data_ptr<scalar_t>(), sorted_rows.const_data_ptr<int64_t>(),
        slot_of.const_data_ptr<int64_t>(), n, num_rows, dst_rows.size(1), grad_output.size(1),
        weight_reader<scalar_t, acc_t>(weights_c), weights_c.has_value(), grad_permuted.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto launch = [&](auto* gw) {
      using w_out_t = std::remove_pointer_t<decltype(gw)>;
      unpermute_backward_weights_kernel<scalar_t, acc_t, w_out_t><<<n, kThreads, 0, stream>>>(
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

#pragma once

// The bodies of the routing kernels of cuda/MoERouting.cu, one function per
// thread (or per phase between two __syncthreads), compiled for the device by
// nvcc and for the host by any C++ compiler (see cuda/MoEThreadPos.cuh). The
// host build runs them over every block and thread of the launch in
// test/test_routing_device_logic.py and compares with the CPU kernels. What
// that walk cannot show, and a GPU run must: that the barriers between the
// phases are where the kernels put them (the walk runs phases one after
// another), atomics (the walk adds in order), the memory model, the device's
// exp, and the launch limits of a real device.
//
// Floating-point: every product that feeds a sum goes through mul_rn, which
// nvcc may not contract into an FMA (it does so by default for a * b + c,
// rounding once where the CPU kernels round twice); so the device gives the
// bits of this code on the host. Only exp differs between the two (the
// device's expf is within 2 ulp, glibc's within 1): router weights agree to
// rounding, everything else bit for bit.

#include <ATen/native/MoERouting.h>
#include <ATen/native/cuda/MoEThreadPos.cuh>

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda/std/limits>
#endif

namespace at::native::moe_cuda {

// Block sizes and the permute chunk, shared by the launches and the host walk.
constexpr int64_t kThreads = 256;        // row kernels: threads across the hidden dimension
constexpr int64_t kRouterThreads = 128;  // router_topk: a token per thread
constexpr int64_t kScanThreads = 1024;   // permute's scan: one block, an expert per thread
// (token, slot) pairs per permute chunk: one thread assigns a chunk's rows in
// order, so chunks stay short.
constexpr int64_t kChunk = 64;
static_assert((kThreads & (kThreads - 1)) == 0, "the weight-gradient tree reduction halves the block");

// A 16-byte unit of permute's row copy.
#if defined(__CUDACC__)
using Vec16 = uint4;
#else
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};
#endif

// ------------------------------------------------------------------ arithmetic

template <typename T>
C10_HOST_DEVICE inline T exp_(T x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline bool isnan_(T x) {
#if defined(__CUDA_ARCH__)
  return isnan(x);
#else
  return std::isnan(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T neg_inf() {
#if defined(__CUDA_ARCH__)
  return -::cuda::std::numeric_limits<T>::infinity();
#else
  return -std::numeric_limits<T>::infinity();
#endif
}

// std::max as the CPU kernel uses it: a NaN b leaves a.
template <typename T>
C10_HOST_DEVICE inline T max_(T a, T b) {
  return a < b ? b : a;
}

// a * b rounded on its own (see the top comment).
template <typename T>
C10_HOST_DEVICE inline T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// ---------------------------------------------------------------- router_topk

// Orders experts by key, descending, ties to the lower id (NaN keys were
// mapped to -inf, so the order is total).
template <typename acc_t>
C10_HOST_DEVICE inline bool ranks_before(acc_t key_a, int64_t a, acc_t key_b, int64_t b) {
  return key_a > key_b || (key_a == key_b && a < b);
}

// Inserts expert e into the sorted list ids/keys (size of cap used).
template <typename acc_t>
C10_HOST_DEVICE inline void topk_insert(int32_t* ids, acc_t* keys, int64_t& size, int64_t cap, int64_t e, acc_t key) {
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
C10_HOST_DEVICE inline acc_t router_score(const scalar_t* row, int64_t e, RouterScore kind, acc_t mx, acc_t inv_sum) {
  const acc_t x = static_cast<acc_t>(row[e]);
  if (kind == RouterScore::kSoftmax) return mul_rn(exp_(x - mx), inv_sum);
  if (kind == RouterScore::kSigmoid) return acc_t(1) / (acc_t(1) + exp_(-x));
  return x;
}

template <typename scalar_t, typename acc_t, typename bias_t>
struct RouterTopkArgs {
  const scalar_t* logits;  // (tokens, experts), contiguous
  int64_t tokens, experts, k;
  RouterScore kind;
  const bias_t* bias;  // (experts,) or nullptr
  int64_t n_group, topk_group;
  bool renormalize;
  acc_t scaling_factor;
  acc_t* weights;  // (tokens, k)
  int32_t* ids;    // (tokens, k)
};

// Token t. The selected ids and keys live in the token's output rows
// (weights holds the keys until the weights are computed), so no per-thread
// arrays sized by k are needed.
template <typename scalar_t, typename acc_t, typename bias_t>
C10_HOST_DEVICE inline void router_topk_token(const RouterTopkArgs<scalar_t, acc_t, bias_t>& a, int64_t t) {
  const scalar_t* row = a.logits + t * a.experts;
  const acc_t ninf = neg_inf<acc_t>();
  acc_t mx = ninf, inv_sum = 1;
  if (a.kind == RouterScore::kSoftmax) {
    for (int64_t e = 0; e < a.experts; ++e) mx = max_(mx, static_cast<acc_t>(row[e]));
    acc_t sum = 0;
    for (int64_t e = 0; e < a.experts; ++e) sum += exp_(static_cast<acc_t>(row[e]) - mx);
    inv_sum = acc_t(1) / sum;
  }
  auto key_of = [&](int64_t e) {
    acc_t v = router_score<scalar_t, acc_t>(row, e, a.kind, mx, inv_sum);
    if (a.bias != nullptr) v += static_cast<acc_t>(a.bias[e]);
    return isnan_(v) ? ninf : v;
  };
  const int64_t group_size = a.experts / a.n_group;
  acc_t* w = a.weights + t * a.k;
  int32_t* sel = a.ids + t * a.k;
  uint64_t group_mask = ~uint64_t(0);
  if (a.n_group > 1) {
    // A group is kept when fewer than topk_group groups rank before it (by
    // the sum of its two best keys): no per-thread list of groups, since
    // topk_group <= k is not guaranteed.
    auto group_key = [&](int64_t g) {
      acc_t first = ninf, second = ninf;
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
        const acc_t v = key_of(e);
        if (v > first) {
          second = first;
          first = v;
        } else if (v > second) {
          second = v;
        }
      }
      // +inf + -inf: a NaN key ranks as -inf, as a NaN expert key does.
      const acc_t sum = group_size > 1 ? first + second : first;
      return sum != sum ? ninf : sum;
    };
    group_mask = 0;
    for (int64_t g = 0; g < a.n_group; ++g) {
      const acc_t mine = group_key(g);
      int64_t better = 0;
      for (int64_t h = 0; h < a.n_group && better < a.topk_group; ++h) {
        if (h != g && ranks_before(group_key(h), h, mine, g)) ++better;
      }
      if (better < a.topk_group) group_mask |= uint64_t(1) << g;
    }
  }
  int64_t found = 0;
  for (int64_t e = 0; e < a.experts; ++e) {
    if ((group_mask >> (e / group_size)) & 1) topk_insert(sel, w, found, a.k, e, key_of(e));
  }
  for (int64_t j = 0; j < a.k; ++j) {
    w[j] = router_score<scalar_t, acc_t>(row, sel[j], a.kind, mx, inv_sum);
  }
  if (a.kind == RouterScore::kSoftmaxAfterTopk) {
    acc_t m = ninf, sum = 0;
    for (int64_t j = 0; j < a.k; ++j) m = max_(m, w[j]);
    for (int64_t j = 0; j < a.k; ++j) {
      w[j] = exp_(w[j] - m);
      sum += w[j];
    }
    for (int64_t j = 0; j < a.k; ++j) w[j] /= sum;
  }
  if (a.renormalize) {
    acc_t sum = 0;
    for (int64_t j = 0; j < a.k; ++j) sum += w[j];
    for (int64_t j = 0; j < a.k; ++j) w[j] /= sum;
  }
  for (int64_t j = 0; j < a.k; ++j) w[j] *= a.scaling_factor;
}

// A thread's tokens: the grid is capped (router_topk_launch), so the thread
// strides. count(e) is called once per selected expert (an atomicAdd on the
// device; integer, so the totals do not depend on the order).
template <typename scalar_t, typename acc_t, typename bias_t, typename count_fn>
C10_HOST_DEVICE inline void router_topk_thread(ThreadPos pos, const RouterTopkArgs<scalar_t, acc_t, bias_t>& a,
                                               count_fn count) {
  for (int64_t t = pos.global(); t < a.tokens; t += pos.stride()) {
    router_topk_token(a, t);
    for (int64_t j = 0; j < a.k; ++j) count(a.ids[t * a.k + j]);
  }
}

inline Launch router_topk_launch(int64_t tokens, int64_t max_blocks = kMaxGridBlocks) {
  return grid_stride_launch(tokens, kRouterThreads, max_blocks);
}

// -------------------------------------------------------------------- permute
//
// (0) src_rows = -1; (1) per-chunk histograms, a chunk of kChunk (token,
// slot) pairs per thread; (2) one block scans experts x chunks into each
// chunk's first row in each group, the group starts and offs; (3) per-chunk
// row assignment in (token, slot) order; (4) a row gather over destination
// rows that also zeroes padding and unused rows: every output row is written
// once.

inline int64_t permute_num_chunks(int64_t pairs) {
  return std::max<int64_t>(1, (pairs + kChunk - 1) / kChunk);
}

C10_HOST_DEVICE inline void fill_minus_one_thread(ThreadPos pos, int64_t* p, int64_t n) {
  for (int64_t i = pos.global(); i < n; i += pos.stride()) p[i] = -1;
}

inline Launch fill_minus_one_launch(int64_t n, int64_t max_blocks = kMaxGridBlocks) {
  return grid_stride_launch(n, kThreads, max_blocks);
}

// (1) The histogram of the thread's chunk into hist (chunks x num_local).
// Returns the first pair of the chunk whose expert id is outside
// [0, num_experts), else -1: the kernel asserts on it.
template <typename index_t>
C10_HOST_DEVICE inline int64_t permute_histogram_thread(ThreadPos pos, const index_t* ids, int64_t pairs,
                                                        int64_t num_experts, int64_t first_expert, int64_t num_local,
                                                        int32_t* hist) {
  const int64_t c = pos.global();
  if (c * kChunk >= pairs) return -1;
  const int64_t end = pairs < (c + 1) * kChunk ? pairs : (c + 1) * kChunk;
  for (int64_t i = c * kChunk; i < end; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    if (e < 0 || e >= num_experts) return i;
    const int64_t local = e - first_expert;
    if (local >= 0 && local < num_local) ++hist[c * num_local + local];
  }
  return -1;
}

inline Launch permute_chunks_launch(int64_t pairs) {
  return one_thread_per_item_launch(permute_num_chunks(pairs), kThreads);
}

// (2), first phase, every thread: expert e's per-chunk counts become each
// chunk's offset inside the group (exclusive prefix); offs[e] keeps the
// group's count for the second phase.
C10_HOST_DEVICE inline void permute_scan_counts_thread(ThreadPos pos, int32_t* hist, int64_t chunks, int64_t num_local,
                                                       int32_t* offs) {
  for (int64_t e = pos.thread; e < num_local; e += pos.threads) {
    int32_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = hist[c * num_local + e];
      hist[c * num_local + e] = running;
      running += n;
    }
    offs[e] = running;
  }
}

// (2), second phase, after a barrier: thread 0 places the groups one after
// another, each padded to a multiple of alignment rows.
C10_HOST_DEVICE inline void permute_scan_place_thread(ThreadPos pos, int64_t num_local, int64_t alignment,
                                                      int32_t* offs, int32_t* group_start) {
  if (pos.thread != 0) return;
  int64_t start = 0;
  for (int64_t e = 0; e < num_local; ++e) {
    const int64_t end = (start + offs[e] + alignment - 1) / alignment * alignment;
    group_start[e] = static_cast<int32_t>(start);
    offs[e] = static_cast<int32_t>(end);
    start = end;
  }
}

inline Launch permute_scan_launch() {
  return {1, kScanThreads};
}

// (3) The rows of the thread's chunk, in (token, slot) order.
template <typename index_t>
C10_HOST_DEVICE inline void permute_assign_thread(ThreadPos pos, const index_t* ids, int64_t pairs,
                                                  int64_t first_expert, int64_t num_local, const int32_t* hist,
                                                  const int32_t* group_start, int64_t* dst, int64_t* src) {
  const int64_t c = pos.global();
  if (c * kChunk >= pairs) return;
  const int64_t end = pairs < (c + 1) * kChunk ? pairs : (c + 1) * kChunk;
  for (int64_t i = c * kChunk; i < end; ++i) {
    const int64_t local = static_cast<int64_t>(ids[i]) - first_expert;
    if (local < 0 || local >= num_local) {
      dst[i] = -1;
      continue;
    }
    // Rows already taken in this group by the chunk: a short scan back over
    // the chunk keeps the per-thread state O(1).
    int64_t rank = 0;
    for (int64_t p = c * kChunk; p < i; ++p) rank += (static_cast<int64_t>(ids[p]) - first_expert == local);
    const int64_t r = static_cast<int64_t>(group_start[local]) + hist[c * num_local + local] + rank;
    dst[i] = r;
    src[r] = i;
  }
}

// (4) Whether a row copy can move 16 bytes at a time.
C10_HOST_DEVICE inline bool permute_gather_vectorised(const char* tokens, int64_t in_stride_bytes, int64_t row_bytes,
                                                      const char* out) {
  return row_bytes % 16 == 0 && in_stride_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(tokens) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

// (4) A block per destination row (striding over rows), threads across the
// row: the source token's row, or zeros for padding and unused rows.
C10_HOST_DEVICE inline void permute_gather_thread(ThreadPos pos, const char* tokens, int64_t in_stride_bytes,
                                                  int64_t row_bytes, int64_t top_k, const int64_t* src, char* out,
                                                  int64_t rows) {
  const bool vec = permute_gather_vectorised(tokens, in_stride_bytes, row_bytes, out);
  for (int64_t r = pos.block; r < rows; r += pos.blocks) {
    const int64_t s = src[r];
    char* o = out + r * row_bytes;
    const char* in = s >= 0 ? tokens + (s / top_k) * in_stride_bytes : nullptr;
    if (vec) {
      for (int64_t i = pos.thread; i < row_bytes / 16; i += pos.threads) {
        reinterpret_cast<Vec16*>(o)[i] = in != nullptr ? reinterpret_cast<const Vec16*>(in)[i] : Vec16{};
      }
    } else {
      for (int64_t i = pos.thread; i < row_bytes; i += pos.threads) o[i] = in != nullptr ? in[i] : char(0);
    }
  }
}

inline Launch permute_gather_launch(int64_t rows, int64_t max_blocks = kMaxGridBlocks) {
  return {std::max<int64_t>(1, std::min<int64_t>(rows, max_blocks)), kThreads};
}

// ------------------------------------------------------------------ unpermute

// Reads a weight stored as float32 or as the data dtype.
template <typename scalar_t, typename acc_t>
struct WeightReader {
  const float* f32;
  const scalar_t* same;
  C10_HOST_DEVICE acc_t operator()(int64_t i) const {
    return f32 != nullptr ? static_cast<acc_t>(f32[i]) : static_cast<acc_t>(same[i]);
  }
};

// A block per token t, threads across the hidden dimension: the sum of the
// token's rows in slot order, rounded once. Returns false when a dst row is
// outside [-1, rows): the kernel asserts on it.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline bool unpermute_thread(ThreadPos pos, const scalar_t* in, int64_t in_stride, int64_t rows,
                                             const int64_t* dst, int64_t top_k, int64_t hidden,
                                             WeightReader<scalar_t, acc_t> w, bool weighted, scalar_t* out) {
  const int64_t t = pos.block;
  for (int64_t h = pos.thread; h < hidden; h += pos.threads) {
    acc_t acc = 0;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t r = dst[t * top_k + j];
      if (r < -1 || r >= rows) return false;
      if (r < 0) continue;
      const acc_t x = static_cast<acc_t>(in[r * in_stride + h]);
      acc += weighted ? mul_rn(w(t * top_k + j), x) : x;
    }
    out[t * hidden + h] = static_cast<scalar_t>(acc);
  }
  return true;
}

inline Launch unpermute_launch(int64_t tokens) {
  return {tokens, kThreads};
}

// unpermute_backward, rows: a block per entry p of the stably sorted dst_rows;
// the first block of each run of equal rows sums the gradients of the slots
// that read the row, in slot order, rounded once (permute reads each row at
// most once; any other index may repeat rows, and a write per slot would then
// race). Returns false when a row is outside [-1, rows).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline bool unpermute_backward_rows_thread(ThreadPos pos, const scalar_t* g, const int64_t* sorted_rows,
                                                           const int64_t* slot_of, int64_t n, int64_t rows,
                                                           int64_t top_k, int64_t hidden,
                                                           WeightReader<scalar_t, acc_t> w, bool weighted,
                                                           scalar_t* gp) {
  const int64_t p = pos.block;
  const int64_t r = sorted_rows[p];
  if (r < -1 || r >= rows) return false;
  if (r < 0 || (p > 0 && sorted_rows[p - 1] == r)) return true;
  for (int64_t h = pos.thread; h < hidden; h += pos.threads) {
    acc_t acc = 0;
    for (int64_t q = p; q < n && sorted_rows[q] == r; ++q) {
      const int64_t i = slot_of[q];
      const acc_t gv = static_cast<acc_t>(g[(i / top_k) * hidden + h]);
      acc += weighted ? mul_rn(w(i), gv) : gv;
    }
    gp[r * hidden + h] = static_cast<scalar_t>(acc);
  }
  return true;
}

// unpermute_backward, weights: a block per (token, slot) i; this thread's
// part of <grad_output[t], permuted[dst[i]]> (0 for a dropped slot), summed
// over the block by block_tree_reduce_step.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t unpermute_backward_weights_partial(ThreadPos pos, const scalar_t* g, const int64_t* dst,
                                                                int64_t top_k, int64_t hidden, const scalar_t* x) {
  const int64_t i = pos.block;
  const int64_t t = i / top_k;
  const int64_t r = dst[i];
  acc_t dot = 0;
  if (r >= 0) {
    for (int64_t h = pos.thread; h < hidden; h += pos.threads) {
      dot += mul_rn(static_cast<acc_t>(g[t * hidden + h]), static_cast<acc_t>(x[r * hidden + h]));
    }
  }
  return dot;
}

// One level of a block's tree reduction over partial[0, 2s): a fixed order,
// so the sum does not depend on scheduling. Levels are separated by barriers.
template <typename acc_t>
C10_HOST_DEVICE inline void block_tree_reduce_step(ThreadPos pos, acc_t* partial, int64_t s) {
  if (pos.thread < s) partial[pos.thread] += partial[pos.thread + s];
}

inline Launch unpermute_backward_launch(int64_t slots) {
  return {slots, kThreads};
}

} // namespace at::native::moe_cuda

#pragma once

// The body of _moe_router_topk's CUDA kernel (cuda/MoERouterTopk.cu), host
// and device code alike (see cuda/MoERouting.cuh).

#include <ATen/native/MoERouterTopk.h>
#include <ATen/native/cuda/MoERouting.cuh>
#include <ATen/native/cuda/MoEThreadPos.cuh>

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace at::native::moe_cuda {

constexpr int64_t kRouterThreads = 128;  // a token per thread

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

} // namespace at::native::moe_cuda

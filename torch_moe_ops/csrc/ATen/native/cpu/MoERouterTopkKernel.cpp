// CPU kernel of _moe_router_topk: one pass per token over its logits row:
// scores, the selection key (score + bias), the optional group mask and the
// top-k (k rounds of a masked vector max with AVX-512, else an insertion
// list), then the weights. Tokens are independent, so the loop is split
// across threads; counts are summed from expert_ids after.

#include <ATen/native/MoERouterTopk.h>
#include <ATen/native/cpu/MoEAvx512Utils.h>
#include <ATen/native/cpu/MoERoutingUtils.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace at::native {
namespace {

// Orders experts by key, descending, ties to the lower id. NaN keys were
// mapped to -inf so the order is total.
template <typename acc_t>
inline bool ranks_before(acc_t key_a, int64_t a, acc_t key_b, int64_t b) {
  return key_a > key_b || (key_a == key_b && a < b);
}

// Inserts expert e into the sorted top list (ids/keys, `size` of `cap` used).
template <typename acc_t>
inline void topk_insert(int64_t* ids, acc_t* keys, int64_t& size, int64_t cap, int64_t e, acc_t key) {
  if (size == cap && !ranks_before(key, e, keys[cap - 1], ids[cap - 1])) {
    return;
  }
  int64_t pos = size < cap ? size++ : cap - 1;
  while (pos > 0 && ranks_before(key, e, keys[pos - 1], ids[pos - 1])) {
    ids[pos] = ids[pos - 1];
    keys[pos] = keys[pos - 1];
    --pos;
  }
  ids[pos] = e;
  keys[pos] = key;
}

#if defined(CPU_CAPABILITY_AVX512)
// ---- AVX-512 router (float32 scores) -----------------------------------------
// Intrinsics, not Vectorized<T>: the selection runs on mask registers
// (kmov/ctz over availability bits) and the exp must be this polynomial, the
// one the tests pin, not Vectorized<float>::exp's (Sleef) bits.
// With a few dozen to a few hundred experts per token, the scalar router
// spends its time in libm's expf calls and in the branches of the insertion
// top-k. Here the scores are 16 experts per instruction and the top-k is k
// rounds of a masked vector max; it picks the same experts in the same order
// (largest key, ties to the lowest id), so ids are identical to the scalar
// path. The selection runs on the availability bits of up to kMaxVecExperts.
constexpr int64_t kMaxVecExperts = 1024;

// GCC 12 reports its own unmasked AVX-512 intrinsics (which start from
// _mm512_undefined_ps) as reading an uninitialised value: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// e^x to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor
// polynomial for e^r (remainder < 6e-9 relative), then scalef by 2^n, which
// saturates to inf or flushes to 0 exactly as expf does. NaN stays NaN (max
// and min return their second operand when either is NaN).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  x = _mm512_min_ps(_mm512_set1_ps(89.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Selection key of 16 experts: score + bias, NaN -> -inf.
inline void store_key(float* key, __m512 v, const float* bias) {
  if (bias != nullptr) {
    v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
  }
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  _mm512_storeu_ps(key, _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), neg_inf));
}

// One token's scores and selection keys (score + bias, NaN -> -inf). score,
// key and bias (zeros past E) hold a multiple of 16 floats, so every store
// and reload is a full vector: a masked store forwards to the next load
// badly, and with a handful of experts per token that stall was the cost.
template <typename scalar_t>
void router_scores_avx512(const scalar_t* row, int64_t experts, RouterScore kind,
                                             const float* bias, float* score, float* key) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  if (kind == RouterScore::kSoftmax) {
    __m512 vmax = neg_inf;
    for (int64_t e = 0; e < experts; e += 16) {
      const __mmask16 m = moe_lanes16(experts, e);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, moe_load_ps(row + e, m));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t e = 0; e < experts; e += 16) {
      const __mmask16 m = moe_lanes16(experts, e);
      const __m512 y = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(moe_load_ps(row + e, m), mx)));
      vsum = _mm512_add_ps(vsum, y);
      _mm512_storeu_ps(score + e, y);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
    for (int64_t e = 0; e < experts; e += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(score + e), inv);
      _mm512_storeu_ps(score + e, v);
      store_key(key + e, v, bias != nullptr ? bias + e : nullptr);
    }
    return;
  }
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t e = 0; e < experts; e += 16) {
    const __mmask16 m = moe_lanes16(experts, e);
    __m512 x = moe_load_ps(row + e, m);
    if (kind == RouterScore::kSigmoid) {
      x = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    }
    x = _mm512_maskz_mov_ps(m, x);
    _mm512_storeu_ps(score + e, x);
    store_key(key + e, x, bias != nullptr ? bias + e : nullptr);
  }
}

// Availability bits of the experts of the kept groups (all when n_group == 1).
inline void available_experts(__mmask16* avail, int64_t experts, int64_t n_group,
                                                 int64_t group_size, uint64_t group_mask) {
  const int64_t chunks = (experts + 15) / 16;
  if (n_group == 1) {
    for (int64_t c = 0; c < chunks; ++c) avail[c] = moe_lanes16(experts, 16 * c);
    return;
  }
  std::fill_n(avail, chunks, __mmask16{0});
  for (int64_t g = 0; g < n_group; ++g) {
    if ((group_mask >> g) & 1) {
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
        avail[e / 16] = static_cast<__mmask16>(avail[e / 16] | (1u << (e % 16)));
      }
    }
  }
}

// k rounds of: the largest key among the available experts, the lowest id
// among equals; the winner leaves the available set. key is padded as above.
void topk_avx512(const float* key, int64_t experts, int64_t k, __mmask16* avail,
                                    int64_t* ids, float* keys) {
  const int64_t chunks = (experts + 15) / 16;
  for (int64_t j = 0; j < k; ++j) {
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t c = 0; c < chunks; ++c) {
      vmax = _mm512_mask_max_ps(vmax, avail[c], vmax, _mm512_loadu_ps(key + 16 * c));
    }
    const float best = _mm512_reduce_max_ps(vmax);
    const __m512 vbest = _mm512_set1_ps(best);
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 eq =
          _mm512_mask_cmp_ps_mask(avail[c], _mm512_loadu_ps(key + 16 * c), vbest, _CMP_EQ_OQ);
      if (eq != 0) {
        const int lane = __builtin_ctz(eq);
        avail[c] = static_cast<__mmask16>(avail[c] & ~(1u << lane));
        ids[j] = 16 * c + lane;
        keys[j] = best;
        break;
      }
    }
  }
}

#pragma GCC diagnostic pop
#endif // CPU_CAPABILITY_AVX512

template <typename scalar_t, typename acc_t, typename bias_t>
void router_topk_impl(
    const Tensor& logits, int64_t k, RouterScore score_kind, const bias_t* bias, int64_t n_group,
    int64_t topk_group, bool renormalize, acc_t scaling_factor, const Tensor& weights, const Tensor& expert_ids) {
  const int64_t tokens = logits.size(0);
  const int64_t experts = logits.size(1);
  const int64_t group_size = experts / n_group;
  const scalar_t* in = logits.const_data_ptr<scalar_t>();
  acc_t* w_out = weights.mutable_data_ptr<acc_t>();
  int32_t* id_out = expert_ids.mutable_data_ptr<int32_t>();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // ~E * 20 flops per token; keep tasks at a few thousand experts' work.
  const int64_t grain = std::max<int64_t>(1, 4096 / experts);
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool kVecType = std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, double>;
  const bool use_vec = kVecType && experts <= kMaxVecExperts;
#else
  constexpr bool use_vec = false;
#endif
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    // Padded to whole vectors for the AVX-512 path.
    const int64_t padded = (experts + 15) / 16 * 16;
    std::vector<acc_t> score(padded), key(padded), top_keys(std::max(k, topk_group));
    std::vector<int64_t> top_ids(std::max(k, topk_group));
#if defined(CPU_CAPABILITY_AVX512)
    std::vector<float> bias_f;
    if (use_vec && bias != nullptr) {
      bias_f.resize(padded, 0.f);
      for (const auto e : c10::irange(experts)) bias_f[e] = static_cast<float>(bias[e]);
    }
#endif
    for (const auto t : c10::irange(begin, end)) {
      const scalar_t* row = in + t * experts;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kVecType) {
        if (use_vec) {
          router_scores_avx512(row, experts, score_kind, bias != nullptr ? bias_f.data() : nullptr, score.data(),
                               key.data());
        }
      }
#endif
      // Scores: what the weights are made of.
      if (use_vec) {
        // Done above.
      } else if (score_kind == RouterScore::kSoftmax) {
        acc_t mx = kNegInf;
        for (const auto e : c10::irange(experts)) {
          score[e] = static_cast<acc_t>(row[e]);
          mx = std::max(mx, score[e]);
        }
        acc_t sum = 0;
        for (const auto e : c10::irange(experts)) {
          score[e] = std::exp(score[e] - mx);
          sum += score[e];
        }
        const acc_t inv = acc_t(1) / sum;
        for (const auto e : c10::irange(experts)) {
          score[e] *= inv;
        }
      } else if (score_kind == RouterScore::kSigmoid) {
        for (const auto e : c10::irange(experts)) {
          score[e] = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(row[e])));
        }
      } else {  // kSoftmaxAfterTopk selects on the logits themselves.
        for (const auto e : c10::irange(experts)) {
          score[e] = static_cast<acc_t>(row[e]);
        }
      }
      // Selection key: score plus the balancing bias, which never reaches
      // the weights.
      for (int64_t e = 0; !use_vec && e < experts; ++e) {
        const acc_t v = bias != nullptr ? score[e] + static_cast<acc_t>(bias[e]) : score[e];
        key[e] = std::isnan(v) ? kNegInf : v;
      }
      // Grouped top-k (DeepSeek-V3): rank groups by the sum of their two best
      // keys (one when a group has a single expert), keep topk_group groups.
      uint64_t group_mask = ~uint64_t(0);
      if (n_group > 1) {
        int64_t kept = 0;
        for (const auto g : c10::irange(n_group)) {
          acc_t first = kNegInf, second = kNegInf;
          for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
            if (key[e] > first) {
              second = first;
              first = key[e];
            } else if (key[e] > second) {
              second = key[e];
            }
          }
          // +inf + -inf: a NaN key ranks as -inf, as a NaN expert key does.
          const acc_t group_key = group_size > 1 ? first + second : first;
          topk_insert(top_ids.data(), top_keys.data(), kept, topk_group, g,
                      std::isnan(group_key) ? kNegInf : group_key);
        }
        group_mask = 0;
        for (const auto i : c10::irange(kept)) {
          group_mask |= uint64_t(1) << top_ids[i];
        }
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kVecType) {
        if (use_vec) {
          __mmask16 avail[kMaxVecExperts / 16];
          available_experts(avail, experts, n_group, group_size, group_mask);
          topk_avx512(key.data(), experts, k, avail, top_ids.data(), top_keys.data());
        }
      }
#endif
      if (!use_vec) {
        // Walked group by group (ascending ids, as a flat scan).
        int64_t found = 0;
        for (const auto g : c10::irange(n_group)) {
          if ((group_mask >> g) & 1) {
            for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
              topk_insert(top_ids.data(), top_keys.data(), found, k, e, key[e]);
            }
          }
        }
      }
      // Weights from the unbiased scores of the chosen experts.
      acc_t* w = w_out + t * k;
      int32_t* ids = id_out + t * k;
      for (const auto j : c10::irange(k)) {
        ids[j] = static_cast<int32_t>(top_ids[j]);
        w[j] = score[top_ids[j]];
      }
      if (score_kind == RouterScore::kSoftmaxAfterTopk) {
        acc_t mx = kNegInf;
        for (const auto j : c10::irange(k)) mx = std::max(mx, w[j]);
        acc_t sum = 0;
        for (const auto j : c10::irange(k)) {
          w[j] = std::exp(w[j] - mx);
          sum += w[j];
        }
        for (const auto j : c10::irange(k)) w[j] /= sum;
      }
      if (renormalize) {
        acc_t sum = 0;
        for (const auto j : c10::irange(k)) sum += w[j];
        for (const auto j : c10::irange(k)) w[j] /= sum;
      }
      if (scaling_factor != acc_t(1)) {
        for (const auto j : c10::irange(k)) w[j] *= scaling_factor;
      }
    }
  });
}

void router_topk_kernel(
    const Tensor& logits, int64_t k, RouterScore score, const std::optional<Tensor>& bias, int64_t n_group,
    int64_t topk_group, bool renormalize, double scaling_factor, const Tensor& weights, const Tensor& expert_ids,
    const Tensor& counts) {
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, logits.scalar_type(), "moe_router_topk_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto run = [&](const auto* bias_ptr) {
      router_topk_impl<scalar_t, acc_t>(logits, k, score, bias_ptr, n_group, topk_group, renormalize,
                                        static_cast<acc_t>(scaling_factor), weights, expert_ids);
    };
    if (!bias.has_value()) {
      run(static_cast<const float*>(nullptr));
    } else if (bias->scalar_type() == kFloat) {
      run(bias->const_data_ptr<float>());
    } else {
      run(bias->const_data_ptr<scalar_t>());
    }
  });
  // Tokens per expert: T * k integer increments, cheap next to the scores.
  int32_t* c = counts.mutable_data_ptr<int32_t>();
  std::fill_n(c, counts.numel(), 0);
  const int32_t* ids = expert_ids.const_data_ptr<int32_t>();
  for (const auto i : c10::irange(expert_ids.numel())) {
    ++c[ids[i]];
  }
}

} // namespace

// Every capability's build registers its copy; the AVX512 one has the
// vector router (plain REGISTER_DISPATCH would leave that slot empty).
ALSO_REGISTER_AVX512_DISPATCH(moe_router_topk_stub, &router_topk_kernel)

} // namespace at::native

// CPU kernels of the routing ops.
//
// router_topk: one pass per token over its logits row: scores, the selection
//   key (score + bias), the optional group mask and the top-k (k rounds of a
//   masked vector max with AVX-512, else an insertion list), then the weights. Tokens are independent, so
//   the loop is split across threads; counts are summed from expert_ids after.
// permute: a counting sort of (token, slot) pairs by expert, stable in
//   (token, slot) order. Tokens are cut into chunks; a per-chunk histogram and
//   a prefix sum over (expert, chunk) give every chunk its first row in every
//   group, so the chunks assign rows in parallel and the result does not
//   depend on the number of chunks or threads. The rows are then gathered in
//   destination order: every permuted row (copy, padding or unused tail) is
//   written exactly once, sequentially, without a prior zero-fill.
// unpermute: per token, the weighted sum of its k rows in slot order,
//   accumulated in float32 (float64 for float64) and rounded once. A gather:
//   no atomics, deterministic.
// All element offsets are int64.

#include <ATen/native/MoERouting.h>
#include <ATen/native/cpu/MoEAvx512Utils.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace at::native {
namespace {

// Compilers contract a mul feeding an add into an FMA (one rounding fewer)
// unless told not to, and the AVX2/AVX512 builds have FMA: the sums of the
// combine and its backward are mul then add in every build, as the reference.
#if defined(__clang__)
#define MOE_NO_FP_CONTRACT
#else
#define MOE_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif

// acc[h] += w * x[h] (w == nullptr: += x[h]), h < n.
template <typename acc_t, typename scalar_t>
MOE_NO_FP_CONTRACT void accumulate_row(acc_t* acc, const scalar_t* x, const acc_t* w, int64_t n) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  if (w != nullptr) {
    const acc_t wj = *w;
    for (int64_t h = 0; h < n; ++h) acc[h] += wj * static_cast<acc_t>(x[h]);
  } else {
    for (int64_t h = 0; h < n; ++h) acc[h] += static_cast<acc_t>(x[h]);
  }
}

// sum_h a[h] * b[h] in acc_t, in order.
template <typename acc_t, typename scalar_t>
MOE_NO_FP_CONTRACT acc_t dot_row(const scalar_t* a, const scalar_t* b, int64_t n) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  acc_t dot = 0;
  for (int64_t h = 0; h < n; ++h) dot += static_cast<acc_t>(a[h]) * static_cast<acc_t>(b[h]);
  return dot;
}

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

template <typename scalar_t>
inline __m512 load_ps(const scalar_t* p, __mmask16 m) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    return moe_cvt_bf16_f32(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
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
      vmax = _mm512_mask_max_ps(vmax, m, vmax, load_ps(row + e, m));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t e = 0; e < experts; e += 16) {
      const __mmask16 m = moe_lanes16(experts, e);
      const __m512 y = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(load_ps(row + e, m), mx)));
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
    __m512 x = load_ps(row + e, m);
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
// One token of unpermute: y = sum_j w_j * rows[j] in float32, slot order,
// one rounding; as mul then add, the very operations of the scalar path and
// of the reference, so the bits agree.
template <typename scalar_t>
MOE_NO_FP_CONTRACT void combine_row_avx512(scalar_t* y, const scalar_t* const* rows,
                                                              const float* w, int64_t k, int64_t hidden) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t h = 0; h < hidden; h += 16) {
    const __mmask16 m = moe_lanes16(hidden, h);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m512 x = load_ps(rows[j] + h, m);
      acc = _mm512_add_ps(acc, w != nullptr ? _mm512_mul_ps(_mm512_set1_ps(w[j]), x) : x);
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_mask_storeu_ps(y + h, m, acc);
    } else if constexpr (std::is_same_v<scalar_t, BFloat16>) {
      _mm256_mask_storeu_epi16(y + h, m, moe_cvt_f32_bf16(acc));
    } else {
      _mm256_mask_storeu_epi16(y + h, m, _mm512_cvtps_ph(acc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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

// Reads a weight stored as float32 or as the data dtype.
template <typename scalar_t, typename acc_t>
struct WeightReader {
  const float* f32 = nullptr;
  const scalar_t* same = nullptr;
  acc_t operator()(int64_t i) const {
    return f32 != nullptr ? static_cast<acc_t>(f32[i]) : static_cast<acc_t>(same[i]);
  }
};

template <typename scalar_t, typename acc_t>
WeightReader<scalar_t, acc_t> weight_reader(const std::optional<Tensor>& weights) {
  WeightReader<scalar_t, acc_t> r;
  if (weights.has_value()) {
    if (weights->scalar_type() == kFloat) {
      r.f32 = weights->const_data_ptr<float>();
    } else {
      r.same = weights->const_data_ptr<scalar_t>();
    }
  }
  return r;
}

// dst_rows entries are -1 (dropped) or a row of permuted.
void check_dst_rows(const char* op, const Tensor& dst_rows, int64_t num_rows) {
  const int64_t* dst = dst_rows.const_data_ptr<int64_t>();
  const int64_t n = dst_rows.numel();
  const int64_t top_k = dst_rows.size(1);
  for (const auto i : c10::irange(n)) {
    TORCH_CHECK_VALUE(dst[i] >= -1 && dst[i] < num_rows,
        op, ": dst_rows must be -1 or a row of permuted in [0, ", num_rows, "), got dst_rows[", i / top_k, ", ",
        i % top_k, "]=", dst[i]);
  }
}

// Rows per task for row-wise passes: ~64 KB of data each.
int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1));
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

void permute_kernel(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    const Tensor& permuted, const Tensor& dst_rows, const Tensor& src_rows, const Tensor& offs) {
  const int64_t num_tokens = tokens.size(0);
  const int64_t top_k = expert_ids.size(1);
  const int64_t num_local = offs.size(0);
  const int64_t rows = permuted.size(0);
  int64_t* dst = dst_rows.mutable_data_ptr<int64_t>();
  int64_t* src = src_rows.mutable_data_ptr<int64_t>();
  int32_t* offs_out = offs.mutable_data_ptr<int32_t>();

  // Chunks of tokens; any count gives the same result (see the top comment).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(num_tokens, at::get_num_threads()));
  const auto chunk_begin = [&](int64_t c) { return c * num_tokens / chunks; };
  // hist[c * L + e]: rows of local expert e in chunk c; becomes chunk c's next row in group e.
  std::vector<int64_t> hist(chunks * num_local, 0);
  std::vector<int64_t> first_bad(chunks, -1);

  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_permute_cpu", [&] {
    const index_t* ids = expert_ids.const_data_ptr<index_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (const auto c : c10::irange(c0, c1)) {
        int64_t* h = hist.data() + c * num_local;
        for (int64_t i = chunk_begin(c) * top_k; i < chunk_begin(c + 1) * top_k; ++i) {
          const int64_t e = static_cast<int64_t>(ids[i]);
          if (e < 0 || e >= num_experts) {
            first_bad[c] = i;
            break;
          }
          const int64_t local = e - first_expert;
          if (local >= 0 && local < num_local) {
            ++h[local];
          }
        }
      }
    });
    for (const auto c : c10::irange(chunks)) {
      if (first_bad[c] >= 0) {
        const int64_t i = first_bad[c];
        TORCH_CHECK_VALUE(false, "permute: expert_ids must be in [0, num_experts=", num_experts,
                          "), got expert_ids[", i / top_k, ", ", i % top_k, "]=", static_cast<int64_t>(ids[i]));
      }
    }

    // Group starts (aligned) and each chunk's first row in each group.
    int64_t start = 0;
    for (const auto e : c10::irange(num_local)) {
      int64_t next = start;
      for (const auto c : c10::irange(chunks)) {
        const int64_t n = hist[c * num_local + e];
        hist[c * num_local + e] = next;
        next += n;
      }
      const int64_t end = (next + alignment - 1) / alignment * alignment;
      for (int64_t r = next; r < end; ++r) {
        src[r] = -1;  // padding
      }
      offs_out[e] = static_cast<int32_t>(end);
      start = end;
    }
    for (int64_t r = start; r < rows; ++r) {
      src[r] = -1;  // unused tail
    }

    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (const auto c : c10::irange(c0, c1)) {
        int64_t* next = hist.data() + c * num_local;
        for (int64_t i = chunk_begin(c) * top_k; i < chunk_begin(c + 1) * top_k; ++i) {
          const int64_t local = static_cast<int64_t>(ids[i]) - first_expert;
          if (local >= 0 && local < num_local) {
            const int64_t r = next[local]++;
            dst[i] = r;
            src[r] = i;
          } else {
            dst[i] = -1;
          }
        }
      }
    });
  });

  // Gather the rows in destination order. A pure copy: bytes, any dtype.
  const int64_t row_bytes = tokens.size(1) * tokens.element_size();
  const int64_t in_stride = tokens.stride(0) * tokens.element_size();
  const char* in = static_cast<const char*>(tokens.const_data_ptr());
  char* out = static_cast<char*>(permuted.mutable_data_ptr());
  at::parallel_for(0, rows, row_grain(row_bytes), [&](int64_t r0, int64_t r1) {
    for (const auto r : c10::irange(r0, r1)) {
      char* o = out + r * row_bytes;
      if (src[r] >= 0) {
        std::memcpy(o, in + (src[r] / top_k) * in_stride, row_bytes);
      } else {
        std::memset(o, 0, row_bytes);
      }
    }
  });
}

void unpermute_kernel(
    const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights, const Tensor& out) {
  check_dst_rows("unpermute", dst_rows, permuted.size(0));
  const int64_t num_tokens = dst_rows.size(0);
  const int64_t top_k = dst_rows.size(1);
  const int64_t hidden = permuted.size(1);
  const int64_t in_stride = permuted.stride(0);
  const int64_t* dst = dst_rows.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, permuted.scalar_type(), "moe_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = permuted.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto w = weight_reader<scalar_t, acc_t>(weights);
    const bool weighted = weights.has_value();
    at::parallel_for(0, num_tokens, row_grain(hidden * top_k * permuted.element_size()), [&](int64_t t0, int64_t t1) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<acc_t, float>) {
        std::vector<const scalar_t*> rows(top_k);
        std::vector<float> wk(top_k);
        for (const auto t : c10::irange(t0, t1)) {
          // Dropped slots (-1) contribute nothing: they are left out.
          int64_t n = 0;
          for (const auto j : c10::irange(top_k)) {
            const int64_t r = dst[t * top_k + j];
            if (r < 0) continue;
            rows[n] = in + r * in_stride;
            wk[n++] = weighted ? w(t * top_k + j) : 1.f;
          }
          combine_row_avx512(o + t * hidden, rows.data(), weighted ? wk.data() : nullptr, n, hidden);
        }
        return;
      }
#endif
      std::vector<acc_t> acc(hidden);
      for (const auto t : c10::irange(t0, t1)) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        // Slot order, one rounding at the end: the result does not depend on
        // where the rows sit in permuted.
        for (const auto j : c10::irange(top_k)) {
          const int64_t r = dst[t * top_k + j];
          if (r < 0) continue;
          const scalar_t* x = in + r * in_stride;
          const acc_t wj = weighted ? w(t * top_k + j) : acc_t(1);
          accumulate_row(acc.data(), x, weighted ? &wj : nullptr, hidden);
        }
        scalar_t* y = o + t * hidden;
        for (const auto h : c10::irange(hidden)) y[h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
}

// Slots grouped by the row they read, for a backward where rows repeat
// (an index that is not permute's): slot_start (rows + 1) and slots, the
// slots of row r in slot order at slots[slot_start[r] .. slot_start[r + 1]).
// Empty when every row is read at most once, the case permute produces.
struct RowSlots {
  std::vector<int64_t> slot_start, slots;
};

RowSlots group_slots_by_row(const int64_t* dst, int64_t n, int64_t rows) {
  RowSlots g;
  std::vector<int64_t> count(rows + 1, 0);
  bool repeated = false;
  for (const auto i : c10::irange(n)) {
    if (dst[i] >= 0) repeated |= count[dst[i] + 1]++ > 0;
  }
  if (!repeated) return g;
  for (const auto r : c10::irange(rows)) count[r + 1] += count[r];
  g.slot_start = count;
  g.slots.resize(count[rows]);
  for (const auto i : c10::irange(n)) {
    if (dst[i] >= 0) g.slots[count[dst[i]]++] = i;
  }
  return g;
}

void unpermute_backward_kernel(
    const Tensor& grad_output, const Tensor& dst_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted, const Tensor& grad_permuted, const Tensor& grad_weights) {
  check_dst_rows("unpermute_backward", dst_rows, grad_permuted.size(0));
  const int64_t num_tokens = dst_rows.size(0);
  const int64_t top_k = dst_rows.size(1);
  const int64_t hidden = grad_output.size(1);
  const int64_t num_rows = grad_permuted.size(0);
  const int64_t* dst = dst_rows.const_data_ptr<int64_t>();
  const RowSlots by_row = group_slots_by_row(dst, dst_rows.numel(), num_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, grad_output.scalar_type(), "moe_unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_permuted.mutable_data_ptr<scalar_t>();
    const scalar_t* x = permuted.has_value() ? permuted->const_data_ptr<scalar_t>() : nullptr;
    const auto w = weight_reader<scalar_t, acc_t>(weights);
    const bool weighted = weights.has_value();
    // grad_weights is float32 or the data dtype (like weights), when computed.
    const bool gw_is_f32 = x != nullptr && grad_weights.scalar_type() == kFloat;
    float* gw_f32 = gw_is_f32 ? grad_weights.mutable_data_ptr<float>() : nullptr;
    scalar_t* gw_same = x != nullptr && !gw_is_f32 ? grad_weights.mutable_data_ptr<scalar_t>() : nullptr;
    const bool rows_repeat = !by_row.slots.empty();
    if (rows_repeat) {
      // A row read by several slots gets the sum of their gradients, in
      // slot order, rounded once: the same bits however the rows are split.
      at::parallel_for(0, num_rows, row_grain(hidden * grad_output.element_size()), [&](int64_t r0, int64_t r1) {
        std::vector<acc_t> acc(hidden);
        for (const auto r : c10::irange(r0, r1)) {
          const int64_t b = by_row.slot_start[r], e = by_row.slot_start[r + 1];
          if (b == e) continue;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t s = b; s < e; ++s) {
            const int64_t i = by_row.slots[s];
            const scalar_t* gt = g + (i / top_k) * hidden;
            const acc_t wi = weighted ? w(i) : acc_t(1);
            accumulate_row(acc.data(), gt, &wi, hidden);
          }
          scalar_t* out_row = gp + r * hidden;
          for (const auto h : c10::irange(hidden)) out_row[h] = static_cast<scalar_t>(acc[h]);
        }
      });
    }
    at::parallel_for(0, num_tokens, row_grain(hidden * top_k * grad_output.element_size()), [&](int64_t t0, int64_t t1) {
      for (const auto t : c10::irange(t0, t1)) {
        const scalar_t* gt = g + t * hidden;
        for (const auto j : c10::irange(top_k)) {
          const int64_t i = t * top_k + j;
          const int64_t r = dst[i];
          // Each (token, slot) owns its row here: one writer per row, no atomics.
          if (r >= 0 && !rows_repeat) {
            scalar_t* out_row = gp + r * hidden;
            if (weighted) {
              const acc_t wj = w(i);
              for (const auto h : c10::irange(hidden)) out_row[h] = static_cast<scalar_t>(wj * static_cast<acc_t>(gt[h]));
            } else {
              std::memcpy(out_row, gt, hidden * sizeof(scalar_t));
            }
          }
          if (x != nullptr) {
            const acc_t dot = r >= 0 ? dot_row<acc_t>(gt, x + r * hidden, hidden) : acc_t(0);
            if (gw_f32 != nullptr) {
              gw_f32[i] = static_cast<float>(dot);
            } else {
              gw_same[i] = static_cast<scalar_t>(dot);
            }
          }
        }
      }
    });
  });
}

} // namespace

// Every capability's build registers its copy; the AVX512 one has the
// vector router and combine (plain REGISTER_DISPATCH would leave that slot empty).
ALSO_REGISTER_AVX512_DISPATCH(moe_router_topk_stub, &router_topk_kernel)
ALSO_REGISTER_AVX512_DISPATCH(moe_permute_stub, &permute_kernel)
ALSO_REGISTER_AVX512_DISPATCH(moe_unpermute_stub, &unpermute_kernel)
ALSO_REGISTER_AVX512_DISPATCH(moe_unpermute_backward_stub, &unpermute_backward_kernel)

} // namespace at::native

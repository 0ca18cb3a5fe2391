// CPU kernel of _moe_unpermute: per token, the weighted sum of its k rows in
// slot order, accumulated in float32 (float64 for float64) and rounded once.
// A gather: no atomics, deterministic. All element offsets are int64.

#include <ATen/native/MoEUnpermute.h>
#include <ATen/native/cpu/MoEAvx512Utils.h>
#include <ATen/native/cpu/MoERoutingUtils.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace at::native {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
// GCC 12 reports its own unmasked AVX-512 intrinsics (which start from
// _mm512_undefined_ps) as reading an uninitialised value: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

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
      const __m512 x = moe_load_ps(rows[j] + h, m);
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
    at::parallel_for(0, num_tokens, moe_row_grain(hidden * top_k * permuted.element_size()), [&](int64_t t0, int64_t t1) {
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

} // namespace

// Every capability's build registers its copy; the AVX512 one has the
// vector combine (plain REGISTER_DISPATCH would leave that slot empty).
ALSO_REGISTER_AVX512_DISPATCH(moe_unpermute_stub, &unpermute_kernel)

} // namespace at::native

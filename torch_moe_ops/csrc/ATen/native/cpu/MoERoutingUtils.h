#pragma once

// What the CPU kernels of the MoE routing ops share (cpu/MoEUnpermuteKernel.cpp,
// cpu/MoEUnpermuteBackwardKernel.cpp, cpu/MoERouterTopkKernel.cpp). Each of
// those files is compiled once per CPU capability, so these live in the
// capability's namespace, inline in every kernel that calls them.

#include <ATen/core/Tensor.h>
#include <ATen/native/cpu/MoEAvx512Utils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

// Compilers contract a mul feeding an add into an FMA (one rounding fewer)
// unless told not to, and the AVX2/AVX512 builds have FMA: the sums of the
// combine and its backward are mul then add in every build, as the reference.
#if defined(__clang__)
#define MOE_NO_FP_CONTRACT
#else
#define MOE_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif

namespace at::native {
inline namespace CPU_CAPABILITY {

// Rows per task for row-wise passes: ~64 KB of data each.
inline int64_t moe_row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1));
}

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
inline void check_dst_rows(const char* op, const Tensor& dst_rows, int64_t num_rows) {
  const int64_t* dst = dst_rows.const_data_ptr<int64_t>();
  const int64_t n = dst_rows.numel();
  const int64_t top_k = dst_rows.size(1);
  for (const auto i : c10::irange(n)) {
    TORCH_CHECK_VALUE(dst[i] >= -1 && dst[i] < num_rows,
        op, ": dst_rows must be -1 or a row of permuted in [0, ", num_rows, "), got dst_rows[", i / top_k, ", ",
        i % top_k, "]=", dst[i]);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// GCC 12 reports its own unmasked AVX-512 intrinsics (which start from
// _mm512_undefined_ps) as reading an uninitialised value: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 16 elements (lanes m) of float32, bfloat16 or float16 as float32.
template <typename scalar_t>
inline __m512 moe_load_ps(const scalar_t* p, __mmask16 m) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    return moe_cvt_bf16_f32(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}

#pragma GCC diagnostic pop
#endif // CPU_CAPABILITY_AVX512

} // namespace CPU_CAPABILITY
} // namespace at::native

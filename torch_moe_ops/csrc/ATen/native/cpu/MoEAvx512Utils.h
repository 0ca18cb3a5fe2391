#pragma once

// AVX-512 helpers shared by the CPU kernels of this directory. The
// functions carry their own target attribute, so the including file needs no
// ISA flags (ATen compiles native/cpu/ once per CPU capability; these are
// static, so each build keeps its own copy); call them only after checking
// the CPU (__builtin_cpu_supports).

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_OPS_HAVE_AVX512 1
#define MOE_OPS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace at::native {

// What every kernel here needs; a kernel checks any further extension itself.
static inline bool moe_cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl");
  return ok;
}

// Mask of the lanes of the 16-wide chunk starting at j0 that fall below n.
static inline __mmask16 moe_lanes16(int64_t n, int64_t j0) {
  const int64_t w = std::clamp<int64_t>(n - j0, 0, 16);
  return static_cast<__mmask16>((uint32_t{1} << w) - 1);
}

// float32 -> bfloat16, round to nearest even, NaN -> 0x7FC0: the bits of
// c10::BFloat16(float). Integer arithmetic, because vcvtneps2bf16 flushes
// denormal inputs to zero. (The all-lanes maskz_ forms avoid GCC 12's false
// -Wmaybe-uninitialized on the unmasked ones; same instructions.)
MOE_OPS_AVX512 static inline __m256i moe_cvt_f32_bf16(__m512 v) {
  const __mmask16 all = 0xFFFF;
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(all, bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  __m512i r = _mm512_maskz_srli_epi32(all, rounded, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_maskz_cvtepi32_epi16(all, r);
}

// bfloat16 -> float32: exact.
MOE_OPS_AVX512 static inline __m512 moe_cvt_bf16_f32(__m256i v) {
  const __mmask16 all = 0xFFFF;
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(all, _mm512_maskz_cvtepu16_epi32(all, v), 16));
}

} // namespace at::native

#endif

#pragma once

// AVX-512 helpers shared by the CPU kernels of this directory, for their
// CPU_CAPABILITY_AVX512 builds (DispatchStub runs that build only on CPUs
// with AVX512F/BW/VL/DQ); the other builds take the kernels' scalar paths.
// Intrinsics rather than Vectorized<T>: the kernels need masked tails and
// these exact conversions.

#if defined(CPU_CAPABILITY_AVX512)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace at::native {
inline namespace CPU_CAPABILITY {

// Mask of the lanes of the 16-wide chunk starting at j0 that fall below n.
inline __mmask16 moe_lanes16(int64_t n, int64_t j0) {
  const int64_t w = std::clamp<int64_t>(n - j0, 0, 16);
  return static_cast<__mmask16>((uint32_t{1} << w) - 1);
}

// The same for 32-wide chunks (masks of 16-bit or byte lanes).
inline __mmask32 moe_lanes32(int64_t n, int64_t j0) {
  const int64_t w = std::clamp<int64_t>(n - j0, 0, 32);
  return static_cast<__mmask32>((uint64_t{1} << w) - 1);
}

// float32 -> bfloat16, round to nearest even, NaN -> 0x7FC0: the bits of
// c10::BFloat16(float) (Vectorized<BFloat16>'s conversion gives NaN other
// bits). Integer arithmetic, because vcvtneps2bf16 flushes denormal inputs
// to zero. (The all-lanes maskz_ forms avoid GCC 12's false
// -Wmaybe-uninitialized on the unmasked ones; same instructions.)
inline __m256i moe_cvt_f32_bf16(__m512 v) {
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
inline __m512 moe_cvt_bf16_f32(__m256i v) {
  const __mmask16 all = 0xFFFF;
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(all, _mm512_maskz_cvtepu16_epi32(all, v), 16));
}

} // namespace CPU_CAPABILITY
} // namespace at::native

#endif // CPU_CAPABILITY_AVX512

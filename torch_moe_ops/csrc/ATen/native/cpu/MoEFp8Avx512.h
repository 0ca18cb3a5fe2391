#pragma once

// float8 -> bfloat16 in AVX-512 registers, shared by the scaled grouped mm's
// conversion (cpu/MoEScaledGroupedMMKernel.cpp) and the grouped mm engine
// that decodes float8 weights as it packs them (GroupedMMFloat8Weights.h):
// by byte arithmetic, and by byte tables where the CPU has AVX512_VBMI.
// For their CPU_CAPABILITY_AVX512 builds only.

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/native/cpu/MoEFp8Utils.h>
#include <c10/util/BFloat16.h>

#include <cpuinfo.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>

namespace at::native {
inline namespace CPU_CAPABILITY {

// The bfloat16 bits of the 128 float8 magnitudes (sign bit clear) of each
// format, from the exact table.
inline const uint16_t* moe_fp8_magnitude_bf16_bits(bool e5m2) {
  static const auto bits = [] {
    std::array<std::array<uint16_t, 128>, 2> out{};
    for (int f = 0; f < 2; ++f) {
      const float* lut = moe_fp8_table(f == 1 ? kFloat8_e5m2 : kFloat8_e4m3fn);
      for (int i = 0; i < 128; ++i) out[f][i] = c10::BFloat16(lut[i]).x;
    }
    return out;
  }();
  return bits[e5m2 ? 1 : 0].data();
}

// 64 float8 codes -> the low and high bytes of their bfloat16 bits, by byte
// arithmetic: a normal e4m3fn magnitude m has the bits (m << 4) + (120 << 7)
// (e5m2: (m << 5) + (112 << 7)), whose bytes need no carry between them;
// the denormals come from two 16-entry byte tables (vpshufb), infinity and
// NaN from masks, and the sign is or-ed into the high byte. Exact (every
// e4m3fn and e5m2 value is a bfloat16 value); NaN -> 0x7FC0 whatever its
// sign, as c10::BFloat16(float) gives; code 0 -> +0, so bytes a masked load
// left zero decode to zero. A third fewer instructions than a 16-bit table
// lookup of the magnitude (two vpermt2w, a test and a blend per 32 codes).
template <bool kE5M2>
struct MoEFp8ToBf16 {
  // Byte constants, held here so that a loop keeps them in registers (or
  // reads them from memory) rather than rebuilding them on every call.
  __m512i den_lo, den_hi, mag_mask, sign_mask, lo_mask, exp_mask, exp_bias, den_bound, special, nan_lo;

  static __m512i bytes(int v) {
    return _mm512_set1_epi8(static_cast<char>(v));
  }

  MoEFp8ToBf16() {
    const uint16_t* bits = moe_fp8_magnitude_bf16_bits(kE5M2);
    alignas(16) uint8_t lo[16] = {}, hi[16] = {};
    for (int m = 0; m < (kE5M2 ? 4 : 8); ++m) {  // the denormal magnitudes
      lo[m] = static_cast<uint8_t>(bits[m] & 0xFF);
      hi[m] = static_cast<uint8_t>(bits[m] >> 8);
    }
    den_lo = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
    den_hi = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)));
    mag_mask = bytes(0x7F);
    sign_mask = bytes(0x80);
    lo_mask = bytes(kE5M2 ? 0xE0 : 0xF0);
    exp_mask = bytes(kE5M2 ? 0x0F : 0x07);
    exp_bias = bytes(kE5M2 ? 0x38 : 0x3C);
    den_bound = bytes(kE5M2 ? 0x04 : 0x08);
    special = bytes(kE5M2 ? 0x7C : 0x7F);  // e5m2: infinity (NaN above); e4m3fn: NaN
    nan_lo = bytes(0xC0);
  }

  void operator()(__m512i codes, __m512i& lo, __m512i& hi) const {
    const __m512i mag = _mm512_and_si512(codes, mag_mask);
    // Shifts are 16-bit: the masks keep each byte's own bits.
    lo = _mm512_and_si512(_mm512_slli_epi16(codes, kE5M2 ? 5 : 4), lo_mask);
    hi = _mm512_add_epi8(_mm512_and_si512(_mm512_srli_epi16(codes, kE5M2 ? 3 : 4), exp_mask), exp_bias);
    const __mmask64 den = _mm512_cmplt_epu8_mask(mag, den_bound);
    lo = _mm512_mask_shuffle_epi8(lo, den, den_lo, mag);
    hi = _mm512_mask_shuffle_epi8(hi, den, den_hi, mag);
    __mmask64 nan;
    if constexpr (kE5M2) {
      const __mmask64 inf = _mm512_cmpeq_epi8_mask(mag, special);
      lo = _mm512_mask_mov_epi8(lo, inf, sign_mask);
      hi = _mm512_mask_mov_epi8(hi, inf, mag_mask);
      nan = _mm512_cmpgt_epu8_mask(mag, special);
    } else {
      nan = _mm512_cmpeq_epi8_mask(mag, special);
    }
    hi = _mm512_ternarylogic_epi32(hi, codes, sign_mask, 0xF8);  // hi | (codes & 0x80)
    lo = _mm512_mask_mov_epi8(lo, nan, nan_lo);
    hi = _mm512_mask_mov_epi8(hi, nan, mag_mask);
  }

  // 64 consecutive codes (lanes m of src; the others decode to zero) -> their
  // bfloat16 bits in order, 32 in each of out[0], out[1]. The qwords are
  // first spread over the 128-bit lanes so that the in-lane byte
  // interleaves put the words back in order.
  void run(const uint8_t* src, __mmask64 m, __m512i (&out)[2]) const {
    const __m512i spread = _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0);
    __m512i lo, hi;
    (*this)(_mm512_permutexvar_epi64(spread, _mm512_maskz_loadu_epi8(m, src)), lo, hi);
    out[0] = _mm512_unpacklo_epi8(lo, hi);
    out[1] = _mm512_unpackhi_epi8(lo, hi);
  }
};

// f(MoEFp8ToBf16<e5m2>{}) for the format of the codes.
template <typename F>
void moe_with_fp8_decoder(bool e5m2, F&& f) {
  if (e5m2) {
    f(MoEFp8ToBf16<true>{});
  } else {
    f(MoEFp8ToBf16<false>{});
  }
}

// The same decode by byte tables, for CPUs with AVX512_VBMI (Ice Lake,
// Sapphire Rapids, Zen 4 and later; not Cooper Lake): vpermt2b looks each
// code's low 7 bits up in 128-byte tables of the magnitudes' low and high
// bytes and of the sign bit to keep (none for NaN), 4 instructions per 64
// codes against MoEFp8ToBf16's 13. The same bits as MoEFp8ToBf16 for every
// code. Its members carry MOE_FP8_VBMI: a caller must too, and run only
// where moe_cpu_has_avx512_vbmi().
#define MOE_FP8_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))

template <bool kE5M2>
struct MoEFp8ToBf16Vbmi {
  __m512i lo0, lo1, hi0, hi1, keep0, keep1;
  // vpermt2b indices that interleave the low and high bytes of codes 0-31
  // (words0) and 32-63 (words1) into their bfloat16 words in order.
  __m512i words0, words1;

  MoEFp8ToBf16Vbmi() {
    const uint16_t* bits = moe_fp8_magnitude_bf16_bits(kE5M2);
    alignas(64) uint8_t lo[128], hi[128], keep[128], words[2][64];
    for (int m = 0; m < 128; ++m) {
      const bool nan = bits[m] > 0x7F80;
      const uint16_t v = nan ? 0x7FC0 : bits[m];
      lo[m] = static_cast<uint8_t>(v & 0xFF);
      hi[m] = static_cast<uint8_t>(v >> 8);
      keep[m] = nan ? 0x00 : 0x80;
    }
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < 32; ++i) {
        words[h][2 * i] = static_cast<uint8_t>(32 * h + i);           // the low byte, from lo
        words[h][2 * i + 1] = static_cast<uint8_t>(64 + 32 * h + i);  // the high byte, from hi
      }
    }
    lo0 = _mm512_load_si512(lo);
    lo1 = _mm512_load_si512(lo + 64);
    hi0 = _mm512_load_si512(hi);
    hi1 = _mm512_load_si512(hi + 64);
    keep0 = _mm512_load_si512(keep);
    keep1 = _mm512_load_si512(keep + 64);
    words0 = _mm512_load_si512(words[0]);
    words1 = _mm512_load_si512(words[1]);
  }

  // MoEFp8ToBf16's operator(): the low and high bytes of 64 codes' bits.
  MOE_FP8_VBMI void operator()(__m512i codes, __m512i& lo, __m512i& hi) const {
    lo = _mm512_permutex2var_epi8(lo0, codes, lo1);
    hi = _mm512_permutex2var_epi8(hi0, codes, hi1);
    const __m512i keep = _mm512_permutex2var_epi8(keep0, codes, keep1);
    hi = _mm512_ternarylogic_epi32(hi, codes, keep, 0xF8);  // hi | (codes & keep)
  }

  // MoEFp8ToBf16::run: 64 consecutive codes (lanes m of src; the others
  // decode to zero) -> their bfloat16 bits in order, 32 in each of out[0],
  // out[1], the bytes interleaved by two more byte permutes.
  MOE_FP8_VBMI void run(const uint8_t* src, __mmask64 m, __m512i (&out)[2]) const {
    __m512i lo, hi;
    (*this)(_mm512_maskz_loadu_epi8(m, src), lo, hi);
    out[0] = _mm512_permutex2var_epi8(lo, words0, hi);
    out[1] = _mm512_permutex2var_epi8(lo, words1, hi);
  }
};

// Read as cpu_has_avx512_bf16 (GroupedMMAvx512.h) reads its flag: by the
// compiler's CPUID builtins, whose answer the wheel's cpuinfo copy lacks.
inline bool moe_cpu_has_avx512_vbmi() {
#if defined(__GNUC__)
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vbmi"));
#else
  static const bool has = cpuinfo_initialize() && cpuinfo_has_x86_avx512vbmi();
#endif
  return has;
}

// The lanes of the 64-wide chunk starting at j0 that fall below n.
inline __mmask64 moe_lanes64(int64_t n, int64_t j0) {
  const int64_t w = std::clamp<int64_t>(n - j0, 0, 64);
  return w == 64 ? ~__mmask64{0} : (__mmask64{1} << w) - 1;
}

} // namespace CPU_CAPABILITY
} // namespace at::native

#endif // CPU_CAPABILITY_AVX512

#pragma once

// Float8 weights in the bfloat16 broadcast engine (GroupedMMAvx512.h): the
// packing that decodes them. scaled_grouped_mm's rowwise recipe on CPUs with
// AVX512_BF16 (grouped_mm_float8_weights_stub) multiplies bfloat16 A by its
// float8 weights this way: each (K block x 64) weight block is decoded from
// the caller's float8 codes straight into the K-pair block vdpbf16ps reads,
// 32 KB of the thread's scratch, so the weights cross the memory bus once at
// one byte an element and are never widened into a buffer of their own.
// (Widening each chunk of groups to bfloat16 first, then running the
// bfloat16 kernel on it, cost a pass over the weights that ran in series with
// the GEMM: 0.73-0.89x the bfloat16 grouped mm's speed, Zen 5.) Decoding is
// exact, so the products and the K order are those of the bfloat16 kernel on
// the decoded weights. Included by cpu/GroupedMMKernel.cpp in its
// CPU_CAPABILITY_AVX512 build only.

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/native/cpu/GroupedMMAvx512.h>
#include <ATen/native/cpu/GroupedMMAvx512BF16.h>
#include <ATen/native/cpu/MoEFp8Avx512.h>

namespace at::native {
namespace {

// The dword permute that spreads 64 codes over the 128-bit lanes so that
// fp8_rows_to_pairs' in-lane interleaves end in column order.
inline __m512i fp8_pair_spread() {
  return _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
}

// K pair (row0, row1) of 64 columns of (K, N) codes -> q[j], the K-pair words
// of columns 16j..16j + 15 as the packed block holds them (row1 zero unless
// second): both rows decoded to bytes, then interleaved bytes to words and
// the rows' words to pairs, in-lane (hence the spread).
template <typename Decoder>
inline __attribute__((always_inline)) void fp8_rows_to_pairs(const Decoder& decode, __m512i spread, __m512i row0,
                                                             __m512i row1, bool second, __m512i (&q)[4]) {
  __m512i lo0, hi0, lo1 = _mm512_setzero_si512(), hi1 = _mm512_setzero_si512();
  decode(_mm512_permutexvar_epi32(spread, row0), lo0, hi0);
  if (second) decode(_mm512_permutexvar_epi32(spread, row1), lo1, hi1);
  const __m512i w0 = _mm512_unpacklo_epi8(lo0, hi0), w1 = _mm512_unpacklo_epi8(lo1, hi1);
  const __m512i x0 = _mm512_unpackhi_epi8(lo0, hi0), x1 = _mm512_unpackhi_epi8(lo1, hi1);
  q[0] = _mm512_unpacklo_epi16(w0, w1);
  q[1] = _mm512_unpackhi_epi16(w0, w1);
  q[2] = _mm512_unpacklo_epi16(x0, x1);
  q[3] = _mm512_unpackhi_epi16(x0, x1);
}

// Weight block (kc x w float8 codes at src, strides rs / cs in codes) ->
// ceil(kc / 2) x 64 bfloat16 K pairs (row 2p in the low half, row 2p + 1 in
// the high half), zero past kc and past w; kc <= 256. Inlined into each
// decoder's caller (pack_b_fp8_pairs_vbmi's target attribute).
template <typename Decoder>
inline __attribute__((always_inline)) void pack_b_fp8_pairs_with(const Decoder& decode, uint32_t* dst,
                                                                 const uint8_t* src, int64_t rs, int64_t cs,
                                                                 int64_t kc, int64_t w, bool e5m2) {
  const int64_t pairs = (kc + 1) / 2;
  if (cs == 1) {  // (K, N) storage: rows of codes, masked past w
    const __m512i spread = fp8_pair_spread();
    const __mmask64 m = moe_lanes64(w, 0);
    for (int64_t kp = 0; kp < pairs; ++kp) {
      const uint8_t* r0 = src + 2 * kp * rs;
      const bool second = 2 * kp + 1 < kc;
      __m512i q[4];
      fp8_rows_to_pairs(decode, spread, _mm512_maskz_loadu_epi8(m, r0),
                        second ? _mm512_maskz_loadu_epi8(m, r0 + rs) : _mm512_setzero_si512(), second, q);
      for (int j = 0; j < 4; ++j) _mm512_store_si512(dst + kp * kNR + 16 * j, q[j]);
    }
    return;
  }
  if (rs == 1 && w % 16 == 0 && kc % 64 == 0) {
    // (N, K) storage, transformers' layout (a column's K codes contiguous):
    // 16 columns x 64 K at a time, the codes first transposed 16 x 16 in
    // registers, a 32-bit word (4 K codes) per column, then each transposed
    // row (K 4q..4q + 3 of the 16 columns, 4 columns a 128-bit lane) decoded
    // and split into K pairs 2q and 2q + 1 with in-lane interleaves and
    // shuffles. Decoding bfloat16 rows first, then transposing those, took
    // a third more instructions and a 32 KB buffer.
    for (int64_t j0 = 0; j0 < w; j0 += 16) {
      for (int64_t k0 = 0; k0 < kc; k0 += 64) {
        __m512i r[16];
        for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(src + (j0 + c) * cs + k0);
        transpose_16x16_epi32(r);
        for (int q = 0; q < 16; ++q) {
          __m512i lo, hi;
          decode(r[q], lo, hi);
          // Per lane: (pair 2q, pair 2q + 1) of each of its 4 columns.
          const __m512 u = _mm512_castsi512_ps(_mm512_unpacklo_epi8(lo, hi));
          const __m512 v = _mm512_castsi512_ps(_mm512_unpackhi_epi8(lo, hi));
          uint32_t* to = dst + (k0 / 2 + 2 * q) * kNR + j0;
          _mm512_store_si512(to, _mm512_castps_si512(_mm512_shuffle_ps(u, v, _MM_SHUFFLE(2, 0, 2, 0))));
          _mm512_store_si512(to + kNR, _mm512_castps_si512(_mm512_shuffle_ps(u, v, _MM_SHUFFLE(3, 1, 3, 1))));
        }
      }
    }
    for (int64_t kp = 0; kp < pairs; ++kp) {
      for (int64_t j = w; j < kNR; j += 16) _mm512_store_si512(dst + kp * kNR + j, _mm512_setzero_si512());
    }
    return;
  }
  if (rs == 1) {
    // (N, K) storage at the edges of the weights: decoded column by column
    // into bfloat16 rows (an even length, zero past kc), whose K pairs are
    // 32-bit words that pack_words_transposed turns into the block.
    constexpr int64_t kMaxKC = 256;
    alignas(64) BFloat16 cols[kNR * kMaxKC];
    TORCH_INTERNAL_ASSERT(kc <= kMaxKC);
    const int64_t ld = (kc + 63) / 64 * 64;
    for (int64_t j = 0; j < w; ++j) {
      for (int64_t i = 0; i < ld; i += 64) {
        __m512i v[2];
        decode.run(src + j * cs + i, moe_lanes64(kc, i), v);
        _mm512_store_si512(cols + j * ld + i, v[0]);
        _mm512_store_si512(cols + j * ld + i + 32, v[1]);
      }
    }
    pack_words_transposed(dst, cols, ld / 2, pairs, w);
    return;
  }
  // Neither dimension contiguous: element by element.
  const uint16_t* bits = moe_fp8_magnitude_bf16_bits(e5m2);
  const auto bf16 = [&](uint8_t code) -> uint32_t {
    const uint32_t v = bits[code & 0x7F];
    return v > 0x7F80 ? 0x7FC0 : v | (static_cast<uint32_t>(code & 0x80) << 8);
  };
  for (int64_t kp = 0; kp < pairs; ++kp) {
    for (int64_t j = 0; j < kNR; ++j) {
      uint32_t word = 0;
      if (j < w) {
        word = bf16(src[2 * kp * rs + j * cs]);
        if (2 * kp + 1 < kc) word |= bf16(src[(2 * kp + 1) * rs + j * cs]) << 16;
      }
      dst[kp * kNR + j] = word;
    }
  }
}

// The same by byte tables (AVX512_VBMI). (N, K) codes are packed in a pass
// in series with the FMAs ((K, N) ones are decoded among them), which its
// decode dominated: Zen 4, 2 threads, DeepSeek-V3 2d3d `nk`, the pass from
// 11.8% to 8.65% of the call's perf samples.
template <bool kE5M2>
MOE_FP8_VBMI void pack_b_fp8_pairs_vbmi(uint32_t* dst, const uint8_t* src, int64_t rs, int64_t cs, int64_t kc,
                                        int64_t w) {
  static const MoEFp8ToBf16Vbmi<kE5M2> decode;
  pack_b_fp8_pairs_with(decode, dst, src, rs, cs, kc, w, kE5M2);
}

void pack_b_fp8_pairs(uint32_t* dst, const uint8_t* src, int64_t rs, int64_t cs, int64_t kc, int64_t w,
                      bool e5m2) {
  if (moe_cpu_has_avx512_vbmi()) {
    return e5m2 ? pack_b_fp8_pairs_vbmi<true>(dst, src, rs, cs, kc, w)
                : pack_b_fp8_pairs_vbmi<false>(dst, src, rs, cs, kc, w);
  }
  moe_with_fp8_decoder(e5m2, [&](const auto& decode) {
    pack_b_fp8_pairs_with(decode, dst, src, rs, cs, kc, w, e5m2);
  });
}

// The weights of K pair kp of the micro-kernel's 64 columns, decoded from
// the float8 rows 2kp and 2kp + 1 (x.pack_b.src8, rs codes apart; the second
// zero past kc) by fp8_rows_to_pairs, as pack_b_fp8_pairs packs (K, N)
// storage, and stored into the block for the row blocks after the first:
// PairWeights<true>'s job for float8 codes, the decode among the first row
// block's FMAs instead of in a pass of its own. Full 64-column strips only
// (plain loads, as PairWeights).
template <bool kE5M2>
struct Float8PairWeights {
  MoEFp8ToBf16<kE5M2> decode;
  const uint8_t* src;
  int64_t rs;
  uint32_t* dst;
  __m512i spread;

  GROUPED_MM_AVX512_BF16 explicit Float8PairWeights(const uint32_t* /*b*/, const MicroArgs& x)
      : src(x.pack_b.src8), rs(x.pack_b.rs), dst(x.pack_b.dst), spread(fp8_pair_spread()) {}

  GROUPED_MM_AVX512_BF16 inline __attribute__((always_inline)) void get(__m512bh (&v)[4], int64_t kp,
                                                                        bool second_row) const {
    const uint8_t* r0 = src + 2 * kp * rs;
    __m512i q[4];
    fp8_rows_to_pairs(decode, spread, _mm512_loadu_si512(r0),
                      second_row ? _mm512_loadu_si512(r0 + rs) : _mm512_setzero_si512(), second_row, q);
    uint32_t* to = dst + kp * kNR;
    for (int j = 0; j < 4; ++j) {
      _mm512_store_si512(to + 16 * j, q[j]);
      v[j] = (__m512bh)q[j];
    }
  }
};

template <int MR, typename out_t>
void micro_bf16_float8(const BFloat16* const* a, const uint32_t* b, const MicroArgs& x) {
  if (x.pack_b.e5m2) {
    micro_bf16_pairs<MR, out_t, Float8PairWeights<true>>(a, b, x);
  } else {
    micro_bf16_pairs<MR, out_t, Float8PairWeights<false>>(a, b, x);
  }
}

// Block i of tile t of a float8 problem, in the broadcast engine's order (the
// tile's 64-column strips K block by K block), as rows to prefetch: weight
// rows of the block's 64 codes ((K, N) storage) or its columns' kc codes
// ((N, K) storage); none past the tile's last block.
template <typename P>
Prefetch float8_weight_block(const P& p, const Tile& t, int64_t i, int64_t kc_max) {
  Prefetch pf;
  const int64_t strips = (t.nb + kNR - 1) / kNR;
  const int64_t k0 = i / strips * kc_max, j0 = t.n0 + i % strips * kNR;
  if (p.k <= 0 || k0 >= p.k) return pf;
  const int64_t kc = std::min(kc_max, p.k - k0), w = std::min(kNR, t.n0 + t.nb - j0);
  pf.base = reinterpret_cast<const char*>(p.b8 + k0 * p.b_rs + j0 * p.b_cs);
  if (p.b_cs == 1) {
    pf.stride = p.b_rs, pf.rows = kc, pf.bytes = w;
  } else {
    pf.stride = p.b_cs, pf.rows = w, pf.bytes = kc;
  }
  return pf;
}

} // namespace
} // namespace at::native

#endif // CPU_CAPABILITY_AVX512

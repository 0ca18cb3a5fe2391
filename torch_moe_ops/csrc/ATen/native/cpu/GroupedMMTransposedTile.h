#pragma once

// The transposed-tile engine of the CPU grouped mm kernel: float32 and
// bfloat16 groups of a few dozen rows and more whose expert weights are stored
// (E, N, K), transformers' layout. Part of the AVX-512 engine (GroupedMMAvx512.h), included with it by
// cpu/GroupedMMKernel.cpp in its CPU_CAPABILITY_AVX512 build only.

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/native/cpu/GroupedMMAvx512.h>
#include <ATen/native/cpu/GroupedMMAvx512BF16.h>
#include <ATen/native/cpu/GroupedMMInnerProduct.h>
#include <c10/util/bit_cast.h>

#include <cstring>

namespace at::native {
namespace {

// ---- transposed-tile engine: C^T tiles, the weights broadcast in place ------
// With a few dozen rows per expert every weight is used by that many rows
// only, so a kernel that first packs a weight block (the broadcast engine) or
// re-reads it once per 6-row block (the inner-product engine) spends a large
// part of its time moving weights rather than multiplying them (Ice Lake, one
// thread, float32, 48 rows per expert: 85-100 GFLOP/s for either, MKL's dense
// sgemm 125-160). Here the roles turn around: a tile of C^T holds up to 48
// rows of C in 3 vectors per output column, the group's rows are packed once
// per tile into K-major order (L2-resident: kTtPackedBytes at most), and each
// weight is broadcast straight from the caller's (E, N, K) memory, 8 weight
// rows side by side, each read as 8 sequential streams that the hardware
// prefetchers follow (same machine: 125-150 GFLOP/s).
//
// It runs float32 groups of 17 rows and more, and bfloat16 groups of 18 and
// more where the CPU has AVX512_BF16: a K pair of a weight row is one 32-bit
// word, broadcast as it is into vdpbf16ps, and the rows are packed as K pairs.
// Past 48 rows a tile makes several passes over the rows per K block, the
// later ones finding the 8 weight rows' block in L1. Zen 5, 2 threads, K 2048,
// N 1536, uniform groups (GFLOP/s, this engine against the inner-product
// engine that (E, N, K) weights took before): float32 64-384 rows 380-410
// against 260-270; bfloat16 32 rows 630 against 550, 48 rows 730, 96-384 rows
// 820-920 (dense 930-970), before the weight prefetch below. With it,
// bfloat16 wins from 18 rows (K 1792, N 1024: 18 rows 475-530 against 430,
// 20 rows 465-570 against 445-465, 24 rows 700 against 500). At 17 rows (two
// vectors, 15 lanes idle) the inner-product engine is faster (480-505 against
// 430-495), as it is at 12-14 rows; float32's wins below 17 rows.
//
// Accumulation is float32 in K order (K pairs for bfloat16, an odd last
// element paired with zero), from zero, exactly as in the broadcast engine,
// so the bits equal those of the same weights stored (E, K, N), and depend
// only on the shapes. Blocks of K spill to a float32 buffer, which changes no
// rounding (blocks hold whole K pairs).
constexpr int64_t kTtNR = 8;       // weight rows (output columns) per micro-kernel call
// Fewer rows: the inner-product engine's prefetched weight stream wins.
constexpr int64_t kTtMinRowsF32 = 17;
constexpr int64_t kTtMinRowsBF16 = 18;
template <typename scalar_t>
constexpr int64_t tt_min_rows() {
  return std::is_same_v<scalar_t, float> ? kTtMinRowsF32 : kTtMinRowsBF16;
}
// More rows leave the packed rows too short a K block (3D x 2D's 1536 weight
// rows: 128 K of bfloat16), the tile's accumulators spilling at each: rows
// stored along K then go to the inner-product engine, which reads them in
// place (Zen 5, 3D x 2D of OLMoE / DeepSeek-V3, bfloat16: 640 / 440 GFLOP/s
// against 450 / 300 here). It cannot read K-major rows (a transposed view),
// for which this engine stays the faster one (540 / 310 against 410 / 220).
constexpr int64_t kTtMaxRows = 512;
constexpr int64_t kTtKC = 2048;    // K per packed block of the group's rows, at most
constexpr int64_t kTtPackedBytes = 384 * 1024; // the packed block of the group's rows, at most

// K elements per 32-bit word of the packed rows: a float32, or a bfloat16 K pair.
template <typename scalar_t>
constexpr int64_t kTtPerWord = static_cast<int64_t>(sizeof(uint32_t) / sizeof(scalar_t));

template <typename scalar_t, typename P>
bool tt_eligible(const P& p) {
  const bool nk = p.b_rs == 1 && p.b_cs != 1 && p.b_idx == nullptr && p.b8 == nullptr &&
      (p.m <= kTtMaxRows || p.a_cs != 1);
  if constexpr (std::is_same_v<scalar_t, float>) {
    return nk && p.m >= tt_min_rows<scalar_t>();
  } else if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    return nk && p.m >= tt_min_rows<scalar_t>() && cpu_has_avx512_bf16();
  } else {
    return false;
  }
}

// K per block: the packed rows within kTtPackedBytes, in whole 32-element
// steps (whole K pairs), at most kTtKC (which float32 up to 48 rows gets).
template <typename scalar_t>
int64_t tt_kc(int64_t k, int64_t mpad) {
  const int64_t fit = kTtPackedBytes / (mpad * static_cast<int64_t>(sizeof(scalar_t))) / 32 * 32;
  return std::min({k, kTtKC, std::max<int64_t>(fit, 32)});
}

// Rows past the tile's last whole 16-row vector take inner products instead
// of a vector of their own, which costs as much as 16 rows (20 rows ran as
// 32, 33 as 48), up to kTtMaxRest of them after two vectors or more and
// kTtMaxRestOneVector after one, whose single vector per column leaves the
// loads the bottleneck. Zen 5, 2 threads, uniform groups streamed from DRAM,
// K 1792, N 1024, bfloat16 GFLOP/s padded against inner products: 18 rows
// 503 / 586, 20 rows 550 / 611, 22 rows 564 / 600, 23 rows 638 / 608 (7
// after one vector: padded), 24 rows 666 / 619, 33 rows 635 / 850, 36 rows
// 685 / 871, 42 rows 743 / 813, 44 rows 773 / 809, 45-47 rows even (13-15
// after two vectors: padded), 58 rows 731 / 781, 60 rows 789 / 826; float32
// 18 rows 253 / 315, 20 rows 277 / 335, 33 rows 305 / 415, 40 rows 366 / 412.
constexpr int64_t kTtMaxRest = 12;
constexpr int64_t kTtMaxRestOneVector = 6;

// How the engine splits a problem's rows: the tile's vectors hold mpad rows
// (all of them padded to whole vectors, or only the whole ones), the rest
// run the inner-product engine's micro-kernel over the whole K right after
// the tile's passes over each 8 weight rows, which are then still in cache.
// That needs A's rows contiguous along K (the micro-kernel reads them in
// place) and K in one block. Those rows sum in the inner-product engine's
// order, so their bits are those of the same rows as a group of their own.
struct TtRows {
  int64_t mpad;  // rows in the tile's vectors, a multiple of 16
  int64_t rest;  // rows after them, as inner products; 0 for none
  int64_t kc;    // K per packed block of the vectors' rows
};

template <typename scalar_t, typename P>
TtRows tt_rows(const P& p) {
  const int64_t whole = p.m / 16 * 16;
  const int64_t kc = tt_kc<scalar_t>(p.k, whole);
  const int64_t most = whole == 16 ? kTtMaxRestOneVector : kTtMaxRest;
  if (p.m - whole <= most && kc == p.k && p.a_cs == 1 && p.a_col_idx == nullptr) {
    return {whole, p.m - whole, kc};
  }
  const int64_t mpad = (p.m + 15) / 16 * 16;
  return {mpad, 0, tt_kc<scalar_t>(p.k, mpad)};
}

// A micro-kernel's accumulators: column j of the tile at ct + j * ldct,
// rows 16 i .. 16 i + 15 in acc[i][j]; zero when first.
template <int MV>
inline void tt_load_acc(__m512 (&acc)[MV][kTtNR], const float* ct, int64_t ldct, bool first) {
  GROUPED_MM_UNROLL
  for (int i = 0; i < MV; ++i) {
    GROUPED_MM_UNROLL
    for (int j = 0; j < kTtNR; ++j) {
      acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(ct + j * ldct + 16 * i);
    }
  }
}

template <int MV>
inline void tt_store_acc(const __m512 (&acc)[MV][kTtNR], float* ct, int64_t ldct) {
  GROUPED_MM_UNROLL
  for (int i = 0; i < MV; ++i) {
    GROUPED_MM_UNROLL
    for (int j = 0; j < kTtNR; ++j) _mm512_storeu_ps(ct + j * ldct + 16 * i, acc[i][j]);
  }
}

// The next 8 weight rows' K block, pulled into L2 while the micro-kernel
// multiplies the current ones, in step with the K loop: a K step reads 4
// bytes of each row (a float32, or a bfloat16 K pair), so every 16 steps use
// up one line of each of the 8 rows, and every other step prefetches the same
// line of one row of the next 8, a whole call ahead of its use. The hardware
// prefetchers alone restart at every 4 KB row. Zen 5, 2 threads, weights
// streamed from DRAM, GFLOP/s without and with: bfloat16 32 rows, K 1792, N
// 1024 (DeepSeek-V3) 640-650 and 795-830; 48 rows, K 2048, N 1536 630-765 and
// 850-875; float32 32-48 rows 310-340 and 400-435. Without rows to prefetch,
// every step prefetches kNoRows' one line (it stays in L1), so the K loop has
// no branch on it.
alignas(64) inline const char kNoRows[64] = {};
struct TtPrefetch {
  const char* rows[kTtNR] = {kNoRows, kNoRows, kNoRows, kNoRows, kNoRows, kNoRows, kNoRows, kNoRows};
  int64_t offset_mask = 0; // ~0 with rows to prefetch
};

// The line an even K step prefetches. The prefetch itself stays in the K
// loop: GCC 12 deems a helper whose only effect is a prefetch free of side
// effects and deletes its calls.
inline const char* tt_prefetch_line(const TtPrefetch& pf, int64_t step) {
  return pf.rows[(step >> 1) & 7] + (((step >> 4) << 6) & pf.offset_mask);
}

// acc[i][j] += at[k][16 i .. 16 i + 15] * b[j][k] over k < kc, for MV vectors
// of rows and the 8 weight rows b; acc starts from zero (first) or from ct,
// column j of the tile at ct + j * ldct, and ends in ct. Not inlined: inlined
// into the tile loop, GCC 12 kept the 1-vector form's accumulators in memory.
template <int MV>
__attribute__((noinline)) void tt_micro(const float* at, int64_t ld_at, const float* const* b, int64_t kc,
                                        float* ct, int64_t ldct, bool first, const TtPrefetch& pf) {
  static_assert(kTtNR == 8);
  __m512 acc[MV][kTtNR];
  tt_load_acc<MV>(acc, ct, ldct, first);
  const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3], *b4 = b[4], *b5 = b[5], *b6 = b[6], *b7 = b[7];
  for (int64_t k = 0; k < kc; ++k) {
    if ((k & 1) == 0) _mm_prefetch(tt_prefetch_line(pf, k), _MM_HINT_T1);
    __m512 a[MV];
    GROUPED_MM_UNROLL
    for (int i = 0; i < MV; ++i) a[i] = _mm512_loadu_ps(at + k * ld_at + 16 * i);
    const float bk[kTtNR] = {b0[k], b1[k], b2[k], b3[k], b4[k], b5[k], b6[k], b7[k]};
    GROUPED_MM_UNROLL
    for (int j = 0; j < kTtNR; ++j) {
      const __m512 bv = _mm512_set1_ps(bk[j]);
      GROUPED_MM_UNROLL
      for (int i = 0; i < MV; ++i) acc[i][j] = _mm512_fmadd_ps(a[i], bv, acc[i][j]);
    }
  }
  tt_store_acc<MV>(acc, ct, ldct);
}

// The same for bfloat16: at holds K pairs (word kp of a row: elements 2 kp and
// 2 kp + 1), each weight row's pair is loaded as one word and broadcast.
template <int MV>
GROUPED_MM_AVX512_BF16 __attribute__((noinline)) void tt_micro_bf16(const uint32_t* at, int64_t ld_at,
                                                                    const BFloat16* const* b, int64_t kc,
                                                                    float* ct, int64_t ldct, bool first,
                                                                    const TtPrefetch& pf) {
  static_assert(kTtNR == 8);
  __m512 acc[MV][kTtNR];
  tt_load_acc<MV>(acc, ct, ldct, first);
  const auto word = [](const BFloat16* s) {
    int32_t w;
    std::memcpy(&w, s, sizeof(w));
    return w;
  };
  const BFloat16 *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3], *b4 = b[4], *b5 = b[5], *b6 = b[6], *b7 = b[7];
  const int64_t pairs = kc / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    if ((kp & 1) == 0) _mm_prefetch(tt_prefetch_line(pf, kp), _MM_HINT_T1);
    __m512bh a[MV];
    GROUPED_MM_UNROLL
    for (int i = 0; i < MV; ++i) a[i] = (__m512bh)_mm512_loadu_si512(at + kp * ld_at + 16 * i);
    const int64_t e = 2 * kp;
    const int32_t bk[kTtNR] = {word(b0 + e), word(b1 + e), word(b2 + e), word(b3 + e),
                               word(b4 + e), word(b5 + e), word(b6 + e), word(b7 + e)};
    GROUPED_MM_UNROLL
    for (int j = 0; j < kTtNR; ++j) {
      const __m512bh bv = (__m512bh)_mm512_set1_epi32(bk[j]);
      GROUPED_MM_UNROLL
      for (int i = 0; i < MV; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a[i], bv);
    }
  }
  if (kc % 2 != 0) {  // the last element pairs with zero; the one after it may not exist
    __m512bh a[MV];
    GROUPED_MM_UNROLL
    for (int i = 0; i < MV; ++i) a[i] = (__m512bh)_mm512_loadu_si512(at + pairs * ld_at + 16 * i);
    GROUPED_MM_UNROLL
    for (int j = 0; j < kTtNR; ++j) {
      const __m512bh bv = (__m512bh)_mm512_set1_epi32(b[j][kc - 1].x);
      GROUPED_MM_UNROLL
      for (int i = 0; i < MV; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a[i], bv);
    }
  }
  tt_store_acc<MV>(acc, ct, ldct);
}

// at[w * mpad + r] = word w of A[r, k0 .. k0 + kc) for w < ceil(kc / per
// word), r < mpad: a float32, or the K pair (2 w, 2 w + 1) of bfloat16 with
// zero past kc; zero for r >= m and for a -1 row index. Rows contiguous along
// K go 16 x 16 words through registers; K-major rows are copied.
template <typename scalar_t, typename out_t>
void tt_pack_a(const Problem<scalar_t, out_t, float>& p, int64_t k0, int64_t kc, int64_t mpad, uint32_t* at) {
  constexpr int64_t per = kTtPerWord<scalar_t>;
  const int64_t words = (kc + per - 1) / per;
  const auto row = [&p](int64_t r) -> const scalar_t* {
    const int64_t i = p.a_row_idx != nullptr ? p.a_row_idx[r] : r;
    return i < 0 ? nullptr : p.a + i * p.a_rs;
  };
  if (p.a_rs == 1 && p.a_cs != 1 && p.a_row_idx == nullptr && p.a_col_idx == nullptr) {
    // K-major rows (a transposed view, 3D x 2D's (E, K, N) weights): the
    // rows' values at one K are contiguous already.
    for (int64_t w = 0; w < words; ++w) {
      uint32_t* dst = at + w * mpad;
      const scalar_t* s0 = p.a + (k0 + w * per) * p.a_cs;
      const scalar_t* s1 = per == 2 && w * per + 1 < kc ? s0 + p.a_cs : nullptr;
      for (int64_t r = 0; r < mpad; r += 16) {
        const __mmask16 lanes = moe_lanes16(p.m, r);
        __m512i v;
        if constexpr (per == 1) {
          v = _mm512_maskz_loadu_epi32(lanes, s0 + r);
        } else {
          v = _mm512_maskz_cvtepu16_epi32(kAll16, _mm256_maskz_loadu_epi16(lanes, s0 + r));
          if (s1 != nullptr) {
            const __m512i hi = _mm512_maskz_cvtepu16_epi32(kAll16, _mm256_maskz_loadu_epi16(lanes, s1 + r));
            v = _mm512_or_si512(v, _mm512_slli_epi32(hi, 16));
          }
        }
        _mm512_storeu_si512(dst + r, v);
      }
    }
    return;
  }
  if (p.a_cs != 1 || p.a_col_idx != nullptr) {
    const auto bits = [&p, k0](const scalar_t* s, int64_t k) -> uint32_t {
      const int64_t c = p.a_col_idx != nullptr ? p.a_col_idx[k0 + k] : k0 + k;
      if (c < 0) return 0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        return c10::bit_cast<uint32_t>(s[c * p.a_cs]);
      } else {
        return s[c * p.a_cs].x;
      }
    };
    for (int64_t r = 0; r < mpad; ++r) {
      const scalar_t* s = r < p.m ? row(r) : nullptr;
      for (int64_t w = 0; w < words; ++w) {
        uint32_t v = 0;
        if (s != nullptr) {
          for (int64_t h = 0; h < per && w * per + h < kc; ++h) v |= bits(s, w * per + h) << (16 * h);
        }
        at[w * mpad + r] = v;
      }
    }
    return;
  }
  for (int64_t r0 = 0; r0 < mpad; r0 += 16) {
    const scalar_t* rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = r0 + i < p.m ? row(r0 + i) : nullptr;
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i) {
        if (rows[i] == nullptr) {
          v[i] = _mm512_setzero_si512();
        } else if constexpr (per == 1) {
          v[i] = _mm512_maskz_loadu_epi32(moe_lanes16(kc, w0), rows[i] + k0 + w0);
        } else {
          v[i] = _mm512_maskz_loadu_epi16(moe_lanes32(kc, 2 * w0), rows[i] + k0 + 2 * w0);
        }
      }
      transpose_16x16_epi32(v);
      for (int64_t q = 0; q < std::min<int64_t>(16, words - w0); ++q) {
        _mm512_storeu_si512(at + (w0 + q) * mpad + r0, v[q]);
      }
    }
  }
}

// Output rows [0, m) of the tile from ct (column j at ct + j * mpad):
// 16 x 16 blocks transposed in registers, + bias, rounded once to out_t; a
// turned problem's C^T takes ct's columns as they are.
template <typename scalar_t, typename out_t>
void tt_store(const Problem<scalar_t, out_t, float>& p, const Tile& t, const float* ct, int64_t mpad, int64_t m) {
  if (p.c_transposed) {
    for (int64_t j = 0; j < t.nb; ++j) {
      out_t* o = p.c + (t.n0 + j) * p.c_rs;
      for (int64_t r0 = 0; r0 < m; r0 += 16) {
        store_lanes(o + r0, moe_lanes16(m, r0), _mm512_loadu_ps(ct + j * mpad + r0));
      }
    }
    return;
  }
  for (int64_t r0 = 0; r0 < m; r0 += 16) {
    for (int64_t j0 = 0; j0 < t.nb; j0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i) {
        v[i] = j0 + i < t.nb ? _mm512_loadu_si512(ct + (j0 + i) * mpad + r0) : _mm512_setzero_si512();
      }
      transpose_16x16_epi32(v);
      const __mmask16 lanes = moe_lanes16(t.nb, j0);
      const float* bias = p.bias != nullptr ? p.bias + t.n0 + j0 : nullptr;
      for (int64_t i = 0; i < std::min<int64_t>(16, m - r0); ++i) {
        __m512 x = _mm512_castsi512_ps(v[i]);
        if (bias != nullptr) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lanes, bias));
        store_lanes(p.c + (r0 + i) * p.c_rs + t.n0 + j0, lanes, x);
      }
    }
  }
}

// Weight-row groups ahead of the one in use that the engine prefetches: one
// is a whole micro-kernel call (about 2 us at 32 rows) ahead.
constexpr int64_t kTtPrefetchAhead = 1;

// Weight row j of tile t from K element k0; past the tile's last row, the
// last row (the tile's last group of 8 repeats it, its extra columns never
// stored).
template <typename scalar_t, typename out_t>
const scalar_t* tt_weight_row(const Problem<scalar_t, out_t, float>& p, const Tile& t, int64_t j, int64_t k0) {
  return p.b + (t.n0 + std::min(j, t.nb - 1)) * p.b_cs + k0;
}

// Group i of tile t's weights in the order the engine uses them (8 rows over
// one K block, the tile's rows K block by K block) as lines to prefetch; none
// past the tile's last group.
template <typename scalar_t, typename out_t>
TtPrefetch tt_weight_group(const Problem<scalar_t, out_t, float>& p, const Tile& t, int64_t i) {
  TtPrefetch pf;
  const int64_t kc = tt_rows<scalar_t>(p).kc;
  const int64_t groups = (t.nb + kTtNR - 1) / kTtNR;
  const int64_t k0 = i / groups * kc, j0 = i % groups * kTtNR;
  if (k0 >= p.k) return pf;
  pf.offset_mask = ~int64_t{0};
  for (int64_t j = 0; j < kTtNR; ++j) {
    pf.rows[j] = reinterpret_cast<const char*>(tt_weight_row(p, t, j0 + j, k0));
  }
  return pf;
}

// The rest's rows x weight rows [j0, j0 + 8) of tile t, as inner products
// over the whole K, stored (into C^T for a turned problem).
template <typename scalar_t, typename out_t>
void tt_rest(const Problem<scalar_t, out_t, float>& p, const Tile& t, const TtRows& s, int64_t j0,
             const scalar_t* const* rows) {
  float sums[kNtMR][kNtNR];
  for (int64_t j = j0; j < std::min(j0 + kTtNR, t.nb); j += kNtNR) {
    const int64_t w = std::min(kNtNR, t.nb - j);
    const scalar_t* b[kNtNR];
    for (int64_t q = 0; q < kNtNR; ++q) b[q] = tt_weight_row(p, t, j + q, 0);
    for (int64_t r0 = 0; r0 < s.rest; r0 += kNtMR) {
      const int64_t mr = std::min(kNtMR, s.rest - r0);
      dispatch_nt_micro<scalar_t>(mr, rows + r0, b, p.k, sums, NtPrefetch{});
      nt_store(p, p.c_row_stride(), p.c_col_stride(), s.mpad + r0, mr, t.n0 + j, w, sums);
    }
  }
}

// One tile: all rows of the problem x columns [n0, n0 + nb), 8 weight rows
// at a time; the last group of 8 repeats its last weight row, whose extra
// columns are never stored. Per K block: the rows packed once, then per 8
// weight rows every 48-row pass, the later passes finding the weights in L1.
// The first pass prefetches the weight rows used next: this tile's next 8,
// else its next K block's first 8, else the first 8 of next (the tile this
// thread runs after t, nullptr if none) when it runs in this engine.
// The rest's rows (TtRows) after each 8 weight rows' passes.
template <typename scalar_t, typename out_t>
void run_tile_tt(const Problem<scalar_t, out_t, float>& p, const Tile& t, ThreadBuffers& buf,
                 const Problem<scalar_t, out_t, float>* next_p, const Tile* next) {
  constexpr int64_t per = kTtPerWord<scalar_t>;
  const TtRows s = tt_rows<scalar_t>(p);
  const int64_t mpad = s.mpad, kc_max = s.kc;
  const scalar_t* rest_rows[kTtMaxRest];
  if (s.rest > 0) nt_a_rows(p, s.mpad, s.rest, nt_zero_row(p, buf.b), rest_rows);
  uint32_t* at = workspace<uint32_t>(buf.a, (kc_max + per - 1) / per * mpad);
  float* ct = workspace<float>(buf.acc, (t.nb + 15) / 16 * 16 * mpad);
  // Groups of 8 weight rows per K block, and in the whole tile.
  const int64_t groups = (t.nb + kTtNR - 1) / kTtNR;
  const int64_t total = (p.k + kc_max - 1) / kc_max * groups;
  for (int64_t k0 = 0; k0 < p.k; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, p.k - k0);
    tt_pack_a(p, k0, kc, mpad, at);
    for (int64_t j0 = 0; j0 < t.nb; j0 += kTtNR) {
      const scalar_t* b[kTtNR];
      for (int64_t j = 0; j < kTtNR; ++j) b[j] = tt_weight_row(p, t, j0 + j, k0);
      TtPrefetch pf;
      const int64_t ahead = k0 / kc_max * groups + j0 / kTtNR + kTtPrefetchAhead;
      if (ahead < total) {
        pf = tt_weight_group(p, t, ahead);
      } else if (next != nullptr && next_p->k > 0 && tt_eligible<scalar_t>(*next_p)) {
        pf = tt_weight_group(*next_p, *next, ahead - total);
      }
      // 48-row passes; a 64-row rest as two of 32 rather than 48 + 16,
      // whose single vector per column would leave the loads the bottleneck.
      for (int64_t m0 = 0; m0 < mpad;) {
        const int64_t left = (mpad - m0) / 16;
        const int64_t mv = left == 4 ? 2 : std::min<int64_t>(3, left);
        float* c = ct + j0 * mpad + m0;
        const bool first = k0 == 0;
        const TtPrefetch& pass_pf = m0 == 0 ? pf : TtPrefetch{};
        if constexpr (std::is_same_v<scalar_t, float>) {
          const float* a = reinterpret_cast<const float*>(at) + m0;
          if (mv == 3) {
            tt_micro<3>(a, mpad, b, kc, c, mpad, first, pass_pf);
          } else if (mv == 2) {
            tt_micro<2>(a, mpad, b, kc, c, mpad, first, pass_pf);
          } else {
            tt_micro<1>(a, mpad, b, kc, c, mpad, first, pass_pf);
          }
        } else {
          if (mv == 3) {
            tt_micro_bf16<3>(at + m0, mpad, b, kc, c, mpad, first, pass_pf);
          } else if (mv == 2) {
            tt_micro_bf16<2>(at + m0, mpad, b, kc, c, mpad, first, pass_pf);
          } else {
            tt_micro_bf16<1>(at + m0, mpad, b, kc, c, mpad, first, pass_pf);
          }
        }
        m0 += 16 * mv;
      }
      if (s.rest > 0) tt_rest(p, t, s, j0, rest_rows);
    }
  }
  tt_store(p, t, ct, mpad, p.m - s.rest);
}

// What run_tile_tt takes from the thread's scratch.
template <typename scalar_t, typename out_t>
void tt_scratch(const Problem<scalar_t, out_t, float>& p, const Tile& t, ScratchBytes& s) {
  constexpr int64_t per = kTtPerWord<scalar_t>;
  const TtRows r = tt_rows<scalar_t>(p);
  const int64_t zero_row = r.rest > 0 && p.a_row_idx != nullptr ? p.k * static_cast<int64_t>(sizeof(scalar_t)) : 0;
  s.at_least((r.kc + per - 1) / per * r.mpad * 4, zero_row, (t.nb + 15) / 16 * 16 * r.mpad * 4);
}

} // namespace
} // namespace at::native

#endif // CPU_CAPABILITY_AVX512

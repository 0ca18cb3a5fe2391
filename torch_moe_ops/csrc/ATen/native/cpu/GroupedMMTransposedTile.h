#pragma once

// The transposed-tile engine of the CPU grouped mm kernel: float32 groups of a
// few dozen rows whose expert weights are stored (E, N, K), transformers'
// layout. Part of the AVX-512 engine (GroupedMMAvx512.h), included with it by
// cpu/GroupedMMKernel.cpp in its CPU_CAPABILITY_AVX512 build only.

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/native/cpu/GroupedMMAvx512.h>

namespace at::native {
namespace {

// ---- transposed-tile engine: C^T tiles, the weights broadcast in place ------
// With 17-48 rows per expert every float32 weight is used by that many rows
// only, so a kernel that first packs a weight block (the broadcast engine) or
// re-reads it once per 6-row block (the inner-product engine) spends a large
// part of its time moving weights rather than multiplying them (Ice Lake, one
// thread, 48 rows per expert: 85-100 GFLOP/s for either, MKL's dense sgemm
// 125-160). Here the roles turn around: a tile of C^T holds up to 48 rows of C in
// 3 vectors per output column, the group's rows are packed once per tile
// into K-major order (48 x 2048 floats: 384 KB, L2-resident), and each weight
// is broadcast straight from the caller's (E, N, K) memory, 8 weight rows
// side by side, each read once per tile as 8 sequential streams that the
// hardware prefetchers follow (same machine: 125-150 GFLOP/s).
//
// Accumulation is float32 in K order, one FMA per product from zero, exactly
// as in the broadcast engine, so the bits equal those of the same weights
// stored (E, K, N), and depend only on the shapes. Blocks of K beyond kTtKC
// spill to a float32 buffer, which changes no rounding.
constexpr int64_t kTtNR = 8;       // weight rows (output columns) per micro-kernel call
constexpr int64_t kTtMinRows = 17; // fewer rows: memory-bound; the inner-product engine's prefetch wins
constexpr int64_t kTtMaxRows = 48; // more rows: the other engines reuse each weight enough
constexpr int64_t kTtKC = 2048;    // K per packed block of the group's rows

template <typename scalar_t, typename P>
bool tt_eligible(const P& p) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    return false;
  } else {
    return p.b_rs == 1 && p.b_cs != 1 && p.b_idx == nullptr && p.m >= kTtMinRows && p.m <= kTtMaxRows;
  }
}

// acc[i][j] += at[k][16 i .. 16 i + 15] * b[j][k] over k < kc, for MV vectors
// of rows and the 8 weight rows b; acc starts from zero (first) or from ct,
// column j of the tile at ct + j * ldct, and ends in ct. Not inlined: inlined
// into the tile loop, GCC 12 kept the 1-vector form's accumulators in memory.
template <int MV>
__attribute__((noinline)) void tt_micro(const float* at, int64_t ld_at, const float* const* b, int64_t kc,
                                        float* ct, int64_t ldct, bool first) {
  static_assert(kTtNR == 8);
  __m512 acc[MV][kTtNR];
  for (int i = 0; i < MV; ++i) {
    for (int j = 0; j < kTtNR; ++j) {
      acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(ct + j * ldct + 16 * i);
    }
  }
  const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3], *b4 = b[4], *b5 = b[5], *b6 = b[6], *b7 = b[7];
  for (int64_t k = 0; k < kc; ++k) {
    __m512 a[MV];
    for (int i = 0; i < MV; ++i) a[i] = _mm512_loadu_ps(at + k * ld_at + 16 * i);
    const float bk[kTtNR] = {b0[k], b1[k], b2[k], b3[k], b4[k], b5[k], b6[k], b7[k]};
    for (int j = 0; j < kTtNR; ++j) {
      const __m512 bv = _mm512_set1_ps(bk[j]);
      for (int i = 0; i < MV; ++i) acc[i][j] = _mm512_fmadd_ps(a[i], bv, acc[i][j]);
    }
  }
  for (int i = 0; i < MV; ++i) {
    for (int j = 0; j < kTtNR; ++j) _mm512_storeu_ps(ct + j * ldct + 16 * i, acc[i][j]);
  }
}

// at[k * mpad + r] = A[r, k0 + k] for k < kc, r < mpad (zero for r >= m and
// for a -1 row index). Rows contiguous along K go 16 x 16 through registers.
template <typename out_t>
void tt_pack_a(const Problem<float, out_t, float>& p, int64_t k0, int64_t kc, int64_t mpad, float* at) {
  const auto row = [&p](int64_t r) -> const float* {
    const int64_t i = p.a_row_idx != nullptr ? p.a_row_idx[r] : r;
    return i < 0 ? nullptr : p.a + i * p.a_rs;
  };
  if (p.a_cs != 1 || p.a_col_idx != nullptr) {
    for (int64_t r = 0; r < mpad; ++r) {
      const float* s = r < p.m ? row(r) : nullptr;
      for (int64_t k = 0; k < kc; ++k) {
        float v = 0.f;
        if (s != nullptr) {
          const int64_t c = p.a_col_idx != nullptr ? p.a_col_idx[k0 + k] : k0 + k;
          v = c < 0 ? 0.f : s[c * p.a_cs];
        }
        at[k * mpad + r] = v;
      }
    }
    return;
  }
  for (int64_t r0 = 0; r0 < mpad; r0 += 16) {
    const float* rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = r0 + i < p.m ? row(r0 + i) : nullptr;
    for (int64_t k = 0; k < kc; k += 16) {
      const __mmask16 lanes = moe_lanes16(kc, k);
      __m512i v[16];
      for (int i = 0; i < 16; ++i) {
        v[i] = rows[i] != nullptr ? _mm512_maskz_loadu_epi32(lanes, rows[i] + k0 + k) : _mm512_setzero_si512();
      }
      transpose_16x16_epi32(v);
      for (int64_t q = 0; q < std::min<int64_t>(16, kc - k); ++q) {
        _mm512_storeu_si512(at + (k + q) * mpad + r0, v[q]);
      }
    }
  }
}

// Output rows of the tile from ct (column j of the tile at ct + j * mpad):
// 16 x 16 blocks transposed in registers, + bias, rounded once to out_t.
template <typename out_t>
void tt_store(const Problem<float, out_t, float>& p, const Tile& t, const float* ct, int64_t mpad) {
  for (int64_t r0 = 0; r0 < p.m; r0 += 16) {
    for (int64_t j0 = 0; j0 < t.nb; j0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i) {
        v[i] = j0 + i < t.nb ? _mm512_loadu_si512(ct + (j0 + i) * mpad + r0) : _mm512_setzero_si512();
      }
      transpose_16x16_epi32(v);
      const __mmask16 lanes = moe_lanes16(t.nb, j0);
      const float* bias = p.bias != nullptr ? p.bias + t.n0 + j0 : nullptr;
      for (int64_t i = 0; i < std::min<int64_t>(16, p.m - r0); ++i) {
        __m512 x = _mm512_castsi512_ps(v[i]);
        if (bias != nullptr) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lanes, bias));
        out_t* o = p.c + (r0 + i) * p.c_rs + t.n0 + j0;
        _mm512_mask_storeu_ps(o, lanes, x); // float32 inputs have a float32 output
      }
    }
  }
}

// One tile: all rows of the problem (kTtMaxRows at most) x columns
// [n0, n0 + nb), 8 weight rows at a time; the last group of 8 repeats its
// last weight row, whose extra columns are never stored.
template <typename out_t>
void run_tile_tt(const Problem<float, out_t, float>& p, const Tile& t, ThreadBuffers& buf) {
  const int64_t mpad = (p.m + 15) / 16 * 16;
  const int64_t kc_max = std::min(p.k, kTtKC);
  float* at = workspace<float>(buf.a, kc_max * mpad);
  float* ct = workspace<float>(buf.acc, (t.nb + 15) / 16 * 16 * mpad);
  for (int64_t k0 = 0; k0 < p.k; k0 += kTtKC) {
    const int64_t kc = std::min(kTtKC, p.k - k0);
    tt_pack_a(p, k0, kc, mpad, at);
    for (int64_t j0 = 0; j0 < t.nb; j0 += kTtNR) {
      const float* b[kTtNR];
      for (int64_t j = 0; j < kTtNR; ++j) b[j] = p.b + (t.n0 + std::min(j0 + j, t.nb - 1)) * p.b_cs + k0;
      // 48-row passes; a 64-row rest as two of 32 rather than 48 + 16,
      // whose single vector per column would leave the loads the bottleneck.
      for (int64_t m0 = 0; m0 < mpad;) {
        const int64_t left = (mpad - m0) / 16;
        const int64_t mv = left == 4 ? 2 : std::min<int64_t>(3, left);
        float* c = ct + j0 * mpad + m0;
        if (mv == 3) {
          tt_micro<3>(at + m0, mpad, b, kc, c, mpad, k0 == 0);
        } else if (mv == 2) {
          tt_micro<2>(at + m0, mpad, b, kc, c, mpad, k0 == 0);
        } else {
          tt_micro<1>(at + m0, mpad, b, kc, c, mpad, k0 == 0);
        }
        m0 += 16 * mv;
      }
    }
  }
  tt_store(p, t, ct, mpad);
}

// What run_tile_tt takes from the thread's scratch.
template <typename out_t>
void tt_scratch(const Problem<float, out_t, float>& p, const Tile& t, ScratchBytes& s) {
  const int64_t mpad = (p.m + 15) / 16 * 16;
  s.at_least(std::min(p.k, kTtKC) * mpad * 4, 0, (t.nb + 15) / 16 * 16 * mpad * 4);
}

} // namespace
} // namespace at::native

#endif // CPU_CAPABILITY_AVX512

#pragma once

// The inner-product engine of the CPU grouped mm kernel, for operands whose
// rows of A and columns of B are both contiguous along K: expert weights
// stored (E, N, K), transformers' layout. Part of the AVX-512 engine
// (GroupedMMAvx512.h, GroupedMMAvx512BF16.h), included with it by
// cpu/GroupedMMKernel.cpp in its CPU_CAPABILITY_AVX512 build only.

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/native/cpu/GroupedMMAvx512BF16.h>

namespace at::native {
namespace {

// ---- inner-product engine: A rows and B columns both contiguous along K ----
// Weights stored (E, N, K) (transformers, torchtitan) reach a 2D x 3D grouped
// mm as the transposed view (G, K, N) with unit stride along K. Packing them
// for the broadcast kernel above means a 16 x 16 word transpose per block,
// paid again on every call and amortised over only a few dozen rows. Here
// they are read in place instead: each output is a dot product along K of
// an A row and a weight row, vectorised over K (16 float32 or 32 bfloat16
// lanes, partial sums per lane, reduced once at the end in a fixed order).
// A register tile holds MR A rows x 4 weight rows; the weight rows (from
// DRAM, prefetched ahead) are reused from cache by every row block of the
// group, the A rows (a few dozen, K-contiguous, gathered or not) stay
// in L2. No packing, no transpose, and rows need no padding.
constexpr int64_t kNtMR = 6;
constexpr int64_t kNtNR = 4;
// Rows of A per pass over a tile's weight rows: kNtMC x K A values stay in
// L2 while the tile's weights stream past once.
constexpr int64_t kNtMC = 96;

// Blocks of kNtNR weight rows between the block in use and the one whose
// lines its micro-kernel calls prefetch. A group of a few rows spends less
// time on a block than DRAM takes to deliver the next (K 512, 1-17 rows: 64
// to 1088 vdpbf16ps), so one block ahead left the stream waiting. Zen 4, 2
// threads, DeepSeek-V3's forward down projection (K 512, N 1792, 16 routed
// rows per expert on average), ms one / two blocks ahead: its 167 groups of
// fewer than 18 rows 13.8-14.9 / 11.3-12.6 (weights read at 20.6-22.2 /
// 24.4-27.1 GB/s), the whole call 30.1-31.6 / 27.4-28.1. Four of
// bench_grouped_mm's `nk` rows moved by under 2%.
constexpr int64_t kNtPrefetchAhead = 2;

// Lines of the weight rows kNtPrefetchAhead blocks ahead to prefetch during
// one micro-kernel call.
struct NtPrefetch {
  const char* rows[kNtNR] = {};
  int64_t lines_per_row = 0;
  int64_t begin = 0, end = 0;  // line range [begin, end) over rows x lines_per_row
};

__attribute__((always_inline)) inline void nt_prefetch_line(const NtPrefetch& pf, int64_t line) {
  const int64_t r = line / pf.lines_per_row;
  _mm_prefetch(pf.rows[r] + (line - r * pf.lines_per_row) * 64, _MM_HINT_T1);
}

// Sums of the 16 lanes of v0..v3 in lanes 0..3 of the result, in a fixed
// order (pairs of lanes first, then the four 128-bit lanes).
inline __m128 nt_reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 t0 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(kAll16, v0, v1), _mm512_maskz_unpackhi_ps(kAll16, v0, v1));
  const __m512 t1 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(kAll16, v2, v3), _mm512_maskz_unpackhi_ps(kAll16, v2, v3));
  const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
  __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, d0, d1)),
                           _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, d0, d1)));
  u = _mm512_add_ps(u, _mm512_maskz_shuffle_f32x4(kAll16, u, u, 0x4E));  // + the other 256-bit half
  u = _mm512_add_ps(u, _mm512_maskz_shuffle_f32x4(kAll16, u, u, 0xB1));  // + the neighbouring 128-bit lane
  return _mm512_maskz_extractf32x4_ps(0xF, u, 0);
}

// sums[i][j] = <a[i][0:k], b[j][0:k]> for i < MR, j < 4. float32: 16 K
// values a step; bfloat16: 32 (16 pairs for vdpbf16ps); the K tail is one
// more step of masked loads (zeros contribute nothing). The 4 x MR
// accumulators are named variables (NT_ACC), not an array: GCC 12 keeps an
// array of them in memory and stores all 24 on every step, which halves the
// speed; a prefetch goes out every `every` steps from the same loop.
#define NT_ACC(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps(), \
                         c##i##2 = _mm512_setzero_ps(), c##i##3 = _mm512_setzero_ps();
#define NT_ROW_F32(i, m)                                                                          \
  if constexpr (MR > i) {                                                                         \
    const __m512 av = _mm512_maskz_loadu_ps(m, a##i + off);                                       \
    c##i##0 = _mm512_fmadd_ps(av, v0, c##i##0);                                                   \
    c##i##1 = _mm512_fmadd_ps(av, v1, c##i##1);                                                   \
    c##i##2 = _mm512_fmadd_ps(av, v2, c##i##2);                                                   \
    c##i##3 = _mm512_fmadd_ps(av, v3, c##i##3);                                                   \
  }
#define NT_ROW_BF16(i, m)                                                                         \
  if constexpr (MR > i) {                                                                         \
    const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a##i + off);                       \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, av, v0);                                                  \
    c##i##1 = _mm512_dpbf16_ps(c##i##1, av, v1);                                                  \
    c##i##2 = _mm512_dpbf16_ps(c##i##2, av, v2);                                                  \
    c##i##3 = _mm512_dpbf16_ps(c##i##3, av, v3);                                                  \
  }
#define NT_SUMS(i) \
  if constexpr (MR > i) _mm_storeu_ps(sums[i], nt_reduce4(c##i##0, c##i##1, c##i##2, c##i##3));
#define NT_ROWS(T)                                                                                \
  const T* a0 = a[0];                                                                             \
  const T* a1 = a[MR > 1 ? 1 : 0];                                                                \
  const T* a2 = a[MR > 2 ? 2 : 0];                                                                \
  const T* a3 = a[MR > 3 ? 3 : 0];                                                                \
  const T* a4 = a[MR > 4 ? 4 : 0];                                                                \
  const T* a5 = a[MR > 5 ? 5 : 0];                                                                \
  const T *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];

template <int MR>
void nt_micro_f32(const float* const* a, const float* const* b, int64_t k, float (*sums)[kNtNR],
                                    const NtPrefetch& pf) {
  static_assert(kNtMR == 6 && kNtNR == 4);
  NT_ROWS(float)
  NT_ACC(0) NT_ACC(1) NT_ACC(2) NT_ACC(3) NT_ACC(4) NT_ACC(5)
  const int64_t full = k / 16;
  const PrefetchSpread spread(pf.end - pf.begin, full);
  const int64_t per = spread.per, every = spread.every;
  int64_t line = pf.begin, next_pf = 0;
  for (int64_t s = 0; s < full; ++s) {
    const int64_t off = s * 16;
    const __m512 v0 = _mm512_loadu_ps(b0 + off), v1 = _mm512_loadu_ps(b1 + off);
    const __m512 v2 = _mm512_loadu_ps(b2 + off), v3 = _mm512_loadu_ps(b3 + off);
    NT_ROW_F32(0, kAll16) NT_ROW_F32(1, kAll16) NT_ROW_F32(2, kAll16)
    NT_ROW_F32(3, kAll16) NT_ROW_F32(4, kAll16) NT_ROW_F32(5, kAll16)
    if (s == next_pf && line < pf.end) {
      for (int64_t q = 0; q < per && line < pf.end; ++q) nt_prefetch_line(pf, line++);
      next_pf += every;
    }
  }
  if (k % 16 != 0) {
    const int64_t off = full * 16;
    const __mmask16 m = moe_lanes16(k, off);
    const __m512 v0 = _mm512_maskz_loadu_ps(m, b0 + off), v1 = _mm512_maskz_loadu_ps(m, b1 + off);
    const __m512 v2 = _mm512_maskz_loadu_ps(m, b2 + off), v3 = _mm512_maskz_loadu_ps(m, b3 + off);
    NT_ROW_F32(0, m) NT_ROW_F32(1, m) NT_ROW_F32(2, m) NT_ROW_F32(3, m) NT_ROW_F32(4, m) NT_ROW_F32(5, m)
  }
  for (; line < pf.end; ++line) nt_prefetch_line(pf, line);
  NT_SUMS(0) NT_SUMS(1) NT_SUMS(2) NT_SUMS(3) NT_SUMS(4) NT_SUMS(5)
}

template <int MR>
GROUPED_MM_AVX512_BF16 void nt_micro_bf16(const BFloat16* const* a, const BFloat16* const* b, int64_t k,
                                          float (*sums)[kNtNR], const NtPrefetch& pf) {
  static_assert(kNtMR == 6 && kNtNR == 4);
  NT_ROWS(BFloat16)
  NT_ACC(0) NT_ACC(1) NT_ACC(2) NT_ACC(3) NT_ACC(4) NT_ACC(5)
  const int64_t full = k / 32;
  const PrefetchSpread spread(pf.end - pf.begin, full);
  const int64_t per = spread.per, every = spread.every;
  int64_t line = pf.begin, next_pf = 0;
  constexpr __mmask32 kAll32 = ~__mmask32(0);
  for (int64_t s = 0; s < full; ++s) {
    const int64_t off = s * 32;
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0 + off), v1 = (__m512bh)_mm512_loadu_si512(b1 + off);
    const __m512bh v2 = (__m512bh)_mm512_loadu_si512(b2 + off), v3 = (__m512bh)_mm512_loadu_si512(b3 + off);
    NT_ROW_BF16(0, kAll32) NT_ROW_BF16(1, kAll32) NT_ROW_BF16(2, kAll32)
    NT_ROW_BF16(3, kAll32) NT_ROW_BF16(4, kAll32) NT_ROW_BF16(5, kAll32)
    if (s == next_pf && line < pf.end) {
      for (int64_t q = 0; q < per && line < pf.end; ++q) nt_prefetch_line(pf, line++);
      next_pf += every;
    }
  }
  if (k % 32 != 0) {
    const int64_t off = full * 32;
    const __mmask32 m = moe_lanes32(k, off);
    const __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi16(m, b0 + off);
    const __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi16(m, b1 + off);
    const __m512bh v2 = (__m512bh)_mm512_maskz_loadu_epi16(m, b2 + off);
    const __m512bh v3 = (__m512bh)_mm512_maskz_loadu_epi16(m, b3 + off);
    NT_ROW_BF16(0, m) NT_ROW_BF16(1, m) NT_ROW_BF16(2, m) NT_ROW_BF16(3, m) NT_ROW_BF16(4, m) NT_ROW_BF16(5, m)
  }
  for (; line < pf.end; ++line) nt_prefetch_line(pf, line);
  NT_SUMS(0) NT_SUMS(1) NT_SUMS(2) NT_SUMS(3) NT_SUMS(4) NT_SUMS(5)
}
#undef NT_ACC
#undef NT_ROW_F32
#undef NT_ROW_BF16
#undef NT_SUMS
#undef NT_ROWS

template <typename scalar_t, int MR>
void call_nt_micro(const scalar_t* const* a, const scalar_t* const* b, int64_t k, float (*sums)[kNtNR],
                   const NtPrefetch& pf) {
  if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    nt_micro_bf16<MR>(a, b, k, sums, pf);
  } else {
    nt_micro_f32<MR>(a, b, k, sums, pf);
  }
}

template <typename scalar_t>
void dispatch_nt_micro(int64_t mr, const scalar_t* const* a, const scalar_t* const* b, int64_t k,
                       float (*sums)[kNtNR], const NtPrefetch& pf) {
  static_assert(kNtMR == 6);
  switch (mr) {
    case 1: call_nt_micro<scalar_t, 1>(a, b, k, sums, pf); break;
    case 2: call_nt_micro<scalar_t, 2>(a, b, k, sums, pf); break;
    case 3: call_nt_micro<scalar_t, 3>(a, b, k, sums, pf); break;
    case 4: call_nt_micro<scalar_t, 4>(a, b, k, sums, pf); break;
    case 5: call_nt_micro<scalar_t, 5>(a, b, k, sums, pf); break;
    default: call_nt_micro<scalar_t, 6>(a, b, k, sums, pf); break;
  }
}

// Rows [r0, r0 + mr) x columns [n0, n0 + w) of C from the micro-kernel's
// sums, + bias, rounded once to out_t; element (r, j) of C at c + c_rs r +
// c_cs j.
template <typename scalar_t, typename out_t>
void nt_store(const Problem<scalar_t, out_t, float>& p, int64_t c_rs, int64_t c_cs, int64_t r0, int64_t mr,
              int64_t n0, int64_t w, const float (*sums)[kNtNR]) {
  for (int64_t i = 0; i < mr; ++i) {
    out_t* o = p.c + (r0 + i) * c_rs + n0 * c_cs;
    for (int64_t j = 0; j < w; ++j) {
      o[j * c_cs] = static_cast<out_t>(p.bias != nullptr ? sums[i][j] + p.bias[n0 + j] : sums[i][j]);
    }
  }
}

// What a -1 row index of A reads: a row of zeros in region, where A's rows
// are gathered (else nullptr).
template <typename scalar_t, typename out_t>
const scalar_t* nt_zero_row(const Problem<scalar_t, out_t, float>& p, const Region& region) {
  if (p.a_row_idx == nullptr) return nullptr;
  scalar_t* z = workspace<scalar_t>(region, p.k);
  std::fill(z, z + p.k, scalar_t(0));
  return z;
}

// Rows [r0, r0 + n) of A in place, zero for a -1 row index.
template <typename scalar_t, typename out_t>
void nt_a_rows(const Problem<scalar_t, out_t, float>& p, int64_t r0, int64_t n, const scalar_t* zero,
               const scalar_t** rows) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = p.a_row_idx != nullptr ? p.a_row_idx[r0 + r] : r0 + r;
    rows[r] = row < 0 ? zero : p.a + row * p.a_rs;
  }
}

// Whether a problem's operands suit the inner-product engine: float32 or
// bfloat16 (vdpbf16ps), rows of A (gathered or not) and columns of B
// contiguous along K, B not gathered, and K long enough that the final
// reductions are a small part of the work.
template <typename scalar_t, typename P>
bool nt_eligible(const P& p) {
  if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, BFloat16>) {
    return false;
  }
  return p.a_cs == 1 && p.a_col_idx == nullptr && p.b_rs == 1 && p.b_cs != 1 && p.b_idx == nullptr &&
      p.b8 == nullptr && p.k >= 64;
}

// One tile: all rows of the problem x columns [n0, n0 + nb), 4 weight rows
// at a time; next (the tile this thread runs after it, or nullptr) has its
// first weight rows prefetched while this tile's last ones are in use.
// bfloat16 without AVX512_BF16 runs the float32 micro-kernel on widened
// copies: a row chunk of A once per tile (reused by every weight block), the
// 4 weight rows once per block (reused by every row block).
template <typename scalar_t, typename out_t>
void run_tile_nt(const Problem<scalar_t, out_t, float>& p, const Tile& t, ThreadBuffers& buf,
                 const Problem<scalar_t, out_t, float>* next_p, const Tile* next) {
  const bool widen = std::is_same_v<scalar_t, BFloat16> && !cpu_has_avx512_bf16();
  const int64_t k = p.k;
  const int64_t n_end = t.n0 + t.nb;
  const int64_t row_bytes = k * static_cast<int64_t>(sizeof(scalar_t));
  // What a -1 row index reads (widened, the rows are zero-filled instead).
  const scalar_t* zero_row = widen ? nullptr : nt_zero_row(p, buf.a);
  const scalar_t* a_rows[kNtMC];
  const float* a_wide[kNtMC];
  float sums[kNtMR][kNtNR];
  for (int64_t m0 = 0; m0 < p.m; m0 += kNtMC) {
    const int64_t mc = std::min(kNtMC, p.m - m0);
    nt_a_rows(p, m0, mc, zero_row, a_rows);
    if constexpr (std::is_same_v<scalar_t, BFloat16>) {
      if (widen) {
        float* w = workspace<float>(buf.acc, mc * k);
        for (int64_t r = 0; r < mc; ++r) {
          if (a_rows[r] == nullptr) {
            std::fill(w + r * k, w + (r + 1) * k, 0.f);
          } else {
            widen_rows_16bit(w + r * k, k, a_rows[r], k, 1, k);
          }
          a_wide[r] = w + r * k;
        }
      }
    }
    const int64_t m_blocks = (mc + kNtMR - 1) / kNtMR;
    for (int64_t n0 = t.n0; n0 < n_end; n0 += kNtNR) {
      const int64_t w = std::min(kNtNR, n_end - n0);
      const scalar_t* b_rows[kNtNR];
      for (int64_t j = 0; j < kNtNR; ++j) b_rows[j] = p.b + (n0 + std::min(j, w - 1)) * p.b_cs;
      const float* b_wide[kNtNR];
      if constexpr (std::is_same_v<scalar_t, BFloat16>) {
        if (widen) {
          float* bw = workspace<float>(buf.b, kNtNR * k);
          for (int64_t j = 0; j < kNtNR; ++j) {
            widen_rows_16bit(bw + j * k, k, b_rows[j], k, 1, k);
            b_wide[j] = bw + j * k;
          }
        }
      }
      // The weight rows used kNtPrefetchAhead blocks from now: this tile's,
      // else (last row chunk) the next tile's, when it reads its weights the
      // same way.
      NtPrefetch pf;
      const Problem<scalar_t, out_t, float>* pf_p = nullptr;
      int64_t pf_n = 0, pf_w = 0;
      const int64_t ahead = n0 + kNtPrefetchAhead * kNtNR;
      if (ahead < n_end) {
        pf_p = &p;
        pf_n = ahead;
        pf_w = std::min(kNtNR, n_end - pf_n);
      } else if (next != nullptr && m0 + kNtMC >= p.m && next_p->k == k && nt_eligible<scalar_t>(*next_p) &&
                 ahead - n_end < next->nb) {
        pf_p = next_p;
        pf_n = next->n0 + (ahead - n_end);
        pf_w = std::min(kNtNR, next->nb - (ahead - n_end));
      }
      if (pf_p != nullptr) {
        for (int64_t j = 0; j < kNtNR; ++j) {
          pf.rows[j] = reinterpret_cast<const char*>(pf_p->b + (pf_n + std::min(j, pf_w - 1)) * pf_p->b_cs);
        }
        pf.lines_per_row = (row_bytes + 63) / 64;
      }
      const int64_t pf_lines = pf_p != nullptr ? pf_w * pf.lines_per_row : 0;
      for (int64_t mb = 0; mb < m_blocks; ++mb) {
        const int64_t r0 = mb * kNtMR;
        const int64_t mr = std::min(kNtMR, mc - r0);
        pf.begin = pf_lines * mb / m_blocks;
        pf.end = pf_lines * (mb + 1) / m_blocks;
        if (widen) {
          dispatch_nt_micro<float>(mr, a_wide + r0, b_wide, k, sums, pf);
        } else {
          dispatch_nt_micro<scalar_t>(mr, a_rows + r0, b_rows, k, sums, pf);
        }
        nt_store(p, p.c_row_stride(), p.c_col_stride(), m0 + r0, mr, n0, w, sums);
      }
    }
  }
}

// What run_tile_nt takes from the thread's scratch.
template <typename scalar_t, typename out_t>
void nt_scratch(const Problem<scalar_t, out_t, float>& p, ScratchBytes& s) {
  const int64_t k = p.k;
  if (std::is_same_v<scalar_t, BFloat16> && !cpu_has_avx512_bf16()) {  // widened copies
    s.at_least(0, kNtNR * k * 4, std::min(kNtMC, p.m) * k * 4);
  } else if (p.a_row_idx != nullptr) {  // the zero row
    s.at_least(k * static_cast<int64_t>(sizeof(scalar_t)), 0, 0);
  }
}

} // namespace
} // namespace at::native

#endif // CPU_CAPABILITY_AVX512

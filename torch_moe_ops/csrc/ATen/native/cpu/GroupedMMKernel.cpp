// CPU kernel for grouped_mm.
//
// Every layout is lowered to a list of independent matmuls ("problems"), one
// per group, each described by pointers and element strides into the caller's
// tensors: no input is copied or sliced as a whole. The problems are cut into
// tiles of NB output columns; a tile computes all rows of its problem, so the
// expert weight block it reads (K x NB) comes from memory once and is reused
// from cache by every m-block. Tiles are split across threads by estimated
// cost (not by count) so uneven groups stay balanced, and each tile runs
// single-threaded: small GEMMs lose most of their speed when split.
//
// Engines:
//   AVX-512 (float32, float16, bfloat16; except groups of hundreds of rows
//     of float32, or of bfloat16 on CPUs with AVX512_BF16, where MKL /
//     oneDNN are faster): our own micro-kernels read the expert weights
//     straight from the caller's memory, one cache-sized block at a time,
//     so streaming the weights from DRAM overlaps the arithmetic instead of
//     preceding it. Weights stored along K ((E, N, K), transformers' layout)
//     go to the inner-product kernel (run_tile_nt), which reads them in
//     place; the others are re-laid out block by block for a broadcast
//     kernel (run_tile_avx512). bfloat16 runs as K pairs through vdpbf16ps
//     where the CPU has AVX512_BF16, widened to float32 where it has not.
//   at::mm (oneDNN/MKL) per group for bfloat16/float32 without bias, as the
//     portable fallback and for large groups, one group after the other
//     outside any parallel region (the BLAS threads each GEMM itself);
//     otherwise tiles gathered into float32 (float64) buffers and multiplied
//     by a Vectorized<T> kernel. float64 always takes that path.
// The AVX-512 engine exists in the CPU_CAPABILITY_AVX512 build of this file
// only; the DEFAULT and AVX2 builds use the other two.
// Accumulation is in float32 (float64 for float64) and rounded once in the
// epilogue, which also adds the bias. The engine, the tiling and the K
// blocking depend only on the shapes, strides and CPU, never on the thread
// count, so results are bitwise reproducible on a machine (the two weight
// storage orders sum along K in different orders, so their bits may differ).
// Scratch is allocated per call (one slice per thread) and freed at return.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/cpu/MoEAvx512Utils.h>

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <cpuinfo.h>
#include <immintrin.h>
#endif

namespace at::native {
namespace {

// One group's matmul: C[m, n] = sum_k A[m, k] B[k, n] (+ bias[n]).
// Strides are in elements and may be anything, including 0.
template <typename scalar_t, typename out_t, typename acc_t>
struct Problem {
  int64_t m, n, k;
  const scalar_t* a;
  int64_t a_rs, a_cs;
  const scalar_t* b;
  int64_t b_rs, b_cs;
  out_t* c; // unit stride along n
  int64_t c_rs;
  const acc_t* bias; // nullptr or n contiguous values
  // grouped_mm_gather: row r of A is at a + a_row_idx[r] * a_rs, column k of
  // A at a + a_col_idx[k] * a_cs, row k of B at b + b_idx[k] * b_rs; an index
  // of -1 reads zeros.
  const int64_t* a_row_idx = nullptr;
  const int64_t* a_col_idx = nullptr;
  const int64_t* b_idx = nullptr;
  bool a_gathered() const { return a_row_idx != nullptr || a_col_idx != nullptr; }
};

struct Tile {
  int64_t problem;
  int64_t n0;
  int64_t nb;
  double cost;
};

// Widening engine: a K x 64 fp32 weight tile of a 2048-wide layer is 512 KB
// and stays in L2 while the group's row blocks stream past it.
constexpr int64_t kWideNB = 256;
constexpr int64_t kWideMB = 128;
// Cost of streaming one weight tile, in rows of compute: lets groups with few
// rows still count for the memory traffic they cause.
constexpr double kWeightStreamRows = 16.0;

// A thread's share of the call's scratch: 64-byte aligned, sized before the
// parallel region by the engine's bound for every tile (scratch_bytes below).
struct Region {
  char* data = nullptr;
  int64_t bytes = 0;
};

struct ThreadBuffers {
  Region a, b, acc;
};

template <typename T>
inline T* workspace(const Region& r, int64_t numel) {
  TORCH_INTERNAL_ASSERT(numel * static_cast<int64_t>(sizeof(T)) <= r.bytes);
  return reinterpret_cast<T*>(r.data);
}

// Bytes each thread needs per region (the maximum over its tiles).
struct ScratchBytes {
  int64_t a = 0, b = 0, acc = 0;
  void at_least(int64_t na, int64_t nb, int64_t nacc) {
    a = std::max(a, na);
    b = std::max(b, nb);
    acc = std::max(acc, nacc);
  }
};

// dst[r * ld + c] = src[r * rs + c * cs] for r < rows, c < cols, converted
// to dst_t; columns in [cols, cols_pad) are zero.
template <typename dst_t, typename src_t>
void copy_block(dst_t* dst, int64_t ld, const src_t* src, int64_t rs, int64_t cs,
                int64_t rows, int64_t cols, int64_t cols_pad) {
  for (int64_t r = 0; r < rows; ++r) {
    dst_t* d = dst + r * ld;
    const src_t* s = src + r * rs;
    if (cs == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<dst_t>(s[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<dst_t>(s[c * cs]);
    }
    for (int64_t c = cols; c < cols_pad; ++c) d[c] = dst_t(0);
  }
}

// Transposing copy in 16x16 blocks: dst[r * ld + c] = src[r * rs + c * cs]
// where the source is contiguous along r (rs == 1), so reads stay sequential.
template <typename dst_t, typename src_t>
void copy_block_transposed(dst_t* dst, int64_t ld, const src_t* src, int64_t cs,
                           int64_t rows, int64_t cols) {
  constexpr int64_t kB = 16;
  for (int64_t c0 = 0; c0 < cols; c0 += kB) {
    const int64_t c1 = std::min(cols, c0 + kB);
    for (int64_t r0 = 0; r0 < rows; r0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB);
      for (int64_t c = c0; c < c1; ++c) {
        const src_t* s = src + c * cs;
        for (int64_t r = r0; r < r1; ++r) dst[r * ld + c] = static_cast<dst_t>(s[r]);
      }
    }
  }
}

// Row-major copy of a (rows x cols) strided block into dst with leading
// dimension ld, choosing the loop order that reads the source sequentially.
template <typename dst_t, typename src_t>
void gather_block(dst_t* dst, int64_t ld, const src_t* src, int64_t rs, int64_t cs,
                  int64_t rows, int64_t cols, int64_t cols_pad) {
  if (rs == 1 && cs != 1 && rows > 1) {
    copy_block_transposed(dst, ld, src, cs, rows, cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = cols; c < cols_pad; ++c) dst[r * ld + c] = dst_t(0);
  } else {
    copy_block(dst, ld, src, rs, cs, rows, cols, cols_pad);
  }
}

// Gathered rows: dst row r = row idx[r] of src (zero for -1), converted to
// dst_t, columns [cols, cols_pad) zero. This is where an MoE layer's token
// gather happens: inside the tile packing, never as a copy of the tokens.
template <typename dst_t, typename src_t>
void gather_rows(dst_t* dst, int64_t ld, const src_t* src, const int64_t* idx, int64_t rs, int64_t cs,
                 int64_t rows, int64_t cols, int64_t cols_pad) {
  for (int64_t r = 0; r < rows; ++r) {
    if (idx[r] < 0) {
      std::fill(dst + r * ld, dst + r * ld + cols_pad, dst_t(0));
    } else {
      copy_block(dst + r * ld, ld, src + idx[r] * rs, rs, cs, 1, cols, cols_pad);
    }
  }
}

// Gathered columns: dst[r * ld + c] = src[r * rs + idx[c] * cs] (zero for
// -1), columns [cols, cols_pad) zero. Column-outer, so a source whose columns
// are rows of a row-major matrix (rs == 1: an MoE layer's tokens, transposed)
// is read sequentially.
template <typename dst_t, typename src_t>
void gather_cols(dst_t* dst, int64_t ld, const src_t* src, const int64_t* idx, int64_t rs, int64_t cs,
                 int64_t rows, int64_t cols, int64_t cols_pad) {
  for (int64_t c = 0; c < cols; ++c) {
    if (idx[c] < 0) {
      for (int64_t r = 0; r < rows; ++r) dst[r * ld + c] = dst_t(0);
    } else {
      const src_t* s = src + idx[c] * cs;
      for (int64_t r = 0; r < rows; ++r) dst[r * ld + c] = static_cast<dst_t>(s[r * rs]);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = cols; c < cols_pad; ++c) dst[r * ld + c] = dst_t(0);
}

// A (mb x kc) block of a problem's A starting at row m0 and column k0, into
// dst (leading dimension ld, columns [kc, ld) zero): gathered or strided.
template <typename dst_t, typename P>
void load_a_block(dst_t* dst, int64_t ld, const P& p, int64_t m0, int64_t mb, int64_t k0, int64_t kc) {
  if (p.a_row_idx != nullptr) {
    gather_rows(dst, ld, p.a + k0 * p.a_cs, p.a_row_idx + m0, p.a_rs, p.a_cs, mb, kc, ld);
  } else if (p.a_col_idx != nullptr) {
    gather_cols(dst, ld, p.a + m0 * p.a_rs, p.a_col_idx + k0, p.a_rs, p.a_cs, mb, kc, ld);
  } else {
    gather_block(dst, ld, p.a + m0 * p.a_rs + k0 * p.a_cs, p.a_rs, p.a_cs, mb, kc, ld);
  }
}

// out rows [m0, m0 + mb) x columns [n0, n0 + nb) = acc (+ bias), rounded once.
template <typename out_t, typename acc_t, typename P>
void store_tile(const P& p, int64_t m0, int64_t mb, int64_t n0, int64_t nb,
                const acc_t* acc, int64_t ld_acc) {
  for (int64_t r = 0; r < mb; ++r) {
    out_t* o = p.c + (m0 + r) * p.c_rs + n0;
    const acc_t* s = acc + r * ld_acc;
    if (p.bias != nullptr) {
      const acc_t* bb = p.bias + n0;
      for (int64_t j = 0; j < nb; ++j) o[j] = static_cast<out_t>(s[j] + bb[j]);
    } else {
      for (int64_t j = 0; j < nb; ++j) o[j] = static_cast<out_t>(s[j]);
    }
  }
}

template <typename out_t, typename P>
void store_bias_only(const P& p, int64_t n0, int64_t nb) {
  for (int64_t r = 0; r < p.m; ++r) {
    out_t* o = p.c + r * p.c_rs + n0;
    for (int64_t j = 0; j < nb; ++j) {
      o[j] = p.bias != nullptr ? static_cast<out_t>(p.bias[n0 + j]) : out_t(0);
    }
  }
}

// Row-major C (mb x nb, ldc) = A (mb x k, lda) B (k x nb, ldb), single-threaded.
// Each output is summed along K in order from zero with Vectorized<T>::fmadd
// (on AVX2/AVX-512 one rounding per step, as the AVX-512 engine), so its bits
// do not depend on the blocking. A tile of kGemmRows rows x 2 vectors is held
// in registers; edge tiles use the same code on partial vectors.
constexpr int64_t kGemmRows = 4;

template <typename T, int R>
void gemm_tile(int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t w) {
  using Vec = vec::Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  const int64_t w0 = std::min<int64_t>(w, kV), w1 = std::max<int64_t>(w - kV, 0);
  Vec acc0[R], acc1[R];
  for (int i = 0; i < R; ++i) {
    acc0[i] = Vec(T(0));
    acc1[i] = Vec(T(0));
  }
  for (int64_t l = 0; l < k; ++l) {
    const T* bl = b + l * ldb;
    const Vec b0 = w0 == kV ? Vec::loadu(bl) : Vec::loadu(bl, w0);
    const Vec b1 = w1 == kV ? Vec::loadu(bl + kV) : (w1 > 0 ? Vec::loadu(bl + kV, w1) : Vec(T(0)));
    for (int i = 0; i < R; ++i) {
      const Vec av(a[i * lda + l]);
      acc0[i] = vec::fmadd(av, b0, acc0[i]);
      acc1[i] = vec::fmadd(av, b1, acc1[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    acc0[i].store(c + i * ldc, w0);
    if (w1 > 0) acc1[i].store(c + i * ldc + kV, w1);
  }
}

template <typename T>
void gemm_row_major(int64_t mb, int64_t nb, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                    T* c, int64_t ldc) {
  constexpr int64_t kW = 2 * vec::Vectorized<T>::size();
  for (int64_t j0 = 0; j0 < nb; j0 += kW) {
    const int64_t w = std::min(kW, nb - j0);
    int64_t r0 = 0;
    for (; r0 + kGemmRows <= mb; r0 += kGemmRows) {
      gemm_tile<T, kGemmRows>(k, a + r0 * lda, lda, b + j0, ldb, c + r0 * ldc + j0, ldc, w);
    }
    for (; r0 < mb; ++r0) {
      gemm_tile<T, 1>(k, a + r0 * lda, lda, b + j0, ldb, c + r0 * ldc + j0, ldc, w);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// vdpbf16ps (AVX512_BF16) is beyond ATen's AVX512 capability (its flags stop
// at AVX512DQ), so the two kernels that use it carry their own target and run
// only where cpuinfo reports AVX512_BF16 (cpu_has_avx512_bf16).
#define GROUPED_MM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

// ---- AVX-512 engine ---------------------------------------------------------
// Intrinsics, not Vectorized<T>: the engine's speed comes from what
// Vectorized<T> does not express (masked loads and stores, broadcast FMAs on
// 4 x MR named accumulators, in-register 16 x 16 transposes, vdpbf16ps K
// pairs, L2 prefetch of the next weight block); see the measurements below.
// With a few dozen rows per expert the weights must come from DRAM on every
// call, and a GEMM that first packs them in a separate pass pays the memory
// time and the compute time one after the other. This engine reads the weight
// tile straight from the caller's memory, one (KC x 64) block at a time: the
// block is re-laid out into a 32 KB buffer of the thread's scratch right before use
// (float32 for float32/float16 inputs, bfloat16 pairs interleaved along K for
// vdpbf16ps), then every row block of the group runs against it from cache.
// While a block is in use, the micro-kernels prefetch the next block into L2
// (a tile's last block: the next tile's first), a row every few K steps over
// the first half of the row blocks, so the DRAM stream overlaps the FMAs and
// the lines have landed before the next pack reads them (at 32 rows per
// expert this moved the bf16 kernel from ~305 to ~325 GFLOP/s).
//
// Micro-kernel: C[MR x 64] in 4 x MR zmm accumulators, A broadcast one element
// (float32) or one K pair (bfloat16) at a time from rows read in place when A
// has unit column stride and the compute type (otherwise from a packed copy of
// the A block). Accumulation is float32 in K order; a K block boundary spills
// the accumulators to a float32 buffer, which does not change any rounding,
// so the bits depend only on K and never on the tiling or thread count.
constexpr int64_t kMR = 6;
constexpr int64_t kNR = 64;
// Rows of a group processed against one weight block: bounds the float32
// accumulator buffer (kMC x kMicroNB) and the packed A block.
constexpr int64_t kMC = 192;
// Output columns per tile (the unit of work balanced across threads).
constexpr int64_t kMicroNB = 256;

// cpuinfo, as at::cpu::is_avx512_bf16_supported (which libtorch does not
// export). Ice Lake, where the tests run, has no AVX512_BF16: the vdpbf16ps
// kernels are compiled there but only run on CPUs that have it.
bool cpu_has_avx512_bf16() {
  static const bool ok = cpuinfo_initialize() && cpuinfo_has_x86_avx512bf16();
  return ok;
}

// Rows of the next weight block to pull into L2 while the current one is used.
struct Prefetch {
  const char* base = nullptr;
  int64_t stride = 0; // bytes between rows
  int64_t rows = 0;
  int64_t bytes = 0; // bytes per row
};

inline void prefetch_row(const Prefetch& pf, int64_t row) {
  const char* p = pf.base + row * pf.stride;
  const char* end = p + pf.bytes;
  for (const char* q = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63)); q < end;
       q += 64) {
    _mm_prefetch(q, _MM_HINT_T1);
  }
}

inline __mmask32 col_mask32(int64_t w, int64_t j0) {
  const int64_t n = std::clamp<int64_t>(w - j0, 0, 32);
  return static_cast<__mmask32>((uint64_t{1} << n) - 1);
}

// The all-lanes maskz_ forms of some intrinsics below avoid GCC 12's false
// -Wmaybe-uninitialized on the unmasked forms (which start from an undefined
// register); they compile to the same instructions.
constexpr __mmask16 kAll16 = 0xFFFF;
constexpr __mmask8 kAll8 = 0xFF;

inline __m512 cvt_f16_f32(__m256i v) {
  return _mm512_maskz_cvtph_ps(kAll16, v);
}

// 16 float16 or bfloat16 values -> float32, exactly.
template <typename scalar_t>
inline __m512 cvt_16bit_f32(__m256i v) {
  if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    return moe_cvt_bf16_f32(v);
  } else {
    return cvt_f16_f32(v);
  }
}

// Epilogue of one output row: (acc + bias), rounded once to out_t, w columns.
template <typename out_t>
inline void store_out_row(out_t* o, const __m512* v, const float* bias, int64_t w) {
  for (int j = 0; j < 4; ++j) {
    const __mmask16 m = moe_lanes16(w, 16 * j);
    __m512 x = v[j];
    if (bias != nullptr) {
      x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + 16 * j));
    }
    if constexpr (std::is_same_v<out_t, float>) {
      _mm512_mask_storeu_ps(o + 16 * j, m, x);
    } else if constexpr (std::is_same_v<out_t, BFloat16>) {
      _mm256_mask_storeu_epi16(o + 16 * j, m, moe_cvt_f32_bf16(x));
    } else {
      _mm256_mask_storeu_epi16(o + 16 * j, m, _mm512_maskz_cvtps_ph(kAll16, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

// Accumulators of MR rows: start from zero (first K block) or from acc, and
// end in acc (more K blocks follow) or in the output (last K block).
struct MicroArgs {
  int64_t kc; // K extent of this block
  // Elements between consecutive K (float32) or K pairs (bfloat16) of an A
  // row: 1 / 2 for rows laid out along K, the packed width for K-major A.
  int64_t a_step;
  float* acc; // MR x 64 float32, leading dimension ld_acc
  int64_t ld_acc;
  bool first, last;
  void* c; // output rows, leading dimension ldc (elements)
  int64_t ldc;
  const float* bias; // nullptr or the 64 columns' bias
  int64_t w; // valid output columns (<= 64)
  Prefetch pf;
  int64_t pf_begin, pf_end; // rows of pf this call prefetches
};

template <int MR>
inline void load_acc(__m512 (&r)[MR][4], const MicroArgs& x) {
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < 4; ++j) {
      r[i][j] = x.first ? _mm512_setzero_ps() : _mm512_loadu_ps(x.acc + i * x.ld_acc + 16 * j);
    }
  }
}

template <int MR, typename out_t>
inline void finish_acc(__m512 (&r)[MR][4], const MicroArgs& x) {
  for (int i = 0; i < MR; ++i) {
    if (x.last) {
      store_out_row<out_t>(static_cast<out_t*>(x.c) + i * x.ldc, r[i], x.bias, x.w);
    } else {
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(x.acc + i * x.ld_acc + 16 * j, r[i][j]);
    }
  }
}

// float32 micro-kernel: a holds MR row pointers of kc floats each (rows of
// the caller's A, gathered or not, or of a packed copy), b is kc x 64.
template <int MR, typename out_t>
void micro_f32(const float* const* a, const float* b, const MicroArgs& x) {
  __m512 r[MR][4];
  load_acc<MR>(r, x);
  int64_t pf = x.pf_begin;
  const int64_t every = std::max<int64_t>(1, x.kc / std::max<int64_t>(1, x.pf_end - x.pf_begin));
  // A countdown, not k % every: an integer division per step costs as much as the step.
  int64_t until_pf = 0;
  for (int64_t k = 0; k < x.kc; ++k) {
    const float* bk = b + k * kNR;
    const __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16);
    const __m512 b2 = _mm512_load_ps(bk + 32), b3 = _mm512_load_ps(bk + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i][k * x.a_step]);
      r[i][0] = _mm512_fmadd_ps(av, b0, r[i][0]);
      r[i][1] = _mm512_fmadd_ps(av, b1, r[i][1]);
      r[i][2] = _mm512_fmadd_ps(av, b2, r[i][2]);
      r[i][3] = _mm512_fmadd_ps(av, b3, r[i][3]);
    }
    if (--until_pf <= 0 && pf < x.pf_end) {
      prefetch_row(x.pf, pf++);
      until_pf = every;
    }
  }
  for (; pf < x.pf_end; ++pf) prefetch_row(x.pf, pf);
  finish_acc<MR, out_t>(r, x);
}

// bfloat16 micro-kernel: a is MR rows of kc bfloat16 (pairs read as 32 bits),
// b is ceil(kc / 2) x 64 K pairs; an odd last element pairs with zero.
template <int MR, typename out_t>
GROUPED_MM_AVX512_BF16 void micro_bf16(const BFloat16* const* a, const uint32_t* b, const MicroArgs& x) {
  __m512 r[MR][4];
  load_acc<MR>(r, x);
  int64_t pf = x.pf_begin;
  const int64_t pairs = x.kc / 2;
  // One prefetched row every `every` K pairs: evenly spread, not in a burst
  // that would overflow the outstanding-miss queues.
  const int64_t every = std::max<int64_t>(1, pairs / std::max<int64_t>(1, x.pf_end - x.pf_begin));
  int64_t until_pf = 0;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const uint32_t* bk = b + kp * kNR;
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bk), b1 = (__m512bh)_mm512_load_si512(bk + 16);
    const __m512bh b2 = (__m512bh)_mm512_load_si512(bk + 32), b3 = (__m512bh)_mm512_load_si512(bk + 48);
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a[i] + kp * x.a_step, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      r[i][0] = _mm512_dpbf16_ps(r[i][0], av, b0);
      r[i][1] = _mm512_dpbf16_ps(r[i][1], av, b1);
      r[i][2] = _mm512_dpbf16_ps(r[i][2], av, b2);
      r[i][3] = _mm512_dpbf16_ps(r[i][3], av, b3);
    }
    if (--until_pf <= 0 && pf < x.pf_end) {
      prefetch_row(x.pf, pf++);
      until_pf = every;
    }
  }
  if (x.kc % 2 != 0) {
    const uint32_t* bk = b + pairs * kNR;
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bk), b1 = (__m512bh)_mm512_load_si512(bk + 16);
    const __m512bh b2 = (__m512bh)_mm512_load_si512(bk + 32), b3 = (__m512bh)_mm512_load_si512(bk + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(a[i][pairs * x.a_step].x);
      r[i][0] = _mm512_dpbf16_ps(r[i][0], av, b0);
      r[i][1] = _mm512_dpbf16_ps(r[i][1], av, b1);
      r[i][2] = _mm512_dpbf16_ps(r[i][2], av, b2);
      r[i][3] = _mm512_dpbf16_ps(r[i][3], av, b3);
    }
  }
  for (; pf < x.pf_end; ++pf) prefetch_row(x.pf, pf);
  finish_acc<MR, out_t>(r, x);
}

// r[i] (16 dwords each) <- column i of the 16 x 16 dword matrix in r.
inline void transpose_16x16_epi32(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_epi32(kAll16, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi32(kAll16, r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_maskz_unpacklo_epi64(kAll8, t[i], t[i + 2]);
    r[i + 1] = _mm512_maskz_unpackhi_epi64(kAll8, t[i], t[i + 2]);
    r[i + 2] = _mm512_maskz_unpacklo_epi64(kAll8, t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_maskz_unpackhi_epi64(kAll8, t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane now holds a 4 x 4 block; gather the lanes.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_maskz_shuffle_i32x4(kAll16, r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_maskz_shuffle_i32x4(kAll16, r[i + 8], r[i + 12], 0x88);
    t[i + 8] = _mm512_maskz_shuffle_i32x4(kAll16, r[i], r[i + 4], 0xDD);
    t[i + 12] = _mm512_maskz_shuffle_i32x4(kAll16, r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_maskz_shuffle_i32x4(kAll16, t[i], t[i + 4], 0x88);
    r[i + 4] = _mm512_maskz_shuffle_i32x4(kAll16, t[i + 8], t[i + 12], 0x88);
    r[i + 8] = _mm512_maskz_shuffle_i32x4(kAll16, t[i], t[i + 4], 0xDD);
    r[i + 12] = _mm512_maskz_shuffle_i32x4(kAll16, t[i + 8], t[i + 12], 0xDD);
  }
}

// Packs 32-bit words of a K-contiguous source: word p of column j is at
// src[j * ld + p]; dst[p * 64 + j] for p < words, j < w (zero past w).
// Full 16 x 16 tiles are transposed in registers, the edges one by one.
// This is how weights stored (E, N, K), transformers' layout, arrive: a
// float32 row is one word, a bfloat16 K pair is one word.
void pack_words_transposed(uint32_t* dst, const void* source, int64_t ld, int64_t words,
                                             int64_t w) {
  const auto* src = static_cast<const uint32_t*>(source);
  // Edge words are copied with memcpy: the source may be bfloat16 memory.
  const auto word = [src](int64_t i) {
    uint32_t v;
    std::memcpy(&v, src + i, sizeof(v));
    return v;
  };
  const int64_t full_j = w / 16 * 16;
  const int64_t full_p = words / 16 * 16;
  for (int64_t j0 = 0; j0 < full_j; j0 += 16) {
    for (int64_t p0 = 0; p0 < full_p; p0 += 16) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(src + (j0 + c) * ld + p0);
      transpose_16x16_epi32(r);
      for (int q = 0; q < 16; ++q) _mm512_store_si512(dst + (p0 + q) * kNR + j0, r[q]);
    }
    for (int64_t p = full_p; p < words; ++p)
      for (int64_t j = j0; j < j0 + 16; ++j) dst[p * kNR + j] = word(j * ld + p);
  }
  for (int64_t p = 0; p < words; ++p) {
    for (int64_t j = full_j; j < w; ++j) dst[p * kNR + j] = word(j * ld + p);
    for (int64_t j = w; j < kNR; ++j) dst[p * kNR + j] = 0;
  }
}

// Row k of a B block: src + k * rs, or with a row index (grouped_mm_gather)
// src + rows[k] * rs, nullptr for a zero row.
template <typename T>
inline const T* b_row(const T* src, int64_t rs, const int64_t* rows, int64_t k) {
  if (rows == nullptr) return src + k * rs;
  return rows[k] < 0 ? nullptr : src + rows[k] * rs;
}

// kc rows of w contiguous bfloat16 (row k at b_row(src, rs, rows, k)) ->
// ceil(kc / 2) x ldw words, word j of row kp = (row 2kp, row 2kp + 1) at
// column j, zero past w and past kc; ldw a multiple of 32.
void pack_pairs_bf16(uint32_t* dst, int64_t ldw, const BFloat16* src, int64_t rs,
                                       const int64_t* rows, int64_t kc, int64_t w) {
  // One two-source word permute per 16 output columns: lane 2c takes
  // column c of row 2kp (x0), lane 2c + 1 column c of row 2kp + 1 (x1).
  alignas(64) static const int16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                              8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const int16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                              24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i idx0 = _mm512_load_si512(kLo), idx1 = _mm512_load_si512(kHi);
  const int64_t pairs = (kc + 1) / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const BFloat16* r0 = b_row(src, rs, rows, 2 * kp);
    const BFloat16* r1 = 2 * kp + 1 < kc ? b_row(src, rs, rows, 2 * kp + 1) : nullptr;
    for (int64_t j = 0; j < ldw; j += 32) {
      const __mmask32 m = col_mask32(w, j);
      const __m512i x0 = r0 != nullptr ? _mm512_maskz_loadu_epi16(m, r0 + j) : _mm512_setzero_si512();
      const __m512i x1 = r1 != nullptr ? _mm512_maskz_loadu_epi16(m, r1 + j) : _mm512_setzero_si512();
      _mm512_store_si512(dst + kp * ldw + j, _mm512_permutex2var_epi16(x0, idx0, x1));
      _mm512_store_si512(dst + kp * ldw + j + 16, _mm512_permutex2var_epi16(x0, idx1, x1));
    }
  }
}

// kc rows of w contiguous float32 / float16 values -> kc x ldw float32, zero
// past w; ldw a multiple of 16.
template <typename scalar_t>
void pack_rows_f32(float* dst, int64_t ldw, const scalar_t* src, int64_t rs, const int64_t* rows,
                                     int64_t kc, int64_t w) {
  for (int64_t k = 0; k < kc; ++k) {
    const scalar_t* s = b_row(src, rs, rows, k);
    for (int64_t j = 0; j < ldw; j += 16) {
      const __mmask16 m = s != nullptr ? moe_lanes16(w, j) : __mmask16(0);
      __m512 v;
      if constexpr (std::is_same_v<scalar_t, float>) {
        v = _mm512_maskz_loadu_ps(m, s + j);
      } else {
        v = cvt_16bit_f32<scalar_t>(_mm256_maskz_loadu_epi16(m, s + j));
      }
      _mm512_store_ps(dst + k * ldw + j, v);
    }
  }
}

// Weight block (kc x w, strides rs/cs) -> kc x 64 float32, zero past w.
template <typename scalar_t>
void pack_b_f32(float* dst, const scalar_t* src, int64_t rs, int64_t cs, int64_t kc, int64_t w,
                                  const int64_t* rows) {
  if (cs == 1) {
    pack_rows_f32(dst, kNR, src, rs, rows, kc, w);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (rs == 1 && rows == nullptr) {
      pack_words_transposed(reinterpret_cast<uint32_t*>(dst), src, cs, kc, w);
      return;
    }
  }
  // Strided or transposed weights: walk along the source's inner dimension.
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t j = w; j < kNR; ++j) dst[k * kNR + j] = 0.f;
  }
  for (int64_t j = 0; j < w; ++j) {
    for (int64_t k = 0; k < kc; ++k) {
      const scalar_t* s = b_row(src, rs, rows, k);
      dst[k * kNR + j] = s != nullptr ? static_cast<float>(s[j * cs]) : 0.f;
    }
  }
}

// Weight block (kc x w) -> ceil(kc / 2) x 64 bfloat16 pairs (row 2p in the
// low half, row 2p + 1 in the high half, zero past kc and past w).
void pack_b_bf16(uint32_t* dst, const BFloat16* src, int64_t rs, int64_t cs, int64_t kc, int64_t w,
                                   const int64_t* rows) {
  const int64_t pairs = (kc + 1) / 2;
  if (cs == 1) {
    pack_pairs_bf16(dst, kNR, src, rs, rows, kc, w);
    return;
  }
  if (rs == 1 && cs % 2 == 0 && rows == nullptr) {
    // K-contiguous weights: a K pair is one 32-bit word of the source.
    const int64_t full = kc / 2;
    pack_words_transposed(dst, src, cs / 2, full, w);
    if (full < pairs) {  // odd kc: the last row pairs with zero
      for (int64_t j = 0; j < kNR; ++j) dst[full * kNR + j] = j < w ? src[(kc - 1) + j * cs].x : 0;
    }
    return;
  }
  for (int64_t kp = 0; kp < pairs; ++kp) {
    for (int64_t j = w; j < kNR; ++j) dst[kp * kNR + j] = 0;
  }
  for (int64_t j = 0; j < w; ++j) {
    for (int64_t kp = 0; kp < pairs; ++kp) {
      const BFloat16* s0 = b_row(src, rs, rows, 2 * kp);
      const BFloat16* s1 = 2 * kp + 1 < kc ? b_row(src, rs, rows, 2 * kp + 1) : nullptr;
      const uint32_t lo = s0 != nullptr ? s0[j * cs].x : 0;
      const uint32_t hi = s1 != nullptr ? s1[j * cs].x : 0;
      dst[kp * kNR + j] = lo | (hi << 16);
    }
  }
}

// float16 / bfloat16 rows (unit column stride) -> float32 rows, ld apart.
template <typename scalar_t>
void widen_rows_16bit(float* dst, int64_t ld, const scalar_t* src, int64_t rs, int64_t rows,
                                        int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = moe_lanes16(cols, j);
      _mm512_mask_storeu_ps(dst + r * ld + j, m,
                            cvt_16bit_f32<scalar_t>(_mm256_maskz_loadu_epi16(m, src + r * rs + j)));
    }
  }
}

// Per input type: the type A is read in by the micro-kernel, the packed
// weight element, and the K block (a 32 KB packed weight block). bfloat16
// runs as K pairs through vdpbf16ps where the CPU has AVX512_BF16
// (kPairs), else widened to float32 like float16: exact, at float32 speed,
// which on such CPUs is several times oneDNN's bfloat16 matmul.
template <typename scalar_t, bool kPairs = false>
struct MicroTraits {
  using a_t = float;
  using b_t = float;
  static constexpr int64_t kKC = 128;
};
template <>
struct MicroTraits<BFloat16, true> {
  using a_t = BFloat16;
  using b_t = uint32_t;
  static constexpr int64_t kKC = 256;
};

template <typename Traits>
constexpr bool kPairsOf = std::is_same_v<typename Traits::b_t, uint32_t>;

template <typename Traits, typename out_t, int MR>
void call_micro(const typename Traits::a_t* const* a, const typename Traits::b_t* b, const MicroArgs& x) {
  if constexpr (kPairsOf<Traits>) {
    micro_bf16<MR, out_t>(a, b, x);
  } else {
    micro_f32<MR, out_t>(a, b, x);
  }
}

template <typename Traits, typename out_t>
void dispatch_micro(int64_t mr, const typename Traits::a_t* const* a, const typename Traits::b_t* b,
                    const MicroArgs& x) {
  static_assert(kMR == 6);
  switch (mr) {
    case 1: call_micro<Traits, out_t, 1>(a, b, x); break;
    case 2: call_micro<Traits, out_t, 2>(a, b, x); break;
    case 3: call_micro<Traits, out_t, 3>(a, b, x); break;
    case 4: call_micro<Traits, out_t, 4>(a, b, x); break;
    case 5: call_micro<Traits, out_t, 5>(a, b, x); break;
    default: call_micro<Traits, out_t, 6>(a, b, x); break;
  }
}

// The K block of the broadcast engine for this input type on this CPU.
template <typename scalar_t>
int64_t micro_kc() {
  if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    return cpu_has_avx512_bf16() ? MicroTraits<BFloat16, true>::kKC : MicroTraits<BFloat16, false>::kKC;
  }
  return MicroTraits<scalar_t>::kKC;
}

// One tile: all rows of the problem x columns [n0, n0 + nb), nb <= kMicroNB
// unless K fits one block (then no accumulator buffer is needed).
// Loop order per kMC rows: K blocks, then 64-column weight blocks, then MR-row
// blocks, so each weight block is packed once and reused by every row block.
// next: the tile this thread runs after t (nullptr if none), whose first
// weight block is prefetched while t's last one is in use: with a few dozen
// rows per expert a tile is short, and a cold first block stalls its pack.
template <typename scalar_t, typename out_t, typename Traits>
void run_tile_avx512(const Problem<scalar_t, out_t, float>& p, const Tile& t, ThreadBuffers& buf,
                     const Problem<scalar_t, out_t, float>* next_p, const Tile* next) {
  using a_t = typename Traits::a_t;
  using b_t = typename Traits::b_t;
  constexpr int64_t kKC = Traits::kKC;
  constexpr int64_t kBRows = std::is_same_v<b_t, uint32_t> ? kKC / 2 : kKC;
  const int64_t k = p.k;
  const int64_t strips = (t.nb + kNR - 1) / kNR;
  b_t* bpack = workspace<b_t>(buf.b, kBRows * kNR);
  float* acc = k > kKC ? workspace<float>(buf.acc, kMC * strips * kNR) : nullptr;
  const int64_t ld_acc = strips * kNR;
  // A is read in place when its rows are unit-stride in the compute type,
  // gathered rows included: the micro-kernel takes one pointer per row.
  constexpr bool kAInPlaceType = std::is_same_v<scalar_t, a_t>;
  const bool a_in_place = kAInPlaceType && p.a_cs == 1 && p.a_col_idx == nullptr;
  // A stored K-major (the transposed operand of a weight gradient, dh^T or
  // grad^T, gathered columns included) is packed K-major by the vector
  // routine that packs B, and the micro-kernel steps through it along K.
  // Gathered rows of a K-major A are not: the packer walks rows in order.
  const bool a_k_major = !a_in_place && p.a_rs == 1 && p.a_cs != 1 && p.a_row_idx == nullptr;
  constexpr int64_t kRowStep = std::is_same_v<b_t, uint32_t> ? 2 : 1;
  // What a -1 row index reads (at most kKC elements of a K block).
  alignas(64) static const a_t kZeroRow[kKC] = {};
  const a_t* a_rows[kMC];
  // Weight rows are prefetched only when they are unit-stride rows in order.
  const bool b_prefetch = p.b_cs == 1 && p.b_idx == nullptr;

  for (int64_t m0 = 0; m0 < p.m; m0 += kMC) {
    const int64_t mc = std::min(kMC, p.m - m0);
    const int64_t m_blocks = (mc + kMR - 1) / kMR;
    for (int64_t k0 = 0; k0 < k; k0 += kKC) {
      const int64_t kc = std::min(kKC, k - k0);
      int64_t a_step = kRowStep;
      if (a_in_place) {
        for (int64_t r = 0; r < mc; ++r) {
          const int64_t row = p.a_row_idx != nullptr ? p.a_row_idx[m0 + r] : m0 + r;
          a_rows[r] = row < 0 ? kZeroRow : reinterpret_cast<const a_t*>(p.a + row * p.a_rs + k0);
        }
      } else if (a_k_major) {
        // Column c of A (contiguous over the rows) is a "row" of the packer.
        const scalar_t* base = p.a + m0 + (p.a_col_idx != nullptr ? 0 : k0 * p.a_cs);
        const int64_t* cols = p.a_col_idx != nullptr ? p.a_col_idx + k0 : nullptr;
        if constexpr (kPairsOf<Traits>) {
          const int64_t ldw = (mc + 31) / 32 * 32;
          uint32_t* w = workspace<uint32_t>(buf.a, (kc + 1) / 2 * ldw);
          pack_pairs_bf16(w, ldw, base, p.a_cs, cols, kc, mc);
          for (int64_t r = 0; r < mc; ++r) a_rows[r] = reinterpret_cast<const a_t*>(w) + 2 * r;
          a_step = 2 * ldw;
        } else {
          const int64_t ldw = (mc + 15) / 16 * 16;
          float* w = workspace<float>(buf.a, kc * ldw);
          pack_rows_f32(w, ldw, base, p.a_cs, cols, kc, mc);
          for (int64_t r = 0; r < mc; ++r) a_rows[r] = w + r;
          a_step = ldw;
        }
      } else {
        // Packed copy, rows padded to an even length (bfloat16 reads K pairs).
        const int64_t lda = (kc + 1) / 2 * 2;
        a_t* w = workspace<a_t>(buf.a, mc * lda);
        const scalar_t* src = p.a + m0 * p.a_rs + k0 * p.a_cs;
        if (p.a_gathered()) {
          load_a_block(w, lda, p, m0, mc, k0, kc);
        } else if constexpr (!std::is_same_v<scalar_t, float> && !kPairsOf<Traits>) {
          if (p.a_cs == 1) {
            widen_rows_16bit(w, lda, src, p.a_rs, mc, kc);
            for (int64_t r = 0; r < mc; ++r)
              for (int64_t c = kc; c < lda; ++c) w[r * lda + c] = 0.f;
          } else {
            gather_block(w, lda, src, p.a_rs, p.a_cs, mc, kc, lda);
          }
        } else {
          gather_block(w, lda, src, p.a_rs, p.a_cs, mc, kc, lda);
        }
        for (int64_t r = 0; r < mc; ++r) a_rows[r] = w + r * lda;
      }
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t j0 = t.n0 + s * kNR;
        const int64_t w = std::min(kNR, t.n0 + t.nb - j0);
        const int64_t* b_rows = p.b_idx != nullptr ? p.b_idx + k0 : nullptr;
        const scalar_t* b_blk = p.b + (b_rows != nullptr ? 0 : k0 * p.b_rs) + j0 * p.b_cs;
        if constexpr (kPairsOf<Traits>) {
          pack_b_bf16(bpack, b_blk, p.b_rs, p.b_cs, kc, w, b_rows);
        } else {
          pack_b_f32(bpack, b_blk, p.b_rs, p.b_cs, kc, w, b_rows);
        }
        // Next weight block of this tile: next strip, else first strip of the
        // next K block (the next row chunk rereads blocks already in cache).
        Prefetch pf;
        if (b_prefetch) {
          int64_t nk0 = k0, nj0 = j0 + kNR;
          if (s + 1 == strips) {
            nk0 = k0 + kKC;
            nj0 = t.n0;
          }
          if (nk0 < k) {
            pf.base = reinterpret_cast<const char*>(p.b + nk0 * p.b_rs + nj0);
            pf.stride = p.b_rs * static_cast<int64_t>(sizeof(scalar_t));
            pf.rows = std::min(kKC, k - nk0);
            pf.bytes = std::min(kNR, t.n0 + t.nb - nj0) * static_cast<int64_t>(sizeof(scalar_t));
          } else if (next != nullptr && m0 + kMC >= p.m && next_p->k > 0 && next_p->b_cs == 1 &&
                     next_p->b_idx == nullptr) {
            pf.base = reinterpret_cast<const char*>(next_p->b + next->n0);
            pf.stride = next_p->b_rs * static_cast<int64_t>(sizeof(scalar_t));
            pf.rows = std::min(kKC, next_p->k);
            pf.bytes = std::min(kNR, next->nb) * static_cast<int64_t>(sizeof(scalar_t));
          }
        }
        MicroArgs x;
        x.kc = kc;
        x.a_step = a_step;
        x.ld_acc = ld_acc;
        x.first = k0 == 0;
        x.last = k0 + kc == k;
        x.ldc = p.c_rs;
        x.bias = p.bias != nullptr ? p.bias + j0 : nullptr;
        x.w = w;
        x.pf = pf;
        for (int64_t mb = 0; mb < m_blocks; ++mb) {
          const int64_t r0 = mb * kMR;
          const int64_t mr = std::min(kMR, mc - r0);
          x.acc = acc != nullptr ? acc + r0 * ld_acc + s * kNR : nullptr;
          x.c = p.c + (m0 + r0) * p.c_rs + j0;
          // Over the first half of the row blocks, so the lines land before the next pack.
          const int64_t pf_blocks = (m_blocks + 1) / 2;
          x.pf_begin = mb < pf_blocks ? pf.rows * mb / pf_blocks : 0;
          x.pf_end = mb < pf_blocks ? pf.rows * (mb + 1) / pf_blocks : 0;
          dispatch_micro<Traits, out_t>(mr, a_rows + r0, bpack, x);
        }
      }
    }
  }
}

// ---- inner-product engine: A rows and B columns both contiguous along K ----
// Weights stored (E, N, K) (transformers, torchtitan) reach a 2D x 3D grouped
// mm as the transposed view (G, K, N) with unit stride along K. Packing them
// for the broadcast kernel above means a 16 x 16 word transpose per block,
// paid again on every call and amortised over only a few dozen rows. Here
// they are read in place instead: each output is a dot product along K of
// an A row and a weight row, vectorised over K (16 float32 or 32 bfloat16
// lanes, partial sums per lane, reduced once at the end in a fixed order).
// A register tile holds MR A rows x 4 weight rows; the weight rows (from
// DRAM, prefetched a block ahead) are reused from cache by every row block
// of the group, the A rows (a few dozen, K-contiguous, gathered or not) stay
// in L2. No packing, no transpose, and rows need no padding.
constexpr int64_t kNtMR = 6;
constexpr int64_t kNtNR = 4;
// Rows of A per pass over a tile's weight rows: kNtMC x K A values stay in
// L2 while the tile's weights stream past once.
constexpr int64_t kNtMC = 96;

// Lines of the next weight rows to prefetch during one micro-kernel call.
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
  const int64_t every = std::max<int64_t>(1, full / std::max<int64_t>(1, pf.end - pf.begin));
  int64_t line = pf.begin, next_pf = 0;
  for (int64_t s = 0; s < full; ++s) {
    const int64_t off = s * 16;
    const __m512 v0 = _mm512_loadu_ps(b0 + off), v1 = _mm512_loadu_ps(b1 + off);
    const __m512 v2 = _mm512_loadu_ps(b2 + off), v3 = _mm512_loadu_ps(b3 + off);
    NT_ROW_F32(0, kAll16) NT_ROW_F32(1, kAll16) NT_ROW_F32(2, kAll16)
    NT_ROW_F32(3, kAll16) NT_ROW_F32(4, kAll16) NT_ROW_F32(5, kAll16)
    if (s == next_pf && line < pf.end) {
      nt_prefetch_line(pf, line++);
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
  const int64_t every = std::max<int64_t>(1, full / std::max<int64_t>(1, pf.end - pf.begin));
  int64_t line = pf.begin, next_pf = 0;
  constexpr __mmask32 kAll32 = ~__mmask32(0);
  for (int64_t s = 0; s < full; ++s) {
    const int64_t off = s * 32;
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0 + off), v1 = (__m512bh)_mm512_loadu_si512(b1 + off);
    const __m512bh v2 = (__m512bh)_mm512_loadu_si512(b2 + off), v3 = (__m512bh)_mm512_loadu_si512(b3 + off);
    NT_ROW_BF16(0, kAll32) NT_ROW_BF16(1, kAll32) NT_ROW_BF16(2, kAll32)
    NT_ROW_BF16(3, kAll32) NT_ROW_BF16(4, kAll32) NT_ROW_BF16(5, kAll32)
    if (s == next_pf && line < pf.end) {
      nt_prefetch_line(pf, line++);
      next_pf += every;
    }
  }
  if (k % 32 != 0) {
    const int64_t off = full * 32;
    const __mmask32 m = col_mask32(k, off);
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
      p.k >= 64;
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
  // What a -1 row index reads.
  const scalar_t* zero_row = nullptr;
  if (p.a_row_idx != nullptr && !widen) {
    scalar_t* z = workspace<scalar_t>(buf.a, k);
    std::fill(z, z + k, scalar_t(0));
    zero_row = z;
  }
  const scalar_t* a_rows[kNtMC];
  const float* a_wide[kNtMC];
  float sums[kNtMR][kNtNR];
  for (int64_t m0 = 0; m0 < p.m; m0 += kNtMC) {
    const int64_t mc = std::min(kNtMC, p.m - m0);
    for (int64_t r = 0; r < mc; ++r) {
      const int64_t row = p.a_row_idx != nullptr ? p.a_row_idx[m0 + r] : m0 + r;
      a_rows[r] = row < 0 ? zero_row : p.a + row * p.a_rs;
    }
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
      // The weight rows used next: this tile's next block, else (last row
      // chunk) the next tile's first, when it reads its weights the same way.
      NtPrefetch pf;
      const Problem<scalar_t, out_t, float>* pf_p = nullptr;
      int64_t pf_n = 0, pf_w = 0;
      if (n0 + kNtNR < n_end) {
        pf_p = &p;
        pf_n = n0 + kNtNR;
        pf_w = std::min(kNtNR, n_end - pf_n);
      } else if (next != nullptr && m0 + kNtMC >= p.m && next_p->k == k && nt_eligible<scalar_t>(*next_p)) {
        pf_p = next_p;
        pf_n = next->n0;
        pf_w = std::min(kNtNR, next->nb);
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
        for (int64_t i = 0; i < mr; ++i) {
          out_t* o = p.c + (m0 + r0 + i) * p.c_rs + n0;
          for (int64_t j = 0; j < w; ++j) {
            o[j] = static_cast<out_t>(p.bias != nullptr ? sums[i][j] + p.bias[n0 + j] : sums[i][j]);
          }
        }
      }
    }
  }
}

// What run_tile_nt or run_tile_avx512 takes from the thread's scratch for t.
template <typename scalar_t, typename out_t>
void avx512_scratch(const Problem<scalar_t, out_t, float>& p, const Tile& t, ScratchBytes& s) {
  const int64_t k = p.k;
  if (nt_eligible<scalar_t>(p)) {
    if (std::is_same_v<scalar_t, BFloat16> && !cpu_has_avx512_bf16()) {  // widened copies
      s.at_least(0, kNtNR * k * 4, std::min(kNtMC, p.m) * k * 4);
    } else if (p.a_row_idx != nullptr) {  // the zero row
      s.at_least(k * static_cast<int64_t>(sizeof(scalar_t)), 0, 0);
    }
    return;
  }
  const auto need = [&](auto traits) {
    using Traits = decltype(traits);
    constexpr int64_t kKC = Traits::kKC;
    constexpr int64_t kBRows = kPairsOf<Traits> ? kKC / 2 : kKC;
    const int64_t strips = (t.nb + kNR - 1) / kNR;
    // A block: at most kMC rows (padded to 32) x kKC (+1 for pairs) 4-byte words.
    s.at_least(kMC * (kKC + 32) * 4, kBRows * kNR * static_cast<int64_t>(sizeof(typename Traits::b_t)),
               k > kKC ? kMC * strips * kNR * 4 : 0);
  };
  if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    if (cpu_has_avx512_bf16()) {
      need(MicroTraits<BFloat16, true>{});
    } else {
      need(MicroTraits<BFloat16, false>{});
    }
  } else {
    need(MicroTraits<scalar_t>{});
  }
}
#endif // CPU_CAPABILITY_AVX512

// ---- widening engine: row-major tiles in compute_t (float or double) --------
// Float inputs with a unit inner stride are read in place; anything else
// (transposed or broadcast operands, 16-bit types) is gathered tile by tile
// into the thread's scratch, which stays in cache.
template <typename scalar_t, typename out_t, typename compute_t>
void widening_scratch(const Problem<scalar_t, out_t, compute_t>& p, const Tile& t, ScratchBytes& s) {
  // The same conditions as run_tile_widening's copies.
  constexpr bool kInPlace = std::is_same_v<scalar_t, compute_t>;
  const bool b_copy = p.b_idx != nullptr || !(kInPlace && p.b_cs == 1 && (p.k == 1 || p.b_rs >= t.nb));
  const bool a_copy = !(kInPlace && p.a_cs == 1 && (p.m == 1 || p.a_rs >= p.k) && !p.a_gathered());
  const auto e = static_cast<int64_t>(sizeof(compute_t));
  s.at_least(a_copy ? std::min(kWideMB, p.m) * p.k * e : 0, b_copy ? p.k * t.nb * e : 0,
             std::is_same_v<out_t, compute_t> ? 0 : kWideMB * t.nb * e);
}

template <typename scalar_t, typename out_t, typename compute_t>
void run_tile_widening(const Problem<scalar_t, out_t, compute_t>& p, const Tile& t, ThreadBuffers& buf) {
  constexpr bool kInPlace = std::is_same_v<scalar_t, compute_t>;
  const int64_t k = p.k;
  const int64_t nb = t.nb;
  const scalar_t* b = p.b + t.n0 * p.b_cs;

  const compute_t* b_ptr;
  int64_t ldb;
  if (p.b_idx != nullptr) {
    compute_t* w = workspace<compute_t>(buf.b, k * nb);
    gather_rows(w, nb, b, p.b_idx, p.b_rs, p.b_cs, k, nb, nb);
    b_ptr = w;
    ldb = nb;
  } else if (kInPlace && p.b_cs == 1 && (k == 1 || p.b_rs >= nb)) {
    b_ptr = reinterpret_cast<const compute_t*>(b);
    ldb = k == 1 ? nb : p.b_rs;
  } else {
    compute_t* w = workspace<compute_t>(buf.b, k * nb);
    gather_block(w, nb, b, p.b_rs, p.b_cs, k, nb, nb);
    b_ptr = w;
    ldb = nb;
  }

  // fp32 output without a type change accumulates straight into out, then
  // adds the bias: the same two roundings as the other engines' epilogue.
  constexpr bool kDirectOut = std::is_same_v<out_t, compute_t>;
  compute_t* acc = kDirectOut ? nullptr : workspace<compute_t>(buf.acc, kWideMB * nb);
  const bool a_in_place = kInPlace && p.a_cs == 1 && (p.m == 1 || p.a_rs >= k) && !p.a_gathered();
  for (int64_t m0 = 0; m0 < p.m; m0 += kWideMB) {
    const int64_t mb = std::min(kWideMB, p.m - m0);
    const compute_t* a_ptr;
    int64_t lda;
    if (a_in_place) {
      a_ptr = reinterpret_cast<const compute_t*>(p.a + m0 * p.a_rs);
      lda = p.m == 1 ? k : p.a_rs;
    } else {
      compute_t* w = workspace<compute_t>(buf.a, mb * k);
      load_a_block(w, k, p, m0, mb, 0, k);
      a_ptr = w;
      lda = k;
    }
    if constexpr (kDirectOut) {
      compute_t* c = reinterpret_cast<compute_t*>(p.c) + m0 * p.c_rs + t.n0;
      gemm_row_major<compute_t>(mb, nb, k, a_ptr, lda, b_ptr, ldb, c, p.c_rs);
      if (p.bias != nullptr) {
        for (int64_t r = 0; r < mb; ++r) {
          for (int64_t j = 0; j < nb; ++j) c[r * p.c_rs + j] += p.bias[t.n0 + j];
        }
      }
    } else {
      gemm_row_major<compute_t>(mb, nb, k, a_ptr, lda, b_ptr, ldb, acc, nb);
      store_tile<out_t>(p, m0, mb, t.n0, nb, acc, nb);
    }
  }
}

// ---- matmul engine: bfloat16 / float32 in and out, no bias ------------------
// oneDNN's bf16 matmul (avx512_bf16/AMX) and MKL's sgemm behind at::mm, one
// group after the other and outside any parallel region: each GEMM is
// threaded by the library, and no ATen op runs inside at::parallel_for.
template <typename scalar_t, typename out_t, typename acc_t>
void run_group_matmul(const Problem<scalar_t, out_t, acc_t>& p) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto* a = const_cast<scalar_t*>(p.a);
  auto* b = const_cast<scalar_t*>(p.b);
  const Tensor a_view = at::from_blob(a, {p.m, p.k}, {p.a_rs, p.a_cs}, opts);
  const Tensor b_view = at::from_blob(b, {p.k, p.n}, {p.b_rs, p.b_cs}, opts);
  Tensor c_view = at::from_blob(p.c, {p.m, p.n}, {p.c_rs, 1}, opts);
  at::mm_out(c_view, a_view, b_view);
}

enum class Engine { kMatmul, kWidening, kAvx512 };

// Average rows per group from which the BLAS behind at::mm (oneDNN's
// bfloat16 matmul with AVX512_BF16, MKL's sgemm) overtakes the
// micro-kernel: its weight packing is then amortised over enough rows.
constexpr int64_t kMatmulMinRows = 256;

// The AVX-512 micro-kernels where the CPU has them (they beat oneDNN/MKL on
// fine-grained groups by overlapping the weight stream with compute), except
// for large bfloat16 groups; otherwise at::mm where it applies, else the
// widening engine.
template <typename scalar_t, typename out_t, typename acc_t>
Engine choose_engine(const std::vector<Problem<scalar_t, out_t, acc_t>>& problems, bool has_bias, bool gathered) {
  constexpr bool kMatmulCapable = (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, float>) &&
      std::is_same_v<out_t, scalar_t>;
  // at::mm cannot read rows through an index. It runs a whole group on all
  // threads, and MKL / oneDNN may then split K across them for small shapes,
  // which changes the bits with the thread count: so only for the large
  // groups of the AVX512 build, where it is the faster engine; the DEFAULT
  // and AVX2 builds use the widening engine, whose bits never depend on it.
  [[maybe_unused]] const Engine fallback =
      kMatmulCapable && !has_bias && !gathered ? Engine::kMatmul : Engine::kWidening;
#if defined(CPU_CAPABILITY_AVX512)
  int64_t rows = 0, nonempty = 0;
  for (const auto& p : problems) {
    if (p.m > 0 && p.n > 0) {
      rows += p.m;
      ++nonempty;
    }
  }
  const bool large_groups = rows >= kMatmulMinRows * std::max<int64_t>(nonempty, 1);
  if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    if (cpu_has_avx512_bf16() && !(fallback == Engine::kMatmul && large_groups)) {
      return Engine::kAvx512;
    }
    // Without AVX512_BF16 oneDNN's bfloat16 matmul runs at a fraction of the
    // float32 rate; the micro-kernels widen to float32 and keep that rate.
    if (!cpu_has_avx512_bf16()) {
      return Engine::kAvx512;
    }
  } else if constexpr (!std::is_same_v<scalar_t, double>) {
    // float32 groups of hundreds of rows amortise MKL's weight packing, and
    // on Intel cores its sgemm outruns the micro-kernel (Ice Lake: 0.6-0.8x
    // of it at Mixtral's 512 rows per expert, measured); below that the
    // micro-kernel's streamed weights win.
    if (!(std::is_same_v<scalar_t, float> && fallback == Engine::kMatmul && large_groups)) {
      return Engine::kAvx512;
    }
  }
  return fallback;
#else
  return Engine::kWidening;
#endif
}

template <typename scalar_t, typename out_t, typename acc_t>
void run_problems(const std::vector<Problem<scalar_t, out_t, acc_t>>& problems, bool has_bias, bool gathered) {
  const Engine engine = choose_engine(problems, has_bias, gathered);
  if (engine == Engine::kMatmul) {
    for (const auto& p : problems) {
      if (p.m == 0 || p.n == 0) continue;
      if (p.k == 0) {
        store_bias_only<out_t>(p, 0, p.n);
      } else {
        run_group_matmul(p);
      }
    }
    return;
  }
  // Tile widths depend on the shapes only (never on the thread count), so the
  // bits of the result do not change with the number of threads.
  int64_t tile_n = kWideNB;
#if defined(CPU_CAPABILITY_AVX512)
  if (engine == Engine::kAvx512) {
    tile_n = kMicroNB;
  }
#endif

  std::vector<Tile> tiles;
  double total = 0;
  for (const auto i : c10::irange(static_cast<int64_t>(problems.size()))) {
    const auto& p = problems[i];
    if (p.m == 0 || p.n == 0) continue;
    int64_t problem_tile_n = tile_n;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (!std::is_same_v<scalar_t, double>) {
      // A K that fits one block (a weight gradient over a few dozen routed
      // rows) needs no accumulator buffer, so a tile can span all of N and
      // pack (transpose, gather) its A block once instead of once per 256
      // columns. Only with enough problems to keep every thread busy.
      if (engine == Engine::kAvx512 && p.k <= micro_kc<scalar_t>() && problems.size() >= 16) {
        problem_tile_n = p.n;
      }
    }
#endif
    for (int64_t n0 = 0; n0 < p.n; n0 += std::min(problem_tile_n, p.n)) {
      const int64_t nb = std::min(problem_tile_n, p.n - n0);
      const double cost = static_cast<double>(nb) * std::max<int64_t>(p.k, 1) *
          (static_cast<double>(p.m) + kWeightStreamRows);
      tiles.push_back({i, n0, nb, cost});
      total += cost;
    }
  }
  if (tiles.empty()) return;

  // Contiguous runs of tiles per thread, cut at equal shares of the cost;
  // neighbouring tiles share their A rows, so runs keep them in cache.
  const int64_t num_chunks = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tiles.size()));
  std::vector<int64_t> bounds(num_chunks + 1, static_cast<int64_t>(tiles.size()));
  bounds[0] = 0;
  {
    double prefix = 0;
    int64_t chunk = 1;
    for (const auto i : c10::irange(static_cast<int64_t>(tiles.size()))) {
      const double mid = prefix + tiles[i].cost / 2;
      while (chunk < num_chunks && mid >= total * chunk / num_chunks) {
        bounds[chunk++] = i;
      }
      prefix += tiles[i].cost;
    }
  }

  // Scratch for this call, one slice per chunk (a thread runs its chunks one
  // after the other in one slice), sized for the largest tile of the engine.
  ScratchBytes need;
  for (const Tile& t : tiles) {
    const auto& p = problems[t.problem];
    if (p.k == 0) continue;
    if (engine == Engine::kWidening) {
      widening_scratch(p, t, need);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (!std::is_same_v<scalar_t, double>) {
        avx512_scratch(p, t, need);
      }
#endif
    }
  }
  const auto round64 = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t slice = round64(need.a) + round64(need.b) + round64(need.acc);
  const Tensor scratch = at::empty({num_chunks * slice}, at::TensorOptions().dtype(kByte));
  char* const scratch_base = reinterpret_cast<char*>(scratch.data_ptr());

  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    ThreadBuffers buf;
    char* base = scratch_base + begin * slice;
    buf.a = {base, need.a};
    buf.b = {base + round64(need.a), need.b};
    buf.acc = {base + round64(need.a) + round64(need.b), need.acc};
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int64_t i = bounds[chunk]; i < bounds[chunk + 1]; ++i) {
        const Tile& t = tiles[i];
        const auto& p = problems[t.problem];
        if (p.k == 0) {
          store_bias_only<out_t>(p, t.n0, t.nb);
        } else if (engine == Engine::kWidening) {
          run_tile_widening(p, t, buf);
        } else {
#if defined(CPU_CAPABILITY_AVX512)
          if constexpr (!std::is_same_v<scalar_t, double>) {
            const Tile* next = i + 1 < bounds[chunk + 1] ? &tiles[i + 1] : nullptr;
            const auto* next_p = next != nullptr ? &problems[next->problem] : nullptr;
            if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>) {
              if (nt_eligible<scalar_t>(p)) {
                run_tile_nt(p, t, buf, next_p, next);
                continue;
              }
            }
            if constexpr (std::is_same_v<scalar_t, BFloat16>) {
              if (cpu_has_avx512_bf16()) {
                run_tile_avx512<scalar_t, out_t, MicroTraits<BFloat16, true>>(p, t, buf, next_p, next);
              } else {
                run_tile_avx512<scalar_t, out_t, MicroTraits<BFloat16, false>>(p, t, buf, next_p, next);
              }
            } else {
              run_tile_avx512<scalar_t, out_t, MicroTraits<scalar_t>>(p, t, buf, next_p, next);
            }
          }
#endif
        }
      }
    }
  });
}

template <typename scalar_t, typename out_t>
void grouped_mm_typed(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs,
                      const std::optional<Tensor>& bias, const std::optional<Tensor>& a_index,
                      const std::optional<Tensor>& b_index, const Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);

  // Bias is tiny (G x N): widen it once so the epilogue adds in acc_t.
  Tensor bias_acc;
  if (bias.has_value()) {
    bias_acc = bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  }
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const int64_t n_out = out.size(-1);

  const scalar_t* a = mat_a.const_data_ptr<scalar_t>();
  const scalar_t* b = mat_b.const_data_ptr<scalar_t>();
  out_t* c = out.data_ptr<out_t>();
  const int64_t a_rs = mat_a.stride(-2), a_cs = mat_a.stride(-1);
  const int64_t b_rs = mat_b.stride(-2), b_cs = mat_b.stride(-1);
  const int64_t c_rs = out.stride(-2);
  const int32_t* off = offs.has_value() ? offs->const_data_ptr<int32_t>() : nullptr;
  const int64_t off_stride = offs.has_value() ? offs->stride(0) : 0;
  const int64_t* a_idx = a_index.has_value() ? a_index->const_data_ptr<int64_t>() : nullptr;
  const int64_t* b_idx = b_index.has_value() ? b_index->const_data_ptr<int64_t>() : nullptr;

  std::vector<Problem<scalar_t, out_t, acc_t>> problems;
  problems.reserve(groups);
  int64_t start = 0;
  for (const auto g : c10::irange(groups)) {
    const int64_t end = off != nullptr ? off[g * off_stride] : 0;
    Problem<scalar_t, out_t, acc_t> p{};
    p.a_rs = a_rs; p.a_cs = a_cs; p.b_rs = b_rs; p.b_cs = b_cs; p.c_rs = c_rs;
    p.bias = bias_ptr != nullptr ? bias_ptr + g * n_out : nullptr;
    switch (layout) {
      case GroupedMMLayout::k2d3d:  // rows [start, end) of A and out, expert g of B
        p.m = end - start; p.n = mat_b.size(2); p.k = mat_a.size(1);
        p.a = a_idx != nullptr ? a : a + start * a_rs;
        p.a_row_idx = a_idx != nullptr ? a_idx + start : nullptr;
        p.b = b + g * mat_b.stride(0);
        p.c = c + start * c_rs;
        break;
      case GroupedMMLayout::k3d2d:  // columns [start, end) of B and out
        p.m = mat_a.size(1); p.n = end - start; p.k = mat_a.size(2);
        p.a = a + g * mat_a.stride(0);
        p.b = b + start * b_cs;
        p.c = c + start;
        if (p.bias != nullptr) p.bias += start;
        break;
      case GroupedMMLayout::k2d2d:  // contraction slice [start, end)
        p.m = mat_a.size(0); p.n = mat_b.size(1); p.k = end - start;
        p.a = a_idx != nullptr ? a : a + start * a_cs;
        p.a_col_idx = a_idx != nullptr ? a_idx + start : nullptr;
        p.b = b_idx != nullptr ? b : b + start * b_rs;
        p.b_idx = b_idx != nullptr ? b_idx + start : nullptr;
        p.c = c + g * out.stride(0);
        break;
      case GroupedMMLayout::k3d3d:
        p.m = mat_a.size(1); p.n = mat_b.size(2); p.k = mat_a.size(2);
        p.a = a + g * mat_a.stride(0);
        p.b = b + g * mat_b.stride(0);
        p.c = c + g * out.stride(0);
        break;
    }
    problems.push_back(p);
    start = end;
  }
  run_problems(problems, bias_ptr != nullptr, a_idx != nullptr || b_idx != nullptr);
}

void grouped_mm_kernel(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs,
                       const std::optional<Tensor>& bias, const std::optional<Tensor>& a_index,
                       const std::optional<Tensor>& b_index, const Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.stride(-1) == 1 || out.size(-1) <= 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, mat_a.scalar_type(), "grouped_mm_cpu", [&] {
    if (out.scalar_type() == mat_a.scalar_type()) {
      grouped_mm_typed<scalar_t, scalar_t>(mat_a, mat_b, offs, bias, a_index, b_index, out);
    } else {
      TORCH_INTERNAL_ASSERT(out.scalar_type() == kFloat);
      if constexpr (!std::is_same_v<scalar_t, double>) {
        grouped_mm_typed<scalar_t, float>(mat_a, mat_b, offs, bias, a_index, b_index, out);
      }
    }
  });
}

} // namespace

// Every capability's build registers its copy; the AVX512 one has the
// AVX-512 engine (plain REGISTER_DISPATCH would leave that slot empty).
ALSO_REGISTER_AVX512_DISPATCH(grouped_mm_stub, &grouped_mm_kernel)

} // namespace at::native

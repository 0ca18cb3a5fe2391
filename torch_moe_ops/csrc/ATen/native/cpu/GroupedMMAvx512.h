#pragma once

// The AVX-512 engine of the CPU grouped mm kernel (cpu/GroupedMMKernel.cpp,
// which includes this header in its CPU_CAPABILITY_AVX512 build only; see
// GroupedMMKernelUtils.h for why the definitions have internal linkage). For
// float32, float16 and bfloat16, except groups of hundreds of rows where
// MKL / oneDNN are faster (float32 on Intel cores; bfloat16 on CPUs with
// AVX512_BF16 unless A and B are both row-major): micro-kernels that read the
// expert weights straight from the caller's memory, one cache-sized block at
// a time, so streaming the weights from DRAM overlaps the arithmetic instead
// of preceding it. bfloat16 runs as K pairs through vdpbf16ps where the CPU
// has AVX512_BF16, widened to float32 where it has not (GroupedMMAvx512BF16.h).

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/native/cpu/GroupedMMKernelUtils.h>
#include <ATen/native/cpu/MoEAvx512Utils.h>

#include <cpuinfo.h>
#include <immintrin.h>

namespace at::native {
namespace {

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
// While a block is in use, the micro-kernels prefetch the block after next
// into L2 (past a tile's last blocks: the next tile's first), a row every few
// K steps over all the row blocks, so the DRAM stream overlaps the FMAs and
// the lines have landed before the pack reads them (at 32 rows per expert
// this moved the bf16 kernel from ~305 to ~325 GFLOP/s; two blocks ahead
// instead of one, Zen 5, vdpbf16ps: 650-665 to 725-740).
//
// Micro-kernel: C[MR x 64] in 4 x MR zmm accumulators, A broadcast one element
// (float32) or one K pair (bfloat16) at a time from rows read in place when A
// has unit column stride and the compute type (otherwise from a packed copy of
// the A block). Accumulation is float32 in K order; a K block boundary spills
// the accumulators to a float32 buffer, which does not change any rounding,
// so the bits depend only on K and never on the tiling or thread count.
// Every loop over a micro-kernel's accumulators (r[MR][4]) is unrolled in
// full, so that each accumulator is a register. With one loop left rolled
// (finish_acc's rows, whose body GCC 12 judged too large to peel), r needed an
// address, and GCC kept it in a stack copy that it stored and reloaded around
// every K loop: on short K blocks (a weight gradient's 32 routed rows) that
// cost as much as half the FMAs. `#pragma GCC unroll` is GCC's and Clang's.
#if defined(__GNUC__)
#define GROUPED_MM_UNROLL _Pragma("GCC unroll 8")
#else
#define GROUPED_MM_UNROLL
#endif

constexpr int64_t kMR = 6;
// Rows of a first row block that decodes float8 weights among its FMAs: at 6,
// its decoder's constants cost 18 zmm stack moves a K pair (GCC 12).
constexpr int64_t kFloat8DecodeMR = 3;
constexpr int64_t kNR = 64;
// Rows of a group processed against one weight block: bounds the float32
// accumulator buffer (kMC x kMicroNB) and the packed A block.
constexpr int64_t kMC = 192;
// Output columns per tile (the unit of work balanced across threads).
constexpr int64_t kMicroNB = 256;

// What the CPU has, read once. GCC and Clang read CPUID (and XCR0) themselves:
// an extension's cpuinfo_* symbols may bind to a copy of cpuinfo that reports
// no ISA at all (torch 2.14.1 wheels: libc10's copy, where
// cpuinfo_has_x86_avx512f() is false on AVX-512 CPUs), which kept the
// vdpbf16ps kernels from ever running. cpuinfo where the builtins are missing.
bool cpu_has_avx512_bf16() {
#if defined(__GNUC__)
  static const bool ok = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));
#else
  static const bool ok = cpuinfo_initialize() && cpuinfo_has_x86_avx512bf16();
#endif
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

// The lanes m of x, rounded once to out_t, stored at o.
template <typename out_t>
inline void store_lanes(out_t* o, __mmask16 m, __m512 x) {
  if constexpr (std::is_same_v<out_t, float>) {
    _mm512_mask_storeu_ps(o, m, x);
  } else if constexpr (std::is_same_v<out_t, BFloat16>) {
    _mm256_mask_storeu_epi16(o, m, moe_cvt_f32_bf16(x));
  } else {
    _mm256_mask_storeu_epi16(o, m, _mm512_maskz_cvtps_ph(kAll16, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Epilogue of one output row: (acc + bias), rounded once to out_t, w columns.
template <typename out_t>
C10_ALWAYS_INLINE void store_out_row(out_t* o, const __m512* v, const float* bias, int64_t w) {
  GROUPED_MM_UNROLL
  for (int j = 0; j < 4; ++j) {
    const __mmask16 m = moe_lanes16(w, 16 * j);
    __m512 x = v[j];
    if (bias != nullptr) {
      x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + 16 * j));
    }
    store_lanes(o + 16 * j, m, x);
  }
}

// Output types the epilogue can stream (stream_out_row).
template <typename out_t>
constexpr bool kStreamable = std::is_same_v<out_t, float> || std::is_same_v<out_t, BFloat16>;

// The output of a group whose K is its smallest dimension (a weight
// gradient's expert: a few dozen routed rows of K, a whole weight's worth of
// output) is not read back before it has left the cache, and a plain store
// first reads the line it writes (read-for-ownership), so every output line
// crossed the memory bus twice. Such a group's tiles that write at least this
// much send their rows to memory with streaming stores. Zen 5, 2 threads:
// float32 weight gradients of routed experts (2D x 2D, 32 to 96 rows per
// expert, 1.1-1.9 GB of output), 1 MB tiles: 8-13% less time; bfloat16 ones
// of Qwen3's down_proj (tiles 1024 x 384, 768 KB) streamed from 128 KB:
// 14.2 -> 12.7 ms; those with tiles of 1 MB and more within 2%.
constexpr int64_t kStreamTileBytes = int64_t{128} << 10;

// store_out_row's values for a full 64-column row at a 64-byte boundary,
// written with streaming stores (the tile driver fences them: run_tile_avx512).
// Always inlined (finish_acc): GCC kept it out of line, and the bfloat16
// kernels' accumulators went through the stack to reach it (Zen 4, bfloat16
// weight gradients, 48 rows per expert, 1 thread: 267 -> 245 ms).
template <typename out_t>
C10_ALWAYS_INLINE void stream_out_row(out_t* o, const __m512* v, const float* bias) {
  __m512 x[4];
  GROUPED_MM_UNROLL
  for (int j = 0; j < 4; ++j) {
    x[j] = bias != nullptr ? _mm512_add_ps(v[j], _mm512_loadu_ps(bias + 16 * j)) : v[j];
  }
  if constexpr (std::is_same_v<out_t, float>) {
    GROUPED_MM_UNROLL
    for (int j = 0; j < 4; ++j) _mm512_stream_ps(o + 16 * j, x[j]);
  } else {  // bfloat16: two rounded halves make one 64-byte line
    GROUPED_MM_UNROLL
    for (int j = 0; j < 4; j += 2) {
      const __m512i line =
          _mm512_inserti64x4(_mm512_castsi256_si512(moe_cvt_f32_bf16(x[j])), moe_cvt_f32_bf16(x[j + 1]), 1);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(o + 16 * j), line);
    }
  }
}

// Accumulators of MR rows: start from zero (first K block) or from acc, and
// end in acc (more K blocks follow) or in the output (last K block).
struct MicroArgs {
  int64_t kc; // K extent of this block
  // Row blocks of MR rows the call runs, one after the other (c, acc and
  // row_scale step MR rows each): the bfloat16 K-pair kernel's only, whose
  // entry and exit cost as much as a few dozen K pairs, the K of a weight
  // gradient's expert.
  int64_t blocks = 1;
  // Elements between consecutive K (float32) or K pairs (bfloat16) of an A
  // row: 1 / 2 for rows laid out along K, the packed width for K-major A.
  int64_t a_step;
  float* acc; // MR x 64 float32, leading dimension ld_acc
  int64_t ld_acc;
  bool first, last;
  // With last: rows of all 64 columns at a 64-byte boundary are streamed
  // (kStreamTileBytes).
  bool stream = false;
  void* c; // output rows, leading dimension ldc (elements)
  int64_t ldc;
  const float* bias; // nullptr or the 64 columns' bias
  // nullptr, or the MR rows' and the 64 columns' scales (Problem::row_scale).
  const float* row_scale = nullptr;
  const float* col_scale = nullptr;
  int64_t w; // valid output columns (<= 64)
  Prefetch pf;
  int64_t pf_begin, pf_end; // rows of pf this call prefetches
  // bfloat16 K pairs only: when src is set, the weight block is not packed
  // yet, and the kernel packs it into dst (the b it multiplies by) from the
  // weight rows at src (rs elements apart, unit column stride) as it goes,
  // for the row blocks after it.
  // src8: the same from float8 codes (Problem::b8) of format e5m2.
  struct {
    const BFloat16* src = nullptr;
    int64_t rs = 0;
    uint32_t* dst = nullptr;
    const uint8_t* src8 = nullptr;
    bool e5m2 = false;
  } pack_b;
};

template <int MR>
inline void load_acc(__m512 (&r)[MR][4], const MicroArgs& x) {
  GROUPED_MM_UNROLL
  for (int i = 0; i < MR; ++i) {
    GROUPED_MM_UNROLL
    for (int j = 0; j < 4; ++j) {
      r[i][j] = x.first ? _mm512_setzero_ps() : _mm512_loadu_ps(x.acc + i * x.ld_acc + 16 * j);
    }
  }
}

// Always inlined, as are the row stores it calls: a call out of line takes
// the accumulators through the stack, a cost per micro-kernel call that
// shows on short K blocks.
template <int MR, typename out_t>
C10_ALWAYS_INLINE void finish_acc(__m512 (&r)[MR][4], const MicroArgs& x) {
  if (x.last && x.row_scale != nullptr) {
    __m512 cs[4];
    GROUPED_MM_UNROLL
    for (int j = 0; j < 4; ++j) cs[j] = _mm512_maskz_loadu_ps(moe_lanes16(x.w, 16 * j), x.col_scale + 16 * j);
    GROUPED_MM_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m512 rs = _mm512_set1_ps(x.row_scale[i]);
      GROUPED_MM_UNROLL
      for (int j = 0; j < 4; ++j) r[i][j] = _mm512_mul_ps(_mm512_mul_ps(r[i][j], rs), cs[j]);
    }
  }
  GROUPED_MM_UNROLL
  for (int i = 0; i < MR; ++i) {
    if (x.last) {
      out_t* o = static_cast<out_t*>(x.c) + i * x.ldc;
      if constexpr (kStreamable<out_t>) {
        if (x.stream && x.w == kNR && reinterpret_cast<uintptr_t>(o) % 64 == 0) {
          stream_out_row<out_t>(o, r[i], x.bias);
          continue;
        }
      }
      store_out_row<out_t>(o, r[i], x.bias, x.w);
    } else {
      GROUPED_MM_UNROLL
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
    GROUPED_MM_UNROLL
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

// Row k of a B block: src + k * rs, or with a row index (grouped_mm_stub's b_index)
// src + rows[k] * rs, nullptr for a zero row.
template <typename T>
inline const T* b_row(const T* src, int64_t rs, const int64_t* rows, int64_t k) {
  if (rows == nullptr) return src + k * rs;
  return rows[k] < 0 ? nullptr : src + rows[k] * rs;
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
// (kPairs: GroupedMMAvx512BF16.h specialises these traits with the pair
// kernels, which the tile driver calls through them), else widened to
// float32 like float16: exact, at float32 speed, which on such CPUs is
// several times oneDNN's bfloat16 matmul.
template <typename scalar_t, bool kPairs = false>
struct MicroTraits {
  using a_t = float;
  using b_t = float;
  static constexpr int64_t kKC = 128;
};

// Calls f(MicroTraits<scalar_t, ...>{}) with the traits scalar_t runs with on
// this CPU (GroupedMMAvx512BF16.h chooses for bfloat16).
template <typename scalar_t>
struct MicroTraitsFor {
  template <typename F>
  static void visit(F&& f) {
    f(MicroTraits<scalar_t>{});
  }
};

template <typename Traits>
constexpr bool kPairsOf = std::is_same_v<typename Traits::b_t, uint32_t>;

template <typename Traits, typename out_t, int MR>
void call_micro(const typename Traits::a_t* const* a, const typename Traits::b_t* b, const MicroArgs& x) {
  if constexpr (kPairsOf<Traits>) {
    Traits::template micro<MR, out_t>(a, b, x);
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
  int64_t kc = 0;
  MicroTraitsFor<scalar_t>::visit([&](auto traits) { kc = decltype(traits)::kKC; });
  return kc;
}

// Rows [m0, m0 + mc) of a turned problem's tile (Problem::c_transposed) from
// the accumulator buffer (row r at acc + (r - m0) * ld_acc) to the output's
// columns: 16 x 16 blocks transposed in registers, rounded once to out_t, so
// each output row gets whole vectors rather than a scatter of single
// elements, whose column-strided lines (a multiple of 4 KB apart) thrash L1.
template <typename scalar_t, typename out_t>
void store_acc_transposed(const Problem<scalar_t, out_t, float>& p, const Tile& t, const float* acc, int64_t ld_acc,
                          int64_t m0, int64_t mc) {
  for (int64_t r0 = 0; r0 < mc; r0 += 16) {
    const __mmask16 lanes = moe_lanes16(mc, r0);
    for (int64_t j0 = 0; j0 < t.nb; j0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i) {
        v[i] = r0 + i < mc ? _mm512_loadu_si512(acc + (r0 + i) * ld_acc + j0) : _mm512_setzero_si512();
      }
      transpose_16x16_epi32(v);
      for (int64_t q = 0; q < std::min<int64_t>(16, t.nb - j0); ++q) {
        store_lanes(p.c + (t.n0 + j0 + q) * p.c_rs + m0 + r0, lanes, _mm512_castsi512_ps(v[q]));
      }
    }
  }
}

// Weight blocks ahead of the one in use that the broadcast engine prefetches:
// with one, spread over the first half of the row blocks, the lines still
// arrived late (Zen 5, bfloat16, 32 rows per expert, weights streamed from
// DRAM: 650-665 GFLOP/s with one, 725-740 with two, 770-800 from cache).
constexpr int64_t kPrefetchBlocksAhead = 2;

// Block i of tile t in the order the broadcast engine uses its weights (the
// tile's 64-column strips K block by K block) as rows to prefetch; none past
// the tile's last block.
template <typename scalar_t, typename P>
Prefetch weight_block(const P& p, const Tile& t, int64_t i, int64_t kc_max) {
  Prefetch pf;
  const int64_t strips = (t.nb + kNR - 1) / kNR;
  const int64_t k0 = i / strips * kc_max, j0 = t.n0 + i % strips * kNR;
  if (p.k <= 0 || k0 >= p.k) return pf;
  pf.base = reinterpret_cast<const char*>(p.b + k0 * p.b_rs + j0);
  pf.stride = p.b_rs * static_cast<int64_t>(sizeof(scalar_t));
  pf.rows = std::min(kc_max, p.k - k0);
  pf.bytes = std::min(kNR, t.n0 + t.nb - j0) * static_cast<int64_t>(sizeof(scalar_t));
  return pf;
}

// Float8 weights (Problem::b8): their packing and prefetch, in GroupedMMFloat8Weights.h.
void pack_b_fp8_pairs(uint32_t* dst, const uint8_t* src, int64_t rs, int64_t cs, int64_t kc, int64_t w,
                      bool e5m2);
template <typename P>
Prefetch float8_weight_block(const P& p, const Tile& t, int64_t i, int64_t kc_max);

// Whether the broadcast engine prefetches p's weight blocks: unit-stride
// rows in order, or float8 codes stored either way.
template <typename P>
bool weights_prefetched(const P& p) {
  return p.b_idx == nullptr && (p.b_cs == 1 || (p.b8 != nullptr && p.b_rs == 1));
}

// One tile: all rows of the problem x columns [n0, n0 + nb), nb <= kMicroNB
// unless K fits one block (then no accumulator buffer is needed).
// Loop order per kMC rows: K blocks, then 64-column weight blocks, then MR-row
// blocks, so each weight block is packed once and reused by every row block.
// next: the tile this thread runs after t (nullptr if none), whose first
// weight blocks are prefetched while t's last ones are in use: with a few
// dozen rows per expert a tile is short, and a cold first block stalls its pack.
template <typename scalar_t, typename out_t, typename Traits>
void run_tile_avx512(const Problem<scalar_t, out_t, float>& p, const Tile& t, ThreadBuffers& buf,
                     const Problem<scalar_t, out_t, float>* next_p, const Tile* next) {
  using a_t = typename Traits::a_t;
  using b_t = typename Traits::b_t;
  constexpr int64_t kKC = Traits::kKC;
  if constexpr (!kPairsOf<Traits>) {
    TORCH_INTERNAL_ASSERT(p.b8 == nullptr, "float8 weights need the bfloat16 K-pair kernels");
  }
  constexpr int64_t kBRows = std::is_same_v<b_t, uint32_t> ? kKC / 2 : kKC;
  const int64_t k = p.k;
  const int64_t strips = (t.nb + kNR - 1) / kNR;
  b_t* bpack = workspace<b_t>(buf.b, kBRows * kNR);
  // A turned problem's tile ends in the accumulator buffer too, then goes to
  // the output's columns 16 x 16 at a time (store_acc_transposed).
  float* acc = k > kKC || p.c_transposed ? workspace<float>(buf.acc, kMC * strips * kNR) : nullptr;
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
  const bool b_prefetch = weights_prefetched(p);
  const bool stream = kStreamable<out_t> && !p.c_transposed && p.k <= std::min(p.m, p.n) &&
      p.m * t.nb * static_cast<int64_t>(sizeof(out_t)) >= kStreamTileBytes;

  for (int64_t m0 = 0; m0 < p.m; m0 += kMC) {
    const int64_t mc = std::min(kMC, p.m - m0);
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
          Traits::pack_pairs(w, ldw, base, p.a_cs, cols, kc, mc);
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
        const scalar_t* b_blk = p.b8 != nullptr ? nullptr : p.b + (b_rows != nullptr ? 0 : k0 * p.b_rs) + j0 * p.b_cs;
        // Unit-stride bfloat16 rows in order are packed by the first row
        // block's kernel (MicroArgs::pack_b), its loads and shuffles among
        // its FMAs: a separate pass took 9-11% of a 32-row tile (Zen 5).
        // So are float8 weights stored (K, N) (GroupedMMFloat8Weights.h).
        const bool pack_in_kernel = kPairsOf<Traits> && p.b_cs == 1 && b_rows == nullptr && w == kNR;
        const uint8_t* b8_blk = p.b8 != nullptr ? p.b8 + k0 * p.b_rs + j0 * p.b_cs : nullptr;
        if constexpr (kPairsOf<Traits>) {
          if (!pack_in_kernel && b8_blk != nullptr) {
            pack_b_fp8_pairs(bpack, b8_blk, p.b_rs, p.b_cs, kc, w, p.b8_e5m2);
          } else if (!pack_in_kernel) {
            Traits::pack_b(bpack, b_blk, p.b_rs, p.b_cs, kc, w, b_rows);
          }
        } else {
          pack_b_f32(bpack, b_blk, p.b_rs, p.b_cs, kc, w, b_rows);
        }
        // The weight block two ahead in this thread's order (this tile's
        // strips, K block by K block, then the next tile's), pulled into L2
        // over all the row blocks: a full block's time for its lines to land.
        Prefetch pf;
        if (b_prefetch) {
          const int64_t ahead = k0 / kKC * strips + s + kPrefetchBlocksAhead;
          const int64_t blocks = (k + kKC - 1) / kKC * strips;
          const auto block = [&](const auto& q, const Tile& u, int64_t i) {
            return q.b8 != nullptr ? float8_weight_block(q, u, i, kKC) : weight_block<scalar_t>(q, u, i, kKC);
          };
          if (ahead < blocks) {
            pf = block(p, t, ahead);
          } else if (next != nullptr && m0 + kMC >= p.m && weights_prefetched(*next_p)) {
            pf = block(*next_p, *next, ahead - blocks);
          }
        }
        MicroArgs x;
        x.kc = kc;
        x.a_step = a_step;
        x.ld_acc = ld_acc;
        x.first = k0 == 0;
        x.last = k0 + kc == k && !p.c_transposed;
        x.stream = stream;
        x.ldc = p.c_rs;
        x.bias = p.bias != nullptr ? p.bias + j0 : nullptr;
        x.col_scale = p.col_scale != nullptr ? p.col_scale + j0 : nullptr;
        x.w = w;
        x.pf = pf;
        const int64_t first_mr = std::min(pack_in_kernel && b8_blk != nullptr ? kFloat8DecodeMR : kMR, mc);
        const int64_t m_blocks = 1 + (mc - first_mr + kMR - 1) / kMR;
        for (int64_t mb = 0; mb < m_blocks; ++mb) {
          const int64_t r0 = mb == 0 ? 0 : first_mr + (mb - 1) * kMR;
          const int64_t mr = mb == 0 ? first_mr : std::min(kMR, mc - r0);
          x.acc = acc != nullptr ? acc + r0 * ld_acc + s * kNR : nullptr;
          x.c = p.c + (m0 + r0) * p.c_rs + j0;
          x.row_scale = p.row_scale != nullptr ? p.row_scale + m0 + r0 : nullptr;
          x.pf_begin = pf.rows * mb / m_blocks;
          x.pf_end = pf.rows * (mb + 1) / m_blocks;
          if constexpr (kPairsOf<Traits>) {
            x.pack_b.src = pack_in_kernel && mb == 0 ? b_blk : nullptr;
            x.pack_b.src8 = pack_in_kernel && mb == 0 ? b8_blk : nullptr;
            x.pack_b.e5m2 = p.b8_e5m2;
            x.pack_b.rs = p.b_rs;
            x.pack_b.dst = bpack;
          }
          // The bfloat16 K-pair kernel runs the full row blocks after the
          // first (which packs the weight block) in one call. With its
          // vcvtne2ps2bf16 rounding, Zen 4, 2 threads, bench_grouped_mm's
          // Qwen3 2d2d `kn` row: 167 -> 148-154 ms (oneDNN's loop: 147-154).
          x.blocks = kPairsOf<Traits> && mb > 0 && mr == kMR ? (mc - r0) / kMR : 1;
          x.pf_end = pf.rows * (mb + x.blocks) / m_blocks;
          dispatch_micro<Traits, out_t>(mr, a_rows + r0, bpack, x);
          mb += x.blocks - 1;
        }
      }
    }
    if (p.c_transposed) store_acc_transposed(p, t, acc, ld_acc, m0, mc);
  }
  // Streaming stores are weakly ordered: visible before the tile counts as done.
  if (stream) _mm_sfence();
}

// What run_tile_avx512 takes from the thread's scratch for t.
template <typename scalar_t, typename out_t>
void avx512_scratch(const Problem<scalar_t, out_t, float>& p, const Tile& t, ScratchBytes& s) {
  const int64_t k = p.k;
  const auto need = [&](auto traits) {
    using Traits = decltype(traits);
    constexpr int64_t kKC = Traits::kKC;
    constexpr int64_t kBRows = kPairsOf<Traits> ? kKC / 2 : kKC;
    const int64_t strips = (t.nb + kNR - 1) / kNR;
    // A block: at most kMC rows (padded to 32) x kKC (+1 for pairs) 4-byte words.
    s.at_least(kMC * (kKC + 32) * 4, kBRows * kNR * static_cast<int64_t>(sizeof(typename Traits::b_t)),
               k > kKC || p.c_transposed ? kMC * strips * kNR * 4 : 0);
  };
  MicroTraitsFor<scalar_t>::visit(need);
}

} // namespace
} // namespace at::native

#endif // CPU_CAPABILITY_AVX512

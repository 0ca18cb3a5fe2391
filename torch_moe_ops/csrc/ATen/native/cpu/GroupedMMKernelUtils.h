#pragma once

// What the engines of the CPU grouped mm kernel (cpu/GroupedMMKernel.cpp)
// share: the problem and tile descriptions, the per-thread scratch, block
// copies, the epilogue and a Vectorized<T> GEMM. Included only by that file
// and the engine headers it includes, so these have internal linkage and are
// compiled, once per CPU capability, into the one translation unit that uses
// them, exactly as if they were written there.

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

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
  // C^T stored instead: element (r, j) at c + j * c_rs + r (a 3D x 2D group
  // turned around, turn_3d2d_groups; the transposed-tile, broadcast and
  // inner-product engines take such a problem).
  bool c_transposed = false;
  const acc_t* bias; // nullptr or n contiguous values
  // With indices (grouped_mm_stub's a_index / b_index): row r of A is at
  // a + a_row_idx[r] * a_rs, column k of A at a + a_col_idx[k] * a_cs, row k
  // of B at b + b_idx[k] * b_rs; an index of -1 reads zeros.
  const int64_t* a_row_idx = nullptr;
  const int64_t* a_col_idx = nullptr;
  const int64_t* b_idx = nullptr;
  // Float8 weights (scaled_grouped_mm's rowwise recipe): B's elements are the
  // float8 codes at b8 (b is null; b_rs / b_cs count codes), which the
  // bfloat16 broadcast engine decodes as it packs them
  // (GroupedMMFloat8Weights.h); no other engine takes such a problem.
  const uint8_t* b8 = nullptr;
  bool b8_e5m2 = false;
  // With b8, rowwise scales (or nullptr): C[m, n] = round((acc[m, n] *
  // row_scale[m]) * col_scale[n] + bias[n]), the scaled grouped mm's epilogue
  // in the broadcast engine's.
  const float* row_scale = nullptr;
  const float* col_scale = nullptr;
  bool a_gathered() const { return a_row_idx != nullptr || a_col_idx != nullptr; }
  // Element (r, j) of the result at c + r * c_row_stride() + j * c_col_stride().
  int64_t c_row_stride() const { return c_transposed ? 1 : c_rs; }
  int64_t c_col_stride() const { return c_transposed ? c_rs : 1; }
};

// p as C^T = B^T A^T (no bias, no indices): B's columns become the rows,
// A's rows the columns.
template <typename P>
P turned(const P& p) {
  P q = p;
  q.m = p.n;
  q.n = p.m;
  q.a = p.b;
  q.a_rs = p.b_cs;
  q.a_cs = p.b_rs;
  q.b = p.a;
  q.b_rs = p.a_cs;
  q.b_cs = p.a_rs;
  q.c_transposed = !p.c_transposed;
  return q;
}

struct Tile {
  int64_t problem;
  int64_t n0;
  int64_t nb;
  double cost;
};

// The threads' runs of tiles ([bounds[c], bounds[c + 1]) for chunk c), each
// claimed one tile at a time: by its own thread from the front, in order, and
// by a thread whose runs are done from the back. The runs are cut at equal
// shares of an estimated cost; claiming evens out what the estimate gets
// wrong and a core the machine takes away in the middle of a call. A tile is
// computed whole by whichever thread claims it, with that thread's scratch,
// so the bits do not depend on who runs it. A run's unclaimed range lives in
// one word (front << 32 | back) so that a claim is one compare-and-swap.
class TileRuns {
 public:
  explicit TileRuns(const std::vector<int64_t>& bounds) : bounds_(bounds), runs_(bounds.size() - 1) {
    TORCH_INTERNAL_ASSERT(bounds.back() < (int64_t{1} << 32), "grouped_mm: too many tiles: ", bounds.back());
    for (const auto c : c10::irange(runs_.size())) {
      runs_[c].store(static_cast<uint64_t>(bounds[c]) << 32 | static_cast<uint64_t>(bounds[c + 1]),
                     std::memory_order_relaxed);
    }
  }
  // The next tile of chunk c from the front into i; false when none is left.
  bool claim_front(int64_t c, int64_t& i) { return claim(c, i, true); }
  // The last tile of chunk c still unclaimed into i; false when none is left.
  bool claim_back(int64_t c, int64_t& i) { return claim(c, i, false); }
  // The tile of run c that a thread which claimed i there (from the front
  // when own) is likely to run next, for the engines' prefetch: a hint only.
  template <typename T>
  const T* next(const std::vector<T>& tiles, int64_t c, int64_t i, bool own) const {
    const int64_t j = own ? i + 1 : i - 1;
    return j >= bounds_[c] && j < bounds_[c + 1] ? &tiles[j] : nullptr;
  }

 private:
  bool claim(int64_t c, int64_t& i, bool front) {
    std::atomic<uint64_t>& run = runs_[c];
    uint64_t v = run.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = v >> 32, b = v & 0xffffffffu;
      if (f >= b) return false;
      const uint64_t claimed = front ? (f + 1) << 32 | b : f << 32 | (b - 1);
      if (run.compare_exchange_weak(v, claimed, std::memory_order_relaxed)) {
        i = static_cast<int64_t>(front ? f : b - 1);
        return true;
      }
    }
  }
  std::vector<int64_t> bounds_;
  std::vector<std::atomic<uint64_t>> runs_;
};

// Widening engine: tiles of 256 columns, row blocks of 128 rows.
constexpr int64_t kWideNB = 256;
constexpr int64_t kWideMB = 128;
// Its K blocks: a 128-row A block of 1 KB rows (128 KB) stays in L2, a B
// panel (kc x 2 vectors, 16 KB of float32) in L1.
template <typename T>
constexpr int64_t kWideKC = 1024 / static_cast<int64_t>(sizeof(T));
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
  // One thread's slice of the call's scratch, each region 64-byte aligned.
  static int64_t aligned(int64_t bytes) {
    return (bytes + 63) / 64 * 64;
  }
  int64_t slice() const {
    return aligned(a) + aligned(b) + aligned(acc);
  }
  ThreadBuffers regions(char* base) const {
    ThreadBuffers buf;
    buf.a = {base, a};
    buf.b = {base + aligned(a), b};
    buf.acc = {base + aligned(a) + aligned(b), acc};
    return buf;
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
      if constexpr (std::is_same_v<dst_t, float> && std::is_same_v<src_t, float>) {
        // Whole blocks in registers (AVX2: four 8 x 8 shuffles): the scalar
        // loop cost as much as the product of a weight block over 48 rows.
        if (c1 - c0 == kB && r1 - r0 == kB) {
          vec::transpose_mxn<float, kB, kB>(src + c0 * cs + r0, cs, dst + r0 * ld + c0, ld);
          continue;
        }
      }
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

// A (kc x nb) block of a problem's B at row k0 and column n0, packed as
// ceil(nb / kW) panels of kc rows x kW columns (panel j at dst + j * kc * kW,
// columns past nb zero), gathered or strided, converted to dst_t. Packed
// from the caller's memory K block by K block, so no copy of a whole weight
// tile is made; a row-major B is copied row by row, each row's nb elements
// read in one sequential run (copied panel by panel, the rows of (G, K, N)
// weights are 64-byte pieces 2-12 KB apart, which the prefetchers and L1's
// sets served badly), a column-major one panel by panel, transposed.
template <int64_t kW, typename dst_t, typename P>
void load_b_panels(dst_t* dst, const P& p, int64_t k0, int64_t kc, int64_t n0, int64_t nb) {
  using src_t = std::remove_const_t<std::remove_pointer_t<decltype(P::b)>>;
  const src_t* b = p.b + n0 * p.b_cs;
  if (p.b_cs != 1) {
    for (int64_t j0 = 0; j0 < nb; j0 += kW) {
      const int64_t w = std::min(kW, nb - j0);
      if (p.b_idx != nullptr) {
        gather_rows(dst + j0 * kc, kW, b + j0 * p.b_cs, p.b_idx + k0, p.b_rs, p.b_cs, kc, w, kW);
      } else {
        gather_block(dst + j0 * kc, kW, b + j0 * p.b_cs + k0 * p.b_rs, p.b_rs, p.b_cs, kc, w, kW);
      }
    }
    return;
  }
  for (int64_t l = 0; l < kc; ++l) {
    const int64_t row = p.b_idx != nullptr ? p.b_idx[k0 + l] : k0 + l;
    const src_t* s = row < 0 ? nullptr : b + row * p.b_rs;
    for (int64_t j0 = 0; j0 < nb; j0 += kW) {
      dst_t* d = dst + j0 * kc + l * kW;
      const int64_t w = std::min(kW, nb - j0);
      if (s == nullptr) {
        std::fill(d, d + kW, dst_t(0));
        continue;
      }
      if constexpr (std::is_same_v<dst_t, src_t>) {
        std::memcpy(d, s + j0, sizeof(dst_t) * w);
      } else {
        for (int64_t j = 0; j < w; ++j) d[j] = static_cast<dst_t>(s[j0 + j]);
      }
      std::fill(d + w, d + kW, dst_t(0));
    }
  }
}

// The cache lines a B block (load_b_panels) will read: `count` lines in runs
// of `run` consecutive lines, `stride` bytes apart (a row of (G, K, N)
// weights, a column of (G, N, K) ones). The widening engine fetches the next
// block's into L2 while it computes on this one: each expert's weights are
// read from memory once per call, and the copy would otherwise wait for them.
struct LinePrefetch {
  const char* base = nullptr;
  int64_t stride = 0, run = 1, count = 0;
  // Lines [begin, end) of the block.
  void issue(int64_t begin, int64_t end) const {
#if defined(__GNUC__)
    // One division per call, not per line: this runs between register tiles.
    int64_t r = begin / run, l = begin % run;
    for (int64_t i = begin; i < end; ++i) {
      __builtin_prefetch(base + r * stride + l * 64, 0, 2);
      if (++l == run) l = 0, ++r;
    }
#endif
  }
};

template <typename P>
LinePrefetch b_block_lines(const P& p, int64_t k0, int64_t kc, int64_t n0, int64_t nb) {
  using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(P::b)>>;
  constexpr int64_t e = sizeof(scalar_t);
  LinePrefetch pf;
  if (kc <= 0 || nb <= 0) return pf;
  if (p.b_idx != nullptr) return pf;  // gathered rows: not worth the bookkeeping
  const scalar_t* b = p.b + k0 * p.b_rs + n0 * p.b_cs;
  pf.base = reinterpret_cast<const char*>(b) - reinterpret_cast<uintptr_t>(b) % 64;
  // Runs of n bytes span ceil(n / 64) lines when every run starts on a line,
  // one more otherwise.
  const bool aligned = reinterpret_cast<uintptr_t>(b) % 64 == 0;
  if (p.b_cs == 1) {
    pf.stride = p.b_rs * e;
    pf.run = (nb * e + 63) / 64 + (aligned && pf.stride % 64 == 0 ? 0 : 1);
    pf.count = kc * pf.run;
  } else if (p.b_rs == 1) {
    pf.stride = p.b_cs * e;
    pf.run = (kc * e + 63) / 64 + (aligned && pf.stride % 64 == 0 ? 0 : 1);
    pf.count = nb * pf.run;
  }
  return pf;
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

// A product over K = 0: zero, scaled (Problem::row_scale: NaN where a scale
// is not finite, as for any K), plus the bias.
template <typename out_t, typename P>
void store_bias_only(const P& p, int64_t n0, int64_t nb) {
  for (int64_t r = 0; r < p.m; ++r) {
    out_t* o = p.c + r * p.c_rs + n0;
    for (int64_t j = 0; j < nb; ++j) {
      std::remove_const_t<std::remove_pointer_t<decltype(P::bias)>> v = 0;  // acc_t
      if (p.row_scale != nullptr) v = (v * p.row_scale[r]) * p.col_scale[n0 + j];
      if (p.bias != nullptr) v += p.bias[n0 + j];
      o[j] = static_cast<out_t>(v);
    }
  }
}

// Row-major C (mb x w, ldc) = A (mb x kc, lda) B, or C += A B with
// accumulate, single-threaded; B's kc rows of kW = 2 vectors ldb apart (a
// packed panel: load_b_panels, whose columns [w, kW) are zero, so every load
// is full width). Each output is summed along K in order with
// Vectorized<T>::fmadd (on AVX2 and AVX-512 one rounding per step, as the
// AVX-512 engine), from zero or from the partial sum a previous K block
// stored in C (exact in T): its bits do not depend on the blocking. A tile of
// kGemmRows rows x 2 vectors is held in registers (AVX2: 12 accumulators of
// the 16 ymm), as named variables: GCC 12 stored an array of them to the
// stack on every K step (half the speed).
constexpr int64_t kGemmRows = 6;

#define WIDE_LOAD(i) \
  if constexpr (R > i) { if (accumulate) { c##i##0 = Vec::loadu(c + i * ldc, w0); \
                         if (w1 > 0) c##i##1 = Vec::loadu(c + i * ldc + kV, w1); } }
#define WIDE_ROW(i) \
  if constexpr (R > i) { const Vec av(a[i * lda + l]); c##i##0 = vec::fmadd(av, b0, c##i##0); \
                         c##i##1 = vec::fmadd(av, b1, c##i##1); }
#define WIDE_STORE(i) \
  if constexpr (R > i) { (c##i##0).store(c + i * ldc, w0); if (w1 > 0) (c##i##1).store(c + i * ldc + kV, w1); }
template <typename T, int R, bool kPack>
void gemm_tile(int64_t kc, const T* a, int64_t lda, const T* b, int64_t ldb, T* pack, T* c, int64_t ldc, int64_t w,
               bool accumulate) {
  static_assert(R >= 1 && R <= 6, "WIDE_LOAD, WIDE_ROW and WIDE_STORE name six rows of accumulators");
  using Vec = vec::Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  const int64_t w0 = std::min<int64_t>(w, kV), w1 = std::max<int64_t>(w - kV, 0);
  const Vec z(T(0));
  Vec c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
  WIDE_LOAD(0) WIDE_LOAD(1) WIDE_LOAD(2) WIDE_LOAD(3) WIDE_LOAD(4) WIDE_LOAD(5)
  for (int64_t l = 0; l < kc; ++l) {
    const Vec b0 = Vec::loadu(b + l * ldb);
    const Vec b1 = Vec::loadu(b + l * ldb + kV);
    if constexpr (kPack) {
      b0.store(pack + l * 2 * kV);
      b1.store(pack + l * 2 * kV + kV);
    }
    WIDE_ROW(0) WIDE_ROW(1) WIDE_ROW(2) WIDE_ROW(3) WIDE_ROW(4) WIDE_ROW(5)
  }
  WIDE_STORE(0) WIDE_STORE(1) WIDE_STORE(2) WIDE_STORE(3) WIDE_STORE(4) WIDE_STORE(5)
}
#undef WIDE_LOAD
#undef WIDE_ROW
#undef WIDE_STORE

// The tiles of a row block. With pack null, B is a packed panel (ldb = kW);
// otherwise it is read in place, a full-width panel of a row-major B of type
// T, by the first register tile, which packs it into `pack` for the others as
// it goes: a separate pass over the weights cost 17% of the time of 48-row
// groups. Lines [line_begin, line_end) of `next` are prefetched, a share
// before each register tile.
template <typename T>
void gemm_panel(int64_t mb, int64_t w, int64_t kc, const T* a, int64_t lda, const T* b, int64_t ldb, T* pack,
                T* c, int64_t ldc, bool accumulate, const LinePrefetch& next, int64_t line_begin, int64_t line_end) {
  constexpr int64_t kW = 2 * vec::Vectorized<T>::size();
  const int64_t tiles = mb / kGemmRows + (mb % kGemmRows) / 2 + (mb % 2);
  const int64_t lines = line_end - line_begin;
  int64_t tile = 0;
  const auto run = [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    next.issue(line_begin + lines * tile / tiles, line_begin + lines * (tile + 1) / tiles);
    if (pack != nullptr && tile == 0 && tiles > 1) {
      gemm_tile<T, R, true>(kc, a + r0 * lda, lda, b, ldb, pack, c + r0 * ldc, ldc, w, accumulate);
    } else if (pack != nullptr && tile > 0) {
      gemm_tile<T, R, false>(kc, a + r0 * lda, lda, pack, kW, nullptr, c + r0 * ldc, ldc, w, accumulate);
    } else {
      gemm_tile<T, R, false>(kc, a + r0 * lda, lda, b, ldb, nullptr, c + r0 * ldc, ldc, w, accumulate);
    }
    ++tile;
  };
  int64_t r0 = 0;
  for (; r0 + kGemmRows <= mb; r0 += kGemmRows) run(std::integral_constant<int, kGemmRows>{}, r0);
  for (; r0 + 2 <= mb; r0 += 2) run(std::integral_constant<int, 2>{}, r0);
  if (r0 < mb) run(std::integral_constant<int, 1>{}, r0);
}

} // namespace
} // namespace at::native

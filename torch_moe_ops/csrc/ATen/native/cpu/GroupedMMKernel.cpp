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
// Engines, per input dtype:
//   bfloat16/float16 where oneDNN brgemm supports it: the weight tile is packed
//     to VNNI in a thread-local buffer right before use (an in-cache pass, not a
//     separate sweep over the weights), A rows are read in place.
//   float32/float64, and 16-bit types without brgemm: BLAS gemm on tiles; 16-bit
//     tiles are widened to float32 in thread-local buffers.
// Accumulation is in float32 (float64 for float64) and rounded once in the
// epilogue, which also adds the bias. The tiling depends only on the shapes,
// never on the thread count, so results are bitwise reproducible.

#include <ATen/native/GroupedMM.h>

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if AT_BUILD_WITH_BLAS()
// The BLAS torch links (MKL on x86 wheels); ATen's own float/double
// cpublas::gemm overloads wrap these but are not exported to extensions.
extern "C" void sgemm_(char* transa, char* transb, int* m, int* n, int* k, float* alpha, const float* a,
                       int* lda, const float* b, int* ldb, float* beta, float* c, int* ldc);
extern "C" void dgemm_(char* transa, char* transb, int* m, int* n, int* k, double* alpha, const double* a,
                       int* lda, const double* b, int* ldb, double* beta, double* c, int* ldc);
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
// Matmul engine with few groups: split N so both threads get work.
constexpr int64_t kMatmulNB = 256;
// Cost of streaming one weight tile, in rows of compute: lets groups with few
// rows still count for the memory traffic they cause.
constexpr double kWeightStreamRows = 16.0;

template <typename T>
inline T* workspace(std::vector<char>& buf, int64_t numel) {
  const size_t bytes = static_cast<size_t>(numel) * sizeof(T) + 64;
  if (buf.size() < bytes) {
    buf.resize(bytes);
  }
  auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
}

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

inline TransposeType no_trans() { return TransposeType::NoTranspose; }
inline TransposeType trans() { return TransposeType::Transpose; }

// Column-major C (m x n) = op(A) (m x k) op(B) (k x n) + beta C. Tiles are
// bounded by the tile sizes and K, so the int casts cannot overflow for K < 2^31.
template <typename T>
void blas_gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k,
               const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, T beta) {
#if AT_BUILD_WITH_BLAS()
  if (k <= std::numeric_limits<int>::max() && lda <= std::numeric_limits<int>::max() &&
      ldb <= std::numeric_limits<int>::max()) {
    char ta_c = ta == TransposeType::NoTranspose ? 'n' : 't';
    char tb_c = tb == TransposeType::NoTranspose ? 'n' : 't';
    int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k);
    int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc_ = static_cast<int>(ldc);
    T alpha = 1;
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&ta_c, &tb_c, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
    } else {
      dgemm_(&ta_c, &tb_c, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
    }
    return;
  }
#endif
  // No BLAS (or K past int): a plain loop in the same column-major terms.
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T sum = beta == T(0) ? T(0) : c[i + j * ldc];
      for (int64_t l = 0; l < k; ++l) {
        const T av = ta == TransposeType::NoTranspose ? a[i + l * lda] : a[l + i * lda];
        const T bv = tb == TransposeType::NoTranspose ? b[l + j * ldb] : b[j + l * ldb];
        sum += av * bv;
      }
      c[i + j * ldc] = sum;
    }
  }
}

struct ThreadBuffers {
  std::vector<char> a, b, acc;
};

// Does this build's oneDNN brgemm run float32 here? (It needs an x86 CPU
// that oneDNN's brgemm supports; elsewhere BLAS takes its place.)
bool brgemm_f32_available() {
  static const bool available = [] {
    try {
      float a = 1.f, b = 2.f, c = 0.f;
      cpublas::brgemm(1, 1, 1, 1, 1, 1, /*add_C=*/false, &a, &b, &c, /*is_vnni=*/false);
      cpublas::brgemm_release(/*is_vnni=*/false);
      return c == 2.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return available;
}

// Row-major C (mb x nb, ldc) (+)= A (mb x k, lda) B (k x nb, ldb), single-threaded.
template <typename T>
void gemm_row_major(int64_t mb, int64_t nb, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                    T* c, int64_t ldc, bool add_c, bool use_brgemm) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_brgemm) {
      cpublas::brgemm(mb, nb, k, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/false);
      return;
    }
  }
  // Column-major view: C^T (nb x mb) = B^T (nb x k) A^T (k x mb).
  blas_gemm<T>(no_trans(), no_trans(), nb, mb, k, b, ldb, a, lda, c, ldc, add_c ? T(1) : T(0));
}

// ---- widening engine: row-major tiles in compute_t (float or double) --------
// Float inputs with a unit inner stride are read in place; anything else
// (transposed or broadcast operands, 16-bit types) is gathered tile by tile
// into thread-local buffers that stay in cache.
template <typename scalar_t, typename out_t, typename compute_t>
void run_tile_widening(const Problem<scalar_t, out_t, compute_t>& p, const Tile& t, ThreadBuffers& buf,
                       bool use_brgemm) {
  constexpr bool kInPlace = std::is_same_v<scalar_t, compute_t>;
  const int64_t k = p.k;
  const int64_t nb = t.nb;
  const scalar_t* b = p.b + t.n0 * p.b_cs;

  const compute_t* b_ptr;
  int64_t ldb;
  if (kInPlace && p.b_cs == 1 && (k == 1 || p.b_rs >= nb)) {
    b_ptr = reinterpret_cast<const compute_t*>(b);
    ldb = k == 1 ? nb : p.b_rs;
  } else {
    compute_t* w = workspace<compute_t>(buf.b, k * nb);
    gather_block(w, nb, b, p.b_rs, p.b_cs, k, nb, nb);
    b_ptr = w;
    ldb = nb;
  }

  // fp32 output without a type change accumulates straight into out; a bias
  // is stored first and accumulated onto (add_C), still one rounding.
  constexpr bool kDirectOut = std::is_same_v<out_t, compute_t>;
  compute_t* acc = kDirectOut ? nullptr : workspace<compute_t>(buf.acc, kWideMB * nb);
  const bool a_in_place = kInPlace && p.a_cs == 1 && (p.m == 1 || p.a_rs >= k);
  for (int64_t m0 = 0; m0 < p.m; m0 += kWideMB) {
    const int64_t mb = std::min(kWideMB, p.m - m0);
    const compute_t* a_ptr;
    int64_t lda;
    if (a_in_place) {
      a_ptr = reinterpret_cast<const compute_t*>(p.a + m0 * p.a_rs);
      lda = p.m == 1 ? k : p.a_rs;
    } else {
      compute_t* w = workspace<compute_t>(buf.a, mb * k);
      gather_block(w, k, p.a + m0 * p.a_rs, p.a_rs, p.a_cs, mb, k, k);
      a_ptr = w;
      lda = k;
    }
    if constexpr (kDirectOut) {
      compute_t* c = reinterpret_cast<compute_t*>(p.c) + m0 * p.c_rs + t.n0;
      if (p.bias != nullptr) {
        for (int64_t r = 0; r < mb; ++r) {
          std::copy(p.bias + t.n0, p.bias + t.n0 + nb, c + r * p.c_rs);
        }
      }
      gemm_row_major<compute_t>(mb, nb, k, a_ptr, lda, b_ptr, ldb, c, p.c_rs, p.bias != nullptr, use_brgemm);
    } else {
      gemm_row_major<compute_t>(mb, nb, k, a_ptr, lda, b_ptr, ldb, acc, nb, false, use_brgemm);
      store_tile<out_t>(p, m0, mb, t.n0, nb, acc, nb);
    }
  }
}

// ---- oneDNN matmul engine: bfloat16 in and out, no bias ---------------------
// oneDNN's bf16 matmul (avx512_bf16/AMX) behind at::mm is the fastest bf16
// GEMM this build has; called from inside the parallel region it runs on one
// thread, which for small per-expert GEMMs is ~90% of the one-thread dense rate.
template <typename scalar_t, typename out_t, typename acc_t>
void run_tile_matmul(const Problem<scalar_t, out_t, acc_t>& p, const Tile& t) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto* a = const_cast<scalar_t*>(p.a);
  auto* b = const_cast<scalar_t*>(p.b + t.n0 * p.b_cs);
  const Tensor a_view = at::from_blob(a, {p.m, p.k}, {p.a_rs, p.a_cs}, opts);
  const Tensor b_view = at::from_blob(b, {p.k, t.nb}, {p.b_rs, p.b_cs}, opts);
  Tensor c_view = at::from_blob(p.c + t.n0, {p.m, t.nb}, {p.c_rs, 1}, opts);
  at::mm_out(c_view, a_view, b_view);
}

enum class Engine { kMatmul, kWidening };

template <typename scalar_t, typename out_t, typename acc_t>
void run_problems(const std::vector<Problem<scalar_t, out_t, acc_t>>& problems, bool has_bias) {
  constexpr bool kMatmulCapable = (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, float>) && std::is_same_v<out_t, scalar_t>;
  const Engine engine = kMatmulCapable && !has_bias ? Engine::kMatmul : Engine::kWidening;
  // ATen's float brgemm serialises concurrent callers here (2 threads ran no
  // faster than 1), so it stays off until our own micro-kernel replaces it.
  const bool use_brgemm = false && std::is_same_v<acc_t, float> && brgemm_f32_available();
  // Tile widths depend on the shapes only (never on the thread count), so the
  // bits of the result do not change with the number of threads.
  int64_t tile_n = kWideNB;
  if (engine == Engine::kMatmul) {
    tile_n = problems.size() >= 16 ? std::numeric_limits<int64_t>::max() : kMatmulNB;
  }

  std::vector<Tile> tiles;
  double total = 0;
  for (const auto i : c10::irange(static_cast<int64_t>(problems.size()))) {
    const auto& p = problems[i];
    if (p.m == 0 || p.n == 0) continue;
    for (int64_t n0 = 0; n0 < p.n; n0 += std::min(tile_n, p.n)) {
      const int64_t nb = std::min(tile_n, p.n - n0);
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

  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    ThreadBuffers buf;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int64_t i = bounds[chunk]; i < bounds[chunk + 1]; ++i) {
        const Tile& t = tiles[i];
        const auto& p = problems[t.problem];
        if (p.k == 0) {
          store_bias_only<out_t>(p, t.n0, t.nb);
        } else if (engine == Engine::kMatmul) {
          run_tile_matmul(p, t);
        } else {
          run_tile_widening(p, t, buf, use_brgemm);
        }
      }
    }
    if (use_brgemm && engine == Engine::kWidening) {
      cpublas::brgemm_release(/*is_vnni=*/false);
    }
  });
}

template <typename scalar_t, typename out_t>
void grouped_mm_typed(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs,
                      const std::optional<Tensor>& bias, const Tensor& out) {
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
        p.a = a + start * a_rs;
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
        p.a = a + start * a_cs;
        p.b = b + start * b_rs;
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
  run_problems(problems, bias_ptr != nullptr);
}

} // namespace

void grouped_mm_cpu_kernel(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs,
                           const std::optional<Tensor>& bias, const Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.stride(-1) == 1 || out.size(-1) <= 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, mat_a.scalar_type(), "grouped_mm_cpu", [&] {
    if (out.scalar_type() == mat_a.scalar_type()) {
      grouped_mm_typed<scalar_t, scalar_t>(mat_a, mat_b, offs, bias, out);
    } else {
      TORCH_INTERNAL_ASSERT(out.scalar_type() == kFloat);
      if constexpr (!std::is_same_v<scalar_t, double>) {
        grouped_mm_typed<scalar_t, float>(mat_a, mat_b, offs, bias, out);
      }
    }
  });
}

} // namespace at::native

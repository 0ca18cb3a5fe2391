// CPU kernel for grouped_mm.
//
// Every layout is lowered to a list of independent matmuls ("problems"), one
// per group, each described by pointers and element strides into the caller's
// tensors: no input is copied or sliced as a whole. The problems are cut into
// tiles of NB output columns; a tile computes all rows of its problem, so the
// expert weight block it reads (K x NB) comes from memory once and is reused
// from cache by every m-block. Tiles are split across threads by estimated
// cost (not by count) so uneven groups stay balanced, a thread done with its
// share takes tiles from the end of another's (TileRuns), and each tile runs
// single-threaded: small GEMMs lose most of their speed when split.
//
// Engines:
//   widening: tiles gathered into float32 (float64) buffers and multiplied by
//     a Vectorized<T> kernel. The DEFAULT and AVX2 builds of this file run
//     every call here, and float64 always does.
//   AVX-512 (GroupedMMAvx512.h, GroupedMMInnerProduct.h; the
//     CPU_CAPABILITY_AVX512 build of this file only): micro-kernels that
//     stream the expert weights from the caller's memory while they compute,
//     and at::mm (oneDNN/MKL) per group where the BLAS is faster (groups of
//     hundreds of rows of bfloat16/float32 without bias), one group after the
//     other outside any parallel region (the BLAS threads each GEMM itself).
//   transposed tiles (GroupedMMTransposedTile.h; the AVX512 build): float32
//     groups of 17 rows and more (bfloat16: 18, with AVX512_BF16) with
//     (E, N, K) weights, the weights broadcast in place into tiles of C^T.
//   brgemm (GroupedMMBrgemm.h; the AVX512 build, bfloat16 and float16 where
//     cpublas::could_pack holds, i.e. AMX): ATen's batch-reduce GEMM per tile
//     on a packed weight block.
// Float8 weights (GroupedMMFloat8Weights.h; scaled_grouped_mm's rowwise
// recipe, grouped_mm_float8_weights_stub): the bfloat16 broadcast engine,
// decoding them as it packs its weight blocks.
// Accumulation is in float32 (float64 for float64) and rounded once in the
// epilogue, which also adds the bias. The engine, the tiling and the K
// blocking depend only on the shapes, strides and CPU, never on the thread
// count, so results are bitwise reproducible on a machine (the two weight
// storage orders sum along K in different orders, so their bits may differ).
// Scratch is allocated per call (one slice per thread) and freed at return.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEScaledGroupedMM.h>
#include <ATen/native/cpu/GroupedMMKernelUtils.h>

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/native/cpu/GroupedMMAvx512.h>
#include <ATen/native/cpu/GroupedMMAvx512BF16.h>
#include <ATen/native/cpu/GroupedMMBrgemm.h>
#include <ATen/native/cpu/GroupedMMFloat8Weights.h>
#include <ATen/native/cpu/GroupedMMInnerProduct.h>
#include <ATen/native/cpu/GroupedMMTransposedTile.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#endif

namespace at::native {
namespace {

// ---- widening engine: row-major tiles in compute_t (float or double) --------
// Goto's blocking: per K block, an A row block (float inputs with a unit
// inner stride read in place; transposed, broadcast, gathered or 16-bit ones
// gathered into the thread's scratch) and the tile's B block as 2-vector
// column panels, each of which the row block's register tiles pass over from
// L1. K blocks after the first add to the partial sums left in the output
// (fp32) or the accumulator tile.
template <typename compute_t>
constexpr int64_t kWidePanel = 2 * vec::Vectorized<compute_t>::size();

template <typename scalar_t, typename out_t, typename compute_t>
void widening_scratch(const Problem<scalar_t, out_t, compute_t>& p, const Tile& t, ScratchBytes& s) {
  // The same condition as run_tile_widening's.
  const bool a_in_place = std::is_same_v<scalar_t, compute_t> && p.a_cs == 1 && (p.m == 1 || p.a_rs >= p.k) &&
      !p.a_gathered();
  const int64_t kc = std::min(p.k, kWideKC<compute_t>);
  const int64_t panels = (t.nb + kWidePanel<compute_t> - 1) / kWidePanel<compute_t>;
  const auto e = static_cast<int64_t>(sizeof(compute_t));
  s.at_least(a_in_place ? 0 : std::min(kWideMB, p.m) * kc * e, kc * panels * kWidePanel<compute_t> * e,
             std::is_same_v<out_t, compute_t> ? 0 : kWideMB * t.nb * e);
}

// next / next_t: the thread's next tile (or null), whose first B block is
// prefetched while this tile's last one is computed.
template <typename scalar_t, typename out_t, typename compute_t>
void run_tile_widening(const Problem<scalar_t, out_t, compute_t>& p, const Tile& t, ThreadBuffers& buf,
                       const Problem<scalar_t, out_t, compute_t>* next, const Tile* next_t) {
  constexpr int64_t kW = kWidePanel<compute_t>;
  const int64_t k = p.k;
  const int64_t nb = t.nb;
  const int64_t panels = (nb + kW - 1) / kW;
  const int64_t kc_max = std::min(k, kWideKC<compute_t>);
  compute_t* packed_b = workspace<compute_t>(buf.b, kc_max * panels * kW);
  // fp32 output without a type change accumulates straight into out, then
  // adds the bias: the same two roundings as the other engines' epilogue.
  constexpr bool kDirectOut = std::is_same_v<out_t, compute_t>;
  compute_t* acc = kDirectOut ? nullptr : workspace<compute_t>(buf.acc, kWideMB * nb);
  const bool a_in_place = std::is_same_v<scalar_t, compute_t> && p.a_cs == 1 && (p.m == 1 || p.a_rs >= k) &&
      !p.a_gathered();
  // Full panels of a row-major B of compute_t are read in place and packed by
  // gemm_panel as it goes, the next panel's rows prefetched meanwhile; other
  // B blocks are packed whole (load_b_panels), the next block prefetched a
  // share per panel: each expert's weights come from memory once per call.
  const bool b_in_place = std::is_same_v<scalar_t, compute_t> && p.b_cs == 1 && p.b_idx == nullptr;
  const int64_t in_place_nb = b_in_place ? nb / kW * kW : 0;
  const int64_t fetch_nb = b_in_place ? kW : nb;
  for (int64_t m0 = 0; m0 < p.m; m0 += kWideMB) {
    const int64_t mb = std::min(kWideMB, p.m - m0);
    compute_t* c = kDirectOut ? reinterpret_cast<compute_t*>(p.c) + m0 * p.c_rs + t.n0 : acc;
    const int64_t ldc = kDirectOut ? p.c_rs : nb;
    for (int64_t k0 = 0; k0 < k; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, k - k0);
      const compute_t* a;
      int64_t lda;
      if (a_in_place) {
        a = reinterpret_cast<const compute_t*>(p.a + m0 * p.a_rs + k0);
        lda = p.a_rs;
      } else {
        compute_t* w = workspace<compute_t>(buf.a, mb * kc);
        load_a_block(w, kc, p, m0, mb, k0, kc);
        a = w;
        lda = kc;
      }
      if (in_place_nb < nb) {
        load_b_panels<kW>(packed_b + in_place_nb * kc, p, k0, kc, t.n0 + in_place_nb, nb - in_place_nb);
      }
      // What is computed after this block: its next K block, the next row
      // block's first, or the next tile's.
      LinePrefetch after;
      if (k0 + kc < k) {
        after = b_block_lines(p, k0 + kc, std::min(kc_max, k - k0 - kc), t.n0, std::min(fetch_nb, nb));
      } else if (m0 + kWideMB < p.m) {
        after = b_block_lines(p, 0, kc_max, t.n0, std::min(fetch_nb, nb));
      } else if (next != nullptr) {
        after = b_block_lines(*next, 0, std::min(next->k, kWideKC<compute_t>), next_t->n0,
                              std::min(fetch_nb, next_t->nb));
      }
      for (int64_t j = 0; j < panels; ++j) {
        const int64_t j0 = j * kW;
        compute_t* panel = packed_b + j0 * kc;
        if (j0 < in_place_nb) {
          const LinePrefetch ahead =
              j0 + kW < nb ? b_block_lines(p, k0, kc, t.n0 + j0 + kW, std::min(kW, nb - j0 - kW)) : after;
          const auto* b = reinterpret_cast<const compute_t*>(p.b + k0 * p.b_rs + t.n0 + j0);
          gemm_panel<compute_t>(mb, kW, kc, a, lda, b, p.b_rs, panel, c + j0, ldc, /*accumulate=*/k0 > 0, ahead, 0,
                                ahead.count);
        } else {
          const int64_t first = b_in_place ? 0 : after.count * j / panels;
          const int64_t last = b_in_place ? after.count : after.count * (j + 1) / panels;
          gemm_panel<compute_t>(mb, std::min(kW, nb - j0), kc, a, lda, panel, kW, nullptr, c + j0, ldc,
                                /*accumulate=*/k0 > 0, after, first, last);
        }
      }
    }
    if constexpr (kDirectOut) {
      if (p.bias != nullptr) {
        for (int64_t r = 0; r < mb; ++r) {
          for (int64_t j = 0; j < nb; ++j) c[r * ldc + j] += p.bias[t.n0 + j];
        }
      }
    } else {
      store_tile<out_t>(p, m0, mb, t.n0, nb, acc, nb);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
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

enum class Engine { kMatmul, kWidening, kAvx512, kBrgemm };

// MKL's sgemm runs its fast kernels on Intel cores only: on AMD's (Zen 5,
// measured) it reached half the micro-kernel's float32 rate. CPUID read
// directly, as cpu_has_avx512_bf16 does (GroupedMMAvx512.h), and for the
// same reason.
bool cpu_is_intel() {
#if defined(__GNUC__)
  static const bool ok = (__builtin_cpu_init(), __builtin_cpu_is("intel"));
#else
  static const bool ok = cpuinfo_initialize() && cpuinfo_get_cores_count() > 0 &&
      cpuinfo_get_core(0)->vendor == cpuinfo_vendor_intel;
#endif
  return ok;
}

// Average rows per group from which the BLAS behind at::mm (oneDNN's
// bfloat16 matmul with AVX512_BF16, MKL's sgemm) overtakes the
// micro-kernel: its weight packing is then amortised over enough rows. The
// rows are the smallest dimension of each group's product: in 3D x 2D the
// tokens are its output's columns, and oneDNN on a few dozen of them (Zen 5,
// bfloat16, 1536 weight rows) ran at 0.1x its dense rate; in 2D x 2D (a
// weight gradient) they are its K: with a few dozen routed rows per expert
// the micro-kernels, whose large tiles stream their output
// (kStreamTileBytes), took 5-15% less time than oneDNN (Zen 5, bfloat16,
// bench_grouped_mm's skewed 2d2d rows of DeepSeek-V3, OLMoE and Qwen3 `nk`;
// Qwen3 `kn` 4% more, within the run-to-run spread).
constexpr int64_t kMatmulMinRows = 256;

// Every group with A and B row-major (2D x 3D and 3D x 3D on (G, K, N)
// weights), the bfloat16 broadcast engine's own layout, where it keeps up
// with oneDNN at any group size, so the large groups stay with it too. Zen 5,
// 2 threads: uniform groups of 2048-8192 rows 0.98-1.01x oneDNN's speed, of
// 300 rows (K 2048, N 1536) 1.16x; Mixtral's shape at a quarter width (8
// skewed groups, 512 rows on average) 1.21-1.23x a loop of at::mm over the
// groups in 2D x 3D and 1.09-1.11x one at::bmm in 3D x 3D. With the weights
// stored (G, N, K), or A column-major, the micro-kernels ran those rows at
// 0.84-0.98x of oneDNN.
template <typename scalar_t, typename out_t, typename acc_t>
bool bf16_broadcast_layout(const std::vector<Problem<scalar_t, out_t, acc_t>>& problems) {
  return std::all_of(problems.begin(), problems.end(), [](const auto& p) {
    return p.m == 0 || p.n == 0 || (p.a_cs == 1 && p.b_cs == 1);
  });
}

// The AVX-512 micro-kernels (they beat oneDNN/MKL on fine-grained groups by
// overlapping the weight stream with compute), except for large bfloat16
// groups outside the broadcast layout (bf16_broadcast_layout); otherwise
// at::mm where it applies, else the widening engine.
// at::mm cannot read rows through an index. It runs a whole group on all
// threads, and MKL / oneDNN may then split K across them for small shapes,
// which changes the bits with the thread count: so only for the large
// groups, where it is the faster engine; the DEFAULT and AVX2 builds use the
// widening engine, whose bits never depend on it.
template <typename scalar_t, typename out_t, typename acc_t>
Engine choose_engine(const std::vector<Problem<scalar_t, out_t, acc_t>>& problems, bool has_bias, bool gathered) {
  constexpr bool kMatmulCapable = (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, float>) &&
      std::is_same_v<out_t, scalar_t>;
  const Engine fallback = kMatmulCapable && !has_bias && !gathered ? Engine::kMatmul : Engine::kWidening;
  int64_t rows = 0, nonempty = 0;
  for (const auto& p : problems) {
    if (p.m > 0 && p.n > 0) {
      rows += std::min({p.m, p.n, p.k});
      ++nonempty;
    }
  }
  const bool large_groups = rows >= kMatmulMinRows * std::max<int64_t>(nonempty, 1);
  // Float8 weights (Problem::b8) run on the broadcast engine only, whatever their size.
  if (std::any_of(problems.begin(), problems.end(), [](const auto& p) { return p.b8 != nullptr; })) {
    return Engine::kAvx512;
  }
  if constexpr (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, Half>) {
    // Where the CPU packs for brgemm (AMX), its matrix units run the tiles;
    // at::mm keeps the large bfloat16 groups (oneDNN's matmul uses AMX too).
    if (CpublasBrgemm::available<scalar_t>() && !(fallback == Engine::kMatmul && large_groups)) {
      return Engine::kBrgemm;
    }
  }
  if constexpr (std::is_same_v<scalar_t, BFloat16>) {
    if (cpu_has_avx512_bf16() &&
        !(fallback == Engine::kMatmul && large_groups && !bf16_broadcast_layout(problems))) {
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
    // of it at Mixtral's 512 rows per expert, measured); below that, and on
    // other cores, the micro-kernel's streamed weights win.
    if (!(std::is_same_v<scalar_t, float> && fallback == Engine::kMatmul && large_groups && cpu_is_intel())) {
      return Engine::kAvx512;
    }
  }
  return fallback;
}
#endif // CPU_CAPABILITY_AVX512

#if defined(CPU_CAPABILITY_AVX512)
// 3D x 2D (the expert's weights as A, the tokens^T K-contiguous as B): C = A
// B has the expert's N weight rows as its rows and the tokens as its few
// columns, the shape these engines handle worst. Such a group runs as
// C^T = B^T A^T instead, which is 2D x 3D (tokens x weights), and its tiles
// store C^T into the output's columns:
// - weights stored (E, N, K) (transformers'; A row-major, too many rows for
//   the transposed-tile engine's packed block, kTtMaxRows): 2D x 3D with
//   (E, N, K) weights, the transposed-tile engine, whose tile holds C^T
//   already;
// - weights stored (E, K, N) (A K-major): 2D x 3D with (E, K, N) weights, the
//   broadcast engine, its tile going through the accumulator buffer to the
//   output's columns (store_acc_transposed). As C = A B the transposed-tile
//   engine repacked every weight for each group;
// - weights stored (E, N, K) and fewer tokens than the transposed-tile engine
//   takes (kTtMinRowsBF16 / kTtMinRowsF32): the inner-product engine either
//   way, but as C = A B its 4 columns are tokens, a group of 1-17 tokens
//   computes up to 3 padding columns per 4, and as C^T its 6 rows are
//   tokens, run with exactly as many rows as there are (DeepSeek-V3, Zen 4,
//   2 threads: bfloat16 92-99 -> 83-86 ms, float32 185-213 -> 162-169 ms;
//   the same bits, each sum being the same dot product in the same order).
// Zen 5, 2 threads, bfloat16, uniform groups, GFLOP/s as C = A B and turned,
// (E, N, K) then (E, K, N): Qwen3 (48 tokens, K 2048, N 1536) 570 -> 855 and
// 405 -> 745; OLMoE (96, 2048, 2048) 635 -> 895 and 530 -> 805; DeepSeek-V3
// (32, 1792, 1024) 520 -> 780 and 305 -> 640 (dense 870-920).
// Turned or not, the engines sum the same products in the same K order.
// The choice of engine is made on the turned groups: turning brings large
// bfloat16 groups on (E, K, N) weights into the broadcast layout, which keeps
// them off at::mm (Mixtral's 3D x 2D `kn` row, Zen 4, 2 threads: 304 ->
// 375 GFLOP/s, upstream's loop of mm 288). Groups stay as they are if the
// turned ones would still go to at::mm, which writes C, never C^T.
template <typename scalar_t, typename out_t, typename acc_t>
void turn_3d2d_groups(bool has_bias, bool gathered, std::vector<Problem<scalar_t, out_t, acc_t>>& problems) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>) {
    if (has_bias || gathered) return;
    auto turned_problems = problems;
    for (auto& p : turned_problems) {
      if (p.m <= p.n || p.n == 0 || p.k == 0 || p.b_rs != 1 || p.b8 != nullptr) continue;
      const auto q = turned(p);
      const bool to_tiles = !tt_eligible<scalar_t>(p) && tt_eligible<scalar_t>(q);
      // Only groups too small for the transposed-tile engine: larger ones that
      // it does not take stay C = A B (turned, Mixtral's groups of 512 tokens
      // and more ran its bfloat16 row at 305 against 342-364 GFLOP/s; without
      // AVX512_BF16 the inner-product engine would widen each weight row once
      // per 96 tokens instead of once).
      const bool to_inner = !tt_eligible<scalar_t>(p) && nt_eligible<scalar_t>(p) && nt_eligible<scalar_t>(q) &&
          q.m < tt_min_rows<scalar_t>();
      const bool to_broadcast = p.a_rs == 1 && p.a_cs != 1;
      if (to_tiles || to_inner || to_broadcast) p = q;
    }
    if (choose_engine(turned_problems, has_bias, gathered) == Engine::kAvx512) {
      problems = std::move(turned_problems);
    }
  }
}
#endif // CPU_CAPABILITY_AVX512

template <typename scalar_t, typename out_t, typename acc_t>
void run_problems(const std::vector<Problem<scalar_t, out_t, acc_t>>& problems, bool has_bias, bool gathered) {
  // Tile widths depend on the shapes only (never on the thread count), so the
  // bits of the result do not change with the number of threads.
  int64_t tile_n = kWideNB;
#if defined(CPU_CAPABILITY_AVX512)
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
  const bool micro = engine == Engine::kAvx512;
  const bool brgemm = engine == Engine::kBrgemm;
  if (micro) {
    tile_n = kMicroNB;
  } else if (brgemm) {
    tile_n = kBrgemmNB;
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
      if (micro && p.k <= micro_kc<scalar_t>() && problems.size() >= 16) {
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
  // neighbouring tiles share their A rows, so runs keep them in cache. A
  // thread done with its runs takes the others' last tiles (TileRuns): the
  // estimate misjudges groups of a few rows and the 256-column tiles of one
  // large group, and a VM's core may stall mid-call. Zen 4, 2 threads,
  // bench_grouped_mm's operands, ours/dense, medians of 3-5 alternations in
  // one process, static runs / claimed: DeepSeek-V3 bfloat16 2d3d `kn`
  // 0.91 / 0.99, 2d2d `nk` 0.93 / 0.98; Qwen3 bfloat16 2d3d `nk` 0.88 / 0.92,
  // float32 3d2d `nk` 1.17 / 1.23; OLMoE bfloat16 2d3d `kn` 0.94 / 1.01.
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
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, Half>) {
      if (brgemm) {
        brgemm_scratch<CpublasBrgemm>(p, t, need);
        continue;
      }
    }
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (micro) {
        if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>) {
          if (tt_eligible<scalar_t>(p)) {
            tt_scratch(p, t, need);
            continue;
          }
        }
        if (nt_eligible<scalar_t>(p)) {
          nt_scratch(p, need);
        } else {
          avx512_scratch(p, t, need);
        }
        continue;
      }
    }
#endif
    widening_scratch(p, t, need);
  }
  const int64_t slice = need.slice();
  const Tensor scratch = at::empty({num_chunks * slice}, at::TensorOptions().dtype(kByte));
  char* const scratch_base = reinterpret_cast<char*>(scratch.data_ptr());

  TileRuns runs(bounds);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    ThreadBuffers buf = need.regions(scratch_base + begin * slice);
    // The thread's own runs from the front, then what is left of every run
    // from the back.
    for (int64_t step = begin; step < end + num_chunks; ++step) {
      const bool own = step < end;
      const int64_t chunk = own ? step : step % num_chunks;
      int64_t i = 0;
      while (own ? runs.claim_front(chunk, i) : runs.claim_back(chunk, i)) {
        const Tile& t = tiles[i];
        const auto& p = problems[t.problem];
        if (p.k == 0) {
          store_bias_only<out_t>(p, t.n0, t.nb);
          continue;
        }
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, Half>) {
          if (brgemm) {
            run_tile_brgemm<CpublasBrgemm>(p, t, buf);
            continue;
          }
        }
        if constexpr (!std::is_same_v<scalar_t, double>) {
          if (micro) {
            const Tile* next = runs.next(tiles, chunk, i, own);
            const auto* next_p = next != nullptr ? &problems[next->problem] : nullptr;
            if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>) {
              if (tt_eligible<scalar_t>(p)) {
                run_tile_tt(p, t, buf, next_p, next);
                continue;
              }
            }
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
            continue;
          }
        }
#endif
        const Tile* next = runs.next(tiles, chunk, i, own);
        run_tile_widening(p, t, buf, next != nullptr ? &problems[next->problem] : nullptr, next);
      }
    }
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, Half>) {
      if (brgemm) {
        CpublasBrgemm::release<scalar_t>(); // the thread's AMX tile configuration
      }
    }
#endif
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
#if defined(CPU_CAPABILITY_AVX512)
  turn_3d2d_groups(bias_ptr != nullptr, a_idx != nullptr || b_idx != nullptr, problems);
#endif
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

#if defined(CPU_CAPABILITY_AVX512)
// The rowwise recipe's 2D x 3D or 3D x 3D product on the broadcast engine,
// its weights float8 codes (Problem::b8), its scales and bias applied as the
// accumulators are stored; see grouped_mm_float8_weights_fn.
template <typename out_t>
void grouped_mm_float8_weights_typed(const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a,
                                     const Tensor& scale_b, const std::optional<Tensor>& offs,
                                     const std::optional<Tensor>& bias, const Tensor& out) {
  const bool rows = grouped_mm_layout(mat_a, mat_b) == GroupedMMLayout::k2d3d;  // else 3D x 3D
  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);
  const int64_t M = mat_a.size(-2), N = mat_b.size(-1);
  const Tensor bias_f = bias.has_value() ? bias->to(kFloat).contiguous() : Tensor();
  std::vector<Problem<BFloat16, out_t, float>> problems(groups);
  int64_t start = 0;
  for (const auto g : c10::irange(groups)) {
    const int64_t end = rows ? offs->const_data_ptr<int32_t>()[g * offs->stride(0)] : 0;
    auto& p = problems[g];
    p.m = rows ? end - start : M;
    p.n = N;
    p.k = mat_a.size(-1);
    p.a = mat_a.const_data_ptr<BFloat16>() + (rows ? start * mat_a.stride(0) : g * mat_a.stride(0));
    p.a_rs = mat_a.stride(-2), p.a_cs = mat_a.stride(-1);
    p.b8 = static_cast<const uint8_t*>(mat_b.const_data_ptr()) + g * mat_b.stride(0);
    p.b8_e5m2 = mat_b.scalar_type() == kFloat8_e5m2;
    p.b_rs = mat_b.stride(-2), p.b_cs = mat_b.stride(-1);
    p.c = out.data_ptr<out_t>() + (rows ? start * out.stride(0) : g * out.stride(0));
    p.c_rs = out.stride(-2);
    p.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() + g * N : nullptr;
    p.row_scale = scale_a.const_data_ptr<float>() + (rows ? start : g * M);
    p.col_scale = scale_b.const_data_ptr<float>() + g * N;
    start = end;
  }
  run_problems(problems, bias.has_value(), false);
}
#endif // CPU_CAPABILITY_AVX512

// grouped_mm_float8_weights_stub: the broadcast engine (choose_engine picks
// it for any size of group), where it runs bfloat16 as K pairs.
bool grouped_mm_float8_weights_kernel(const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a,
                                      const Tensor& scale_b, const std::optional<Tensor>& offs,
                                      const std::optional<Tensor>& bias, const Tensor& out) {
#if defined(CPU_CAPABILITY_AVX512)
  if (cpu_has_avx512_bf16() && !CpublasBrgemm::available<BFloat16>()) {
    TORCH_INTERNAL_ASSERT(mat_a.scalar_type() == kBFloat16 && scale_a.is_contiguous() && scale_b.is_contiguous());
    if (out.scalar_type() == kFloat) {
      grouped_mm_float8_weights_typed<float>(mat_a, mat_b, scale_a, scale_b, offs, bias, out);
    } else {
      grouped_mm_float8_weights_typed<BFloat16>(mat_a, mat_b, scale_a, scale_b, offs, bias, out);
    }
    return true;
  }
#endif
  return false;
}

} // namespace

// Every capability's build registers its copy; the AVX512 one has the
// AVX-512 engine (plain REGISTER_DISPATCH would leave that slot empty).
ALSO_REGISTER_AVX512_DISPATCH(grouped_mm_stub, &grouped_mm_kernel)
ALSO_REGISTER_AVX512_DISPATCH(grouped_mm_float8_weights_stub, &grouped_mm_float8_weights_kernel)

} // namespace at::native

// CPU kernel for scaled_grouped_mm (semantics in ATen/native/MoEScaledGroupedMM.h).
//
// The groups are processed in chunks. A chunk's float8 operands are widened
// to bfloat16 tile buffers (AVX-512 integer code, a table on other CPUs),
// multiplied by grouped_mm's CPU kernel into a float32 accumulator, and the
// epilogue applies the rowwise scales and the bias and rounds once to
// out_dtype. Working memory is bounded by the chunk size (kChunkElems
// converted elements, or one group's operands when a group alone is larger),
// never a dequantised copy of all operands of a large layer.
//
// Rowwise weights in 2D x 3D and 3D x 3D skip the conversion where grouped
// mm's engine can decode them itself (grouped_mm_float8_weights_stub: AVX-512
// CPUs with AVX512_BF16, without AMX): only A is converted, and the engine
// applies the scales and the bias as it stores.
//
// Exactness: float8 -> bfloat16 is exact (3 or 2 mantissa bits, exponents
// within bfloat16's); rowwise scales factor out of the K sum and are applied
// to the float32 accumulator; MX scales are powers of two folded into the
// conversion, exact unless a product falls below bfloat16's normal range
// (2^-126). So the result is the float32-accumulated product of the
// dequantised operands, as aten::_scaled_grouped_mm computes it on GPUs.

#include <ATen/native/MoEScaledGroupedMM.h>
#include <ATen/native/cpu/MoEAvx512Utils.h>
#include <ATen/native/cpu/MoEFp8Avx512.h>
#include <ATen/native/cpu/MoEFp8Utils.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <vector>

namespace at::native {
namespace {

// Converted elements per chunk of groups (bfloat16: 8 MB), so that the GEMM
// reads the tiles the conversion just wrote from the last-level cache rather
// than DRAM: on a 32 MB L3, DeepSeek-V3's up-projection (2 experts a chunk)
// ran at 470 GFLOP/s with 4M elements, 280-370 with 16M; 1-2M left the GEMM
// one group, too little to split over the threads. Each chunk costs four
// parallel regions (two conversions, the GEMM, the epilogue), so smaller
// chunks pay more fork/joins, and more when the cores are shared.
constexpr int64_t kChunkElems = int64_t{4} << 20;

// Group g spans [start[g], start[g + 1]) of the split dimension (all zero
// without offs: 3D x 3D).
std::vector<int64_t> group_starts(const std::optional<Tensor>& offs, int64_t groups) {
  std::vector<int64_t> start(groups + 1, 0);
  for (const auto g : c10::irange(groups)) {
    start[g + 1] = offs.has_value() ? offs->const_data_ptr<int32_t>()[g * offs->stride(0)] : 0;
  }
  return start;
}

// The end of the chunk of groups that starts at g0: as many groups as fit
// kChunkElems converted elements by elems(g), at least one.
template <typename Elems>
int64_t chunk_end(int64_t g0, int64_t groups, const Elems& elems) {
  int64_t g1 = g0 + 1, total = elems(g0);
  while (g1 < groups && total + elems(g1) <= kChunkElems) total += elems(g1++);
  return g1;
}

// The ends of groups [g0, g1) from the chunk's first row or column, as
// grouped mm's offs over the chunk.
std::vector<int32_t> chunk_ends(const std::vector<int64_t>& start, int64_t g0, int64_t g1) {
  std::vector<int32_t> ends(g1 - g0);
  for (int64_t g = g0; g < g1; ++g) ends[g - g0] = static_cast<int32_t>(start[g + 1] - start[g0]);
  return ends;
}

// The converted operands of a chunk of groups, owned by the call and reused
// by its chunks (grown to the largest). Megabytes: from c10's allocator, so
// THP_MEM_ALLOC_ENABLE=1 gives them huge pages (first-touch faults otherwise
// cost about as much as the conversion).
struct Workspace {
  Tensor data;
  template <typename T>
  T* get(int64_t n) {
    const int64_t want = n * static_cast<int64_t>(sizeof(T));
    if (!data.defined() || want > data.numel()) {
      data = at::empty({want}, at::TensorOptions().dtype(kByte));
    }
    return reinterpret_cast<T*>(data.data_ptr());
  }
};

// Where the scale of element (r, c) of an operand lives:
// s[(r / r_div) * r_mul + (c / c_div) * c_mul], s = sc (e8m0, MX) or scf
// (float32, blockwise); neither means 1.
struct ScaleMap {
  const uint8_t* sc = nullptr;
  const float* scf = nullptr;
  int64_t r_div = 1, r_mul = 0, c_div = 1, c_mul = 0;
  bool any() const { return sc != nullptr || scf != nullptr; }
};

// A run of n contiguous float8 bytes; element i has scale
// s[(i / every) * stride] (no scale pointer: 1).
struct Run {
  const uint8_t* src;
  int64_t n;
  const uint8_t* sc;
  const float* scf;
  int64_t every, stride;
  bool scaled() const { return sc != nullptr || scf != nullptr; }
  float scale(int64_t i) const {
    const int64_t k = (i / every) * stride;
    return sc != nullptr ? moe_e8m0_to_float(sc[k]) : scf[k];
  }
};

template <typename dst_t>
void convert_run_scalar(const Run& run, dst_t* dst, const float* lut) {
  for (int64_t i = 0; i < run.n; ++i) {
    float v = lut[run.src[i]];
    if (run.scaled()) v *= run.scale(i);
    dst[i] = static_cast<dst_t>(v);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Intrinsics: the float8 decode is integer bit surgery (expand, shift, blend
// for denormals; byte tables) that Vectorized<T> has no operations for.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive on unmasked intrinsics
#endif

// The conversion prefetches the float8 bytes this far ahead of its loads:
// runs are a row of a few KB, too short for the hardware prefetchers to ramp
// up, and the conversion read 7-8 GB/s of float8 without (16-18 with).
constexpr int64_t kDecodePrefetchBytes = 1024;

// 16 float8 bytes -> float32, exact: integer re-biasing for normals,
// int -> float times the smallest denormal for denormals (no float denormal
// is ever formed, so the result is independent of DAZ/FTZ).
inline __m512 fp8x16_to_f32(__m128i bytes, bool e5m2) {
  const __m512i b = _mm512_cvtepu8_epi32(bytes);
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  __m512 v;
  if (!e5m2) {  // s eeee mmm, bias 7
    v = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
    const __m512 den = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 512));
    v = _mm512_mask_mov_ps(v, _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(0x08)), den);
    v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)),
                           _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
  } else {  // s eeeee mm, bias 15
    v = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 21), _mm512_set1_epi32(112 << 23)));
    const __m512 den = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 65536));
    v = _mm512_mask_mov_ps(v, _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(0x04)), den);
    v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7C)),
                           _mm512_castsi512_ps(_mm512_set1_epi32(0x7F800000)));
    v = _mm512_mask_mov_ps(v, _mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(0x7C)),
                           _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
  }
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
}

// 16 e8m0 scale codes -> float32: the bits of moe_e8m0_to_float (2^(b - 127);
// 0 the denormal 2^-127, 0xFF NaN).
inline __m512 e8m0x16_to_f32(__m128i codes) {
  const __m512i b = _mm512_cvtepu8_epi32(codes);
  __m512i f = _mm512_slli_epi32(b, 23);
  f = _mm512_mask_mov_epi32(f, _mm512_cmpeq_epi32_mask(b, _mm512_setzero_si512()), _mm512_set1_epi32(0x00400000));
  f = _mm512_mask_mov_epi32(f, _mm512_cmpeq_epi32_mask(b, _mm512_set1_epi32(0xFF)), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(f);
}

// An unscaled run into bfloat16, 64 lanes at a time (MoEFp8ToBf16, or
// MoEFp8ToBf16Vbmi where the CPU has AVX512_VBMI): the same bits as the
// float32 route below at a fraction of its instructions. This pass, not the
// GEMM, bounded fp8 once the GEMM ran on vdpbf16ps.
template <typename Decoder>
inline __attribute__((always_inline)) void convert_run_bf16_with(const Decoder& decode, const Run& run,
                                                                 BFloat16* dst) {
  for (int64_t i = 0; i < run.n; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(run.src + i + kDecodePrefetchBytes), _MM_HINT_T0);
    __m512i v[2];
    decode.run(run.src + i, moe_lanes64(run.n, i), v);
    _mm512_mask_storeu_epi16(dst + i, moe_lanes32(run.n, i), v[0]);
    _mm512_mask_storeu_epi16(dst + i + 32, moe_lanes32(run.n, i + 32), v[1]);
  }
}

template <bool kE5M2>
MOE_FP8_VBMI void convert_run_bf16_vbmi(const Run& run, BFloat16* dst) {
  static const MoEFp8ToBf16Vbmi<kE5M2> decode;
  convert_run_bf16_with(decode, run, dst);
}

inline void convert_run_bf16_unscaled(const Run& run, BFloat16* dst, bool e5m2) {
  if (moe_cpu_has_avx512_vbmi()) {
    return e5m2 ? convert_run_bf16_vbmi<true>(run, dst) : convert_run_bf16_vbmi<false>(run, dst);
  }
  moe_with_fp8_decoder(e5m2, [&](const auto& decode) { convert_run_bf16_with(decode, run, dst); });
}

template <typename dst_t>
void convert_run_avx512(const Run& run, dst_t* dst, bool e5m2) {
  if constexpr (std::is_same_v<dst_t, BFloat16>) {
    if (!run.scaled()) return convert_run_bf16_unscaled(run, dst, e5m2);
  }
  alignas(64) float scales[16];
  for (int64_t i = 0; i < run.n; i += 16) {
    const __mmask16 m = moe_lanes16(run.n, i);
    _mm_prefetch(reinterpret_cast<const char*>(run.src + i + kDecodePrefetchBytes), _MM_HINT_T0);
    __m512 v = fp8x16_to_f32(_mm_maskz_loadu_epi8(m, run.src + i), e5m2);
    if (run.scaled()) {
      if (run.every % 16 == 0) {  // one scale per 16 lanes (runs start on block bounds)
        v = _mm512_mul_ps(v, _mm512_set1_ps(run.scale(i)));
      } else if (run.sc != nullptr && run.every == 1) {
        // A scale per element: MX weights stored (K, N), whose runs go along N
        // and whose scales go along K. The codes are gathered into two 64-bit
        // words and moved to a vector as registers: 16 byte stores read back
        // as one vector load stalled on store forwarding, half the pass.
        const int64_t lanes = std::min<int64_t>(16, run.n - i);
        const uint8_t* sc = run.sc + i * run.stride;
        uint64_t lo = 0, hi = 0;
        for (int64_t j = 0; j < std::min<int64_t>(lanes, 8); ++j) {
          lo |= static_cast<uint64_t>(sc[j * run.stride]) << (8 * j);
        }
        for (int64_t j = 8; j < lanes; ++j) hi |= static_cast<uint64_t>(sc[j * run.stride]) << (8 * (j - 8));
        const __m128i codes = _mm_set_epi64x(static_cast<int64_t>(hi), static_cast<int64_t>(lo));
        v = _mm512_mul_ps(v, e8m0x16_to_f32(codes));
      } else {
        for (int64_t j = 0; j < 16; ++j) {
          scales[j] = i + j < run.n ? run.scale(i + j) : 0.0f;
        }
        v = _mm512_mul_ps(v, _mm512_load_ps(scales));
      }
    }
    if constexpr (std::is_same_v<dst_t, float>) {
      _mm512_mask_storeu_ps(dst + i, m, v);
    } else {
      _mm256_mask_storeu_epi16(dst + i, m, moe_cvt_f32_bf16(v));
    }
  }
}

// One output row of a block (epilogue below), 16 columns at a time: the
// scalar loop's operations in its order and its rounding (moe_cvt_f32_bf16
// gives c10::BFloat16(float)'s bits). Rounded one element at a time through
// c10's conversion, the epilogue took 6% of a rowwise call (Zen 5, Qwen3's
// up-projection).
template <typename out_t>
void epilogue_row_avx512(const float* acc, out_t* o, int64_t cols, const float* sa, const float* sb,
                         const float* bias) {
  const __m512 s = _mm512_set1_ps(sa != nullptr ? *sa : 1.0f);
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 m = moe_lanes16(cols, c);
    __m512 v = _mm512_maskz_loadu_ps(m, acc + c);
    if (sa != nullptr) v = _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_maskz_loadu_ps(m, sb + c));
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + c));
    if constexpr (std::is_same_v<out_t, float>) {
      _mm512_mask_storeu_ps(o + c, m, v);
    } else {
      _mm256_mask_storeu_epi16(o + c, m, moe_cvt_f32_bf16(v));
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif

template <typename dst_t>
void convert_run(const Run& run, dst_t* dst, ScalarType t) {
#if defined(CPU_CAPABILITY_AVX512)
  return convert_run_avx512(run, dst, t == kFloat8_e5m2);
#else
  convert_run_scalar(run, dst, moe_fp8_table(t));
#endif
}

// `batch` (rows x cols) float8 matrices with element strides (matrix b at
// src + b * src_bs, its scales at sm.sc + b * sc_bs), converted into dst +
// b * dst_bs, keeping the unit-stride dimension innermost; one parallel
// region for the whole batch. Returns the strides of each dst matrix.
struct Strides2 {
  int64_t rs, cs;
};

template <typename dst_t>
Strides2 convert_batch(const uint8_t* src, int64_t batch, int64_t src_bs, int64_t rows, int64_t cols, int64_t rs,
                       int64_t cs, ScalarType t, const ScaleMap& sm, int64_t sc_bs, dst_t* dst, int64_t dst_bs) {
  const bool col_major = cs != 1 && rs == 1;
  const int64_t runs = col_major ? cols : rows, len = col_major ? rows : cols;
  const int64_t src_step = col_major ? cs : rs, src_inner = col_major ? rs : cs;
  at::parallel_for(0, batch * runs, std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> gathered;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / runs, i = j % runs;
      Run run{src + b * src_bs + i * src_step, len, nullptr, nullptr, 1, 0};
      if (sm.any()) {
        const int64_t off = b * sc_bs + (col_major ? (i / sm.c_div) * sm.c_mul : (i / sm.r_div) * sm.r_mul);
        run.sc = sm.sc != nullptr ? sm.sc + off : nullptr;
        run.scf = sm.scf != nullptr ? sm.scf + off : nullptr;
        run.every = col_major ? sm.r_div : sm.c_div;
        run.stride = col_major ? sm.r_mul : sm.c_mul;
      }
      if (src_inner != 1 && len > 0) {  // neither dimension contiguous: gather the run first
        gathered.resize(len);
        for (int64_t k = 0; k < len; ++k) gathered[k] = run.src[k * src_inner];
        run.src = gathered.data();
      }
      convert_run(run, dst + b * dst_bs + i * len, t);
    }
  });
  return col_major ? Strides2{1, rows} : Strides2{cols, 1};
}

// One group's block of the output: out[r, c] = round((acc[r, c] * sa[r]) * sb[c] + bias[c]).
template <typename out_t>
struct Block {
  const float* acc;
  int64_t acc_rs;
  out_t* out;
  int64_t out_rs, rows, cols;
  const float* sa;  // nullptr: no rowwise scales (MX folds them into the tiles)
  const float* sb;
  const float* bias;
};

template <typename out_t>
void epilogue(const std::vector<Block<out_t>>& blocks) {
  std::vector<int64_t> first_row(blocks.size() + 1, 0);
  for (size_t i = 0; i < blocks.size(); ++i) first_row[i + 1] = first_row[i] + blocks[i].rows;
  const int64_t cols = blocks.empty() ? 1 : std::max<int64_t>(blocks[0].cols, 1);
  at::parallel_for(0, first_row.back(), std::max<int64_t>(1, 8192 / cols), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const size_t bi = std::upper_bound(first_row.begin(), first_row.end(), j) - first_row.begin() - 1;
      const Block<out_t>& bl = blocks[bi];
      const int64_t r = j - first_row[bi];
      const float* a = bl.acc + r * bl.acc_rs;
      out_t* o = bl.out + r * bl.out_rs;
#if defined(CPU_CAPABILITY_AVX512)
      epilogue_row_avx512(a, o, bl.cols, bl.sa != nullptr ? bl.sa + r : nullptr, bl.sb, bl.bias);
      continue;
#endif
      const float s = bl.sa != nullptr ? bl.sa[r] : 1.0f;
      for (int64_t c = 0; c < bl.cols; ++c) {
        float v = a[c];
        if (bl.sa != nullptr) v = (v * s) * bl.sb[c];
        if (bl.bias != nullptr) v += bl.bias[c];
        o[c] = static_cast<out_t>(v);
      }
    }
  });
}

template <typename tile_t>
Tensor blob(tile_t* p, IntArrayRef sizes, IntArrayRef strides) {
  return at::from_blob(p, sizes, strides, at::TensorOptions().dtype(c10::CppTypeToScalarType<tile_t>::value));
}

// tile_t: bfloat16 (exact for rowwise and MX) or float32 (blockwise: the
// scale, an arbitrary float per 128-block of K, is applied in the
// conversion, one rounding to float32).
template <typename out_t, typename tile_t>
void scaled_grouped_mm_typed(const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a,
                             const Tensor& scale_b, const std::optional<Tensor>& offs,
                             const std::optional<Tensor>& bias, ScaledGroupedMMRecipe recipe, const Tensor& out) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);
  const bool mx = recipe == ScaledGroupedMMRecipe::kMX;
  const bool blockwise = recipe == ScaledGroupedMMRecipe::kBlockwise;
  const bool rowwise = recipe == ScaledGroupedMMRecipe::kRowwise;
  const auto ta = mat_a.scalar_type(), tb = mat_b.scalar_type();
  const auto* A = static_cast<const uint8_t*>(mat_a.const_data_ptr());
  const auto* B = static_cast<const uint8_t*>(mat_b.const_data_ptr());
  const int64_t a_rs = mat_a.stride(-2), a_cs = mat_a.stride(-1), b_rs = mat_b.stride(-2), b_cs = mat_b.stride(-1);
  const int64_t a_gs = mat_a.dim() == 3 ? mat_a.stride(0) : 0, b_gs = mat_b.dim() == 3 ? mat_b.stride(0) : 0;
  const int64_t M = mat_a.size(-2), K = mat_a.size(-1), N = mat_b.size(-1);
  const float* sa = mx ? nullptr : scale_a.const_data_ptr<float>();
  const float* sb = mx ? nullptr : scale_b.const_data_ptr<float>();
  const int64_t KB = (K + 127) / 128, NB = (N + 127) / 128;  // blockwise scale grids
  const auto* sa8 = mx ? static_cast<const uint8_t*>(scale_a.const_data_ptr()) : nullptr;
  const auto* sb8 = mx ? static_cast<const uint8_t*>(scale_b.const_data_ptr()) : nullptr;
  const int64_t S = (K + 31) / 32;
  Tensor bias_f = bias.has_value() ? bias->to(kFloat).contiguous() : Tensor();
  const float* bp = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  const int64_t n_out = out.size(-1);
  out_t* op = out.data_ptr<out_t>();

  const std::vector<int64_t> start = group_starts(offs, groups);
  auto extent = [&](int64_t g) { return start[g + 1] - start[g]; };
  auto group_elems = [&](int64_t g) -> int64_t {
    switch (layout) {
      case GroupedMMLayout::k2d3d: return extent(g) * K + K * N;
      case GroupedMMLayout::k3d3d: return M * K + K * N;
      case GroupedMMLayout::k3d2d: return M * K + K * extent(g);
      case GroupedMMLayout::k2d2d: return (M + N) * extent(g);
    }
    return 0;
  };

  Workspace ws_a, ws_b;
  for (int64_t g0 = 0; g0 < groups;) {
    const int64_t g1 = chunk_end(g0, groups, group_elems);
    const int64_t gc = g1 - g0;
    const int64_t s0 = start[g0], s1 = start[g1];
    std::vector<int32_t> ends = chunk_ends(start, g0, g1);
    Tensor offs_c = at::from_blob(ends.data(), {gc}, at::TensorOptions().dtype(kInt));

    // Scale maps. MX: A element (m, k) -> scale_a[.., m, k / 32], B element
    // (k, n) -> scale_b[g, n, k / 32]. Blockwise: A (m, k) -> scale_a[.., m,
    // k / 128], B (k, n) -> scale_b[g, n / 128, k / 128]. Rowwise: none (epilogue).
    auto a_map = [&](int64_t g, int64_t row0) {
      ScaleMap s;
      if (mx) s = ScaleMap{sa8 + (g * M + row0) * S, nullptr, 1, S, 32, 1};
      if (blockwise) s = ScaleMap{nullptr, sa + (g * M + row0) * KB, 1, KB, 128, 1};
      return s;
    };
    auto b_map = [&](int64_t g) {
      ScaleMap s;
      if (mx) s = ScaleMap{sb8 + g * N * S, nullptr, 32, 1, 1, S};
      if (blockwise) s = ScaleMap{nullptr, sb + g * NB * KB, 128, 1, 128, KB};
      return s;
    };
    const int64_t a_sc_bs = mx ? M * S : M * KB, b_sc_bs = mx ? N * S : NB * KB;

    Tensor ta_t, tb_t;
    const ScaleMap none{};
    switch (layout) {
      case GroupedMMLayout::k2d3d: {  // rows [s0, s1) of A, experts g0..g1 of B
        tile_t* const pa = ws_a.get<tile_t>((s1 - s0) * K);
        tile_t* const pb = ws_b.get<tile_t>(gc * K * N);
        const auto sa_str = convert_batch(A + s0 * a_rs, 1, 0, s1 - s0, K, a_rs, a_cs, ta, a_map(0, s0), 0,
                                          pa, 0);
        const auto sb_str = convert_batch(B + g0 * b_gs, gc, b_gs, K, N, b_rs, b_cs, tb, b_map(g0), b_sc_bs,
                                          pb, K * N);
        ta_t = blob(pa, {s1 - s0, K}, {sa_str.rs, sa_str.cs});
        tb_t = blob(pb, {gc, K, N}, {K * N, sb_str.rs, sb_str.cs});
        break;
      }
      case GroupedMMLayout::k3d3d: {
        tile_t* const pa = ws_a.get<tile_t>(gc * M * K);
        tile_t* const pb = ws_b.get<tile_t>(gc * K * N);
        const auto sa_str = convert_batch(A + g0 * a_gs, gc, a_gs, M, K, a_rs, a_cs, ta, a_map(g0, 0), a_sc_bs,
                                          pa, M * K);
        const auto sb_str = convert_batch(B + g0 * b_gs, gc, b_gs, K, N, b_rs, b_cs, tb, b_map(g0), b_sc_bs,
                                          pb, K * N);
        ta_t = blob(pa, {gc, M, K}, {M * K, sa_str.rs, sa_str.cs});
        tb_t = blob(pb, {gc, K, N}, {K * N, sb_str.rs, sb_str.cs});
        break;
      }
      case GroupedMMLayout::k3d2d: {  // A groups g0..g1, columns [s0, s1) of B
        tile_t* const pa = ws_a.get<tile_t>(gc * M * K);
        tile_t* const pb = ws_b.get<tile_t>(K * (s1 - s0));
        const auto sa_str = convert_batch(A + g0 * a_gs, gc, a_gs, M, K, a_rs, a_cs, ta, none, 0, pa,
                                          M * K);
        const auto sb_str = convert_batch(B + s0 * b_cs, 1, 0, K, s1 - s0, b_rs, b_cs, tb, none, 0, pb, 0);
        ta_t = blob(pa, {gc, M, K}, {M * K, sa_str.rs, sa_str.cs});
        tb_t = blob(pb, {K, s1 - s0}, {sb_str.rs, sb_str.cs});
        break;
      }
      case GroupedMMLayout::k2d2d: {  // contraction slice [s0, s1)
        tile_t* const pa = ws_a.get<tile_t>(M * (s1 - s0));
        tile_t* const pb = ws_b.get<tile_t>((s1 - s0) * N);
        // MX: A (m, k) -> scale_a[m, k / 32], B (k, n) -> scale_b[n, k / 32]; s0 is a multiple of 32.
        const ScaleMap a2 = mx ? ScaleMap{sa8 + s0 / 32, nullptr, 1, S, 32, 1} : none;
        const ScaleMap b2 = mx ? ScaleMap{sb8 + s0 / 32, nullptr, 32, 1, 1, S} : none;
        const auto sa_str = convert_batch(A + s0 * a_cs, 1, 0, M, s1 - s0, a_rs, a_cs, ta, a2, 0, pa, 0);
        const auto sb_str = convert_batch(B + s0 * b_rs, 1, 0, s1 - s0, N, b_rs, b_cs, tb, b2, 0, pb, 0);
        ta_t = blob(pa, {M, s1 - s0}, {sa_str.rs, sa_str.cs});
        tb_t = blob(pb, {s1 - s0, N}, {sb_str.rs, sb_str.cs});
        break;
      }
    }
    const bool has_offs = layout != GroupedMMLayout::k3d3d;
    const Tensor acc = grouped_mm_cpu(ta_t, tb_t, has_offs ? std::optional<Tensor>(offs_c) : std::nullopt,
                                      std::nullopt, kFloat);
    const float* ap = acc.const_data_ptr<float>();
    const int64_t acc_rs = acc.stride(-2);

    std::vector<Block<out_t>> blocks;
    blocks.reserve(gc);
    for (int64_t g = g0; g < g1; ++g) {
      const float* bias_g = bp != nullptr ? bp + g * n_out : nullptr;
      switch (layout) {
        case GroupedMMLayout::k2d3d:
          blocks.push_back({ap + (start[g] - s0) * acc_rs, acc_rs, op + start[g] * n_out, n_out, extent(g), N,
                            rowwise ? sa + start[g] : nullptr, rowwise ? sb + g * N : nullptr, bias_g});
          break;
        case GroupedMMLayout::k3d3d:
          blocks.push_back({ap + (g - g0) * acc.stride(0), acc_rs, op + g * M * n_out, n_out, M, N,
                            rowwise ? sa + g * M : nullptr, rowwise ? sb + g * N : nullptr, bias_g});
          break;
        case GroupedMMLayout::k3d2d:
          blocks.push_back({ap + (start[g] - s0), acc_rs, op + start[g], n_out, M, extent(g), sa + g * M,
                            sb + start[g], bias_g != nullptr ? bias_g + start[g] : nullptr});
          break;
        case GroupedMMLayout::k2d2d:
          blocks.push_back({ap + (g - g0) * acc.stride(0), acc_rs, op + g * M * n_out, n_out, M, N,
                            rowwise ? sa + g * M : nullptr, rowwise ? sb + g * N : nullptr, bias_g});
          break;
      }
    }
    epilogue(blocks);
    g0 = g1;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Rowwise float8 weights in 2D x 3D and 3D x 3D: A converted chunk by chunk
// as above, then grouped mm's engine takes the weights as they are, decodes
// them as it packs its weight blocks and applies the scales and the bias as
// it stores its accumulators (grouped_mm_float8_weights_stub): no converted
// weights, no float32 accumulator, no epilogue pass. A chunk counts A's
// elements only. false, having written nothing to out, where the stub
// declines (it does so for the CPU, before any work): the caller then
// converts the weights too.
bool scaled_grouped_mm_float8_weights(const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a,
                                      const Tensor& scale_b, const std::optional<Tensor>& offs,
                                      const std::optional<Tensor>& bias, const Tensor& out) {
  const bool rows = grouped_mm_layout(mat_a, mat_b) == GroupedMMLayout::k2d3d;  // else 3D x 3D
  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);
  const auto* A = static_cast<const uint8_t*>(mat_a.const_data_ptr());
  const int64_t a_rs = mat_a.stride(-2), a_cs = mat_a.stride(-1), a_gs = rows ? 0 : mat_a.stride(0);
  const int64_t M = mat_a.size(-2), K = mat_a.size(-1);
  const Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const std::optional<Tensor> bias_f = bias.has_value() ? std::optional<Tensor>(bias->to(kFloat).contiguous())
                                                        : std::nullopt;

  const std::vector<int64_t> start = group_starts(offs, groups);  // 2D x 3D: group g's rows
  auto a_elems = [&](int64_t g) { return (rows ? start[g + 1] - start[g] : M) * K; };

  Workspace ws_a;
  for (int64_t g0 = 0; g0 < groups;) {
    const int64_t g1 = chunk_end(g0, groups, a_elems);
    const int64_t gc = g1 - g0, s0 = start[g0], s1 = start[g1];
    std::vector<int32_t> ends = chunk_ends(start, g0, g1);

    auto* const pa = ws_a.get<BFloat16>((rows ? s1 - s0 : gc * M) * K);
    const auto a_str = rows ? convert_batch(A + s0 * a_rs, 1, 0, s1 - s0, K, a_rs, a_cs, mat_a.scalar_type(),
                                            ScaleMap{}, 0, pa, 0)
                            : convert_batch(A + g0 * a_gs, gc, a_gs, M, K, a_rs, a_cs, mat_a.scalar_type(),
                                            ScaleMap{}, 0, pa, M * K);
    const Tensor a_c = rows ? blob(pa, {s1 - s0, K}, {a_str.rs, a_str.cs})
                            : blob(pa, {gc, M, K}, {M * K, a_str.rs, a_str.cs});
    const auto offs_c = rows ? std::optional<Tensor>(at::from_blob(ends.data(), {gc}, at::TensorOptions().dtype(kInt)))
                             : std::nullopt;
    const int64_t r0 = rows ? s0 : g0, rn = rows ? s1 - s0 : gc;  // the chunk's rows of out and scale_a
    const bool done = grouped_mm_float8_weights_stub(
        kCPU, a_c, mat_b.narrow(0, g0, gc), sa.narrow(0, r0, rn), sb.narrow(0, g0, gc), offs_c,
        bias_f.has_value() ? std::optional<Tensor>(bias_f->narrow(0, g0, gc)) : std::nullopt,
        out.narrow(0, r0, rn));
    if (!done) {
      TORCH_INTERNAL_ASSERT(g0 == 0);
      return false;
    }
    g0 = g1;
  }
  return true;
}
#endif

void scaled_grouped_mm_kernel(const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a,
                              const Tensor& scale_b, const std::optional<Tensor>& offs,
                              const std::optional<Tensor>& bias, ScaledGroupedMMRecipe recipe, const Tensor& out) {
  const bool f32_tiles = recipe == ScaledGroupedMMRecipe::kBlockwise;
#if defined(CPU_CAPABILITY_AVX512)
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  if (recipe == ScaledGroupedMMRecipe::kRowwise &&
      (layout == GroupedMMLayout::k2d3d || layout == GroupedMMLayout::k3d3d) &&
      scaled_grouped_mm_float8_weights(mat_a, mat_b, scale_a, scale_b, offs, bias, out)) {
    return;
  }
#endif
  if (out.scalar_type() == kFloat) {
    if (f32_tiles) {
      scaled_grouped_mm_typed<float, float>(mat_a, mat_b, scale_a, scale_b, offs, bias, recipe, out);
    } else {
      scaled_grouped_mm_typed<float, c10::BFloat16>(mat_a, mat_b, scale_a, scale_b, offs, bias, recipe, out);
    }
  } else {
    if (f32_tiles) {
      scaled_grouped_mm_typed<c10::BFloat16, float>(mat_a, mat_b, scale_a, scale_b, offs, bias, recipe, out);
    } else {
      scaled_grouped_mm_typed<c10::BFloat16, c10::BFloat16>(mat_a, mat_b, scale_a, scale_b, offs, bias, recipe,
                                                            out);
    }
  }
}

} // namespace

// Every capability's build registers its copy; the AVX512 one has the
// AVX-512 paths (plain REGISTER_DISPATCH would leave that slot empty).
ALSO_REGISTER_AVX512_DISPATCH(scaled_grouped_mm_stub, &scaled_grouped_mm_kernel)

} // namespace at::native

// CPU kernels for quantize_fp8 and dequantize_fp8 (the recipes and their
// numerics are specified in ATen/native/MoEQuantize.h).
//
// quantize runs three passes over shapes that never depend on the thread
// count, so the bits do not either: (1) the float32 amax of every (row,
// segment), a segment being a block's extent along C or a group of offs;
// (2) the amax of every block (max over its rows: exact, order-free), its
// multiplier q and its stored scale; (3) every row again: x * q, clamp,
// round to fp8. Pass 1 and 3 read the input once each (the second read is
// mostly from cache for 1xN blocks). The fp8 rounding is our own integer
// code (the bits of c10's conversion on clamped inputs), AVX-512 where the
// CPU has it, so that both paths give the same bytes.
// dequantize widens with a 256-entry table and multiplies by the block
// scale, one row per task.

#include <ATen/native/MoEQuantize.h>
#include <ATen/native/cpu/MoEAvx512Utils.h>
#include <ATen/native/cpu/MoEFp8Utils.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace at::native {
namespace {

// An fp8 format as the rounding needs it: mantissa bits, exponent bias, the
// float32 bits of the smallest normal, and the float32 whose ulp is the
// format's smallest denormal (adding it rounds a denormal to nearest even).
struct Fp8Format {
  int mant;
  int bias;
  uint32_t min_normal_bits;
  uint32_t denorm_magic_bits;
  float max;
  int emax;  // exponent of the largest power of two below max (OCP MX emax_elem)
};

constexpr Fp8Format kE4M3{3, 7, 121u << 23, 141u << 23, 448.0f, 8};
constexpr Fp8Format kE5M2{2, 15, 113u << 23, 134u << 23, 57344.0f, 15};

inline const Fp8Format& fp8_format(ScalarType t) {
  return t == kFloat8_e5m2 ? kE5M2 : kE4M3;
}

// float (already clamped to +-max, or NaN) -> fp8 bits, round to nearest even.
// NaN -> 0x7F: one NaN byte whatever the sign, as the reference canonicalises.
inline uint8_t fp8_encode(float v, const Fp8Format& f) {
  const uint32_t bits = c10::bit_cast<uint32_t>(v);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t a = bits & 0x7FFFFFFFu;
  if (a > 0x7F800000u) {
    return 0x7F;
  }
  uint32_t r;
  if (a < f.min_normal_bits) {
    const float t = c10::bit_cast<float>(a) + c10::bit_cast<float>(f.denorm_magic_bits);
    r = c10::bit_cast<uint32_t>(t) - f.denorm_magic_bits;
  } else {
    const int shift = 23 - f.mant;
    r = (a + (static_cast<uint32_t>(f.bias - 127) << 23) + ((1u << (shift - 1)) - 1) + ((a >> shift) & 1u)) >> shift;
  }
  return static_cast<uint8_t>(r | sign);
}

inline float fp8_clamp(float v, float max) {
  // Comparisons are false for NaN, which passes through.
  v = v < -max ? -max : v;
  return v > max ? max : v;
}

// ------------------------------------------------------------- scalar rows

template <typename scalar_t>
float amax_scalar(const scalar_t* x, int64_t n) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    nan |= std::isnan(v);
    m = std::max(m, std::abs(v));
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

template <typename scalar_t>
void quantize_scalar(const scalar_t* x, uint8_t* out, int64_t n, float q, const Fp8Format& f) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = fp8_encode(fp8_clamp(static_cast<float>(x[i]) * q, f.max), f);
  }
}

template <typename out_t>
void dequantize_scalar(const uint8_t* d, out_t* out, int64_t n, float s, const float* lut) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<out_t>(lut[d[i]] * s);
  }
}

// ------------------------------------------------------------- AVX-512 rows

#if defined(CPU_CAPABILITY_AVX512)
// Intrinsics: the fp8 rounding is integer code on the float bits (unsigned
// compares, variable shifts, masked narrowing stores) and the dequantize a
// table gather, which Vectorized<T> does not provide.

// GCC 12 reports the unmasked intrinsics' internal undefined vectors as
// maybe-uninitialized (a false positive; MoEAvx512Utils.h works around it
// with maskz forms, too many here).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

template <typename scalar_t>
inline __m512 load16(const scalar_t* p, __mmask16 m) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return moe_cvt_bf16_f32(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}

template <typename scalar_t>
float amax_avx512(const scalar_t* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load16(x + i, moe_lanes16(n, i));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    acc = _mm512_max_ps(acc, _mm512_abs_ps(v));
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(acc);
}

// fp8_encode on 16 lanes.
inline __m512i fp8_encode16(__m512 v, const Fp8Format& f) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i a = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80));
  const __m128i shift = _mm_cvtsi32_si128(23 - f.mant);
  const __m512i odd = _mm512_and_si512(_mm512_srl_epi32(a, shift), _mm512_set1_epi32(1));
  const uint32_t bias = (static_cast<uint32_t>(f.bias - 127) << 23) + ((1u << (22 - f.mant)) - 1);
  __m512i r = _mm512_srl_epi32(_mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(static_cast<int>(bias))), odd),
                               shift);
  const __m512i magic = _mm512_set1_epi32(static_cast<int>(f.denorm_magic_bits));
  const __m512i den = _mm512_sub_epi32(
      _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(magic))), magic);
  r = _mm512_mask_mov_epi32(r, _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(static_cast<int>(f.min_normal_bits))),
                            den);
  r = _mm512_or_si512(r, sign);
  return _mm512_mask_mov_epi32(r, _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000)),
                               _mm512_set1_epi32(0x7F));
}

template <typename scalar_t>
void quantize_avx512(const scalar_t* x, uint8_t* out, int64_t n, float q, const Fp8Format& f) {
  const __m512 vq = _mm512_set1_ps(q);
  const __m512 hi = _mm512_set1_ps(f.max);
  const __m512 lo = _mm512_set1_ps(-f.max);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = moe_lanes16(n, i);
    __m512 v = _mm512_mul_ps(load16(x + i, m), vq);
    // max/min return their second operand when either is NaN: NaN survives.
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    _mm512_mask_cvtepi32_storeu_epi8(out + i, m, fp8_encode16(v, f));
  }
}

template <typename out_t>
void dequantize_avx512(const uint8_t* d, out_t* out, int64_t n, float s, const float* lut) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = moe_lanes16(n, i);
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, d + i));
    const __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(idx, lut, 4), vs);
    if constexpr (std::is_same_v<out_t, float>) {
      _mm512_mask_storeu_ps(out + i, m, v);
    } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
      _mm256_mask_storeu_epi16(out + i, m, moe_cvt_f32_bf16(v));
    } else {
      _mm256_mask_storeu_epi16(out + i, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

// A whole row of 32-element blocks (MX): the amax of each block, then its
// quantisation, without a call per block.
template <typename scalar_t>
void amax32_avx512(const scalar_t* x, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 v0 = load16(x + 32 * b, 0xFFFF), v1 = load16(x + 32 * b + 16, 0xFFFF);
    const __mmask16 nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
    out[b] = nan ? std::numeric_limits<float>::quiet_NaN()
                 : _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  }
}

template <typename scalar_t>
void quantize32_avx512(const scalar_t* x, uint8_t* out, int64_t blocks, const float* q,
                                      const Fp8Format& f) {
  const __m512 hi = _mm512_set1_ps(f.max), lo = _mm512_set1_ps(-f.max);
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 vq = _mm512_set1_ps(q[b]);
    for (int64_t h = 0; h < 32; h += 16) {
      __m512 v = _mm512_mul_ps(load16(x + 32 * b + h, 0xFFFF), vq);
      v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b + h), _mm512_cvtepi32_epi8(fp8_encode16(v, f)));
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif

template <typename scalar_t>
float row_amax(const scalar_t* x, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  return amax_avx512(x, n);
#else
  return amax_scalar(x, n);
#endif
}

template <typename scalar_t>
void row_quantize(const scalar_t* x, uint8_t* out, int64_t n, float q, const Fp8Format& f) {
#if defined(CPU_CAPABILITY_AVX512)
  return quantize_avx512(x, out, n, q, f);
#else
  quantize_scalar(x, out, n, q, f);
#endif
}

template <typename out_t>
void row_dequantize(const uint8_t* d, out_t* out, int64_t n, float s, const float* lut) {
#if defined(CPU_CAPABILITY_AVX512)
  return dequantize_avx512(d, out, n, s, lut);
#else
  dequantize_scalar(d, out, n, s, lut);
#endif
}

// --------------------------------------------------------------- geometry

// Where every block of a (B, R, C) operand lies and where its scale is stored.
struct Blocks {
  int64_t nb, rows, cols;
  int64_t block_rows;             // rows per block, >= 1
  int64_t nrb;                    // row blocks per matrix
  std::vector<int64_t> seg;       // segment bounds along C, size nseg + 1
  int64_t nseg() const { return static_cast<int64_t>(seg.size()) - 1; }
  int64_t covered() const { return seg.back(); }  // columns past it belong to no group
  bool grouped;                   // tensorwise/rowwise with offs: scales per group
  bool swizzle;
  Fp8Recipe recipe;

  Blocks(const Tensor& t, Fp8Recipe r, const std::optional<Tensor>& offs, bool swz)
      : nb(t.dim() == 3 ? t.size(0) : 1), rows(t.size(-2)), cols(t.size(-1)), swizzle(swz), recipe(r) {
    grouped = offs.has_value() && r != Fp8Recipe::kMX;
    const int64_t br = fp8_block_rows(r);
    block_rows = br == 0 ? std::max<int64_t>(rows, 1) : br;
    nrb = br == 0 ? 1 : fp8_ceil_div(rows, br);
    seg.push_back(0);
    if (grouped) {
      const int32_t* o = offs->const_data_ptr<int32_t>();
      for (const auto g : c10::irange(offs->size(0))) seg.push_back(o[g * offs->stride(0)]);
    } else if (const int64_t w = fp8_block_cols(r); w > 0) {
      for (int64_t c = w; c < cols + w; c += w) seg.push_back(std::min(c, cols));
    } else {
      seg.push_back(cols);
    }
  }

  // Offset in the scale tensor of block (b, rb, s).
  int64_t scale_offset(int64_t b, int64_t rb, int64_t s) const {
    switch (recipe) {
      case Fp8Recipe::kTensorwise: return grouped ? s : b;
      case Fp8Recipe::kRowwise: return grouped ? s * rows + rb : b * rows + rb;
      case Fp8Recipe::kMX:
        if (swizzle) {
          const int64_t sp = fp8_round_up(nseg(), 4);
          return b * fp8_round_up(rows, 128) * sp + fp8_swizzled_offset(rb, s, sp);
        }
        [[fallthrough]];
      default: return (b * nrb + rb) * nseg() + s;
    }
  }
};

// Rows per parallel task: ~32K elements, whatever the row width.
inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
}

// ---------------------------------------------------------------- kernels

template <typename scalar_t>
void quantize_typed(const Tensor& x, const Blocks& bl, const Fp8Format& f, const Tensor& data, const Tensor& scale) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  uint8_t* dp = static_cast<uint8_t*>(data.data_ptr());
  const int64_t nseg = bl.nseg(), rows = bl.rows, cols = bl.cols;
  const int64_t total_rows = bl.nb * rows;

  // (1) amax per (row, segment).
  // MX rows (fixed 32-wide segments) go through the whole-row AVX-512 loops.
  [[maybe_unused]] const bool whole32 = !bl.grouped && fp8_block_cols(bl.recipe) == 32;
  std::vector<float> ra(static_cast<size_t>(total_rows * nseg));
  at::parallel_for(0, total_rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t s0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
      if (whole32) {  // full blocks here, a partial last one below
        amax32_avx512(xp + r * cols, cols / 32, &ra[r * nseg]);
        s0 = cols / 32;
      }
#endif
      for (int64_t s = s0; s < nseg; ++s) {
        ra[r * nseg + s] = row_amax(xp + r * cols + bl.seg[s], bl.seg[s + 1] - bl.seg[s]);
      }
    }
  });

  // (2) per block: amax, multiplier q, stored scale; block rows in parallel
  // (MX has one block per 32 elements: serial, this pass halved its rate).
  const bool mx = bl.recipe == Fp8Recipe::kMX;
  std::vector<float> qs(static_cast<size_t>(bl.nb * bl.nrb * nseg));
  if (bl.swizzle) {
    std::memset(scale.data_ptr(), 0, scale.nbytes());  // the padding of the blocked layout
  }
  float* sf = mx ? nullptr : scale.data_ptr<float>();
  uint8_t* s8 = mx ? static_cast<uint8_t*>(scale.data_ptr()) : nullptr;
  at::parallel_for(0, bl.nb * bl.nrb, std::max<int64_t>(1, 4096 / std::max<int64_t>(nseg, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / bl.nrb, rb = j % bl.nrb;
      const int64_t r1 = std::min(rows, (rb + 1) * bl.block_rows);
      for (int64_t s = 0; s < nseg; ++s) {
        float amax = 0.0f;
        for (int64_t r = rb * bl.block_rows; r < r1; ++r) {
          const float v = ra[(b * rows + r) * nseg + s];
          amax = (std::isnan(v) || std::isnan(amax)) ? std::numeric_limits<float>::quiet_NaN() : std::max(amax, v);
        }
        float q;
        if (mx) {
          uint8_t byte;
          if (!(amax <= std::numeric_limits<float>::max())) {  // NaN or inf
            byte = 0xFF;
            q = std::numeric_limits<float>::quiet_NaN();
          } else {
            int e = static_cast<int>((c10::bit_cast<uint32_t>(amax) >> 23) & 0xFF) - 127 - f.emax;
            e = std::clamp(e, -127, 127);
            byte = static_cast<uint8_t>(e + 127);
            q = c10::bit_cast<float>(static_cast<uint32_t>(127 - e) << 23);  // 2^-e, exact (e <= 119)
          }
          s8[bl.scale_offset(b, rb, s)] = byte;
        } else {
          const float a = amax < 1e-12f ? 1e-12f : amax;  // NaN stays NaN
          q = f.max / a;
          sf[bl.scale_offset(b, rb, s)] = 1.0f / q;
        }
        qs[(b * bl.nrb + rb) * nseg + s] = q;
      }
    }
  });

  // (3) quantize.
  const int64_t covered = bl.covered();
  at::parallel_for(0, total_rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / rows, rb = (r % rows) / bl.block_rows;
      int64_t s0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
      if (whole32) {
        quantize32_avx512(xp + r * cols, dp + r * cols, cols / 32, &qs[(b * bl.nrb + rb) * nseg], f);
        s0 = cols / 32;
      }
#endif
      for (int64_t s = s0; s < nseg; ++s) {
        row_quantize(xp + r * cols + bl.seg[s], dp + r * cols + bl.seg[s], bl.seg[s + 1] - bl.seg[s],
                     qs[(b * bl.nrb + rb) * nseg + s], f);
      }
      if (covered < cols) {
        std::memset(dp + r * cols + covered, 0, cols - covered);
      }
    }
  });
}

void quantize_fp8_kernel(const Tensor& x, Fp8Recipe recipe, const std::optional<Tensor>& offs, bool swizzle,
                         const Tensor& data, const Tensor& scale) {
  const Blocks bl(x, recipe, offs, swizzle);
  const Fp8Format& f = fp8_format(data.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, x.scalar_type(), "quantize_fp8_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      quantize_typed<scalar_t>(x, bl, f, data, scale);
    }
  });
}

template <typename out_t>
void dequantize_typed(const Tensor& data, const Tensor& scale, const Blocks& bl, const Tensor& out) {
  const uint8_t* dp = static_cast<const uint8_t*>(data.const_data_ptr());
  out_t* op = out.data_ptr<out_t>();
  const float* lut = moe_fp8_table(data.scalar_type());
  const bool mx = bl.recipe == Fp8Recipe::kMX;
  const float* sf = mx ? nullptr : scale.const_data_ptr<float>();
  const uint8_t* s8 = mx ? static_cast<const uint8_t*>(scale.const_data_ptr()) : nullptr;
  const int64_t nseg = bl.nseg(), rows = bl.rows, cols = bl.cols, covered = bl.covered();
  at::parallel_for(0, bl.nb * rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / rows, rb = (r % rows) / bl.block_rows;
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t off = bl.scale_offset(b, rb, s);
        const float sc = mx ? moe_e8m0_to_float(s8[off]) : sf[off];
        row_dequantize(dp + r * cols + bl.seg[s], op + r * cols + bl.seg[s], bl.seg[s + 1] - bl.seg[s], sc, lut);
      }
      for (int64_t c = covered; c < cols; ++c) op[r * cols + c] = out_t(0);
    }
  });
}

void dequantize_fp8_kernel(const Tensor& data, const Tensor& scale, Fp8Recipe recipe,
                           const std::optional<Tensor>& offs, bool swizzle, const Tensor& out) {
  const Blocks bl(data, recipe, offs, swizzle);
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, out.scalar_type(), "dequantize_fp8_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      dequantize_typed<scalar_t>(data, scale, bl, out);
    }
  });
}

} // namespace

// Every capability's build registers its copy; the AVX512 one has the
// AVX-512 paths (plain REGISTER_DISPATCH would leave that slot empty).
ALSO_REGISTER_AVX512_DISPATCH(quantize_fp8_stub, &quantize_fp8_kernel)
ALSO_REGISTER_AVX512_DISPATCH(dequantize_fp8_stub, &dequantize_fp8_kernel)

} // namespace at::native

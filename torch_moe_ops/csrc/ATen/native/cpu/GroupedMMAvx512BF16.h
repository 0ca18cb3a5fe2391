#pragma once

// The bfloat16 K-pair kernels of the AVX-512 engine (GroupedMMAvx512.h): on
// CPUs with AVX512_BF16, bfloat16 runs through vdpbf16ps, two K steps per
// instruction, on weights packed as K pairs; elsewhere it stays widened to
// float32. The tile driver reaches these kernels through
// MicroTraits<BFloat16, true>, which MicroTraitsFor<BFloat16> chooses at run
// time. Included by cpu/GroupedMMKernel.cpp in its CPU_CAPABILITY_AVX512
// build only.

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/native/cpu/GroupedMMAvx512.h>

namespace at::native {
namespace {

// vdpbf16ps (AVX512_BF16) is beyond ATen's AVX512 capability (its flags stop
// at AVX512DQ), so the two kernels that use it carry their own target and run
// only where the CPU reports AVX512_BF16 (cpu_has_avx512_bf16).
#define GROUPED_MM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

// Word permutes that interleave two rows of 32 bfloat16 into K pairs: lane
// 2c takes column c of the first row, lane 2c + 1 column c of the second;
// kPairLo for columns 0-15, kPairHi for 16-31.
alignas(64) constexpr int16_t kPairLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                             8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) constexpr int16_t kPairHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                             24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// The weights of K pair kp of the micro-kernel's 64 columns, from the packed
// block, or (kPack) built from the weight rows 2kp and 2kp + 1 (the second
// zero past kc) and stored into the block, as pack_pairs_bf16 lays them out.
// Everything it reads is held in its members, so the kernel keeps it in
// registers across the block's stores (which may alias anything). The rows
// are read with plain loads, so only full 64-column strips: GCC 12 cannot
// tell what a masked load reads, and with one in the loop it kept all 24
// accumulators in memory, stored on every K pair (half the speed).
template <bool kPack>
struct PairWeights {
  const uint32_t* b;
  const BFloat16* src;
  int64_t rs;
  uint32_t* dst;
  __m512i idx0, idx1;

  GROUPED_MM_AVX512_BF16 explicit PairWeights(const uint32_t* b_, const MicroArgs& x)
      : b(b_), src(x.pack_b.src), rs(x.pack_b.rs), dst(x.pack_b.dst), idx0(_mm512_load_si512(kPairLo)),
        idx1(_mm512_load_si512(kPairHi)) {}

  GROUPED_MM_AVX512_BF16 inline __attribute__((always_inline)) void get(__m512bh (&v)[4], int64_t kp,
                                                                        bool second_row) const {
    if constexpr (kPack) {
      const BFloat16* r0 = src + 2 * kp * rs;
      const __m512i x0 = _mm512_loadu_si512(r0), y0 = _mm512_loadu_si512(r0 + 32);
      const __m512i x1 = second_row ? _mm512_loadu_si512(r0 + rs) : _mm512_setzero_si512();
      const __m512i y1 = second_row ? _mm512_loadu_si512(r0 + rs + 32) : _mm512_setzero_si512();
      const __m512i w0 = _mm512_permutex2var_epi16(x0, idx0, x1), w1 = _mm512_permutex2var_epi16(x0, idx1, x1);
      const __m512i w2 = _mm512_permutex2var_epi16(y0, idx0, y1), w3 = _mm512_permutex2var_epi16(y0, idx1, y1);
      uint32_t* to = dst + kp * kNR;
      _mm512_store_si512(to, w0);
      _mm512_store_si512(to + 16, w1);
      _mm512_store_si512(to + 32, w2);
      _mm512_store_si512(to + 48, w3);
      v[0] = (__m512bh)w0, v[1] = (__m512bh)w1, v[2] = (__m512bh)w2, v[3] = (__m512bh)w3;
    } else {
      const uint32_t* from = b + kp * kNR;
      v[0] = (__m512bh)_mm512_load_si512(from), v[1] = (__m512bh)_mm512_load_si512(from + 16);
      v[2] = (__m512bh)_mm512_load_si512(from + 32), v[3] = (__m512bh)_mm512_load_si512(from + 48);
    }
  }
};

// How a micro-kernel (this file's, the inner-product engine's) spreads
// `items` prefetches (rows or lines) over the `steps` steps of its loop:
// `per` at a time, every `every` steps, so that all of them leave from the
// loop. Prefetches issued back to back after it are mostly dropped (Zen 5: a
// block's rows prefetched in a burst read 80 us later at nearly the cost of
// no prefetch; a few cycles apart, at L2 speed).
// Kernels on short K blocks (a weight gradient's few dozen rows) compute
// it on every call, where two divisions cost as much as a few K pairs: the
// common counts, up to two items over two steps or more, take none.
struct PrefetchSpread {
  int64_t per = 1, every = 1;
  PrefetchSpread(int64_t items, int64_t steps) {
    if (items <= 2 && steps >= 2) {
      every = items == 2 ? steps / 2 : steps;
    } else {
      per = std::max<int64_t>(1, (items + steps - 1) / std::max<int64_t>(1, steps));
      every = std::max<int64_t>(1, steps * per / std::max<int64_t>(1, items));
    }
  }
};

// The epilogue of the bfloat16 K-pair kernels. A last K block of full
// 64-column bfloat16 rows without scales is rounded by vcvtne2ps2bf16, 32
// values in one instruction where moe_cvt_f32_bf16 takes eight for 16, a cost
// per call that shows on short K blocks (Zen 4, 1 thread, weight gradients
// of 16 rows per expert, 2048 x 1536 each: 193 -> 181 ms). It rounds to
// nearest even as c10::BFloat16 does, except that it reads denormals as zero
// and keeps a NaN's payload: rows holding either (vfpclassps) take
// finish_acc's conversion, as does every other call.
// The bias is added into the accumulators, which die here, so the sums need
// no registers of their own: formed apart from them, GCC 12 held all 24 sums
// at once (with the accumulators, more than the 32 registers) and spilled
// them to the stack.
template <int MR, typename out_t>
GROUPED_MM_AVX512_BF16 C10_ALWAYS_INLINE void finish_acc_pairs(__m512 (&r)[MR][4], const MicroArgs& x) {
  if constexpr (!std::is_same_v<out_t, BFloat16>) {
    finish_acc<MR, out_t>(r, x);
  } else {
    if (!x.last || x.row_scale != nullptr || x.w != kNR) {
      finish_acc<MR, out_t>(r, x);
      return;
    }
    if (x.bias != nullptr) {
      GROUPED_MM_UNROLL
      for (int j = 0; j < 4; ++j) {
        const __m512 b = _mm512_loadu_ps(x.bias + 16 * j);
        GROUPED_MM_UNROLL
        for (int i = 0; i < MR; ++i) r[i][j] = _mm512_add_ps(r[i][j], b);
      }
    }
    __mmask16 special = 0;
    GROUPED_MM_UNROLL
    for (int i = 0; i < MR; ++i) {
      GROUPED_MM_UNROLL
      for (int j = 0; j < 4; ++j) special |= _mm512_fpclass_ps_mask(r[i][j], 0xA1);  // QNaN | SNaN | denormal
    }
    if (special != 0) {
      MicroArgs summed = x;  // the bias is in r already
      summed.bias = nullptr;
      finish_acc<MR, out_t>(r, summed);
      return;
    }
    GROUPED_MM_UNROLL
    for (int i = 0; i < MR; ++i) {
      BFloat16* o = static_cast<BFloat16*>(x.c) + i * x.ldc;
      const bool stream = x.stream && reinterpret_cast<uintptr_t>(o) % 64 == 0;
      GROUPED_MM_UNROLL
      for (int j = 0; j < 4; j += 2) {
        const __m512i line = (__m512i)_mm512_cvtne2ps_pbh(r[i][j + 1], r[i][j]);
        if (stream) {
          _mm512_stream_si512(reinterpret_cast<__m512i*>(o + 16 * j), line);
        } else {
          _mm512_storeu_si512(o + 16 * j, line);
        }
      }
    }
  }
}

// bfloat16 micro-kernel: a is MicroArgs::blocks x MR rows of kc bfloat16
// (pairs read as 32 bits), run MR at a time, b is ceil(kc / 2) x 64 K pairs,
// which Weights reads (PairWeights<false>) or packs as it goes
// (PairWeights<true>, one block; float8 weights: GroupedMMFloat8Weights.h);
// an odd last element pairs with zero. The row-block loop and the K loop in
// one function: with the K loop in an always-inlined helper, GCC 12 left out
// its prefetches (DeepSeek-V3's 2d3d `kn` row: 0.82x -> 0.61x dense).
template <int MR, typename out_t, typename Weights>
GROUPED_MM_AVX512_BF16 void micro_bf16_pairs(const BFloat16* const* a, const uint32_t* b, const MicroArgs& x) {
  const Weights weights(b, x);
  const int64_t a_step = x.a_step;
  const Prefetch pf_rows = x.pf;
  const int64_t pairs = x.kc / 2;
  // The prefetches shared out among the row blocks.
  const int64_t pf_per_block = (x.pf_end - x.pf_begin) / x.blocks;
  const int64_t pf_extra = (x.pf_end - x.pf_begin) % x.blocks;
  MicroArgs y = x;  // the block's output, accumulator and scale rows
  int64_t pf = x.pf_begin;
  for (int64_t blk = 0; blk < x.blocks; ++blk) {
    __m512 r[MR][4];
    load_acc<MR>(r, y);
    // Held in locals for the same reason as PairWeights' members: read
    // through a and x, they would be reloaded after every packing store.
    const BFloat16* rows[MR];
    GROUPED_MM_UNROLL
    for (int i = 0; i < MR; ++i) rows[i] = a[blk * MR + i];
    const int64_t pf_end = pf + pf_per_block + (blk < pf_extra ? 1 : 0);
    // The rows spread over the K pairs (PrefetchSpread), written out for at
    // most two a step: a call prefetches at most one block's rows, kc <= 2
    // pairs + 1 (an odd block's last row goes after the loop).
    const PrefetchSpread spread(pf_end - pf, pairs);
    const bool two = spread.per > 1;
    const int64_t every = spread.every;
    int64_t until_pf = 0;
    __m512bh bv[4];
    for (int64_t kp = 0; kp < pairs; ++kp) {
      weights.get(bv, kp, true);
      GROUPED_MM_UNROLL
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, rows[i] + kp * a_step, sizeof(pair));
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        r[i][0] = _mm512_dpbf16_ps(r[i][0], av, bv[0]);
        r[i][1] = _mm512_dpbf16_ps(r[i][1], av, bv[1]);
        r[i][2] = _mm512_dpbf16_ps(r[i][2], av, bv[2]);
        r[i][3] = _mm512_dpbf16_ps(r[i][3], av, bv[3]);
      }
      if (--until_pf <= 0 && pf < pf_end) {
        prefetch_row(pf_rows, pf++);
        if (two && pf < pf_end) prefetch_row(pf_rows, pf++);
        until_pf = every;
      }
    }
    if (x.kc % 2 != 0) {
      weights.get(bv, pairs, false);
      GROUPED_MM_UNROLL
      for (int i = 0; i < MR; ++i) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(rows[i][pairs * a_step].x);
        GROUPED_MM_UNROLL
        for (int j = 0; j < 4; ++j) r[i][j] = _mm512_dpbf16_ps(r[i][j], av, bv[j]);
      }
    }
    for (; pf < pf_end; ++pf) prefetch_row(pf_rows, pf);
    finish_acc_pairs<MR, out_t>(r, y);
    y.c = static_cast<out_t*>(y.c) + MR * x.ldc;
    if (y.acc != nullptr) y.acc += MR * x.ld_acc;
    if (y.row_scale != nullptr) y.row_scale += MR;
  }
}

// The kernel that packs float8 weights as it goes (GroupedMMFloat8Weights.h).
template <int MR, typename out_t>
void micro_bf16_float8(const BFloat16* const* a, const uint32_t* b, const MicroArgs& x);

// The traits' kernel: the block packed by this call (x.pack_b.src or
// x.pack_b.src8 set) or before it.
template <int MR, typename out_t>
void micro_bf16(const BFloat16* const* a, const uint32_t* b, const MicroArgs& x) {
  if (x.pack_b.src8 != nullptr) {
    TORCH_INTERNAL_ASSERT(MR <= kFloat8DecodeMR);  // no wider float8 kernel is compiled
    if constexpr (MR <= kFloat8DecodeMR) micro_bf16_float8<MR, out_t>(a, b, x);
  } else if (x.pack_b.src != nullptr) {
    micro_bf16_pairs<MR, out_t, PairWeights<true>>(a, b, x);
  } else {
    micro_bf16_pairs<MR, out_t, PairWeights<false>>(a, b, x);
  }
}

// kc rows of w contiguous bfloat16 (row k at b_row(src, rs, rows, k)) ->
// ceil(kc / 2) x ldw words, word j of row kp = (row 2kp, row 2kp + 1) at
// column j, zero past w and past kc; ldw a multiple of 32.
void pack_pairs_bf16(uint32_t* dst, int64_t ldw, const BFloat16* src, int64_t rs,
                                       const int64_t* rows, int64_t kc, int64_t w) {
  const __m512i idx0 = _mm512_load_si512(kPairLo), idx1 = _mm512_load_si512(kPairHi);
  const int64_t pairs = (kc + 1) / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const BFloat16* r0 = b_row(src, rs, rows, 2 * kp);
    const BFloat16* r1 = 2 * kp + 1 < kc ? b_row(src, rs, rows, 2 * kp + 1) : nullptr;
    for (int64_t j = 0; j < ldw; j += 32) {
      const __mmask32 m = moe_lanes32(w, j);
      const __m512i x0 = r0 != nullptr ? _mm512_maskz_loadu_epi16(m, r0 + j) : _mm512_setzero_si512();
      const __m512i x1 = r1 != nullptr ? _mm512_maskz_loadu_epi16(m, r1 + j) : _mm512_setzero_si512();
      _mm512_store_si512(dst + kp * ldw + j, _mm512_permutex2var_epi16(x0, idx0, x1));
      _mm512_store_si512(dst + kp * ldw + j + 16, _mm512_permutex2var_epi16(x0, idx1, x1));
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

// bfloat16 as K pairs: A read as pairs, weights packed as pairs, 256 K a
// block (the same 32 KB packed block as float32's 128). The kernels above,
// as run_tile_avx512 calls them for traits whose b_t is a K pair (kPairsOf).
template <>
struct MicroTraits<BFloat16, true> {
  using a_t = BFloat16;
  using b_t = uint32_t;
  static constexpr int64_t kKC = 256;

  template <int MR, typename out_t>
  static void micro(const a_t* const* a, const b_t* b, const MicroArgs& x) {
    micro_bf16<MR, out_t>(a, b, x);
  }
  static void pack_pairs(uint32_t* dst, int64_t ldw, const BFloat16* src, int64_t rs, const int64_t* rows,
                         int64_t kc, int64_t w) {
    pack_pairs_bf16(dst, ldw, src, rs, rows, kc, w);
  }
  static void pack_b(uint32_t* dst, const BFloat16* src, int64_t rs, int64_t cs, int64_t kc, int64_t w,
                     const int64_t* rows) {
    pack_b_bf16(dst, src, rs, cs, kc, w, rows);
  }
};

// K pairs where the CPU reports AVX512_BF16, else widened to float32.
template <>
struct MicroTraitsFor<BFloat16> {
  template <typename F>
  static void visit(F&& f) {
    if (cpu_has_avx512_bf16()) {
      f(MicroTraits<BFloat16, true>{});
    } else {
      f(MicroTraits<BFloat16, false>{});
    }
  }
};

} // namespace
} // namespace at::native

#endif // CPU_CAPABILITY_AVX512

"""The PRs before core/0006c5a (the scaled kernel's float8 decode by byte arithmetic) and 0006c5b (float8
weights decoded in grouped mm's engine, patches/manifest.py): the sources without those PRs' code. Every
Copy of these files in an earlier PR applies these anchored edits to the source first (Copy's ``before``,
ahead of its ``undefine`` and ``edits``), which gives the file as it was before them: grouped mm's engine
without Problem::b8 and its scales, scaled_grouped_mm's kernel without the route that uses it, its
rowwise conversion with the table-lookup decode of core/0006c4 and the scalar epilogue.
Each anchor must match exactly once, so an edit of the sources that moves one fails the generator at
that anchor instead of carrying a stale file."""

from __future__ import annotations

import os

from . import changes


def _span(path: str, start: str, stop: str) -> str:
    """changes.source_span of the file itself (these edits are what its SOURCES_BEFORE entry takes out)."""
    with open(os.path.join(changes.REPO_ROOT, path), encoding="utf-8") as f:
        text = f.read()
    if text.count(start) != 1:
        raise ValueError(f"{path}: {start!r} occurs {text.count(start)} times")
    begin = text.index(start)
    return text[begin:text.index(stop, begin)]


NATIVE = "torch_moe_ops/csrc/ATen/native"

UTILS = f"{NATIVE}/cpu/GroupedMMKernelUtils.h"
AVX512 = f"{NATIVE}/cpu/GroupedMMAvx512.h"
BF16 = f"{NATIVE}/cpu/GroupedMMAvx512BF16.h"
INNER_PRODUCT = f"{NATIVE}/cpu/GroupedMMInnerProduct.h"
TRANSPOSED_TILE = f"{NATIVE}/cpu/GroupedMMTransposedTile.h"
KERNEL = f"{NATIVE}/cpu/GroupedMMKernel.cpp"
SCALED_HEADER = f"{NATIVE}/MoEScaledGroupedMM.h"
SCALED_ENTRY = f"{NATIVE}/MoEScaledGroupedMM.cpp"
SCALED_KERNEL = f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp"

# The new files: the engine's float8 packing, and the decode the scaled kernel's conversion shares with it.
FLOAT8_WEIGHTS_H = f"{NATIVE}/cpu/GroupedMMFloat8Weights.h"
FP8_AVX512_H = f"{NATIVE}/cpu/MoEFp8Avx512.h"

_UTILS = [
    (_span(UTILS, "  // Float8 weights (scaled_grouped_mm's rowwise recipe)", "  bool a_gathered()"), ""),
    (_span(UTILS, "// A product over K = 0: zero, scaled", "template <typename out_t, typename P>\nvoid store_bias_only"),
     ""),
    (_span(UTILS, "      std::remove_const_t<std::remove_pointer_t<decltype(P::bias)>> v = 0;", "    }\n  }\n}"),
     "      o[j] = p.bias != nullptr ? static_cast<out_t>(p.bias[n0 + j]) : out_t(0);\n"),
]

_AVX512 = [
    ("  // Row blocks of MR rows the call runs, one after the other (c, acc and\n"
     "  // row_scale step MR rows each): the bfloat16 K-pair kernel's only, whose\n",
     "  // Row blocks of MR rows the call runs, one after the other (c and acc\n"
     "  // step MR rows each): the bfloat16 K-pair kernel's only, whose\n"),
    (_span(AVX512, "  // nullptr, or the MR rows' and the 64 columns' scales", "  int64_t w; // valid output columns"), ""),
    ("  // src8: the same from float8 codes (Problem::b8) of format e5m2.\n", ""),
    ("    const uint8_t* src8 = nullptr;\n    bool e5m2 = false;\n", ""),
    (_span(AVX512, "  if (x.last && x.row_scale != nullptr) {", "  for (int i = 0; i < MR; ++i) {\n    if (x.last) {"), ""),
    (_span(AVX512, "// Float8 weights (Problem::b8): their packing and prefetch", "// One tile: all rows of the problem"), ""),
    (_span(AVX512, "  if constexpr (!kPairsOf<Traits>) {\n    TORCH_INTERNAL_ASSERT(p.b8", "  constexpr int64_t kBRows"), ""),
    ("  const bool b_prefetch = weights_prefetched(p);\n",
     "  // Weight rows are prefetched only when they are unit-stride rows in order.\n"
     "  const bool b_prefetch = p.b_cs == 1 && p.b_idx == nullptr;\n"),
    ("        const scalar_t* b_blk = p.b8 != nullptr ? nullptr : p.b + (b_rows != nullptr ? 0 : k0 * p.b_rs) + j0 * p.b_cs;\n",
     "        const scalar_t* b_blk = p.b + (b_rows != nullptr ? 0 : k0 * p.b_rs) + j0 * p.b_cs;\n"),
    ("        // So are float8 weights stored (K, N) (GroupedMMFloat8Weights.h).\n", ""),
    (_span(AVX512, "        const uint8_t* b8_blk = ", "        } else {\n          pack_b_f32("),
     "        if constexpr (kPairsOf<Traits>) {\n"
     "          if (!pack_in_kernel) Traits::pack_b(bpack, b_blk, p.b_rs, p.b_cs, kc, w, b_rows);\n"),
    (_span(AVX512, "          const auto block = [&](const auto& q, const Tile& u, int64_t i) {", "        MicroArgs x;"),
     "          if (ahead < blocks) {\n"
     "            pf = weight_block<scalar_t>(p, t, ahead, kKC);\n"
     "          } else if (next != nullptr && m0 + kMC >= p.m && next_p->b_cs == 1 && next_p->b_idx == nullptr) {\n"
     "            pf = weight_block<scalar_t>(*next_p, *next, ahead - blocks, kKC);\n"
     "          }\n"
     "        }\n"),
    ("        x.col_scale = p.col_scale != nullptr ? p.col_scale + j0 : nullptr;\n", ""),
    ("          x.row_scale = p.row_scale != nullptr ? p.row_scale + m0 + r0 : nullptr;\n", ""),
    (_span(AVX512, "// Rows of a first row block that decodes float8 weights", "constexpr int64_t kNR = 64;"), ""),
    ("std::min(pack_in_kernel && b8_blk != nullptr ? kFloat8DecodeMR : kMR, mc);\n", "std::min(kMR, mc);\n"),
    ("            x.pack_b.src8 = pack_in_kernel && mb == 0 ? b8_blk : nullptr;\n"
     "            x.pack_b.e5m2 = p.b8_e5m2;\n", ""),
]

_BF16 = [
    ("    if (!x.last || x.row_scale != nullptr || x.w != kNR) {\n",
     "    if (!x.last || x.w != kNR) {\n"),
    ("  MicroArgs y = x;  // the block's output, accumulator and scale rows\n",
     "  MicroArgs y = x;  // the block's output and accumulator rows\n"),
    ("    if (y.row_scale != nullptr) y.row_scale += MR;\n", ""),
    ("// (pairs read as 32 bits), run MR at a time, b is ceil(kc / 2) x 64 K pairs,\n"
     "// which Weights reads (PairWeights<false>) or packs as it goes\n"
     "// (PairWeights<true>, one block; float8 weights: GroupedMMFloat8Weights.h);\n"
     "// an odd last element pairs with zero. The row-block loop and the K loop in\n",
     "// (pairs read as 32 bits), run MR at a time, b is ceil(kc / 2) x 64 K pairs\n"
     "// (kPack: packed by this call, one block); an odd last element pairs with\n"
     "// zero. The row-block loop and the K loop in\n"),
    ("// its prefetches (DeepSeek-V3's 2d3d `kn` row: 0.82x -> 0.61x dense).\n"
     "template <int MR, typename out_t, typename Weights>\n",
     "// its prefetches (DeepSeek-V3's 2d3d `kn` row: 0.82x -> 0.61x dense).\n"
     "template <int MR, typename out_t, bool kPack>\n"),
    ("  const Weights weights(b, x);\n", "  const PairWeights<kPack> weights(b, x);\n"),
    (_span(BF16, "// The kernel that packs float8 weights as it goes", "void pack_pairs_bf16("),
     "// The traits' kernel: the block packed by this call (x.pack_b.src set) or before it.\n"
     "template <int MR, typename out_t>\n"
     "void micro_bf16(const BFloat16* const* a, const uint32_t* b, const MicroArgs& x) {\n"
     "  if (x.pack_b.src != nullptr) {\n"
     "    micro_bf16_pairs<MR, out_t, true>(a, b, x);\n"
     "  } else {\n"
     "    micro_bf16_pairs<MR, out_t, false>(a, b, x);\n"
     "  }\n"
     "}\n"
     "\n"
     "// kc rows of w contiguous bfloat16 (row k at b_row(src, rs, rows, k)) ->\n"
     "// ceil(kc / 2) x ldw words, word j of row kp = (row 2kp, row 2kp + 1) at\n"
     "// column j, zero past w and past kc; ldw a multiple of 32.\n"),
]

_INNER_PRODUCT = [
    ("      p.b8 == nullptr && p.k >= 64;\n", "      p.k >= 64;\n"),
]

_TRANSPOSED_TILE = [
    ("  const bool nk = p.b_rs == 1 && p.b_cs != 1 && p.b_idx == nullptr && p.b8 == nullptr &&\n"
     "      (p.m <= kTtMaxRows || p.a_cs != 1);\n",
     "  const bool nk = p.b_rs == 1 && p.b_cs != 1 && p.b_idx == nullptr && (p.m <= kTtMaxRows || p.a_cs != 1);\n"),
]

_KERNEL = [
    (_span(KERNEL, "// Float8 weights (GroupedMMFloat8Weights.h;", "// Accumulation is in float32"), ""),
    ("#include <ATen/native/MoEScaledGroupedMM.h>\n", ""),
    ("#include <ATen/native/cpu/GroupedMMFloat8Weights.h>\n", ""),
    ("  // Float8 weights (Problem::b8) run on the broadcast engine only, whatever their size.\n"
     "  if (std::any_of(problems.begin(), problems.end(), [](const auto& p) { return p.b8 != nullptr; })) {\n"
     "    return Engine::kAvx512;\n"
     "  }\n", ""),
    ("      if (p.m <= p.n || p.n == 0 || p.k == 0 || p.b_rs != 1 || p.b8 != nullptr) continue;\n",
     "      if (p.m <= p.n || p.n == 0 || p.k == 0 || p.b_rs != 1) continue;\n"),
    (_span(KERNEL, "#if defined(CPU_CAPABILITY_AVX512)\n// The rowwise recipe's 2D x 3D or 3D x 3D product",
           "} // namespace\n\n// Every capability's build"), ""),
    ("ALSO_REGISTER_AVX512_DISPATCH(grouped_mm_float8_weights_stub, &grouped_mm_float8_weights_kernel)\n", ""),
]

_SCALED_HEADER = [
    (_span(SCALED_HEADER, "// The rowwise recipe's 2D x 3D and 3D x 3D products on grouped_mm's CPU", "Tensor scaled_grouped_mm_cpu("),
     ""),
]

_SCALED_ENTRY = [
    ("DEFINE_DISPATCH(grouped_mm_float8_weights_stub);\n", ""),
]

# core/0006c4's rowwise conversion: the magnitude looked up in a table of bfloat16 bits, 32 codes a step.
_TABLE_DECODE = (
    "// The bfloat16 bits of the 128 float8 magnitudes (sign bit clear) of each\n"
    "// format, from the exact table. Four 32-entry vectors: vpermt2w looks up 64\n"
    "// entries at once, so two lookups and a blend cover a magnitude.\n"
    "inline const uint16_t* fp8_magnitude_bf16_bits(bool e5m2) {\n"
    "  static const auto bits = [] {\n"
    "    std::array<std::array<uint16_t, 128>, 2> out{};\n"
    "    for (int f = 0; f < 2; ++f) {\n"
    "      const float* lut = moe_fp8_table(f == 1 ? kFloat8_e5m2 : kFloat8_e4m3fn);\n"
    "      for (int i = 0; i < 128; ++i) out[f][i] = c10::BFloat16(lut[i]).x;\n"
    "    }\n"
    "    return out;\n"
    "  }();\n"
    "  return bits[e5m2 ? 1 : 0].data();\n"
    "}\n"
    "\n"
    "// An unscaled run into bfloat16, 32 lanes at a time: a table lookup of the\n"
    "// magnitude in 16-bit lanes, the sign or-ed on. The same bits as the float32\n"
    "// route below (values exact; NaN -> 0x7FC0, as c10::BFloat16(float) gives),\n"
    "// at a third of its instructions: this pass, not the GEMM, bounded fp8 once\n"
    "// the GEMM ran on vdpbf16ps.\n"
    "inline void convert_run_bf16_unscaled(const Run& run, BFloat16* dst, bool e5m2) {\n"
    "  const uint16_t* bits = fp8_magnitude_bf16_bits(e5m2);\n"
    "  const __m512i t0 = _mm512_loadu_si512(bits), t1 = _mm512_loadu_si512(bits + 32);\n"
    "  const __m512i t2 = _mm512_loadu_si512(bits + 64), t3 = _mm512_loadu_si512(bits + 96);\n"
    "  for (int64_t i = 0; i < run.n; i += 32) {\n"
    "    const __mmask32 m = moe_lanes32(run.n, i);\n"
    "    _mm_prefetch(reinterpret_cast<const char*>(run.src + i + kDecodePrefetchBytes), _MM_HINT_T0);\n"
    "    const __m512i b = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, run.src + i));\n"
    "    const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi16(0x7F));\n"
    "    // vpermt2w reads the low 6 index bits: magnitudes 64-127 look up t2/t3 as 0-63.\n"
    "    const __m512i low = _mm512_permutex2var_epi16(t0, mag, t1);\n"
    "    const __m512i high = _mm512_permutex2var_epi16(t2, mag, t3);\n"
    "    __m512i v = _mm512_mask_mov_epi16(low, _mm512_test_epi16_mask(mag, _mm512_set1_epi16(0x40)), high);\n"
    "    const __mmask32 nan = _mm512_cmpgt_epu16_mask(v, _mm512_set1_epi16(0x7F80));\n"
    "    v = _mm512_or_si512(v, _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8));\n"
    "    v = _mm512_mask_mov_epi16(v, nan, _mm512_set1_epi16(0x7FC0));\n"
    "    _mm512_mask_storeu_epi16(dst + i, m, v);\n"
    "  }\n"
    "}\n"
    "\n"
)

# core/0006c5b's route in the scaled kernel: the weights left to grouped mm's engine.
_SCALED_KERNEL = [
    (_span(SCALED_KERNEL, "// Rowwise weights in 2D x 3D and 3D x 3D skip the conversion", "// Exactness: float8"), ""),
    (_span(SCALED_KERNEL, "#if defined(CPU_CAPABILITY_AVX512)\n// Rowwise float8 weights in 2D x 3D and 3D x 3D",
           "void scaled_grouped_mm_kernel("), ""),
    (_span(SCALED_KERNEL, "#if defined(CPU_CAPABILITY_AVX512)\n  const auto layout = grouped_mm_layout(mat_a, mat_b);",
           "  if (out.scalar_type() == kFloat) {"), ""),
]

# core/0006c5a: the byte-arithmetic decode (MoEFp8Avx512.h) in place of 0006c4's table, the vector epilogue.
_SCALED_KERNEL_DECODE = [
    ("// for denormals; byte tables) that Vectorized<T> has no operations for.\n",
     "// for denormals; 16-bit table lookups) that Vectorized<T> has no operations for.\n"),
    ("#include <ATen/native/cpu/MoEFp8Avx512.h>\n", ""),
    (_span(SCALED_KERNEL, "// An unscaled run into bfloat16, 64 lanes at a time", "template <typename dst_t>\nvoid convert_run_avx512"),
     _TABLE_DECODE),
    (_span(SCALED_KERNEL, "// One output row of a block (epilogue below)", "#if defined(__GNUC__) && !defined(__clang__)\n#pragma GCC diagnostic pop"),
     ""),
    ("#if defined(CPU_CAPABILITY_AVX512)\n"
     "      epilogue_row_avx512(a, o, bl.cols, bl.sa != nullptr ? bl.sa + r : nullptr, bl.sb, bl.bias);\n"
     "      continue;\n"
     "#endif\n", ""),
]

# source -> the edits that take core/0006c5b's code out of it (the PRs before it, 0006c5a included).
BEFORE = {
    UTILS: _UTILS,
    AVX512: _AVX512,
    BF16: _BF16,
    INNER_PRODUCT: _INNER_PRODUCT,
    TRANSPOSED_TILE: _TRANSPOSED_TILE,
    KERNEL: _KERNEL,
    SCALED_HEADER: _SCALED_HEADER,
    SCALED_ENTRY: _SCALED_ENTRY,
    SCALED_KERNEL: _SCALED_KERNEL,
}

# ... and the edits that take core/0006c5a's out too (the PRs before 0006c5a).
BEFORE_DECODE = {path: edits + (_SCALED_KERNEL_DECODE if path == SCALED_KERNEL else []) for path, edits in BEFORE.items()}

changes.SOURCES_BEFORE.update(BEFORE_DECODE)

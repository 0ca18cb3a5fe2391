"""The fp8 quantisation ops land op by op, then recipe family by recipe family
(core/0006, 0006a1-a4 of patches/manifest.py): _quantize_fp8 tensorwise and
rowwise, then _dequantize_fp8 (the same recipes), then the blocked recipes
(1x128, 128x128), then MX (e8m0 scales, the swizzled layout), then the
AVX-512 rows of the kernel. Each PR carries the files as it leaves them; the
recipes not yet landed are rejected by the recipe parser with the list of
those that are.

The cuts, as anchored (old, new) edits: NO_MX_* take the MX recipe out of the
in-repo sources, NO_BLOCKED_* then take the blocked recipes out of the result,
NO_DEQUANTIZE_* (applied first, computed from the sources) take
_dequantize_fp8 out for the first PR. A PR before MX applies NO_MX (then
NO_BLOCKED before the blocked recipes); the generated files (the meta block,
the OpInfo module) get the same edits and the PR that lands a family applies
them reversed (``landing``). The kernel's AVX-512 rows (its
``#if defined(CPU_CAPABILITY_AVX512)`` blocks, the MX whole-row loops among
them) are left out by ``undefine`` until the last PR. The device-generic
fallbacks of MoEQuantize.cpp (ATen operations, which the CUDA entries of
core/0007 run) are cut by the same edits, so each recipe PR grows the kernel
and the fallback together; the first PR's CPU entry computes through the
fallback (ON_FALLBACK_*), the kernel comes in the next (core/0006.1).
"""

from __future__ import annotations

import os

from . import rewrite
from .changes import REPO_ROOT, undefine

Edits = list[tuple[str, str]]


def landing(edits: Edits) -> Edits:
    """The edits that undo ``edits`` on the text they produced (a later PR's diff)."""
    return [(new, old) for old, new in reversed(edits)]


# -- ATen/native/MoEQuantize.h --------------------------------------------------------------------------

NO_MX_HEADER: Edits = [(
    "//   mx                  1 x 32     (R, ceil(C/32))      (B, R, ceil(C/32))     float8_e8m0fnu\n", "",
), (
    "// MX (OCP MX v1.0 with torchao's default \"floor\" rounding of the scale):\n"
    "// scale = 2^(floor(log2(amax)) - emax), emax = 8 for e4m3fn, 15 for e5m2,\n"
    "// floor(log2) read from amax's float32 exponent field (so a denormal or zero\n"
    "// amax gives the smallest scale, 2^-127) and the exponent clamped to\n"
    "// [-127, 127]; data = fp8(clamp(x * 2^-e, ...)) as above, the multiply exact.\n"
    "// Non-finite inputs: a block holding NaN or +-inf gets a NaN scale (MX: the\n"
    "// e8m0 NaN, 0xFF; float: inf amax gives q = 0 and scale = inf), and the block\n",
    "// Non-finite inputs: a block holding NaN or +-inf gets a NaN scale (inf amax\n"
    "// gives q = 0 and scale = inf), and the block\n",
), (
    "//   layout); mx: the blocks are unchanged, and offs must split C on multiples\n"
    "//   of 32. Elements past offs[-1] belong to no group and quantise to zero\n"
    "//   (tensorwise, rowwise). The 1x128",
    "//   layout). Elements past offs[-1] belong to no group and quantise to zero.\n"
    "//   The 1x128",
), (
    "//\n"
    "// swizzle (mx only, no offs): the scale in the blocked layout upstream's CUDA\n"
    "// MX kernels read (cuBLAS \"32_4_4\"): the (R, S) scale grid, padded with zero\n"
    "// bytes to (round_up(R, 128), round_up(S, 4)), cut into 128 x 4 tiles stored\n"
    "// one after the other (row tiles outer), element (32 i + j, c) of a tile at\n"
    "// byte 16 j + 4 i + c. Shape (round_up(R, 128), round_up(S, 4)) for 2-D x,\n"
    "// (B, round_up(R, 128) * round_up(S, 4)) for 3-D x, as upstream checks them.\n",
    "//\n"
    "// swizzle: the MX recipe's scale layout, not yet supported: swizzle=True is\n"
    "// rejected.\n",
), (
    "kBlock128x128, kMX };", "kBlock128x128 };",
), (
    "  if (recipe == \"blockwise_128x128\") return Fp8Recipe::kBlock128x128;\n"
    "  TORCH_CHECK_VALUE(recipe == \"mx\", op,\n"
    "      \": recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' or 'mx', got '\", recipe,\n"
    "      \"'\");\n"
    "  return Fp8Recipe::kMX;\n",
    "  TORCH_CHECK_VALUE(recipe == \"blockwise_128x128\", op,\n"
    "      \": recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128' or 'blockwise_128x128', got '\", recipe, \"'\");\n"
    "  return Fp8Recipe::kBlock128x128;\n",
), (
    "    case Fp8Recipe::kMX: return 32;\n", "",
), (
    "inline ScalarType fp8_scale_dtype(Fp8Recipe r) {\n  return r == Fp8Recipe::kMX ? kFloat8_e8m0fnu : kFloat;\n}\n",
    "inline ScalarType fp8_scale_dtype(Fp8Recipe /*r*/) {\n  return kFloat;\n}\n",
), (
    "inline int64_t fp8_round_up(int64_t a, int64_t b) {\n"
    "  return fp8_ceil_div(a, b) * b;\n"
    "}\n"
    "\n"
    "// Byte offset of scale-grid element (r, s) in the swizzled (blocked 32_4_4)\n"
    "// layout of an (R, S) grid whose padded width is sp = round_up(S, 4).\n"
    "// fp8_unswizzle_scale (MoEQuantize.cpp) is its inverse on whole tensors.\n"
    "inline int64_t fp8_swizzled_offset(int64_t r, int64_t s, int64_t sp) {\n"
    "  const int64_t tile = (r / 128) * (sp / 4) + s / 4;\n"
    "  return tile * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + s % 4;\n"
    "}\n"
    "\n",
    "",
), (
    "      default: break;  // mx: as without offs\n", "      default: break;\n",
), (
    "    case Fp8Recipe::kBlock1x128:\n"
    "    case Fp8Recipe::kMX: {\n"
    "      const int64_t s = fp8_ceil_div(cols, fp8_block_cols(recipe));\n"
    "      if (swizzle) {\n"
    "        const int64_t rp = fp8_round_up(rows, 128), sp = fp8_round_up(s, 4);\n"
    "        if (sizes.size() == 2) {\n"
    "          out.push_back(rp);\n"
    "          out.push_back(sp);\n"
    "        } else {\n"
    "          out.push_back(rp * sp);\n"
    "        }\n"
    "      } else {\n"
    "        out.push_back(rows);\n"
    "        out.push_back(s);\n"
    "      }\n"
    "      break;\n"
    "    }\n",
    "    case Fp8Recipe::kBlock1x128:\n"
    "      out.push_back(rows);\n"
    "      out.push_back(fp8_ceil_div(cols, 128));\n"
    "      break;\n",
), (
    "// The plain (B, R, S) grids of swizzled MX scales, (B, round_up(R, 128) *\n"
    "// round_up(S, 4)) or, for one 2-D grid, (round_up(R, 128), round_up(S, 4)):\n"
    "// a view where it can be (ATen operations, any device).\n"
    "Tensor fp8_unswizzle_scale(const Tensor& scale, int64_t nb, int64_t rows, int64_t s);\n"
    "\n",
    "",
), (
    "  TORCH_CHECK_VALUE(!swizzle || recipe == Fp8Recipe::kMX,\n", "  TORCH_CHECK_VALUE(!swizzle,\n",
), (
    " || recipe == Fp8Recipe::kRowwise || recipe == Fp8Recipe::kMX,\n", " || recipe == Fp8Recipe::kRowwise,\n",
), (
    "// Values of a CPU offs: non-decreasing, within C, and (mx) on block bounds.\n",
    "// Values of a CPU offs: non-decreasing and within C.\n",
), (
    "    TORCH_CHECK_VALUE(recipe != Fp8Recipe::kMX || end % 32 == 0 || end == cols,\n"
    "        op, \": with recipe 'mx' every group must hold whole 32-element blocks: offs[g] must be a multiple of 32 \"\n"
    "        \"or C=\", cols, \", got offs[\", g, \"]=\", end);\n",
    "",
)]

NO_BLOCKED_HEADER: Edits = [(
    "//   blockwise_1x128     1 x 128    (R, ceil(C/128))     (B, R, ceil(C/128))    float32\n"
    "//   blockwise_128x128   128 x 128  (ceil(R/128), ceil(C/128)) (B, ...)         float32\n",
    "",
), (
    "//   layout). Elements past offs[-1] belong to no group and quantise to zero.\n"
    "//   The 1x128 and 128x128 recipes take no offs (their\n"
    "//   per-group block counts would depend on the values of offs).\n"
    "// Rows (the tokens of a 2D x 3D forward operand) need no offs: no recipe's\n"
    "// block spans two rows except 128x128, which is meant for weights.\n",
    "//   layout). Elements past offs[-1] belong to no group and quantise to zero.\n"
    "// Rows (the tokens of a 2D x 3D forward operand) need no offs: no rowwise\n"
    "// block spans two rows.\n",
), (
    "enum class Fp8Recipe { kTensorwise, kRowwise, kBlock1x128, kBlock128x128 };",
    "enum class Fp8Recipe { kTensorwise, kRowwise };",
), (
    "  if (recipe == \"rowwise\") return Fp8Recipe::kRowwise;\n"
    "  if (recipe == \"blockwise_1x128\") return Fp8Recipe::kBlock1x128;\n"
    "  TORCH_CHECK_VALUE(recipe == \"blockwise_128x128\", op,\n"
    "      \": recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128' or 'blockwise_128x128', got '\", recipe, \"'\");\n"
    "  return Fp8Recipe::kBlock128x128;\n",
    "  TORCH_CHECK_VALUE(recipe == \"rowwise\", op, \": recipe must be 'tensorwise' or 'rowwise', got '\", recipe, \"'\");\n"
    "  return Fp8Recipe::kRowwise;\n",
), (
    "// Block extent along C; 0 means the whole row (or group).\n"
    "inline int64_t fp8_block_cols(Fp8Recipe r) {\n"
    "  switch (r) {\n"
    "    case Fp8Recipe::kBlock1x128: return 128;\n"
    "    case Fp8Recipe::kBlock128x128: return 128;\n"
    "    default: return 0;\n"
    "  }\n"
    "}\n",
    "// Block extent along C; 0 means the whole row (or group).\n"
    "inline int64_t fp8_block_cols(Fp8Recipe /*r*/) {\n"
    "  return 0;\n"
    "}\n",
), (
    "    case Fp8Recipe::kBlock128x128: return 128;\n    default: return 1;\n",
    "    default: return 1;\n",
), (
    "  const int64_t cols = sizes[sizes.size() - 1];\n  std::vector<int64_t> out(", "  std::vector<int64_t> out(",
), (
    "    case Fp8Recipe::kBlock1x128:\n"
    "      out.push_back(rows);\n"
    "      out.push_back(fp8_ceil_div(cols, 128));\n"
    "      break;\n"
    "    case Fp8Recipe::kBlock128x128:\n"
    "      out.push_back(fp8_ceil_div(rows, 128));\n"
    "      out.push_back(fp8_ceil_div(cols, 128));\n"
    "      break;\n",
    "",
), (
    "    TORCH_CHECK_VALUE(recipe == Fp8Recipe::kTensorwise || recipe == Fp8Recipe::kRowwise,\n"
    "        op, \": offs is supported with recipes 'tensorwise', 'rowwise' and 'mx', got '\", recipe_name, \"'\");\n",
    "",
)]

# -- ATen/native/MoEQuantize.cpp, cpu/MoEFp8Utils.h ----------------------------------------------------

NO_MX_ENTRY: Edits = [(
    "// The unswizzling of swizzled MX scales (ATen operations too).\n", "",
), (
    "// The exponent of the largest power of two below fp8_max (OCP MX emax_elem).\n"
    "int64_t fp8_emax(ScalarType t) {\n"
    "  return t == kFloat8_e5m2 ? 15 : 8;\n"
    "}\n"
    "\n",
    "",
), (
    "std::pair<Tensor, Tensor> fp8_block_scales(const Tensor& amax, Fp8Recipe recipe, ScalarType float8) {\n"
    "  if (recipe == Fp8Recipe::kMX) {\n"
    "    // floor(log2(amax)) from the float32 exponent field; 255 is inf or NaN.\n"
    "    const Tensor field = amax.contiguous().view(kInt).bitwise_right_shift(23).bitwise_and(0xFF);\n"
    "    const Tensor e = field.sub(127 + fp8_emax(float8)).clamp(-127, 127);\n"
    "    const Tensor finite = field.ne(255);\n"
    "    const Tensor byte = at::where(finite, e.add(127), at::scalar_tensor(255, e.options())).to(kByte);\n"
    "    const Tensor pow2 = e.neg().add(127).bitwise_left_shift(23).view(kFloat);  // 2^-e, exact\n"
    "    return {at::where(finite, pow2, kNaN), byte.view(kFloat8_e8m0fnu)};\n"
    "  }\n",
    "std::pair<Tensor, Tensor> fp8_block_scales(const Tensor& amax, Fp8Recipe /*recipe*/, ScalarType float8) {\n",
), (
    "// The blocked 32_4_4 layout of (B, R, S) scale grids (bytes).\n"
    "Tensor fp8_swizzle(const Tensor& grid, bool two_d) {\n"
    "  const int64_t nb = grid.size(0), rows = grid.size(1), s = grid.size(2);\n"
    "  const int64_t rp = fp8_round_up(rows, 128), sp = fp8_round_up(s, 4);\n"
    "  const Tensor padded = at::constant_pad_nd(grid, {0, sp - s, 0, rp - rows}, 0);\n"
    "  // row 128 t + 32 i + j, column 4 u + c  ->  [t][u][j][i][c]\n"
    "  const Tensor tiles = padded.view({nb, rp / 128, 4, 32, sp / 4, 4}).permute({0, 1, 4, 3, 2, 5}).contiguous();\n"
    "  return fp8_dense_output(two_d ? tiles.view({rp, sp}) : tiles.view({nb, rp * sp}));\n"
    "}\n"
    "\n"
    "// e8m0 -> float32: 2^(b - 127); 0 is the denormal 2^-127, 0xFF is NaN.\n"
    "Tensor e8m0_to_float(const Tensor& scale) {\n"
    "  const Tensor b = scale.view(kByte).to(kInt);\n"
    "  Tensor bits = at::where(b.eq(0), at::scalar_tensor(0x00400000, b.options()), b.bitwise_left_shift(23));\n"
    "  bits = at::where(b.eq(255), at::scalar_tensor(0x7FC00000, b.options()), bits);\n"
    "  return bits.view(kFloat);\n"
    "}\n"
    "\n",
    "",
), (
    "const std::optional<Tensor>& offs, bool swizzle) {\n  const Tensor xf = x.to(kFloat);\n",
    "const std::optional<Tensor>& offs, bool /*swizzle*/) {\n  const Tensor xf = x.to(kFloat);\n",
), (
    "  if (offs.has_value() && recipe != Fp8Recipe::kMX) {  // tensorwise/rowwise per group of columns\n",
    "  if (offs.has_value()) {  // per group of columns\n",
), (
    "  if (swizzle) {\n"
    "    return {data, fp8_swizzle(scale.view(kByte), x.dim() == 2).view(kFloat8_e8m0fnu)};\n"
    "  }\n",
    "",
), (
    "\nTensor fp8_unswizzle_scale(const Tensor& scale, int64_t nb, int64_t rows, int64_t s) {\n"
    "  const int64_t rp = fp8_round_up(rows, 128), sp = fp8_round_up(s, 4);\n"
    "  // [t][u][j][i][c] -> row 128 t + 32 i + j, column 4 u + c (fp8_swizzled_offset)\n"
    "  return scale.reshape({nb, rp / 128, sp / 4, 32, 4, 4}).permute({0, 1, 4, 3, 2, 5}).reshape({nb, rp, sp})\n"
    "      .narrow(1, 0, rows).narrow(2, 0, s);\n"
    "}\n",
    "",
)]

NO_MX_UTILS: Edits = [(
    "// scaled grouped mm): exact tables and the e8m0 scale format. In the\n"
    "// CPU_CAPABILITY namespace, so each capability's build keeps its own copy.\n",
    "// scaled grouped mm): exact tables. In the CPU_CAPABILITY namespace, so each\n"
    "// capability's build keeps its own copy.\n",
), (
    "#include <c10/util/bit_cast.h>\n", "",
), (
    "\n// e8m0 -> float32: 2^(b - 127); 0 is the denormal 2^-127, 0xFF is NaN.\n"
    "inline float moe_e8m0_to_float(uint8_t b) {\n"
    "  if (b == 0xFF) return std::numeric_limits<float>::quiet_NaN();\n"
    "  if (b == 0) return c10::bit_cast<float>(0x00400000u);\n"
    "  return c10::bit_cast<float>(static_cast<uint32_t>(b) << 23);\n"
    "}\n",
    "",
), (
    "#include <limits>\n", "",
)]

# -- cpu/MoEQuantizeKernel.cpp (without its CPU_CAPABILITY_AVX512 blocks) -------------------------------

PORTABLE_KERNEL: Edits = [(
    "#include <ATen/native/cpu/MoEAvx512Utils.h>\n", "",
), (
    "      int64_t s0 = 0;\n      for (int64_t s = s0; s < nseg; ++s) {\n        ra[",
    "      for (int64_t s = 0; s < nseg; ++s) {\n        ra[",
), (
    "      int64_t s0 = 0;\n      for (int64_t s = s0; s < nseg; ++s) {\n        row_quantize(",
    "      for (int64_t s = 0; s < nseg; ++s) {\n        row_quantize(",
), (
    "// code (the bits of c10's conversion on clamped inputs), AVX-512 where the\n"
    "// CPU has it, so that both paths give the same bytes.\n",
    "// code (the bits of c10's conversion on clamped inputs), so that an AVX-512\n"
    "// path can give the same bytes.\n",
), (
    "// Every capability's build registers its copy; the AVX512 one has the\n"
    "// AVX-512 paths (plain REGISTER_DISPATCH would leave that slot empty).\n",
    "// Every capability's build registers its copy (plain REGISTER_DISPATCH\n"
    "// would leave the AVX512 slot empty).\n",
)]

NO_MX_KERNEL: Edits = [(
    "  int emax;  // exponent of the largest power of two below max (OCP MX emax_elem)\n", "",
), (
    "constexpr Fp8Format kE4M3{3, 7, 121u << 23, 141u << 23, 448.0f, 8};\n"
    "constexpr Fp8Format kE5M2{2, 15, 113u << 23, 134u << 23, 57344.0f, 15};\n",
    "constexpr Fp8Format kE4M3{3, 7, 121u << 23, 141u << 23, 448.0f};\n"
    "constexpr Fp8Format kE5M2{2, 15, 113u << 23, 134u << 23, 57344.0f};\n",
), (
    "    grouped = offs.has_value() && r != Fp8Recipe::kMX;\n", "    grouped = offs.has_value();\n",
), (
    "      case Fp8Recipe::kMX:\n"
    "        if (swizzle) {\n"
    "          const int64_t sp = fp8_round_up(nseg(), 4);\n"
    "          return b * fp8_round_up(rows, 128) * sp + fp8_swizzled_offset(rb, s, sp);\n"
    "        }\n"
    "        [[fallthrough]];\n",
    "",
), (
    "  // MX rows (fixed 32-wide segments) go through the whole-row AVX-512 loops.\n"
    "  [[maybe_unused]] const bool whole32 = !bl.grouped && fp8_block_cols(bl.recipe) == 32;\n",
    "",
), (
    "  // (2) per block: amax, multiplier q, stored scale; block rows in parallel\n"
    "  // (MX has one block per 32 elements: serial, this pass halved its rate).\n"
    "  const bool mx = bl.recipe == Fp8Recipe::kMX;\n"
    "  std::vector<float> qs(static_cast<size_t>(bl.nb * bl.nrb * nseg));\n"
    "  if (bl.swizzle) {\n"
    "    std::memset(scale.data_ptr(), 0, scale.nbytes());  // the padding of the blocked layout\n"
    "  }\n"
    "  float* sf = mx ? nullptr : scale.data_ptr<float>();\n"
    "  uint8_t* s8 = mx ? static_cast<uint8_t*>(scale.data_ptr()) : nullptr;\n",
    "  // (2) per block: amax, multiplier q, stored scale; block rows in parallel.\n"
    "  std::vector<float> qs(static_cast<size_t>(bl.nb * bl.nrb * nseg));\n"
    "  float* sf = scale.data_ptr<float>();\n",
), (
    "        float q;\n"
    "        if (mx) {\n"
    "          uint8_t byte;\n"
    "          if (!(amax <= std::numeric_limits<float>::max())) {  // NaN or inf\n"
    "            byte = 0xFF;\n"
    "            q = std::numeric_limits<float>::quiet_NaN();\n"
    "          } else {\n"
    "            int e = static_cast<int>((c10::bit_cast<uint32_t>(amax) >> 23) & 0xFF) - 127 - f.emax;\n"
    "            e = std::clamp(e, -127, 127);\n"
    "            byte = static_cast<uint8_t>(e + 127);\n"
    "            q = c10::bit_cast<float>(static_cast<uint32_t>(127 - e) << 23);  // 2^-e, exact (e <= 119)\n"
    "          }\n"
    "          s8[bl.scale_offset(b, rb, s)] = byte;\n"
    "        } else {\n"
    "          const float a = amax < 1e-12f ? 1e-12f : amax;  // NaN stays NaN\n"
    "          q = f.max / a;\n"
    "          sf[bl.scale_offset(b, rb, s)] = 1.0f / q;\n"
    "        }\n",
    "        const float a = amax < 1e-12f ? 1e-12f : amax;  // NaN stays NaN\n"
    "        const float q = f.max / a;\n"
    "        sf[bl.scale_offset(b, rb, s)] = 1.0f / q;\n",
)]

NO_MX_DEQUANTIZE_KERNEL: Edits = [(
    "  const bool mx = bl.recipe == Fp8Recipe::kMX;\n"
    "  const float* sf = mx ? nullptr : scale.const_data_ptr<float>();\n"
    "  const uint8_t* s8 = mx ? static_cast<const uint8_t*>(scale.const_data_ptr()) : nullptr;\n",
    "  const float* sf = scale.const_data_ptr<float>();\n",
), (
    "        const int64_t off = bl.scale_offset(b, rb, s);\n"
    "        const float sc = mx ? moe_e8m0_to_float(s8[off]) : sf[off];\n"
    "        row_dequantize(dp + r * cols + bl.seg[s], op + r * cols + bl.seg[s], bl.seg[s + 1] - bl.seg[s], sc, lut);\n",
    "        const float sc = sf[bl.scale_offset(b, rb, s)];\n"
    "        row_dequantize(dp + r * cols + bl.seg[s], op + r * cols + bl.seg[s], bl.seg[s + 1] - bl.seg[s], sc, lut);\n",
)]

NO_MX_DEQUANTIZE_ENTRY: Edits = [(
    "    bool swizzle) {\n  const Tensor df = data.to(kFloat);",
    "    bool /*swizzle*/) {\n  const Tensor df = data.to(kFloat);",
), (
    "  if (offs.has_value() && recipe != Fp8Recipe::kMX) {\n    const int64_t rows = data.size(0)",
    "  if (offs.has_value()) {\n    const int64_t rows = data.size(0)",
), (
    "  Tensor grid;\n"
    "  if (recipe == Fp8Recipe::kMX) {\n"
    "    grid = e8m0_to_float(swizzle ? fp8_unswizzle_scale(scale, g.nb, g.rows, g.nseg) : scale);\n"
    "  } else {\n"
    "    grid = scale;\n"
    "  }\n"
    "  grid = grid.reshape({g.nb, g.nrb, 1, g.nseg, 1});\n",
    "  const Tensor grid = scale.reshape({g.nb, g.nrb, 1, g.nseg, 1});\n",
)]

# -- torch/_meta_registrations.py (the block Meta generates from torch_moe_ops/_checks.py) ----------------

NO_MX_META: Edits = [(
    '_FP8_RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx")\n',
    '_FP8_RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128")\n',
), (
    "        lambda: f\"{op}: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' or 'mx', \"\n"
    "        f\"got '{recipe}'\")\n",
    "        lambda: f\"{op}: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128' or 'blockwise_128x128', \"\n"
    "        f\"got '{recipe}'\")\n",
), (
    "def _fp8_scale_dtype(recipe: str) -> torch.dtype:\n"
    "    return torch.float8_e8m0fnu if recipe == \"mx\" else torch.float32\n",
    "def _fp8_scale_dtype(recipe: str) -> torch.dtype:\n"
    "    return torch.float32\n",
), (
    "    s = _fp8_ceil_div(cols, 32 if recipe == \"mx\" else 128)\n"
    "    if swizzle:\n"
    "        rp, sp = _fp8_ceil_div(rows, 128) * 128, _fp8_ceil_div(s, 4) * 4\n"
    "        return [rp, sp] if len(sizes) == 2 else batch + [rp * sp]\n"
    "    return batch + [rows, s]\n",
    "    return batch + [rows, _fp8_ceil_div(cols, 128)]\n",
)]

NO_BLOCKED_META: Edits = [(
    '_FP8_RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128")\n',
    '_FP8_RECIPES = ("tensorwise", "rowwise")\n',
), (
    "def _fp8_ceil_div(a, b):\n    return (a + b - 1) // b\n\n\ndef _fp8_check_recipe(", "def _fp8_check_recipe(",
), (
    "        lambda: f\"{op}: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128' or 'blockwise_128x128', \"\n"
    "        f\"got '{recipe}'\")\n",
    "        lambda: f\"{op}: recipe must be 'tensorwise' or 'rowwise', got '{recipe}'\")\n",
), (
    "    if recipe == \"rowwise\":\n"
    "        return batch + [rows]\n"
    "    if recipe == \"blockwise_128x128\":\n"
    "        return batch + [_fp8_ceil_div(rows, 128), _fp8_ceil_div(cols, 128)]\n"
    "    return batch + [rows, _fp8_ceil_div(cols, 128)]\n",
    "    return batch + [rows]\n",
), (
    "    rows, cols = sizes[-2], sizes[-1]\n", "    rows = sizes[-2]\n",
), (
    "        chk(recipe in (\"tensorwise\", \"rowwise\", \"mx\"),\n"
    "            lambda: f\"{op}: offs is supported with recipes 'tensorwise', 'rowwise' and 'mx', got '{recipe}'\")\n"
    "        chk(not swizzle,", "        chk(not swizzle,",
)]

# -- torch/testing/_internal/opinfo/definitions/fp8.py (test/opinfo_fp8.py with the references inlined) ------

NO_MX_OPINFO: Edits = [(
    'FP8_RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx")\n',
    'FP8_RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128")\n',
), (
    '              "blockwise_128x128": (128, 128), "mx": (1, 32)}\n\n\n'
    "_FP8_EMAX = {torch.float8_e4m3fn: 8, torch.float8_e5m2: 15}\n",
    '              "blockwise_128x128": (128, 128)}\n',
), (
    "def _fp8_swizzle(grid: torch.Tensor) -> torch.Tensor:\n"
    '    """(R, S) scale grid -> the blocked 32_4_4 layout, (round_up(R, 128), round_up(S, 4))."""\n'
    "    rows, cols = grid.shape\n"
    "    rp, sp = -(-rows // 128) * 128, -(-cols // 4) * 4\n"
    "    padded = grid.new_zeros(rp, sp)\n"
    "    padded[:rows, :cols] = grid\n"
    "    tiles = padded.view(rp // 128, 128, sp // 4, 4).permute(0, 2, 1, 3)  # (row tile, col tile, 128, 4)\n"
    "    tiles = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)                  # row 32 i + j -> [j][i]\n"
    "    return tiles.reshape(rp, sp)\n"
    "\n\n"
    "def torch_quantize_fp8(\n",
    "def torch_quantize_fp8(\n",
), (
    'len(segs), dtype=torch.float8_e8m0fnu if recipe == "mx" else torch.float32)\n',
    "len(segs), dtype=torch.float32)\n",
), (
    '                if recipe == "mx":\n'
    "                    if not bool(torch.isfinite(amax)):\n"
    '                        q[b, i, j] = float("nan")\n'
    "                        scale[b, i, j] = torch.tensor(255, dtype=torch.uint8).view(torch.float8_e8m0fnu)\n"
    "                    else:\n"
    "                        # floor(log2(amax)) from the float32 exponent field.\n"
    "                        e = int((amax.view(torch.int32) >> 23) & 0xFF) - 127 - _FP8_EMAX[f8]\n"
    "                        e = min(max(e, -127), 127)\n"
    "                        q[b, i, j] = 2.0 ** -e\n"
    "                        scale[b, i, j] = torch.tensor(e + 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)\n"
    "                else:\n"
    "                    qq = torch.div(torch.tensor(fmax, dtype=torch.float32), amax.clamp_min(1e-12))\n"
    "                    q[b, i, j] = qq\n"
    "                    scale[b, i, j] = torch.reciprocal(qq)\n",
    "                qq = torch.div(torch.tensor(fmax, dtype=torch.float32), amax.clamp_min(1e-12))\n"
    "                q[b, i, j] = qq\n"
    "                scale[b, i, j] = torch.reciprocal(qq)\n",
), (
    "        out = grid[:, :, 0]\n"
    "    elif swizzle:\n"
    "        bits = grid.view(torch.uint8)\n"
    "        out = torch.stack([_fp8_swizzle(bits[b]) for b in range(nb)]).view(torch.float8_e8m0fnu)\n"
    "        if dim == 3:\n"
    "            out = out.reshape(nb, -1)\n"
    "    else:\n",
    "        out = grid[:, :, 0]\n    else:\n",
), (
    "    # mx: groups of whole 32-element blocks; the blocked (swizzled) scale layout.\n"
    '    yield "mx_offs", x(), "mx", dict(offs=_offs([32, 32, 96, 200], device))\n'
    '    yield "mx_swizzle_2d", _spread((130, 200), device, dtype, 4), "mx", dict(swizzle=True)\n'
    '    yield "mx_swizzle_3d", _spread((2, 40, 96), device, dtype, 5), "mx", dict(swizzle=True)\n'
    "\n\n"
    "def sample_inputs_quantize_fp8(",
    "\n\ndef sample_inputs_quantize_fp8(",
), (
    "    yield e(r\"quantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' \"\n"
    "            r\"or 'mx', got 'rowise'\", x, \"rowise\")\n",
    "    yield e(r\"quantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128' or 'blockwise_128x128', \"\n"
    "            r\"got 'rowise'\", x, \"rowise\")\n",
), (
    "    # mx\n"
    '    yield e(r"quantize_fp8: swizzle=True does not take offs", x, "mx", offs=offs, swizzle=True)\n'
    "    if cpu:\n"
    "        yield e(r\"quantize_fp8: with recipe 'mx' every group must hold whole 32-element blocks: offs\\[g\\] must \"\n"
    '                r"be a multiple of 32 or C=64, got offs\\[0\\]=40", x, "mx", offs=_offs([40, 64], device),\n'
    '                name="offs_values")\n'
    "\n\n"
    "def _fp8_opinfo(",
    "\n\ndef _fp8_opinfo(",
), (
    "    column, both float8 formats, per-group (offs) operands with empty groups\n"
    "    and columns past ``offs[-1]``, the swizzled MX scale layout, and values\n",
    "    column, both float8 formats, per-group (offs) operands with empty groups\n"
    "    and columns past ``offs[-1]``, and values\n",
)]

NO_BLOCKED_OPINFO: Edits = [(
    'FP8_RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128")\n',
    'FP8_RECIPES = ("tensorwise", "rowwise")\n',
), (
    '_FP8_BLOCK = {"tensorwise": (0, 0), "rowwise": (1, 0), "blockwise_1x128": (1, 128),\n'
    '              "blockwise_128x128": (128, 128)}\n',
    '_FP8_BLOCK = {"tensorwise": (0, 0), "rowwise": (1, 0)}\n',
), (
    "    yield e(r\"quantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128' or 'blockwise_128x128', \"\n"
    "            r\"got 'rowise'\", x, \"rowise\")\n",
    "    yield e(r\"quantize_fp8: recipe must be 'tensorwise' or 'rowwise', got 'rowise'\", x, \"rowise\")\n",
), (
    "    # blockwise\n"
    "    yield e(r\"quantize_fp8: offs is supported with recipes 'tensorwise', 'rowwise' and 'mx', got \"\n"
    "            r\"'blockwise_128x128'\", x, \"blockwise_128x128\", offs=offs)\n"
    "\n\n"
    "def _fp8_opinfo(",
    "\n\ndef _fp8_opinfo(",
)]

# The same cuts of dequantize_fp8's OpInfo and reference (appended by its PR).

NO_MX_DEQUANTIZE_OPINFO: Edits = [(
    "    if swizzle:\n"
    "        return _fp8_unswizzle(s, rows, nseg)\n"
    "    return s\n"
    "\n\n"
    "def _fp8_unswizzle(s: torch.Tensor, rows: int, nseg: int) -> torch.Tensor:\n"
    '    """Swizzled scales (B, ...) of (rows, nseg) grids -> the grids (B, rows, nseg)."""\n'
    "    nb = s.shape[0]\n"
    "    rp, sp = -(-rows // 128) * 128, -(-nseg // 4) * 4\n"
    "    flat = s.reshape(nb, rp // 128, sp // 4, 32, 4, 4)   # [tile r][tile c][j][i][c]\n"
    "    grid = flat.permute(0, 1, 4, 3, 2, 5).reshape(nb, rp, sp)\n"
    "    return grid[:, :rows, :nseg]\n",
    "    return s\n",
), (
    "    yield e(r\"dequantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' \"\n"
    "            r\"or 'mx', got 'MX'\", d, s, \"MX\")\n",
    "    yield e(r\"dequantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128' or 'blockwise_128x128', \"\n"
    "            r\"got 'MX'\", d, s, \"MX\")\n",
), (
    "    # mx\n"
    '    dm, sm = (t.to(device) for t in torch_quantize_fp8(x.cpu(), "mx"))\n'
    "    yield e(r\"dequantize_fp8: scale must be Float8_e8m0fnu for recipe 'mx', got Float\", dm, sm.float(), \"mx\")\n"
    "    yield e(r\"dequantize_fp8: scale must have shape \\[4, 2\\] for data of sizes \\[4, 64\\] and recipe 'mx', \"\n"
    '            r"got \\[4, 1\\]", dm, sm[:, :1], "mx")\n'
    "    yield e(r\"dequantize_fp8: scale must have shape \\[128, 4\\] for data of sizes \\[4, 64\\] and recipe 'mx' \"\n"
    '            r"\\(swizzled\\), got \\[4, 2\\]", dm, sm, "mx", swizzle=True)\n'
    "\n\n"
    "def dequantize_fp8_opinfos(",
    "\n\ndef dequantize_fp8_opinfos(",
)]

NO_BLOCKED_DEQUANTIZE_OPINFO: Edits = [(
    "    yield e(r\"dequantize_fp8: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128' or 'blockwise_128x128', \"\n"
    "            r\"got 'MX'\", d, s, \"MX\")\n",
    "    yield e(r\"dequantize_fp8: recipe must be 'tensorwise' or 'rowwise', got 'MX'\", d, s, \"MX\")\n",
), (
    "    # blockwise\n"
    "    yield e(r\"dequantize_fp8: scale must have shape \\[1, 1\\] for data of sizes \\[4, 64\\] and recipe \"\n"
    "            r\"'blockwise_128x128', got \\[4\\]\", d, s, \"blockwise_128x128\")\n"
    "\n\n"
    "def dequantize_fp8_opinfos(",
    "\n\ndef dequantize_fp8_opinfos(",
)]


# -- _dequantize_fp8 lands in a PR of its own after _quantize_fp8 (both tensorwise and rowwise) ---------------

def _text(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        return f.read()


def _function(text: str, start: str) -> tuple[str, str]:
    """An edit removing the definition that starts at ``start`` (up to its closing brace in column 0) and the
    blank line after it."""
    at = text.index(start)
    end = text.index("\n}\n", at) + 3
    if text.startswith("\n", end):
        end += 1
    return text[at:end], ""


def _span(text: str, start: str, stop: str) -> tuple[str, str]:
    """An edit removing the text from ``start`` up to (not including) ``stop``."""
    at = text.index(start)
    return text[at:text.index(stop, at)], ""


_SRC = "torch_moe_ops/csrc/ATen/native"
_HEADER = _text(f"{_SRC}/MoEQuantize.h")
_ENTRY = _text(f"{_SRC}/MoEQuantize.cpp")
_KERNEL = undefine(_text(f"{_SRC}/cpu/MoEQuantizeKernel.cpp"), "CPU_CAPABILITY_AVX512",
                   f"{_SRC}/cpu/MoEQuantizeKernel.cpp")

# Applied to the sources first (the NO_MX / NO_BLOCKED edits of quantize's text follow).
NO_DEQUANTIZE_HEADER: Edits = [
    ("// (_quantize_fp8, _dequantize_fp8), used by every backend.", "// (_quantize_fp8), used by every backend."),
    _span(_HEADER, "inline ScalarType dequantize_fp8_out_dtype(", "// t with the strides"),
    _span(_HEADER, "using dequantize_fp8_fn = void (*)(", "DECLARE_DISPATCH(quantize_fp8_fn"),
    ("DECLARE_DISPATCH(dequantize_fp8_fn, dequantize_fp8_stub);\n", ""),
    _span(_HEADER, "Tensor dequantize_fp8_cpu(", "// CUDA entry points"),
    ("// The device-generic quantisation and dequantisation (native/MoEQuantize.cpp):\n",
     "// The device-generic quantisation (native/MoEQuantize.cpp):\n"),
    _span(_HEADER, "\nTensor dequantize_fp8_fallback(", "\n// CPU kernels"),
]

NO_DEQUANTIZE_ENTRY: Edits = [
    ("// CPU entry points of quantize_fp8 and dequantize_fp8 (validate, allocate,\n"
     "// run the kernels) and their device-generic fallbacks, written as ATen\n"
     "// operations.\n",
     "// CPU entry point of quantize_fp8 (validate, allocate, run the kernel) and\n"
     "// its device-generic fallback, written as ATen operations.\n"),
    ("DEFINE_DISPATCH(dequantize_fp8_stub);\n", ""),
    _function(_ENTRY, "Tensor dequantize_fp8_cpu("),
    _function(_ENTRY, "Tensor dequantize_fp8_fallback("),
]

NO_DEQUANTIZE_KERNEL: Edits = [
    ("// CPU kernels for quantize_fp8 and dequantize_fp8 (the recipes and their\n",
     "// CPU kernel for quantize_fp8 (the recipes and their\n"),
    ("// dequantize widens with a 256-entry table and multiplies by the block\n// scale, one row per task.\n", ""),
    ("#include <ATen/native/cpu/MoEFp8Utils.h>\n", ""),
    _function(_KERNEL, "template <typename out_t>\nvoid dequantize_scalar("),
    _function(_KERNEL, "template <typename out_t>\nvoid row_dequantize("),
    _function(_KERNEL, "template <typename out_t>\nvoid dequantize_typed("),
    _function(_KERNEL, "void dequantize_fp8_kernel("),
    ("ALSO_REGISTER_AVX512_DISPATCH(dequantize_fp8_stub, &dequantize_fp8_kernel)\n", ""),
]


# The CUDA entries (native/cuda/MoEQuantize.cpp) land in core/0007, their declarations with them.
NO_CUDA_HEADER: Edits = [_span(_HEADER, "// CUDA entry points", "} // namespace at::native")]


# -- per-group operands (offs) land in a PR of their own after _quantize_fp8's first (core/0006a0) -------------
# Applied after the NO_DEQUANTIZE / NO_MX / NO_BLOCKED edits of the first PR's files; until then offs is
# rejected (the schema takes it from the start).

NO_OFFS_HEADER: Edits = [(
    "// checks above accepted. Each caller checks the values of offs its own way.\n",
    "// checks above accepted.\n",
), (
    "// Per-group operands (offs, 2-D x only): offs holds int32 cumulative group\n"
    "// ends along C, the contraction dimension of the 2D x 2D (weight-gradient)\n"
    "// grouped GEMM, so that no block straddles two groups:\n"
    "//   tensorwise: one scale per group, scale (G,); rowwise: one per row and\n"
    "//   group, scale (G, R) (flattened, the (G * R,) operand scale of the 2D x 2D\n"
    "//   layout). Elements past offs[-1] belong to no group and quantise to zero.\n"
    "// Rows (the tokens of a 2D x 3D forward operand) need no offs: no rowwise\n"
    "// block spans two rows.\n",
    "// offs: per-group operands (scales per group of columns), not yet supported:\n"
    "// offs is rejected.\n",
), (
    "  if (groups >= 0) {\n"
    "    switch (recipe) {\n"
    "      case Fp8Recipe::kTensorwise: return {groups};\n"
    "      case Fp8Recipe::kRowwise: return {groups, rows};\n"
    "      default: break;\n"
    "    }\n"
    "  }\n",
    "",
), (
    "  if (offs.has_value()) {\n"
    "    TORCH_CHECK_VALUE(t.dim() == 2,\n"
    "        op, \": offs needs a 2-D \", arg, \", got \", arg, \" of sizes \", t.sizes());\n"
    "    TORCH_CHECK_VALUE(!swizzle, op, \": swizzle=True does not take offs\");\n"
    "    TORCH_CHECK_VALUE(offs->dim() == 1, op, \": offs must be 1-D, got \", offs->dim(), \"-D with sizes \", offs->sizes());\n"
    "    TORCH_CHECK_VALUE(offs->scalar_type() == kInt, op, \": offs must be int32, got \", offs->scalar_type());\n"
    "    TORCH_CHECK_VALUE(offs->device() == t.device(),\n"
    "        op, \": offs must be on the device of \", arg, \" (\", t.device(), \"), got \", offs->device());\n"
    "  }\n",
    "  TORCH_CHECK_VALUE(!offs.has_value(), op, \": offs (per-group scales) is not supported yet\");\n",
), (
    "// Values of a CPU offs: non-decreasing and within C.\n"
    "inline void fp8_check_offsets_cpu(const char* op, const Tensor& offs, int64_t cols, Fp8Recipe recipe) {\n"
    "  const int64_t groups = offs.size(0);\n"
    "  const int32_t* data = offs.const_data_ptr<int32_t>();\n"
    "  const int64_t stride = offs.stride(0);\n"
    "  int64_t prev = 0;\n"
    "  for (int64_t g = 0; g < groups; ++g) {\n"
    "    const int64_t end = data[g * stride];\n"
    "    TORCH_CHECK_VALUE(end >= prev && end <= cols,\n"
    "        op, \": offs must be non-decreasing in [0, C=\", cols, \"], got offs[\", g, \"]=\", end,\n"
    "        g == 0 ? std::string() : \" after offs[\" + std::to_string(g - 1) + \"]=\" + std::to_string(prev));\n"
    "    prev = end;\n"
    "  }\n"
    "}\n"
    "\n"
    "// The device-generic quantisation",
    "// The device-generic quantisation",
)]

NO_OFFS_ENTRY: Edits = [(
    "  if (offs.has_value()) {\n"
    "    fp8_check_offsets_cpu(\"quantize_fp8\", *offs, x.size(-1), recipe);\n"
    "  }\n",
    "",
), (
    "fp8_scale_size(x.sizes(), recipe, offs.has_value() ? offs->size(0) : -1, swizzle);",
    "fp8_scale_size(x.sizes(), recipe, -1, swizzle);",
), (
    "#include <ATen/native/GroupedMM.h>\n", "",
), (
    "#include <ATen/ops/zeros.h>\n", "",
), (
    "const std::optional<Tensor>& offs, bool /*swizzle*/) {\n  const Tensor xf = x.to(kFloat);\n\n",
    "const std::optional<Tensor>& /*offs*/, bool /*swizzle*/) {\n  const Tensor xf = x.to(kFloat);\n",
), (
    _span(_ENTRY, "  if (offs.has_value() && recipe != Fp8Recipe::kMX) {  // tensorwise/rowwise per group of columns\n",
          "  const BlockGrid g(x, recipe);")[0].replace(
        "  if (offs.has_value() && recipe != Fp8Recipe::kMX) {  // tensorwise/rowwise per group of columns\n",
        "  if (offs.has_value()) {  // per group of columns\n"),
    "",
)]

NO_OFFS_KERNEL: Edits = [(
    "#include <cstring>\n", "",
), (
    "  int64_t covered() const { return seg.back(); }  // columns past it belong to no group\n"
    "  bool grouped;                   // tensorwise/rowwise with offs: scales per group\n",
    "",
), (
    "    grouped = offs.has_value();\n", "",
), (
    "    if (grouped) {\n"
    "      const int32_t* o = offs->const_data_ptr<int32_t>();\n"
    "      for (const auto g : c10::irange(offs->size(0))) seg.push_back(o[g * offs->stride(0)]);\n"
    "    } else if (const int64_t w = fp8_block_cols(r); w > 0) {\n",
    "    if (const int64_t w = fp8_block_cols(r); w > 0) {\n",
), (
    "      case Fp8Recipe::kTensorwise: return grouped ? s : b;\n"
    "      case Fp8Recipe::kRowwise: return grouped ? s * rows + rb : b * rows + rb;\n",
    "      case Fp8Recipe::kTensorwise: return b;\n"
    "      case Fp8Recipe::kRowwise: return b * rows + rb;\n",
), (
    "  const int64_t covered = bl.covered();\n", "",
), (
    "      if (covered < cols) {\n"
    "        std::memset(dp + r * cols + covered, 0, cols - covered);\n"
    "      }\n",
    "",
)]

NO_OFFS_META: Edits = [(
    "    if groups is not None and recipe == \"tensorwise\":\n"
    "        return [groups]\n"
    "    if groups is not None and recipe == \"rowwise\":\n"
    "        return [groups, rows]\n"
    "    if recipe == \"tensorwise\":\n",
    "    if recipe == \"tensorwise\":\n",
), (
    "    if offs is not None:\n"
    "        chk(t.dim() == 2, lambda: f\"{op}: offs needs a 2-D {arg}, got {arg} of sizes {_grouped_mm_sizes(t)}\")\n"
    "        chk(not swizzle, lambda: f\"{op}: swizzle=True does not take offs\")\n"
    "        chk(offs.dim() == 1, lambda: f\"{op}: offs must be 1-D, got {offs.dim()}-D with sizes {_grouped_mm_sizes(offs)}\")\n"
    "        chk(offs.dtype == torch.int32, lambda: f\"{op}: offs must be int32, got {_grouped_mm_c10(offs.dtype)}\")\n"
    "        chk(offs.device == t.device,\n"
    "            lambda: f\"{op}: offs must be on the device of {arg} ({t.device}), got {offs.device}\")\n",
    "    chk(offs is None, lambda: f\"{op}: offs (per-group scales) is not supported yet\")\n",
)]

NO_OFFS_OPINFO: Edits = [(
    "from functools import partial\nfrom typing import Optional\n", "from typing import Optional\n",
), (
    "    if offs is not None and recipe != \"mx\":\n"
    "        ends = offs.tolist()\n"
    "        segs = list(zip([0] + ends[:-1], ends))\n"
    "    elif bc:\n",
    "    if bc:\n",
), (
    "    # q of every element (columns past the last group are set to +0 below).\n",
    "    # q of every element.\n",
), (
    "    if offs is not None and recipe != \"mx\":\n"
    "        y[:, :, segs[-1][1] if segs else 0:] = 0.0  # no group: +0\n"
    "    data = y.to(f8)",
    "    data = y.to(f8)",
), (
    "    if offs is not None and recipe == \"tensorwise\":\n"
    "        return grid[0, 0]\n"
    "    if offs is not None and recipe == \"rowwise\":\n"
    "        return grid[0].t().contiguous()\n"
    "    if recipe == \"tensorwise\":\n",
    "    if recipe == \"tensorwise\":\n",
), (
    "    # Per-group operands of the 2D x 2D grouped GEMM: groups along C (tokens).\n"
    "    x = partial(_spread, (7, 200), device, dtype, 6)\n"
    "    yield \"tensorwise_offs\", x(), \"tensorwise\", dict(offs=_offs([50, 50, 130], device))\n"
    "    yield \"rowwise_offs\", x(), \"rowwise\", dict(offs=_offs([10, 10, 64, 199], device))\n"
    "    yield \"rowwise_offs_no_groups\", x(), \"rowwise\", dict(offs=_offs([], device))\n"
    "\n\ndef sample_inputs_quantize_fp8(",
    "\n\ndef sample_inputs_quantize_fp8(",
), (
    "    offs = _offs([32, 64], device)\n"
    "    cpu = torch.device(device).type == \"cpu\"  # values of offs: checked by the kernels, not by fake kernels\n"
    "    e = _err\n",
    "    e = _err\n",
), (
    "    yield e(r\"quantize_fp8: offs needs a 2-D x, got x of sizes \\[1, 4, 64\\]\", x.view(1, 4, 64), \"rowwise\",\n"
    "            offs=offs)\n"
    "    yield e(r\"quantize_fp8: offs must be 1-D, got 2-D with sizes \\[1, 2\\]\", x, \"rowwise\", offs=offs.view(1, 2))\n"
    "    yield e(r\"quantize_fp8: offs must be int32, got Long\", x, \"rowwise\", offs=offs.long())\n"
    "    if cpu:\n"
    "        yield e(r\"quantize_fp8: offs must be non-decreasing in \\[0, C=64\\], got offs\\[1\\]=16 after offs\\[0\\]=32\",\n"
    "                x, \"rowwise\", offs=_offs([32, 16], device), name=\"offs_values\")\n"
    "        yield e(r\"quantize_fp8: offs must be non-decreasing in \\[0, C=64\\], got offs\\[0\\]=65\", x, \"tensorwise\",\n"
    "                offs=_offs([65], device), name=\"offs_values\")\n",
    "    yield e(r\"quantize_fp8: offs \\(per-group scales\\) is not supported yet\", x, \"rowwise\",\n"
    "            offs=_offs([32, 64], device))\n",
), (
    "    column, both float8 formats, per-group (offs) operands with empty groups\n"
    "    and columns past ``offs[-1]``, and values\n",
    "    column, both float8 formats, and values\n",
)]


# -- _quantize_fp8's first PR computes through the device-generic fallback (core/0006) ----------------------
# Its CPU entry validates and calls quantize_fp8_fallback (ATen operations, native/MoEQuantize.cpp); the next
# PR (core/0006k) adds the kernel (quantize_fp8_stub, cpu/MoEQuantizeKernel.cpp) and runs it instead, as
# core/0001 and 0001a land _grouped_mm. Applied after the first PR's NO_* edits, to the text they leave.

def _staged(text: str, edits: Edits) -> str:
    for old, new in edits:
        text = rewrite.replace_once(text, old, new, "fp8_recipes")
    return text


_FIRST_HEADER = _staged(_HEADER, NO_DEQUANTIZE_HEADER + NO_MX_HEADER + NO_BLOCKED_HEADER + NO_OFFS_HEADER)
_FIRST_ENTRY = _staged(_ENTRY, NO_DEQUANTIZE_ENTRY + NO_MX_ENTRY + NO_OFFS_ENTRY)

ON_FALLBACK_HEADER: Edits = [
    ("#include <ATen/native/DispatchStub.h>\n", ""),
    _span(_FIRST_HEADER, "// CPU kernels (native/cpu/MoEQuantizeKernel.cpp).", "std::tuple<Tensor, Tensor> quantize_fp8_cpu("),
]

ON_FALLBACK_ENTRY: Edits = [(
    _FIRST_ENTRY[:_FIRST_ENTRY.index("#include")],
    "// CPU entry point of quantize_fp8: validate, then compute through the\n"
    "// device-generic fallback, written as ATen operations.\n"
    "//\n"
    "// No device code here: torch's float -> float8 conversion is c10's, the same\n"
    "// function on host and device, and every other step (an amax, a float32\n"
    "// division, a multiply, a clamp) is exact or correctly rounded, so the\n"
    "// fallback gives the same bytes on any device. The price is a few passes over\n"
    "// x and a float32 copy of it, where a fused kernel reads x twice.\n"
    "\n",
), (
    "#include <ATen/ops/empty.h>\n", "",
), (
    "DEFINE_DISPATCH(quantize_fp8_stub);\n\n", "",
), (
    _FIRST_ENTRY[_FIRST_ENTRY.index("  Tensor data = at::empty("):_FIRST_ENTRY.index("  return {data, scale};\n")]
    + "  return {data, scale};\n",
    "  return quantize_fp8_fallback(x, recipe, float8_dtype.value_or(kFloat8_e4m3fn), offs, swizzle);\n",
), (
    "  // The comparison is in float32 (1e-12f), as the CPU kernel's; NaN passes.\n",
    "  // The comparison is in float32 (1e-12f); NaN passes.\n",
), (
    "// x * q -> clamp -> float8, one NaN byte whatever the sign (as the CPU kernel).\n",
    "// x * q -> clamp -> float8, one NaN byte whatever the sign.\n",
)]

# The OpInfo samples that span several of the kernel's parallel tasks land with the kernel (core/0006.1).
NO_KERNEL_OPINFO: Edits = [(
    '        yield f"{recipe}_weight_transposed", w.transpose(-2, -1), recipe, {}\n'
    "    # Rows enough for the CPU kernel to split them across threads (its tasks\n"
    "    # hold ~32K elements), the tensorwise amax reduced over every task's rows.\n"
    '    for recipe in ("tensorwise", "rowwise"):\n'
    '        yield f"{recipe}_rows_across_threads", _spread((300, 128), device, dtype, 7), recipe, {}\n',
    '        yield f"{recipe}_weight_transposed", w.transpose(-2, -1), recipe, {}\n',
)]

"""_scaled_grouped_mm's CPU kernel as each PR of stack 3 leaves it (patches/manifest.py): the rowwise
recipe first, then blockwise (1x128 x 128x128), then MX, then the AVX-512 float8 decode. The in-repo
sources hold every recipe, one function per recipe in the checks (MoEScaledGroupedMM.h, _checks.py)
and the OpInfo (test/opinfo_fp8.py); these are the anchored edits that take the later recipes out of
them (Copy's ``edits``, Meta's and OpInfoModule's ``source_edits``).
Each anchor must match exactly once, so an edit of the sources that moves one fails the generator at
that anchor instead of carrying a stale file."""

from __future__ import annotations

from .changes import source_span as _span

NATIVE = "torch_moe_ops/csrc/ATen/native"


HEADER = f"{NATIVE}/MoEScaledGroupedMM.h"
ENTRY = f"{NATIVE}/MoEScaledGroupedMM.cpp"
KERNEL = f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp"

ROWWISE_ONLY_C10 = (
    '"scaled_grouped_mm: scale_a and scale_b must both be float32 (rowwise), got ", scale_a.scalar_type(), " and ",\n'
    '      scale_b.scalar_type());\n')

# MoEScaledGroupedMM.h: the checks of the rowwise recipe alone; the others' scales are refused.
HEADER_ROWWISE = [
    ("#include <ATen/native/MoEQuantize.h>\n", ""),
    (_span(HEADER, "//   mx, float8_e8m0fnu, 1x32 blocks along K", "// scale_result must be None"), ""),
    ("enum class ScaledGroupedMMRecipe { kRowwise, kMX, kBlockwise };",
     "enum class ScaledGroupedMMRecipe { kRowwise };"),
    (_span(HEADER, "// Blockwise: 2D x 3D and 3D x 3D only", "// bias and the scales' device"), ""),
    (_span(HEADER, "  const auto layout = grouped_mm_layout(mat_a, mat_b);\n\n  const int64_t groups =",
           "  scaled_grouped_mm_check_bias_and_devices("),
     "  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);\n"
     "  TORCH_CHECK_VALUE(scale_a.scalar_type() == kFloat && scale_b.scalar_type() == kFloat,\n"
     "      " + ROWWISE_ONLY_C10 +
     "  const auto recipe = ScaledGroupedMMRecipe::kRowwise;\n"
     "  scaled_grouped_mm_check_rowwise_scales(mat_a, mat_b, scale_a, scale_b, groups);\n"),
]

# MoEScaledGroupedMM.cpp: no mx scales to unswizzle, no 32-blocks for offs to fall on.
ENTRY_ROWWISE = [
    ("#include <ATen/native/MoEQuantize.h>\n#include <ATen/native/MoESwizzleMXScale.h>\n", ""),
    (_span(ENTRY, "      TORCH_CHECK_VALUE(recipe != ScaledGroupedMMRecipe::kMX", "      prev = end;"), ""),
    (_span(ENTRY, "    const int64_t s = (mat_a.size(-1) + 31) / 32;\n", "    scaled_grouped_mm_stub(kCPU"),
     "    const Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();\n"),
]

# core/0006c1, before the chunked kernel (core/0006c1a): the entry computes through ATen operations on whole
# operands (scaled_grouped_mm_dequantised, taken from the test-only op that test_fp8 proves against the float64
# reference and the kernel) where it calls the kernel, and the header declares no kernel stub.
DEQUANTISED = "torch_moe_ops/csrc/testing/ScaledGroupedMMDequantised.cpp"
ENTRY_DEQUANTISED = [
    ("validate, allocate, run the kernel.\n", "validate, allocate, compute.\n"),
    ("DEFINE_DISPATCH(scaled_grouped_mm_stub);\n\n",
     _span(DEQUANTISED, "// Rowwise scales in 2D x 3D and 3D x 3D", "namespace {\n\n// The op:")),
    ("    const Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();\n"
     "    scaled_grouped_mm_stub(kCPU, mat_a, mat_b, sa, sb, offs, bias, recipe, out);\n",
     "    scaled_grouped_mm_dequantised(mat_a, mat_b, scale_a, scale_b, offs, bias, out);\n"),
]
HEADER_NO_STUB = [
    ("#include <ATen/native/DispatchStub.h>\n", ""),
    (_span(HEADER, "// CPU kernel (native/cpu/MoEScaledGroupedMMKernel.cpp)", "Tensor scaled_grouped_mm_cpu("), ""),
]

# cpu/MoEScaledGroupedMMKernel.cpp without its CPU_CAPABILITY_AVX512 blocks (the PRs before the
# AVX-512 decode's): the float8 bytes decoded by table.
KERNEL_PORTABLE = [
    ("#include <ATen/native/cpu/MoEAvx512Utils.h>\n", ""),
    ("to bfloat16 tile buffers (AVX-512 integer code, a table on other CPUs),\n",
     "to bfloat16 tile buffers (a table lookup per byte),\n"),
    ("// Every capability's build registers its copy; the AVX512 one has the\n"
     "// AVX-512 paths (plain REGISTER_DISPATCH would leave that slot empty).\n",
     "// Every capability's build registers its copy (plain REGISTER_DISPATCH\n"
     "// would leave the AVX512 slot empty).\n"),
]

# ... and without block scales in the conversion (rowwise: scales in the epilogue only).
KERNEL_ROWWISE = [
    ("; MX scales are powers of two folded into the\n// conversion, exact unless a product falls below "
     "bfloat16's normal range\n// (2^-126)", ""),
    (_span(KERNEL, "// Where the scale of element (r, c) of an operand lives:", "// A run of n contiguous"), ""),
    (_span(KERNEL, "// A run of n contiguous float8 bytes; element i has scale", "template <typename dst_t>"),
     "// A run of n contiguous float8 bytes.\nstruct Run {\n  const uint8_t* src;\n  int64_t n;\n};\n\n"),
    ("    if (run.scaled()) v *= run.scale(i);\n", ""),
    (", its scales at sm.sc + b * sc_bs), converted into dst +", "), converted into dst +"),
    ("ScalarType t, const ScaleMap& sm, int64_t sc_bs, dst_t* dst,", "ScalarType t, dst_t* dst,"),
    (_span(KERNEL, "      Run run{src + b * src_bs + i * src_step, len, nullptr, nullptr, 1, 0};\n",
           "      if (src_inner != 1"),
     "      Run run{src + b * src_bs + i * src_step, len};\n"),
    ("  const float* sa;  // nullptr: no rowwise scales (MX folds them into the tiles)\n", "  const float* sa;\n"),
    ("      const float s = bl.sa != nullptr ? bl.sa[r] : 1.0f;\n", "      const float s = bl.sa[r];\n"),
    ("        float v = a[c];\n        if (bl.sa != nullptr) v = (v * s) * bl.sb[c];\n",
     "        float v = (a[c] * s) * bl.sb[c];\n"),
    (_span(KERNEL, "// tile_t: bfloat16 (exact for rowwise and MX)", "template <typename out_t, typename tile_t>"),
     "// tile_t: bfloat16, which holds every float8 value exactly.\n"),
    (_span(KERNEL, "  const bool mx = recipe == ScaledGroupedMMRecipe::kMX;\n", "  const auto ta = mat_a"), ""),
    (_span(KERNEL, "  const float* sa = mx ? nullptr", "  Tensor bias_f ="),
     "  const float* sa = scale_a.const_data_ptr<float>();\n  const float* sb = scale_b.const_data_ptr<float>();\n"),
    (_span(KERNEL, "    // Scale maps. MX: A element (m, k)", "    Tensor ta_t, tb_t;"), ""),
    ("    const ScaleMap none{};\n", ""),
    ("ta, a_map(0, s0), 0,\n                                          pa, 0);",
     "ta, pa, 0);"),
    ("tb, b_map(g0), b_sc_bs,\n                                          pb, K * N);\n"
     "        ta_t = blob(pa, {s1 - s0, K}",
     "tb, pb, K * N);\n        ta_t = blob(pa, {s1 - s0, K}"),
    ("ta, a_map(g0, 0), a_sc_bs,\n                                          pa, M * K);",
     "ta, pa, M * K);"),
    ("tb, b_map(g0), b_sc_bs,\n                                          pb, K * N);\n"
     "        ta_t = blob(pa, {gc, M, K}",
     "tb, pb, K * N);\n        ta_t = blob(pa, {gc, M, K}"),
    ("ta, none, 0, pa,\n                                          M * K);", "ta, pa, M * K);"),
    ("tb, none, 0, pb, 0);", "tb, pb, 0);"),
    (_span(KERNEL, "        // MX: A (m, k) -> scale_a[m, k / 32]",
           "        const auto sa_str = convert_batch(A + s0 * a_cs"),
     ""),
    ("a_rs, a_cs, ta, a2, 0, pa, 0);", "a_rs, a_cs, ta, pa, 0);"),
    ("b_rs, b_cs, tb, b2, 0, pb, 0);", "b_rs, b_cs, tb, pb, 0);"),
    ("                            rowwise ? sa + start[g] : nullptr, rowwise ? sb + g * N : nullptr, bias_g});",
     "                            sa + start[g], sb + g * N, bias_g});"),
    ("          blocks.push_back({ap + (g - g0) * acc.stride(0), acc_rs, op + g * M * n_out, n_out, M, N,\n"
     "                            rowwise ? sa + g * M : nullptr, rowwise ? sb + g * N : nullptr, bias_g});\n"
     "          break;\n        case GroupedMMLayout::k3d2d:",
     "          blocks.push_back({ap + (g - g0) * acc.stride(0), acc_rs, op + g * M * n_out, n_out, M, N,\n"
     "                            sa + g * M, sb + g * N, bias_g});\n"
     "          break;\n        case GroupedMMLayout::k3d2d:"),
    ("                            rowwise ? sa + g * M : nullptr, rowwise ? sb + g * N : nullptr, bias_g});\n"
     "          break;\n      }",
     "                            sa + g * M, sb + g * N, bias_g});\n          break;\n      }"),
    (_span(KERNEL, "  const bool f32_tiles = recipe == ScaledGroupedMMRecipe::kBlockwise;", "} // namespace\n"),
     "  if (out.scalar_type() == kFloat) {\n"
     "    scaled_grouped_mm_typed<float, c10::BFloat16>(mat_a, mat_b, scale_a, scale_b, offs, bias, recipe, out);\n"
     "  } else {\n"
     "    scaled_grouped_mm_typed<c10::BFloat16, c10::BFloat16>(mat_a, mat_b, scale_a, scale_b, offs, bias, recipe,\n"
     "                                                          out);\n"
     "  }\n"
     "}\n\n"),
]

# torch_moe_ops/_checks.py, for the rowwise PR's meta block: the recipe told from the scales is rowwise
# or refused, as the kernel's checks have it (HEADER_ROWWISE). The checks of the other recipes are
# left out of that block (CHECKS_LATER).
CHECKS_ROWWISE = [
    (_span("torch_moe_ops/_checks.py", "    f32 = scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32\n",
           "    chk(scale_a.device == mat_a.device and scale_b.device == mat_a.device,"),
     "    chk(scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32,\n"
     "        lambda: \"scaled_grouped_mm: scale_a and scale_b must both be float32 (rowwise), got \"\n"
     "        f\"{_fp8_c10(scale_a.dtype)} and {_fp8_c10(scale_b.dtype)}\")\n"
     "    recipe = \"rowwise\"\n"
     "    check_scaled_grouped_mm_rowwise_scales(mat_a, mat_b, scale_a, scale_b, groups)\n"),
    ("    layout = grouped_mm_layout(mat_a, mat_b)\n    groups = grouped_mm_num_groups(mat_a, offs)\n    chk(scale_a",
     "    groups = grouped_mm_num_groups(mat_a, offs)\n    chk(scale_a"),
]
CHECKS_LATER = ("check_scaled_grouped_mm_blockwise_scales", "check_scaled_grouped_mm_mx_scales",
                "_check_mx_blocked_scale")

# test/opinfo_fp8.py, for the rowwise PR: its samples and error inputs; the later PRs add the others'.
OPINFO_ROWWISE = [
    ("        _scaled_grouped_mm_blockwise_operands,\n        _scaled_grouped_mm_mx_operands,\n", ""),
    ("        _scaled_grouped_mm_blockwise_errors,\n        _scaled_grouped_mm_mx_errors,\n", ""),
]

# The blockwise PR: rowwise and DeepSeek-V3's blockwise recipe, no MX (float32 block scales only).
HEADER_BLOCKWISE = [
    ("#include <ATen/native/MoEQuantize.h>\n", ""),
    (_span(HEADER, "//   mx, float8_e8m0fnu, 1x32 blocks along K", "//   blockwise, float32, DeepSeek-V3's recipe"), ""),
    ("enum class ScaledGroupedMMRecipe { kRowwise, kMX, kBlockwise };",
     "enum class ScaledGroupedMMRecipe { kRowwise, kBlockwise };"),
    (_span(HEADER, "// 2-D operands: the per-group blocked layout (swizzle_mx_scale)", "// bias and the scales' device"),
     ""),
    (_span(HEADER, "  } else if (scale_a.scalar_type() == kFloat && scale_b.scalar_type() == kFloat) {\n",
           "  scaled_grouped_mm_check_bias_and_devices("),
     "  } else {\n"
     "    TORCH_CHECK_VALUE(scale_a.scalar_type() == kFloat && scale_b.scalar_type() == kFloat,\n"
     '        "scaled_grouped_mm: scale_a and scale_b must both be float32 (rowwise, blockwise), got ",\n'
     '        scale_a.scalar_type(), " and ", scale_b.scalar_type());\n'
     "    recipe = ScaledGroupedMMRecipe::kRowwise;\n"
     "    scaled_grouped_mm_check_rowwise_scales(mat_a, mat_b, scale_a, scale_b, groups);\n"
     "  }\n"),
]

# ... the kernel's scale maps with float32 scales only.
KERNEL_BLOCKWISE = [
    KERNEL_ROWWISE[0],  # the MX sentence of the exactness comment
    (_span(KERNEL, "// Where the scale of element (r, c) of an operand lives:", "// A run of n contiguous"),
     "// Where the scale of element (r, c) of an operand lives:\n"
     "// scf[(r / r_div) * r_mul + (c / c_div) * c_mul] (float32, blockwise); none\n"
     "// means 1.\n"
     "struct ScaleMap {\n"
     "  const float* scf = nullptr;\n"
     "  int64_t r_div = 1, r_mul = 0, c_div = 1, c_mul = 0;\n"
     "  bool any() const { return scf != nullptr; }\n"
     "};\n\n"),
    (_span(KERNEL, "// A run of n contiguous float8 bytes; element i has scale", "template <typename dst_t>"),
     "// A run of n contiguous float8 bytes; element i has scale\n"
     "// scf[(i / every) * stride] (no scale pointer: 1).\n"
     "struct Run {\n"
     "  const uint8_t* src;\n"
     "  int64_t n;\n"
     "  const float* scf;\n"
     "  int64_t every, stride;\n"
     "  bool scaled() const { return scf != nullptr; }\n"
     "  float scale(int64_t i) const { return scf[(i / every) * stride]; }\n"
     "};\n\n"),
    (", its scales at sm.sc + b * sc_bs), converted into dst +", ", its scales at sm.scf + b * sc_bs), converted into dst +"),
    ("len, nullptr, nullptr, 1, 0};", "len, nullptr, 1, 0};"),
    ("        run.sc = sm.sc != nullptr ? sm.sc + off : nullptr;\n"
     "        run.scf = sm.scf != nullptr ? sm.scf + off : nullptr;\n",
     "        run.scf = sm.scf + off;\n"),
    ("  const float* sa;  // nullptr: no rowwise scales (MX folds them into the tiles)\n",
     "  const float* sa;  // nullptr: no rowwise scales (blockwise folds them into the tiles)\n"),
    ("// tile_t: bfloat16 (exact for rowwise and MX) or float32", "// tile_t: bfloat16 (exact for rowwise) or float32"),
    ("  const bool mx = recipe == ScaledGroupedMMRecipe::kMX;\n", ""),
    ("  const float* sa = mx ? nullptr : scale_a.const_data_ptr<float>();\n"
     "  const float* sb = mx ? nullptr : scale_b.const_data_ptr<float>();\n",
     "  const float* sa = scale_a.const_data_ptr<float>();\n  const float* sb = scale_b.const_data_ptr<float>();\n"),
    (_span(KERNEL, "  const auto* sa8 = mx ?", "  Tensor bias_f ="), ""),
    (_span(KERNEL, "    // Scale maps. MX: A element (m, k)", "    auto a_map = "),
     "    // Scale maps. Blockwise: A (m, k) -> scale_a[.., m, k / 128], B (k, n) ->\n"
     "    // scale_b[g, n / 128, k / 128]. Rowwise: none (epilogue).\n"),
    ("      if (mx) s = ScaleMap{sa8 + (g * M + row0) * S, nullptr, 1, S, 32, 1};\n", ""),
    ("ScaleMap{nullptr, sa + (g * M + row0) * KB, 1, KB, 128, 1};", "ScaleMap{sa + (g * M + row0) * KB, 1, KB, 128, 1};"),
    ("      if (mx) s = ScaleMap{sb8 + g * N * S, nullptr, 32, 1, 1, S};\n", ""),
    ("ScaleMap{nullptr, sb + g * NB * KB, 128, 1, 128, KB};", "ScaleMap{sb + g * NB * KB, 128, 1, 128, KB};"),
    ("    const int64_t a_sc_bs = mx ? M * S : M * KB, b_sc_bs = mx ? N * S : NB * KB;",
     "    const int64_t a_sc_bs = M * KB, b_sc_bs = NB * KB;"),
    (_span(KERNEL, "        // MX: A (m, k) -> scale_a[m, k / 32]",
           "        const auto sa_str = convert_batch(A + s0 * a_cs"),
     ""),
    ("a_rs, a_cs, ta, a2, 0, pa, 0);", "a_rs, a_cs, ta, none, 0, pa, 0);"),
    ("b_rs, b_cs, tb, b2, 0, pb, 0);", "b_rs, b_cs, tb, none, 0, pb, 0);"),
]

CHECKS_BLOCKWISE = [
    (_span("torch_moe_ops/_checks.py", "    elif f32:\n        recipe = \"rowwise\"\n",
           "    chk(scale_a.device == mat_a.device and scale_b.device == mat_a.device,"),
     "    else:\n"
     "        chk(f32, lambda: \"scaled_grouped_mm: scale_a and scale_b must both be float32 (rowwise, blockwise), \"\n"
     "            f\"got {_fp8_c10(scale_a.dtype)} and {_fp8_c10(scale_b.dtype)}\")\n"
     "        recipe = \"rowwise\"\n"
     "        check_scaled_grouped_mm_rowwise_scales(mat_a, mat_b, scale_a, scale_b, groups)\n"),
]
CHECKS_MX = ("check_scaled_grouped_mm_mx_scales", "_check_mx_blocked_scale")

OPINFO_BLOCKWISE = [
    ("        _scaled_grouped_mm_rowwise_operands,\n",
     "        _scaled_grouped_mm_rowwise_operands,\n        _scaled_grouped_mm_blockwise_operands,\n"),
    ("        _scaled_grouped_mm_rowwise_errors,\n",
     "        _scaled_grouped_mm_rowwise_errors,\n        _scaled_grouped_mm_blockwise_errors,\n"),
]
OPINFO_MX = [
    ("        _scaled_grouped_mm_blockwise_operands,\n",
     "        _scaled_grouped_mm_blockwise_operands,\n        _scaled_grouped_mm_mx_operands,\n"),
    ("        _scaled_grouped_mm_blockwise_errors,\n",
     "        _scaled_grouped_mm_blockwise_errors,\n        _scaled_grouped_mm_mx_errors,\n"),
]
BLOCKWISE_OPINFOS = ("_scaled_grouped_mm_blockwise_operands", "_scaled_grouped_mm_blockwise_errors")
MX_OPINFOS = ("_scaled_grouped_mm_mx_operands", "_scaled_grouped_mm_mx_errors")

# The float64 reference of the OpInfo (torch_scaled_grouped_mm of torch_moe_ops/reference.py, inlined in
# definitions/fp8.py) as each PR leaves it: the rowwise PR's without the block-scaled recipes' branches, each
# landed (fp8_recipes.landing) with its recipe's PR. Anchored on the generated module (OpInfoModule's edits).
REFERENCE = "torch_moe_ops/reference.py"
_BLOCKWISE_BRANCH = "    elif layout in (\"2d3d\", \"3d3d\") and scale_a.dim() == mat_a.dim():"
_ROWWISE_2D2D = "    elif layout == \"2d2d\":  # per group"
REF_NO_MX = [
    (_span(REFERENCE, "    if scale_a.dtype == torch.float8_e8m0fnu:  # 1x32 blocks along K\n", _BLOCKWISE_BRANCH)
     + _BLOCKWISE_BRANCH, _BLOCKWISE_BRANCH.replace("elif", "if", 1)),
    (_span(REFERENCE, "def _fp8_unswizzle_groups(", "def torch_scaled_grouped_mm(") + "def torch_scaled_grouped_mm(",
     "def torch_scaled_grouped_mm("),
]
REF_NO_BLOCKWISE = [
    ("    k = a.shape[-1]\n    n = b.shape[-1]\n" + _BLOCKWISE_BRANCH.replace("elif", "if", 1)
     + _span(REFERENCE, _BLOCKWISE_BRANCH, _ROWWISE_2D2D)[len(_BLOCKWISE_BRANCH):] + _ROWWISE_2D2D,
     _ROWWISE_2D2D.replace("elif", "if", 1)),
]

# The rowwise PR without the 3D x 2D and 2D x 2D layouts (refused until core/0006c1b, which lands them:
# fp8_recipes.landing of the generated files' edits, the sources' files carried again without these).
FORWARD_ONLY_C10 = (
    '  TORCH_CHECK_VALUE(mat_b.dim() == 3,\n'
    '      "scaled_grouped_mm: the 3D x 2D and 2D x 2D layouts are not supported yet, got mat_a ", mat_a.sizes(),\n'
    '      " and mat_b ", mat_b.sizes());\n')
HEADER_FORWARD_LAYOUTS = [
    ("// in the four layouts of grouped_mm (GroupedMM.h), with float8_e4m3fn or\n"
     "// float8_e5m2 operands and out_dtype bfloat16 (default, as upstream) or\n",
     "// in grouped_mm's 2D x 3D and 3D x 3D layouts (GroupedMM.h; 3D x 2D and 2D x 2D\n"
     "// are refused), with float8_e4m3fn or float8_e5m2 operands and out_dtype\n"
     "// bfloat16 (default, as upstream) or\n"),
    ("//     3D x 2D  scale_a (G, M)    scale_b (N,)\n"
     "//     2D x 2D  scale_a (G * M,)  scale_b (G * N,)   (one scale per row and group,\n"
     "//              group-major: quantize_fp8(..., \"rowwise\", offs=offs) flattened)\n", ""),
    (_span(HEADER, "    case GroupedMMLayout::k3d2d:\n      scaled_grouped_mm_check_scale(\"scale_a\", scale_a, {groups, m}, what);",
           "  }\n}\n"),
     "    default:  // refused by scaled_grouped_mm_check_inputs\n      break;\n"),
    ('  grouped_mm_check_layout("scaled_grouped_mm", mat_a, mat_b, offs);\n',
     '  grouped_mm_check_layout("scaled_grouped_mm", mat_a, mat_b, offs);\n' + FORWARD_ONLY_C10),
]
KERNEL_FORWARD_LAYOUTS = [
    ("      case GroupedMMLayout::k3d2d: return M * K + K * extent(g);\n"
     "      case GroupedMMLayout::k2d2d: return (M + N) * extent(g);\n",
     "      default: break;  // 3D x 2D, 2D x 2D: refused by the checks\n"),
    (
     '      case GroupedMMLayout::k3d2d: {  // A groups g0..g1, columns [s0, s1) of B\n'
     '        tile_t* const pa = ws_a.get<tile_t>(gc * M * K);\n'
     '        tile_t* const pb = ws_b.get<tile_t>(K * (s1 - s0));\n'
     '        const auto sa_str = convert_batch(A + g0 * a_gs, gc, a_gs, M, K, a_rs, a_cs, ta, pa, M * K);\n'
     '        const auto sb_str = convert_batch(B + s0 * b_cs, 1, 0, K, s1 - s0, b_rs, b_cs, tb, pb, 0);\n'
     '        ta_t = blob(pa, {gc, M, K}, {M * K, sa_str.rs, sa_str.cs});\n'
     '        tb_t = blob(pb, {K, s1 - s0}, {sb_str.rs, sb_str.cs});\n'
     '        break;\n'
     '      }\n'
     '      case GroupedMMLayout::k2d2d: {  // contraction slice [s0, s1)\n'
     '        tile_t* const pa = ws_a.get<tile_t>(M * (s1 - s0));\n'
     '        tile_t* const pb = ws_b.get<tile_t>((s1 - s0) * N);\n'
     '        const auto sa_str = convert_batch(A + s0 * a_cs, 1, 0, M, s1 - s0, a_rs, a_cs, ta, pa, 0);\n'
     '        const auto sb_str = convert_batch(B + s0 * b_rs, 1, 0, s1 - s0, N, b_rs, b_cs, tb, pb, 0);\n'
     '        ta_t = blob(pa, {M, s1 - s0}, {sa_str.rs, sa_str.cs});\n'
     '        tb_t = blob(pb, {s1 - s0, N}, {sb_str.rs, sb_str.cs});\n'
     '        break;\n'
     '      }\n'
     '    }\n'
     + "    const bool has_offs",
     "      default:\n        break;\n    }\n    const bool has_offs"),
    ("        case GroupedMMLayout::k3d2d:\n"
     "          blocks.push_back({ap + (start[g] - s0), acc_rs, op + start[g], n_out, M, extent(g), sa + g * M,\n"
     "                            sb + start[g], bias_g != nullptr ? bias_g + start[g] : nullptr});\n"
     "          break;\n"
     "        case GroupedMMLayout::k2d2d:\n"
     "          blocks.push_back({ap + (g - g0) * acc.stride(0), acc_rs, op + g * M * n_out, n_out, M, N,\n"
     "                            sa + g * M, sb + g * N, bias_g});\n"
     "          break;\n"
     "      }\n",
     "        default:\n          break;\n      }\n"),
]
CHECKS_FORWARD_LAYOUTS = [
    ('    check_grouped_mm_layout("scaled_grouped_mm", mat_a, mat_b, offs)\n',
     '    check_grouped_mm_layout("scaled_grouped_mm", mat_a, mat_b, offs)\n'
     '    chk(mat_b.dim() == 3, lambda: "scaled_grouped_mm: the 3D x 2D and 2D x 2D layouts are not supported yet, "\n'
     '        f"got mat_a {_sizes(mat_a)} and mat_b {_sizes(mat_b)}")\n'),
    ('"3d3d": ([groups, m], [groups, n]), "3d2d": ([groups, m], [n]),\n            "2d2d": ([groups * m], [groups * n])}',
     '"3d3d": ([groups, m], [groups, n])}'),
]
# definitions/fp8.py as generated (OpInfoModule's edits; landed by core/0006c1b).
_ZERO_TOKENS = "    yield \"2d3d_zero_tokens\", (ad, bd, as_, bs), dict(offs=_offs([0, 0, 0, 0], \"cpu\")), False"
OPINFO_FORWARD_LAYOUTS = [
    (_ZERO_TOKENS + "\n" + _span("test/opinfo_fp8.py",
                                 "    # 3D x 2D (offs over N) and 2D x 2D (offs over K: the weight gradient).\n", "\n\n"),
     _ZERO_TOKENS),
    (_span("test/opinfo_fp8.py",
           "    yield e(r\"scaled_grouped_mm: scale_b must have shape \\[8\\] for rowwise scaling of these operands,",
           "    # Scale dtypes"),
     "    yield e(r\"scaled_grouped_mm: the 3D x 2D and 2D x 2D layouts are not supported yet, got mat_a \\[2, 6, 64\\] \"\n"
     "            r\"and mat_b \\[64, 8\\]\", a3, b2, ones(G, M), sb, _offs([3, 8], device))\n"),
    ("    # Rowwise scale shapes, every layout.\n", "    # Rowwise scale shapes, both layouts.\n"),
    (_ROWWISE_2D2D.replace("elif", "if", 1) + _span(REFERENCE, _ROWWISE_2D2D, "    elif layout == \"2d3d\":\n")[
        len(_ROWWISE_2D2D):] + "    elif layout == \"2d3d\":\n        a, b = a * sa[:, None]",
     "    if layout == \"2d3d\":\n        a, b = a * sa[:, None]"),
    ("    elif layout == \"3d3d\":\n        a, b = a * sa[:, :, None], b * sb[:, None, :]\n"
     "    else:  # 3d2d\n        a, b = a * sa[:, :, None], b * sb[None, :]\n",
     "    else:  # 3d3d\n        a, b = a * sa[:, :, None], b * sb[:, None, :]\n"),
]

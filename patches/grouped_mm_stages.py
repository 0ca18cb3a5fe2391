"""_grouped_mm's contract as the first PRs of stack 1 leave it (patches/manifest.py): the base
contract first (the input dtype out, no bias: both refused with a ValueError naming the value), then
the values of offs, the 2D x 2D and 3D x 3D layouts, bias and the float32 output. The in-repo sources
hold the whole contract, bias and the output dtype checked in functions of their own
(grouped_mm_check_bias, grouped_mm_out_dtype in GroupedMM.h; check_grouped_mm_bias,
grouped_mm_out_dtype in _checks.py); these are the anchored edits that take them out (Copy's
``edits``, Meta's ``source_edits`` and ``leave_out``), applied after the edits that put the CPU entry
on the device-generic fallback (manifest.ENTRY_ON_FALLBACK*).
Each anchor must match exactly once, so an edit of the sources that moves one fails the generator at
that anchor instead of carrying a stale file."""

from __future__ import annotations

from .changes import source_span as _span

NATIVE = "torch_moe_ops/csrc/ATen/native"
HEADER = f"{NATIVE}/GroupedMM.h"
ENTRY = f"{NATIVE}/GroupedMM.cpp"
TEST = "patches/src/test/test_matmul.py"


BIAS_REFUSED_C10 = '"grouped_mm: bias is not supported yet, got a bias of sizes ", bias->sizes());\n'

# GroupedMM.h: the output dtype is the input dtype; a bias is refused.
HEADER_BASE = [
    ("// bias, when given, is (G, N_out) with N_out = out.size(-1); in 3D x 2D the\n"
     "// group g adds bias[g, n] to the columns n it owns.\n", ""),
    ("// Output dtype: the input dtype, or float32 for 16-bit inputs (the kernels\n"
     "// accumulate in fp32 and round once).\n", "// Output dtype: the input dtype.\n"),
    ("      out == in || (out == kFloat && (in == kHalf || in == kBFloat16)),\n"
     '      "grouped_mm: out_dtype must be the input dtype (", in,\n'
     '      ") or float32 for float16/bfloat16 inputs, got out_dtype=", out);\n',
     "      out == in,\n"
     '      "grouped_mm: out_dtype must be the input dtype (", in, "), got out_dtype=", out);\n'),
    (_span(HEADER, "// Number of groups G.\n", "// Extent of the dimension"), ""),
    (_span(HEADER, "// bias, when given: (G, N_out), in the input or the output dtype", "// Checks everything"), ""),
    ("  grouped_mm_check_bias(mat_a, mat_b, offs, bias, out_dtype);\n",
     "  TORCH_CHECK_VALUE(!bias.has_value(),\n      " + BIAS_REFUSED_C10),
    ("// The device-generic grouped mm, for validated inputs: one mm / addmm per\n",
     "// The device-generic grouped mm, for validated inputs: one mm per\n"),
    ("Tensor grouped_mm_fallback(\n    const Tensor& mat_a,\n    const Tensor& mat_b,\n"
     "    const std::optional<Tensor>& offs,\n    const std::optional<Tensor>& bias,\n",
     "Tensor grouped_mm_fallback(\n    const Tensor& mat_a,\n    const Tensor& mat_b,\n"
     "    const std::optional<Tensor>& offs,\n"),
]

# GroupedMM.cpp: the fallback without bias (one mm / bmm per group).
ENTRY_BASE = [
    ("#include <ATen/ops/addmm.h>\n", ""),
    ("#include <ATen/ops/baddbmm.h>\n", ""),
    ("// One group's product in the compute dtype, its bias row added before the\n"
     "// single rounding to the output dtype (as the CPU kernel adds it to its\n"
     "// accumulator).\n"
     "Tensor grouped_mm_group(const Tensor& a, const Tensor& b, const std::optional<Tensor>& bias_row, "
     "ScalarType compute) {\n"
     "  const Tensor ac = a.to(compute);\n"
     "  const Tensor bc = b.to(compute);\n"
     "  return bias_row.has_value() ? at::addmm(bias_row->to(compute), ac, bc) : at::mm(ac, bc);\n",
     "// One group's product in the compute dtype (rounded once to the output dtype\n"
     "// by the caller's copy).\n"
     "Tensor grouped_mm_group(const Tensor& a, const Tensor& b, ScalarType compute) {\n"
     "  return at::mm(a.to(compute), b.to(compute));\n"),
    ("    const std::optional<Tensor>& offs,\n    const std::optional<Tensor>& bias,\n"
     "    std::optional<ScalarType> out_dtype) {\n  const auto layout",
     "    const std::optional<Tensor>& offs,\n    std::optional<ScalarType> out_dtype) {\n  const auto layout"),
    ("  // and each group's sum, bias included, rounds once to the output dtype: the\n"
     "  // CPU kernel's numerics, whatever a backend's 16-bit matmul does with the\n"
     "  // bias or the accumulator. The copies cost memory traffic, not flops.\n",
     "  // and each group's sum rounds once to the output dtype: the CPU kernel's\n"
     "  // numerics, whatever a backend's 16-bit matmul does with the accumulator.\n"
     "  // The copies cost memory traffic, not flops.\n"),
    ("  // Group g's bias, its entries from..from+n (3D x 2D: the columns g owns).\n"
     "  auto bias_row = [&](int64_t g, int64_t from, int64_t n) {\n"
     "    return bias.has_value() ? std::optional<Tensor>((*bias)[g].narrow(0, from, n)) : std::nullopt;\n"
     "  };\n", ""),
    ("    return out.copy_(bias.has_value() ? at::baddbmm(bias->to(compute).unsqueeze(1), a, b) : at::bmm(a, b));\n",
     "    return out.copy_(at::bmm(a, b));\n"),
    ("  const int64_t n_out = out.size(-1);\n", ""),
    ("mat_b[g], bias_row(g, 0, n_out), compute));\n", "mat_b[g], compute));\n"),
    ("mat_b.narrow(1, start, len), bias_row(g, start, len), compute));\n", "mat_b.narrow(1, start, len), compute));\n"),
    ("  // the K slice start:end; an empty one gives zeros (+ bias)\n"
     "      out[g].copy_(grouped_mm_group(mat_a.narrow(1, start, len), mat_b.narrow(0, start, len),\n"
     "                                    bias_row(g, 0, n_out), compute));\n",
     "  // the K slice start:end; an empty one gives zeros\n"
     "      out[g].copy_(grouped_mm_group(mat_a.narrow(1, start, len), mat_b.narrow(0, start, len), compute));\n"),
    ("  return grouped_mm_fallback(mat_a, mat_b, offs, bias, out_dtype);\n",
     "  return grouped_mm_fallback(mat_a, mat_b, offs, out_dtype);\n"),
]

# torch_moe_ops/_checks.py, for the base PR's meta block: the same two refusals, with the same messages.
CHECKS_BASE = [
    ("        out == in_dtype or (out == torch.float32 and in_dtype in (torch.float16, torch.bfloat16)),\n"
     '        lambda: f"grouped_mm: out_dtype must be the input dtype ({_c10(in_dtype)}) or float32 for "\n'
     '        f"float16/bfloat16 inputs, got out_dtype={_c10(out)}",\n',
     "        out == in_dtype,\n"
     '        lambda: f"grouped_mm: out_dtype must be the input dtype ({_c10(in_dtype)}), got "\n'
     '        f"out_dtype={_c10(out)}",\n'),
    ("    check_grouped_mm_bias(mat_a, mat_b, offs, bias, out_dtype)\n",
     "    chk(bias is None,\n"
     '        lambda: f"grouped_mm: bias is not supported yet, got a bias of sizes {_sizes(bias)}")\n'),
]
CHECKS_LATER = ("check_grouped_mm_bias", "grouped_mm_num_groups")

# test/test_matmul.py: the tests of bias, the float32 output and the compiled bias go with their PR.
TEST_BASE = [
    ("# (bias, float16/float32/float64, a float32 output for 16-bit inputs, zeroed\n"
     "# rows past offs[-1], ValueErrors naming the argument) is tested on CPU only.\n",
     "# (float16/float32/float64, zeroed rows past offs[-1], ValueErrors naming the\n"
     "# argument) is tested on CPU only.\n"),
    ("def _loop(a, b, offs, bias):\n", "def _loop(a, b, offs):\n"),
    ("            out[s:e] = a[s:e] @ b[g] + (0 if bias is None else bias[g])\n", "            out[s:e] = a[s:e] @ b[g]\n"),
    ("            out[:, s:e] = a[g] @ b[:, s:e] + (0 if bias is None else bias[g, s:e])\n",
     "            out[:, s:e] = a[g] @ b[:, s:e]\n"),
    ("            out[g] = a[:, s:e] @ b[s:e] + (0 if bias is None else bias[g])\n", "            out[g] = a[:, s:e] @ b[s:e]\n"),
    ("    return a @ b + (0 if bias is None else bias[:, None])\n", "    return a @ b\n"),
    (_span(TEST, "def _reference(a, b, offs, bias=None):\n", "\n\nclass TestGroupedMM"),
     "def _reference(a, b, offs):\n"
     '    """The float64 result, the magnitude |a| @ |b| that bounds a kernel\'s\n'
     '    rounding error per element, and K."""\n'
     "    a, b = a.double(), b.double()\n"
     "    return _loop(a, b, offs), _loop(a.abs(), b.abs(), offs), a.size(-1)\n"),
    ("    def assertGroupedClose(self, out, a, b, offs, bias=None):\n        ref, mag, k = _reference(a, b, offs, bias)\n",
     "    def assertGroupedClose(self, out, a, b, offs):\n        ref, mag, k = _reference(a, b, offs)\n"),
    ("        # The dot-product bound: K + 1 roundings of the accumulator (the\n"
     "        # products' sums and the bias), then one rounding to the output dtype.\n",
     "        # The dot-product bound: K + 1 roundings of the accumulator (the\n"
     "        # products' sums), then one rounding to the output dtype.\n"),
    (_span(TEST, "    @onlyCPU\n    @dtypes(torch.float32, torch.bfloat16, torch.float64)\n"
                 "    @parametrize(\"layout\", [\"2d3d\", \"3d2d\", \"2d2d\", \"3d3d\"])\n    def test_grouped_mm_bias(",
           "    @onlyCPU\n    @dtypes(torch.float32, torch.bfloat16)\n    def test_grouped_mm_rows_past_offs_are_zero("),
     ""),
    (_span(TEST, '            ((a, b), {"offs": offs, "bias": torch.randn(3)}', '            ((a, b), {"offs": offs, "out_dtype"'),
     '            ((a, b), {"offs": offs, "bias": torch.randn(2, 3)}, r"bias is not supported yet, got a bias of sizes '
     '\\[2, 3\\]"),\n'),
]


# -- core/0001 carries the 2D x 3D and 3D x 2D layouts (the MoE forward); core/0001.0b the other two (the
# layouts of the weight gradient and of a batch), with their checks (grouped_mm_check_3d3d), the fallback's
# branches, their tests and docs. Applied after the *_BASE edits above.

TWO_LAYOUTS_REFUSED_C10 = (
    '      op, ": the ", mat_a.dim(), "D x ", mat_b.dim(), "D layout (mat_a ", mat_a.sizes(), ", mat_b ",\n'
    '      mat_b.sizes(), ") is not supported on CPU yet, only 2D x 3D and 3D x 2D");\n')

# GroupedMM.h: grouped_mm_check_layout refuses 2D x 2D and 3D x 3D (the CPU entry is its only caller).
HEADER_TWO_LAYOUTS = [
    (_span(HEADER, "// 3D x 3D: a batch of G products, no offs.\n", "// offs against the layout"), ""),
    ("// offs against the layout: None for 3D x 3D, else int32, 1-D, one entry per group.\n",
     "// The layouts the CPU entry takes so far, and offs against them: int32, 1-D,\n"
     "// one entry per group.\n"),
    ("  if (layout == GroupedMMLayout::k3d3d) {\n"
     "    grouped_mm_check_3d3d(op, mat_a, mat_b, offs);\n"
     "    return;\n"
     "  }\n",
     "  TORCH_CHECK_VALUE(layout == GroupedMMLayout::k2d3d || layout == GroupedMMLayout::k3d2d,\n"
     + TWO_LAYOUTS_REFUSED_C10),
]

# GroupedMM.cpp: the fallback's 2D x 3D and 3D x 2D branches only.
ENTRY_TWO_LAYOUTS = [
    ("#include <ATen/ops/bmm.h>\n", ""),
    ("  if (layout == GroupedMMLayout::k3d3d) {\n"
     "    const Tensor a = mat_a.to(compute), b = mat_b.to(compute);\n"
     "    return out.copy_(at::bmm(a, b));\n"
     "  }\n", ""),
    ("    } else if (layout == GroupedMMLayout::k2d2d) {  // the K slice start:end; an empty one gives zeros\n"
     "      out[g].copy_(grouped_mm_group(mat_a.narrow(1, start, len), mat_b.narrow(0, start, len), compute));\n",
     ""),
]

# _checks.py, for the meta function: the same refusal with the same message, for CPU tensors only (CUDA
# runs upstream's kernel, which takes all four layouts, until the CUDA entry's PR).
CHECKS_TWO_LAYOUTS = [
    ('    if layout == "3d3d":\n        check_grouped_mm_3d3d(op, mat_a, mat_b, offs)\n',
     "    # CPU only: CUDA tensors still run upstream's kernel, which takes all four.\n"
     '    chk(mat_a.device.type != "cpu" or layout in ("2d3d", "3d2d"),\n'
     '        lambda: f"{op}: the {mat_a.dim()}D x {mat_b.dim()}D layout (mat_a {_sizes(mat_a)}, mat_b {_sizes(mat_b)}) "\n'
     '        "is not supported on CPU yet, only 2D x 3D and 3D x 2D")\n'
     '    if layout == "3d3d":\n        check_grouped_mm_3d3d(op, mat_a, mat_b, offs)\n'),
]

# test/test_matmul.py: the two layouts' operands, reference and parametrisations; their error cases.
TEST_TWO_LAYOUTS = [
    ("    if layout == \"3d2d\":\n"
     "        return make(g, m, k), make(k, total), _offs(sizes, device)\n"
     "    if layout == \"2d2d\":\n"
     "        return make(m, total), make(total, n), _offs(sizes, device)\n"
     "    return make(g, m, k), make(g, k, n), None\n",
     "    return make(g, m, k), make(k, total), _offs(sizes, device)  # 3d2d\n"),
    ("        return out\n"
     "    if a.dim() == 2:  # 2D x 2D: offs splits K, one output per group\n"
     "        out = a.new_zeros(len(ends), a.size(0), b.size(1))\n"
     "        for g, (s, e) in enumerate(zip(starts, ends)):\n"
     "            out[g] = a[:, s:e] @ b[s:e]\n"
     "        return out\n"
     "    return a @ b\n",
     "        return out\n"),
    ('    @parametrize("layout", ["2d3d", "3d2d", "2d2d", "3d3d"])\n    def test_grouped_mm_layouts(',
     '    @parametrize("layout", ["2d3d", "3d2d"])\n    def test_grouped_mm_layouts('),
    ('    @parametrize("layout", ["2d3d", "3d2d", "2d2d", "3d3d"])\n    def test_grouped_mm_ragged(',
     '    @parametrize("layout", ["2d3d", "3d2d"])\n    def test_grouped_mm_ragged('),
    ("        a3 = torch.randn(3, 5, 4, device=device)\n", ""),
    (_span(TEST, "            ((a3[:2], b), {\"offs\": offs}", "            ((a, b), {}, r\"offs is required"),
     '            ((a, b[0]), {"offs": offs}, r"the 2D x 2D layout \\(mat_a \\[5, 4\\], mat_b \\[4, 3\\]\\) is not "\n'
     '             r"supported on CPU yet, only 2D x 3D and 3D x 2D"),\n'),
]

# torch/nn/functional.py (after manifest.GROUPED_MM_DOCS): what CPU does not take yet; core/0001.0b reverses it.
DOCS_TWO_LAYOUTS = [(
    "    past ``offs[-1]`` are zero in the output.\n",
    "    past ``offs[-1]`` are zero in the output; CPU does not take the 2D x 2D and\n"
    "    3D x 3D layouts yet.\n",
)]

# GroupedMM.h before the CUDA entry's PR (core/0002), which uses them first (then the fp8 ops):
# grouped_mm_group_index and grouped_mm_offs_ok, with the includes they alone need.
WITHOUT_GROUP_INDEX_H = [
    ("#include <ATen/ops/arange.h>\n", ""),
    ("#include <ATen/ops/searchsorted.h>\n", ""),
    (_span(HEADER, "// The group of every index 0 .. size-1", "// CPU kernel (native/cpu/GroupedMMKernel.cpp)"), ""),
]


# -- The values of offs land with core/0001.0a, the PR after core/0001: their host check
# (grouped_mm_check_offsets_cpu with grouped_mm_split_size / split_name, read by the fallback) and the zeroed
# output past offs[-1] (grouped_mm_zero_uncovered). core/0001 reads offs on the host unchecked (a bad end fails
# in narrow, which the fallback then calls for empty groups too) and leaves the uncovered elements unwritten,
# as upstream's kernels do. Applied after the *_TWO_LAYOUTS edits above.

HEADER_WITHOUT_OFFS_VALUES = [
    ("// Output elements that no group covers (rows/columns past offs[-1]) are zero.\n", ""),
    (_span(HEADER, "// Extent of the dimension that offs splits", "inline c10::SmallVector<int64_t, 3> grouped_mm_out_size("),
     ""),
    (_span(HEADER, "// Checks the values of a CPU offs tensor", "// The group of every index"), ""),
    ("// Zeroes the rows (2D x 3D) or columns (3D x 2D) of out at or past offs[-1],\n"
     "// which no group covers, comparing offs[-1] on its device (no host sync).\n"
     "void grouped_mm_zero_uncovered(const Tensor& out, GroupedMMLayout layout, const std::optional<Tensor>& offs);\n\n",
     ""),
    ("// uncovered elements zeroed, grouped_mm_cpu's output layout. It reads offs on\n"
     "// the host (a sync, as upstream's fallback) and checks it with the CPU errors.\n",
     "// grouped_mm_cpu's output layout, elements no group covers unwritten. It reads\n"
     "// offs on the host, their values unchecked yet (a bad end fails in narrow).\n"),
]

ENTRY_WITHOUT_OFFS_VALUES = [
    ("#include <ATen/ops/arange.h>\n", ""),
    ("#include <ATen/ops/zeros.h>\n", ""),
    (_span(ENTRY, "// Zeroes the rows (2D x 3D) or columns (3D x 2D) of out at or past offs[-1],\n", "namespace {\n"), ""),
    ("  // The group ends on the host, checked as the CPU kernel checks them.\n"
     "  const Tensor ends = offs->to(kCPU);\n"
     "  grouped_mm_check_offsets_cpu(ends, grouped_mm_split_size(mat_a, mat_b), grouped_mm_split_name(layout));\n",
     "  const Tensor ends = offs->to(kCPU);\n"),
    ("    if (layout == GroupedMMLayout::k2d3d && len > 0) {", "    if (layout == GroupedMMLayout::k2d3d) {"),
    ("    } else if (layout == GroupedMMLayout::k3d2d && len > 0) {", "    } else if (layout == GroupedMMLayout::k3d2d) {"),
    ("  grouped_mm_zero_uncovered(out, layout, offs);\n", ""),
]

# torch/nn/functional.py (after DOCS_TWO_LAYOUTS): no zeroed rows yet; core/0001.0a reverses it.
DOCS_WITHOUT_OFFS_VALUES = [(
    "    ``torch.float64`` with any strides, and the rows (2D x 3D) or columns (3D x 2D)\n"
    "    past ``offs[-1]`` are zero in the output; CPU does not take the 2D x 2D and\n"
    "    3D x 3D layouts yet.\n",
    "    ``torch.float64`` with any strides; CPU does not take the 2D x 2D and 3D x 3D\n"
    "    layouts yet.\n",
)]

TEST_WITHOUT_OFFS_VALUES = [
    ("# (float16/float32/float64, zeroed rows past offs[-1], ValueErrors naming the\n"
     "# argument) is tested on CPU only.\n",
     "# (float16/float32/float64, ValueErrors naming the argument) is tested on CPU\n"
     "# only.\n"),
    (_span(TEST, "    @onlyCPU\n    @dtypes(torch.float32, torch.bfloat16)\n    def test_grouped_mm_rows_past_offs_are_zero(",
           "    @onlyCPU\n    @dtypes(torch.float32, torch.bfloat16)\n    def test_grouped_mm_deterministic("), ""),
    ('            ((a, b), {"offs": _offs([3, -2], device)}, r"offs must be non-decreasing"),\n'
     '            ((a, b), {"offs": _offs([2, 4], device)}, r"offs\\[-1\\]=6 exceeds the grouped dimension M"),\n', ""),
]


# -- grouped_mm_out_strides (GroupedMM.h) lands with the CUDA entry's PR (core/0002), its first user that pads:
# before it the C++ entries allocate contiguous outputs with at::empty (the meta function pads CUDA outputs
# as upstream's kernels allocate them, GROUPED_MM_META_EARLY).

WITHOUT_OUT_STRIDES_H = [
    (_span(HEADER, "// Output strides: contiguous on CPU and ROCm;", "// Shape checks shared by the grouped GEMMs"), ""),
]
# GroupedMM.cpp's fallback (every stage before core/0002) ...
WITHOUT_OUT_STRIDES_CPP = [
    ("#include <ATen/ops/empty_strided.h>\n", "#include <ATen/ops/empty.h>\n"),
    ("  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, out_t, mat_a.device()),\n"
     "                                 mat_a.options().dtype(out_t));\n",
     "  Tensor out = at::empty(size, mat_a.options().dtype(out_t));\n"),
]
# ... and grouped_mm_empty_cpu (the kernel's stages).
WITHOUT_OUT_STRIDES_EMPTY_CPU = [
    ("  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, out_dtype, mat_a.device()),\n"
     "                                 mat_a.options().dtype(out_dtype));\n",
     "  Tensor out = at::empty(size, mat_a.options().dtype(out_dtype));\n"),
]

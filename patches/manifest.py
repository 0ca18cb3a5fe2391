"""What goes upstream, in which patch: the series, each patch a commit
message (patches/messages/) and a list of changes.

What each op is (schema, dispatch, aten name, derivatives, or why it stays
here) is declared once in torch_moe_ops/native_functions.yaml; the changes
below derive from it and from our sources, one builder per kind of change:

* Copy (changes.py): the C++ kernels, verbatim (the very files the extension
  compiles);
* NativeFunctions, Dispatch, Derivatives (native_yaml.py): the yaml entries;
* Meta (meta.py): checks and fake kernels as meta functions;
* OpInfoModule (opinfo.py): the OpInfos with their references;
* SingleDimStrategy, StrategyModule (strategy.py): the DTensor strategies;
* FxPassModule, PassTests (fx_passes.py): Inductor passes of torch_moe_ops/compile/ and their tests;
* Edit (changes.py): anchored edits of upstream files (includes, __init__ lists);
  Insert: an in-repo block inserted at an anchor (the derivative helpers in
  FunctionsManual.{h,cpp}).

Series are applied in order; each series' patches are stacked on the
previous series. Adding an op to a family that goes upstream needs no change
here unless it brings new kernel files (check_coverage names them).
"""

from __future__ import annotations

import fnmatch
import os

from torch_moe_ops import native_functions

from . import float8_weights_stages  # first: registers the sources' spans as the PRs before it see them
from . import fp8_stages
from .changes import REPO_ROOT, Copy, Edit, Insert, Patch, Series, source_text
from .decomp_expect import DecompExpect
from .errors import PatchError
from .fx_passes import FxPassModule, PassTests
from . import grouped_mm_stages
from . import fp8_recipes
from .meta import META_REGISTRATIONS, Meta
from .native_yaml import Derivatives, Dispatch, NativeFunctions
from . import opinfo_lists
from .opinfo import OpInfoModule
from .strategy import SingleDimStrategy, StrategyModule

__all__ = ["REPO_ROOT", "SERIES", "NOT_UPSTREAMED", "CARRIED_DIRS", "check_coverage", "Copy", "Edit", "Insert",
           "Patch", "Series", "FxPassModule", "PassTests"]

# Every file under these in-repo directories must be either carried by some
# change below or listed in NOT_UPSTREAMED: a new kernel source that the
# manifest does not mention is an error, not a silent gap in the series.
CARRIED_DIRS = ["torch_moe_ops/csrc"]

# The upstream-mirror tree: it holds only what the series carries (check_coverage).
MIRROR = "torch_moe_ops/csrc/ATen"

# fnmatch patterns of sources deliberately kept out of the series, with why;
# they live outside MIRROR. (fnmatch's * also matches "/".)
NOT_UPSTREAMED: dict[str, str] = {
    "torch_moe_ops/csrc/moe/*": (
        "project-only kernels. The fused expert MLP (ExpertMLP.*) is a layer-level composition (the torchao / "
        "torchtitan level of the stack) of kernels that do go upstream (_grouped_mm, the routing ops); "
        "upstream takes the primitives, not the layer. grouped_mm_gather (GroupedMMGather.*: its checks and "
        "entry point) is _grouped_mm with the grouped dimension read through an index, an op no upstream "
        "schema has; its kernel is the carried one (grouped_mm_stub's index parameters). LargeOutputCache.* is "
        "the extension's cache of large CPU blocks for those ops' outputs, and GroupedMMCached.* the extension's "
        "CPU entry of grouped_mm: the carried grouped_mm_cpu with its output from that cache; upstream's CPU "
        "allocator policy is not an op's to change"),
    "torch_moe_ops/csrc/library.cpp": (
        "the extension's registration glue; in-tree, torchgen generates the registrations from the core "
        "series' native_functions.yaml entries"),
    "torch_moe_ops/csrc/testing/*": "test-only ops (torch.ops.moe_ops_testing), not kernels",
}

# Sources in MIRROR that are bound for upstream but that the series cannot
# carry yet, with why (an exception to MIRROR holding only what is carried).
PENDING_UPSTREAM: dict[str, str] = {}

NATIVE = "aten/src/ATen/native"
SRC = "torch_moe_ops/csrc/ATen/native"
BF16_H = f"{SRC}/cpu/GroupedMMAvx512BF16.h"

# ---------------------------------------------------------------------------
# Headers of the meta blocks (what they restate, and the C++ they must stay in step with).

GROUPED_MM_META = """\
# aten._grouped_mm: checks and output allocation. These restate
# grouped_mm_check_inputs, grouped_mm_out_size and grouped_mm_out_strides of
# ATen/native/GroupedMM.h one for one, with the same messages, so that an error
# reads the same in eager and under torch.compile; keep the two in step.
"""
# The header as the PRs before the CUDA entry's (core/0002) carry it: grouped_mm_out_strides comes with that
# PR (grouped_mm_stages.WITHOUT_OUT_STRIDES_H), which puts GROUPED_MM_META in its place (GROUPED_MM_META_HEADER).
GROUPED_MM_META_EARLY = """\
# aten._grouped_mm: checks and output allocation. These restate
# grouped_mm_check_inputs and grouped_mm_out_size of ATen/native/GroupedMM.h one
# for one, with the same messages, so that an error reads the same in eager and
# under torch.compile; keep the two in step (the strides are the kernels').
"""
GROUPED_MM_META_HEADER = Edit("torch/_meta_registrations.py", [(GROUPED_MM_META_EARLY, GROUPED_MM_META)])

PERMUTE_META = """\
# aten._moe_permute: checks and output allocation. These restate the checks of
# ATen/native/MoEPermute.h one for one, with the same messages; keep the two in
# step.
"""

UNPERMUTE_META = """\
# aten._moe_unpermute: checks and output allocation. These restate the checks
# of ATen/native/MoEUnpermute.h one for one, with the same messages; keep the
# two in step.
"""

UNPERMUTE_BACKWARD_META = """\
# aten._moe_unpermute_backward: checks and output allocation. These restate the
# checks of ATen/native/MoEUnpermuteBackward.h one for one, with the same
# messages; keep the two in step.
"""

ROUTER_TOPK_META = """\
# aten._moe_router_topk: checks and output allocation. These restate the checks
# of ATen/native/MoERouterTopk.h one for one, with the same messages; keep the
# two in step.
"""

FP8_QUANTIZE_META = """\
# aten._quantize_fp8: checks and output allocation. These restate the checks
# of ATen/native/MoEQuantize.h one for one, with the same messages; keep them
# in step.
"""

FP8_DEQUANTIZE_META = """\
# aten._dequantize_fp8: checks and output allocation (MoEQuantize.h, as above).
"""

SWIZZLE_MX_SCALE_META = """\
# aten._swizzle_mx_scale: checks and output allocation. These restate the
# checks of ATen/native/MoESwizzleMXScale.h one for one, with the same
# messages; keep them in step.
"""

SCALED_GROUPED_MM_CPU_META = """\
# aten._scaled_grouped_mm on CPU (the CPU branch of meta_scaled_grouped_mm):
# checks and output allocation. These restate the checks of
# ATen/native/MoEScaledGroupedMM.h one for one, with the same messages; keep
# them in step.
"""

SCALED_GROUPED_MM_V2_META = """\
# aten._scaled_grouped_mm_v2 on CPU: the checks of the recipes the CPU kernel
# takes, as stated by ScalingType / SwizzleType. These restate the checks of
# ATen/native/MoEScaledGroupedMMv2.h one for one, with the same messages; keep
# them in step.
"""

MOE_OPS_STRATEGY_DOC = """\
Sharding strategies of the MoE routing ops (_moe_router_topk, _moe_permute,
_moe_unpermute, _moe_unpermute_backward) and the fp8 quantisation ops
(_quantize_fp8, _dequantize_fp8, _swizzle_mx_scale).

Per mesh dimension, besides everything replicated:

* _moe_router_topk: tokens: logits Shard(0) -> weights and expert ids
  Shard(0), counts Partial (a sum over tokens); the bias replicated.
* _moe_permute: hidden: tokens Shard(1) -> permuted Shard(1); a Partial
  tokens (permute is linear in it) -> permuted Partial. Tokens are never
  sharded: the rows are sorted by expert over all tokens (expert
  parallelism's all-to-all moves them instead).
* _moe_unpermute: hidden; tokens (dst_rows, weights Shard(0) -> output
  Shard(0)); a Partial permuted -> Partial output. _moe_unpermute_backward
  mirrors it (tokens sharded -> Partial grad_permuted).
* _quantize_fp8 / _dequantize_fp8: along rows (and the batch of 3-D inputs)
  for the recipes whose blocks lie within a row: rowwise, blockwise_1x128,
  mx (not swizzled); the scale follows the data. No Partial: a sum of float8
  data is not float8 data.
* _swizzle_mx_scale: replicated only.

Inputs are validated by the meta functions' checks, so a bad call fails in
sharding propagation with the kernel's message.
"""

# ---------------------------------------------------------------------------
# The Inductor MoE passes (torch_moe_ops/compile/). Only the rewrites whose target ops go upstream are
# carried: the router (router.py -> aten._moe_router_topk, with DeepSeek-V3's group limit in
# group_limit.py) and the combine (combine.py -> aten._moe_unpermute), with the helpers they share
# (_fx.py). The experts-block rewrite (pre_grad.py -> expert_mlp) and the gather rewrite (post_grad.py ->
# grouped_mm_gather) target ops that stay here: the builders reject any mention of them
# (patches/fx_passes.py), and the message says why.

MOE_MODULES = {"_fx": "moe_fx_utils", "router": "moe_router", "combine": "moe_combine",
               "group_limit": "moe_group_limit"}

# moe_router.py as the router's PR leaves it: ungrouped (n_group = 1). The third PR adds DeepSeek-V3's
# group-limited selection (group_limit.py -> moe_group_limit.py) and the router's match of it.
ROUTER_UNGROUPED = [(
    "choice = scores [+ bias] [group-limited as DeepSeek-V3];\n",
    "choice = scores [+ bias];\n",
), (
    "-inf for masked groups, an epsilon that vanishes in fp32. Exact ties are the exception no graph can\n",
    "an epsilon that vanishes in fp32. Exact ties are the exception no graph can\n",
), (
    "from .group_limit import match_group_limit\n", "",
), (
    "    n_group, topk_group, group_region = 1, 1, []\n"
    "    group = match_group_limit(choice, vc.shape[-1])\n"
    "    if group is not None:\n"
    "        choice, n_group, topk_group, group_region = group\n",
    "    n_group, topk_group, group_region = 1, 1, []\n",
)]

# The switch as the router's PR adds it; the combine's PR widens its comment (MOE_CONFIG_COMBINE).
MOE_CONFIG = """\
# set to True to rewrite stock mixture-of-experts code into the MoE ops: a
# router's score function and top-k into aten._moe_router_topk (pre-grad,
# fx_passes/moe_router.py; only where the op selects the same experts).
# Each rewrite counts itself in torch._dynamo.utils.counters["moe_passes"].
moe_passes = os.environ.get("TORCHINDUCTOR_MOE_PASSES", "0") == "1"
"""

MOE_CONFIG_COMBINE = (
    "# fx_passes/moe_router.py; only where the op selects the same experts).\n"
    "# Each rewrite counts itself in torch._dynamo.utils.counters[\"moe_passes\"].\n",
    "# fx_passes/moe_router.py; only where the op selects the same experts), the\n"
    "# weighted index_add / scatter_add of a grouped GEMM's rows into\n"
    "# aten._moe_unpermute (post-grad, fx_passes/moe_combine.py; it sums in fp32 and\n"
    "# rounds once where the stock code rounds every step). Each rewrite counts\n"
    "# itself in torch._dynamo.utils.counters[\"moe_passes\"].\n",
)

MOE_TESTS = "test/inductor/test_moe_passes.py"

MOE_TESTS_HEADER = """\
# Owner(s): ["module: inductor"]
\"\"\"The MoE passes (config.moe_passes, fx_passes/moe_*.py) on hand-written stock MoE code,
with hypothesis-drawn shapes.\"\"\"

import contextlib

import torch
from hypothesis import given, Phase, settings, strategies as st
from torch._dynamo.utils import counters
from torch._inductor.fx_passes.moe_fx_utils import COUNTER
from torch._inductor.test_case import run_tests, TestCase
"""

# ---------------------------------------------------------------------------
# The series.

# The core series is three ghstack stacks, one per RFC (patches/rfc/): grouped
# mm on CPU, MoE routing ops, fp8 grouped GEMM on CPU. Each patch is one PR,
# complete on its own: kernel, schema/dispatch, checks, meta function, tests
# in PyTorch's test/ files (or an OpInfo, which test_ops runs), decomposition
# expect entries for new ops, docs. PR_SIZE_LIMIT in test/test_patches.py
# bounds each one's size.

GROUPED_MM_DOCS = [(
    "    ``mat_a`` and column-major ``mat_b`` for FP8 inputs). Inputs are currently\n"
    "    expected to be ``torch.bfloat16`` values on CUDA devices with :math:`SM \\ge 80`.\n",
    "    ``mat_a`` and column-major ``mat_b`` for FP8 inputs). On CUDA devices with\n"
    "    :math:`SM \\ge 80`, inputs are expected to be ``torch.bfloat16`` values. On CPU,\n"
    "    inputs may be ``torch.float32``, ``torch.float16``, ``torch.bfloat16`` or\n"
    "    ``torch.float64`` with any strides, and the rows (2D x 3D) or columns (3D x 2D)\n"
    "    past ``offs[-1]`` are zero in the output.\n",
)]
# The bias PR's: bias and the float32 output on CPU.
GROUPED_MM_BIAS_DOCS = [(
    "    ``torch.float64`` with any strides, and the rows (2D x 3D) or columns (3D x 2D)\n"
    "    past ``offs[-1]`` are zero in the output.\n",
    "    ``torch.float64`` with any strides, ``bias`` and a ``torch.float32`` ``out_dtype``\n"
    "    (for 16-bit inputs) are supported, and the rows (2D x 3D) or columns (3D x 2D)\n"
    "    past ``offs[-1]`` are zero in the output.\n",
), (
    "        bias: Optional tensor that is added to the grouped outputs. Bias is not\n"
    "            jagged and must be broadcastable to the result shape of each group.\n",
    "        bias: Optional tensor that is added to the grouped outputs, of shape\n"
    "            ``(num_groups, N)`` with ``N`` the output's last dimension: group ``g`` adds\n"
    "            ``bias[g]`` to the outputs it owns (CPU only for now).\n",
)]

# Inductor's grouped mm lowerings hand the aten choice and the templates mat_a, mat_b, the scales and offs,
# never bias or scale_result: once a meta function accepts a bias, a compiled call would drop it and
# return the product without it. Upstream's metas reject bias, so nothing reaches them today; the PR whose
# meta accepts it falls back to the op itself when one is given.
MM_GROUPED_LOWERING = "torch/_inductor/kernel/mm_grouped.py"
GROUPED_MM_LOWERING_BIAS = [("from ..lowering import register_lowering\n",
                             "from ..lowering import fallback_handler, register_lowering\n"), (
    '    """Auto-tuning for _grouped_mm() operator."""\n\n',
    '    """Auto-tuning for _grouped_mm() operator."""\n\n'
    "    if bias is not None:\n"
    "        # The aten choice and the templates below take no bias: run the op with it.\n"
    "        return fallback_handler(aten._grouped_mm.default, add_to_fallback_set=False)(\n"
    "            mat_a, mat_b, offs, bias, out_dtype\n"
    "        )\n\n",
)]
SCALED_GROUPED_MM_LOWERING_BIAS = [(
    '    """Auto-tuning for _scaled_grouped_mm() operator."""\n\n',
    '    """Auto-tuning for _scaled_grouped_mm() operator."""\n\n'
    "    if bias is not None or scale_result is not None:\n"
    "        # As for _grouped_mm: the choices below take neither, so run the op with them.\n"
    "        return fallback_handler(aten._scaled_grouped_mm.default, add_to_fallback_set=False)(\n"
    "            mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum\n"
    "        )\n\n",
)]

OPINFO_INIT = "torch/testing/_internal/opinfo/definitions/__init__.py"


def opinfo_module_registered(module: str, prev: str, nxt: str) -> Edit:
    """definitions/__init__.py importing the OpInfo module and adding its op_db, between its alphabetical
    neighbours prev and nxt (as the file lists them when the PR applies)."""
    return Edit(OPINFO_INIT, [
        (f"    {prev},\n    {nxt},\n", f"    {prev},\n    {module},\n    {nxt},\n"),
        (f"    *{prev}.op_db,\n    *{nxt}.op_db,\n", f"    *{prev}.op_db,\n    *{module}.op_db,\n    *{nxt}.op_db,\n"),
    ])

def _source_block(path: str, first: str, last: str) -> str:
    """The text of the in-repo source path from the line that starts with first to the line that starts with
    last, both included, and the blank line after it: a block an earlier PR of a stack leaves out."""
    text = source_text(path)
    start = text.index("\n" + first) + 1
    stop = text.index("\n\n", text.index("\n" + last, start) + 1) + 2
    return text[start:stop]


# The stack's first PR: the checks, the meta function and a CPU entry that
# computes through grouped_mm_fallback (the device-generic loop of ATen
# matmuls); the next PR adds the kernel (grouped_mm_stub) and runs it instead.
ENTRY_ON_FALLBACK_H = [(
    "#include <ATen/native/DispatchStub.h>\n", "",
), (
    _source_block(f"{SRC}/GroupedMM.h", "// CPU kernel (native/cpu/GroupedMMKernel.cpp)", "    ScalarType out_dtype);"), "",
), (
    "// The CUDA entry runs it where upstream's grouped GEMM does not apply.\n",
    "// grouped_mm_cpu computes through it.\n",
)]
ENTRY_ON_FALLBACK = [(
    "// Entry points of _grouped_mm: the CPU kernel's (validate, allocate, run\n"
    "// grouped_mm_stub), and the device-generic loop of ATen matmuls that the CUDA\n"
    "// entry falls back to where upstream's grouped GEMM does not apply.\n",
    "// Entry point of _grouped_mm on CPU: validate, then compute through the\n"
    "// device-generic loop of ATen matmuls (grouped_mm_fallback).\n",
), (
    "DEFINE_DISPATCH(grouped_mm_stub);\n\n", "",
), (
    _source_block(f"{SRC}/GroupedMM.cpp", "Tensor grouped_mm_empty_cpu(", "}"), "",
), (
    "  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);\n"
    "  Tensor out = grouped_mm_empty_cpu(mat_a, mat_b, offs, grouped_mm_out_dtype(mat_a, out_dtype));\n"
    "  if (out.numel() > 0) {\n"
    "    grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, std::nullopt, std::nullopt, out);\n"
    "  }\n"
    "  return out;\n",
    "  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);\n"
    "  return grouped_mm_fallback(mat_a, mat_b, offs, bias, out_dtype);\n",
)]

# GroupedMMKernel.cpp as the stack's PRs leave it. The kernel's first PR
# carries the portable engine only: the file without its CPU_CAPABILITY_AVX512
# blocks, and these edits.
PORTABLE_KERNEL = [(
    "// Engines:\n"
    "//   widening: tiles gathered into float32 (float64) buffers and multiplied by\n"
    "//     a Vectorized<T> kernel. The DEFAULT and AVX2 builds of this file run\n"
    "//     every call here, and float64 always does.\n"
    "//   AVX-512 (GroupedMMAvx512.h, GroupedMMInnerProduct.h; the\n"
    "//     CPU_CAPABILITY_AVX512 build of this file only): micro-kernels that\n"
    "//     stream the expert weights from the caller's memory while they compute,\n"
    "//     and at::mm (oneDNN/MKL) per group where the BLAS is faster (groups of\n"
    "//     hundreds of rows of bfloat16/float32 without bias), one group after the\n"
    "//     other outside any parallel region (the BLAS threads each GEMM itself).\n",
    "// Tiles are gathered into float32 (float64) buffers and multiplied by a\n"
    "// Vectorized<T> kernel.\n",
), (
    "  int64_t tile_n = kWideNB;\n\n  std::vector<Tile> tiles;\n",
    "  const int64_t tile_n = kWideNB;\n\n  std::vector<Tile> tiles;\n",
), (
    "    int64_t problem_tile_n = tile_n;\n",
    "    const int64_t problem_tile_n = tile_n;\n",
), (
    "problems, bool has_bias, bool gathered) {\n",
    "problems) {\n",
), (
    "  run_problems(problems, bias_ptr != nullptr, a_idx != nullptr || b_idx != nullptr);\n",
    "  run_problems(problems);\n",
)]

# The AVX-512 PR: the file without the inner-product engine (the next PR).
WITHOUT_INNER_PRODUCT = [(
    "//   AVX-512 (GroupedMMAvx512.h, GroupedMMInnerProduct.h; the\n"
    "//     CPU_CAPABILITY_AVX512 build of this file only): micro-kernels that\n"
    "//     stream the expert weights from the caller's memory while they compute,\n",
    "//   AVX-512 (GroupedMMAvx512.h; the CPU_CAPABILITY_AVX512 build of this file\n"
    "//     only): micro-kernels that stream the expert weights from the caller's\n"
    "//     memory while they compute,\n",
), (
    "#include <ATen/native/cpu/GroupedMMInnerProduct.h>\n", "",
), (
    "        if (nt_eligible<scalar_t>(p)) {\n"
    "          nt_scratch(p, need);\n"
    "        } else {\n"
    "          avx512_scratch(p, t, need);\n"
    "        }\n",
    "        avx512_scratch(p, t, need);\n",
), (
    "            if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>) {\n"
    "              if (nt_eligible<scalar_t>(p)) {\n"
    "                run_tile_nt(p, t, buf, next_p, next);\n"
    "                continue;\n"
    "              }\n"
    "            }\n",
    "",
)]

# The AVX-512 engine's first PR: bfloat16 widened to float32 like float16; the
# next PR adds its K pairs (GroupedMMAvx512BF16.h, MicroTraits<BFloat16, true>).
WITHOUT_BF16_PAIRS = [(
    "#include <ATen/native/cpu/GroupedMMAvx512BF16.h>\n", "",
), (
    "            if constexpr (std::is_same_v<scalar_t, BFloat16>) {\n"
    "              if (cpu_has_avx512_bf16()) {\n"
    "                run_tile_avx512<scalar_t, out_t, MicroTraits<BFloat16, true>>(p, t, buf, next_p, next);\n"
    "              } else {\n"
    "                run_tile_avx512<scalar_t, out_t, MicroTraits<BFloat16, false>>(p, t, buf, next_p, next);\n"
    "              }\n"
    "            } else {\n"
    "              run_tile_avx512<scalar_t, out_t, MicroTraits<scalar_t>>(p, t, buf, next_p, next);\n"
    "            }\n",
    "            run_tile_avx512<scalar_t, out_t, MicroTraits<scalar_t>>(p, t, buf, next_p, next);\n",
)]


# The PRs before the brgemm engine's (AMX, cpu/GroupedMMBrgemm.h): its comment (every stage) and its code
# (the AVX-512 stages; the portable ones drop the CPU_CAPABILITY_AVX512 blocks that hold it anyway).
BRGEMM_COMMENT = [(
    "//   brgemm (GroupedMMBrgemm.h; the AVX512 build, bfloat16 and float16 where\n"
    "//     cpublas::could_pack holds, i.e. AMX): ATen's batch-reduce GEMM per tile\n"
    "//     on a packed weight block.\n", "",
)]
# Inside the span WITHOUT_MATMUL removes whole (the engine choice), so only for the stages after it.
BRGEMM_ENGINE_CHOICE = [(
    "enum class Engine { kMatmul, kWidening, kAvx512, kBrgemm };", "enum class Engine { kMatmul, kWidening, kAvx512 };",
), (
    "  if constexpr (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, Half>) {\n"
    "    // Where the CPU packs for brgemm (AMX), its matrix units run the tiles;\n"
    "    // at::mm keeps the large bfloat16 groups (oneDNN's matmul uses AMX too).\n"
    "    if (CpublasBrgemm::available<scalar_t>() && !(fallback == Engine::kMatmul && large_groups)) {\n"
    "      return Engine::kBrgemm;\n"
    "    }\n"
    "  }\n", "",
)]
BRGEMM_REST = BRGEMM_COMMENT + [(
    "#include <ATen/native/cpu/GroupedMMBrgemm.h>\n", "",
), (
    "  const bool brgemm = engine == Engine::kBrgemm;\n", "",
), (
    "  } else if (brgemm) {\n    tile_n = kBrgemmNB;\n  }\n", "  }\n",
), (
    "    if constexpr (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, Half>) {\n"
    "      if (brgemm) {\n"
    "        brgemm_scratch<CpublasBrgemm>(p, t, need);\n"
    "        continue;\n"
    "      }\n"
    "    }\n", "",
), (
    "        if constexpr (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, Half>) {\n"
    "          if (brgemm) {\n"
    "            run_tile_brgemm<CpublasBrgemm>(p, t, buf);\n"
    "            continue;\n"
    "          }\n"
    "        }\n", "",
), (
    "#if defined(CPU_CAPABILITY_AVX512)\n"
    "    if constexpr (std::is_same_v<scalar_t, BFloat16> || std::is_same_v<scalar_t, Half>) {\n"
    "      if (brgemm) {\n"
    "        CpublasBrgemm::release<scalar_t>(); // the thread's AMX tile configuration\n"
    "      }\n"
    "    }\n"
    "#endif\n", "",
)]
WITHOUT_BRGEMM = BRGEMM_ENGINE_CHOICE + BRGEMM_REST

def _source_between(path: str, start: str, stop: str) -> str:
    """The text of the in-repo source path from start up to and including stop (the first after it)."""
    text = source_text(path)
    first = text.index(start)
    return text[first:text.index(stop, first) + len(stop)]


# The PRs before the transposed-tile engine's (float32 and bfloat16, (E, N, K) weights, cpu/GroupedMMTransposedTile.h): its
# comment (every stage) and its code (the AVX-512 stages). Applied before WITHOUT_INNER_PRODUCT, whose spans
# it sits next to.
# The PRs before 1c3's turned 3D x 2D groups (C^T = B^T A^T): the kernel's
# turning, the transposed-tile engine's store of C^T, the Problem's flag and
# the broadcast engine's transposed store (WITHOUT_TURNED_UTILS and
# WITHOUT_TURNED_AVX512 below), and 1c3's lines of the upstream test.
KERNEL_WITHOUT_TURNED = [(
    _source_between(f"{SRC}/cpu/GroupedMMKernel.cpp",
                    "#if defined(CPU_CAPABILITY_AVX512)\n// 3D x 2D (the expert's weights as A",
                    "#endif // CPU_CAPABILITY_AVX512\n\n"), "",
), (
    "#if defined(CPU_CAPABILITY_AVX512)\n"
    "  turn_3d2d_groups(bias_ptr != nullptr, a_idx != nullptr || b_idx != nullptr, problems);\n"
    "#endif\n", "",
)]
TT_WITHOUT_TURNED = [(
    "// 16 x 16 blocks transposed in registers, + bias, rounded once to out_t; a\n"
    "// turned problem's C^T takes ct's columns as they are.\n",
    "// 16 x 16 blocks transposed in registers, + bias, rounded once to out_t.\n",
), (
    _source_between(f"{SRC}/cpu/GroupedMMTransposedTile.h", "  if (p.c_transposed) {\n", "    return;\n  }\n"), "",
)]
# The inner-product engine's store of C^T (a turned 3D x 2D group of few tokens, 1c3).
NT_WITHOUT_TURNED = [(
    "        nt_store(p, p.c_row_stride(), p.c_col_stride(), m0 + r0, mr, n0, w, sums);\n",
    "        nt_store(p, p.c_rs, 1, m0 + r0, mr, n0, w, sums);\n",
)]
TEST_MATMUL_WITHOUT_TURNED = [(
    "        # row-major and column-major. 3D x 2D with more than 512 such weight\n"
    "        # rows runs turned around (C^T = B^T A^T) in the same kernel, with\n"
    "        # the same bits as the (G, K, N) storage, which it takes unturned.\n",
    "        # row-major and column-major.\n",
), (
    _source_between("patches/src/test/test_matmul.py", "            w_nk = torch.randn(len(sizes), 520, k,",
                    "                self.assertEqual(out[:, few], kn[:, few], atol=0, rtol=0)\n"), "",
)]

# The PRs before 1c4's rows after a tile's last whole vector as inner
# products (TtRows::rest): the transposed-tile engine pads them into a vector.
TT_WITHOUT_REST = [(
    "#include <ATen/native/cpu/GroupedMMInnerProduct.h>\n", "",
), (
    _source_between(f"{SRC}/cpu/GroupedMMTransposedTile.h", "// Rows past the tile's last whole 16-row vector take",
                    "constexpr int64_t kTtMaxRestOneVector = 6;\n\n"), "",
), (
    _source_between(f"{SRC}/cpu/GroupedMMTransposedTile.h", "// How the engine splits a problem's rows:",
                    "// order, so their bits are those of the same rows as a group of their own.\n"),
    "// The tile's rows, padded to whole 16-row vectors, and its K block.\n",
), (
    "  int64_t rest;  // rows after them, as inner products; 0 for none\n", "",
), (
    _source_between(f"{SRC}/cpu/GroupedMMTransposedTile.h", "  const int64_t whole = p.m / 16 * 16;\n",
                    "    return {whole, p.m - whole, kc};\n  }\n"), "",
), (
    "  return {mpad, 0, tt_kc<scalar_t>(p.k, mpad)};\n", "  return {mpad, tt_kc<scalar_t>(p.k, mpad)};\n",
), (
    _source_between(f"{SRC}/cpu/GroupedMMTransposedTile.h", "// The rest's rows x weight rows [j0, j0 + 8)",
                    "      nt_store(p, p.c_row_stride(), p.c_col_stride(), s.mpad + r0, mr, t.n0 + j, w, sums);\n"
                    "    }\n  }\n}\n\n"), "",
), (
    "// The rest's rows (TtRows) after each 8 weight rows' passes.\n", "",
), (
    "  const scalar_t* rest_rows[kTtMaxRest];\n"
    "  if (s.rest > 0) nt_a_rows(p, s.mpad, s.rest, nt_zero_row(p, buf.b), rest_rows);\n", "",
), (
    "      if (s.rest > 0) tt_rest(p, t, s, j0, rest_rows);\n", "",
), (
    "  tt_store(p, t, ct, mpad, p.m - s.rest);\n", "  tt_store(p, t, ct, mpad, p.m);\n",
), (
    "  const int64_t zero_row = r.rest > 0 && p.a_row_idx != nullptr ? p.k * static_cast<int64_t>(sizeof(scalar_t)) : 0;\n"
    "  s.at_least((r.kc + per - 1) / per * r.mpad * 4, zero_row,",
    "  s.at_least((r.kc + per - 1) / per * r.mpad * 4, 0,",
)]
TEST_MATMUL_WITHOUT_REST = [(
    "        # The rows after a group's last whole 16 (17 = 16 + 1, 33, 130) may\n"
    "        # take inner products instead, with the bits of the same rows as a\n"
    "        # group of their own.\n", "",
), (
    _source_between("patches/src/test/test_matmul.py", "        tiled = [(e, s - n, n) for e,",
                    "for e, s, n in tiled if n % 16]\n"),
    "        few = torch.cat([torch.arange(s - n, s) for s, n in zip(itertools.accumulate(sizes), sizes) if n >= fewest])\n",
), (
    _source_between("patches/src/test/test_matmul.py", "                    kn = torch._grouped_mm(x, w.contiguous(),",
                    "torch.equal(out[r], own))\n"),
    "                    self.assertEqual(out[few], torch._grouped_mm(x, w.contiguous(), offs=offs, bias=bias)[few],\n"
    "                                     atol=0, rtol=0)\n",
), (
    _source_between("patches/src/test/test_matmul.py", "                for e, r, o in rest:\n                    own = torch._grouped_mm(w_nk",
                    "torch.equal(out[:, r], own))\n"), "",
)]

TRANSPOSED_TILE_COMMENT = [(
    "//   transposed tiles (GroupedMMTransposedTile.h; the AVX512 build): float32\n"
    "//     groups of 17 rows and more (bfloat16: 18, with AVX512_BF16) with\n"
    "//     (E, N, K) weights, the weights broadcast in place into tiles of C^T.\n", "",
)]
WITHOUT_TRANSPOSED_TILE = TRANSPOSED_TILE_COMMENT + KERNEL_WITHOUT_TURNED + [(
    "#include <ATen/native/cpu/GroupedMMTransposedTile.h>\n", "",
), (
    "        if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>) {\n"
    "          if (tt_eligible<scalar_t>(p)) {\n"
    "            tt_scratch(p, t, need);\n"
    "            continue;\n"
    "          }\n"
    "        }\n", "",
), (
    "            if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>) {\n"
    "              if (tt_eligible<scalar_t>(p)) {\n"
    "                run_tile_tt(p, t, buf, next_p, next);\n"
    "                continue;\n"
    "              }\n"
    "            }\n", "",
)]


# The grouped dimension read through an index (grouped_mm_stub's a_index /
# b_index) serves torch-moe-ops' grouped_mm_gather only: no op of the series
# passes one. The portable kernel's PR leaves it out; the PR after it adds it
# (the AVX-512 engines of the later PRs read through it).
WITHOUT_INDEX_H = [(
    "// a_index / b_index, when given, are contiguous int64 indices (-1 reads zeros)\n"
    "// through which the grouped dimension of mat_a / mat_b is read: the row i of\n"
    "// a 2D x 3D mat_a is mat_a[a_index[i]], in 2D x 2D the column k of mat_a is\n"
    "// mat_a[:, a_index[k]] and the row k of mat_b is mat_b[b_index[k]]. _grouped_mm\n"
    "// passes nullopt; a caller that routes tokens to groups can thus multiply them\n"
    "// without first copying them into group order.\n", "",
), (
    "    const std::optional<Tensor>& bias,\n"
    "    const std::optional<Tensor>& a_index,\n"
    "    const std::optional<Tensor>& b_index,\n"
    "    const Tensor& out);\n",
    "    const std::optional<Tensor>& bias,\n"
    "    const Tensor& out);\n",
)]
WITHOUT_INDEX_CPP = [(
    "grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, std::nullopt, std::nullopt, out);",
    "grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, out);",
)]
WITHOUT_INDEX_UTILS = [(
    "  const acc_t* bias; // nullptr or n contiguous values\n"
    "  // With indices (grouped_mm_stub's a_index / b_index): row r of A is at\n"
    "  // a + a_row_idx[r] * a_rs, column k of A at a + a_col_idx[k] * a_cs, row k\n"
    "  // of B at b + b_idx[k] * b_rs; an index of -1 reads zeros.\n"
    "  const int64_t* a_row_idx = nullptr;\n"
    "  const int64_t* a_col_idx = nullptr;\n"
    "  const int64_t* b_idx = nullptr;\n"
    "  bool a_gathered() const { return a_row_idx != nullptr || a_col_idx != nullptr; }\n",
    "  const acc_t* bias; // nullptr or n contiguous values\n",
), (
    _source_block(f"{SRC}/cpu/GroupedMMKernelUtils.h", "// Gathered rows: dst row r", "}"), "",
), (
    _source_block(f"{SRC}/cpu/GroupedMMKernelUtils.h", "// Gathered columns: dst[r * ld + c]", "}"), "",
), (
    "// dst (leading dimension ld, columns [kc, ld) zero): gathered or strided.\n",
    "// dst (leading dimension ld, columns [kc, ld) zero).\n",
), (
    "  if (p.a_row_idx != nullptr) {\n"
    "    gather_rows(dst, ld, p.a + k0 * p.a_cs, p.a_row_idx + m0, p.a_rs, p.a_cs, mb, kc, ld);\n"
    "  } else if (p.a_col_idx != nullptr) {\n"
    "    gather_cols(dst, ld, p.a + m0 * p.a_rs, p.a_col_idx + k0, p.a_rs, p.a_cs, mb, kc, ld);\n"
    "  } else {\n"
    "    gather_block(dst, ld, p.a + m0 * p.a_rs + k0 * p.a_cs, p.a_rs, p.a_cs, mb, kc, ld);\n"
    "  }\n",
    "  gather_block(dst, ld, p.a + m0 * p.a_rs + k0 * p.a_cs, p.a_rs, p.a_cs, mb, kc, ld);\n",
)]
# The widening engine's B panels, gathered rows aside (the in-place PR; the
# first PR packs its B blocks by a plain strided copy, without prefetch).
WITHOUT_INDEX_B_PANELS = [(
    "// columns past nb zero), gathered or strided, converted to dst_t. Packed\n",
    "// columns past nb zero), strided, converted to dst_t. Packed\n",
), (
    "      if (p.b_idx != nullptr) {\n"
    "        gather_rows(dst + j0 * kc, kW, b + j0 * p.b_cs, p.b_idx + k0, p.b_rs, p.b_cs, kc, w, kW);\n"
    "      } else {\n"
    "        gather_block(dst + j0 * kc, kW, b + j0 * p.b_cs + k0 * p.b_rs, p.b_rs, p.b_cs, kc, w, kW);\n"
    "      }\n",
    "      gather_block(dst + j0 * kc, kW, b + j0 * p.b_cs + k0 * p.b_rs, p.b_rs, p.b_cs, kc, w, kW);\n",
), (
    "    const int64_t row = p.b_idx != nullptr ? p.b_idx[k0 + l] : k0 + l;\n"
    "    const src_t* s = row < 0 ? nullptr : b + row * p.b_rs;\n",
    "    const src_t* s = b + (k0 + l) * p.b_rs;\n",
), (
    "      if (s == nullptr) {\n"
    "        std::fill(d, d + kW, dst_t(0));\n"
    "        continue;\n"
    "      }\n", "",
), (
    "  if (p.b_idx != nullptr) return pf;  // gathered rows: not worth the bookkeeping\n", "",
)]
WITHOUT_INDEX_TILE = [(
    "(p.m == 1 || p.a_rs >= p.k) &&\n      !p.a_gathered();\n",
    "(p.m == 1 || p.a_rs >= p.k);\n",
), (
    "(p.m == 1 || p.a_rs >= k) &&\n      !p.a_gathered();\n",
    "(p.m == 1 || p.a_rs >= k);\n",
), (
    "p.b_cs == 1 && p.b_idx == nullptr;\n",
    "p.b_cs == 1;\n",
)]
WITHOUT_INDEX_ENTRY = [(
    "                      const std::optional<Tensor>& bias, const std::optional<Tensor>& a_index,\n"
    "                      const std::optional<Tensor>& b_index, const Tensor& out) {\n",
    "                      const std::optional<Tensor>& bias, const Tensor& out) {\n",
), (
    "  const int64_t* a_idx = a_index.has_value() ? a_index->const_data_ptr<int64_t>() : nullptr;\n"
    "  const int64_t* b_idx = b_index.has_value() ? b_index->const_data_ptr<int64_t>() : nullptr;\n", "",
), (
    "        p.a = a_idx != nullptr ? a : a + start * a_rs;\n"
    "        p.a_row_idx = a_idx != nullptr ? a_idx + start : nullptr;\n",
    "        p.a = a + start * a_rs;\n",
), (
    "        p.a = a_idx != nullptr ? a : a + start * a_cs;\n"
    "        p.a_col_idx = a_idx != nullptr ? a_idx + start : nullptr;\n"
    "        p.b = b_idx != nullptr ? b : b + start * b_rs;\n"
    "        p.b_idx = b_idx != nullptr ? b_idx + start : nullptr;\n",
    "        p.a = a + start * a_cs;\n"
    "        p.b = b + start * b_rs;\n",
), (
    "                       const std::optional<Tensor>& bias, const std::optional<Tensor>& a_index,\n"
    "                       const std::optional<Tensor>& b_index, const Tensor& out) {\n",
    "                       const std::optional<Tensor>& bias, const Tensor& out) {\n",
), (
    "grouped_mm_typed<scalar_t, scalar_t>(mat_a, mat_b, offs, bias, a_index, b_index, out);",
    "grouped_mm_typed<scalar_t, scalar_t>(mat_a, mat_b, offs, bias, out);",
), (
    "grouped_mm_typed<scalar_t, float>(mat_a, mat_b, offs, bias, a_index, b_index, out);",
    "grouped_mm_typed<scalar_t, float>(mat_a, mat_b, offs, bias, out);",
)]

WITHOUT_INDEX_KERNEL = WITHOUT_INDEX_TILE + WITHOUT_INDEX_ENTRY

# The portable kernel's first PR gathers every operand block into scratch,
# each A row block and B block K block by K block, and rounds every output in
# the epilogue; the PR after it reads float operands in place (the first
# register tile packing a row-major B's panel as it goes), prefetches the
# next B block, writes fp32 output directly and copies a transposed block in
# 16 x 16 blocks. The same values meet in the same order, so the same bits.
KERNEL_H = f"{SRC}/cpu/GroupedMMKernel.cpp"
WIDENING_ALL_COPIED = [(
    _source_between(KERNEL_H, "// ---- widening engine: row-major tiles",
                    "      store_tile<out_t>(p, m0, mb, t.n0, nb, acc, nb);\n    }\n  }\n}\n"),
    "// ---- widening engine: row-major tiles in compute_t (float or double) --------\n"
    "// Operands are gathered tile by tile into scratch, B zero-padded to 2 vectors.\n"
    "template <typename compute_t>\n"
    "constexpr int64_t kWidePanel = 2 * vec::Vectorized<compute_t>::size();\n"
    "\n"
    "template <typename scalar_t, typename out_t, typename compute_t>\n"
    "void widening_scratch(const Problem<scalar_t, out_t, compute_t>& p, const Tile& t, ScratchBytes& s) {\n"
    "  const int64_t ldb = (t.nb + kWidePanel<compute_t> - 1) / kWidePanel<compute_t> * kWidePanel<compute_t>;\n"
    "  const auto e = static_cast<int64_t>(sizeof(compute_t));\n"
    "  s.at_least(std::min(kWideMB, p.m) * p.k * e, p.k * ldb * e, kWideMB * t.nb * e);\n"
    "}\n"
    "\n"
    "template <typename scalar_t, typename out_t, typename compute_t>\n"
    "void run_tile_widening(const Problem<scalar_t, out_t, compute_t>& p, const Tile& t, ThreadBuffers& buf) {\n"
    "  constexpr int64_t kW = kWidePanel<compute_t>;\n"
    "  const int64_t k = p.k;\n"
    "  const int64_t nb = t.nb;\n"
    "  const int64_t ldb = (nb + kW - 1) / kW * kW;\n"
    "  compute_t* b = workspace<compute_t>(buf.b, k * ldb);\n"
    "  gather_block(b, ldb, p.b + t.n0 * p.b_cs, p.b_rs, p.b_cs, k, nb, ldb);\n"
    "  compute_t* acc = workspace<compute_t>(buf.acc, kWideMB * nb);\n"
    "  for (int64_t m0 = 0; m0 < p.m; m0 += kWideMB) {\n"
    "    const int64_t mb = std::min(kWideMB, p.m - m0);\n"
    "    compute_t* a = workspace<compute_t>(buf.a, mb * k);\n"
    "    load_a_block(a, k, p, m0, mb, 0, k);\n"
    "    for (int64_t j0 = 0; j0 < nb; j0 += kW) {\n"
    "      gemm_panel<compute_t>(mb, std::min(kW, nb - j0), k, a, k, b + j0, ldb, acc + j0, nb);\n"
    "    }\n"
    "    store_tile<out_t>(p, m0, mb, t.n0, nb, acc, nb);\n"
    "  }\n"
    "}\n",
), (
    "        const Tile* next = i + 1 < bounds[chunk + 1] ? &tiles[i + 1] : nullptr;\n"
    "        run_tile_widening(p, t, buf, next != nullptr ? &problems[next->problem] : nullptr, next);\n",
    "        run_tile_widening(p, t, buf);\n",
)]
UTILS_H = f"{SRC}/cpu/GroupedMMKernelUtils.h"
# C^T outputs (a problem turned around for the transposed-tile engine, 1c2).
WITHOUT_TURNED_UTILS = [(
    _source_between(UTILS_H, "  // C^T stored instead: element (r, j)", "  bool c_transposed = false;\n"), "",
), (
    _source_between(UTILS_H, "  // Element (r, j) of the result at c + r * c_row_stride()",
                    "  int64_t c_col_stride() const { return c_transposed ? c_rs : 1; }\n"), "",
), (
    _source_between(UTILS_H, "// p as C^T = B^T A^T (no bias, no indices)", "  return q;\n}\n\n"), "",
)]
# The first PR's widening engine: no K blocks, no packing in the register
# tile, no prefetch (WIDENING_ALL_COPIED).
WIDENING_UTILS_ALL_COPIED = [(
    _source_between(UTILS_H, "// Its K blocks: a 128-row A block", "sizeof(T));\n"), "",
), (
    _source_between(UTILS_H, "// A (kc x nb) block of a problem's B at row k0", "  return pf;\n}\n\n"), "",
), (
    _source_between(UTILS_H, "// Row-major C (mb x w, ldc) = A (mb x kc, lda) B, or C += A B with",
                    "// stack on every K step (half the speed).\n"),
    "// Row-major C (mb x w, ldc) = A (mb x k, lda) B (k rows of kW = 2 vectors, ldb\n"
    "// apart, columns [w, kW) zero, so every load is full width), single-threaded.\n"
    "// Each output is summed along K in order from zero with Vectorized<T>::fmadd\n"
    "// (on AVX2/AVX-512 one rounding per step). A tile of kGemmRows rows x 2\n"
    "// vectors is held in registers (AVX2: 12 accumulators of the 16 ymm), as\n"
    "// named variables: GCC 12 stored an array of them to the stack on every K\n"
    "// step (half the speed).\n",
), (
    _source_between(UTILS_H, "#define WIDE_LOAD(i)", "c##i##1 = Vec::loadu(c + i * ldc + kV, w1); } }\n"), "",
), (
    "template <typename T, int R, bool kPack>\n"
    "void gemm_tile(int64_t kc, const T* a, int64_t lda, const T* b, int64_t ldb, T* pack, T* c, int64_t ldc, int64_t w,\n"
    "               bool accumulate) {\n"
    "  static_assert(R >= 1 && R <= 6, \"WIDE_LOAD, WIDE_ROW and WIDE_STORE name six rows of accumulators\");\n",
    "template <typename T, int R>\n"
    "void gemm_tile(int64_t kc, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t w) {\n"
    "  static_assert(R >= 1 && R <= 6, \"WIDE_ROW and WIDE_STORE name six rows of accumulators\");\n",
), (
    "  WIDE_LOAD(0) WIDE_LOAD(1) WIDE_LOAD(2) WIDE_LOAD(3) WIDE_LOAD(4) WIDE_LOAD(5)\n", "",
), (
    "    if constexpr (kPack) {\n"
    "      b0.store(pack + l * 2 * kV);\n"
    "      b1.store(pack + l * 2 * kV + kV);\n"
    "    }\n", "",
), (
    "#undef WIDE_LOAD\n", "",
), (
    _source_between(UTILS_H, "// The tiles of a row block. With pack null",
                    "  if (r0 < mb) run(std::integral_constant<int, 1>{}, r0);\n}\n"),
    "template <typename T>\n"
    "void gemm_panel(int64_t mb, int64_t w, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,\n"
    "                int64_t ldc) {\n"
    "  int64_t r0 = 0;\n"
    "  for (; r0 + kGemmRows <= mb; r0 += kGemmRows) {\n"
    "    gemm_tile<T, kGemmRows>(k, a + r0 * lda, lda, b, ldb, c + r0 * ldc, ldc, w);\n"
    "  }\n"
    "  for (; r0 + 2 <= mb; r0 += 2) gemm_tile<T, 2>(k, a + r0 * lda, lda, b, ldb, c + r0 * ldc, ldc, w);\n"
    "  if (r0 < mb) gemm_tile<T, 1>(k, a + r0 * lda, lda, b, ldb, c + r0 * ldc, ldc, w);\n"
    "}\n",
)]
WITHOUT_TRANSPOSED_COPY = [(
    _source_block(UTILS_H, "// Transposing copy in 16x16 blocks", "}"), "",
), (
    "// Row-major copy of a (rows x cols) strided block into dst with leading\n"
    "// dimension ld, choosing the loop order that reads the source sequentially.\n",
    "// Row-major copy of a (rows x cols) strided block into dst with leading\n"
    "// dimension ld.\n",
), (
    "  if (rs == 1 && cs != 1 && rows > 1) {\n"
    "    copy_block_transposed(dst, ld, src, cs, rows, cols);\n"
    "    for (int64_t r = 0; r < rows; ++r)\n"
    "      for (int64_t c = cols; c < cols_pad; ++c) dst[r * ld + c] = dst_t(0);\n"
    "  } else {\n"
    "    copy_block(dst, ld, src, rs, cs, rows, cols, cols_pad);\n"
    "  }\n",
    "  copy_block(dst, ld, src, rs, cs, rows, cols, cols_pad);\n",
)]

# The AVX-512 PR without at::mm for large groups (the PR after it).
WITHOUT_MATMUL = [(
    "//     memory while they compute,\n"
    "//     and at::mm (oneDNN/MKL) per group where the BLAS is faster (groups of\n"
    "//     hundreds of rows of bfloat16/float32 without bias), one group after the\n"
    "//     other outside any parallel region (the BLAS threads each GEMM itself).\n",
    "//     memory while they compute.\n",
), (
    "#include <ATen/ops/from_blob.h>\n#include <ATen/ops/mm.h>\n", "",
), (
    _source_between(f"{SRC}/cpu/GroupedMMKernel.cpp", "#if defined(CPU_CAPABILITY_AVX512)\n// ---- matmul engine",
                    "#endif // CPU_CAPABILITY_AVX512\n\n"), "",
), (
    "problems, bool has_bias, bool gathered) {\n",
    "problems) {\n",
), (
    _source_between(f"{SRC}/cpu/GroupedMMKernel.cpp", "  const Engine engine = choose_engine(",
                    "  const bool micro = engine == Engine::kAvx512;\n"),
    "  // float64 stays on the widening engine.\n"
    "  constexpr bool micro = !std::is_same_v<scalar_t, double>;\n",
), (
    "  run_problems(problems, bias_ptr != nullptr, a_idx != nullptr || b_idx != nullptr);\n",
    "  run_problems(problems);\n",
)]
AVX512_WITHOUT_MATMUL = [(
    "// float32, float16 and bfloat16, except groups of hundreds of rows where\n"
    "// MKL / oneDNN are faster (float32 on Intel cores; bfloat16 on CPUs with\n"
    "// AVX512_BF16 unless A and B are both row-major): micro-kernels that read the\n"
    "// expert weights straight from the caller's memory, one cache-sized block at\n"
    "// a time, so streaming the weights from DRAM overlaps the arithmetic instead\n"
    "// of preceding it. bfloat16 runs as K pairs through vdpbf16ps where the CPU\n"
    "// has AVX512_BF16, widened to float32 where it has not (GroupedMMAvx512BF16.h).\n",
    "// float32, float16 and bfloat16: micro-kernels that read the expert weights\n"
    "// straight from the caller's memory, one cache-sized block at a time, so\n"
    "// streaming the weights from DRAM overlaps the arithmetic instead of preceding\n"
    "// it. bfloat16 runs as K pairs through vdpbf16ps where the CPU has\n"
    "// AVX512_BF16, widened to float32 where it has not (GroupedMMAvx512BF16.h).\n",
)]

# The packing of K-contiguous weights by 16 x 16 register transposes lands
# with the inner-product PR (weights stored along K); before it such weights
# are packed element by element (the same values, so the same bits).
WITHOUT_PACK_WORDS = [(
    "// 4 x MR named accumulators, in-register 16 x 16 transposes, vdpbf16ps K\n"
    "// pairs, L2 prefetch of the next weight block); see the measurements below.\n",
    "// 4 x MR named accumulators, vdpbf16ps K pairs, L2 prefetch of the next\n"
    "// weight block); see the measurements below.\n",
), (
    _source_block(f"{SRC}/cpu/GroupedMMAvx512.h", "// r[i] (16 dwords each)", "}"), "",
), (
    _source_block(f"{SRC}/cpu/GroupedMMAvx512.h", "// Packs 32-bit words of a K-contiguous source", "}"), "",
), (
    "  if constexpr (std::is_same_v<scalar_t, float>) {\n"
    "    if (rs == 1 && rows == nullptr) {\n"
    "      pack_words_transposed(reinterpret_cast<uint32_t*>(dst), src, cs, kc, w);\n"
    "      return;\n"
    "    }\n"
    "  }\n", "",
)]
# The PRs before 1c5's: the K-pair kernel's rounding by vcvtne2ps2bf16, its
# runs of row blocks (MicroArgs::blocks, AVX512_WITHOUT_STREAM) and the
# prefetch spread computed without a division.
BF16_WITHOUT_SHORT_K = [(
    _source_between(BF16_H, "// Kernels on short K blocks (a weight gradient's few dozen rows) compute",
                    "    }\n  }\n};\n"),
    "struct PrefetchSpread {\n"
    "  int64_t per, every;\n"
    "  PrefetchSpread(int64_t items, int64_t steps)\n"
    "      : per(std::max<int64_t>(1, (items + steps - 1) / std::max<int64_t>(1, steps))),\n"
    "        every(std::max<int64_t>(1, steps * per / std::max<int64_t>(1, items))) {}\n"
    "};\n",
), (
    _source_between(BF16_H, "// The epilogue of the bfloat16 K-pair kernels. A last K block of full",
                    "  }\n}\n\n"), "",
), (
    _source_between(BF16_H, "// bfloat16 micro-kernel: a is MicroArgs::blocks x MR rows",
                    "    if (y.acc != nullptr) y.acc += MR * x.ld_acc;\n  }\n}\n\n"),
    """// bfloat16 micro-kernel: a is MR rows of kc bfloat16 (pairs read as 32 bits),
// b is ceil(kc / 2) x 64 K pairs (kPack: packed by this call); an odd last
// element pairs with zero.
template <int MR, typename out_t, bool kPack>
GROUPED_MM_AVX512_BF16 void micro_bf16_pairs(const BFloat16* const* a, const uint32_t* b, const MicroArgs& x) {
  __m512 r[MR][4];
  load_acc<MR>(r, x);
  const PairWeights<kPack> weights(b, x);
  // Held in locals for the same reason as PairWeights' members: read
  // through a and x, they would be reloaded after every packing store.
  const BFloat16* rows[MR];
  for (int i = 0; i < MR; ++i) rows[i] = a[i];
  const int64_t a_step = x.a_step;
  const Prefetch pf_rows = x.pf;
  int64_t pf = x.pf_begin;
  const int64_t pf_end = x.pf_end;
  const int64_t pairs = x.kc / 2;
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
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(rows[i][pairs * a_step].x);
      for (int j = 0; j < 4; ++j) r[i][j] = _mm512_dpbf16_ps(r[i][j], av, bv[j]);
    }
  }
  for (; pf < pf_end; ++pf) prefetch_row(pf_rows, pf);
  finish_acc<MR, out_t>(r, x);
}

""",
)]

BF16_WITHOUT_PACK_WORDS = [(
    _source_between(f"{SRC}/cpu/GroupedMMAvx512BF16.h", "  if (rs == 1 && cs % 2 == 0 && rows == nullptr) {\n",
                    "    return;\n  }\n"), "",
)]

# The broadcast engine's tiles of turned problems (C^T into the output's
# columns), which only 1c2's turned 3D x 2D groups use.
WITHOUT_TURNED_AVX512 = [(
    _source_between(f"{SRC}/cpu/GroupedMMAvx512.h", "// Rows [m0, m0 + mc) of a turned problem's tile",
                    "      }\n    }\n  }\n}\n\n"), "",
), (
    "  // A turned problem's tile ends in the accumulator buffer too, then goes to\n"
    "  // the output's columns 16 x 16 at a time (store_acc_transposed).\n"
    "  float* acc = k > kKC || p.c_transposed ? workspace<float>(buf.acc, kMC * strips * kNR) : nullptr;\n",
    "  float* acc = k > kKC ? workspace<float>(buf.acc, kMC * strips * kNR) : nullptr;\n",
), (
    "        x.last = k0 + kc == k && !p.c_transposed;\n", "        x.last = k0 + kc == k;\n",
), (
    "    if (p.c_transposed) store_acc_transposed(p, t, acc, ld_acc, m0, mc);\n", "",
), (
    "               k > kKC || p.c_transposed ? kMC * strips * kNR * 4 : 0);\n",
    "               k > kKC ? kMC * strips * kNR * 4 : 0);\n",
)]

AVX512_H = f"{SRC}/cpu/GroupedMMAvx512.h"

# 1b3's at::mm takes every large bfloat16 group: the broadcast engine keeps
# the row-major ones only from 1bb on, whose vdpbf16ps K pairs keep up with
# oneDNN there (widened to float32 before, they could not).
KERNEL_WITHOUT_BF16_BROADCAST = [(
    _source_between(f"{SRC}/cpu/GroupedMMKernel.cpp", "// Every group with A and B row-major", "  });\n}\n\n"), "",
), (
    "// groups outside the broadcast layout (bf16_broadcast_layout); otherwise\n"
    "// at::mm where it applies, else the widening engine.\n",
    "// groups; otherwise at::mm where it applies, else the widening engine.\n",
), (
    "    if (cpu_has_avx512_bf16() &&\n"
    "        !(fallback == Engine::kMatmul && large_groups && !bf16_broadcast_layout(problems))) {\n",
    "    if (cpu_has_avx512_bf16() && !(fallback == Engine::kMatmul && large_groups)) {\n",
)]
AVX512_WITHOUT_BF16_BROADCAST = [(
    "// AVX512_BF16 unless A and B are both row-major): micro-kernels that read the\n"
    "// expert weights straight from the caller's memory, one cache-sized block at\n"
    "// a time, so streaming the weights from DRAM overlaps the arithmetic instead\n"
    "// of preceding it. bfloat16 runs as K pairs through vdpbf16ps where the CPU\n"
    "// has AVX512_BF16, widened to float32 where it has not (GroupedMMAvx512BF16.h).\n",
    "// AVX512_BF16): micro-kernels that read the expert weights straight from the\n"
    "// caller's memory, one cache-sized block at a time, so streaming the weights\n"
    "// from DRAM overlaps the arithmetic instead of preceding it. bfloat16 runs as\n"
    "// K pairs through vdpbf16ps where the CPU has AVX512_BF16, widened to float32\n"
    "// where it has not (GroupedMMAvx512BF16.h).\n",
)]

# The PRs before 1c5's: the full unrolling of every loop over a micro-kernel's
# accumulators (GROUPED_MM_UNROLL), which keeps them in registers on the short
# K blocks of weight gradients. Its definition is an edit; its uses, one line
# each, are Copy.drop_lines (UNROLL_LINES).
AVX512_WITHOUT_UNROLL = [(
    _source_between(AVX512_H, "// Every loop over a micro-kernel's accumulators (r[MR][4]) is unrolled in",
                    "#endif\n\n"), "",
)]
UNROLL_LINES = ("GROUPED_MM_UNROLL",)

# The PRs before 1c5's streamed outputs: the broadcast engine's streaming
# epilogue (stream_out_row, MicroArgs::stream, the tile's fence), and the
# kernel's choice of at::mm by each group's smallest dimension (the smaller
# side of its output before). First in their files' edit lists, so that the
# other edits see the text they were written against; the PRs before 1b3
# leave out choose_engine whole (WITHOUT_MATMUL), so they need no
# KERNEL_WITHOUT_STREAM.
AVX512_WITHOUT_STREAM = [(
    _source_between(AVX512_H, "  // Row blocks of MR rows the call runs, one after the other", "  int64_t blocks = 1;\n"), "",
), (
    _source_between(AVX512_H, "          // The bfloat16 K-pair kernel runs the full row blocks after the",
                    "          x.pf_end = pf.rows * (mb + x.blocks) / m_blocks;\n"), "",
), (
    "          mb += x.blocks - 1;\n", "",
), (
    _source_between(AVX512_H, "// Output types the epilogue can stream (stream_out_row).\n",
                    "      _mm512_stream_si512(reinterpret_cast<__m512i*>(o + 16 * j), line);\n    }\n  }\n}\n\n"), "",
), (
    "  // With last: rows of all 64 columns at a 64-byte boundary are streamed\n"
    "  // (kStreamTileBytes).\n  bool stream = false;\n", "",
), (
    _source_between(AVX512_H, "      out_t* o = static_cast<out_t*>(x.c) + i * x.ldc;\n",
                    "      store_out_row<out_t>(o, r[i], x.bias, x.w);\n"),
    "      store_out_row<out_t>(static_cast<out_t*>(x.c) + i * x.ldc, r[i], x.bias, x.w);\n",
), (
    "  const bool stream = kStreamable<out_t> && !p.c_transposed && p.k <= std::min(p.m, p.n) &&\n"
    "      p.m * t.nb * static_cast<int64_t>(sizeof(out_t)) >= kStreamTileBytes;\n", "",
), (
    "        x.stream = stream;\n", "",
), (
    "  // Streaming stores are weakly ordered: visible before the tile counts as done.\n"
    "  if (stream) _mm_sfence();\n", "",
)]
AVX512_BEFORE_1C5 = AVX512_WITHOUT_UNROLL + AVX512_WITHOUT_STREAM
KERNEL_WITHOUT_STREAM = [(
    _source_between(KERNEL_H, "// rows are the smallest dimension of each group's product:",
                    "// Qwen3 `kn` 4% more, within the run-to-run spread).\n"),
    "// rows are the smaller side of each group's output: in 3D x 2D the tokens\n"
    "// are its columns, and oneDNN on a few dozen of them (Zen 5, bfloat16, 1536\n"
    "// weight rows) ran at 0.1x its dense rate.\n",
), (
    "      rows += std::min({p.m, p.n, p.k});\n", "      rows += std::min(p.m, p.n);\n",
)]

# The 32-lane mask, first used by the bfloat16 K pairs (0001bb).
WITHOUT_LANES32 = [(
    _source_between(f"{SRC}/cpu/MoEAvx512Utils.h", "// The same for 32-wide chunks", "  return static_cast<__mmask32>((uint64_t{1} << w) - 1);\n}\n\n"), "",
)]

# The first row block's kernel packing the bfloat16 weight block as it
# multiplies (MicroArgs::pack_b) lands with the K pairs it packs (0001bb).
WITHOUT_PACK_IN_KERNEL = [(
    _source_between(AVX512_H, "  // bfloat16 K pairs only: when src is set", "  } pack_b;\n"), "",
), (
    _source_between(AVX512_H, "        // Unit-stride bfloat16 rows in order are packed by the first row",
                    "&& w == kNR;\n"), "",
), (
    "          if (!pack_in_kernel) Traits::pack_b(", "          Traits::pack_b(",
), (
    _source_between(AVX512_H, "          if constexpr (kPairsOf<Traits>) {\n            x.pack_b.src",
                    "            x.pack_b.dst = bpack;\n          }\n"), "",
)]

# The AVX-512 PR without the L2 prefetch of the next weight block (the PR
# after it): the micro-kernels compute the same bits either way.
WITHOUT_PREFETCH = [(
    "// 4 x MR named accumulators, vdpbf16ps K pairs, L2 prefetch of the next\n"
    "// weight block); see the measurements below.\n",
    "// 4 x MR named accumulators, vdpbf16ps K pairs); see the measurements\n"
    "// below.\n",
), (
    _source_between(AVX512_H, "// While a block is in use, the micro-kernels prefetch",
                    "// instead of one, Zen 5, vdpbf16ps: 650-665 to 725-740).\n"), "",
), (
    _source_block(AVX512_H, "// Rows of the next weight block to pull into L2", "}"), "",
), (
    _source_block(AVX512_H, "inline void prefetch_row(", "}"), "",
), (
    _source_between(AVX512_H, "// Weight blocks ahead of the one in use", "  return pf;\n}\n\n"), "",
), (
    "  Prefetch pf;\n  int64_t pf_begin, pf_end; // rows of pf this call prefetches\n", "",
), (
    _source_between(AVX512_H, "  int64_t pf = x.pf_begin;\n", "  int64_t until_pf = 0;\n"), "",
), (
    "    if (--until_pf <= 0 && pf < x.pf_end) {\n"
    "      prefetch_row(x.pf, pf++);\n"
    "      until_pf = every;\n"
    "    }\n", "",
), (
    "  for (; pf < x.pf_end; ++pf) prefetch_row(x.pf, pf);\n", "",
), (
    "// next: the tile this thread runs after t (nullptr if none), whose first\n"
    "// weight blocks are prefetched while t's last ones are in use: with a few\n"
    "// dozen rows per expert a tile is short, and a cold first block stalls its pack.\n", "",
), (
    "ThreadBuffers& buf,\n                     const Problem<scalar_t, out_t, float>* next_p, const Tile* next) {\n",
    "ThreadBuffers& buf) {\n",
), (
    "  // Weight rows are prefetched only when they are unit-stride rows in order.\n"
    "  const bool b_prefetch = p.b_cs == 1 && p.b_idx == nullptr;\n", "",
), (
    _source_between(AVX512_H, "        // The weight block two ahead in this thread's order", "        MicroArgs x;\n"),
    "        MicroArgs x;\n",
), (
    "        x.pf = pf;\n", "",
), (
    "          x.pf_begin = pf.rows * mb / m_blocks;\n          x.pf_end = pf.rows * (mb + 1) / m_blocks;\n", "",
)]
KERNEL_WITHOUT_PREFETCH = [(
    "            const Tile* next = i + 1 < bounds[chunk + 1] ? &tiles[i + 1] : nullptr;\n"
    "            const auto* next_p = next != nullptr ? &problems[next->problem] : nullptr;\n", "",
), (
    "            run_tile_avx512<scalar_t, out_t, MicroTraits<scalar_t>>(p, t, buf, next_p, next);\n",
    "            run_tile_avx512<scalar_t, out_t, MicroTraits<scalar_t>>(p, t, buf);\n",
)]

# The AVX-512 PR without its two paths for weight-gradient shapes (2D x 2D, K
# the routed rows of a group; the PR after the prefetch's): a K-major A packed
# by the vector packer, and a tile spanning all of N when K fits one block.
# Without them A is packed row by row and tiles stay kMicroNB wide: the same
# values summed in the same K order, so the same bits.
WITHOUT_WEIGHT_GRAD_H = [(
    _source_block(AVX512_H, "// The K block of the broadcast engine for this input type", "}"), "",
), (
    "// One tile: all rows of the problem x columns [n0, n0 + nb), nb <= kMicroNB\n"
    "// unless K fits one block (then no accumulator buffer is needed).\n",
    "// One tile: all rows of the problem x columns [n0, n0 + nb), nb <= kMicroNB.\n",
), (
    "  // A stored K-major (the transposed operand of a weight gradient, dh^T or\n"
    "  // grad^T, gathered columns included) is packed K-major by the vector\n"
    "  // routine that packs B, and the micro-kernel steps through it along K.\n"
    "  // Gathered rows of a K-major A are not: the packer walks rows in order.\n"
    "  const bool a_k_major = !a_in_place && p.a_rs == 1 && p.a_cs != 1 && p.a_row_idx == nullptr;\n", "",
), (
    _source_between(AVX512_H, "      } else if (a_k_major) {\n", "      } else {\n        // Packed copy"),
    "      } else {\n        // Packed copy",
)]
KERNEL_WITHOUT_WHOLE_N = [(
    _source_between(f"{SRC}/cpu/GroupedMMKernel.cpp", "    int64_t problem_tile_n = tile_n;\n#if defined(CPU_CAPABILITY_AVX512)\n",
                    "#endif\n"),
    "    const int64_t problem_tile_n = tile_n;\n",
)]


# Before 1b1 each thread runs only its own run of tiles (TileRuns, the
# claims from the back, comes with the prefetch of the tile run next).
WITHOUT_TILE_RUNS_UTILS = [(
    _source_between(UTILS_H, "// The threads' runs of tiles ([bounds[c], bounds[c + 1]) for chunk c), each",
                    "  std::vector<std::atomic<uint64_t>> runs_;\n};\n\n"), "",
), (
    "#include <atomic>\n", "",
), (
    "#include <type_traits>\n#include <vector>\n", "#include <type_traits>\n",
)]
KERNEL_WITHOUT_TILE_RUNS = [(
    "// cost (not by count) so uneven groups stay balanced, a thread done with its\n"
    "// share takes tiles from the end of another's (TileRuns), and each tile runs\n",
    "// cost (not by count) so uneven groups stay balanced, and each tile runs\n",
), (
    _source_between(KERNEL_H, "  // neighbouring tiles share their A rows, so runs keep them in cache. A\n",
                    "  const int64_t num_chunks"),
    "  // neighbouring tiles share their A rows, so runs keep them in cache.\n  const int64_t num_chunks",
), (
    "  TileRuns runs(bounds);\n", "",
), (
    _source_between(KERNEL_H, "    // The thread's own runs from the front, then what is left of every run\n",
                    "      while (own ? runs.claim_front(chunk, i) : runs.claim_back(chunk, i)) {\n"),
    "    for (int64_t chunk = begin; chunk < end; ++chunk) {\n"
    "      for (int64_t i = bounds[chunk]; i < bounds[chunk + 1]; ++i) {\n",
), (
    "        const Tile* next = runs.next(tiles, chunk, i, own);\n        run_tile_widening",
    "        const Tile* next = i + 1 < bounds[chunk + 1] ? &tiles[i + 1] : nullptr;\n        run_tile_widening",
)]
# The same in the AVX-512 build's micro-kernel branch (1b).
KERNEL_MICRO_WITHOUT_TILE_RUNS = [(
    "            const Tile* next = runs.next(tiles, chunk, i, own);\n            const auto* next_p",
    "            const Tile* next = i + 1 < bounds[chunk + 1] ? &tiles[i + 1] : nullptr;\n            const auto* next_p",
)]

def _test_method(name: str) -> str:
    """The text of TestGroupedMM.<name> in patches/src/test/test_matmul.py, its decorators and the blank
    line after it included: the tests a later PR of the stack adds."""
    with open(os.path.join(REPO_ROOT, "patches/src/test/test_matmul.py"), encoding="utf-8") as f:
        text = f.read()
    end = text.index(f"    def {name}(")
    start = text.rindex("\n\n", 0, end) + 2
    stop = text.index("\n\n", end) + 2
    return text[start:stop]


KERNEL_TEST = _test_method("test_grouped_mm_deterministic")
AVX512_TEST = _test_method("test_grouped_mm_blocked")
BF16_PAIRS_TEST = _test_method("test_grouped_mm_bfloat16_k_pairs")
INNER_PRODUCT_TEST = _test_method("test_grouped_mm_weights_along_k")
TRANSPOSED_TILE_TEST = _test_method("test_grouped_mm_few_rows_weights_along_k")
STREAM_TEST = _test_method("test_grouped_mm_weight_gradient_streamed")
ROUNDING_TEST = _test_method("test_grouped_mm_bfloat16_rounds_as_c10")
# The kernel PRs' tests in the order the PRs add them; a PR's test_matmul.py leaves out those of later PRs.
KERNEL_PR_TESTS = (KERNEL_TEST, AVX512_TEST, BF16_PAIRS_TEST, INNER_PRODUCT_TEST, TRANSPOSED_TILE_TEST, STREAM_TEST,
                   ROUNDING_TEST)


def without_tests_from(first: str) -> list[tuple[str, str]]:
    """Edits removing the kernel PRs' tests from first on (the PR that adds first, and every later one)."""
    return [(test, "") for test in KERNEL_PR_TESTS[KERNEL_PR_TESTS.index(first):]]

# Each routing OpInfo tests the forward until its op's derivatives land (a
# later PR of the stack turns autograd on).
ROUTING_OPINFO_TITLE = "OpInfos of the MoE routing ops (``torch.ops.aten._moe_*``)."
PERMUTE_NO_AUTOGRAD = ("skips=PERMUTE_SKIPS)", "skips=PERMUTE_SKIPS, supports_autograd=False)")
UNPERMUTE_NO_AUTOGRAD = ("floating,\n               supports_gradgrad=False)",
                         "floating,\n               supports_autograd=False, supports_gradgrad=False)")
ROUTER_NO_AUTOGRAD = ("gradcheck_wrapper=gradcheck_router_topk)",
                      "gradcheck_wrapper=gradcheck_router_topk, supports_autograd=False)")
ROUTING_OPINFO = "torch/testing/_internal/opinfo/definitions/moe_routing.py"
FP8_OPINFO = "torch/testing/_internal/opinfo/definitions/fp8.py"

# MoERouterTopkKernel.cpp as the router's first PR leaves it: the scalar path
# only (the file without its CPU_CAPABILITY_AVX512 blocks, and these edits);
# the next PR carries the file itself and the samples sized for its vectors.
ROUTER_SCALAR_KERNEL = [(
    "// top-k (k rounds of a masked vector max with AVX-512, else an insertion\n"
    "// list), then the weights. Tokens are independent, so the loop is split\n"
    "// across threads; counts are summed from expert_ids after.\n",
    "// top-k (an insertion list), then the weights. Tokens are independent, so\n"
    "// the loop is split across threads; counts are summed from expert_ids after.\n",
), (
    "#include <ATen/native/cpu/MoEAvx512Utils.h>\n", "",
), (
    "  const int64_t grain = std::max<int64_t>(1, 4096 / experts);\n  constexpr bool use_vec = false;\n",
    "  const int64_t grain = std::max<int64_t>(1, 4096 / experts);\n",
), (
    "    // Padded to whole vectors for the AVX-512 path.\n"
    "    const int64_t padded = (experts + 15) / 16 * 16;\n"
    "    std::vector<acc_t> score(padded), key(padded),",
    "    std::vector<acc_t> score(experts), key(experts),",
), (
    "      if (use_vec) {\n        // Done above.\n      } else if (score_kind == RouterScore::kSoftmax) {\n",
    "      if (score_kind == RouterScore::kSoftmax) {\n",
), (
    "      for (int64_t e = 0; !use_vec && e < experts; ++e) {\n",
    "      for (const auto e : c10::irange(experts)) {\n",
), (
    "      if (!use_vec) {\n"
    "        // Walked group by group (ascending ids, as a flat scan).\n"
    "        int64_t found = 0;\n"
    "        for (const auto g : c10::irange(n_group)) {\n"
    "          if ((group_mask >> g) & 1) {\n"
    "            for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {\n"
    "              topk_insert(top_ids.data(), top_keys.data(), found, k, e, key[e]);\n"
    "            }\n"
    "          }\n"
    "        }\n"
    "      }\n",
    "      // Walked group by group (ascending ids, as a flat scan).\n"
    "      int64_t found = 0;\n"
    "      for (const auto g : c10::irange(n_group)) {\n"
    "        if ((group_mask >> g) & 1) {\n"
    "          for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {\n"
    "            topk_insert(top_ids.data(), top_keys.data(), found, k, e, key[e]);\n"
    "          }\n"
    "        }\n"
    "      }\n",
), (
    "// Every capability's build registers its copy; the AVX512 one has the\n"
    "// vector router (plain REGISTER_DISPATCH would leave that slot empty).\n",
    "// Every capability's build registers its copy (plain REGISTER_DISPATCH\n"
    "// would leave the AVX512 slot empty).\n",
)]


def _router_sample_block() -> str:
    """The router samples of test/opinfo_routing.py sized for the AVX-512 build's vectors (from their
    comment to the last of them): what the router's AVX-512 PR adds to its OpInfo."""
    with open(os.path.join(REPO_ROOT, "test/opinfo_routing.py"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("    # The AVX-512 build's vector router")
    stop = text.index("\n", text.index('name="past_vector_width")', start)) + 1
    return text[start:stop]


ROUTER_VECTOR_SAMPLES = _router_sample_block()
# The anchor in the module as generated: the sample before the block.
ROUTER_VECTOR_SAMPLES_AFTER = 'name="strided_bias_dtype")\n'

# Stack 3, one op per PR: the top-level definitions of test/opinfo_fp8.py each PR carries (its op's
# builder and what only it uses), and the op_db statement of the upstream module after each PR.
FP8_QUANTIZE_OPS = ("quantize_fp8", "dequantize_fp8")  # one PR each, quantize first
FP8_OPINFOS = {
    "quantize_fp8_opinfos": ["FP8_DTYPES", "_offs", "_spread", "quantize_cases", "sample_inputs_quantize_fp8", "_err",
                             "error_inputs_quantize_fp8", "_fp8_opinfo", "quantize_fp8_opinfos"],
    "dequantize_fp8_opinfos": ["_dequantize_cases", "sample_inputs_dequantize_fp8", "error_inputs_dequantize_fp8",
                               "dequantize_fp8_opinfos"],
    "swizzle_mx_scale_opinfos": ["swizzle_cases", "sample_inputs_swizzle_mx_scale", "error_inputs_swizzle_mx_scale",
                                 "swizzle_mx_scale_opinfos"],
    # the rowwise recipe's PR; the blockwise and MX PRs append theirs (fp8_stages.OPINFO_BLOCKWISE, OPINFO_MX)
    "scaled_grouped_mm_opinfos": ["SCALED_MM_DTYPES", "_quantize_weight", "_f8_tag",
                                  "_scaled_grouped_mm_rowwise_operands", "_scaled_grouped_mm_operands",
                                  "scaled_grouped_mm_cases", "sample_inputs_scaled_grouped_mm",
                                  "_scaled_grouped_mm_error_operands", "_scaled_grouped_mm_rowwise_errors",
                                  "error_inputs_scaled_grouped_mm", "scaled_grouped_mm_opinfos"],
}
# upstream's CUDA kernel of _scaled_grouped_mm is narrower than the CPU one's samples: tested in its own files
FP8_CUDA_TESTED_ELSEWHERE = {"scaled_grouped_mm_opinfos": ', cuda_tested_elsewhere=("scaled_grouped_mm",)',
                             "scaled_grouped_mm_v2_opinfos": ', cuda_tested_elsewhere=("scaled_grouped_mm_v2",)'}


def fp8_op_db(*builders: str) -> str:
    """The op_db statement of definitions/fp8.py holding the OpInfos of builders (of test/opinfo_fp8.py)
    for the aten ops."""
    return "op_db = [\n" + "".join(
        f'    *{b}(lambda op: f"_{{op}}", lambda op: getattr(torch.ops.aten, f"_{{op}}").default'
        f'{FP8_CUDA_TESTED_ELSEWHERE.get(b, "")}),\n' for b in builders) + "]\n"


FP8_OP_DB = fp8_op_db("quantize_fp8_opinfos", "dequantize_fp8_opinfos", "swizzle_mx_scale_opinfos",
                      "scaled_grouped_mm_opinfos")

# _scaled_grouped_mm_v2's OpInfo (core/0008b), from its own test module: the samples and error inputs
# within what its structured meta function passes on to the CPU kernel (test/opinfo_scaled_grouped_mm_v2.py).
V2_OPINFO_SOURCE = "test/opinfo_scaled_grouped_mm_v2.py"
V2_OPINFOS = ["TENSORWISE", "ROWWISE", "BLOCKWISE_1X16", "BLOCKWISE_1X32", "BLOCKWISE_1X128", "BLOCKWISE_128X128",
              "NO_SWIZZLE", "SWIZZLE_32_4_4", "_scaled_grouped_mm_v2_structured_operands",
              "_scaled_grouped_mm_v2_structured_samples", "sample_inputs_scaled_grouped_mm_v2_structured",
              "_scaled_grouped_mm_v2_error_operands", "_v2_err", "error_inputs_scaled_grouped_mm_v2_structured",
              "scaled_grouped_mm_v2_opinfos"]
FP8_V2_OP_DB = fp8_op_db("quantize_fp8_opinfos", "dequantize_fp8_opinfos", "swizzle_mx_scale_opinfos",
                         "scaled_grouped_mm_opinfos", "scaled_grouped_mm_v2_opinfos")

# Derivative helpers go where upstream's are: declared in FunctionsManual.h
# (after _grouped_mm's own, or before the header's last declaration), defined
# at the end of FunctionsManual.cpp (the wheel does not ship it: patches/base.py
# STAND_INS says what stands in for it). The in-repo blocks are MANUAL_SRC/<family>.{h,cpp}.
FUNCTIONS_MANUAL_H = "torch/csrc/autograd/FunctionsManual.h"
FUNCTIONS_MANUAL_CPP = "torch/csrc/autograd/FunctionsManual.cpp"
MANUAL_SRC = "patches/src/torch/csrc/autograd/FunctionsManual"
GROUPED_MM_MAT2_BACKWARD = (
    "at::Tensor _grouped_mm_mat2_backward(\n    const at::Tensor& grad,\n    const at::Tensor& mat1,\n"
    "    at::SymIntArrayRef sizes,\n    at::SymIntArrayRef strides,\n    c10::Layout layout,\n"
    "    std::optional<Tensor> offs,\n    const at::Scalar& alpha);\n")
VALUES_BACKWARD_DECL = "\nTensor values_backward(const Tensor& grad, const Tensor& self);\n"
MANUAL_NAMESPACE_END = "\n} // namespace torch::autograd::generated::details\n"

FP8_DECODE_PR = "core/0006c5a-fp8-scaled-grouped-mm-cpu-byte-decode.txt"
FLOAT8_WEIGHTS_PR = "core/0006c5b-fp8-scaled-grouped-mm-cpu-float8-weights.txt"

SERIES = [
    Series("core", [
        # -- Stack 1: grouped mm on CPU (patches/rfc/0001-grouped-mm-cpu.md) ---------------------------
        # The kernel lands engine by engine: each PR carries GroupedMMKernel.cpp (and the tests) as it
        # leaves them, the last one the file itself (Copy's undefine / edits / update).
        # The contract lands in four PRs (grouped_mm_stages: the sources as the first three leave them): the base
        # contract (the input dtype out, no bias) in the 2D x 3D and 3D x 2D layouts, then the values of offs
        # (checked, uncovered outputs zeroed), then the 2D x 2D and 3D x 3D layouts, then bias and the float32
        # output. grouped_mm_out_strides waits for the CUDA entry (core/0002), the first to pad.
        Patch(
            message="core/0001-grouped-mm-cpu-checks-and-meta.txt",
            changes=[
                Copy(f"{NATIVE}/GroupedMM.h", f"{SRC}/GroupedMM.h",
                     edits=ENTRY_ON_FALLBACK_H + grouped_mm_stages.WITHOUT_GROUP_INDEX_H
                     + grouped_mm_stages.WITHOUT_OUT_STRIDES_H + grouped_mm_stages.HEADER_BASE
                     + grouped_mm_stages.HEADER_TWO_LAYOUTS + grouped_mm_stages.HEADER_WITHOUT_OFFS_VALUES),
                Copy(f"{NATIVE}/GroupedMM.cpp", f"{SRC}/GroupedMM.cpp",
                     edits=ENTRY_ON_FALLBACK + grouped_mm_stages.WITHOUT_OUT_STRIDES_CPP + grouped_mm_stages.ENTRY_BASE
                     + grouped_mm_stages.ENTRY_TWO_LAYOUTS + grouped_mm_stages.ENTRY_WITHOUT_OFFS_VALUES),
                Dispatch("grouped_mm"),
                Meta("grouped_mm", GROUPED_MM_META_EARLY, replaces=["meta_grouped_mm"],
                     source_edits=grouped_mm_stages.CHECKS_BASE + grouped_mm_stages.CHECKS_TWO_LAYOUTS,
                     leave_out=grouped_mm_stages.CHECKS_LATER,
                     # The checks annotate with Optional (they are written for Python 3.10).
                     edits=[("from typing import TypeVar\n", "from typing import Optional, TypeVar\n")]),
                Edit("torch/nn/functional.py", GROUPED_MM_DOCS + grouped_mm_stages.DOCS_TWO_LAYOUTS
                     + grouped_mm_stages.DOCS_WITHOUT_OFFS_VALUES),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=[*without_tests_from(KERNEL_TEST),
                            *grouped_mm_stages.TEST_BASE, *grouped_mm_stages.TEST_TWO_LAYOUTS,
                            *grouped_mm_stages.TEST_WITHOUT_OFFS_VALUES]),
            ],
        ),
        Patch(
            message="core/0001.0a-grouped-mm-cpu-offs-values.txt",
            changes=[
                Copy(f"{NATIVE}/GroupedMM.h", f"{SRC}/GroupedMM.h",
                     edits=ENTRY_ON_FALLBACK_H + grouped_mm_stages.WITHOUT_GROUP_INDEX_H
                     + grouped_mm_stages.WITHOUT_OUT_STRIDES_H + grouped_mm_stages.HEADER_BASE
                     + grouped_mm_stages.HEADER_TWO_LAYOUTS, update=True),
                Copy(f"{NATIVE}/GroupedMM.cpp", f"{SRC}/GroupedMM.cpp",
                     edits=ENTRY_ON_FALLBACK + grouped_mm_stages.WITHOUT_OUT_STRIDES_CPP + grouped_mm_stages.ENTRY_BASE
                     + grouped_mm_stages.ENTRY_TWO_LAYOUTS, update=True),
                Edit("torch/nn/functional.py", [new_old[::-1] for new_old in grouped_mm_stages.DOCS_WITHOUT_OFFS_VALUES]),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=[*without_tests_from(KERNEL_TEST),
                            *grouped_mm_stages.TEST_BASE, *grouped_mm_stages.TEST_TWO_LAYOUTS], update=True),
            ],
        ),
        Patch(
            message="core/0001.0b-grouped-mm-cpu-2d2d-and-3d3d.txt",
            changes=[
                Copy(f"{NATIVE}/GroupedMM.h", f"{SRC}/GroupedMM.h",
                     edits=ENTRY_ON_FALLBACK_H + grouped_mm_stages.WITHOUT_GROUP_INDEX_H
                     + grouped_mm_stages.WITHOUT_OUT_STRIDES_H + grouped_mm_stages.HEADER_BASE, update=True),
                Copy(f"{NATIVE}/GroupedMM.cpp", f"{SRC}/GroupedMM.cpp",
                     edits=ENTRY_ON_FALLBACK + grouped_mm_stages.WITHOUT_OUT_STRIDES_CPP + grouped_mm_stages.ENTRY_BASE,
                     update=True),
                Meta("grouped_mm", GROUPED_MM_META_EARLY, source_edits=grouped_mm_stages.CHECKS_BASE,
                     leave_out=grouped_mm_stages.CHECKS_LATER, update=True),
                Edit("torch/nn/functional.py", [new_old[::-1] for new_old in grouped_mm_stages.DOCS_TWO_LAYOUTS]),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=[*without_tests_from(KERNEL_TEST),
                            *grouped_mm_stages.TEST_BASE], update=True),
            ],
        ),
        Patch(
            message="core/0001.1-grouped-mm-cpu-bias-and-fp32-output.txt",
            changes=[
                Copy(f"{NATIVE}/GroupedMM.h", f"{SRC}/GroupedMM.h",
                     edits=ENTRY_ON_FALLBACK_H + grouped_mm_stages.WITHOUT_GROUP_INDEX_H
                     + grouped_mm_stages.WITHOUT_OUT_STRIDES_H, update=True),
                Copy(f"{NATIVE}/GroupedMM.cpp", f"{SRC}/GroupedMM.cpp",
                     edits=ENTRY_ON_FALLBACK + grouped_mm_stages.WITHOUT_OUT_STRIDES_CPP, update=True),
                Meta("grouped_mm", GROUPED_MM_META_EARLY, update=True),
                Edit("torch/nn/functional.py", GROUPED_MM_BIAS_DOCS),
                Edit(MM_GROUPED_LOWERING, GROUPED_MM_LOWERING_BIAS),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=without_tests_from(KERNEL_TEST),
                     update=True),
            ],
        ),
        Patch(
            message="core/0001a-grouped-mm-cpu-kernel.txt",
            changes=[
                Copy(f"{NATIVE}/GroupedMM.h", f"{SRC}/GroupedMM.h",
                     edits=WITHOUT_INDEX_H + grouped_mm_stages.WITHOUT_GROUP_INDEX_H
                     + grouped_mm_stages.WITHOUT_OUT_STRIDES_H, update=True),
                Copy(f"{NATIVE}/GroupedMM.cpp", f"{SRC}/GroupedMM.cpp",
                     edits=WITHOUT_INDEX_CPP + grouped_mm_stages.WITHOUT_OUT_STRIDES_CPP
                     + grouped_mm_stages.WITHOUT_OUT_STRIDES_EMPTY_CPU, update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMKernelUtils.h", f"{SRC}/cpu/GroupedMMKernelUtils.h",
                     edits=WITHOUT_TILE_RUNS_UTILS + WIDENING_UTILS_ALL_COPIED + WITHOUT_INDEX_UTILS
                     + WITHOUT_TRANSPOSED_COPY + WITHOUT_TURNED_UTILS),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",),
                     edits=KERNEL_WITHOUT_TILE_RUNS + TRANSPOSED_TILE_COMMENT + BRGEMM_COMMENT + PORTABLE_KERNEL
                     + WIDENING_ALL_COPIED + WITHOUT_INDEX_ENTRY),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=without_tests_from(AVX512_TEST),
                     update=True),
            ],
        ),
        Patch(
            message="core/0001a1-grouped-mm-cpu-in-place-operands.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMKernelUtils.h", f"{SRC}/cpu/GroupedMMKernelUtils.h",
                     edits=WITHOUT_TILE_RUNS_UTILS + WITHOUT_INDEX_UTILS + WITHOUT_INDEX_B_PANELS + WITHOUT_TURNED_UTILS,
                     update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",), edits=KERNEL_WITHOUT_TILE_RUNS + TRANSPOSED_TILE_COMMENT
                     + BRGEMM_COMMENT + PORTABLE_KERNEL + WITHOUT_INDEX_KERNEL,
                     update=True),
            ],
        ),
        Patch(
            message="core/0001a2-grouped-mm-cpu-index.txt",
            changes=[
                Copy(f"{NATIVE}/GroupedMM.h", f"{SRC}/GroupedMM.h",
                     edits=grouped_mm_stages.WITHOUT_GROUP_INDEX_H + grouped_mm_stages.WITHOUT_OUT_STRIDES_H, update=True),
                Copy(f"{NATIVE}/GroupedMM.cpp", f"{SRC}/GroupedMM.cpp",
                     edits=grouped_mm_stages.WITHOUT_OUT_STRIDES_CPP + grouped_mm_stages.WITHOUT_OUT_STRIDES_EMPTY_CPU,
                     update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMKernelUtils.h", f"{SRC}/cpu/GroupedMMKernelUtils.h",
                     edits=WITHOUT_TILE_RUNS_UTILS + WITHOUT_TURNED_UTILS, update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",),
                     edits=KERNEL_WITHOUT_TILE_RUNS + TRANSPOSED_TILE_COMMENT + BRGEMM_COMMENT + PORTABLE_KERNEL,
                     update=True),
            ],
        ),
        Patch(
            message="core/0001b-grouped-mm-cpu-avx512.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/MoEAvx512Utils.h", f"{SRC}/cpu/MoEAvx512Utils.h", edits=WITHOUT_LANES32),
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512.h", f"{SRC}/cpu/GroupedMMAvx512.h",
                     edits=AVX512_BEFORE_1C5 + WITHOUT_TURNED_AVX512 + AVX512_WITHOUT_MATMUL + WITHOUT_PACK_WORDS + WITHOUT_PREFETCH
                     + WITHOUT_WEIGHT_GRAD_H + WITHOUT_PACK_IN_KERNEL, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     edits=KERNEL_WITHOUT_TILE_RUNS + KERNEL_MICRO_WITHOUT_TILE_RUNS + WITHOUT_TRANSPOSED_TILE
                     + BRGEMM_REST + WITHOUT_INNER_PRODUCT
                     + WITHOUT_BF16_PAIRS + WITHOUT_MATMUL + KERNEL_WITHOUT_PREFETCH + KERNEL_WITHOUT_WHOLE_N, update=True),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=without_tests_from(BF16_PAIRS_TEST), update=True),
            ],
        ),
        Patch(
            message="core/0001b1-grouped-mm-cpu-avx512-prefetch.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMKernelUtils.h", f"{SRC}/cpu/GroupedMMKernelUtils.h",
                     edits=WITHOUT_TURNED_UTILS, update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512.h", f"{SRC}/cpu/GroupedMMAvx512.h",
                     edits=AVX512_BEFORE_1C5 + WITHOUT_TURNED_AVX512 + AVX512_WITHOUT_MATMUL + WITHOUT_PACK_WORDS + WITHOUT_WEIGHT_GRAD_H
                     + WITHOUT_PACK_IN_KERNEL, update=True, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     edits=WITHOUT_TRANSPOSED_TILE + BRGEMM_REST + WITHOUT_INNER_PRODUCT + WITHOUT_BF16_PAIRS + WITHOUT_MATMUL
                     + KERNEL_WITHOUT_WHOLE_N, update=True),
            ],
        ),
        Patch(
            message="core/0001b2-grouped-mm-cpu-avx512-weight-gradients.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512.h", f"{SRC}/cpu/GroupedMMAvx512.h",
                     edits=AVX512_BEFORE_1C5 + WITHOUT_TURNED_AVX512 + AVX512_WITHOUT_MATMUL + WITHOUT_PACK_WORDS + WITHOUT_PACK_IN_KERNEL,
                     update=True, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     edits=WITHOUT_TRANSPOSED_TILE + BRGEMM_REST + WITHOUT_INNER_PRODUCT + WITHOUT_BF16_PAIRS + WITHOUT_MATMUL, update=True),
            ],
        ),
        Patch(
            message="core/0001b3-grouped-mm-cpu-large-groups-mm.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512.h", f"{SRC}/cpu/GroupedMMAvx512.h",
                     edits=AVX512_BEFORE_1C5 + WITHOUT_TURNED_AVX512 + WITHOUT_PACK_WORDS + WITHOUT_PACK_IN_KERNEL
                     + AVX512_WITHOUT_BF16_BROADCAST, update=True, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     edits=KERNEL_WITHOUT_STREAM + WITHOUT_TRANSPOSED_TILE + WITHOUT_BRGEMM + WITHOUT_INNER_PRODUCT + WITHOUT_BF16_PAIRS
                     + KERNEL_WITHOUT_BF16_BROADCAST, update=True),
            ],
        ),
        Patch(
            message="core/0001bb-grouped-mm-cpu-avx512-bf16.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/MoEAvx512Utils.h", f"{SRC}/cpu/MoEAvx512Utils.h", update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512.h", f"{SRC}/cpu/GroupedMMAvx512.h",
                     edits=AVX512_BEFORE_1C5 + WITHOUT_TURNED_AVX512 + WITHOUT_PACK_WORDS, update=True, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512BF16.h", f"{SRC}/cpu/GroupedMMAvx512BF16.h",
                     edits=BF16_WITHOUT_SHORT_K + BF16_WITHOUT_PACK_WORDS, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     edits=KERNEL_WITHOUT_STREAM + WITHOUT_TRANSPOSED_TILE + WITHOUT_BRGEMM + WITHOUT_INNER_PRODUCT, update=True),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=without_tests_from(INNER_PRODUCT_TEST),
                     update=True),
            ],
        ),
        Patch(
            message="core/0001c-grouped-mm-cpu-inner-product.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512.h", f"{SRC}/cpu/GroupedMMAvx512.h",
                     edits=AVX512_BEFORE_1C5 + WITHOUT_TURNED_AVX512,
                     update=True, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512BF16.h", f"{SRC}/cpu/GroupedMMAvx512BF16.h",
                     edits=BF16_WITHOUT_SHORT_K, update=True, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMInnerProduct.h", f"{SRC}/cpu/GroupedMMInnerProduct.h",
                     edits=NT_WITHOUT_TURNED),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     edits=KERNEL_WITHOUT_STREAM + WITHOUT_TRANSPOSED_TILE + WITHOUT_BRGEMM, update=True),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=without_tests_from(TRANSPOSED_TILE_TEST), update=True),
            ],
        ),
        Patch(
            message="core/0001c1-grouped-mm-cpu-brgemm.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMBrgemm.h", f"{SRC}/cpu/GroupedMMBrgemm.h"),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     edits=KERNEL_WITHOUT_STREAM + WITHOUT_TRANSPOSED_TILE, update=True),
            ],
        ),
        Patch(
            message="core/0001c2-grouped-mm-cpu-transposed-tile.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMTransposedTile.h", f"{SRC}/cpu/GroupedMMTransposedTile.h",
                     edits=TT_WITHOUT_REST + TT_WITHOUT_TURNED, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp",
                     edits=KERNEL_WITHOUT_STREAM + KERNEL_WITHOUT_TURNED, update=True),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py",
                     edits=without_tests_from(STREAM_TEST) + TEST_MATMUL_WITHOUT_REST + TEST_MATMUL_WITHOUT_TURNED, update=True),
            ],
        ),
        Patch(
            message="core/0001c3-grouped-mm-cpu-turned-3d2d.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMKernelUtils.h", f"{SRC}/cpu/GroupedMMKernelUtils.h", update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512.h", f"{SRC}/cpu/GroupedMMAvx512.h", edits=AVX512_BEFORE_1C5, update=True, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMTransposedTile.h", f"{SRC}/cpu/GroupedMMTransposedTile.h",
                     edits=TT_WITHOUT_REST, update=True, drop_lines=UNROLL_LINES),
                Copy(f"{NATIVE}/cpu/GroupedMMInnerProduct.h", f"{SRC}/cpu/GroupedMMInnerProduct.h", update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp", edits=KERNEL_WITHOUT_STREAM, update=True),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py", edits=without_tests_from(STREAM_TEST) + TEST_MATMUL_WITHOUT_REST,
                     update=True),
            ],
        ),
        Patch(
            message="core/0001c4-grouped-mm-cpu-tile-rest-rows.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMTransposedTile.h", f"{SRC}/cpu/GroupedMMTransposedTile.h", update=True, drop_lines=UNROLL_LINES),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py", edits=without_tests_from(STREAM_TEST), update=True),
            ],
        ),
        Patch(
            message="core/0001c5-grouped-mm-cpu-streamed-outputs.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512.h", f"{SRC}/cpu/GroupedMMAvx512.h", update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMAvx512BF16.h", f"{SRC}/cpu/GroupedMMAvx512BF16.h", update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMTransposedTile.h", f"{SRC}/cpu/GroupedMMTransposedTile.h", update=True),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", f"{SRC}/cpu/GroupedMMKernel.cpp", update=True),
                Copy("test/test_matmul.py", "patches/src/test/test_matmul.py", update=True),
            ],
        ),
        Patch(
            message="core/0002-grouped-mm-backward-and-opinfo.txt",
            changes=[
                # _grouped_mm's CUDA entry: the shared checks, upstream's CUTLASS kernel or the fallback; the
                # check of offs on the device that it needs (grouped_mm_offs_ok, with grouped_mm_group_index);
                # the output strides of upstream's kernels (grouped_mm_out_strides: CUDA pads the last dimension).
                Copy(f"{NATIVE}/GroupedMM.h", f"{SRC}/GroupedMM.h", update=True),
                Copy(f"{NATIVE}/GroupedMM.cpp", f"{SRC}/GroupedMM.cpp", update=True),
                GROUPED_MM_META_HEADER,
                Copy(f"{NATIVE}/cuda/GroupedMM.h", f"{SRC}/cuda/GroupedMM.h"),
                Copy(f"{NATIVE}/cuda/GroupedMM.cpp", f"{SRC}/cuda/GroupedMM.cpp"),
                Dispatch("grouped_mm", keys=("CUDA",)),
                Insert(FUNCTIONS_MANUAL_H, f"{MANUAL_SRC}/grouped_mm.h", after=GROUPED_MM_MAT2_BACKWARD),
                Insert(FUNCTIONS_MANUAL_CPP, f"{MANUAL_SRC}/grouped_mm.cpp", before=MANUAL_NAMESPACE_END),
                Derivatives(family="grouped_mm"),
                OpInfoModule("grouped_mm", "grouped_mm", "OpInfo for ``torch._grouped_mm``.", op_db_call=(
                    'make_grouped_mm_opinfo("moe_ops.grouped_mm", torch.ops.moe_ops.grouped_mm.default)',
                    'make_grouped_mm_opinfo("_grouped_mm", torch._grouped_mm)')),
                opinfo_module_registered("grouped_mm", "fft", "linalg"),
                *opinfo_lists.entries("_grouped_mm"),
            ],
        ),
        # -- Stack 2: MoE routing ops (patches/rfc/0002-moe-routing-ops.md) ------------------------------
        # One op per PR on CPU (permute; unpermute; unpermute's backward with the derivatives of both;
        # the router; its derivative), then the CUDA kernels, one PR per op.
        Patch(
            message="core/0003-moe-permute-cpu.txt",
            changes=[
                Copy(f"{NATIVE}/MoEPermute.h", f"{SRC}/MoEPermute.h"),
                Copy(f"{NATIVE}/MoEPermute.cpp", f"{SRC}/MoEPermute.cpp"),
                Copy(f"{NATIVE}/cpu/MoEPermuteKernel.cpp", f"{SRC}/cpu/MoEPermuteKernel.cpp"),
                NativeFunctions("routing", after="_grouped_mm", later=("CUDA",), ops=("permute",)),
                Meta("routing", PERMUTE_META, after="meta_grouped_mm", ops=("permute",)),
                DecompExpect("routing", ops=("permute",)),
                OpInfoModule("routing", "moe_routing", ROUTING_OPINFO_TITLE, ops=("permute",),
                             edits=[PERMUTE_NO_AUTOGRAD]),
                opinfo_module_registered("moe_routing", "linalg", "signal"),
                *opinfo_lists.entries("_moe_permute"),
            ],
        ),
        Patch(
            message="core/0003b-moe-unpermute-cpu.txt",
            changes=[
                Copy(f"{NATIVE}/MoERouting.h", f"{SRC}/MoERouting.h"),
                Copy(f"{NATIVE}/MoEUnpermute.h", f"{SRC}/MoEUnpermute.h"),
                Copy(f"{NATIVE}/MoEUnpermute.cpp", f"{SRC}/MoEUnpermute.cpp"),
                Copy(f"{NATIVE}/cpu/MoERoutingUtils.h", f"{SRC}/cpu/MoERoutingUtils.h"),
                Copy(f"{NATIVE}/cpu/MoEUnpermuteKernel.cpp", f"{SRC}/cpu/MoEUnpermuteKernel.cpp"),
                NativeFunctions("routing", after="_moe_permute", later=("CUDA",), ops=("unpermute",)),
                Meta("routing", UNPERMUTE_META, after="meta_moe_permute", ops=("unpermute",)),
                DecompExpect("routing", ops=("unpermute",)),
                OpInfoModule("routing", "moe_routing", ROUTING_OPINFO_TITLE, ops=("permute", "unpermute"),
                             edits=[PERMUTE_NO_AUTOGRAD, UNPERMUTE_NO_AUTOGRAD]),
                *opinfo_lists.entries("_moe_unpermute"),
            ],
        ),
        Patch(
            message="core/0003c-moe-unpermute-backward-and-derivatives.txt",
            changes=[
                Copy(f"{NATIVE}/MoEUnpermuteBackward.h", f"{SRC}/MoEUnpermuteBackward.h"),
                Copy(f"{NATIVE}/MoEUnpermuteBackward.cpp", f"{SRC}/MoEUnpermuteBackward.cpp"),
                Copy(f"{NATIVE}/cpu/MoEUnpermuteBackwardKernel.cpp", f"{SRC}/cpu/MoEUnpermuteBackwardKernel.cpp"),
                NativeFunctions("routing", after="_moe_unpermute", later=("CUDA",), ops=("unpermute_backward",)),
                Meta("routing", UNPERMUTE_BACKWARD_META, after="meta_moe_unpermute", ops=("unpermute_backward",)),
                DecompExpect("routing", ops=("unpermute_backward",)),
                Derivatives(ops=["permute", "unpermute"], before="mode"),
                Edit(ROUTING_OPINFO, [PERMUTE_NO_AUTOGRAD[::-1], UNPERMUTE_NO_AUTOGRAD[::-1]]),
            ],
        ),
        Patch(
            message="core/0003d-moe-router-topk-cpu.txt",
            changes=[
                Copy(f"{NATIVE}/MoERouterTopk.h", f"{SRC}/MoERouterTopk.h"),
                Copy(f"{NATIVE}/MoERouterTopk.cpp", f"{SRC}/MoERouterTopk.cpp"),
                Copy(f"{NATIVE}/cpu/MoERouterTopkKernel.cpp", f"{SRC}/cpu/MoERouterTopkKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",), edits=ROUTER_SCALAR_KERNEL),
                NativeFunctions("routing", after="_grouped_mm", later=("CUDA",), ops=("router_topk",)),
                Meta("routing", ROUTER_TOPK_META, after="meta_grouped_mm", ops=("router_topk",)),
                DecompExpect("routing", ops=("router_topk",)),
                OpInfoModule("routing", "moe_routing", ROUTING_OPINFO_TITLE, ops=("router_topk", "permute", "unpermute"),
                             edits=[ROUTER_NO_AUTOGRAD, (ROUTER_VECTOR_SAMPLES, "")]),
                *opinfo_lists.entries("_moe_router_topk"),
            ],
        ),
        Patch(
            message="core/0003e-moe-router-topk-cpu-avx512.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/MoERouterTopkKernel.cpp", f"{SRC}/cpu/MoERouterTopkKernel.cpp", update=True),
                Edit(ROUTING_OPINFO, [(ROUTER_VECTOR_SAMPLES_AFTER,
                                       ROUTER_VECTOR_SAMPLES_AFTER + ROUTER_VECTOR_SAMPLES)]),
            ],
        ),
        Patch(
            message="core/0004-moe-router-topk-derivatives.txt",
            changes=[
                Insert(FUNCTIONS_MANUAL_H, f"{MANUAL_SRC}/moe_routing.h", before=VALUES_BACKWARD_DECL),
                Insert(FUNCTIONS_MANUAL_CPP, f"{MANUAL_SRC}/moe_routing.cpp", before=MANUAL_NAMESPACE_END),
                Derivatives(ops=["router_topk"], before="_moe_permute"),
                Edit(ROUTING_OPINFO, [ROUTER_NO_AUTOGRAD[::-1]]),
            ],
        ),
        Patch(
            message="core/0005-moe-permute-cuda.txt",
            changes=[
                Copy(f"{NATIVE}/cuda/MoEThreadPos.cuh", f"{SRC}/cuda/MoEThreadPos.cuh"),
                Copy(f"{NATIVE}/cuda/MoERouting.cuh", f"{SRC}/cuda/MoERouting.cuh"),
                Copy(f"{NATIVE}/cuda/MoEPermute.cuh", f"{SRC}/cuda/MoEPermute.cuh"),
                Copy(f"{NATIVE}/cuda/MoEPermute.cu", f"{SRC}/cuda/MoEPermute.cu"),
                Dispatch("permute", keys=("CUDA",)),
            ],
        ),
        Patch(
            message="core/0005b-moe-unpermute-cuda.txt",
            changes=[
                Copy(f"{NATIVE}/cuda/MoEUnpermute.cuh", f"{SRC}/cuda/MoEUnpermute.cuh"),
                Copy(f"{NATIVE}/cuda/MoEUnpermute.cu", f"{SRC}/cuda/MoEUnpermute.cu"),
                Dispatch("unpermute", keys=("CUDA",)),
                Dispatch("unpermute_backward", keys=("CUDA",)),
            ],
        ),
        Patch(
            message="core/0005c-moe-router-topk-cuda.txt",
            changes=[
                Copy(f"{NATIVE}/cuda/MoERouterTopk.cuh", f"{SRC}/cuda/MoERouterTopk.cuh"),
                Copy(f"{NATIVE}/cuda/MoERouterTopk.cu", f"{SRC}/cuda/MoERouterTopk.cu"),
                Dispatch("router_topk", keys=("CUDA",)),
            ],
        ),
        # -- Stack 3: fp8 grouped GEMM on CPU (patches/rfc/0003-fp8-grouped-gemm-cpu.md) -----------------
        # One op per PR: the quantisation ops, _swizzle_mx_scale, then _scaled_grouped_mm's CPU kernel;
        # each brings its schema, dispatch, meta block (the checks it reaches, less an earlier PR's),
        # OpInfos (appended to definitions/fp8.py) and expect entries.
        Patch(
            message="core/0006-fp8-cpu.txt",
            changes=[
                Copy(f"{NATIVE}/MoEQuantize.h", f"{SRC}/MoEQuantize.h", edits=fp8_recipes.NO_DEQUANTIZE_HEADER
                     + fp8_recipes.NO_MX_HEADER + fp8_recipes.NO_BLOCKED_HEADER + fp8_recipes.NO_OFFS_HEADER
                     + fp8_recipes.ON_FALLBACK_HEADER + fp8_recipes.NO_CUDA_HEADER),
                Copy(f"{NATIVE}/MoEQuantize.cpp", f"{SRC}/MoEQuantize.cpp",
                     edits=fp8_recipes.NO_DEQUANTIZE_ENTRY + fp8_recipes.NO_MX_ENTRY + fp8_recipes.NO_OFFS_ENTRY
                     + fp8_recipes.ON_FALLBACK_ENTRY),
                NativeFunctions("fp8", after="_moe_unpermute_backward", later=("CUDA",), ops=("quantize_fp8",)),
                Meta("fp8", FP8_QUANTIZE_META, ops=("quantize_fp8",), after="meta_moe_unpermute_backward"),
                Edit(META_REGISTRATIONS, fp8_recipes.NO_MX_META + fp8_recipes.NO_BLOCKED_META
                     + fp8_recipes.NO_OFFS_META),
                DecompExpect("fp8", ops=("quantize_fp8",)),
                OpInfoModule("fp8", "fp8", "OpInfos of the fp8 ops.", carried=FP8_OPINFOS["quantize_fp8_opinfos"],
                             op_db=fp8_op_db("quantize_fp8_opinfos"),
                             edits=fp8_recipes.NO_MX_OPINFO + fp8_recipes.NO_BLOCKED_OPINFO
                             + fp8_recipes.NO_OFFS_OPINFO + fp8_recipes.NO_KERNEL_OPINFO),
                opinfo_module_registered("fp8", "fft", "grouped_mm"),
                *opinfo_lists.entries("_quantize_fp8"),
            ],
        ),
        Patch(
            message="core/0006.1-fp8-quantize-cpu-kernel.txt",
            changes=[
                Copy(f"{NATIVE}/MoEQuantize.h", f"{SRC}/MoEQuantize.h", edits=fp8_recipes.NO_DEQUANTIZE_HEADER
                     + fp8_recipes.NO_MX_HEADER + fp8_recipes.NO_BLOCKED_HEADER + fp8_recipes.NO_OFFS_HEADER
                     + fp8_recipes.NO_CUDA_HEADER, update=True),
                Copy(f"{NATIVE}/MoEQuantize.cpp", f"{SRC}/MoEQuantize.cpp",
                     edits=fp8_recipes.NO_DEQUANTIZE_ENTRY + fp8_recipes.NO_MX_ENTRY + fp8_recipes.NO_OFFS_ENTRY,
                     update=True),
                Copy(f"{NATIVE}/cpu/MoEQuantizeKernel.cpp", f"{SRC}/cpu/MoEQuantizeKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",), edits=fp8_recipes.PORTABLE_KERNEL
                     + fp8_recipes.NO_DEQUANTIZE_KERNEL + fp8_recipes.NO_MX_KERNEL + fp8_recipes.NO_OFFS_KERNEL),
                Edit(FP8_OPINFO, fp8_recipes.landing(fp8_recipes.NO_KERNEL_OPINFO)),
            ],
        ),
        Patch(
            message="core/0006a0-fp8-quantize-offs.txt",
            changes=[
                Copy(f"{NATIVE}/MoEQuantize.h", f"{SRC}/MoEQuantize.h", edits=fp8_recipes.NO_DEQUANTIZE_HEADER
                     + fp8_recipes.NO_MX_HEADER + fp8_recipes.NO_BLOCKED_HEADER + fp8_recipes.NO_CUDA_HEADER,
                     update=True),
                Copy(f"{NATIVE}/MoEQuantize.cpp", f"{SRC}/MoEQuantize.cpp",
                     edits=fp8_recipes.NO_DEQUANTIZE_ENTRY + fp8_recipes.NO_MX_ENTRY, update=True),
                Copy(f"{NATIVE}/cpu/MoEQuantizeKernel.cpp", f"{SRC}/cpu/MoEQuantizeKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",), edits=fp8_recipes.PORTABLE_KERNEL
                     + fp8_recipes.NO_DEQUANTIZE_KERNEL + fp8_recipes.NO_MX_KERNEL, update=True),
                Edit(META_REGISTRATIONS, fp8_recipes.landing(fp8_recipes.NO_OFFS_META)),
                Edit(FP8_OPINFO, fp8_recipes.landing(fp8_recipes.NO_OFFS_OPINFO)),
            ],
        ),
        Patch(
            message="core/0006a1-fp8-dequantize-cpu.txt",
            changes=[
                Copy(f"{NATIVE}/MoEQuantize.h", f"{SRC}/MoEQuantize.h",
                     edits=fp8_recipes.NO_MX_HEADER + fp8_recipes.NO_BLOCKED_HEADER + fp8_recipes.NO_CUDA_HEADER,
                     update=True),
                Copy(f"{NATIVE}/MoEQuantize.cpp", f"{SRC}/MoEQuantize.cpp",
                     edits=fp8_recipes.NO_MX_ENTRY + fp8_recipes.NO_MX_DEQUANTIZE_ENTRY, update=True),
                Copy(f"{NATIVE}/cpu/MoEQuantizeKernel.cpp", f"{SRC}/cpu/MoEQuantizeKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",), edits=fp8_recipes.PORTABLE_KERNEL
                     + fp8_recipes.NO_MX_KERNEL + fp8_recipes.NO_MX_DEQUANTIZE_KERNEL, update=True),
                Copy(f"{NATIVE}/cpu/MoEFp8Utils.h", f"{SRC}/cpu/MoEFp8Utils.h", edits=fp8_recipes.NO_MX_UTILS),
                NativeFunctions("fp8", after="_quantize_fp8", later=("CUDA",), ops=("dequantize_fp8",)),
                Meta("fp8", FP8_DEQUANTIZE_META, ops=("dequantize_fp8",), after="meta_quantize_fp8"),
                DecompExpect("fp8", ops=("dequantize_fp8",)),
                OpInfoModule("fp8", "fp8", "", carried=FP8_OPINFOS["dequantize_fp8_opinfos"], extends=True,
                             op_db=fp8_op_db("quantize_fp8_opinfos", "dequantize_fp8_opinfos"),
                             edits=fp8_recipes.NO_MX_DEQUANTIZE_OPINFO + fp8_recipes.NO_BLOCKED_DEQUANTIZE_OPINFO),
                *opinfo_lists.entries("_dequantize_fp8"),
            ],
        ),
        Patch(
            message="core/0006a2-fp8-quantize-blockwise.txt",
            changes=[
                Copy(f"{NATIVE}/MoEQuantize.h", f"{SRC}/MoEQuantize.h",
                     edits=fp8_recipes.NO_MX_HEADER + fp8_recipes.NO_CUDA_HEADER, update=True),
                Edit(META_REGISTRATIONS, fp8_recipes.landing(fp8_recipes.NO_BLOCKED_META)),
                Edit(FP8_OPINFO, fp8_recipes.landing(fp8_recipes.NO_BLOCKED_OPINFO
                                                     + fp8_recipes.NO_BLOCKED_DEQUANTIZE_OPINFO)),
            ],
        ),
        Patch(
            message="core/0006a3-fp8-quantize-mx.txt",
            changes=[
                Copy(f"{NATIVE}/MoEQuantize.h", f"{SRC}/MoEQuantize.h", edits=fp8_recipes.NO_CUDA_HEADER, update=True),
                Copy(f"{NATIVE}/MoEQuantize.cpp", f"{SRC}/MoEQuantize.cpp", update=True),
                Copy(f"{NATIVE}/cpu/MoEQuantizeKernel.cpp", f"{SRC}/cpu/MoEQuantizeKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",), edits=fp8_recipes.PORTABLE_KERNEL, update=True),
                Copy(f"{NATIVE}/cpu/MoEFp8Utils.h", f"{SRC}/cpu/MoEFp8Utils.h", update=True),
                Edit(META_REGISTRATIONS, fp8_recipes.landing(fp8_recipes.NO_MX_META)),
                Edit(FP8_OPINFO, fp8_recipes.landing(fp8_recipes.NO_MX_OPINFO + fp8_recipes.NO_MX_DEQUANTIZE_OPINFO)),
            ],
        ),
        Patch(
            message="core/0006a4-fp8-quantize-avx512.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/MoEQuantizeKernel.cpp", f"{SRC}/cpu/MoEQuantizeKernel.cpp", update=True),
            ],
        ),
        Patch(
            message="core/0006b-fp8-swizzle-mx-scale.txt",
            changes=[
                Copy(f"{NATIVE}/MoESwizzleMXScale.h", f"{SRC}/MoESwizzleMXScale.h"),
                Copy(f"{NATIVE}/MoESwizzleMXScale.cpp", f"{SRC}/MoESwizzleMXScale.cpp"),
                NativeFunctions("fp8", after="_dequantize_fp8", ops=("swizzle_mx_scale",)),
                Meta("fp8", SWIZZLE_MX_SCALE_META, ops=("swizzle_mx_scale",),
                     after="meta_dequantize_fp8"),
                DecompExpect("fp8", ops=("swizzle_mx_scale",)),
                OpInfoModule("fp8", "fp8", "", carried=FP8_OPINFOS["swizzle_mx_scale_opinfos"], extends=True,
                             op_db=fp8_op_db("quantize_fp8_opinfos", "dequantize_fp8_opinfos",
                                             "swizzle_mx_scale_opinfos")),
                *opinfo_lists.entries("_swizzle_mx_scale"),
            ],
        ),
        # _scaled_grouped_mm's CPU kernel lands recipe by recipe (fp8_stages: the sources as each PR leaves
        # them): rowwise scales (first through ATen operations on whole operands, then the chunked kernel),
        # blockwise scales, MX scales, then the AVX-512 decode.
        Patch(
            message="core/0006c1-fp8-scaled-grouped-mm-cpu-rowwise.txt",
            changes=[
                Copy(f"{NATIVE}/MoEScaledGroupedMM.h", f"{SRC}/MoEScaledGroupedMM.h",
                     edits=fp8_stages.HEADER_ROWWISE + fp8_stages.HEADER_FORWARD_LAYOUTS + fp8_stages.HEADER_NO_STUB),
                Copy(f"{NATIVE}/MoEScaledGroupedMM.cpp", f"{SRC}/MoEScaledGroupedMM.cpp",
                     edits=fp8_stages.ENTRY_ROWWISE + fp8_stages.ENTRY_DEQUANTISED),
                Dispatch("scaled_grouped_mm"),
                Edit(MM_GROUPED_LOWERING, SCALED_GROUPED_MM_LOWERING_BIAS),
                Meta("fp8", SCALED_GROUPED_MM_CPU_META, ops=("scaled_grouped_mm",),
                     after="meta_swizzle_mx_scale",
                     cpu_branch=("scaled_grouped_mm",),
                     source_edits=fp8_stages.CHECKS_ROWWISE + fp8_stages.CHECKS_FORWARD_LAYOUTS,
                     leave_out=fp8_stages.CHECKS_LATER,
                     edits=[(
                         "    # matching _scaled_grouped_mm_cuda Blas.cpp implementation\n",
                         "    if mat_a.device.type == \"cpu\":  # the CPU kernel's checks, wider than the CUDA kernels'\n"
                         "        return _meta_scaled_grouped_mm_cpu(\n"
                         "            mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum\n"
                         "        )\n"
                         "    # matching _scaled_grouped_mm_cuda Blas.cpp implementation\n")]),
                # the float64 grouped mm its reference calls: _grouped_mm's OpInfo module defines it (core/0002)
                OpInfoModule("fp8", "fp8", "", carried=FP8_OPINFOS["scaled_grouped_mm_opinfos"], extends=True,
                             imports={"torch_grouped_mm": "torch.testing._internal.opinfo.definitions.grouped_mm"},
                             op_db=FP8_OP_DB, source_edits=fp8_stages.OPINFO_ROWWISE,
                             edits=fp8_stages.REF_NO_MX + fp8_stages.REF_NO_BLOCKWISE
                             + fp8_stages.OPINFO_FORWARD_LAYOUTS),
                *opinfo_lists.entries("_scaled_grouped_mm"),
            ],
        ),
        Patch(
            message="core/0006c1a-fp8-scaled-grouped-mm-cpu-rowwise-kernel.txt",
            changes=[
                Copy(f"{NATIVE}/MoEScaledGroupedMM.h", f"{SRC}/MoEScaledGroupedMM.h",
                     edits=fp8_stages.HEADER_ROWWISE + fp8_stages.HEADER_FORWARD_LAYOUTS, update=True),
                Copy(f"{NATIVE}/MoEScaledGroupedMM.cpp", f"{SRC}/MoEScaledGroupedMM.cpp",
                     edits=fp8_stages.ENTRY_ROWWISE, update=True),
                Copy(f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp", f"{SRC}/cpu/MoEScaledGroupedMMKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",),
                     edits=fp8_stages.KERNEL_PORTABLE + fp8_stages.KERNEL_ROWWISE + fp8_stages.KERNEL_FORWARD_LAYOUTS),
            ],
        ),
        Patch(
            message="core/0006c1b-fp8-scaled-grouped-mm-cpu-rowwise-3d2d-2d2d.txt",
            changes=[
                Copy(f"{NATIVE}/MoEScaledGroupedMM.h", f"{SRC}/MoEScaledGroupedMM.h", edits=fp8_stages.HEADER_ROWWISE,
                     update=True),
                Copy(f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp", f"{SRC}/cpu/MoEScaledGroupedMMKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",),
                     edits=fp8_stages.KERNEL_PORTABLE + fp8_stages.KERNEL_ROWWISE, update=True),
                Meta("fp8", SCALED_GROUPED_MM_CPU_META, ops=("scaled_grouped_mm",), cpu_branch=("scaled_grouped_mm",),
                     source_edits=fp8_stages.CHECKS_ROWWISE, leave_out=fp8_stages.CHECKS_LATER, update=True),
                Edit(FP8_OPINFO, fp8_recipes.landing(fp8_stages.OPINFO_FORWARD_LAYOUTS)),
            ],
        ),
        Patch(
            message="core/0006c2-fp8-scaled-grouped-mm-cpu-blockwise.txt",
            changes=[
                Copy(f"{NATIVE}/MoEScaledGroupedMM.h", f"{SRC}/MoEScaledGroupedMM.h", edits=fp8_stages.HEADER_BLOCKWISE,
                     update=True),
                Copy(f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp", f"{SRC}/cpu/MoEScaledGroupedMMKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",),
                     edits=fp8_stages.KERNEL_PORTABLE + fp8_stages.KERNEL_BLOCKWISE, update=True),
                Meta("fp8", SCALED_GROUPED_MM_CPU_META, ops=("scaled_grouped_mm",), cpu_branch=("scaled_grouped_mm",),
                     source_edits=fp8_stages.CHECKS_BLOCKWISE, leave_out=fp8_stages.CHECKS_MX, update=True),
                OpInfoModule("fp8", "fp8", "", carried=list(fp8_stages.BLOCKWISE_OPINFOS), extends=True,
                             op_db=FP8_OP_DB, edits=fp8_stages.OPINFO_BLOCKWISE),
                Edit(FP8_OPINFO, fp8_recipes.landing(fp8_stages.REF_NO_BLOCKWISE)),
            ],
        ),
        Patch(
            message="core/0006c3-fp8-scaled-grouped-mm-cpu-mx.txt",
            changes=[
                Copy(f"{NATIVE}/MoEScaledGroupedMM.h", f"{SRC}/MoEScaledGroupedMM.h", update=True),
                Copy(f"{NATIVE}/MoEScaledGroupedMM.cpp", f"{SRC}/MoEScaledGroupedMM.cpp", update=True),
                Copy(f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp", f"{SRC}/cpu/MoEScaledGroupedMMKernel.cpp",
                     undefine=("CPU_CAPABILITY_AVX512",), edits=fp8_stages.KERNEL_PORTABLE, update=True),
                Meta("fp8", SCALED_GROUPED_MM_CPU_META, ops=("scaled_grouped_mm",), cpu_branch=("scaled_grouped_mm",),
                     update=True),
                OpInfoModule("fp8", "fp8", "", carried=list(fp8_stages.MX_OPINFOS), extends=True,
                             op_db=FP8_OP_DB, edits=fp8_stages.OPINFO_MX),
                Edit(FP8_OPINFO, fp8_recipes.landing(fp8_stages.REF_NO_MX)),
            ],
        ),
        Patch(
            message="core/0006c4-fp8-scaled-grouped-mm-cpu-avx512.txt",
            changes=[
                Copy(f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp", f"{SRC}/cpu/MoEScaledGroupedMMKernel.cpp",
                     update=True),
            ],
        ),
        # The float8 decode by byte arithmetic (shared with the next PR's engine), then rowwise float8 weights
        # decoded in grouped mm's engine: the PRs before them carry their files without them
        # (float8_weights_stages, applied by _without_float8_weights below).
        Patch(
            message=FP8_DECODE_PR,
            changes=[
                Copy(f"{NATIVE}/cpu/MoEFp8Avx512.h", float8_weights_stages.FP8_AVX512_H),
                Copy(f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp", float8_weights_stages.SCALED_KERNEL,
                     before=list(float8_weights_stages.BEFORE[float8_weights_stages.SCALED_KERNEL]), update=True),
            ],
        ),
        Patch(
            message=FLOAT8_WEIGHTS_PR,
            changes=[
                Copy(f"{NATIVE}/cpu/GroupedMMFloat8Weights.h", float8_weights_stages.FLOAT8_WEIGHTS_H),
                *(Copy(f"{NATIVE}/{source[len(SRC) + 1:]}", source, update=True)
                  for source in float8_weights_stages.BEFORE),
            ],
        ),
        Patch(
            message="core/0007-fp8-quantize-cuda.txt",
            changes=[
                Copy(f"{NATIVE}/MoEQuantize.h", f"{SRC}/MoEQuantize.h", update=True),
                Copy(f"{NATIVE}/cuda/MoEQuantize.cpp", f"{SRC}/cuda/MoEQuantize.cpp"),
                *(Dispatch(op.name, keys=("CUDA",)) for op in native_functions.upstreamed("fp8")
                  if not op.upstream.extends and op.has_own_cuda_kernel),
            ],
        ),
        # -- After stack 3: _scaled_grouped_mm_v2 on CPU (patches/rfc/0003-fp8-grouped-gemm-cpu.md) -------------
        Patch(
            message="core/0008-scaled-grouped-mm-v2-cpu.txt",
            changes=[
                Copy(f"{NATIVE}/MoEScaledGroupedMMv2.h", f"{SRC}/MoEScaledGroupedMMv2.h"),
                Copy(f"{NATIVE}/MoEScaledGroupedMMv2.cpp", f"{SRC}/MoEScaledGroupedMMv2.cpp"),
                Copy(f"{NATIVE}/ScaledGroupedMMCPU.cpp", "patches/src/aten/src/ATen/native/ScaledGroupedMMCPU.cpp"),
                Dispatch("scaled_grouped_mm_v2"),
                Meta("fp8", SCALED_GROUPED_MM_V2_META, after="_meta_scaled_grouped_mm_cpu",
                     ops=("scaled_grouped_mm_v2",),
                     cpu_branch=("scaled_grouped_mm_v2",), edits=[(
                         "    _out_dtype = out_dtype or torch.bfloat16\n",
                         "    if mat_a.device.type == \"cpu\":  # the CPU kernel's checks of the stated recipes\n"
                         "        _meta_scaled_grouped_mm_v2_cpu(\n"
                         "            mat_a, mat_b, scale_a, scale_recipe_a, swizzle_a, scale_b, scale_recipe_b, swizzle_b,\n"
                         "            offs, bias, out_dtype, contraction_dim or [], use_fast_accum\n"
                         "        )\n"
                         "    _out_dtype = out_dtype or torch.bfloat16\n")]),
            ],
        ),
        Patch(
            message="core/0008b-scaled-grouped-mm-v2-opinfo.txt",
            changes=[
                OpInfoModule("fp8", "fp8", "", carried=V2_OPINFOS, extends=True, op_db=FP8_V2_OP_DB,
                             source_file=V2_OPINFO_SOURCE),
                *opinfo_lists.entries("_scaled_grouped_mm_v2"),
            ],
        ),
    ]),
    Series("compile", [
        # The router rewrite with the matching helpers and the test file, then the combine rewrite with
        # its hook and its test case appended to that file, then the router's group-limited selection
        # (ungrouped until then: ROUTER_UNGROUPED) with its test case appended.
        Patch(
            message="compile/0001-inductor-moe-router-pass.txt",
            changes=[
                FxPassModule("moe_fx_utils", "torch_moe_ops/compile/_fx.py", MOE_MODULES,
                             edits=[('COUNTER = "torch_moe_ops"\n', 'COUNTER = "moe_passes"\n')]),
                FxPassModule("moe_router", "torch_moe_ops/compile/router.py", MOE_MODULES, edits=ROUTER_UNGROUPED),
                Edit("torch/_inductor/config.py", [(
                    "# set to True to enable the back-to-back GEMM pass\nb2b_gemm_pass = False\n",
                    "# set to True to enable the back-to-back GEMM pass\nb2b_gemm_pass = False\n\n" + MOE_CONFIG,
                )]),
                Edit("torch/_inductor/fx_passes/pre_grad.py", [(
                    "    for pre_grad_custom_pass in get_custom_graph_passes(config.pre_grad_custom_pass):\n",
                    "    if config.moe_passes:\n"
                    "        from .moe_router import rewrite_routers\n\n"
                    "        GraphTransformObserver(gm, \"moe_router\").apply_graph_pass(rewrite_routers)\n\n"
                    "    for pre_grad_custom_pass in get_custom_graph_passes(config.pre_grad_custom_pass):\n",
                )]),
                PassTests(MOE_TESTS, "test/test_compile_passes.py", MOE_TESTS_HEADER,
                          ["FEW", "_SoftmaxRouter", "_SigmoidRouter", "_moe_counters", "MoEPassTestCase",
                           "TestMoERouterPass"],
                          edits=[("        self._stack.enter_context(moe_compile.enabled())\n",
                                  "        self._stack.enter_context(torch._inductor.config.patch(moe_passes=True))\n")]),
            ],
        ),
        Patch(
            message="compile/0002-inductor-moe-combine-pass.txt",
            changes=[
                FxPassModule("moe_combine", "torch_moe_ops/compile/combine.py", MOE_MODULES),
                Edit("torch/_inductor/config.py", [MOE_CONFIG_COMBINE]),
                Edit("torch/_inductor/fx_passes/post_grad.py", [(
                    "    for post_grad_custom_post_pass in get_custom_graph_passes(\n",
                    "    if config.moe_passes:\n"
                    "        from .moe_combine import run as moe_combine\n\n"
                    "        GraphTransformObserver(gm, \"moe_combine\").apply_graph_pass(moe_combine)\n\n"
                    "    for post_grad_custom_post_pass in get_custom_graph_passes(\n",
                )]),
                PassTests(MOE_TESTS, "test/test_compile_passes.py", "",
                          ["_stock_combine", "_routing", "TestMoECombinePass"], extends=True),
            ],
        ),
        Patch(
            message="compile/0003-inductor-moe-router-group-limit.txt",
            changes=[
                FxPassModule("moe_group_limit", "torch_moe_ops/compile/group_limit.py", MOE_MODULES),
                FxPassModule("moe_router", "torch_moe_ops/compile/router.py", MOE_MODULES, update=True),
                PassTests(MOE_TESTS, "test/test_compile_passes.py", "",
                          ["_GroupLimitedRouter", "TestMoERouterGroupLimitPass"], extends=True),
            ],
        ),
    ]),
    Series("distributed", [
        Patch(
            message="distributed/0001-grouped-mm-bias-and-partial-bias.txt",
            changes=[
                SingleDimStrategy("torch/distributed/tensor/_ops/_matrix_ops.py", "distributed/grouped_mm_strategy.py",
                                  "grouped_mm", "grouped_mm_single_dim_strategy",
                                  provided=("_valid_grouped_mm_strides",)),
                opinfo_lists.removals(opinfo_lists.DTENSOR_OPS, "_grouped_mm"),  # test_dtensor_op_db passes
            ],
        ),
        Patch(
            message="distributed/0002-moe-routing-and-fp8-quantisation-ops-sharding.txt",
            changes=[
                StrategyModule("torch/distributed/tensor/_ops/_moe_ops.py", "distributed/moe_strategy.py",
                               ("routing", "fp8"), MOE_OPS_STRATEGY_DOC),
                Edit("torch/distributed/tensor/_ops/__init__.py", [(
                    "from ._matrix_ops import *  # noqa: F403\n",
                    "from ._matrix_ops import *  # noqa: F403\nfrom ._moe_ops import *  # noqa: F403\n",
                )]),
                # test_dtensor_op_db passes with these rules
                opinfo_lists.removals(opinfo_lists.DTENSOR_OPS, "_moe_router_topk", "_moe_permute", "_moe_unpermute",
                                      "_quantize_fp8", "_dequantize_fp8"),
            ],
        ),
        Patch(
            message="distributed/0003-scaled-grouped-mm-sharding-rules.txt",
            changes=[
                SingleDimStrategy("torch/distributed/tensor/_ops/_matrix_ops.py",
                                  "distributed/scaled_grouped_mm_strategy.py", "fp8",
                                  "scaled_grouped_mm_single_dim_strategy", after="grouped_mm_single_dim_strategy"),
                SingleDimStrategy("torch/distributed/tensor/_ops/_matrix_ops.py",
                                  "distributed/scaled_grouped_mm_strategy.py", "fp8",
                                  "scaled_grouped_mm_v2_single_dim_strategy",
                                  provided=("scaled_grouped_mm_single_dim_strategy",),  # the change above
                                  after="scaled_grouped_mm_single_dim_strategy"),
            ],
        ),
    ]),
]



def _chain_meta_blocks() -> None:
    """A family's meta blocks that select ops (one PR per op) leave out the
    checks an earlier PR's block carries: each block's earlier_ops are the
    ops of the family's blocks before it in the series."""
    carried: dict[str, tuple[str, ...]] = {}
    for series in SERIES:
        for patch in series.patches:
            for change in patch.changes:
                if isinstance(change, Meta) and change.ops:
                    # (an op's later block, update=True, grows its own earlier block: not "earlier" to itself)
                    change.earlier_ops = tuple(o for o in carried.get(change.family, ()) if o not in change.ops)
                    carried[change.family] = (*change.earlier_ops, *change.ops)


_chain_meta_blocks()
opinfo_lists.chain(SERIES)


def _without_float8_weights() -> None:
    """Every Copy of a file that FP8_DECODE_PR or FLOAT8_WEIGHTS_PR changes, in
    the PRs before them, takes their code out of the source first (Copy.before)."""
    for series in SERIES:
        for patch in series.patches:
            if patch.message == FP8_DECODE_PR:
                return
            for change in patch.changes:
                if isinstance(change, Copy) and change.source in float8_weights_stages.BEFORE_DECODE:
                    change.before = float8_weights_stages.BEFORE_DECODE[change.source] + change.before


_without_float8_weights()

def check_coverage() -> None:
    """Every file under CARRIED_DIRS is the source of some change or, outside
    MIRROR, NOT_UPSTREAMED (or, inside MIRROR, PENDING_UPSTREAM)."""
    carried = {s for series in SERIES for p in series.patches for c in p.changes for s in c.sources}
    for top in CARRIED_DIRS:
        for dirpath, _, files in os.walk(os.path.join(REPO_ROOT, top)):
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(dirpath, name), REPO_ROOT)
                pending = any(fnmatch.fnmatch(rel, p) for p in PENDING_UPSTREAM)
                if rel not in carried and rel.startswith(MIRROR + "/") and not pending:
                    raise PatchError(rel, None, f"is in the upstream-mirror tree ({MIRROR}/) but in no change of "
                                                "patches/manifest.py: carry it, or move it to "
                                                "torch_moe_ops/csrc/moe/ and give NOT_UPSTREAMED its reason")
                if rel not in carried and not pending and not any(fnmatch.fnmatch(rel, p) for p in NOT_UPSTREAMED):
                    raise PatchError(rel, None, "is in neither a change of patches/manifest.py nor its "
                                                "NOT_UPSTREAMED: decide whether it goes upstream")

"""How big each PR of the series is, and the limit test/test_patches.py holds them to.

A PR's size is the number of lines its diff adds plus the lines it removes,
counted in the ``.patch`` file that ``git format-patch`` wrote, over every file
it touches except GENERATED ones. Everything the series carries counts in
full: the C++ kernels, and the meta functions and OpInfos that patches/
generates from our Python too (upstream reviews those as code; they are
generated here, not by PyTorch's build).

LIMIT: 500 lines per PR ("about 500 lines or fewer, the generated code
aside", issue 14): what a reviewer reads in one sitting, and the size of
upstream's own stacked kernel PRs.

GENERATED: files PyTorch's tooling writes, reviewed by re-running it rather
than by reading: the expect files of test/expect/ (``EXPECTTEST_ACCEPT=1
python test/test_decomp.py -k HasDecompTest`` rewrites them).

OVER_LIMIT: the PRs still over the limit, each with its size today (a
ceiling: the PR may shrink, never grow), why, and the split of the in-repo
sources that would bring it under. A PR in neither bound fails the test.
"""

from __future__ import annotations

import fnmatch
import re

LIMIT = 500

GENERATED = ("test/expect/*.expect",)

# Also counted aside: the skip / xfail lists of upstream's OpInfo-driven
# suites (patches/opinfo_lists.py), one line per new op and suite (and
# device), bookkeeping that follows from the OpInfo the PR adds; two of them
# are rewritten by their suites' own tooling (test_dtensor_ops.py's dry_run,
# PYTORCH_COLLECT_EXPECT=1 for test_torchinductor_opinfo.py).
OPINFO_LISTS = ("test/distributed/tensor/test_dtensor_ops.py", "test/functorch/test_vmap.py",
                "test/inductor/test_torchinductor_opinfo.py")

# Patch message (patches/messages/<series>/...) -> (ceiling, reason and fix).
OVER_LIMIT: dict[str, tuple[int, str]] = {
    "core/0001-grouped-mm-cpu-kernel.txt": (1216, (
        "a working CPU kernel is its checks (GroupedMM.h, 262 lines) and entry point (52) plus the portable "
        "engine (cpu/GroupedMMKernelUtils.h 257, cpu/GroupedMMKernel.cpp 279 as this PR carries it), 850 lines "
        "before the meta function (166) and test_matmul.py (187). The AVX-512 engines are already later PRs. "
        "Fix: a first PR of the checks and the meta function alone, with CPU computing through v2.14.1's "
        "loop-of-mm fallback where it can (no bias, the input dtype out) and rejecting the rest; that "
        "intermediate GroupedMM.cpp is code no in-repo source holds, so it needs a source-level switch first")),
    "core/0001b-grouped-mm-cpu-avx512.txt": (871, (
        "cpu/GroupedMMAvx512.h alone is 651 lines (micro-kernels, weight packing, tile driver of the "
        "broadcast engine). Fix: carry the bfloat16 K-pair kernels (vdpbf16ps: micro_bf16, pack_pairs_bf16, "
        "pack_b_bf16, MicroTraits<BFloat16, true>, ~130 lines) and the packing of K-contiguous weights "
        "(pack_words_transposed, ~70, with the inner-product PR) in files of their own, reached through the "
        "traits instead of kPairsOf branches")),
    "core/0003d-moe-router-topk-cpu.txt": (649, (
        "cpu/MoERouterTopkKernel.cpp alone is 373 lines, ~150 of them the AVX-512 scores and selection. Fix: "
        "the AVX-512 path in a PR of its own after this one, which needs a Copy that carries the kernel file "
        "without its CPU_CAPABILITY_AVX512 blocks first (what the DEFAULT and AVX2 builds of the same file "
        "compile), then the whole file")),
    "core/0006-fp8-cpu.txt": (1308, (
        "_quantize_fp8 and _dequantize_fp8 (core/0006b, _swizzle_mx_scale, is 316): cpu/MoEQuantizeKernel.cpp "
        "(457) and MoEQuantize.h (283) hold every recipe's kernel and checks, with the two ops' OpInfos (338) "
        "and meta functions (127). Fix: split the kernel, checks and samples by recipe: tensorwise and rowwise "
        "(whole-row segments) first, then the blocked recipes (1x128, 128x128), then MX (e8m0 scales, "
        "swizzle), each PR with its recipes' samples")),
    "core/0006c-fp8-scaled-grouped-mm-cpu.txt": (1189, (
        "_scaled_grouped_mm on CPU: cpu/MoEScaledGroupedMMKernel.cpp (423), MoEScaledGroupedMM.h (277, its "
        "scale checks one function per recipe, shared with _scaled_grouped_mm_v2's PR) and "
        "its OpInfo (312) cover every recipe. Fix: the rowwise kernel first, then the blockwise and the MX "
        "scales in PRs of their own (the target stack of patches/rfc/0003, on _scaled_grouped_mm_v2, "
        "which re-cuts this PR)")),
    "compile/0001-inductor-moe-router-pass.txt": (544, (
        "fx_passes/moe_router.py alone is 240 lines and the matching helpers it reads (moe_fx_utils.py) 160, "
        "with the test file's 133 (the combine's PR, compile/0002, is 230). Fix: carry DeepSeek-V3's "
        "group-limited selection (router.py's _group_limit, ~70 lines with its test) as a third PR, which "
        "needs the router's matcher to take the group limit from a module of its own")),
}


def is_generated(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in GENERATED)


def patch_sizes(text: str) -> dict[str, int]:
    """Lines added plus removed, per file, in a git format-patch text."""
    sizes: dict[str, int] = {}
    path = None
    in_hunk = False
    for line in text.splitlines():
        if line.startswith("diff --git "):
            path = re.match(r"diff --git a/(\S+) b/", line).group(1)
            sizes[path] = 0
            in_hunk = False
        elif path is None:
            continue
        elif line.startswith("@@"):
            in_hunk = True
        elif in_hunk and line[:1] in "+-":
            sizes[path] += 1
    return sizes


def pr_size(text: str) -> int:
    """The PR's size as LIMIT counts it (GENERATED files and OPINFO_LISTS left out)."""
    return sum(n for path, n in patch_sizes(text).items() if not is_generated(path) and path not in OPINFO_LISTS)

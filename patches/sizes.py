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
    "core/0003-moe-routing-ops-cpu.txt": (1604, (
        "cpu/MoERoutingKernel.cpp alone is 746 lines (router, permute, unpermute in one file). Fix: one "
        "kernel file per op (router_topk; permute; unpermute and its backward), each PR with its op's "
        "schema, meta function and OpInfo")),
    "core/0005-moe-routing-ops-cuda.txt": (799, (
        "cuda/MoERouting.cuh (468) and cuda/MoERouting.cu (272) hold the three ops' CUDA kernels together. "
        "Fix: the same per-op split as the CPU kernels")),
    "core/0006-fp8-cpu.txt": (2688, (
        "the quantisation ops and _scaled_grouped_mm come together: one meta block and one OpInfo module "
        "(707 lines) per family, and MoEQuantizeKernel.cpp (457) / MoEScaledGroupedMMKernel.cpp (423). Fix: "
        "split test/opinfo_fp8.py and the fp8 meta block per op (quantize/dequantize; swizzle_mx_scale; "
        "scaled_grouped_mm) and carry _scaled_grouped_mm in its own PR")),
    "compile/0001-inductor-moe-passes-router-and-combine.txt": (801, (
        "the router and the combine rewrites land together with their shared helpers (moe_fx_utils.py, 197 "
        "lines) and one test file. Fix: two PRs, the router rewrite with the helpers it uses and its tests "
        "(~450 lines once the helpers only the combine needs move into moe_combine.py), then the combine "
        "rewrite with its tests (~300), which needs PassTests to extend the test file the first PR adds")),
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
    """The PR's size as LIMIT counts it (GENERATED files left out)."""
    return sum(n for path, n in patch_sizes(text).items() if not is_generated(path))

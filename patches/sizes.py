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
OPINFO_LISTS = ("test/distributed/tensor/test_dtensor_ops.py", "test/functorch/test_ops.py",
                "test/functorch/test_vmap.py", "test/inductor/test_torchinductor_opinfo.py", "test/test_proxy_tensor.py")

# Patch message (patches/messages/<series>/...) -> (ceiling, reason and fix).
OVER_LIMIT: dict[str, tuple[int, str]] = {}


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

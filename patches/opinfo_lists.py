"""Entries for the series' new OpInfos in the OpInfo-driven suites upstream
runs over every ``op_db`` entry and whose skip / xfail lists live in test
files the wheel does not ship (``base.STAND_INS`` holds the lines of each
that the hunks need, as pytorch/pytorch stores them).

Each entry was found by running the suite's own check on our OpInfos
against our kernels (CPU, the v2.14.1 wheel; the reasons below); a suite
not listed here needs no entry, or was not checked (patches/README.md):

* test/distributed/tensor/test_dtensor_ops.py, ``dtensor_fails``
  (``test_dtensor_op_db``: float32 samples through DTensor on a 4-rank
  mesh): the new ops have no sharding strategy in the core series
  (NotImplementedError), and v2.14.1's ``_grouped_mm`` rule leaves no valid
  strategy for the OpInfo's first sample (2d3d, float32).
  ``_swizzle_mx_scale`` has no float32 test. With the distributed series'
  rules (without this project's placement guard, as upstream runs them,
  results compared on rank 0 as the test does) the test passes: the
  entries go in the PR carrying the op's rules; except _scaled_grouped_mm's,
  which stays: its float32 sample 2d3d_blockwise_e4m3 differs from eager by
  up to 2.1e-4 (relative 5.6e-4, on 152 of 4500 elements) with the
  distributed/0003 rule.
* test/functorch/test_vmap.py, ``test_op_has_batch_rule``: no new op has a
  batching rule; with the vmap fallback disabled (as that test runs) every
  one raises "hit the vmap fallback which is currently disabled".
  ``test_vmap_exhaustive`` passes through the fallback: no entry.
  ``_scaled_grouped_mm_v2``'s OpInfo is bfloat16 only (its structured meta
  function takes no other output), so it has no DTensor entry (float32
  only) and no Inductor one (test_comprehensive tests no bfloat16); this
  test runs every op at float32 regardless, and each of its samples hits
  the disabled fallback (checked against our kernel, which takes a
  float32 output; in-tree the meta function refuses one first: fails
  either way).
* test/inductor/test_torchinductor_opinfo.py,
  ``inductor_expected_failures_single_sample`` (``test_comprehensive`` runs
  with ``implicit_fallbacks=False``): an op with neither a lowering nor an
  explicit fallback fails with MissingOperatorWithoutDecomp, on every dtype
  and device; ``_grouped_mm`` and ``_scaled_grouped_mm`` have lowerings.

An entry goes in the PR that adds the op's OpInfo (``entries`` in that
Patch of the manifest) and leaves in the PR that makes the test pass
(``removals``: the DTensor rules). The entries of a list sit together,
sorted, after an anchor line of the upstream file, so each PR's hunk
rewrites the block the earlier PRs left (``earlier``, set from the series
order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import rewrite
from .changes import declared_at
from .errors import PatchError

DTENSOR_OPS = "test/distributed/tensor/test_dtensor_ops.py"
FUNCTORCH_VMAP = "test/functorch/test_vmap.py"
INDUCTOR_OPINFO = "test/inductor/test_torchinductor_opinfo.py"

# The dtypes test_comprehensive tests (its allowed_dtypes), in the file's spelling.
_INDUCTOR_DTYPES = {"b8": "bool", "f16": "float16", "f32": "float32", "f64": "float64", "i32": "int32",
                    "i64": "int64"}


@dataclass(frozen=True)
class Block:
    """Where a list's entries go: after ``anchor`` (a run of lines that
    occurs once in the upstream file), sorted by op name; ``ops`` decides
    which ops go in this block (dtensor_fails is sorted, so ours sit in two
    places of it)."""

    path: str
    anchor: str
    ops: tuple[str, ...]
    line: str  # the entry, with {op} (and {dtypes})


BLOCKS = [
    # dtensor_fails: after "_chunk_cat" and after "_native_batch_norm_legit", where our names sort.
    Block(DTENSOR_OPS, '    xfail("_chunk_cat"),\n',
          ("_dequantize_fp8", "_grouped_mm", "_moe_permute", "_moe_router_topk", "_moe_unpermute"),
          '    xfail("{op}"),\n'),
    Block(DTENSOR_OPS, '    xfail("_native_batch_norm_legit"),\n',
          ("_quantize_fp8", "_scaled_grouped_mm"), '    xfail("{op}"),\n'),
    # test_op_has_batch_rule's xfails, first in its set.
    Block(FUNCTORCH_VMAP, '        "test_op_has_batch_rule",\n        vmap_fail.union(\n            {\n',
          ("_dequantize_fp8", "_grouped_mm", "_moe_permute", "_moe_router_topk", "_moe_unpermute", "_quantize_fp8",
           "_scaled_grouped_mm", "_scaled_grouped_mm_v2", "_swizzle_mx_scale"),
          '                xfail("{op}"),  # no batching rule: hits the vmap fallback\n'),
    # test_comprehensive's expected failures, on each device, first in each dict.
    *(Block(INDUCTOR_OPINFO, f'inductor_expected_failures_single_sample["{device}"] = {{\n',
            ("_dequantize_fp8", "_moe_permute", "_moe_router_topk", "_moe_unpermute", "_quantize_fp8"),
            '    "{op}": {dtypes},  # no lowering (MissingOperatorWithoutDecomp)\n')
      for device in ("cpu", "cuda")),
]

# The dtypes of test_comprehensive's expected failures: the OpInfo's dtypes it tests.
INDUCTOR_DTYPES = {
    "_dequantize_fp8": ("f16", "f32"),
    "_moe_permute": ("b8", "f16", "f32", "f64", "i32", "i64"),
    "_moe_router_topk": ("f16", "f32", "f64"),
    "_moe_unpermute": ("f16", "f32", "f64"),
    "_quantize_fp8": ("f16", "f32"),
}


def _render(block: Block, ops) -> str:
    return "".join(block.line.format(op=op, dtypes="{" + ", ".join(INDUCTOR_DTYPES.get(op, ())) + "}")
                   for op in sorted(o for o in ops if o in block.ops))


@dataclass
class ListEntries:
    """The entries of ``ops`` (OpInfo names) in one upstream test file's
    lists (``remove``: taken out, when a later PR makes the test pass);
    ``earlier``: the ops with entries in that file before this PR."""

    path: str
    ops: tuple[str, ...]
    earlier: tuple[str, ...] = ()
    remove: bool = False
    declared_at: str = field(default_factory=declared_at)
    sources: list[str] = field(default_factory=list)

    def apply(self, text: str | None) -> str:
        if text is None:
            raise PatchError(self.path, None, "does not exist in the base tree (see patches/base.py STAND_INS)")
        blocks = [b for b in BLOCKS if b.path == self.path]
        unknown = [op for op in self.ops if not any(op in b.ops for b in blocks)]
        if unknown:
            file, line = self.declared_at.rsplit(":", 1)
            raise PatchError(file, int(line), f"no list of {self.path} takes {unknown} (patches/opinfo_lists.py)")
        if self.remove and set(self.ops) - set(self.earlier):
            file, line = self.declared_at.rsplit(":", 1)
            raise PatchError(file, int(line), f"{sorted(set(self.ops) - set(self.earlier))} have no entry to remove")
        for block in blocks:
            before = _render(block, self.earlier)
            after = _render(block, [op for op in self.earlier if op not in self.ops] if self.remove
                            else (*self.earlier, *self.ops))
            if before != after:
                text = rewrite.replace_once(text, block.anchor + before, block.anchor + after, self.path)
        return text


def entries(*ops: str) -> list[ListEntries]:
    """The changes giving ops their entries, one per test file that lists any of them."""
    paths = dict.fromkeys(b.path for b in BLOCKS if any(op in b.ops for op in ops))
    return [ListEntries(path, tuple(op for op in ops if any(op in b.ops for b in BLOCKS if b.path == path)),
                        declared_at=declared_at()) for path in paths]


def removals(path: str, *ops: str) -> ListEntries:
    """The change taking ops' entries out of path's lists."""
    return ListEntries(path, ops, remove=True, declared_at=declared_at())


def chain(series) -> None:
    """Each ListEntries' earlier: the ops of the same file's ListEntries before it in the series."""
    seen: dict[str, tuple[str, ...]] = {}
    for s in series:
        for patch in s.patches:
            for change in patch.changes:
                if isinstance(change, ListEntries):
                    change.earlier = seen.get(change.path, ())
                    seen[change.path] = (tuple(op for op in change.earlier if op not in change.ops) if change.remove
                                         else (*change.earlier, *change.ops))

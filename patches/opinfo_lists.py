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
  which stays, though its rule is right: the float32 sample
  2d3d_blockwise_e4m3 has a column-major mat_b, DTensor's local tensors are
  contiguous, and the CPU kernel sums K in the storage order of mat_b, so
  its outputs (up to ~500) differ from eager by up to 4 ulp (2.4e-4), beyond
  the test's float32 tolerance on 152 near-zero elements of 4500. Eager on a
  contiguous copy of mat_b gives the same bits as every DTensor placement
  that runs on gloo (4 ranks, 2026-11-29).
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
* test/functorch/test_ops.py, TestOperators (float32; test_vmap_autograd_grad
  float64 too): the fp8 ops have no autograd and skip every test; the four
  differentiable ops have no forward-AD formula (test_jvp, test_vmapjvpall*
  skip themselves) and no batching rule. Run through stand-ins with
  derivatives.yaml's structure (an autograd.Function per op with
  setup_context, the extension's backward formulas calling the stand-ins, no
  jvp, vmap reaching the kernel: the fallback), since the extension's
  register_autograd kernels are not functorch-aware as a C++ autograd kernel
  is: test_grad, test_vjp, test_vjpvjp, test_vmapvjp, test_vmapvjpvjp,
  test_vjpvmap and test_vmap_autograd_grad pass (with the vmap fallback);
  test_vmapvjp_has_batch_rule fails ("hit the vmap fallback which is currently
  disabled"), test_jvpvjp and test_vmapjvpvjp fail (the forward of the op
  under jvp: "Trying to use forward AD with _grouped_mm that does not support
  it", which the wheel's own aten::_grouped_mm gives too). _moe_unpermute's
  double backward would need a derivative of _moe_unpermute_backward, which
  the series does not define: its OpInfo says supports_gradgrad=False (so
  test_vjpvjp skips, as test_ops.py's test_fn_gradgrad does) instead of an
  entry.
* test/test_proxy_tensor.py, ``make_fx_failures`` (test_make_fx_exhaustive,
  _fake_, _symbolic_: optests.make_fx_check on the first 100 float32
  samples): _dequantize_fp8 and _scaled_grouped_mm fail in the harness, not
  in tracing: randomize_data refills every floating input with uniform_,
  which float8 lacks ("check_uniform_bounds" not implemented for
  'Float8_e4m3fn'). Every other op traces in the three modes.
* test/test_schema_check.py keeps no list (the skips are the OpInfos', as
  _scaled_mm's): SchemaCheckMode compares inputs with torch.allclose, which
  float8 and bcomplex32 lack, so _moe_permute's OpInfo skips it for those
  dtypes, and the fp8 ops taking float8 inputs (_dequantize_fp8,
  _swizzle_mx_scale, _scaled_grouped_mm and _v2) skip it (opinfo_fp8's
  _fp8_opinfo; checked: SchemaCheckMode raises "mul_cpu_reduced_float" not
  implemented for 'Float8_e4m3fn' on their samples).
* test/export/test_export_opinfo.py (fake export of the float32 samples onto
  a fake cuda:0 and xpu:0 device) passes for every op: no entry; its samples
  with a non-tensor positional argument are not exported.
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
FUNCTORCH_OPS = "test/functorch/test_ops.py"
INDUCTOR_OPINFO = "test/inductor/test_torchinductor_opinfo.py"
PROXY_TENSOR = "test/test_proxy_tensor.py"

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
    # TestOperators' xfails of the compositions that fail for a differentiable op
    # without a batching rule or a forward-AD formula, first in each test's set.
    *(Block(FUNCTORCH_OPS, f'        "{test}",\n        {base}.union(\n            {{\n',
            ("_grouped_mm", "_moe_permute", "_moe_router_topk", "_moe_unpermute"),
            f'                xfail("{{op}}"),  # {reason}\n')
      for test, base, reason in (
          ("test_vmapvjp_has_batch_rule", "vmapvjp_fail", "no batching rule: hits the vmap fallback"),
          ("test_jvpvjp", "vjp_fail", "NYI: forward AD for {op}"),
          ("test_vmapjvpvjp", "vjp_fail", "NYI: forward AD for {op}"))),
    # make_fx_failures, after its first group (the file groups them by reason).
    Block(PROXY_TENSOR, "make_fx_failures = {\n    # unknown\n    xfail('allclose'),\n    xfail('equal'),\n",
          ("_dequantize_fp8", "_scaled_grouped_mm"),
          "    xfail('{op}'),  # make_fx_check's randomize_data: uniform_ not implemented for float8 inputs\n"),
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

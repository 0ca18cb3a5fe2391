"""What goes upstream, where, and in which patch.

Each patch is a list of changes to PyTorch v2.14.1 paths. A change either
copies an in-repo file verbatim (the C++ kernels: the very files the extension
compiles), applies anchored edits to an upstream file, or generates Python from
our sources with names rewritten (the meta function and the DTensor strategy
are the code this package runs). Series are applied in order; each series'
patches are stacked on the previous series.

Paths in ``source`` are relative to the repository root.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from . import rewrite
from .errors import PatchError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every file under these in-repo directories must be either carried by some
# change below or listed in NOT_UPSTREAMED: a new kernel source that the
# manifest does not mention is an error, not a silent gap in the series.
CARRIED_DIRS = ["torch_moe_ops/csrc/ATen"]

# fnmatch patterns of sources deliberately kept out of the series, with why.
# (fnmatch's * also matches "/".)
NOT_UPSTREAMED: dict[str, str] = {
    "torch_moe_ops/csrc/ATen/native/ExpertMLP.*": (
        "the fused expert MLP is a layer-level composition (the torchao / torchtitan level of the stack) of "
        "kernels that do go upstream (_grouped_mm and its gathered form, the routing ops); upstream takes the "
        "primitives, not the layer"),
}


def _declared_at() -> str:
    """manifest.py:LINE of the change being declared, for error messages."""
    frame = sys._getframe(2)
    return f"{os.path.relpath(frame.f_code.co_filename, REPO_ROOT)}:{frame.f_lineno}"


def read_source(source: str, declared_at: str) -> str:
    path = os.path.join(REPO_ROOT, source)
    if not os.path.isfile(path):
        file, line = declared_at.rsplit(":", 1)
        raise PatchError(file, int(line), f"source {source} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


@dataclass
class Copy:
    """A new upstream file, byte-identical to an in-repo source."""

    path: str
    source: str
    declared_at: str = field(default_factory=_declared_at)

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, text: str | None) -> str:
        if text is not None:
            raise PatchError(self.path, None, "exists upstream; a Copy may only add new files")
        return read_source(self.source, self.declared_at)


@dataclass
class Edit:
    """Anchored edits to an upstream file: (old, new) pairs, each old exactly once."""

    path: str
    edits: list[tuple[str, str]]
    declared_at: str = field(default_factory=_declared_at)
    sources: list[str] = field(default_factory=list)

    def apply(self, text: str | None) -> str:
        if text is None:
            raise PatchError(self.path, None, "does not exist in the base tree")
        for old, new in self.edits:
            text = rewrite.replace_once(text, old, new, self.path)
        return text


@dataclass
class Generate:
    """An upstream file (new when the base tree has none) computed from sources."""

    path: str
    sources: list[str]
    make: Callable[..., str]  # make(upstream_text_or_None, *source_texts) -> new text
    declared_at: str = field(default_factory=_declared_at)

    def apply(self, text: str | None) -> str:
        return self.make(text, *(read_source(s, self.declared_at) for s in self.sources))


@dataclass
class Patch:
    title: str
    summary: str
    test_plan: str
    changes: list


@dataclass
class Series:
    name: str
    patches: list[Patch]


# ---------------------------------------------------------------------------
# Names: our Python helpers become private helpers of torch/_meta_registrations.py.

CHECKS = "torch_moe_ops/_checks.py"
FAKE = "torch_moe_ops/ops/grouped_mm.py"
STRATEGY = "distributed/grouped_mm_strategy.py"
OPINFO = "test/opinfo.py"
REFERENCE = "torch_moe_ops/reference.py"

CHECK_NAMES = {
    "GROUPED_MM_DTYPES": "_GROUPED_MM_DTYPES",
    "grouped_mm_layout": "_grouped_mm_layout",
    "grouped_mm_out_dtype": "_grouped_mm_out_dtype",
    "grouped_mm_num_groups": "_grouped_mm_num_groups",
    "grouped_mm_out_size": "_grouped_mm_out_size",
    "grouped_mm_out_strides": "_grouped_mm_out_strides",
    "_c10": "_grouped_mm_c10",
    "_sizes": "_grouped_mm_sizes",
    "check_grouped_mm_dims": "_grouped_mm_check_dims",
    "check_grouped_mm_contraction": "_grouped_mm_check_contraction",
    "check_grouped_mm_layout": "_grouped_mm_check_layout",
    "check_grouped_mm_inputs": "_grouped_mm_check_inputs",
}

META_HEADER = """\
# aten._grouped_mm: checks and output allocation. These restate
# grouped_mm_check_inputs, grouped_mm_out_size and grouped_mm_out_strides of
# ATen/native/GroupedMM.h one for one, with the same messages, so that an error
# reads the same in eager and under torch.compile; keep the two in step.
"""


def _checks_block(checks_src: str) -> str:
    """The grouped_mm definitions of CHECKS (it also holds other ops' checks)."""
    renamed = rewrite.rename(checks_src, CHECKS, CHECK_NAMES)[0]
    return rewrite.definitions(renamed, CHECKS, list(CHECK_NAMES.values()))


def make_meta(upstream: str, checks_src: str, fake_src: str) -> str:
    # Renamed as a whole file first, so that errors give the line in FAKE.
    fake_src = rewrite.rename(fake_src, FAKE, {**CHECK_NAMES, "_grouped_mm_fake": "meta_grouped_mm"},
                              module_alias="_checks")[0]
    fake = rewrite.definition(fake_src, FAKE, "meta_grouped_mm")
    fake = rewrite.replace_once(fake, '@torch.library.register_fake("moe_ops::grouped_mm")\n',
                                "@register_meta(aten._grouped_mm)\n", FAKE)
    # The checks annotate with Optional (they are written for Python 3.10).
    upstream = rewrite.replace_once(upstream, "from typing import TypeVar\n",
                                    "from typing import Optional, TypeVar\n", "torch/_meta_registrations.py")
    block = META_HEADER + "\n" + _checks_block(checks_src) + "\n\n" + fake + "\n\n"
    return rewrite.replace_definitions(upstream, "torch/_meta_registrations.py", ["meta_grouped_mm"], block)


# The routing ops' checks and fake kernels become meta functions of the
# aten._moe_* ops, next to those of _grouped_mm (whose _c10 and _sizes helpers
# they share).
ROUTING_FAKE = "torch_moe_ops/ops/routing.py"

ROUTING_CHECK_NAMES = {
    "ROUTER_SCORE_FUNCS": "_MOE_ROUTER_SCORE_FUNCS",
    "router_topk_weights_dtype": "_moe_router_topk_weights_dtype",
    "check_router_topk_inputs": "_moe_router_topk_check_inputs",
    "permute_num_local": "_moe_permute_num_local",
    "permute_num_rows": "_moe_permute_num_rows",
    "check_permute_inputs": "_moe_permute_check_inputs",
    "check_unpermute_inputs": "_moe_unpermute_check_inputs",
    "check_unpermute_backward_inputs": "_moe_unpermute_backward_check_inputs",
}

ROUTING_FAKES = {
    "_router_topk_fake": ("meta_moe_router_topk", "router_topk"),
    "_permute_fake": ("meta_moe_permute", "permute"),
    "_unpermute_fake": ("meta_moe_unpermute", "unpermute"),
    "_unpermute_backward_fake": ("meta_moe_unpermute_backward", "unpermute_backward"),
}

ROUTING_META_HEADER = """\
# aten._moe_router_topk, _moe_permute, _moe_unpermute: checks and output
# allocation. These restate the checks of ATen/native/MoERouting.h one for one,
# with the same messages; keep the two in step.
"""


def _meta_block(checks_src: str, fake_src: str, fake_path: str, check_names: dict, shared_names: tuple,
                fakes: list, header: str) -> str:
    """One family of ops for torch/_meta_registrations.py: the checks of CHECKS
    named in check_names (they may use the grouped_mm helpers shared_names,
    carried by the first compile patch) and the fake kernels of fake_path, each
    (fake, meta name, moe_ops op, aten op or None for a plain helper) renamed,
    register_fake turned into register_meta."""
    shared = {name: CHECK_NAMES[name] for name in shared_names}
    checks = rewrite.rename(checks_src, CHECKS, {**check_names, **shared})[0]
    checks = rewrite.definitions(checks, CHECKS, list(check_names.values()), provided=tuple(shared.values()))
    fakes_renamed = rewrite.rename(fake_src, fake_path,
                                   {**check_names, **shared, **{fake: meta for fake, meta, _, _ in fakes}},
                                   module_alias="_checks")[0]
    metas = []
    for _, meta_name, op, aten_op in fakes:
        fake = rewrite.definition(fakes_renamed, fake_path, meta_name)
        metas.append(rewrite.replace_once(fake, f'@torch.library.register_fake("moe_ops::{op}")\n',
                                          f"@register_meta(aten.{aten_op})\n" if aten_op else "", fake_path))
    return header + "\n" + checks + "\n\n" + "\n\n".join(metas) + "\n\n"


def _insert_after(upstream: str, name: str, block: str) -> str:
    """block placed after the top-level definition name of torch/_meta_registrations.py."""
    path = "torch/_meta_registrations.py"
    after = rewrite.definition(upstream, path, name)
    return rewrite.replace_definitions(upstream, path, [name], after + "\n\n" + block)


def make_routing_meta(upstream: str, checks_src: str, fake_src: str) -> str:
    fakes = [(fake, meta, op, f"_moe_{op}") for fake, (meta, op) in ROUTING_FAKES.items()]
    shared = ("_c10", "_sizes", "GROUPED_MM_DTYPES")
    block = _meta_block(checks_src, fake_src, ROUTING_FAKE, ROUTING_CHECK_NAMES, shared, fakes, ROUTING_META_HEADER)
    return _insert_after(upstream, "meta_grouped_mm", block)


# The fp8 ops' checks and fake kernels become the meta functions of
# aten._quantize_fp8 and _dequantize_fp8, and the CPU branch of
# _scaled_grouped_mm's meta function (its CUDA branch stays upstream's, which
# states what the CUDA kernels accept).
FP8_FAKE = "torch_moe_ops/ops/fp8.py"

FP8_CHECK_NAMES = {
    "FP8_RECIPES": "_FP8_RECIPES",
    "FP8_DATA_DTYPES": "_FP8_DATA_DTYPES",
    "FP8_FLOAT_DTYPES": "_FP8_FLOAT_DTYPES",
    "_fp8_c10": "_fp8_c10",
    "_dims": "_fp8_dims",
    "_ceil_div": "_fp8_ceil_div",
    "fp8_check_recipe": "_fp8_check_recipe",
    "fp8_scale_dtype": "_fp8_scale_dtype",
    "fp8_scale_size": "_fp8_scale_size",
    "fp8_check_layout": "_fp8_check_layout",
    "check_quantize_fp8_inputs": "_quantize_fp8_check_inputs",
    "check_dequantize_fp8_inputs": "_dequantize_fp8_check_inputs",
    "scaled_grouped_mm_out_dtype": "_scaled_grouped_mm_out_dtype",
    "_scaled_check_scale": "_scaled_grouped_mm_check_scale",
    "check_scaled_grouped_mm_inputs": "_scaled_grouped_mm_check_inputs",
    "swizzle_mx_scale_size": "_swizzle_mx_scale_size",
    "check_swizzle_mx_scale_inputs": "_swizzle_mx_scale_check_inputs",
}

# fake kernel -> (meta name, aten op registered, or None for a helper)
FP8_FAKES = {
    "_quantize_fp8_fake": ("meta_quantize_fp8", "_quantize_fp8"),
    "_dequantize_fp8_fake": ("meta_dequantize_fp8", "_dequantize_fp8"),
    "_scaled_grouped_mm_fake": ("_meta_scaled_grouped_mm_cpu", None),
    "_swizzle_mx_scale_fake": ("meta_swizzle_mx_scale", "_swizzle_mx_scale"),
}

FP8_META_HEADER = """\
# aten._quantize_fp8, _dequantize_fp8, and _scaled_grouped_mm on CPU: checks
# and output allocation. These restate the checks of ATen/native/MoEQuantize.h
# and MoEScaledGroupedMM.h one for one, with the same messages; keep them in
# step.
"""


def make_fp8_meta(upstream: str, checks_src: str, fake_src: str) -> str:
    path = "torch/_meta_registrations.py"
    shared = ("_c10", "_sizes", "check_grouped_mm_dims", "check_grouped_mm_contraction", "check_grouped_mm_layout",
              "grouped_mm_layout", "grouped_mm_num_groups", "grouped_mm_out_size")
    fakes = [(fake, meta, aten_op[1:] if aten_op else "scaled_grouped_mm", aten_op)
             for fake, (meta, aten_op) in FP8_FAKES.items()]
    block = _meta_block(checks_src, fake_src, FP8_FAKE, FP8_CHECK_NAMES, shared, fakes, FP8_META_HEADER)
    text = _insert_after(upstream, ROUTING_FAKES["_unpermute_backward_fake"][0], block)
    return rewrite.replace_once(
        text,
        "    # matching _scaled_grouped_mm_cuda Blas.cpp implementation\n",
        "    if mat_a.device.type == \"cpu\":  # the CPU kernel's checks, wider than the CUDA kernels'\n"
        "        return _meta_scaled_grouped_mm_cpu(\n"
        "            mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum\n"
        "        )\n"
        "    # matching _scaled_grouped_mm_cuda Blas.cpp implementation\n",
        path)


FP8_OPINFO = "test/opinfo_fp8.py"


def make_fp8_opinfo(upstream: str | None, opinfo_src: str, reference_src: str) -> str:
    references = rewrite.definitions(reference_src, REFERENCE, [
        "torch_grouped_mm", "FP8_RECIPES", "_FP8_BLOCK", "_FP8_EMAX", "_fp8_blocks", "_fp8_swizzle",
        "torch_quantize_fp8", "_fp8_scale_layout", "torch_dequantize_fp8", "_fp8_scale_grid", "_fp8_unswizzle",
        "torch_swizzle_mx_scale", "_fp8_unswizzle_groups", "torch_scaled_grouped_mm"])
    src = "# mypy: ignore-errors\n\n" + opinfo_src
    src = rewrite.replace_once(src, '''"""OpInfos of the fp8 ops ``moe_ops.quantize_fp8``, ``moe_ops.dequantize_fp8``,
``moe_ops.scaled_grouped_mm`` and ``moe_ops.swizzle_mx_scale``.''', '''"""OpInfos of ``torch.ops.aten._quantize_fp8``,
``_dequantize_fp8``, ``_scaled_grouped_mm`` and ``_swizzle_mx_scale``.''', FP8_OPINFO)
    src = rewrite.replace_once(src, "from __future__ import annotations\n\n", "", FP8_OPINFO)
    src = rewrite.replace_once(src, "from functools import partial\n",
                               "from functools import partial\nfrom typing import Optional\n", FP8_OPINFO)
    # The plain-torch references (torch_moe_ops/reference.py) come along: they
    # are the OpInfos' refs.
    src = rewrite.replace_once(
        src, "\nfrom torch_moe_ops.reference import (\n    FP8_RECIPES,\n    torch_dequantize_fp8,\n"
             "    torch_quantize_fp8,\n    torch_scaled_grouped_mm,\n    torch_swizzle_mx_scale,\n)\n",
        "\n\n" + references + "\n\n", FP8_OPINFO)
    return rewrite.replace_once(
        src, 'op_db = make_fp8_op_db(lambda op: f"moe_ops.{op}", lambda op: getattr(torch.ops.moe_ops, op).default)',
        'op_db = make_fp8_op_db(lambda op: f"_{op}", lambda op: getattr(torch.ops.aten, f"_{op}").default)',
        FP8_OPINFO)


def make_strategy(upstream: str | None, strategy_src: str) -> str:
    src = rewrite.replace_once(
        strategy_src,
        "The patch series turns this module into upstream's strategy for\n"
        "``aten._grouped_mm`` (patches/manifest.py rewrites the op and the names of the\n"
        "checks), so it is written against DTensor's own registry and helpers only.\n\n",
        "", STRATEGY)
    src = rewrite.replace_once(src, "torch.ops.moe_ops.grouped_mm.default", "torch.ops.aten._grouped_mm.default",
                               STRATEGY)
    src, used = rewrite.rename(src, STRATEGY, CHECK_NAMES, module_alias="_checks")
    src = rewrite.replace_once(src, "\nfrom torch_moe_ops import _checks\n", "", STRATEGY)
    # Upstream, the checks are the meta function's helpers (compile series).
    imports = "".join(f"    {name},\n" for name in sorted(used))
    return rewrite.replace_once(src, "import torch\n",
                                f"import torch\nfrom torch._meta_registrations import (\n{imports})\n", STRATEGY)


def make_opinfo(upstream: str | None, opinfo_src: str, reference_src: str) -> str:
    reference = rewrite.definitions(reference_src, REFERENCE, ["torch_grouped_mm"])
    src = "# mypy: ignore-errors\n\n" + opinfo_src
    src = rewrite.replace_once(src, '''"""OpInfo for grouped_mm, usable for ``moe_ops.grouped_mm`` and, through the
upstream patch series, for ``torch._grouped_mm``.''', '"""OpInfo for ``torch._grouped_mm``.', OPINFO)
    src = rewrite.replace_once(src, "from functools import partial\n",
                               "from functools import partial\nfrom typing import Optional\n", OPINFO)
    src = rewrite.replace_once(src, "\nfrom torch_moe_ops.reference import torch_grouped_mm\n", "", OPINFO)
    # The float64 loop reference (torch_moe_ops/reference.py) comes along: it
    # is the OpInfo's ref.
    src = rewrite.replace_once(src, "\n\ndef reference_grouped_mm(", "\n\n" + reference + "\n\ndef reference_grouped_mm(",
                               OPINFO)
    return rewrite.replace_once(
        src, 'make_grouped_mm_opinfo("moe_ops.grouped_mm", torch.ops.moe_ops.grouped_mm.default)',
        'make_grouped_mm_opinfo("_grouped_mm", torch._grouped_mm)', OPINFO)


ROUTING_OPINFO = "test/opinfo_routing.py"


def make_routing_opinfo(upstream: str | None, opinfo_src: str, reference_src: str) -> str:
    references = rewrite.definitions(reference_src, REFERENCE,
                                     ["_routing_acc", "torch_router_topk", "torch_permute", "torch_unpermute"])
    src = "# mypy: ignore-errors\n\n" + opinfo_src
    src = rewrite.replace_once(src, '''"""OpInfos of the routing ops, usable for ``moe_ops.router_topk``,
``moe_ops.permute`` and ``moe_ops.unpermute`` and, through the upstream patch
series, for ``torch.ops.aten._moe_router_topk``, ``_moe_permute`` and
``_moe_unpermute``.''', '''"""OpInfos of ``torch.ops.aten._moe_router_topk``, ``_moe_permute`` and
``_moe_unpermute``.''', ROUTING_OPINFO)
    src = rewrite.replace_once(src, "from __future__ import annotations\n\n", "", ROUTING_OPINFO)
    src = rewrite.replace_once(src, "from functools import partial\n",
                               "from functools import partial\nfrom typing import Optional\n", ROUTING_OPINFO)
    # The plain-torch references (torch_moe_ops/reference.py) come along: they
    # are the OpInfos' refs.
    src = rewrite.replace_once(
        src, "\nfrom torch_moe_ops.reference import torch_permute, torch_router_topk, torch_unpermute\n\n",
        "\n\n" + references + "\n\n", ROUTING_OPINFO)
    return rewrite.replace_once(
        src, 'op_db = make_routing_op_db(lambda op: f"moe_ops.{op}", lambda op: getattr(torch.ops.moe_ops, op).default)',
        'op_db = make_routing_op_db(lambda op: f"_moe_{op}", lambda op: getattr(torch.ops.aten, f"_moe_{op}").default)',
        ROUTING_OPINFO)


MATRIX_OPS = "torch/distributed/tensor/_ops/_matrix_ops.py"


def remove_single_dim_strategy(upstream: str) -> str:
    """Drops the single-dim strategy of _grouped_mm (it takes precedence over op
    strategies) and the imports only it used."""
    text = rewrite.replace_definitions(upstream, MATRIX_OPS,
                                       ["_valid_grouped_mm_strides", "grouped_mm_single_dim_strategy"], "")
    for old, new in [
        ("from torch.distributed.device_mesh import DeviceMesh\n", ""),
        ("from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta\n",
         "from torch.distributed.tensor._dtensor_spec import TensorMeta\n"),
        ("from torch.distributed.tensor._utils import (\n"
         "    compute_local_shape_and_global_offset,\n"
         "    compute_local_stride,\n"
         ")\n", ""),
    ]:
        text = rewrite.replace_once(text, old, new, MATRIX_OPS)
    return text



ROUTING_NATIVE_FUNCTIONS = """\
- func: _moe_router_topk(Tensor logits, int k, str score_func="softmax", Tensor? bias=None, int n_group=1, int topk_group=1, bool renormalize=False, float scaling_factor=1.0) -> (Tensor weights, Tensor expert_ids, Tensor counts)
  variants: function
  dispatch:
    CPU: moe_router_topk_cpu
    CUDA: moe_router_topk_cuda

- func: _moe_permute(Tensor tokens, Tensor expert_ids, int num_experts, int alignment=1, int first_expert=0, int? num_local_experts=None) -> (Tensor permuted, Tensor dst_rows, Tensor src_rows, Tensor offs)
  variants: function
  dispatch:
    CPU: moe_permute_cpu
    CUDA: moe_permute_cuda

- func: _moe_unpermute(Tensor permuted, Tensor dst_rows, Tensor? weights=None) -> Tensor
  variants: function
  dispatch:
    CPU: moe_unpermute_cpu
    CUDA: moe_unpermute_cuda

- func: _moe_unpermute_backward(Tensor grad_output, Tensor dst_rows, SymInt num_rows, Tensor? weights=None, Tensor? permuted=None) -> (Tensor grad_permuted, Tensor grad_weights)
  variants: function
  dispatch:
    CPU: moe_unpermute_backward_cpu
    CUDA: moe_unpermute_backward_cuda
"""

ROUTING_DERIVATIVES = """\
- name: _moe_router_topk(Tensor logits, int k, str score_func="softmax", Tensor? bias=None, int n_group=1, int topk_group=1, bool renormalize=False, float scaling_factor=1.0) -> (Tensor weights, Tensor expert_ids, Tensor counts)
  output_differentiability: [True, False, False]
  logits: moe_router_topk_backward(grad, logits, expert_ids, score_func, renormalize, scaling_factor)
  bias: non_differentiable

- name: _moe_permute(Tensor tokens, Tensor expert_ids, int num_experts, int alignment=1, int first_expert=0, int? num_local_experts=None) -> (Tensor permuted, Tensor dst_rows, Tensor src_rows, Tensor offs)
  output_differentiability: [True, False, False, False]
  tokens: at::_moe_unpermute(grad, dst_rows)
  expert_ids: non_differentiable

- name: _moe_unpermute(Tensor permuted, Tensor dst_rows, Tensor? weights=None) -> Tensor
  permuted, weights: _moe_unpermute_backward_symint(grad, dst_rows, permuted.sym_size(0), weights, wrap_opt_if(permuted, grad_input_mask[1]))
  dst_rows: non_differentiable

"""

FP8_NATIVE_FUNCTIONS = """\
- func: _quantize_fp8(Tensor x, str recipe, ScalarType? float8_dtype=None, Tensor? offs=None, bool swizzle=False) -> (Tensor data, Tensor scale)
  variants: function
  dispatch:
    CPU: quantize_fp8_cpu
    CUDA: quantize_fp8_cuda

- func: _dequantize_fp8(Tensor data, Tensor scale, str recipe, ScalarType? out_dtype=None, Tensor? offs=None, bool swizzle=False) -> Tensor
  variants: function
  dispatch:
    CPU: dequantize_fp8_cpu
    CUDA: dequantize_fp8_cuda

- func: _swizzle_mx_scale(Tensor scale, Tensor offs, int dim) -> Tensor
  variants: function
  dispatch:
    CPU, CUDA: swizzle_mx_scale
"""

# ---------------------------------------------------------------------------
# The series.

NATIVE = "aten/src/ATen/native"

SERIES = [
    Series("core", [
        Patch(
            title="[ATen] _grouped_mm: CPU kernel with bias, fp32 output and checked offs",
            summary="""\
On CPU, _grouped_mm was a CompositeExplicitAutograd loop of mm: it never
validated offs, rejected bias and an fp32 out_dtype, and left the rows (2D x 3D)
or columns (3D x 2D) that no group covers uninitialised.

This adds a CPU kernel, at::native::grouped_mm_cpu, and the checks every
backend shares (ATen/native/GroupedMM.h):
- all four layouts (2D x 3D, 3D x 2D, 2D x 2D, 3D x 3D), operands of any
  strides including 0 (expanded gradients);
- float32, float16, bfloat16 and float64; out_dtype=float32 for 16-bit inputs;
- bias of shape (G, N_out), in the input or the output dtype;
- offs validated (non-decreasing, non-negative, within the grouped dimension);
  uncovered output elements are zero;
- every error is a ValueError naming the argument and the value received.
- large outputs (a weight gradient is hundreds of MB) ask for transparent huge
  pages before the first touch: page faults otherwise cost more than the GEMM.

GroupedMM.{h,cpp,cu} also carry grouped_mm_gather, the same kernels with the
grouped dimension read through an int64 index (-1 reads zeros), which lets an
MoE layer run its expert GEMMs and their weight gradients straight from the
unsorted tokens. Its schema (_grouped_mm_gather), meta function and OpInfo are
left to a follow-up; until then those functions are compiled, not registered.

Dispatch: CPU now points at grouped_mm_cpu. CompositeExplicitAutograd stays for
the other backends. CUDA stays at _grouped_mm_cuda on purpose: the CUDA entry
carried here (cuda/GroupedMM.cu, grouped_mm_cuda) routes its fast path to
aten::_grouped_mm itself, so registering it as the CUDA kernel would recurse.
It is compiled (ATen globs native/cuda) so that it builds in CI, and becomes the
CUDA kernel in a follow-up that gives it kernels of its own.

The files are those of torch-moe-ops (torch_moe_ops/csrc/ATen/native), where
the same kernel is registered as moe_ops::grouped_mm. ATen globs native/,
native/cpu and native/cuda, so no build file changes.""",
            test_plan="""\
In torch-moe-ops (test/test_grouped_mm.py): the OpInfo samples (every layout,
empty groups, zero tokens, rows past offs[-1], transposed and strided
operands, bias, fp32 output) against a float64 loop reference, the error
inputs, and hypothesis-generated shapes.
Here: python test/test_ops.py -k _grouped_mm (OpInfo added later in this stack);
torchgen parses the patched native_functions.yaml.""",
            changes=[
                Copy(f"{NATIVE}/GroupedMM.h", "torch_moe_ops/csrc/ATen/native/GroupedMM.h"),
                Copy(f"{NATIVE}/GroupedMM.cpp", "torch_moe_ops/csrc/ATen/native/GroupedMM.cpp"),
                Copy(f"{NATIVE}/cpu/GroupedMMKernel.cpp", "torch_moe_ops/csrc/ATen/native/cpu/GroupedMMKernel.cpp"),
                Copy(f"{NATIVE}/cpu/MoEAvx512Utils.h", "torch_moe_ops/csrc/ATen/native/cpu/MoEAvx512Utils.h"),
                Copy(f"{NATIVE}/cpu/MoEHugePages.h", "torch_moe_ops/csrc/ATen/native/cpu/MoEHugePages.h"),
                Copy(f"{NATIVE}/cuda/GroupedMM.cu", "torch_moe_ops/csrc/ATen/native/cuda/GroupedMM.cu"),
                Copy(f"{NATIVE}/cuda/GroupedMM.cuh", "torch_moe_ops/csrc/ATen/native/cuda/GroupedMM.cuh"),
                Copy(f"{NATIVE}/cuda/MoEThreadPos.cuh", "torch_moe_ops/csrc/ATen/native/cuda/MoEThreadPos.cuh"),
                Edit(f"{NATIVE}/native_functions.yaml", [(
                    "  dispatch:\n"
                    "    CompositeExplicitAutograd: _grouped_mm\n"
                    "    CUDA: _grouped_mm_cuda\n",
                    "  dispatch:\n"
                    "    CPU: grouped_mm_cpu\n"
                    "    CompositeExplicitAutograd: _grouped_mm\n"
                    "    CUDA: _grouped_mm_cuda\n",
                )]),
            ],
        ),
        Patch(
            title="[autograd] _grouped_mm: backward for every layout, expanded gradients and bias",
            summary="""\
The backward of a grouped mm is grouped mms in the other layouts, for all four
layouts alike:
  grad_mat_a = _grouped_mm(grad, mat2^T, offs)
  grad_mat_b = _grouped_mm(self^T, grad, offs)
(for a mat2 stored (G, N, K) and passed transposed, grad_mat_b is computed as
(grad^T self)^T, in mat2's own layout, as _grouped_mm_mat2_backward did).
grad is cast to the input dtype (it is float32 when out_dtype=float32) and made
contiguous: x.sum().backward() hands an expanded, stride-0 gradient, which the
CUDA kernel rejects; for the usual contiguous gradient this is a no-op.

bias gets a gradient too: per-group sums of grad, accumulated in fp32 (fp64 for
fp64) in a fixed order, returned in grad's dtype: a bias in the input dtype
gets its gradient cast by autograd, as for any input, so nothing of bias is
saved.

The helpers live in a new header, torch/csrc/autograd/GroupedMMBackward.h,
included by the generated Functions.cpp; it is header-only, so no build file
changes. They also turn the undefined tensor that the generated code unpacks
for an absent offs back into nullopt, which is how the kernels tell the
layouts apart.

The formulas are those of torch-moe-ops' Python autograd for moe_ops::grouped_mm
(torch_moe_ops/ops/grouped_mm.py).""",
            test_plan="""\
In torch-moe-ops: gradcheck/gradgradcheck through the OpInfo samples, and
x.sum().backward() for every layout.
Here: gen_autograd generates GroupedMmBackward0 with the three formulas;
python test/test_ops.py -k _grouped_mm (OpInfo added later in this stack).""",
            changes=[
                Copy("torch/csrc/autograd/GroupedMMBackward.h", "patches/src/torch/csrc/autograd/GroupedMMBackward.h"),
                Edit("tools/autograd/templates/Functions.cpp", [(
                    '#include "torch/csrc/autograd/FunctionsManual.h"\n',
                    '#include "torch/csrc/autograd/FunctionsManual.h"\n'
                    '#include "torch/csrc/autograd/GroupedMMBackward.h"\n',
                )]),
                Edit("tools/autograd/derivatives.yaml", [(
                    "  self: _grouped_mm_mat1_backward(grad, mat2, self.sym_sizes(), self.sym_strides(), "
                    "self.layout(), offs, 1)\n"
                    "  mat2: _grouped_mm_mat2_backward(grad, self, mat2.sym_sizes(), mat2.sym_strides(), "
                    "mat2.layout(), offs, 1)\n",
                    "  self: grouped_mm_mat_a_backward(grad, mat2, offs, self.scalar_type())\n"
                    "  mat2: grouped_mm_mat_b_backward(grad, self, mat2, offs, self.scalar_type())\n"
                    "  bias: grouped_mm_bias_backward(grad, self, mat2, offs)\n",
                )]),
            ],
        ),
        Patch(
            title="[ATen] MoE routing ops: _moe_router_topk, _moe_permute, _moe_unpermute",
            summary="""\
Around every grouped GEMM an MoE layer routes tokens, sorts them by expert,
pads groups to kernel alignment and scatters the results back with routing
weights. Today that is argsort + histc + index_select + index_add_: several
passes over the token rows, host syncs, and crash-prone edge cases. These ops
make each step one call:

- _moe_router_topk(logits, k, score_func, bias, n_group, topk_group,
  renormalize, scaling_factor) -> (weights, expert_ids, counts): softmax or
  sigmoid scores (or softmax over the k chosen), top-k with ties to the lowest
  expert id, DeepSeek-V3 grouped top-k, a selection-only score bias
  (aux-loss-free balancing), renormalisation and scaling;
- _moe_permute(tokens, expert_ids, num_experts, alignment, first_expert,
  num_local_experts) -> (permuted, dst_rows, src_rows, offs): a stable
  counting sort of the (token, slot) rows by expert, groups aligned to a power
  of two with zeroed padding, a local expert range for expert parallelism, and
  int32 group ends ready for _grouped_mm. Output shapes depend on input shapes
  only, so nothing syncs with the host;
- _moe_unpermute(permuted, dst_rows, weights) -> out: the weighted sum of each
  token's k rows, accumulated in fp32 in slot order (deterministic, no
  atomics), and its backward _moe_unpermute_backward.

Every bad input raises a ValueError naming the argument and the value.
Indexing is int64 throughout. The CPU kernels are vectorised (AVX-512 router
with a run-time CPU check) and parallel over tokens; results do not depend on
the thread count. The CUDA kernels are compiled here but have not run on a GPU.

The files are those of torch-moe-ops (torch_moe_ops/csrc/ATen/native), where
the same kernels are registered as moe_ops::router_topk, permute and unpermute.""",
            test_plan="""\
In torch-moe-ops (test/test_routing.py): OpInfos for the three ops against
plain-torch references (ids, counts, permuted rows and unpermute bitwise;
weights to float32 rounding), hypothesis over tokens (including 0), widths,
experts, k, alignment and skewed routing, opcheck, gradcheck, compile with
fullgraph=True and dynamic=True; benchmarks/bench_routing.py.
Here: torchgen parses the patched native_functions.yaml.""",
            changes=[
                Copy(f"{NATIVE}/MoERouting.h", "torch_moe_ops/csrc/ATen/native/MoERouting.h"),
                Copy(f"{NATIVE}/MoERouting.cpp", "torch_moe_ops/csrc/ATen/native/MoERouting.cpp"),
                Copy(f"{NATIVE}/cpu/MoERoutingKernel.cpp", "torch_moe_ops/csrc/ATen/native/cpu/MoERoutingKernel.cpp"),
                Copy(f"{NATIVE}/cuda/MoERouting.cu", "torch_moe_ops/csrc/ATen/native/cuda/MoERouting.cu"),
                Copy(f"{NATIVE}/cuda/MoERouting.cuh", "torch_moe_ops/csrc/ATen/native/cuda/MoERouting.cuh"),
                Edit(f"{NATIVE}/native_functions.yaml", [(
                    "    CPU: grouped_mm_cpu\n"
                    "    CompositeExplicitAutograd: _grouped_mm\n"
                    "    CUDA: _grouped_mm_cuda\n",
                    "    CPU: grouped_mm_cpu\n"
                    "    CompositeExplicitAutograd: _grouped_mm\n"
                    "    CUDA: _grouped_mm_cuda\n\n" + ROUTING_NATIVE_FUNCTIONS,
                )]),
            ],
        ),
        Patch(
            title="[autograd] MoE routing ops: derivatives of _moe_router_topk, _moe_permute, _moe_unpermute",
            summary="""\
- _moe_router_topk: the gradient flows to the logits through the weights;
  with the expert ids fixed (selection is piecewise constant) the weights are
  score(logits) gathered, renormalised and scaled, and the formula is that
  chain rule (torch/csrc/autograd/MoERoutingBackward.h, header-only). The
  selection bias gets none: it never reaches the weights.
- _moe_permute: each token's gradient is the sum of its k rows' gradients,
  which is _moe_unpermute without weights.
- _moe_unpermute: _moe_unpermute_backward gives the gradient of the rows (the
  weighted gradient of their token) and of the weights (the dot product of
  each row with its token's gradient); the rows are saved only when the
  weights need a gradient.

The formulas are those of torch-moe-ops' Python autograd
(torch_moe_ops/ops/routing.py).""",
            test_plan="""\
In torch-moe-ops: gradcheck through the OpInfo samples of the three ops.
Here: gen_autograd generates MoeRouterTopkBackward0, MoePermuteBackward0 and
MoeUnpermuteBackward0 with these formulas.""",
            changes=[
                Copy("torch/csrc/autograd/MoERoutingBackward.h", "patches/src/torch/csrc/autograd/MoERoutingBackward.h"),
                Edit("tools/autograd/templates/Functions.cpp", [(
                    '#include "torch/csrc/autograd/GroupedMMBackward.h"\n',
                    '#include "torch/csrc/autograd/GroupedMMBackward.h"\n'
                    '#include "torch/csrc/autograd/MoERoutingBackward.h"\n',
                )]),
                Edit("tools/autograd/derivatives.yaml", [(
                    "- name: mode(Tensor self, int dim=-1, bool keepdim=False) -> (Tensor values, Tensor indices)\n",
                    ROUTING_DERIVATIVES
                    + "- name: mode(Tensor self, int dim=-1, bool keepdim=False) -> (Tensor values, Tensor indices)\n",
                )]),
            ],
        ),
        Patch(
            title="[ATen] fp8 quantisation: _quantize_fp8, _dequantize_fp8, _swizzle_mx_scale",
            summary="""\
_scaled_mm and _scaled_grouped_mm take float8 operands and scales, but ATen has
no op that produces them: every user writes the amax/scale/clamp/cast by hand,
and the MX scale layouts (e8m0 dtype, the blocked "swizzled" layout the CUDA
kernels read) are a frequent source of errors. These ops quantise and
dequantise for the recipes torch's scaled GEMMs accept:

- _quantize_fp8(x, recipe, float8_dtype, offs, swizzle) -> (data, scale) with
  recipe tensorwise, rowwise, blockwise_1x128, blockwise_128x128 (DeepSeek-V3)
  or mx (1x32 blocks, float8_e8m0fnu scales, OCP MX with floor rounding of
  the scale exponent); float8_e4m3fn (default) or float8_e5m2 data; scale is
  the dequantisation scale, in the shape the scaled GEMMs take (rowwise:
  (M,) for A, (G, N) for a (G, K, N) weight quantised through its transpose);
  swizzle=True writes MX scales in the blocked 32_4_4 layout upstream's
  CUDA MX kernels read;
- offs gives per-group operands of the 2D x 2D (weight-gradient) layout:
  groups along the contraction dimension, one scale per row and group, so
  that no block straddles two groups;
- _dequantize_fp8(data, scale, recipe, out_dtype, offs, swizzle) -> the
  inverse, in float32, bfloat16 or float16;
- _swizzle_mx_scale(scale, offs, dim) -> the MX scales of a 2-D grouped
  operand in the layout the CUDA MX grouped GEMMs read for 2-D operands:
  each group's part of the grid blocked on its own, groups one after the
  other (groups of rows, dim=0, for the 2D x 3D forward; along K, dim=1, for
  the 2D x 2D weight gradient), in a shape bounded by the arguments' shapes
  (no host sync).

Numerics (ATen/native/MoEQuantize.h): float32 amax per block, saturation to
the format's max, round to nearest even; a block holding NaN or inf
dequantises to NaN. The CPU kernel is AVX-512 with a run-time CPU check and a
scalar fallback that give the same bytes, parallel over rows, bitwise
independent of the thread count. Every bad input raises a ValueError naming
the argument and the value.

Dispatch: CPU, and CUDA through device-generic ATen code
(native/cuda/MoEQuantize.cpp: block amax, float32 division, multiply, clamp,
c10's float -> float8 conversion, which is the same function on host and
device), so the CUDA path gives the CPU kernel's bytes; offs is validated on
the device with _assert_async, no host sync. It costs a float32 copy of x and
a few passes where a fused kernel would read x twice: a fused Triton/CUDA
kernel is the follow-up, with a GPU to measure it on.

The files are those of torch-moe-ops (torch_moe_ops/csrc/ATen/native), where
the same kernels are registered as moe_ops::quantize_fp8 and dequantize_fp8.""",
            test_plan="""\
In torch-moe-ops (test/test_fp8.py): OpInfos for both ops against plain-torch
references that round with torch's own float -> float8 conversion, compared
bit for bit (data and scale bytes) on every recipe, both formats, 2-D and
3-D operands, partial blocks, zero sizes, transposed weights, swizzled MX
scales and per-group operands; hypothesis over shapes, dtypes, magnitudes and
NaN/inf/zero inputs; rounding checked against torch's conversion on every
float8 value and midpoint; e8m0 edge cases (zero blocks, inf/NaN, denormals,
saturation) against hand-computed bytes; opcheck and torch.compile with
fullgraph=True, dynamic=True. The CUDA functions run there on CPU tensors
(called through the dispatcher's CUDA slot) and give the CPU kernel's bytes
on every OpInfo sample and on hypothesis-drawn problems.
Here: torchgen parses the patched native_functions.yaml.""",
            changes=[
                Copy(f"{NATIVE}/MoEQuantize.h", "torch_moe_ops/csrc/ATen/native/MoEQuantize.h"),
                Copy(f"{NATIVE}/MoEQuantize.cpp", "torch_moe_ops/csrc/ATen/native/MoEQuantize.cpp"),
                Copy(f"{NATIVE}/cpu/MoEQuantizeKernel.cpp", "torch_moe_ops/csrc/ATen/native/cpu/MoEQuantizeKernel.cpp"),
                Copy(f"{NATIVE}/cpu/MoEFp8Utils.h", "torch_moe_ops/csrc/ATen/native/cpu/MoEFp8Utils.h"),
                Copy(f"{NATIVE}/cuda/MoEQuantize.cpp", "torch_moe_ops/csrc/ATen/native/cuda/MoEQuantize.cpp"),
                Edit(f"{NATIVE}/native_functions.yaml", [(
                    "    CPU: moe_unpermute_backward_cpu\n"
                    "    CUDA: moe_unpermute_backward_cuda\n",
                    "    CPU: moe_unpermute_backward_cpu\n"
                    "    CUDA: moe_unpermute_backward_cuda\n\n" + FP8_NATIVE_FUNCTIONS,
                )]),
            ],
        ),
        Patch(
            title="[ATen] _scaled_grouped_mm: CPU kernel for rowwise, blockwise and MX scaling",
            summary="""\
_scaled_grouped_mm runs only on CUDA (sm_90/sm_100), so an fp8 MoE cannot be
tested, debugged or run on a CPU at all. This adds a CPU kernel,
at::native::scaled_grouped_mm_cpu, with the checks it needs in
ATen/native/MoEScaledGroupedMM.h:

- the four layouts of _grouped_mm (2D x 3D, 3D x 3D, 3D x 2D, 2D x 2D), with
  float8_e4m3fn or float8_e5m2 operands of any strides (upstream's row-major
  A / column-major B included);
- rowwise float32 scales in upstream's shapes (scale_a (M,) / (G, M) /
  (G * M,), scale_b (G, N) / (N,) / (G * N,)); for 2D x 3D and 3D x 3D also
  DeepSeek-V3's blockwise float32 scales (1x128 blocks of A, 128x128 blocks
  of the (N, K) weight); MX float8_e8m0fnu scales (1x32 along K) for 2D x 3D,
  3D x 3D and 2D x 2D (the weight gradient, token groups of whole blocks) in
  the layouts the CUDA kernels take: a 3-D operand's plain (G, rows, S) grid or
  its swizzled (G, round_up(rows, 128) * round_up(S, 4)) form, a 2-D
  operand's per-group blocked layout (_swizzle_mx_scale; any 2-D shape with
  at least `rows` rows that holds the groups' bytes, checked against offs's
  values);
- out_dtype bfloat16 (default) or float32, bias (G, N) in float32 or
  out_dtype; scale_result must be None; use_fast_accum is ignored (float32
  accumulation always);
- every error is a ValueError naming the argument and the value.

The kernel processes groups in chunks: float8 operands are widened to
bfloat16 tiles (exact; AVX-512 integer code, a table elsewhere; MX scales,
powers of two, folded in) or, for blockwise scales, float32 tiles with the
scale applied, multiplied by the _grouped_mm CPU kernel of this stack into a
float32 accumulator; the epilogue applies the rowwise scales and the bias
and rounds once. Working memory is one chunk (16M tile elements, kept
across calls), not a dequantised copy of the operands. On a 2-core Zen 4 the
rowwise path runs at 0.56-0.73x the bfloat16 _grouped_mm rate on the expert
up-projection of Qwen3-MoE, OLMoE, DeepSeek-V3 and Mixtral shapes.

Dispatch: CPU added beside CUDA. The meta function still states the CUDA
constraints (e4m3 only, strides); the compile series gives it a CPU branch
with this kernel's checks.

cuda/MoEScaledGroupedMM.cpp carries scaled_grouped_mm_cuda, which runs the
cases upstream's CUDA kernels reject (MX and blockwise scales on sm_90, e5m2,
bias, float32 out, other strides) as their definition: _dequantize_fp8 of the
operands (exact to bfloat16 for rowwise and MX), grouped_mm in float32, the
rowwise scales and bias on the float32 product, rounded once. It is compiled
here, not registered: it routes the supported cases to aten::_scaled_grouped_mm
itself, so as the CUDA kernel it would recurse; it becomes the fallback of
_scaled_grouped_mm_cuda in a follow-up that edits ScaledBlas.cpp.""",
            test_plan="""\
In torch-moe-ops (test/test_fp8.py): OpInfo samples (every layout, both
recipes and formats, empty groups, rows past offs[-1], both weight storage
orders, bias, both output dtypes) and hypothesis-generated problems against a
float64 dequantise-then-matmul reference, within a bound derived from float32
summation; equality with _grouped_mm of the dequantised operands; error inputs
for every wrong scale shape and dtype; opcheck; torch.compile. The fallback of
cuda/MoEScaledGroupedMM.cpp runs there on CPU tensors (through the
dispatcher's CUDA slot of moe_ops::scaled_grouped_mm) on the same samples.
Here: torchgen parses the patched native_functions.yaml.""",
            changes=[
                Copy(f"{NATIVE}/MoEScaledGroupedMM.h", "torch_moe_ops/csrc/ATen/native/MoEScaledGroupedMM.h"),
                Copy(f"{NATIVE}/MoEScaledGroupedMM.cpp", "torch_moe_ops/csrc/ATen/native/MoEScaledGroupedMM.cpp"),
                Copy(f"{NATIVE}/cpu/MoEScaledGroupedMMKernel.cpp",
                     "torch_moe_ops/csrc/ATen/native/cpu/MoEScaledGroupedMMKernel.cpp"),
                Copy(f"{NATIVE}/cuda/MoEScaledGroupedMM.cpp",
                     "torch_moe_ops/csrc/ATen/native/cuda/MoEScaledGroupedMM.cpp"),
                Edit(f"{NATIVE}/native_functions.yaml", [(
                    "  dispatch:\n"
                    "    CUDA: _scaled_grouped_mm_cuda\n"
                    "  tags: needs_exact_strides\n",
                    "  dispatch:\n"
                    "    CPU: scaled_grouped_mm_cpu\n"
                    "    CUDA: _scaled_grouped_mm_cuda\n"
                    "  tags: needs_exact_strides\n",
                )]),
            ],
        ),
    ]),
    Series("compile", [
        Patch(
            title="[meta] _grouped_mm: the eager checks, dtypes and strides",
            summary="""\
The meta function of _grouped_mm rejected float32/float16 inputs that eager
accepts (so torch.compile failed on them), bias and out_dtype=float32, and
never checked what the kernels check.

It now restates grouped_mm_check_inputs of ATen/native/GroupedMM.h one for one,
with the same messages, and allocates the output as the kernels do: contiguous
on CPU, last dimension padded to 16 bytes on CUDA.

The code is generated from torch-moe-ops' fake kernel for moe_ops::grouped_mm
(torch_moe_ops/_checks.py and torch_moe_ops/ops/grouped_mm.py), with names
made private to this module.""",
            test_plan="""\
In torch-moe-ops: this very function, run on every OpInfo sample and layout,
agrees with the CPU kernel in shape, strides and dtype, and raises on every
error input with the kernel's message; torch.compile(fullgraph=True) tests.
Here: python test/test_ops.py -k "_grouped_mm and (meta or fake)";
python test/inductor/test_torchinductor_opinfo.py -k _grouped_mm.""",
            changes=[Generate("torch/_meta_registrations.py", [CHECKS, FAKE], make_meta)],
        ),
        Patch(
            title="[meta] MoE routing ops: meta functions of _moe_router_topk, _moe_permute, _moe_unpermute",
            summary="""\
Meta functions for the routing ops of the core stack, so that they trace under
torch.compile with fake tensors. Every output shape is a function of the input
shapes only (_moe_permute sizes its output for the worst case: T * k rows plus
the alignment padding of every local expert), so a compiled MoE layer needs no
host sync and no graph break.

They restate the checks of ATen/native/MoERouting.h one for one, with the same
messages, and are generated from torch-moe-ops' fake kernels
(torch_moe_ops/_checks.py and torch_moe_ops/ops/routing.py).""",
            test_plan="""\
In torch-moe-ops: these very functions agree with the CPU kernels in shape,
strides and dtype on every routing OpInfo sample, and raise the kernels'
errors; the ops compile with fullgraph=True, dynamic=True and no recompile
across token counts.
Here: python test/test_ops.py -k "_moe_ and (meta or fake)".""",
            changes=[Generate("torch/_meta_registrations.py", [CHECKS, ROUTING_FAKE], make_routing_meta)],
        ),
        Patch(
            title="[OpInfo] Add an OpInfo for _grouped_mm",
            summary="""\
_grouped_mm had no OpInfo. Its samples cover the four layouts, empty groups,
zero tokens, rows past offs[-1], transposed and non-contiguous operands, bias
and fp32 output; its error inputs cover every rejected argument; its ref is a
float64 loop of mm.

Comes last in this stack: test_ops' meta and fake tests need the meta function
of the previous patch, and the samples need the CPU kernel and backward of the
core stack.

The definition is torch-moe-ops' (test/opinfo.py), instantiated for
torch._grouped_mm.""",
            test_plan="""\
python test/test_ops.py -k _grouped_mm
In torch-moe-ops the same OpInfo runs against moe_ops::grouped_mm.""",
            changes=[
                Generate("torch/testing/_internal/opinfo/definitions/grouped_mm.py", [OPINFO, REFERENCE], make_opinfo),
                Edit("torch/testing/_internal/opinfo/definitions/__init__.py", [
                    ("    fft,\n    linalg,\n", "    fft,\n    grouped_mm,\n    linalg,\n"),
                    ("    *fft.op_db,\n    *linalg.op_db,\n", "    *fft.op_db,\n    *grouped_mm.op_db,\n    *linalg.op_db,\n"),
                ]),
            ],
        ),
        Patch(
            title="[OpInfo] Add OpInfos for _moe_router_topk, _moe_permute, _moe_unpermute",
            summary="""\
OpInfos for the routing ops of the core stack. Samples: logits on a grid so
that ties occur (broken by the lower expert id), DeepSeek-V3 grouped top-k
with a selection bias, gpt-oss softmax after top-k, zero tokens, strided
inputs; routing with empty experts and all tokens on one expert, alignment
padding, a local expert range with dropped ids; weighted and unweighted
combine. Error inputs cover every rejected argument. The refs are plain-torch
implementations of the contracts (stable sorts for the tie rule).

The definitions are torch-moe-ops' (test/opinfo_routing.py), instantiated for
the aten ops.""",
            test_plan="""\
python test/test_ops.py -k _moe_
In torch-moe-ops the same OpInfos run against the moe_ops kernels.""",
            changes=[
                Generate("torch/testing/_internal/opinfo/definitions/moe_routing.py", [ROUTING_OPINFO, REFERENCE],
                         make_routing_opinfo),
                Edit("torch/testing/_internal/opinfo/definitions/__init__.py", [
                    ("    linalg,\n    signal,\n", "    linalg,\n    moe_routing,\n    signal,\n"),
                    ("    *linalg.op_db,\n    *signal.op_db,\n", "    *linalg.op_db,\n    *moe_routing.op_db,\n    *signal.op_db,\n"),
                ]),
            ],
        ),
        Patch(
            title="[meta] fp8 ops: meta functions of the quantisation ops, _scaled_grouped_mm on CPU",
            summary="""\
Meta functions for the fp8 quantisation ops of the core stack (_quantize_fp8,
_dequantize_fp8, _swizzle_mx_scale), so that they trace under torch.compile
with fake tensors: output shapes and dtypes are functions of the arguments
(the scale shape of each recipe, swizzled or not, per group with offs), and
every check of ATen/native/MoEQuantize.h is restated with the same message.

_scaled_grouped_mm's meta function states what the CUDA kernels accept
(e4m3 only, no bias, their strides). CPU tensors now take a branch with the
checks of the CPU kernel (ATen/native/MoEScaledGroupedMM.h: e4m3 and e5m2,
rowwise, blockwise and MX scales in every layout the kernel runs, bias,
bfloat16 or float32 out) and a contiguous output, so that what runs in eager
on CPU also compiles. The CUDA branch is unchanged.

Generated from torch-moe-ops' fake kernels (torch_moe_ops/_checks.py and
torch_moe_ops/ops/fp8.py), with names made private to this module.""",
            test_plan="""\
In torch-moe-ops: these very functions agree with the CPU kernels in shape,
strides and dtype on every fp8 OpInfo sample, and raise the kernels' errors
on every error input that does not need tensor values; the ops compile with
fullgraph=True, dynamic=True.
Here: python test/test_ops.py -k "(_quantize_fp8 or _dequantize_fp8 or _scaled_grouped_mm or _swizzle_mx_scale)
and (meta or fake)".""",
            changes=[Generate("torch/_meta_registrations.py", [CHECKS, FP8_FAKE], make_fp8_meta)],
        ),
        Patch(
            title="[OpInfo] Add OpInfos for the fp8 ops",
            summary="""\
OpInfos for the fp8 ops. quantize/dequantize samples: every recipe on 2-D
and 3-D operands, partial blocks, zero rows and columns, a transposed weight
quantised per output column, both float8 formats, swizzled MX scales, and
per-group operands with empty groups and columns past offs[-1], with values
spanning 40 binades. _scaled_grouped_mm samples: the four layouts with rowwise
scales, 2D x 3D and 3D x 3D with MX and blockwise scales, 2D x 2D with MX,
empty groups, rows past offs[-1], both weight storage orders, bias, both
output dtypes. _swizzle_mx_scale samples: groups of rows and along K, empty
groups, groups past 128 rows, rows and columns past offs[-1], no groups.
Error inputs cover every rejected argument. The refs are plain-torch
implementations (block loops, torch's own float -> float8 conversion;
dequantise in float64 then a loop of mm).

The definitions are torch-moe-ops' (test/opinfo_fp8.py), instantiated for
the aten ops; the CPU samples need the kernels of the core stack.""",
            test_plan="""\
python test/test_ops.py -k "_quantize_fp8 or _dequantize_fp8 or _scaled_grouped_mm or _swizzle_mx_scale"
In torch-moe-ops the same OpInfos run against the moe_ops kernels (and their
CUDA entries, on CPU tensors).""",
            changes=[
                Generate("torch/testing/_internal/opinfo/definitions/fp8.py", [FP8_OPINFO, REFERENCE],
                         make_fp8_opinfo),
                Edit("torch/testing/_internal/opinfo/definitions/__init__.py", [
                    ("    fft,\n    grouped_mm,\n", "    fft,\n    fp8,\n    grouped_mm,\n"),
                    ("    *fft.op_db,\n    *grouped_mm.op_db,\n", "    *fft.op_db,\n    *fp8.op_db,\n    *grouped_mm.op_db,\n"),
                ]),
            ],
        ),
    ]),
    Series("distributed", [
        Patch(
            title="[DTensor] _grouped_mm: shard experts, N and K",
            summary="""\
Replaces the single-dim strategy of _grouped_mm in _matrix_ops.py, which
rejected bias and could not shard the experts of the batched 3D x 3D layout,
with an op strategy that offers, per mesh dimension:
- replicate everything;
- 3D x 3D: shard the expert/batch dimension G of both operands, the output and
  bias (expert parallelism: each rank runs its experts);
- shard N (mat2's last dimension) -> the output's last dimension, bias along N,
  except in 3D x 2D where offs splits N;
- shard K on both operands -> Partial output, except in 2D x 2D where offs
  splits K, and not with bias (each rank would add it).
offs is always replicated.

Inputs are validated by the meta function's checks (previous stack), so a bad
call fails in sharding propagation with the kernel's message.

Generated from torch-moe-ops' strategy for moe_ops::grouped_mm
(distributed/grouped_mm_strategy.py).""",
            test_plan="""\
In torch-moe-ops (test/distributed, fake process group, world size 4): the
placements DTensor picks for each layout, rank-local results against the
unsharded op, Partial sums against the unsharded op, and no sharding across
group boundaries.
Here: python test/distributed/tensor/test_matrix_ops.py -k grouped_mm""",
            changes=[
                Generate("torch/distributed/tensor/_ops/_grouped_mm_ops.py", [STRATEGY], make_strategy),
                Edit("torch/distributed/tensor/_ops/__init__.py", [(
                    "from ._embedding_ops import *  # noqa: F403\n",
                    "from ._embedding_ops import *  # noqa: F403\nfrom ._grouped_mm_ops import *  # noqa: F403\n",
                )]),
                Generate("torch/distributed/tensor/_ops/_matrix_ops.py", [], remove_single_dim_strategy),
            ],
        ),
    ]),
]


def check_coverage() -> None:
    """Every file under CARRIED_DIRS is the source of some change."""
    carried = {s for series in SERIES for p in series.patches for c in p.changes for s in c.sources}
    for top in CARRIED_DIRS:
        for dirpath, _, files in os.walk(os.path.join(REPO_ROOT, top)):
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(dirpath, name), REPO_ROOT)
                if rel not in carried and not any(fnmatch.fnmatch(rel, p) for p in NOT_UPSTREAMED):
                    raise PatchError(rel, None, "is in neither a change of patches/manifest.py nor its "
                                                "NOT_UPSTREAMED: decide whether it goes upstream")

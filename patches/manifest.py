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


MESSAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "messages")


@dataclass
class Patch:
    """One commit: its message (a file under patches/messages: the title, a
    blank line, the summary, and a `Test Plan:` section) and its changes."""

    message: str
    changes: list

    @property
    def text(self) -> str:
        with open(os.path.join(MESSAGES, self.message), encoding="utf-8") as f:
            return f.read()

    @property
    def title(self) -> str:
        return self.text.split("\n", 1)[0]


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
            message="core/0001-grouped-mm-cpu-kernel-with-bias-fp32-output-and.txt",
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
            message="core/0002-grouped-mm-backward-for-every-layout-expanded-gr.txt",
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
            message="core/0003-moe-routing-ops-moe-router-topk-moe-permute-moe.txt",
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
            message="core/0004-moe-routing-ops-derivatives-of-moe-router-topk-m.txt",
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
            message="core/0005-fp8-quantisation-quantize-fp8-dequantize-fp8-swi.txt",
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
            message="core/0006-scaled-grouped-mm-cpu-kernel-for-rowwise-blockwi.txt",
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
            message="compile/0001-grouped-mm-the-eager-checks-dtypes-and-strides.txt",
            changes=[Generate("torch/_meta_registrations.py", [CHECKS, FAKE], make_meta)],
        ),
        Patch(
            message="compile/0002-moe-routing-ops-meta-functions-of-moe-router-top.txt",
            changes=[Generate("torch/_meta_registrations.py", [CHECKS, ROUTING_FAKE], make_routing_meta)],
        ),
        Patch(
            message="compile/0003-add-an-opinfo-for-grouped-mm.txt",
            changes=[
                Generate("torch/testing/_internal/opinfo/definitions/grouped_mm.py", [OPINFO, REFERENCE], make_opinfo),
                Edit("torch/testing/_internal/opinfo/definitions/__init__.py", [
                    ("    fft,\n    linalg,\n", "    fft,\n    grouped_mm,\n    linalg,\n"),
                    ("    *fft.op_db,\n    *linalg.op_db,\n", "    *fft.op_db,\n    *grouped_mm.op_db,\n    *linalg.op_db,\n"),
                ]),
            ],
        ),
        Patch(
            message="compile/0004-add-opinfos-for-moe-router-topk-moe-permute-moe.txt",
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
            message="compile/0005-fp8-ops-meta-functions-of-the-quantisation-ops-s.txt",
            changes=[Generate("torch/_meta_registrations.py", [CHECKS, FP8_FAKE], make_fp8_meta)],
        ),
        Patch(
            message="compile/0006-add-opinfos-for-the-fp8-ops.txt",
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
            message="distributed/0001-grouped-mm-shard-experts-n-and-k.txt",
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

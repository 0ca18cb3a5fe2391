"""Proof that the upstream patch series (patches/) apply and work.

What the tests rebuild: the PyTorch v2.14.1 files the series touch, from the
installed wheel (patches/base.py), in a scratch git repository. Every series is
checked with ``git apply --check`` and applied with ``git am``, in order. On
the result:

* torchgen parses native_functions.yaml and derivatives.yaml and gen_autograd
  generates the backward nodes;
* the carried C++ compiles as in-tree (patches/proof.py): torchgen generates
  the ATen operator headers of the patched yaml, every carried file compiles
  against them (native/cpu/ per CPU capability, the CUDA files with the CUDA
  headers) with upstream's warnings as errors, each kernel the yaml names has
  the signature torchgen declares for it, and the autograd code generated from
  the new formulas compiles; the backward helpers agree with our Python
  autograd;
* every patched Python file compiles; aten names in the patched meta functions
  and OpInfos resolve to the ops the patched yaml generates (with their
  schemas); the patched meta function, OpInfo and DTensor strategy are run
  against this package's kernels;
* the base tree holds every upstream file the series edits, and no new file
  takes an upstream path (patches/upstream_tree.txt);
* every PR is within patches/sizes.py's LIMIT (generated expect files
  excluded), or within the ceiling OVER_LIMIT records with its reason;
* the new ops are in HasDecompTest's expect file; test/test_matmul.py, the
  upstream test file the series adds, passes against this package's kernel,
  and as each of the grouped mm stack's first two PRs leaves it, against the
  device-generic fallback those PRs compute through;
* the commit author comes from PATCH_AUTHOR (default: the fixed one);
* regenerating the series reproduces patches/ byte for byte;
* bad input to the generator fails naming the file (and line); a kernel that
  does not match the yaml, a kernel name no file defines, a misspelt aten name
  and a formula calling a misspelt op are rejected.

What only a source build of PyTorch (with a GPU for the CUDA files) can prove
is listed in patches/README.md.
"""

import ast as ast_mod
import difflib
import filecmp
import glob
import importlib.util
import io
import itertools
import os
import pathlib
import re
import shutil
import sys
import textwrap
import unittest
import unittest.mock

import pytest
import torch
import torchgen
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.opinfo.core import SampleInput
from torch.utils._pytree import tree_leaves

import torch_moe_ops
from patches import base, generate, manifest, names, proof, rewrite, sizes, upstream_tree
from patches.decomp_expect import HAS_DECOMPOSITION_EXPECT, DecompExpect
from patches.errors import PatchError

from opinfo_grouped_mm import error_inputs_grouped_mm, make_grouped_mm_opinfo, sample_inputs_grouped_mm
from opinfo_fp8 import op_db as fp8_op_db
from test_fp8 import assert_scaled_mm_close
from torch_moe_ops import native_functions
from torch_moe_ops.reference import torch_scaled_grouped_mm
from opinfo_routing import op_db as routing_op_db

PATCHES = os.path.dirname(os.path.abspath(generate.__file__))
# Series with patches (one may be empty until its first entry lands).
SERIES = [s.name for s in manifest.SERIES if s.patches]
PATCH_LIST = [p for s in manifest.SERIES for p in s.patches]
NUM_PATCHES = sum(len(s.patches) for s in manifest.SERIES)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def series_files(root, name):
    return sorted(glob.glob(os.path.join(root, name, "*.patch")))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The base tree with every committed series applied, as git am would."""
    root = str(tmp_path_factory.mktemp("pytorch"))
    generate.init_base_repo(root)
    for series in manifest.SERIES:
        if not series.patches:
            assert not series_files(PATCHES, series.name), f"patches/{series.name} has no manifest entry"
    for name in SERIES:
        files = series_files(PATCHES, name)
        assert files, f"patches/{name} is empty: run python -m patches.generate"
        # Each patch is checked against the tree the previous ones leave, then
        # applied; --keep-non-patch keeps the "[ATen]"-style tags of the titles.
        for path in files:
            generate.git(root, "apply", "--check", path)
            generate.git(root, "am", "--quiet", "--keep-non-patch", path)
    return root


# (a) ----------------------------------------------------------------------

def test_series_apply_in_order(tree):
    titles = generate.git(tree, "log", "--reverse", "--format=%s", f"HEAD~{NUM_PATCHES}..HEAD").splitlines()
    assert titles == [p.title for s in manifest.SERIES for p in s.patches]


def test_kernel_files_are_the_extension_sources(tree):
    copies = [c for p in manifest.SERIES[0].patches for c in p.changes
              if isinstance(c, manifest.Copy) and c.path.startswith("aten/")]
    # Which sources must be carried is manifest.check_coverage's business
    # (every native source carried or NOT_UPSTREAMED); here, that they are.
    assert copies
    for change in copies:
        assert filecmp.cmp(os.path.join(tree, change.path), os.path.join(manifest.REPO_ROOT, change.source),
                           shallow=False), change.path


def series_paths(tree, status):
    """Paths the series adds (status "A") or modifies ("M")."""
    return generate.git(tree, "diff", "--name-only", f"--diff-filter={status}", f"HEAD~{NUM_PATCHES}", "HEAD").split()


def test_base_tree_holds_every_upstream_file_the_series_edits(tree):
    """Every file a patch modifies is in the base tree, from the wheel (none
    needs vendoring: patches/base.py), and is listed upstream; the one file
    the wheel lacks, FunctionsManual.cpp, has a stand-in of the lines its
    hunks need, and is compiled into the wheel's libraries; so have the test
    files whose OpInfo lists the series extends (`source` lines)."""
    edited = series_paths(tree, "M")
    from_wheel = set(edited) - set(base.REBUILT) - set(base.STAND_INS)
    assert edited and from_wheel <= set(base.WHEEL_PATHS) | set(base.GUARDED), \
        from_wheel - set(base.WHEEL_PATHS) - set(base.GUARDED)
    listed = upstream_tree.load()
    assert from_wheel <= set(listed.wheel)
    assert set(base.STAND_INS) <= set(edited) and set(base.STAND_INS) <= set(listed.binary) | set(listed.source)
    assert sorted(listed.source) == sorted(base.UPSTREAM_EXCERPTS)


def test_upstream_tree_is_current():
    listed = upstream_tree.load()
    assert listed.dirs == upstream_tree.touched_dirs(), \
        "the series touches other directories: run `python -m patches.upstream_tree`"
    if listed.torch_version != torch.__version__:
        pytest.skip(f"patches/upstream_tree.txt lists torch {listed.torch_version}, "
                    f"torch {torch.__version__} is installed")
    assert listed.wheel == upstream_tree.wheel_paths(listed.dirs), "run `python -m patches.upstream_tree`"


def test_new_files_take_no_upstream_path(tree):
    """No new file of the series lands on an upstream path (up to case), and
    each was looked up upstream (an `absent` line of patches/upstream_tree.txt)."""
    new = series_paths(tree, "A")
    listed = upstream_tree.load()
    assert not upstream_tree.collisions(new, listed.upstream()), upstream_tree.collisions(new, listed.upstream())
    assert not set(new) - set(listed.absent), (
        f"new files never looked up upstream: {sorted(set(new) - set(listed.absent))}; check that v2.14.1 has no "
        "such path and add an `absent` line to patches/upstream_tree.txt")
    assert not set(listed.absent) - set(new), f"stale `absent` lines: {sorted(set(listed.absent) - set(new))}"


def test_collision_up_to_case_is_found():
    listed = upstream_tree.load()
    assert upstream_tree.collisions(["aten/src/ATen/native/groupedmmutils.h", "aten/src/ATen/native/GroupedMM.h"],
                                    listed.upstream()) == [("aten/src/ATen/native/groupedmmutils.h",
                                                            "aten/src/ATen/native/GroupedMMUtils.h")]


# (b) ----------------------------------------------------------------------

def test_torchgen_accepts_the_yaml_and_generates_the_backward(tree, tmp_path):
    from torchgen.gen import parse_native_yaml
    from torchgen.model import DispatchKey
    from torchgen.packaged.autograd.gen_autograd import gen_autograd
    from torchgen.selective_build.selector import SelectiveBuilder

    native = os.path.join(tree, "aten/src/ATen/native/native_functions.yaml")
    tags = os.path.join(tree, "aten/src/ATen/native/tags.yaml")
    parsed = parse_native_yaml(native, tags)
    kernels = parsed.backend_indices
    # Each op the declaration sends upstream dispatches to the kernels it
    # declares (new ops: all of ours; extended ones: the keys they add).
    upstreamed = native_functions.upstreamed()
    assert upstreamed
    for op in upstreamed:
        (fn,) = [f for f in parsed.native_functions if str(f.func.name) == op.upstream.name]
        if fn.structured_delegate is not None:  # a structured op's kernels are its out= overload's
            (fn,) = [f for f in parsed.native_functions if f.func.name == fn.structured_delegate]
        for key, kernel in op.upstream_dispatch().items():
            assert kernels[getattr(DispatchKey, key)].get_kernel(fn).kernel == kernel, (op.name, key)
    # Upstream's own CUDA kernel stays where the series only extends an entry;
    # _grouped_mm's is replaced by ours (upstream.dispatch), and no other key changes.
    (fn,) = [f for f in parsed.native_functions if str(f.func.name) == "_scaled_grouped_mm"]
    assert kernels[DispatchKey.CUDA].get_kernel(fn).kernel == "_scaled_grouped_mm_cuda"
    (fn,) = [f for f in parsed.native_functions if str(f.func.name) == "_grouped_mm"]
    assert {str(k): kernels[k].get_kernel(fn).kernel for k in kernels if kernels[k].get_kernel(fn)} == {
        "CPU": "grouped_mm_cpu", "CUDA": "grouped_mm_cuda", "CompositeExplicitAutograd": "_grouped_mm"}

    # gen_autograd reads every template (the series patch none).
    autograd = os.path.join(tree, "tools/autograd")
    templates = os.path.join(os.path.dirname(torchgen.__file__), "packaged/autograd/templates")
    for path in glob.glob(os.path.join(templates, "*")):
        dest = os.path.join(autograd, "templates", os.path.basename(path))
        if not os.path.exists(dest):
            shutil.copyfile(path, dest)
    gen_autograd(native, tags, str(tmp_path), autograd, SelectiveBuilder.get_nop_selector())
    functions = (tmp_path / "Functions.cpp").read_text()
    # The helpers the formulas call are FunctionsManual's, which Functions.cpp includes.
    assert '#include "torch/csrc/autograd/FunctionsManual.h"' in functions
    manual = pathlib.Path(tree, "torch/csrc/autograd/FunctionsManual.h").read_text()
    for helper in ("grouped_mm_mat_a_backward", "grouped_mm_mat_b_backward", "grouped_mm_bias_backward",
                   "moe_router_topk_backward"):
        assert f"at::Tensor {helper}(" in manual, helper
    for call in ("grouped_mm_mat_a_backward(grad, mat2, offs, self_scalar_type)",
                 "grouped_mm_mat_b_backward(grad, self, mat2, offs, self_scalar_type)",
                 "grouped_mm_bias_backward(grad, self, mat2, offs)"):
        assert call in functions
    assert "struct TORCH_API GroupedMmBackward0" in (tmp_path / "Functions.h").read_text()
    for call in ("moe_router_topk_backward(grad, logits, expert_ids, score_func, renormalize, scaling_factor)",
                 "at::_moe_unpermute(grad, dst_rows)",
                 "_moe_unpermute_backward_symint(grad, dst_rows, permuted_sym_argsize_0, weights, "):
        assert call in functions, call
    header = (tmp_path / "Functions.h").read_text()
    for node in ("MoeRouterTopkBackward0", "MoePermuteBackward0", "MoeUnpermuteBackward0"):
        assert f"struct TORCH_API {node}" in header


# The derivative helpers as the series inserts them into FunctionsManual.cpp.
MANUAL_SRC = os.path.join(manifest.REPO_ROOT, manifest.MANUAL_SRC)
# Each scratch extension keeps its helpers to itself (another one loaded in the
# process defines the same names).
HIDDEN = ["-fvisibility=hidden"]


def test_backward_helpers_match_python(tree, tmp_path):
    """The backward helpers (FunctionsManual's, as the series adds them)
    restate our Python autograd in C++: compile them into scratch ops and
    compare (router_topk on every score function, the weight gradient of
    grouped_mm on both weight layouts)."""
    from torch.utils.cpp_extension import load_inline

    source = textwrap.dedent(f"""
        #include <torch/library.h>
        #include <torch/csrc/autograd/FunctionsManual.h>  // the patched tree's: the declarations

        namespace torch::autograd::generated::details {{
        #include "{MANUAL_SRC}/grouped_mm.cpp"
        #include "{MANUAL_SRC}/moe_routing.cpp"
        }} // namespace torch::autograd::generated::details

        at::Tensor grouped_mm_mat_b_backward(const at::Tensor& grad, const at::Tensor& mat_a,
                                             const at::Tensor& mat_b, const at::Tensor& offs) {{
          return torch::autograd::generated::details::grouped_mm_mat_b_backward(
              grad, mat_a, mat_b, offs, mat_a.scalar_type());
        }}

        at::Tensor router_topk_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& ids,
                                        c10::string_view score_func, bool renormalize, double scaling_factor) {{
          return torch::autograd::generated::details::moe_router_topk_backward(
              grad, logits, ids, score_func, renormalize, scaling_factor);
        }}

        TORCH_LIBRARY(moe_patch_test, m) {{
          m.def("router_topk_backward(Tensor grad, Tensor logits, Tensor ids, str score_func, bool renormalize, "
                "float scaling_factor) -> Tensor", &router_topk_backward);
          m.def("grouped_mm_mat_b_backward(Tensor grad, Tensor mat_a, Tensor mat_b, Tensor offs) -> Tensor",
                &grouped_mm_mat_b_backward);
        }}
    """)
    load_inline("moe_patch_test", source, extra_include_paths=[str(tree)], extra_cflags=["-std=c++20", *HIDDEN],
                is_python_module=False, build_directory=str(tmp_path))
    g = torch.Generator().manual_seed(0)
    for score_func in ("softmax", "sigmoid", "softmax_after_topk"):
        for renormalize in (False, True):
            logits = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
            weights, ids, _ = torch.ops.moe_ops.router_topk(logits, 3, score_func, None, 1, 1, renormalize, 2.5)
            grad = torch.randn(weights.shape, generator=g, dtype=torch.float64)
            (expected,) = torch.autograd.grad(weights, logits, grad)
            got = torch.ops.moe_patch_test.router_topk_backward(grad, logits.detach(), ids, score_func,
                                                                renormalize, 2.5)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # grouped_mm's weight gradient (upstream's _grouped_mm computes it here),
    # for weights stored (G, K, N) and stored (G, N, K) and read transposed:
    # same values as our autograd, and in the weight's own layout.
    # (Sizes keep the 16-byte strides upstream's CPU kernel still asks for.)
    offs = torch.tensor([4, 4, 12], dtype=torch.int32)
    a = torch.randn(12, 8, generator=g)
    for w in (torch.randn(3, 8, 12, generator=g), torch.randn(3, 12, 8, generator=g).transpose(-2, -1)):
        w = w.requires_grad_()
        out = torch.ops.moe_ops.grouped_mm(a, w, offs)
        grad = torch.randn(out.shape, generator=g)
        (expected,) = torch.autograd.grad(out, w, grad)
        got = torch.ops.moe_patch_test.grouped_mm_mat_b_backward(grad, a, w.detach(), offs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert got.stride() == w.stride() == expected.stride()


def test_grouped_mm_backward_is_symint_safe(tree, tmp_path):
    """The grouped mm backward helpers traced with symbolic shapes (make_fx's
    symbolic mode, what torch.compile(dynamic=True)'s AOT autograd does to
    the generated GroupedMmBackward0): compiled into scratch ops registered as
    CompositeImplicitAutograd, so the C++ runs on fake tensors whose sizes are
    SymInts. A size read as int64_t (.size(), not .sym_size()) specialises it:
    the graph keeps the traced value as a constant (with .size(0) in the bias
    gradient, replaying it on 13 rows fails its contraction check at 9). The
    traced graphs, replayed on other sizes, give the helpers' eager values. The
    helpers call at::_grouped_mm, whose CPU kernel and meta the series makes
    ours; the installed torch has v2.14.1's, so here those calls go to
    moe_ops::grouped_mm."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.cpp_extension import load_inline

    source = textwrap.dedent("""
        #include <ATen/core/dispatch/Dispatcher.h>
        #include <ATen/ops/_grouped_mm.h>
        #include <torch/library.h>

        namespace at {
        inline Tensor moe_test_grouped_mm(const Tensor& a, const Tensor& b, const std::optional<Tensor>& offs,
                                          const std::optional<Tensor>& bias = std::nullopt,
                                          std::optional<ScalarType> out_dtype = std::nullopt) {
          static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("moe_ops::grouped_mm", "").typed<
              Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                     std::optional<ScalarType>)>();
          return op.call(a, b, offs, bias, out_dtype);
        }
        } // namespace at
        #include <torch/csrc/autograd/FunctionsManual.h>  // the patched tree's: the declarations
        #define _grouped_mm moe_test_grouped_mm
        namespace torch::autograd::generated::details {
        #include "MANUAL_SRC/grouped_mm.cpp"
        } // namespace torch::autograd::generated::details
        #undef _grouped_mm
""".replace("MANUAL_SRC", MANUAL_SRC) + """

        namespace details = torch::autograd::generated::details;

        at::Tensor mat_a_backward(const at::Tensor& grad, const at::Tensor& mat_b,
                                  const std::optional<at::Tensor>& offs) {
          return details::grouped_mm_mat_a_backward(grad, mat_b, offs, mat_b.scalar_type());
        }
        at::Tensor mat_b_backward(const at::Tensor& grad, const at::Tensor& mat_a, const at::Tensor& mat_b,
                                  const std::optional<at::Tensor>& offs) {
          return details::grouped_mm_mat_b_backward(grad, mat_a, mat_b, offs, mat_a.scalar_type());
        }
        at::Tensor bias_backward(const at::Tensor& grad, const at::Tensor& mat_a, const at::Tensor& mat_b,
                                 const std::optional<at::Tensor>& offs) {
          return details::grouped_mm_bias_backward(grad, mat_a, mat_b, offs);
        }

        TORCH_LIBRARY(moe_patch_symint, m) {
          m.def("mat_a_backward(Tensor grad, Tensor mat_b, Tensor? offs) -> Tensor");
          m.def("mat_b_backward(Tensor grad, Tensor mat_a, Tensor mat_b, Tensor? offs) -> Tensor");
          m.def("bias_backward(Tensor grad, Tensor mat_a, Tensor mat_b, Tensor? offs) -> Tensor");
        }
        TORCH_LIBRARY_IMPL(moe_patch_symint, CompositeImplicitAutograd, m) {
          m.impl("mat_a_backward", &mat_a_backward);
          m.impl("mat_b_backward", &mat_b_backward);
          m.impl("bias_backward", &bias_backward);
        }
    """)
    load_inline("moe_patch_symint", source, extra_include_paths=[str(tree)], extra_cflags=["-std=c++20", *HIDDEN],
                is_python_module=False, build_directory=str(tmp_path))
    ops = torch.ops.moe_patch_symint
    g = torch.Generator().manual_seed(0)

    def problem(layout, total):
        rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        offs = torch.tensor([total // 3, total // 3, total], dtype=torch.int32)
        if layout == "2d3d":  # weights stored (G, N, K), read transposed: the K-major branch
            return rand(total + 2, 6), rand(3, 5, 6).transpose(-2, -1), offs, (total + 2, 5)
        if layout == "3d2d":
            return rand(3, 4, 6), rand(6, total), offs, (4, total)
        if layout == "2d2d":
            return rand(4, total), rand(total, 5), offs, (3, 4, 5)
        return rand(3, total, 6), rand(3, 6, 5), None, (3, total, 5)

    def backward(grad, a, b, offs):
        return (ops.mat_a_backward(grad, b, offs), ops.mat_b_backward(grad, a, b, offs),
                ops.bias_backward(grad, a, b, offs))

    for layout in ("2d3d", "3d2d", "2d2d", "3d3d"):
        a, b, offs, out_shape = problem(layout, 7)
        gm = make_fx(backward, tracing_mode="symbolic")(torch.randn(out_shape, generator=g), a, b, offs)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert any(isinstance(s, torch.SymInt) and not s.node.is_constant()
                   for n in placeholders for s in n.meta["val"].shape), f"{layout}: nothing was symbolic"
        for total in (7, 11, 20):
            a, b, offs, out_shape = problem(layout, total)
            grad = torch.randn(out_shape, generator=g)
            for got, expected in zip(gm(grad, a, b, offs), backward(grad, a, b, offs), strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{layout}, total={total}")


# (b2) The carried C++, compiled as in-tree (patches/proof.py) ------------------

SOURCES = [p for p in proof.carried_files() if not p.endswith((".h", ".cuh"))]


@pytest.fixture(scope="module")
def compiled(tree, tmp_path_factory):
    """ATen headers generated from the patched yaml, the autograd code of the
    new formulas, and every translation unit compiled (cached by content)."""
    return proof.prove(tree, str(tmp_path_factory.mktemp("autograd")))


def unit_results(compiled, prefix):
    results = [r for name, r in compiled.results.items() if name == prefix or name.startswith(prefix + " ")]
    assert results, f"{prefix}: patches/proof.py made no translation unit of it"
    skipped = [r.unit.skip for r in results if r.unit.skip]
    if skipped:
        pytest.skip(skipped[0])
    failed = [r.report() for r in results if not r.ok]
    assert not failed, "\n\n".join(failed)
    return results


def test_functions_manual_helpers_compile(compiled):
    """The definitions the series adds to FunctionsManual.cpp, compiled in its
    stand-in against the patched FunctionsManual.h (their declarations) with
    upstream's warnings as errors."""
    unit_results(compiled, proof.FUNCTIONS_MANUAL_CPP)


def test_functions_manual_hunks_apply_to_the_whole_file(tmp_path):
    """The FunctionsManual.cpp hunks are made against a stand-in holding the
    real file's last lines only (patches/base.py STAND_INS); on v2.14.1's file
    those lines sit thousands of lines further down, and git applies the
    hunks there (at an offset). Shown on the stand-in with 7000 lines put
    before its last function; that the real file ends so is what the stand-in
    asserts (see STAND_INS), which only a source checkout shows."""
    import subprocess

    rel = proof.FUNCTIONS_MANUAL_CPP
    stand_in = base.STAND_INS[rel]
    at = stand_in.index("Tensor values_backward(")
    longer = stand_in[:at] + "".join(f"// line {i}\n" for i in range(7000)) + stand_in[at:]
    (tmp_path / os.path.dirname(rel)).mkdir(parents=True)
    (tmp_path / rel).write_text(longer)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    applied = 0
    for patch in sorted(glob.glob(os.path.join(manifest.REPO_ROOT, "patches", "core", "*.patch"))):
        text = pathlib.Path(patch).read_text()
        if f"diff --git a/{rel} " not in text:
            continue
        result = subprocess.run(["git", "apply", f"--include={rel}", "-"], input=text, text=True,
                                capture_output=True, cwd=tmp_path)
        assert result.returncode == 0, (patch, result.stderr)
        applied += 1
    assert applied == 2  # the grouped mm and the routing helpers
    out = (tmp_path / rel).read_text()
    assert out.count("// line ") == 7000 and out.endswith(base.STAND_INS[rel].splitlines(True)[-1])
    for helper in ("grouped_mm_bias_backward(", "moe_router_topk_backward("):
        assert out.index(helper) > out.index("Tensor values_backward(")


def _patches_of(rel):
    """The series' patch files that touch rel, in order."""
    out = []
    for name in ("core", "compile", "distributed"):
        for patch in sorted(glob.glob(os.path.join(manifest.REPO_ROOT, "patches", name, "*.patch"))):
            if f"diff --git a/{rel} " in pathlib.Path(patch).read_text():
                out.append(patch)
    return out


@pytest.mark.parametrize("rel", sorted(base.UPSTREAM_EXCERPTS))
def test_opinfo_list_stand_ins_hold_the_recorded_upstream_lines(rel, tmp_path):
    """A test file whose OpInfo lists the series extends (the wheel ships
    none) stands in as the lines read in pytorch/pytorch (UPSTREAM_EXCERPTS,
    with the commit), each excerpt after an elision line; the hunks made
    against it apply, in order, to a copy with 300 unrelated lines on each
    side of every elision (the rest of the real file), so their context is
    the recorded upstream lines and nothing the stand-in adds."""
    import subprocess

    revision, excerpts = base.UPSTREAM_EXCERPTS[rel]
    assert re.fullmatch(r"[0-9a-f]{40}", revision)
    stand_in = base.STAND_INS[rel]
    assert stand_in == base.excerpt_stand_in(rel)
    for excerpt in excerpts:
        assert excerpt.endswith("\n") and excerpt in stand_in
    filler = "".join(f"# upstream line {i}\n" for i in range(300))
    longer = base.excerpt_stand_in(rel, filler).replace(base.ELISION, base.ELISION + filler)
    (tmp_path / os.path.dirname(rel)).mkdir(parents=True)
    (tmp_path / rel).write_text(longer)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    patches = _patches_of(rel)
    assert patches
    for patch in patches:
        result = subprocess.run(["git", "apply", f"--include={rel}", "-"], input=pathlib.Path(patch).read_text(),
                                text=True, capture_output=True, cwd=tmp_path)
        assert result.returncode == 0, (patch, result.stderr)
    out = (tmp_path / rel).read_text()
    assert out.count("# upstream line ") == longer.count("# upstream line ")
    source = os.environ.get("PYTORCH_SOURCE")  # a pytorch/pytorch clone: the lines must be v2.14.1's
    if source:
        real = subprocess.run(["git", "-C", source, "show", f"v{base.UPSTREAM_VERSION}:{rel}"], check=True,
                              capture_output=True, text=True).stdout
        assert all(excerpt in real for excerpt in excerpts)


def test_opinfo_list_entries_follow_the_opinfos():
    """The lists name exactly the OpInfos the suites run and fail: every new
    OpInfo in test_op_has_batch_rule's xfails (no op has a batching rule),
    every differentiable one in functorch test_ops.py's
    (test_vmapvjp_has_batch_rule, test_jvpvjp, test_vmapjvpvjp);
    in dtensor_fails, every one with a float32 test (test_dtensor_op_db's only
    dtype); in Inductor's expected failures, every one without a lowering, for
    the dtypes test_comprehensive tests of it."""
    from patches import opinfo_lists

    grouped = make_grouped_mm_opinfo("_grouped_mm", torch._grouped_mm)
    infos = {grouped.name: grouped}
    from opinfo_scaled_grouped_mm_v2 import scaled_grouped_mm_v2_opinfos

    # _scaled_grouped_mm_v2's as upstream builds it (core/0008b): bfloat16 alone
    v2 = scaled_grouped_mm_v2_opinfos(lambda op: f"moe_ops.{op}", lambda op: getattr(torch.ops.moe_ops, op).default)
    for info in [*routing_op_db, *fp8_op_db, *v2]:
        op = native_functions.op(info.name.removeprefix("moe_ops."))
        infos[op.upstream.name] = info
    listed = {}
    for block in opinfo_lists.BLOCKS:
        listed.setdefault(block.path, set()).update(block.ops)
    carried = {c.ops for s in manifest.SERIES for p in s.patches for c in p.changes
               if isinstance(c, opinfo_lists.ListEntries)}
    assert {op for ops in carried for op in ops} == set(infos)
    assert listed[opinfo_lists.FUNCTORCH_VMAP] == set(infos)
    # functorch's TestOperators runs float32 compositions of vjp; no new op has a forward-AD formula or a
    # batching rule, so every differentiable one fails vmap(vjp) without the fallback and jvp(vjp).
    assert listed[opinfo_lists.FUNCTORCH_OPS] == {n for n, i in infos.items()
                                                  if i.supports_autograd and torch.float32 in i.dtypes}
    assert not any(i.supports_forward_ad for i in infos.values())
    # make_fx_check's randomize_data fills every floating input with uniform_, which float8 lacks: the
    # ops with a float32 test and float8 inputs (their samples decide; quantize's inputs are float32).
    float8 = {d for d in vars(torch).values() if isinstance(d, torch.dtype) and "float8" in str(d)}

    def takes_float8(info):
        return any(isinstance(t, torch.Tensor) and t.dtype in float8
                   for s in itertools.islice(info.sample_inputs("cpu", torch.float32), 100)
                   for t in tree_leaves((s.input, s.args, s.kwargs)))
    assert listed[opinfo_lists.PROXY_TENSOR] == {n for n, i in infos.items()
                                                 if torch.float32 in i.dtypes and takes_float8(i)}
    assert set(sizes.OPINFO_LISTS) == set(listed)
    assert listed[opinfo_lists.DTENSOR_OPS] == {n for n, i in infos.items() if torch.float32 in i.dtypes}
    lowered = {"_grouped_mm", "_scaled_grouped_mm"}  # tuned_grouped_mm, tuned_scaled_grouped_mm
    tested_dtypes = {getattr(torch, d) for d in TESTED_BY_INDUCTOR}
    assert listed[opinfo_lists.INDUCTOR_OPINFO] == {n for n, i in infos.items()
                                                    if n not in lowered and set(i.dtypes) & tested_dtypes}
    for name, dtypes in opinfo_lists.INDUCTOR_DTYPES.items():
        tested = {d for d in TESTED_BY_INDUCTOR if getattr(torch, d) in infos[name].dtypes}
        assert {opinfo_lists._INDUCTOR_DTYPES[d] for d in dtypes} == tested, name


# test_comprehensive's allowed_dtypes
TESTED_BY_INDUCTOR = ("float16", "float32", "float64", "int32", "int64", "bool")


@pytest.mark.parametrize("path", SOURCES)
def test_carried_file_compiles_in_tree(compiled, path):
    """Entry points with the yaml's kernel signatures and the generated
    declarations, native/cpu/ kernels once per CPU capability, the CUDA files
    as ATen's CUDA build compiles them."""
    results = unit_results(compiled, path)
    if "/native/cpu/" in path:
        assert len(results) == len(proof.CPU_CAPABILITY_BUILDS)


def test_carried_files_compile_as_each_pr_leaves_them(compiled):
    """A file a stack grows over several PRs (Copy's undefine / edits / update)
    compiles as each of them leaves it, with only the files the series holds
    by then: each PR builds on its own, not only the end of the series."""
    stages = proof.intermediate_versions()
    results = [r for name, r in compiled.results.items() if any(name.startswith(f"{m}: ") for m in stages)]
    assert {name.split(": ", 1)[0] for name in (r.unit.name for r in results)} == set(stages)
    failed = [r.report() for r in results if not r.ok and not r.unit.skip]
    assert not failed, "\n\n".join(failed)


@pytest.mark.parametrize("generated", ["Functions.cpp", "VariableTypeEverything.cpp"])
def test_generated_autograd_code_compiles(compiled, generated):
    """The backward nodes of the series' formulas (Functions.cpp) and the
    autograd kernels that save what they use (VariableType), as torchgen
    generates them from the patched derivatives.yaml."""
    unit_results(compiled, f"{proof.GENERATED_AUTOGRAD}/{generated}")
    text = (pathlib.Path(compiled.autograd_root) / proof.GENERATED_AUTOGRAD / generated).read_text()
    for node in ("GroupedMmBackward0", "MoeRouterTopkBackward0", "MoePermuteBackward0", "MoeUnpermuteBackward0"):
        assert node in text, f"{generated} has no {node}"


def test_every_new_kernel_is_checked(compiled):
    """The kernels the patched yaml names that v2.14.1's does not, each checked
    against the file that defines it."""
    # (a structured op's kernel is its out= overload's)
    assert {(k.op.removesuffix(".out") if k.structured else k.op, k.key): k.name for k in compiled.kernels} == {
        (op.upstream.name, key): kernel
        for op in native_functions.upstreamed() for key, kernel in op.upstream_dispatch().items()}
    unchecked = proof.check_kernels_covered(compiled.kernels, [u for u in compiled.units if not u.skip])
    if unchecked and all(k.key == "CUDA" for k in unchecked) and proof.cuda_toolkit() is None:
        pytest.skip("no CUDA toolkit: the CUDA kernels are not compiled here")
    assert not unchecked, "native_functions.yaml names kernels that no carried file defines: " + ", ".join(
        f"{k.op} [{k.key}] at::native::{k.name}" for k in unchecked)


def test_every_carried_header_is_compiled(compiled, tree):
    assert not proof.headers_not_compiled(tree, compiled.autograd_root)


def test_generated_aten_headers(compiled):
    """The overlay holds the headers of the new and changed ops; torchgen
    reproduced every other header of the wheel (proof.aten_headers checks)."""
    files = set(proof.overlay_files(compiled.overlay))
    new_ops = [op.upstream.name for op in native_functions.upstreamed() if not op.upstream.extends]
    assert new_ops
    for root in new_ops:
        assert {f"ATen/ops/{root}.h", f"ATen/ops/{root}_ops.h", f"ATen/ops/{root}_native.h"} <= files, root
    assert {"ATen/ops/_grouped_mm_native.h", "ATen/ops/_grouped_mm_cpu_dispatch.h",
            "ATen/ops/_scaled_grouped_mm_native.h", "ATen/ops/_scaled_grouped_mm_cpu_dispatch.h", "ATen/Functions.h",
            "ATen/Operators.h"} <= files
    assert "ATen/ops/_grouped_mm.h" not in files  # the schema is unchanged
    native = (pathlib.Path(compiled.overlay) / "ATen/ops/_moe_permute_native.h").read_text()
    assert "moe_permute_cpu(" in native and "moe_permute_cuda(" in native


def test_compile_rejects_a_definition_that_drifts_from_the_yaml(compiled, tree, tmp_path):
    """moe_permute_cpu defined with a num_local_experts that is not optional:
    the file alone compiles (a new overload; the build would fail to link),
    the in-tree proof does not."""
    copy = tmp_path / "tree"
    shutil.copytree(os.path.join(tree, "aten"), copy / "aten")
    path = copy / "aten/src/ATen/native/MoEPermute.cpp"
    text = path.read_text()
    old = "int64_t first_expert,\n    std::optional<int64_t> num_local_experts) {\n  permute_check_inputs"
    drift = text.replace(old, old.replace("std::optional<int64_t> num_local_experts", "int64_t num_local_experts"))
    assert drift != text
    path.write_text(drift)
    (unit,) = proof.units(str(copy), compiled.overlay, None, compiled.kernels, compiled.roots,
                          sources=["aten/src/ATen/native/MoEPermute.cpp"])
    result = proof.compile_unit(unit, str(copy), proof._sha(drift), {str(copy): "<tree>"})
    assert not result.ok
    assert "moe_permute_cpu" in result.output and "overloaded function" in result.output, result.output[-3000:]


def test_proof_compiles_a_unit_again_only_when_a_file_it_read_changes(compiled, tree, tmp_path, monkeypatch):
    """The proof's cache (compile_unit) keeps, per unit, what the compiler read:
    the series applied at another path finds MoEPermute.cpp compiled; an edit
    of a carried header it does not read leaves it found; an edit of one it
    reads compiles it again. (A cache of its own: the real one stays as the
    series leaves it.)"""
    monkeypatch.setenv("TORCH_MOE_OPS_CACHE", str(tmp_path / "cache"))
    roots = {compiled.overlay: "<aten-headers>", compiled.autograd_root: "<autograd>"}

    def permute_unit(copy):
        (unit,) = proof.units(str(copy), compiled.overlay, None, compiled.kernels, compiled.roots,
                              sources=["aten/src/ATen/native/MoEPermute.cpp"])
        result = proof.compile_unit(unit, str(copy), proof.inputs_digest(), roots)
        assert result.ok, result.output[-3000:]
        return result

    first, second = tmp_path / "tree1", tmp_path / "tree2"
    for copy in (first, second):
        shutil.copytree(tree, copy, ignore=shutil.ignore_patterns(".git"))
    assert not permute_unit(first).cached
    assert permute_unit(second).cached
    unread = second / "aten/src/ATen/native/GroupedMM.h"
    unread.write_text(unread.read_text() + "\n// an edit MoEPermute.cpp does not read\n")
    assert permute_unit(second).cached
    read = second / "aten/src/ATen/native/MoEPermute.h"
    read.write_text(read.read_text() + "\n// an edit MoEPermute.cpp reads\n")
    assert not permute_unit(second).cached
    assert permute_unit(second).cached


def test_kernel_named_by_no_carried_file_is_rejected(compiled, tree, tmp_path):
    """native_functions.yaml naming a kernel no carried file defines (a typo)."""
    copy = tmp_path / "tree"
    for rel in (proof.NATIVE_YAML, proof.TAGS_YAML, proof.DERIVATIVES_YAML):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(tree, rel), copy / rel)
    native = copy / proof.NATIVE_YAML
    native.write_text(native.read_text().replace("    CPU: moe_permute_cpu\n", "    CPU: moe_permute_cpux\n"))
    kernels = proof.series_kernels(proof.parse_base(), proof.parse(str(copy)))
    unit_list = proof.units(tree, compiled.overlay, None, kernels, compiled.roots)
    (unchecked,) = proof.check_kernels_covered(kernels, unit_list)
    assert (unchecked.op, unchecked.key, unchecked.name) == ("_moe_permute", "CPU", "moe_permute_cpux")


def test_formula_calling_a_misspelt_op_does_not_compile(compiled, tree, tmp_path):
    """A derivatives.yaml formula is C++: torchgen copies it into Functions.cpp
    unchecked, the compile rejects it."""
    copy = tmp_path / "tree"
    shutil.copytree(os.path.join(tree, "aten"), copy / "aten")
    shutil.copytree(os.path.join(tree, "tools"), copy / "tools")
    shutil.copytree(os.path.join(tree, "torch/csrc"), copy / "torch/csrc")
    derivatives = copy / proof.DERIVATIVES_YAML
    text = derivatives.read_text()
    assert text.count("tokens: at::_moe_unpermute(grad, dst_rows)") == 1
    derivatives.write_text(text.replace("tokens: at::_moe_unpermute(grad, dst_rows)",
                                        "tokens: at::_moe_unpermut(grad, dst_rows)"))
    out = tmp_path / "autograd"
    proof.autograd_sources(str(copy), str(out), derivatives={"_moe_permute"})
    unit = [u for u in proof.units(str(copy), compiled.overlay, str(out), [], set(), sources=[])
            if "Functions.cpp" in u.name][0]
    result = proof.compile_unit(unit, str(copy), proof._sha(derivatives.read_text()), {str(copy): "<tree>"})
    assert not result.ok and "_moe_unpermut" in result.output, result.output[-3000:]


# (c) ----------------------------------------------------------------------

def patched_python_files(tree):
    out = generate.git(tree, "diff", "--name-only", f"HEAD~{NUM_PATCHES}", "HEAD", "--", "*.py")
    return out.split()


def test_patched_python_compiles(tree):
    files = patched_python_files(tree)
    # the meta functions, 4 OpInfo files, functional.py (grouped_mm's docstring), test/test_matmul.py,
    # the grouped mm lowerings (mm_grouped.py); the DTensor rules (_matrix_ops.py, _moe_ops.py and
    # _ops/__init__.py); the MoE passes: 4 modules, the config switch, its two hooks and the tests; the
    # OpInfo lists of 5 test files (their stand-ins)
    assert len(files) == 24
    for path in files:
        with open(os.path.join(tree, path)) as f:
            compile(f.read(), path, "exec")


@pytest.fixture(scope="module")
def aten(tree):
    """torch.ops.aten as the patched native_functions.yaml generates it."""
    return proof.GeneratedAten(tree)


@pytest.fixture(scope="module")
def meta(tree, aten):
    """The generated part of the patched torch/_meta_registrations.py, run in
    a scratch namespace (importing the whole file would register every meta
    function again). Its aten names resolve against the ops the patched yaml
    generates; register_meta records what it registers."""
    path = os.path.join(tree, "torch/_meta_registrations.py")
    with open(path) as f:
        source = f.read()
    metas = [c for s in manifest.SERIES for p in s.patches for c in p.changes if isinstance(c, manifest.Meta)]
    generated = [name for m in metas for name in [*m.carried_checks().values(), *m.meta_names().values()]]
    # upstream's meta function of _scaled_grouped_mm, which calls its CPU branch
    generated.append("meta_scaled_grouped_mm")
    # and of _scaled_grouped_mm_v2 (core/0008's CPU branch), with the helper its shape inference calls
    generated += ["_create_grouped_mm_output_tensor", "meta_scaled_grouped_mm_v2"]
    registered = []

    def register_meta(op):
        def record(fn):
            registered.append((op, fn))
            return fn
        return record

    namespace = {"torch": torch, "Optional": __import__("typing").Optional, "aten": aten,
                 "register_meta": register_meta, "__registered__": registered}
    generated = "\n\n".join(rewrite.definition(source, path, name) for name in generated)
    exec(compile(generated, path, "exec"), namespace)
    return namespace


def test_patched_meta_registers_generated_ops(meta):
    """Each register_meta names an op of the patched yaml, and the meta
    function can take that op's arguments."""
    registered = {}
    for op, fn in meta["__registered__"]:
        for schema in proof.torchgen_schemas(op):
            mismatch = proof.meta_signature_mismatch(fn, schema)
            assert mismatch is None, mismatch
            registered[str(schema.name)] = fn.__name__
    assert registered == {op.upstream.name: names.meta_name(op.name) for op in native_functions.upstreamed()}


def test_generated_aten_rejects_what_the_yaml_does_not_define(aten):
    with pytest.raises(AttributeError, match=r"aten\._moe_permut: the patched native_functions.yaml defines no such "
                                             r"op \(aten\._moe_permute\?\)"):
        aten._moe_permut
    with pytest.raises(AttributeError, match=r"aten\._moe_permute\.out: .* the overloads \['default'\]"):
        aten._moe_permute.out
    (schema,) = proof.torchgen_schemas(aten._moe_permute)

    def meta_moe_permute(tokens, expert_ids, num_experts):
        pass
    assert "cannot take aten::_moe_permute" in proof.meta_signature_mismatch(meta_moe_permute, schema)
    # An aten op whose generated schema is not that of the kernel that runs it.
    with pytest.raises(AssertionError, match=r"differ: arguments differ"):
        proof.GeneratedOverload("_moe_permute", "default", schema, torch.ops.moe_ops.unpermute.default)


def samples(dtype):
    return list(sample_inputs_grouped_mm(None, "cpu", dtype, requires_grad=False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patched_meta_matches_the_kernel(meta, dtype):
    for s in samples(dtype):
        args = [s.input, *s.args]
        expected = torch.ops.moe_ops.grouped_mm(*args, **s.kwargs)
        with FakeTensorMode() as mode:
            to_fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
            got = meta["meta_grouped_mm"](*map(to_fake, args), **{k: to_fake(v) for k, v in s.kwargs.items()})
        assert (got.shape, got.stride(), got.dtype) == (expected.shape, expected.stride(), expected.dtype), s.name


def test_patched_meta_raises_the_kernel_errors(meta):
    for e in error_inputs_grouped_mm(None, "cpu"):
        if e.sample_input.name == "offs_values":  # needs the values of offs
            continue
        s = e.sample_input
        with pytest.raises(e.error_type, match=e.error_regex):
            meta["meta_grouped_mm"](s.input, *s.args, **s.kwargs)


def check_meta_against_kernel(meta_fn, info, dtypes, value_errors: str) -> None:
    """meta_fn on fake copies of every OpInfo sample agrees with the kernel in
    shape, strides and dtype, and raises every error input's error alike but
    those named value_errors (they need tensor values: the kernels' alone)."""
    for dtype in dtypes:
        for s in info.sample_inputs("cpu", dtype):
            args = [s.input, *s.args]
            expected = info.op(*args, **s.kwargs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            with FakeTensorMode() as mode:
                to_fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
                got = meta_fn(*map(to_fake, args), **{k: to_fake(v) for k, v in s.kwargs.items()})
            got = got if isinstance(got, tuple) else (got,)
            assert [(t.shape, t.stride(), t.dtype) for t in got] == \
                [(t.shape, t.stride(), t.dtype) for t in expected], s.name
    for e in info.error_inputs("cpu"):
        s = e.sample_input
        if s.name == value_errors:
            continue
        with pytest.raises(e.error_type, match=e.error_regex):
            meta_fn(s.input, *s.args, **s.kwargs)


@pytest.mark.parametrize("info", routing_op_db, ids=lambda info: info.name)
def test_patched_routing_meta_matches_the_kernels(meta, info):
    check_meta_against_kernel(meta[names.meta_name(info.name.split('.')[-1])], info,
                              (torch.float32, torch.bfloat16, torch.float64), value_errors="ids_values")


def test_patched_scaled_grouped_mm_v2_meta_has_the_cpu_checks(meta):
    """core/0008: upstream's meta_scaled_grouped_mm_v2 with its CPU branch raises the CPU
    kernel's error on every error input (but those needing offs's values) and, on every
    sample, infers the kernel's shape and dtype (its strides stay upstream's, padded as the
    structured meta function allocates out)."""
    from opinfo_scaled_grouped_mm_v2 import op_db as v2_op_db

    fn = meta["meta_scaled_grouped_mm_v2"]
    for info in v2_op_db:  # ours, and the structured one core/0008b carries
        for dtype in info.dtypes:
            for s in info.sample_inputs("cpu", dtype):
                expected = info.op(s.input, *s.args, **s.kwargs)
                with FakeTensorMode() as mode:
                    fake = lambda t: (mode.from_tensor(t) if isinstance(t, torch.Tensor)  # noqa: E731
                                      else [fake(x) for x in t] if isinstance(t, list) else t)
                    got = fn(fake(s.input), *map(fake, s.args), **{k: fake(v) for k, v in s.kwargs.items()})
                assert (got.shape, got.dtype) == (expected.shape, expected.dtype), s.name
        for e in info.error_inputs("cpu"):
            s = e.sample_input
            if s.name == "offs_values":
                continue
            with pytest.raises(e.error_type, match=e.error_regex):
                fn(s.input, *s.args, **s.kwargs)


@pytest.mark.parametrize("info", fp8_op_db, ids=lambda info: info.name)
def test_patched_fp8_meta_matches_the_kernels(meta, info):
    """meta_quantize_fp8, meta_dequantize_fp8, meta_swizzle_mx_scale, and
    meta_scaled_grouped_mm on CPU fake tensors (its CPU branch), against the
    CPU kernels."""
    check_meta_against_kernel(meta[names.meta_name(info.name.split('.')[-1])], info, info.dtypes,
                              value_errors="offs_values")


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patched_opinfo(tree):
    path = os.path.join(tree, "torch/testing/_internal/opinfo/definitions/grouped_mm.py")
    module = load_module(path, "patched_grouped_mm_opinfo")
    (info,) = module.op_db
    assert info.name == "_grouped_mm" and info.op is torch._grouped_mm
    # The same definition, instantiated for our op: samples match the
    # reference, error inputs raise.
    ours = module.make_grouped_mm_opinfo("moe_ops.grouped_mm", torch.ops.moe_ops.grouped_mm.default)
    for s in ours.sample_inputs("cpu", torch.float64):
        torch.testing.assert_close(ours.op(s.input, *s.args, **s.kwargs), ours.ref(s.input, *s.args, **s.kwargs))
    for e in ours.error_inputs("cpu"):
        with pytest.raises(e.error_type, match=e.error_regex):
            ours.op(e.sample_input.input, *e.sample_input.args, **e.sample_input.kwargs)


class _TorchWithAten:
    """torch, but torch.ops.aten is the patched yaml's (proof.GeneratedAten)."""

    def __init__(self, aten):
        self.ops = type("ops", (), {"aten": aten, "__getattr__": lambda self, name: getattr(torch.ops, name)})()

    def __getattr__(self, name):
        return getattr(torch, name)


def series_definitions(tree, source):
    """The OpInfo definitions modules source imports that the series adds (the
    wheel has none of them), loaded from tree under their upstream names."""
    package = "torch.testing._internal.opinfo.definitions."
    modules = {}
    for node in ast_mod.parse(source).body:
        if isinstance(node, ast_mod.ImportFrom) and (node.module or "").startswith(package):
            rel = node.module.replace(".", "/") + ".py"
            if not os.path.exists(os.path.join(os.path.dirname(torch.__file__), "..", rel)):
                modules[node.module] = load_module(os.path.join(tree, rel), node.module)
    return modules


def upstream_op_db(tree, aten, rel, upstream_db):
    """op_db of the patched definitions module, as upstream builds it (its
    aten names resolved by the patched yaml, each op run by the moe_ops kernel
    of the same schema; the definitions modules it imports from the series')."""
    path = os.path.join(tree, rel)
    with open(path) as f:
        source = f.read()
    assert source.count(upstream_db) == 1
    namespace = {"__name__": "patched_" + os.path.basename(rel)[:-3]}
    with unittest.mock.patch.dict(sys.modules, series_definitions(tree, source)):
        exec(compile(source.replace(upstream_db, ""), path, "exec"), namespace)
    namespace["torch"] = _TorchWithAten(aten)
    try:
        exec(compile(upstream_db, path, "exec"), namespace)
    finally:
        namespace["torch"] = torch
    return namespace["op_db"]


def upstream_op_db_line(family, rest=""):
    """The op_db statement of a family's patched OpInfo module, with the aten
    names of the declaration (the family's prefix: "_moe_" for routing)."""
    prefix = names.op_prefix(family)
    return (f'op_db = make_{family}_op_db(lambda op: f"{prefix}{{op}}", '
            f'lambda op: getattr(torch.ops.aten, f"{prefix}{{op}}").default{rest})')


def test_patched_routing_opinfo(tree, aten):
    """The patched definitions module's op_db, built as upstream does: samples
    match the refs, error inputs raise."""
    op_db = upstream_op_db(tree, aten, "torch/testing/_internal/opinfo/definitions/moe_routing.py",
                           upstream_op_db_line("routing"))
    ops = [op.name for op in native_functions.public_ops("routing")]
    assert [info.name for info in op_db] == [names.aten_name(op) for op in ops]
    assert [info.op.impl for info in op_db] == [getattr(torch.ops.moe_ops, op).default for op in ops]
    for info in op_db:
        for s in info.sample_inputs("cpu", torch.float64):
            torch.testing.assert_close(info.op(s.input, *s.args, **s.kwargs), info.ref(s.input, *s.args, **s.kwargs),
                                       rtol=1e-12, atol=1e-14, msg=lambda m: f"{info.name} {s.name}: {m}")
        if info.name == "_moe_router_topk":
            # float32 selects through the AVX-512 build's vectors on such CPUs (core/0003e's samples): the
            # same experts as the reference (logits on a grid of 1/4 tie exactly or differ by far more than
            # an ulp), weights within a few ulps (the build's own exp polynomial, about 1 ulp).
            for s in info.sample_inputs("cpu", torch.float32):
                (w, ids, counts), (w_ref, ids_ref, counts_ref) = (
                    f(s.input, *s.args, **s.kwargs) for f in (info.op, info.ref))
                assert torch.equal(ids, ids_ref) and torch.equal(counts, counts_ref), s.name
                torch.testing.assert_close(w, w_ref, rtol=4e-7, atol=1e-7, msg=lambda m: f"{s.name}: {m}")
        for e in info.error_inputs("cpu"):
            with pytest.raises(e.error_type, match=e.error_regex):
                info.op(e.sample_input.input, *e.sample_input.args, **e.sample_input.kwargs)


def test_patched_fp8_opinfo(tree, aten):
    """The patched fp8 definitions module's op_db, built as upstream does:
    quantize and dequantize equal their refs bit for bit, scaled_grouped_mm is
    close to its float64 ref, error inputs raise. _scaled_grouped_mm_v2's
    (core/0008b) is within its structured meta function: v2.14.1's takes every
    sample and error input (the wheel's op on CPU runs it, then finds no CPU
    kernel), so in-tree its errors are the kernel's own."""
    from test_scaled_grouped_mm_v2 import _structured_meta_passes

    ours = upstream_op_db(tree, aten, "torch/testing/_internal/opinfo/definitions/fp8.py", manifest.FP8_V2_OP_DB)
    ops = [info.name.split(".", 1)[1] for info in fp8_op_db] + ["scaled_grouped_mm_v2"]
    # in the stack's order (one PR per op), each op once
    assert sorted(info.name for info in ours) == sorted(names.aten_name(op) for op in ops)
    assert [info.op.impl for info in ours] == [getattr(torch.ops.moe_ops, info.name[1:]).default for info in ours]
    # upstream's CUDA kernels of _scaled_grouped_mm and _scaled_grouped_mm_v2 are tested in their own files
    skipped = {info.name for info in ours if any(d.device_type == "cuda" for d in info.decorators)}
    assert skipped == {"_scaled_grouped_mm", "_scaled_grouped_mm_v2"}
    for info in ours:
        dtype = torch.float32 if torch.float32 in info.dtypes else next(iter(info.dtypes))
        for s in info.sample_inputs("cpu", dtype):
            out = info.op(s.input, *s.args, **s.kwargs)
            ref = info.ref(s.input, *s.args, **s.kwargs)
            if info.name == "_scaled_grouped_mm_v2":
                assert _structured_meta_passes(s), s.name
                mat_b, (sa,), _, _, (sb,), _, _ = s.args
                assert_scaled_mm_close(out, s.input, mat_b, sa, sb, s.kwargs.get("offs"), None, s.kwargs["out_dtype"])
                continue
            if info.name.endswith("scaled_grouped_mm"):  # float32 sums: within test_fp8's bound of the float64 ref
                assert_scaled_mm_close(out, s.input, *s.args, **s.kwargs)
                assert torch.equal(ref, torch_scaled_grouped_mm(s.input, *s.args, **s.kwargs)), s.name
                continue
            for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,),
                            strict=True):
                if o.dtype.itemsize == 1:
                    assert torch.equal(o.view(torch.uint8), r.view(torch.uint8)), f"{info.name} {s.name}"
                else:
                    torch.testing.assert_close(o, r, rtol=0, atol=0, equal_nan=True,
                                               msg=lambda m: f"{info.name} {s.name}: {m}")
        for e in info.error_inputs("cpu"):
            assert info.name != "_scaled_grouped_mm_v2" or _structured_meta_passes(e.sample_input)
            with pytest.raises(e.error_type, match=e.error_regex):
                info.op(e.sample_input.input, *e.sample_input.args, **e.sample_input.kwargs)


def test_patched_strategy_matches_ours(tree, meta, monkeypatch):
    """The patched aten._grouped_mm single-dim strategy (_matrix_ops.py) gives
    the in-repo one's rules, and rejects bad inputs with the same message; so
    do the aten._scaled_grouped_mm and _scaled_grouped_mm_v2 ones distributed/0003
    adds there, on every OpInfo sample."""
    import torch._meta_registrations as upstream_meta
    from torch.distributed.tensor._dtensor_spec import TensorMeta
    from torch.distributed.tensor._ops import single_dim_strategy

    from torch_moe_ops.distributed.grouped_mm_strategy import grouped_mm_single_dim_strategy as ours

    # Its imports resolve to the patched meta helpers; registering it would
    # replace the wheel's aten._grouped_mm strategy for the whole session.
    for family in ("grouped_mm", "fp8"):  # _grouped_mm's and (distributed/0003) _scaled_grouped_mm's
        for name in names.family_checks(family).values():
            monkeypatch.setattr(upstream_meta, name, meta[name], raising=False)
    monkeypatch.setattr(single_dim_strategy, "register_single_dim_strategy", lambda *a, **k: (lambda fn: fn))
    # In its package, for its relative imports.
    module = load_module(os.path.join(tree, "torch/distributed/tensor/_ops/_matrix_ops.py"),
                         "torch.distributed.tensor._ops._patched_matrix_ops")
    patched = module.grouped_mm_single_dim_strategy

    def metas(*tensors):
        return tuple(None if t is None else TensorMeta(t.shape, t.stride(), t.dtype) for t in tensors)

    offs = torch.tensor([2, 4, 6, 8], dtype=torch.int32)
    cases = [
        metas(torch.empty(8, 8), torch.empty(4, 8, 6), offs),
        metas(torch.empty(8, 8), torch.empty(4, 8, 6), offs, torch.empty(4, 6)),
        metas(torch.empty(4, 4, 8), torch.empty(8, 8), offs, torch.empty(4, 8)),
        metas(torch.empty(4, 8), torch.empty(8, 4), offs),
        metas(torch.empty(4, 4, 8), torch.empty(4, 8, 8)),
        metas(torch.empty(4, 4, 8), torch.empty(4, 8, 8), None, torch.empty(4, 8)),
    ]
    for args in cases:
        rules = ours(torch.ops.moe_ops.grouped_mm.default, args, {})
        assert repr(patched(torch.ops.aten._grouped_mm.default, args, {})) == repr(rules)
    # Both reject mismatched operands with the checks' message.
    bad = metas(torch.empty(8, 5), torch.empty(4, 6, 8), offs)
    messages = []
    for op, strategy in ((torch.ops.moe_ops.grouped_mm.default, ours), (torch.ops.aten._grouped_mm.default, patched)):
        with pytest.raises(ValueError, match="contraction sizes differ") as info:
            strategy(op, bad, {})
        messages.append(str(info.value))
    assert messages[0] == messages[1]

    # distributed/0003: aten._scaled_grouped_mm's strategy, after grouped_mm's.
    (scaled,) = [info for info in fp8_op_db if info.name == "moe_ops.scaled_grouped_mm"]
    assert compare_strategies(module.scaled_grouped_mm_single_dim_strategy,
                              torch.ops.aten._scaled_grouped_mm.default, torch.ops.moe_ops.scaled_grouped_mm.default,
                              sample_cases(scaled)) > 0
    # ... and aten._scaled_grouped_mm_v2's, after it: v1's rules for the recipe v2 states.
    from opinfo_scaled_grouped_mm_v2 import op_db as v2_op_db
    v2_cases = [case for info in [*fp8_op_db, *v2_op_db] if info.name == "moe_ops.scaled_grouped_mm_v2"
                for case in sample_cases(info)]
    assert compare_strategies(module.scaled_grouped_mm_v2_single_dim_strategy,
                              torch.ops.aten._scaled_grouped_mm_v2.default,
                              torch.ops.moe_ops.scaled_grouped_mm_v2.default, v2_cases) > 0


def as_strategy_args(sample):
    """A sample's arguments as DTensor gives them to a single-dim strategy:
    tensors as TensorMeta, positional and keyword as the caller passed them."""
    from torch.distributed.tensor._dtensor_spec import TensorMeta

    def meta(v):
        if isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            return tuple(map(meta, v))  # a tensor list (v2's scales), as a TupleStrategy's metas
        return TensorMeta(v.shape, v.stride(), v.dtype) if isinstance(v, torch.Tensor) else v
    return tuple(map(meta, [sample.input, *sample.args])), {k: meta(v) for k, v in sample.kwargs.items()}


def ours_single_dim(op):
    """The in-repo strategy registered for a moe_ops op (without the guard,
    which wraps only the full-mesh filter)."""
    from torch.distributed.tensor import DTensor

    import torch_moe_ops.distributed  # noqa: F401  (registers them)
    return DTensor._op_dispatcher.sharding_propagator.op_single_dim_strategy_funcs[op].func


def sample_cases(info):
    """Every OpInfo sample of every dtype, as a strategy gets it."""
    return [as_strategy_args(s) for dtype in sorted(info.dtypes, key=str) for s in info.sample_inputs("cpu", dtype)]


def compare_strategies(patched, aten_op, ours_op, cases):
    """The patched strategy gives the in-repo one's rules on every case
    ((args, kwargs) as DTensor passes them), or raises the same error.
    Returns how many rules the cases gave (the comparison bites only on
    cases with rules)."""
    ours = ours_single_dim(ours_op)
    assert cases
    rules = 0
    for args, kwargs in cases:
        try:
            expected = repr(ours(ours_op, args, kwargs))
        except (RuntimeError, ValueError) as e:
            with pytest.raises(type(e), match=re.escape(str(e))):
                patched(aten_op, args, kwargs)
            continue
        assert repr(patched(aten_op, args, kwargs)) == expected, (ours_op, args, kwargs)
        rules += expected.count("[") - 1
    return rules


def test_patched_moe_strategies_register_and_match_ours(tree, meta, aten, monkeypatch):
    """distributed/0002's new module _ops/_moe_ops.py, imported against the
    installed torch with torch.ops.aten as the patched yaml generates it and
    the meta helpers of the compile series: it registers one strategy for
    each of the routing and fp8 quantisation aten ops (the upstream names of
    the yaml), with our schema info, and each gives the in-repo strategy's
    rules (or error) on every OpInfo sample."""
    import torch._meta_registrations as upstream_meta
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._ops import single_dim_strategy

    for family in ("routing", "fp8"):
        for name in names.family_checks(family).values():
            monkeypatch.setattr(upstream_meta, name, meta[name], raising=False)
    registered = {}

    def record(op, **kwargs):
        def register(fn):
            assert str(op) not in registered, f"{op} registered twice"
            registered[str(op)] = (op, kwargs, fn)
            return fn
        return register
    monkeypatch.setattr(single_dim_strategy, "register_single_dim_strategy", record)
    monkeypatch.setattr(torch.ops, "aten", aten)
    module = load_module(os.path.join(tree, "torch/distributed/tensor/_ops/_moe_ops.py"),
                         "torch.distributed.tensor._ops._patched_moe_ops")
    monkeypatch.undo()  # the real torch.ops.aten and meta helpers again; the module keeps what it imported
    ours_ops = ["router_topk", "permute", "unpermute", "unpermute_backward", "quantize_fp8", "dequantize_fp8",
                "swizzle_mx_scale"]
    upstream = native_functions.upstream_names()
    assert sorted(registered) == sorted(f"aten.{upstream[op]}.default (generated; runs moe_ops.{op}.default)"
                                        for op in ours_ops)
    propagator = DTensor._op_dispatcher.sharding_propagator
    by_op = {}
    for op_name in ours_ops:
        op, kwargs, fn = registered[f"aten.{upstream[op_name]}.default (generated; runs moe_ops.{op_name}.default)"]
        ours_op = getattr(torch.ops.moe_ops, op_name).default
        assert isinstance(op, proof.GeneratedOverload) and op.impl is ours_op
        ours_single_dim(ours_op)
        assert kwargs.pop("schema_info") == propagator.op_to_schema_info_for_single_dim_strategy[ours_op], op_name
        assert kwargs == {}, (op_name, kwargs)
        by_op[op_name] = (fn, op, ours_op)
    infos = {info.name.removeprefix("moe_ops."): info for info in [*routing_op_db, *fp8_op_db]}
    for op_name, (fn, op, ours_op) in by_op.items():
        if op_name == "unpermute_backward":  # no OpInfo of its own: unpermute's samples, as its backward gets them
            extra = []
            for s in infos["unpermute"].sample_inputs("cpu", torch.float64):
                permuted, dst_rows, weights = s.input, s.args[0], (s.args[1] if len(s.args) > 1 else None)
                grad = torch.empty(dst_rows.shape[0], permuted.shape[1], dtype=permuted.dtype)
                sample = SampleInput(grad, args=(dst_rows, permuted.shape[0], weights, permuted))
                extra.append(as_strategy_args(sample))
            cases = extra
        else:
            cases = sample_cases(infos[op_name])
        rules = compare_strategies(fn, op, ours_op, cases)
        # swizzle_mx_scale is replicated only: its cases check the errors and the empty list.
        assert rules > 0 or op_name == "swizzle_mx_scale", f"{op_name}: no sample gives a sharding rule"


def unresolved_globals(source, path):
    """Names a module reads as globals that nothing binds: not a module-level name, an import or a builtin
    (a NameError upstream the first time the code runs)."""
    import builtins
    import symtable
    top = symtable.symtable(source, path, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()
             or s.is_namespace()}
    missing = set()

    def walk(table):
        for sym in table.get_symbols():
            if sym.is_referenced() and (sym.is_global() or table is top) and not sym.is_assigned() \
                    and sym.get_name() not in bound and not hasattr(builtins, sym.get_name()):
                missing.add(sym.get_name())
        for child in table.get_children():
            walk(child)
    walk(top)
    return sorted(missing)


MOE_PASS_FILES = sorted({c.path for p in manifest.SERIES[1].patches for c in p.changes
                         if isinstance(c, (manifest.FxPassModule, manifest.PassTests))})


@pytest.mark.parametrize("path", MOE_PASS_FILES)
def test_patched_moe_pass_files_resolve_every_name(tree, path):
    with open(os.path.join(tree, path)) as f:
        source = f.read()
    assert not unresolved_globals(source, path)
    assert "moe_ops" not in source.replace("_moe_", "")
    assert unresolved_globals("def f():\n    return nowhere\n", "x.py") == ["nowhere"]  # the check bites


def test_patched_moe_hooks_reach_the_passes(tree):
    """The patched hooks import names the patched pass modules define, under a switch the patched config
    defines (off by default), and run where the custom passes run (just before them)."""
    import ast
    def read(rel):
        with open(os.path.join(tree, rel)) as f:
            return f.read()
    config = ast.parse(read("torch/_inductor/config.py"))
    switch = [n for n in config.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "moe_passes" for t in n.targets)]
    assert len(switch) == 1 and "TORCHINDUCTOR_MOE_PASSES" in ast.unparse(switch[0].value)
    for hook, custom in (("pre_grad", "pre_grad_custom_pass"), ("post_grad", "post_grad_custom_post_pass")):
        source = read(f"torch/_inductor/fx_passes/{hook}.py")
        imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.level == 1
                   and n.module and n.module.startswith("moe_")]
        assert len(imports) == 1, hook
        (imp,) = imports
        module = ast.parse(read(f"torch/_inductor/fx_passes/{imp.module}.py"))
        defined = {name for node in module.body for name in rewrite.top_level_names(node)}
        assert {a.name for a in imp.names} <= defined, (hook, imp.module)
        assert source.index("if config.moe_passes:") < source.index(f"for {custom} in get_custom_graph_passes(")


@pytest.fixture(scope="module")
def patched_moe_passes(tree, aten):
    """The patched torch/_inductor/fx_passes/moe_*.py, imported from the patched tree as a package of their
    own (their relative imports resolve among them, everything else against the installed torch), with
    torch.ops.aten the patched yaml's: the aten ops they insert run our kernels of the same schema."""
    import types
    package = "patched_fx_passes"
    pkg = types.ModuleType(package)
    pkg.__path__ = [os.path.join(tree, "torch/_inductor/fx_passes")]
    sys.modules[package] = pkg
    modules = {}
    try:
        for name in ("moe_fx_utils", "moe_group_limit", "moe_router", "moe_combine"):
            spec = importlib.util.spec_from_file_location(f"{package}.{name}",
                                                          os.path.join(tree, f"torch/_inductor/fx_passes/{name}.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            module.torch = _TorchWithAten(aten)
            modules[name] = module
        yield modules
    finally:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]


def test_patched_moe_passes_rewrite_traced_graphs(patched_moe_passes):
    """The patched passes, as the patched hooks run them (moe_router.rewrite_routers before the pre-grad
    custom pass, moe_combine.run before the post-grad custom post pass; here in those slots), rewrite a
    stock router and a stock combine compiled with dynamic shapes into the patched aten ops (run by our
    kernels), bump the patched counter, and give eager's ids and, within fp32 / bf16 rounding, its values.
    test_compile_passes.py's TestMoERouterPass, TestMoERouterGroupLimitPass and TestMoECombinePass (the patched
    test file) test the same code in depth."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    from test_compile_passes import _GroupLimitedRouter, _SoftmaxRouter, _stock_combine, _routing
    fx_utils, router, combine = (patched_moe_passes[n] for n in ("moe_fx_utils", "moe_router", "moe_combine"))
    assert fx_utils.COUNTER == "moe_passes"
    with torch._inductor.config.patch(pre_grad_custom_pass=router.rewrite_routers,
                                      post_grad_custom_post_pass=combine.run, fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        counters.clear()
        logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
        fn = _SoftmaxRouter(2, True)
        (weights, ids), codes = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=True), logits)
        assert dict(counters["moe_passes"]) == {"router_topk": 1}
        assert any("moe_ops.router_topk" in c for c in codes)
        want = fn(logits)
        assert torch.equal(ids.long(), want[1])
        torch.testing.assert_close(weights, want[0], rtol=2.0 ** -20, atol=0)

        # DeepSeek-V3's group-limited selection (moe_group_limit.py, compile/0003): both top-k unsorted
        torch._dynamo.reset()
        counters.clear()
        fn = _GroupLimitedRouter(3, 4, 2, 12)
        bias = torch.randn(12, generator=torch.Generator().manual_seed(1)) / 4
        logits = torch.randn(9, 12, generator=torch.Generator().manual_seed(0))
        (weights, ids), codes = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=True), logits, bias)
        assert dict(counters["moe_passes"]) == {"router_topk": 1}
        assert any("moe_ops.router_topk" in c for c in codes)
        want = fn(logits, bias)
        got_order, want_order = ids.long().argsort(-1), want[1].argsort(-1)
        assert torch.equal(ids.long().gather(-1, got_order), want[1].gather(-1, want_order))
        torch.testing.assert_close(weights.gather(-1, got_order), want[0].gather(-1, want_order),
                                   rtol=2.0 ** -19, atol=2.0 ** -29)

        torch._dynamo.reset()
        counters.clear()
        ids, w = _routing(11, 4, 2, {0, 2, 3}, 1)
        g = torch.Generator().manual_seed(2)
        x, w1 = torch.randn(11, 8, generator=g).bfloat16(), torch.randn(4, 8, 16, generator=g).bfloat16()
        with torch.no_grad():
            out, codes = run_and_get_code(torch.compile(_stock_combine, fullgraph=True, dynamic=True),
                                          x, ids, w.bfloat16(), w1)
            want = _stock_combine(x, ids, w.bfloat16(), w1)
        assert dict(counters["moe_passes"]) == {"unpermute": 1}
        assert any("moe_ops.unpermute" in c for c in codes)
        # each side within 3 bf16 roundings (k + 1) of the exact combine
        torch.testing.assert_close(out.float(), want.float(), rtol=6 * 2.0 ** -8, atol=6 * 2.0 ** -8)
    torch._dynamo.reset()


# (c2) What each PR carries besides code; its size ------------------------------

def patch_files():
    """(Patch, its .patch file) for every patch of the series, in order."""
    out = []
    for series in manifest.SERIES:
        files = series_files(PATCHES, series.name)
        assert len(files) == len(series.patches), f"patches/{series.name}: run python -m patches.generate"
        out += list(zip(series.patches, files))
    return out


def test_each_pr_within_the_size_limit():
    """Every PR is at most sizes.LIMIT changed lines (expect files aside), or
    is one of sizes.OVER_LIMIT and within the ceiling recorded there (those
    wait for a split of the in-repo sources, named with them)."""
    assert set(sizes.OVER_LIMIT) <= {p.message for p in PATCH_LIST}, "OVER_LIMIT names a patch the manifest lacks"
    over, stale = [], []
    for patch, path in patch_files():
        with open(path) as f:
            size = sizes.pr_size(f.read())
        known = sizes.OVER_LIMIT.get(patch.message)
        if known is None and size > sizes.LIMIT:
            over.append(f"{patch.message}: {size} lines > {sizes.LIMIT}")
        elif known is not None and size > known[0]:
            over.append(f"{patch.message}: {size} lines, over its recorded ceiling {known[0]}")
        elif known is not None and size <= sizes.LIMIT:
            stale.append(f"{patch.message}: {size} lines, within the limit now")
    assert not over, "PRs too big (patches/sizes.py): " + "; ".join(over)
    assert not stale, "drop from sizes.OVER_LIMIT: " + "; ".join(stale)


def test_size_counts_changed_lines_but_not_expect_files():
    def diff(path, added, removed=0):
        return (f"diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n@@ -1,{removed} +1,{added} @@\n"
                + "+x\n" * added + "-y\n" * removed + " context\n")

    text = "Subject: [PATCH] t\n---\n" + diff("aten/src/ATen/native/Big.cpp", sizes.LIMIT, 1) + diff(
        "test/expect/HasDecompTest.test_has_decomposition.expect", 40)
    assert sizes.patch_sizes(text) == {"aten/src/ATen/native/Big.cpp": sizes.LIMIT + 1,
                                       "test/expect/HasDecompTest.test_has_decomposition.expect": 40}
    assert sizes.pr_size(text) == sizes.LIMIT + 1 > sizes.LIMIT


def test_new_ops_are_in_the_decomposition_expect_file(tree):
    """HasDecompTest lists every aten overload with a Tensor in its schema, no
    CompositeImplicitAutograd kernel and no decomposition: each new op of the
    series is one, so each is added (sorted), and nothing else changes."""
    from torchgen.gen import parse_native_yaml

    base_lines = base.rebuild(HAS_DECOMPOSITION_EXPECT).splitlines()
    # The rebuild is the test's own computation: upstream ops with kernels and
    # no decomposition are there, ops with one are not.
    assert {"aten::_grouped_mm", "aten::_scaled_grouped_mm"} <= set(base_lines)
    assert not {"aten::addmm", "aten::gelu", "aten::_softmax"} & set(base_lines)
    with open(os.path.join(tree, HAS_DECOMPOSITION_EXPECT)) as f:
        lines = f.read().splitlines()
    assert lines == sorted(lines) and set(base_lines) <= set(lines)
    parsed = parse_native_yaml(os.path.join(tree, "aten/src/ATen/native/native_functions.yaml"),
                               os.path.join(tree, "aten/src/ATen/native/tags.yaml"))
    new = {op.upstream.name for op in native_functions.upstreamed() if not op.upstream.extends}
    wanted = set()
    for fn in parsed.native_functions:
        if str(fn.func.name.name) in new:
            assert fn.func.name.overload_name == "", fn.func.name  # the series adds no .out variants
            assert not fn.has_composite_implicit_autograd_kernel
            assert any("Tensor" in str(a.type) for a in [*fn.func.arguments.flat_all, *fn.func.returns])
            wanted.add(f"aten::{fn.func.name}")
    assert {n.removeprefix("aten::") for n in wanted} == new
    assert set(lines) - set(base_lines) == wanted


def test_decomp_expect_rejects_an_unsorted_or_listed_file():
    change = DecompExpect("routing")
    with pytest.raises(PatchError, match="is not sorted"):
        change.apply("aten::b\naten::a\n")
    with pytest.raises(PatchError, match="already lists aten::_moe_permute"):
        change.apply("aten::_moe_permute\n")
    assert change.apply("aten::_a\naten::_z\n").splitlines() == [
        "aten::_a", "aten::_moe_permute", "aten::_moe_router_topk", "aten::_moe_unpermute",
        "aten::_moe_unpermute_backward", "aten::_z"]


class _TorchGroupedMM:
    """torch, whose _grouped_mm is the given function (the patched op, run by our kernel)."""

    def __init__(self, grouped_mm):
        self._grouped_mm = grouped_mm

    def __getattr__(self, name):
        return getattr(torch, name)


def run_upstream_test_matmul(tree, grouped_mm):
    """test/test_matmul.py of the series, its CPU tests run with torch._grouped_mm = grouped_mm."""
    path = os.path.join(tree, "test/test_matmul.py")
    namespace = {"__name__": "patched_test_matmul"}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    namespace["torch"] = _TorchGroupedMM(grouped_mm)
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(namespace["TestGroupedMMCPU"])
    stream = io.StringIO()
    return unittest.TextTestRunner(stream=stream, verbosity=0).run(suite), stream.getvalue()


def test_upstream_test_matmul_passes_against_the_kernel(tree):
    """The device-generic tests the series adds to PyTorch's test/, run on CPU
    with _grouped_mm as the patched yaml makes it (our kernel); they fail for
    a kernel off by 2^-10 relative, and for v2.14.1's CPU _grouped_mm (no bias,
    no fp32 output, no float64)."""
    result, log = run_upstream_test_matmul(tree, torch.ops.moe_ops.grouped_mm.default)
    assert result.testsRun >= 45 and result.wasSuccessful() and not result.skipped, log

    def off(*args, **kwargs):
        out = torch.ops.moe_ops.grouped_mm.default(*args, **kwargs)
        return out + out.abs() * 2.0 ** -10

    result, _ = run_upstream_test_matmul(tree, off)
    assert len(result.failures) >= 20
    result, _ = run_upstream_test_matmul(tree, torch._grouped_mm)  # the wheel's
    failed = {t.id().rsplit(".", 1)[1] for t, _ in result.failures + result.errors}
    assert {"test_grouped_mm_bias_layout_2d3d_cpu_float32", "test_grouped_mm_out_dtype_float32_cpu_bfloat16",
            "test_grouped_mm_layouts_layout_2d3d_cpu_float64"} <= failed


@pytest.mark.skipif(not torch_moe_ops.cuda_kernels_built(),
                    reason="CPU-only build: the device-generic fallback is reached through the CUDA entry's test op")
@pytest.mark.parametrize("pr, tests, off_failures", [(0, 17, 10), (1, 19, 10), (2, 33, 20), (3, 48, 20)])
def test_first_prs_test_matmul_pass_on_the_fallback(tmp_path, pr, tests, off_failures):
    """The grouped mm stack's first four PRs (the base contract in the 2D x 3D and 3D x 2D layouts; the
    values of offs; the 2D x 2D and 3D x 3D layouts; bias and the float32 output) compute on CPU through
    grouped_mm_fallback (the device-generic loop of ATen matmuls; the kernel is the PR after them):
    test/test_matmul.py, as each leaves it, passes with _grouped_mm = the CUDA entry on CPU tensors (the
    checks, then that fallback), and fails for it off by 2^-10 relative. That entry takes all the series'
    contract; what a PR still refuses (bias and another out_dtype before the fourth; 2D x 2D and 3D x 3D
    in the first two) its checks refuse first, as its meta function states them (_checks.py with the
    source_edits of the PR's meta block, or of the last one before it), so the tests of those refusals run
    against the PR's messages."""
    text = None
    for patch in manifest.SERIES[0].patches[:pr + 1]:
        text = next(c for c in patch.changes
                    if isinstance(c, manifest.Copy) and c.path == "test/test_matmul.py").apply(text)
    (tmp_path / "test").mkdir()
    (tmp_path / "test/test_matmul.py").write_text(text)
    meta = [c for patch in manifest.SERIES[0].patches[:pr + 1] for c in patch.changes
            if isinstance(c, manifest.Meta)][-1]
    checks = pathlib.Path(manifest.REPO_ROOT, names.CHECKS).read_text()
    for old, new in meta.source_edits:
        checks = rewrite.replace_once(checks, old, new, names.CHECKS)
    staged = {"__name__": "staged_checks"}
    exec(compile(checks, names.CHECKS, "exec"), staged)
    full = torch.ops.moe_ops_testing.grouped_mm_cuda_entry_on_host.default

    def staged_entry(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
        staged["check_grouped_mm_inputs"](mat_a, mat_b, offs, bias, out_dtype)
        return full(mat_a, mat_b, offs, bias, out_dtype)

    # The PR with the whole contract (no source_edits) compiles the op itself (test_grouped_mm_bias_compiled).
    entry = staged_entry if meta.source_edits else full
    with torch.library._scoped_library("moe_ops_testing", "FRAGMENT") as lib:
        # test_grouped_mm_bias_compiled compiles it: its fake is the kernel's (the same checks and shapes).
        torch.library.register_fake("moe_ops_testing::grouped_mm_cuda_entry_on_host",
                                    torch.ops.moe_ops.grouped_mm.default, lib=lib)
        result, log = run_upstream_test_matmul(str(tmp_path), entry)
    assert result.testsRun == tests and result.wasSuccessful() and not result.skipped, log

    def off(*args, **kwargs):
        out = entry(*args, **kwargs)
        return out + out.abs() * 2.0 ** -10

    result, _ = run_upstream_test_matmul(str(tmp_path), off)
    assert len(result.failures) >= off_failures


def test_commit_author_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(generate.AUTHOR_ENV, raising=False)
    assert generate.author() == ("torch-moe-ops", "torch-moe-ops@users.noreply.github.com")
    monkeypatch.setenv(generate.AUTHOR_ENV, " Ada Lovelace <ada@example.org> ")
    repo = str(tmp_path)
    generate.git(repo, "init", "--quiet")
    generate.git(repo, "commit", "--quiet", "--allow-empty", "--message", "t")
    assert generate.git(repo, "log", "--format=%an <%ae>|%cn <%ce>") == (
        "Ada Lovelace <ada@example.org>|Ada Lovelace <ada@example.org>\n")
    for bad in ("Ada", "<ada@example.org>", "Ada <ada>", "Ada <a@b> <c@d>"):
        monkeypatch.setenv(generate.AUTHOR_ENV, bad)
        with pytest.raises(PatchError, match=r"PATCH_AUTHOR: expected 'Name <email>'"):
            generate.author()


# Carried files that still name this project (none now; the set only shrinks).
PROJECT_NAMES = re.compile(r"moe_ops::|TORCH_MOE_OPS|torch_moe_ops|torch-moe-ops")
PROJECT_NAMES_PENDING: set[str] = set()


def test_carried_files_name_nothing_of_this_project(tree):
    """No file the series adds or edits names this project (its namespace,
    macros, paths) except the C++ files pending in PROJECT_NAMES_PENDING."""
    found = set()
    for path in series_paths(tree, "A") + series_paths(tree, "M"):
        with open(os.path.join(tree, path), encoding="utf-8") as f:
            if PROJECT_NAMES.search(f.read()):
                found.add(path)
    assert found == PROJECT_NAMES_PENDING, (
        f"name this project: {sorted(found - PROJECT_NAMES_PENDING)}; "
        f"clean now (drop from PROJECT_NAMES_PENDING): {sorted(PROJECT_NAMES_PENDING - found)}")


# (d) ----------------------------------------------------------------------

def test_series_up_to_date(tmp_path, monkeypatch):
    monkeypatch.delenv(generate.AUTHOR_ENV, raising=False)
    generate.generate(str(tmp_path))
    diffs = []
    for name in SERIES:
        committed = {os.path.basename(p): p for p in series_files(PATCHES, name)}
        fresh = {os.path.basename(p): p for p in series_files(str(tmp_path), name)}
        for base in sorted(committed.keys() | fresh.keys()):
            old = open(committed[base]).readlines() if base in committed else []
            new = open(fresh[base]).readlines() if base in fresh else []
            diffs += difflib.unified_diff(old, new, f"patches/{name}/{base}", f"regenerated/{name}/{base}")
    assert not diffs, ("patches/ is stale; run `python -m patches.generate` and commit the result:\n"
                       + "".join(diffs[:200]))


# Errors of the generator name the file (and line) ---------------------------

def test_error_source_missing_on_disk():
    change = manifest.Copy("aten/src/ATen/native/Missing.cpp", "torch_moe_ops/csrc/ATen/native/Missing.cpp")
    line = sys._getframe().f_lineno - 1
    with pytest.raises(PatchError, match=rf"test/test_patches.py:{line}: source "
                                         r"torch_moe_ops/csrc/ATen/native/Missing.cpp does not exist"):
        change.apply(None)


def test_error_source_missing_from_manifest(tmp_path, monkeypatch):
    # In the upstream-mirror tree: carry it or move it out.
    extra = tmp_path / "torch_moe_ops/csrc/ATen/native/cpu/NewKernel.cpp"
    extra.parent.mkdir(parents=True)
    extra.write_text("// a kernel nobody listed\n")
    monkeypatch.setattr(manifest, "REPO_ROOT", str(tmp_path))
    with pytest.raises(PatchError, match=r"^torch_moe_ops/csrc/ATen/native/cpu/NewKernel.cpp: is in the "
                                         r"upstream-mirror tree .* carry it, or move it to torch_moe_ops/csrc/moe/"):
        manifest.check_coverage()
    # Elsewhere in csrc/: decide.
    extra.unlink()
    other = tmp_path / "torch_moe_ops/csrc/other/New.cpp"
    other.parent.mkdir(parents=True)
    other.write_text("// a source nobody listed\n")
    with pytest.raises(PatchError, match=r"^torch_moe_ops/csrc/other/New.cpp: is in neither"):
        manifest.check_coverage()


def test_error_edit_no_longer_applies():
    edit = manifest.Edit("tools/autograd/derivatives.yaml", [("- name: no_such_op(", "")])
    with pytest.raises(PatchError, match=r"^tools/autograd/derivatives.yaml: edit no longer applies: "
                                         r"anchor '- name: no_such_op\(' not found"):
        edit.apply("- name: mm(Tensor self, Tensor mat2) -> Tensor\n")


def test_error_patch_no_longer_applies(tmp_path):
    root = str(tmp_path)
    generate.init_base_repo(root)
    path = os.path.join(root, "aten/src/ATen/native/native_functions.yaml")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("    CUDA: _grouped_mm_cuda\n", "    CUDA: _grouped_mm_cuda_v2\n"))
    with pytest.raises(PatchError, match=r"patch failed: aten/src/ATen/native/native_functions.yaml:\d+"):
        generate.git(root, "apply", "--check", *series_files(PATCHES, "core"))


def test_error_yaml_rejected_by_torchgen(tree, tmp_path):
    root = str(tmp_path)
    shutil.copytree(os.path.join(tree, "aten"), os.path.join(root, "aten"))
    path = os.path.join(root, "aten/src/ATen/native/native_functions.yaml")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("    CPU: grouped_mm_cpu\n", "    CPUU: grouped_mm_cpu\n"))
    line = text[:text.index("- func: _grouped_mm(")].count("\n") + 1
    with pytest.raises(PatchError, match=rf"(?s)^aten/src/ATen/native/native_functions.yaml: torchgen rejects.*"
                                         rf"aten/src/ATen/native/native_functions.yaml:{line}"):
        generate.validate(root, ["aten/src/ATen/native/native_functions.yaml"])


def test_error_python_rejected():
    bad = textwrap.dedent("""\
        def grouped_mm_layout(a, b):
            return _checks.not_carried(a)
    """)
    with pytest.raises(PatchError, match=r"^x.py:2: _checks.not_carried has no upstream name"):
        rewrite.rename(bad, "x.py", {}, module_alias="_checks")


def test_error_pass_module_naming_an_op_that_stays_here():
    """A carried pass module may name only ops that go upstream, and no other part of this package."""
    from patches import fx_passes
    src = "import torch\n\nrepl = torch.ops.moe_ops.grouped_mm_gather.default\n"
    with pytest.raises(PatchError, match=r"^x.py:3: torch.ops.moe_ops.grouped_mm_gather does not go upstream"):
        fx_passes.rename_ops(src, "x.py")
    with pytest.raises(PatchError, match=r"^x.py:2: mentions moe_ops with no upstream spelling"):
        fx_passes.rename_ops("import torch\n# see torch.ops.moe_ops_testing\n", "x.py")
    assert fx_passes.rename_ops("f = torch.ops.moe_ops.unpermute.default  # moe_ops::router_topk\n", "x.py") == \
        "f = torch.ops.aten._moe_unpermute.default  # aten::_moe_router_topk\n"
    with pytest.raises(PatchError, match=r"^x.py:1: imports from torch_moe_ops outside the carried modules"):
        fx_passes.rename_imports("from ..ops.routing import router_topk\n", "x.py", {})
    with pytest.raises(PatchError, match=r"^x.py:2: imports .pre_grad, which is not carried upstream"):
        fx_passes.rename_imports("import torch\nfrom .pre_grad import run\n", "x.py", {"_fx": "moe_fx_utils"})
    assert fx_passes.rename_imports("from . import _fx\nfrom ._fx import count\n", "x.py", {"_fx": "moe_fx_utils"}) \
        == "from . import moe_fx_utils as _fx\nfrom .moe_fx_utils import count\n"



def test_pass_tests_extend_the_file_an_earlier_pr_added(tmp_path):
    """PassTests(extends=True) appends its definitions before run_tests(), may use what the file defines,
    and refuses a file that is not there yet, a definition carried twice, a name neither carries, a header."""
    src = tmp_path / "t.py"
    src.write_text("import torch\n\nA = 1\n\n\nclass Base:\n    pass\n\n\ndef helper():\n    return A\n\n\n"
                   "class TestOne(Base):\n    x = A\n\n\nclass TestTwo(Base):\n    y = helper()\n")
    first = manifest.PassTests("test/t.py", str(src), "import torch", ["A", "Base", "TestOne"])
    text = first.apply(None)
    second = manifest.PassTests("test/t.py", str(src), "", ["helper", "TestTwo"], extends=True)
    both = second.apply(text)
    assert both == text.replace('\n\n\nif __name__', "\n\n\ndef helper():\n    return A\n\n\nclass TestTwo(Base):\n"
                                "    y = helper()\n\n\nif __name__")
    assert both.endswith('\n\n\nif __name__ == "__main__":\n    run_tests()\n')
    with pytest.raises(PatchError, match="does not exist yet"):
        second.apply(None)
    with pytest.raises(PatchError, match="exists upstream"):
        first.apply(text)
    with pytest.raises(PatchError, match=r"already defines \['Base'\]"):
        manifest.PassTests("test/t.py", str(src), "", ["Base", "TestTwo"], extends=True).apply(text)
    with pytest.raises(PatchError, match="helper is used by TestTwo but not carried upstream"):
        manifest.PassTests("test/t.py", str(src), "", ["TestTwo"], extends=True).apply(text)
    with pytest.raises(PatchError, match="takes no header"):
        manifest.PassTests("test/t.py", str(src), "import os", ["helper", "TestTwo"], extends=True).apply(text)


def test_fx_pass_module_grows_over_prs(tmp_path):
    """A pass module a stack grows (the router: ungrouped, then with its group limit): the earlier PR
    carries it with edits, the later one (update=True) the source itself, which needs the earlier's file;
    without update=True a second FxPassModule of the module is refused."""
    src = tmp_path / "m.py"
    src.write_text("from .extra import more\n\n\ndef f():\n    return more()\n")
    modules = {"extra": "moe_extra"}
    first = manifest.FxPassModule("moe_m", str(src), modules, edits=[
        ("from .extra import more\n", ""), ("    return more()\n", "    return 1\n")])
    text = first.apply(None)
    assert text == "\n\ndef f():\n    return 1\n"
    later = manifest.FxPassModule("moe_m", str(src), modules, update=True)
    assert later.apply(text) == "from .moe_extra import more\n\n\ndef f():\n    return more()\n"
    with pytest.raises(PatchError, match="an update needs an earlier FxPassModule"):
        later.apply(None)
    with pytest.raises(PatchError, match="exists upstream"):
        manifest.FxPassModule("moe_m", str(src), modules).apply(text)


# Names and yaml entries derived from the declaration ------------------------

def test_upstream_names_follow_the_rule():
    """The rule of patches/names.py on the shapes of names it meets: an op's
    name leads (the longest that fits), else the family's prefix."""
    assert names.helper_name("check_unpermute_backward_inputs", "routing") == "_moe_unpermute_backward_check_inputs"
    assert names.helper_name("permute_num_rows", "routing") == "_moe_permute_num_rows"
    assert names.helper_name("ROUTER_SCORE_FUNCS", "routing") == "_MOE_ROUTER_SCORE_FUNCS"
    assert names.helper_name("GROUPED_MM_DTYPES", "grouped_mm") == "_GROUPED_MM_DTYPES"
    assert names.helper_name("_c10", "grouped_mm") == "_grouped_mm_c10"
    assert names.helper_name("_fp8_c10", "fp8") == "_fp8_c10"
    assert names.helper_name("fp8_check_recipe", "fp8") == "_fp8_check_recipe"
    assert names.helper_name("scaled_grouped_mm_out_dtype", "fp8") == "_scaled_grouped_mm_out_dtype"
    assert names.helper_name("_check_scaled_grouped_mm_scale", "fp8") == "_scaled_grouped_mm_check_scale"
    with pytest.raises(PatchError, match="expert_mlp does not go upstream"):
        names.aten_name("expert_mlp")


def test_family_checks_are_what_the_fake_kernels_reach():
    """Each family carries the checks its fake kernels reach and no other;
    those an earlier family carries are shared, not repeated."""
    grouped, routing, fp8 = (set(names.family_checks(f)) for f in ("grouped_mm", "routing", "fp8"))
    assert "check_grouped_mm_inputs" in grouped and "_c10" in grouped
    assert "check_permute_inputs" in routing and "_c10" not in routing
    assert "check_scaled_grouped_mm_inputs" in fp8 and not fp8 & (grouped | routing)
    # grouped_mm_gather's checks stay here: no fake kernel of an upstreamed op reaches them.
    assert "check_grouped_mm_gather_inputs" not in grouped | routing | fp8


def test_yaml_entries_from_the_declaration():
    """A new op's entry is its declared schema under the aten name with its
    dispatch (keys sharing a kernel on one line); an extended entry gets the
    declared keys first in its dispatch."""
    from patches.native_yaml import Dispatch, NativeFunctions

    base = ("- func: _grouped_mm(Tensor self) -> Tensor\n  variants: function\n  dispatch:\n"
            "    CUDA: _grouped_mm_cuda\n\n# NOTE\n")
    extended = Dispatch("grouped_mm").apply(base)
    assert "  dispatch:\n    CPU: grouped_mm_cpu\n    CUDA: _grouped_mm_cuda\n" in extended
    patched = NativeFunctions("fp8", after="_grouped_mm").apply(extended)
    assert ("    CUDA: _grouped_mm_cuda\n\n- func: _quantize_fp8(Tensor x, str recipe, ScalarType? float8_dtype=None, "
            "Tensor? offs=None, bool swizzle=False) -> (Tensor data, Tensor scale)\n") in patched
    assert "  dispatch:\n    CPU, CUDA: swizzle_mx_scale\n\n# NOTE\n" in patched
    assert "_scaled_grouped_mm" not in patched  # upstream has it: Dispatch extends its entry instead
    with pytest.raises(PatchError, match="expected one entry '- func: _no_such_op\\('"):
        NativeFunctions("fp8", after="_no_such_op").apply(base)
    # An op selection (a PR of one op) writes only its entries; a name not of the family is an error.
    one = NativeFunctions("fp8", after="_grouped_mm", ops=("swizzle_mx_scale",)).apply(extended)
    assert "- func: _swizzle_mx_scale(" in one and "_quantize_fp8" not in one
    with pytest.raises(PatchError, match=r"\['permute'\] are not new upstream ops of the fp8 family"):
        NativeFunctions("fp8", after="_grouped_mm", ops=("permute",)).apply(extended)
    with pytest.raises(PatchError, match=r"\['scaled_grouped_mm'\] are not new upstream ops of the fp8 family"):
        NativeFunctions("fp8", after="_grouped_mm", ops=("scaled_grouped_mm",)).apply(extended)
    with pytest.raises(PatchError, match=r"\['permute'\] are not upstreamed ops of the fp8 family"):
        DecompExpect("fp8", ops=("permute",)).names()


def test_yaml_entries_of_some_ops_of_a_family():
    """NativeFunctions(ops=...): a stack that adds a family's ops one PR at a
    time writes only those entries; an op the family does not send upstream
    as a new entry is an error."""
    from patches.native_yaml import NativeFunctions

    base = "- func: _grouped_mm(Tensor self) -> Tensor\n  variants: function\n\n# NOTE\n"
    permute = NativeFunctions("routing", after="_grouped_mm", later=("CUDA",), ops=("permute",)).apply(base)
    assert permute.count("- func: _moe_") == 1 and "- func: _moe_permute(Tensor tokens" in permute
    assert "    CPU: moe_permute_cpu\n" in permute and "CUDA" not in permute
    both = NativeFunctions("routing", after="_moe_permute", ops=("unpermute",)).apply(permute)
    assert [line.split("(")[0] for line in both.splitlines() if line.startswith("- func: ")] == \
        ["- func: _grouped_mm", "- func: _moe_permute", "- func: _moe_unpermute"]
    with pytest.raises(PatchError, match=r"\['grouped_mm'\] are not new upstream ops of the routing family"):
        NativeFunctions("routing", after="_grouped_mm", ops=("grouped_mm",)).apply(base)


def test_meta_blocks_of_some_ops_of_a_family():
    """Meta(ops=..., earlier_ops=...): each block carries its ops' meta
    functions and the checks they reach; a check an earlier block of the
    family carries is called, not repeated (unpermute_backward's checks call
    unpermute's)."""
    from patches.meta import Meta

    upstream = "import torch\n\n\ndef meta_grouped_mm(mat_a, mat_b):\n    return mat_a\n"
    first = Meta("routing", "# unpermute\n", after="meta_grouped_mm", ops=("unpermute",)).apply(upstream)
    assert "def _moe_unpermute_check_inputs(" in first and "def meta_moe_unpermute(" in first
    for other in ("meta_moe_permute", "meta_moe_router_topk", "meta_moe_unpermute_backward",
                  "_moe_unpermute_backward_check_inputs", "_moe_permute_check_inputs"):
        assert other not in first, other
    second = Meta("routing", "# unpermute_backward\n", after="meta_moe_unpermute",
                  ops=("unpermute_backward",), earlier_ops=("unpermute",)).apply(first)
    assert second.startswith(first.split("\n\n\n# unpermute\n")[0])
    assert second.count("def _moe_unpermute_check_inputs(") == 1
    assert "def _moe_unpermute_backward_check_inputs(" in second
    assert "        _moe_unpermute_check_inputs(permuted, dst_rows, weights)\n" in second
    assert second.index("def meta_moe_unpermute(") < second.index("# unpermute_backward\n")
    with pytest.raises(PatchError, match=r"\['grouped_mm'\] are not upstreamed ops of the routing family"):
        Meta("routing", "#\n", after="meta_grouped_mm", ops=("grouped_mm",)).apply(upstream)


def test_opinfo_module_of_some_ops_of_a_family():
    """OpInfoModule(ops=...): the module holds only those ops' OpInfos and what
    they use (references inlined, imports); the module of more ops is a
    superset line for line, so a later PR that rewrites it only adds."""
    from patches.opinfo import OpInfoModule

    def module(*ops):
        return OpInfoModule("routing", "moe_routing", "Title.", ops=ops).apply(None)

    permute, both, every = module("permute"), module("permute", "unpermute"), module("router_topk", "permute", "unpermute")
    assert 'opinfo("permute"' in permute and 'opinfo("unpermute"' not in permute
    for other in ("torch_unpermute", "sample_inputs_unpermute", "torch_router_topk", "gradcheck_router_topk",
                  "_routing_acc"):
        assert other not in permute, other
    compile(permute, "moe_routing.py", "exec")
    # The imports are those the kept code uses (none left over for flake8 to flag).
    tree = rewrite.parse(permute, "moe_routing.py")
    imported = {a.asname or a.name.split(".")[0] for n in tree.body if isinstance(n, (ast_mod.Import, ast_mod.ImportFrom))
                for a in n.names}
    used = {n.id for n in ast_mod.walk(tree) if isinstance(n, ast_mod.Name)}
    assert imported - {"torch"} <= used, imported - used
    for smaller, larger in ((permute, both), (both, every)):
        removed = [line for line in difflib.ndiff(smaller.splitlines(), larger.splitlines()) if line.startswith("- ")]
        assert not removed, removed
    assert every == OpInfoModule("routing", "moe_routing", "Title.").apply(None)
    with pytest.raises(PatchError, match=r"ops=\['grouped_mm'\]: no such op of the routing family"):
        module("grouped_mm")



def test_stack_3_meta_blocks_partition_the_fp8_checks():
    """Stack 3's meta blocks, one per op PR, carry every check of the fp8 family once between them, each
    block the checks its ops reach but an earlier block's; each block names only its ops' meta functions.
    _scaled_grouped_mm lands over four PRs (rowwise in two layout steps, blockwise, MX): each later recipe's
    block grows the one before by the checks it left out (the layouts' PR rewrites the rowwise block in place:
    the same checks, its layout refusal gone)."""
    from patches import fp8_stages
    metas = [c for p in manifest.SERIES[0].patches for c in p.changes
             if isinstance(c, manifest.Meta) and c.family == "fp8"]
    sgmm = ("scaled_grouped_mm",)
    quantize, dequantize = ((op,) for op in manifest.FP8_QUANTIZE_OPS)
    assert [m.ops for m in metas] == [quantize, dequantize, ("swizzle_mx_scale",), sgmm, sgmm, sgmm, sgmm,
                                      ("scaled_grouped_mm_v2",)]
    assert [m.update for m in metas] == [False, False, False, False, True, True, True, False]
    carried = [set(m.carried_checks()) for m in metas]
    assert carried[3] == carried[4] < carried[5] < carried[6]
    assert carried[6] - carried[3] == set(fp8_stages.CHECKS_LATER)
    assert carried[6] - carried[5] == set(fp8_stages.CHECKS_MX)
    final = carried[:3] + carried[6:]
    assert set().union(*final) == set(names.family_checks("fp8"))
    assert sum(map(len, final)) == len(names.family_checks("fp8"))  # disjoint
    assert "check_dequantize_fp8_inputs" in carried[1] and "fp8_scale_size" in carried[0]
    assert "check_scaled_grouped_mm_inputs" in carried[3] and "check_swizzle_mx_scale_inputs" in carried[2]
    sgmm_earlier = (*manifest.FP8_QUANTIZE_OPS, "swizzle_mx_scale")
    assert [tuple(m.earlier_ops) for m in metas] == [(), quantize, manifest.FP8_QUANTIZE_OPS, sgmm_earlier,
                                                     sgmm_earlier, sgmm_earlier, sgmm_earlier,
                                                     (*sgmm_earlier, "scaled_grouped_mm")]
    assert list(metas[2].meta_names().values()) == ["meta_swizzle_mx_scale"]
    with pytest.raises(PatchError, match=r"\['router_topk'\] are not upstreamed ops of the fp8 family"):
        names.op_checks("fp8", ("router_topk",))


def test_opinfo_module_grows_one_op_per_pr():
    """The fp8 OpInfo module of stack 3: the first PR writes it, each later one appends its op's
    definitions and widens op_db; carrying a definition twice, or extending a module not written yet, is
    an error."""
    from patches.opinfo import OpInfoModule
    first = OpInfoModule("fp8", "fp8", "OpInfos.", carried=manifest.FP8_OPINFOS["quantize_fp8_opinfos"],
                         op_db=manifest.fp8_op_db("quantize_fp8_opinfos"))
    text = first.apply(None)
    assert text.startswith('# mypy: ignore-errors\n\n"""OpInfos."""\n\nimport unittest\n')
    assert "def torch_quantize_fp8(" in text and "def torch_swizzle_mx_scale(" not in text
    assert "torch_moe_ops" not in text and "moe_ops" not in text.replace("_moe_", "")
    second = OpInfoModule("fp8", "fp8", "", carried=manifest.FP8_OPINFOS["swizzle_mx_scale_opinfos"],
                          extends=True, op_db=manifest.fp8_op_db("quantize_fp8_opinfos", "swizzle_mx_scale_opinfos"))
    grown = second.apply(text)
    assert grown.startswith(text[:text.index("\n\n\nop_db = [")])
    assert grown.count("def torch_swizzle_mx_scale(") == 1 and grown.count("def _fp8_swizzle(") == 1
    assert grown.endswith(manifest.fp8_op_db("quantize_fp8_opinfos", "swizzle_mx_scale_opinfos"))
    with pytest.raises(PatchError, match="does not exist yet"):
        second.apply(None)
    with pytest.raises(PatchError, match=r"already defines \['_offs'\]"):
        OpInfoModule("fp8", "fp8", "", carried=["_offs"], extends=True, op_db="op_db = []\n").apply(text)
    with pytest.raises(PatchError, match="exists already"):
        first.apply(text)


def _compiled_grouped_mm_bias_error(mm_grouped_path, op_name):
    """Largest |compiled - eager| of aten.<op_name> with a bias on CPU: its CPU and Meta kernels those of
    moe_ops.<op_name without its underscore> (what the series makes of them), Inductor's grouped mm
    lowerings those of the module at mm_grouped_path (the wheel's or the patched one)."""
    import importlib.util
    from torch._inductor import lowering

    op = getattr(torch.ops.aten, op_name).default
    ours = getattr(torch.ops.moe_ops, op_name.lstrip("_")).default
    saved_lowerings = {o: lowering.lowerings.get(o) for o in (torch.ops.aten._grouped_mm.default,
                                                              torch.ops.aten._scaled_grouped_mm.default)}
    saved_meta = op.py_kernels.get(torch._C.DispatchKey.Meta)
    try:
        with torch.library._scoped_library("aten", "IMPL") as lib:
            lib.impl(op_name, ours, "CPU")
            lib.impl(op_name, ours, "Meta")
            op.py_kernels[torch._C.DispatchKey.Meta] = ours
            op._dispatch_cache.clear()
            spec = importlib.util.spec_from_file_location("torch._inductor.kernel.mm_grouped", mm_grouped_path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))  # (re-)registers the lowerings
            gen = torch.Generator().manual_seed(0)
            offs = torch.tensor([3, 3, 8], dtype=torch.int32)
            bias = torch.randn(3, 32, generator=gen)
            if op_name == "_grouped_mm":
                args = (torch.randn(8, 16, generator=gen), torch.randn(3, 16, 32, generator=gen))
            else:
                a, sa = torch.ops.moe_ops.quantize_fp8(torch.randn(8, 16, generator=gen), "rowwise")
                b, sb = torch.ops.moe_ops.quantize_fp8(torch.randn(3, 32, 16, generator=gen), "rowwise")
                args = (a, b.transpose(-2, -1), sa, sb)
                bias = bias.bfloat16()

            def fn(*args):
                return op(*args, offs=offs, bias=bias)

            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                torch._dynamo.reset()
                got = torch.compile(fn, fullgraph=True)(*args)
            return (got.float() - fn(*args).float()).abs().max().item()
    finally:
        torch._dynamo.reset()
        for o, saved in saved_lowerings.items():
            lowering.lowerings[o] = saved
        if saved_meta is not None:
            op.py_kernels[torch._C.DispatchKey.Meta] = saved_meta
        op._dispatch_cache.clear()


@pytest.mark.parametrize("op_name", ["_grouped_mm", "_scaled_grouped_mm"])
def test_patched_inductor_lowering_keeps_the_bias(tree, op_name):
    """Inductor's grouped mm lowerings hand their choices mat_a, mat_b, the scales and offs, never the bias:
    with the series' metas accepting one, the wheel's lowering returns the product without it (the control
    below, off by about the bias), the patched one (core/0001.1, core/0006c1) runs the op with it."""
    import torch._inductor.kernel.mm_grouped as wheel_module
    assert _compiled_grouped_mm_bias_error(wheel_module.__file__, op_name) > 0.5
    patched = os.path.join(tree, "torch/_inductor/kernel/mm_grouped.py")
    assert _compiled_grouped_mm_bias_error(patched, op_name) <= 1e-5

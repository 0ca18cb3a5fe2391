"""Proof that the upstream patch series (patches/) apply and work.

What the tests rebuild: the PyTorch v2.14.1 files the series touch, from the
installed wheel (patches/base.py), in a scratch git repository. Every series is
checked with ``git apply --check`` and applied with ``git am``, in order. On
the result:

* torchgen parses native_functions.yaml and derivatives.yaml and gen_autograd
  generates the backward node of _grouped_mm; the new autograd header compiles
  against the wheel's headers, and the CPU kernel as each CPU-capability build
  of ATen compiles it;
* every patched Python file compiles; the patched meta function, OpInfo and
  DTensor strategy are run against this package's kernels;
* regenerating the series reproduces patches/ byte for byte;
* bad input to the generator fails naming the file (and line).

What only a source build of PyTorch (with a GPU for the CUDA file) can prove,
the kernels compiled in-tree, is listed in patches/README.md.
"""

import difflib
import filecmp
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torchgen
from torch._subclasses.fake_tensor import FakeTensorMode

import torch_moe_ops  # noqa: F401
from patches import generate, manifest, rewrite
from patches.errors import PatchError

from opinfo import error_inputs_grouped_mm, sample_inputs_grouped_mm
from opinfo_fp8 import op_db as fp8_op_db
from test_fp8 import assert_scaled_mm_close
from torch_moe_ops.reference import torch_scaled_grouped_mm
from opinfo_routing import op_db as routing_op_db

PATCHES = os.path.dirname(os.path.abspath(generate.__file__))
SERIES = [s.name for s in manifest.SERIES]
NUM_PATCHES = sum(len(s.patches) for s in manifest.SERIES)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def series_files(root, name):
    return sorted(glob.glob(os.path.join(root, name, "*.patch")))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The base tree with every committed series applied, as git am would."""
    root = str(tmp_path_factory.mktemp("pytorch"))
    generate.init_base_repo(root)
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
    assert len(copies) == 19
    for change in copies:
        assert filecmp.cmp(os.path.join(tree, change.path), os.path.join(manifest.REPO_ROOT, change.source),
                           shallow=False), change.path


# (b) ----------------------------------------------------------------------

def test_torchgen_accepts_the_yaml_and_generates_the_backward(tree, tmp_path):
    from torchgen.gen import parse_native_yaml
    from torchgen.model import DispatchKey
    from torchgen.packaged.autograd.gen_autograd import gen_autograd
    from torchgen.selective_build.selector import SelectiveBuilder

    native = os.path.join(tree, "aten/src/ATen/native/native_functions.yaml")
    tags = os.path.join(tree, "aten/src/ATen/native/tags.yaml")
    parsed = parse_native_yaml(native, tags)
    (fn,) = [f for f in parsed.native_functions if str(f.func.name) == "_grouped_mm"]
    kernels = parsed.backend_indices
    assert kernels[DispatchKey.CPU].get_kernel(fn).kernel == "grouped_mm_cpu"
    assert kernels[DispatchKey.CUDA].get_kernel(fn).kernel == "_grouped_mm_cuda"
    for op in ("router_topk", "permute", "unpermute", "unpermute_backward"):
        (fn,) = [f for f in parsed.native_functions if str(f.func.name) == f"_moe_{op}"]
        assert kernels[DispatchKey.CPU].get_kernel(fn).kernel == f"moe_{op}_cpu"
        assert kernels[DispatchKey.CUDA].get_kernel(fn).kernel == f"moe_{op}_cuda"
    for op in ("quantize_fp8", "dequantize_fp8"):
        (fn,) = [f for f in parsed.native_functions if str(f.func.name) == f"_{op}"]
        assert kernels[DispatchKey.CPU].get_kernel(fn).kernel == f"{op}_cpu"
        assert kernels[DispatchKey.CUDA].get_kernel(fn).kernel == f"{op}_cuda"
    (fn,) = [f for f in parsed.native_functions if str(f.func.name) == "_swizzle_mx_scale"]
    assert kernels[DispatchKey.CPU].get_kernel(fn).kernel == kernels[DispatchKey.CUDA].get_kernel(fn).kernel == \
        "swizzle_mx_scale"
    (fn,) = [f for f in parsed.native_functions if str(f.func.name) == "_scaled_grouped_mm"]
    assert kernels[DispatchKey.CPU].get_kernel(fn).kernel == "scaled_grouped_mm_cpu"
    assert kernels[DispatchKey.CUDA].get_kernel(fn).kernel == "_scaled_grouped_mm_cuda"

    # gen_autograd reads every template; the series only patch Functions.cpp.
    autograd = os.path.join(tree, "tools/autograd")
    templates = os.path.join(os.path.dirname(torchgen.__file__), "packaged/autograd/templates")
    for path in glob.glob(os.path.join(templates, "*")):
        dest = os.path.join(autograd, "templates", os.path.basename(path))
        if not os.path.exists(dest):
            shutil.copyfile(path, dest)
    gen_autograd(native, tags, str(tmp_path), autograd, SelectiveBuilder.get_nop_selector())
    functions = (tmp_path / "Functions.cpp").read_text()
    assert '#include "torch/csrc/autograd/GroupedMMBackward.h"' in functions
    for call in ("grouped_mm_mat_a_backward(grad, mat2, offs, self_scalar_type)",
                 "grouped_mm_mat_b_backward(grad, self, mat2, offs, self_scalar_type)",
                 "grouped_mm_bias_backward(grad, self, mat2, offs)"):
        assert call in functions
    assert "struct TORCH_API GroupedMmBackward0" in (tmp_path / "Functions.h").read_text()
    assert '#include "torch/csrc/autograd/MoERoutingBackward.h"' in functions
    for call in ("moe_router_topk_backward(grad, logits, expert_ids, score_func, renormalize, scaling_factor)",
                 "at::_moe_unpermute(grad, dst_rows)",
                 "_moe_unpermute_backward_symint(grad, dst_rows, permuted_sym_argsize_0, weights, "):
        assert call in functions, call
    header = (tmp_path / "Functions.h").read_text()
    for node in ("MoeRouterTopkBackward0", "MoePermuteBackward0", "MoeUnpermuteBackward0"):
        assert f"struct TORCH_API {node}" in header


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_autograd_header_compiles(tree, tmp_path):
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    src = tmp_path / "use.cpp"
    src.write_text('#include "torch/csrc/autograd/GroupedMMBackward.h"\n'
                   '#include "torch/csrc/autograd/MoERoutingBackward.h"\n')
    subprocess.run(["g++", "-std=c++20", "-fsyntax-only", f"-I{tree}", f"-I{include}", str(src)],
                   check=True, capture_output=True)


def test_backward_headers_match_python(tree, tmp_path):
    """The backward headers restate our Python autograd in C++: compile them
    into scratch ops and compare (router_topk on every score function, the
    weight gradient of grouped_mm on both weight layouts)."""
    from torch.utils.cpp_extension import load_inline

    source = textwrap.dedent("""
        #include <torch/library.h>
        #include "torch/csrc/autograd/GroupedMMBackward.h"
        #include "torch/csrc/autograd/MoERoutingBackward.h"

        at::Tensor grouped_mm_mat_b_backward(const at::Tensor& grad, const at::Tensor& mat_a,
                                             const at::Tensor& mat_b, const at::Tensor& offs) {
          return torch::autograd::generated::details::grouped_mm_mat_b_backward(
              grad, mat_a, mat_b, offs, mat_a.scalar_type());
        }

        at::Tensor router_topk_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& ids,
                                        c10::string_view score_func, bool renormalize, double scaling_factor) {
          return torch::autograd::generated::details::moe_router_topk_backward(
              grad, logits, ids, score_func, renormalize, scaling_factor);
        }

        TORCH_LIBRARY(moe_patch_test, m) {
          m.def("router_topk_backward(Tensor grad, Tensor logits, Tensor ids, str score_func, bool renormalize, "
                "float scaling_factor) -> Tensor", &router_topk_backward);
          m.def("grouped_mm_mat_b_backward(Tensor grad, Tensor mat_a, Tensor mat_b, Tensor offs) -> Tensor",
                &grouped_mm_mat_b_backward);
        }
    """)
    load_inline("moe_patch_test", source, extra_include_paths=[str(tree)], extra_cflags=["-std=c++20"],
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


# ATen builds native/cpu/ files once per CPU capability, each with its own
# macros and ISA flags (cmake/Codegen.cmake); the extension builds them once.
# Compile the carried kernel the in-tree ways, so that the capability branches
# of its DispatchStub registration are checked too.
CPU_CAPABILITY_BUILDS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


@pytest.mark.parametrize("kernel", ["GroupedMMKernel.cpp", "MoERoutingKernel.cpp", "MoEQuantizeKernel.cpp",
                                    "MoEScaledGroupedMMKernel.cpp"])
@pytest.mark.parametrize("capability", sorted(CPU_CAPABILITY_BUILDS))
def test_cpu_kernel_compiles_per_capability(tree, capability, kernel):
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    kernel = os.path.join(tree, "aten/src/ATen/native/cpu", kernel)
    flags = ["-std=c++20", "-fsyntax-only", "-fopenmp", f"-DCPU_CAPABILITY={capability}",
             f"-DCPU_CAPABILITY_{capability}", "-DHAVE_AVX512_CPU_DEFINITION", "-DHAVE_AVX2_CPU_DEFINITION",
             f"-I{os.path.join(tree, 'aten/src')}", f"-I{include}"]
    result = subprocess.run(["g++", *flags, *CPU_CAPABILITY_BUILDS[capability], kernel],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


# (c) ----------------------------------------------------------------------

def patched_python_files(tree):
    out = generate.git(tree, "diff", "--name-only", f"HEAD~{NUM_PATCHES}", "HEAD", "--", "*.py")
    return out.split()


def test_patched_python_compiles(tree):
    files = patched_python_files(tree)
    assert len(files) == 8
    for path in files:
        with open(os.path.join(tree, path)) as f:
            compile(f.read(), path, "exec")


@pytest.fixture(scope="module")
def meta(tree):
    """The generated part of the patched torch/_meta_registrations.py, run in
    a scratch namespace (importing the whole file would register every meta
    function again)."""
    path = os.path.join(tree, "torch/_meta_registrations.py")
    with open(path) as f:
        source = f.read()
    names = (list(manifest.CHECK_NAMES.values()) + ["meta_grouped_mm"] + list(manifest.ROUTING_CHECK_NAMES.values())
             + [meta_name for meta_name, _ in manifest.ROUTING_FAKES.values()]
             + list(manifest.FP8_CHECK_NAMES.values()) + [meta_name for meta_name, _ in manifest.FP8_FAKES.values()]
             + ["meta_scaled_grouped_mm"])
    new_ops = ("_quantize_fp8", "_dequantize_fp8", "_swizzle_mx_scale")

    class Aten:
        """torch.ops.aten, plus names for the ops the core series adds (the
        decorators only evaluate them)."""

        def __getattr__(self, name):
            return name if name.startswith("_moe_") or name in new_ops else getattr(torch.ops.aten, name)

    namespace = {"torch": torch, "Optional": __import__("typing").Optional, "aten": Aten(),
                 "register_meta": lambda op: (lambda fn: fn)}
    generated = "\n\n".join(rewrite.definition(source, path, name) for name in names)
    exec(compile(generated, path, "exec"), namespace)
    return namespace


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
    check_meta_against_kernel(meta[f"meta_moe_{info.name.split('.')[-1]}"], info,
                              (torch.float32, torch.bfloat16, torch.float64), value_errors="ids_values")


@pytest.mark.parametrize("info", fp8_op_db, ids=lambda info: info.name)
def test_patched_fp8_meta_matches_the_kernels(meta, info):
    """meta_quantize_fp8, meta_dequantize_fp8, meta_swizzle_mx_scale, and
    meta_scaled_grouped_mm on CPU fake tensors (its CPU branch), against the
    CPU kernels."""
    check_meta_against_kernel(meta[f"meta_{info.name.split('.')[-1]}"], info, info.dtypes,
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


def test_patched_routing_opinfo(tree):
    """The patched definitions module, instantiated for our kernels (the aten
    ops it names upstream do not exist in the wheel): samples match the refs,
    error inputs raise."""
    path = os.path.join(tree, "torch/testing/_internal/opinfo/definitions/moe_routing.py")
    with open(path) as f:
        source = f.read()
    upstream_db = 'op_db = make_routing_op_db(lambda op: f"_moe_{op}", lambda op: getattr(torch.ops.aten, f"_moe_{op}").default)'
    assert source.count(upstream_db) == 1
    namespace = {"__name__": "patched_moe_routing"}
    exec(compile(source.replace(upstream_db, ""), path, "exec"), namespace)
    ours = namespace["make_routing_op_db"](lambda op: f"moe_ops.{op}", lambda op: getattr(torch.ops.moe_ops, op).default)
    assert [info.name for info in ours] == ["moe_ops.router_topk", "moe_ops.permute", "moe_ops.unpermute"]
    for info in ours:
        for s in info.sample_inputs("cpu", torch.float64):
            torch.testing.assert_close(info.op(s.input, *s.args, **s.kwargs), info.ref(s.input, *s.args, **s.kwargs),
                                       rtol=1e-12, atol=1e-14, msg=lambda m: f"{info.name} {s.name}: {m}")
        for e in info.error_inputs("cpu"):
            with pytest.raises(e.error_type, match=e.error_regex):
                info.op(e.sample_input.input, *e.sample_input.args, **e.sample_input.kwargs)


def test_patched_fp8_opinfo(tree):
    """The patched fp8 definitions module, instantiated for our kernels (the
    aten ops it names upstream do not exist in the wheel): quantize and
    dequantize equal their refs bit for bit, scaled_grouped_mm is close to its
    float64 ref, error inputs raise."""
    path = os.path.join(tree, "torch/testing/_internal/opinfo/definitions/fp8.py")
    with open(path) as f:
        source = f.read()
    upstream_db = 'op_db = make_fp8_op_db(lambda op: f"_{op}", lambda op: getattr(torch.ops.aten, f"_{op}").default)'
    assert source.count(upstream_db) == 1
    namespace = {"__name__": "patched_fp8"}
    exec(compile(source.replace(upstream_db, ""), path, "exec"), namespace)
    ours = namespace["make_fp8_op_db"](lambda op: f"moe_ops.{op}", lambda op: getattr(torch.ops.moe_ops, op).default)
    assert [info.name for info in ours] == ["moe_ops.quantize_fp8", "moe_ops.dequantize_fp8",
                                            "moe_ops.scaled_grouped_mm", "moe_ops.swizzle_mx_scale"]
    for info in ours:
        dtype = torch.float32 if torch.float32 in info.dtypes else next(iter(info.dtypes))
        for s in info.sample_inputs("cpu", dtype):
            out = info.op(s.input, *s.args, **s.kwargs)
            ref = info.ref(s.input, *s.args, **s.kwargs)
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
            with pytest.raises(e.error_type, match=e.error_regex):
                info.op(e.sample_input.input, *e.sample_input.args, **e.sample_input.kwargs)


def test_patched_strategy_matches_ours(tree, meta, monkeypatch):
    """The generated aten._grouped_mm strategy decides as the in-repo one."""
    import torch.distributed as dist
    import torch._meta_registrations as upstream_meta
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy
    from torch.distributed.tensor._ops import utils
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torch_moe_ops.distributed.grouped_mm_strategy import grouped_mm_strategy

    # Its imports resolve to the patched meta helpers; registering it would
    # replace the wheel's aten._grouped_mm strategy for the whole session.
    for name in manifest.CHECK_NAMES.values():
        monkeypatch.setattr(upstream_meta, name, meta[name], raising=False)
    monkeypatch.setattr(utils, "register_op_strategy", lambda op: (lambda fn: fn))
    patched = load_module(os.path.join(tree, "torch/distributed/tensor/_ops/_grouped_mm_ops.py"),
                          "patched_grouped_mm_ops").grouped_mm_strategy

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (2, 2))

        def arg(t, placement):
            spec = DTensorSpec(mesh, (placement, Replicate()), TensorMeta(t.shape, t.stride(), t.dtype))
            return OpStrategy([OpSpec(spec)])

        offs = torch.tensor([2, 4, 6, 8], dtype=torch.int32)
        # (mat_a, mat_b, offs, bias), placements of mat_a and mat_b on mesh dim 0,
        # and the strategies offered per mesh dim (squared on the 2 x 2 mesh).
        cases = [
            ((torch.empty(8, 8), torch.empty(4, 8, 6), offs, None), (Shard(1), Shard(1)), 3),  # R, N, K
            ((torch.empty(4, 3, 8), torch.empty(8, 8), offs, torch.empty(4, 8)), (Replicate(), Shard(1)), 1),  # R
            ((torch.empty(3, 8), torch.empty(8, 4), offs, None), (Shard(1), Shard(0)), 2),  # R, N
            ((torch.empty(4, 3, 8), torch.empty(4, 8, 6), None, torch.empty(4, 6)), (Shard(0), Shard(0)), 3),  # R, G, N
        ]
        for tensors, (pa, pb), per_dim in cases:
            args = [arg(tensors[0], pa), arg(tensors[1], pb)] + [
                arg(t, Replicate()) if t is not None else None for t in tensors[2:]]
            decisions = []
            for op, strategy in ((torch.ops.moe_ops.grouped_mm.default, grouped_mm_strategy),
                                 (torch.ops.aten._grouped_mm.default, patched)):
                result = strategy(OpSchema(op, tuple(args), {}))
                decisions.append([str(s) for s in result.strategies])
            assert decisions[0] == decisions[1]
            assert len(decisions[0]) == per_dim ** 2
    finally:
        dist.destroy_process_group()


# (d) ----------------------------------------------------------------------

def test_series_up_to_date(tmp_path):
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
    extra = tmp_path / "torch_moe_ops/csrc/ATen/native/cpu/NewKernel.cpp"
    extra.parent.mkdir(parents=True)
    extra.write_text("// a kernel nobody listed\n")
    monkeypatch.setattr(manifest, "REPO_ROOT", str(tmp_path))
    with pytest.raises(PatchError, match=r"^torch_moe_ops/csrc/ATen/native/cpu/NewKernel.cpp: is in neither"):
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

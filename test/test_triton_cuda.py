"""The Triton kernels as the moe_ops ops' CUDA kernels (torch_moe_ops/triton/cuda.py):
what torch.compile sees on CUDA, proven without a GPU, and the package without
its compiled extension.

torch.compile's AOT dispatcher traces the forward and the backward under
``FunctionalTensorMode``; there, on CUDA tensors, each of grouped_mm,
grouped_mm_gather, expert_mlp and expert_mlp_backward decomposes into its
Triton kernels (``triton_kernel_wrapper_functional``, which Inductor compiles
as user-defined Triton kernels) and the device-side asserts of its value
checks. The tests trace with fake CUDA tensors (no GPU: the driver queries of
a launch, the SM count and the capability, are those of an H100) through
``make_fx(dispatch_functionalize(...))`` and through AOTAutograd
(``aot_function``, the inference graph: tracing a backward through autograd
on CUDA tensors needs a CUDA context, so the backward's ops are traced one by
one instead, for every layout the backward formulas call).

What only a GPU can verify: Inductor's compilation and launch of these graphs
(its code generation for CUDA queries the device), the joint forward-backward
graph of torch.compile, the kernels' runs and numerics (test_triton_*.py run
them in the interpreter), recompilation behaviour with real strides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import triton

import torch_moe_ops
from torch_moe_ops.triton import experts as tex
from torch_moe_ops.triton import fp8 as tf8
from torch_moe_ops.triton import grouped_mm as tgm

ROOT = Path(__file__).resolve().parents[1]
OUR_KERNELS = {tgm.grouped_mm_kernel, tex.expert_gemm_kernel, tex.combine_kernel, tf8.scaled_grouped_mm_kernel}

pytestmark = pytest.mark.skipif(
    not isinstance(tgm.grouped_mm_kernel, triton.runtime.JITFunction),
    reason="TRITON_INTERPRET=1 makes the kernels interpreted functions: nothing to trace")


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(tgm, "_num_sms", lambda index: 132)
    monkeypatch.setattr(tgm, "_capability", lambda index: (9, 0))


def _trace(fn, *args):
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(dispatch_functionalize(fn))(*args)


def _targets(graph):
    return [n.target for n in graph.graph.nodes if n.op == "call_function"]


def assert_triton_kernels_only(graph, kernels: int, asserts: int):
    """The graph holds the Triton kernels (ours) and the value checks' device
    asserts, and no moe_ops call (an opaque op Inductor could only call)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    targets = _targets(graph)
    opaque = [t for t in targets if str(t).startswith("moe_ops")]
    assert not opaque, opaque
    wrapped = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(wrapped) == kernels, [str(t) for t in targets]
    for node in wrapped:
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        kernel = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction
        assert kernel in OUR_KERNELS, kernel
    assert targets.count(torch.ops.aten._assert_async.msg) == asserts


def _fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def _e(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="cuda", dtype=dtype)


# (name, builder of args, kernels, asserts): grouped_mm's forward layout and every one its backward
# formulas call (ops/grouped_mm.py: 2D x 3D with transposed weights, 2D x 2D, 3D x 2D, 3D x 3D).
GROUPED_MM_CASES = [
    ("2d3d", lambda: (_e(250, 256), _e(4, 256, 128), _e(4, dtype=torch.int32))),
    ("2d3d_weights_nk", lambda: (_e(250, 128), _e(4, 256, 128).transpose(1, 2), _e(4, dtype=torch.int32))),
    ("2d2d_wgrad", lambda: (_e(250, 256).t(), _e(250, 128), _e(4, dtype=torch.int32))),
    ("3d2d", lambda: (_e(4, 64, 256), _e(256, 250), _e(4, dtype=torch.int32))),
    ("3d3d_bias_fp32_out", lambda: (_e(4, 64, 256), _e(4, 256, 128), None, _e(4, 128), torch.float32)),
]


@pytest.mark.parametrize("case", GROUPED_MM_CASES, ids=lambda c: c[0])
def test_grouped_mm_traces_into_the_triton_kernel(h100, case):
    _, make = case
    with _fake_cuda():
        args = make()
        graph = _trace(torch.ops.moe_ops.grouped_mm.default, *args)
    assert_triton_kernels_only(graph, kernels=1, asserts=1 if args[2] is not None else 0)


def test_grouped_mm_gather_traces_into_the_triton_kernel(h100):
    with _fake_cuda():
        offs = _e(4, dtype=torch.int32)
        rows = _e(250, dtype=torch.int64)
        up = _trace(torch.ops.moe_ops.grouped_mm_gather.default, _e(100, 256), _e(4, 256, 128), offs, rows)
        wgrad = _trace(torch.ops.moe_ops.grouped_mm_gather.default, _e(100, 256).t(), _e(250, 128), offs, rows)
        both = _trace(torch.ops.moe_ops.grouped_mm_gather.default, _e(64, 100), _e(100, 128), offs, rows, rows)
    # The index range checks (one per index) and offs's.
    assert_triton_kernels_only(up, kernels=1, asserts=2)
    assert_triton_kernels_only(wgrad, kernels=1, asserts=2)
    assert_triton_kernels_only(both, kernels=1, asserts=3)


def _expert_args(T=64, H=256, inter=128, E=4, k=2, dtype=torch.bfloat16):
    return (_e(T, H, dtype=dtype), _e(T * k, dtype=torch.int64), _e(E, dtype=torch.int32),
            _e(T, k, dtype=torch.int64), _e(T, k, dtype=torch.float32), _e(E, H, 2 * inter, dtype=dtype),
            _e(E, inter, H, dtype=dtype))


def test_expert_mlp_and_backward_trace_into_the_triton_kernels(h100):
    """Forward: gate/up GEMM with the activation epilogue, down GEMM with the
    weighted slot rows, combine. Backward: the dgrad with the activation's
    derivative, dh @ gate_up^T, its combine, and the 2D x 2D weight gradients
    and the routing weights' bias term through grouped_mm_gather's kernel. The
    routing checks: four device asserts."""
    with _fake_cuda():
        args = _expert_args()
        fwd = _trace(torch.ops.moe_ops.expert_mlp.default, *args)
        tokens, h = args[0], _e(128, 256)
        bwd = _trace(torch.ops.moe_ops.expert_mlp_backward.default, torch.empty_like(tokens), *args, None, None, h,
                     "swiglu", False, 1.702, 7.0, [True, True, True, True])
    assert_triton_kernels_only(fwd, kernels=3, asserts=4)
    assert_triton_kernels_only(bwd, kernels=5, asserts=4)


def test_grouped_mm_backward_formulas_trace_into_triton_kernels(h100):
    """grouped_mm's registered backward (ops/grouped_mm.py), run on fake CUDA
    tensors under the AOT dispatcher's mode: both gradients are Triton
    kernels (what the joint graph of torch.compile holds on a GPU)."""
    from torch_moe_ops.ops.grouped_mm import _backward, _setup_context

    def backward(a, b, offs, out, grad):
        ctx = types.SimpleNamespace(needs_input_grad=(True, True, False, False, False))
        ctx.save_for_backward = lambda *saved: setattr(ctx, "saved_tensors", saved)
        _setup_context(ctx, (a, b, offs, None, None), out)
        return _backward(ctx, grad)

    with _fake_cuda():
        a, b, offs = _e(250, 256), _e(4, 128, 256).transpose(1, 2), _e(4, dtype=torch.int32)
        graph = _trace(backward, a, b, offs, _e(250, 128), _e(250, 128))
    assert_triton_kernels_only(graph, kernels=2, asserts=2)


def test_scaled_grouped_mm_mx_traces_with_the_blocked_scale_assert(h100):
    """scaled_grouped_mm with mx scales on CUDA: its Triton kernel and the
    device-side value checks, offs's and, for each scale blocked per group
    (2D x 3D: A's; 2D x 2D: both), that it holds the bytes offs's groups read
    (the CPU kernel checks that on the host; here no host sync)."""
    e8, f8 = torch.float8_e8m0fnu, torch.float8_e4m3fn
    with _fake_cuda():
        a, b, offs = _e(250, 256, dtype=f8), _e(4, 128, 256, dtype=f8).transpose(1, 2), _e(4, dtype=torch.int32)
        up = _trace(torch.ops.moe_ops.scaled_grouped_mm, a, b, _e(250 + 4 * 128, 8, dtype=e8),
                    _e(4, 128, 8, dtype=e8), offs)
        toks = _e(4, dtype=torch.int32)
        wgrad = _trace(torch.ops.moe_ops.scaled_grouped_mm, _e(128, 256, dtype=f8), _e(64, 256, dtype=f8).t(),
                       _e(128, 8 + 16, dtype=e8), _e(128, 8 + 16, dtype=e8), toks)
    assert_triton_kernels_only(up, kernels=1, asserts=2)
    assert_triton_kernels_only(wgrad, kernels=1, asserts=4)  # offs, whole 32-blocks of K, two scales


def test_aot_autograd_graph_holds_the_triton_kernels(h100):
    """Through AOTAutograd itself (what torch.compile runs before Inductor):
    an MoE layer's expert GEMMs, gathered up-projection then down projection,
    compile to a graph of Triton kernels."""
    from functorch.compile import aot_function

    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm

    def experts(tokens, rows, offs, w1, w2):
        h = torch.ops.moe_ops.grouped_mm_gather(tokens, w1, offs, rows)
        return torch.ops.moe_ops.grouped_mm(torch.nn.functional.silu(h), w2, offs)

    compiled = aot_function(experts, fw_compiler=capture)
    with _fake_cuda():
        compiled(_e(100, 256), _e(250, dtype=torch.int64), _e(4, dtype=torch.int32), _e(4, 256, 512),
                 _e(4, 512, 256))
    (graph,) = graphs
    assert_triton_kernels_only(graph, kernels=2, asserts=3)


def test_other_devices_and_export_keep_the_op():
    """On CPU tensors the op stays one node (its CPU kernel), and so it does
    on CUDA under torch.export, which keeps custom Triton ops whole."""
    from torch.export._trace import _disable_custom_triton_op_functional_decomposition

    a, b, offs = torch.randn(10, 8), torch.randn(2, 8, 4), torch.tensor([3, 10], dtype=torch.int32)
    assert torch.ops.moe_ops.grouped_mm.default in _targets(_trace(torch.ops.moe_ops.grouped_mm.default, a, b, offs))
    with _fake_cuda():
        a, b, offs = _e(250, 256), _e(4, 256, 128), _e(4, dtype=torch.int32)
        with _disable_custom_triton_op_functional_decomposition():
            graph = _trace(torch.ops.moe_ops.grouped_mm.default, a, b, offs)
    assert _targets(graph) == [torch.ops.moe_ops.grouped_mm.default]


def test_compile_on_cpu_is_unchanged():
    """torch.compile (Inductor, CPU) of an op keeps calling its CPU kernel."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 8, generator=g), torch.randn(2, 8, 4, generator=g)
    offs = torch.tensor([3, 10], dtype=torch.int32)
    compiled = torch.compile(torch.ops.moe_ops.grouped_mm.default, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(a, b, offs), torch.ops.moe_ops.grouped_mm(a, b, offs))


# ------------------------------------------------- without the compiled extension

def _run_without_extension(code: str, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """code in a fresh interpreter importing a copy of the package without
    its compiled extension (as a checkout never built)."""
    shutil.copytree(ROOT / "torch_moe_ops", tmp_path / "torch_moe_ops",
                    ignore=shutil.ignore_patterns("_C*.so", "csrc", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_triton_kernels_and_references_work_without_the_extension(tmp_path):
    """A checkout whose _C is not built (a GPU machine with another torch and
    no compiler): torch_moe_ops.triton and torch_moe_ops.reference import and
    compute (the kernels in the interpreter here, against the float64
    references); the ops say that they need the extension."""
    result = _run_without_extension('''
        import torch
        import torch_moe_ops
        from torch_moe_ops.reference import torch_expert_mlp, torch_grouped_mm, torch_permute
        from torch_moe_ops.triton import triton_expert_mlp, triton_grouped_mm

        assert torch_moe_ops._C is None and not torch_moe_ops.cuda_kernels_built()
        assert not hasattr(torch.ops.moe_ops, "grouped_mm")
        g = torch.Generator().manual_seed(0)
        a, b = torch.rand(20, 16, generator=g), torch.rand(3, 16, 8, generator=g)
        offs = torch.tensor([4, 4, 17], dtype=torch.int32)
        out = triton_grouped_mm(a, b, offs)
        ref = torch_grouped_mm(a, b, offs, None, torch.float64)
        # values in [0, 1): the fp32 dot of 16 terms is within 18 * 2^-24 * ref of it
        assert ((out.double() - ref).abs() <= 18 * 2.0**-24 * ref + 1e-30).all()
        assert out[17:].eq(0).all()
        tokens = torch.rand(6, 16, generator=g)
        ids = torch.tensor([[0, 1], [1, 2], [2, 0], [1, 1], [0, 2], [2, 2]])
        _, dst_rows, src_rows, offs = torch_permute(tokens, ids, 3)
        w = torch.rand(6, 2, generator=g)
        w1, w2 = torch.rand(3, 16, 8, generator=g) - 0.5, torch.rand(3, 4, 16, generator=g) - 0.5
        got, _ = triton_expert_mlp(tokens, src_rows, offs, dst_rows, w, w1, w2)
        want, _ = torch_expert_mlp(tokens.double(), src_rows, offs, dst_rows, w.double(), w1.double(), w2.double())
        assert (got.double() - want).abs().max() < 1e-5, (got.double() - want).abs().max()
        for name in ("grouped_mm", "nn"):
            try:
                getattr(torch_moe_ops, name)
            except ImportError as e:
                assert "is not built in this checkout" in str(e)
            else:
                raise AssertionError(name)
        try:
            import torch_moe_ops.ops
        except ImportError as e:
            assert "torch_moe_ops.ops: torch_moe_ops._C" in str(e)
        else:
            raise AssertionError("torch_moe_ops.ops imported without _C")
        print("ok")
    ''', tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]

"""The Triton grouped GEMM (torch_moe_ops/triton/grouped_mm.py) in Triton's
interpreter, on CPU tensors, against the float64 references.

The kernel runs through ``InterpretedFunction`` (CPU tensors take that path in
``triton_grouped_mm``), so this module needs no ``TRITON_INTERPRET=1`` and
leaves the rest of the pytest process compiling Triton normally (it passes
with ``TRITON_INTERPRET=1`` too, but for the one trace of the compiled kernel). The
interpreter executes the kernel's program logic exactly as written: the
persistent schedule over groups read from ``offs``, the tail group, every mask,
the strides of both weight storage orders, the row gather and the epilogue.

Dtypes: float32 and float16 products are checked against the float64
reference; the interpreter's bfloat16 arithmetic is wrong (numpy has no
bfloat16: a bfloat16 ``tl.dot`` returns garbage there), so bfloat16 is checked
only on paths without a product (bias loads, zero fill, stores, out_dtype).

What only a GPU can verify: the compiled kernel's numerics (wgmma's fp32
accumulation order, tf32), the autotuner's choice, the memory model (cp.async
pipelining, races between programs), timing. test_triton_aot.py checks what the
compiler says about the sm_90a build.
"""

from __future__ import annotations

import operator

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_moe_ops  # noqa: F401  (moe_ops, for the OpInfo modules)
from torch_moe_ops import _checks
from torch_moe_ops.reference import torch_grouped_mm
from torch_moe_ops.triton import triton_grouped_mm, triton_grouped_mm_gather
from torch_moe_ops.triton import grouped_mm as tgm

from opinfo_grouped_mm import _offs, sample_inputs_grouped_mm, grouped_mm_opinfo
from opinfo_experts import gathered, grouped_mm_gather_opinfo, sample_inputs_grouped_mm_gather

# CPU runs the interpreter; with a GPU the same tests run the compiled kernel,
# and bfloat16 products are checked too (the interpreter's are wrong).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PRODUCT_DTYPES = [(d, t) for d in DEVICES for t in (torch.float32, torch.float16)
                  + ((torch.bfloat16,) if d == "cuda" else ())]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _abs(t):
    return None if t is None else t.abs()


def assert_close_to_reference(out, mat_a, mat_b, offs, bias, out_dtype):
    """Elementwise: |out - ref| <= tol, with tol per element from the standard
    bound of an fp32 dot product: every product and sum rounds once with unit
    roundoff u = 2^-24, along at most K products, K - 1 sums (any order, as
    tl.dot and numpy sum in blocks), the accumulate into acc and the bias add,
    so |acc - exact| <= (K + 2) u (|A||B| + |bias|)_ij; then one rounding to the
    output dtype adds u_out |acc_ij|. Elements no group covers and empty groups
    have |A||B| + |bias| = 0: they must be exactly zero (or exactly the bias)."""
    out_dtype = out_dtype or mat_a.dtype
    ref = torch_grouped_mm(mat_a, mat_b, offs, bias, torch.float64)
    magnitude = torch_grouped_mm(_abs(mat_a), _abs(mat_b), offs, _abs(bias), torch.float64)
    K = mat_a.shape[-1]
    acc_err = (K + 2) * 2.0**-24 * magnitude
    tol = 1.01 * (acc_err + UNIT_ROUNDOFF[out_dtype] * (ref.abs() + acc_err))
    assert out.dtype == out_dtype and out.shape == ref.shape
    err = (out.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} elements off, worst at {tuple(bad.nonzero()[0].tolist())}: "
                           f"err {err[bad].max().item():.3g} > tol {tol[bad].min().item():.3g}")


def _call(sample, fn=triton_grouped_mm):
    return fn(sample.input, *sample.args, **sample.kwargs)


def _samples(fn, opinfo, device, dtype):
    return list(fn(opinfo, device, dtype, requires_grad=False))


@pytest.mark.parametrize("device,dtype", PRODUCT_DTYPES, ids=str)
def test_opinfo_samples(device, dtype):
    """Every grouped_mm OpInfo sample (four layouts, empty groups, zero tokens,
    rows past offs[-1], transposed and strided operands, bias, fp32 out)."""
    samples = _samples(sample_inputs_grouped_mm, grouped_mm_opinfo, device, dtype)
    assert {s.name for s in samples} >= {"2d3d", "2d3d_b_transposed", "2d3d_zero_tokens", "3d2d", "2d2d", "3d3d"}
    for s in samples:
        out = _call(s)
        kw = s.kwargs
        assert_close_to_reference(out, s.input, s.args[0], kw["offs"], kw.get("bias"), kw.get("out_dtype"))


@pytest.mark.parametrize("device,dtype", PRODUCT_DTYPES, ids=str)
def test_gather_opinfo_samples(device, dtype):
    """Every grouped_mm_gather OpInfo sample: rows of A gathered over 3-D mat_b
    (unsorted, repeated and -1 rows, zero rows, rows past offs[-1]) and the
    2D x 2D gathers of K through a_index, b_index or both."""
    samples = _samples(sample_inputs_grouped_mm_gather, grouped_mm_gather_opinfo, device, dtype)
    assert {s.name for s in samples} >= {"2d3d", "2d3d_zero_tokens", "2d2d_a_index", "2d2d_b_index", "2d2d_both"}
    for s in samples:
        mat_b, offs = s.args
        kw = s.kwargs
        a_index, b_index = kw.get("a_index"), kw.get("b_index")
        out = triton_grouped_mm_gather(s.input, mat_b, offs, a_index, b_index, kw.get("bias"), kw.get("out_dtype"))
        a = gathered(s.input, a_index, 1 if mat_b.dim() == 2 else 0)
        assert_close_to_reference(out, a, gathered(mat_b, b_index, 0), offs, kw.get("bias"), kw.get("out_dtype"))


def _multi_tile_case(dtype, b_nk: bool):
    """Groups spanning several 16x16 tiles and 16-deep K steps of the
    interpreter's config, with a ragged K (40) and N (36)."""
    g = torch.Generator().manual_seed(0)
    sizes = [0, 37, 2, 33]
    a = torch.rand(sum(sizes) + 5, 40, generator=g).sub(0.5).to(dtype)
    b = torch.rand(len(sizes), 36, 40, generator=g).sub(0.5).to(dtype)
    b = b.transpose(1, 2) if b_nk else b.transpose(1, 2).contiguous()
    bias = torch.rand(len(sizes), 36, generator=g).to(dtype)
    return a, b, _offs(sizes, "cpu"), bias


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("b_nk", [False, True], ids=["b_kn", "b_nk"])
def test_persistent_schedule_independent_of_grid(b_nk, tma):
    """Weights stored (G, K, N) and (G, N, K), read by pointers or through a TMA
    descriptor (the interpreter emulates its bounds: zeros past each group's K
    and N). Each tile is computed whole by one program, so the result is
    bitwise the same for any number of persistent programs (1: one program
    walks every group; 40: more programs than tiles)."""
    a, b, offs, bias = _multi_tile_case(torch.float32, b_nk)
    assert b.stride(1) == (1 if b_nk else 36)
    assert tgm._prepare(a, b, offs, bias, None, tma=tma)[1]["B_DESC"] == (0 if not tma else 2 if b_nk else 1)
    outs = [triton_grouped_mm(a, b, offs, bias, num_programs=p, tma=tma) for p in (1, 3, 40)]
    assert_close_to_reference(outs[0], a, b, offs, bias, None)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_multi_tile_fp16_out_fp32():
    a, b, offs, bias = _multi_tile_case(torch.float16, False)
    out = triton_grouped_mm(a, b, offs, bias, out_dtype=torch.float32)
    assert_close_to_reference(out, a, b, offs, bias, torch.float32)


def test_tma_gather_and_batched():
    """The TMA path with gathered A rows (2D x 3D) and in 3D x 3D; tma=True
    refuses weights TMA cannot address (fp16 rows of 36 elements: 72 bytes)."""
    a, b, offs, bias = _multi_tile_case(torch.float32, True)
    index = torch.tensor([5, -1, 3] + list(range(70)) + [76, 76], dtype=torch.int64)[:72]
    out = triton_grouped_mm_gather(a, b, offs, index, None, bias, tma=True)
    assert_close_to_reference(out, gathered(a, index, 0), b, offs, bias, None)
    a3 = a[:60].reshape(4, 15, 40)
    out = triton_grouped_mm(a3, b, None, bias, tma=True)
    assert_close_to_reference(out, a3, b, None, bias, None)
    a16, b16, offs16, _ = _multi_tile_case(torch.float16, False)
    with pytest.raises(ValueError, match="tma=True needs mat_b 16-byte aligned"):
        triton_grouped_mm(a16, b16, offs16, tma=True)


@st.composite
def grouped_problems(draw):
    """Random group structures (empty groups, skew, rows/columns past offs[-1]),
    sizes ragged against the interpreter's 16-wide tiles, either storage order
    of both operands, bias, the persistent grid size and, for 3-D weights, TMA."""
    layout = draw(st.sampled_from(["2d3d", "3d2d", "2d2d", "3d3d"]))
    sizes = draw(st.lists(st.integers(0, 40), min_size=0 if layout != "3d3d" else 1, max_size=6))
    if sizes and draw(st.booleans()):  # skew: every row in one group
        total, sizes = sum(sizes), [0] * len(sizes)
        sizes[draw(st.integers(0, len(sizes) - 1))] = total
    dims = [draw(st.integers(1, 40)) for _ in range(3)]  # m, k, n
    flags = [draw(st.booleans()) for _ in range(3)]  # transpose a, transpose b, bias
    tma = draw(st.booleans())
    if tma:  # fp32 weights TMA can address: K and N multiples of 4 (16 bytes)
        dims[1], dims[2] = -(-dims[1] // 4) * 4, -(-dims[2] // 4) * 4
    return layout, sizes, draw(st.integers(0, 3)), dims, flags, draw(st.integers(1, 6)), tma


TMA_EXAMPLES: list = []


@settings(max_examples=40, deadline=None)
@given(grouped_problems(), st.integers(0, 2**31 - 1))
def test_property_matches_reference(problem, seed):
    layout, sizes, extra, (m, k, n), (ta, tb, with_bias), programs, tma = problem
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731
    G, total = len(sizes), sum(sizes)
    offs = _offs(sizes, "cpu") if layout != "3d3d" else None
    a, b = {"2d3d": lambda: (rand(total + extra, k), rand(G, k, n)),
            "3d2d": lambda: (rand(G, m, k), rand(k, total + extra)),
            "2d2d": lambda: (rand(m, total + extra), rand(total + extra, n)),
            "3d3d": lambda: (rand(G, m, k), rand(G, k, n))}[layout]()
    t = lambda x, flag: x.transpose(-2, -1).contiguous().transpose(-2, -1) if flag else x  # noqa: E731
    a, b = t(a, ta), t(b, tb)
    bias = rand(G, total + extra if layout == "3d2d" else n) if with_bias else None
    # TMA where the weights allow it (not for 2-D weights or empty ones); counted below.
    use_tma = tma and b.dim() == 3 and b.numel() > 0 and (tgm._tma_ok(b, 2) or tgm._tma_ok(b, 1))
    TMA_EXAMPLES.append(use_tma)
    out = triton_grouped_mm(a, b, offs, bias, num_programs=programs, tma=use_tma)
    assert_close_to_reference(out, a, b, offs, bias, None)


def test_property_examples_reached_tma():
    """The examples above (derandomised: the same on every run) include TMA ones."""
    if not TMA_EXAMPLES:
        test_property_matches_reference()
    assert sum(TMA_EXAMPLES) >= 3, TMA_EXAMPLES


def test_bfloat16_load_store_paths():
    """bfloat16 without products (the interpreter's bfloat16 dot is wrong):
    empty contractions give exactly the bias, in bfloat16 and as float32;
    rows past offs[-1] are exactly zero."""
    bias = torch.randn(4, 10, dtype=torch.bfloat16)
    empty_k = [  # (mat_a, mat_b, offs): K = 0 in 3D x 3D, every K group empty in 2D x 2D
        (torch.randn(4, 6, 0, dtype=torch.bfloat16), torch.randn(4, 0, 10, dtype=torch.bfloat16), None),
        (torch.randn(6, 0, dtype=torch.bfloat16), torch.randn(0, 10, dtype=torch.bfloat16),
         torch.zeros(4, dtype=torch.int32)),
    ]
    for a, b, offs in empty_k:
        for out_dtype in (None, torch.float32):
            out = triton_grouped_mm(a, b, offs, bias, out_dtype=out_dtype)
            assert torch.equal(out, bias.to(out_dtype or bias.dtype)[:, None].expand(4, 6, 10))
    a, b = torch.randn(13, 12, dtype=torch.bfloat16), torch.randn(4, 12, 10, dtype=torch.bfloat16)
    out = triton_grouped_mm(a, b, _offs([3, 0, 5, 2], "cpu"), bias)
    assert torch.equal(out[10:], torch.zeros(3, 10, dtype=torch.bfloat16))


def test_rejects_what_grouped_mm_rejects():
    """The checks are grouped_mm's own (torch_moe_ops._checks), messages included."""
    a, b = torch.randn(5, 4), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="offs is required"):
        triton_grouped_mm(a, b)
    with pytest.raises(ValueError, match="out_dtype must be the input dtype"):
        triton_grouped_mm(a, b, _offs([2, 3], "cpu"), out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="mat_a must be float32, float16, bfloat16 or float64, got Int"):
        triton_grouped_mm(a.int(), b.int(), _offs([2, 3], "cpu"))
    assert set(_checks.GROUPED_MM_DTYPES) == {torch.float16, torch.bfloat16, torch.float32, torch.float64}


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_float64(tma):
    """float64 inputs accumulate in float64 (the ops take float64: gradcheck on
    a GPU runs here): within 2 (K + 2) 2^-53 of the sum of the absolute terms
    (the kernel's and the float64 reference's rounding, each (K + 2) u), every
    layout's path through the multi-tile case and 3D x 3D."""
    a, b, offs, bias = _multi_tile_case(torch.float32, True)
    a, b, bias = a.double(), b.double(), bias.double()
    cases = [(a, b, offs, bias), (a[:60].reshape(4, 15, 40), b, None, bias), (a.t(), a, _offs([9, 0, 40, 20], "cpu"),
                                                                               None)]
    for mat_a, mat_b, o, bb in cases:
        out = triton_grouped_mm(mat_a, mat_b, o, bb, tma=tma and mat_b.dim() == 3)
        ref = torch_grouped_mm(mat_a, mat_b, o, bb, torch.float64)
        mag = torch_grouped_mm(mat_a.abs(), mat_b.abs(), o, _abs(bb), torch.float64)
        assert out.dtype == torch.float64
        tol = 2 * (mat_a.shape[-1] + 2) * 2.0**-53 * mag
        assert ((out - ref).abs() <= tol).all(), ((out - ref).abs() - tol).max()
        assert (out - ref).abs().max() < 1e-13  # and not the float32 path (errors near 1e-6)


def test_triton_op_eager_and_traced():
    """moe_ops_triton::grouped_mm: eager on CPU is the interpreted kernel; the
    op traces with fake tensors (shape, strides, dtype) under torch.compile."""
    a, b, offs, bias = _multi_tile_case(torch.float32, True)
    eager = torch.ops.moe_ops_triton.grouped_mm(a, b, offs, bias)
    assert torch.equal(eager, triton_grouped_mm(a, b, offs, bias))
    compiled = torch.compile(torch.ops.moe_ops_triton.grouped_mm, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(a, b, offs, bias), eager)
    torch.library.opcheck(torch.ops.moe_ops_triton.grouped_mm_interpreted.default, (a, b, offs, bias, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not isinstance(tgm.grouped_mm_kernel, triton.runtime.JITFunction),
                    reason="TRITON_INTERPRET=1 makes the kernel an interpreted function: nothing to trace")
def test_triton_op_traces_into_the_kernel_on_cuda(monkeypatch):
    """With fake CUDA tensors (no GPU needed), tracing moe_ops_triton::grouped_mm
    as torch.compile's functionalisation does yields the Triton kernel itself
    (triton_kernel_wrapper_functional, the node Inductor compiles), not an
    opaque call, and the graph returns the kernel's out_ptr. Without a driver
    Triton cannot analyse which arguments the kernel stores to, so here every
    pointer is cloned; on a GPU only out_ptr is (not checked here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setattr(tgm, "_num_sms", lambda index: 132)  # the driver queries of a real launch (an H100)
    monkeypatch.setattr(tgm, "_capability", lambda index: (9, 0))
    with FakeTensorMode():
        a = torch.empty(250, 256, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(4, 128, 256, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        offs = torch.empty(4, device="cuda", dtype=torch.int32)
        bias = torch.empty(4, 128, device="cuda", dtype=torch.bfloat16)
        graph = make_fx(dispatch_functionalize(torch.ops.moe_ops_triton.grouped_mm))(a, b, offs, bias)
    (node,) = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    assert kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn is tgm.grouped_mm_kernel
    kw = node.kwargs["kwargs"]
    assert kw["stride_bk"] == 1 and kw["LAYOUT"] == tgm.LAYOUT_2D3D and kw["HAS_BIAS"]
    assert kw["B_DESC"] == 2  # sm_90, weights stored (G, N, K) and aligned: TMA
    ret = graph.graph.output_node().args[0]
    assert ret.target is operator.getitem and ret.args == (node, "out_ptr")


def test_autotuner_configs_are_the_compiled_ones():
    """The configs the autotuners may pick are those test_triton_aot compiles."""
    assert tgm._autotuned_16bit.configs == tgm.CONFIGS_16BIT == tgm.configs_for(torch.bfloat16)
    assert tgm._autotuned_fp32.configs == tgm.CONFIGS_FP32 == tgm.configs_for(torch.float32)
    assert tgm._autotuned_fp64.configs == tgm.CONFIGS_FP64 == tgm.configs_for(torch.float64)


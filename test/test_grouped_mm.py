"""Tests of moe_ops::grouped_mm: values against a float64 loop reference,
fake/meta agreement, opcheck, errors, gradients, determinism and compile.

Device-generic through instantiate_device_type_tests, so the same tests run on
CUDA where one exists.
"""

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.common_device_type import (
    onlyCPU,
    ops,
)
from torch.testing._internal.common_utils import TestCase, run_tests

import torch_moe_ops  # noqa: F401
from torch_moe_ops import native_functions
from torch_moe_ops.reference import torch_grouped_mm

from common import assert_same_bits_at_thread_counts, at_thread_counts, num_threads
from _cpu import cpu_flags
from _device import instantiate_cpu_and_cuda
from opinfo_experts import gathered
from opinfo_grouped_mm import op_db

# Kernels accumulate in fp32 (fp64 for fp64) and round once to the output
# dtype. The reference rounds the exact float64 result once too, so both are
# within half an ulp of the exact value and differ by at most one ulp (when
# the exact value sits near a rounding boundary): rtol = 2^-7 (bf16) and
# 2^-10 (fp16), plus a small atol for fp32 accumulation error near zero.
# fp32: sums of <= 64 products of values in [-1, 1].
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1.3e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=2e-6),
    torch.float16: dict(rtol=2**-10, atol=2e-6),
}


def _call(op, sample):
    return op(sample.input, *sample.args, **sample.kwargs)


def _detached(sample):
    a = sample.input.detach()
    b = sample.args[0].detach()
    kw = {k: (v.detach() if isinstance(v, torch.Tensor) and k == "bias" else v) for k, v in sample.kwargs.items()}
    return a, b, kw


class TestGroupedMM(TestCase):
    @ops(op_db)
    def test_matches_float64_reference(self, device, dtype, op):
        for sample in op.sample_inputs(device, dtype):
            out = _call(op, sample)
            ref = op.ref(sample.input, *sample.args, **sample.kwargs)
            self.assertEqual(out.dtype, ref.dtype)
            self.assertEqual(out, ref, exact_dtype=True, **TOLERANCES[out.dtype], msg=sample.name)

    @ops(op_db, allowed_dtypes=(torch.float32, torch.bfloat16))
    def test_backward_matches_reference(self, device, dtype, op):
        """Gradients against float64 autograd through the loop reference, for
        the expanded gradient of .sum() and for a non-contiguous gradient."""
        for sample in op.sample_inputs(device, dtype, requires_grad=True):
            a, b, kw = _detached(sample)
            leaves = [a, b] + ([kw["bias"]] if "bias" in kw else [])
            ours = [t.clone().requires_grad_() for t in leaves]
            refs = [t.double().requires_grad_() for t in leaves]
            rest = {k: v for k, v in kw.items() if k != "bias"}
            out = op(ours[0], ours[1], bias=ours[2] if len(ours) > 2 else None, **rest)
            ref = torch_grouped_mm(refs[0], refs[1], bias=refs[2] if len(refs) > 2 else None,
                                   **{**rest, "out_dtype": torch.float64})
            def weighted(t):
                # Small integer weights (exact in bf16) laid out column-major,
                # so the incoming gradient is non-contiguous.
                w = (torch.arange(t.numel(), device=t.device) % 7 - 3).view(t.shape).to(t.dtype)
                return (t * w.mT.contiguous().mT).sum()

            # Gradients are grouped mms (and column sums) of the same inputs,
            # accumulated in float32 and rounded once to the dtype: per element
            # within one rounding of the result (TOLERANCES' rtol) plus
            # n * 2^-24 of the sum of the absolute terms, n bounding any
            # reduction's length. The magnitudes are the same gradients of
            # the reference on |inputs| with |incoming gradient|.
            n = max(max(t.shape, default=1) for t in leaves)
            abs_leaves = [t.detach().double().abs().requires_grad_() for t in leaves]
            abs_out = torch_grouped_mm(abs_leaves[0], abs_leaves[1], bias=abs_leaves[2] if len(leaves) > 2 else None,
                                       **{**rest, "out_dtype": torch.float64})
            for make_grad in (lambda t: t.sum(), weighted):
                for t in ours + refs + abs_leaves:
                    t.grad = None
                make_grad(out).backward(retain_graph=True)
                make_grad(ref).backward(retain_graph=True)
                g_abs = torch.autograd.grad(make_grad(ref), ref, retain_graph=True)[0].abs()
                abs_out.backward(g_abs, retain_graph=True)
                for mine, theirs, mag in zip(ours, refs, abs_leaves):
                    bound = TOLERANCES[dtype]["rtol"] * theirs.grad.abs() + n * 2.0**-24 * mag.grad
                    err = (mine.grad.double() - theirs.grad).abs()
                    self.assertTrue(bool((err <= bound).all()),
                                    msg=f"{sample.name}: {(err - bound).amax().item() if err.numel() else 0} over the bound")

    @onlyCPU
    def test_bits_independent_of_thread_count(self, device):
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(0, 90, (24,), generator=g)
        offs = sizes.cumsum(0).to(torch.int32)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            a = torch.randn(int(offs[-1]), 136, generator=g).to(dtype)
            b = torch.randn(24, 136, 200, generator=g).to(dtype)
            assert_same_bits_at_thread_counts(lambda: torch.ops.moe_ops.grouped_mm(a, b, offs))

    @onlyCPU
    def test_every_tile_once_when_threads_take_each_others(self, device):
        # A thread done with its run of tiles takes the others' last ones
        # (TileRuns in cpu/GroupedMMKernelUtils.h). 8 threads on this
        # machine's 2 cores are descheduled at random, so their runs end at
        # different times and they take from each other in a different
        # pattern on every call. A tile skipped or written by the wrong
        # thread's claim would leave the output block a NaN-filled tensor
        # freed just before (the allocator hands the same block back).
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(0, 60, (32,), generator=g)
        sizes[3] = 300  # one group of many rows among small ones: the cost estimate's worst case
        offs = sizes.cumsum(0).to(torch.int32)
        for dtype, transposed in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)):
            a = torch.randn(int(offs[-1]), 96, generator=g).to(dtype)
            b = torch.randn(32, 600, 96, generator=g).to(dtype).transpose(-2, -1) if transposed else \
                torch.randn(32, 96, 600, generator=g).to(dtype)
            with num_threads(1):
                expected = torch.ops.moe_ops.grouped_mm(a, b, offs)
            # float32 sums of 96 products, rounded once to dtype: within
            # 96 u sum|a b| (u = 2^-24) plus half an ulp of dtype.
            ref = torch_grouped_mm(a.double(), b.double(), offs)
            bound = torch.finfo(dtype).eps / 2 * ref.abs() + 96 * 2.0**-24 * torch_grouped_mm(
                a.double().abs(), b.double().abs(), offs)
            self.assertTrue(bool(((expected.double() - ref).abs() <= bound).all()))
            with num_threads(8):
                for _ in range(10):
                    poison = torch.full_like(expected, float("nan"))
                    del poison
                    self.assertTrue(torch.equal(torch.ops.moe_ops.grouped_mm(a, b, offs), expected))

    @onlyCPU
    def test_large_index_past_int32(self, device):
        # 2^31 + rows of bf16: offsets into mat_a overflow int32 unless the
        # kernel indexes with int64. One group covers the tail rows.
        K = 1 << 16
        M = (1 << 31) // K + 3
        a = torch.zeros(M, K, dtype=torch.bfloat16)
        a[-1, -3:] = torch.tensor([1.0, 2.0, 3.0])
        b = torch.ones(2, K, 4, dtype=torch.bfloat16)
        offs = torch.tensor([M - 1, M], dtype=torch.int32)
        out = torch.ops.moe_ops.grouped_mm(a, b, offs)
        self.assertEqual(out[-1], torch.full((4,), 6.0, dtype=torch.bfloat16))
        self.assertEqual(out[:-1].abs().sum().item(), 0.0)

    def test_compile_dynamic_no_recompile(self, device):
        for dtype in (torch.float32, torch.bfloat16):
            torch._dynamo.reset()
            counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

            def f(x, w, offs):
                return torch.ops.moe_ops.grouped_mm(x, w, offs).relu().sum()

            cf = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
            w = torch.randn(4, 16, 8, device=device, dtype=dtype, requires_grad=True)
            for tokens in (10, 17, 33):
                x = torch.randn(tokens, 16, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([tokens // 4, tokens // 2, tokens // 2, tokens], dtype=torch.int32, device=device)
                loss = cf(x, w, offs)
                loss.backward()
                xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
                f(xr, wr, offs).backward()
                # The same kernels run compiled and eager: the gradient is the
                # same bits. Inductor may sum the loss in another order: the
                # terms are >= 0, so two orders differ by at most numel * 2^-24
                # of the loss (float32 accumulation), plus one rounding to the
                # output dtype each.
                acc_eps = 2.0**-53 if dtype == torch.float64 else 2.0**-24
                rtol = tokens * 8 * acc_eps + torch.finfo(dtype).eps
                self.assertEqual(loss, f(xr, wr, offs), rtol=rtol, atol=0)
                self.assertEqual(x.grad, xr.grad, rtol=0, atol=0)
                w.grad = None
            self.assertEqual(counter.frame_count, 1, msg=f"recompiled for new token counts ({dtype})")


instantiate_cpu_and_cuda(TestGroupedMM, globals(), gpu_adds=(
    "the CUDA kernel on CUDA tensors: the Triton grouped GEMM compiled (wgmma, TMA, the autotuner), "
    "device-side asserts on offs; it runs in Triton's interpreter on CPU tensors in test_cuda_entries.py and "
    "test_triton_grouped_mm.py"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 15, 32, 33, 300, 513])
@pytest.mark.parametrize("n", [1, 17, 64, 100])
def test_weights_stored_transposed(dtype, k, n):
    """Weights stored (G, N, K) and read transposed, as transformers stores
    them, take their own path: short K through the packing kernel's 16 x 16
    word transposes (edges one by one, odd K in bfloat16 element by element),
    longer K through the inner-product engine, which reads them in place and
    sums along K in another order. So the two storage orders agree within
    float32 summation (each sum of K products off by at most K * 2^-24 of the
    sum of their magnitudes, twice for the two orders; in bfloat16 the two
    rounded results may then land on neighbouring values, one ulp apart:
    2^-7 relative), and each is the same bits with 1 or 2 threads and from
    run to run."""
    g = torch.Generator().manual_seed(k * 1000 + n)
    offs = torch.tensor([5, 5, 40, 47], dtype=torch.int32)
    a = torch.randn(50, k, generator=g).to(dtype)
    b_nk = torch.randn(4, n, k, generator=g).to(dtype)
    transposed = torch.ops.moe_ops.grouped_mm(a, b_nk.transpose(-2, -1), offs)
    contiguous = torch.ops.moe_ops.grouped_mm(a, b_nk.transpose(-2, -1).contiguous(), offs)
    magnitude = torch_grouped_mm(a.abs(), b_nk.transpose(-2, -1).abs(), offs, out_dtype=torch.float64)
    rounding = 2.0**-7 if dtype == torch.bfloat16 else 0.0
    bound = 2 * k * 2.0**-24 * magnitude + rounding * contiguous.double().abs()
    assert ((transposed.double() - contiguous.double()).abs() <= bound).all()
    for bits in at_thread_counts(lambda: torch.ops.moe_ops.grouped_mm(a, b_nk.transpose(-2, -1), offs)).values():
        assert torch.equal(bits, transposed)
    ref = torch_grouped_mm(a, b_nk.transpose(-2, -1), offs)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(transposed, ref, rtol=tol["rtol"], atol=tol["atol"] * k)


def cpu_has_avx512_bf16():
    """What the CPU reports, read apart from torch and the kernel."""
    return "avx512_bf16" in cpu_flags()


# (dtype, the fewest rows of a group that the transposed-tile engine takes)
TRANSPOSED_TILE_ROWS = {torch.float32: 17, torch.bfloat16: 18}


def transposed_tile_groups(sizes, dtype, k, rows_along_k):
    """offs of groups of these sizes; of the groups the transposed-tile engine
    takes, the output rows (2D x 3D) or columns (3D x 2D) in its 16-row
    vectors, and per group (its index, its rows) the rest after its last whole
    vector (a slice) where they take inner products instead (TtRows: up to 6 rows after
    one vector, 12 after more, when the rows of A are contiguous along K,
    rows_along_k, and K fits one packed block of the vectors' rows); whether
    the tiled rows' bits must equal those of the other weight storage order
    (float32, and bfloat16 where vdpbf16ps runs: widened, the engines sum in
    other orders)."""
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    starts = [0] + offs.tolist()[:-1]
    tiled, rest = [], []
    for g, (s, n) in enumerate(zip(starts, sizes)):
        if n < TRANSPOSED_TILE_ROWS[dtype]:
            continue
        whole = n // 16 * 16
        kc = min(k, 2048, max(384 * 1024 // (whole * dtype.itemsize) // 32 * 32, 32))
        if rows_along_k and kc == k and n - whole <= (6 if whole == 16 else 12):
            rest += [(g, slice(s + whole, s + n))] if n > whole else []
            n = whole
        tiled.append(torch.arange(s, s + n))
    return offs, torch.cat(tiled), rest, dtype == torch.float32 or cpu_has_avx512_bf16()


def assert_within_sum_bound(out, a, b, offs, bias, msg):
    """out against the float64 grouped mm within the float32 bound of a K-term
    sum (K * 2^-24 of the sum of the products' magnitudes; with a bias, K + 1
    terms, the bias's magnitude among them) plus, for bfloat16, its rounding
    of the output (2^-8 relative)."""
    k = a.shape[-1] + (bias is not None)
    ref = torch_grouped_mm(a.double(), b.double(), offs, bias=None if bias is None else bias.double())
    magnitude = torch_grouped_mm(a.abs().double(), b.abs().double(), offs,
                                 bias=None if bias is None else bias.abs().double())
    rounding = 2.0**-8 if out.dtype == torch.bfloat16 else 0.0
    bound = k * 2.0**-24 * magnitude + rounding * ref.abs() + 1e-30
    assert ((out.double() - ref).abs() <= bound).all(), msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 301, 2048 + 37])
def test_transposed_tiles(dtype, k):
    """Groups with weights stored (G, N, K): in the AVX512 build (the one this
    machine runs) float32 groups of 17 rows and more, and bfloat16 groups of
    18 and more on CPUs with AVX512_BF16, take the transposed-tile engine
    (cpu/GroupedMMTransposedTile.h), which keeps the group's rows in vector
    lanes and broadcasts each weight (a K pair of bfloat16) from its (G, N, K)
    memory. It sums along K in the same order as the broadcast engine that
    (G, K, N) weights take, so the two storage orders give the same bits on
    the rows in its 16-row vectors; the inner-product engine, which the
    smaller nk groups take (5 rows here, and 17 in bfloat16), sums in another
    order, so this equality also shows which engine ran. The rows after a
    group's last whole vector (17 = 16 + 1, 33, 18, 130 = 128 + 2, 22, 44; 40
    in 3D x 3D) take inner products when A's rows are contiguous along K and
    K fits one block (not 2085): their bits must equal those of the same rows
    as a group of their own, which the inner-product engine takes. Groups
    past 48 rows (64, 130: several passes over the rows) and K past one block
    (2085; bfloat16 130-row groups from 256 on) spill between K blocks, which
    must change no bit; an odd K pairs its last element with zero. Rows
    column-major and gathered (-1 reads zeros), bias, N across the 8-column
    and 16-column edges and past a 256-column tile, 3D x 3D, 1 and 2 threads.
    Values against float64 within the float32 bound of a K-term sum (K *
    2^-24 of the sum of the products' magnitudes) plus, for bfloat16, its
    rounding of the output (2^-8 relative).
    Without AVX512_BF16 bfloat16 is widened to float32 by both engines, in
    different orders: then only the values are checked."""
    g = torch.Generator().manual_seed(k)
    # 17 and 18: bfloat16's edge; 22 and 23, 44 and 45: the most rows after
    # one vector and after more that take inner products, and one more.
    sizes = [17, 0, 48, 33, 5, 64, 130, 18, 22, 23, 44, 45]
    m = sum(sizes)
    for n in (1, 9, 300):
        w_nk = torch.randn(len(sizes), n, k, generator=g).to(dtype)
        bias = torch.randn(len(sizes), n, generator=g).to(dtype)
        a_row = torch.randn(m, k, generator=g).to(dtype)
        idx = torch.randint(-1, m, (m,), generator=g)
        for a in (a_row, a_row.t().contiguous().t()):
            offs, tiled, rest, same_bits = transposed_tile_groups(sizes, dtype, k, rows_along_k=a.stride(1) == 1)
            for name, run, ref_a in (
                ("rows", lambda w: torch.ops.moe_ops.grouped_mm(a, w, offs, bias=bias), a),
                ("gathered", lambda w: torch.ops.moe_ops.grouped_mm_gather(a, w, offs, idx, bias=bias),
                 gathered(a, idx, 0))):
                out = run(w_nk.transpose(-2, -1))
                kn = run(w_nk.transpose(-2, -1).contiguous())
                msg = f"k={k} n={n} {name} a.stride()={a.stride()}"
                if same_bits:
                    assert torch.equal(out[tiled], kn[tiled]), msg
                    for e, rows in rest:
                        own = torch.ops.moe_ops.grouped_mm(ref_a[rows], w_nk[e:e + 1].transpose(-2, -1),
                                                           torch.tensor([rows.stop - rows.start], dtype=torch.int32),
                                                           bias=bias[e:e + 1])
                        assert torch.equal(out[rows], own), f"{msg} rest of group {e}"
                assert_within_sum_bound(out, ref_a, w_nk.transpose(-2, -1), offs, bias, msg)
                for bits in at_thread_counts(lambda: run(w_nk.transpose(-2, -1))).values():
                    assert torch.equal(bits, out), msg
        a3 = torch.randn(2, 40, k, generator=g).to(dtype)
        w3 = torch.randn(2, n, k, generator=g).to(dtype).transpose(-2, -1)
        _, tiled3, rest3, same_bits = transposed_tile_groups([40], dtype, k, rows_along_k=True)
        if same_bits:
            out3 = torch.ops.moe_ops.grouped_mm(a3, w3)
            assert torch.equal(out3[:, tiled3], torch.ops.moe_ops.grouped_mm(a3, w3.contiguous())[:, tiled3])
            for _, rows in rest3:
                assert torch.equal(out3[:, rows], torch.ops.moe_ops.grouped_mm(a3[:, rows], w3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 301, 2085])
def test_transposed_tiles_turned_3d2d(dtype, k):
    """3D x 2D in the AVX512 build runs turned around, as C^T = B^T A^T (2D x
    3D, tokens x weights), its tiles stored into the output's columns: with
    weights stored (G, N, K) row-major and more than 512 of them (kTtMaxRows)
    each group of enough tokens (the transposed-tile engine's fewest rows) in
    the transposed-tile engine, whose tile holds C^T already; with the weights
    stored (G, K, N) (a K-major view) every group in the broadcast engine,
    through its accumulator buffer and 16 x 16 transposes. Both sum the same
    products in the same K order, so on the first groups the two storage
    orders give the same bits, except on the tokens after a group's last
    whole 16 (100 = 96 + 4, with x.t() and K in one block), which take inner
    products and must give the bits of the same tokens as a group of their
    own. A group of fewer tokens (5) with (G, N, K) weights and x.t() runs
    turned in the inner-product engine, its rows the tokens (unturned, its 4
    columns were, mostly padding), and must give the bits of the same tokens
    as 2D x 3D (C^T, the same dot products); unturned, with row-major
    tokens^T, it has them too. Values against float64 within the bound
    of test_transposed_tiles; tokens^T K-contiguous (as x.t(), the layout
    that turns) and row-major (which does not); 1 and 2 threads; N past a
    256-column tile and off the 16-column edge."""
    g = torch.Generator().manual_seed(k)
    sizes = [30, 0, 48, 5, 100, 25]
    m = sum(sizes)
    for n in (513, 1100):
        w_nk = torch.randn(len(sizes), n, k, generator=g).to(dtype)
        x = torch.randn(m, k, generator=g).to(dtype)
        for xt in (x.t(), x.t().contiguous()):
            offs, tiled, rest, same_bits = transposed_tile_groups(sizes, dtype, k, rows_along_k=xt.stride(0) == 1)
            run = lambda w: torch.ops.moe_ops.grouped_mm(w, xt, offs)  # noqa: E731
            out = run(w_nk)
            msg = f"k={k} n={n} xt.stride()={xt.stride()}"
            if same_bits:
                kn = run(w_nk.transpose(-2, -1).contiguous().transpose(-2, -1))
                assert torch.equal(out[:, tiled], kn[:, tiled]), msg
                for e, cols in rest:
                    own = torch.ops.moe_ops.grouped_mm(w_nk[e:e + 1], xt[:, cols],
                                                       torch.tensor([cols.stop - cols.start], dtype=torch.int32))
                    assert torch.equal(out[:, cols], own), f"{msg} rest of group {e}"
                few = slice(sum(sizes[:3]), sum(sizes[:4]))  # group 3, 5 tokens
                as_2d3d = torch.ops.moe_ops.grouped_mm(xt[:, few].t(), w_nk[3:4].transpose(-2, -1),
                                                       torch.tensor([few.stop - few.start], dtype=torch.int32))
                assert torch.equal(out[:, few], as_2d3d.t()), f"{msg} group of 5 tokens"
            assert_within_sum_bound(out, w_nk, xt, offs, None, msg)
            for bits in at_thread_counts(lambda: run(w_nk)).values():
                assert torch.equal(bits, out), msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1024, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [2048, 256])
def test_weight_gradient_outputs_streamed(dtype, n, with_bias, m):
    """A weight gradient (2D x 2D) whose experts' outputs outgrow L2: in the
    AVX512 build each tile of the broadcast engine here whose expert has no
    more routed rows (K) than output rows writes at least 128 KB
    (kStreamTileBytes; 256 rows x 256 columns or more), so it sends its full,
    64-byte aligned 64-column rows to memory with streaming stores, and the
    rest with plain ones (n = 1000: rows 2000 bytes apart, so three in four
    start unaligned; the last 40 columns). With 256 output rows the expert of
    300 routed rows keeps plain stores. Every element is summed in K order
    whatever the tile, so each holds the bits of the same rows run as a small
    problem (16 rows: 64 KB tiles or less, plain stores), and of the same
    product with the routed rows read through an index (as expert_mlp's
    backward reads them); all within the float32 K-term bound of float64.
    One expert's 300 routed rows take two K blocks (its tiles 256 columns
    wide, through the accumulator buffer), three have none. On other builds
    this checks the same values through plain stores."""
    g = torch.Generator().manual_seed(n + with_bias + m)
    sizes = [37, 0, 96, 300, 5, 0, 64, 1, 80, 17, 0, 128, 40, 9, 70, 33]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    total = sum(sizes)
    x = torch.randn(total, m, generator=g).to(dtype)  # routed rows: A = x^T, K-major
    dy = torch.randn(total, n, generator=g).to(dtype)
    bias = torch.randn(len(sizes), n, generator=g).to(dtype) if with_bias else None
    out = torch.ops.moe_ops.grouped_mm(x.t(), dy, offs, bias=bias)
    assert out.shape == (len(sizes), m, n)
    for r0 in (0, 128, m - 16):
        small = torch.ops.moe_ops.grouped_mm(x[:, r0:r0 + 16].t(), dy, offs, bias=bias)
        assert torch.equal(out[:, r0:r0 + 16], small), f"rows {r0}-{r0 + 15}"
    if not with_bias:
        tokens = torch.randn(300, m, generator=g).to(dtype)
        rows = torch.randint(0, 300, (total,), generator=g)
        gathered = torch.ops.moe_ops.grouped_mm_gather(tokens.t(), dy, offs, rows)
        assert torch.equal(gathered, torch.ops.moe_ops.grouped_mm(tokens[rows].t(), dy, offs))
    assert_within_sum_bound(out, x.t(), dy, offs, bias, f"{dtype} n={n} m={m}")


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512_BF16 (/proc/cpuinfo)")
@pytest.mark.parametrize("rows,w_order", [(8, "nk"), (48, "nk"), (48, "kn")])
def test_bfloat16_kernels_run_where_the_cpu_has_avx512_bf16(rows, w_order):
    """On a CPU with AVX512_BF16 the bfloat16 engines run vdpbf16ps, which
    reads subnormal inputs as zero, as torch.mm's oneDNN matmul does on such a
    CPU; the float32-widening kernels keep them. A subnormal row times 2^100
    tells which ran, so this fails if the kernel's CPU check reads the CPU
    wrongly (it did: cpuinfo's symbols, bound in an extension, reported no
    AVX-512 at all on a Zen 5). Inner-product (8 rows, (G, N, K)),
    transposed-tile (48, (G, N, K)) and broadcast (48, (G, K, N)) engines."""
    k, n = 64, 16
    tiny = torch.full((rows, k), 1e-39).bfloat16()
    assert tiny.float()[0, 0] != 0 and tiny.float()[0, 0].abs() < torch.finfo(torch.float32).tiny
    w = torch.full((1, n, k), 2.0**100).bfloat16()
    w = w.transpose(-2, -1) if w_order == "nk" else w.transpose(-2, -1).contiguous()
    offs = torch.tensor([rows], dtype=torch.int32)
    ours = torch.ops.moe_ops.grouped_mm(tiny, w, offs, out_dtype=torch.float32)
    dense = torch.mm(tiny, w[0]).float()
    assert torch.equal(ours == 0, dense == 0), (ours[0, 0].item(), dense[0, 0].item())
    assert (ours == 0).all()


def c10_bfloat16_bits(x: torch.Tensor) -> torch.Tensor:
    """The bits c10::BFloat16(float) gives each float32 of x, as int64: round
    to nearest even (denormals included), every NaN 0x7FC0."""
    b = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    r[x.isnan()] = 0x7FC0
    return r


@pytest.mark.parametrize("layout", ["2d3d", "2d2d"])
def test_bfloat16_outputs_round_denormals_and_nan_as_c10(layout):
    """Where the CPU has AVX512_BF16 the bfloat16 kernels round full 64-column
    rows with vcvtne2ps2bf16, which reads float32 denormals as zero and keeps
    a NaN's sign and payload; rows holding either must round as
    c10::BFloat16(float) does, the bits of every other bfloat16 output here.
    Small integers, so every float32 sum is exact in any order; rows of A
    that are zero leave the output a bias of bfloat16 denormals (2D x 3D);
    a negative NaN with a payload in A makes its output rows (2D x 3D) or
    columns of A's row (2D x 2D) NaN. Groups of 30 rows (2D x 3D) or 30 rows
    of output (2D x 2D: A's rows), 128 columns: the row blocks after the first
    run in one call of the kernel (MicroArgs::blocks)."""
    g = torch.Generator().manual_seed(0)
    groups, rows, k, n = 3, 30, 64, 128
    nan = torch.tensor([0xFFA5 - 0x10000], dtype=torch.int16).view(torch.bfloat16)[0]  # negative, payload 0x25
    if layout == "2d3d":
        a = torch.randint(-3, 4, (groups * rows, k), generator=g).bfloat16()
        a[7] = 0
        a[40:52] = 0  # two whole row blocks of group 1
        a[65, 9] = nan
        b = torch.randint(-3, 4, (groups, k, n), generator=g).bfloat16()
        bias = torch.randint(-3, 4, (groups, n), generator=g).bfloat16()
        bias[:, ::3] = torch.tensor(2.0**-130).bfloat16() * torch.randint(1, 7, (groups, (n + 2) // 3), generator=g)
        denormal = (bias.float() != 0) & (bias.float().abs() < torch.finfo(torch.float32).tiny)
        assert denormal.sum() == groups * ((n + 2) // 3)
        offs = torch.arange(1, groups + 1, dtype=torch.int32) * rows
        ref = torch.cat([a[i * rows:(i + 1) * rows].double() @ b[i].double() + bias[i].double()
                         for i in range(groups)]).float()
        ref[65] = float("nan")
    else:  # a weight gradient: A (M, total K) K-major, K = 16 routed rows per group
        tokens = 16
        x = torch.randint(-3, 4, (groups * tokens, rows), generator=g).bfloat16()
        x[5, 3] = nan
        a = x.t()
        b = torch.randint(-3, 4, (groups * tokens, n), generator=g).bfloat16()
        bias = None
        offs = torch.arange(1, groups + 1, dtype=torch.int32) * tokens
        ref = torch.stack([a[:, i * tokens:(i + 1) * tokens].double() @ b[i * tokens:(i + 1) * tokens].double()
                           for i in range(groups)]).float()
        ref[0, 3] = float("nan")
    out = torch.ops.moe_ops.grouped_mm(a, b, offs, bias)
    got = out.view(torch.int16).to(torch.int64) & 0xFFFF
    want = c10_bfloat16_bits(ref)
    assert torch.equal(got, want), (got != want).nonzero()[:8].tolist()


@pytest.mark.skipif(not cpu_has_avx512_bf16() or "amx_tile" in cpu_flags(),
                    reason="needs a CPU with AVX512_BF16 and without AMX, whose small groups run brgemm tiles")
@pytest.mark.parametrize("layout", ["2d3d", "3d3d", "3d2d"])
def test_bfloat16_large_groups_row_major_stay_on_micro_kernels(layout):
    """bfloat16 groups of hundreds of rows leave the micro-kernels for
    oneDNN's matmul, except with A and B both row-major, where the broadcast
    engine is as fast (bf16_broadcast_layout, GroupedMMKernel.cpp), and 3D x
    2D on (G, K, N) weights, which turned (C^T = tokens x weights) is in that
    layout (turn_3d2d_groups). Its rows have the same bits whatever the
    group's size and the thread count, so each 16-row slice (3D x 2D: 16
    output columns) equals the slice run as its own small problem (always
    the micro-kernels); oneDNN sums K = 2048 in another order and misses
    those bits (checked: it does on a Zen 5, and on a Zen 4 for 3D x 2D).
    Groups of 300-620 rows, one empty, N off the 64-column strip."""
    g = torch.Generator().manual_seed(0)
    # The group's smallest dimension decides (choose_engine); 3D x 2D groups
    # turn only with more weight rows (N) than tokens.
    k, n = 2048, 700 if layout == "3d2d" else 300
    sizes = [320] * 3 if layout == "3d3d" else [300, 0, 620, 400]
    w = torch.randn(len(sizes), k, n, generator=g).bfloat16()
    ends = torch.tensor(sizes).cumsum(0)
    if layout == "3d2d":
        # Weights stored (G, K, N) as A (G, N, K): the column-major view; the
        # tokens' transpose (K, M) as B, K-contiguous; out (N, M).
        wt = w.transpose(-2, -1)
        xt = torch.randn(sum(sizes), k, generator=g).bfloat16().t()
        offs = ends.to(torch.int32)
        run = lambda: torch.ops.moe_ops.grouped_mm(wt, xt, offs)  # noqa: E731
        assert_same_bits_at_thread_counts(run)
        out = run()
        one = torch.tensor([16], dtype=torch.int32)
        for e, (end, size) in enumerate(zip(ends.tolist(), sizes)):
            for r in (end - size, end - size + 144) if size else ():
                small = torch.ops.moe_ops.grouped_mm(wt[e:e + 1], xt[:, r:r + 16], one)
                assert torch.equal(out[:, r:r + 16], small), f"{layout} expert {e} columns {r}-{r + 15}"
        assert_within_sum_bound(out, wt, xt, offs, None, layout)
        return
    if layout == "2d3d":
        offs = ends.to(torch.int32)
        a = torch.randn(sum(sizes), k, generator=g).bfloat16()
    else:
        offs = None
        a = torch.randn(len(sizes), sizes[0], k, generator=g).bfloat16()
    run = lambda: torch.ops.moe_ops.grouped_mm(a, w, offs)  # noqa: E731
    assert_same_bits_at_thread_counts(run)
    out = run()
    # Row r of either layout's A and output: 3D x 3D's groups laid end to end.
    a_rows, out_rows = a.reshape(-1, k), out.reshape(-1, n)
    one = torch.tensor([16], dtype=torch.int32)
    for e, (end, size) in enumerate(zip(ends.tolist(), sizes)):
        for r in (end - size, end - size + 144) if size else ():
            small = torch.ops.moe_ops.grouped_mm(a_rows[r:r + 16], w[e:e + 1], one)
            assert torch.equal(out_rows[r:r + 16], small), f"{layout} expert {e} rows {r}-{r + 15}"
    assert_within_sum_bound(out, a, w, offs, None, layout)


def test_gradient_of_transposed_weights_keeps_their_layout():
    """transformers stores expert weights (E, N, K) and passes the transposed
    view: the weight gradient must arrive in that layout, or autograd copies
    every expert's gradient once more."""
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    a = torch.randn(12, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out = torch.ops.moe_ops.grouped_mm(a, w.transpose(-2, -1), offs)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    assert w.grad.is_contiguous()
    ref = torch.zeros_like(w)
    for e, (s0, s1) in enumerate(zip([0, 4, 4], [4, 4, 10])):
        ref[e] = grad[s0:s1].t() @ a[s0:s1]
    torch.testing.assert_close(w.grad, ref, rtol=1e-12, atol=1e-12)


# Property tests against the float64 loop reference over random group
# structures. fp32 so the tolerance stays tight; 16-bit paths share the tiling
# and are covered by the OpInfo samples above.
@st.composite
def grouped_problems(draw):
    layout = draw(st.sampled_from(["2d3d", "3d2d", "2d2d", "3d3d"]))
    groups = draw(st.integers(0 if layout != "3d3d" else 1, 7))
    sizes = draw(st.lists(st.integers(0, 40), min_size=groups, max_size=groups))
    # Skew: sometimes all tokens in one group.
    if sizes and draw(st.booleans()):
        total = sum(sizes)
        sizes = [0] * len(sizes)
        sizes[draw(st.integers(0, len(sizes) - 1))] = total
    extra = draw(st.integers(0, 3))  # rows/columns past offs[-1]
    m = draw(st.integers(0, 37))
    k = draw(st.integers(1, 70))
    n = draw(st.integers(1, 70))
    transpose_a = draw(st.booleans())
    transpose_b = draw(st.booleans())
    with_bias = draw(st.booleans())
    return layout, sizes, extra, m, k, n, transpose_a, transpose_b, with_bias


def _maybe_t(t, flag):
    return t.transpose(-2, -1).contiguous().transpose(-2, -1) if flag else t


def grouped_problem_tensors(problem, seed):
    """(a, b, offs, bias) of a drawn grouped_problems() problem: float32 values in [-1, 1]."""
    layout, sizes, extra, m, k, n, ta, tb, with_bias = problem
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731
    G = len(sizes)
    total = sum(sizes)
    offs = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32) if layout != "3d3d" else None
    if layout == "2d3d":
        a, b, n_out = rand(total + extra, k), rand(G, k, n), n
    elif layout == "3d2d":
        a, b, n_out = rand(G, m, k), rand(k, total + extra), total + extra
    elif layout == "2d2d":
        a, b, n_out = rand(m, total + extra), rand(total + extra, n), n
    else:
        G = max(G, 1)
        a, b, n_out = rand(G, m, k), rand(G, k, n), n
    a, b = _maybe_t(a, ta), _maybe_t(b, tb)
    bias = rand(G, n_out) if with_bias else None
    return a, b, offs, bias


def assert_close_to_float64(out, a, b, offs, bias):
    """Per element: float32 accumulation of K products and the bias, each
    partial sum rounded once, is within (K + 1) * 2^-24 of the sum of the
    absolute terms, plus one rounding of the result."""
    ref = torch_grouped_mm(a, b, offs, bias, out_dtype=torch.float64)
    magnitude = torch_grouped_mm(a.abs(), b.abs(), offs, bias.abs() if bias is not None else None,
                                 out_dtype=torch.float64)
    k = a.shape[-1]  # the contraction length in every layout (an upper bound for 2D x 2D groups)
    bound = (k + 2) * 2.0**-24 * magnitude
    err = (out.double() - ref).abs()
    assert out.shape == ref.shape and bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@settings(max_examples=120, deadline=None)
@given(grouped_problems(), st.integers(0, 2**31 - 1))
def test_property_matches_reference(problem, seed):
    a, b, offs, bias = grouped_problem_tensors(problem, seed)
    out = torch.ops.moe_ops.grouped_mm(a, b, offs, bias)
    assert_close_to_float64(out, a, b, offs, bias)
    assert torch.equal(torch.ops.moe_ops.grouped_mm(a, b, offs, bias), out)


# Ops with CPU kernels only, and why: each would be a known gap, declared
# (cpu_only in torch_moe_ops/native_functions.yaml) rather than hidden. None today.
CPU_ONLY_OPS = {op.qualname: op.cpu_only for op in native_functions.ops() if op.cpu_only}


def test_cuda_kernels_registered_when_built():
    """In a CUDA build every moe_ops op but CPU_ONLY_OPS has a CUDA kernel in
    the dispatcher. CI builds with TORCH_MOE_OPS_CUDA=1, so there the CUDA
    build must be on."""
    import os

    ops_ = sorted({name for name in torch._C._dispatch_get_all_op_names() if name.startswith("moe_ops::")})
    assert "moe_ops::grouped_mm" in ops_
    if os.environ.get("TORCH_MOE_OPS_CUDA") == "1":
        assert torch_moe_ops.cuda_kernels_built(), "TORCH_MOE_OPS_CUDA=1 but _C was built without CUDA"
    if not torch_moe_ops.cuda_kernels_built():
        pytest.skip("CPU-only build")
    missing = [op for op in ops_
               if op not in CPU_ONLY_OPS and not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"


if __name__ == "__main__":
    run_tests()

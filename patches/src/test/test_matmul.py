# Owner(s): ["module: linear algebra"]

# Device-generic tests of torch._grouped_mm (the CUDA-only ones stay in
# test_matmul_cuda.py). What the CPU kernel does that the CUDA kernels do not
# (bias, float16/float32/float64, a float32 output for 16-bit inputs, zeroed
# rows past offs[-1], ValueErrors naming the argument) is tested on CPU only.

import itertools

import torch
from torch.testing._internal.common_cuda import SM80OrLater
from torch.testing._internal.common_device_type import (
    dtypes,
    dtypesIfCUDA,
    instantiate_device_type_tests,
    onlyCPU,
    skipCUDAIf,
)
from torch.testing._internal.common_utils import parametrize, run_tests, TestCase


def _offs(sizes, device):
    return torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32, device=device)


def _groups(layout, sizes, device, dtype, *, m=5, k=16, n=24):
    """Operands of layout with the grouped dimension split into sizes."""

    def make(*shape):
        return torch.empty(shape, device=device, dtype=dtype).uniform_(-1, 1)

    total, g = sum(sizes), len(sizes)
    if layout == "2d3d":
        return make(total, k), make(g, k, n), _offs(sizes, device)
    if layout == "3d2d":
        return make(g, m, k), make(k, total), _offs(sizes, device)
    if layout == "2d2d":
        return make(m, total), make(total, n), _offs(sizes, device)
    return make(g, m, k), make(g, k, n), None


def _loop(a, b, offs, bias):
    """The grouped product in float64, one group at a time."""
    ends = [] if offs is None else offs.tolist()
    starts = [0, *ends[:-1]]
    if a.dim() == 2 and b.dim() == 3:  # offs splits the rows of a
        out = a.new_zeros(a.size(0), b.size(2))
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[s:e] = a[s:e] @ b[g] + (0 if bias is None else bias[g])
        return out
    if a.dim() == 3 and b.dim() == 2:  # offs splits the columns of b
        out = a.new_zeros(a.size(1), b.size(1))
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[:, s:e] = a[g] @ b[:, s:e] + (0 if bias is None else bias[g, s:e])
        return out
    if a.dim() == 2:  # 2D x 2D: offs splits K, one output per group
        out = a.new_zeros(len(ends), a.size(0), b.size(1))
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[g] = a[:, s:e] @ b[s:e] + (0 if bias is None else bias[g])
        return out
    return a @ b + (0 if bias is None else bias[:, None])


def _reference(a, b, offs, bias=None):
    """The float64 result, the magnitude |a| @ |b| + |bias| that bounds a
    kernel's rounding error per element, and K."""
    a, b = a.double(), b.double()
    bias = None if bias is None else bias.double()
    mag = _loop(a.abs(), b.abs(), offs, None if bias is None else bias.abs())
    return _loop(a, b, offs, bias), mag, a.size(-1)


class TestGroupedMM(TestCase):
    def assertGroupedClose(self, out, a, b, offs, bias=None):
        ref, mag, k = _reference(a, b, offs, bias)
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        # The dot-product bound: K + 1 roundings of the accumulator (the
        # products' sums and the bias), then one rounding to the output dtype.
        # finfo.eps is twice the unit roundoff, so the bound has a factor 2 of slack.
        bound = (k + 1) * torch.finfo(acc).eps * mag + torch.finfo(out.dtype).eps * ref.abs()
        err = (out.double() - ref).abs()
        self.assertEqual(out.shape, ref.shape)
        bad = err > bound
        if bad.any():
            self.fail(f"{int(bad.sum())} elements over the bound, worst error {err[bad].max()}")

    @skipCUDAIf(not SM80OrLater, "grouped GEMM needs SM80+ on CUDA")
    @dtypes(torch.float32, torch.float16, torch.bfloat16, torch.float64)
    @dtypesIfCUDA(torch.bfloat16)
    @parametrize("layout", ["2d3d", "3d2d", "2d2d", "3d3d"])
    def test_grouped_mm_layouts(self, device, dtype, layout):
        # Group sizes stay multiples of 16 so that CUDA's TMA alignment holds;
        # the CPU-only test below covers empty and unaligned groups.
        for sizes in ([16, 32, 16], [48], [16, 16, 16, 16]):
            a, b, offs = _groups(layout, sizes, device, dtype)
            out = torch._grouped_mm(a, b, offs=offs)
            self.assertEqual(out.dtype, dtype)
            self.assertGroupedClose(out, a, b, offs)

    @onlyCPU
    @dtypes(torch.float32, torch.bfloat16, torch.float64)
    @parametrize("layout", ["2d3d", "3d2d", "2d2d", "3d3d"])
    def test_grouped_mm_ragged(self, device, dtype, layout):
        # Empty groups, unaligned sizes, odd K and N, zero tokens.
        for sizes, k, n in (([3, 0, 5, 2], 7, 5), ([0, 0, 0], 12, 10), ([1], 1, 1), ([0, 9], 33, 17)):
            a, b, offs = _groups(layout, sizes, device, dtype, k=k, n=n)
            self.assertGroupedClose(torch._grouped_mm(a, b, offs=offs), a, b, offs)

    @onlyCPU
    @dtypes(torch.float32, torch.bfloat16)
    def test_grouped_mm_noncontiguous(self, device, dtype):
        # nn.Linear-layout expert weights (G, N, K) passed transposed, and a
        # strided view of the tokens, as MoE layers call it.
        sizes = [4, 0, 7, 3]
        a = torch.randn(sum(sizes), 32, device=device, dtype=dtype)[:, ::2]
        w = torch.randn(len(sizes), 12, 16, device=device, dtype=dtype)
        offs = _offs(sizes, device)
        self.assertGroupedClose(torch._grouped_mm(a, w.transpose(-2, -1), offs=offs), a, w.transpose(-2, -1), offs)

    @onlyCPU
    @dtypes(torch.float32, torch.bfloat16, torch.float64)
    @parametrize("layout", ["2d3d", "3d2d", "2d2d", "3d3d"])
    def test_grouped_mm_bias(self, device, dtype, layout):
        a, b, offs = _groups(layout, [3, 0, 6], device, dtype)
        n = b.size(-1)
        bias = torch.randn(3, n, device=device, dtype=dtype)
        self.assertGroupedClose(torch._grouped_mm(a, b, offs=offs, bias=bias), a, b, offs, bias)

    @onlyCPU
    def test_grouped_mm_bias_compiled(self, device):
        # Inductor's grouped mm lowering gives its choices no bias: with one it runs the op itself.
        a, b, offs = _groups("2d3d", [3, 0, 6], device, torch.float32)
        bias = torch.randn(3, b.size(-1), device=device)

        def fn(a, b, offs, bias):
            return torch._grouped_mm(a, b, offs=offs, bias=bias)

        self.assertEqual(torch.compile(fn, fullgraph=True)(a, b, offs, bias), fn(a, b, offs, bias))

    @onlyCPU
    @dtypes(torch.float16, torch.bfloat16)
    def test_grouped_mm_out_dtype_float32(self, device, dtype):
        a, b, offs = _groups("2d3d", [5, 0, 11], device, dtype, k=40)
        out = torch._grouped_mm(a, b, offs=offs, out_dtype=torch.float32)
        self.assertEqual(out.dtype, torch.float32)
        self.assertGroupedClose(out, a, b, offs)
        # One rounding of the same float32 sums: the 16-bit output is its cast.
        self.assertEqual(torch._grouped_mm(a, b, offs=offs), out.to(dtype), atol=0, rtol=0)

    @onlyCPU
    @dtypes(torch.float32, torch.bfloat16)
    def test_grouped_mm_rows_past_offs_are_zero(self, device, dtype):
        a, b, offs = _groups("2d3d", [2, 3], device, dtype)
        a = torch.cat([a, torch.full((4, a.size(1)), float("nan"), device=device, dtype=dtype)])
        out = torch._grouped_mm(a, b, offs=offs)
        self.assertEqual(out[5:], torch.zeros_like(out[5:]), atol=0, rtol=0)
        a, b, offs = _groups("3d2d", [2, 3], device, dtype)
        out = torch._grouped_mm(a, torch.cat([b, b[:, :2]], dim=1), offs=offs)
        self.assertEqual(out[:, 5:], torch.zeros_like(out[:, 5:]), atol=0, rtol=0)

    @onlyCPU
    @dtypes(torch.float32, torch.bfloat16)
    def test_grouped_mm_deterministic(self, device, dtype):
        # The same bits whatever the thread count: no split-K reductions
        # whose order depends on the threads.
        a, b, offs = _groups("2d3d", [37, 0, 130, 5], device, dtype, k=300, n=70)
        threads = torch.get_num_threads()
        try:
            outs = []
            for n in (1, max(threads, 2)):
                torch.set_num_threads(n)
                outs.append(torch._grouped_mm(a, b, offs=offs))
        finally:
            torch.set_num_threads(threads)
        self.assertEqual(outs[0], outs[1], atol=0, rtol=0)

    @onlyCPU
    @dtypes(torch.float32, torch.float16, torch.bfloat16)
    def test_grouped_mm_blocked(self, device, dtype):
        # Past one block in every dimension, with ragged edges: a group of more
        # rows than a row block, K over several K blocks, N over several column
        # tiles; many groups of a short K (a weight gradient over a few routed
        # rows); large float32 groups without bias (there the CPU kernel may
        # hand each group to the BLAS behind mm).
        bias_dtype = torch.float32 if dtype == torch.float32 else dtype
        a, b, offs = _groups("2d3d", [200, 0, 7, 65], device, dtype, k=300, n=300)
        bias = torch.randn(4, 300, device=device, dtype=bias_dtype)
        self.assertGroupedClose(torch._grouped_mm(a, b, offs=offs, bias=bias), a, b, offs, bias)
        a, b, offs = _groups("3d2d", [130, 3, 170], device, dtype, m=70, k=150)
        self.assertGroupedClose(torch._grouped_mm(a, b, offs=offs), a, b, offs)
        a, b, offs = _groups("2d2d", [5, 0, 3, 9] * 5, device, dtype, m=33, n=290)
        self.assertGroupedClose(torch._grouped_mm(a, b, offs=offs), a, b, offs)
        if dtype != torch.float32:
            out = torch._grouped_mm(a, b, offs=offs, out_dtype=torch.float32)
            self.assertEqual(out.dtype, torch.float32)
            self.assertGroupedClose(out, a, b, offs)
        a, b, offs = _groups("2d3d", [300, 270], device, dtype, k=64, n=40)
        self.assertGroupedClose(torch._grouped_mm(a, b, offs=offs), a, b, offs)

    @onlyCPU
    def test_grouped_mm_bfloat16_k_pairs(self, device):
        # On CPUs with AVX512_BF16 (Sapphire Rapids, Zen 4) bfloat16 runs as K
        # pairs, two K steps per vdpbf16ps; elsewhere it is widened to float32,
        # and only that path runs. The pairs' edges: an odd K (the last element
        # pairs with zero) below and past one K block (256), weights stored
        # (G, N, K) with an even and an odd column stride (a K pair is one
        # 32-bit word of the former), and A stored K-major (X^T of a weight
        # gradient), with bias and a float32 output.
        dtype = torch.bfloat16
        for k in (1, 7, 255, 257, 600):
            a, b, offs = _groups("2d3d", [9, 0, 20], device, dtype, k=k, n=70)
            bias = torch.randn(3, 70, device=device, dtype=dtype)
            self.assertGroupedClose(torch._grouped_mm(a, b, offs=offs, bias=bias), a, b, offs, bias)
            out = torch._grouped_mm(a, b, offs=offs, out_dtype=torch.float32)
            self.assertGroupedClose(out, a, b, offs)
            for stride in (k + k % 2, k + 1 - k % 2):
                w = torch.randn(3, 70, stride, device=device, dtype=dtype)[..., :k].transpose(-2, -1)
                self.assertGroupedClose(torch._grouped_mm(a, w, offs=offs), a, w, offs)
            x = torch.randn(a.size(0), 40, device=device, dtype=dtype).t()
            self.assertGroupedClose(torch._grouped_mm(x, a, offs=offs), x, a, offs)
            a3 = torch.randn(2, k, 30, device=device, dtype=dtype).transpose(-2, -1)
            b3 = torch.randn(2, k, 50, device=device, dtype=dtype)
            self.assertGroupedClose(torch._grouped_mm(a3, b3), a3, b3, None)
        # With the pairs, groups of hundreds of rows with A and B row-major
        # stay on them rather than on mm: each row keeps the bits it has in a
        # small group (mm sums this K in another order). Not with AMX, whose
        # small groups run brgemm tiles.
        if torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported():
            a, b, offs = _groups("2d3d", [300, 0, 620], device, dtype, k=2048, n=300)
            out = torch._grouped_mm(a, b, offs=offs)
            self.assertGroupedClose(out, a, b, offs)
            sixteen = torch.tensor([16], device=device, dtype=torch.int32)
            for g, r in ((0, 0), (2, 300), (2, 900)):
                small = torch._grouped_mm(a[r:r + 16], b[g:g + 1], offs=sixteen)
                self.assertEqual(out[r:r + 16], small, atol=0, rtol=0)

    @onlyCPU
    @dtypes(torch.float32, torch.bfloat16, torch.float16)
    def test_grouped_mm_weights_along_k(self, device, dtype):
        # Expert weights stored (G, N, K), passed transposed: rows of A and
        # columns of B both contiguous along K. K long enough for the kernels
        # that read such weights in place, and not a multiple of their vector
        # width; N not a multiple of their weight rows; a group of more rows
        # than they hold at once; bias and a float32 output.
        for sizes, k, n in (([100, 0, 9, 31], 100, 13), ([6, 1], 257, 70), ([40], 64, 4)):
            g = len(sizes)
            a = torch.randn(sum(sizes), k, device=device, dtype=dtype)
            w = torch.randn(g, n, k, device=device, dtype=dtype).transpose(-2, -1)
            offs = _offs(sizes, device)
            bias = torch.randn(g, n, device=device, dtype=dtype)
            self.assertGroupedClose(torch._grouped_mm(a, w, offs=offs, bias=bias), a, w, offs, bias)
            if dtype != torch.float32:
                out = torch._grouped_mm(a, w, offs=offs, out_dtype=torch.float32)
                self.assertGroupedClose(out, a, w, offs)
            # 3D x 3D and 2D x 3D with the tokens strided as well.
            a3 = torch.randn(g, 7, 2 * k, device=device, dtype=dtype)[..., ::2].contiguous()
            self.assertGroupedClose(torch._grouped_mm(a3, w), a3, w, None)

    @onlyCPU
    @dtypes(torch.float32, torch.bfloat16)
    def test_grouped_mm_few_rows_weights_along_k(self, device, dtype):
        # Groups of 17 rows and more (bfloat16: 18, on CPUs with AVX512_BF16)
        # with weights stored (G, N, K) take the transposed-tile kernel on
        # AVX-512 CPUs, which sums along K in the order the (G, K, N) storage
        # is summed in: both storage orders give the same bits on those
        # groups. Groups past 48 rows (several passes over the rows), K past
        # one block, N past a tile and off the 8- and 16-column edges, A
        # row-major and column-major. 3D x 2D with more than 512 such weight
        # rows runs turned around (C^T = B^T A^T) in the same kernel, with
        # the same bits as the (G, K, N) storage, which it takes unturned.
        # The rows after a group's last whole 16 (17 = 16 + 1, 33, 130) may
        # take inner products instead, with the bits of the same rows as a
        # group of their own.
        sizes = [17, 0, 48, 33, 5, 130]
        fewest = 17 if dtype == torch.float32 else 18
        same_bits = dtype == torch.float32 or torch.cpu._is_avx512_bf16_supported()
        tiled = [(e, s - n, n) for e, (s, n) in enumerate(zip(itertools.accumulate(sizes), sizes)) if n >= fewest]
        few = torch.cat([torch.arange(s, s + n // 16 * 16) for _, s, n in tiled])
        rest = [(e, slice(s + n // 16 * 16, s + n), _offs([n % 16], device)) for e, s, n in tiled if n % 16]
        for k, n in ((64, 9), (301, 300), (2085, 20)):
            a = torch.randn(sum(sizes), k, device=device, dtype=dtype)
            w = torch.randn(len(sizes), n, k, device=device, dtype=dtype).transpose(-2, -1)
            offs = _offs(sizes, device)
            bias = torch.randn(len(sizes), n, device=device, dtype=dtype)
            for x in (a, a.t().contiguous().t()):
                out = torch._grouped_mm(x, w, offs=offs, bias=bias)
                self.assertGroupedClose(out, x, w, offs, bias)
                if same_bits:
                    kn = torch._grouped_mm(x, w.contiguous(), offs=offs, bias=bias)
                    self.assertEqual(out[few], kn[few], atol=0, rtol=0)
                    for e, r, o in rest:
                        own = torch._grouped_mm(x[r], w[e:e + 1], offs=o, bias=bias[e:e + 1])
                        self.assertTrue(torch.equal(out[r], kn[r]) or torch.equal(out[r], own))
            w_nk = torch.randn(len(sizes), 520, k, device=device, dtype=dtype)
            out = torch._grouped_mm(w_nk, a.t(), offs=offs)
            self.assertGroupedClose(out, w_nk, a.t(), offs)
            if same_bits:
                kn = torch._grouped_mm(w_nk.transpose(-2, -1).contiguous().transpose(-2, -1), a.t(), offs=offs)
                self.assertEqual(out[:, few], kn[:, few], atol=0, rtol=0)
                for e, r, o in rest:
                    own = torch._grouped_mm(w_nk[e:e + 1], a.t()[:, r], offs=o)
                    self.assertTrue(torch.equal(out[:, r], kn[:, r]) or torch.equal(out[:, r], own))

    @onlyCPU
    @dtypes(torch.float32, torch.bfloat16)
    def test_grouped_mm_weight_gradient_streamed(self, device, dtype):
        # A weight gradient (2D x 2D) whose groups have fewer routed rows (K)
        # than output rows: on AVX-512 CPUs its tiles that write 128 KB and
        # more (256 rows and more) send their full, 64-byte aligned 64-column
        # rows to memory with streaming stores, the others (N 1000: most rows
        # unaligned; the last 40 columns) with plain ones, as does the group
        # of 300 routed rows when there are 256 output rows. Each element sums
        # in K order whatever the tile, so it holds the bits of the same rows
        # run as a small problem (16 rows, plain stores). One group spans two
        # K blocks (tiles 256 columns wide), three are empty.
        sizes = [37, 0, 96, 300, 5, 0, 64, 1, 80, 17, 0, 128, 40, 9, 70, 33]
        offs = _offs(sizes, device)
        for m, n, with_bias in ((2048, 1024, False), (256, 1000, True)):
            x = torch.randn(sum(sizes), m, device=device, dtype=dtype)
            dy = torch.randn(sum(sizes), n, device=device, dtype=dtype)
            bias = torch.randn(len(sizes), n, device=device, dtype=dtype) if with_bias else None
            out = torch._grouped_mm(x.t(), dy, offs=offs, bias=bias)
            self.assertGroupedClose(out, x.t(), dy, offs, bias)
            for r0 in (0, m - 16):
                small = torch._grouped_mm(x[:, r0:r0 + 16].t(), dy, offs=offs, bias=bias)
                self.assertEqual(out[:, r0:r0 + 16], small, atol=0, rtol=0)

    @onlyCPU
    def test_grouped_mm_bfloat16_rounds_as_c10(self, device):
        # bfloat16 outputs round as c10::BFloat16(float) does, NaN and float32
        # denormals included: on AVX512_BF16 CPUs full 64-column rows round
        # with vcvtne2ps2bf16, which reads denormals as zero and keeps a NaN's
        # sign and payload, so rows holding either must round otherwise. Small
        # integers make every float32 sum exact, whatever its order; zero rows
        # of A leave a bias of denormals; a negative NaN with a payload in A
        # makes its output row NaN. Groups of 30 rows: the row blocks after the
        # first run in one call of the kernel.
        offs = _offs([30, 30, 30], device)
        a = torch.randint(-3, 4, (90, 64), device=device).bfloat16()
        a[7] = 0
        a[40:52] = 0
        a[65, 9] = torch.tensor(0xFFA5 - 0x10000, dtype=torch.int16).view(torch.bfloat16)
        b = torch.randint(-3, 4, (3, 64, 128), device=device).bfloat16()
        bias = torch.randint(-3, 4, (3, 128), device=device).bfloat16()
        bias[:, ::3] = 2.0**-130 * torch.randint(1, 7, (3, 43), device=device)
        out = torch._grouped_mm(a, b, offs=offs, bias=bias)
        ref = torch.cat([a[30 * g:30 * (g + 1)].double() @ b[g].double() + bias[g].double() for g in range(3)])
        bits = ref.float().view(torch.int32).long() & 0xFFFFFFFF
        want = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
        want[65] = 0x7FC0
        self.assertEqual(out.view(torch.int16).long() & 0xFFFF, want, atol=0, rtol=0)

    @onlyCPU
    def test_grouped_mm_errors(self, device):
        a, b = torch.randn(5, 4, device=device), torch.randn(2, 4, 3, device=device)
        a3 = torch.randn(3, 5, 4, device=device)
        offs = _offs([2, 3], device)
        cases = [
            ((a, torch.randn(2, 5, 3)), {"offs": offs}, r"contraction sizes differ"),
            ((a3[:2], b), {"offs": offs}, r"offs must be None when mat_a and mat_b are both 3-D"),
            ((a3, b), {}, r"batch sizes differ: mat_a \[3, 5, 4\], mat_b \[2, 4, 3\]"),
            ((a, b[0]), {"offs": offs}, r"offs\[-1\]=5 exceeds the grouped dimension K \(mat_a.size\(1\)\)=4"),
            ((a, b), {}, r"offs is required when mat_a or mat_b is 2-D"),
            ((a, b), {"offs": offs.long()}, r"offs must be int32, got Long"),
            ((a, b), {"offs": _offs([3, -2], device)}, r"offs must be non-decreasing"),
            ((a, b), {"offs": _offs([2, 4], device)}, r"offs\[-1\]=6 exceeds the grouped dimension M"),
            ((a, b), {"offs": offs, "bias": torch.randn(3)}, r"bias must have shape \(G, N\) = \(2, 3\)"),
            ((a, b), {"offs": offs, "bias": torch.randn(2, 3, dtype=torch.float64)},
             r"bias must have the input dtype \(Float\) or the output dtype \(Float\), got Double"),
            ((a, b), {"offs": offs, "out_dtype": torch.bfloat16}, r"out_dtype must be the input dtype"),
        ]
        for args, kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                torch._grouped_mm(*args, **kwargs)


instantiate_device_type_tests(TestGroupedMM, globals())

if __name__ == "__main__":
    run_tests()

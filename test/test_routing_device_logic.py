"""The routing kernels of cuda/MoE{Permute,Unpermute,RouterTopk}.cu, run on the host.

The kernels are shells around bodies written as C10_HOST_DEVICE functions
(cuda/MoE{Permute,Unpermute,RouterTopk}.cuh) that the CPU build compiles too. The test-only ops
torch.ops.moe_ops_testing.*_on_host (csrc/testing/CudaKernelsOnHost.cpp)
mirror the CUDA entries (checks, allocations, arguments, launch sequence) and
walk every block and thread of each launch in sequence, running the phases a
kernel separates by __syncthreads one after another over the whole block.
They run in every build, CPU-only included. Compared with the CPU ops on the
OpInfo samples of test/opinfo_routing.py and on inputs that reach the parts
those samples do not (16-byte row copies, several histogram blocks, more
experts than scan threads, hidden sizes past the block, a capped grid):

- permute (all four outputs), unpermute and unpermute_backward's
  grad_permuted: bit for bit;
- router_topk: ids and counts bit for bit; weights bit for bit in float64 and
  to WEIGHT_TOL otherwise (the CPU kernel's AVX-512 path has its own exp);
- unpermute_backward's grad_weights: a block tree reduction, another order
  than the CPU's running sum, so both within the summation bound of the
  exact dot product.

What this proves: the index arithmetic, the chunking, the histogram and scan,
the slot assignment, the row gathers, the combines, the top-k selection and
the grid-stride loops, for the grids the entries launch (and smaller ones).

What only a GPU can verify:
- warp-level execution and synchronisation: that each __syncthreads is where
  the phases need it (the walk orders the phases whatever the kernel does),
  and divergence around it; the kernels use no warp shuffles or votes;
- atomics: router_topk's counts are atomicAdds (integers, so any order sums
  the same; the walk adds in order);
- the memory model: visibility of one kernel's writes to the next on the
  stream, shared memory, 16-byte loads and stores on device addresses;
- the device's arithmetic where it is not the host's: its exp (CUDA's expf is
  within 2 ulp, glibc's within 1), so router weights differ from these by
  rounding; every product feeding a sum is mul_rn, which nvcc may not fuse
  into an FMA, so the rest is the same bits;
- launch configuration limits (grid and block sizes, registers, shared
  memory, a launch that fails) and CUDA_KERNEL_ASSERT, where the walk raises.
"""

import pytest
import torch

import torch_moe_ops  # noqa: F401  (loads _C, which registers moe_ops_testing)
from torch_moe_ops.reference import torch_router_topk

from opinfo_routing import PERMUTE_DTYPES, make_rows, op_db, random_routing
from test_routing import WEIGHT_TOL

ops = {op.name.split(".")[1]: op for op in op_db}
on_host = torch.ops.moe_ops_testing

# The entries' grid cap (kMaxGridBlocks) and caps that make every grid-stride
# loop of router_topk, permute's fill and gather stride.
MAX_BLOCKS = [65535, 1, 3]
FLOATING = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _bytes(t):
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _assert_same(a, b, msg):
    assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), msg
    assert torch.equal(_bytes(a), _bytes(b)), msg


# ---------------------------------------------------------------- router_topk


@pytest.mark.parametrize("max_blocks", MAX_BLOCKS)
@pytest.mark.parametrize("dtype", FLOATING)
def test_router_topk_on_host(dtype, max_blocks):
    for s in ops["router_topk"].sample_inputs("cpu", dtype):
        w, ids, counts = on_host.router_topk_on_host(s.input, *s.args, **s.kwargs, max_blocks=max_blocks)
        rw, rids, rcounts = torch.ops.moe_ops.router_topk(s.input, *s.args, **s.kwargs)
        _assert_same(ids, rids, s.name)
        _assert_same(counts, rcounts, s.name)
        if dtype == torch.float64:  # the CPU kernel's scalar path: the same operations in the same order
            _assert_same(w, rw, s.name)
        else:
            assert (w.dtype, w.shape) == (rw.dtype, rw.shape)
            torch.testing.assert_close(w, rw, **WEIGHT_TOL[torch.float32], msg=s.name)


@pytest.mark.parametrize("max_blocks", [1, 2, 65535])
def test_router_topk_every_token_routed_under_a_capped_grid(max_blocks):
    """The grid is capped (65535 blocks of 128 threads) and each thread
    strides over tokens. Regression: the kernel had no stride loop, so
    tokens past 65535 * 128 = 8,388,480 were never routed (weights and ids
    left unwritten, counts short); a cap of 1 or 2 blocks shows it here."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 64, generator=g, dtype=torch.float64)
    bias = torch.randn(64, generator=g, dtype=torch.float64) * 0.1
    for kw in (dict(), dict(score_func="sigmoid", bias=bias, n_group=8, topk_group=3, renormalize=True,
                            scaling_factor=2.5)):
        got = on_host.router_topk_on_host(logits, 6, **kw, max_blocks=max_blocks)
        for a, b in zip(got, torch.ops.moe_ops.router_topk(logits, 6, **kw), strict=True):
            _assert_same(a, b, str(kw))
        assert int(got[2].sum()) == 1000 * 6


# -------------------------------------------------------------------- permute


def permute_cases(dtype):
    """The OpInfo samples, then inputs the samples do not reach."""
    for s in ops["permute"].sample_inputs("cpu", dtype):
        yield s.name, s.input, s.args, s.kwargs
    g = torch.Generator().manual_seed(1)
    # Rows of 16k bytes: the 16-byte copies (the samples' rows are 7 elements).
    width = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
    ids = random_routing(11, 6, 3, "cpu", g)
    yield "vectorised_rows", make_rows((11, 4 * width), device="cpu", dtype=dtype), (ids, 6), dict(alignment=4)
    yield "vectorised_strided_rows", make_rows((11, 8 * width), device="cpu", dtype=dtype)[:, : 4 * width], \
        (ids, 6), {}


def large_permute_cases():
    g = torch.Generator().manual_seed(2)
    # 2400 x 8 pairs: 300 chunks of 64, two blocks of histogram threads.
    yield "many_chunks", torch.randn(2400, 3, generator=g), (random_routing(2400, 40, 8, "cpu", g), 40), \
        dict(alignment=16, first_expert=3, num_local_experts=30)
    # 1500 local experts: more than the scan's 1024 threads, so threads stride.
    yield "many_experts", torch.randn(50, 4, generator=g), (random_routing(50, 1500, 4, "cpu", g), 1500), \
        dict(alignment=2)
    yield "all_tokens_one_expert", torch.randn(300, 5, generator=g), \
        (random_routing(300, 9, 1, "cpu", g, skew="one").long(), 9), dict(alignment=128)


@pytest.mark.parametrize("max_blocks", MAX_BLOCKS)
@pytest.mark.parametrize("dtype", sorted(PERMUTE_DTYPES, key=str), ids=str)
def test_permute_on_host(dtype, max_blocks):
    for name, tokens, args, kwargs in permute_cases(dtype):
        got = on_host.permute_on_host(tokens, *args, **kwargs, max_blocks=max_blocks)
        want = torch.ops.moe_ops.permute(tokens, *args, **kwargs)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_same(a, b, f"{name} output {i}")


@pytest.mark.parametrize("max_blocks", MAX_BLOCKS)
def test_permute_on_host_large(max_blocks):
    for name, tokens, args, kwargs in large_permute_cases():
        got = on_host.permute_on_host(tokens, *args, **kwargs, max_blocks=max_blocks)
        want = torch.ops.moe_ops.permute(tokens, *args, **kwargs)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_same(a, b, f"{name} output {i}")


def test_permute_on_host_rejects_bad_ids():
    """Where the histogram kernel's CUDA_KERNEL_ASSERT fires, the walk raises
    the CPU kernel's message (the first bad pair)."""
    for ei in ops["permute"].error_inputs("cpu"):
        s = ei.sample_input
        if s.name == "ids_values":
            with pytest.raises(ValueError, match=ei.error_regex):
                on_host.permute_on_host(s.input, *s.args, **s.kwargs)


# ------------------------------------------------------------------ unpermute


def unpermute_cases(dtype):
    for s in ops["unpermute"].sample_inputs("cpu", dtype):
        yield s.name, s.input, s.args[0], (s.args[1] if len(s.args) > 1 else None)
    # Hidden past the block's 256 threads (threads stride), and rows that
    # repeat (an index other than permute's; the backward sums them in slot order).
    g = torch.Generator().manual_seed(3)
    ids = random_routing(7, 5, 2, "cpu", g)
    _, dst_rows, _, _ = torch.ops.moe_ops.permute(torch.zeros(7, 1), ids, 5, 4)
    rows = 14 + 5 * 3
    yield "wide", torch.randn(rows, 300, generator=g).to(dtype), dst_rows, torch.rand(7, 2, generator=g)
    repeated = torch.tensor([[0, 3], [3, -1], [0, 2], [5, 5]])
    yield "repeated_rows", torch.randn(6, 5, generator=g).to(dtype), repeated, torch.rand(4, 2, generator=g)
    yield "repeated_rows_unweighted", torch.randn(6, 300, generator=g).to(dtype), repeated, None


@pytest.mark.parametrize("dtype", FLOATING)
def test_unpermute_on_host(dtype):
    for name, permuted, dst_rows, weights in unpermute_cases(dtype):
        _assert_same(on_host.unpermute_on_host(permuted, dst_rows, weights),
                     torch.ops.moe_ops.unpermute(permuted, dst_rows, weights), name)


def _dot_bound(grad_output, permuted, dst_rows, acc_eps, out_eps):
    """Exact (float64) <grad_output[t], permuted[dst[t, j]]> and the bound
    on a float sum of its `hidden` products in any order (hidden * eps of
    the accumulation type times the sum of magnitudes) plus the rounding to
    the output dtype."""
    g, x = grad_output.double(), permuted.double()
    safe = dst_rows.clamp_min(0)
    prods = g.unsqueeze(1) * x[safe]  # (T, k, H)
    keep = dst_rows.ge(0).unsqueeze(-1)
    exact = (prods * keep).sum(-1)
    mag = (prods.abs() * keep).sum(-1)
    hidden = grad_output.shape[1]
    return exact, hidden * acc_eps * mag + out_eps * exact.abs()


@pytest.mark.parametrize("dtype", FLOATING)
def test_unpermute_backward_on_host(dtype):
    g = torch.Generator().manual_seed(4)
    acc_eps = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    for name, permuted, dst_rows, weights in unpermute_cases(dtype):
        permuted = permuted.detach()
        weights = weights.detach() if weights is not None else None
        grad = torch.randn(dst_rows.shape[0], permuted.shape[1], generator=g).to(dtype)
        rows = permuted.shape[0]
        for with_permuted in (False, True):
            p = permuted.contiguous() if with_permuted else None
            gp, gw = on_host.unpermute_backward_on_host(grad, dst_rows, rows, weights, p)
            rgp, rgw = torch.ops.moe_ops.unpermute_backward(grad, dst_rows, rows, weights, p)
            _assert_same(gp, rgp, f"{name}: grad_permuted")
            assert (gw.dtype, gw.shape) == (rgw.dtype, rgw.shape), name
            if with_permuted:
                out_eps = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
                           torch.float16: 2.0**-11}[gw.dtype]
                exact, bound = _dot_bound(grad, p, dst_rows, acc_eps, out_eps)
                for got in (gw, rgw):
                    assert bool(((got.double() - exact).abs() <= bound + 1e-300).all()), name


def test_unpermute_on_host_rejects_bad_rows():
    """Where the kernels' CUDA_KERNEL_ASSERT fires, the walk raises."""
    permuted = torch.randn(6, 4)
    bad = torch.tensor([[0, 1], [2, 6], [4, 5]])
    with pytest.raises(ValueError, match=r"unpermute: dst_rows must be -1 or a row of permuted"):
        on_host.unpermute_on_host(permuted, bad)
    with pytest.raises(ValueError, match=r"unpermute_backward: dst_rows must be -1 or a row of permuted"):
        on_host.unpermute_backward_on_host(torch.randn(3, 4), bad, 6, None, permuted)
    with pytest.raises(ValueError, match=r"unpermute_backward: dst_rows must be -1 or a row of permuted"):
        on_host.unpermute_backward_on_host(torch.randn(3, 4), bad - 8, 6)


def test_router_topk_nan_group_keys():
    """A group whose two best keys are +inf and -inf (softmax_after_topk on
    infinite logits, n_group > 1) has the key inf + -inf = NaN: the contract
    ranks it as -inf (as a NaN expert key), ties by lower group id, on the
    CUDA body, the CPU kernel and the reference alike."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randint(-3, 4, (16, 16), generator=g).double()
        m = torch.rand(16, 16, generator=g)
        x[m < 0.15], x[m > 0.85] = float("inf"), -float("inf")
        kw = dict(score_func="softmax_after_topk", n_group=4, topk_group=2)
        ids = torch.ops.moe_ops.router_topk(x, 3, **kw)[1]
        _assert_same(on_host.router_topk_on_host(x, 3, **kw)[1], ids, "CUDA body")
        _assert_same(torch_router_topk(x, 3, **kw)[1], ids, "reference")

"""Tests of the routing ops: moe_ops::router_topk, moe_ops::permute and
moe_ops::unpermute, against the plain-torch references in
torch_moe_ops/reference.py.

permute is a copy, so it is compared bitwise; unpermute accumulates in the
reference's order and precision, so it is bitwise too; router_topk ids and
counts are exact and its weights agree to float32 rounding.

The OpInfos live in test/opinfo_routing.py (the ops return tuples and take
integer routing tensors, which the grouped_mm tests do not handle); the patch
series carries that module upstream.
"""

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.common_device_type import onlyCPU, ops
from torch.testing._internal.common_utils import TestCase, run_tests

import torch_moe_ops  # noqa: F401
from torch_moe_ops.reference import torch_permute, torch_router_topk, torch_unpermute

from common import assert_same_bits_at_thread_counts
from _device import instantiate_cpu_and_cuda
from opinfo_routing import op_db as routing_op_db, random_routing

# router_topk weights: the kernel and the reference both compute the scores in
# float32, but with different exp implementations (<= 1 ulp each) and sum
# orders (<= E * 2^-24 relative for E <= 64 terms here), then at most one
# renormalisation: 2e-5 relative covers it; 1e-7 absolute for scores that
# underflow near zero. float64 gets the same bound scaled to 2^-53.
WEIGHT_TOL = {torch.float32: dict(rtol=2e-5, atol=1e-7), torch.float64: dict(rtol=1e-13, atol=1e-15)}




def _call(op, s):
    return op(s.input, *s.args, **s.kwargs)


def _as_tuple(x):
    return x if isinstance(x, (tuple, list)) else (x,)


def _fake(mode, v):
    return mode.from_tensor(v) if isinstance(v, torch.Tensor) else v


def _diff_inputs(s):
    """The floating-point tensors of a sample that take a gradient."""
    return [t for t in (s.input, *s.args, *s.kwargs.values())
            if isinstance(t, torch.Tensor) and t.requires_grad]


class TestRouting(TestCase):
    @ops(routing_op_db)
    def test_matches_reference(self, device, dtype, op):
        for s in op.sample_inputs(device, dtype):
            out = _as_tuple(_call(op, s))
            ref = _as_tuple(op.ref(s.input, *s.args, **s.kwargs))
            for i, (o, r) in enumerate(zip(out, ref, strict=True)):
                self.assertEqual(o.dtype, r.dtype, msg=s.name)
                if op.name.endswith("router_topk") and i == 0:
                    self.assertEqual(o, r, **WEIGHT_TOL[o.dtype], msg=s.name)
                else:  # ids, counts, permute (a copy), unpermute (same order and precision)
                    self.assertEqual(o, r, atol=0, rtol=0, msg=f"{s.name} output {i}")

    @onlyCPU
    def test_bits_independent_of_thread_count(self, device):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(3000, 64, generator=g)
        tokens = torch.randn(3000, 96, generator=g).bfloat16()

        def run():
            w, ids, _ = torch.ops.moe_ops.router_topk(logits, 6, renormalize=True)
            p = torch.ops.moe_ops.permute(tokens, ids, 64, 16)
            return (w, ids) + tuple(p) + (torch.ops.moe_ops.unpermute(p[0], p[1], w),)

        assert_same_bits_at_thread_counts(run)

    @onlyCPU
    def test_large_index_past_int32(self, device):
        # permuted has 2^31 + 2^28 elements: row offsets overflow int32 unless
        # the kernels index with int64. Distinct row fills tell the rows apart.
        hidden = 1 << 28
        tokens = torch.arange(1, 3, dtype=torch.uint8).view(2, 1).expand(2, hidden).contiguous()
        # k = 8 with repeated experts: 16 rows, groups padded to 2, R = 16 + 4.
        ids = torch.tensor([[2, 1, 0, 3, 3, 0, 1, 2], [0, 1, 2, 3, 3, 2, 1, 1]], dtype=torch.int32)
        permuted, dst_rows, src_rows, offs = torch.ops.moe_ops.permute(tokens, ids, 4, alignment=2)
        self.assertGreater(permuted.numel(), 2**31)
        ref = torch_permute(tokens[:, :1], ids, 4, alignment=2)
        self.assertEqual((dst_rows, src_rows, offs), ref[1:4], atol=0, rtol=0)
        self.assertEqual(permuted[:, -1], ref[0][:, 0], atol=0, rtol=0)
        self.assertEqual(permuted[:, 0], ref[0][:, 0], atol=0, rtol=0)
        del permuted
        # unpermute gathers rows at element offsets past 2^31 (bf16, 2^28 wide).
        rows = torch.zeros(9, 1 << 28, dtype=torch.bfloat16)
        rows[8, -1] = 3.0
        out = torch.ops.moe_ops.unpermute(rows, torch.tensor([[8, -1]]), torch.tensor([[2.0, 5.0]]))
        self.assertEqual(out[0, -1].item(), 6.0)
        self.assertEqual(out[0, :-1].abs().sum().item(), 0.0)

    def test_compile_dynamic_no_recompile(self, device):
        """router -> permute -> (expert matmul) -> unpermute, forward and
        backward, under fullgraph=True, dynamic=True: one frame for three
        token counts."""
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        E, k, H = 8, 2, 16

        def moe(x, router_w, experts):
            weights, ids, _ = torch.ops.moe_ops.router_topk(x @ router_w, k, renormalize=True)
            permuted, dst_rows, _, offs = torch.ops.moe_ops.permute(x, ids, E, alignment=4)
            y = torch.ops.moe_ops.grouped_mm(permuted, experts, offs)
            return torch.ops.moe_ops.unpermute(y, dst_rows, weights)

        cmoe = torch.compile(moe, backend=counter, fullgraph=True, dynamic=True)
        g = torch.Generator().manual_seed(0)
        router_w = torch.randn(H, E, generator=g).to(device).requires_grad_()
        experts = torch.randn(E, H, H, generator=g).to(device).requires_grad_()
        for tokens in (10, 17, 33):
            x = torch.randn(tokens, H, generator=g).to(device).requires_grad_()
            out = cmoe(x, router_w, experts)
            grads = torch.autograd.grad(out.square().sum(), (x, router_w, experts))
            ref = moe(x, router_w, experts)
            ref_grads = torch.autograd.grad(ref.square().sum(), (x, router_w, experts))
            # Same ops, but inductor may fuse the router matmul and the loss
            # differently: fp32 rounding of sums of <= 33 * 16 terms.
            self.assertEqual(out, ref, rtol=1e-5, atol=1e-5)
            for a, b in zip(grads, ref_grads):
                self.assertEqual(a, b, rtol=1e-4, atol=1e-4)
        self.assertEqual(counter.frame_count, 1, msg="recompiled for new token counts")


instantiate_cpu_and_cuda(TestRouting, globals(), gpu_adds=(
    "the routing kernels on the device: launches, barriers, atomics, the memory model, the device's exp; "
    "their bodies run on the host in test_routing_device_logic.py"))


# ------------------------------------------------------ hypothesis properties


@st.composite
def routing_problems(draw):
    experts = draw(st.integers(1, 20))
    k = draw(st.integers(1, min(experts, 6)))
    tokens = draw(st.integers(0, 40))
    hidden = draw(st.integers(1, 33))
    alignment = draw(st.sampled_from([1, 2, 8, 16, 32, 128]))
    first = draw(st.integers(0, experts - 1))
    num_local = draw(st.integers(1, experts - first))
    skew = draw(st.sampled_from([None, None, "one"]))
    return experts, k, tokens, hidden, alignment, first, num_local, skew


@settings(max_examples=150, deadline=None)
@given(routing_problems(), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**31 - 1))
def test_property_permute_unpermute(problem, dtype, seed):
    experts, k, tokens, hidden, alignment, first, num_local, skew = problem
    g = torch.Generator().manual_seed(seed)
    ids = random_routing(tokens, experts, k, "cpu", g, skew)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    out = torch.ops.moe_ops.permute(x, ids, experts, alignment, first, num_local)
    ref = torch_permute(x, ids, experts, alignment, first, num_local)
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    permuted, dst_rows, src_rows, offs = out
    # grouped_mm layout: groups start aligned and end within the output.
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    assert bool((starts % alignment == 0).all()) and int(offs[-1]) <= permuted.shape[0]
    w = torch.rand(tokens, k, generator=g)
    for weights in (None, w):
        assert torch.equal(torch.ops.moe_ops.unpermute(permuted, dst_rows, weights),
                           torch_unpermute(permuted, dst_rows, weights))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 6), st.integers(1, 3), st.integers(1, 7), st.integers(1, 4), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_unpermute_double_backward(tokens, k, rows, hidden, with_weights, extra_rows, seed):
    """Second derivatives of unpermute (its backward, unpermute_backward, has
    its own derivative) against finite differences, in float64: dst_rows
    drawn freely, so rows repeat (a row summed into several tokens) and slots
    drop (-1); rows no slot names (extra_rows) get zero gradients. Before the
    derivative was registered, autograd took unpermute_backward as constant:
    gradgradcheck failed and a second derivative came back None, with a
    warning only."""
    g = torch.Generator().manual_seed(seed)
    rows += 3 if extra_rows else 0
    dst = torch.randint(-1, rows, (tokens, k), generator=g)
    permuted = torch.randn(rows, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = [permuted]
    if with_weights:
        inputs.append(torch.rand(tokens, k, generator=g, dtype=torch.float64, requires_grad=True))

    def f(*args):
        return torch.ops.moe_ops.unpermute(args[0], dst, args[1] if with_weights else None)

    assert torch.autograd.gradgradcheck(f, inputs)


def test_unpermute_second_derivative_values():
    """The helper's case, by value: out = sum_j w[t, j] * p[dst[t, j]], so
    d/dw of sum(d out.sum() / dp) is the width of p (3) for every used slot."""
    p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    out = torch.ops.moe_ops.unpermute(p, torch.tensor([[0, 1], [2, 3], [-1, 2]]), w)
    gp, = torch.autograd.grad(out.sum(), p, create_graph=True)
    gw, = torch.autograd.grad(gp.sum(), w)
    assert torch.equal(gw, torch.tensor([[3.0, 3.0], [3.0, 3.0], [0.0, 3.0]], dtype=torch.float64))


def test_permute_and_gather_double_backward():
    """permute's backward is an unpermute, grouped_mm_gather's scatters its
    rows' gradients with unpermute_backward: both twice differentiable, with
    tokens routed twice to one expert and a -1 gather index."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [1, 1]], dtype=torch.int32)
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.moe_ops.permute(t, ids, 3, 2)[0], (tokens,))
    a = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([3, 6], dtype=torch.int32)
    index = torch.tensor([0, 2, 2, -1, 3, 0])
    assert torch.autograd.gradgradcheck(lambda a, b: torch.ops.moe_ops.grouped_mm_gather(a, b, offs, index), (a, b))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 40), st.sampled_from([(8, 2, 1, 1), (16, 4, 4, 2), (32, 8, 8, 4), (12, 8, 3, 2), (6, 1, 1, 1)]),
       st.sampled_from(["softmax", "sigmoid", "softmax_after_topk"]), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_property_router_topk(tokens, shape, score_func, with_bias, renormalize, seed):
    experts, k, n_group, topk_group = shape
    g = torch.Generator().manual_seed(seed)
    # A 1/8 grid: ties are frequent, distinct values far apart.
    logits = torch.randint(-24, 25, (tokens, experts), generator=g) / 8
    bias = torch.randint(-8, 9, (experts,), generator=g) / 64 if with_bias else None
    args = (logits, k, score_func, bias, n_group, topk_group, renormalize, 1.5)
    w, ids, counts = torch.ops.moe_ops.router_topk(*args)
    rw, rids, rcounts = torch_router_topk(*args)
    assert torch.equal(ids, rids) and torch.equal(counts, rcounts)
    torch.testing.assert_close(w, rw, **WEIGHT_TOL[torch.float32])


@pytest.mark.parametrize("experts,k,n_group,topk_group", [(8, 2, 1, 1), (60, 4, 1, 1), (128, 8, 1, 1),
                                                        (256, 8, 8, 4), (384, 8, 1, 1), (1100, 6, 1, 1)])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_router_topk_real_widths(experts, k, n_group, topk_group, score_func, dtype):
    """Router widths of real models, past one vector of experts and past the
    vectorised path's limit (1024 experts): ids exact, weights to rounding."""
    g = torch.Generator().manual_seed(experts)
    logits = (torch.randn(300, experts, generator=g) * 3).to(dtype)
    bias = torch.randn(experts, generator=g) * 0.1
    args = (logits, k, score_func, bias, n_group, topk_group, True, 2.5)
    w, ids, counts = torch.ops.moe_ops.router_topk(*args)
    rw, rids, rcounts = torch_router_topk(*args)
    assert torch.equal(ids, rids) and torch.equal(counts, rcounts)
    torch.testing.assert_close(w, rw, **WEIGHT_TOL[torch.float32])


@pytest.mark.parametrize("disabled", [float("-inf"), float("nan")])
def test_router_topk_group_limit_keeps_a_disabled_expert_of_a_kept_group(disabled):
    """A -inf or NaN key (a bias that disables an expert, a NaN logit) inside
    a kept group: only the kept groups are eligible, so when k needs it that
    expert is chosen, never one of a dropped group. The reference masked the
    dropped groups' keys with -inf, so the disabled expert tied with them and
    its stable sort took expert 0 from the dropped group."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0, 1.0], [10.0, 1.0, 10.0, 0.0, 0.0, 0.0]])
    bias = torch.tensor([0.0, disabled, 0.0, 0.0, 0.0, disabled])
    args = (logits, 3, "sigmoid", bias, 2, 1, False, 1.0)  # 2 groups of 3 experts, 1 kept, k = 3
    w, ids, counts = torch.ops.moe_ops.router_topk(*args)
    rw, rids, rcounts = torch_router_topk(*args)
    assert ids.tolist() == rids.tolist() == [[3, 4, 5], [0, 2, 1]]
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(w, rw, **WEIGHT_TOL[torch.float32])

def test_cuda_kernels_registered_for_routing_ops():
    """Every routing op has a CUDA kernel in CUDA builds (the repo-wide check
    lives in test_grouped_mm.py; this names the routing ops explicitly)."""
    names = ["moe_ops::router_topk", "moe_ops::permute", "moe_ops::unpermute", "moe_ops::unpermute_backward"]
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    if not torch_moe_ops.cuda_kernels_built():
        pytest.skip("CPU-only build")
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


if __name__ == "__main__":
    run_tests()


def _unpermute_backward_args():
    dst = torch.tensor([[0, 2], [1, -1], [3, 4]])
    return dict(grad_output=torch.randn(3, 5), dst_rows=dst, num_rows=6, weights=torch.rand(3, 2),
                permuted=torch.randn(6, 5))


@pytest.mark.parametrize("change, regex", [
    (dict(grad_output=torch.randn(3, 4)), r"grad_output must be as wide as permuted \(5\), got sizes \[3, 4\]"),
    (dict(grad_output=torch.randn(3, 5).double()), r"grad_output must have permuted's dtype \(Float\), got Double"),
    (dict(grad_output=torch.ones(3, 5, dtype=torch.int32)),
     r"grad_output must be float32, float16, bfloat16 or float64, got Int"),
    (dict(grad_output=torch.randn(2, 5)), r"grad_output must be 2-D with one row per token \(3\), got sizes \[2, 5\]"),
    (dict(num_rows=7), r"num_rows must be permuted's row count \(6\), got 7"),
    (dict(num_rows=-1, permuted=None, weights=None), r"num_rows must be >= 0, got -1"),
    (dict(dst_rows=torch.zeros(3, dtype=torch.long), permuted=None, weights=None),
     r"dst_rows must be 2-D \(tokens, top_k\), got 1-D"),
    (dict(dst_rows=torch.zeros(3, 2, dtype=torch.int32), permuted=None, weights=None),
     r"dst_rows must be int64, got Int"),
])
def test_unpermute_backward_errors_in_eager_and_fake(change, regex):
    """unpermute_backward has no OpInfo (it is unpermute's backward, reached by
    the gradient tests), but it is a public op: a gradient of the wrong width
    or dtype must be an error naming it, in eager and in fake mode."""
    kw = {**_unpermute_backward_args(), **change}
    with pytest.raises(ValueError, match="unpermute_backward: " + regex):
        torch.ops.moe_ops.unpermute_backward(**kw)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="unpermute_backward: " + regex):
        torch.ops.moe_ops.unpermute_backward(
            **{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

"""Tests of the routing ops: moe_ops::router_topk, moe_ops::permute and
moe_ops::unpermute, against the plain-torch references in
torch_moe_ops/reference.py.

permute is a copy, so it is compared bitwise; unpermute accumulates in the
reference's order and precision, so it is bitwise too; router_topk ids and
counts are exact and its weights agree to float32 rounding.

The OpInfos live here rather than in test/opinfo.py: the ops return tuples
and take integer routing tensors, which the generic grouped_mm tests there do
not handle.
"""

from functools import partial

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing import make_tensor
from torch.testing._internal.common_device_type import instantiate_device_type_tests, onlyCPU, ops
from torch.testing._internal.common_dtype import floating_types_and
from torch.testing._internal.common_utils import TestCase, run_tests
from torch.testing._internal.opinfo.core import ErrorInput, OpInfo, SampleInput

import torch_moe_ops  # noqa: F401
from torch_moe_ops.reference import torch_permute, torch_router_topk, torch_unpermute

# router_topk weights: the kernel and the reference both compute the scores in
# float32, but with different exp implementations (<= 1 ulp each) and sum
# orders (<= E * 2^-24 relative for E <= 64 terms here), then at most one
# renormalisation: 2e-5 relative covers it; 1e-7 absolute for scores that
# underflow near zero. float64 gets the same bound scaled to 2^-53.
WEIGHT_TOL = {torch.float32: dict(rtol=2e-5, atol=1e-7), torch.float64: dict(rtol=1e-13, atol=1e-15)}


def _routing(tokens, experts, k, device, generator=None, skew=None):
    """Expert ids (T, k) with distinct experts per token. skew="one" sends every
    token to experts 0..k-1 (all but k experts empty)."""
    if skew == "one":
        return torch.arange(k, device=device, dtype=torch.int32).expand(tokens, k).contiguous()
    scores = torch.rand(tokens, experts, generator=generator).to(device)
    return scores.topk(k, dim=1).indices.to(torch.int32)


# ------------------------------------------------------------------- OpInfos


def sample_inputs_router_topk(op_info, device, dtype, requires_grad, **kwargs):
    # Logits on a grid of 1/4 so ties happen (and are broken by expert id)
    # while distinct logits stay far apart in every dtype.
    def logits(t, e):
        x = (torch.randint(-12, 13, (t, e)) / 4).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    bias = (torch.randint(-4, 5, (16,)) / 32).to(device)
    yield SampleInput(logits(9, 16), args=(4,), name="softmax")
    yield SampleInput(logits(9, 16), args=(4,), kwargs=dict(renormalize=True), name="softmax_renorm")
    yield SampleInput(logits(9, 16), args=(2,), kwargs=dict(score_func="sigmoid", bias=bias, n_group=4, topk_group=2,
                                                            renormalize=True, scaling_factor=2.5), name="deepseek")
    yield SampleInput(logits(9, 16), args=(3,), kwargs=dict(score_func="softmax_after_topk"), name="gpt_oss")
    yield SampleInput(logits(7, 8), args=(8,), kwargs=dict(score_func="sigmoid"), name="k_equals_e")
    yield SampleInput(logits(0, 8), args=(2,), name="zero_tokens")
    yield SampleInput(logits(5, 32)[:, ::2], args=(3,), kwargs=dict(bias=bias.to(dtype)), name="strided_bias_dtype")


def error_inputs_router_topk(op_info, device, **kwargs):
    x = make_tensor((4, 8), device=device, dtype=torch.float32)

    def err(inp, regex, *args, **kw):
        return ErrorInput(SampleInput(inp, args=args, kwargs=kw), error_type=ValueError, error_regex=regex)

    yield err(x[0], r"router_topk: logits must be 2-D \(tokens, experts\), got 1-D", 2)
    yield err(x.int(), r"router_topk: logits must be float32, float16, bfloat16 or float64, got Int", 2)
    yield err(x, r"router_topk: k must be in \[1, num_experts=8\], got k=9", 9)
    yield err(x, r"router_topk: k must be in \[1, num_experts=8\], got k=0", 0)
    yield err(x, r"score_func must be 'softmax', 'sigmoid' or 'softmax_after_topk', got 'relu'", 2, "relu")
    yield err(x, r"n_group must be >= 1 and divide num_experts=8, got n_group=3", 2, n_group=3)
    yield err(x, r"topk_group must be in \[1, n_group=4\], got topk_group=5", 2, n_group=4, topk_group=5)
    yield err(x, r"k=5 exceeds the experts of the selected groups, topk_group \* num_experts / n_group = 4", 5,
              n_group=4, topk_group=2)
    yield err(x, r"bias must have shape \(num_experts,\) = \(8\), got \[7\]", 2, bias=x.new_zeros(7))
    yield err(x, r"bias must be float32 or the logits dtype \(Float\), got Double", 2, bias=x.new_zeros(8).double())


def sample_inputs_permute(op_info, device, dtype, requires_grad, **kwargs):
    make = partial(make_tensor, device=device, dtype=dtype, requires_grad=requires_grad)
    g = torch.Generator().manual_seed(0)
    ids = _routing(11, 6, 3, device, g)
    yield SampleInput(make((11, 7)), args=(ids, 6), name="basic")
    yield SampleInput(make((11, 7)), args=(ids.long(), 6), kwargs=dict(alignment=8), name="aligned_int64_ids")
    yield SampleInput(make((11, 7)), args=(ids, 6), kwargs=dict(alignment=4, first_expert=2, num_local_experts=3),
                      name="local_range")
    yield SampleInput(make((11, 7)), args=(_routing(11, 6, 3, device, skew="one"), 6), kwargs=dict(alignment=2),
                      name="skewed_empty_experts")
    yield SampleInput(make((0, 7)), args=(ids[:0], 6), kwargs=dict(alignment=16), name="zero_tokens")
    yield SampleInput(make((11, 14))[:, ::2], args=(ids, 6), name="non_contiguous_tokens")
    yield SampleInput(make((11, 7)), args=(ids.t().contiguous().t(), 6), name="non_contiguous_ids")


def error_inputs_permute(op_info, device, **kwargs):
    x = make_tensor((4, 8), device=device, dtype=torch.float32)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]], dtype=torch.int32, device=device)

    def err(inp, regex, *args, name="", **kw):
        return ErrorInput(SampleInput(inp, args=args, kwargs=kw, name=name), error_type=ValueError, error_regex=regex)

    yield err(x[0], r"permute: tokens must be 2-D \(tokens, hidden\), got 1-D", ids, 4)
    yield err(x, r"permute: expert_ids must be 2-D \(tokens, top_k\), got 1-D", ids[:, 0], 4)
    yield err(x, r"permute: expert_ids must be int32 or int64, got Float", ids.float(), 4)
    yield err(x, r"permute: expert_ids must have one row per token \(4\), got sizes \[3, 2\]", ids[:3], 4)
    yield err(x, r"permute: num_experts must be >= 1, got num_experts=0", ids, 0)
    yield err(x, r"alignment must be a power of two in \[1, 128\], got alignment=3", ids, 4, alignment=3)
    yield err(x, r"alignment must be a power of two in \[1, 128\], got alignment=256", ids, 4, alignment=256)
    yield err(x, r"first_expert must be in \[0, num_experts=4\), got first_expert=4", ids, 4, first_expert=4)
    yield err(x, r"num_local_experts must be in \[1, num_experts - first_expert = 3\], got num_local_experts=4", ids,
              4, first_expert=1, num_local_experts=4)
    if torch.device(device).type == "cpu":
        # Values are checked where reading them needs no device sync (CUDA:
        # device-side assert); fake kernels see no values ("ids_values").
        bad = ids.clone()
        bad[2, 1] = 7
        yield err(x, r"permute: expert_ids must be in \[0, num_experts=4\), got expert_ids\[2, 1\]=7", bad, 4,
                  name="ids_values")
        bad[1, 0] = -1
        yield err(x, r"permute: expert_ids must be in \[0, num_experts=4\), got expert_ids\[1, 0\]=-1", bad, 4,
                  name="ids_values")


def sample_inputs_unpermute(op_info, device, dtype, requires_grad, **kwargs):
    g = torch.Generator().manual_seed(1)
    make = partial(make_tensor, device=device, dtype=dtype, requires_grad=requires_grad)
    for name, tokens, kw in [("basic", 9, {}), ("aligned", 9, dict(alignment=4)),
                             ("dropped", 9, dict(first_expert=1, num_local_experts=3, alignment=2)),
                             ("zero_tokens", 0, {})]:
        ids = _routing(tokens, 5, 2, device, g)
        permuted, dst_rows, _, _ = torch_permute(torch.zeros(tokens, 6, device=device), ids, 5, **kw)
        x = make((permuted.shape[0], 6))
        yield SampleInput(x, args=(dst_rows,), name=name)
        yield SampleInput(x, args=(dst_rows, make((tokens, 2))), name=name + "_weighted")
        w32 = make_tensor((tokens, 2), device=device, dtype=torch.float32, requires_grad=requires_grad)
        yield SampleInput(x, args=(dst_rows, w32), name=name + "_fp32_weights")
    ids = _routing(9, 5, 2, device, g)
    _, dst_rows, _, _ = torch_permute(torch.zeros(9, 6, device=device), ids, 5)
    yield SampleInput(make((18, 12))[:, ::2], args=(dst_rows, make((9, 2))), name="non_contiguous")


def error_inputs_unpermute(op_info, device, **kwargs):
    x = make_tensor((6, 4), device=device, dtype=torch.float32)
    dst = torch.tensor([[0, 1], [2, -1], [4, 5]], device=device)

    def err(inp, regex, *args, name=""):
        return ErrorInput(SampleInput(inp, args=args, name=name), error_type=ValueError, error_regex=regex)

    yield err(x[0], r"unpermute: permuted must be 2-D \(rows, hidden\), got 1-D", dst)
    yield err(x.int(), r"unpermute: permuted must be float32, float16, bfloat16 or float64, got Int", dst)
    yield err(x, r"unpermute: dst_rows must be 2-D \(tokens, top_k\), got 1-D", dst[0])
    yield err(x, r"unpermute: dst_rows must be int64, got Int", dst.int())
    yield err(x, r"unpermute: weights must have the shape of dst_rows \[3, 2\], got \[3, 3\]", dst, x.new_ones(3, 3))
    yield err(x, r"unpermute: weights must be float32 or the dtype of permuted \(Float\), got Double", dst,
              x.new_ones(3, 2).double())
    if torch.device(device).type == "cpu":
        yield err(x, r"unpermute: dst_rows must be -1 or a row of permuted in \[0, 6\), got dst_rows\[1, 1\]=6",
                  torch.tensor([[0, 1], [2, 6], [4, 5]], device=device), name="ids_values")


def _opinfo(name, sample_fn, error_fn, ref, dtypes, autograd):
    return OpInfo(name, op=getattr(torch.ops.moe_ops, name.split(".")[-1]).default, ref=ref, dtypes=dtypes,
                  sample_inputs_func=sample_fn, error_inputs_func=error_fn, supports_out=False,
                  supports_autograd=autograd, supports_forward_ad=False, supports_fwgrad_bwgrad=False)


routing_op_db = [
    _opinfo("moe_ops.router_topk", sample_inputs_router_topk, error_inputs_router_topk, torch_router_topk,
            floating_types_and(torch.float16, torch.bfloat16), True),
    _opinfo("moe_ops.permute", sample_inputs_permute, error_inputs_permute, torch_permute,
            floating_types_and(torch.float16, torch.bfloat16, torch.int32, torch.uint8), True),
    _opinfo("moe_ops.unpermute", sample_inputs_unpermute, error_inputs_unpermute, torch_unpermute,
            floating_types_and(torch.float16, torch.bfloat16), True),
]


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

    @ops(routing_op_db)
    def test_fake_matches_eager(self, device, dtype, op):
        for s in op.sample_inputs(device, dtype):
            out = _as_tuple(_call(op, s))
            with FakeTensorMode() as mode:
                fout = _as_tuple(op(_fake(mode, s.input), *(_fake(mode, a) for a in s.args),
                                    **{k: _fake(mode, v) for k, v in s.kwargs.items()}))
            for o, f in zip(out, fout, strict=True):
                self.assertEqual((f.shape, f.stride(), f.dtype), (o.shape, o.stride(), o.dtype), msg=s.name)

    @ops(routing_op_db, allowed_dtypes=(torch.float32, torch.bfloat16))
    def test_opcheck(self, device, dtype, op):
        for requires_grad in (False, True):
            for s in op.sample_inputs(device, dtype, requires_grad=requires_grad):
                torch.library.opcheck(op.op, (s.input, *s.args), s.kwargs)

    @ops(routing_op_db, allowed_dtypes=(torch.float32,))
    def test_error_inputs(self, device, dtype, op):
        for ei in op.error_inputs(device):
            s = ei.sample_input
            with self.assertRaisesRegex(ei.error_type, ei.error_regex):
                _call(op, s)
            if s.name != "ids_values":  # fake kernels see shapes, not values
                with FakeTensorMode() as mode, self.assertRaisesRegex(ei.error_type, ei.error_regex):
                    op(_fake(mode, s.input), *(_fake(mode, a) for a in s.args),
                       **{k: _fake(mode, v) for k, v in s.kwargs.items()})

    @ops(routing_op_db, allowed_dtypes=(torch.float64,))
    def test_gradcheck(self, device, dtype, op):
        for s in op.sample_inputs(device, dtype, requires_grad=True):
            leaves = _diff_inputs(s)
            # float32 weights cannot pass a float64 finite-difference check.
            if not leaves or s.input.numel() == 0 or s.name.endswith("_fp32_weights"):
                continue
            if op.name.endswith("router_topk"):
                # Selection is piecewise constant: perturb logits on a grid of
                # 1/4 by gradcheck's eps=1e-6 keeps the ids, except at exact
                # ties, which the grid creates; break them.
                s.input.detach().add_(torch.arange(s.input.numel(), dtype=dtype, device=device)
                                  .view_as(s.input) * 1e-3)

            def fn(*ts, s=s, leaves=leaves):
                swap = {id(a): b for a, b in zip(leaves, ts)}
                sub = lambda v: swap.get(id(v), v)  # noqa: E731
                out = op(sub(s.input), *(sub(a) for a in s.args), **{k: sub(v) for k, v in s.kwargs.items()})
                return tuple(o for o in _as_tuple(out) if o.is_floating_point())

            # Detached leaves with the samples' strides (some samples are views).
            inputs = tuple(t.detach().requires_grad_() for t in leaves)
            self.assertTrue(torch.autograd.gradcheck(fn, inputs), msg=s.name)

    @ops(routing_op_db, allowed_dtypes=(torch.float32, torch.bfloat16))
    def test_deterministic(self, device, dtype, op):
        for s in op.sample_inputs(device, dtype):
            first = _as_tuple(_call(op, s))
            for a, b in zip(first, _as_tuple(_call(op, s))):
                self.assertEqual(a, b, atol=0, rtol=0, msg=s.name)

    @onlyCPU
    def test_bits_independent_of_thread_count(self, device):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(3000, 64, generator=g)
        tokens = torch.randn(3000, 96, generator=g).bfloat16()
        threads = torch.get_num_threads()

        def run():
            w, ids, _ = torch.ops.moe_ops.router_topk(logits, 6, renormalize=True)
            p = torch.ops.moe_ops.permute(tokens, ids, 64, 16)
            return (w, ids) + tuple(p) + (torch.ops.moe_ops.unpermute(p[0], p[1], w),)

        try:
            torch.set_num_threads(1)
            one = run()
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(run(), one):
            self.assertEqual(a, b, atol=0, rtol=0)

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


instantiate_device_type_tests(TestRouting, globals(), only_for=("cpu", "cuda"))


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
    ids = _routing(tokens, experts, k, "cpu", g, skew)
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

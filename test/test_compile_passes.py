"""torch_moe_ops.compile: the Inductor passes that rewrite stock MoE code into our ops.

Each test compiles once (fullgraph=True, dynamic=True) and checks, on the
same compiled callable: that the rewrite fired (the counters and the
generated code), that outputs and gradients equal the uncompiled model's
within the stated tolerance, that a second token count runs without a
recompile (``fail_on_recompile``), and that the generated code reads nothing
back to the host. Negative tests check that a rewrite leaves alone what it
cannot replace exactly. Shapes are tiny: compile time dominates (~10-30 s a
graph on this machine). The fused ops' GPU kernels are not exercised here
(no GPU); the rewrites are device-independent graph edits, and which kernel
runs is the ops' own dispatch, tested in their own files.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st
from torch._dynamo.test_case import TestCase
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import torch_moe_ops  # noqa: F401
import torch_moe_ops.compile as moe_compile
from torch_moe_ops.compile import stock
from torch_moe_ops.compile._fx import COUNTER
from torch_moe_ops.ops import fused_experts, grouped_mm, grouped_mm_gather, permute, router_topk, unpermute

from common import assert_rows_close

pytestmark = pytest.mark.filterwarnings("ignore")

# Host reads in generated code: a tensor turned into a Python number.
HOST_READS = ("_local_scalar_dense", ".item()", ".tolist()", ".cpu()")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    counters.clear()
    # No FX graph / AOT autograd cache: on a hit Inductor skips the passes, and the counters with them.
    with moe_compile.enabled(), warnings.catch_warnings(), \
            torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def fired() -> dict:
    return dict(counters[moe_compile.COUNTER])


def fwd_bwd(fn, x):
    """Output and the gradients of every parameter and of x for loss = sum(out^2) / 2 (a non-uniform
    upstream gradient, so that a wrong combine weight shows)."""
    x = x.detach().requires_grad_(True)
    params = [p for p in fn.parameters()] if isinstance(fn, torch.nn.Module) else []
    for p in params:
        p.grad = None
    out = fn(x)
    (out.float().square().sum() / 2).backward()
    return out.detach(), [p.grad.clone() for p in params] + [x.grad.clone()]


def assert_all_close(got, want, dtype, factor, what):
    out, grads = got
    ref, ref_grads = want
    assert_rows_close(out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]), dtype, factor, f"{what} out")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        g2, r2 = g.reshape(-1, g.shape[-1]), r.reshape(-1, r.shape[-1])
        assert_rows_close(g2, r2, dtype, factor, f"{what} grad {i}", magnitude=r2.abs().amax().expand_as(r2))


def check_code(codes, must=(), must_not=()):
    # Comments name the aten ops a kernel came from, rewritten or not: only code lines count.
    text = "\n".join(line for code in codes for line in code.splitlines() if not line.strip().startswith("#"))
    for s in must:
        assert s in text, f"{s!r} not in the generated code"
    for s in must_not + HOST_READS:
        assert s not in text, f"{s!r} in the generated code"


def test_enable_disable_leave_other_passes_alone():
    from torch._inductor import config
    moe_compile.disable()
    assert not moe_compile.is_enabled()

    def mine(graph):
        return None
    with config.patch(pre_grad_custom_pass=mine):
        moe_compile.enable()
        moe_compile.enable()  # idempotent
        assert moe_compile.is_enabled()
        assert config.pre_grad_custom_pass[0] is mine and len(config.pre_grad_custom_pass) == 2
        moe_compile.disable()
        assert config.pre_grad_custom_pass is mine
    with moe_compile.enabled():
        assert moe_compile.is_enabled()
    assert not moe_compile.is_enabled()


def test_qwen3_moe_block_fp32():
    """Qwen3-MoE's sparse block in fp32 (transformers' own grouped GEMM op under compile): experts ->
    expert_mlp, softmax + topk + renormalise -> router_topk. Both sides compute in fp32 and differ only in
    summation order, so the bound is fp32's (2e-5 relative, common.ROW_TOL) times 4."""
    block = stock.moe_block(stock.transformers_model("qwen3-30b-a3b", shrink=64, dtype=torch.float32))
    x = torch.randn(1, 11, block.gate.hidden_dim, generator=torch.Generator().manual_seed(1))
    want = fwd_bwd(block, x)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    got, codes = run_and_get_code(fwd_bwd, compiled, x)
    assert fired() == {"expert_mlp": 1, "router_topk": 1}
    check_code(codes, must=("moe_ops.expert_mlp.default", "moe_ops.expert_mlp_backward.default",
                            "moe_ops.router_topk.default"), must_not=("grouped_mm_fallback", "aten.topk"))
    assert_all_close(got, want, torch.float32, 4, "qwen3 fp32")
    x2 = torch.randn(1, 14, block.gate.hidden_dim, generator=torch.Generator().manual_seed(2))
    with torch.compiler.set_stance("fail_on_recompile"):
        got2 = fwd_bwd(compiled, x2)
    assert_all_close(got2, fwd_bwd(block, x2), torch.float32, 4, "qwen3 fp32, 14 tokens")


def test_deepseek_v3_moe_block_bf16():
    """DeepSeek-V3's block in bf16 (torch._grouped_mm): experts -> expert_mlp, sigmoid + bias + group-limited
    top-k + renormalise -> router_topk(n_group, topk_group). The stock code rounds to bf16 after each
    GEMM, the activation, the weighting and the sum; the op keeps fp32 from the down GEMM through the
    combine. Each side is within a few bf16 roundings (2^-8 relative) of the exact value, so they are
    within 8 of each other, of the largest element (per row for outputs, per tensor for gradients)."""
    block = stock.moe_block(stock.transformers_model("deepseek-v3", shrink=64, dtype=torch.bfloat16))
    x = torch.randn(1, 13, block.gate.hidden_dim, generator=torch.Generator().manual_seed(3)).bfloat16()
    want = fwd_bwd(block, x)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    got = fwd_bwd(compiled, x)
    assert fired() == {"expert_mlp": 1, "router_topk": 1}
    assert_all_close(got, want, torch.bfloat16, 8, "deepseek-v3 bf16")


def test_torchtitan_moe_bf16():
    """torchtitan's MoE layer in bf16: dispatch -> GroupedExperts -> combine -> expert_mlp (w1 | w3 side by
    side). The router stays: on CPU torchtitan's fp32 autocast region is a no-op, so its scores are bf16,
    which router_topk (fp32 scores) does not reproduce (TestMoERouterPass.test_router_left_alone_on_16bit_scores). Tolerance as for DeepSeek-V3, plus the
    stock combine's bf16 scatter_add, which rounds after every addition (k = 2 here)."""
    moe = stock.torchtitan_moe("mixtral-8x7b", shrink=128, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    want = fwd_bwd(moe, x)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    got = fwd_bwd(compiled, x)
    assert fired() == {"expert_mlp": 1}
    assert_all_close(got, want, torch.bfloat16, 8, "torchtitan bf16")
    with torch.compiler.set_stance("fail_on_recompile"):
        x2 = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(44)).bfloat16()
        got2 = fwd_bwd(compiled, x2)
    assert_all_close(got2, fwd_bwd(moe, x2), torch.bfloat16, 8, "torchtitan bf16, 6 tokens")


def test_torchtitan_fp32_router_only():
    """Negative for the experts: torchtitan casts fp32 tokens and weights to bf16 for its GEMMs, a real
    conversion expert_mlp would not make, so the block is left alone; its fp32 sigmoid router is rewritten.
    Forward only; the stock bf16 experts run on both sides, rounding differently once fused by Inductor."""
    moe = stock.torchtitan_moe("deepseek-v3", shrink=128, dtype=torch.float32, route_norm=True)
    x = torch.randn(1, 9, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = moe(x)
        got, codes = run_and_get_code(torch.compile(moe, fullgraph=True, dynamic=True), x)
    assert fired() == {"router_topk": 1}
    check_code(codes, must=("moe_ops.router_topk.default", "aten._grouped_mm"), must_not=("expert_mlp",))
    assert_rows_close(got.reshape(-1, 56), want.reshape(-1, 56), torch.bfloat16, 8, "torchtitan fp32")


def test_transformers_tanh_gelu_experts_left_alone():
    """Negative: an experts activation expert_mlp does not implement (tanh-approximated GELU) keeps the
    stock experts; the router is still rewritten. fp32, forward only: the same fp32 ops on both sides."""
    cfg = stock.transformers_config("olmoe-1b-7b", shrink=64)
    cfg.hidden_act = "gelu_pytorch_tanh"
    import transformers
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm")
    block = stock.moe_block(model).float()
    x = torch.randn(1, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = block(x)
        got = torch.compile(block, fullgraph=True, dynamic=True)(x)
    assert fired() == {"router_topk": 1}
    assert_rows_close(got.reshape(-1, cfg.hidden_size), want.reshape(-1, cfg.hidden_size), torch.float32, 4,
                      "olmoe tanh-gelu")


def _stock_layer(x, ids, w, w1, w2):
    """The hand-written stock MoE layer of the post-grad patterns: sort, gather, grouped GEMMs, weighted
    index_add / scatter_add."""
    k = ids.shape[1]
    perm = torch.sort(ids.reshape(-1)).indices
    tok = perm // k
    counts = torch.histc(ids.reshape(-1).float(), bins=w1.shape[0], min=0, max=w1.shape[0] - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(x[tok], w1, offs=offs)
    y = torch._grouped_mm(torch.relu(h), w2, offs=offs)
    by_index_add = torch.zeros_like(x).index_add(0, tok, y * w.reshape(-1)[perm].unsqueeze(-1))
    by_scatter_add = torch.zeros(x.shape[0], y.shape[1], dtype=y.dtype).scatter_add(
        0, tok.unsqueeze(-1).expand(-1, y.shape[1]), w.reshape(-1)[perm].unsqueeze(-1) * y)
    return torch.cat([by_index_add, by_scatter_add], dim=1)


def _layer_inputs(tokens, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=g).to(dtype)
    ids = torch.randint(0, 4, (tokens, 2), generator=g)
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, 3, (tokens,), generator=g)) % 4  # distinct per token
    ids[0] = torch.tensor([3, 1])  # expert 2 gets nothing at some sizes: empty groups
    w = torch.rand(tokens, 2, generator=g).to(dtype)
    w1 = torch.randn(4, 16, 24, generator=g).to(dtype)
    w2 = torch.randn(4, 24, 16, generator=g).to(dtype) / 5
    return x, ids, w, w1, w2


def test_post_grad_gather_and_combine():
    """(a) x[perm // k] -> grouped_mm_gather and (b) the weighted index_add / scatter_add -> unpermute, in an
    inference graph. bf16: the stock code rounds each weighted row and each addition (k = 2) to bf16, the op
    sums in fp32 and rounds once, so the two are within 4 bf16 roundings of the row's largest value."""
    fn = torch.compile(_stock_layer, fullgraph=True, dynamic=True)
    inputs = _layer_inputs(9, torch.bfloat16)
    with torch.no_grad():
        got, codes = run_and_get_code(fn, *inputs)
        want = _stock_layer(*inputs)
    assert fired() == {"grouped_mm_gather": 1, "unpermute": 2}
    check_code(codes, must=("moe_ops.grouped_mm_gather.default", "moe_ops.unpermute.default"),
               must_not=("index_add", "scatter_add"))
    assert_rows_close(got, want, torch.bfloat16, 4, "post-grad bf16")
    inputs = _layer_inputs(17, torch.bfloat16, seed=8)
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        got = fn(*inputs)
    assert_rows_close(got, _stock_layer(*inputs), torch.bfloat16, 4, "post-grad bf16, 17 tokens")


def test_post_grad_left_alone_where_not_exact():
    """Negatives: (a) a gather by an index that is an input (it may hold -1, which aten reads as the last row
    and the op as zeros); (b) a bf16 GEMM scattered into fp32 zeros (the stock output keeps fp32 sums of
    fp32 products that unpermute, rounding to the rows' dtype, would not). Results equal eager exactly:
    the same aten ops run on both sides."""
    def layer(x, idx, w1, offs, y, tok, w):
        gathered = torch._grouped_mm(x[idx], w1, offs=offs)
        combined = torch.zeros(x.shape[0], y.shape[1], dtype=torch.float32).index_add(
            0, tok, y * w.unsqueeze(-1).float())
        return gathered, combined
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 16, generator=g).bfloat16()
    idx = torch.tensor([5, -1, 0, 2, 2, 1])
    w1 = torch.randn(2, 16, 8, generator=g).bfloat16()
    offs = torch.tensor([2, 6], dtype=torch.int32)
    y = torch.randn(6, 8, generator=g).bfloat16()
    tok = torch.tensor([0, 0, 1, 3, 5, 4])
    w = torch.rand(6, generator=g)
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True, dynamic=True)(x, idx, w1, offs, y, tok, w)
        want = layer(x, idx, w1, offs, y, tok, w)
    assert fired() == {}
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)  # fp32 sums; Inductor may fuse the product


def _all_ops(x, logits, w1, w2, w_gate_up, w_down):
    """Every routing and GEMM op, differentiable end to end."""
    weights, ids, counts = router_topk(logits, 2, "softmax", renormalize=True)
    rows, dst_rows, src_rows, offs = permute(x, ids, w1.shape[0], alignment=4)
    h = grouped_mm(rows, w1, offs)
    h2 = grouped_mm_gather(x, w1, offs, src_rows.div(2, rounding_mode="floor").clamp(min=-1))
    y = unpermute(grouped_mm(torch.relu(h + h2), w2, offs), dst_rows, weights)
    fused = fused_experts(x, ids, weights, w_gate_up, w_down)
    return y.sum(-1, keepdim=True) + fused + counts.sum().float()


def test_ops_compile_guarantees():
    """Every op under fullgraph=True, dynamic=True: one graph, forward and backward, no host reads in the
    generated code, no recompile for a new token count (5 then 12 tokens; 0 and 1 are specialised by
    Dynamo itself and would compile their own graphs). Values equal eager within fp32 summation order."""
    g = torch.Generator().manual_seed(10)
    w1 = torch.randn(4, 8, 8, generator=g).requires_grad_()
    w2 = torch.randn(4, 8, 16, generator=g).requires_grad_()
    w3 = torch.randn(4, 16, 8, generator=g).requires_grad_()
    leaves = [w1, w2, w3]

    def run(fn, tokens):
        x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(tokens)).requires_grad_()
        logits = torch.randn(tokens, 4, generator=torch.Generator().manual_seed(tokens + 1)).requires_grad_()
        for t in leaves:
            t.grad = None
        # transformers' (E, N1, H) storage read as the (E, H, N1) view; a sliced (E, I, H) down projection
        out = fn(x, logits, w1, w2, w3.transpose(-2, -1), w3[:, :8, :8])
        out.square().sum().backward()
        return [out.detach(), x.grad, logits.grad] + [t.grad.clone() for t in leaves]

    compiled = torch.compile(_all_ops, fullgraph=True, dynamic=True)
    got, codes = run_and_get_code(run, compiled, 5)
    check_code(codes, must=("moe_ops.router_topk", "moe_ops.permute", "moe_ops.grouped_mm_gather",
                            "moe_ops.unpermute", "moe_ops.expert_mlp"))
    assert_tensors_close(got, run(_all_ops, 5))
    with torch.compiler.set_stance("fail_on_recompile"):
        got = run(compiled, 12)
    assert_tensors_close(got, run(_all_ops, 12))


def assert_tensors_close(got, want):
    # Same ops on both sides; Inductor fuses the glue (relu, sums, squares) in another fp32 order, and the
    # logits' gradient is a difference of such sums (softmax backward), so the bound is relative to each
    # tensor's largest element: 2e-6, 16 fp32 ulps (measured: up to 1.6e-7).
    for i, (a, b) in enumerate(zip(got, want)):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 2e-6 * scale, f"tensor {i}: max error {err} of {scale}"


def test_fp8_ops_no_host_reads():
    """The fp8 ops under Inductor (test_fp8.py checks their values and one frame per token count):
    no host read in the generated code, no recompile for a second token count, eager's bits."""
    def forward(x, w, offs):
        xd, xs = torch.ops.moe_ops.quantize_fp8(x, "rowwise")
        wd, ws = torch.ops.moe_ops.quantize_fp8(w.transpose(-2, -1), "rowwise")
        md, ms = torch.ops.moe_ops.quantize_fp8(w, "mx", swizzle=True)
        return (torch.ops.moe_ops.scaled_grouped_mm(xd, wd.transpose(-2, -1), xs, ws, offs),
                torch.ops.moe_ops.dequantize_fp8(md, ms, "mx", None, None, True))

    w = torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(11))

    def inputs(tokens):
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
        return x, w, torch.tensor([tokens // 3, tokens // 2, tokens], dtype=torch.int32)
    compiled = torch.compile(forward, fullgraph=True, dynamic=True)
    got, codes = run_and_get_code(compiled, *inputs(10))
    check_code(codes, must=("moe_ops.quantize_fp8", "moe_ops.scaled_grouped_mm"))
    for a, b in zip(got, forward(*inputs(10))):
        assert torch.equal(a, b)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled(*inputs(33))
    for a, b in zip(got, forward(*inputs(33))):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# The rewrites whose target ops go upstream (the router -> router_topk, the combine -> unpermute) on
# hand-written stock code, with hypothesis-drawn shapes. The test cases and the helpers they use are
# carried by the Compile series as test/inductor/test_moe_passes.py (patches/manifest.py: the router's
# PR adds the file with MoEPassTestCase and TestMoERouterPass, the combine's appends TestMoECombinePass),
# so they use nothing of this package but the passes' switch and counter.

# Compile time dominates (several seconds a graph): a few examples per test, and no shrinking (each
# shrink step compiles again; a failure prints its example, which replays: the draws are derandomized).
FEW = settings(max_examples=3, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))


class _SoftmaxRouter(torch.nn.Module):
    """Mixtral / Qwen3-MoE / OLMoE: softmax over the experts, top-k, optionally renormalised. k is a module
    attribute, as in the models (Dynamo keeps it static; a closure or argument int it would make symbolic
    under dynamic=True, and the op takes a static k)."""

    def __init__(self, k, renormalize):
        super().__init__()
        self.k, self.renormalize = k, renormalize

    def forward(self, logits):
        scores = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(scores, self.k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class _SigmoidRouter(torch.nn.Module):
    """DeepSeek-V3 without groups: sigmoid, a bias for the choice only, the unbiased scores gathered,
    renormalised with an epsilon, scaled (a literal: Dynamo reads a float attribute as a tensor)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, logits, bias):
        scores = logits.sigmoid()
        ids = torch.topk(scores + bias, self.k, dim=-1)[1]
        weights = scores.gather(-1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * 2.5, ids


def _moe_counters():
    return dict(counters[COUNTER])


class MoEPassTestCase(TestCase):
    """The passes switched on, caches off, counters cleared; no tests of its own."""

    def setUp(self):
        super().setUp()
        torch._dynamo.reset()
        counters.clear()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(moe_compile.enabled())
        # No FX graph / AOT autograd cache: on a hit Inductor skips the passes, and their counters.
        self._stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        self._stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))

    def tearDown(self):
        self._stack.close()
        torch._dynamo.reset()
        super().tearDown()

    def _fresh(self):
        torch._dynamo.reset()
        counters.clear()

    def assertRouterRewritten(self, got, want):
        """One router rewrite; eager's ids; (weights, ids, logits' gradient) within fp32 summation order."""
        self.assertEqual(_moe_counters(), {"router_topk": 1})
        self.assertTrue(torch.equal(got[1].long(), want[1]))
        tol = 2.0 ** -19
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol * 2 ** -10)
        torch.testing.assert_close(got[2], want[2], rtol=tol, atol=tol * 5)


class TestMoERouterPass(MoEPassTestCase):
    @FEW
    @given(tokens=st.sampled_from([0, 1, 7, 33]), experts=st.integers(2, 12), k=st.integers(1, 4),
           softmax=st.booleans(), renormalize=st.booleans(), seed=st.integers(0, 2 ** 16))
    def test_router_rewrite(self, tokens, experts, k, softmax, renormalize, seed):
        """fp32 routers -> router_topk: ids equal eager's exactly (random logits: no ties), weights and the
        logits' gradient within fp32 summation order. The sums run over at most 12 experts (softmax) and
        4 slots (renormalisation), so each side is within 12 ulps of the exact value: rtol 2^-19 (8 ulps
        each side) and, for the gradient (a difference of such sums, softmax's backward: cancellation),
        atol 2^-19 times the largest |upstream gradient| (< 5 for these normal draws)."""
        self._fresh()
        k = min(k, experts)
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(tokens, experts, generator=g)
        bias = torch.randn(experts, generator=g) / 4
        grad = torch.randn(tokens, k, generator=g)
        if softmax:
            fn, args = _SoftmaxRouter(k, renormalize), ()
        else:
            fn, args = _SigmoidRouter(k), (bias,)

        def run(f):
            x = logits.clone().requires_grad_(True)
            weights, ids = f(x, *args)
            (weights * grad).sum().backward()
            return weights.detach(), ids, x.grad

        want = run(fn)
        got = run(torch.compile(fn, fullgraph=True, dynamic=True))
        self.assertRouterRewritten(got, want)

    def test_router_ties_go_to_the_lower_id(self):
        """Exact ties, which no graph can rule out, go to the lowest ids (torch.topk's order is unspecified):
        padding tokens' all-zero logits tie every expert, two equal top logits tie inside the top-k. The
        weights are eager's (tied experts score the same), and so are the other tokens' ids."""
        self._fresh()
        logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
        logits[1, 5] = logits[1, 2] = 5.0
        logits[3:] = 0.0
        fn = _SoftmaxRouter(2, False)
        want = fn(logits)
        got = torch.compile(fn, fullgraph=True, dynamic=True)(logits)
        self.assertEqual(_moe_counters(), {"router_topk": 1})
        self.assertEqual(got[1][3:].tolist(), [[0, 1]] * 3)
        self.assertEqual(got[1][1].tolist(), [2, 5])
        self.assertTrue(torch.equal(got[1][[0, 2]].long(), want[1][[0, 2]]))
        torch.testing.assert_close(got[0], want[0], rtol=2.0 ** -19, atol=0)

    def test_router_left_alone_on_16bit_scores(self):
        """A bf16 router (torchtitan's on CPU: its fp32 autocast region is a no-op there, so the gate's
        logits and the scores are bf16) is left alone: the stock top-k selects on bf16-rounded scores, the
        op on fp32 scores, so where two scores round to the same bf16 value they pick different experts.
        Shown on such a pair: logits -0.84375 and -0.83984375 (adjacent in bf16) have fp32 sigmoids
        0.300746 < 0.301568 that both round to 0.30078125 in bf16."""
        logits = torch.tensor([[-0.84375, -0.83984375, -1.0]], dtype=torch.bfloat16)
        self.assertEqual(logits.sigmoid()[0, 0].item(), logits.sigmoid()[0, 1].item())
        self.assertLess(logits[0, 0].float().sigmoid().item(), logits[0, 1].float().sigmoid().item())
        op_ids = torch.ops.moe_ops.router_topk.default(logits, 1, "sigmoid", None, 1, 1, False, 1.0)[1]
        self.assertEqual(op_ids.tolist(), [[1]])  # the larger fp32 score
        fn = _SigmoidRouter(1)
        zero = torch.zeros(3, dtype=torch.bfloat16)
        got = torch.compile(fn, fullgraph=True, dynamic=True)(logits, zero)
        self.assertEqual(_moe_counters(), {})
        want = fn(logits, zero)
        self.assertEqual(want[1].tolist(), [[0]])  # the tie, kept by the stock code (CPU's topk: the first)
        self.assertTrue(torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]))


class _GroupLimitedRouter(torch.nn.Module):
    """DeepSeek-V3's router (transformers' DeepseekV3TopkRouter) after its gate: sigmoid, a bias for the
    choice only, group-limited selection (the topk_group groups with the largest sum of their two best
    keys stay eligible, the other groups' experts are masked to -inf), unsorted top-k, the unbiased scores
    gathered, renormalised with an epsilon, scaled. Sizes are module attributes, as in the model (the
    view and the expand need them static)."""

    def __init__(self, k, n_group, topk_group, experts, fill=float("-inf")):
        super().__init__()
        self.k, self.n_group, self.topk_group, self.experts, self.fill = k, n_group, topk_group, experts, fill

    def forward(self, logits, bias):
        scores = logits.sigmoid()
        choice = scores + bias
        size = self.experts // self.n_group
        group_scores = choice.view(-1, self.n_group, size).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, size).reshape(-1, self.experts)
        choice = choice.masked_fill(~score_mask.bool(), self.fill)
        ids = torch.topk(choice, k=self.k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * 2.5, ids


class TestMoERouterGroupLimitPass(MoEPassTestCase):
    @FEW
    @given(tokens=st.sampled_from([1, 7, 33]), n_group=st.sampled_from([2, 4]), size=st.integers(2, 4),
           data=st.data(), seed=st.integers(0, 2 ** 16))
    def test_group_limited_router_rewrite(self, tokens, n_group, size, data, seed):
        """DeepSeek-V3's group-limited router -> router_topk(n_group, topk_group): the same experts as eager
        (random logits and bias: no ties between keys or group sums), and, paired by expert (both top-k are
        unsorted), weights and the logits' gradient within fp32 summation order (sums of at most 12
        experts' slots: the bounds of test_router_rewrite). Zero tokens are not drawn: the stock view(-1, G,
        E / G) rejects an empty batch."""
        self._fresh()
        experts = n_group * size
        topk_group = data.draw(st.integers(1, n_group), label="topk_group")
        k = data.draw(st.integers(1, topk_group * size), label="k")
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(tokens, experts, generator=g)
        bias = torch.randn(experts, generator=g) / 4
        grad = torch.randn(tokens, k, generator=g)
        fn = _GroupLimitedRouter(k, n_group, topk_group, experts)

        def run(f):
            x = logits.clone().requires_grad_(True)
            weights, ids = f(x, bias)
            order = ids.argsort(dim=-1)
            weights, ids = weights.gather(-1, order), ids.gather(-1, order)
            (weights * grad).sum().backward()
            return weights.detach(), ids, x.grad

        want = run(fn)
        got = run(torch.compile(fn, fullgraph=True, dynamic=True))
        self.assertRouterRewritten(got, want)

    def test_group_mask_other_than_minus_inf_left_alone(self):
        """Older DeepSeek code masked the other groups' experts with 0, not -inf: with sigmoid scores in
        (0, 1) and a bias, a masked expert's 0 can outrank a kept expert's negative key, which the op never
        selects, so the router is left alone (and computes what eager does)."""
        fn = _GroupLimitedRouter(2, 4, 2, 8, fill=0.0)
        logits, bias = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), torch.full((8,), -0.75)

        def by_id(weights, ids):  # both top-k are unsorted
            order = ids.argsort(dim=-1)
            return weights.gather(-1, order), ids.gather(-1, order)

        got = by_id(*torch.compile(fn, fullgraph=True, dynamic=True)(logits, bias))
        self.assertEqual(_moe_counters(), {})
        want = by_id(*fn(logits, bias))
        self.assertTrue(torch.equal(got[1], want[1]))
        torch.testing.assert_close(got[0], want[0])


def _stock_combine(x, ids, w, w1):
    """A stock experts layer up to its combine: tokens sorted by expert, one grouped GEMM, each row
    weighted and added back to its token (index_add)."""
    k = ids.shape[1]
    perm = torch.sort(ids.reshape(-1)).indices
    tok = perm // k
    counts = torch.histc(ids.reshape(-1).float(), bins=w1.shape[0], min=0, max=w1.shape[0] - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    y = torch._grouped_mm(x[tok], w1, offs=offs)
    return torch.zeros(x.shape[0], y.shape[1], dtype=y.dtype).index_add(0, tok, y * w.reshape(-1)[perm].unsqueeze(-1))


def _routing(tokens, experts, k, used, seed):
    """ids (tokens, k), each row k distinct experts drawn from ``used`` (so the others get no rows and the
    loads are uneven), and weights in (0, 1]."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(sorted(used))
    pick = torch.rand(tokens, len(used), generator=g).argsort(dim=-1)[:, :k]
    return used[pick], torch.rand(tokens, k, generator=g) + 2 ** -8


class TestMoECombinePass(MoEPassTestCase):
    @FEW
    @given(tokens=st.sampled_from([0, 1, 5, 29]), experts=st.integers(1, 5), k=st.integers(1, 3),
           hidden=st.sampled_from([8, 24]), out=st.sampled_from([8, 16]), data=st.data())
    def test_combine_rewrite(self, tokens, experts, k, hidden, out, data):
        """The weighted index_add after a grouped GEMM -> unpermute, forward and backward, in bf16 (the
        dtype _grouped_mm takes on every device). Some experts get no rows; widths are multiples of 8
        (_grouped_mm's 16-byte stride rule). The op sums each token's k products in fp32 and rounds once;
        the stock code rounds each product and each addition to bf16: the two are within (k + 1) bf16
        roundings (2^-8 relative) of the sum of the terms' magnitudes, per element (a magnitude bounded
        through |x| @ |w1|, which also covers the GEMM's own rounding). The gradients come from the stock
        backward graph on both sides (the rewrite replaces forward ops only), which Inductor fuses in
        fp32 where eager rounds each op to bf16: within 4 bf16 roundings of the largest gradient."""
        self._fresh()
        k = min(k, experts)
        used = data.draw(st.sets(st.integers(0, experts - 1), min_size=k, max_size=experts), label="used experts")
        seed = data.draw(st.integers(0, 2 ** 16), label="seed")
        ids, w = _routing(tokens, experts, k, used, seed)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(tokens, hidden, generator=g).bfloat16()
        w1 = (torch.randn(experts, hidden, out, generator=g) / hidden ** 0.5).bfloat16()
        w = w.bfloat16()
        grad = torch.randn(tokens, out, generator=g).bfloat16()

        def run(f):
            leaves = [t.clone().requires_grad_(True) for t in (x, w, w1)]
            y = f(leaves[0], ids, leaves[1], leaves[2])
            (y.float() * grad.float()).sum().backward()
            return [y.detach()] + [t.grad for t in leaves]

        want = run(_stock_combine)
        got = run(torch.compile(_stock_combine, fullgraph=True, dynamic=True))
        self.assertEqual(_moe_counters(), {"unpermute": 1})
        rows = (x.double().abs().repeat_interleave(k, dim=0)[:, None, :]
                @ w1.double().abs()[ids.reshape(-1)]).squeeze(1) * w.double().reshape(-1, 1)
        terms = torch.zeros(tokens, out, dtype=torch.float64).index_add(0, torch.arange(tokens).repeat_interleave(k),
                                                                        rows)
        bound = (k + 1) * 2.0 ** -8 * terms
        err = (got[0].double() - want[0].double()).abs()
        outside = err > bound
        self.assertFalse(bool(outside.any()), f"combine output: errors {err[outside].tolist()} outside the bound")
        for a, b in zip(got[1:], want[1:]):
            scale = b.float().abs().max().item() if b.numel() else 0.0
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=4 * 2.0 ** -8 * scale)


# The rewrites whose target ops stay here, on drawn routing (zero tokens, empty experts, uneven loads).

@FEW
@given(tokens=st.sampled_from([0, 1, 6, 23]), experts=st.integers(1, 6), k=st.integers(1, 3),
       hidden=st.sampled_from([8, 16]), inter=st.sampled_from([8, 24]), data=st.data())
def test_experts_rewrite_on_drawn_routing(tokens, experts, k, hidden, inter, data):
    """transformers' "grouped_mm" experts (OLMoE's SwiGLU experts, called with drawn routing) -> expert_mlp,
    forward and backward in fp32 (transformers' own grouped GEMM under compile). Both sides compute in fp32
    and differ in summation order only: within 4 fp32 row tolerances (common.ROW_TOL), as the Qwen3 test."""
    import transformers
    torch._dynamo.reset()
    counters.clear()
    k = min(k, experts)
    used = data.draw(st.sets(st.integers(0, experts - 1), min_size=k, max_size=experts), label="used experts")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    cfg = transformers.OlmoeConfig(vocab_size=16, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, num_experts=experts,
                                   num_experts_per_tok=k, eos_token_id=None, pad_token_id=None,
                                   bos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm")
    experts_module = stock.moe_block(model).experts.float()
    ids, w = _routing(tokens, experts, k, used, seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1))

    def run(fn):
        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        for t in (*leaves, ids):
            # Only the token count is dynamic: called on its own, the module reads k from top_k_index's shape,
            # which dynamic=True would make symbolic (in a model k comes from the router's static topk, and
            # the matcher takes a static k only).
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for p in experts_module.parameters():
            p.grad = None
        out = fn(leaves[0], ids, leaves[1])
        (out.square().sum() / 2).backward()
        return out.detach(), [p.grad.clone() for p in experts_module.parameters()] + [t.grad for t in leaves]

    want = run(experts_module)
    got = run(torch.compile(experts_module, fullgraph=True, dynamic=False))
    assert fired() == {"expert_mlp": 1}
    if tokens:
        assert_all_close(got, want, torch.float32, 4, f"experts {tokens}x{experts} k={k}")
    else:
        assert got[0].shape == want[0].shape and all(not g.any() for g in got[1][:2])


@FEW
@given(tokens=st.sampled_from([0, 1, 5, 29]), experts=st.integers(1, 5), k=st.integers(1, 3),
       hidden=st.sampled_from([8, 24]), out=st.sampled_from([8, 16]), data=st.data())
def test_gather_and_combine_on_drawn_routing(tokens, experts, k, hidden, out, data):
    """Inference: x[perm // k] into the grouped GEMM -> grouped_mm_gather, and the combine -> unpermute, on
    drawn routing, bf16. The gathered GEMM computes exactly the rows of the stock one (same kernel, rows
    read through the index); the combine's bound is TestMoECombinePass.test_combine_rewrite's: (k + 1) bf16
    roundings of the sum of the terms' magnitudes, per element."""
    torch._dynamo.reset()
    counters.clear()
    k = min(k, experts)
    used = data.draw(st.sets(st.integers(0, experts - 1), min_size=k, max_size=experts), label="used experts")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    ids, w = _routing(tokens, experts, k, used, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    w1 = (torch.randn(experts, hidden, out, generator=g) / hidden ** 0.5).bfloat16()
    w = w.bfloat16()
    with torch.no_grad():
        got = torch.compile(_stock_combine, fullgraph=True, dynamic=True)(x, ids, w, w1)
        want = _stock_combine(x, ids, w, w1)
    assert fired() == {"grouped_mm_gather": 1, "unpermute": 1}
    rows = (x.double().abs().repeat_interleave(k, dim=0)[:, None, :]
            @ w1.double().abs()[ids.reshape(-1)]).squeeze(1) * w.double().reshape(-1, 1)
    terms = torch.zeros(tokens, out, dtype=torch.float64).index_add(0, torch.arange(tokens).repeat_interleave(k), rows)
    err = (got.double() - want.double()).abs()
    outside = err > (k + 1) * 2.0 ** -8 * terms
    assert not outside.any(), f"errors {err[outside].tolist()} outside the bound"

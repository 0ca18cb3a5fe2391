"""Tests of the fused experts: moe_ops::grouped_mm_gather (OpInfo-driven,
device-generic) and moe_ops::expert_mlp / fused_experts (the OpInfo's samples
in every dtype against the float64 reference, values and every gradient
against a float64 per-token loop, hypothesis over shapes and routing, what
autograd keeps, opcheck, errors, determinism, compile; the op bugs the
OpInfo found, as regression tests). The generic OpInfo tests are in test_ops.py.
"""

from functools import partial

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.common_device_type import ops
from torch.testing._internal.common_utils import TestCase

import torch_moe_ops
from torch_moe_ops import fused_experts
from torch_moe_ops.reference import torch_expert_mlp

from common import assert_rows_close, assert_same_bits_at_thread_counts, num_threads
from _device import instantiate_cpu_and_cuda
from opinfo_experts import expert_mlp_opinfo, grouped_mm_gather_opinfo
from test_grouped_mm import TOLERANCES

GATED = ("swiglu", "geglu", "swiglu_clamped")
ACTIVATIONS = GATED + ("silu", "gelu", "relu")


def _fake(mode, v):
    return mode.from_tensor(v) if isinstance(v, torch.Tensor) else v


class TestGroupedMMGather(TestCase):
    @ops([grouped_mm_gather_opinfo])
    def test_matches_float64_reference(self, device, dtype, op):
        for s in op.sample_inputs(device, dtype):
            out = op(s.input, *s.args, **s.kwargs)
            ref = op.ref(s.input, *s.args, **s.kwargs)
            self.assertEqual(out, ref, exact_dtype=True, **TOLERANCES[out.dtype], msg=s.name)


instantiate_cpu_and_cuda(TestGroupedMMGather, globals(), gpu_adds=(
    "the CUDA kernel on CUDA tensors: the Triton grouped GEMM compiled (the gather in its loads, wgmma, TMA), "
    "device-side asserts on the indices and offs; it runs in Triton's interpreter on CPU tensors in "
    "test_cuda_entries.py and test_triton_grouped_mm.py"))


# --------------------------------------------------------------- expert_mlp


def reference_experts(x, ids, w, gate_up, down, gate_up_bias, down_bias, activation, interleaved,
                      alpha=1.702, limit=7.0):
    """float64, one (token, slot) at a time: weight * down(act(gate_up(x))),
    activations written from their definitions."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    out = x * 0  # zeros that stay in the graph when there are no tokens
    inter = down.shape[1]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = x[t] @ gate_up[e] + (gate_up_bias[e].double() if gate_up_bias is not None else 0)
            if activation in GATED:
                gate, up = (h[0::2], h[1::2]) if interleaved else (h[:inter], h[inter:])
                if activation == "swiglu":
                    a = gate / (1 + torch.exp(-gate)) * up
                elif activation == "geglu":
                    a = 0.5 * gate * (1 + torch.erf(gate / 2**0.5)) * up
                else:
                    g = torch.minimum(gate, torch.tensor(limit, dtype=h.dtype))
                    u = torch.clamp(up, -limit, limit)
                    a = (u + 1) * g / (1 + torch.exp(-alpha * g))
            elif activation == "silu":
                a = h / (1 + torch.exp(-h))
            elif activation == "gelu":
                a = 0.5 * h * (1 + torch.erf(h / 2**0.5))
            else:
                a = torch.where(h > 0, h, 0)
            y = a @ down[e] + (down_bias[e].double() if down_bias is not None else 0)
            out[t] += (w[t, j].double() if w is not None else 1) * y
    return out


def make_problem(tokens, hidden, inter, experts, top_k, activation, bias, k_major, skew, dtype, seed,
                 weights=True):
    """Leaves (x, w, gate_up, down, biases) and the (E, in, out) views the op takes.
    k_major: weights stored as transformers does, (E, N1, H) and (E, H, I)."""
    gen = torch.Generator().manual_seed(seed)
    n1 = 2 * inter if activation in GATED else inter
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64).to(dtype)
    if skew:  # every token to the same few experts; the rest get no rows
        ids = torch.stack([torch.arange(top_k)] * tokens) if tokens else torch.zeros(0, top_k, dtype=torch.long)
    else:
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]) if tokens \
            else torch.zeros(0, top_k, dtype=torch.long)
    ids = ids.int()
    w = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64).to(torch.float32 if dtype != torch.float64
                                                                            else dtype) if weights else None
    scale = 0.5
    if k_major:
        gate_up = (torch.randn(experts, n1, hidden, generator=gen, dtype=torch.float64) * scale).to(dtype)
        down = (torch.randn(experts, hidden, inter, generator=gen, dtype=torch.float64) * scale).to(dtype)
        views = lambda gu, dn: (gu.transpose(-2, -1), dn.transpose(-2, -1))  # noqa: E731
    else:
        gate_up = (torch.randn(experts, hidden, n1, generator=gen, dtype=torch.float64) * scale).to(dtype)
        down = (torch.randn(experts, inter, hidden, generator=gen, dtype=torch.float64) * scale).to(dtype)
        views = lambda gu, dn: (gu, dn)  # noqa: E731
    gub = torch.randn(experts, n1, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    dnb = torch.randn(experts, hidden, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return x, ids, w, gate_up, down, gub, dnb, views


@settings(max_examples=150, deadline=None)
@given(tokens=st.integers(0, 17), hidden=st.integers(1, 20), inter=st.integers(1, 12), experts=st.integers(1, 6),
       data=st.data(), activation=st.sampled_from(ACTIVATIONS), bias=st.booleans(), k_major=st.booleans(),
       skew=st.booleans(), weights=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_experts_matches_float64_loop(tokens, hidden, inter, experts, data, activation, bias, k_major, skew,
                                            weights, seed):
    """Output and the gradients of tokens, routing weights, both weights and
    both biases, in float64: the op sums the same products in another order
    (GEMM blocking, fp64 accumulation), so 1e-10 relative holds."""
    top_k = data.draw(st.integers(1, experts))
    interleaved = activation in GATED and data.draw(st.booleans())
    x, ids, w, gate_up, down, gub, dnb, views = make_problem(tokens, hidden, inter, experts, top_k, activation, bias,
                                                             k_major, skew, torch.float64, seed, weights)
    leaves = [t.requires_grad_() for t in (x, w, gate_up, down, gub, dnb) if t is not None]
    gu, dn = views(gate_up, down)
    out = fused_experts(x, ids, w, gu, dn, gub, dnb, activation, interleaved)
    ref = reference_experts(x, ids, w, gu, dn, gub, dnb, activation, interleaved)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
    for leaf, g, r in zip(leaves, got, want):
        r = torch.zeros_like(leaf) if r is None else r
        g = torch.zeros_like(leaf) if g is None else g
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
        # Weight gradients arrive in the parameter's own layout (no autograd
        # copy); strides of size-1 dimensions are arbitrary.
        assert all(a == b for a, b, n in zip(g.stride(), leaf.stride(), leaf.shape) if n > 1), (g.stride(), leaf.stride())


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_clamped", "relu"])
def test_gradcheck(activation):
    x, ids, w, gate_up, down, gub, dnb, views = make_problem(5, 6, 3, 4, 2, activation, True, True, False,
                                                             torch.float64, 0)
    interleaved = activation == "swiglu_clamped"
    leaves = [t.requires_grad_() for t in (x, w, gate_up, down, gub, dnb)]

    def f(x, w, gate_up, down, gub, dnb):
        return fused_experts(x, ids, w, *views(gate_up, down), gub, dnb, activation, interleaved)

    assert torch.autograd.gradcheck(f, leaves)


def test_double_backward_raises_and_the_composition_supports_it():
    """expert_mlp's backward op has no derivative. Before it had an autograd
    kernel that says so, a second derivative through fused_experts came back
    None (d grad_x / d x), partly computed, or failed on an inner ATen op
    ("derivative for aten::silu_backward is not implemented"), depending on
    the loss. Now every one raises the same error, and the composition its
    message points to is twice differentiable (gradgradcheck, float64)."""
    x, ids, w, gate_up, down, _, _, views = make_problem(5, 4, 3, 3, 2, "swiglu", False, False, False,
                                                         torch.float64, 0)
    leaves = [t.requires_grad_() for t in (x, w, gate_up, down)]
    for loss in (lambda o: o.sum(), lambda o: o.pow(2).sum()):
        out = fused_experts(x, ids, w, *views(gate_up, down))
        gx, gw = torch.autograd.grad(loss(out), (x, w), create_graph=True)
        for first in (gx, gw):
            for leaf in leaves:
                with pytest.raises(RuntimeError, match="expert_mlp .fused_experts. has no double backward"):
                    torch.autograd.grad(first.sum(), leaf, retain_graph=True, allow_unused=True)

    gate_up_v, down_v = views(gate_up, down)
    experts = gate_up_v.shape[0]

    def composed(x, w, gate_up, down):
        gate_up, down = views(gate_up, down)
        rows, dst_rows, _, offs = torch_moe_ops.permute(x, ids, experts)
        h = torch.ops.moe_ops.grouped_mm(rows, gate_up, offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch.ops.moe_ops.grouped_mm(F.silu(gate) * up, down, offs)
        return torch_moe_ops.unpermute(y, dst_rows, w)

    torch.testing.assert_close(composed(*leaves), fused_experts(x, ids, w, gate_up_v, down_v), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(composed, leaves)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_16bit_and_fp32_close_to_float64(dtype, bias):
    """Per element. h, act(h) and y round once each to the dtype (2^-9
    relative in bf16) and the combine accumulates in fp32: each output row is
    within 3 roundings of its own magnitude (its largest element), factor 4
    of ROW_TOL (measured: 1.6 over 20 seeds). Gradients: every elementwise
    step in fp32, the GEMM inputs rounded once: the token gradient, the down
    weights' and the biases' likewise per row. The gradients of gate_up
    (sum over an expert's tokens of x * dh) and of the routing weights
    (<grad_out, y> over hidden) cancel, so they are bounded by the sums of
    their absolute terms (|x|^T |dh| with dh's own cancelling sum
    |grad_out| @ |down|^T, and |grad_out| . |y|, in float64 one slot at a
    time) instead of their rows. Without biases the SwiGLU rows run the fused
    kernels (ExpertSwiGLU.h) both ways; with them the backward's routing
    weight gradient takes the down bias's term, through the ATen composition."""
    x, ids, w, gate_up, down, gub, dnb, views = make_problem(40, 64, 24, 8, 3, "swiglu", True, True, False, dtype, 5)
    if not bias:
        gub, dnb = torch.zeros_like(gub), torch.zeros_like(dnb)
    leaves = [t.requires_grad_() for t in (x, w, gate_up, down, gub, dnb)]
    out = fused_experts(x, ids, w, *views(gate_up, down), *((gub, dnb) if bias else (None, None)))
    grad = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves if bias else leaves[:4], grad.to(dtype))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference_experts(leaves64[0], ids, leaves64[1], *views(leaves64[2], leaves64[3]), leaves64[4],
                            leaves64[5], "swiglu", False)
    assert_rows_close(out, ref, dtype, 4, "out")
    want = torch.autograd.grad(ref, leaves64, grad)
    magnitude = _cancelling_grad_magnitudes(leaves64, ids, grad, views)
    for name, g, r in zip(("tokens", "weights", "gate_up", "down", "gate_up_bias", "down_bias"), got, want):
        assert_rows_close(g, r, dtype, 4, f"grad of {name}", magnitude.get(name))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weights", [True, False])
def test_interleaved_swiglu_is_a_column_permutation(dtype, weights):
    """gate and up interleaved in gate_up's columns (gpt-oss's layout) are the
    same layer as gate then up with the columns permuted: every h column sums
    the same products in the same order and each SwiGLU row is computed alone
    in the fused kernels, so the output and the gradients of the routing
    weights, of down and (permuted back) of gate_up keep their bits; the token
    gradient sums over the permuted columns in another order, so it is close.
    Inter 37: rows off the vector width."""
    x, ids, w, gate_up, down, _, _, views = make_problem(33, 48, 37, 6, 2, "swiglu", False, False, False, dtype, 3,
                                                         weights)
    inter = down.shape[1]
    perm = torch.stack([torch.arange(inter), torch.arange(inter) + inter], 1).reshape(-1)  # gate0, up0, gate1, ...
    grad = torch.randn(33, 48, generator=torch.Generator().manual_seed(4)).to(dtype)
    runs = []
    for interleaved in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, gate_up[..., perm] if interleaved else gate_up,
                                                                down)]
        wl = w.detach().clone().requires_grad_() if weights else None
        out = fused_experts(leaves[0], ids, wl, leaves[1], leaves[2], None, None, "swiglu", interleaved)
        grads = torch.autograd.grad(out, leaves + ([wl] if weights else []), grad)
        runs.append((out, *grads))
    (out, gx, ggu, gdn, *gw), (out_i, gx_i, ggu_i, gdn_i, *gw_i) = runs
    assert torch.equal(out, out_i)
    assert torch.equal(ggu[..., perm], ggu_i)
    assert torch.equal(gdn, gdn_i)
    for a, b in zip(gw, gw_i):
        assert torch.equal(a, b)
    # The token gradient sums 2 * inter products per row in another order. In float32 a reordered sum of n terms
    # moves by up to 2 (n - 1) u sum|terms|, taken as 2 n u max|gx| (gx reaches ~250 here, so an absolute 1e-5 was
    # too tight: the AVX2 build's widening engine differs by 4.6e-5, 1.8e-7 max|gx|); a wrong column order would
    # move gx by ~max|gx|. bfloat16 keeps its bound, 2**-7 of max|gx|.
    if dtype == torch.bfloat16:
        tol = {"rtol": 2**-7, "atol": 2**-7 * gx.abs().max().item()}
    else:
        tol = {"rtol": 1e-5, "atol": 2 * (2 * inter) * 2**-24 * gx.abs().max().item()}
    torch.testing.assert_close(gx, gx_i, **tol)


def _cancelling_grad_magnitudes(leaves64, ids, grad, views):
    """Sums of the absolute terms of the gate_up weights' and routing
    weights' gradients (swiglu, not interleaved), one (token, slot) at a time."""
    x, w, stored_gate_up, down, gub, dnb = (t.detach() for t in leaves64)
    gate_up, down = views(stored_gate_up, down)
    inter = down.shape[1]
    mag_gate_up, mag_w = torch.zeros_like(gate_up), torch.zeros_like(w)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = x[t] @ gate_up[e] + gub[e]
            gate, up = h[:inter], h[inter:]
            sig = torch.sigmoid(gate)
            y = (gate * sig * up) @ down[e] + dnb[e]
            # d act(h) = (grad_out * w) @ down^T cancels over hidden: its
            # magnitude, through |d act / d gate| and |d act / d up|.
            da = (grad[t] * w[t, j]).abs() @ down[e].abs().t()
            dh = torch.cat([da * (up * sig * (1 + gate * (1 - sig))).abs(), da * (gate * sig).abs()])
            mag_gate_up[e] += torch.outer(x[t].abs(), dh)
            mag_w[t, j] = (grad[t].abs() * y.abs()).sum()
    # In the stored layout of the leaf (views may transpose (E, N, K) weights).
    if mag_gate_up.shape != stored_gate_up.shape:
        mag_gate_up = mag_gate_up.transpose(-2, -1)
    return {"gate_up": mag_gate_up, "weights": mag_w}


def test_keeps_no_token_times_k_times_hidden_activation():
    """What autograd keeps from the forward: the inputs, the routing and h
    (R, N1). Nothing of R x H (the permuted tokens, the down-projection
    output) and nothing of R x I (the activation) is kept."""
    tokens, hidden, inter, k = 64, 96, 16, 4
    x, ids, w, gate_up, down, _, _, views = make_problem(tokens, hidden, inter, 8, k, "swiglu", False, True, False,
                                                         torch.float32, 1)
    for t in (x, w, gate_up, down):
        t.requires_grad_()
    params = {t.untyped_storage().data_ptr() for t in (x, w, gate_up, down)}
    kept = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.is_floating_point():
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_experts(x, ids, w, *views(gate_up, down))
    assert kept == [(tokens * k, 2 * inter)], kept


def test_expanded_and_noncontiguous_gradients():
    """.sum() sends an expanded (stride-0) gradient; a transposed gradient is
    non-contiguous. Both must give the gradients of a contiguous copy."""
    x, ids, w, gate_up, down, gub, dnb, views = make_problem(11, 8, 5, 4, 2, "geglu", True, False, False,
                                                             torch.float64, 2)
    leaves = [t.requires_grad_() for t in (x, w, gate_up, down, gub, dnb)]
    out = fused_experts(x, ids, w, *views(gate_up, down), gub, dnb, "geglu")
    for grad in (torch.ones(1, 1, dtype=out.dtype).expand(out.shape), torch.randn(8, 11, dtype=out.dtype).t()):
        got = torch.autograd.grad(out, leaves, grad, retain_graph=True)
        want = torch.autograd.grad(out, leaves, grad.contiguous(), retain_graph=True)
        for g, r in zip(got, want):
            assert torch.equal(g, r)


def test_bits_independent_of_thread_count_and_run():
    """Chunks and GEMM tiles depend on the shapes only: the same bits with
    one thread or two, run after run (bf16, every gradient)."""
    x, ids, w, gate_up, down, gub, dnb, views = make_problem(300, 128, 48, 16, 4, "swiglu", True, True, False,
                                                             torch.bfloat16, 3)
    leaves = [t.requires_grad_() for t in (x, w, gate_up, down, gub, dnb)]
    grad = torch.randn(300, 128).to(torch.bfloat16)

    def run():
        out = fused_experts(x, ids, w, *views(gate_up, down), gub, dnb)
        return [out, *torch.autograd.grad(out, leaves, grad)]

    assert_same_bits_at_thread_counts(run)



@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inference_mode_and_grad_inputs_on_worker_threads(activation, dtype):
    """The ATen composition (every activation in float64; all but SwiGLU in
    bfloat16) runs 128-row chunks on at::parallel_for's threads and calls ATen
    ops there, so each worker must run under the caller's thread-local state.
    Without it, under torch.inference_mode() a worker could not write its
    chunk of a buffer made in inference mode (failed every time from 2
    threads on), and in the backward, whose inputs require grad, workers
    recorded autograd history on a shared buffer and raced on its grad_fn
    (CI failed now and then on test_bits_independent_of_thread_count_and_run).
    400 routed rows: 4 chunks. Forward and every gradient: the same bits in
    inference mode, under no_grad and through autograd."""
    x, ids, w, gate_up, down, gub, dnb, views = make_problem(100, 16, 8, 4, 4, activation, True, False, False,
                                                             dtype, 5)
    _, dst_rows, src_rows, offs = torch_moe_ops.permute(x[:, :0], ids, 4)
    args = (x, src_rows, offs, dst_rows, w, *views(gate_up, down), gub, dnb, activation)
    grad = torch.randn(100, 16, dtype=torch.float64).to(dtype)
    leaves = [x, w, gate_up, down, gub, dnb]

    def backward_op(out_h):
        return torch.ops.moe_ops.expert_mlp_backward(grad, *args[:-1], out_h[1], activation, False, 1.702, 7.0,
                                                     [True, True, True, True])

    with num_threads(2):
        with torch.no_grad():
            want = torch.ops.moe_ops.expert_mlp(*args)
            want_grads = backward_op(want)
        with torch.inference_mode():
            got = torch.ops.moe_ops.expert_mlp(*args)
            got_grads = backward_op(got)
        for t in leaves:
            t.requires_grad_()
        out = fused_experts(x, ids, w, *views(gate_up, down), gub, dnb, activation)
        autograd_grads = torch.autograd.grad(out, leaves, grad)
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        assert torch.equal(a, b)
    assert torch.equal(out, want[0])
    # expert_mlp_backward's outputs in the autograd function's order: tokens,
    # weights, gate_up, down, then the two biases.
    for a, b in zip(autograd_grads, want_grads):
        assert torch.equal(a, b.view_as(a))


def _clamped_swiglu_torch(x, w, gate_up, down, limit=7.0, alpha=1.702):
    """gpt-oss's clamped SwiGLU experts in plain torch (one expert, k = 1): torch.clamp's backward."""
    h = x @ gate_up[0]
    gate, up = h.chunk(2, dim=1)
    g = gate.clamp(max=limit)
    return (((up.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)) @ down[0]) * w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clamped_swiglu_gradient_is_zero_where_clamped(dtype):
    """Where a clamp is active (gate >= limit, |up| >= limit: torch's clamp
    passes 0 at the bounds too) the gradient is 0, even from an infinite
    upstream gradient, as torch.clamp's backward selects it. The kernel
    multiplied by the mask instead (inf * 0 = NaN in dh, which the
    weight-gradient GEMM spread over the expert's whole gate_up column), and
    passed the full gradient at the bounds (the gradients of tokens 4-6 were
    off by up to 25x). Every gradient has torch's non-finite pattern and,
    where finite, its value."""
    # Tokens 4-6 sit exactly on a bound (gate = 7; up = -7; up = 7): torch's clamp passes 0 there.
    x = torch.tensor([[1.0, 0.5], [1.0, 0.0], [0.0, 1.0], [0.25, 0.25], [0.5, 2.0], [2.0, 1.0], [-2.0, -1.0]],
                     dtype=dtype)
    ids = torch.zeros(7, 1, dtype=torch.int32)
    w = torch.tensor([[1.0], [float("inf")], [float("inf")], [0.5], [1.0], [1.0], [0.75]],
                     dtype=torch.float32 if dtype != torch.float64 else dtype)
    # Token 1: gate 10 > 7, up 1; token 2: gate 1, up -9 < -7; token 3: both inside.
    gate_up = torch.tensor([[[10.0, 1.0], [1.0, -9.0]]], dtype=dtype)
    down = torch.tensor([[[0.75, 0.5]]], dtype=dtype)  # one sign: grad_out @ down^T * w stays inf, not inf - inf
    grads = []
    for fn in (lambda *t: fused_experts(t[0], ids, t[1], t[2], t[3], activation="swiglu_clamped"),
               _clamped_swiglu_torch):
        leaves = [t.clone().requires_grad_() for t in (x, w, gate_up, down)]
        grads.append(torch.autograd.grad(fn(*leaves), leaves, torch.ones(7, 2, dtype=dtype)))
    for got, want in zip(*grads):
        assert torch.equal(got.isfinite(), want.isfinite()) and torch.equal(got.isnan(), want.isnan()), (got, want)
        finite = want.isfinite()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-6 if dtype == torch.float32 else 1e-13,
                                   atol=0)


def _op_args(dtype=torch.float32, bias=True):
    x, ids, w, gate_up, down, gub, dnb, views = make_problem(9, 8, 4, 3, 2, "swiglu", bias, True, False, dtype, 4)
    _, dst_rows, src_rows, offs = torch_moe_ops.permute(x[:, :0], ids, 3)
    return x, src_rows, offs, dst_rows, w, *views(gate_up, down), gub, dnb


def test_opcheck():
    args = _op_args()
    torch.library.opcheck(torch.ops.moe_ops.expert_mlp.default, args)
    leaves = [args[0], args[4], args[5], args[6], args[7], args[8]]
    for t in leaves:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.moe_ops.expert_mlp.default, args)
    out, h = torch.ops.moe_ops.expert_mlp(*[a.detach() for a in args])
    for mask in ([True, True, True, True], [True, False, False, True], [False, True, True, False]):
        torch.library.opcheck(torch.ops.moe_ops.expert_mlp_backward.default,
                              (torch.randn_like(out), *[a.detach() for a in args], h, "swiglu", False, 1.702, 7.0,
                               mask))


@pytest.mark.parametrize("change, regex", [
    (dict(activation="tanh"), r'activation must be one of swiglu, .* got "tanh"'),
    (dict(activation="relu", interleaved=True), r'gate_up_interleaved needs a gated activation, got "relu"'),
    (dict(x=lambda x: x[None]), r"tokens must be 2-D \(tokens, hidden\), got 3-D"),
    (dict(gate_up=lambda g: g[..., :-1]), r"gate_up_proj must have N1=8 columns .* got \[3, 8, 7\]"),
    (dict(down=lambda d: d.double()), r"must have the dtype of tokens \(Float\), got Float and Double"),
    (dict(w=lambda w: w[:, :1]), r"weights must have the shape of dst_rows \[9, 2\], got \[9, 1\]"),
    (dict(w=lambda w: w.double()), r"weights must be float32 or the dtype of tokens \(Float\), got Double"),
    (dict(gub=lambda b: b[:, :3]), r"gate_up_bias must be \(E, N1\) = \(3, 8\), got \[3, 3\]"),
    (dict(dnb=lambda b: b[:2]), r"down_bias must be \(E, H\) = \(3, 8\), got \[2, 8\]"),
    (dict(offs=lambda o: o[:2]), r"must agree on the number of experts"),
])
def test_errors_in_eager_and_fake(change, regex):
    x, src_rows, offs, dst_rows, w, gu, dn, gub, dnb = _op_args()
    args = dict(x=x, src_rows=src_rows, offs=offs, dst_rows=dst_rows, w=w, gate_up=gu, down=dn, gub=gub, dnb=dnb)
    activation, interleaved = change.get("activation", "swiglu"), change.get("interleaved", False)
    for key, fn in change.items():
        if callable(fn):
            args[key] = fn(args[key])
    call = lambda a: torch.ops.moe_ops.expert_mlp(  # noqa: E731
        a["x"], a["src_rows"], a["offs"], a["dst_rows"], a["w"], a["gate_up"], a["down"], a["gub"], a["dnb"],
        activation, interleaved)
    with pytest.raises(ValueError, match=regex):
        call(args)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=regex):
        call({k: _fake(mode, v) for k, v in args.items()})


@pytest.mark.parametrize("change, regex", [
    (dict(grad=lambda g: g[:, :4]), r"grad_out must be Float of sizes \[9, 8\], got Float of sizes \[9, 4\]"),
    (dict(grad=lambda g: g.double()), r"grad_out must be Float of sizes \[9, 8\], got Double of sizes \[9, 8\]"),
    (dict(h=lambda h: h[:, 1:]), r"h must be Float of sizes \(R, N1\) = \(18, {n1}\), got Float of sizes \[18, {n1m}\]"),
    (dict(h=lambda h: h.double()), r"h must be Float of sizes \(R, N1\) = \(18, {n1}\), got Double of sizes \[18, {n1}\]"),
    (dict(h=lambda h: h.bfloat16()), r"h must be Float .* got BFloat16 of sizes \[18, {n1}\]"),
])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_backward_errors_in_eager_and_fake(change, regex, activation):
    """expert_mlp_backward's own arguments, grad_out and h, checked alike by
    the kernel and the fake kernel. The fake kernel checked neither (a wrong
    grad_out or h traced to normal-looking outputs) and the kernel took h of
    any dtype: float64 failed inside the SwiGLU kernel, bfloat16 in a GEMM,
    neither naming h, and relu's path took both silently."""
    x, src_rows, offs, dst_rows, w, gu, dn, gub, dnb = _op_args(bias=False)
    if activation == "relu":
        gu = gu[..., :4]  # N1 = I for an ungated activation
    out, h = torch.ops.moe_ops.expert_mlp(x, src_rows, offs, dst_rows, w, gu, dn, None, None, activation)
    n1 = h.shape[1]
    regex = regex.format(n1=n1, n1m=n1 - 1)
    args = dict(grad=torch.randn_like(out), h=h)
    for key, fn in change.items():
        args[key] = fn(args[key])
    rest = (x, src_rows, offs, dst_rows, w, gu, dn, None, None)

    def call(a, rest):
        return torch.ops.moe_ops.expert_mlp_backward(a["grad"], *rest, a["h"], activation, False, 1.702, 7.0,
                                                     [True, True, True, True])

    with pytest.raises(ValueError, match=regex):
        call(args, rest)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=regex):
        call({k: _fake(mode, v) for k, v in args.items()}, [_fake(mode, v) for v in rest])


def test_routing_out_of_range_names_the_id():
    x, ids, w, gate_up, down, _, _, views = make_problem(4, 8, 4, 3, 2, "swiglu", False, True, False,
                                                         torch.float32, 6)
    ids[2, 1] = 3
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, num_experts=3\)"):
        fused_experts(x, ids, w, *views(gate_up, down))


# The output against the float64 reference, relative to the output's scale: h,
# a and y round once each to the dtype and the combine accumulates in fp32
# (see test_16bit_and_fp32_close_to_float64); float16 has 3 more bits than
# bfloat16, float64 differs in summation order only.
def _op_args_on(device, dtype=torch.float32):
    return [a.to(device) for a in _op_args(dtype)]


class TestExpertMLP(TestCase):
    @ops([expert_mlp_opinfo])
    def test_matches_float64_reference(self, device, dtype, op):
        for s in op.sample_inputs(device, dtype):
            with self.subTest(sample=s.name):
                out, h = op(s.input, *s.args, **s.kwargs)
                ref_out, ref_h = op.ref(s.input, *s.args, **s.kwargs)
                # Per element, against the output row's magnitude (its largest
                # element): h, act(h) and y rounded once each, as in
                # test_16bit_and_fp32_close_to_float64.
                assert_rows_close(out, ref_out, dtype, 4, s.name)
                # h is one grouped GEMM rounded once (test_grouped_mm.TOLERANCES).
                self.assertEqual(h, ref_h, **TOLERANCES[dtype])

    def test_h_is_not_differentiable(self, device):
        """h is returned only for the backward to keep: it carries no
        gradient, so a loss on it fails loudly instead of getting zeros."""
        x, src_rows, offs, dst_rows, w, gu, dn, gub, dnb = _op_args_on(device, torch.float64)
        for t in (x, gu, gub):
            t.requires_grad_()
        out, h = torch.ops.moe_ops.expert_mlp(x, src_rows, offs, dst_rows, w, gu, dn, gub, dnb)
        self.assertTrue(out.requires_grad)
        self.assertFalse(h.requires_grad)

    def test_backward_of_zero_tokens_with_padding_rows(self, device):
        """No tokens, routing from permute with alignment > 1 (every row
        padding, src_rows all -1) and routing weights: every gradient is zero
        (the backward once indexed the empty routing weights)."""
        ids = torch.zeros(0, 2, dtype=torch.int32, device=device)
        _, dst_rows, src_rows, offs = torch_moe_ops.permute(torch.zeros(0, 0, device=device), ids, 3, alignment=4)
        make = partial(torch.randn, dtype=torch.float64, device=device, requires_grad=True)
        x, w, gu, dn = make(0, 8), make(0, 2), make(3, 8, 8), make(3, 4, 8)
        out, _ = torch.ops.moe_ops.expert_mlp(x, src_rows, offs, dst_rows, w, gu, dn)
        grads = torch.autograd.grad(out.sum(), (x, w, gu, dn), allow_unused=True)
        self.assertEqual([g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (x, w, gu, dn))],
                         [torch.zeros_like(t) for t in (x, w, gu, dn)])

    def test_bias_dtype_errors_name_the_bias(self, device):
        """Biases of another dtype than the tokens are refused by eager and
        fake alike, naming the bias (they once failed inside grouped_mm,
        naming neither, and the fake kernel let them through)."""
        args = dict(zip(("x", "src_rows", "offs", "dst_rows", "w", "gu", "dn", "gub", "dnb"), _op_args_on(device)))
        for key, name in (("gub", "gate_up_bias"), ("dnb", "down_bias")):
            bad = dict(args, **{key: args[key].double()})
            with self.assertRaisesRegex(ValueError, f"expert_mlp: {name}"):
                torch.ops.moe_ops.expert_mlp(*bad.values())
            with FakeTensorMode() as mode, self.assertRaisesRegex(ValueError, f"expert_mlp: {name}"):
                torch.ops.moe_ops.expert_mlp(*(_fake(mode, v) for v in bad.values()))

    def test_offs_dtype_error_in_fake_mode(self, device):
        """int64 offs are refused by eager and fake alike, under expert_mlp's name."""
        x, src_rows, offs, dst_rows, w, gu, dn, gub, dnb = _op_args_on(device)
        args = (x, src_rows, offs.long(), dst_rows, w, gu, dn, gub, dnb)
        with self.assertRaisesRegex(ValueError, r"expert_mlp: offs must be int32, got Long"):
            torch.ops.moe_ops.expert_mlp(*args)
        with FakeTensorMode() as mode, self.assertRaisesRegex(ValueError, r"expert_mlp: offs must be int32, got Long"):
            torch.ops.moe_ops.expert_mlp(*(_fake(mode, v) for v in args))


instantiate_cpu_and_cuda(TestExpertMLP, globals(), gpu_adds=(
    "the CUDA kernels on CUDA tensors: the fused Triton kernels compiled (gate/up with the activation "
    "epilogue, down with the weighted slot rows, combine; the backward's), device-side asserts on the routing; "
    "they run in Triton's interpreter on CPU tensors in test_cuda_entries.py and test_triton_experts.py"))


def test_compile_fullgraph_backward_no_recompile():
    """aot_eager traces forward and backward with the fake kernels; new token
    counts reuse the graph (dynamic=True) and give eager's bits."""
    _, _, _, gate_up, down, gub, dnb, views = make_problem(1, 16, 8, 4, 2, "swiglu", True, True, False,
                                                           torch.float32, 7)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def layer(x, ids, w, gate_up, down, gub, dnb):
        return fused_experts(x, ids, w, *views(gate_up, down), gub, dnb)

    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for tokens in (5, 9, 14):
        x, ids, w, *_ = make_problem(tokens, 16, 8, 4, 2, "swiglu", True, True, False, torch.float32, tokens)
        leaves = [t.detach().requires_grad_() for t in (x, w, gate_up, down, gub, dnb)]
        out = compiled(leaves[0], ids, *leaves[1:])
        grads = torch.autograd.grad(out.square().sum(), leaves)
        ref_leaves = [t.detach().requires_grad_() for t in leaves]
        ref = layer(ref_leaves[0], ids, *ref_leaves[1:])
        ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
        assert torch.equal(out, ref)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r)
        frames.append(counter.frame_count)
    # New token counts compile nothing new; one graph holds the op.
    assert frames[0] == frames[-1]
    assert sum("moe_ops.expert_mlp.default" in g.code for g in counter.graphs) == 1


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 260), n=st.integers(1, 150), tokens=st.integers(0, 40), groups=st.integers(1, 20),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), layout=st.sampled_from(
           ["rows", "b_index", "a_cols", "both"]), seed=st.integers(0, 2**16))
def test_grouped_mm_gather_large_tiles(m, n, tokens, groups, dtype, layout, seed):
    """Sizes past the micro-kernel's tiles (6-row blocks, 64-column strips,
    192-row chunks, 256-deep K blocks), K-major A (a transposed operand, as
    in a weight gradient) and gathered rows and columns with -1 entries,
    against the float64 reference: one rounding of the exact result
    (TOLERANCES) plus fp32 accumulation over up to a few hundred products."""
    from opinfo_experts import torch_grouped_mm_gather
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 30, (groups,), generator=gen)
    offs = sizes.cumsum(0).to(torch.int32)
    rows = int(offs[-1])
    index = torch.randint(-1, max(tokens, 1), (rows,), generator=gen) if tokens else torch.full((rows,), -1)
    make = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64).mul(2).sub(1).to(dtype)  # noqa: E731
    if layout == "rows":
        args = (make(tokens, m), make(groups, m, n), offs, index)
        kw = {}
    elif layout == "b_index":
        args = (make(rows, m).t(), make(tokens, n), offs, None, index)  # K-major A, gathered B
        kw = {}
    elif layout == "a_cols":
        args = (make(tokens, m).t(), make(rows, n), offs, index)  # gathered K-major A columns
        kw = {}
    else:
        args = (make(tokens, m).t(), make(tokens, n), offs, index, index)
        kw = {}
    out = torch.ops.moe_ops.grouped_mm_gather(*args, **kw)
    ref = torch_grouped_mm_gather(*args, **kw)
    tol = dict(TOLERANCES[dtype])
    tol["atol"] = max(tol["atol"], 1e-5 if dtype == torch.float32 else tol["atol"])
    torch.testing.assert_close(out, ref, **tol)

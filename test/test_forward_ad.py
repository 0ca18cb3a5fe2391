"""Forward-mode AD, and the float8 ops' missing derivative: every op raises,
naming the argument, where it used to drop the tangent or gradient silently.

torch.library's autograd kernel has no forward rule and ran the op below
autograd, so a forward tangent on any input was lost: forward_ad read None,
torch.func.jvp a zero tangent (also through nn.MoE). The float8 ops had no
autograd kernel at all: a backward reached their float inputs (a scale, the
values quantised) as None, with only a warning. torch's own ops raise in both
cases (torch._grouped_mm, torch._scaled_grouped_mm), and so do ours now
(torch_moe_ops/_autograd.py).
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torch_moe_ops
from torch_moe_ops.nn import MoE, MoEConfig
from torch_moe_ops.reference import torch_grouped_mm

from opinfo_scaled_grouped_mm_v2 import scaled_grouped_mm_v2_cases

OPS = torch.ops.moe_ops
FORWARD_AD = "forward-mode AD is not supported: {arg} has a forward tangent"


def _rand(*size, dtype=torch.float64, seed=0):
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed + sum(size)), dtype=dtype)


def _routing():
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [1, 0], [0, 2]], dtype=torch.int32)
    _, dst_rows, src_rows, offs = torch_moe_ops.permute(torch.zeros(5, 0, dtype=torch.float64), ids, 3)
    return ids, dst_rows, src_rows, offs


def _expert_mlp_args():
    ids, dst_rows, src_rows, offs = _routing()
    return dict(tokens=_rand(5, 4), src_rows=src_rows, offs=offs, dst_rows=dst_rows, weights=_rand(5, 2),
                gate_up_proj=_rand(3, 4, 6), down_proj=_rand(3, 3, 4), gate_up_bias=_rand(3, 6),
                down_bias=_rand(3, 4))


def _differentiable_cases():
    """(op, kwargs, float arguments): every op with a backward formula."""
    ids, dst_rows, src_rows, offs = _routing()
    offs2 = torch.tensor([3, 6], dtype=torch.int32)
    yield OPS.grouped_mm, dict(mat_a=_rand(6, 4), mat_b=_rand(2, 4, 3), offs=offs2, bias=_rand(2, 3)), \
        ("mat_a", "mat_b", "bias")
    yield OPS.grouped_mm_gather, dict(mat_a=_rand(5, 4), mat_b=_rand(2, 4, 3), offs=offs2,
                                      a_index=torch.tensor([0, 4, 2, 2, 1, 3]), bias=_rand(2, 3)), \
        ("mat_a", "mat_b", "bias")
    yield OPS.router_topk, dict(logits=_rand(5, 4), k=2, bias=_rand(4)), ("logits",)
    yield OPS.permute, dict(tokens=_rand(5, 4), expert_ids=ids, num_experts=3), ("tokens",)
    yield OPS.unpermute, dict(permuted=_rand(10, 4), dst_rows=dst_rows, weights=_rand(5, 2)), ("permuted", "weights")
    yield OPS.unpermute_backward, dict(grad_output=_rand(5, 4), dst_rows=dst_rows, num_rows=10, weights=_rand(5, 2),
                                       permuted=_rand(10, 4)), ("grad_output", "weights", "permuted")
    mlp = _expert_mlp_args()
    yield OPS.expert_mlp, mlp, ("tokens", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias")
    _, h = OPS.expert_mlp(**mlp)
    yield OPS.expert_mlp_backward, dict(grad_out=_rand(5, 4), **mlp, h=h, activation="swiglu",
                                        gate_up_interleaved=False, swiglu_alpha=1.702, swiglu_limit=7.0,
                                        output_mask=[True] * 4), ("grad_out", "tokens", "h")
    train = dict(a=_rand(8, 32, dtype=torch.float32), b=_rand(2, 32, 16, dtype=torch.float32),
                 offs=torch.tensor([3, 8], dtype=torch.int32), recipe="rowwise", out_dtype=torch.float32,
                 wgrad_fp8=True)
    yield torch.ops.moe_ops_training.fp8_grouped_mm, train, ("a", "b")


def _float8_cases():
    """(op, kwargs, float arguments): the float8 ops, which have no derivative."""
    x = _rand(8, 64, dtype=torch.float32)
    data, scale = OPS.quantize_fp8(x, "rowwise")
    yield OPS.quantize_fp8, dict(x=x, recipe="rowwise"), ("x",)
    yield OPS.dequantize_fp8, dict(data=data, scale=scale, recipe="rowwise"), ("scale",)
    _, b_scale = OPS.quantize_fp8(_rand(2, 16, 64, dtype=torch.float32), "rowwise")
    b_data = OPS.quantize_fp8(_rand(2, 16, 64, dtype=torch.float32), "rowwise")[0].transpose(-2, -1)
    yield OPS.scaled_grouped_mm, dict(mat_a=data, mat_b=b_data, scale_a=scale, scale_b=b_scale,
                                      offs=torch.tensor([3, 8], dtype=torch.int32), out_dtype=torch.float32), \
        ("scale_a", "scale_b")
    _, args, kw, _, _ = next(iter(scaled_grouped_mm_v2_cases("cpu", torch.float32)))
    names = [a.name for a in OPS.scaled_grouped_mm_v2.default._schema.arguments]
    yield OPS.scaled_grouped_mm_v2, {**dict(zip(names, args)), **kw}, ("scale_a", "scale_b")


def _case_id(value):
    return str(value) if isinstance(value, torch._ops.OpOverloadPacket) else ""


def _with_tangent(kwargs, arg):
    """kwargs with arg made dual (a list of tensors: each of them)."""
    value = kwargs[arg]
    dual = lambda t: fwAD.make_dual(t, torch.ones_like(t))  # noqa: E731
    return {**kwargs, arg: [dual(t) for t in value] if isinstance(value, list) else dual(value)}


@pytest.mark.parametrize("op, kwargs, args", [*_differentiable_cases(), *_float8_cases()],
                         ids=_case_id)
def test_forward_ad_raises_naming_the_argument(op, kwargs, args):
    for arg in args:
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match=FORWARD_AD.format(arg=arg)):
                op(**_with_tangent(kwargs, arg))
            # Without tangents, a dual level changes nothing.
            op(**kwargs)


@pytest.mark.parametrize("op, kwargs, args", [c for c in _differentiable_cases() if c[0] != OPS.expert_mlp_backward],
                         ids=_case_id)
def test_reverse_mode_unchanged(op, kwargs, args):
    """The refusal does not reach reverse mode: the same first gradients in a
    dual level as outside one (expert_mlp_backward has none: its own
    backward raises, test_experts.py)."""
    leaves = {a: kwargs[a].detach().requires_grad_() for a in args}
    outs = op(**{**kwargs, **leaves})
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.is_floating_point() and o.requires_grad]
    want = torch.autograd.grad(outs, list(leaves.values()), [torch.ones_like(o) for o in outs], allow_unused=True)
    with fwAD.dual_level():
        outs = op(**{**kwargs, **leaves})
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.is_floating_point() and o.requires_grad]
        got = torch.autograd.grad(outs, list(leaves.values()), [torch.ones_like(o) for o in outs],
                                  allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w))
    assert any(g is not None for g in got)


def test_functorch_transforms_raise():
    """torch.func.jvp (also nested and under vmap), jacfwd, and nn.MoE: the
    layer's output tangent came back as zeros."""
    a, b, offs = _rand(6, 4), _rand(2, 4, 3), torch.tensor([3, 6], dtype=torch.int32)
    f = lambda x: torch_moe_ops.grouped_mm(x, b, offs)  # noqa: E731
    match = FORWARD_AD.format(arg="mat_a")
    with pytest.raises(NotImplementedError, match=match):
        torch.func.jvp(f, (a,), (torch.ones_like(a),))
    with pytest.raises(NotImplementedError, match=match):
        torch.func.jvp(lambda x: torch.func.jvp(f, (x,), (x,))[1], (a,), (a,))
    with pytest.raises(NotImplementedError, match=match):
        torch.func.vmap(lambda x: torch.func.jvp(f, (x,), (x,))[1])(a.expand(2, 6, 4))
    with pytest.raises(NotImplementedError, match=match):
        torch.func.jacfwd(f)(a)
    # The reference the message points to has the tangent: grouped_mm of the tangent.
    _, tangent = torch.func.jvp(lambda x: torch_grouped_mm(x, b, offs), (a,), (torch.ones_like(a),))
    assert torch.equal(tangent, torch_moe_ops.grouped_mm(torch.ones_like(a), b, offs))

    layer = MoE(MoEConfig(hidden=8, intermediate=4, num_experts=4, top_k=2), dtype=torch.float64)
    x = _rand(5, 8)
    with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
        torch.func.jvp(layer, (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("op, kwargs, args", list(_float8_cases()),
                         ids=_case_id)
def test_float8_ops_backward_raises(op, kwargs, args):
    """Gradients through the float8 ops came back None, with a warning; now
    the backward raises as upstream's _scaled_grouped_mm's does. Without
    inputs that require grad, nothing changes."""
    plain = op(**kwargs)
    for arg in args:
        value = kwargs[arg]
        leaf = [t.detach().requires_grad_() for t in value] if isinstance(value, list) else \
            value.detach().requires_grad_()
        outs = op(**{**kwargs, arg: leaf})
        outs = outs if isinstance(outs, tuple) else (outs,)
        for o, p in zip(outs, plain if isinstance(plain, tuple) else (plain,)):
            assert torch.equal(o.detach().view(torch.uint8), p.view(torch.uint8))
        loss = sum(o.float().sum() for o in outs if o.requires_grad)
        with pytest.raises(NotImplementedError, match=f"the derivative for moe_ops::{op._qualified_op_name[9:]} "
                                                      "is not implemented"):
            loss.backward()

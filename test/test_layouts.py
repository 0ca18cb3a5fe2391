"""Every op, every storage order of every tensor argument, against float64.

The OpInfo samples hold a few hand-picked strided inputs; users pass anything:
column-major tokens, transposed (E, out, in) weights, expanded (stride 0)
scalars, slices, views at odd storage offsets. Here each tensor argument of
each op is re-laid out every way a tensor can be (every permutation of its
storage order, every other element, a storage offset of 3 elements, and
expanded along each dimension, which changes the values to ones that can be
expanded), one argument at a time and then all at once, and the op's outputs
and gradients are compared with the plain-torch references in float64
(torch_moe_ops/reference.py), or bit for bit where the op is exact (routing,
fp8 quantisation). Index arguments are re-laid out too; expanding one of them
keeps it valid (all offsets equal, one token or row repeated, which is how
unpermute's repeated rows are reached).

Tolerances: a layout bug reads the wrong element and is off by O(1) of the
values, so every comparison of rounded results is per element against
rtol * |ref| + row_tol * (largest |ref| of the element's row): one rounding
to the output dtype for the single GEMMs and the combine (row_tol 2^-8 for
bfloat16, 2^-11 for float16, 2e-5 for float32 sums of at most a few hundred
products, 1e-12 for float64), a few roundings for the fused experts, whose
intermediates h and act(h) are stored in the input dtype (x8). Scaling by the
row, not the tensor, keeps rows of small values checked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

import torch_moe_ops  # noqa: F401
from torch_moe_ops import reference as ref

from common import assert_rows_close
from opinfo_experts import gathered

OPS = torch.ops.moe_ops
FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------- storage orders


def _stored_like(t: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """t's values, laid out in memory with its dimensions in the order perm."""
    inverse = [perm.index(i) for i in range(t.dim())]
    return t.permute(perm).contiguous().permute(inverse)


def _sliced(t: torch.Tensor) -> torch.Tensor:
    """t's values at every other element of a buffer twice its size in every dimension."""
    buf = torch.zeros([2 * s for s in t.shape], dtype=t.dtype) if t.dim() else t.clone()
    view = buf[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def _offset(t: torch.Tensor, offset: int = 3) -> torch.Tensor:
    """t's values, contiguous from an odd storage offset (misaligned for vector loads)."""
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def storage_orders(t: torch.Tensor, expand: bool = True):
    """(name, values, tensor): tensor holds values (== values elementwise) in
    another storage order. Expanded tensors change the values to ones that can
    be expanded: the first slice along the dimension, repeated."""
    yield "contiguous", t, t.contiguous()
    identity = tuple(range(t.dim()))
    for perm in itertools.permutations(identity):
        if perm != identity:
            yield "stored" + "".join(map(str, perm)), t, _stored_like(t, perm)
    yield "sliced", t, _sliced(t)
    yield "offset3", t, _offset(t)
    if expand:
        for d in range(t.dim()):
            if t.shape[d] > 1:
                v = t.narrow(d, 0, 1).expand(t.shape)
                yield f"expanded{d}", v.contiguous(), v


def _kinds_for_all(t: torch.Tensor) -> list[str]:
    """Order kinds every tensor of a problem can take at once."""
    return ["sliced", "offset3"] + (["stored" + "".join(map(str, reversed(range(t.dim()))))] if t.dim() > 1 else [])


# --------------------------------------------------------------- comparisons


def assert_same(out: torch.Tensor, expected: torch.Tensor, what: str):
    assert out.dtype == expected.dtype and out.shape == expected.shape, (
        f"{what}: {out.dtype} {tuple(out.shape)} != {expected.dtype} {tuple(expected.shape)}")
    if out.dtype.is_floating_point and out.element_size() == 1:
        out, expected = out.view(torch.uint8), expected.view(torch.uint8)
    assert torch.equal(out, expected), f"{what}: values differ"


# --------------------------------------------------------------- the problems


@dataclass
class Problem:
    """One call of an op: named tensor inputs, how to call the op and the
    reference on them, and which outputs / inputs to compare."""

    name: str
    inputs: dict[str, torch.Tensor]
    call: Callable[[dict], tuple]        # the op on the inputs -> tuple of outputs
    reference: Callable[[dict], tuple]   # float64 (or exact) reference -> tuple of outputs
    dtype: torch.dtype
    factor: float = 1.0                  # tolerance multiple (composite ops)
    exact: tuple[int, ...] = ()          # outputs compared bit for bit
    grads: tuple[str, ...] = ()          # inputs whose gradients are compared
    fixed: tuple[str, ...] = ()          # inputs that are not re-laid out (kept as given)
    no_expand: tuple[str, ...] = ()      # inputs that stay valid only with their own values
    skip_outputs: tuple[int, ...] = ()   # outputs not compared (e.g. internal buffers)
    # magnitudes of gradients whose rows are too short to scale them: (inputs, incoming gradients) -> {name: t}
    grad_magnitude: Optional[Callable[[dict, list], dict]] = None


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _offs(values):
    return torch.tensor(values, dtype=torch.int32)


def grouped_mm_problems(dtype):
    gen = torch.Generator().manual_seed(1)
    G, M, K, N = 4, 23, 80, 19  # K > 64 with a tail: both CPU engines and masked loads
    call = lambda v: (OPS.grouped_mm(v["mat_a"], v["mat_b"], v.get("offs"), v.get("bias")),)  # noqa: E731
    refn = lambda v: (ref.torch_grouped_mm(v["mat_a"], v["mat_b"], v.get("offs"), v.get("bias"),  # noqa: E731
                                           out_dtype=torch.float64),)
    # An empty group, and rows / columns past offs[-1] (zero in the output).
    yield Problem("grouped_mm_2d3d", dict(mat_a=_rand(gen, M, K, dtype=dtype), mat_b=_rand(gen, G, K, N, dtype=dtype),
                                          offs=_offs([5, 5, 17, 21]), bias=_rand(gen, G, N, dtype=dtype)),
                  call, refn, dtype, grads=("mat_a", "mat_b", "bias"))
    yield Problem("grouped_mm_3d3d", dict(mat_a=_rand(gen, G, 7, K, dtype=dtype), mat_b=_rand(gen, G, K, N, dtype=dtype),
                                          bias=_rand(gen, G, N, dtype=dtype)),
                  call, refn, dtype, grads=("mat_a", "mat_b", "bias"))
    yield Problem("grouped_mm_3d2d", dict(mat_a=_rand(gen, G, 9, K, dtype=dtype), mat_b=_rand(gen, K, M, dtype=dtype),
                                          offs=_offs([4, 4, 15, 20]), bias=_rand(gen, G, M, dtype=dtype)),
                  call, refn, dtype, grads=("mat_a", "mat_b", "bias"))
    yield Problem("grouped_mm_2d2d", dict(mat_a=_rand(gen, 9, K, dtype=dtype), mat_b=_rand(gen, K, N, dtype=dtype),
                                          offs=_offs([20, 20, 64, 80])),
                  call, refn, dtype, grads=("mat_a", "mat_b"))
    # Without bias, as an MoE layer calls it: in the AVX512 build a group with
    # fewer tokens than weight rows (4 and 5 of 9 here, not 11) runs turned
    # around, C^T = B^T A^T, where the tokens^T are K-contiguous.
    yield Problem("grouped_mm_3d2d_no_bias", dict(mat_a=_rand(gen, G, 9, K, dtype=dtype),
                                                  mat_b=_rand(gen, K, M, dtype=dtype), offs=_offs([4, 4, 15, 20])),
                  call, refn, dtype, grads=("mat_a", "mat_b"))


def grouped_mm_gather_problems(dtype):
    gen = torch.Generator().manual_seed(2)
    G, T, K, N = 4, 11, 72, 21
    a_index = torch.tensor([3, -1, 0, 7, 7, 10, 2, 5, 1, -1, 9, 4, 6, 8, 0, 3, 2, 10, 5, 6])

    def call(v):
        return (OPS.grouped_mm_gather(v["mat_a"], v["mat_b"], v["offs"], v.get("a_index"), v.get("b_index"),
                                      v.get("bias")),)

    def ref_2d3d(v):
        a = gathered(v["mat_a"], v["a_index"], 0)
        return (ref.torch_grouped_mm(a, v["mat_b"], v["offs"], v.get("bias"), out_dtype=torch.float64),)

    yield Problem("grouped_mm_gather_2d3d",
                  dict(mat_a=_rand(gen, T, K, dtype=dtype), mat_b=_rand(gen, G, K, N, dtype=dtype),
                       offs=_offs([4, 4, 13, 18]), a_index=a_index, bias=_rand(gen, G, N, dtype=dtype)),
                  call, ref_2d3d, dtype, grads=("mat_a", "mat_b", "bias"))

    def ref_2d2d(v):
        a = gathered(v["mat_a"], v["a_index"], 1)
        b = gathered(v["mat_b"], v["b_index"], 0)
        return (ref.torch_grouped_mm(a, b, v["offs"], out_dtype=torch.float64),)

    # Weight gradients: tokens^T gathered along K, gradient rows gathered along K.
    yield Problem("grouped_mm_gather_2d2d",
                  dict(mat_a=_rand(gen, 13, T, dtype=dtype), mat_b=_rand(gen, T, N, dtype=dtype),
                       offs=_offs([6, 6, 15, 20]), a_index=a_index, b_index=a_index.flip(0)),
                  call, ref_2d2d, dtype, grads=("mat_a", "mat_b"))


def routing_problems(dtype):
    gen = torch.Generator().manual_seed(3)
    T, E, k, H = 12, 16, 4, 24
    logits = _rand(gen, T, E, dtype=dtype)
    bias = _rand(gen, E) * 0.1

    def router(**kw):
        def call(v):
            return OPS.router_topk(v["logits"], k, bias=v.get("bias"), **kw)

        def reference(v):
            # ids and counts from the reference in the kernel's own precision
            # (float32 scores), weights from float64 logits.
            w, ids, counts = ref.torch_router_topk(v["logits"], k, bias=v.get("bias"), **kw)
            w64 = ref.torch_router_topk(v["logits"].double(), k, bias=v.get("bias"), **kw)[0]
            return w64, ids, counts
        return call, reference

    for name, kw, extra in [("softmax", dict(renormalize=True), {}),
                            ("sigmoid_grouped", dict(score_func="sigmoid", n_group=4, topk_group=2,
                                                     renormalize=True, scaling_factor=2.5), dict(bias=bias)),
                            ("softmax_after_topk", dict(score_func="softmax_after_topk"), {})]:
        call, reference = router(**kw)
        # float32 weights (float64 for float64 logits), the logits' gradient rounded to their dtype:
        # the logits dtype's tolerance, times 4 for the renormalisation's few operations.
        yield Problem(f"router_topk_{name}", dict(logits=logits.clone(), **extra), call, reference, dtype,
                      factor=4, exact=(1, 2), grads=("logits",))

    tokens = _rand(gen, T, H, dtype=dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    ids[2] = ids[5]  # two tokens with the same experts
    ids[0, 1] = 15   # outside the local range below

    def permute_call(v):
        return OPS.permute(v["tokens"], v["expert_ids"], E, alignment=4, first_expert=2, num_local_experts=12)

    def permute_ref(v):
        return ref.torch_permute(v["tokens"].double(), v["expert_ids"], E, 4, 2, 12)

    yield Problem("permute", dict(tokens=tokens, expert_ids=ids), permute_call, permute_ref, dtype,
                  exact=(1, 2, 3), grads=("tokens",))

    permuted, dst_rows, _, _ = ref.torch_permute(tokens, ids, E, 4, 2, 12)
    weights = torch.rand(T, k, generator=gen)

    def unpermute_call(v):
        return (OPS.unpermute(v["permuted"], v["dst_rows"], v.get("weights")),)

    def unpermute_ref(v):
        return (ref.torch_unpermute(v["permuted"].double(), v["dst_rows"], v["weights"].double()),)

    yield Problem("unpermute", dict(permuted=_rand(gen, *permuted.shape, dtype=dtype), dst_rows=dst_rows,
                                    weights=weights.to(dtype if dtype != torch.float16 else torch.float32)),
                  unpermute_call, unpermute_ref, dtype, factor=2, grads=("permuted", "weights"))


def _float64(v: dict) -> dict:
    return {n: t.double() if t.dtype.is_floating_point else t for n, t in v.items()}


def expert_mlp_problems(dtype):
    gen = torch.Generator().manual_seed(4)
    T, H, I, E, k = 10, 72, 24, 5, 2
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    ids[:3, 0] = 1  # a popular expert; expert 4 gets few tokens
    _, dst_rows, src_rows, offs = ref.torch_permute(torch.zeros(T, 1), ids, E, 4)  # alignment 4: padding rows
    # Routing weights are float32, or float64 with float64 tokens (their gradient has their dtype).
    inputs = dict(tokens=_rand(gen, T, H, dtype=dtype), src_rows=src_rows, offs=offs, dst_rows=dst_rows,
                  weights=torch.rand(T, k, generator=gen, dtype=torch.float64 if dtype == torch.float64 else None),
                  gate_up_proj=(_rand(gen, E, H, 2 * I) / H**0.5).to(dtype),
                  down_proj=(_rand(gen, E, I, H) / I**0.5).to(dtype),
                  gate_up_bias=_rand(gen, E, 2 * I, dtype=dtype), down_bias=_rand(gen, E, H, dtype=dtype))

    def call(v):
        out, _ = OPS.expert_mlp(v["tokens"], v["src_rows"], v["offs"], v["dst_rows"], v["weights"],
                                v["gate_up_proj"], v["down_proj"], v["gate_up_bias"], v["down_bias"])
        return (out,)

    def reference(v):
        return (ref.torch_expert_mlp(**_float64(v))[0],)

    def weights_grad_magnitude(v, gouts):
        """The routing weight's gradient is <grad_out[t], y[r]> = <grad_out[t] @ down^T, act(h[r])> (+ the
        bias term): its rounding errors scale with sum_i |grad_out[t] @ |down|^T|_i |act(h[r])_i|, which
        cancellation can make far larger than the result."""
        d = _float64(v)
        gate, up = ref.torch_expert_mlp(**d)[1].chunk(2, dim=1)
        go = gathered(gouts[0].abs(), torch.div(d["src_rows"], k, rounding_mode="floor"), 0)
        gd = ref.torch_grouped_mm(go, d["down_proj"].abs().transpose(-2, -1), d["offs"], out_dtype=torch.float64)
        gb = ref.torch_grouped_mm(go, d["down_bias"].abs().unsqueeze(-1), d["offs"], out_dtype=torch.float64)
        per_row = (gd * (torch.nn.functional.silu(gate) * up).abs()).sum(1) + gb.squeeze(1)
        dst = d["dst_rows"]
        return {"weights": torch.where(dst >= 0, per_row[dst.clamp(min=0)], 0.0)}

    # src_rows and dst_rows must stay inverse maps: not expanded.
    yield Problem("expert_mlp", inputs, call, reference, dtype, factor=8,
                  grads=("tokens", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"),
                  no_expand=("src_rows", "dst_rows"), grad_magnitude=weights_grad_magnitude)


def fp8_problems(dtype):
    gen = torch.Generator().manual_seed(5)
    M, K = 40, 160
    x = _rand(gen, M, K, dtype=dtype) * 3
    for recipe in ("tensorwise", "rowwise", "blockwise_1x128", "mx"):
        yield Problem(f"quantize_fp8_{recipe}", dict(x=x.clone()),
                      lambda v, r=recipe: OPS.quantize_fp8(v["x"], r),
                      lambda v, r=recipe: ref.torch_quantize_fp8(v["x"], r), dtype, exact=(0, 1))
    for recipe in ("rowwise", "mx"):
        data, scale = ref.torch_quantize_fp8(x.float(), recipe)
        yield Problem(f"dequantize_fp8_{recipe}", dict(data=data, scale=scale),
                      lambda v, r=recipe: (OPS.dequantize_fp8(v["data"], v["scale"], r, dtype),),
                      lambda v, r=recipe: (ref.torch_dequantize_fp8(v["data"], v["scale"], r, dtype),), dtype,
                      exact=(0,))


def fp8_once_problems():
    """fp8 problems whose operands have no floating dtype of their own to sweep."""
    gen = torch.Generator().manual_seed(6)
    offs = _offs([10, 10, 140, 290])
    _, grid = ref.torch_quantize_fp8(torch.randn(300, 200, generator=gen), "mx")
    yield Problem("swizzle_mx_scale", dict(scale=grid, offs=offs),
                  lambda v: (OPS.swizzle_mx_scale(v["scale"], v["offs"], 0),),
                  lambda v: (ref.torch_swizzle_mx_scale(v["scale"], v["offs"], 0),), torch.float32, exact=(0,))
    G, M, K, N = 3, 30, 96, 24
    offs = _offs([8, 8, 27])
    a, sa = ref.torch_quantize_fp8(torch.randn(M, K, generator=gen), "rowwise")
    w = torch.randn(G, N, K, generator=gen)  # (E, out, in)
    bt, sb = ref.torch_quantize_fp8(w, "rowwise")
    for out_dtype in (torch.bfloat16, torch.float32):
        call = lambda v, o=out_dtype: (OPS.scaled_grouped_mm(v["mat_a"], v["mat_b"], v["scale_a"], v["scale_b"],  # noqa: E731
                                                             v["offs"], out_dtype=o),)
        refn = lambda v, o=out_dtype: (ref.torch_scaled_grouped_mm(v["mat_a"], v["mat_b"], v["scale_a"],  # noqa: E731
                                                                   v["scale_b"], v["offs"],
                                                                   out_dtype=torch.float64),)
        yield Problem(f"scaled_grouped_mm_rowwise_{str(out_dtype)[6:]}",
                      dict(mat_a=a, mat_b=bt.transpose(-2, -1), scale_a=sa, scale_b=sb, offs=offs),
                      call, refn, out_dtype)
    # MX: the tokens' scales blocked per group (fixed: their bytes depend on offs), the weights' plain 3-D grid.
    a, sa = ref.torch_quantize_fp8(torch.randn(M, K, generator=gen), "mx")
    bt, sb = ref.torch_quantize_fp8(w, "mx")
    yield Problem("scaled_grouped_mm_mx",
                  dict(mat_a=a, mat_b=bt.transpose(-2, -1), scale_a=ref.torch_swizzle_mx_scale(sa, offs, 0),
                       scale_b=sb, offs=offs),
                  lambda v: (OPS.scaled_grouped_mm(v["mat_a"], v["mat_b"], v["scale_a"], v["scale_b"], v["offs"]),),
                  lambda v: (ref.torch_scaled_grouped_mm(v["mat_a"], v["mat_b"], v["scale_a"], v["scale_b"],
                                                         v["offs"], out_dtype=torch.float64),),
                  torch.bfloat16, fixed=("scale_a",))


def all_problems():
    for dtype in FLOATS:
        yield from grouped_mm_problems(dtype)
        yield from grouped_mm_gather_problems(dtype)
        yield from routing_problems(dtype)
        yield from expert_mlp_problems(dtype)
        if dtype != torch.float64:
            yield from fp8_problems(dtype)
    yield from fp8_once_problems()


PROBLEMS = list(all_problems())


def _id(p: Problem) -> str:
    return f"{p.name}-{str(p.dtype)[6:]}" if not p.name.startswith(("swizzle", "scaled")) else p.name


# -------------------------------------------------------------------- sweep


def variants(p: Problem):
    """(label, values, laid_out): one argument re-laid out at a time, then all at once."""
    names = [n for n in p.inputs if n not in p.fixed]
    for n in names:
        for order, values, t in storage_orders(p.inputs[n], expand=n not in p.no_expand):
            if order == "contiguous" and n != names[0]:
                continue
            yield f"{n}:{order}", {**p.inputs, n: values}, {**p.inputs, n: t}
    kinds = set.intersection(*[set(_kinds_for_all(p.inputs[n])) for n in names])
    for kind in sorted(kinds):
        laid = dict(p.inputs)
        for n in names:
            laid[n] = dict((o, t) for o, _, t in storage_orders(p.inputs[n], expand=False))[kind]
        yield f"all:{kind}", p.inputs, laid


def _as_leaves(inputs: dict, names, to64: bool) -> dict:
    out = dict(inputs)
    for n in names:
        t = inputs[n].detach()
        out[n] = (t.double() if to64 else t).requires_grad_(True)
    return out


def _grad_out(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A gradient for output t, column-major where it has two dimensions (a non-contiguous incoming gradient)."""
    g = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    return _stored_like(g, tuple(reversed(range(g.dim())))) if g.dim() == 2 else g


def check_variant(p: Problem, label: str, values: dict, laid: dict):
    what = f"{p.name} [{label}]"
    grads = [n for n in p.grads if laid[n].dtype.is_floating_point]
    ours_in = _as_leaves(laid, grads, to64=False)
    ref_in = _as_leaves(values, grads, to64=True)
    outs, refs = p.call(ours_in), p.reference(ref_in)
    float_outs = []
    for i, (o, r) in enumerate(zip(outs, refs)):
        if i in p.skip_outputs:
            continue
        if i in p.exact:
            assert_same(o, r, f"{what} output {i}")
        else:
            assert_rows_close(o, r, p.dtype, p.factor, f"{what} output {i}")
            float_outs.append(i)
    if not grads:
        return
    gen = torch.Generator().manual_seed(7)
    g64 = [_grad_out(outs[i], gen) for i in float_outs]
    torch.autograd.backward([outs[i] for i in float_outs], [g.to(outs[i].dtype) for i, g in zip(float_outs, g64)])
    # The reference sees the same (rounded) incoming gradient.
    torch.autograd.backward([refs[i] for i in float_outs], [g.to(outs[i].dtype).double() for i, g in zip(float_outs, g64)])
    magnitudes = p.grad_magnitude(values, g64) if p.grad_magnitude is not None else {}
    for n in grads:
        assert ours_in[n].grad is not None, f"{what}: no gradient for {n}"
        assert_rows_close(ours_in[n].grad, ref_in[n].grad, p.dtype, 2 * p.factor, f"{what} grad {n}",
                          magnitudes.get(n))


@pytest.mark.parametrize("problem", PROBLEMS, ids=_id)
def test_every_storage_order(problem: Problem):
    count = 0
    for label, values, laid in variants(problem):
        check_variant(problem, label, values, laid)
        count += 1
    assert count > 4


def test_storage_orders_cover_the_kinds_users_pass():
    """The sweep itself: a 3-D weight gets all six storage orders (transposed
    (E, out, in) views among them), slices, an odd offset and stride 0."""
    w = torch.randn(2, 3, 4)
    orders = {name: t for name, _, t in storage_orders(w)}
    assert len([n for n in orders if n.startswith("stored")]) == 5
    assert orders["stored021"].stride() == (12, 1, 3)  # (G, N, K) storage seen as (G, K, N)
    assert orders["sliced"].stride() == (96, 16, 2)
    assert orders["offset3"].storage_offset() == 3
    assert orders["expanded1"].stride()[1] == 0
    for name, values, t in storage_orders(w):
        assert torch.equal(values, t), name

"""Every moe_ops op on DTensors over real processes (gloo, 2 and 4 ranks; run
by test_gloo.py).

Each case distributes full inputs with the placements given, runs the op,
checks the output placements the strategy picked, and compares the outputs
(full_tensor(), or the local shards for float8 data, which gloo cannot
gather) and, for the differentiable ops, the gradients of the sharded inputs
with the single-process op on the full tensors. Placements a strategy must
refuse raise an error naming the argument, never redistribute silently.

float64 throughout but fp8: each rank runs the same kernel on its piece, but
the kernels block their loops by the sizes they get, and a K (or I) split sums
the ranks' partial products in another order: a reassociation, within
K * 2^-53 of the magnitude (K <= 16, values O(1): rtol = atol = 1e-13).
Integer outputs (expert ids, counts, rows) are exact. All cases run in one spawned
function per world size with the expert-parallel cases (process start-up
dominates: ~15 s per spawn).
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import torch_moe_ops  # noqa: F401
import torch_moe_ops.distributed  # noqa: F401  (registers the strategies)

G, K, N = 8, 8, 8
ops = torch.ops.moe_ops
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)


def _offsets(*sizes):
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _rand():
    gen = torch.Generator().manual_seed(0)
    return lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731


def _dt(mesh, t, p):
    """t as a DTensor placed p (one placement, or a tuple of one per mesh
    dimension without Partial), without communication (gloo moves no float8)."""
    if isinstance(p, Partial):  # rank 0 holds it all, the others zeros: an exact sum
        return DTensor.from_local(t if dist.get_rank() == 0 else torch.zeros_like(t), mesh, [p], run_check=False)
    placements = list(p) if isinstance(p, tuple) else [p] * mesh.ndim if isinstance(p, Replicate) else [p]
    return distribute_tensor(t, mesh, placements, src_data_rank=None)


def _dts(mesh, v, p):
    """An argument as DTensors placed p: a tensor, or each tensor of a tensor
    list (v2's scale lists); anything else as it is."""
    if isinstance(v, torch.Tensor):
        return _dt(mesh, v.detach(), p)
    if isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
        return [_dt(mesh, t.detach(), p) for t in v]
    return v


FAILURES = []


def _collect(check):
    """Runs every case, then reports all failures at once."""
    def run(mesh, name, *args, **kwargs):
        try:
            check(mesh, name, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            FAILURES.append(f"{name}: {type(e).__name__}: {e}")
    return run


@_collect
def _case(mesh, name, fn, full, placements, expected, rtol=1e-13, atol=None, grad=True, no_grad=()):
    """fn(**inputs) on DTensors vs on the full tensors: placements, values, and
    the gradients of the floating inputs (but those named in no_grad)."""
    dts = {k: _dts(mesh, v, placements.get(k, Replicate())) for k, v in full.items()}
    differentiable = {k: v for k, v in dts.items()
                      if grad and k not in no_grad and isinstance(v, DTensor) and v.dtype.is_floating_point
                      and v.dtype not in FP8}
    for v in differentiable.values():
        v.requires_grad_()
    ref_leaves = {k: full[k].detach().clone().requires_grad_() for k in differentiable}
    out = fn(**dts)
    ref = fn(**{**full, **ref_leaves})
    out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    assert len(out) == len(expected), name
    loss = ref_loss = 0
    for i, (o, r, e) in enumerate(zip(out, ref, expected)):
        assert isinstance(o, DTensor), f"{name}: output {i} is not a DTensor"
        if e is not None:
            e = e if isinstance(e, tuple) else (e,)
            assert o.placements == e, f"{name}: output {i} placed {o.placements}, expected {e}"
        if o.dtype in FP8:  # the local shard against the same shard of the reference
            want = _dt(mesh, r.detach(), o.placements[0]).to_local()
            assert torch.equal(o.to_local().view(torch.uint8), want.view(torch.uint8)), f"{name}: output {i}"
            continue
        got = o.full_tensor()
        torch.testing.assert_close(got, r, rtol=rtol, atol=atol if atol is not None else rtol,
                                   msg=lambda m: f"{name}, output {i}: {m}")
        if differentiable and o.requires_grad:
            g = torch.randn(r.shape, generator=torch.Generator().manual_seed(i + 1), dtype=r.dtype)
            loss = loss + (got * g).sum()
            ref_loss = ref_loss + (r * g).sum()
    if not differentiable or isinstance(loss, int):
        return
    loss.backward()
    ref_loss.backward()
    for k, leaf in differentiable.items():
        assert leaf.grad is not None, f"{name}: no gradient for {k}"
        torch.testing.assert_close(leaf.grad.full_tensor(), ref_leaves[k].grad, rtol=1e-13, atol=1e-13,
                                   msg=lambda m: f"{name}, grad of {k}: {m}")


@_collect
def _refused(mesh, name, fn, full, placements, match):
    dts = {k: _dts(mesh, v, placements.get(k, Replicate())) for k, v in full.items()}
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(**dts)


# ---------------------------------------------------------------- grouped_mm


def _grouped_mm_cases(mesh):
    r = _rand()
    offs = _offsets(*([2, 0, 3, 3] * (G // 4)))  # an empty group, uneven ones
    rows = int(offs[-1])
    mm = ops.grouped_mm
    P = Partial()
    cases = [
        ("3d3d experts", dict(mat_a=r(G, 3, K), mat_b=r(G, K, N), bias=r(G, N)),
         dict(mat_a=Shard(0), mat_b=Shard(0), bias=Shard(0)), Shard(0)),
        ("3d3d M", dict(mat_a=r(G, 4, K), mat_b=r(G, K, N), bias=r(G, N)), dict(mat_a=Shard(1)), Shard(1)),
        ("3d3d N", dict(mat_a=r(G, 3, K), mat_b=r(G, K, N), bias=r(G, N)), dict(mat_b=Shard(2), bias=Shard(1)),
         Shard(2)),
        ("3d3d K", dict(mat_a=r(G, 3, K), mat_b=r(G, K, N)), dict(mat_a=Shard(2), mat_b=Shard(1)), P),
        ("2d3d N", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs, bias=r(G, N)),
         dict(mat_b=Shard(2), bias=Shard(1)), Shard(1)),
        ("2d3d N, weights stored (G, N, K)",
         dict(mat_a=r(rows, K), mat_b=r(G, N, K).transpose(-2, -1), offs=offs), dict(mat_b=Shard(2)), Shard(1)),
        ("2d3d K", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs), dict(mat_a=Shard(1), mat_b=Shard(1)), P),
        ("3d2d M", dict(mat_a=r(G, 4, K), mat_b=r(K, rows), offs=offs, bias=r(G, rows)), dict(mat_a=Shard(1)),
         Shard(0)),
        ("3d2d K", dict(mat_a=r(G, 3, K), mat_b=r(K, rows), offs=offs), dict(mat_a=Shard(2), mat_b=Shard(0)), P),
        ("2d2d M", dict(mat_a=r(4, rows), mat_b=r(rows, N), offs=offs), dict(mat_a=Shard(0)), Shard(1)),
        ("2d2d N", dict(mat_a=r(3, rows), mat_b=r(rows, N), offs=offs, bias=r(G, N)),
         dict(mat_b=Shard(1), bias=Shard(1)), Shard(2)),
    ]
    # Upstream's Partial rules (grouped_mm is linear in each operand), the
    # bias Partial with them or with a K split so that it is added once.
    for layout, a, b, o in [("2d3d", r(rows, K), r(G, K, N), offs), ("3d2d", r(G, 3, K), r(K, rows), offs),
                            ("2d2d", r(3, rows), r(rows, N), offs), ("3d3d", r(G, 3, K), r(G, K, N), None)]:
        full = dict(mat_a=a, mat_b=b, offs=o)
        cases.append((f"{layout} mat_a Partial", full, dict(mat_a=P), P))
        cases.append((f"{layout} mat_b Partial, bias Partial", {**full, "bias": r(G, b.shape[-1])},
                      dict(mat_b=P, bias=P), P))
        # A Replicate bias is never turned Partial (DTensor would divide it by
        # the mesh size): the Partial operand is reduced instead.
        cases.append((f"{layout} mat_a Partial, bias Replicate", {**full, "bias": r(G, b.shape[-1])},
                      dict(mat_a=P), Replicate()))
    cases += [
        ("2d3d K, bias Partial", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs, bias=r(G, N)),
         dict(mat_a=Shard(1), mat_b=Shard(1), bias=P), P),
        ("3d3d K, bias Partial", dict(mat_a=r(G, 3, K), mat_b=r(G, K, N), bias=r(G, N)),
         dict(mat_a=Shard(2), mat_b=Shard(1), bias=P), P),
        ("3d2d K, bias Partial", dict(mat_a=r(G, 3, K), mat_b=r(K, rows), offs=offs, bias=r(G, rows)),
         dict(mat_a=Shard(2), mat_b=Shard(0), bias=P), P),
        # A Replicate operand is chunked where the sharding of the other asks
        # (no communication): mat_b follows mat_a's K split.
        ("2d3d K from mat_a alone", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs), dict(mat_a=Shard(1)), P),
    ]
    for name, full, placements, expected in cases:
        _case(mesh, "grouped_mm " + name, mm, full, placements, [expected])

    refused = [
        ("2d3d experts", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs), dict(mat_b=Shard(0)),
         r"mat_b placed Shard\(0\) \(its G \(experts\) dimension\).*expert parallelism"),
        ("2d3d rows", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs), dict(mat_a=Shard(0)),
         r"mat_a placed Shard\(0\).*group boundary"),
        ("3d2d experts", dict(mat_a=r(G, 3, K), mat_b=r(K, rows), offs=offs), dict(mat_a=Shard(0)),
         r"mat_a placed Shard\(0\).*columns of mat_b"),
        ("3d2d N along group boundaries", dict(mat_a=r(G, 3, K), mat_b=r(K, rows), offs=offs),
         dict(mat_b=Shard(1)), r"mat_b placed Shard\(1\).*group boundary"),
        ("2d2d K along group boundaries", dict(mat_a=r(3, rows), mat_b=r(rows, N), offs=offs),
         dict(mat_a=Shard(1), mat_b=Shard(0)), r"mat_a placed Shard\(1\).*group boundary"),
        ("2d3d K with bias", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs, bias=r(G, N)),
         dict(mat_a=Shard(1), mat_b=Shard(1)), r"mat_a placed Shard\(1\).*add the bias"),
        ("offs sharded", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs), dict(offs=Shard(0)),
         r"offs placed Shard\(0\).*every group boundary"),
        ("K and N together", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs),
         dict(mat_a=Shard(1), mat_b=Shard(2)), r"no sharding of this op keeps mat_a Shard\(1\), mat_b Shard\(2\)"),
    ]
    refused += [
        ("3d3d K with bias", dict(mat_a=r(G, 3, K), mat_b=r(G, K, N), bias=r(G, N)),
         dict(mat_a=Shard(2), mat_b=Shard(1)),
         r"mat_a placed Shard\(2\) \(its K dimension\) on mesh dimension 0 cannot be honoured with bias placed "
         r"Replicate\(\): .*place the bias Partial\(\)"),
        ("3d2d experts, bias", dict(mat_a=r(G, 3, K), mat_b=r(K, rows), offs=offs, bias=r(G, rows)),
         dict(bias=Shard(0)), r"bias placed Shard\(0\) \(its G \(experts\) dimension\)"),
    ]
    for name, full, placements, match in refused:
        _refused(mesh, "grouped_mm " + name, mm, full, placements, "grouped_mm: " + match)


# ---------------------------------------------------------- grouped_mm_gather


def _gather_cases(mesh):
    r = _rand()
    offs = _offsets(3, 0, 2, 3)
    index = torch.tensor([5, 0, 2, 2, -1, 1, 4, 3], dtype=torch.int64)  # repeats and a -1
    gather = ops.grouped_mm_gather
    full = dict(mat_a=r(6, K), mat_b=r(4, K, N), offs=offs, a_index=index, bias=r(4, N))
    _case(mesh, "gather 2d3d N", gather, full, dict(mat_b=Shard(2), bias=Shard(1)), [Shard(1)])
    full = dict(mat_a=r(6, K), mat_b=r(4, K, N), offs=offs, a_index=index)
    _case(mesh, "gather 2d3d K", gather, full, dict(mat_a=Shard(1), mat_b=Shard(1)), [Partial()])
    full = dict(mat_a=r(4, 6), mat_b=r(7, N), offs=offs, a_index=index, b_index=index.clamp(min=0) + 1)
    _case(mesh, "gather 2d2d M", gather, full, dict(mat_a=Shard(0)), [Shard(1)])
    _case(mesh, "gather 2d2d N", gather, {**full, "bias": r(4, N)}, dict(mat_b=Shard(1), bias=Shard(1)), [Shard(2)])
    # Linear in each operand, as grouped_mm: Partial in, Partial out.
    full = dict(mat_a=r(6, K), mat_b=r(4, K, N), offs=offs, a_index=index, bias=r(4, N))
    _case(mesh, "gather 2d3d mat_a Partial, bias Partial", gather, full, dict(mat_a=Partial(), bias=Partial()),
          [Partial()])
    _case(mesh, "gather 2d3d K, bias Partial", gather, full, dict(mat_a=Shard(1), mat_b=Shard(1), bias=Partial()),
          [Partial()])
    _refused(mesh, "gather 2d3d K, bias Replicate", gather, full, dict(mat_a=Shard(1), mat_b=Shard(1)),
             r"grouped_mm_gather: mat_a placed Shard\(1\).*with bias placed Replicate\(\).*add the bias")
    _refused(mesh, "gather tokens", gather, dict(mat_a=r(6, K), mat_b=r(4, K, N), offs=offs, a_index=index),
             dict(mat_a=Shard(0)), r"grouped_mm_gather: mat_a placed Shard\(0\) \(its T \(tokens")
    _refused(mesh, "gather index", gather, dict(mat_a=r(6, K), mat_b=r(4, K, N), offs=offs, a_index=index),
             dict(a_index=Shard(0)), r"grouped_mm_gather: a_index placed Shard\(0\)")


# ------------------------------------------------------------------- routing


def _routing_cases(mesh):
    r = _rand()
    T, E, H, k = 12, 8, 8, 2
    logits = r(T, E)
    topk = lambda **kw: ops.router_topk(kw.pop("logits"), **kw)  # noqa: E731
    for score, extra in [("softmax", {}), ("sigmoid", dict(renormalize=True, bias=r(E).float()))]:
        _case(mesh, f"router_topk tokens {score}", topk, dict(logits=logits, k=k, score_func=score, **extra),
              dict(logits=Shard(0)), [Shard(0), Shard(0), Partial()], no_grad=("bias",))
    _refused(mesh, "router_topk experts", topk, dict(logits=logits, k=k), dict(logits=Shard(1)),
             r"router_topk: logits placed Shard\(1\) \(its E \(experts\) dimension\).*all experts")

    weights, ids, _ = ops.router_topk(logits, k)
    ids[3] = ids[0]  # some expert gets more
    tokens = r(T, H)
    perm = lambda **kw: ops.permute(kw.pop("tokens"), **kw)  # noqa: E731
    for alignment in (1, 4):
        full = dict(tokens=tokens, expert_ids=ids, num_experts=E, alignment=alignment)
        _case(mesh, f"permute hidden, alignment {alignment}", perm, full, dict(tokens=Shard(1)),
              [Shard(1), Replicate(), Replicate(), Replicate()])
    _case(mesh, "permute local experts, partial tokens", perm,
          dict(tokens=tokens, expert_ids=ids, num_experts=E, first_expert=2, num_local_experts=3),
          dict(tokens=Partial()), [Partial(), Replicate(), Replicate(), Replicate()])
    _refused(mesh, "permute tokens", perm, dict(tokens=tokens, expert_ids=ids, num_experts=E),
             dict(tokens=Shard(0), expert_ids=Shard(0)), r"permute: tokens placed Shard\(0\).*expert parallelism")

    permuted, dst_rows, _, _ = ops.permute(tokens, ids, E, 1, 2, 3)  # some slots dropped (-1)
    full = dict(permuted=r(*permuted.shape), dst_rows=dst_rows, weights=weights)
    unperm = ops.unpermute
    _case(mesh, "unpermute hidden", unperm, full, dict(permuted=Shard(1)), [Shard(1)])
    _case(mesh, "unpermute tokens", unperm, full, dict(dst_rows=Shard(0), weights=Shard(0)), [Shard(0)])
    _case(mesh, "unpermute partial", unperm, full, dict(permuted=Partial()), [Partial()])
    _case(mesh, "unpermute hidden, no weights", unperm, {**full, "weights": None}, dict(permuted=Shard(1)),
          [Shard(1)])
    _refused(mesh, "unpermute rows", unperm, full, dict(permuted=Shard(0)),
             r"unpermute: permuted placed Shard\(0\).*whole permuted")


# ---------------------------------------------------------------- expert_mlp


def _expert_mlp_cases(mesh):
    r = _rand()
    T, E, H, I, k = 10, 4, 6, 4, 2  # I divisible by 2 and 4
    tokens = r(T, H)
    _, ids, _ = ops.router_topk(r(T, E), k)
    weights = r(T, k)
    _, dst_rows, src_rows, offs = ops.permute(tokens[:, :0], ids, E)
    route = dict(tokens=tokens, src_rows=src_rows, offs=offs, dst_rows=dst_rows, weights=weights)
    mlp = lambda **kw: ops.expert_mlp(**kw)[0]  # noqa: E731  (h is not differentiable)
    tp = dict(gate_up_proj=Shard(2), down_proj=Shard(1), gate_up_bias=Shard(1))
    _case(mesh, "expert_mlp I, silu", mlp,
          dict(**route, gate_up_proj=r(E, H, I), down_proj=r(E, I, H), gate_up_bias=r(E, I), activation="silu"),
          tp, [Partial()])
    # gate/up interleaved: stored (E, 2I, H) as transformers does, a transposed view.
    _case(mesh, "expert_mlp I, swiglu interleaved", mlp,
          dict(**route, gate_up_proj=r(E, 2 * I, H).transpose(-2, -1), down_proj=r(E, I, H),
               activation="swiglu", gate_up_interleaved=True), dict(gate_up_proj=Shard(2), down_proj=Shard(1)),
          [Partial()])
    _case(mesh, "expert_mlp I, gelu, down_bias Partial", mlp,
          dict(**route, gate_up_proj=r(E, H, I), down_proj=r(E, I, H), down_bias=r(E, H), activation="gelu"),
          dict(gate_up_proj=Shard(2), down_proj=Shard(1), down_bias=Partial()), [Partial()])
    _refused(mesh, "expert_mlp I, down_bias Replicate", mlp,
             dict(**route, gate_up_proj=r(E, H, I), down_proj=r(E, I, H), down_bias=r(E, H), activation="gelu"),
             dict(gate_up_proj=Shard(2), down_proj=Shard(1)),
             r"expert_mlp: gate_up_proj placed Shard\(2\).*with down_bias placed Replicate\(\).*Partial")
    _case(mesh, "expert_mlp replicated", mlp,
          dict(**route, gate_up_proj=r(E, H, 2 * I), down_proj=r(E, I, H), down_bias=r(E, H)), {}, [Replicate()])
    gated = dict(**route, gate_up_proj=r(E, H, 2 * I), down_proj=r(E, I, H))
    _refused(mesh, "expert_mlp I, swiglu halves", mlp, gated, dict(gate_up_proj=Shard(2), down_proj=Shard(1)),
             r"expert_mlp: gate_up_proj placed Shard\(2\).*gate_up_interleaved=True")
    # I = 5 splits into whole (gate, up) pairs neither 2 nor 4 ways: the
    # I-sharded rule exists, its full-mesh filter rejects every shard layout.
    _refused(mesh, "expert_mlp I, swiglu interleaved, uneven I", mlp,
             dict(**route, gate_up_proj=r(E, 10, H).transpose(-2, -1), down_proj=r(E, 5, H), activation="swiglu",
                  gate_up_interleaved=True), dict(gate_up_proj=Shard(2), down_proj=Shard(1)),
             r"expert_mlp: the placements gate_up_proj Shard\(2\), down_proj Shard\(1\) cannot be honoured: "
             r"With gate_up_interleaved, each rank's slice of I must be whole \(gate, up\) column pairs")
    _refused(mesh, "expert_mlp experts", mlp, gated, dict(gate_up_proj=Shard(0), down_proj=Shard(0)),
             r"expert_mlp: gate_up_proj placed Shard\(0\) \(its E \(experts\).*expert parallelism")
    _refused(mesh, "expert_mlp tokens", mlp, gated, dict(dst_rows=Shard(0), weights=Shard(0)),
             r"expert_mlp: dst_rows placed Shard\(0\)")


# ---------------------------------------------------------------- fp8


def _fp8_cases(mesh):
    r = _rand()
    world = dist.get_world_size()
    x = r(4 * world, 64).float()
    quant = lambda **kw: ops.quantize_fp8(kw.pop("x"), **kw)  # noqa: E731
    for recipe in ("rowwise", "blockwise_1x128", "mx"):
        _case(mesh, f"quantize_fp8 rows {recipe}", quant, dict(x=x, recipe=recipe), dict(x=Shard(0)),
              [Shard(0), Shard(0)], grad=False)
        data, scale = ops.quantize_fp8(x, recipe)
        _case(mesh, f"dequantize_fp8 rows {recipe}", ops.dequantize_fp8, dict(data=data, scale=scale, recipe=recipe),
              dict(data=Shard(0), scale=Shard(0)), [Shard(0)], grad=False)
    x3 = r(world, 6, 64).float()
    for recipe in ("tensorwise", "rowwise"):
        _case(mesh, f"quantize_fp8 batch {recipe}", quant, dict(x=x3, recipe=recipe), dict(x=Shard(0)),
              [Shard(0), Shard(0)], grad=False)
    _case(mesh, "quantize_fp8 3-D rows", quant, dict(x=x3, recipe="rowwise"), dict(x=Shard(1)), [Shard(1), Shard(1)],
          grad=False)
    offs = _offsets(16, 0, 48)
    _case(mesh, "quantize_fp8 rowwise grouped", quant, dict(x=x, recipe="rowwise", offs=offs), dict(x=Shard(0)),
          [Shard(0), Shard(1)], grad=False)
    _refused(mesh, "quantize_fp8 tensorwise rows", quant, dict(x=x, recipe="tensorwise"), dict(x=Shard(0)),
             r"quantize_fp8: x placed Shard\(0\).*amax")
    _refused(mesh, "quantize_fp8 rowwise columns", quant, dict(x=x, recipe="rowwise"), dict(x=Shard(1)),
             r"quantize_fp8: x placed Shard\(1\).*last dimension")

    data, scale = ops.quantize_fp8(x, "mx")
    swz = ops.swizzle_mx_scale
    _case(mesh, "swizzle_mx_scale replicated", swz, dict(scale=scale, offs=_offsets(8, 0, 4 * world - 8), dim=0),
          {}, [Replicate()], grad=False)
    _refused(mesh, "swizzle_mx_scale rows", swz, dict(scale=scale, offs=_offsets(4 * world), dim=0),
             dict(scale=Shard(0)), r"swizzle_mx_scale: scale placed Shard\(0\)")


def _scaled_grouped_mm_cases(mesh):
    r = _rand()
    offs = _offsets(3, 0, 5, 4)
    rows, Kq, Nq = int(offs[-1]), 64, 16
    a_d, a_s = ops.quantize_fp8(r(rows, Kq).float(), "rowwise")
    bt_d, b_s = ops.quantize_fp8(r(4, Nq, Kq).float(), "rowwise")  # (G, N, K) blocks along K
    b_d = bt_d.transpose(-2, -1)
    sgm = ops.scaled_grouped_mm
    base = dict(mat_a=a_d, mat_b=b_d, scale_a=a_s, scale_b=b_s, offs=offs, out_dtype=torch.float32)
    # float32 accumulation, blocked by the sizes each rank gets (and for K
    # splits, each rank's K/W slice then the sum): within K * 2^-24 of
    # sum |a||b| (K = 64, |a|, |b| < 4 after scaling: < 1e-4).
    tol = dict(rtol=1e-5, atol=1e-4, grad=False)
    _case(mesh, "scaled_grouped_mm 2d3d N", sgm, base, dict(mat_b=Shard(2), scale_b=Shard(1)), [Shard(1)],
          **tol)
    _case(mesh, "scaled_grouped_mm 2d3d K", sgm, base, dict(mat_a=Shard(1), mat_b=Shard(1)), [Partial()],
          **tol)
    _refused(mesh, "scaled_grouped_mm 2d3d experts", sgm, base, dict(mat_b=Shard(0), scale_b=Shard(0)),
             r"scaled_grouped_mm: mat_b placed Shard\(0\).*expert parallelism")
    a3_d, a3_s = ops.quantize_fp8(r(4, 8, Kq).float(), "rowwise")
    base3 = dict(mat_a=a3_d, mat_b=b_d, scale_a=a3_s, scale_b=b_s, out_dtype=torch.float32)
    _case(mesh, "scaled_grouped_mm 3d3d experts", sgm, base3,
          dict(mat_a=Shard(0), mat_b=Shard(0), scale_a=Shard(0), scale_b=Shard(0)), [Shard(0)], **tol)
    _case(mesh, "scaled_grouped_mm 3d3d M", sgm, base3, dict(mat_a=Shard(1), scale_a=Shard(1)), [Shard(1)], **tol)
    mx_a, mx_as = ops.quantize_fp8(r(4, 8, Kq).float(), "mx")
    mx_bt, mx_bs = ops.quantize_fp8(r(4, Nq, Kq).float(), "mx")
    basemx = dict(mat_a=mx_a, mat_b=mx_bt.transpose(-2, -1), scale_a=mx_as, scale_b=mx_bs, out_dtype=torch.float32)
    _case(mesh, "scaled_grouped_mm mx 3d3d experts", sgm, basemx,
          dict(mat_a=Shard(0), mat_b=Shard(0), scale_a=Shard(0), scale_b=Shard(0)), [Shard(0)], **tol)
    _case(mesh, "scaled_grouped_mm mx 3d3d N", sgm, basemx, dict(mat_b=Shard(2), scale_b=Shard(1)), [Shard(2)],
          **tol)
    _case(mesh, "scaled_grouped_mm 2d3d K, bias Partial", sgm, {**base, "bias": r(4, Nq).float()},
          dict(mat_a=Shard(1), mat_b=Shard(1), bias=Partial()), [Partial()], **tol)
    # A replicated scale is chunked to follow its operand (no communication).
    _case(mesh, "scaled_grouped_mm mx 3d3d N, scale_b chunked", sgm, basemx, dict(mat_b=Shard(2)), [Shard(2)],
          **tol)
    _refused(mesh, "scaled_grouped_mm mx K", sgm, basemx, dict(mat_a=Shard(2), mat_b=Shard(1)),
             r"scaled_grouped_mm: mat_a placed Shard\(2\).*blocks along K")

    # _scaled_grouped_mm_v2: the recipe stated, the scales in one-tensor
    # lists; v1's rules, the lists' elements following their operand.
    def v2(recipe, swizzle=()):
        def call(mat_a, mat_b, scale_a, scale_b, **kw):
            return ops.scaled_grouped_mm_v2(mat_a, mat_b, scale_a, [recipe], list(swizzle), scale_b, [recipe],
                                            list(swizzle), **kw)
        return call

    rw, mx = v2(1), v2(3, [0])  # RowWise; BlockWise1x32 with 3-D operands' plain (G, rows, K/32) scales
    lists = lambda d: {**d, "scale_a": [d["scale_a"]], "scale_b": [d["scale_b"]]}  # noqa: E731
    _case(mesh, "scaled_grouped_mm_v2 2d3d N", rw, lists(base), dict(mat_b=Shard(2), scale_b=Shard(1)), [Shard(1)],
          **tol)
    _case(mesh, "scaled_grouped_mm_v2 2d3d K, bias Partial", rw, {**lists(base), "bias": r(4, Nq).float()},
          dict(mat_a=Shard(1), mat_b=Shard(1), bias=Partial()), [Partial()], **tol)
    _case(mesh, "scaled_grouped_mm_v2 3d3d experts", rw, lists(base3),
          dict(mat_a=Shard(0), mat_b=Shard(0), scale_a=Shard(0), scale_b=Shard(0)), [Shard(0)], **tol)
    _case(mesh, "scaled_grouped_mm_v2 mx 3d3d N, scale_b chunked", mx, lists(basemx), dict(mat_b=Shard(2)),
          [Shard(2)], **tol)
    _refused(mesh, "scaled_grouped_mm_v2 2d3d experts", rw, lists(base), dict(mat_b=Shard(0), scale_b=Shard(0)),
             r"scaled_grouped_mm_v2: mat_b placed Shard\(0\).*expert parallelism")
    _refused(mesh, "scaled_grouped_mm_v2 2d3d scale_a rows", rw, lists(base), dict(scale_a=Shard(0)),
             r"scaled_grouped_mm_v2: scale_a\[0\] placed Shard\(0\) on mesh dimension 0 cannot be honoured: offs splits")
    _refused(mesh, "scaled_grouped_mm_v2 mx K", mx, lists(basemx), dict(mat_a=Shard(2), mat_b=Shard(1)),
             r"scaled_grouped_mm_v2: mat_a placed Shard\(2\).*blocks along K")
    # The v2 checks run before any rule: a refused recipe pair is the op's own error.
    _refused(mesh, "scaled_grouped_mm_v2 recipe mismatch", lambda **kw: ops.scaled_grouped_mm_v2(
        kw["mat_a"], kw["mat_b"], kw["scale_a"], [1], [], kw["scale_b"], [3], [], offs=kw["offs"]),
        lists(base), {}, r"scaled_grouped_mm_v2: recipe_a=\[1\].*recipe_b=\[3\]")


def _mesh_2d_cases(mesh):
    """A 2 x 2 mesh: the single-dim rules expanded over both mesh dimensions
    (experts on one, M, N or K on the other), Partial on one dimension only."""
    r = _rand()
    R = Replicate()
    mm = ops.grouped_mm
    _case(mesh, "grouped_mm 2-D mesh 3d3d experts x M", mm,
          dict(mat_a=r(4, 4, K), mat_b=r(4, K, N), bias=r(4, N)),
          dict(mat_a=(Shard(0), Shard(1)), mat_b=(Shard(0), R), bias=(Shard(0), R)), [(Shard(0), Shard(1))])
    _case(mesh, "grouped_mm 2-D mesh 3d3d experts x K", mm, dict(mat_a=r(4, 3, K), mat_b=r(4, K, N)),
          dict(mat_a=(Shard(0), Shard(2)), mat_b=(Shard(0), Shard(1))), [(Shard(0), Partial())])
    offs = _offsets(2, 0, 3, 3)
    _case(mesh, "grouped_mm 2-D mesh 2d3d N x K", mm, dict(mat_a=r(8, K), mat_b=r(4, K, N), offs=offs),
          dict(mat_a=(R, Shard(1)), mat_b=(Shard(2), Shard(1))), [(Shard(1), Partial())])
    _refused(mesh, "grouped_mm 2-D mesh 2d3d experts", mm, dict(mat_a=r(8, K), mat_b=r(4, K, N), offs=offs),
             dict(mat_b=(R, Shard(0))),
             r"grouped_mm: mat_b placed Shard\(0\) \(its G \(experts\) dimension\) on mesh dimension 1")
    T, E, H, I = 8, 4, 6, 4
    tokens = r(T, H)
    _, ids, _ = ops.router_topk(r(T, E), 2)
    _, dst_rows, src_rows, eoffs = ops.permute(tokens[:, :0], ids, E)
    mlp = lambda **kw: ops.expert_mlp(**kw)[0]  # noqa: E731
    full = dict(tokens=tokens, src_rows=src_rows, offs=eoffs, dst_rows=dst_rows, weights=r(T, 2),
                gate_up_proj=r(E, 2 * I, H).transpose(-2, -1), down_proj=r(E, I, H), activation="swiglu",
                gate_up_interleaved=True)
    # I split over both mesh dimensions: 4 slices of whole (gate, up) pairs.
    _case(mesh, "expert_mlp 2-D mesh I x I", mlp, full,
          dict(gate_up_proj=(Shard(2), Shard(2)), down_proj=(Shard(1), Shard(1))), [(Partial(), Partial())])


def check_all_strategies():
    if dist.get_world_size() == 4:
        _mesh_2d_cases(init_device_mesh("cpu", (2, 2)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    _grouped_mm_cases(mesh)
    _gather_cases(mesh)
    _routing_cases(mesh)
    _expert_mlp_cases(mesh)
    _fp8_cases(mesh)
    _scaled_grouped_mm_cases(mesh)
    assert not FAILURES, f"rank {dist.get_rank()}:\n" + "\n".join(FAILURES)


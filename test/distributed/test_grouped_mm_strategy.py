"""DTensor sharding strategy of moe_ops.grouped_mm, on CPU.

A fake process group (world size 4, rank 0) drives DTensor's real sharding
propagation: the tests check which placements it picks, and that rank 0's
local result is the matching piece of the unsharded op. For a Partial output
the sum over every rank's local result is checked against the unsharded op by
running each rank's local computation directly.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

import torch_moe_ops  # noqa: F401
import torch_moe_ops.distributed  # noqa: F401  (registers the strategy)

WORLD = 4
op = torch.ops.moe_ops.grouped_mm.default


@pytest.fixture(scope="module")
def mesh():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    try:
        yield init_device_mesh("cpu", (WORLD,))
    finally:
        dist.destroy_process_group()


def offsets(*sizes):
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def shard0(t, placement):
    """Rank 0's local piece of t under placement."""
    if isinstance(placement, Shard):
        return t.chunk(WORLD, placement.dim)[0]
    return t


def run(mesh, a, b, a_p, b_p, offs=None, bias=None, bias_p=Replicate()):
    d = lambda t, p: DTensor.from_local(shard0(t, p), mesh, [p], run_check=False)  # noqa: E731
    args = [d(a, a_p), d(b, b_p)]
    kwargs = {}
    if offs is not None:
        kwargs["offs"] = d(offs, Replicate())
    if bias is not None:
        kwargs["bias"] = d(bias, bias_p)
    return op(*args, **kwargs)


def test_3d3d_shards_experts(mesh):
    a, b, bias = torch.randn(8, 3, 5), torch.randn(8, 5, 6), torch.randn(8, 6)
    out = run(mesh, a, b, Shard(0), Shard(0), bias=bias, bias_p=Shard(0))
    assert out.placements == (Shard(0),)
    torch.testing.assert_close(out.to_local(), shard0(op(a, b, None, bias), Shard(0)))


@pytest.mark.parametrize("layout", ["2d3d", "2d2d", "3d3d"])
def test_shard_n(mesh, layout):
    offs = offsets(2, 0, 3, 3)
    a, b = {
        "2d3d": (torch.randn(8, 5), torch.randn(4, 5, 8)),
        "2d2d": (torch.randn(3, 8), torch.randn(8, 8)),
        "3d3d": (torch.randn(4, 3, 5), torch.randn(4, 5, 8)),
    }[layout]
    offs = None if layout == "3d3d" else offs
    bias = torch.randn(4, 8)
    out = run(mesh, a, b, Replicate(), Shard(b.dim() - 1), offs=offs, bias=bias, bias_p=Shard(1))
    full = op(a, b, offs, bias)
    assert out.placements == (Shard(full.dim() - 1),)
    torch.testing.assert_close(out.to_local(), shard0(full, Shard(full.dim() - 1)))


@pytest.mark.parametrize("layout", ["2d3d", "3d2d", "3d3d"])
def test_shard_k_is_partial(mesh, layout):
    offs = offsets(2, 0, 3, 3)
    a, b = {
        "2d3d": (torch.randn(8, 8), torch.randn(4, 8, 6)),
        "3d2d": (torch.randn(4, 3, 8), torch.randn(8, 8)),
        "3d3d": (torch.randn(4, 3, 8), torch.randn(4, 8, 6)),
    }[layout]
    offs = None if layout == "3d3d" else offs
    out = run(mesh, a, b, Shard(a.dim() - 1), Shard(b.dim() - 2), offs=offs)
    assert out.placements == (Partial(),)
    # Every rank's local product, summed, is the unsharded result.
    pieces = zip(a.chunk(WORLD, a.dim() - 1), b.chunk(WORLD, b.dim() - 2))
    total = sum(op(pa, pb, offs) for pa, pb in pieces)
    torch.testing.assert_close(total, op(a, b, offs))


def test_no_sharding_along_group_boundaries(mesh):
    # 3D x 2D: offs splits N; 2D x 2D: offs splits K. Refused with the reason,
    # instead of an all-gather DTensor would plan silently.
    offs = offsets(2, 2, 2, 2)
    with pytest.raises(RuntimeError, match=r"mat_b placed Shard\(1\) \(its N \(columns, grouped by offs\)"):
        run(mesh, torch.randn(4, 3, 8), torch.randn(8, 8), Replicate(), Shard(1), offs=offs)
    with pytest.raises(RuntimeError, match=r"mat_a placed Shard\(1\) \(its K \(grouped by offs\)"):
        run(mesh, torch.randn(3, 8), torch.randn(8, 4), Shard(1), Shard(0), offs=offs)


def test_experts_of_2d_layouts_are_refused(mesh):
    offs = offsets(2, 2, 2, 2)
    with pytest.raises(RuntimeError, match=r"mat_b placed Shard\(0\) \(its G \(experts\) dimension\).*offs"):
        run(mesh, torch.randn(8, 8), torch.randn(4, 8, 6), Replicate(), Shard(0), offs=offs)


def test_k_sharding_with_bias_is_refused(mesh):
    offs = offsets(2, 2, 2, 2)
    with pytest.raises(RuntimeError, match="every rank would add the bias"):
        run(mesh, torch.randn(8, 8), torch.randn(4, 8, 6), Shard(1), Shard(1), offs=offs, bias=torch.randn(4, 6))


@pytest.mark.parametrize("layout", ["3d2d", "2d2d", "3d3d"])
def test_shard_m(mesh, layout):
    offs = offsets(2, 0, 3, 3)
    a, b = {
        "3d2d": (torch.randn(4, 8, 5), torch.randn(5, 8)),
        "2d2d": (torch.randn(8, 8), torch.randn(8, 6)),
        "3d3d": (torch.randn(4, 8, 5), torch.randn(4, 5, 6)),
    }[layout]
    offs = None if layout == "3d3d" else offs
    m_dim = a.dim() - 2
    out = run(mesh, a, b, Shard(m_dim), Replicate(), offs=offs)
    full = op(a, b, offs)
    out_m = full.dim() - 2
    assert out.placements == (Shard(out_m),)
    torch.testing.assert_close(out.to_local(), shard0(full, Shard(out_m)))


def test_invalid_inputs_raise_the_kernel_message(mesh):
    # DTensor wraps the ValueError of the checks into its propagation error.
    with pytest.raises(RuntimeError, match="contraction sizes differ"):
        run(mesh, torch.randn(8, 5), torch.randn(4, 6, 8), Replicate(), Replicate(), offs=offsets(2, 2, 2, 2))


@pytest.mark.parametrize("layout", ["2d3d", "3d2d", "2d2d", "3d3d"])
def test_partial_operand_gives_partial_output(mesh, layout):
    # Upstream's Partial rules: linear in each operand. Each rank's local
    # product of its piece of the Partial operand, summed, is the product.
    offs = offsets(2, 0, 3, 3)
    a, b = {
        "2d3d": (torch.randn(8, 5), torch.randn(4, 5, 6)),
        "3d2d": (torch.randn(4, 3, 5), torch.randn(5, 8)),
        "2d2d": (torch.randn(3, 8), torch.randn(8, 6)),
        "3d3d": (torch.randn(4, 3, 5), torch.randn(4, 5, 6)),
    }[layout]
    offs = None if layout == "3d3d" else offs
    bias = torch.randn(4, b.shape[-1])
    pieces = list(torch.randn(WORLD, *a.shape).unbind(0))
    pieces[-1] = a - sum(pieces[:-1])
    d = lambda t, p: DTensor.from_local(t, mesh, [p], run_check=False)  # noqa: E731
    kwargs = {"bias": d(bias / WORLD, Partial())}
    if offs is not None:
        kwargs["offs"] = d(offs, Replicate())
    out = op(d(pieces[0], Partial()), d(b, Replicate()), **kwargs)
    assert out.placements == (Partial(),)
    total = sum(op(piece, b, offs, bias / WORLD) for piece in pieces)
    # float32, K = 5: the four pieces sum to a within a few ulps, and so do the products.
    torch.testing.assert_close(total, op(a, b, offs, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.to_local(), op(pieces[0], b, offs, bias / WORLD))


def test_replicate_bias_is_not_made_partial(mesh):
    # A Partial operand with a Replicate bias: DTensor could make the bias
    # Partial by dividing it by the mesh size; the guard has it reduce the
    # operand instead (an all-reduce; the fake process group's keeps rank 0's
    # piece), so the output is Replicate.
    offs = offsets(2, 2, 2, 2)
    d = lambda t, p: DTensor.from_local(t, mesh, [p], run_check=False)  # noqa: E731
    out = op(d(torch.randn(8, 5), Partial()), d(torch.randn(4, 5, 6), Replicate()), offs=d(offs, Replicate()),
             bias=d(torch.randn(4, 6), Replicate()))
    assert out.placements == (Replicate(),)


def test_strided_shard_of_experts_is_kept(mesh):
    # The rules use _ShardingPlaceholder: a _StridedShard of the experts is
    # kept as such (each rank's local batch of experts is multiplied as is).
    from torch.distributed.tensor.placement_types import _StridedShard
    p = _StridedShard(0, split_factor=2)
    a, b = torch.randn(8, 3, 5), torch.randn(8, 5, 6)
    d = lambda t: DTensor.from_local(t, mesh, [p], run_check=False)  # noqa: E731
    local_a, local_b = a[:2], b[:2]  # any local batch: the rule does not look at which experts
    out = op(d(local_a), d(local_b))
    assert out.placements == (p,)
    torch.testing.assert_close(out.to_local(), op(local_a, local_b))


def test_stride_filter_checks_the_local_shards(mesh):
    # The filter runs the op's checks on every rank's local operands: a
    # candidate whose shards disagree (mat_b's N split, the bias's not) is
    # rejected, the rule's own candidate passes.
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy

    from torch_moe_ops.distributed.grouped_mm_strategy import _valid_grouped_mm_strides

    def spec(t, p):
        return DTensorSpec(mesh, (p,), tensor_meta=TensorMeta(t.shape, t.stride(), t.dtype))

    a, b, offs, bias = torch.randn(8, 5), torch.randn(4, 5, 8), offsets(2, 2, 2, 2), torch.randn(4, 8)
    schema = OpSchema(op, tuple(OpStrategy([OpSpec(spec(t, Replicate()))]) for t in (a, b, offs, bias)), {})
    good = [spec(a, Replicate()), spec(b, Shard(2)), spec(offs, Replicate()), spec(bias, Shard(1))]
    bad = [spec(a, Replicate()), spec(b, Shard(2)), spec(offs, Replicate()), spec(bias, Replicate())]
    assert _valid_grouped_mm_strides(mesh, schema, good, None)
    assert not _valid_grouped_mm_strides(mesh, schema, bad, None)
    # Unequal K shards of mat_a and mat_b (a K of 5 in 4 pieces is 2, 2, 1, 0
    # for mat_a's dim 1 but mat_b is split along N): rejected.
    assert not _valid_grouped_mm_strides(
        mesh, schema, [spec(a, Shard(1)), spec(b, Shard(2)), spec(offs, Replicate()), spec(bias, Shard(1))], None)


@pytest.mark.parametrize("layout", ["2d3d", "3d2d", "2d2d", "3d3d"])
def test_rules_without_bias_are_upstreams(layout):
    # Every rule of v2.14.1's grouped_mm_single_dim_strategy (aten._grouped_mm),
    # in its order, and no other, when there is no bias; with a bias, the same
    # rules with the bias's placement appended.
    from torch.distributed.tensor._dtensor_spec import TensorMeta
    from torch.distributed.tensor._ops._matrix_ops import grouped_mm_single_dim_strategy as upstream

    from torch_moe_ops.distributed.grouped_mm_strategy import grouped_mm_single_dim_strategy as ours

    def meta(t):
        return TensorMeta(t.shape, t.stride(), t.dtype)

    a, b = {
        "2d3d": (torch.randn(8, 16), torch.randn(4, 16, 8)),
        "3d2d": (torch.randn(4, 8, 16), torch.randn(16, 8)),
        "2d2d": (torch.randn(8, 8), torch.randn(8, 16)),
        "3d3d": (torch.randn(4, 8, 16), torch.randn(4, 16, 8)),
    }[layout]
    args = [meta(a), meta(b)] + ([] if layout == "3d3d" else [meta(offsets(2, 2, 2, 2))])
    rules = ours(op, tuple(args), {})
    assert repr(rules) == repr(upstream(torch.ops.aten._grouped_mm.default, tuple(args), {}))
    bias = torch.randn(4, 8 if layout != "2d2d" else 16)
    with_bias = ours(op, tuple(args + [None] * (3 - len(args)) + [meta(bias)]), {})
    assert repr([r[:-1] for r in with_bias]) == repr(rules)
    assert {repr(r[-1]) for r in with_bias} <= {"Partial(sum)", "Replicate()", "_ShardingPlaceholder(dim=0)",
                                                 "_ShardingPlaceholder(dim=1)"}

"""grouped_mm on DTensors over real processes (gloo, 2 and 4 ranks): every
placement the strategy offers is run end to end, and the values of the sharded
output and of the sharded inputs' gradients, gathered with full_tensor(), are
compared with the single-process op on the full tensors.

float64 throughout: each rank runs the same kernel on its piece, so sharding
along G or N gives the same bits; a K split (Partial) sums the ranks' partial
products in another order, within K * 2^-53 of the magnitude (1e-13 relative).
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import torch_moe_ops  # noqa: F401
import torch_moe_ops.distributed  # noqa: F401  (registers the strategy)

from multiprocess import run_on_ranks

G, K, N = 8, 8, 8


def _offsets(*sizes):
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _cases():
    """(name, full inputs, placements, expected output placement or None for 'not this one')."""
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    offs = _offsets(*([2, 0, 3, 3] * (G // 4)))  # an empty group, uneven ones
    rows = int(offs[-1])
    yield ("3d3d experts", dict(mat_a=r(G, 3, K), mat_b=r(G, K, N), bias=r(G, N)),
           dict(mat_a=Shard(0), mat_b=Shard(0), bias=Shard(0)), Shard(0))
    yield ("2d3d N", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs, bias=r(G, N)),
           dict(mat_b=Shard(2), bias=Shard(1)), Shard(1))
    yield ("2d3d N, weights stored (G, N, K)", dict(mat_a=r(rows, K), mat_b=r(G, N, K).transpose(-2, -1), offs=offs),
           dict(mat_b=Shard(2)), Shard(1))
    yield ("2d2d N", dict(mat_a=r(3, rows), mat_b=r(rows, N), offs=offs, bias=r(G, N)),
           dict(mat_b=Shard(1), bias=Shard(1)), Shard(2))
    yield ("3d3d N", dict(mat_a=r(G, 3, K), mat_b=r(G, K, N), bias=r(G, N)),
           dict(mat_b=Shard(2), bias=Shard(1)), Shard(2))
    yield ("2d3d K", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs),
           dict(mat_a=Shard(1), mat_b=Shard(1)), Partial())
    yield ("3d2d K", dict(mat_a=r(G, 3, K), mat_b=r(K, rows), offs=offs),
           dict(mat_a=Shard(2), mat_b=Shard(0)), Partial())
    yield ("3d3d K", dict(mat_a=r(G, 3, K), mat_b=r(G, K, N)),
           dict(mat_a=Shard(2), mat_b=Shard(1)), Partial())
    # Placements the strategy must not honour as given (a group boundary
    # along the sharded dimension, or a bias that K sharding would add twice):
    # DTensor redistributes, and the values must still be right.
    yield ("3d2d N along group boundaries", dict(mat_a=r(G, 3, K), mat_b=r(K, rows), offs=offs),
           dict(mat_b=Shard(1)), None)
    yield ("2d2d K along group boundaries", dict(mat_a=r(3, rows), mat_b=r(rows, N), offs=offs),
           dict(mat_a=Shard(1), mat_b=Shard(0)), None)
    yield ("2d3d K with bias", dict(mat_a=r(rows, K), mat_b=r(G, K, N), offs=offs, bias=r(G, N)),
           dict(mat_a=Shard(1), mat_b=Shard(1)), None)


def _check_all_cases():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    op = torch.ops.moe_ops.grouped_mm
    for name, full, placements, expected in _cases():
        dts = {k: distribute_tensor(v.detach(), mesh, [placements.get(k, Replicate())]) for k, v in full.items()}
        leaves = {k: v for k, v in dts.items() if k != "offs"}
        for v in leaves.values():
            v.requires_grad_()
        out = op(**dts)
        assert isinstance(out, DTensor), name
        if expected is not None:
            assert out.placements == (expected,), f"{name}: {out.placements}"
        else:
            assert out.placements[0] not in (Shard(1), Partial()), f"{name}: {out.placements}"
        ref_leaves = {k: v.detach().clone().requires_grad_() for k, v in full.items() if k != "offs"}
        ref = op(**{**full, **ref_leaves})
        rtol = 1e-13 if expected == Partial() else 0
        torch.testing.assert_close(out.full_tensor(), ref, rtol=rtol, atol=1e-300 if rtol else 0,
                                   msg=lambda m: f"{name}: {m}")
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out.full_tensor() * grad).sum().backward()
        (ref * grad).sum().backward()
        for k, leaf in leaves.items():
            assert leaf.grad is not None, f"{name}: no gradient for {k}"
            # Gradients of K-sharded operands are N-sums of local products.
            torch.testing.assert_close(leaf.grad.full_tensor(), ref_leaves[k].grad, rtol=1e-13, atol=1e-300,
                                       msg=lambda m: f"{name}, grad of {k}: {m}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_placement_forward_and_backward(world_size):
    run_on_ranks(_check_all_cases, world_size)

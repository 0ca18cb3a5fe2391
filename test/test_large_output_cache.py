"""The large-output cache (csrc/moe/LargeOutputCache.h, torch_moe_ops.memory):
the CPU blocks that grouped_mm's and grouped_mm_gather's outputs and
expert_mlp's workspaces reuse. A reused block holds the bytes of the tensor
that freed it, so every test here first fills the held blocks with a NaN
pattern, then checks the op's output bit for bit against the same op with the
cache off (no block reused), and that a block was in fact reused (the hit
counter, the data pointer).

The tests cache every block (min_block_bytes=1) so that small shapes reach the
cache; the default (32 MiB) only changes which requests do.
"""

import functools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_moe_ops
from torch_moe_ops import fused_experts, memory

from common import cache_limit
from test_experts import make_problem

NAN_BYTE = 0xFF  # 0xFFFF... is a NaN in bfloat16, float16, float32 and float64


def every_block_cached(test):
    """The test with every block cached, from an empty cache, emptied after."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        memory.empty_cpu_cache()
        try:
            with cache_limit(256 << 20, min_block_bytes=1):
                return test(*args, **kwargs)
        finally:
            memory.empty_cpu_cache()
    return wrapper


def cache_off(fn):
    """fn() with nothing reused: every output in memory no tensor wrote before."""
    with cache_limit(0):
        return fn()


def assert_reused_block_gives_fresh_bits(run):
    """run()'s output written into the block of the output before it, that
    block first filled with NaN, equals bit for bit its output with the cache
    off; and the block was reused (one hit, the same data pointer)."""
    fresh = cache_off(run)
    held = run()
    ptr = held.data_ptr()
    del held  # its block is held now
    torch_moe_ops._C._cpu_cache_fill(NAN_BYTE)
    hits = memory.cpu_cache_stats()["hits"]
    out = run()
    if out.numel() > 0:
        assert memory.cpu_cache_stats()["hits"] == hits + 1
        assert out.data_ptr() == ptr
    assert torch.equal(out, fresh)


def offsets(sizes):
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6),
       extra=st.integers(0, 5), layout=st.sampled_from(["2d2d", "2d3d"]), dtype=st.sampled_from(
           [torch.float32, torch.bfloat16]), transposed=st.booleans(), seed=st.integers(0, 2**16))
@every_block_cached
def test_reused_block_gives_the_bits_of_a_fresh_one(m, n, sizes, extra, layout, dtype, transposed,
                                                    seed):
    """Empty groups (2D x 2D: a zero block per expert) and rows past offs[-1]
    (2D x 3D: zeros) must be written, not left to the block's old bytes."""
    gen = torch.Generator().manual_seed(seed)
    offs = offsets(sizes)
    total = int(offs[-1])
    if layout == "2d2d":  # a weight gradient: columns of A and rows of B gathered by index
        k = total + extra
        a = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(n, k, generator=gen).to(dtype).t() if transposed else torch.randn(k, n, generator=gen).to(dtype)
        index = torch.randperm(k, generator=gen)[:total]
        index[::3] = -1  # padding rows read zeros
        args = (a, b, offs, index, index)
    else:  # routed tokens through the up-projection; rows past offs[-1] belong to no group
        rows = total + extra
        a = torch.randn(rows + 3, m, generator=gen).to(dtype)
        b = torch.randn(len(sizes), n, m, generator=gen).to(dtype).transpose(-2, -1) if transposed \
            else torch.randn(len(sizes), m, n, generator=gen).to(dtype)
        index = torch.randint(-1, rows + 3, (rows,), generator=gen)
        args = (a, b, offs, index, None)

    assert_reused_block_gives_fresh_bits(lambda: torch.ops.moe_ops.grouped_mm_gather(*args))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 24), k=st.integers(1, 24), n=st.integers(1, 24),
       sizes=st.lists(st.integers(0, 9), min_size=1, max_size=5), extra=st.integers(0, 4),
       layout=st.sampled_from(["2d3d", "3d2d", "2d2d", "3d3d"]), bias=st.booleans(), transposed=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), out_float32=st.booleans(), seed=st.integers(0, 2**16))
@every_block_cached
def test_grouped_mm_reused_block_gives_the_bits_of_a_fresh_one(m, k, n, sizes, extra, layout, bias, transposed,
                                                               dtype, out_float32, seed):
    """moe_ops::grouped_mm's CPU entry (csrc/moe/GroupedMMCached.h) in every
    layout: rows (2D x 3D) and columns (3D x 2D) past offs[-1] zeroed, empty
    groups (2D x 2D: a zero block, or the bias) written, never the old bytes."""
    gen = torch.Generator().manual_seed(seed)
    groups, offs = len(sizes), offsets(sizes)
    split = int(offs[-1]) + extra  # the dimension offs splits; past offs[-1] no group covers it

    def rnd(*shape):
        """A tensor of shape, stored transposed in its last two dimensions when asked."""
        if transposed:
            return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).to(dtype).transpose(-2, -1)
        return torch.randn(*shape, generator=gen).to(dtype)

    a, b = {"2d3d": lambda: (rnd(split, k), rnd(groups, k, n)),
            "3d2d": lambda: (rnd(groups, m, k), rnd(k, split)),
            "2d2d": lambda: (rnd(m, split), rnd(split, n)),
            "3d3d": lambda: (rnd(groups, m, k), rnd(groups, k, n))}[layout]()
    out_n = split if layout == "3d2d" else n
    kwargs = dict(offs=None if layout == "3d3d" else offs,
                  bias=torch.randn(groups, out_n, generator=gen).to(dtype) if bias else None,
                  out_dtype=torch.float32 if out_float32 and dtype != torch.float32 else None)

    assert_reused_block_gives_fresh_bits(lambda: torch.ops.moe_ops.grouped_mm(a, b, **kwargs))


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 6), k_major=st.booleans(), skew=st.booleans(),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
@every_block_cached
def test_expert_mlp_step_after_step_same_bits(tokens, experts, k_major, skew, bias, dtype, seed):
    """Two training steps of fused_experts: the second reuses the first one's
    freed gradients and workspaces (filled with NaN in between), and gives the
    bits of a step with the cache off. skew leaves experts without rows."""
    top_k = min(2, experts)
    x, ids, w, gate_up, down, gub, dnb, views = make_problem(tokens, 24, 8, experts, top_k, "swiglu", bias, k_major,
                                                             skew, dtype, seed)
    leaves = [t.requires_grad_() for t in (x, w, gate_up, down, gub, dnb) if t is not None]
    grad = torch.randn(tokens, 24, generator=torch.Generator().manual_seed(seed)).to(dtype)

    def step():
        out = fused_experts(x, ids, w, *views(gate_up, down), gub, dnb)
        return [out, *torch.autograd.grad(out, leaves, grad)]

    fresh = cache_off(step)
    step()  # its outputs are dropped at once: their blocks are held
    torch_moe_ops._C._cpu_cache_fill(NAN_BYTE)
    hits = memory.cpu_cache_stats()["hits"]
    second = step()
    if tokens > 0:
        assert memory.cpu_cache_stats()["hits"] > hits
    for got, want in zip(second, fresh):
        assert torch.equal(got, want)


def grad_shaped(shape):
    """A 2D x 2D grouped_mm_gather output of exactly shape (G, M, N), float32."""
    g, m, n = shape
    a = torch.ones(m, 1)
    b = torch.ones(1, n)
    offs = torch.ones(g, dtype=torch.int32).cumsum(0, dtype=torch.int32).clamp_(max=1)
    return torch.ops.moe_ops.grouped_mm_gather(a, b, offs, torch.zeros(1, dtype=torch.long), None)


@every_block_cached
def test_limit_evicts_the_oldest_block():
    kib = 1 << 10
    memory.set_cpu_cache_limit(10 * kib)
    a, b, c = grad_shaped((1, 16, 64)), grad_shaped((1, 16, 32)), grad_shaped((1, 16, 48))  # 4, 2, 3 KiB
    del a, b, c  # released in this order: 9 KiB held
    assert memory.cpu_cache_stats()["cached_bytes"] == 9 * kib
    d = grad_shaped((1, 16, 80))  # 5 KiB, a miss; released, it pushes out a (4 KiB), the oldest
    misses = memory.cpu_cache_stats()["misses"]
    del d
    stats = memory.cpu_cache_stats()
    assert (stats["cached_bytes"], stats["cached_blocks"]) == (10 * kib, 3)
    hits = stats["hits"]
    keep = [grad_shaped((1, 16, 32)), grad_shaped((1, 16, 48)), grad_shaped((1, 16, 80))]
    assert memory.cpu_cache_stats()["hits"] == hits + 3
    keep.append(grad_shaped((1, 16, 64)))  # evicted: allocated anew
    assert memory.cpu_cache_stats()["misses"] == misses + 1
    del keep
    memory.set_cpu_cache_limit(3 * kib)  # a lowered limit frees the oldest beyond it
    assert memory.cpu_cache_stats()["cached_bytes"] <= 3 * kib
    big = grad_shaped((1, 16, 256))  # 16 KiB, above the limit: never held
    del big
    assert memory.cpu_cache_stats()["cached_bytes"] <= 3 * kib


@every_block_cached
def test_off_and_small_blocks_are_not_held():
    memory.set_cpu_cache_limit(1 << 20, min_block_bytes=8 << 10)
    small = grad_shaped((1, 16, 64))  # 4 KiB < 8 KiB
    before = memory.cpu_cache_stats()
    del small
    after = memory.cpu_cache_stats()
    assert (after["cached_bytes"], after["misses"], after["hits"]) == (before["cached_bytes"], before["misses"],
                                                                       before["hits"])
    memory.set_cpu_cache_limit(0)
    for _ in range(3):
        grad_shaped((1, 64, 64))
    assert memory.cpu_cache_stats()["cached_bytes"] == 0


@every_block_cached
def test_resize_of_a_cached_storage_keeps_its_values():
    out = grad_shaped((2, 8, 8))  # group 0: ones; group 1: empty, zeros
    want = out.clone()
    out.resize_(4, 8, 8)  # the storage grows through the cache's allocator
    assert torch.equal(out[:2], want)


@every_block_cached
def test_blocks_released_from_other_threads():
    """Tensors freed by several threads at once: the held bytes stay a sum of
    block sizes and every output stays right."""
    import threading

    errors = []

    def work(n):
        try:
            for i in range(30):
                out = grad_shaped((3, 8 + n, 16 + i % 4))
                assert torch.equal(out[0], torch.ones(8 + n, 16 + i % 4)) and not out[1:].any()
        except AssertionError as e:  # pragma: no cover (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert memory.cpu_cache_stats()["cached_bytes"] <= 256 << 20


def test_configure_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"limit_bytes must be >= 0, got -1"):
        memory.set_cpu_cache_limit(-1)
    with pytest.raises(ValueError, match=r"min_block_bytes must be >= 1, got 0"):
        memory.set_cpu_cache_limit(1 << 20, min_block_bytes=0)
    with pytest.raises(ValueError, match=r"byte must be in \[0, 255\], got 256"):
        torch_moe_ops._C._cpu_cache_fill(256)


@pytest.mark.parametrize("value, expect", [("0", "limit_bytes=0"), ("5", f"limit_bytes={5 << 20}"),
                                           ("12x", "ValueError: TORCH_MOE_OPS_CPU_CACHE_MB must be a whole number "
                                                   "of MiB in [0, 2**40], got '12x'"),
                                           ("-3", "got '-3'")])
def test_environment_variable(value, expect):
    code = ("import torch_moe_ops\n"
            "try:\n"
            "    print('limit_bytes=%d' % torch_moe_ops.cpu_cache_stats()['limit_bytes'])\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    env = {**os.environ, "TORCH_MOE_OPS_CPU_CACHE_MB": value}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout


@every_block_cached
def test_profiler_and_stats_count_the_blocks():
    """torch.profiler(profile_memory=True) sees a cached block's allocation
    under the op that made it and its release, as it sees c10's own."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        out = grad_shaped((2, 16, 64))  # 8 KiB
        assert memory.cpu_cache_stats()["in_use_bytes"] == 8 << 10
        del out
    stats = memory.cpu_cache_stats()
    assert (stats["in_use_bytes"], stats["cached_bytes"]) == (0, 8 << 10)
    usage = [(e.name, e.cpu_memory_usage) for e in prof.events()]
    assert ("moe_ops::grouped_mm_gather", 8 << 10) in usage
    assert ("[memory]", -(8 << 10)) in usage

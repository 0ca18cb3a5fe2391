"""Helpers shared by the test files: explicit thread counts, a record of
which moe_ops kernels a piece of code dispatched to, and the large-output
cache's settings for a block."""

import contextlib
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Thread counts the bitwise-determinism tests compare. Explicit, never the
# process default: with a default of one thread "1 vs default" compares a run
# with itself and cannot fail. 3 splits work unevenly over 2 cores, which is
# where a reduction whose order followed the split would differ.
THREAD_COUNTS = (1, 2, 3)


@contextlib.contextmanager
def num_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        assert torch.get_num_threads() == n, f"asked for {n} threads, got {torch.get_num_threads()}"
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def cache_limit(limit_bytes: int, min_block_bytes: Optional[int] = None):
    """The large-output cache's settings (torch_moe_ops.memory) for the block;
    the ones before restored after, whatever the block changed them to."""
    from torch_moe_ops import memory

    before = memory.cpu_cache_stats()
    memory.set_cpu_cache_limit(limit_bytes, min_block_bytes)
    try:
        yield
    finally:
        memory.set_cpu_cache_limit(before["limit_bytes"], before["min_block_bytes"])


def at_thread_counts(run, counts=THREAD_COUNTS):
    """run() once at each thread count: {count: result}."""
    results = {}
    for n in counts:
        with num_threads(n):
            results[n] = run()
    return results


def assert_same_bits_at_thread_counts(run, counts=THREAD_COUNTS, equal=torch.equal):
    """run() returns a tensor or a sequence of tensors; every thread count
    must give the same bits as the first (and a second run the same again)."""
    as_list = lambda r: list(r) if isinstance(r, (list, tuple)) else [r]  # noqa: E731
    results = {n: as_list(r) for n, r in at_thread_counts(run, counts).items()}
    with num_threads(counts[-1]):
        results["again"] = as_list(run())
    first = results[counts[0]]
    for n, outs in results.items():
        assert len(outs) == len(first), n
        for i, (a, b) in enumerate(zip(outs, first)):
            assert equal(a, b), f"output {i} at {n} threads differs from {counts[0]} thread(s)"


class MoeOpsCalls(TorchDispatchMode):
    """Records the moe_ops overloads dispatched under it (forward and backward),
    so a test can tell our kernels ran from a silent fallback to plain torch."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "moe_ops":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


# Per-element relative tolerance of a value computed in dtype against its
# float64 reference: a few roundings of the output dtype, or of float32
# accumulation (2e-5 ~ 170 ulps: sums of up to a few hundred terms).
ROW_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_rows_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, factor: float, what: str,
                      magnitude: Optional[torch.Tensor] = None):
    """|out - expected| <= factor * row_tol(dtype) * (|expected| + max |expected| of the row), per element,
    or with the given magnitude of each element (the sum of the absolute terms it is made of) in place of
    the row's largest value."""
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    if out.numel() == 0:
        return
    e = expected.double()
    o = out.double()
    tol = factor * ROW_TOL[dtype]
    if magnitude is None:
        magnitude = e.abs().amax(dim=-1, keepdim=True) if e.dim() else e.abs()
    bound = tol * (e.abs() + magnitude) + (1e-300 if dtype == torch.float64 else 0)
    err = (o - e).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {out.numel()} elements off, first at {i}: "
                             f"got {o[tuple(i)].item()}, expected {e[tuple(i)].item()} (bound {bound[tuple(i)].item():.3g})")


def family_op_db(family: str) -> list:
    """A family's OpInfos: test/opinfo_<family>.py's, and those of its ops that have a module of
    their own (test/opinfo_<op>.py, e.g. scaled_grouped_mm_v2)."""
    import importlib
    import pathlib

    from torch_moe_ops import native_functions

    here = pathlib.Path(__file__).parent
    db = list(importlib.import_module(f"opinfo_{family}").op_db)
    for op in native_functions.public_ops(family):
        if op.name != family and (here / f"opinfo_{op.name}.py").exists():
            db += importlib.import_module(f"opinfo_{op.name}").op_db
    return db

"""Side-by-side timing shared by the benchmarks."""

from __future__ import annotations

import statistics

import torch
from torch.utils.benchmark import Timer


def interleaved_medians(stmts: dict[str, str], env: dict, min_run_time: float, rounds: int) -> dict[str, float]:
    """Seconds per call of each statement, with all of torch's threads.

    The statements take turns, round after round, and each keeps its median
    round: on this shared VM the machine's speed drifts over seconds, and
    interleaving makes every ratio see the same drift."""
    times: dict[str, list[float]] = {name: [] for name in stmts}
    for _ in range(rounds):
        for name, stmt in stmts.items():
            timer = Timer(stmt, globals=env, num_threads=torch.get_num_threads())
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return {name: statistics.median(ts) for name, ts in times.items()}

"""What the benchmarks share: side-by-side timing and the report."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
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


def print_machine() -> None:
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def report(results: list, checks: list[tuple[str, bool]], json_path: str, strict: bool) -> int:
    """Prints each target as met or MISSED, writes the results and targets as
    JSON, and returns the exit code (1 under strict when a target is missed)."""
    print()
    for text, ok in checks:
        print(f"[{'met' if ok else 'MISSED'}] {text}")
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "results": [dataclasses.asdict(r) for r in results],
                   "targets": [{"target": t, "met": ok} for t, ok in checks]}, f, indent=2)
    print(f"\nwrote {os.path.relpath(json_path)}")
    return 0 if (not strict or all(ok for _, ok in checks)) else 1

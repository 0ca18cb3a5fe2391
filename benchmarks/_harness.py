"""What the benchmarks share: side-by-side timing, targets, metadata and the JSON.

Every benchmark writes one JSON document:

    {"benchmark": "grouped_mm",
     "meta": {"date", "machine", "cores", "threads", "torch", "python", "commit", "command", "quick"},
     "<section>": [row, ...], ...}

Each row that has targets carries them, as the issue states them, under
"targets": [{"issue", "name", "op", "bound", "value", "met"}, ...]; rows with
no target that applies have an empty list. benchmarks/tables.py renders the
tables (printed by the benchmark, and the README's) from these documents
only, so what a run prints, what its JSON holds and what the README shows are
the same text.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from typing import Optional

import torch
from torch.utils.benchmark import Timer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
# Where the JSON goes when --out is not given (tests, CI: a scratch directory).
OUT_ENV = "MOE_BENCH_OUT"


def interleaved_medians(stmts: dict[str, str], env: dict, min_run_time: float, rounds: int,
                        min_runs: int = 1) -> dict[str, float]:
    """Seconds per call of each statement, with all of torch's threads.

    The statements take turns, round after round, and each keeps its median
    round: on this shared VM the machine's speed drifts over seconds, and
    interleaving makes every ratio see the same drift. A round's value is the
    median of at least min_runs timed blocks: a statement of a few hundred ms
    fits 2-3 blocks in min_run_time, whose median is then the mean of two, and
    one step that met a slow moment of the VM's page faults (5-20x their usual
    system time) moved the round by half of it."""
    times: dict[str, list[float]] = {name: [] for name in stmts}
    for _ in range(rounds):
        for name, stmt in stmts.items():
            timer = Timer(stmt, globals=env, num_threads=torch.get_num_threads())
            m = timer.blocked_autorange(min_run_time=min_run_time)
            blocks = list(m.times)
            while len(blocks) < min_runs:
                blocks.append(timer.timeit(m.number_per_run).median)
            times[name].append(statistics.median(blocks))
    return {name: statistics.median(ts) for name, ts in times.items()}


def thp_alloc() -> str:
    """c10's CPU allocator advises MADV_HUGEPAGE on allocations of 2 MB and more
    when THP_MEM_ALLOC_ENABLE=1 (read once, at its first allocation: set it
    before starting Python). The kernels leave page size to the allocator, and
    large fresh outputs (permute, weight gradients) spend much of their time in
    first-touch faults without it, so every result records this setting."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE", "0")


def cpu_cache_mb() -> Optional[int]:
    """The large-output cache's limit in MiB (torch_moe_ops.memory; 0: off):
    expert_mlp's weight gradients reuse its blocks instead of fresh pages, so
    every result records it. None without the extension."""
    try:
        import torch_moe_ops
        return torch_moe_ops.cpu_cache_stats()["limit_bytes"] >> 20
    except (ImportError, AttributeError):
        return None


def print_machine() -> None:
    print(f"torch {torch.__version__}, {machine()}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, THP_MEM_ALLOC_ENABLE={thp_alloc()}, "
          f"large-output cache {cpu_cache_mb()} MiB")


# ------------------------------------------------------------------ targets


def target(issue: int, key: str, what: str, where: str, value: Optional[float], op: str,
           bound: float, ceiling: Optional[float] = None) -> Optional[dict]:
    """One target of one row, as its issue states it: value op bound, as
    measured (nothing rounded). key is its short label in the printed tables,
    what the ratio compared ("ours/dense"), where the rows it applies to. None
    when the value was not measured (the target is then not listed). ceiling:
    the most the value can reach on this machine, where the benchmark can
    bound it (the target is then marked out of reach when below it)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    assert op in (">=", "<=")
    met = value >= bound if op == ">=" else value <= bound
    t = dict(issue=issue, key=key, what=what, where=where, op=op, bound=bound, value=float(value), met=bool(met))
    if ceiling is not None:
        t["reachable"] = bool(ceiling >= bound)
    return t


def targets(*ts: Optional[dict]) -> list[dict]:
    return [t for t in ts if t is not None]


# ------------------------------------------------------------------ metadata


def machine() -> str:
    """lscpu's model name (the VM's host CPU), else what platform knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return " ".join(line.split(":", 1)[1].split())
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The checkout's short commit, '-dirty' when tracked files differ from it
    (other than the results and the README's tables, which a run rewrites)."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results",
                    ":!benchmarks/README.md").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command(script: str, argv: list[str]) -> str:
    """The command line as run from the repository root, less --out (where
    the JSON went does not change the numbers, and may be a scratch path)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            args.append(a)
    rel = os.path.relpath(os.path.abspath(script), ROOT)
    return " ".join(["PYTHONPATH=. python", rel, *map(shlex.quote, args)])


def metadata(script: str, argv: Optional[list[str]], quick: bool) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(), cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), commit=commit(), command=command(script, argv), quick=quick,
        cpu_capability=torch.backends.cpu.get_cpu_capability(), thp_mem_alloc_enable=thp_alloc(),
        cpu_cache_mb=cpu_cache_mb())


# ------------------------------------------------------------------ the run


def add_common_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed, listing each")
    parser.add_argument("--out", default=os.environ.get(OUT_ENV),
                        help=f"directory for the JSON (default: ${OUT_ENV}, else benchmarks/results); the file is "
                             "<benchmark>.json, <benchmark>-quick.json with --quick")


def json_path(name: str, args: argparse.Namespace) -> str:
    return os.path.join(args.out or RESULTS, f"{name}-quick.json" if args.quick else f"{name}.json")


def finish(doc: dict, path: str, missed_targets: Optional[list[str]], strict: bool) -> int:
    """Writes doc as JSON, prints the missed targets (None: the benchmark has
    no targets), and returns the exit code: 1 under strict when a target is
    missed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print()
    if missed_targets is None:
        print("no targets")
    elif missed_targets:
        print(f"{len(missed_targets)} target(s) MISSED:")
        for line in missed_targets:
            print(f"  MISSED {line}")
    else:
        print("every target that applies is met")
    print(f"\nwrote {path}")
    return 1 if strict and missed_targets else 0

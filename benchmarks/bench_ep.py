"""Expert parallelism benchmark: where a step's time goes, and the bytes on the wire.

Real processes over gloo (spawned, one per rank, as torchrun would start
them), EP = 1, 2 and 4 on this machine; each rank routes its own tokens and
runs dispatch_combine (torch_moe_ops.distributed.expert_parallel) around its
local experts (the fused experts, bfloat16).

1. Time per training step of the dispatch-experts-combine block (forward and
   backward), split into
     dispatch   forward: routing, the token counts' exchange and the wait for
                the rows (the time before each chunk's experts that the
                experts do not cover); backward: the wait for the rows'
                gradients at the end
     experts    the local experts' GEMMs (forward) and their gradients
     combine    forward: the wait for the outputs and the weighted sum;
                backward: the wait for the outputs' gradients before each
                chunk's expert gradients
   read off the pipeline's event trace (the same schedule with chunks = 1,
   no overlap, and chunks = 2, overlap), for the splits and capacity modes and
   the fp8 (rowwise) dispatch. "hidden" is the step time that overlap saved
   against the same mode and EP without it. Each rank keeps its round of
   median step time (rounds interleave the variants), whose phases add up
   to its step; the table shows the slowest rank's (a step waits for it).
2. Bytes sent per rank, measured on the all-to-alls' own arguments
   (distributed/traffic.py's AllToAllBytes, forward: dispatch and combine),
   against the analytic volume tokens x top-k x hidden x bytes x (EP-1)/EP
   each way, under a balanced routing (token t's slot j to expert
   (t * k + j) mod E: every expert gets the same rows from every rank).
   They must agree exactly, on every rank: the rows' targets (--check fails
   otherwise), and fp8 dispatch must send <= 0.53x the bytes of bfloat16.
3. The analytic volume for larger EP degrees at real model shapes
   (torch_moe_ops.shapes, 4096 tokens per rank): MB per rank each way.

Each process runs one thread (EP = 4 puts four processes on this machine's
two cores: the EP = 4 rows time contention as much as the pipeline).

    python benchmarks/bench_ep.py [--quick] [--check] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tables
from _harness import add_common_args, finish, json_path, metadata, print_machine, target, targets

HERE = os.path.dirname(os.path.abspath(__file__))

# (mode, fp8_dispatch, chunks): the timed variants of each EP size.
# Two chunks: on this CPU each chunk's expert GEMMs (and their weight
# gradients, full-size per chunk) cost a fixed overhead that more chunks multiply.
VARIANTS = [("splits", None, 1), ("splits", None, 2), ("splits", "rowwise", 1), ("splits", "rowwise", 2),
            ("capacity", None, 1), ("capacity", None, 2)]
SCALE_BYTES = {"rowwise": lambda h: 4, "mx": lambda h: -(-h // 32)}


def shape(quick: bool) -> dict:
    if quick:  # proves the script runs (CI, tests): numbers not comparable
        return dict(tokens=64, hidden=128, intermediate=32, experts=8, top_k=2, rounds=1, warmup=1)
    return dict(tokens=1024, hidden=512, intermediate=256, experts=16, top_k=2, rounds=5, warmup=1)


def row_bytes(hidden: int, recipe: Optional[str], elem: int = 2) -> int:
    """Bytes of one token row as the dispatch sends it."""
    return hidden * elem if recipe is None else hidden + SCALE_BYTES[recipe](hidden)


def analytic(tokens: int, top_k: int, bytes_per_row: int, ep: int) -> int:
    """tokens x top-k x (hidden x bytes) x (EP - 1) / EP: exact when every
    rank receives the same share of a rank's rows."""
    return tokens * top_k * bytes_per_row * (ep - 1) // ep


# ------------------------------------------------------------------ on every rank


def _experts(cfg, ep, seed=0):
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    local = cfg["experts"] // ep
    h, i = cfg["hidden"], cfg["intermediate"]
    gate_up = (torch.randn(local, h, 2 * i, generator=g) * h ** -0.5).to(torch.bfloat16).requires_grad_()
    down = (torch.randn(local, i, h, generator=g) * i ** -0.5).to(torch.bfloat16).requires_grad_()
    return gate_up, down


def _timed_step(ep_module, cfg, mesh, x, ids, w, gate_up, down, mode, recipe, chunks):
    """One forward and backward through the pipeline; the phases from its trace."""
    from torch_moe_ops import fused_experts

    def local(rows, local_ids):
        return fused_experts(rows, local_ids, None, gate_up, down, None, None, "swiglu", False)

    stats = type("Stats", (), {})()
    x = x.detach().requires_grad_()
    dist.barrier()
    t0 = time.perf_counter()
    out = ep_module._pipelined_dispatch_combine(x, ids, w, cfg["experts"], mesh, local, mode, 1.0, stats, recipe,
                                                chunks)
    t1 = time.perf_counter()
    out.backward(torch.ones_like(out))
    t2 = time.perf_counter()
    ev = {(name, c): t for name, c, t in stats.ep_trace}
    n = chunks
    f_exp = sum(ev[("experts_end", c)] - ev[("experts_start", c)] for c in range(n))
    f_disp = ev[("experts_start", 0)] - t0 + sum(ev[("experts_start", c)] - ev[("experts_end", c - 1)]
                                                 for c in range(1, n))
    f_comb = t1 - ev[("experts_end", n - 1)]
    b_exp = sum(ev[("experts_grad_end", c)] - ev[("experts_grad_start", c)] for c in range(n))
    b_comb = ev[("experts_grad_start", 0)] - t1 + sum(ev[("experts_grad_start", c)] - ev[("experts_grad_end", c - 1)]
                                                      for c in range(1, n))
    b_disp = t2 - ev[("experts_grad_end", n - 1)]
    return dict(step=t2 - t0, dispatch=f_disp + b_disp, experts=f_exp + b_exp, combine=f_comb + b_comb,
                fwd_dispatch=f_disp, fwd_experts=f_exp, fwd_combine=f_comb, bwd_combine=b_comb, bwd_experts=b_exp,
                bwd_dispatch=b_disp)


def _measure_bytes(ep_module, cfg, mesh, x, ids, w, mode, recipe):
    from torch_moe_ops.distributed.traffic import AllToAllBytes

    with torch.no_grad(), AllToAllBytes() as traffic:
        ep_module.dispatch_combine(x, ids, w, cfg["experts"], mesh, lambda rows, local_ids: rows, mode=mode,
                                   capacity_factor=1.0, fp8_dispatch=recipe)
    payload = [c for c in traffic.calls if c.dtype != torch.int64]  # the counts' exchange apart
    # The combine is the forward's last all-to-all; every one before it is the dispatch's.
    return sum(c.bytes_to_peers for c in payload[:-1]), payload[-1].bytes_to_peers


def _rank_main(rank, world, init_file, cfg, out_file):
    sys.path.insert(0, HERE)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import torch_moe_ops.distributed.expert_parallel as ep_module
        mesh = init_device_mesh("cpu", (world,))
        T, k, H, E = cfg["tokens"], cfg["top_k"], cfg["hidden"], cfg["experts"]
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        w = torch.softmax(torch.randn(T, k, generator=g), -1)
        balanced = (torch.arange(T * k) % E).view(T, k)

        sent = {}
        for mode in ("splits", "capacity"):
            for recipe in (None, "rowwise", "mx"):
                sent[(mode, recipe)] = _measure_bytes(ep_module, cfg, mesh, x, balanced, w, mode, recipe)

        # Timing: a random routing (as a trained router's, roughly uniform) for
        # the splits mode; the capacity mode's buffers hold C = T * k / E rows
        # per expert (capacity_factor 1), the same bytes as the balanced case.
        ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
        gate_up, down = _experts(cfg, world)
        times = {v: [] for v in VARIANTS}
        for v in VARIANTS:
            for _ in range(cfg["warmup"]):
                _timed_step(ep_module, cfg, mesh, x, ids, w, gate_up, down, *v)
        for _ in range(cfg["rounds"]):
            for v in VARIANTS:
                times[v].append(_timed_step(ep_module, cfg, mesh, x, ids, w, gate_up, down, *v))
        # The round of median step time, whole: its phases partition its step
        # (medians taken phase by phase would not add up).
        medians = {v: sorted(ts, key=lambda t: t["step"])[len(ts) // 2] for v, ts in times.items()}
        every = [None] * world
        dist.all_gather_object(every, dict(sent=sent, times=medians))
        if rank == 0:
            torch.save(every, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ep(ep: int, cfg: dict) -> list:
    """Every rank's bytes and median phase times, from ep spawned processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pt")
        if ep == 1:  # in this process: a spawn costs its imports, ~10-20 s here
            threads = torch.get_num_threads()
            try:
                _rank_main(0, 1, os.path.join(tmp, "init"), cfg, out_file)
            finally:
                torch.set_num_threads(threads)
            return torch.load(out_file, weights_only=False)
        mp.start_processes(_rank_main, args=(ep, os.path.join(tmp, "init"), cfg, out_file), nprocs=ep, join=True,
                           start_method="spawn")
        return torch.load(out_file, weights_only=False)


# ------------------------------------------------------------------ rows


def timing_rows(ep: int, every: list) -> list[dict]:
    rows = []
    base = {}
    for mode, recipe, chunks in VARIANTS:
        slowest = max(every, key=lambda r: r["times"][(mode, recipe, chunks)]["step"])["times"][(mode, recipe, chunks)]
        ms = {key: 1e3 * v for key, v in slowest.items()}
        if chunks == 1:
            base[(mode, recipe)] = ms["step"]
        hidden = base[(mode, recipe)] - ms["step"] if chunks > 1 else None
        rows.append(dict(ep=ep, mode=mode, fp8=recipe or "-", chunks=chunks, step_ms=ms["step"],
                         dispatch_ms=ms["dispatch"], experts_ms=ms["experts"], combine_ms=ms["combine"],
                         fwd_dispatch_ms=ms["fwd_dispatch"], fwd_experts_ms=ms["fwd_experts"],
                         fwd_combine_ms=ms["fwd_combine"], bwd_combine_ms=ms["bwd_combine"],
                         bwd_experts_ms=ms["bwd_experts"], bwd_dispatch_ms=ms["bwd_dispatch"], hidden_ms=hidden))
    return rows


def bytes_rows(ep: int, every: list, cfg: dict) -> list[dict]:
    T, k, H = cfg["tokens"], cfg["top_k"], cfg["hidden"]
    rows = []
    for mode in ("splits", "capacity"):
        bf16 = None
        for recipe in (None, "rowwise", "mx"):
            per_rank = [r["sent"][(mode, recipe)] for r in every]
            dispatch = [d for d, _ in per_rank]
            combine = [c for _, c in per_rank]
            want_d, want_c = analytic(T, k, row_bytes(H, recipe), ep), analytic(T, k, row_bytes(H, None), ep)
            # The worst rank's disagreement, in bytes (0 when every rank agrees exactly).
            off = max([abs(d - want_d) for d in dispatch] + [abs(c - want_c) for c in combine])
            if recipe is None:
                bf16 = dispatch[0]
            vs_bf16 = max(dispatch) / bf16 if bf16 else None
            rows.append(dict(
                ep=ep, mode=mode, fp8=recipe or "-", tokens=T, top_k=k, hidden=H, row_bytes=row_bytes(H, recipe),
                dispatch_bytes=dispatch, combine_bytes=combine, analytic_dispatch=want_d, analytic_combine=want_c,
                vs_bf16=vs_bf16, off_bytes=off,
                targets=targets(
                    target(15, "exact", "|measured - analytic| bytes", "every rank, dispatch and combine", off, "<=",
                           0),
                    target(15, "fp8", "fp8/bf16 dispatch bytes", "fp8 dispatch, EP > 1", vs_bf16, "<=", 0.53)
                    if recipe is not None else None)))
    return rows


def volume_rows(quick: bool) -> list[dict]:
    import torch_moe_ops.shapes

    models = torch_moe_ops.shapes.models()
    names = ["qwen3-30b-a3b", "deepseek-v3"] if quick else ["mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-120b",
                                                            "deepseek-v3", "kimi-k2"]
    tokens = 4096
    rows = []
    for name in names:
        m = models[name]
        for ep in (8, 16, 32, 64):
            if ep > m["experts"]:
                continue
            rows.append(dict(config=name, ep=ep, tokens=tokens, top_k=m["top_k"], hidden=m["hidden"],
                             bf16_mb=analytic(tokens, m["top_k"], row_bytes(m["hidden"], None), ep) / 1e6,
                             rowwise_mb=analytic(tokens, m["top_k"], row_bytes(m["hidden"], "rowwise"), ep) / 1e6,
                             mx_mb=analytic(tokens, m["top_k"], row_bytes(m["hidden"], "mx"), ep) / 1e6))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "EP = 1 and 2, a tiny layer, one round: proves the script runs (CI, tests)")
    args = parser.parse_args(argv)
    cfg = shape(args.quick)
    doc = dict(benchmark="ep", meta=metadata(__file__, argv, args.quick), shape=cfg, timing=[], bytes=[], volume=[])
    load = os.getloadavg()[0]
    print_machine()
    for ep in ((1, 2) if args.quick else (1, 2, 4)):
        start = time.perf_counter()
        every = run_ep(ep, cfg)
        doc["timing"] += timing_rows(ep, every)
        doc["bytes"] += bytes_rows(ep, every, cfg)
        print(f"EP = {ep}: {time.perf_counter() - start:.0f} s", flush=True)
    doc["volume"] = volume_rows(args.quick)
    doc["meta"]["note"] = (f"gloo over loopback, spawned processes, one thread each; the machine's 2 cores were shared "
                           f"with other jobs (1-minute load average {load:.1f} at the start, "
                           f"{os.getloadavg()[0]:.1f} at the end): timings are noisy, bytes are exact.")
    print("\nPer training step (forward + backward) of dispatch, experts and combine, ms\n")
    print(tables.table("ep/time", doc))
    print("\nBytes sent per rank (forward), measured vs analytic\n")
    print(tables.table("ep/bytes", doc))
    print("\nAnalytic volume per rank, each way, 4096 tokens per rank, MB\n")
    print(tables.table("ep/volume", doc))
    return finish(doc, json_path("ep", args), tables.missed("ep/bytes", doc), args.check)


if __name__ == "__main__":
    raise SystemExit(main())

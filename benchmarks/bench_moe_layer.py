"""MoE layer benchmark: the experts of real model shapes, forward + backward.

The experts run inside transformers' own experts module (Qwen3-MoE's:
``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, SwiGLU), called as
transformers calls it, ``experts(hidden_states, top_k_index, top_k_weights)``,
with ``config._experts_implementation`` switched between

  eager       transformers' per-expert loop
  grouped_mm  transformers' sort + gather + torch._grouped_mm path
  unfused     "torch_moe_ops_unfused": permute + grouped_mm + SwiGLU + grouped_mm + unpermute
              (the unfused composition of our ops)
  ours        "torch_moe_ops": the fused experts (moe_ops::expert_mlp: tokens gathered
              inside the GEMM, SwiGLU between the GEMMs in cache-sized chunks, only the
              up-projection output kept for a backward that never rebuilds the
              down-projection output; its weight gradients in blocks the
              large-output cache keeps between steps, torch_moe_ops.memory)

  dense       not an MoE: one SwiGLU MLP of one expert's shape over all tokens * top_k
              rows (torch.mm, autograd), the same FLOPs, weights in the same storage order

on the same weights and the same skewed routing (weights requiring grad, as
they do in training), with the weights stored as transformers' module stores
them, (E, out, in) ("nk", passed to the GEMMs as a transposed view), and
stored (E, in, out) ("kn", the module's ``is_transposed``, as gpt-oss's);
transformers' eager loop reads only the first, so it runs on "nk" rows. Per
shape and weight order it prints forward, backward and total time and the
activation memory: the bytes autograd saves for the backward (unique storages,
parameters excluded), which is what a training step holds from the forward to
the backward (this CPU build of torch has no allocator peak statistic), with
the row's targets (row_targets). Before timing, ours is checked against
eager, or against transformers' grouped_mm where eager does not run. Writes
the table as JSON (benchmarks/tables.py renders it, here and in the README).

    python benchmarks/bench_moe_layer.py [--quick] [--check] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import transformers
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import tables
import torch_moe_ops.integrations.transformers as moe_transformers
from _harness import add_common_args, finish, interleaved_medians, json_path, metadata, print_machine, target, targets
from bench_grouped_mm import bound_vs_dense, cache_holds, fresh_output_zeroing, memory_rates
from torch_moe_ops import shapes

ORDERS = ("nk", "kn")
IMPLS = {"eager": "eager", "grouped_mm": "grouped_mm", "unfused": moe_transformers.UNFUSED_NAME,
         "ours": moe_transformers.NAME}
# Bytes of zero gradients the eager loop may materialise per step (see run()).
EAGER_MAX_TRAFFIC = 12 * 2**30


@dataclass(frozen=True)
class Config:
    name: str
    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    dtype: torch.dtype


def configs(quick: bool) -> list[Config]:
    models = shapes.models()
    # (model, tokens, width scale): fine-grained shapes first.
    plan = [("qwen3-30b-a3b", 1024, 2), ("olmoe-1b-7b", 1024, 2), ("deepseek-v3", 512, 4), ("mixtral-8x7b", 1024, 4)]
    if quick:  # make demo, CI, tests: one small shape, short timing, numbers not comparable to a full run
        plan = [("qwen3-30b-a3b", 128, 8)]
    return [Config(name, tokens, models[name]["hidden"] // scale, models[name]["expert_intermediate"] // scale,
                   models[name]["experts"], models[name]["top_k"], torch.bfloat16) for name, tokens, scale in plan]


def make_experts(cfg: Config, gen: torch.Generator) -> Qwen3MoeExperts:
    """Qwen3-MoE's experts module, weights stored (E, out, in) as transformers stores them."""
    config = transformers.Qwen3MoeConfig(hidden_size=cfg.hidden, moe_intermediate_size=cfg.intermediate,
                                         num_experts=cfg.experts, num_experts_per_tok=cfg.top_k)
    experts = Qwen3MoeExperts(copy.deepcopy(config)).to(cfg.dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * cfg.hidden ** -0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * cfg.intermediate ** -0.5)
    return experts


def transposed_experts(experts: Qwen3MoeExperts) -> Qwen3MoeExperts:
    """The same module and weight values, the weights stored (E, in, out)
    (transformers' ``is_transposed``, as gpt-oss stores them)."""
    out = copy.deepcopy(experts)
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts, name).detach()
        setattr(out, name, torch.nn.Parameter(w.transpose(-2, -1).contiguous()))
    out.is_transposed = True
    return out


def routing(cfg: Config, gen: torch.Generator):
    """Skewed top-k routing (a per-expert preference, as a trained router has)
    and softmax weights over the chosen experts."""
    pref = torch.randn(cfg.experts, generator=gen) * 0.5
    scores = pref + torch.randn(cfg.tokens, cfg.experts, generator=gen)
    top, ids = scores.topk(cfg.top_k, dim=1)
    return ids, torch.softmax(top, dim=-1).to(cfg.dtype)


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while running fn, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def layer_memory_bound(params: list, dense_params: list, dense_s: float, rates: dict) -> float:
    """The most ours/dense (forward + backward) can reach on this machine. The
    dense MLP reuses one expert's weights from cache; the experts must read
    every expert's weights twice from DRAM (the forward's GEMMs, then the
    backward's input-gradient GEMMs: two calls, so no cache holds them
    between) and write every expert's weight gradient once to fresh memory
    (a training step starts with no gradients), and the cores zero those
    fresh pages beyond the dense MLP's own (bench_grouped_mm.bound_vs_dense).
    Activations (tens of MB) are left out, which only loosens the bound. With
    DeepSeek-V3's 16 rows per expert the weights are 1.4 GB a pass against
    68 GFLOP, and this bound is well under 1.

    Where the large-output cache (torch_moe_ops.memory) holds every gradient
    block, the gradients are written into last step's pages: no zeroing, and
    the write is counted at the read rate (this machine's rate of writing
    resident memory is not measured; at most the read rate, so the bound only
    loosens)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    if gradients_cached(params):
        return bound_vs_dense(dense_s, 3 * weight_bytes, 0, rates)
    zeroing_s = max(0.0, sum(fresh_output_zeroing(tuple(p.shape), p.dtype) for p in params)
                    - sum(fresh_output_zeroing(tuple(p.shape), p.dtype) for p in dense_params))
    return bound_vs_dense(dense_s, 2 * weight_bytes, weight_bytes, rates, zeroing_s)


def gradients_cached(params: list) -> bool:
    """Whether the large-output cache keeps every weight gradient's block
    from one step to the next."""
    return cache_holds([p.numel() * p.element_size() for p in params])


def run(cfg: Config, experts: Qwen3MoeExperts, order: str, min_run_time: float, rounds: int, min_runs: int,
        rates: dict) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids, weights = routing(cfg, gen)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(cfg.dtype).requires_grad_()
    weights.requires_grad_()
    grad = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(cfg.dtype)
    params = list(experts.parameters())

    def forward(impl):
        experts.config._experts_implementation = IMPLS[impl]
        return experts(x, ids, weights)

    def forward_backward(impl):
        # A training step starts with no gradients (zero_grad(set_to_none=True)):
        # the backward writes them instead of adding to them.
        for t in (x, weights, *params):
            t.grad = None
        forward(impl).backward(grad)

    # The dense baseline: one expert's SwiGLU MLP over all routed rows (the
    # same FLOPs as the experts), weights stored as the experts' are.
    rows = cfg.tokens * cfg.top_k
    dense_x = torch.randn(rows, cfg.hidden, generator=gen).to(cfg.dtype).requires_grad_()
    dense_grad = torch.randn(rows, cfg.hidden, generator=gen).to(cfg.dtype)
    dense_up = experts.gate_up_proj[0].detach().clone().requires_grad_()  # (2I, H) "nk", (H, 2I) "kn"
    dense_down = experts.down_proj[0].detach().clone().requires_grad_()   # (H, I) "nk", (I, H) "kn"
    dense_params = [dense_up, dense_down]

    def dense_forward():
        up, down = (dense_up.t(), dense_down.t()) if order == "nk" else (dense_up, dense_down)
        gate, u = (dense_x @ up).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * u) @ down

    def dense_forward_backward():
        for t in (dense_x, *dense_params):
            t.grad = None
        dense_forward().backward(dense_grad)

    # The eager loop reads (E, out, in) weights only, and its backward
    # materialises a zero gradient of every expert weight per expert
    # (select_backward): E x the weights' bytes of memory traffic, minutes at
    # DeepSeek-V3's shape. It runs on "nk" rows where that stays small.
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    not_run = {}
    if order != "nk":
        not_run["eager"] = "transformers' eager loop reads (E, out, in) weights only"
    elif cfg.experts * weight_bytes > EAGER_MAX_TRAFFIC:
        not_run["eager"] = "see EAGER_MAX_TRAFFIC"
    impls = [i for i in IMPLS if i not in not_run]
    # Ours against the reference (eager, else transformers' grouped_mm): bf16
    # outputs and gradients within a few bf16 ulps of the largest value (the
    # others add the k rows in bf16, ours in fp32).
    # Every timed path runs once here, which also warms it up (transformers'
    # grouped_mm path is seconds slower on its first calls: oneDNN creates a
    # primitive per group size).
    reference = impls[0]
    results = {}
    for impl in dict.fromkeys((reference, "grouped_mm", "unfused", "ours")):
        for t in (x, weights, *params):
            t.grad = None
        out = forward(impl)
        out.backward(grad)
        results[impl] = [out.detach(), x.grad, weights.grad, *(p.grad for p in params)]
    dense_forward_backward()
    for impl in ("unfused", "ours"):
        for got, ref in zip(results[impl], results[reference]):
            torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=8 * 2**-8 * ref.abs().max().item())

    env = dict(forward=forward, forward_backward=forward_backward, dense_forward=dense_forward,
               dense_forward_backward=dense_forward_backward)

    def stmts(impls):
        return {f"{kind} {impl}": f"{fn}({impl!r})" for impl in impls
                for kind, fn in (("fwd", "forward"), ("total", "forward_backward"))}

    t = interleaved_medians({**stmts(["grouped_mm", "unfused", "ours"]), "fwd dense": "dense_forward()",
                             "total dense": "dense_forward_backward()"}, env, min_run_time, rounds, min_runs)
    if "eager" in impls:
        # One round: the loop's backward is seconds per step.
        t.update(interleaved_medians(stmts(["eager"]), env, 0.0, 1))
    timed = impls + ["dense"]
    fwd = {impl: t[f"fwd {impl}"] * 1e3 for impl in timed}
    bwd = {impl: max(t[f"total {impl}"] * 1e3 - fwd[impl], 0.0) for impl in timed}
    saved = {impl: saved_bytes(lambda: forward(impl), params) / 2**20 for impl in impls}
    saved["dense"] = saved_bytes(dense_forward, dense_params) / 2**20
    total = {impl: fwd[impl] + bwd[impl] for impl in timed}
    row = dict(config=cfg.name, order=order, tokens=cfg.tokens, hidden=cfg.hidden, intermediate=cfg.intermediate,
               experts=cfg.experts, top_k=cfg.top_k, fwd_ms=fwd, bwd_ms=bwd, saved_mb=saved, not_run=not_run,
               vs_grouped_mm=total["grouped_mm"] / total["ours"], vs_dense=total["dense"] / total["ours"],
               grouped_mm_vs_dense=total["dense"] / total["grouped_mm"],
               memory_vs_grouped_mm=saved["ours"] / saved["grouped_mm"],
               memory_bound_vs_dense=layer_memory_bound(params, dense_params, total["dense"] / 1e3, rates))
    row["targets"] = row_targets(row)
    return row


def row_targets(r: dict) -> list[dict]:
    """On the fine-grained shapes (>= 64 experts, top-k >= 4), in both weight
    orders: issue #5's fwd+bwd >= 1.5x transformers' grouped_mm and activation
    memory <= 0.6x its; issue #11 asks of expert_mlp "the same" as of
    grouped_mm with (G, N, K) weights, read here as its bf16 targets with the
    layer's fwd+bwd in place of one GEMM: >= 0.85x the dense MLP of the same
    FLOPs (its "never slower than upstream", upstream being transformers'
    torch._grouped_mm path, and ">= 1.3x upstream where it runs below 0.65x
    dense" are implied by #5's 1.5x on the same row). No target is stated
    for the coarse shape (Mixtral)."""
    if not (r["experts"] >= 64 and r["top_k"] >= 4):
        return []
    where = "fine-grained shapes"
    return targets(
        target(5, "gmm", "ours/transformers grouped_mm, fwd+bwd speed", where, r["vs_grouped_mm"], ">=", 1.5),
        target(5, "mem", "ours/transformers grouped_mm, saved activations", where, r["memory_vs_grouped_mm"],
               "<=", 0.6),
        target(11, "dense", "ours/dense MLP, fwd+bwd speed", where, r.get("vs_dense"), ">=", 0.85,
               r.get("memory_bound_vs_dense")),
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "one small shape, short timing (make demo; CI and tests: proves the script runs)")
    args = parser.parse_args(argv)

    moe_transformers.register()
    # A step takes 0.1-0.6 s, so min_run_time alone would time 1-5 of them a
    # round: every round times at least min_runs.
    min_run_time, rounds, min_runs = (0.05, 1, 1) if args.quick else (0.5, 3, 5)
    doc = dict(benchmark="moe_layer", meta=metadata(__file__, argv, args.quick), results=[])
    print_machine()
    print("MoE experts, bf16 forward + backward through transformers' experts module, side by side, weights stored "
          "(E, out, in) ('nk') and (E, in, out) ('kn'); ours checked first against eager (transformers' grouped_mm "
          "where eager is not run)\n")
    rates = memory_rates(args.quick)
    doc["memory"] = rates
    for cfg in configs(args.quick):
        experts = make_experts(cfg, torch.Generator().manual_seed(0))
        for order in ORDERS:
            doc["results"].append(run(cfg, experts if order == "nk" else transposed_experts(experts), order,
                                      min_run_time, rounds, min_runs, rates))
            print("\n".join(tables.table("moe_layer", dict(results=doc["results"][-1:])).splitlines()[2:]),
                  flush=True)
    print()
    print(tables.table("moe_layer", doc))
    return finish(doc, json_path("moe_layer", args), tables.missed("moe_layer", doc), args.check)


if __name__ == "__main__":
    sys.exit(main())

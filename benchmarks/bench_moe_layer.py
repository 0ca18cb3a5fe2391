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
              down-projection output)

on the same weights and the same skewed routing (weights requiring grad, as
they do in training). Per shape it prints forward, backward and total time
and the activation memory: the bytes autograd saves for the backward (unique
storages, parameters excluded), which is what a training step holds from the
forward to the backward (this CPU build of torch has no allocator peak
statistic). Before timing, ours is checked against eager, or against
transformers' grouped_mm where eager is too slow to run (EAGER_MAX_TRAFFIC).

    python benchmarks/bench_moe_layer.py [--quick] [--json PATH] [--check]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import transformers
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import torch_moe_ops.integrations.transformers as moe_transformers
from torch_moe_ops import shapes
from _harness import interleaved_medians, print_machine, report

HERE = os.path.dirname(os.path.abspath(__file__))
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


@dataclass(frozen=True)
class Result:
    config: str
    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    fwd_ms: dict
    bwd_ms: dict
    saved_mb: dict

    def total_ms(self, impl: str) -> float:
        return self.fwd_ms[impl] + self.bwd_ms[impl]


def configs(quick: bool) -> list[Config]:
    models = shapes.models()
    # (model, tokens, width scale): fine-grained shapes first.
    plan = [("qwen3-30b-a3b", 1024, 2), ("olmoe-1b-7b", 1024, 2), ("deepseek-v3", 512, 4), ("mixtral-8x7b", 1024, 4)]
    if quick:
        plan = [("qwen3-30b-a3b", 512, 4)]
    return [Config(name, tokens, models[name]["hidden"] // scale, models[name]["expert_intermediate"] // scale,
                   models[name]["experts"], models[name]["top_k"], torch.bfloat16) for name, tokens, scale in plan]


def make_experts(cfg: Config) -> Qwen3MoeExperts:
    config = transformers.Qwen3MoeConfig(hidden_size=cfg.hidden, moe_intermediate_size=cfg.intermediate,
                                         num_experts=cfg.experts, num_experts_per_tok=cfg.top_k)
    experts = Qwen3MoeExperts(copy.deepcopy(config)).to(cfg.dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, cfg.hidden ** -0.5)
        experts.down_proj.normal_(0, cfg.intermediate ** -0.5)
    return experts


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


def run(cfg: Config, min_run_time: float, rounds: int) -> Result:
    gen = torch.Generator().manual_seed(0)
    experts = make_experts(cfg)
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

    # The eager loop's backward materialises a zero gradient of every expert
    # weight per expert (select_backward): E x the weights' bytes of memory
    # traffic, minutes at DeepSeek-V3's shape. It runs where that stays small.
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    impls = [i for i in IMPLS if i != "eager" or cfg.experts * weight_bytes <= EAGER_MAX_TRAFFIC]
    # Ours against the reference (eager, else transformers' grouped_mm): bf16
    # outputs and gradients within a few bf16 ulps of the largest value (the
    # others add the k rows in bf16, ours in fp32).
    reference = impls[0]
    results = {}
    for impl in (reference, "unfused", "ours"):
        for t in (x, weights, *params):
            t.grad = None
        out = forward(impl)
        out.backward(grad)
        results[impl] = [out.detach(), x.grad, weights.grad, *(p.grad for p in params)]
    for impl in ("unfused", "ours"):
        for got, ref in zip(results[impl], results[reference]):
            torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=8 * 2**-8 * ref.abs().max().item())

    env = dict(forward=forward, forward_backward=forward_backward)

    def stmts(impls):
        return {f"{kind} {impl}": f"{fn}({impl!r})" for impl in impls
                for kind, fn in (("fwd", "forward"), ("total", "forward_backward"))}

    t = interleaved_medians(stmts(["grouped_mm", "unfused", "ours"]), env, min_run_time, rounds)
    if "eager" in impls:
        # One round: the loop's backward is seconds per step.
        t.update(interleaved_medians(stmts(["eager"]), env, 0.0, 1))
    fwd = {impl: t[f"fwd {impl}"] * 1e3 for impl in impls}
    bwd = {impl: max(t[f"total {impl}"] * 1e3 - fwd[impl], 0.0) for impl in impls}
    saved = {impl: saved_bytes(lambda: forward(impl), params) / 2**20 for impl in impls}
    return Result(cfg.name, cfg.tokens, cfg.hidden, cfg.intermediate, cfg.experts, cfg.top_k, fwd, bwd, saved)


def check_targets(results: list[Result]) -> list[tuple[str, bool]]:
    """Issue #5's targets, on fine-grained shapes (>= 64 experts, top-k >= 4)."""
    checks = []
    for r in results:
        if r.experts >= 64 and r.top_k >= 4:
            speedup = r.total_ms("grouped_mm") / r.total_ms("ours")
            memory = r.saved_mb["ours"] / r.saved_mb["grouped_mm"]
            checks.append((f"{r.config}: fwd+bwd >= 1.5x transformers grouped_mm ({speedup:.2f}x)", speedup >= 1.5))
            checks.append((f"{r.config}: activation memory <= 0.6x grouped_mm ({memory:.2f}x)", memory <= 0.6))
    return checks


def format_table(results: list[Result]) -> str:
    head = (f"{'model':<14} {'T':>5} {'H':>5} {'I':>5} {'E':>4} {'k':>2} {'impl':<10} {'fwd ms':>8} {'bwd ms':>8} "
            f"{'total ms':>9} {'saved MB':>9} {'vs grouped_mm':>13}")
    lines = [head, "-" * len(head)]
    for r in results:
        for impl in IMPLS:
            if impl not in r.fwd_ms:
                lines.append(f"{r.config:<14} {r.tokens:>5} {r.hidden:>5} {r.intermediate:>5} {r.experts:>4} "
                             f"{r.top_k:>2} {impl:<10} {'(not run: see EAGER_MAX_TRAFFIC)':>50}")
                continue
            speed = r.total_ms("grouped_mm") / r.total_ms(impl)
            lines.append(f"{r.config:<14} {r.tokens:>5} {r.hidden:>5} {r.intermediate:>5} {r.experts:>4} {r.top_k:>2} "
                         f"{impl:<10} {r.fwd_ms[impl]:>8.1f} {r.bwd_ms[impl]:>8.1f} {r.total_ms(impl):>9.1f} "
                         f"{r.saved_mb[impl]:>9.1f} {speed:>12.2f}x")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, short timing (make demo)")
    parser.add_argument("--json", help="default: results/moe_layer.json (results/moe_layer-quick.json with --quick)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    args.json = args.json or os.path.join(HERE, "results", "moe_layer-quick.json" if args.quick else "moe_layer.json")

    moe_transformers.register()
    min_run_time, rounds = (0.2, 1) if args.quick else (0.5, 3)
    print_machine()
    print("MoE experts, bf16 forward + backward through transformers' experts module, side by side; "
          "ours checked first against eager (transformers' grouped_mm where eager is not run)\n")
    results = [run(cfg, min_run_time, rounds) for cfg in configs(args.quick)]
    print(format_table(results))
    return report(results, check_targets(results), args.json, args.check)


if __name__ == "__main__":
    sys.exit(main())

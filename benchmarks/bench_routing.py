"""Routing benchmark on real MoE shapes: router top-k, permute and unpermute.

For each model shape (torch_moe_ops.shapes: experts, top_k, hidden and the
router kind kept; tokens chosen for this CPU) it times, side by side in one run,

  permute      torch.ops.moe_ops.permute          vs  argsort + bincount + index_select
  unpermute    torch.ops.moe_ops.unpermute        vs  weighted rows + index_add_
  clone        permuted.clone(): the same output bytes, the floor of a fresh-output op
  router       torch.ops.moe_ops.router_topk      vs  softmax/sigmoid + topk + renorm + bincount

(the torch-native paths are those of transformers' grouped_mm experts), prints
GB/s and ratios, checks the targets of issue #4 and writes the table as JSON.

    python benchmarks/bench_routing.py [--quick] [--json PATH] [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from torch_moe_ops import shapes
from _harness import interleaved_medians, print_machine, report

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Config:
    name: str
    tokens: int
    hidden: int
    experts: int
    top_k: int
    score: str  # "softmax" | "sigmoid" | "softmax_after_topk"
    renormalize: bool
    n_group: int
    topk_group: int
    score_bias: bool
    dtype: torch.dtype

    @property
    def pairs(self) -> int:
        return self.tokens * self.top_k


@dataclass(frozen=True)
class Result:
    config: str
    dtype: str
    tokens: int
    hidden: int
    experts: int
    top_k: int
    permute_ms: float
    unpermute_ms: float
    clone_ms: float
    torch_permute_ms: float
    torch_unpermute_ms: float
    router_ms: float
    torch_router_ms: float
    permute_gbs: float
    unpermute_gbs: float

    @property
    def pair_ms(self) -> float:
        return self.permute_ms + self.unpermute_ms

    @property
    def vs_torch(self) -> float:
        return (self.torch_permute_ms + self.torch_unpermute_ms) / self.pair_ms

    @property
    def vs_clone(self) -> float:
        return self.pair_ms / self.clone_ms

    @property
    def router_speedup(self) -> float:
        return self.torch_router_ms / self.router_ms


def configs(quick: bool) -> list[Config]:
    models = shapes.models()
    # (model, tokens, hidden scale)
    plan = [("qwen3-30b-a3b", 4096, 1), ("olmoe-1b-7b", 4096, 1), ("deepseek-v3", 2048, 4),
            ("gpt-oss-20b", 4096, 2), ("mixtral-8x7b", 4096, 2)]
    if quick:
        plan = [plan[0], plan[2]]
    out = []
    for name, tokens, scale in plan:
        m = models[name]
        out.append(Config(name, tokens, m["hidden"] // scale, m["experts"], m["top_k"], m["score"], m["renormalize"],
                          m.get("n_group", 1), m.get("topk_group", 1), bool(m.get("score_bias", False)),
                          torch.bfloat16))
    return out


# Torch-native paths ---------------------------------------------------------


def torch_router(logits, cfg: Config, bias):
    x = logits.float()
    if cfg.score == "softmax_after_topk":
        top, ids = x.topk(cfg.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:
        scores = torch.softmax(x, dim=-1) if cfg.score == "softmax" else torch.sigmoid(x)
        choice = scores + bias if bias is not None else scores
        if cfg.n_group > 1:
            groups = choice.view(x.shape[0], cfg.n_group, -1)
            best = groups.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
            mask = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~mask.repeat_interleave(groups.shape[-1], 1), float("-inf"))
        ids = choice.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    counts = torch.bincount(ids.flatten(), minlength=cfg.experts)
    return weights, ids, counts


# transformers' grouped_mm experts path (integrations/moe.py), step for step:
# a stable argsort by expert and its inverse, the token rows gathered once
# per (token, slot) and again in expert order, histc for the group sizes; on
# the way back the weighted rows are gathered back to (token, slot) order and
# summed per token with index_add_.


def torch_native_permute(x, ids, num_experts):
    num_tokens, top_k = ids.shape
    expert_ids = ids.reshape(-1)
    token_idx = torch.arange(num_tokens).unsqueeze(1).expand(-1, top_k).reshape(-1)
    perm = torch.argsort(expert_ids, stable=True)
    inv_perm = torch.argsort(perm, stable=True)
    rows = x[token_idx][perm]
    counts = torch.histc(expert_ids[perm].float(), bins=num_experts, min=0, max=num_experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return rows, (token_idx, perm, inv_perm), offs


def torch_native_unpermute(y, order, weights, num_tokens):
    token_idx, perm, inv_perm = order
    weighted = (y * weights.reshape(-1)[perm].unsqueeze(-1))[inv_perm]
    return torch.zeros(num_tokens, y.shape[1], dtype=y.dtype).index_add_(0, token_idx, weighted.to(y.dtype))


# -----------------------------------------------------------------------------


def run(cfg: Config, min_run_time: float, rounds: int) -> Result:
    gen = torch.Generator().manual_seed(0)
    # A trained router's skew: per-expert preference plus per-token noise.
    logits = (torch.randn(cfg.experts, generator=gen) * 0.5 + torch.randn(cfg.tokens, cfg.experts, generator=gen))
    logits = logits.to(cfg.dtype)
    bias = torch.randn(cfg.experts, generator=gen) * 0.01 if cfg.score_bias else None
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(cfg.dtype)
    router_args = (cfg.top_k, cfg.score, bias, cfg.n_group, cfg.topk_group, cfg.renormalize, 1.0)
    weights, ids, _ = torch.ops.moe_ops.router_topk(logits, *router_args)
    permuted, dst_rows, _, offs = torch.ops.moe_ops.permute(x, ids, cfg.experts)
    native, order, native_offs = torch_native_permute(x, ids.long(), cfg.experts)
    # Same rows in the same order (stable sort by expert), same combine.
    assert torch.equal(permuted, native) and torch.equal(offs, native_offs)
    out = torch.ops.moe_ops.unpermute(permuted, dst_rows, weights)
    # transformers hands the experts routing weights in the model dtype.
    native_weights = weights.to(cfg.dtype)
    torch.testing.assert_close(out, torch_native_unpermute(native, order, native_weights, cfg.tokens),
                               rtol=2e-2, atol=2e-2)

    env = dict(torch=torch, logits=logits, x=x, ids=ids, ids64=ids.long(), weights=weights, permuted=permuted,
               dst_rows=dst_rows, order=order, native_weights=native_weights, cfg=cfg, bias=bias, router_args=router_args,
               torch_router=torch_router, torch_native_permute=torch_native_permute,
               torch_native_unpermute=torch_native_unpermute)
    elt = x.element_size()
    rows_bytes = cfg.pairs * cfg.hidden * elt
    t = interleaved_medians({
        "permute": "torch.ops.moe_ops.permute(x, ids, cfg.experts)",
        "unpermute": "torch.ops.moe_ops.unpermute(permuted, dst_rows, weights)",
        "clone": "permuted.clone()",
        "torch_permute": "torch_native_permute(x, ids64, cfg.experts)",
        "torch_unpermute": "torch_native_unpermute(permuted, order, native_weights, cfg.tokens)",
        "router": "torch.ops.moe_ops.router_topk(logits, *router_args)",
        "torch_router": "torch_router(logits, cfg, bias)",
    }, env, min_run_time, rounds)
    ms = {name: seconds * 1e3 for name, seconds in t.items()}
    return Result(
        config=cfg.name, dtype=str(cfg.dtype).replace("torch.", ""), tokens=cfg.tokens, hidden=cfg.hidden,
        experts=cfg.experts, top_k=cfg.top_k,
        permute_ms=ms["permute"], unpermute_ms=ms["unpermute"], clone_ms=ms["clone"],
        torch_permute_ms=ms["torch_permute"], torch_unpermute_ms=ms["torch_unpermute"],
        router_ms=ms["router"], torch_router_ms=ms["torch_router"],
        # Bytes each op must move: permute reads k rows per token and writes
        # them; unpermute reads them and writes one row per token.
        permute_gbs=2 * rows_bytes / ms["permute"] / 1e6,
        unpermute_gbs=(rows_bytes + cfg.tokens * cfg.hidden * elt) / ms["unpermute"] / 1e6,
    )


def check_targets(results: list[Result]) -> list[tuple[str, bool]]:
    checks = []
    for r in results:
        tag = f"{r.config} {r.dtype}"
        if r.hidden >= 1024:
            checks.append((f"{tag}: permute+unpermute >= 8x torch-native ({r.vs_torch:.1f}x)", r.vs_torch >= 8))
            checks.append((f"{tag}: permute+unpermute within 2x of clone ({r.vs_clone:.2f}x)", r.vs_clone <= 2))
        checks.append((f"{tag}: router_topk >= 3x torch ({r.router_speedup:.1f}x)", r.router_speedup >= 3))
    return checks


def format_table(results: list[Result]) -> str:
    head = (f"{'model':<14} {'T':>5} {'H':>5} {'E':>4} {'k':>2} | {'perm':>6} {'unperm':>6} {'clone':>6} "
            f"{'t.perm':>7} {'t.unp':>6} | {'perm':>5} {'unp':>5} | {'vs torch':>8} {'/clone':>6} | "
            f"{'router':>6} {'t.router':>8} {'x':>5}")
    sub = (f"{'':<14} {'':>5} {'':>5} {'':>4} {'':>2} | {'ms':>6} {'ms':>6} {'ms':>6} {'ms':>7} {'ms':>6} | "
           f"{'GB/s':>5} {'GB/s':>5} | {'':>8} {'':>6} | {'ms':>6} {'ms':>8} {'':>5}")
    lines = [head, sub, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.config:<14} {r.tokens:>5} {r.hidden:>5} {r.experts:>4} {r.top_k:>2} | {r.permute_ms:>6.1f} "
            f"{r.unpermute_ms:>6.1f} {r.clone_ms:>6.1f} {r.torch_permute_ms:>7.1f} {r.torch_unpermute_ms:>6.1f} | "
            f"{r.permute_gbs:>5.1f} {r.unpermute_gbs:>5.1f} | {r.vs_torch:>7.1f}x {r.vs_clone:>5.2f}x | "
            f"{r.router_ms:>6.2f} {r.torch_router_ms:>8.2f} {r.router_speedup:>4.1f}x")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, shorter timing")
    parser.add_argument("--json", help="default: results/routing.json (results/routing-quick.json with --quick)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    args.json = args.json or os.path.join(HERE, "results", "routing-quick.json" if args.quick else "routing.json")

    min_run_time, rounds = (0.2, 2) if args.quick else (0.4, 5)
    print_machine()
    print("MoE routing: permute / unpermute (weighted) / router top-k, bf16, side by side "
          "(t.* = torch-native path)\n")
    results = [run(cfg, min_run_time, rounds) for cfg in configs(args.quick)]
    print(format_table(results))
    return report(results, check_targets(results), args.json, args.check)

if __name__ == "__main__":
    sys.exit(main())

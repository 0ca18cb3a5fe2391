"""Compile benchmark: stock MoE model code under torch.compile, with and without our passes.

Issue #17's targets: bf16 Qwen3-MoE, OLMoE and DeepSeek-V3-shaped transformers models built
from their configs (one decoder layer, widths of ``torch_moe_ops.shapes`` divided by
``shrink``, experts and top-k kept), unchanged model code, ``"grouped_mm"`` experts implementation; and
torchtitan 0.3.0's MoE layer (router, local dispatch, GroupedExperts, combine) at the same
shapes. Each is compiled twice, ``fullgraph=True, dynamic=True``, on its own copy of the same
weights:

  stock   torch.compile as shipped (Inductor, no custom passes)
  ours    torch.compile(options=torch_moe_ops.compile.options()): the experts block becomes
          moe_ops::expert_mlp (memory-lean backward), the router moe_ops::router_topk

and a training step (forward, loss = mean(out^2) in fp32, backward; gradients set to None
before each step) is timed, the two taking turns (interleaved medians). The memory column is
the bytes autograd saves for the backward (unique storages, parameters excluded; this CPU
build of torch has no allocator peak statistic). Before timing, ours is checked to have fired
(the counters: one expert_mlp per MoE layer) and its output compared with stock's.

    python benchmarks/bench_compile.py [--quick] [--check] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

import tables
import torch_moe_ops  # noqa: F401
import torch_moe_ops.compile as moe_compile
from _harness import add_common_args, finish, interleaved_medians, json_path, metadata, print_machine, target, targets
from torch_moe_ops.compile import stock


@dataclass(frozen=True)
class Config:
    framework: str   # "transformers" or "torchtitan"
    model: str       # a model of torch_moe_ops.shapes
    shrink: int
    tokens: int


def configs(quick: bool) -> list[Config]:
    if quick:
        # Compile time dominates (two graphs, forward and backward, per compiled model): one small model each.
        # (widths / 32: torch._grouped_mm needs 16-byte row strides)
        return [Config("transformers", "qwen3-30b-a3b", 32, 32), Config("torchtitan", "qwen3-30b-a3b", 32, 32)]
    return [Config("transformers", "qwen3-30b-a3b", 8, 256), Config("transformers", "olmoe-1b-7b", 8, 256),
            Config("transformers", "deepseek-v3", 16, 256), Config("torchtitan", "qwen3-30b-a3b", 8, 256)]


def build(cfg: Config):
    """(module, input, fn(module, input) -> output, description of the MoE layer)."""
    gen = torch.Generator().manual_seed(1)
    if cfg.framework == "transformers":
        model = stock.transformers_model(cfg.model, cfg.shrink, layers=1, dtype=torch.bfloat16)
        ids = torch.randint(0, model.config.vocab_size, (1, cfg.tokens), generator=gen)

        def fn(m, x):
            return m(input_ids=x).logits
        block = stock.moe_block(model)
        experts = block.experts
        return model, ids, fn, dict(hidden=model.config.hidden_size, intermediate=experts.intermediate_dim,
                                    experts=experts.num_experts, top_k=model.config.num_experts_per_tok)
    moe = stock.torchtitan_moe(cfg.model, cfg.shrink, dtype=torch.bfloat16)
    inner = moe.routed_experts.inner_experts
    dim, hid = inner.w1_EFD.shape[2], inner.w1_EFD.shape[1]
    x = torch.randn(1, cfg.tokens, dim, generator=gen).bfloat16()

    def fn(m, x):
        return m(x)
    return moe, x, fn, dict(hidden=dim, intermediate=hid, experts=inner.num_experts, top_k=moe.router.top_k)


def step(module, fn, x):
    for p in module.parameters():
        p.grad = None
    out = fn(module, x)
    out.float().square().mean().backward()


def saved_bytes(module, fn, x) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(module, x)
    del out
    return sum(seen.values())


def run(cfg: Config, min_run_time: float, rounds: int) -> dict:
    module, x, fn, shape = build(cfg)
    stock_mod, ours_mod = module, copy.deepcopy(module)
    compiled = {
        "stock": torch.compile(stock_mod, fullgraph=True, dynamic=True),
        "ours": torch.compile(ours_mod, fullgraph=True, dynamic=True, options=moe_compile.options()),
    }
    mods = {"stock": stock_mod, "ours": ours_mod}
    torch._dynamo.utils.counters.clear()
    # The first training-mode call compiles the forward, the first step the backward (neither timed).
    outs = {name: fn(c, x).detach().float() for name, c in compiled.items()}
    for name, c in compiled.items():
        step(c, fn, x)
    fired_train = dict(torch._dynamo.utils.counters[moe_compile.COUNTER])
    err = ((outs["ours"] - outs["stock"]).abs().max() / outs["stock"].abs().max()).item()
    env = dict(step=step, fn=fn, x=x, **compiled)
    times = interleaved_medians({name: f"step({name}, fn, x)" for name in compiled}, env, min_run_time, rounds)
    saved = {name: saved_bytes(c, fn, x) / 2**20 for name, c in compiled.items()}
    del mods
    row = dict(framework=cfg.framework, model=cfg.model, tokens=cfg.tokens, **shape,
               step_ms={k: v * 1e3 for k, v in times.items()}, saved_mb=saved,
               fired=fired_train, max_rel_diff=err,
               speedup=times["stock"] / times["ours"], memory=saved["ours"] / saved["stock"])
    where = f"{cfg.framework} bf16 models, compiled fwd+bwd"
    row["targets"] = targets(
        target(17, "speed", "ours/stock compiled, fwd+bwd speed", where, row["speedup"], ">=", 1.5),
        target(17, "mem", "ours/stock compiled, saved for backward", where, row["memory"], "<=", 0.6))
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "one small shape per framework, short timing (CI and tests: proves the script runs)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # transformers' and torchtitan's CPU autocast / lru_cache notices
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/torch-moe-ops/inductor"))
    min_run_time, rounds = (0.05, 1) if args.quick else (0.5, 2)
    doc = dict(benchmark="compile", meta=metadata(__file__, argv, args.quick), results=[])
    import transformers
    import torchtitan
    versions = dict(transformers=transformers.__version__, torchtitan=getattr(torchtitan, "__version__", "0.3.0"))
    doc["meta"]["versions"] = versions
    load = os.getloadavg()[0]
    doc["meta"]["note"] = (f"transformers {versions['transformers']}, torchtitan {versions['torchtitan']}. "
                           f"Load average {load:.1f} on {os.cpu_count()} cores at the start"
                           + (" (shared with other jobs: noisy)." if load > 1.5 else "."))
    print_machine()
    print("Stock MoE models (bf16, one MoE layer), torch.compile(fullgraph=True, dynamic=True) with and without "
          "torch_moe_ops.compile's passes, training step (fwd + bwd) side by side\n")
    for cfg in configs(args.quick):
        doc["results"].append(run(cfg, min_run_time, rounds))
        print("\n".join(tables.table("compile", dict(results=doc["results"][-1:])).splitlines()[2:]), flush=True)
    print()
    print(tables.table("compile", doc))
    return finish(doc, json_path("compile", args), tables.missed("compile", doc), args.check)


if __name__ == "__main__":
    sys.exit(main())

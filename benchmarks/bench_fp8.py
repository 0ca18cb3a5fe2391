"""fp8 benchmark: quantisation throughput and scaled grouped GEMM vs bfloat16.

1. quantize_fp8 / dequantize_fp8 in GB/s (bytes read + written) for every
   recipe on a (tokens, hidden) bfloat16 activation, against the same
   arithmetic in eager torch (amax, multiply, clamp, .to(float8)).
2. The expert up-projection of real MoE shapes (torch_moe_ops.shapes,
   the configs of bench_grouped_mm.py): a 2D x 3D grouped mm with uneven
   tokens per expert, GFLOP/s of

     bf16        torch.ops.moe_ops.grouped_mm in bfloat16 (out bfloat16)
     fp8         torch.ops.moe_ops.scaled_grouped_mm, rowwise e4m3 operands
                 (weights quantised once, as they would be cached)
     fp8+quant   the same plus quantize_fp8 of the activations per call
     fp8 mx      scaled_grouped_mm with MX (1x32, e8m0) operands

   Issue #6's target: fp8 >= 0.5x bf16. All timings of one row are taken
   side by side, interleaved in rounds (median round per statement).
3. Bytes of one MoE layer at full size (every model of torch_moe_ops.shapes): the
   expert weights (gate_up + down) and the expert GEMMs' inputs for 4096
   tokens, in bfloat16 against float8 data + scales, rowwise and MX. The
   float8 sizes are those quantize_fp8 returns, taken from its fake kernel
   (no full-size tensor is allocated).

    python benchmarks/bench_fp8.py [--quick] [--json PATH] [--check]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import torch_moe_ops.shapes
from _harness import interleaved_medians, print_machine, report
from bench_grouped_mm import configs, routed_offsets

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx")


@dataclass(frozen=True)
class QuantResult:
    recipe: str
    rows: int
    cols: int
    quantize_gbps: float
    dequantize_gbps: float
    eager_gbps: float


@dataclass(frozen=True)
class GemmResult:
    config: str
    experts: int
    rows: int
    k: int
    n: int
    bf16_gflops: float
    fp8_gflops: float
    fp8_quant_gflops: float
    fp8_mx_gflops: float

    @property
    def fp8_vs_bf16(self) -> float:
        return self.fp8_gflops / self.bf16_gflops


def eager_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise quantisation in eager torch, for scale: the same arithmetic as the kernel."""
    amax = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12)
    q = 448.0 / amax
    return (x.float() * q).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), q.reciprocal()


def run_quant(rows: int, cols: int, min_run_time: float, rounds: int) -> list[QuantResult]:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).bfloat16()
    # bf16 in (2 bytes) + fp8 out (1 byte); scales are < 1% of the traffic.
    nbytes = x.numel() * 3
    out = []
    for recipe in RECIPES:
        data, scale = torch.ops.moe_ops.quantize_fp8(x, recipe)
        env = dict(torch=torch, x=x, data=data, scale=scale, recipe=recipe, eager_quantize=eager_quantize)
        t = interleaved_medians({
            "q": "torch.ops.moe_ops.quantize_fp8(x, recipe)",
            "dq": "torch.ops.moe_ops.dequantize_fp8(data, scale, recipe, torch.bfloat16)",
            "eager": "eager_quantize(x)",
        }, env, min_run_time, rounds)
        out.append(QuantResult(recipe, rows, cols, nbytes / t["q"] / 1e9, nbytes / t["dq"] / 1e9,
                               nbytes / t["eager"] / 1e9))
    return out


def run_gemm(cfg, min_run_time: float, rounds: int) -> GemmResult:
    gen = torch.Generator().manual_seed(0)
    offs = routed_offsets(cfg, gen)
    a = torch.randn(cfg.rows, cfg.hidden, generator=gen).bfloat16()
    # Weights stored (G, N, K), used as (G, K, N) column-major: the layout
    # upstream's scaled kernels want and transformers stores.
    w = (torch.randn(cfg.experts, cfg.n, cfg.hidden, generator=gen) / cfg.hidden**0.5).bfloat16()
    b = w.transpose(-2, -1)
    q = torch.ops.moe_ops.quantize_fp8
    ad, as_ = q(a, "rowwise")
    wd, ws = q(w, "rowwise")
    am, ams = q(a, "mx")
    ams = torch.ops.moe_ops.swizzle_mx_scale(ams, offs, 0)  # upstream's layout for a 2-D operand
    wm, wms = q(w, "mx")
    bd, bm = wd.transpose(-2, -1), wm.transpose(-2, -1)
    # Sanity: fp8 against bf16 within fp8 quantisation noise (SQNR > 20 dB).
    ref = torch.ops.moe_ops.grouped_mm(a, b, offs).float()
    got = torch.ops.moe_ops.scaled_grouped_mm(ad, bd, as_, ws, offs).float()
    assert 10 * torch.log10(ref.pow(2).sum() / (got - ref).pow(2).sum()) > 20
    env = dict(torch=torch, a=a, b=b, offs=offs, ad=ad, as_=as_, bd=bd, ws=ws, am=am, ams=ams, bm=bm, wms=wms)
    t = interleaved_medians({
        "bf16": "torch.ops.moe_ops.grouped_mm(a, b, offs)",
        "fp8": "torch.ops.moe_ops.scaled_grouped_mm(ad, bd, as_, ws, offs)",
        "fp8_quant": "torch.ops.moe_ops.scaled_grouped_mm(*torch.ops.moe_ops.quantize_fp8(a, 'rowwise')[:1], bd, "
                     "torch.ops.moe_ops.quantize_fp8(a, 'rowwise')[1], ws, offs)",
        "fp8_mx": "torch.ops.moe_ops.scaled_grouped_mm(am, bm, ams, wms, offs)",
    }, env, min_run_time, rounds)
    gf = {k: cfg.flops / v / 1e9 for k, v in t.items()}
    return GemmResult(cfg.name, cfg.experts, cfg.rows, cfg.hidden, cfg.n, gf["bf16"], gf["fp8"], gf["fp8_quant"],
                      gf["fp8_mx"])


@dataclass(frozen=True)
class BytesResult:
    config: str
    weights_bf16_gb: float
    weights_rowwise_gb: float
    weights_mx_gb: float
    inputs_bf16_mb: float
    inputs_rowwise_mb: float
    inputs_mx_mb: float


def layer_bytes(name: str, entry: dict, tokens: int = 4096) -> BytesResult:
    """A layer's expert weights, quantised per output column (blocks along K,
    as the scaled GEMMs read them), and the inputs of its two expert GEMMs:
    tokens * top_k rows of H, then of I."""
    e, h, i, k = entry["experts"], entry["hidden"], entry["expert_intermediate"], entry["top_k"]
    shapes_w = [(e, 2 * i, h), (e, h, i)]  # transformers' (E, out, in) layouts
    shapes_x = [(tokens * k, h), (tokens * k, i)]

    def nbytes(shapes, recipe):
        total = 0
        with FakeTensorMode():
            for shape in shapes:
                t = torch.empty(shape, dtype=torch.bfloat16)
                if recipe is None:
                    total += t.numel() * t.element_size()
                    continue
                data, scale = torch_moe_ops.quantize_fp8(t, recipe)
                total += data.numel() * data.element_size() + scale.numel() * scale.element_size()
        return total

    return BytesResult(name, *(nbytes(shapes_w, r) / 1e9 for r in (None, "rowwise", "mx")),
                       *(nbytes(shapes_x, r) / 1e6 for r in (None, "rowwise", "mx")))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, shorter timing")
    parser.add_argument("--json", help="default: results/fp8.json (results/fp8-quick.json with --quick)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    args.json = args.json or os.path.join(HERE, "results", "fp8-quick.json" if args.quick else "fp8.json")
    min_run_time, rounds = (0.1, 2) if args.quick else (0.25, 3)
    print_machine()

    quant = run_quant(4096, 2048, min_run_time, rounds)
    print("\nquantize_fp8 / dequantize_fp8 of a (4096, 2048) bfloat16 activation, GB/s (bf16 + fp8 bytes)\n")
    print(f"{'recipe':<18} {'quantize':>9} {'dequant':>9} {'eager torch':>12}")
    for r in quant:
        print(f"{r.recipe:<18} {r.quantize_gbps:>9.2f} {r.dequantize_gbps:>9.2f} {r.eager_gbps:>12.2f}")

    cfgs = [c for c in configs(args.quick) if c.dtype == torch.bfloat16]
    gemm = [run_gemm(c, min_run_time, rounds) for c in cfgs]
    print("\nExpert up-projection (2D x 3D, uneven tokens per expert), GFLOP/s\n")
    head = (f"{'model':<15} {'G':>4} {'M':>6} {'K':>5} {'N':>5} {'bf16':>7} {'fp8':>7} {'fp8+quant':>9} "
            f"{'fp8 mx':>7} {'fp8/bf16':>8}")
    print(head + "\n" + "-" * len(head))
    for r in gemm:
        print(f"{r.config:<15} {r.experts:>4} {r.rows:>6} {r.k:>5} {r.n:>5} {r.bf16_gflops:>7.1f} {r.fp8_gflops:>7.1f} "
              f"{r.fp8_quant_gflops:>9.1f} {r.fp8_mx_gflops:>7.1f} {r.fp8_vs_bf16:>7.2f}x")
    checks = [(f"{r.config}: fp8 scaled_grouped_mm >= 0.5x bf16 grouped_mm ({r.fp8_vs_bf16:.2f}x)",
               r.fp8_vs_bf16 >= 0.5) for r in gemm]

    models = torch_moe_ops.shapes.models()
    sizes = [layer_bytes(name, entry) for name, entry in models.items()]
    print("\nOne full-size MoE layer: expert weights (GB) and expert GEMM inputs for 4096 tokens (MB)\n")
    head = (f"{'model':<16} {'w bf16':>7} {'w fp8':>7} {'w mx':>7} {'saved':>6} | {'x bf16':>7} {'x fp8':>7} "
            f"{'x mx':>7} {'saved':>6}")
    print(head + "\n" + "-" * len(head))
    for r in sizes:
        print(f"{r.config:<16} {r.weights_bf16_gb:>7.2f} {r.weights_rowwise_gb:>7.2f} {r.weights_mx_gb:>7.2f} "
              f"{1 - r.weights_rowwise_gb / r.weights_bf16_gb:>6.1%} | {r.inputs_bf16_mb:>7.1f} "
              f"{r.inputs_rowwise_mb:>7.1f} {r.inputs_mx_mb:>7.1f} {1 - r.inputs_rowwise_mb / r.inputs_bf16_mb:>6.1%}")
    return report(quant + gemm + sizes, checks, args.json, args.check)


if __name__ == "__main__":
    raise SystemExit(main())

"""Times every Triton kernel of torch_moe_ops on a (Hopper) GPU against the
baselines, after checking each against float64; one command, results and log
in one folder, within about ten minutes.

    PYTHONPATH=. python benchmarks/gpu/run.py --out DIR [--quick] [--budget SECONDS]

Writes DIR/results.json (every row: kernel, shape, implementation, time,
TFLOP/s and GB/s with their fraction of the device's peak, the timing method,
the float64 check) and DIR/run.log (everything printed). Needs only torch,
Triton and this checkout: not the compiled extension (torch_moe_ops._C), so
it runs on a machine with another torch (e.g. 2.11 with Triton 3.6) and no
compiler. On a machine without a CUDA GPU it writes both files saying so and
exits 0. Exit 1: a kernel failed its float64 check (timings are still
written).

Kernels (bfloat16 unless named): ``triton_grouped_mm`` (the MoE up and down
projections, 2D x 3D; the weight gradient, 2D x 2D), ``triton_grouped_mm_gather``
(the up projection reading the tokens through the routing), ``triton_expert_mlp``
and ``triton_expert_mlp_backward`` (the fused experts), and, when
``torch_moe_ops.triton.fp8`` exists, its scaled grouped GEMM (rowwise, and
DeepSeek-V3 blockwise at DeepGEMM's published shapes) and ``triton_quantize_fp8``.
Baselines: ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` (upstream's
CUTLASS kernels), the unfused torch path (a per-expert ``torch.mm`` loop; for the
experts, index_select + ``torch._grouped_mm`` + SwiGLU + ``torch._grouped_mm`` +
weighted combine, its backward by autograd) and, where installed, sonic-moe's
MoE layer (``pip install sonic-moe``; its timings include its router).

Timing: ``triton.testing.do_bench`` (median, L2 flushed between runs); a row
whose kernel takes under 0.2 ms is re-timed as a CUDA graph of launches over
inputs rotated through copies that together exceed twice the L2 (no launch
overhead, no L2 reuse between launches). The autotuner runs before timing.
TFLOP/s counts the useful FLOPs (2 M N K over the routed rows; the experts
6 T k I H forward, 12 T k I H backward); GB/s the bytes of the operation's
inputs and outputs, each once. Peaks: the datasheet's dense figures for the
device (table below), else derived from its SM count and clocks.

benchmarks/README.md ("Hopper timing") lists the published figures to compare
with: SonicMoE's paper and repository, DeepGEMM's README.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import math
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("moe_gpu_bench")

# Dense datasheet peaks: (name pattern, bf16 TFLOP/s, fp8 TFLOP/s, HBM TB/s). First match wins.
PEAKS = [
    (r"H100 PCIe", 756.5, 1513.0, 2.0),
    (r"H100 NVL", 835.5, 1671.0, 3.9),
    (r"GH200", 989.4, 1978.9, 4.0),
    (r"H200", 989.4, 1978.9, 4.8),
    (r"H100", 989.4, 1978.9, 3.35),  # SXM5
    (r"H800", 989.4, 1978.9, 3.35),
    (r"H20\b", 148.0, 296.0, 4.0),
]
SMALL_MS = 0.2
# Where and in which dtype the rows run: a CUDA GPU in bfloat16. test/test_gpu_benchmark.py runs the
# rows' code on CPU tensors in float32 (Triton's interpreter; its bfloat16 products are wrong).
DEVICE = "cuda"
DTYPE = torch.bfloat16
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


# --------------------------------------------------------------------- set-up


def setup_logging(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(out / "run.log", mode="w")):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def environment() -> dict:
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "triton": triton.__version__}
    try:
        import torch_moe_ops

        env["torch_moe_ops_extension"] = torch_moe_ops._C is not None
    except Exception as e:  # the kernels below do not need the package's ops
        env["torch_moe_ops_extension"] = f"import failed: {e}"
    try:
        import subprocess

        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except Exception:
        env["commit"] = None
    return env


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1), "l2_bytes": getattr(p, "L2_cache_size", 50 * 2**20)}
    for pattern, bf16, fp8, hbm in PEAKS:
        if re.search(pattern, p.name):
            info.update(peak_bf16_tflops=bf16, peak_fp8_tflops=fp8, peak_hbm_tbps=hbm, peak_source="datasheet")
            return info
    clock = getattr(p, "clock_rate", 0) * 1e3  # kHz -> Hz
    mem_clock, bus = getattr(p, "memory_clock_rate", 0) * 1e3, getattr(p, "memory_bus_width", 0)
    # Hopper: 4096 dense bf16 FLOP per clock per SM (989.4 TFLOP/s = 132 SMs x 1.83 GHz x 4096), fp8 twice.
    per_clock = 4096 if p.major >= 9 else 2048
    bf16 = p.multi_processor_count * clock * per_clock / 1e12 if clock else None
    info.update(peak_bf16_tflops=bf16, peak_fp8_tflops=2 * bf16 if bf16 and p.major >= 9 else None,
                peak_hbm_tbps=2 * mem_clock * bus / 8 / 1e12 if mem_clock and bus else None,
                peak_source="derived from SM count and clocks (no datasheet entry for this name)")
    return info


# -------------------------------------------------------------------- timing


def _free_memory() -> int:
    return torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 2**32


def rotations(bytes_per_set: int, l2_bytes: int, free_bytes: int) -> int:
    """Copies of a row's inputs to cycle through so that consecutive launches
    miss the L2: together at least twice its size, at most 8, within a quarter
    of the free memory."""
    want = math.ceil(2 * l2_bytes / max(bytes_per_set, 1))
    fit = max(1, free_bytes // 4 // max(bytes_per_set, 1))
    return int(max(1, min(want, 8, fit)))


def bench(fn: Callable[[int], object], sets: int, grad_to_none=None) -> tuple[float, str]:
    """Median milliseconds of fn(i), i cycling over the input sets."""
    import triton.testing

    fn(0)  # the autotuner (and any lazy set-up) runs here, not in the timing
    torch.cuda.synchronize()
    cycle = itertools.cycle(range(sets))
    ms = triton.testing.do_bench(lambda: fn(next(cycle)), warmup=25, rep=100, grad_to_none=grad_to_none,
                                 return_mode="median")
    if ms < SMALL_MS and grad_to_none is None:
        try:
            rounds = max(1, math.ceil(8 / sets))  # enough launches per replay to amortise the replay itself

            def all_sets():
                for _ in range(rounds):
                    for i in range(sets):
                        fn(i)

            ms = triton.testing.do_bench_cudagraph(all_sets, rep=50, return_mode="median") / (rounds * sets)
            return ms, f"cuda_graph x{rounds * sets} over {sets} input sets"
        except Exception as e:  # e.g. an operation that cannot be captured
            log.info("    (CUDA graph capture failed, keeping do_bench: %s)", str(e).splitlines()[0][:120])
    return ms, f"do_bench over {sets} input sets"


class Runner:
    def __init__(self, device: dict, budget_s: float, quick: bool):
        self.device, self.quick = device, quick
        self.deadline = time.monotonic() + budget_s
        self.rows: list[dict] = []
        self.failed_checks: list[str] = []
        self.skipped: list[str] = []

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def time_row(self, kernel: str, case: str, impl: str, fn, sets: int, flops: float, nbytes: float,
                 fp8: bool = False, note: str = "", grad_to_none=None) -> Optional[float]:
        if self.out_of_time():
            self.skipped.append(f"{kernel} {case} {impl}")
            return None
        row = {"kernel": kernel, "case": case, "impl": impl, "note": note}
        try:
            ms, method = bench(fn, sets, grad_to_none)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}"[:500])
            log.info("  %-34s %-26s FAILED: %s", kernel, impl, row["error"].splitlines()[0])
            self.rows.append(row)
            return None
        tflops = flops / ms / 1e9
        gbps = nbytes / ms / 1e6
        peak = self.device["peak_fp8_tflops" if fp8 else "peak_bf16_tflops"]
        hbm = self.device["peak_hbm_tbps"]
        row.update(ms=ms, method=method, tflops=tflops, gbps=gbps, flops=flops, bytes=nbytes,
                   pct_peak_flops=100 * tflops / peak if peak else None,
                   pct_peak_hbm=100 * gbps / (1e3 * hbm) if hbm else None)
        self.rows.append(row)
        log.info("  %-34s %-26s %9.3f ms %8.1f TFLOP/s (%5s%% of peak) %7.0f GB/s (%5s%% of HBM)  [%s]",
                 kernel, impl, ms, tflops, _pct(row["pct_peak_flops"]), gbps, _pct(row["pct_peak_hbm"]), method)
        return ms

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        log.info("  check %-40s %s (%s)", name, "ok" if ok else "FAILED", detail)
        if not ok:
            self.failed_checks.append(name)


def _pct(v):
    return f"{v:.0f}" if v is not None else "?"


# ------------------------------------------------------------------ problems


def routing(T: int, E: int, k: int, seed: int, local: Optional[int] = None):
    """Uniformly random top-k routing (distinct experts per token) over E
    experts, permuted as moe_ops.permute does (reference.torch_permute) for
    the local experts 0 .. local - 1 (expert parallelism: the other slots are
    -1 in dst_rows): (src_rows, offs, dst_rows, weights)."""
    from torch_moe_ops.reference import torch_permute

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = torch.rand(T, E, generator=g, device=DEVICE).topk(k, dim=1).indices
    weights = torch.rand(T, k, generator=g, device=DEVICE).softmax(1)
    _, dst_rows, src_rows, offs = torch_permute(torch.empty(T, 0, device=DEVICE), ids, E, 1, 0, local or E)
    return src_rows, offs, dst_rows, weights


def expert_weights(E: int, H: int, inter: int, seed: int, dtype=None):
    """gate_up (E, H, 2I) and down (E, I, H) stored as transformers and
    torchtitan store them, (E, 2I, H) and (E, H, I), passed transposed: the
    column-major weights torch._grouped_mm wants."""
    dtype = dtype or DTYPE
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w1 = (torch.randn(E, 2 * inter, H, generator=g, device=DEVICE) * H**-0.5).to(dtype).transpose(1, 2)
    w2 = (torch.randn(E, H, inter, generator=g, device=DEVICE) * inter**-0.5).to(dtype).transpose(1, 2)
    return w1, w2


def cases(quick: bool) -> list[dict]:
    """MoE layers of public models (torch_moe_ops.shapes) at a training
    micro-batch, and SonicMoE's benchmark points."""
    from torch_moe_ops import shapes

    out = []
    tokens = 1024 if quick else 16384
    names = ["qwen3-30b-a3b"] if quick else ["qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b", "mixtral-8x7b"]
    for name in names:
        m = shapes.model(name)
        out.append(_case(f"{name} T={tokens}", tokens, m["hidden"], m["expert_intermediate"], m["experts"],
                         m["top_k"]))
    if not quick:
        for name, p in shapes.load()["sonicmoe_benchmarks"].items():
            if not name.startswith("_"):
                out.append(_case(f"sonicmoe-{name} T={p['T']}", p["T"], p["H"], p["I"], p["E"], p["K"]))
    return out


WEIGHT_BUDGET = 8 * 2**30


def _case(name, T, H, inter, E, k) -> dict:
    """A layer whose bf16 expert weights exceed 8 GiB is run as one rank of
    expert parallelism (EP, a power of two): E / EP local experts, each with the
    rows it gets from the T tokens (as many per expert as without EP)."""
    ep = 1
    while 3 * 2 * (E // ep) * H * inter > WEIGHT_BUDGET and E // ep > 1:
        ep *= 2
    if ep > 1:
        name += f" EP={ep} ({E // ep} of {E} experts local)"
    return dict(name=name, T=T, H=H, I=inter, E=E, E_local=E // ep, k=k)


# -------------------------------------------------------------- float64 checks


def grouped_mm_error_ok(out, a, b, offs) -> tuple[bool, str]:
    """Per element: fp32 accumulation of K products (any order) is within
    (K + 2) 2^-24 of the sum of the absolute terms; one rounding to the output
    dtype adds u_out |exact|."""
    from torch_moe_ops.reference import torch_grouped_mm

    exact = torch_grouped_mm(a, b, offs, None, torch.float64)
    mag = torch_grouped_mm(a.abs(), b.abs(), offs, None, torch.float64)
    u_out = UNIT_ROUNDOFF[out.dtype]
    acc = (a.shape[-1] + 2) * 2.0**-24 * mag
    tol = 1.01 * (acc + u_out * (exact.abs() + acc))
    err = (out.double() - exact).abs()
    worst = (err / tol.clamp_min(1e-300)).max().item() if err.numel() else 0.0
    return bool((err <= tol).all()), f"max err / bound = {worst:.3f}"


def rel_error(got, exact) -> float:
    """Norm-wise relative error ||got - exact|| / ||exact||."""
    exact = exact.double()
    den = exact.norm().item()
    return (got.double() - exact).norm().item() / den if den else (got.double() - exact).norm().item()


def check_grouped(r: Runner, case: dict) -> None:
    from torch_moe_ops.triton import triton_grouped_mm, triton_grouped_mm_gather
    from torch_moe_ops.reference import torch_grouped_mm

    T, H, inter, E, k = (min(case["T"], 2048), case["H"], case["I"], case["E_local"], case["k"])
    src_rows, offs, dst_rows, _ = routing(T, case["E"], k, seed=1, local=E)
    w1, w2 = expert_weights(E, H, inter, seed=2)
    x = torch.randn(T, H, device=DEVICE).to(DTYPE)
    xr = x[src_rows.div(k, rounding_mode="floor")]
    ok, detail = grouped_mm_error_ok(triton_grouped_mm(xr, w1, offs), xr, w1, offs)
    r.check(f"grouped_mm 2d3d {case['name']}", ok, detail)
    rows = src_rows.div(k, rounding_mode="floor")
    ok, detail = grouped_mm_error_ok(triton_grouped_mm_gather(x, w1, offs, rows), xr, w1, offs)
    r.check(f"grouped_mm_gather {case['name']}", ok, detail)
    dy = torch.randn(xr.shape[0], 2 * inter, device=DEVICE).to(DTYPE)
    got = triton_grouped_mm(xr.t(), dy, offs)
    exact = torch_grouped_mm(xr.t(), dy, offs, None, torch.float64)
    mag = torch_grouped_mm(xr.t().abs(), dy.abs(), offs, None, torch.float64)
    tol = 1.01 * ((xr.shape[0] + 2) * 2.0**-24 * mag + UNIT_ROUNDOFF[got.dtype] * exact.abs())
    err = (got.double() - exact).abs()
    r.check(f"grouped_mm 2d2d {case['name']}", bool((err <= tol).all()),
            f"max err / bound = {(err / tol.clamp_min(1e-300)).max().item():.3f}")


def check_experts(r: Runner, case: dict) -> None:
    """The fused experts' forward and six gradients against float64 (autograd
    through reference.torch_expert_mlp on float64 copies). bfloat16 rounds h,
    act(h), dh and the outputs once each (u = 2^-8), a few u of norm-wise
    error; a misplaced row or column would err by the order of the values
    themselves: the norm-wise bound 2^-6 separates the two."""
    from torch_moe_ops.reference import torch_expert_mlp
    from torch_moe_ops.triton import triton_expert_mlp, triton_expert_mlp_backward

    T, H, inter, E, k = (min(case["T"], 2048), case["H"], case["I"], case["E_local"], case["k"])
    src_rows, offs, dst_rows, weights = routing(T, case["E"], k, seed=3, local=E)
    w1, w2 = expert_weights(E, H, inter, seed=4)
    x = torch.randn(T, H, device=DEVICE).to(DTYPE)
    out, h = triton_expert_mlp(x, src_rows, offs, dst_rows, weights, w1, w2)
    leaves = [t.detach().double().requires_grad_() for t in (x, weights, w1, w2)]
    ref_out, ref_h = torch_expert_mlp(leaves[0], src_rows, offs, dst_rows, leaves[1], leaves[2], leaves[3])
    bound = 2.0**-6
    errs = {"out": rel_error(out, ref_out), "h": rel_error(h, ref_h)}
    grad = torch.randn(T, H, device=DEVICE).to(DTYPE)
    got = triton_expert_mlp_backward(grad, x, src_rows, offs, dst_rows, weights, w1, w2, None, None, h, "swiglu",
                                     False, 1.702, 7.0, (True, True, True, True))
    want = torch.autograd.grad(ref_out, leaves, grad.double())
    for name, g, w in zip(("grad tokens", "grad weights", "grad gate_up", "grad down"), got, want):
        errs[name] = rel_error(g, w)
    worst = max(errs.values())
    r.check(f"expert_mlp fwd+bwd {case['name']}", worst <= bound,
            "norm-wise relative errors " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) + f" (bound {bound:.1e})")
    fp8_forward = _fp8_experts()
    if fp8_forward is not None:
        # act and the down weights in e4m3 (3 mantissa bits: 2^-4 relative per element, a few percent
        # norm-wise for the two together); a misplaced row or block scale errs by the values themselves.
        fp8_bound = 2.0**-3
        fp8_errs = {}
        for recipe in FP8_EXPERT_RECIPES:
            down, scale = fp8_down_weights(w2, recipe)
            got8 = fp8_forward(x, src_rows, offs, dst_rows, weights, w1, down, scale, recipe=recipe)
            fp8_errs[recipe] = rel_error(got8, ref_out)
        r.check(f"expert_mlp fp8 forward {case['name']}", max(fp8_errs.values()) <= fp8_bound,
                "norm-wise relative errors " + ", ".join(f"{n} {e:.1e}" for n, e in fp8_errs.items())
                + f" (bound {fp8_bound:.1e})")


# act quantised in the gate/up epilogue for an fp8 down GEMM: the recipe of act (and of the down weights).
FP8_EXPERT_RECIPES = ("blockwise_1x128", "mx", "rowwise")
_FP8_WEIGHT_RECIPE = {"blockwise_1x128": "blockwise_128x128", "mx": "mx", "rowwise": "rowwise"}


def _fp8_experts():
    """triton_expert_mlp_fp8, or None in a checkout without it."""
    from torch_moe_ops.triton import experts

    return getattr(experts, "triton_expert_mlp_fp8", None)


def fp8_down_weights(w2, recipe: str):
    """The down weights (E, I, H) in e4m3 with their scales per output column
    (blocks along I), as triton_expert_mlp_fp8 takes them."""
    from torch_moe_ops.triton import triton_quantize_fp8

    data, scale = triton_quantize_fp8(w2.transpose(1, 2), _FP8_WEIGHT_RECIPE[recipe])
    return data.transpose(1, 2), scale


# ------------------------------------------------------------------- timings


def time_grouped(r: Runner, case: dict) -> None:
    from torch_moe_ops.triton import triton_grouped_mm, triton_grouped_mm_gather

    T, H, inter, E, k = case["T"], case["H"], case["I"], case["E_local"], case["k"]
    src_rows, offs, dst_rows, _ = routing(T, case["E"], k, seed=5, local=E)
    R = src_rows.shape[0]
    rows = src_rows.div(k, rounding_mode="floor")
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()  # the unfused loop's host-side sizes (untimed)
    free = _free_memory()
    l2 = r.device["l2_bytes"]
    el = DTYPE.itemsize
    for label, K, N in (("up (gate+up proj)", H, 2 * inter), ("down proj", inter, H)):
        per_set = el * (R * K + E * K * N + R * N)
        n = rotations(per_set, l2, free)
        a = [torch.randn(R, K, device=DEVICE).to(DTYPE) for _ in range(n)]
        b = [expert_weights(E, K, N // 2, seed=10 + i)[0] if label.startswith("up") else
             expert_weights(E, N, K, seed=10 + i)[1] for i in range(n)]
        flops, nbytes = 2.0 * R * K * N, per_set
        kname = f"grouped_mm 2d3d {label}"
        r.time_row(kname, case["name"], "triton", lambda i: triton_grouped_mm(a[i], b[i], offs), n, flops, nbytes)
        r.time_row(kname, case["name"], "torch._grouped_mm", lambda i: torch._grouped_mm(a[i], b[i], offs), n,
                   flops, nbytes)

        def loop(i):
            outs, start = [], 0
            for g, m in enumerate(sizes):
                outs.append(a[i][start:start + m] @ b[i][g])
                start += m
            return torch.cat(outs)

        r.time_row(kname, case["name"], "unfused (torch.mm per expert)", loop, n, flops, nbytes)
        if label.startswith("up"):
            x = [torch.randn(T, K, device=DEVICE).to(DTYPE) for _ in range(n)]
            gname = "grouped_mm_gather up (tokens read by routing)"
            gbytes = el * (T * K + E * K * N + R * N)
            r.time_row(gname, case["name"], "triton", lambda i: triton_grouped_mm_gather(x[i], b[i], offs, rows), n,
                       flops, gbytes)
            r.time_row(gname, case["name"], "index_select + torch._grouped_mm",
                       lambda i: torch._grouped_mm(x[i].index_select(0, rows), b[i], offs), n, flops, gbytes)
        del a, b
    # The weight gradient of the up projection: 2D x 2D over the routed rows, (E, H, 2I).
    K, N = H, 2 * inter
    per_set = el * (R * K + R * N + E * K * N)
    n = rotations(per_set, l2, free)
    xs = [torch.randn(R, K, device=DEVICE).to(DTYPE) for _ in range(n)]
    dys = [torch.randn(R, N, device=DEVICE).to(DTYPE) for _ in range(n)]
    kname = "grouped_mm 2d2d wgrad (up proj)"
    r.time_row(kname, case["name"], "triton", lambda i: triton_grouped_mm(xs[i].t(), dys[i], offs), n,
               2.0 * R * K * N, per_set)
    r.time_row(kname, case["name"], "torch._grouped_mm", lambda i: torch._grouped_mm(xs[i].t(), dys[i], offs), n,
               2.0 * R * K * N, per_set)


def unfused_experts(x, rows, offs, dst_rows, weights, w1, w2):
    """The unfused torch MoE experts: gather, grouped GEMM, SwiGLU, grouped
    GEMM, weighted combine (autograd gives the backward)."""
    h = torch._grouped_mm(x.index_select(0, rows), w1, offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2, offs)
    y = torch.cat([y, y.new_zeros(1, y.shape[1])])[torch.where(dst_rows >= 0, dst_rows, y.shape[0])]
    return (y.float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)


def time_experts(r: Runner, case: dict, sonic) -> None:
    from torch_moe_ops.triton import triton_expert_mlp, triton_expert_mlp_backward

    T, H, inter, E, k = case["T"], case["H"], case["I"], case["E_local"], case["k"]
    src_rows, offs, dst_rows, weights = routing(T, case["E"], k, seed=6, local=E)
    rows = src_rows.div(k, rounding_mode="floor")
    R = src_rows.shape[0]
    el = DTYPE.itemsize
    w_bytes = el * 3 * E * H * inter
    fwd_bytes = el * (2 * T * H + R * 2 * inter) + w_bytes  # tokens, out, h (kept), weights
    bwd_bytes = el * (3 * T * H + R * 2 * inter) + 2 * w_bytes  # grad_out, tokens, grad tokens, h; weights, grads
    n = rotations(el * T * H * 2 + w_bytes, r.device["l2_bytes"], _free_memory())
    ws = [expert_weights(E, H, inter, seed=20 + i) for i in range(n)]
    xs = [torch.randn(T, H, device=DEVICE).to(DTYPE) for _ in range(n)]
    fwd_flops, bwd_flops = 6.0 * R * inter * H, 12.0 * R * inter * H
    name = case["name"]
    r.time_row("expert_mlp forward", name, "triton (fused)",
               lambda i: triton_expert_mlp(xs[i], src_rows, offs, dst_rows, weights, *ws[i]), n, fwd_flops,
               fwd_bytes)
    r.time_row("expert_mlp forward", name, "unfused torch (_grouped_mm)",
               lambda i: unfused_experts(xs[i], rows, offs, dst_rows, weights, *ws[i]), n, fwd_flops, fwd_bytes)
    hs = [triton_expert_mlp(xs[i], src_rows, offs, dst_rows, weights, *ws[i])[1] for i in range(n)]
    grads = [torch.randn(T, H, device=DEVICE).to(DTYPE) for _ in range(n)]
    r.time_row("expert_mlp backward", name, "triton (fused)",
               lambda i: triton_expert_mlp_backward(grads[i], xs[i], src_rows, offs, dst_rows, weights, *ws[i], None,
                                                    None, hs[i], "swiglu", False, 1.702, 7.0,
                                                    (True, True, True, True)), n, bwd_flops, bwd_bytes)
    del hs
    fp8_forward = _fp8_experts()
    if fp8_forward is not None:
        # The forward with act stored in float8 by the gate/up epilogue and the down GEMM in fp8
        # (inference): 1 byte per act and down-weight element; rowwise computes the gate/up GEMM twice.
        fp8_bytes = el * (2 * T * H + 2 * E * H * inter) + R * inter + E * H * inter
        for recipe in FP8_EXPERT_RECIPES:
            downs = [fp8_down_weights(ws[i][1], recipe) for i in range(n)]
            r.time_row(f"expert_mlp forward, fp8 down ({recipe} act)", name, "triton (fused)",
                       lambda i: fp8_forward(xs[i], src_rows, offs, dst_rows, weights, ws[i][0], *downs[i],
                                             recipe=recipe), n, fwd_flops, fp8_bytes,
                       note="gate/up in the tokens' dtype, down GEMM in e4m3; FLOPs as the 16-bit forward")
            del downs
    leaves = [[xs[i].detach().requires_grad_(), ws[i][0].detach().requires_grad_(),
               ws[i][1].detach().requires_grad_()] for i in range(n)]
    outs = [unfused_experts(lv[0], rows, offs, dst_rows, weights, lv[1], lv[2]) for lv in leaves]
    r.time_row("expert_mlp backward", name, "unfused torch (autograd)",
               lambda i: outs[i].backward(grads[i], retain_graph=True), n, bwd_flops, bwd_bytes,
               grad_to_none=[t for lv in leaves for t in lv])
    del outs, leaves
    if sonic is not None and case["E_local"] == case["E"]:
        time_sonic(r, case, sonic, fwd_flops, bwd_flops, fwd_bytes, bwd_bytes)


def time_sonic(r: Runner, case: dict, sonic, fwd_flops, bwd_flops, fwd_bytes, bwd_bytes) -> None:
    """sonic-moe's MoE layer (router included), forward and forward + backward."""
    T, H, inter, E, k = case["T"], case["H"], case["I"], case["E"], case["k"]
    note = "sonic-moe's MoE layer: includes its router and routing"
    try:
        moe = sonic.MoE(num_experts=E, num_experts_per_tok=k, hidden_size=H, intermediate_size=inter,
                        activation_function=sonic.ActivationType.SWIGLU, add_bias=False, std=0.02)
        moe = moe.to(device=DEVICE, dtype=DTYPE)
    except Exception as e:
        r.rows.append({"kernel": "expert_mlp", "case": case["name"], "impl": "sonic-moe",
                       "error": f"could not build sonic-moe's MoE: {type(e).__name__}: {e}"[:500]})
        log.info("  sonic-moe: could not build its MoE layer: %s", e)
        return
    x = torch.randn(T, H, device=DEVICE).to(DTYPE).requires_grad_()
    grad = torch.randn(T, H, device=DEVICE).to(DTYPE)

    def fwd(i):
        return moe(x, kernel_backend_moe=sonic.KernelBackendMoE.sonicmoe)[0]

    def fwd_bwd(i):
        fwd(i).backward(grad)

    fms = r.time_row("expert_mlp forward", case["name"], "sonic-moe", fwd, 1, fwd_flops, fwd_bytes, note=note)
    both = r.time_row("expert_mlp forward+backward", case["name"], "sonic-moe", fwd_bwd, 1,
                      fwd_flops + bwd_flops, fwd_bytes + bwd_bytes, note=note,
                      grad_to_none=[x, *moe.parameters()])
    if fms is not None and both is not None:
        log.info("  sonic-moe backward alone (difference): %.3f ms", both - fms)


def time_fp8(r: Runner, fp8) -> None:
    """The fp8 Triton kernels, if present: rowwise against torch._scaled_grouped_mm
    on a Qwen3 and a DeepSeek-V3 up projection, DeepSeek-V3 blockwise at
    DeepGEMM's published contiguous-layout shapes, and the quantisation."""
    g = torch.Generator(device=DEVICE).manual_seed(7)
    l2 = r.device["l2_bytes"]
    shapes = [("deepgemm G=4 M=8192 N=4096 K=7168", 4, 8192, 4096, 7168),
              ("deepgemm G=4 M=8192 N=7168 K=2048", 4, 8192, 7168, 2048),
              ("deepgemm G=8 M=4096 N=4096 K=7168", 8, 4096, 4096, 7168),
              ("deepgemm G=8 M=4096 N=7168 K=2048", 8, 4096, 7168, 2048)]
    if r.quick:
        shapes = [("G=4 M=512 N=1024 K=1024", 4, 512, 1024, 1024)]
    for name, G, Mg, N, K in shapes:
        M = G * Mg
        offs = torch.arange(1, G + 1, device=DEVICE, dtype=torch.int32) * Mg
        a_hp = torch.randn(M, K, generator=g, device=DEVICE).to(DTYPE)
        w_hp = (torch.randn(G, N, K, generator=g, device=DEVICE) * K**-0.5).to(DTYPE)
        flops, nbytes = 2.0 * M * N * K, M * K + G * K * N + 2 * M * N
        n = rotations(nbytes, l2, _free_memory())
        for recipe_a, recipe_b, label in (("rowwise", "rowwise", "rowwise"),
                                          ("blockwise_1x128", "blockwise_128x128", "blockwise (DeepSeek-V3)")):
            try:
                qa = fp8.triton_quantize_fp8(a_hp, recipe_a)
                qb = fp8.triton_quantize_fp8(w_hp, recipe_b)
            except Exception as e:
                r.rows.append({"kernel": f"scaled_grouped_mm {label}", "case": name, "impl": "triton",
                               "error": f"quantisation failed: {type(e).__name__}: {e}"[:500]})
                continue
            b8 = qb[0].transpose(-2, -1)  # (G, K, N), column-major: the layout scaled GEMMs take
            sa, sb = qa[1], qb[1]
            kname = f"scaled_grouped_mm {label}"
            r.time_row(kname, name, "triton", lambda i: fp8.triton_scaled_grouped_mm(qa[0], b8, sa, sb, offs), n,
                       flops, nbytes, fp8=True)
            if recipe_a == "rowwise":
                r.time_row(kname, name, "torch._scaled_grouped_mm",
                           lambda i: torch._scaled_grouped_mm(qa[0], b8, sa, sb, offs=offs, out_dtype=torch.bfloat16),
                           n, flops, nbytes, fp8=True)
        r.time_row("quantize_fp8 blockwise_1x128 (activations)", name, "triton",
                   lambda i: fp8.triton_quantize_fp8(a_hp, "blockwise_1x128"), 1, 0.0, 2 * M * K + M * K,
                   note="memory-bound: GB/s is the figure")


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and run.log")
    parser.add_argument("--quick", action="store_true", help="one small shape, to see that everything runs")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds after which no new row starts (default 480: the run ends within ~10 min)")
    args = parser.parse_args(argv)
    setup_logging(args.out)
    started = time.monotonic()
    result = {"benchmark": "gpu", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "environment": environment()}
    log.info("torch_moe_ops GPU benchmark: %s", json.dumps(result["environment"]))
    if not torch.cuda.is_available():
        msg = ("no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to time. Run this "
               "on a Hopper GPU (H100/H800/H200); the kernels' CPU checks are test/test_triton_*.py.")
        log.info(msg)
        result.update(status="no_gpu", message=msg)
        (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0
    import triton  # noqa: F401  (a CUDA torch without Triton fails here, plainly)

    device = device_info()
    result["device"] = device
    log.info("device: %s", json.dumps(device))
    if not device["capability"].startswith("9."):
        log.info("not a Hopper GPU (sm_%s): no TMA/wgmma; the kernels run and are timed anyway",
                 device["capability"].replace(".", ""))
    torch.backends.cuda.matmul.allow_tf32 = False
    runner = Runner(device, args.budget, args.quick)
    try:
        from torch_moe_ops.triton import fp8
    except ImportError:
        fp8 = None
        log.info("torch_moe_ops.triton.fp8 is not in this checkout: no fp8 rows")
    try:
        import sonicmoe
        from sonicmoe.enums import ActivationType

        sonic = type("Sonic", (), dict(MoE=sonicmoe.MoE, KernelBackendMoE=sonicmoe.KernelBackendMoE,
                                       ActivationType=ActivationType))
        result["environment"]["sonic_moe"] = getattr(sonicmoe, "__version__", "installed")
    except Exception as e:
        sonic = None
        log.info("sonic-moe not usable here (%s: %s): no sonic-moe rows", type(e).__name__, e)
    for case in cases(args.quick):
        log.info("== %s: T=%d H=%d I=%d E=%d (local %d) k=%d", case["name"], case["T"], case["H"], case["I"],
                 case["E"], case["E_local"], case["k"])
        for step in (check_grouped, check_experts, time_grouped, lambda r, c: time_experts(r, c, sonic)):
            if runner.out_of_time():
                break
            try:
                step(runner, case)
            except Exception:
                runner.rows.append({"case": case["name"], "error": traceback.format_exc()[-2000:]})
                log.info("  step failed:\n%s", traceback.format_exc())
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if fp8 is not None and not runner.out_of_time():
        log.info("== fp8")
        try:
            time_fp8(runner, fp8)
        except Exception:
            runner.rows.append({"case": "fp8", "error": traceback.format_exc()[-2000:]})
            log.info("  fp8 failed:\n%s", traceback.format_exc())
    result.update(status="ok" if not runner.failed_checks else "check_failed", rows=runner.rows,
                  failed_checks=runner.failed_checks, skipped_for_time=runner.skipped,
                  seconds=round(time.monotonic() - started, 1))
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    log.info("done in %.0f s: %d rows, %d failed checks%s; wrote %s", result["seconds"], len(runner.rows),
             len(runner.failed_checks), f", {len(runner.skipped)} rows skipped for time" if runner.skipped else "",
             args.out)
    return 1 if runner.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())

"""The Triton kernels compiled ahead of time for sm_90a, on a machine with no GPU
(torch_moe_ops/triton/aot.py): every variant in every configuration its
autotuner may pick compiles; 16-bit and tf32 GEMMs issue wgmma (PTX) / HGMMA
(SASS), the exact fp32 path does not; ptxas spills nothing; and the checked-in
report benchmarks/gpu/kernels.json (registers, spills, shared memory, SASS
instruction counts) is what this Triton and ptxas produce.

A kernel change changes the report: regenerate it with
``TORCH_MOE_OPS_REGEN_KERNELS=1`` on this test (or benchmarks/gpu/kernels.py)
and commit it, so the review sees the resource changes.

A separate module from test_triton_grouped_mm.py: the fused experts' kernels
(triton/experts.py: the gate/up GEMM with its activation epilogue, the down
GEMM, the combine) and the fp8 kernels (triton/fp8.py: the scaled grouped GEMM
for rowwise, blockwise and MX scales, whose SASS must hold QGMMA, and the
quantiser) are in this report and these checks.

What only a GPU can verify: that the cubins load and run (occupancy with these
registers and shared memory, the launch itself), the numerics of wgmma and tf32,
the pipelining's memory ordering, TMA behaviour (descriptor creation in global
scratch, the zero fill past each group's K and N, which the interpreter
emulates), and timing.

Compiling is seconds per kernel; entries are cached by content under
~/.cache/torch-moe-ops/triton-aot, so only changed kernels recompile.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from torch_moe_ops.triton import aot
from torch_moe_ops.triton import grouped_mm as tgm

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "gpu" / "kernels.json"
SM90_SMEM_PER_BLOCK = 227 * 1024  # H100: the most dynamic shared memory one block may opt into
MAX_REGS = 255


@pytest.fixture(scope="module")
def report():
    """aot.report(), computed in a fresh process (see fresh_compile: entries
    the content cache lacks are compiled, which fails after this process ran
    Triton's interpreter), read back through JSON as the stored report is."""
    return json.loads(_fresh_python("import json, sys\nfrom torch_moe_ops.triton import aot\n"
                                    "json.dump(aot.report(), sys.stdout)\n", timeout=3600))


def test_report_is_up_to_date(report):
    if os.environ.get("TORCH_MOE_OPS_REGEN_KERNELS") == "1":
        sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
        import kernels

        kernels.write(report, REPORT)
    stored = json.loads(REPORT.read_text())
    assert stored == report, (
        "benchmarks/gpu/kernels.json is stale: rerun with TORCH_MOE_OPS_REGEN_KERNELS=1 and commit it. "
        + "\n".join(f"{a} != {b}" for a, b in zip(stored["kernels"], report["kernels"]) if a != b)
        + f"\n{ {k: v for k, v in stored.items() if k != 'kernels'} } vs "
        f"{ {k: v for k, v in report.items() if k != 'kernels'} }")


VARIANTS = {v.name: v for v in aot.all_variants()}


def _gemms_per_k_step(variant) -> int:
    """tl.dot calls per K step: the gate/up GEMM of a gated activation has two accumulators."""
    if variant.kernel in ("expert_combine", "quantize_fp8"):
        return 0
    if variant.kernel == "expert_gate_up":
        gated = 2 if variant.make(variant.dtype)[1]["activation"] in ("swiglu", "geglu", "swiglu_clamped") else 1
        # Rowwise float8 act: the K loop twice (the amax sweep, then the stores).
        return gated * (2 if variant.quant == "rowwise" else 1)
    return 1


def test_every_autotuner_config_of_every_variant_is_compiled(report):
    compiled = {(k["variant"], tuple(sorted(k["config"].items()))) for k in report["kernels"]}
    variants = aot.grouped_mm_variants()
    assert {v.layout for v in variants} >= {"2d3d", "2d3d_b_nk", "2d3d_gather_bias", "3d2d", "2d2d",
                                           "2d2d_gather", "3d3d"}
    assert {v.layout for v in variants if v.tma} == {"2d3d", "2d3d_b_nk", "2d3d_gather_bias", "3d3d"}
    experts = aot.expert_mlp_variants()
    assert {v.kernel for v in experts} == {"expert_gate_up", "expert_down", "expert_dgrad", "expert_combine"}
    assert {v.make(v.dtype)[1]["activation"] for v in experts if v.kernel == "expert_gate_up"} >= {
        "swiglu", "geglu", "swiglu_clamped", "gelu"}
    assert {v.kernel for v in experts if v.tma} == {"expert_gate_up", "expert_down", "expert_dgrad"}
    assert {v.quant for v in experts if v.kernel == "expert_gate_up"} == {None, "rowwise", "blockwise_1x128", "mx"}
    assert any(v.weighted for v in experts if v.kernel == "expert_combine")
    scaled = aot.scaled_grouped_mm_variants()
    recipes = {(v.name.split("_")[1], v.layout) for v in scaled}
    assert recipes == {("rowwise", "2d3d"), ("rowwise", "3d2d"), ("rowwise", "2d2d"), ("rowwise", "3d3d"),
                       ("blockwise", "2d3d"), ("blockwise", "3d3d"), ("mx", "2d3d"), ("mx", "3d3d"), ("mx", "2d2d")}
    assert {v.name.split("_")[1] for v in scaled if v.tma} == {"rowwise", "blockwise", "mx"}
    assert {v.make(v.dtype)[0][1] for v in aot.quantize_fp8_variants()} == {
        "tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx"}
    assert len(VARIANTS) == len(variants) + len(experts) + len(aot.fp8_variants())  # names are unique
    for v in VARIANTS.values():
        configs = aot.configs_for_variant(v)
        assert configs == (tgm.configs_for(v.dtype) if v.kernel == "grouped_mm" else configs)
        for c in configs:
            key = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            assert (v.name, tuple(sorted(key.items()))) in compiled


def test_no_spills_and_resources_fit_sm90(report):
    for k in report["kernels"]:
        where = f"{k['variant']} {k['config']}"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, where
        assert k["local"] == 0 and k["stack"] == 0 and k["LDL_STL"] == 0, where
        assert k["regs"] == k["ptxas_regs"] <= MAX_REGS, where
        smem = k["smem_dynamic"] + k["smem_static"]
        if k["kernel"] == "combine_kernel":  # elementwise: no shared memory at all
            assert smem == 0, where
        elif k["kernel"] == "quantize_fp8_kernel":
            # The cross-warp reductions' scratch; a transposed input (a weight
            # quantised per output column) also goes through a layout conversion.
            assert smem <= (16384 if "transposed" in k["variant"] else 4096), where
        else:
            assert 0 < smem <= SM90_SMEM_PER_BLOCK, where


def test_matrix_instructions(report):
    """bf16/fp16 and tf32: wgmma in the PTX, HGMMA in the SASS, the K loop
    pipelined with cp.async (LDGSTS). Exact fp32: no tensor cores (FFMA).
    float64: DMMA (the fp64 tensor cores' mma.sync).
    The gated gate/up GEMM issues two per K step (gate and up accumulators);
    the combine none."""
    for k in report["kernels"]:
        where = f"{k['variant']} {k['config']}"
        gemms = _gemms_per_k_step(VARIANTS[k["variant"]])
        if gemms == 0:  # the combine and the quantiser: loads, fp32 arithmetic, stores
            assert k["kernel"] in ("combine_kernel", "quantize_fp8_kernel"), where
            assert k["HGMMA"] == k["QGMMA"] == k["ptx_wgmma"] == k["HMMA"] == 0, where
            assert k["UTMALDG"] == 0 and k["global_scratch"] == 0, where
            continue
        exact_fp32 = k["dtype"] == "float32" and not k["variant"].endswith("tf32")
        if k["dtype"] == "float64":  # Hopper's fp64 tensor cores (DMMA), no wgmma
            assert k["HGMMA"] == k["ptx_wgmma"] == k["HMMA"] == 0 and k["DMMA"] > 0, where
        elif k["kernel"] == "scaled_grouped_mm_kernel":  # fp8: QGMMA (wgmma k32), never the 16-bit HGMMA
            # Per k32 step, one m64 wgmma per 64 rows of each warpgroup's share of the
            # tile (warpgroups split M, or N when M has too few rows for them all).
            c = k["config"]
            steps = c["BLOCK_K"] // 32 * max(1, c["BLOCK_M"] // (16 * c["num_warps"]))
            assert k["ptx_wgmma"] == steps and k["QGMMA"] == steps and k["HGMMA"] == k["HMMA"] == 0, where
        elif exact_fp32:
            assert k["HGMMA"] == k["ptx_wgmma"] == k["HMMA"] == 0 and k["FFMA"] > 0, where
        else:
            steps = gemms * k["config"]["BLOCK_K"] // (8 if k["dtype"] == "float32" else 16)
            assert k["ptx_wgmma"] == steps and k["HGMMA"] == steps, where  # one per K step of each tile
            assert k["QGMMA"] == 0, where
        if k["variant"].endswith("_tma"):  # B by TMA (device-side descriptor in global scratch), A by cp.async
            assert k["UTMALDG"] == gemms * k["config"]["num_stages"] and k["global_scratch"] > 0, where
        else:
            assert k["UTMALDG"] == 0 and k["global_scratch"] == 0, where
        if k["kernel"] == "scaled_grouped_mm_kernel" and "_2d2d" in k["variant"]:
            # The fp8 weight gradient's loads are staged in registers, not
            # cp.async: a known gap of this layout, to be tuned on a GPU.
            assert k["LDGSTS"] == 0, where
        else:
            assert k["LDGSTS"] > 0, where


_FRESH_COMPILE = """
import json, sys
from torch_moe_ops.triton import aot
variants = {v.name: v for v in aot.all_variants()}
variant = variants[sys.argv[1]]
keep = {}
entry = aot.compile_entry(variant, aot.configs_for_variant(variant)[0], use_cache=False, keep=keep)
json.dump({"entry": entry, "keep": {k: keep[k] for k in ("ptx", "sass", "ptxas_log")}}, sys.stdout)
"""


def fresh_compile(name: str) -> tuple[dict, dict]:
    """compile_entry(variant, its first config) with no cache, in a fresh
    process: Triton's interpreter, which other tests in this process may have
    run, patches triton.language in place, and a real compile after it fails
    ("'block_argument' object has no attribute 'dtype'")."""
    out = json.loads(_fresh_python(_FRESH_COMPILE, name))
    return out["entry"], out["keep"]


def _fresh_python(code: str, *argv: str, timeout: int = 600) -> str:
    """What python -c code argv... prints, run with this checkout importable
    and without TRITON_INTERPRET."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_fresh_compile_ptx_and_sass():
    """One kernel compiled anew (no report cache): the raw PTX and SASS text and
    the ptxas log themselves, not counts read back from the cache."""
    assert aot.configs_for_variant(next(v for v in aot.grouped_mm_variants() if v.name == "bf16_2d3d"))[0] is (
        tgm.CONFIGS_16BIT[0])
    entry, keep = fresh_compile("bf16_2d3d")
    assert ".target sm_90a" in keep["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in keep["ptx"]
    assert "HGMMA.64x128x16.F32.BF16" in keep["sass"]
    assert "0 bytes spill stores, 0 bytes spill loads" in keep["ptxas_log"]
    assert f"Used {entry['regs']} registers" in keep["ptxas_log"]
    assert entry["smem_dynamic"] == 3 * (128 * 64 + 64 * 128) * torch.bfloat16.itemsize  # 3 stages of A and B


def test_fresh_compile_fp8_blockwise_ptx_and_sass():
    """The DeepSeek-V3 blockwise GEMM compiled anew: e4m3 wgmma in the PTX,
    QGMMA in the SASS (no HGMMA: the operands stay float8), B by TMA, no spill."""
    entry, keep = fresh_compile("fp8_blockwise_2d3d_tma")
    assert ".target sm_90a" in keep["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in keep["ptx"]
    assert "QGMMA.64x128x32.F32.E4M3.E4M3" in keep["sass"] and "HGMMA" not in keep["sass"]
    assert "UTMALDG" in keep["sass"]
    assert "0 bytes spill stores, 0 bytes spill loads" in keep["ptxas_log"]
    assert entry["smem_dynamic"] >= 4 * (128 * 128 + 128 * 128)  # 4 stages of float8 A and B tiles

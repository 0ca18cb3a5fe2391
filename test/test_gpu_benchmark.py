"""benchmarks/gpu/run.py, the one command for a Hopper GPU, on this GPU-less
machine: it exits 0 saying there is no GPU and writes its results and log to
the folder given (with and without the compiled extension), and the code of
its rows (routing, inputs, float64 checks, every kernel and baseline call, the
byte and FLOP counts) runs on CPU tensors in Triton's interpreter, in float32
(its bfloat16 products are wrong), with the timing stubbed.

What only a GPU can verify: the timings themselves (do_bench, CUDA graphs),
the bfloat16 and fp8 numerics the checks gate, the torch._grouped_mm /
torch._scaled_grouped_mm and sonic-moe baselines, the ten-minute budget.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would time it")
@pytest.mark.parametrize("extension", [True, False], ids=["with_C", "without_C"])
def test_without_a_gpu_exits_0_and_writes_its_folder(tmp_path, extension):
    root = ROOT
    if not extension:  # a checkout never built: the package and the script, no _C
        root = tmp_path / "checkout"
        shutil.copytree(ROOT / "torch_moe_ops", root / "torch_moe_ops",
                        ignore=shutil.ignore_patterns("_C*.so", "csrc", "__pycache__"))
        (root / "benchmarks" / "gpu").mkdir(parents=True)
        shutil.copy2(SCRIPT, root / "benchmarks" / "gpu" / "run.py")
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu" / "run.py"), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA GPU on this machine" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["status"] == "no_gpu" and result["environment"]["torch_moe_ops_extension"] is extension
    assert "no CUDA GPU on this machine" in (out / "run.log").read_text()


def test_rows_run_on_cpu_in_the_interpreter(monkeypatch):
    """Every row of a small layer: the float64 checks pass, every Triton row
    runs (and the unfused torch rows that CPU torch has); no GPU call is made
    (the timing is a stub that runs the statement once)."""
    run = _load()
    monkeypatch.setattr(run, "DEVICE", "cpu")
    monkeypatch.setattr(run, "DTYPE", torch.float32)
    monkeypatch.setattr(run, "bench", lambda fn, sets, grad_to_none=None: (fn(sets - 1), (1.0, "stub"))[1])
    device = {"name": "cpu", "l2_bytes": 1,  # one input set per row: the interpreter is slow
              "peak_bf16_tflops": 1.0, "peak_fp8_tflops": 2.0,
              "peak_hbm_tbps": 1.0}
    runner = run.Runner(device, budget_s=600, quick=True)
    case = run._case("tiny", 12, 40, 24, 6, 2)
    assert case["E_local"] == 6
    run.check_grouped(runner, case)
    run.check_experts(runner, case)
    run.time_grouped(runner, case)
    run.time_experts(runner, case, sonic=None)
    assert not runner.failed_checks
    checks = [r for r in runner.rows if "check" in r]
    assert len(checks) == 5 and all(r["ok"] for r in checks)
    timed = [r for r in runner.rows if "impl" in r]
    triton_rows = [r for r in timed if r["impl"].startswith("triton")]
    assert len(triton_rows) == 9 and all("error" not in r for r in triton_rows), triton_rows
    assert {r["kernel"] for r in triton_rows} == {
        "grouped_mm 2d3d up (gate+up proj)", "grouped_mm 2d3d down proj",
        "grouped_mm_gather up (tokens read by routing)", "grouped_mm 2d2d wgrad (up proj)",
        "expert_mlp forward", "expert_mlp backward"} | {
        f"expert_mlp forward, fp8 down ({recipe} act)" for recipe in ("blockwise_1x128", "mx", "rowwise")}
    for r in triton_rows:  # 1 ms per row: TFLOP/s = FLOPs / 1e9, GB/s = bytes / 1e6
        assert r["tflops"] == pytest.approx(r["flops"] / 1e9) and r["gbps"] == pytest.approx(r["bytes"] / 1e6)
    unfused = [r for r in timed if r["impl"].startswith("unfused")]
    assert unfused and all("error" not in r for r in unfused if "torch.mm" in r["impl"]), unfused


def test_expert_parallel_cases_fit_the_weight_budget():
    run = _load()
    deepseek = run._case("deepseek-v3", 16384, 7168, 2048, 256, 8)
    assert deepseek["E_local"] == 64 and "EP=4" in deepseek["name"]
    assert 3 * 2 * deepseek["E_local"] * 7168 * 2048 <= run.WEIGHT_BUDGET
    sonic = run._case("sonicmoe-default", 32768, 4096, 1024, 128, 8)
    assert sonic["E_local"] == 128  # SonicMoE's points run whole, as published

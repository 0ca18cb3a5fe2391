"""The benchmarks run, and benchmarks/README.md shows what their JSON holds.

- README's tables are what benchmarks/tables.py renders from benchmarks/results/*.json, so the
  two cannot drift; the committed JSON is well-formed (run metadata, rows, targets consistent
  with their values).
- Every benchmark's --quick mode runs in a subprocess, writes well-formed JSON to a scratch
  directory (never over benchmarks/results) and prints the table its JSON renders to. This
  proves the scripts run, not their targets: timing on this shared VM is too noisy for pass/fail
  (`make bench-check` checks the targets, on an idle machine).
"""

import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import tables  # noqa: E402  (benchmarks/tables.py: pure Python, no torch)

# script -> JSON name; make bench / bench-check run these (see test_makefile_runs_every_benchmark).
SCRIPTS = {"bench_grouped_mm": "grouped_mm", "bench_routing": "routing", "bench_fp8": "fp8",
           "bench_moe_layer": "moe_layer", "numerics_fp8": "numerics_fp8", "bench_ep": "ep",
           "bench_compile": "compile"}
META = {"date", "machine", "cores", "threads", "torch", "python", "commit", "command", "quick"}
TARGET = {"issue", "key", "what", "where", "op", "bound", "value", "met"}


def table_names(json_name: str) -> list[str]:
    return [name for name, (file, *_) in tables.TABLES.items() if file == f"{json_name}.json"]


def check_doc(doc: dict, json_name: str, quick: bool) -> None:
    """doc is a benchmark's JSON: metadata, every table renders, targets match their values."""
    assert doc["benchmark"] == json_name
    assert META <= set(doc["meta"]), META - set(doc["meta"])
    assert doc["meta"]["quick"] is quick
    assert "--out" not in doc["meta"]["command"] and doc["meta"]["command"].startswith("PYTHONPATH=. python benchmarks/")
    names = table_names(json_name)
    assert names, f"no table in benchmarks/tables.py renders {json_name}.json"
    for name in names:
        text = tables.table(name, doc)
        assert len(text.splitlines()) > 2, text
        section = tables.TABLES[name][2]
        if section is None:
            continue
        assert doc[section], f"{json_name}.json: no rows in {section!r}"
        for row in doc[section]:
            for t in row["targets"]:
                assert TARGET <= set(t) <= TARGET | {"reachable"}, t
                assert t["met"] == (t["value"] >= t["bound"] if t["op"] == ">=" else t["value"] <= t["bound"]), t
        tables.summary(name, doc), tables.missed(name, doc)


def test_readme_tables_are_rendered_from_the_json():
    text = (BENCH / "README.md").read_text()
    rendered = tables.render_readme(text)
    assert rendered == text, ("benchmarks/README.md differs from what benchmarks/results/*.json renders: "
                              "run `python benchmarks/tables.py`")
    # Every marker is there once, around a table.
    names = re.findall(r"^<!-- table:([\w/]+) -->$", text, re.M)
    assert sorted(names) == sorted(tables.TABLES)


def test_readme_check_mode_reports_a_drift(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((BENCH / "README.md").read_text().replace("\n<!-- /table -->", "\nstale\n<!-- /table -->", 1))
    assert tables.main(["--check", "--readme", str(readme)]) == 1
    assert tables.main(["--readme", str(readme)]) == 0
    assert tables.main(["--check", "--readme", str(readme)]) == 0


@pytest.mark.parametrize("json_name", sorted(SCRIPTS.values()))
def test_committed_json_is_well_formed(json_name):
    doc = json.loads((RESULTS / f"{json_name}.json").read_text())
    check_doc(doc, json_name, quick=False)


def test_every_result_is_in_the_readme():
    committed = {p.name for p in RESULTS.glob("*.json") if not p.name.endswith("-quick.json")}
    assert committed == {file for file, *_ in tables.TABLES.values()}


def test_makefile_runs_every_benchmark():
    makefile = (ROOT / "Makefile").read_text()
    (listed,) = re.findall(r"^BENCHMARKS := (.*)$", makefile, re.M)
    scripts = {p.stem for p in BENCH.glob("*.py") if p.stem not in ("_harness", "tables")}
    assert set(listed.split()) == scripts == set(SCRIPTS)
    assert re.search(r"^bench-check: build\n(\t.*\n)*\t.*--check", makefile, re.M)


def test_check_exit_code(tmp_path):
    from _harness import finish
    doc = {"benchmark": "x"}
    assert finish(doc, str(tmp_path / "x.json"), ["a missed target"], strict=True) == 1
    assert finish(doc, str(tmp_path / "x.json"), ["a missed target"], strict=False) == 0
    assert finish(doc, str(tmp_path / "x.json"), [], strict=True) == 0
    assert finish(doc, str(tmp_path / "x.json"), None, strict=True) == 0
    assert json.loads((tmp_path / "x.json").read_text()) == doc


def test_grouped_mm_memory_bound():
    """bench_grouped_mm's ceiling on ours/dense: the dense compute time over the
    time to read the inputs and write a fresh output at the machine's rates, or
    over the compute time plus the fresh output's page zeroing."""
    import torch
    from bench_grouped_mm import memory_bound, zeroing_beyond_dense
    rates = dict(read_gbs=20.0, fresh_write_gbs=5.0)
    # Qwen3's weight gradient (2d2d kn, float32): 50 + 38 MB read, a 1.61 GB fresh output
    # written: 0.33 s of memory traffic against 0.19 s of dense compute at 200 GFLOP/s.
    m, k, n, g = 6144, 2048, 1536, 128
    a, b = torch.empty(m, k).t(), torch.empty(m, n)
    out = torch.empty(g, k, n)
    flops = 2 * m * k * n
    dense_s = flops / 200e9
    memory_s = (a.numel() + b.numel()) * 4 / 20e9 + out.numel() * 4 / 5e9
    bound = memory_bound(a, b, out, flops, 200.0, rates)
    assert bound == pytest.approx(dense_s / memory_s, rel=1e-12)
    assert 0.55 < bound < 0.62
    # Memory time below the compute time: the bound is the dense rate itself.
    assert memory_bound(a, b, torch.empty(k, n), flops, 200.0, rates) == 1.0
    # A transposed view counts its whole storage: the (G, N, K) weights stream every element once.
    slow = dict(read_gbs=4.0, fresh_write_gbs=5.0)
    x, w = torch.empty(m, k), torch.empty(g, n, k).transpose(-2, -1)
    expected = dense_s / ((x.numel() + w.numel()) * 4 / 4e9 + m * n * 4 / 5e9)
    assert expected < 1
    assert memory_bound(x, w, torch.empty(m, n), flops, 200.0, slow) == pytest.approx(expected, rel=1e-12)
    # Page zeroing of a fresh output runs on the cores: it adds to the compute time.
    fast = dict(read_gbs=400.0, fresh_write_gbs=400.0)
    assert memory_bound(a, b, out, flops, 200.0, fast) == 1.0
    assert memory_bound(a, b, out, flops, 200.0, fast, zeroing_s=dense_s) == pytest.approx(0.5, rel=1e-12)
    # ...and only where the grouped mm's output outgrows the dense mm's, whose rate includes its own.
    assert zeroing_beyond_dense(torch.empty(m, n), x, w[0]) == 0.0
    # An output from the large-output cache is written into mapped memory: at the read rate, no zeroing.
    # Qwen3's 1.7 GB at 20 GB/s take 85 ms, under the dense 193 ms; at 4 GB/s, 425 ms.
    assert memory_bound(a, b, out, flops, 200.0, rates, zeroing_s=dense_s, out_cached=True) == 1.0
    cached_s = (a.numel() + b.numel() + out.numel()) * 4 / 4e9
    assert memory_bound(a, b, out, flops, 200.0, slow, zeroing_s=dense_s, out_cached=True) == pytest.approx(
        dense_s / cached_s, rel=1e-12)


def test_moe_layer_memory_bound(monkeypatch):
    """bench_moe_layer's ceiling on the layer's ours/dense: every expert's
    weights read twice (forward, backward) and their gradients written once
    to fresh memory, against the dense MLP's time, plus the gradients' page
    zeroing beyond the dense MLP's; where the large-output cache holds the
    gradients, written into mapped memory (at the read rate, no zeroing).
    DeepSeek-V3 at the benchmark's width (hidden 1792, intermediate 512, 256
    experts): 1.41 GB of bfloat16 weights."""
    import torch
    import bench_moe_layer
    zeroing = {}  # seconds per shape, fixed here (the benchmark measures them)
    monkeypatch.setattr(bench_moe_layer, "fresh_output_zeroing", lambda shape, dtype: zeroing.get(shape, 0.0))
    cached = [False]
    monkeypatch.setattr(bench_moe_layer, "gradients_cached", lambda params: cached[0])
    e, h, i = 256, 1792, 512
    params = [torch.empty(e, 2 * i, h, dtype=torch.bfloat16), torch.empty(e, h, i, dtype=torch.bfloat16)]
    dense = [torch.empty(2 * i, h, dtype=torch.bfloat16), torch.empty(h, i, dtype=torch.bfloat16)]
    w = e * 3 * i * h * 2
    assert w == 1_409_286_144
    rates = dict(read_gbs=80.0, fresh_write_gbs=33.0)
    memory_s = 2 * w / 80e9 + w / 33e9  # 35 ms + 43 ms
    for dense_s in (0.050, 0.077):
        got = bench_moe_layer.layer_memory_bound(params, dense, dense_s, rates)
        assert got == pytest.approx(dense_s / memory_s, rel=1e-12)
    # The zeroing of the experts' gradients, less the dense MLP's, adds to the compute time.
    zeroing.update({(e, 2 * i, h): 0.033, (e, h, i): 0.017, (2 * i, h): 0.001, (h, i): 0.001})
    got = bench_moe_layer.layer_memory_bound(params, dense, 0.077, rates)
    assert got == pytest.approx(0.077 / (0.077 + 0.048), rel=1e-12)
    # Weights that fit the time the dense MLP computes, no zeroing: no ceiling below 1.
    zeroing.clear()
    assert bench_moe_layer.layer_memory_bound(params[:1], dense, 10.0, rates) == 1.0
    # Gradients in cached blocks: three passes at the read rate (52.8 ms), the zeroing ignored.
    cached[0] = True
    zeroing.update({(e, 2 * i, h): 0.033, (e, h, i): 0.017})
    assert bench_moe_layer.layer_memory_bound(params, dense, 0.050, rates) == pytest.approx(
        0.050 / (3 * w / 80e9), rel=1e-12)
    assert bench_moe_layer.layer_memory_bound(params, dense, 0.077, rates) == 1.0


def test_moe_layer_gradients_cached():
    """Whether the cache keeps the gradients (bench_grouped_mm.cache_holds):
    each block at least its minimum, all of them within its limit
    (DeepSeek-V3's 940 + 470 MB)."""
    import torch
    import bench_moe_layer
    import torch_moe_ops
    from common import cache_limit
    params = [torch.empty(256, 1024, 1792, dtype=torch.bfloat16), torch.empty(256, 1792, 512, dtype=torch.bfloat16)]
    with cache_limit(2 << 30, min_block_bytes=32 << 20):
        assert bench_moe_layer.gradients_cached(params)
        torch_moe_ops.set_cpu_cache_limit(1 << 30)  # 1.41 GB no longer fits
        assert not bench_moe_layer.gradients_cached(params)
        torch_moe_ops.set_cpu_cache_limit(2 << 30, min_block_bytes=512 << 20)  # down_proj's 470 MB too small
        assert not bench_moe_layer.gradients_cached(params)
        torch_moe_ops.set_cpu_cache_limit(0)
        assert not bench_moe_layer.gradients_cached(params)


def test_interleaved_medians_min_runs(monkeypatch):
    """A round is the median of at least min_runs timed blocks: with the two
    blocks min_run_time fits for a long statement, one slow block (a slow
    moment of the VM) moved the round to the mean of the two."""
    import _harness

    class Measurement:
        def __init__(self, times):
            self.times, self.number_per_run, self.median = times, 1, statistics.median(times)

    calls = []

    class FakeTimer:
        """blocked_autorange: a fast and a slow block; timeit: fast blocks."""
        def __init__(self, stmt, globals, num_threads):
            self.stmt = stmt

        def blocked_autorange(self, min_run_time):
            calls.append(("autorange", self.stmt))
            return Measurement([0.2, 1.0])

        def timeit(self, number):
            calls.append(("timeit", self.stmt, number))
            return Measurement([0.2])

    monkeypatch.setattr(_harness, "Timer", FakeTimer)
    assert _harness.interleaved_medians({"a": "a()"}, {}, 0.5, 3) == {"a": pytest.approx(0.6)}
    assert not [c for c in calls if c[0] == "timeit"]
    calls.clear()
    assert _harness.interleaved_medians({"a": "a()", "b": "b()"}, {}, 0.5, 3, min_runs=5) == {"a": 0.2, "b": 0.2}
    # 3 more blocks a round and statement, interleaved: a's round, then b's.
    assert calls[:4] == [("autorange", "a()"), ("timeit", "a()", 1), ("timeit", "a()", 1), ("timeit", "a()", 1)]
    assert len(calls) == 3 * 2 * 4


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*"))}


# Seconds per subprocess on the 2 cores shared with other jobs compiling (load 7-10):
# grouped_mm ~35, routing ~15, fp8 ~20, numerics_fp8 ~15, moe_layer 65-160
# (transformers' eager loop and grouped_mm path creating oneDNN primitives for 128
# experts' group sizes), hence its slow mark; ep ~30-60 (one spawn of two gloo
# processes, their imports). About 3x less on an idle machine.
QUICK = [pytest.param("bench_grouped_mm"), pytest.param("bench_routing"), pytest.param("bench_fp8"),
         pytest.param("numerics_fp8"), pytest.param("bench_moe_layer", marks=pytest.mark.slow),
         pytest.param("bench_ep"),
         pytest.param("bench_compile", marks=pytest.mark.slow)]


@pytest.mark.parametrize("script", QUICK)
def test_quick_mode_runs(script, tmp_path):
    json_name = SCRIPTS[script]
    before = digest(RESULTS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MOE_BENCH_OUT", None)
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert digest(RESULTS) == before, "a quick run wrote into benchmarks/results"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert f"{json_name}-quick.json" in written, written
    doc = json.loads((tmp_path / f"{json_name}-quick.json").read_text())
    check_doc(doc, json_name, quick=True)
    # What it printed is what its JSON renders to.
    for name in table_names(json_name):
        assert tables.table(name, doc) in proc.stdout, name
        for line in tables.missed(name, doc):
            assert f"MISSED {line}" in proc.stdout


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.skipif(not {"avx512f", "avx512bw"} <= cpu_flags(), reason="the probe is AVX-512 code")
def test_weight_stream_probe_runs(tmp_path):
    """benchmarks/probe_weight_stream.c builds with the command its header gives and prints a
    rate for each read order from each process (README: "What bounds the bfloat16 misses on
    DeepSeek-V3"); one expert (3.7 MB) keeps it short, so the rates themselves mean nothing here."""
    exe = tmp_path / "probe_weight_stream"
    build = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-mavx512f", "-mavx512bw", "-o", str(exe),
                            str(BENCH / "probe_weight_stream.c")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    proc = subprocess.run([str(exe), "2", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    orders = ["rows", "blocks", "blocks+prefetch", "chunks16", "chunks8", "rows+pack"]
    rates = {}
    for line in proc.stdout.splitlines():
        m = re.fullmatch(r"pid (\d+) (\S+) +([0-9.]+) GB/s", line)
        assert m, line
        rates.setdefault(m.group(2), []).append(float(m.group(3)))
    assert sorted(rates) == sorted(orders)
    assert all(len(v) == 2 and min(v) > 0 for v in rates.values()), rates
    bad = subprocess.run([str(exe), "0"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr

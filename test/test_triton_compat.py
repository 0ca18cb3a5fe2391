"""Triton 3.6 compatibility of the kernels and benchmarks/gpu/run.py.

The GPU box we know of runs torch 2.11 + triton 3.6 and cannot install anything;
this project's venv has Triton 3.8. Every Triton name the sources use (modules,
functions and their keyword arguments, and inside @triton.jit functions the
methods and attributes of tensors, dtypes and tensor descriptors; see
test/triton_api.py) must be in test/data/triton_3_6_api.json, the names of
Triton 3.6.0 (PyPI's wheel, recorded there with its origin) and their
parameters.

A name absent there fails this test: use one 3.6 has, or guard the newer one
(``hasattr``) with a 3.6 path, then extend the list only from a Triton 3.6
installation (its docstring says how). Names cannot catch a change of meaning:
when this list was made every kernel variant of benchmarks/gpu/kernels.json was
also compiled for sm_90a with Triton 3.6.0 itself, which found one (an fp64
``tl.dot`` accumulator needs ``out_dtype=tl.float64`` in 3.6); only the GPU box
can run them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import triton_api

ROOT = Path(__file__).resolve().parents[1]
API_FILE = ROOT / "test" / "data" / "triton_3_6_api.json"


def _api() -> dict:
    return json.loads(API_FILE.read_text())


def missing_names(used: dict, api: dict) -> list:
    """The used names (with where they are used) that the API lacks: a name,
    or a keyword argument its recorded parameters do not take."""
    out = []
    for name, where in sorted(used.items()):
        base, kw = re.fullmatch(r"(.+?)(?:\((\w+)\))?", name).groups()
        if base not in api:
            out.append((name, where))
        elif kw:
            params = api[base]
            if params is not None and kw not in params and not any(p.startswith("**") for p in params):
                out.append((name, where))
    return out


def test_the_list_is_triton_3_6():
    data = _api()
    assert data["triton"] == "3.6.0"
    assert "sha256 e8e323d608e3a9bfcc2d9efcc90ceefb764a82b99dea12a86d643c72539ad5d3" in data["source"]
    names = data["names"]
    # What the kernels lean on, present in 3.6 (device-side TMA descriptors, the allocator they need).
    for name in ("triton.language.make_tensor_descriptor", "triton.set_allocator", "triton.language.math.div_rn",
                 "triton.testing.do_bench_cudagraph", ".load", ".to"):
        assert name in names, name
    assert "bitcast" in names[".to"] and "input_precision" in names["triton.language.dot"]


def test_every_triton_name_the_sources_use_is_in_triton_3_6():
    used = triton_api.all_used_names()
    # The scan sees the kernels: a sample of what they use must be among the names.
    for name in ("triton.language.make_tensor_descriptor", "triton.language.dot(input_precision)",
                 "triton.language.dot(out_dtype)", ".to(bitcast)", ".load", "triton.jit(do_not_specialize)",
                 "triton.testing.do_bench(grad_to_none)", "triton.runtime.interpreter.InterpretedFunction"):
        assert name in used, name
    assert {w.split(":")[0] for ws in used.values() for w in ws} >= {
        "torch_moe_ops/triton/grouped_mm.py", "torch_moe_ops/triton/experts.py", "torch_moe_ops/triton/fp8.py",
        "benchmarks/gpu/run.py"}
    missing = missing_names(used, _api()["names"])
    assert not missing, "Triton names absent from Triton 3.6:\n" + "\n".join(f"{n} at {w}" for n, w in missing)


def test_the_check_catches_newer_names(tmp_path):
    """A kernel using a function, a keyword and a tensor method 3.6 lacks (all
    made up here), and a module function 3.6 has: exactly the three are
    reported."""
    src = tmp_path / "kernel.py"
    src.write_text(
        "import triton\n"
        "import triton.language as tl\n\n\n"
        "@triton.jit\n"
        "def k(x_ptr, BLOCK: tl.constexpr):\n"
        "    x = tl.load(x_ptr + tl.arange(0, BLOCK))\n"
        "    y = tl.not_in_triton_3_6(x)\n"
        "    z = tl.dot(x, y, not_a_dot_keyword=1)\n"
        "    tl.store(x_ptr, z.not_a_tensor_method())\n")
    missing = {n for n, _ in missing_names(triton_api.used_names(src), _api()["names"])}
    assert missing == {"triton.language.not_in_triton_3_6", "triton.language.dot(not_a_dot_keyword)",
                       ".not_a_tensor_method"}, missing

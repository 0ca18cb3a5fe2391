"""Writes benchmarks/gpu/kernels.json: every Triton kernel variant, in every
configuration its autotuner may pick, compiled ahead of time for sm_90a (no GPU
needed), with registers, spills, shared memory and SASS instruction counts
(torch_moe_ops/triton/aot.py). test/test_triton_aot.py regenerates it and fails
on any difference; run this (or that test with TORCH_MOE_OPS_REGEN_KERNELS=1)
after changing a kernel, and commit the result.

    PYTHONPATH=. python benchmarks/gpu/kernels.py [--no-cache]
"""

import argparse
import json
from pathlib import Path

REPORT = Path(__file__).with_name("kernels.json")


def write(report: dict, path: Path = REPORT) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-cache", action="store_true", help="recompile every variant")
    args = parser.parse_args()
    from torch_moe_ops.triton import aot

    report = aot.report(use_cache=not args.no_cache)
    write(report)
    for k in report["kernels"]:
        c = k["config"]
        tile = "x".join(str(v) for n, v in c.items() if n.startswith("BLOCK"))
        print(f"{k['kernel']:<19} {k['variant']:<37} {tile} w{c['num_warps']} s{c['num_stages']}: "
              f"{k['regs']} regs, spills {k['spill_stores']}/{k['spill_loads']} B, smem {k['smem_dynamic']} B, "
              f"{k['sass_instructions']} SASS, HGMMA {k['HGMMA']}")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()

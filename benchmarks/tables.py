"""The benchmark tables, rendered from the benchmarks' JSON only.

One renderer per table serves both the benchmark's own printout and
benchmarks/README.md, where each table sits between marker comments

    <!-- table:grouped_mm -->
    ...generated: run metadata, the table, the targets' summary...
    <!-- /table -->

and is regenerated from benchmarks/results/*.json:

    python benchmarks/tables.py           # rewrite README.md's tables from results/*.json
    python benchmarks/tables.py --check   # exit 1 (with a diff) if README.md differs from that

test/test_benchmarks.py runs the --check, so the README cannot drift from the
JSON. Pure Python: no torch, no extension.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")

MARKER = re.compile(r"(<!-- table:(?P<name>[\w/]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


# ------------------------------------------------------------------ helpers


def num(v: Optional[float], spec: str, width: int, suffix: str = "") -> str:
    """v formatted to spec and suffix, right-aligned in width; '-' when not measured."""
    text = "-" if v is None else format(v, spec) + suffix
    return text.rjust(width)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def target_cell(targets: list[dict]) -> str:
    """The targets of a row, each 'key>=bound ok' or 'key>=bound MISSED'
    ('MISSED*' when the machine's memory bound is below the target)."""
    def state(t: dict) -> str:
        if t["met"]:
            return "ok"
        return "MISSED*" if t.get("reachable") is False else "MISSED"
    return "  ".join(f"{t['key']}{t['op']}{t['bound']:g} {state(t)}" for t in targets)


def rule(head: str) -> str:
    return "-" * len(head.rstrip())


# ------------------------------------------------------------------ grouped_mm


def grouped_mm_tag(r: dict) -> str:
    return f"{r['config']} {r['dtype']} {r['layout']} {r['order']}"


def grouped_mm_table(doc: dict) -> str:
    head = (f"{'model':<15} {'dtype':<9} {'layout':<6} {'w':<3} {'G':>4} {'M':>6} {'K':>5} {'N':>5} {'rows/E':>6} "
            f"{'maxrows':>7} {'ours':>7} {'upstream':>8} {'dense':>7} {'vs up':>6} {'vs dense':>8} {'up/dense':>8} "
            f"{'bound':>6}  targets")
    lines = [head, rule(head)]
    for r in doc["results"]:
        lines.append(
            f"{r['config']:<15} {r['dtype']:<9} {r['layout']:<6} {r['order']:<3} {r['experts']:>4} {r['rows']:>6} "
            f"{r['k']:>5} {r['n']:>5} {r['rows'] / r['experts']:>6.0f} {r['max_rows_per_expert']:>7} "
            f"{r['ours_gflops']:>7.1f} {r['upstream_gflops']:>8.1f} {r['dense_gflops']:>7.1f} "
            f"{r['vs_upstream']:>5.2f}x {r['vs_dense']:>7.2f}x {r['upstream_vs_dense']:>7.2f}x "
            f"{num(r.get('memory_bound_vs_dense'), '.2f', 6, 'x')}  "
            f"{target_cell(r['targets'])}".rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ routing


def routing_tag(r: dict) -> str:
    return f"{r['config']} {r['dtype']}"


def routing_table(doc: dict) -> str:
    head = (f"{'model':<14} {'T':>5} {'H':>5} {'E':>4} {'k':>2} | {'perm':>6} {'unperm':>6} {'copy':>6} {'clone':>6} "
            f"{'t.perm':>7} {'t.unp':>6} | {'perm':>5} {'unp':>5} {'copy':>5} | {'vs torch':>8} {'/copy':>6} "
            f"{'/clone':>6} | {'router':>6} {'t.router':>8} {'x':>5} | targets")
    sub = (f"{'':<14} {'':>5} {'':>5} {'':>4} {'':>2} | {'ms':>6} {'ms':>6} {'ms':>6} {'ms':>6} {'ms':>7} {'ms':>6} | "
           f"{'GB/s':>5} {'GB/s':>5} {'GB/s':>5} | {'':>8} {'':>6} {'':>6} | {'ms':>6} {'ms':>8} {'':>5} |")
    lines = [head, sub, rule(head)]
    for r in doc["results"]:
        lines.append(
            f"{r['config']:<14} {r['tokens']:>5} {r['hidden']:>5} {r['experts']:>4} {r['top_k']:>2} | "
            f"{r['permute_ms']:>6.1f} {r['unpermute_ms']:>6.1f} {num(r.get('copy_ms'), '.1f', 6)} "
            f"{num(r.get('clone_ms'), '.1f', 6)} {r['torch_permute_ms']:>7.1f} {r['torch_unpermute_ms']:>6.1f} | "
            f"{r['permute_gbs']:>5.1f} {r['unpermute_gbs']:>5.1f} {num(r.get('copy_gbs'), '.1f', 5)} | "
            f"{r['vs_torch']:>7.1f}x {num(r.get('vs_copy'), '.2f', 6, 'x')} {num(r.get('vs_clone'), '.2f', 6, 'x')} | "
            f"{r['router_ms']:>6.2f} {r['torch_router_ms']:>8.2f} {r['router_speedup']:>4.1f}x | "
            f"{target_cell(r['targets'])}".rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ moe_layer

MOE_IMPLS = ("eager", "grouped_mm", "unfused", "ours", "dense")


def moe_layer_tag(r: dict) -> str:
    return f"{r['config']} {r['order']}"


def moe_layer_table(doc: dict) -> str:
    head = (f"{'model':<14} {'T':>5} {'H':>5} {'I':>5} {'E':>4} {'k':>2} {'w':<3} {'impl':<10} {'fwd ms':>8} "
            f"{'bwd ms':>8} {'total ms':>9} {'saved MB':>9} {'vs grouped_mm':>13} {'vs dense':>8} {'bound':>6}  targets")
    lines = [head, rule(head)]
    for r in doc["results"]:
        pre = (f"{r['config']:<14} {r['tokens']:>5} {r['hidden']:>5} {r['intermediate']:>5} {r['experts']:>4} "
               f"{r['top_k']:>2} {r['order']:<3}")
        for impl in MOE_IMPLS:
            if impl in r.get("not_run", {}):
                lines.append(f"{pre} {impl:<10} {'(not run: ' + r['not_run'][impl] + ')':>50}")
                continue
            if impl not in r["fwd_ms"]:
                continue
            total = r["fwd_ms"][impl] + r["bwd_ms"][impl]
            speed = ratio(r["fwd_ms"]["grouped_mm"] + r["bwd_ms"]["grouped_mm"], total)
            dense = ratio(r["fwd_ms"]["dense"] + r["bwd_ms"]["dense"], total)
            # The memory bound on ours/dense (older runs have none), on ours' line.
            bound = r.get("memory_bound_vs_dense") if impl == "ours" else None
            cell = target_cell(r["targets"]) if impl == "ours" else ""
            lines.append(f"{pre} {impl:<10} {r['fwd_ms'][impl]:>8.1f} {r['bwd_ms'][impl]:>8.1f} {total:>9.1f} "
                         f"{num(r['saved_mb'].get(impl), '.1f', 9)} {num(speed, '.2f', 13, 'x')} "
                         f"{num(dense, '.2f', 8, 'x')} {num(bound, '.2f', 6, 'x') if impl == 'ours' else '':>6}  "
                         f"{cell}".rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ compile


def compile_tag(r: dict) -> str:
    return f"{r['framework']} {r['model']}"


def compile_table(doc: dict) -> str:
    head = (f"{'framework':<12} {'model':<14} {'T':>5} {'H':>5} {'I':>5} {'E':>4} {'k':>2} {'compiled':<8} "
            f"{'step ms':>9} {'saved MB':>9} {'speedup':>8} {'memory':>7}  {'fired':<28} targets")
    lines = [head, rule(head)]
    for r in doc["results"]:
        pre = (f"{r['framework']:<12} {r['model']:<14} {r['tokens']:>5} {r['hidden']:>5} {r['intermediate']:>5} "
               f"{r['experts']:>4} {r['top_k']:>2}")
        for name in ("stock", "ours"):
            ours = name == "ours"
            fired = " ".join(f"{k}x{v}" for k, v in sorted(r["fired"].items())) if ours else ""
            lines.append(f"{pre} {name:<8} {r['step_ms'][name]:>9.1f} {r['saved_mb'][name]:>9.1f} "
                         f"{num(r['speedup'] if ours else 1.0, '.2f', 8, 'x')} "
                         f"{num(r['memory'] if ours else 1.0, '.2f', 7, 'x')}  {fired:<28} "
                         f"{target_cell(r['targets']) if ours else ''}".rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ fp8


def fp8_quantize_table(doc: dict) -> str:
    head = f"{'recipe':<18} {'quantize':>9} {'dequant':>9} {'eager torch':>12}"
    lines = [head, rule(head)]
    for r in doc["quantize"]:
        lines.append(f"{r['recipe']:<18} {r['quantize_gbps']:>9.2f} {r['dequantize_gbps']:>9.2f} {r['eager_gbps']:>12.2f}")
    return "\n".join(lines)


def fp8_gemm_tag(r: dict) -> str:
    return f"{r['config']} {r['order']}"


def fp8_gemm_table(doc: dict) -> str:
    head = (f"{'model':<15} {'G':>4} {'M':>6} {'K':>5} {'N':>5} {'w':<3} {'bf16':>7} {'fp8':>7} {'fp8+quant':>9} "
            f"{'fp8 mx':>7} {'upstream':>8} {'dense':>7} {'fp8/bf16':>8} {'fp8/dense':>9} {'fp8/up':>7} "
            f"{'up/dense':>8}  targets")
    lines = [head, rule(head)]
    for r in doc["gemm"]:
        lines.append(
            f"{r['config']:<15} {r['experts']:>4} {r['rows']:>6} {r['k']:>5} {r['n']:>5} {r['order']:<3} "
            f"{r['bf16_gflops']:>7.1f} {r['fp8_gflops']:>7.1f} {r['fp8_quant_gflops']:>9.1f} {r['fp8_mx_gflops']:>7.1f} "
            f"{num(r.get('upstream_gflops'), '.1f', 8)} {num(r.get('dense_gflops'), '.1f', 7)} "
            f"{r['fp8_vs_bf16']:>7.2f}x {num(r.get('fp8_vs_dense'), '.2f', 9, 'x')} "
            f"{num(r.get('fp8_vs_upstream'), '.2f', 7, 'x')} {num(r.get('upstream_vs_dense'), '.2f', 8, 'x')}  "
            f"{target_cell(r['targets'])}".rstrip())
    return "\n".join(lines)


def fp8_bytes_table(doc: dict) -> str:
    head = (f"{'model':<16} {'w bf16':>7} {'w fp8':>7} {'w mx':>7} {'saved':>6} | {'x bf16':>7} {'x fp8':>7} "
            f"{'x mx':>7} {'saved':>6}")
    lines = [head, rule(head)]
    for r in doc["bytes"]:
        lines.append(
            f"{r['config']:<16} {r['weights_bf16_gb']:>7.2f} {r['weights_rowwise_gb']:>7.2f} {r['weights_mx_gb']:>7.2f} "
            f"{1 - r['weights_rowwise_gb'] / r['weights_bf16_gb']:>6.1%} | {r['inputs_bf16_mb']:>7.1f} "
            f"{r['inputs_rowwise_mb']:>7.1f} {r['inputs_mx_mb']:>7.1f} {1 - r['inputs_rowwise_mb'] / r['inputs_bf16_mb']:>6.1%}")
    return "\n".join(lines)


# ------------------------------------------------------------------ numerics_fp8


def numerics_table(doc: dict) -> str:
    head = f"{'operand':<12} {'recipe':<18} {'format':<6} {'SQNR dB':>8} {'max rel err':>12}"
    lines = [head, rule(head)]
    for r in doc["roundtrip"]:
        lines.append(f"{r['operand']:<12} {r['recipe']:<18} {r['format']:<6} {r['sqnr_db']:>8.2f} "
                     f"{r['max_rel_err']:>12.4f}")
    lines += ["", "scaled_grouped_mm (activations x weights^T per expert) vs float64 GEMM of the unquantised operands"]
    for r in doc["gemm"]:
        lines.append(f"  {r['recipe']:<8} {r['format']}: SQNR {r['sqnr_db']:6.2f} dB")
    lines += ["", "fp8_grouped_mm (training path, e4m3) vs float64 autograd: SQNR dB of the output and the gradients",
              f"  {'recipe':<8} {'wgrad':<6} {'out':>6} {'dgrad':>6} {'wgrad':>6}"]
    for r in doc["training"]:
        lines.append(f"  {r['recipe']:<8} {r['wgrad_path']:<6} {r['out_db']:>6.2f} {r['dgrad_db']:>6.2f} "
                     f"{r['wgrad_db']:>6.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ ep


def ep_time_table(doc: dict) -> str:
    head = (f"{'EP':>2} {'mode':<8} {'fp8':<7} {'chunks':>6} {'step':>7} {'dispatch':>8} {'experts':>8} "
            f"{'combine':>8} {'hidden':>7} | {'fwd: disp':>9} {'exp':>7} {'comb':>7} | {'bwd: comb':>9} {'exp':>7} "
            f"{'disp':>7}")
    c = doc["shape"]
    lines = [f"layer: {c['tokens']} tokens per rank, hidden {c['hidden']}, intermediate {c['intermediate']}, "
             f"{c['experts']} experts, top-{c['top_k']}, bfloat16; the round of median step of {c['rounds']}",
             "", head, rule(head)]
    for r in doc["timing"]:
        lines.append(
            f"{r['ep']:>2} {r['mode']:<8} {r['fp8']:<7} {r['chunks']:>6} {r['step_ms']:>7.1f} {r['dispatch_ms']:>8.1f} "
            f"{r['experts_ms']:>8.1f} {r['combine_ms']:>8.1f} {num(r.get('hidden_ms'), '.1f', 7)} | "
            f"{r['fwd_dispatch_ms']:>9.1f} {r['fwd_experts_ms']:>7.1f} {r['fwd_combine_ms']:>7.1f} | "
            f"{r['bwd_combine_ms']:>9.1f} {r['bwd_experts_ms']:>7.1f} {r['bwd_dispatch_ms']:>7.1f}")
    return "\n".join(lines)


def ep_bytes_tag(r: dict) -> str:
    return f"EP={r['ep']} {r['mode']} fp8={r['fp8']}"


def ep_bytes_table(doc: dict) -> str:
    head = (f"{'EP':>2} {'mode':<8} {'fp8':<7} {'row B':>5} {'dispatch B':>10} {'analytic':>10} {'combine B':>10} "
            f"{'analytic':>10} {'vs bf16':>7}  targets")
    lines = [head, rule(head)]
    for r in doc["bytes"]:
        d, c = r["dispatch_bytes"], r["combine_bytes"]
        # Every rank's measurement; one number when they all agree.
        show = lambda v: str(v[0]) if len(set(v)) == 1 else "/".join(map(str, v))  # noqa: E731
        lines.append(
            f"{r['ep']:>2} {r['mode']:<8} {r['fp8']:<7} {r['row_bytes']:>5} {show(d):>10} {r['analytic_dispatch']:>10} "
            f"{show(c):>10} {r['analytic_combine']:>10} {num(r.get('vs_bf16'), '.3f', 6, 'x')}  "
            f"{target_cell(r['targets'])}".rstrip())
    return "\n".join(lines)


def ep_volume_table(doc: dict) -> str:
    head = f"{'model':<15} {'EP':>3} {'top_k':>5} {'hidden':>6} {'bf16 MB':>8} {'fp8 MB':>7} {'mx MB':>7}"
    lines = [head, rule(head)]
    for r in doc["volume"]:
        lines.append(f"{r['config']:<15} {r['ep']:>3} {r['top_k']:>5} {r['hidden']:>6} {r['bf16_mb']:>8.1f} "
                     f"{r['rowwise_mb']:>7.1f} {r['mx_mb']:>7.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ registry

# README marker -> (JSON file, table renderer, section holding rows with
# targets or None, row tag for the list of missed targets)
TABLES: dict[str, tuple[str, Callable[[dict], str], Optional[str], Optional[Callable[[dict], str]]]] = {
    "grouped_mm": ("grouped_mm.json", grouped_mm_table, "results", grouped_mm_tag),
    "routing": ("routing.json", routing_table, "results", routing_tag),
    "moe_layer": ("moe_layer.json", moe_layer_table, "results", moe_layer_tag),
    "fp8/quantize": ("fp8.json", fp8_quantize_table, None, None),
    "fp8/gemm": ("fp8.json", fp8_gemm_table, "gemm", fp8_gemm_tag),
    "fp8/bytes": ("fp8.json", fp8_bytes_table, None, None),
    "numerics_fp8": ("numerics_fp8.json", numerics_table, None, None),
    "ep/time": ("ep.json", ep_time_table, None, None),
    "ep/bytes": ("ep.json", ep_bytes_table, "bytes", ep_bytes_tag),
    "ep/volume": ("ep.json", ep_volume_table, None, None),
    "compile": ("compile.json", compile_table, "results", compile_tag),
}


def table(name: str, doc: dict) -> str:
    return TABLES[name][1](doc)


def missed(name: str, doc: dict) -> list[str]:
    """'<row>: #<issue> <ratio> <op> <bound>: <value>' for each missed target of the table's rows."""
    _, _, section, tag = TABLES[name]
    if section is None:
        return []
    return [f"{tag(r)}: #{t['issue']} {t['what']} {t['op']} {t['bound']:g}: {t['value']:.2f}"
            for r in doc[section] for t in r["targets"] if not t["met"]]


def meta_line(doc: dict, json_name: str) -> str:
    m = doc["meta"]
    mode = " (quick mode)" if m.get("quick") else ""
    text = (f"Run{mode}: {m['date']}; {m['machine']}, {m['cores']} cores, {m['threads']} threads; torch {m['torch']}, "
            f"Python {m['python']}; commit `{m['commit']}`. Command: `{m['command']}` (JSON: `results/{json_name}`).")
    if m.get("note"):
        text += f"\n{m['note']}"
    return text


def summary(name: str, doc: dict) -> str:
    """Each target of the table (issue, what, bound) with the rows it applies to,
    how many met it, and the range of the measured values."""
    _, _, section, _ = TABLES[name]
    if section is None:
        return ""
    groups: dict[tuple, list[dict]] = {}
    for r in doc[section]:
        for t in r["targets"]:
            groups.setdefault((t["issue"], t["what"], t["op"], t["bound"], t["where"]), []).append(t)
    if not groups:
        return "\nNo target applies to these rows.\n"
    out = ["", "| issue | target | where | rows | met | measured |", "|---|---|---|---:|---:|---|"]
    for (issue, what, op, bound, where), ts in sorted(groups.items(), key=lambda kv: kv[0][0]):
        met = sum(t["met"] for t in ts)
        values = [t["value"] for t in ts]
        span = f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
        flag = "" if met == len(ts) else " **missed**"
        # Missed where this machine's memory traffic alone forbids the target (bench_grouped_mm's bound).
        beyond = sum(not t["met"] and t.get("reachable") is False for t in ts)
        if beyond:
            flag += f" ({beyond} beyond the memory bound)"
        cell = f"{what} {op} {bound:g}".replace("|", "\\|")  # a literal | would end the Markdown cell
        out.append(f"| #{issue} | {cell} | {where} | {len(ts)} | {met}{flag} | {span} |")
    return "\n".join(out) + "\n"


def readme_block(name: str, results: str = RESULTS, first: bool = True) -> str:
    """The README's text for one table: the run's metadata (or, after the
    first table of the same JSON, a pointer to it), the table, the targets."""
    json_name = TABLES[name][0]
    with open(os.path.join(results, json_name)) as f:
        doc = json.load(f)
    head = meta_line(doc, json_name) if first else f"Same run as above (`results/{json_name}`)."
    return f"{head}\n\n```\n{table(name, doc)}\n```\n{summary(name, doc)}"


def render_readme(text: str, results: str = RESULTS) -> str:
    """text with every marked table regenerated from the JSON in results;
    each JSON's metadata is shown at its first table."""
    names = [m.group("name") for m in MARKER.finditer(text)]
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise SystemExit(f"README.md: no renderer for table(s) {unknown}; known: {sorted(TABLES)}")
    missing = sorted(set(TABLES) - set(names))
    if missing:
        raise SystemExit(f"README.md: no <!-- table:NAME --> marker for {missing}")
    seen: set[str] = set()

    def block(m: re.Match) -> str:
        json_name = TABLES[m.group("name")][0]
        first = json_name not in seen
        seen.add(json_name)
        return m.group(1) + readme_block(m.group("name"), results, first) + m.group(4)

    return MARKER.sub(block, text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from what the JSON renders")
    parser.add_argument("--results", default=RESULTS, help="directory of the JSON (default: benchmarks/results)")
    parser.add_argument("--readme", default=README)
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    new = render_readme(text, args.results)
    if args.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       "README.md", "README.md from results/*.json"))
            print("\nbenchmarks/README.md differs from its JSON: run `python benchmarks/tables.py`")
            return 1
        print("benchmarks/README.md matches results/*.json")
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
        print(f"rewrote the tables of {os.path.relpath(args.readme)}")
    else:
        print(f"{os.path.relpath(args.readme)} already matches results/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fp8 numerics report: how much each recipe loses, measured against float64.

For every recipe (tensorwise, rowwise, blockwise 1x128, blockwise 128x128,
MX 1x32) and float8 format (e4m3fn, e5m2), on two operands of a Qwen3-MoE
sized expert layer:

  activations  (tokens, hidden) normal values with 1% outlier channels x 30
               (the channel outliers of LLM activations)
  weights      (experts, N, hidden) normal values / sqrt(hidden), with each
               expert at its own scale (x 2^[-2, 2])

it reports the quantise-dequantise round trip (SQNR in dB and the maximum
relative error of the elements within 2^-10 of their block's amax, the ones a
recipe should represent: smaller ones may underflow by design), and for the
recipes scaled_grouped_mm accepts (rowwise, mx) the SQNR of the grouped GEMM
out = A @ W^T per expert against the float64 GEMM of the unquantised
operands, and for the training path (fp8_grouped_mm: rowwise with its weight
gradient in float8, MX with it in float8 and in high precision) the SQNR of
the output and of both gradients against float64 autograd. Writes a table,
results/numerics_fp8.json and a bar chart of the
round-trip SQNR, results/numerics_fp8.png (drawn here: no plotting
dependency).

Deterministic; no targets (issue #6 asks for the report, not for bounds).
benchmarks/tables.py renders the JSON, here and in the README.

    python benchmarks/numerics_fp8.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import struct
import zlib
from typing import Optional

import torch

import tables
import torch_moe_ops
from _harness import add_common_args, finish, json_path, metadata
RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx")
SHORT = {"tensorwise": "TW", "rowwise": "RW", "blockwise_1x128": "1X128", "blockwise_128x128": "128X128", "mx": "MX"}
FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (x.double() - ref).pow(2).sum()))


def operands(gen: torch.Generator, quick: bool = False):
    # Every expert's token count is a multiple of 128 (MX's float8 weight
    # gradient takes 32-row blocks within a group).
    tokens, hidden, experts, n = (512, 256, 4, 128) if quick else (2048, 2048, 16, 768)
    x = torch.randn(tokens, hidden, generator=gen)
    outliers = torch.randperm(hidden, generator=gen)[: hidden // 100]
    x[:, outliers] *= 30
    w = torch.randn(experts, n, hidden, generator=gen) / hidden**0.5
    w *= 2.0 ** (torch.rand(experts, 1, 1, generator=gen) * 4 - 2)
    counts = torch.full((experts,), tokens // experts)
    offs = counts.cumsum(0).to(torch.int32)
    return x.bfloat16(), w.bfloat16(), offs


def roundtrip(t: torch.Tensor, recipe: str, f8: torch.dtype) -> dict:
    data, scale = torch_moe_ops.quantize_fp8(t, recipe, f8)
    back = torch_moe_ops.dequantize_fp8(data, scale, recipe)
    ref = t.double()
    # Elements within 2^-10 of the largest magnitude of their row (a proxy for
    # "their block" common to every recipe) are the ones that must survive.
    big = ref.abs() >= ref.abs().amax(-1, keepdim=True) * 2.0 ** -10
    rel = ((back.double() - ref).abs() / ref.abs())[big]
    return {"sqnr_db": sqnr_db(back, ref), "max_rel_err": float(rel.max())}


def gemm_sqnr(x, w, offs, recipe, f8) -> float:
    xd, xs = torch_moe_ops.quantize_fp8(x, recipe, f8)
    wd, ws = torch_moe_ops.quantize_fp8(w, recipe, f8)
    if recipe == "mx":  # a 2-D operand's MX scale goes blocked per group
        xs = torch_moe_ops.swizzle_mx_scale(xs, offs, 0)
    out = torch_moe_ops.scaled_grouped_mm(xd, wd.transpose(-2, -1), xs, ws, offs, out_dtype=torch.float32)
    ref = torch_moe_ops.grouped_mm(x.double(), w.double().transpose(-2, -1), offs)
    return sqnr_db(out, ref)


def training_sqnr(x, w, offs, recipe, wgrad, gen) -> dict:
    """fp8_grouped_mm(x, w^T) forward, grad of x (dgrad) and grad of w
    (wgrad) for a random upstream gradient, against float64 autograd."""
    grad = torch.randn(x.shape[0], w.shape[1], generator=gen).bfloat16()
    a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = torch_moe_ops.fp8_grouped_mm(a, b.transpose(-2, -1), offs, recipe, wgrad)
    out.backward(grad)
    a64, b64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = torch_moe_ops.grouped_mm(a64, b64.transpose(-2, -1), offs)
    ref.backward(grad.double())
    return {"out": sqnr_db(out, ref), "dgrad": sqnr_db(a.grad, a64.grad), "wgrad": sqnr_db(b.grad, b64.grad)}


# ---------------------------------------------------------------- PNG chart

# 3 x 5 glyphs of the characters the chart needs.
FONT = {
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    "T": ["###", ".#.", ".#.", ".#.", ".#."], "W": ["#.#", "#.#", "#.#", "###", "#.#"],
    "R": ["##.", "#.#", "##.", "#.#", "#.#"], "X": ["#.#", "#.#", ".#.", "#.#", "#.#"],
    "M": ["#.#", "###", "###", "#.#", "#.#"], "E": ["###", "#..", "##.", "#..", "###"],
    "S": ["###", "#..", "###", "..#", "###"], "Q": ["###", "#.#", "#.#", "###", "..#"],
    "N": ["##.", "#.#", "#.#", "#.#", "#.#"], "D": ["##.", "#.#", "#.#", "#.#", "##."],
    "B": ["##.", "#.#", "##.", "#.#", "##."], " ": ["...", "...", "...", "...", "..."],
    ".": ["...", "...", "...", "...", ".#."], "-": ["...", "...", "###", "...", "..."],
    "A": [".#.", "#.#", "###", "#.#", "#.#"], "C": ["###", "#..", "#..", "#..", "###"],
    "I": ["###", ".#.", ".#.", ".#.", "###"], "V": ["#.#", "#.#", "#.#", "#.#", ".#."],
    "O": ["###", "#.#", "#.#", "#.#", "###"], "G": ["###", "#..", "#.#", "#.#", "###"],
    "H": ["#.#", "#.#", "###", "#.#", "#.#"],
}
COLORS = {"e4m3": (31, 119, 180), "e5m2": (255, 127, 14)}


class Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def rect(self, x0, y0, x1, y1, rgb):
        for y in range(max(0, y0), min(self.h, y1)):
            row = y * self.w * 3
            for x in range(max(0, x0), min(self.w, x1)):
                self.px[row + 3 * x: row + 3 * x + 3] = bytes(rgb)

    def text(self, x, y, s, scale=3, rgb=(0, 0, 0)):
        for ch in s.upper():
            for gy, line in enumerate(FONT.get(ch, FONT[" "])):
                for gx, on in enumerate(line):
                    if on == "#":
                        self.rect(x + gx * scale, y + gy * scale, x + (gx + 1) * scale, y + (gy + 1) * scale, rgb)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def chart(rows: list[dict], path: str) -> None:
    """Grouped bars of round-trip SQNR (dB), activations then weights, one
    group per recipe, e4m3 blue / e5m2 orange; gridlines every 10 dB."""
    top = 50
    c = Canvas(1000, 460)
    x0, y0, y1 = 70, 40, 380  # plot box; y1 is 0 dB
    scale = (y1 - y0) / top
    for db in range(0, top + 1, 10):
        y = int(y1 - db * scale)
        c.rect(x0, y, 990, y + 1, (200, 200, 200))
        c.text(20, y - 7, str(db))
    c.text(20, 8, "SQNR DB")
    x = x0 + 10
    for operand in ("activations", "weights"):
        c.text(x + 120, y0 - 25, operand, scale=2)
        for recipe in RECIPES:
            for fmt in FORMATS:
                (r,) = [r for r in rows if (r["operand"], r["recipe"], r["format"]) == (operand, recipe, fmt)]
                h = int(max(0.0, min(top, r["sqnr_db"])) * scale)
                c.rect(x, y1 - h, x + 18, y1, COLORS[fmt])
                x += 20
            c.text(x - 40, y1 + 12, SHORT[recipe], scale=2)
            x += 50
        c.rect(x - 25, y0, x - 24, y1 + 60, (0, 0, 0))
    c.text(x0, 430, "E4M3", rgb=COLORS["e4m3"])
    c.text(x0 + 80, 430, "E5M2", rgb=COLORS["e5m2"])
    with open(path, "wb") as f:
        f.write(c.png())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "smaller operands: proves the script runs (CI, tests)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    x, w, offs = operands(gen, args.quick)
    rows = []
    for operand, t in (("activations", x), ("weights", w)):
        for recipe in RECIPES:
            for fmt, f8 in FORMATS.items():
                rows.append(dict(operand=operand, recipe=recipe, format=fmt, **roundtrip(t, recipe, f8)))
    gemm = {(r, f): gemm_sqnr(x, w, offs, r, f8) for r in ("rowwise", "mx") for f, f8 in FORMATS.items()}
    training = {(r, wg): training_sqnr(x, w, offs, r, wg, gen) for r, wg in
                (("rowwise", "fp8"), ("mx", "fp8"), ("mx", "hp"))}
    doc = dict(benchmark="numerics_fp8", meta=metadata(__file__, argv, args.quick), roundtrip=rows,
               gemm=[dict(recipe=r, format=fm, sqnr_db=v) for (r, fm), v in gemm.items()],
               training=[dict(recipe=r, wgrad_path=wg, out_db=v["out"], dgrad_db=v["dgrad"], wgrad_db=v["wgrad"])
                         for (r, wg), v in training.items()])
    print(f"operands: activations {tuple(x.shape)} bf16 with 1% outlier channels x30, "
          f"weights {tuple(w.shape)} bf16, experts at scales 2^[-2, 2]\n")
    print(tables.table("numerics_fp8", doc))
    path = json_path("numerics_fp8", args)
    png = os.path.splitext(path)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    chart(rows, png)
    print(f"\nwrote {png}")
    return finish(doc, path, None, args.check)


if __name__ == "__main__":
    raise SystemExit(main())

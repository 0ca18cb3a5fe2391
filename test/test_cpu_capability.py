"""Every CPU-capability build of the kernels.

ATen compiles native/cpu/ once per CPU capability (DEFAULT, AVX2, AVX512 on
x86) and DispatchStub runs the one the CPU supports; our extension is built the
same way (setup.py). The other test files run only the copy this machine
selects (AVX512 on the CI machine); here each copy the CPU can run computes the
same ops in a subprocess with ATEN_CPU_CAPABILITY forcing the choice, checked
against the float64 references, and the results that are exact by contract
(routing, permutation, float8 bytes) must agree bit for bit across copies.

Not covered on CPUs without AVX512_BF16 (the Ice Lake CI machine): the AVX512
build's vdpbf16ps kernels, chosen at run time through cpuinfo, are compiled
there but never run.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from torch_moe_ops.reference import torch_grouped_mm, torch_permute, torch_quantize_fp8, torch_router_topk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["DEFAULT", "AVX2", "AVX512"]

# Runs in the subprocess: the ops on fixed inputs, saved with the capability
# DispatchStub reports.
SCRIPT = r"""
import sys, torch
from torch_moe_ops.ops.grouped_mm import grouped_mm
from torch_moe_ops.ops.experts import grouped_mm_gather
from torch_moe_ops.ops.routing import router_topk, permute, unpermute
from torch_moe_ops.ops.fp8 import quantize_fp8
inputs = torch.load(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, (a, b, offs, bias, idx) in inputs["gmm"].items():
    out["gmm " + name] = grouped_mm(a, b, offs, bias=bias)
    out["gmm f32 " + name] = grouped_mm(a, b, offs, bias=bias, out_dtype=torch.float32)
    out["gather " + name] = grouped_mm_gather(a, b, offs, a_index=idx, bias=bias)
    out["wgrad " + name] = grouped_mm(a.t(), a, offs)
logits, ids_in, tokens = inputs["routing"]
out["topk"] = router_topk(logits, 6, "sigmoid", bias=torch.linspace(-1, 1, 64), n_group=4, topk_group=2,
                          renormalize=True, scaling_factor=2.5)
out["topk softmax"] = router_topk(logits, 6, "softmax")
out["permute"] = permute(tokens, ids_in, 64, alignment=8)
p, dst = out["permute"][0], out["permute"][1]
out["unpermute"] = unpermute(p, dst, inputs["combine_weights"])
for recipe in ("rowwise", "blockwise_1x128", "mx"):
    d, s = quantize_fp8(inputs["fp8"], recipe)
    out["fp8 " + recipe] = (d.view(torch.uint8), s.view(torch.uint8) if s.element_size() == 1 else s)
for name, (a, w, offs) in inputs["rows"].items():
    # Each row again as a group of its own, its expert's weights in the same storage order.
    e = torch.repeat_interleave(torch.arange(w.shape[0]), torch.diff(offs, prepend=offs.new_zeros(1)))
    w_rows = w.transpose(-2, -1)[e].transpose(-2, -1) if w.stride(-2) == 1 else w[e]
    alone = torch.arange(1, a.shape[0] + 1, dtype=torch.int32)
    out["rows " + name] = (grouped_mm(a, w, offs), grouped_mm(a, w_rows, alone))
torch.save(out, sys.argv[2])
"""


def _capabilities():
    best = torch.backends.cpu.get_cpu_capability()
    if best not in ORDER:  # not x86: one build
        return [best]
    return ORDER[: ORDER.index(best) + 1]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    sizes = [5, 0, 37, 70, 1]  # an empty group, odd sizes
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    m, k, n = sum(sizes), 136, 200  # K past one 128-wide block, N past three 64-wide strips
    gmm = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = rnd(m, k).to(dtype)
        bias = rnd(len(sizes), n).to(dtype)
        idx = torch.randint(-1, m, (m,), generator=gen)
        w = rnd(len(sizes), k, n).to(dtype)
        gmm[f"{dtype} kn"] = (a, w, offs, bias, idx)
        # (E, N, K) storage: the inner-product engine of the AVX512 build.
        gmm[f"{dtype} nk"] = (a, w.transpose(-2, -1).contiguous().transpose(-2, -1), offs, bias, idx)
    # The widening engine (the DEFAULT and AVX2 builds): K 600 spans three K
    # blocks (256 float32 / 128 float64 wide), N 40 two full 16-column panels
    # and a partial one; groups of 1, 7, 48 and 130 rows take 1-row, 2-row and
    # 6-row register tiles, the first tile of a multi-row group packing
    # row-major weights as it reads them, a 1-row group reading them in place.
    rows = {}
    sizes = torch.tensor([1, 7, 48, 130])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        a = rnd(int(sizes.sum()), 600).to(dtype)
        w = rnd(len(sizes), 600, 40).to(dtype)
        rows[f"{dtype} kn"] = (a, w, sizes.cumsum(0).to(torch.int32))
        rows[f"{dtype} nk"] = (a, w.transpose(-2, -1).contiguous().transpose(-2, -1), sizes.cumsum(0).to(torch.int32))
    logits = rnd(200, 64)
    ids = rnd(200, 64).topk(4, dim=1).indices.to(torch.int32)
    tokens = rnd(200, 48).to(torch.bfloat16)
    fp8 = (rnd(96, 256) * 4).to(torch.bfloat16)
    return dict(gmm=gmm, rows=rows, routing=(logits, ids, tokens), fp8=fp8,
                combine_weights=torch.rand(200, 4, generator=gen))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_capability")
    inputs = _inputs()
    torch.save(inputs, tmp / "inputs.pt")
    out = {}
    for cap in _capabilities():
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower(), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, "-c", SCRIPT, str(tmp / "inputs.pt"), str(tmp / f"{cap}.pt")], env=env,
                       check=True, timeout=600)
        out[cap] = torch.load(tmp / f"{cap}.pt")
    return inputs, out


def test_dispatch_selects_the_requested_build(results):
    _, out = results
    for cap, r in out.items():
        assert r["capability"] == cap


def _close_to_reference(got, ref, dtype, k):
    # float32 accumulation of k products, one rounding to dtype: a few float32
    # ulps of the magnitude of the sum of |products| plus one ulp of dtype.
    tol = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    bound = 4 * k * 2.0**-24 + tol
    scale = ref.abs().clamp_min(1.0)
    err = ((got.double() - ref) / scale).abs().max().item() if got.numel() else 0.0
    assert err <= bound, (err, bound)


def test_grouped_mm_every_build(results):
    inputs, out = results
    for name, (a, b, offs, bias, idx) in inputs["gmm"].items():
        dtype = a.dtype
        ref = torch_grouped_mm(a, b, offs, bias=bias, out_dtype=torch.float32, acc_dtype=torch.float64)
        a_gathered = torch.where((idx >= 0)[:, None], a[idx.clamp_min(0)], torch.zeros((), dtype=dtype))
        ref_gather = torch_grouped_mm(a_gathered, b, offs, bias=bias, out_dtype=torch.float32, acc_dtype=torch.float64)
        ref_wgrad = torch_grouped_mm(a.t(), a, offs, out_dtype=torch.float32, acc_dtype=torch.float64)
        for cap, r in out.items():
            assert r["gmm " + name].dtype == dtype
            _close_to_reference(r["gmm " + name], ref.double(), dtype, a.shape[1])
            _close_to_reference(r["gmm f32 " + name], ref.double(), torch.float32, a.shape[1])
            _close_to_reference(r["gather " + name], ref_gather.double(), dtype, a.shape[1])
            _close_to_reference(r["wgrad " + name], ref_wgrad.double(), dtype, a.shape[0])
            # Rows no group covers (none here) and the empty group leave nothing uncovered.
            assert torch.isfinite(r["gmm " + name]).all()


def test_widening_engine_rows_do_not_depend_on_their_group(results):
    """In the widening engine each output sums along K in order from zero
    with one fmadd per step, whatever its register tile, K block or panel:
    so a row's bits in a group of 7, 48 or 130 rows equal its bits as a group
    of its own (which reads the weights in place, unpacked), in both weight
    storage orders. A row packed wrongly, a K block's partial sums not
    reloaded, or a panel edge misread changes them. The AVX512 build runs
    other engines, whose orders depend on the group's size: values only."""
    inputs, out = results
    for name, (a, w, offs) in inputs["rows"].items():
        ref = torch_grouped_mm(a.double(), w.double(), offs)
        # float64: K steps of float64 rounding, each within 2^-53 of the sum of |products|.
        magnitude = torch_grouped_mm(a.double().abs(), w.double().abs(), offs)
        for cap, r in out.items():
            group, alone = r["rows " + name]
            if a.dtype != torch.float64:
                _close_to_reference(group, ref, a.dtype, a.shape[1])
            else:
                assert ((group - ref).abs() <= a.shape[1] * 2.0**-53 * magnitude).all(), (cap, name)
            if cap in ("DEFAULT", "AVX2") or a.dtype == torch.float64:
                assert torch.equal(group, alone), f"{cap} {name}: rows differ from the same rows alone"


def test_routing_and_fp8_bits_agree_across_builds(results):
    inputs, out = results
    logits, ids, tokens = inputs["routing"]
    ref_w, ref_ids, ref_counts = torch_router_topk(logits, 6, "sigmoid", bias=torch.linspace(-1, 1, 64), n_group=4,
                                                   topk_group=2, renormalize=True, scaling_factor=2.5)
    ref_perm = torch_permute(tokens, ids, 64, alignment=8)
    first = next(iter(out.values()))
    for cap, r in out.items():
        w, got_ids, counts = r["topk"]
        assert torch.equal(got_ids, ref_ids.to(got_ids.dtype)) and torch.equal(counts, ref_counts.to(counts.dtype))
        torch.testing.assert_close(w, ref_w.to(w.dtype), rtol=1e-6, atol=1e-6)
        for got, ref in zip(r["permute"], ref_perm):
            assert torch.equal(got, ref.to(got.dtype))
        for recipe in ("rowwise", "blockwise_1x128", "mx"):
            d_ref, s_ref = torch_quantize_fp8(inputs["fp8"], recipe)
            d, s = r["fp8 " + recipe]
            assert torch.equal(d, d_ref.view(torch.uint8))
            assert torch.equal(s, s_ref.view(torch.uint8) if s_ref.element_size() == 1 else s_ref)
        # Exact by contract, so every build gives the same bits: the selection
        # (not the weights: the AVX512 build's exp is its own polynomial, not
        # libm's), the permutation and the combine (float32, slot order).
        for key in ("topk", "topk softmax"):
            assert torch.equal(r[key][1], first[key][1]) and torch.equal(r[key][2], first[key][2]), (cap, key)
        for x, y in zip(r["permute"], first["permute"]):
            assert torch.equal(x, y), cap
        assert torch.equal(r["unpermute"], first["unpermute"]), cap


# The AVX512 build's micro-kernels whose accumulators fill the register file
# (6 rows x 64 columns, 16 rows x 8 columns x 3): every loop over them must
# be unrolled in full (GROUPED_MM_UNROLL in GroupedMMAvx512.h). One loop left
# rolled gives the accumulator array an address, and GCC 12 then stores and
# reloads all of it around every K loop, which on a weight gradient's short K
# blocks costs as much as half the FMAs; the results stay right, so only the
# compiled code shows it (and bench_grouped_mm's 2d2d rows). Before the
# unrolling these kernels had 103-188 such moves each.
# The float8 kernels that decode a weight block among their FMAs
# (Float8PairWeights) also hold the decoder's constants: with 6 rows they
# had 54-60 such moves, 18 of them in every K step. They are compiled for
# kFloat8DecodeMR rows at most (GroupedMMAvx512.h), every one checked here.
REGISTER_KERNELS = re.compile(
    r"(micro_bf16_pairs<6, (c10::BFloat16|float), at::native::\(anonymous namespace\)::PairWeights<false> >"
    r"|micro_f32<6, float>|tt_micro<3>|tt_micro_bf16<3>"
    r"|micro_bf16_pairs<\d, (c10::BFloat16|float), at::native::\(anonymous namespace\)::Float8PairWeights<\w+> >)\(")
MAX_STACK_MOVES = 16  # cold paths (an odd K's last pair, NaN rows) may spill a few


def test_avx512_micro_kernels_keep_accumulators_in_registers():
    import torch_moe_ops

    so = torch_moe_ops._C.__file__
    nm, objdump, readelf = shutil.which("nm"), shutil.which("objdump"), shutil.which("readelf")
    if nm is None or objdump is None or readelf is None:
        pytest.skip("nm/objdump/readelf (binutils) not installed: the compiled kernels cannot be read")
    comment = subprocess.run([readelf, "-p", ".comment", so], capture_output=True, text=True).stdout
    if "GCC:" not in comment or "clang" in comment.lower():
        pytest.skip("built by another compiler than GCC: the counts below are GCC 12's")
    symbols = subprocess.run([nm, "-S", "-C", so], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in symbols.splitlines():
        fields = line.split(None, 3)
        match = REGISTER_KERNELS.search(fields[3]) if len(fields) == 4 else None
        if match is None:
            continue
        start, size = int(fields[0], 16), int(fields[1], 16)
        code = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--start-address={start}",
                               f"--stop-address={start + size}", so], capture_output=True, text=True, check=True).stdout
        found[match.group(1)] = sum(1 for insn in code.splitlines() if "zmm" in insn and "(%rsp)" in insn)
    if not found:
        pytest.skip("no AVX512 build of the kernels in this library (not x86, or built without it)")
    float8 = [name for name in found if "Float8PairWeights" in name]
    assert len(found) - len(float8) == 5 and float8, sorted(found)
    spilled = {name: n for name, n in found.items() if n > MAX_STACK_MOVES}
    assert not spilled, f"zmm moves to or from the stack, at most {MAX_STACK_MOVES} allowed: {spilled}"

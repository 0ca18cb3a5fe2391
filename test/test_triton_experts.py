"""The Triton fused experts (torch_moe_ops/triton/experts.py), forward and
backward, in Triton's interpreter, on CPU tensors, against the float64
reference (reference.torch_expert_mlp on float64 copies of the inputs, and
float64 autograd through it for the six gradients).

As test_triton_grouped_mm.py: the kernels run through ``InterpretedFunction``
(no ``TRITON_INTERPRET=1`` needed), float32 and float16 are checked against a
per-element error bound derived below; bfloat16 is not checked (the
interpreter's bfloat16 ``tl.dot`` is wrong, and every path of these kernels
multiplies).

What only a GPU can verify: the compiled kernels' numerics (wgmma, fast
exp/erf), the autotuner's choice, TMA itself, races between programs, timing.
test_triton_aot.py checks what the compiler says about the sm_90a builds.
"""

from __future__ import annotations

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_moe_ops  # noqa: F401  (moe_ops, for the OpInfo modules)
from torch_moe_ops.ops.experts import _like_strides
from torch_moe_ops.reference import torch_expert_mlp, torch_grouped_mm
from torch_moe_ops.triton import experts as tex
from torch_moe_ops.triton import triton_expert_mlp

from opinfo_experts import _expert_routing, expert_mlp_opinfo, sample_inputs_expert_mlp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PRODUCT_DTYPES = [(d, t) for d in DEVICES for t in (torch.float32, torch.float16)
                  + ((torch.bfloat16,) if d == "cuda" else ())]
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24
# Largest |f'| of the activations' nonlinear factors: silu' in [-0.100, 1.100] (also d/dg of
# g * sigmoid(alpha * g), which is silu'(alpha * g)), gelu' in [-0.17, 1.13]; clamps and relu: 1.
LIPSCHITZ = 1.13


def _f64(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _abs(v):
    return None if v is None else v.double().abs()


def expert_mlp_error_bounds(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias=None,
                            down_bias=None, activation="swiglu", gate_up_interleaved=False, swiglu_alpha=1.702,
                            swiglu_limit=7.0):
    """(exact out, exact h, per-element bound on |out - exact|, on |h - exact|)
    for the kernels' arithmetic, in float64. u = 2^-24 (fp32), u_d the
    dtype's unit roundoff:

    * h: an fp32 dot of H products plus the bias, any summation order:
      |acc - h| <= (H + 2) u (|x| |W1| + |b1|) =: E; stored rounded:
      Dh = E + u_d (|h| + E).
    * a = act(h as stored), fp32: the change of act over the error of its
      inputs, |f'| <= LIPSCHITZ for the nonlinear factor with |f(g)| <= |g|
      (silu, gelu, the clamped gate's g sigmoid(alpha g)), the other factor
      up (or clamp(up) + 1) taken at its largest, |up| + Dup; plus 32 u of
      evaluation error (exp/erf and three products in fp32) on
      (1 + |g| + Dg)(1 + |up| + Dup); then one rounding to the dtype.
    * y = a W2 + b2 in fp32 (not rounded): Da through |W2| plus
      (I + 2) u (|a| |W2| + |b2|); times the weight (exact in fp32: weights
      are fp32 or the dtype) with one rounding u; the combine's k - 1 fp32
      sums add (k - 1) u of the sum of the terms' magnitudes; then the
      output's rounding u_d (|out| + err).

    Elements whose every term is zero (no slot, zero tokens) get a zero bound:
    they must be exact."""
    dtype = tokens.dtype
    ud = UNIT_ROUNDOFF[dtype]
    U32 = 2.0**-53 if dtype == torch.float64 else 2.0**-24  # the kernels' accumulation: fp64 for fp64 inputs
    args64 = [_f64(a) for a in (tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
                                down_bias)]
    out, h = torch_expert_mlp(*args64, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit)
    k, H = dst_rows.shape[1], tokens.shape[1]
    inter = down_proj.shape[1]
    rows = src_rows.div(k, rounding_mode="floor")
    x = torch.cat([tokens.double(), tokens.new_zeros(1, H, dtype=torch.float64)])[rows]
    E = (H + 2) * U32 * torch_grouped_mm(x.abs(), _abs(gate_up_proj), offs, _abs(gate_up_bias), torch.float64)
    Dh = E + ud * (h.abs() + E)
    if activation in ("swiglu", "geglu", "swiglu_clamped"):
        def halves(t):
            return (t[:, 0::2], t[:, 1::2]) if gate_up_interleaved else (t[:, :inter], t[:, inter:])
        (g, up), (Dg, Du) = halves(h), halves(Dh)
        gm, um = g.abs() + Dg, up.abs() + Du
        if activation == "swiglu_clamped":
            um = um.clamp(max=swiglu_limit) + 1
        Da = LIPSCHITZ * um * Dg + gm * Du
        mag = gm * um
        Da = Da + 32 * U32 * (1 + gm) * (1 + um)
    else:
        mag = h.abs() + Dh
        Da = LIPSCHITZ * Dh + 32 * U32 * (1 + mag)
    Da = Da + ud * (mag + Da)
    a_mag = mag + Da
    down_abs = _abs(down_proj)
    Dy = (torch_grouped_mm(Da, down_abs, offs, None, torch.float64)
          + (inter + 2) * U32 * torch_grouped_mm(a_mag, down_abs, offs, _abs(down_bias), torch.float64))
    y_mag = torch_grouped_mm(a_mag, down_abs, offs, _abs(down_bias), torch.float64)
    w = _abs(weights) if weights is not None else None
    # Per token: sum over its slots of |w| (Dy + u |y|) and (k - 1) u sum |w y|, through the reference combine.
    from torch_moe_ops.reference import torch_unpermute
    err = (torch_unpermute(Dy + U32 * y_mag, dst_rows, w)
           + max(k - 1, 0) * U32 * torch_unpermute(y_mag, dst_rows, w))
    tol_out = err + ud * (out.abs() + err)
    return out, h, tol_out, Dh


def assert_within(got, exact, tol, what):
    assert got.shape == exact.shape, what
    err = (got.double() - exact).abs()
    bad = err > 1.01 * tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, worst at {tuple(bad.nonzero()[0].tolist())}: "
                           f"err {err[bad].max().item():.3g} > tol {tol[bad].min().item():.3g}")


def check_against_reference(args, kwargs, **launch):
    out, h = triton_expert_mlp(*args, **kwargs, **launch)
    exact_out, exact_h, tol_out, tol_h = expert_mlp_error_bounds(*args, **kwargs)
    assert out.dtype == h.dtype == args[0].dtype
    assert_within(h, exact_h, tol_h, "h")
    assert_within(out, exact_out, tol_out, "out")
    return out, h


@pytest.mark.parametrize("device,dtype", PRODUCT_DTYPES, ids=str)
def test_opinfo_samples(device, dtype):
    """Every expert_mlp OpInfo sample: the six activations, split and
    interleaved gate/up, biases, weights in fp32, in the dtype or absent,
    both weight storage orders, aligned padding rows, dropped slots (local
    experts), empty experts, zero tokens, strided tokens."""
    samples = list(sample_inputs_expert_mlp(expert_mlp_opinfo, device, dtype, requires_grad=False))
    assert len({s.kwargs["activation"] for s in samples}) == 6
    for s in samples:
        check_against_reference((s.input, *s.args), s.kwargs)


def _multi_tile_case(dtype, activation, interleaved, bias, k_major, seed=0):
    """Groups spanning several of the interpreter's 16x16 tiles, ragged H (40)
    and I (36), aligned padding rows and a dropped slot (a local expert set)."""
    T, H, inter, E, k = 30, 40, 36, 4, 3
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: ((torch.rand(*s, generator=g) * 2 - 1) * scale).to(dtype)  # noqa: E731
    src_rows, offs, dst_rows = _expert_routing(T, 5, k, "cpu", seed, None, alignment=4, first_expert=0,
                                               num_local_experts=E)
    n1 = 2 * inter if activation in ("swiglu", "geglu", "swiglu_clamped") else inter
    if k_major:
        gate_up, down = rand(E, n1, H, scale=0.3).mT, rand(E, H, inter, scale=0.3).mT
    else:
        gate_up, down = rand(E, H, n1, scale=0.3), rand(E, inter, H, scale=0.3)
    weights = torch.rand(T, k, generator=g)
    kwargs = dict(activation=activation, gate_up_interleaved=interleaved)
    if activation == "swiglu_clamped":
        kwargs["swiglu_limit"] = 1.0
    if bias:
        kwargs.update(gate_up_bias=rand(E, n1), down_bias=rand(E, H))
    return (rand(T, H), src_rows, offs, dst_rows, weights, gate_up, down), kwargs


@pytest.mark.parametrize("activation,interleaved,tma", [("swiglu", False, False), ("swiglu", False, True),
                                                        ("swiglu_clamped", True, False), ("gelu", False, True)])
def test_multi_tile_schedule_independent_of_grid(activation, interleaved, tma):
    """Several tiles per group in M, N and K; weights (G, N, K) through TMA
    descriptors (interpreted: zero fill past each group's K and N, the gate
    tile's columns past I reading up columns that are never stored) or
    pointers. Every output element is computed by one program, and the
    combine sums in slot order: the bits are the same for any persistent
    grid (1 program; 3; more programs than tiles)."""
    args, kwargs = _multi_tile_case(torch.float32, activation, interleaved, bias=True, k_major=True)
    first = check_against_reference(args, kwargs, num_programs=1, tma=tma)
    for p in (3, 40):
        out, h = triton_expert_mlp(*args, **kwargs, num_programs=p, tma=tma)
        assert torch.equal(out, first[0]) and torch.equal(h, first[1])


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu"])
def test_multi_tile_fp16(activation):
    args, kwargs = _multi_tile_case(torch.float16, activation, activation == "geglu", bias=True, k_major=False,
                                    seed=1)
    check_against_reference(args, kwargs)


def test_h_is_expert_mlps_h():
    """h is moe_ops.expert_mlp's h (the pre-activation with the bias, in the
    dtype), within one rounding of it: both are fp32 dots rounded once."""
    args, kwargs = _multi_tile_case(torch.float32, "swiglu", False, bias=True, k_major=True)
    _, h = triton_expert_mlp(*args, **kwargs)
    _, h_op = torch.ops.moe_ops.expert_mlp(*args, **kwargs)
    _, exact_h, _, tol_h = expert_mlp_error_bounds(*args, **kwargs)
    assert_within(h_op, exact_h, tol_h, "moe_ops.expert_mlp's h")
    torch.testing.assert_close(h, h_op, rtol=0, atol=2 * tol_h.max().item())


def test_rejects_what_expert_mlp_rejects():
    args, kwargs = _multi_tile_case(torch.float32, "swiglu", False, bias=False, k_major=True)
    with pytest.raises(ValueError, match='activation must be one of .* got "tanh"'):
        triton_expert_mlp(*args, activation="tanh")


def test_float64_forward_and_backward(activation="swiglu_clamped", interleaved=True):
    """float64 inputs: accumulators, activations and slot rows in float64 (the
    ops take float64: gradcheck on a GPU runs these kernels). Forward within
    twice the bound derived above with u = 2^-53 (the kernels' rounding and
    the float64 reference's own, each within the bound); the six gradients
    within check_backward's float64 tolerance. One case (the fullest epilogue:
    interleaved gated clamps and biases), ~18 s in the interpreter."""
    args, kwargs = _multi_tile_case(torch.float64, activation, interleaved, bias=True, k_major=True)
    args = (*args[:4], args[4].double(), *args[5:])  # weights in the tokens' dtype (fp32 weights widen exactly)
    out, h = triton_expert_mlp(*args, **kwargs)
    exact_out, exact_h, tol_out, tol_h = expert_mlp_error_bounds(*args, **kwargs)
    assert out.dtype == h.dtype == torch.float64
    assert_within(h, exact_h, 2 * tol_h, "h")
    assert_within(out, exact_out, 2 * tol_out, "out")
    assert (out - exact_out).abs().max() < 1e-12  # not a float32 path
    check_backward(args, kwargs)


def test_triton_op_eager_and_traced():
    """moe_ops_triton::expert_mlp: eager on CPU is the interpreted kernels;
    it traces with fake tensors under torch.compile."""
    args, kwargs = _multi_tile_case(torch.float32, "geglu", True, bias=True, k_major=True)
    eager = torch.ops.moe_ops_triton.expert_mlp(*args, **kwargs)
    direct = triton_expert_mlp(*args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(eager, direct))
    compiled = torch.compile(torch.ops.moe_ops_triton.expert_mlp, backend="aot_eager", fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(compiled(*args, **kwargs), eager))
    pos = tuple(args) + (kwargs["gate_up_bias"], kwargs["down_bias"], "geglu", True, 1.702, 7.0)
    torch.library.opcheck(torch.ops.moe_ops_triton.expert_mlp_interpreted.default, pos,
                          test_utils=("test_schema", "test_faketensor"))


def test_autotuner_configs_are_the_compiled_ones():
    """The configs the autotuners may pick (per dtype class and stage) are
    those test_triton_aot compiles (aot.configs_for_variant reads configs_for)."""
    bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    assert tex._autotuned(bf16, 0).configs == tex.CONFIGS_16BIT_GATE_UP == tex.configs_for(bf16, 0)
    assert tex._autotuned(fp16, 1) is tex._autotuned(bf16, 1)
    assert tex._autotuned(fp16, 1).configs == tex.CONFIGS_16BIT == tex.configs_for(fp16, 1)
    assert tex._autotuned(bf16, 2).configs == tex.CONFIGS_16BIT_DGRAD == tex.configs_for(bf16, 2)
    assert tex._autotuned(fp32, 0).configs == tex.CONFIGS_FP32_GATE_UP == tex.configs_for(fp32, 2)
    assert tex._autotuned(fp32, 1).configs == tex.CONFIGS_FP32
    assert all(tex._autotuned(fp64, s).configs == tex.CONFIGS_FP64 for s in range(3))
    # act stored in float8: 1x128 blocks need 128-wide tiles; rowwise and mx take the gate/up ones.
    q = tex.QUANT_RECIPES
    assert tex._autotuned(fp16, 0, q["blockwise_1x128"]) is tex._autotuned(bf16, 0, q["blockwise_1x128"])
    assert tex._autotuned(bf16, 0, q["blockwise_1x128"]).configs == tex.CONFIGS_16BIT_GATE_UP_1X128
    assert tex._autotuned(fp32, 0, q["blockwise_1x128"]).configs == tex.CONFIGS_FP32_GATE_UP_1X128
    assert all(c.kwargs["BLOCK_N"] % 128 == 0 for c in tex.CONFIGS_16BIT_GATE_UP_1X128 + tex.CONFIGS_FP32_GATE_UP_1X128)
    for recipe in ("rowwise", "mx"):
        assert tex._autotuned(bf16, 0, q[recipe]).configs == tex.CONFIGS_16BIT_GATE_UP
    assert all(c.kwargs["BLOCK_N"] % 32 == 0 for c in tex.CONFIGS_16BIT_GATE_UP + tex.CONFIGS_FP32_GATE_UP)


# ------------------------------------------------------------------ backward


def backward_magnitudes(grad_out, tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
                        down_bias, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit):
    """Per element of every gradient, the sum of the absolute values of the
    terms it is made of (float64), through bounds of the activations'
    factors: row r (token t, weight w, expert e) has g = grad_out[t] @ down_e^T
    with |g| <= |grad_out[t]| @ |down_e|^T =: G; the gate's gradient factor
    |d act / d gate| <= (1.13 + |gate|) |up'| (1.13 bounds silu' and gelu'; the
    |gate| term covers their change over h's rounding, |f''| <= 0.5 |..|), the
    up's |gate|; non-gated 1.13 + |h|. The GEMMs then sum such terms with
    absolute operands. Cancellation (the gradients of gate_up and of the
    routing weights sum terms of both signs) is why the bound is this sum and
    not the rows' largest value (CONTRIBUTING: per element)."""
    f64 = torch.float64
    k, H = dst_rows.shape[1], tokens.shape[1]
    inter = down_proj.shape[1]
    rows = src_rows.div(k, rounding_mode="floor")
    pad = lambda t: torch.cat([t.double(), t.new_zeros(1, t.shape[1], dtype=f64)])  # noqa: E731
    x, go = pad(tokens)[rows].abs(), pad(grad_out)[rows].abs()
    if weights is not None:
        flat = torch.cat([weights.reshape(-1).double().abs(), torch.zeros(1, dtype=f64)])
        w = flat[torch.where(src_rows >= 0, src_rows, flat.shape[0] - 1)][:, None]
    else:
        w = (src_rows >= 0).double()[:, None]
    h = torch_grouped_mm(pad(tokens)[rows], gate_up_proj.double(), offs, _f64(gate_up_bias), f64)
    G = torch_grouped_mm(go, down_proj.double().abs().transpose(-2, -1), offs, None, f64)
    if activation in ("swiglu", "geglu", "swiglu_clamped"):
        if gate_up_interleaved:
            gate, up = h[:, 0::2].abs(), h[:, 1::2].abs()
        else:
            gate, up = h[:, :inter].abs(), h[:, inter:].abs()
        up_f = up.clamp(max=swiglu_limit) + 1 if activation == "swiglu_clamped" else up
        d_gate, d_up = w * G * (1.13 + gate) * up_f, w * G * gate
        dh = torch.stack([d_gate, d_up], 2).flatten(1) if gate_up_interleaved else torch.cat([d_gate, d_up], 1)
        act = gate * up_f
    else:
        dh = w * G * (1.13 + h.abs())
        act = h.abs()
    dx = torch_grouped_mm(dh, gate_up_proj.double().abs().transpose(-2, -1), offs, None, f64)
    from torch_moe_ops.reference import torch_unpermute
    mags = {"tokens": torch_unpermute(dx, dst_rows, None)}
    if weights is not None:
        d_row = (G * act).sum(1)
        if down_bias is not None:
            d_row = d_row + torch_grouped_mm(go, _abs(down_bias).unsqueeze(-1), offs, None, f64).squeeze(1)
        flat_d = torch.cat([d_row, torch.zeros(1, dtype=f64)])
        dst = dst_rows.reshape(-1)
        mags["weights"] = flat_d[torch.where(dst >= 0, dst, d_row.shape[0])].view(dst_rows.shape)
    mags["gate_up"] = torch_grouped_mm(x.t(), dh, offs, None, f64)
    mags["down"] = torch_grouped_mm((w * act).t(), go, offs, None, f64)
    if gate_up_bias is not None:
        mags["gate_up_bias"] = torch_grouped_mm(torch.ones(1, dh.shape[0], dtype=f64), dh, offs, None, f64)[:, 0]
    if down_bias is not None:
        mags["down_bias"] = torch_grouped_mm(w.t(), go, offs, None, f64)[:, 0]
    return mags


GRAD_NAMES = ("tokens", "weights", "gate_up", "down", "gate_up_bias", "down_bias")


def check_backward(args, kwargs, seed=0, factor=4, got=None, **launch):
    """Every gradient of the Triton backward (h from the Triton forward)
    against float64 autograd through reference.torch_expert_mlp, per element:
    factor * ROW_TOL[dtype] * (|exact| + magnitude) (test/common.py), with
    the magnitude of backward_magnitudes. ROW_TOL is 2^-11 for fp16 (one
    rounding; the chain rounds h, act(h) and dh once each, and the GEMMs'
    fp32 sums add (K + 2) 2^-24, far below) and 2e-5 for fp32 (335 units of
    2^-24: the K + 2 of each of two chained fp32 dots, K <= 40 here)."""
    from common import assert_rows_close

    full = {**dict(gate_up_bias=None, down_bias=None, activation="swiglu", gate_up_interleaved=False,
                   swiglu_alpha=1.702, swiglu_limit=7.0), **kwargs}
    tokens, src_rows, offs, dst_rows, weights, gate_up, down = args
    dtype = tokens.dtype
    h = triton_expert_mlp(*args, **kwargs)[1] if got is None else None
    grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    rest = (full["gate_up_bias"], full["down_bias"], h, full["activation"], full["gate_up_interleaved"],
            full["swiglu_alpha"], full["swiglu_limit"])
    if got is None:  # else: given gradients, checked
        got = tex.triton_expert_mlp_backward(grad, *args, *rest, (True,) * 4, **launch)
    leaves = {"tokens": tokens, "weights": weights, "gate_up": gate_up, "down": down,
              "gate_up_bias": full["gate_up_bias"], "down_bias": full["down_bias"]}
    leaves64 = {n: v.detach().double().requires_grad_() for n, v in leaves.items() if v is not None}
    ref_out, _ = torch_expert_mlp(leaves64["tokens"], src_rows, offs, dst_rows, leaves64.get("weights"),
                                  leaves64["gate_up"], leaves64["down"], leaves64.get("gate_up_bias"),
                                  leaves64.get("down_bias"), full["activation"], full["gate_up_interleaved"],
                                  full["swiglu_alpha"], full["swiglu_limit"])
    names = list(leaves64)
    want = dict(zip(names, torch.autograd.grad(ref_out, [leaves64[n] for n in names], grad.double(),
                                               allow_unused=True)))
    mags = backward_magnitudes(grad, *args, *rest[:2], *rest[3:])
    for name, g in zip(GRAD_NAMES, got):
        if leaves[name] is None:
            assert g.numel() == 0, name
            continue
        # expert_mlp_backward's layouts: the weights' own (a transposed view stays one), else contiguous.
        layout = _like_strides(leaves[name]) if name in ("gate_up", "down") else leaves[name].new_empty(g.shape)
        assert g.dtype == leaves[name].dtype and g.stride() == layout.stride(), name
        exact = want[name] if want[name] is not None else torch.zeros_like(leaves64[name])
        assert_rows_close(g, exact, dtype, factor, f"grad of {name}", mags[name])
    return got


@pytest.mark.parametrize("device,dtype", PRODUCT_DTYPES, ids=str)
def test_backward_opinfo_samples(device, dtype):
    """Every expert_mlp OpInfo sample's six gradients (the weights' in their
    own layout: transformers' transposed views stay transposed)."""
    for s in sample_inputs_expert_mlp(expert_mlp_opinfo, device, dtype, requires_grad=False):
        check_backward((s.input, *s.args), s.kwargs)


@pytest.mark.parametrize("activation,interleaved,tma", [("swiglu", False, True), ("swiglu_clamped", True, False),
                                                        ("geglu", False, False)])
def test_backward_multi_tile(activation, interleaved, tma):
    """Several tiles per group (so several partial sums per row for the
    routing weights' gradient); the bits do not depend on the grid."""
    args, kwargs = _multi_tile_case(torch.float32, activation, interleaved, bias=True, k_major=tma)
    first = check_backward(args, kwargs, num_programs=1, tma=tma)
    again = check_backward(args, kwargs, num_programs=5, tma=tma)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_backward_fp16_multi_tile():
    args, kwargs = _multi_tile_case(torch.float16, "swiglu", False, bias=True, k_major=False, seed=2)
    check_backward(args, kwargs)


def test_backward_bound_catches_a_one_percent_error():
    """In fp32 any one gradient 1% off fails the bound (it is a worst case over
    the absolute terms, so in fp16 the gradients that cancel, of the tokens and
    of gate_up, allow a few percent: measured 1% = 0.3 and 0.9 of their fp16
    bounds, 24 times more of the fp32 ones)."""
    args, kwargs = _multi_tile_case(torch.float32, "swiglu", False, bias=True, k_major=False, seed=2)
    got = check_backward(args, kwargs)
    for i, name in enumerate(GRAD_NAMES):
        with pytest.raises(AssertionError, match=f"grad of {name}"):
            check_backward(args, kwargs, got=tuple(g * 1.01 if j == i else g for j, g in enumerate(got)))


def test_triton_op_autograd_eager_and_compiled():
    """moe_ops_triton::expert_mlp is differentiable (moe_ops.expert_mlp's
    saved set, its backward moe_ops_triton::expert_mlp_backward): the
    gradients equal triton_expert_mlp_backward's, eager and under
    torch.compile(fullgraph=True) with aot_eager."""
    s = next(s for s in sample_inputs_expert_mlp(expert_mlp_opinfo, "cpu", torch.float32, requires_grad=False)
             if s.name == "swiglu_clamped_interleaved_bias")  # small: the interpreter runs it three times
    args, kwargs = (s.input, *s.args), {**s.kwargs, "swiglu_limit": 1.0}
    tokens, src_rows, offs, dst_rows, weights, gate_up, down = args
    gub, dnb = kwargs["gate_up_bias"], kwargs["down_bias"]
    grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
    out, h = triton_expert_mlp(*args, **kwargs)
    want = tex.triton_expert_mlp_backward(grad, *args, gub, dnb, h, "swiglu_clamped", True, 1.702, 1.0,
                                          (True,) * 4)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (tokens, weights, gate_up, down, gub, dnb)]
        x, w, gu, dn, b1, b2 = leaves
        o, _ = fn(x, src_rows, offs, dst_rows, w, gu, dn, b1, b2, "swiglu_clamped", True, 1.702, 1.0)
        return torch.autograd.grad(o, leaves, grad)

    op = torch.ops.moe_ops_triton.expert_mlp
    for got in (grads(op), grads(torch.compile(op, backend="aot_eager", fullgraph=True))):
        for name, g, w in zip(GRAD_NAMES, got, want):
            assert torch.equal(g, w.reshape(g.shape)), name
    pos = (grad, *args, gub, dnb, h, "swiglu_clamped", True, 1.702, 1.0, [True] * 4)
    torch.library.opcheck(torch.ops.moe_ops_triton.expert_mlp_backward_interpreted.default, pos,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not isinstance(tex.expert_gemm_kernel, triton.runtime.JITFunction),
                    reason="TRITON_INTERPRET=1 makes the kernels interpreted functions: nothing to trace")
def test_triton_ops_trace_into_the_kernels_on_cuda(monkeypatch):
    """With fake CUDA tensors (no GPU needed), functionalised tracing of
    moe_ops_triton::expert_mlp and ::expert_mlp_backward yields the Triton
    kernels themselves (triton_kernel_wrapper_functional nodes, which
    Inductor compiles), not opaque calls: forward gate/up GEMM, down GEMM,
    combine; backward dgrad, the grouped GEMMs and the combine."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch_moe_ops.triton import grouped_mm as tgm

    monkeypatch.setattr(tgm, "_num_sms", lambda index: 132)  # an H100's driver answers
    monkeypatch.setattr(tgm, "_capability", lambda index: (9, 0))

    def kernels(graph):
        nodes = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
        found = []
        for n in nodes:
            k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            found.append((getattr(k, "fn", k).__name__, n.kwargs["kwargs"].get("STAGE")))
        return found

    with FakeTensorMode():
        E, T, H, inter, k = 4, 64, 256, 128, 2
        dev = dict(device="cuda", dtype=torch.bfloat16)
        tokens = torch.empty(T, H, **dev)
        src_rows = torch.empty(T * k, device="cuda", dtype=torch.int64)
        offs = torch.empty(E, device="cuda", dtype=torch.int32)
        dst_rows = torch.empty(T, k, device="cuda", dtype=torch.int64)
        weights = torch.empty(T, k, device="cuda", dtype=torch.float32)
        gate_up = torch.empty(E, 2 * inter, H, **dev).transpose(1, 2)
        down = torch.empty(E, H, inter, **dev).transpose(1, 2)
        args = (tokens, src_rows, offs, dst_rows, weights, gate_up, down)
        fwd = make_fx(dispatch_functionalize(torch.ops.moe_ops_triton.expert_mlp))(*args)
        h = torch.empty(T * k, 2 * inter, **dev)
        bwd = make_fx(dispatch_functionalize(torch.ops.moe_ops_triton.expert_mlp_backward))(
            torch.empty(T, H, **dev), *args, None, None, h, "swiglu", False, 1.702, 7.0, [True] * 4)
    assert kernels(fwd) == [("expert_gemm_kernel", 0), ("expert_gemm_kernel", 1), ("combine_kernel", None)]
    found = kernels(bwd)
    assert found[0] == ("expert_gemm_kernel", 2) and ("combine_kernel", None) in found
    assert sum(name == "grouped_mm_kernel" for name, _ in found) == 3  # dx and the two weights (no biases)


def test_backward_rejects_what_expert_mlp_backward_rejects():
    """The messages of moe_ops.expert_mlp_backward (ExpertMLP.cpp) for grad_out and h."""
    args, kwargs = _multi_tile_case(torch.float32, "swiglu", False, bias=False, k_major=True)
    tokens = args[0]
    h = torch.zeros(args[1].shape[0], args[5].shape[2])
    rest = (None, None, h, "swiglu", False, 1.702, 7.0)
    for bad_grad, bad_h in ((tokens.double(), h), (tokens[:-1], h), (tokens, h[:, :-1]), (tokens, h.double())):
        with pytest.raises(ValueError, match="expert_mlp_backward: (grad_out|h) must be") as tri:
            tex.triton_expert_mlp_backward(bad_grad, *args, *rest[:2], bad_h, *rest[3:])
        with pytest.raises((ValueError, RuntimeError)) as op:
            torch.ops.moe_ops.expert_mlp_backward(bad_grad, *args, *rest[:2], bad_h, *rest[3:], [True] * 4)
        assert str(tri.value) in str(op.value)



@st.composite
def expert_problems(draw):
    """Random layers: tokens (zero included), hidden and intermediate sizes
    ragged against the interpreter's 16-wide tiles, experts, top_k, skewed
    routing, expert-parallel local ranges (dropped slots), padding alignment,
    every activation, interleaving, biases, weights absent/fp32, either
    weight storage order, the persistent grid size."""
    T, H, inter = draw(st.integers(0, 24)), draw(st.integers(1, 36)), draw(st.integers(1, 20))
    E, k = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    k = min(k, E + 1)
    activation = draw(st.sampled_from(sorted(tex.ACTIVATIONS)))
    gated = activation in ("swiglu", "geglu", "swiglu_clamped")
    return dict(T=T, H=H, inter=inter, E=E, k=k, activation=activation,
                interleaved=gated and draw(st.booleans()), bias=draw(st.booleans()),
                weights=draw(st.booleans()), k_major=draw(st.booleans()), skew=draw(st.booleans()),
                local=draw(st.booleans()), alignment=draw(st.sampled_from([1, 4])),
                programs=draw(st.integers(1, 5)), backward=draw(st.booleans()))


def _problem_case(p, seed, column_major_tokens=False):
    """An expert_problems draw as (args, kwargs) of triton_expert_mlp, float32
    values in [-1, 1) (weights scaled by 1/2). local: experts 0..E-1 of E + 2
    are this rank's, the slots routed to the other two are dropped."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.rand(*s, generator=g) * 2 - 1) * scale  # noqa: E731
    routed = p["E"] + (2 if p["local"] else 0)
    k = min(p["k"], routed)
    src_rows, offs, dst_rows = _expert_routing(p["T"], routed, k, "cpu", seed % 1000, "one" if p["skew"] else None,
                                               alignment=p["alignment"], first_expert=0, num_local_experts=p["E"])
    gated = p["activation"] in ("swiglu", "geglu", "swiglu_clamped")
    E, H, inter = p["E"], p["H"], p["inter"]
    n1 = 2 * inter if gated else inter
    if p["k_major"]:
        gate_up, down = rand(E, n1, H, scale=0.5).mT, rand(E, H, inter, scale=0.5).mT
    else:
        gate_up, down = rand(E, H, n1, scale=0.5), rand(E, inter, H, scale=0.5)
    weights = torch.rand(p["T"], k, generator=g) if p["weights"] else None
    kwargs = dict(activation=p["activation"], gate_up_interleaved=p["interleaved"], swiglu_limit=1.5)
    if p["bias"]:
        kwargs.update(gate_up_bias=rand(E, n1), down_bias=rand(E, H))
    tokens = rand(H, p["T"]).t() if column_major_tokens else rand(p["T"], H)
    return (tokens, src_rows, offs, dst_rows, weights, gate_up, down), kwargs


@settings(max_examples=25, deadline=None)
@given(expert_problems(), st.integers(0, 2**31 - 1))
def test_property_matches_reference(p, seed):
    """Forward (and, for half the examples, every gradient) against the
    float64 reference with the bounds above, fp32."""
    args, kwargs = _problem_case(p, seed)
    check_against_reference(args, kwargs, num_programs=p["programs"])
    if p["backward"]:
        check_backward(args, kwargs, seed=seed, num_programs=p["programs"])


# ------------------------------------------------------------------ float8 act for an fp8 down GEMM
# triton_expert_mlp_fp8: the gate/up epilogue stores act quantised (rowwise, 1x128 or
# mx) and the down GEMM is the fp8 scaled kernel. Interpreted in float32 and float16;
# not bfloat16, whose tl.dot and float32 -> bfloat16 rounding are wrong in Triton's
# interpreter (so neither the unfused act nor the reference would be right). What only
# a GPU can verify: that the compiled epilogue's exp/erf give the interpreter's act
# bits (the fused and unfused kernels share one code path, so they agree with each
# other on the GPU too), QGMMA's accumulation, timing.

FP8_RECIPES = ("rowwise", "blockwise_1x128", "mx")
# The down weights' recipe that pairs with act's in scaled_grouped_mm (2D x 3D).
WEIGHT_RECIPE = {"rowwise": "rowwise", "blockwise_1x128": "blockwise_128x128", "mx": "mx"}


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _unfused_act(args, kwargs, **launch):
    """(act, h) of the unfused gate/up GEMM (triton_expert_mlp's first kernel)."""
    tokens, src_rows, offs, dst_rows, weights, gate_up, down = args
    kw = {**dict(gate_up_bias=None, down_bias=None, activation="swiglu", gate_up_interleaved=False,
                 swiglu_alpha=1.702, swiglu_limit=7.0), **kwargs}
    _, h, act, slot_rows = tex._allocate(tokens, src_rows, dst_rows, gate_up, down)
    stage = tex.stage_args(0, tokens, src_rows, offs, dst_rows, weights, gate_up, down, kw["gate_up_bias"], None,
                           kw["activation"], kw["gate_up_interleaved"], kw["swiglu_alpha"], kw["swiglu_limit"], h, act,
                           slot_rows, tma=launch.get("tma"))
    tex._run_gemm(stage, False, None, launch.get("num_programs"), lambda k: k)
    return act, h


def _fused_act(args, kwargs, recipe, f8=torch.float8_e4m3fn, **launch):
    tokens, src_rows, offs, dst_rows, weights, gate_up, down = args
    kw = {**dict(gate_up_bias=None, activation="swiglu", gate_up_interleaved=False, swiglu_alpha=1.702,
                 swiglu_limit=7.0), **kwargs}
    return tex._gate_up_fp8(tokens, src_rows, offs, dst_rows, gate_up, down.shape[1], kw["gate_up_bias"],
                            kw["activation"], kw["gate_up_interleaved"], kw["swiglu_alpha"], kw["swiglu_limit"],
                            recipe, f8, True, None, launch.get("num_programs"), launch.get("tma"), lambda k: k)


def _quantized_act_reference(act, recipe, offs, f8=torch.float8_e4m3fn):
    """moe_ops.quantize_fp8 of the unfused act; mx scales blocked per group of rows."""
    data, scale = torch.ops.moe_ops.quantize_fp8(act, recipe, f8)
    if recipe == "mx":
        scale = torch.ops.moe_ops.swizzle_mx_scale(scale, offs, 0)
    return data, scale


def _fp8_case(dtype, activation, interleaved, inter=36, seed=0):
    args, kwargs = _multi_tile_case(dtype, activation, interleaved, bias=True, k_major=True, seed=seed)
    if inter != 36:  # a wider I: several 1x128 blocks per row (the last one partial)
        tokens, src_rows, offs, dst_rows, weights, gate_up, down = args
        g = torch.Generator().manual_seed(seed + 7)
        n1 = 2 * inter if activation in ("swiglu", "geglu", "swiglu_clamped") else inter
        gate_up = ((torch.rand(gate_up.shape[0], n1, gate_up.shape[1], generator=g) * 2 - 1) * 0.3).to(dtype).mT
        down = ((torch.rand(down.shape[0], inter, down.shape[2], generator=g) * 2 - 1) * 0.3).to(dtype)
        kwargs["gate_up_bias"] = ((torch.rand(gate_up.shape[0], n1, generator=g) * 2 - 1)).to(dtype)
        args = (tokens, src_rows, offs, dst_rows, weights, gate_up, down)
    return args, kwargs


@pytest.mark.parametrize("recipe", FP8_RECIPES)
@pytest.mark.parametrize("dtype,activation,interleaved,tma", [
    (torch.float32, "swiglu", False, True), (torch.float32, "swiglu_clamped", True, False),
    (torch.float16, "geglu", False, False), (torch.float32, "relu", False, True)], ids=str)
def test_fp8_act_is_quantize_fp8_of_the_unfused_act(recipe, dtype, activation, interleaved, tma):
    """The gate/up epilogue's float8 act and scales are, bit for bit,
    moe_ops.quantize_fp8 of the act the unfused kernel stores (rounded to the
    tokens' dtype; mx scales then swizzle_mx_scale(scale, offs, 0), the layout
    the down GEMM reads, padding bytes zero), and h is the unfused h: ragged I
    (36: partial 1x128 and mx blocks), several N tiles per row (rowwise's two
    sweeps), aligned padding rows, a dropped slot, rows past offs[-1], for any
    persistent grid (1 program, 3, more than tiles: in the first case only)."""
    args, kwargs = _fp8_case(dtype, activation, interleaved)
    act, h = _unfused_act(args, kwargs, tma=tma)
    want = _quantized_act_reference(act, recipe, args[2])
    for p in (1, 3, 40) if (dtype, activation) == (torch.float32, "swiglu") else (3,):
        data, scale, h8 = _fused_act(args, kwargs, recipe, num_programs=p, tma=tma)
        assert data.dtype == torch.float8_e4m3fn and data.shape == act.shape
        assert scale.dtype == want[1].dtype and scale.shape == want[1].shape, (scale.shape, want[1].shape)
        assert torch.equal(_bits(data), _bits(want[0])), f"{recipe} p={p}: data bits differ"
        assert torch.equal(_bits(scale), _bits(want[1])), f"{recipe} p={p}: scale bits differ"
        assert torch.equal(h8, h)


@pytest.mark.parametrize("recipe", ["blockwise_1x128", "mx"])
def test_fp8_act_wide_rows_and_e5m2(recipe):
    """I = 160: two 1x128 blocks a row (one partial), five mx blocks; e5m2
    (rowwise's several N tiles a row are in the test above)."""
    args, kwargs = _fp8_case(torch.float32, "swiglu", False, inter=160, seed=2)
    act, _ = _unfused_act(args, kwargs)
    want = _quantized_act_reference(act, recipe, args[2], torch.float8_e5m2)
    data, scale, _ = _fused_act(args, kwargs, recipe, torch.float8_e5m2)
    assert data.dtype == torch.float8_e5m2
    assert torch.equal(_bits(data), _bits(want[0])) and torch.equal(_bits(scale), _bits(want[1]))


def _deq64(data, scale, recipe, shape):
    """float8 data times its scales, exactly (float64), for act (R, I) and the
    down weights quantised as (E, H, I)."""
    d = data.double()
    if recipe == "mx":
        s = torch.exp2(scale.view(torch.uint8).double() - 127).repeat_interleave(32, -1)[..., :shape[-1]]
    elif recipe == "rowwise":
        s = scale.double().unsqueeze(-1)
    elif recipe == "blockwise_1x128":
        s = scale.double().repeat_interleave(128, -1)[..., :shape[-1]]
    else:  # 128x128 blocks of the last two dims
        s = scale.double().repeat_interleave(128, -2)[..., :shape[-2], :].repeat_interleave(128, -1)[..., :shape[-1]]
    return d * s


def fp8_forward_reference(args, kwargs, recipe, down_data, down_scale):
    """(exact out, per-element bound) of triton_expert_mlp_fp8, in float64,
    from the unfused act quantised by quantize_fp8 (the epilogue's bits, by
    the test above) and the down weights' float8 values:
    y = deq(act) deq(W2)^T + b2 with an fp32 accumulation (the products of
    float8 values are exact in fp32; per block sums promoted with two scale
    products: (I + 2 cdiv(I, 32) + 2) u (|a| |W2| + |b2|) covers every
    recipe); then each token's rows times their fp32 weights (one rounding),
    k - 1 fp32 sums in slot order and the output's rounding."""
    tokens, src_rows, offs, dst_rows, weights, gate_up, down = args
    act, _ = _unfused_act(args, kwargs)
    ad, ascale = torch.ops.moe_ops.quantize_fp8(act, recipe)
    a = _deq64(ad, ascale, recipe, act.shape)
    w = _deq64(down_data, down_scale, WEIGHT_RECIPE[recipe], down_data.shape)  # (E, H, I)
    b = kwargs.get("down_bias")
    R, H, inter = act.shape[0], down.shape[2], down.shape[1]
    y, mag = torch.zeros(R, H, dtype=torch.float64), torch.zeros(R, H, dtype=torch.float64)
    ends = offs.tolist()
    for e, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
        y[lo:hi] = a[lo:hi] @ w[e].T
        mag[lo:hi] = a[lo:hi].abs() @ w[e].T.abs()
        if b is not None:
            y[lo:hi] += b[e].double()
            mag[lo:hi] += b[e].double().abs()
    err_y = (inter + 2 * -(-inter // 32) + 2) * U32 * mag
    T, k = dst_rows.shape
    wt = weights.double() if weights is not None else torch.ones(T, k, dtype=torch.float64)
    out, tol, terms = (torch.zeros(T, H, dtype=torch.float64) for _ in range(3))
    for j in range(k):
        d = dst_rows[:, j]
        ok = (d >= 0).double().unsqueeze(1)
        rows = d.clamp(min=0)
        out += ok * wt[:, j:j + 1] * y[rows]
        tol += ok * wt[:, j:j + 1].abs() * err_y[rows]
        terms += ok * wt[:, j:j + 1].abs() * (y[rows].abs() + err_y[rows])
    tol = tol + (k + 1) * U32 * terms
    tol = tol + UNIT_ROUNDOFF[tokens.dtype] * (out.abs() + tol)
    return out, tol


def _fp8_weights(down, recipe, f8=torch.float8_e4m3fn):
    """down (E, I, H) quantised per output column along I: (data (E, I, H) view, scale)."""
    data, scale = torch.ops.moe_ops.quantize_fp8(down.mT.contiguous().float(), WEIGHT_RECIPE[recipe], f8)
    return data.mT, scale


@pytest.mark.parametrize("recipe", FP8_RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fp8_forward_against_float64(recipe, dtype):
    """triton_expert_mlp_fp8's output within the bound derived above of the
    float64 forward on the float8 values; the bound is tight enough that a
    1% error in any row fails."""
    args, kwargs = _fp8_case(dtype, "swiglu", False)
    down_data, down_scale = _fp8_weights(args[6], recipe)
    exact, tol = fp8_forward_reference(args, kwargs, recipe, down_data.mT, down_scale)
    fp8_args = (*args[:6], down_data, down_scale)
    out, h = tex.triton_expert_mlp_fp8(*fp8_args, kwargs["gate_up_bias"], kwargs["down_bias"], recipe=recipe,
                                       keep_h=True)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert_within(out, exact, tol, f"fp8 {recipe} out")
    assert torch.equal(h, _unfused_act(args, kwargs)[1])
    assert ((exact * 0.01).abs() > tol).any(), "the bound could not catch a 1% error"
    assert torch.equal(tex.triton_expert_mlp_fp8(*fp8_args, kwargs["gate_up_bias"], kwargs["down_bias"],
                                                 recipe=recipe), out)


def test_fp8_forward_zero_tokens_and_empty_experts():
    """No tokens: an empty output, no launch reads anything; experts with no
    rows (offs repeats) as in the cases above."""
    args, kwargs = _fp8_case(torch.float32, "silu", False)
    tokens, src_rows, offs, dst_rows, weights, gate_up, down = args
    empty = (tokens[:0], src_rows[:0], torch.zeros_like(offs), dst_rows[:0], weights[:0], gate_up)
    for recipe in FP8_RECIPES:
        dd, ds = _fp8_weights(down, recipe)
        out = tex.triton_expert_mlp_fp8(*empty, dd, ds, activation="silu", recipe=recipe)
        assert out.shape == (0, tokens.shape[1])


def test_fp8_rejects():
    args, kwargs = _fp8_case(torch.float32, "swiglu", False)
    dd, ds = _fp8_weights(args[6], "rowwise")
    a = (*args[:6], dd, ds)
    with pytest.raises(ValueError, match="recipe must be 'rowwise', 'blockwise_1x128' or 'mx', got 'tensorwise'"):
        tex.triton_expert_mlp_fp8(*a, recipe="tensorwise")
    with pytest.raises(ValueError, match="down_proj must be Float8_e4m3fn or Float8_e5m2, got torch.float32"):
        tex.triton_expert_mlp_fp8(*args, ds, recipe="rowwise")
    with pytest.raises(ValueError, match="tokens must be Float, Half or BFloat16, got Double"):
        tex.triton_expert_mlp_fp8(args[0].double(), *a[1:], recipe="rowwise")
    with pytest.raises(ValueError, match="activation must be one of .* got \"tanh\""):
        tex.triton_expert_mlp_fp8(*a, activation="tanh", recipe="rowwise")
    with pytest.raises(ValueError, match="needs BLOCK_N a multiple of 128"):
        tex.triton_expert_mlp_fp8(*a, recipe="blockwise_1x128", configs=(tex.INTERPRETER_CONFIG, None))
    with pytest.raises(ValueError, match="scale_b"):  # the down GEMM's checks: rowwise scales for 1x128 act
        tex.triton_expert_mlp_fp8(*a, recipe="blockwise_1x128")


def test_fp8_triton_op_eager_and_traced():
    """moe_ops_triton::expert_mlp_fp8: eager on CPU is the interpreted kernels;
    it traces with fake tensors under torch.compile; opcheck's fake tensor
    check on the interpreted op (its schema check multiplies the inputs, which
    CPU float8 tensors do not support)."""
    args, kwargs = _fp8_case(torch.float32, "swiglu", False)
    dd, ds = _fp8_weights(args[6], "mx")
    a = (*args[:6], dd, ds, kwargs["gate_up_bias"], kwargs["down_bias"])
    eager = torch.ops.moe_ops_triton.expert_mlp_fp8(*a, recipe="mx")
    assert torch.equal(eager, tex.triton_expert_mlp_fp8(*a, recipe="mx"))
    compiled = torch.compile(torch.ops.moe_ops_triton.expert_mlp_fp8, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*a, recipe="mx"), eager)
    torch.library.opcheck(torch.ops.moe_ops_triton.expert_mlp_fp8_interpreted.default,
                          a + ("swiglu", False, 1.702, 7.0, "mx", None), test_utils=("test_faketensor",))


@settings(max_examples=10, deadline=None)
@given(expert_problems(), st.sampled_from(FP8_RECIPES), st.integers(0, 2**31 - 1))
def test_fp8_property(p, recipe, seed):
    """Random layers (expert_problems: zero tokens, ragged H and I, empty and
    dropped experts, padding rows, every activation, interleaving, biases,
    either weight order, the grid), tokens a non-contiguous view: the float8
    act is quantize_fp8 of the unfused act bit for bit (h too), and the fp8
    forward is within the bound of the float64 forward on the float8 values."""
    args, kwargs = _problem_case(p, seed, column_major_tokens=True)
    offs, down = args[2], args[6]
    act, h = _unfused_act(args, kwargs, num_programs=p["programs"])
    data, scale, h8 = _fused_act(args, kwargs, recipe, num_programs=p["programs"])
    want = _quantized_act_reference(act, recipe, offs)
    assert torch.equal(_bits(data), _bits(want[0])) and torch.equal(_bits(scale), _bits(want[1])), recipe
    assert torch.equal(h8, h)
    down_data, down_scale = _fp8_weights(down, recipe)
    exact, tol = fp8_forward_reference(args, kwargs, recipe, down_data.mT, down_scale)
    fwd_kw = {n: kwargs[n] for n in ("gate_up_bias", "down_bias") if n in kwargs}
    out = tex.triton_expert_mlp_fp8(*args[:6], down_data, down_scale, **fwd_kw, activation=p["activation"],
                                    gate_up_interleaved=p["interleaved"], swiglu_limit=1.5, recipe=recipe,
                                    num_programs=p["programs"])
    assert_within(out, exact, tol, f"fp8 {recipe} out")


def test_clamped_swiglu_gradient_is_zero_where_clamped():
    """As test_experts.py's test of the same name, for the Triton backward:
    where a clamp is active an infinite upstream gradient gives 0, not
    inf * 0 = NaN (the gate's clamp multiplied by a 0 derivative), and a
    value on a bound gets 0 (the kernel passed it). float64: the six
    gradients have the C++ kernel's non-finite pattern and, where finite,
    its values to 1e-13."""
    # Tokens 4-6 sit exactly on a bound (gate = 7; up = -7; up = 7): torch's clamp passes 0 there.
    x = torch.tensor([[1.0, 0.5], [1.0, 0.0], [0.0, 1.0], [0.25, 0.25], [0.5, 2.0], [2.0, 1.0], [-2.0, -1.0]],
                     dtype=torch.float64)
    ids = torch.zeros(7, 1, dtype=torch.int32)
    w = torch.tensor([[1.0], [float("inf")], [float("inf")], [0.5], [1.0], [1.0], [0.75]], dtype=torch.float64)
    gate_up = torch.tensor([[[10.0, 1.0], [1.0, -9.0]]], dtype=torch.float64)  # gate > 7; up < -7
    down = torch.tensor([[[0.75, 0.5]]], dtype=torch.float64)
    gub, dnb = torch.tensor([[0.5, -0.25]], dtype=torch.float64), torch.tensor([[0.125, 1.0]], dtype=torch.float64)
    _, dst_rows, src_rows, offs = torch_moe_ops.permute(x[:, :0], ids, 1)
    args = (x, src_rows, offs, dst_rows, w, gate_up, down, gub, dnb)
    _, h = torch.ops.moe_ops.expert_mlp(*args, "swiglu_clamped")
    rest = (h, "swiglu_clamped", False, 1.702, 7.0, (True,) * 4)
    grad = torch.ones(7, 2, dtype=torch.float64)
    want = torch.ops.moe_ops.expert_mlp_backward(grad, *args, *rest)
    got = tex.triton_expert_mlp_backward(grad, *args, *rest)
    assert not want[2].isfinite().all()  # the infinite weights reach the gate_up gradient
    for g, r in zip(got, want):
        assert torch.equal(g.isnan(), r.isnan()) and torch.equal(g.isinf(), r.isinf()), (g, r)
        finite = r.isfinite()
        torch.testing.assert_close(g[finite], r[finite], rtol=1e-13, atol=1e-13)

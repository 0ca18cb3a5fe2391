"""The Triton fused experts' forward (torch_moe_ops/triton/experts.py) in
Triton's interpreter, on CPU tensors, against the float64 reference
(reference.torch_expert_mlp computed on float64 copies of the inputs).

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

import torch_moe_ops  # noqa: F401  (moe_ops, for the OpInfo modules)
from torch_moe_ops.reference import torch_expert_mlp, torch_grouped_mm
from torch_moe_ops.triton import experts as tex
from torch_moe_ops.triton import triton_expert_mlp

from opinfo_experts import _expert_routing, expert_mlp_opinfo, sample_inputs_expert_mlp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PRODUCT_DTYPES = [(d, t) for d in DEVICES for t in (torch.float32, torch.float16)
                  + ((torch.bfloat16,) if d == "cuda" else ())]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
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
    with pytest.raises(NotImplementedError, match="float64 inputs are not supported"):
        triton_expert_mlp(*[_f64(a) for a in args])


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
    assert tex._autotuned(False, True).configs == tex.CONFIGS_16BIT_GATE_UP
    assert tex._autotuned(False, False).configs == tex.CONFIGS_16BIT
    assert tex._autotuned(True, True).configs == tex.CONFIGS_FP32_GATE_UP
    assert tex._autotuned(True, False).configs == tex.CONFIGS_FP32


def test_bound_catches_a_one_percent_error():
    """The derived bound is tight enough to fail: routing weights scaled by
    1.01 (a 1% error in out) exceed it in fp16 (measured: the kernels use
    15% of it in fp16, 0.2% in fp32)."""
    args, kwargs = _multi_tile_case(torch.float16, "swiglu", False, bias=True, k_major=True)
    exact, _, tol, _ = expert_mlp_error_bounds(*args, **kwargs)
    wrong = list(args)
    wrong[4] = args[4] * 1.01
    out, _ = triton_expert_mlp(*wrong, **kwargs)
    with pytest.raises(AssertionError, match="out: .* elements off"):
        assert_within(out, exact, tol, "out")

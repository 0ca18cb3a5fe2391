"""Tests of moe_ops::scaled_grouped_mm_v2, the schema of aten::_scaled_grouped_mm_v2.

v2 states the recipe (ScalingType / SwizzleType) where scaled_grouped_mm (v1) tells it from the
scales; once checked, both run the same CPU kernel on the same arguments. So v2 is compared with
v1 bit for bit on every supported recipe, and with the float64 reference within test_fp8's
float32-summation bound (assert_scaled_mm_close: (K + 5) * 2^-24 * sum |a b| plus half an ulp of
the output dtype; why that bound holds is said there). Every rejected combination is an error
input of its OpInfo (test/opinfo_scaled_grouped_mm_v2.py), raised with the same message by the
CPU kernel, the fake kernel and the CUDA entry.

The CUDA entry (torch_moe_ops/ops/fp8.py) checks the stated recipe and calls scaled_grouped_mm,
whose CUDA kernel is tested in test_fp8.py / test_triton_fp8.py; here it runs through the
dispatcher's CUDA slot on CPU tensors, which proves the recipe mapping and the checks. That the
mapped call runs on a GPU only a GPU can show.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._C import DispatchKey
from torch._subclasses.fake_tensor import FakeTensorMode

from torch_moe_ops import _checks
from torch_moe_ops.reference import (
    torch_quantize_fp8,
    torch_scaled_grouped_mm,
    torch_scaled_grouped_mm_v2,
    torch_swizzle_mx_scale,
)

from opinfo_scaled_grouped_mm_v2 import (
    BLOCKWISE_1X32,
    NO_SWIZZLE,
    ROWWISE,
    SWIZZLE_32_4_4,
    error_inputs_scaled_grouped_mm_v2,
    error_inputs_scaled_grouped_mm_v2_structured,
    op_db,
    scaled_grouped_mm_v2_cases,
)
from test_fp8 import assert_scaled_mm_close

V1 = torch.ops.moe_ops.scaled_grouped_mm.default
V2 = torch.ops.moe_ops.scaled_grouped_mm_v2.default
OPINFO, STRUCTURED = op_db  # ours; the one upstream runs (definitions/fp8.py)


def _cuda_slot(*args, **kwargs):
    return V2._op_dk(DispatchKey.CUDA, *args, **kwargs)


@pytest.fixture(scope="module")
def cases():
    return [c for dtype in (torch.bfloat16, torch.float32) for c in scaled_grouped_mm_v2_cases("cpu", dtype)]


def test_every_recipe_is_sampled(cases):
    """The samples state each supported pair, MX both plain and swizzled on 3-D operands."""
    stated = {(a[3][0], tuple(a[4]), b) for _, a, _, _, _ in cases for b in [(a[6][0], tuple(a[7]))]}
    assert {(1, (), (1, ())), (4, (), (5, ())), (3, (1,), (3, (0,))), (3, (1,), (3, (1,))),
            (3, (0,), (3, (0,)))} <= stated


def test_equals_v1_bitwise(cases):
    """v2 with the recipe stated == v1 with it inferred, bit for bit, on every sample."""
    for name, args, kw, v1_args, v1_kw in cases:
        out, ref = V2(*args, **kw), V1(*v1_args, **v1_kw)
        assert out.dtype == ref.dtype and out.shape == ref.shape, name
        assert torch.equal(out.view(torch.int16 if out.dtype == torch.bfloat16 else torch.int32),
                           ref.view(torch.int16 if ref.dtype == torch.bfloat16 else torch.int32)), name


def test_matches_float64_reference(cases):
    """Against the float64 reference of the stated recipe, which is the v1 reference exactly."""
    for name, args, kw, v1_args, v1_kw in cases:
        ref = torch_scaled_grouped_mm_v2(*args, **{**kw, "out_dtype": torch.float64})
        kw1 = {k: v for k, v in v1_kw.items() if k != "out_dtype"}
        assert torch.equal(ref, torch_scaled_grouped_mm(*v1_args, **kw1, out_dtype=torch.float64)), name
        assert_scaled_mm_close(V2(*args, **kw), *v1_args, kw.get("offs"), kw.get("bias"), kw.get("out_dtype"))


def test_cuda_slot_is_the_cpu_kernel(cases):
    """The CUDA entry on CPU tensors: its checks, then scaled_grouped_mm (here its CPU kernel)."""
    for name, args, kw, _, _ in cases[::3]:
        assert torch.equal(_cuda_slot(*args, **kw), V2(*args, **kw)), name


def test_fake_kernel_matches(cases):
    for name, args, kw, _, _ in cases[::2]:
        out = V2(*args, **kw)
        with FakeTensorMode() as mode:
            fake = V2(*[_fake(mode, a) for a in args], **{k: _fake(mode, v) for k, v in kw.items()})
        assert (fake.shape, fake.dtype, fake.stride()) == (out.shape, out.dtype, out.stride()), name


def _fake(mode, v):
    if isinstance(v, list):
        return [_fake(mode, x) for x in v]
    return mode.from_tensor(v) if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("errors", [error_inputs_scaled_grouped_mm_v2, error_inputs_scaled_grouped_mm_v2_structured])
@pytest.mark.parametrize("where", ["cpu", "fake", "cuda_slot"])
def test_error_inputs(where, errors):
    """Every rejected combination, the same ValueError and message from each entry (the fake
    kernel checks everything but offs's values, which only the kernels read)."""
    seen = 0
    for ei in errors(OPINFO, "cpu"):
        s = ei.sample_input
        if where == "fake" and s.name == "offs_values":
            continue
        with pytest.raises(ei.error_type, match=ei.error_regex):
            if where == "fake":
                with FakeTensorMode() as mode:
                    V2(_fake(mode, s.input), *[_fake(mode, a) for a in s.args],
                       **{k: _fake(mode, v) for k, v in s.kwargs.items()})
            else:
                (V2 if where == "cpu" else _cuda_slot)(s.input, *s.args, **s.kwargs)
        seen += 1
    assert seen >= 35


def _structured_meta_passes(s) -> bool:
    """Whether v2.14.1's structured meta function (TORCH_META_FUNC(_scaled_grouped_mm_v2), which checks
    every call on every device) takes the sample: the wheel's op on CPU tensors runs it, then finds no CPU
    kernel of the out= overload it allocated for; refused, it raises its own ValueError."""
    try:
        torch.ops.aten._scaled_grouped_mm_v2(s.input, *s.args, **s.kwargs)
    except NotImplementedError as e:
        assert "'aten::_scaled_grouped_mm_v2.out' with arguments from the 'CPU' backend" in str(e)
        return True
    except (ValueError, RuntimeError):
        return False
    raise AssertionError(f"{s.name}: the wheel ran _scaled_grouped_mm_v2 on CPU")


def test_structured_opinfo_within_the_structured_meta_function():
    """Upstream's OpInfo (definitions/fp8.py, core/0008b) is what the structured meta function passes
    on to the CPU kernel in-tree: every sample and every error input gets past v2.14.1's (so its error
    is the kernel's own, which test_error_inputs checks). Ours goes beyond it (float32 output, bias,
    unaligned K and N, row-major weights), which is why upstream's is cut: most of ours it refuses."""
    samples = list(STRUCTURED.sample_inputs("cpu", torch.bfloat16))
    errors = [e.sample_input for e in STRUCTURED.error_inputs("cpu")]
    assert len(samples) >= 20 and len(errors) >= 35
    refused = [s.name for s in [*samples, *errors] if not _structured_meta_passes(s)]
    assert refused == []
    ours = [s for dtype in OPINFO.dtypes for s in OPINFO.sample_inputs("cpu", dtype)]
    assert sum(not _structured_meta_passes(s) for s in ours) > len(ours) // 2


def test_structured_opinfo_values():
    """Its samples: v2 == v1 bit for bit, within the float32 bound of the float64 reference, which its
    ref is; every supported recipe pair, MX 3-D scales plain and swizzled, the four layouts."""
    stated = set()
    for s in STRUCTURED.sample_inputs("cpu", torch.bfloat16):
        mat_b, (sa,), ra, swa, (sb,), rb, swb = s.args
        stated.add((ra[0], tuple(swa), rb[0], tuple(swb), s.input.dim(), mat_b.dim()))
        offs, out_dtype = s.kwargs.get("offs"), s.kwargs["out_dtype"]
        out = V2(s.input, *s.args, **s.kwargs)
        assert out.dtype == torch.bfloat16 and "bias" not in s.kwargs, s.name
        assert torch.equal(out, V1(s.input, mat_b, sa, sb, offs, None, None, out_dtype)), s.name
        assert torch.equal(STRUCTURED.ref(s.input, *s.args, **{**s.kwargs, "out_dtype": torch.float64}),
                           torch_scaled_grouped_mm(s.input, mat_b, sa, sb, offs, out_dtype=torch.float64)), s.name
        assert_scaled_mm_close(out, s.input, mat_b, sa, sb, offs, None, out_dtype)
    assert {(ra, rb) for ra, _, rb, _, _, _ in stated} == {(1, 1), (3, 3), (4, 5)}
    assert {(a, b) for *_, a, b in stated} == {(2, 3), (3, 3), (3, 2), (2, 2)}
    assert {(1,), (0,)} <= {swb for _, _, rb, swb, _, b in stated if rb == 3 and b == 3}


def test_schema_and_enums_are_upstreams():
    """The schema is aten::_scaled_grouped_mm_v2's (names, types, defaults) and the recipe values
    are torch.nn.functional's ScalingType / SwizzleType."""
    ours, theirs = V2._schema, torch.ops.aten._scaled_grouped_mm_v2.default._schema
    assert [(a.name, str(a.type), a.default_value) for a in ours.arguments] == [
        (a.name, str(a.type), a.default_value) for a in theirs.arguments]
    assert [str(r.type) for r in ours.returns] == [str(r.type) for r in theirs.returns]
    F = torch.nn.functional
    assert {k: v.value for k, v in F.ScalingType.__members__.items()} == {
        name: value for value, name in enumerate(_checks.SCALING_TYPES)}
    assert {k: v.value for k, v in F.SwizzleType.__members__.items()} == {
        "NO_SWIZZLE": NO_SWIZZLE, "SWIZZLE_32_4_4": SWIZZLE_32_4_4}


def test_functional_spelling():
    """Called as torch.nn.functional.scaled_grouped_mm spells its arguments (enums turned into
    their values, a single tensor into a list), v2 gives v1's bits."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(3)
    offs = torch.tensor([0, 9, 9, 20], dtype=torch.int32)
    a, sa = torch_quantize_fp8(torch.randn(23, 96, generator=g), "mx")
    sa = torch_swizzle_mx_scale(sa, offs, 0)
    bt, sb = torch_quantize_fp8(torch.randn(4, 40, 96, generator=g), "mx", None, None, True)
    out = V2(a, bt.transpose(-2, -1), [sa], [F.ScalingType.BlockWise1x32.value],
             [F.SwizzleType.SWIZZLE_32_4_4.value], [sb], [F.ScalingType.BlockWise1x32.value],
             [F.SwizzleType.SWIZZLE_32_4_4.value], offs, None, torch.bfloat16, [], False)
    assert torch.equal(out, V1(a, bt.transpose(-2, -1), sa, sb, offs))


def test_opcheck():
    """The fake kernel agrees with the kernel under torch.library.opcheck on one sample per recipe and
    layout (its test_schema cannot compare float8 inputs for mutation: allclose has no float8 kernel)."""
    picked = {}
    for name, args, kw, _, _ in scaled_grouped_mm_v2_cases("cpu", torch.bfloat16):
        picked.setdefault((args[3][0], len(args[4]) and args[4][0], args[0].dim(), args[1].dim()), (args, kw))
    for args, kw in list(picked.values())[:4]:
        torch.library.opcheck(V2, args, kw, test_utils=("test_faketensor",))


@st.composite
def problems(draw):
    layout = draw(st.sampled_from(["2d3d", "3d3d", "3d2d", "2d2d"]))
    recipe = draw(st.sampled_from({"3d2d": ["rowwise"], "2d2d": ["rowwise", "mx"]}.get(
        layout, ["rowwise", "mx", "blockwise"])))
    groups = draw(st.integers(1, 4))
    m, k, n = draw(st.integers(0, 20)), draw(st.integers(1, 160)), draw(st.integers(1, 40))
    sizes = draw(st.lists(st.integers(0, 9), min_size=groups, max_size=groups))  # empty groups included
    if layout == "2d2d" and recipe == "mx":  # groups along K hold whole 32-blocks
        sizes = [32 * (s % 3) for s in sizes]
    return layout, recipe, groups, m, k, n, sizes


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]),
       st.sampled_from([torch.bfloat16, torch.float32]), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_property_v2_equals_v1_and_reference(problem, f8, out_dtype, swizzle, strided, seed):
    """Uneven and empty groups, rows past offs[-1], zero tokens, unaligned K and N, non-contiguous
    operands (a column slice of mat_a, row-major or column-major mat_b), MX 3-D scales plain or
    swizzled: v2 == v1 bitwise, and within the float32 bound of the float64 reference."""
    layout, recipe, groups, m, k, n, sizes = problem
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    total = int(ends[-1])
    ra, rb = {"rowwise": ("rowwise", "rowwise"), "mx": ("mx", "mx"),
              "blockwise": ("blockwise_1x128", "blockwise_128x128")}[recipe]
    sw3 = recipe == "mx" and swizzle

    def right(w, swz):  # (.., K, N) quantised per output column, column-major or row-major
        d, s = torch_quantize_fp8(w.transpose(-2, -1).contiguous(), rb, f8, None, swz)
        return (d.transpose(-2, -1) if seed % 3 else d.transpose(-2, -1).contiguous()), s

    offs, swa, swb = ends, [], []
    if layout == "2d3d":
        a, sa = torch_quantize_fp8(torch.randn(total + 2, k, generator=g), ra, f8)
        if recipe == "mx":
            sa, swa = torch_swizzle_mx_scale(sa, ends, 0), [SWIZZLE_32_4_4]
        b, sb = right(torch.randn(groups, k, n, generator=g), sw3)
        swb = [SWIZZLE_32_4_4 if sw3 else NO_SWIZZLE] if recipe == "mx" else []
    elif layout == "3d3d":
        a, sa = torch_quantize_fp8(torch.randn(groups, m, k, generator=g), ra, f8, None, sw3)
        b, sb = right(torch.randn(groups, k, n, generator=g), sw3)
        offs = None
        if recipe == "mx":
            swa = swb = [SWIZZLE_32_4_4 if sw3 else NO_SWIZZLE]
    elif layout == "3d2d":
        a, sa = torch_quantize_fp8(torch.randn(groups, m, k, generator=g), "rowwise", f8)
        b, sb = right(torch.randn(k, total + 1, generator=g), False)
    else:
        a, sa = torch_quantize_fp8(torch.randn(m, total + 3, generator=g), recipe, f8, ends)
        bt, sb = torch_quantize_fp8(torch.randn(n, total + 3, generator=g), recipe, f8, ends)
        b = bt.t()
        if recipe == "rowwise":
            sa, sb = sa.flatten(), sb.flatten()
        else:
            sa, sb = torch_swizzle_mx_scale(sa, ends, 1), torch_swizzle_mx_scale(sb, ends, 1)
            swa = swb = [SWIZZLE_32_4_4]
    if strided:  # mat_a as a view into a wider buffer: its rows no longer contiguous
        wide = torch.zeros(*a.shape[:-1], a.shape[-1] + 5, dtype=a.dtype)
        wide[..., :a.shape[-1]] = a
        a = wide[..., :a.shape[-1]]
        assert not a.is_contiguous() or a.numel() == 0 or a.shape[-2] <= 1
    code = {"rowwise": ROWWISE, "mx": BLOCKWISE_1X32, "blockwise": 4}[recipe]
    bias = torch.randn(groups, b.shape[-1], generator=g) if seed % 2 else None
    out = V2(a, b, [sa], [code], swa, [sb], [code + (recipe == "blockwise")], swb, offs, bias, out_dtype)
    assert torch.equal(out, V1(a, b, sa, sb, offs, bias, None, out_dtype))
    assert_scaled_mm_close(out, a, b, sa, sb, offs, bias, out_dtype)


def test_bits_independent_of_thread_count():
    from common import assert_same_bits_at_thread_counts

    cases = [(a, kw) for _, a, kw, _, _ in scaled_grouped_mm_v2_cases("cpu", torch.float32)][:8]
    assert_same_bits_at_thread_counts(lambda: [V2(*a, **kw) for a, kw in cases])


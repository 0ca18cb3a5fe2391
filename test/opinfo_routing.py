"""OpInfos of the routing ops, usable for ``moe_ops.router_topk``,
``moe_ops.permute`` and ``moe_ops.unpermute`` and, through the upstream patch
series, for ``torch.ops.aten._moe_router_topk``, ``_moe_permute`` and
``_moe_unpermute``.

Each op's samples cover its edge cases (zero tokens, strided inputs, and
per op: ties, grouped top-k with a bias; empty experts, skewed routing,
alignment padding, a local expert range); its error inputs cover every
rejected argument; its ref is a plain-torch implementation of the op.
"""

from __future__ import annotations

import unittest
from functools import partial

import torch
from torch.testing import make_tensor
from torch.testing._internal.common_dtype import all_types_and_complex_and, floating_types_and
from torch.testing._internal.opinfo.core import DecorateInfo, ErrorInput, OpInfo, SampleInput

from torch_moe_ops.reference import torch_permute, torch_router_topk, torch_unpermute


def random_routing(tokens, experts, k, device, generator=None, skew=None):
    """Expert ids (T, k) with distinct experts per token. skew="one" sends every
    token to experts 0..k-1 (all but k experts empty)."""
    if skew == "one":
        return torch.arange(k, device=device, dtype=torch.int32).expand(tokens, k).contiguous()
    scores = torch.rand(tokens, experts, generator=generator).to(device)
    return scores.topk(k, dim=1).indices.to(torch.int32)


def sample_inputs_router_topk(op_info, device, dtype, requires_grad, **kwargs):
    # Logits on a grid of 1/4 so ties happen (and are broken by expert id)
    # while distinct logits stay far apart in every dtype.
    def logits(t, e, step=1):
        """(t, e) logits; step=2 takes every other column of (t, 2e) storage. The
        strided view of detached storage is made the leaf, so gradients reach it."""
        x = (torch.randint(-12, 13, (t, e * step)) / 4).to(device=device, dtype=dtype)[:, ::step]
        return x.requires_grad_(requires_grad)

    def bias(dtype=torch.float32):
        return (torch.randint(-4, 5, (16,)) / 32).to(device=device, dtype=dtype)

    yield SampleInput(logits(9, 16), args=(4,), name="softmax")
    yield SampleInput(logits(9, 16), args=(4,), kwargs=dict(renormalize=True), name="softmax_renorm")
    yield SampleInput(logits(9, 16), args=(2,), kwargs=dict(score_func="sigmoid", bias=bias(), n_group=4, topk_group=2,
                                                            renormalize=True, scaling_factor=2.5), name="deepseek")
    yield SampleInput(logits(9, 16), args=(3,), kwargs=dict(score_func="softmax_after_topk"), name="gpt_oss")
    yield SampleInput(logits(7, 8), args=(8,), kwargs=dict(score_func="sigmoid"), name="k_equals_e")
    yield SampleInput(logits(0, 8), args=(2,), name="zero_tokens")
    yield SampleInput(logits(5, 16, step=2), args=(3,), kwargs=dict(bias=bias(dtype)), name="strided_bias_dtype")
    # The AVX-512 build's vector router (float32 selection, 16 experts per
    # vector, up to 1024 experts): a partial last vector with ties across
    # vectors; groups that straddle vectors; past 1024 experts, its scalar code.
    def wide_bias(e):
        return (torch.randint(-4, 5, (e,)) / 32).to(device=device)

    yield SampleInput(logits(6, 37), args=(5,), kwargs=dict(bias=wide_bias(37)), name="vector_tail")
    yield SampleInput(logits(6, 48), args=(3,), kwargs=dict(score_func="sigmoid", bias=wide_bias(48), n_group=4,
                                                            topk_group=2), name="vector_groups_straddle")
    yield SampleInput(logits(2, 1040), args=(4,), kwargs=dict(renormalize=True), name="past_vector_width")


def error_inputs_router_topk(op_info, device, **kwargs):
    x = make_tensor((4, 8), device=device, dtype=torch.float32)

    def err(inp, regex, *args, **kw):
        return ErrorInput(SampleInput(inp, args=args, kwargs=kw), error_type=ValueError, error_regex=regex)

    yield err(x[0], r"router_topk: logits must be 2-D \(tokens, experts\), got 1-D", 2)
    yield err(x.int(), r"router_topk: logits must be float32, float16, bfloat16 or float64, got Int", 2)
    yield err(x, r"router_topk: k must be in \[1, num_experts=8\], got k=9", 9)
    yield err(x, r"router_topk: k must be in \[1, num_experts=8\], got k=0", 0)
    yield err(x, r"score_func must be 'softmax', 'sigmoid' or 'softmax_after_topk', got 'relu'", 2, "relu")
    yield err(x, r"n_group must be >= 1 and divide num_experts=8, got n_group=3", 2, n_group=3)
    yield err(x, r"topk_group must be in \[1, n_group=4\], got topk_group=5", 2, n_group=4, topk_group=5)
    yield err(x, r"k=5 exceeds the experts of the selected groups, topk_group \* num_experts / n_group = 4", 5,
              n_group=4, topk_group=2)
    yield err(x, r"bias must have shape \(num_experts,\) = \(8\), got \[7\]", 2, bias=x.new_zeros(7))
    yield err(x, r"bias must be float32 or the logits dtype \(Float\), got Double", 2, bias=x.new_zeros(8).double())


# permute copies rows as bytes, so it takes every dtype: among them the
# float8 formats of fp8 dispatch, whose tokens (float8_e4m3fn) and MX scales
# (float8_e8m0fnu) are permuted alike.
PERMUTE_DTYPES = all_types_and_complex_and(
    torch.bool, torch.float16, torch.bfloat16, torch.complex32, torch.bcomplex32, torch.uint16, torch.uint32,
    torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu)
# SchemaCheckMode compares each input before and after the call with torch.allclose, which these
# dtypes lack ("mul_cpu_reduced_float" / "mul_cpu" not implemented), as for _scaled_mm's OpInfo.
PERMUTE_SKIPS = (DecorateInfo(
    unittest.skip("torch.allclose does not take these dtypes"), "TestSchemaCheckModeOpInfo", "test_schema_correctness",
    dtypes=(torch.bcomplex32, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
            torch.float8_e8m0fnu)),)


def make_rows(shape, *, device, dtype, requires_grad=False, noncontiguous=False):
    """make_tensor, and float8_e8m0fnu (which make_tensor does not make) as
    random finite bytes."""
    if dtype == torch.float8_e8m0fnu:
        return make_tensor(shape, device=device, dtype=torch.uint8, low=0, high=254,
                           noncontiguous=noncontiguous).view(dtype)
    return make_tensor(shape, device=device, dtype=dtype, requires_grad=requires_grad, noncontiguous=noncontiguous)


def sample_inputs_permute(op_info, device, dtype, requires_grad, **kwargs):
    make = partial(make_rows, device=device, dtype=dtype, requires_grad=requires_grad)
    g = torch.Generator().manual_seed(0)

    def ids(tokens=11):
        return random_routing(tokens, 6, 3, device, g)

    yield SampleInput(make((11, 7)), args=(ids(), 6), name="basic")
    yield SampleInput(make((11, 7)), args=(ids().long(), 6), kwargs=dict(alignment=8), name="aligned_int64_ids")
    yield SampleInput(make((11, 7)), args=(ids(), 6), kwargs=dict(alignment=4, first_expert=2, num_local_experts=3),
                      name="local_range")
    yield SampleInput(make((11, 7)), args=(random_routing(11, 6, 3, device, skew="one"), 6), kwargs=dict(alignment=2),
                      name="skewed_empty_experts")
    yield SampleInput(make((0, 7)), args=(ids(0), 6), kwargs=dict(alignment=16), name="zero_tokens")
    yield SampleInput(make((11, 7), noncontiguous=True), args=(ids(), 6), name="non_contiguous_tokens")
    yield SampleInput(make((11, 7)), args=(ids().t().contiguous().t(), 6), name="non_contiguous_ids")


def error_inputs_permute(op_info, device, **kwargs):
    x = make_tensor((4, 8), device=device, dtype=torch.float32)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]], dtype=torch.int32, device=device)

    def err(inp, regex, *args, name="", **kw):
        return ErrorInput(SampleInput(inp, args=args, kwargs=kw, name=name), error_type=ValueError, error_regex=regex)

    yield err(x[0], r"permute: tokens must be 2-D \(tokens, hidden\), got 1-D", ids, 4)
    yield err(x, r"permute: expert_ids must be 2-D \(tokens, top_k\), got 1-D", ids[:, 0], 4)
    yield err(x, r"permute: expert_ids must be int32 or int64, got Float", ids.float(), 4)
    yield err(x, r"permute: expert_ids must have one row per token \(4\), got sizes \[3, 2\]", ids[:3], 4)
    yield err(x, r"permute: num_experts must be in \[1, 2\^31 - 1\], got num_experts=0", ids, 0)
    # Sizes near 2^63: the checks must not overflow on their way to the message.
    yield err(x, r"permute: num_experts must be in \[1, 2\^31 - 1\], got num_experts=4611686018427387904", ids, 2**62,
              name="num_experts_2^62")
    yield err(x, r"num_local_experts must be in \[1, num_experts - first_expert = 3\], "
              r"got num_local_experts=9223372036854775807", ids, 4, first_expert=1, num_local_experts=2**63 - 1,
              name="num_local_experts_2^63-1")
    yield err(x, r"alignment must be a power of two in \[1, 128\], got alignment=3", ids, 4, alignment=3)
    yield err(x, r"alignment must be a power of two in \[1, 128\], got alignment=256", ids, 4, alignment=256)
    yield err(x, r"first_expert must be in \[0, num_experts=4\), got first_expert=4", ids, 4, first_expert=4)
    yield err(x, r"num_local_experts must be in \[1, num_experts - first_expert = 3\], got num_local_experts=4", ids,
              4, first_expert=1, num_local_experts=4)
    if torch.device(device).type == "cpu":
        # Values are checked where reading them needs no device sync (CUDA:
        # device-side assert); fake kernels see no values ("ids_values").
        bad = ids.clone()
        bad[2, 1] = 7
        yield err(x, r"permute: expert_ids must be in \[0, num_experts=4\), got expert_ids\[2, 1\]=7", bad, 4,
                  name="ids_values")
        bad[1, 0] = -1
        yield err(x, r"permute: expert_ids must be in \[0, num_experts=4\), got expert_ids\[1, 0\]=-1", bad, 4,
                  name="ids_values")


def sample_inputs_unpermute(op_info, device, dtype, requires_grad, **kwargs):
    g = torch.Generator().manual_seed(1)
    make = partial(make_tensor, device=device, dtype=dtype, requires_grad=requires_grad)
    for name, tokens, kw in [("basic", 9, {}), ("aligned", 9, dict(alignment=4)),
                             ("dropped", 9, dict(first_expert=1, num_local_experts=3, alignment=2)),
                             ("zero_tokens", 0, {})]:
        ids = random_routing(tokens, 5, 2, device, g)
        permuted, dst_rows, _, _ = torch_permute(torch.zeros(tokens, 6, device=device), ids, 5, **kw)
        rows = permuted.shape[0]
        yield SampleInput(make((rows, 6)), args=(dst_rows.clone(),), name=name)
        yield SampleInput(make((rows, 6)), args=(dst_rows.clone(), make((tokens, 2))), name=name + "_weighted")
        w32 = make_tensor((tokens, 2), device=device, dtype=torch.float32, requires_grad=requires_grad)
        yield SampleInput(make((rows, 6)), args=(dst_rows.clone(), w32), name=name + "_fp32_weights")
    ids = random_routing(9, 5, 2, device, g)
    _, dst_rows, _, _ = torch_permute(torch.zeros(9, 6, device=device), ids, 5)
    yield SampleInput(make((18, 6), noncontiguous=True), args=(dst_rows, make((9, 2), noncontiguous=True)),
                      name="non_contiguous")


def error_inputs_unpermute(op_info, device, **kwargs):
    x = make_tensor((6, 4), device=device, dtype=torch.float32)
    dst = torch.tensor([[0, 1], [2, -1], [4, 5]], device=device)

    def err(inp, regex, *args, name=""):
        return ErrorInput(SampleInput(inp, args=args, name=name), error_type=ValueError, error_regex=regex)

    yield err(x[0], r"unpermute: permuted must be 2-D \(rows, hidden\), got 1-D", dst)
    yield err(x.int(), r"unpermute: permuted must be float32, float16, bfloat16 or float64, got Int", dst)
    yield err(x, r"unpermute: dst_rows must be 2-D \(tokens, top_k\), got 1-D", dst[0])
    yield err(x, r"unpermute: dst_rows must be int64, got Int", dst.int())
    yield err(x, r"unpermute: weights must have the shape of dst_rows \[3, 2\], got \[3, 3\]", dst, x.new_ones(3, 3))
    yield err(x, r"unpermute: weights must be float32 or the dtype of permuted \(Float\), got Double", dst,
              x.new_ones(3, 2).double())
    if torch.device(device).type == "cpu":
        yield err(x, r"unpermute: dst_rows must be -1 or a row of permuted in \[0, 6\), got dst_rows\[1, 1\]=6",
                  torch.tensor([[0, 1], [2, 6], [4, 5]], device=device), name="ids_values")


def gradcheck_router_topk(op, logits, *args, **kwargs):
    """Selection is piecewise constant: a finite-difference step of 1e-6 keeps
    the experts of logits on the samples' grid of 1/4, except at the exact
    ties the grid makes on purpose. A fixed offset of 1e-3 per element breaks
    them without changing the derivative."""
    tie_break = torch.arange(logits.numel(), dtype=logits.dtype, device=logits.device).view_as(logits) * 1e-3
    return op(logits + tie_break, *args, **kwargs)


def make_routing_op_db(name_of, op_of) -> list[OpInfo]:
    """OpInfos of the routing ops; name_of and op_of map an op's name
    ("permute") to the OpInfo's name and the op it calls."""

    floating = floating_types_and(torch.float16, torch.bfloat16)

    def opinfo(op, sample_fn, error_fn, ref, dtypes, backward_dtypes=floating, supports_autograd=True, **kwargs):
        return OpInfo(name_of(op), op=op_of(op), ref=ref, dtypes=dtypes, backward_dtypes=backward_dtypes,
                      sample_inputs_func=sample_fn, error_inputs_func=error_fn, supports_out=False,
                      supports_autograd=supports_autograd, supports_forward_ad=False, supports_fwgrad_bwgrad=False,
                      **kwargs)

    return [
        opinfo("router_topk", sample_inputs_router_topk, error_inputs_router_topk, torch_router_topk, floating,
               gradcheck_wrapper=gradcheck_router_topk),
        # The backward of permute is an unpermute: floating dtypes only.
        opinfo("permute", sample_inputs_permute, error_inputs_permute, torch_permute, PERMUTE_DTYPES,
               skips=PERMUTE_SKIPS),
        # Its backward, _moe_unpermute_backward, has no derivative: no double backward.
        opinfo("unpermute", sample_inputs_unpermute, error_inputs_unpermute, torch_unpermute, floating,
               supports_gradgrad=False),
    ]


op_db = make_routing_op_db(lambda op: f"moe_ops.{op}", lambda op: getattr(torch.ops.moe_ops, op).default)


"""OpInfos of the expert ops.

grouped_mm_gather: samples with gathered rows and columns, -1 (zero)
entries, repeated and unsorted indices, empty groups, zero tokens, rows past
offs[-1], transposed and strided operands, bias and fp32 output; an error
input for every check; the reference materialises the gathered operand and
runs the float64 loop reference of grouped_mm.

expert_mlp: every activation, gate/up halves split or interleaved, biases,
the weights as transformers stores them ((E, out, in), passed as transposed
views) and stored (E, in, out), routing weights in float32, in the tokens'
dtype or none, alignment padding, a local expert range (dropped slots),
empty experts, zero tokens, strided and column-major tokens; an error input
for every check, each message naming the argument (checks that the op leaves
to the ops it calls, which name their own arguments instead, are expected
failures in test_experts.py); the float64 reference of
torch_moe_ops/reference.py.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.testing import make_tensor
from torch.testing._internal.common_dtype import floating_types_and
from torch.testing._internal.opinfo.core import ErrorInput, OpInfo, SampleInput

from torch_moe_ops.reference import torch_expert_mlp, torch_grouped_mm, torch_permute

from opinfo_grouped_mm import _offs, _transposed
from opinfo_routing import random_routing


def gathered(mat: torch.Tensor, index, dim: int) -> torch.Tensor:
    """mat with dimension dim read through index (-1 reads zeros)."""
    if index is None:
        return mat
    if mat.shape[dim] == 0:  # every entry is -1
        size = list(mat.shape)
        size[dim] = index.shape[0]
        return mat.new_zeros(size)
    picked = mat.index_select(dim, index.clamp(min=0))
    keep = (index >= 0).to(mat.dtype)
    return picked * (keep.unsqueeze(1) if dim == 0 else keep.unsqueeze(0))


def torch_grouped_mm_gather(mat_a, mat_b, offs, a_index=None, b_index=None, bias=None, out_dtype=None):
    a = gathered(mat_a, a_index, 1 if mat_b.dim() == 2 else 0)
    b = gathered(mat_b, b_index, 0)
    return torch_grouped_mm(a, b, offs, bias, out_dtype)


def _index(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


def sample_inputs_grouped_mm_gather(op_info, device, dtype, requires_grad, **kwargs):
    values = partial(make_tensor, device=device, dtype=dtype, low=-1, high=1)

    def leaf(t):
        """t (any strides) as a leaf of the autograd graph."""
        return t.detach().requires_grad_(requires_grad)

    def make(shape):
        return leaf(values(shape))

    T, K, N = 9, 12, 10
    group_sizes = [3, 0, 5, 2]
    G, M = len(group_sizes), sum(group_sizes)

    def offs():
        return _offs(group_sizes, device)

    def rows():
        """Unsorted, repeated, with padding (-1): an MoE layer's rows."""
        return _index([4, -1, 0, 8, 8, 2, -1, 7, 1, 3], device)

    def sample(a, b, offs, name, **kw):
        return SampleInput(a, args=(b, offs), kwargs=kw, name=name)

    # 2D x 3D, a_index: tokens -> expert rows.
    yield sample(make((T, K)), make((G, K, N)), offs(), "2d3d", a_index=rows())
    yield sample(make((T, K)), make((G, K, N)), offs(), "2d3d_rows_past_offs", a_index=torch.cat([rows(), rows()[:3]]))
    yield sample(make((T, K)), leaf(_transposed(values((G, K, N)))), offs(), "2d3d_b_transposed", a_index=rows())
    yield sample(leaf(values((T, 2 * K))[:, ::2]), make((G, K, N)), offs(), "2d3d_a_strided", a_index=rows())
    yield sample(make((T, K)), make((G, K, N)), offs(), "2d3d_bias", a_index=rows(), bias=make((G, N)))
    yield sample(make((0, K)), make((G, K, N)), _offs([1, 0, 1, 0], device), "2d3d_zero_tokens",
                 a_index=_index([-1, -1], device))
    yield sample(make((T, K)), make((G, K, N)), _offs([0] * G, device), "2d3d_zero_rows",
                 a_index=_index([], device))
    if dtype in (torch.float16, torch.bfloat16):
        yield sample(make((T, K)), make((G, K, N)), offs(), "2d3d_out_fp32", a_index=rows(), out_dtype=torch.float32)
    # 2D x 2D: the contraction (rows of the layer) gathered.
    yield sample(make((7, M)), make((T, N)), offs(), "2d2d_b_index", b_index=rows())
    yield sample(leaf(_transposed(values((7, M)))), make((T, N)), offs(), "2d2d_b_index_a_transposed", b_index=rows(),
                 bias=make((G, N)))
    yield sample(leaf(values((T, 7)).t()), make((M, N)), offs(), "2d2d_a_index", a_index=rows())
    both = rows()
    yield sample(leaf(values((T, 7)).t()), make((T, N)), offs(), "2d2d_both", a_index=both, b_index=both)


def error_inputs_grouped_mm_gather(op_info, device, **kwargs):
    make = partial(make_tensor, device=device, dtype=torch.float32)
    offs = _offs([2, 3], device)
    a, b = make((4, 6)), make((2, 6, 3))
    rows = _index([0, 1, 2, 3, -1], device)

    def err(a, b, regex, name="", **kw):
        return ErrorInput(SampleInput(a, args=(b, offs), kwargs=kw, name=name), error_type=ValueError,
                          error_regex=regex)

    yield err(a, b, r"a_index or b_index must be given")
    yield err(make((2, 4, 6)), b, r"needs mat_a 2-D and mat_b 3-D .* got mat_a \[2, 4, 6\]", a_index=rows)
    yield err(a, b, r"b_index needs mat_b 2-D \(the 2D x 2D layout\), got mat_b \[2, 6, 3\]", b_index=rows)
    yield err(a, b, r"a_index must be int64, got Int", a_index=rows.int())
    yield err(a, b, r"a_index must be 1-D, got 2-D", a_index=rows.view(1, 5))
    yield err(a, make((2, 5, 3)), r"contraction sizes differ: .* has K=6 .* has K=5", a_index=rows)
    yield err(make((3, 5)), make((4, 3)), r"contraction sizes differ: mat_a \[3, 5\] has K=5 but mat_b \[4, 3\] has K=4",
              b_index=rows[:4])
    if torch.device(device).type == "cpu":
        # Values are checked where they can be read without a device sync.
        yield err(a, b, r"offs\[-1\]=5 exceeds the grouped dimension M", a_index=rows[:4], name="offs_values")
        err = partial(err, name="index_values")
        yield err(a, b, r"a_index\[1\]=4 is out of range \[-1, 4\)", a_index=_index([0, 4, 1, 2, 3], device))
        yield err(a, b, r"a_index\[0\]=-2 is out of range \[-1, 4\)", a_index=_index([-2, 0, 1, 2, 3], device))
        yield err(make((3, 5)), make((4, 3)), r"b_index\[4\]=9 is out of range \[-1, 4\)",
                  b_index=_index([0, 1, 2, 3, 9], device))


grouped_mm_gather_opinfo = OpInfo(
    "moe_ops.grouped_mm_gather",
    op=torch.ops.moe_ops.grouped_mm_gather.default,
    ref=torch_grouped_mm_gather,
    dtypes=floating_types_and(torch.float16, torch.bfloat16),
    sample_inputs_func=sample_inputs_grouped_mm_gather,
    error_inputs_func=error_inputs_grouped_mm_gather,
    supports_out=False,
    supports_autograd=True,
    supports_forward_ad=False,
    supports_fwgrad_bwgrad=False,
)


# ------------------------------------------------------------------ expert_mlp


def _expert_routing(tokens, experts, top_k, device, seed, skew=None, **permute_kw):
    """(src_rows, offs, dst_rows) of a random routing, from the reference permute
    of zero-width tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = random_routing(tokens, experts, top_k, device, g, skew)
    _, dst_rows, src_rows, offs = torch_permute(torch.zeros(tokens, 0, device=device), ids, experts, **permute_kw)
    return src_rows, offs, dst_rows


def sample_inputs_expert_mlp(op_info, device, dtype, requires_grad, **kwargs):
    T, H, I, E, k = 9, 8, 4, 4, 2

    def leaf(t):
        """t (a view of detached storage at most) as a leaf: gradients reach the
        view itself, in its strides."""
        return t.requires_grad_(requires_grad)

    def make(shape, low=-1.0, high=1.0, dtype=dtype, **kw):
        return leaf(make_tensor(shape, device=device, dtype=dtype, low=low, high=high, **kw))

    def sample(name, activation="swiglu", *, tokens=None, experts=E, k_major=True, bias=False,
               weights=torch.float32, interleaved=False, seed=0, skew=None, routing_experts=None, permute_kw=None,
               **op_kw):
        tokens = make((T, H)) if tokens is None else tokens
        t = tokens.shape[0]
        src_rows, offs, dst_rows = _expert_routing(t, routing_experts or experts, k, device, seed, skew,
                                                   **(permute_kw or {}))
        n1 = 2 * I if activation in ("swiglu", "geglu", "swiglu_clamped") else I
        # Weights on the scale of 1/sqrt(fan-in), so h and the output stay O(1).
        if k_major:  # transformers' parameters (E, out, in), passed transposed
            gate_up = leaf(make_tensor((experts, n1, H), device=device, dtype=dtype, low=-0.5, high=0.5).mT)
            down = leaf(make_tensor((experts, H, I), device=device, dtype=dtype, low=-0.5, high=0.5).mT)
        else:
            gate_up, down = make((experts, H, n1), -0.5, 0.5), make((experts, I, H), -0.5, 0.5)
        w = make((t, k), 0.0, 1.0, dtype=weights) if weights is not None else None
        kw = dict(activation=activation, **op_kw)
        if interleaved:
            kw["gate_up_interleaved"] = True
        if bias:
            kw.update(gate_up_bias=make((experts, n1), -0.5, 0.5), down_bias=make((experts, H), -0.5, 0.5))
        return SampleInput(tokens, args=(src_rows, offs, dst_rows, w, gate_up, down), kwargs=kw, name=name)

    yield sample("swiglu")
    yield sample("swiglu_weights_stored_in_out", k_major=False)
    yield sample("geglu_bias", "geglu", bias=True, k_major=False, seed=1)
    yield sample("geglu_interleaved", "geglu", interleaved=True, seed=2)
    # gpt-oss: interleaved halves, biases; a limit the values reach, so the clamps act.
    yield sample("swiglu_clamped_interleaved_bias", "swiglu_clamped", interleaved=True, bias=True, seed=3,
                 swiglu_alpha=1.702, swiglu_limit=0.75)
    yield sample("silu_weights_in_dtype", "silu", weights=dtype, seed=4)
    yield sample("gelu_no_weights", "gelu", weights=None, seed=5)
    yield sample("relu_aligned_bias", "relu", bias=True, seed=6, permute_kw=dict(alignment=4))
    # Expert parallelism: 4 of 8 experts here, the other slots dropped (dst_rows -1).
    yield sample("local_experts", routing_experts=8, seed=7, permute_kw=dict(first_expert=2, num_local_experts=4))
    yield sample("empty_experts", skew="one", seed=8)
    yield sample("zero_tokens", tokens=make((0, H)))
    # Every row padding (src_rows all -1), with and without routing weights.
    yield sample("zero_tokens_aligned", tokens=make((0, H)), bias=True, permute_kw=dict(alignment=4))
    yield sample("zero_tokens_aligned_unweighted", tokens=make((0, H)), bias=True, weights=None,
                 permute_kw=dict(alignment=4))
    yield sample("noncontiguous_tokens", tokens=make((T, H), noncontiguous=True), seed=9)
    yield sample("column_major_tokens", tokens=leaf(_transposed(make_tensor((T, H), device=device, dtype=dtype,
                                                                             low=-1, high=1))), seed=10)


def error_inputs_expert_mlp(op_info, device, **kwargs):
    make = partial(make_tensor, device=device, dtype=torch.float32)
    T, H, I, E, k = 9, 8, 4, 3, 2
    src_rows, offs, dst_rows = _expert_routing(T, E, k, device, 0)
    valid = dict(tokens=make((T, H)), src_rows=src_rows, offs=offs, dst_rows=dst_rows, weights=make((T, k)),
                 gate_up_proj=make((E, H, 2 * I)), down_proj=make((E, I, H)), gate_up_bias=make((E, 2 * I)),
                 down_bias=make((E, H)), activation="swiglu", gate_up_interleaved=False)

    def err(regex, name="", **change):
        a = {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in {**valid, **change}.items()}
        s = SampleInput(a.pop("tokens"), args=tuple(a.pop(n) for n in ("src_rows", "offs", "dst_rows", "weights",
                                                                       "gate_up_proj", "down_proj")),
                        kwargs=a, name=name)
        return ErrorInput(s, error_type=ValueError, error_regex=regex)

    def with_value(t, index, value):
        t = t.clone()
        t[index] = value
        return t

    yield err(r'expert_mlp: activation must be one of swiglu, geglu, swiglu_clamped, silu, gelu, relu, got "tanh"',
              activation="tanh")
    yield err(r'expert_mlp: gate_up_interleaved needs a gated activation, got "relu"', activation="relu",
              gate_up_interleaved=True, gate_up_proj=make((E, H, I)), gate_up_bias=make((E, I)))
    yield err(r"expert_mlp: tokens must be 2-D \(tokens, hidden\), got 3-D with sizes \[1, 9, 8\]",
              tokens=make((1, T, H)))
    yield err(r"expert_mlp: tokens must be float32, float16, bfloat16 or float64, got Int",
              tokens=make((T, H), dtype=torch.int32))
    yield err(r"expert_mlp: src_rows must be 1-D int64 \(permute's src_rows\), got 1-D Int", src_rows=src_rows.int())
    yield err(r"expert_mlp: src_rows must be 1-D int64 \(permute's src_rows\), got 2-D Long",
              src_rows=src_rows.view(1, -1))
    yield err(r"expert_mlp: dst_rows must be int64 \(tokens, top_k\) with tokens=9, got Int of sizes \[9, 2\]",
              dst_rows=dst_rows.int())
    yield err(r"expert_mlp: dst_rows must be int64 \(tokens, top_k\) with tokens=9, got Long of sizes \[8, 2\]",
              dst_rows=dst_rows[:8])
    yield err(r"expert_mlp: dst_rows must have top_k >= 1, got sizes \[9, 0\]", dst_rows=dst_rows[:, :0],
              weights=make((T, 0)))
    yield err(r"expert_mlp: gate_up_proj \(E, H, N1\) and down_proj \(E, I, H\) must be 3-D, got \[3, 8, 8\] and "
              r"\[4, 8\]", down_proj=make((I, H)))
    yield err(r"expert_mlp: gate_up_proj must be \(E, H, N1\) and down_proj \(E, I, H\) with H=8 \(tokens \[9, 8\]\), "
              r"got \[3, 8, 8\] and \[3, 4, 6\]", down_proj=make((E, I, 6)))
    yield err(r"expert_mlp: gate_up_proj, down_proj and offs must agree on the number of experts, got \[3, 8, 8\], "
              r"\[3, 4, 8\] and offs of sizes \[2\]", offs=offs[:2])
    yield err(r'expert_mlp: gate_up_proj must have N1=8 columns for activation "swiglu" with I=4 \(down_proj '
              r"\[3, 4, 8\]\), got \[3, 8, 7\]", gate_up_proj=make((E, H, 7)))
    yield err(r"expert_mlp: gate_up_proj and down_proj must have the dtype of tokens \(Float\), got Float and Double",
              down_proj=make((E, I, H), dtype=torch.float64))
    yield err(r"expert_mlp: weights must have the shape of dst_rows \[9, 2\], got \[9, 1\]", weights=make((T, 1)))
    yield err(r"expert_mlp: weights must be float32 or the dtype of tokens \(Float\), got Double",
              weights=make((T, k), dtype=torch.float64))
    yield err(r"expert_mlp: gate_up_bias must be \(E, N1\) = \(3, 8\), got \[3, 4\]", gate_up_bias=make((E, I)))
    yield err(r"expert_mlp: down_bias must be \(E, H\) = \(3, 8\), got \[8\]", down_bias=make((H,)))
    yield err(r"expert_mlp: gate_up_bias must have the dtype of tokens \(Float\), got Double",
              gate_up_bias=make((E, 2 * I), dtype=torch.float64))
    yield err(r"expert_mlp: down_bias must have the dtype of tokens \(Float\), got Double",
              down_bias=make((E, H), dtype=torch.float64))
    yield err(r"expert_mlp: offs must be int32, got Long", offs=offs.long())
    if torch.device(device).type == "cpu":
        # Values of the routing, under expert_mlp's name (CUDA: device-side
        # asserts), not seen by the fake kernel.
        yield err(r"expert_mlp: src_rows must be -1 or token \* top_k \+ slot in \[0, 9 \* 2 = 18\), "
                  r"got src_rows\[3\]=18", name="routing_values", src_rows=with_value(src_rows, (3,), 18))
        yield err(r"expert_mlp: dst_rows must be -1 or a row in \[0, src_rows.size\(0\)=18\), got dst_rows\[4, 1\]=18",
                  name="routing_values", dst_rows=with_value(dst_rows, (4, 1), 18))
        yield err(r"expert_mlp: offs must be non-decreasing and non-negative, got offs\[1\]=3 < offs\[0\]=5",
                  name="routing_values", offs=torch.tensor([5, 3, 18], dtype=torch.int32, device=device))
        yield err(r"expert_mlp: src_rows and dst_rows must be inverse maps \(permute's outputs\), got dst_rows\[0, 0\]=",
                  name="routing_values", dst_rows=dst_rows.flip(0))


expert_mlp_opinfo = OpInfo(
    "moe_ops.expert_mlp",
    op=torch.ops.moe_ops.expert_mlp.default,
    ref=torch_expert_mlp,
    dtypes=floating_types_and(torch.float16, torch.bfloat16),
    sample_inputs_func=sample_inputs_expert_mlp,
    error_inputs_func=error_inputs_expert_mlp,
    supports_out=False,
    supports_autograd=True,
    supports_forward_ad=False,
    supports_fwgrad_bwgrad=False,
)

op_db = [grouped_mm_gather_opinfo, expert_mlp_opinfo]

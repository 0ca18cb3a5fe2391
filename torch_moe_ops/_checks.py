"""Input validation shared by fake kernels and DTensor strategies.

Restates the C++ checks of ``csrc/native/GroupedMM.h`` one for one, with the
same messages, so that an error surfaces identically in eager, under
``torch.compile`` (fake tensors) and in sharding propagation. Only checks that
need tensor values (the contents of ``offs``) are left to the kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def grouped_mm_layout(mat_a: torch.Tensor, mat_b: torch.Tensor) -> str:
    """One of ``"2d3d"``, ``"3d2d"``, ``"2d2d"``, ``"3d3d"``."""
    return f"{mat_a.dim()}d{mat_b.dim()}d"


def grouped_mm_out_dtype(mat_a: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    in_dtype = mat_a.dtype
    out = in_dtype if out_dtype is None else out_dtype
    torch._check_value(
        out == in_dtype or (out == torch.float32 and in_dtype in (torch.float16, torch.bfloat16)),
        lambda: f"grouped_mm: out_dtype must be the input dtype ({_c10(in_dtype)}) or float32 for "
        f"float16/bfloat16 inputs, got out_dtype={_c10(out)}",
    )
    return out


def grouped_mm_num_groups(mat_a: torch.Tensor, offs: Optional[torch.Tensor]) -> int:
    return offs.shape[0] if offs is not None else mat_a.shape[0]


def grouped_mm_out_size(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Optional[torch.Tensor]) -> list:
    layout = grouped_mm_layout(mat_a, mat_b)
    if layout == "2d3d":
        return [mat_a.shape[0], mat_b.shape[2]]
    if layout == "3d2d":
        return [mat_a.shape[1], mat_b.shape[1]]
    if layout == "2d2d":
        return [offs.shape[0], mat_a.shape[0], mat_b.shape[1]]
    return [mat_a.shape[0], mat_a.shape[1], mat_b.shape[2]]


def grouped_mm_out_strides(size: list, dtype: torch.dtype, device: torch.device) -> list:
    """Contiguous on CPU and ROCm (torch.version.cuda None); on CUDA the last
    dimension is padded to 16 bytes, as upstream's TMA-based kernels allocate it."""
    padded = list(size)
    if device.type == "cuda" and torch.version.cuda is not None:
        align = 16 // dtype.itemsize
        padded[-1] = (padded[-1] + align - 1) // align * align
    strides = [1] * len(padded)
    for i in range(len(padded) - 2, -1, -1):
        strides[i] = strides[i + 1] * padded[i + 1]
    return strides


def _c10(dtype: torch.dtype) -> str:
    """The C++ spelling of a dtype, so Python and C++ messages match."""
    return {
        torch.float32: "Float",
        torch.float16: "Half",
        torch.bfloat16: "BFloat16",
        torch.float64: "Double",
        torch.int32: "Int",
        torch.int64: "Long",
    }.get(dtype, str(dtype).replace("torch.", ""))


def _sizes(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_grouped_mm_dims(op: str, mat_a: torch.Tensor, mat_b: torch.Tensor) -> None:
    """Shape checks shared by the grouped GEMMs; op names the operator in the messages."""
    chk = torch._check_value
    chk(mat_a.dim() in (2, 3),
        lambda: f"{op}: mat_a must be 2-D or 3-D, got {mat_a.dim()}-D with sizes {_sizes(mat_a)}")
    chk(mat_b.dim() in (2, 3),
        lambda: f"{op}: mat_b must be 2-D or 3-D, got {mat_b.dim()}-D with sizes {_sizes(mat_b)}")


def check_grouped_mm_contraction(op: str, mat_a: torch.Tensor, mat_b: torch.Tensor) -> None:
    chk = torch._check_value
    chk(mat_b.device == mat_a.device,
        lambda: f"{op}: mat_b must be on the device of mat_a ({mat_a.device}), got {mat_b.device}")
    chk(mat_a.shape[-1] == mat_b.shape[-2],
        lambda: f"{op}: contraction sizes differ: mat_a {_sizes(mat_a)} has K={mat_a.shape[-1]} "
        f"but mat_b {_sizes(mat_b)} has K={mat_b.shape[-2]}")


def check_grouped_mm_3d3d(op: str, mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Optional[torch.Tensor]) -> None:
    """3D x 3D: a batch of G products, no offs."""
    chk = torch._check_value
    chk(offs is None,
        lambda: f"{op}: offs must be None when mat_a and mat_b are both 3-D, got offs of sizes {_sizes(offs)}")
    chk(mat_a.shape[0] == mat_b.shape[0],
        lambda: f"{op}: batch sizes differ: mat_a {_sizes(mat_a)}, mat_b {_sizes(mat_b)}")


def check_grouped_mm_layout(op: str, mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Optional[torch.Tensor]) -> None:
    """offs against the layout: None for 3D x 3D, else int32, 1-D, one entry per group."""
    chk = torch._check_value
    layout = grouped_mm_layout(mat_a, mat_b)
    if layout == "3d3d":
        check_grouped_mm_3d3d(op, mat_a, mat_b, offs)
        return
    chk(offs is not None,
        lambda: f"{op}: offs is required when mat_a or mat_b is 2-D (mat_a {_sizes(mat_a)}, mat_b {_sizes(mat_b)})")
    chk(offs.dim() == 1, lambda: f"{op}: offs must be 1-D, got {offs.dim()}-D with sizes {_sizes(offs)}")
    chk(offs.dtype == torch.int32, lambda: f"{op}: offs must be int32, got {_c10(offs.dtype)}")
    chk(offs.device == mat_a.device,
        lambda: f"{op}: offs must be on the device of mat_a ({mat_a.device}), got {offs.device}")
    if layout == "2d3d":
        chk(offs.shape[0] == mat_b.shape[0],
            lambda: f"{op}: offs has {offs.shape[0]} groups but mat_b {_sizes(mat_b)} has {mat_b.shape[0]}")
    elif layout == "3d2d":
        chk(offs.shape[0] == mat_a.shape[0],
            lambda: f"{op}: offs has {offs.shape[0]} groups but mat_a {_sizes(mat_a)} has {mat_a.shape[0]}")


def check_grouped_mm_bias(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> None:
    """bias, when given: (G, N_out), in the input or the output dtype, on the device of mat_a (after the
    checks of the operands and offs)."""
    if bias is None:
        return
    chk = torch._check_value
    groups = grouped_mm_num_groups(mat_a, offs)
    n_out = grouped_mm_out_size(mat_a, mat_b, offs)[-1]
    chk(bias.dim() == 2 and bias.shape[0] == groups and bias.shape[1] == n_out,
        lambda: f"grouped_mm: bias must have shape (G, N) = ({groups}, {n_out}), got {_sizes(bias)}")
    chk(bias.dtype in (mat_a.dtype, out_dtype),
        lambda: f"grouped_mm: bias must have the input dtype ({_c10(mat_a.dtype)}) or the output dtype "
        f"({_c10(out_dtype)}), got {_c10(bias.dtype)}")
    chk(bias.device == mat_a.device,
        lambda: f"grouped_mm: bias must be on the device of mat_a ({mat_a.device}), got {bias.device}")


def check_grouped_mm_inputs(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype],
) -> torch.dtype:
    """Validates everything but the values of offs; returns the output dtype.
    The same on every device: the CUDA entry takes all it accepts."""
    chk = torch._check_value
    check_grouped_mm_dims("grouped_mm", mat_a, mat_b)
    chk(mat_a.dtype in GROUPED_MM_DTYPES,
        lambda: f"grouped_mm: mat_a must be float32, float16, bfloat16 or float64, got {_c10(mat_a.dtype)}")
    chk(mat_b.dtype == mat_a.dtype,
        lambda: f"grouped_mm: mat_b must have the dtype of mat_a ({_c10(mat_a.dtype)}), got {_c10(mat_b.dtype)}")
    check_grouped_mm_contraction("grouped_mm", mat_a, mat_b)
    out_dtype = grouped_mm_out_dtype(mat_a, out_dtype)
    check_grouped_mm_layout("grouped_mm", mat_a, mat_b, offs)
    check_grouped_mm_bias(mat_a, mat_b, offs, bias, out_dtype)
    return out_dtype


# --------------------------------------------------------- grouped_mm_gather
# Restates the grouped_mm_gather checks of GroupedMM.h.


def grouped_mm_gather_dim(is_a: bool, mat_b: torch.Tensor) -> int:
    """Dimension of the operand that its index replaces (the one offs splits)."""
    return 1 if is_a and mat_b.dim() == 2 else 0


def grouped_mm_gathered_shape(mat: torch.Tensor, index: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """A stride-0 stand-in with the gathered operand's shape, for the grouped_mm checks."""
    if index is None:
        return mat
    size = list(mat.shape)
    size[dim] = index.shape[0]
    return mat.new_empty((1, 1)).expand(size)


def _check_gather_index(index: torch.Tensor, mat_a: torch.Tensor, name: str) -> None:
    chk = torch._check_value
    chk(index.dim() == 1,
        lambda: f"grouped_mm_gather: {name} must be 1-D, got {index.dim()}-D with sizes {_sizes(index)}")
    chk(index.dtype == torch.int64, lambda: f"grouped_mm_gather: {name} must be int64, got {_c10(index.dtype)}")
    chk(index.device == mat_a.device,
        lambda: f"grouped_mm_gather: {name} must be on the device of mat_a ({mat_a.device}), got {index.device}")


def check_grouped_mm_gather_inputs(mat_a, mat_b, offs, a_index, b_index, bias, out_dtype):
    """Validates grouped_mm_gather's arguments; returns (gathered A, gathered B, out dtype)."""
    chk = torch._check_value
    chk(a_index is not None or b_index is not None,
        lambda: "grouped_mm_gather: a_index or b_index must be given (else call grouped_mm)")
    chk(mat_a.dim() == 2 and mat_b.dim() in (2, 3),
        lambda: "grouped_mm_gather: needs mat_a 2-D and mat_b 3-D (rows of A gathered) or 2-D (K gathered), "
        f"got mat_a {_sizes(mat_a)} and mat_b {_sizes(mat_b)}")
    chk(b_index is None or mat_b.dim() == 2,
        lambda: f"grouped_mm_gather: b_index needs mat_b 2-D (the 2D x 2D layout), got mat_b {_sizes(mat_b)}")
    if a_index is not None:
        _check_gather_index(a_index, mat_a, "a_index")
    if b_index is not None:
        _check_gather_index(b_index, mat_a, "b_index")
    a = grouped_mm_gathered_shape(mat_a, a_index, grouped_mm_gather_dim(True, mat_b))
    b = grouped_mm_gathered_shape(mat_b, b_index, 0)
    return a, b, check_grouped_mm_inputs(a, b, offs, bias, out_dtype)


# --------------------------------------------------------------- expert_mlp
# Restates csrc/moe/ExpertMLP.h.

EXPERT_ACTIVATIONS = ("swiglu", "geglu", "swiglu_clamped", "silu", "gelu", "relu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "swiglu_clamped")


def check_expert_mlp_backward_inputs(grad_out, tokens, src_rows, gate_up_proj, h) -> None:
    """What expert_mlp_backward checks beyond check_expert_mlp_inputs (ExpertMLP.cpp, the same messages)."""
    chk = torch._check_value
    chk(grad_out.shape == tokens.shape and grad_out.dtype == tokens.dtype,
        lambda: f"expert_mlp_backward: grad_out must be {_c10(tokens.dtype)} of sizes {_sizes(tokens)}, got "
        f"{_c10(grad_out.dtype)} of sizes {_sizes(grad_out)}")
    rows, n1 = src_rows.shape[0], gate_up_proj.shape[2]
    chk(h.dim() == 2 and h.shape[0] == rows and h.shape[1] == n1 and h.dtype == tokens.dtype,
        lambda: f"expert_mlp_backward: h must be {_c10(tokens.dtype)} of sizes (R, N1) = ({rows}, {n1}), got "
        f"{_c10(h.dtype)} of sizes {_sizes(h)}")


def check_expert_mlp_inputs(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
                            down_bias, activation, gate_up_interleaved) -> None:
    chk = torch._check_value
    chk(activation in EXPERT_ACTIVATIONS,
        lambda: "expert_mlp: activation must be one of swiglu, geglu, swiglu_clamped, silu, gelu, relu, "
        f'got "{activation}"')
    gated = activation in GATED_ACTIVATIONS
    chk(not gate_up_interleaved or gated,
        lambda: f'expert_mlp: gate_up_interleaved needs a gated activation, got "{activation}"')
    chk(tokens.dim() == 2,
        lambda: f"expert_mlp: tokens must be 2-D (tokens, hidden), got {tokens.dim()}-D with sizes {_sizes(tokens)}")
    chk(tokens.dtype in GROUPED_MM_DTYPES,
        lambda: f"expert_mlp: tokens must be float32, float16, bfloat16 or float64, got {_c10(tokens.dtype)}")
    chk(src_rows.dim() == 1 and src_rows.dtype == torch.int64,
        lambda: f"expert_mlp: src_rows must be 1-D int64 (permute's src_rows), got {src_rows.dim()}-D "
        f"{_c10(src_rows.dtype)}")
    chk(dst_rows.dim() == 2 and dst_rows.dtype == torch.int64 and dst_rows.shape[0] == tokens.shape[0],
        lambda: f"expert_mlp: dst_rows must be int64 (tokens, top_k) with tokens={tokens.shape[0]}, got "
        f"{_c10(dst_rows.dtype)} of sizes {_sizes(dst_rows)}")
    chk(dst_rows.shape[1] > 0, lambda: f"expert_mlp: dst_rows must have top_k >= 1, got sizes {_sizes(dst_rows)}")
    chk(gate_up_proj.dim() == 3 and down_proj.dim() == 3,
        lambda: f"expert_mlp: gate_up_proj (E, H, N1) and down_proj (E, I, H) must be 3-D, got "
        f"{_sizes(gate_up_proj)} and {_sizes(down_proj)}")
    experts, hidden, inter = gate_up_proj.shape[0], tokens.shape[1], down_proj.shape[1]
    chk(gate_up_proj.shape[1] == hidden and down_proj.shape[2] == hidden,
        lambda: f"expert_mlp: gate_up_proj must be (E, H, N1) and down_proj (E, I, H) with H={hidden} (tokens "
        f"{_sizes(tokens)}), got {_sizes(gate_up_proj)} and {_sizes(down_proj)}")
    chk(down_proj.shape[0] == experts and offs.dim() == 1 and offs.shape[0] == experts,
        lambda: "expert_mlp: gate_up_proj, down_proj and offs must agree on the number of experts, got "
        f"{_sizes(gate_up_proj)}, {_sizes(down_proj)} and offs of sizes {_sizes(offs)}")
    chk(offs.dtype == torch.int32, lambda: f"expert_mlp: offs must be int32, got {_c10(offs.dtype)}")
    n1 = 2 * inter if gated else inter
    chk(gate_up_proj.shape[2] == n1,
        lambda: f'expert_mlp: gate_up_proj must have N1={n1} columns for activation "{activation}" with I={inter} '
        f"(down_proj {_sizes(down_proj)}), got {_sizes(gate_up_proj)}")
    chk(gate_up_proj.dtype == tokens.dtype and down_proj.dtype == tokens.dtype,
        lambda: f"expert_mlp: gate_up_proj and down_proj must have the dtype of tokens ({_c10(tokens.dtype)}), "
        f"got {_c10(gate_up_proj.dtype)} and {_c10(down_proj.dtype)}")
    if weights is not None:
        chk(weights.shape == dst_rows.shape,
            lambda: f"expert_mlp: weights must have the shape of dst_rows {_sizes(dst_rows)}, got {_sizes(weights)}")
        chk(weights.dtype in (torch.float32, tokens.dtype),
            lambda: f"expert_mlp: weights must be float32 or the dtype of tokens ({_c10(tokens.dtype)}), "
            f"got {_c10(weights.dtype)}")
    if gate_up_bias is not None:
        chk(gate_up_bias.dim() == 2 and gate_up_bias.shape[0] == experts and gate_up_bias.shape[1] == n1,
            lambda: f"expert_mlp: gate_up_bias must be (E, N1) = ({experts}, {n1}), got {_sizes(gate_up_bias)}")
        chk(gate_up_bias.dtype == tokens.dtype,
            lambda: f"expert_mlp: gate_up_bias must have the dtype of tokens ({_c10(tokens.dtype)}), got "
            f"{_c10(gate_up_bias.dtype)}")
    if down_bias is not None:
        chk(down_bias.dim() == 2 and down_bias.shape[0] == experts and down_bias.shape[1] == hidden,
            lambda: f"expert_mlp: down_bias must be (E, H) = ({experts}, {hidden}), got {_sizes(down_bias)}")
        chk(down_bias.dtype == tokens.dtype,
            lambda: f"expert_mlp: down_bias must have the dtype of tokens ({_c10(tokens.dtype)}), got "
            f"{_c10(down_bias.dtype)}")
    for t in (src_rows, offs, dst_rows, gate_up_proj, down_proj, weights, gate_up_bias, down_bias):
        if t is None:
            continue
        chk(t.device == tokens.device,
            lambda: f"expert_mlp: every input must be on the device of tokens ({tokens.device}), got one on {t.device}")


# ------------------------------------------------------------------ routing ops
# Restates csrc/ATen/native/MoE{Permute,Unpermute,UnpermuteBackward,RouterTopk}.h one for one, with the
# same messages.

ROUTER_SCORE_FUNCS = ("softmax", "sigmoid", "softmax_after_topk")


def router_topk_weights_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """float32 weights (float64 for float64 logits); see MoERouterTopk.h."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def check_router_topk_inputs(
    logits: torch.Tensor,
    k: int,
    score_func: str,
    bias: Optional[torch.Tensor],
    n_group: int,
    topk_group: int,
) -> None:
    chk = torch._check_value
    chk(score_func in ROUTER_SCORE_FUNCS,
        lambda: f"router_topk: score_func must be 'softmax', 'sigmoid' or 'softmax_after_topk', got '{score_func}'")
    chk(logits.dim() == 2,
        lambda: f"router_topk: logits must be 2-D (tokens, experts), got {logits.dim()}-D with sizes {_sizes(logits)}")
    chk(logits.dtype in GROUPED_MM_DTYPES,
        lambda: f"router_topk: logits must be float32, float16, bfloat16 or float64, got {_c10(logits.dtype)}")
    experts = logits.shape[1]
    chk(1 <= k <= experts, lambda: f"router_topk: k must be in [1, num_experts={experts}], got k={k}")
    chk(n_group >= 1 and experts % n_group == 0,
        lambda: f"router_topk: n_group must be >= 1 and divide num_experts={experts}, got n_group={n_group}")
    chk(1 <= topk_group <= n_group,
        lambda: f"router_topk: topk_group must be in [1, n_group={n_group}], got topk_group={topk_group}")
    chk(k <= topk_group * (experts // n_group),
        lambda: f"router_topk: k={k} exceeds the experts of the selected groups, topk_group * num_experts / n_group "
        f"= {topk_group * (experts // n_group)}")
    chk(n_group <= 64, lambda: f"router_topk: n_group must be at most 64, got n_group={n_group}")
    if bias is not None:
        chk(bias.dim() == 1 and bias.shape[0] == experts,
            lambda: f"router_topk: bias must have shape (num_experts,) = ({experts}), got {_sizes(bias)}")
        chk(bias.dtype in (torch.float32, logits.dtype),
            lambda: f"router_topk: bias must be float32 or the logits dtype ({_c10(logits.dtype)}), "
            f"got {_c10(bias.dtype)}")
        chk(bias.device == logits.device,
            lambda: f"router_topk: bias must be on the device of logits ({logits.device}), got {bias.device}")


def permute_num_local(num_experts: int, first_expert: int, num_local_experts: Optional[int]) -> int:
    return num_experts - first_expert if num_local_experts is None else num_local_experts


def permute_num_rows(tokens, top_k, num_local: int, alignment: int):
    """Worst-case permuted rows: every (token, slot) local, every group padded by alignment - 1."""
    return tokens * top_k + num_local * (alignment - 1)


def check_permute_inputs(
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    alignment: int,
    first_expert: int,
    num_local_experts: Optional[int],
) -> None:
    chk = torch._check_value
    chk(tokens.dim() == 2,
        lambda: f"permute: tokens must be 2-D (tokens, hidden), got {tokens.dim()}-D with sizes {_sizes(tokens)}")
    chk(expert_ids.dim() == 2,
        lambda: f"permute: expert_ids must be 2-D (tokens, top_k), got {expert_ids.dim()}-D with sizes "
        f"{_sizes(expert_ids)}")
    chk(expert_ids.dtype in (torch.int32, torch.int64),
        lambda: f"permute: expert_ids must be int32 or int64, got {_c10(expert_ids.dtype)}")
    chk(expert_ids.shape[0] == tokens.shape[0],
        lambda: f"permute: expert_ids must have one row per token ({tokens.shape[0]}), got sizes {_sizes(expert_ids)}")
    chk(expert_ids.device == tokens.device,
        lambda: f"permute: expert_ids must be on the device of tokens ({tokens.device}), got {expert_ids.device}")
    chk(1 <= num_experts <= 2**31 - 1,
        lambda: f"permute: num_experts must be in [1, 2^31 - 1], got num_experts={num_experts}")
    chk(1 <= alignment <= 128 and alignment & (alignment - 1) == 0,
        lambda: f"permute: alignment must be a power of two in [1, 128], got alignment={alignment}")
    chk(0 <= first_expert < num_experts,
        lambda: f"permute: first_expert must be in [0, num_experts={num_experts}), got first_expert={first_expert}")
    num_local = permute_num_local(num_experts, first_expert, num_local_experts)
    chk(1 <= num_local <= num_experts - first_expert,
        lambda: f"permute: num_local_experts must be in [1, num_experts - first_expert = {num_experts - first_expert}]"
        f", got num_local_experts={num_local}")
    tokens_n, top_k = tokens.shape[0], expert_ids.shape[1]
    # rows <= 2^31 - 1 as a whole bound on T (T * k <= c gives export T <= c / k, which it cannot print).
    limit = 2**31 - 1 - num_local * (alignment - 1)
    chk(limit >= 0 and (top_k == 0 or tokens_n <= limit // top_k),
        lambda: f"permute: the permuted row count tokens * top_k + num_local_experts * (alignment - 1) = {tokens_n} * "
        f"{top_k} + {num_local} * {alignment - 1} exceeds the int32 offsets (2^31 - 1)")


def check_unpermute_inputs(
    permuted: torch.Tensor, dst_rows: torch.Tensor, weights: Optional[torch.Tensor]
) -> None:
    chk = torch._check_value
    chk(permuted.dim() == 2,
        lambda: f"unpermute: permuted must be 2-D (rows, hidden), got {permuted.dim()}-D with sizes {_sizes(permuted)}")
    chk(permuted.dtype in GROUPED_MM_DTYPES,
        lambda: f"unpermute: permuted must be float32, float16, bfloat16 or float64, got {_c10(permuted.dtype)}")
    chk(dst_rows.dim() == 2,
        lambda: f"unpermute: dst_rows must be 2-D (tokens, top_k), got {dst_rows.dim()}-D with sizes "
        f"{_sizes(dst_rows)}")
    chk(dst_rows.dtype == torch.int64, lambda: f"unpermute: dst_rows must be int64, got {_c10(dst_rows.dtype)}")
    chk(dst_rows.device == permuted.device,
        lambda: f"unpermute: dst_rows must be on the device of permuted ({permuted.device}), got {dst_rows.device}")
    if weights is not None:
        chk(weights.shape == dst_rows.shape,
            lambda: f"unpermute: weights must have the shape of dst_rows {_sizes(dst_rows)}, got {_sizes(weights)}")
        chk(weights.dtype in (torch.float32, permuted.dtype),
            lambda: f"unpermute: weights must be float32 or the dtype of permuted ({_c10(permuted.dtype)}), "
            f"got {_c10(weights.dtype)}")
        chk(weights.device == permuted.device,
            lambda: f"unpermute: weights must be on the device of permuted ({permuted.device}), got {weights.device}")


def check_unpermute_backward_inputs(
    grad_output: torch.Tensor, dst_rows: torch.Tensor, num_rows, weights: Optional[torch.Tensor],
    permuted: Optional[torch.Tensor],
) -> None:
    chk = torch._check_value
    chk(dst_rows.dim() == 2,
        lambda: f"unpermute_backward: dst_rows must be 2-D (tokens, top_k), got {dst_rows.dim()}-D with sizes "
        f"{_sizes(dst_rows)}")
    chk(dst_rows.dtype == torch.int64,
        lambda: f"unpermute_backward: dst_rows must be int64, got {_c10(dst_rows.dtype)}")
    chk(grad_output.dim() == 2 and grad_output.shape[0] == dst_rows.shape[0],
        lambda: f"unpermute_backward: grad_output must be 2-D with one row per token ({dst_rows.shape[0]}), "
        f"got sizes {_sizes(grad_output)}")
    chk(grad_output.dtype in GROUPED_MM_DTYPES,
        lambda: f"unpermute_backward: grad_output must be float32, float16, bfloat16 or float64, got "
        f"{_c10(grad_output.dtype)}")
    chk(dst_rows.device == grad_output.device,
        lambda: f"unpermute_backward: dst_rows must be on the device of grad_output ({grad_output.device}), got "
        f"{dst_rows.device}")
    chk(num_rows >= 0, lambda: f"unpermute_backward: num_rows must be >= 0, got {num_rows}")
    if permuted is not None:
        check_unpermute_inputs(permuted, dst_rows, weights)
        chk(permuted.shape[0] == num_rows,
            lambda: f"unpermute_backward: num_rows must be permuted's row count ({permuted.shape[0]}), got {num_rows}")
        chk(grad_output.shape[1] == permuted.shape[1],
            lambda: f"unpermute_backward: grad_output must be as wide as permuted ({permuted.shape[1]}), got sizes "
            f"{_sizes(grad_output)}")
        chk(grad_output.dtype == permuted.dtype,
            lambda: f"unpermute_backward: grad_output must have permuted's dtype ({_c10(permuted.dtype)}), got "
            f"{_c10(grad_output.dtype)}")


# ------------------------------------------------------------------ fp8 quantisation
# Restates csrc/ATen/native/MoEQuantize.h one for one, with the same messages.

FP8_RECIPES = ("tensorwise", "rowwise", "blockwise_1x128", "blockwise_128x128", "mx")
FP8_DATA_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fp8_c10(dtype: torch.dtype) -> str:
    return {torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2",
            torch.float8_e8m0fnu: "Float8_e8m0fnu"}.get(dtype) or _c10(dtype)


def _dims(sizes) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def _ceil_div(a, b):
    return (a + b - 1) // b


def mx_blocked_scale_message(scale, need=None) -> str:
    """scaled_grouped_mm's message for an mx scale blocked per group
    (swizzle_mx_scale's layout) that holds fewer bytes than the groups of offs
    read. ``need`` comes from offs's values: the CPU check gives it; a
    device-side check (no host sync) cannot format it and leaves it out."""
    msg = (f"scaled_grouped_mm: the blocked mx scale of sizes {_dims(scale.shape)} holds {scale.numel()} bytes, "
           "fewer than the groups of offs need")
    return msg if need is None else f"{msg} ({need})"


def fp8_check_recipe(op: str, recipe: str) -> None:
    torch._check_value(
        recipe in FP8_RECIPES,
        lambda: f"{op}: recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' or 'mx', "
        f"got '{recipe}'")


def fp8_scale_dtype(recipe: str) -> torch.dtype:
    return torch.float8_e8m0fnu if recipe == "mx" else torch.float32


def fp8_scale_size(sizes, recipe: str, groups: Optional[int], swizzle: bool) -> list:
    """Scale shape for data of sizes (R, C) or (B, R, C); see MoEQuantize.h."""
    rows, cols = sizes[-2], sizes[-1]
    batch = list(sizes[:-2])
    if groups is not None and recipe == "tensorwise":
        return [groups]
    if groups is not None and recipe == "rowwise":
        return [groups, rows]
    if recipe == "tensorwise":
        return batch
    if recipe == "rowwise":
        return batch + [rows]
    if recipe == "blockwise_128x128":
        return batch + [_ceil_div(rows, 128), _ceil_div(cols, 128)]
    s = _ceil_div(cols, 32 if recipe == "mx" else 128)
    if swizzle:
        rp, sp = _ceil_div(rows, 128) * 128, _ceil_div(s, 4) * 4
        return [rp, sp] if len(sizes) == 2 else batch + [rp * sp]
    return batch + [rows, s]


def fp8_check_layout(op: str, arg: str, t: torch.Tensor, recipe: str, offs: Optional[torch.Tensor],
                     swizzle: bool) -> None:
    chk = torch._check_value
    chk(t.dim() in (2, 3), lambda: f"{op}: {arg} must be 2-D or 3-D, got {t.dim()}-D with sizes {_sizes(t)}")
    chk(not swizzle or recipe == "mx", lambda: f"{op}: swizzle=True needs recipe 'mx', got '{recipe}'")
    if offs is not None:
        chk(t.dim() == 2, lambda: f"{op}: offs needs a 2-D {arg}, got {arg} of sizes {_sizes(t)}")
        chk(recipe in ("tensorwise", "rowwise", "mx"),
            lambda: f"{op}: offs is supported with recipes 'tensorwise', 'rowwise' and 'mx', got '{recipe}'")
        chk(not swizzle, lambda: f"{op}: swizzle=True does not take offs")
        chk(offs.dim() == 1, lambda: f"{op}: offs must be 1-D, got {offs.dim()}-D with sizes {_sizes(offs)}")
        chk(offs.dtype == torch.int32, lambda: f"{op}: offs must be int32, got {_c10(offs.dtype)}")
        chk(offs.device == t.device,
            lambda: f"{op}: offs must be on the device of {arg} ({t.device}), got {offs.device}")


def check_quantize_fp8_inputs(x: torch.Tensor, recipe: str, float8_dtype: Optional[torch.dtype],
                              offs: Optional[torch.Tensor], swizzle: bool) -> torch.dtype:
    """Validates; returns the data dtype."""
    fp8_check_recipe("quantize_fp8", recipe)
    torch._check_value(x.dtype in FP8_FLOAT_DTYPES,
                       lambda: f"quantize_fp8: x must be float32, bfloat16 or float16, got {_c10(x.dtype)}")
    if float8_dtype is not None:
        torch._check_value(float8_dtype in FP8_DATA_DTYPES,
                           lambda: "quantize_fp8: float8_dtype must be Float8_e4m3fn or Float8_e5m2, got "
                           f"{_fp8_c10(float8_dtype)}")
    fp8_check_layout("quantize_fp8", "x", x, recipe, offs, swizzle)
    return float8_dtype or torch.float8_e4m3fn


def check_dequantize_fp8_inputs(data: torch.Tensor, scale: torch.Tensor, recipe: str,
                                out_dtype: Optional[torch.dtype], offs: Optional[torch.Tensor],
                                swizzle: bool) -> torch.dtype:
    """Validates; returns the output dtype."""
    chk = torch._check_value
    fp8_check_recipe("dequantize_fp8", recipe)
    chk(data.dtype in FP8_DATA_DTYPES,
        lambda: f"dequantize_fp8: data must be Float8_e4m3fn or Float8_e5m2, got {_fp8_c10(data.dtype)}")
    fp8_check_layout("dequantize_fp8", "data", data, recipe, offs, swizzle)
    want_dtype = fp8_scale_dtype(recipe)
    chk(scale.dtype == want_dtype,
        lambda: f"dequantize_fp8: scale must be {_fp8_c10(want_dtype)} for recipe '{recipe}', got "
        f"{_fp8_c10(scale.dtype)}")
    want = fp8_scale_size(data.shape, recipe, offs.shape[0] if offs is not None else None, swizzle)
    chk(list(scale.shape) == want,
        lambda: f"dequantize_fp8: scale must have shape {_dims(want)} for data of sizes {_sizes(data)} and recipe "
        f"'{recipe}'{' (swizzled)' if swizzle else ''}, got {_sizes(scale)}")
    chk(scale.device == data.device,
        lambda: f"dequantize_fp8: scale must be on the device of data ({data.device}), got {scale.device}")
    out = out_dtype or torch.float32
    chk(out in FP8_FLOAT_DTYPES,
        lambda: f"dequantize_fp8: out_dtype must be float32, bfloat16 or float16, got {_fp8_c10(out)}")
    return out


# ------------------------------------------------------------------ swizzle_mx_scale
# Restates csrc/ATen/native/MoESwizzleMXScale.h one for one, with the same messages.

def swizzle_mx_scale_size(rows: int, s: int, groups: int, dim: int) -> list:
    if dim == 0:
        return [rows + 128 * groups, _ceil_div(s, 4) * 4]
    return [_ceil_div(rows, 128) * 128, s + 4 * groups]


def check_swizzle_mx_scale_inputs(scale: torch.Tensor, offs: torch.Tensor, dim: int) -> None:
    chk = torch._check_value
    chk(scale.dtype == torch.float8_e8m0fnu,
        lambda: f"swizzle_mx_scale: scale must be Float8_e8m0fnu, got {_fp8_c10(scale.dtype)}")
    chk(scale.dim() == 2,
        lambda: f"swizzle_mx_scale: scale must be the 2-D (R, S) grid of a 2-D operand, got sizes {_sizes(scale)}")
    chk(dim in (0, 1), lambda: f"swizzle_mx_scale: dim must be 0 or 1, got {dim}")
    chk(offs.dim() == 1, lambda: f"swizzle_mx_scale: offs must be 1-D, got {offs.dim()}-D with sizes {_sizes(offs)}")
    chk(offs.dtype == torch.int32, lambda: f"swizzle_mx_scale: offs must be int32, got {_c10(offs.dtype)}")
    chk(offs.device == scale.device,
        lambda: f"swizzle_mx_scale: offs must be on the device of scale ({scale.device}), got {offs.device}")


# ------------------------------------------------------------------ scaled_grouped_mm
# Restates csrc/ATen/native/MoEScaledGroupedMM.h one for one, with the same messages.


def scaled_grouped_mm_out_dtype(out_dtype: Optional[torch.dtype]) -> torch.dtype:
    out = out_dtype or torch.bfloat16
    torch._check_value(out in (torch.bfloat16, torch.float32),
                       lambda: f"scaled_grouped_mm: out_dtype must be bfloat16 or float32, got {_fp8_c10(out)}")
    return out


def _check_scaled_grouped_mm_scale(name: str, scale: torch.Tensor, want: list, recipe: str) -> None:
    torch._check_value(list(scale.shape) == list(want),
                       lambda: f"scaled_grouped_mm: {name} must have shape {_dims(want)} for {recipe} scaling of "
                       f"these operands, got {_sizes(scale)}")


def _check_mx_blocked_scale(name: str, scale: torch.Tensor, operand: str, rows: int, s: int, dim: int) -> None:
    """A 2-D operand's mx scale, blocked per group (swizzle_mx_scale): its rank and rows."""
    chk = torch._check_value
    chk(scale.dim() == 2 and scale.shape[0] >= rows,
        lambda: f"scaled_grouped_mm: {name} must be the mx scale of {operand} blocked per group "
        f"(swizzle_mx_scale(scale, offs, dim={dim})): 2-D with at least {rows} rows, got {_sizes(scale)}")
    chk(not (scale.shape[0] == rows and scale.shape[1] == s),
        lambda: f"scaled_grouped_mm: {name} has the shape of the plain mx scale grid of {operand}, "
        f"[{rows}, {s}]; 2-D operands take their scales blocked per group "
        f"(swizzle_mx_scale(scale, offs, dim={dim})), which at this shape cannot be told from the plain grid")


# The scale shapes of each recipe (MoEScaledGroupedMM.h), once the recipe is known.
def check_scaled_grouped_mm_rowwise_scales(mat_a, mat_b, scale_a, scale_b, groups: int) -> None:
    m, n = mat_a.shape[-2], mat_b.shape[-1]
    want = {"2d3d": ([m], [groups, n]), "3d3d": ([groups, m], [groups, n]), "3d2d": ([groups, m], [n]),
            "2d2d": ([groups * m], [groups * n])}[grouped_mm_layout(mat_a, mat_b)]
    _check_scaled_grouped_mm_scale("scale_a", scale_a, want[0], "rowwise")
    _check_scaled_grouped_mm_scale("scale_b", scale_b, want[1], "rowwise")


def check_scaled_grouped_mm_blockwise_scales(mat_a, mat_b, scale_a, scale_b, groups: int) -> None:
    """2D x 3D and 3D x 3D only (the caller checks the layout)."""
    m, n, k = mat_a.shape[-2], mat_b.shape[-1], mat_a.shape[-1]
    kb, nb = (k + 127) // 128, (n + 127) // 128
    what = "blockwise (1x128 x 128x128)"
    _check_scaled_grouped_mm_scale("scale_a", scale_a, [m, kb] if mat_a.dim() == 2 else [groups, m, kb], what)
    _check_scaled_grouped_mm_scale("scale_b", scale_b, [groups, nb, kb], what)


def check_scaled_grouped_mm_mx_scales(
    mat_a, mat_b, scale_a, scale_b, groups: int, swizzled_a: bool, swizzled_b: bool
) -> None:
    """3-D operands: the plain (G, rows, S) grid or, swizzled, (G, round_up(rows, 128) * round_up(S, 4));
    2-D operands: blocked per group (swizzle_mx_scale)."""
    layout = grouped_mm_layout(mat_a, mat_b)
    torch._check_value(layout != "3d2d",
                       lambda: "scaled_grouped_mm: mx scaling supports 2D x 3D, 3D x 3D and 2D x 2D operands, got "
                       f"mat_a {_sizes(mat_a)} and mat_b {_sizes(mat_b)}")
    m, n, s = mat_a.shape[-2], mat_b.shape[-1], (mat_a.shape[-1] + 31) // 32

    def check_3d(name, scale, rows, swizzled):
        if swizzled:
            want = [groups, _ceil_div(rows, 128) * 128 * _ceil_div(s, 4) * 4]
            _check_scaled_grouped_mm_scale(name, scale, want, "mx (swizzled)")
        else:
            _check_scaled_grouped_mm_scale(name, scale, [groups, rows, s], "mx")

    if layout == "2d2d":  # groups along K: offs must fall on 32-blocks (checked on values)
        _check_mx_blocked_scale("scale_a", scale_a, "mat_a", m, s, 1)
        _check_mx_blocked_scale("scale_b", scale_b, "mat_b^T", n, s, 1)
        return
    if layout == "2d3d":
        _check_mx_blocked_scale("scale_a", scale_a, "mat_a", m, s, 0)
    else:
        check_3d("scale_a", scale_a, m, swizzled_a)
    check_3d("scale_b", scale_b, n, swizzled_b)


def check_scaled_grouped_mm_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype):
    """Validates everything but the values of offs; returns (recipe, output dtype): the recipe told from
    the scales' dtypes and ranks."""
    chk = torch._check_value
    check_grouped_mm_dims("scaled_grouped_mm", mat_a, mat_b)
    chk(mat_a.dtype in FP8_DATA_DTYPES,
        lambda: f"scaled_grouped_mm: mat_a must be Float8_e4m3fn or Float8_e5m2, got {_fp8_c10(mat_a.dtype)}")
    chk(mat_b.dtype in FP8_DATA_DTYPES,
        lambda: f"scaled_grouped_mm: mat_b must be Float8_e4m3fn or Float8_e5m2, got {_fp8_c10(mat_b.dtype)}")
    check_grouped_mm_contraction("scaled_grouped_mm", mat_a, mat_b)
    chk(scale_result is None,
        lambda: f"scaled_grouped_mm: scale_result is not supported, got a tensor of sizes {_sizes(scale_result)}")
    out_t = scaled_grouped_mm_out_dtype(out_dtype)
    check_grouped_mm_layout("scaled_grouped_mm", mat_a, mat_b, offs)
    layout = grouped_mm_layout(mat_a, mat_b)
    groups = grouped_mm_num_groups(mat_a, offs)
    f32 = scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32
    if f32 and layout in ("2d3d", "3d3d") and scale_a.dim() == mat_a.dim():  # scale_a one rank above rowwise's
        recipe = "blockwise (1x128 x 128x128)"
        check_scaled_grouped_mm_blockwise_scales(mat_a, mat_b, scale_a, scale_b, groups)
    elif f32:
        recipe = "rowwise"
        check_scaled_grouped_mm_rowwise_scales(mat_a, mat_b, scale_a, scale_b, groups)
    else:
        chk(scale_a.dtype == torch.float8_e8m0fnu and scale_b.dtype == torch.float8_e8m0fnu,
            lambda: "scaled_grouped_mm: scale_a and scale_b must both be float32 (rowwise, blockwise) or both "
            f"Float8_e8m0fnu (mx), got {_fp8_c10(scale_a.dtype)} and {_fp8_c10(scale_b.dtype)}")
        recipe = "mx"
        swizzled = (scale_a.dim() == 2, scale_b.dim() == 2)  # a 3-D operand's scale is swizzled when 2-D
        check_scaled_grouped_mm_mx_scales(mat_a, mat_b, scale_a, scale_b, groups, *swizzled)
    chk(scale_a.device == mat_a.device and scale_b.device == mat_a.device,
        lambda: f"scaled_grouped_mm: scale_a and scale_b must be on the device of mat_a ({mat_a.device}), got "
        f"{scale_a.device} and {scale_b.device}")
    if bias is not None:
        n_out = grouped_mm_out_size(mat_a, mat_b, offs)[-1]
        chk(bias.dim() == 2 and bias.shape[0] == groups and bias.shape[1] == n_out,
            lambda: f"scaled_grouped_mm: bias must have shape (G, N) = ({groups}, {n_out}), got {_sizes(bias)}")
        chk(bias.dtype in (torch.float32, out_t),
            lambda: f"scaled_grouped_mm: bias must be float32 or the output dtype ({_c10(out_t)}), "
            f"got {_fp8_c10(bias.dtype)}")
        chk(bias.device == mat_a.device,
            lambda: f"scaled_grouped_mm: bias must be on the device of mat_a ({mat_a.device}), got {bias.device}")
    return recipe, out_t


# ------------------------------------------------------------------ scaled_grouped_mm_v2
# Restates scaled_grouped_mm_v2_check_inputs (csrc/ATen/native/MoEScaledGroupedMM.h) one for
# one, with the same messages: the recipe stated by at::blas::ScalingType / SwizzleType values
# (torch.nn.functional.ScalingType / SwizzleType), never told from the scales.

SCALING_TYPES = ("TensorWise", "RowWise", "BlockWise1x16", "BlockWise1x32", "BlockWise1x128", "BlockWise128x128")
NO_SWIZZLE = 0
SWIZZLE_32_4_4 = 1
# (recipe_a, recipe_b) -> the v1 recipe the CPU kernel runs; every other pair is refused.
SCALED_GROUPED_MM_V2_RECIPES = {(1, 1): "rowwise", (3, 3): "mx", (4, 5): "blockwise (1x128 x 128x128)"}


def _int_list(v) -> str:
    return "[" + ", ".join(str(int(x)) for x in v) + "]"


def _scaled_grouped_mm_v2_recipe(name: str, recipe) -> int:
    torch._check_value(len(recipe) == 1,
                       lambda: f"scaled_grouped_mm_v2: {name} must hold one ScalingType (one scale per operand on "
                       f"CPU), got {name}={_int_list(recipe)}")
    torch._check_value(0 <= recipe[0] < len(SCALING_TYPES),
                       lambda: f"scaled_grouped_mm_v2: {name}={_int_list(recipe)} is not a ScalingType "
                       "(0 TensorWise .. 5 BlockWise128x128)")
    return int(recipe[0])


def _scaled_grouped_mm_v2_swizzle(name: str, swizzle) -> bool:
    torch._check_value(len(swizzle) <= 1,
                       lambda: f"scaled_grouped_mm_v2: {name} must hold at most one SwizzleType (one scale per "
                       f"operand on CPU), got {name}={_int_list(swizzle)}")
    if not swizzle:
        return False
    torch._check_value(swizzle[0] in (NO_SWIZZLE, SWIZZLE_32_4_4),
                       lambda: f"scaled_grouped_mm_v2: {name}={_int_list(swizzle)} is not a SwizzleType "
                       "(0 NO_SWIZZLE, 1 SWIZZLE_32_4_4)")
    return swizzle[0] == SWIZZLE_32_4_4


def _scaled_grouped_mm_v2_scale_dtype(name: str, scale: torch.Tensor, want: torch.dtype, recipe: str) -> None:
    torch._check_value(scale.dtype == want,
                       lambda: f"scaled_grouped_mm_v2: {name} must be {_fp8_c10(want)} for {recipe}, got "
                       f"{_fp8_c10(scale.dtype)}")


def check_scaled_grouped_mm_v2_inputs(mat_a, mat_b, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b,
                                      offs, bias, out_dtype, contraction_dim):
    """Validates everything but the values of offs; returns (the v1 recipe the kernel runs, output dtype)."""
    chk = torch._check_value
    op = "scaled_grouped_mm_v2"
    check_grouped_mm_dims(op, mat_a, mat_b)
    chk(mat_a.dtype in FP8_DATA_DTYPES,
        lambda: f"{op}: mat_a must be Float8_e4m3fn or Float8_e5m2, got {_fp8_c10(mat_a.dtype)}")
    chk(mat_b.dtype in FP8_DATA_DTYPES,
        lambda: f"{op}: mat_b must be Float8_e4m3fn or Float8_e5m2, got {_fp8_c10(mat_b.dtype)}")
    check_grouped_mm_contraction(op, mat_a, mat_b)
    scaled_grouped_mm_out_dtype(out_dtype)
    ra = _scaled_grouped_mm_v2_recipe("recipe_a", recipe_a)
    rb = _scaled_grouped_mm_v2_recipe("recipe_b", recipe_b)
    swa = _scaled_grouped_mm_v2_swizzle("swizzle_a", swizzle_a)
    swb = _scaled_grouped_mm_v2_swizzle("swizzle_b", swizzle_b)
    chk(len(scale_a) == 1, lambda: f"{op}: scale_a must hold one tensor for recipe_a={_int_list(recipe_a)} "
        f"({SCALING_TYPES[ra]}), got {len(scale_a)}")
    chk(len(scale_b) == 1, lambda: f"{op}: scale_b must hold one tensor for recipe_b={_int_list(recipe_b)} "
        f"({SCALING_TYPES[rb]}), got {len(scale_b)}")
    if len(contraction_dim):
        cd = list(contraction_dim)
        chk(len(cd) == 2 and cd[0] in (-1, mat_a.dim() - 1) and cd[1] in (-2, mat_b.dim() - 2),
            lambda: f"{op}: contraction_dim must be [] or [-1, -2] (K last in mat_a, first in mat_b), got "
            f"contraction_dim={_int_list(cd)}")
    check_grouped_mm_layout(op, mat_a, mat_b, offs)
    layout = grouped_mm_layout(mat_a, mat_b)
    groups = grouped_mm_num_groups(mat_a, offs)
    (sa,), (sb,) = scale_a, scale_b
    m, n, k = mat_a.shape[-2], mat_b.shape[-1], mat_a.shape[-1]
    recipe = SCALED_GROUPED_MM_V2_RECIPES.get((ra, rb))

    def refuse_swizzle(name):
        chk(not swa and not swb,
            lambda: f"{op}: {name} scales are never swizzled: swizzle_a and swizzle_b must be [] or [0] "
            f"(NO_SWIZZLE), got swizzle_a={_int_list(swizzle_a)} and swizzle_b={_int_list(swizzle_b)}")

    if recipe == "rowwise":
        refuse_swizzle("RowWise")
        _scaled_grouped_mm_v2_scale_dtype("scale_a", sa, torch.float32, "recipe_a=[1] (RowWise)")
        _scaled_grouped_mm_v2_scale_dtype("scale_b", sb, torch.float32, "recipe_b=[1] (RowWise)")
        want = {"2d3d": ([m], [groups, n]), "3d3d": ([groups, m], [groups, n]), "3d2d": ([groups, m], [n]),
                "2d2d": ([groups * m], [groups * n])}[layout]
        _check_scaled_grouped_mm_scale("scale_a", sa, want[0], recipe)
        _check_scaled_grouped_mm_scale("scale_b", sb, want[1], recipe)
    elif recipe == "mx":
        _scaled_grouped_mm_v2_scale_dtype("scale_a", sa, torch.float8_e8m0fnu, "recipe_a=[3] (BlockWise1x32)")
        _scaled_grouped_mm_v2_scale_dtype("scale_b", sb, torch.float8_e8m0fnu, "recipe_b=[3] (BlockWise1x32)")
        chk(layout != "3d2d",
            lambda: f"{op}: recipe_a=[3] x recipe_b=[3] (BlockWise1x32, MXFP8) supports 2D x 3D, 3D x 3D and "
            f"2D x 2D operands, got mat_a {_sizes(mat_a)} and mat_b {_sizes(mat_b)}")
        for mat, sw, x in ((mat_a, swa, "a"), (mat_b, swb, "b")):
            chk(mat.dim() == 3 or sw,
                lambda: f"{op}: recipe_{x}=[3] (BlockWise1x32) of a 2-D mat_{x} takes its scale blocked per group "
                f"(swizzle_mx_scale): swizzle_{x} must be [1] (SWIZZLE_32_4_4), got "
                f"swizzle_{x}={_int_list(swizzle_a if x == 'a' else swizzle_b)}")
        # 3-D operands: the swizzle stated, not the scale's rank (as v1 has it), says which grid.
        s = (k + 31) // 32
        sp = _ceil_div(s, 4) * 4
        if layout == "2d3d":
            _check_mx_blocked_scale("scale_a", sa, "mat_a", m, s, 0)
        for name, scale, mat, sw, rows in (("scale_a", sa, mat_a, swa, m), ("scale_b", sb, mat_b, swb, n)):
            if mat.dim() == 3:
                want, what = (([groups, _ceil_div(rows, 128) * 128 * sp], "mx (swizzled)") if sw
                              else ([groups, rows, s], "mx"))
                _check_scaled_grouped_mm_scale(name, scale, want, what)
    elif recipe is not None:
        refuse_swizzle("BlockWise1x128 x BlockWise128x128")
        chk(layout in ("2d3d", "3d3d"),
            lambda: f"{op}: recipe_a=[4] (BlockWise1x128) x recipe_b=[5] (BlockWise128x128) supports 2D x 3D and "
            f"3D x 3D operands, got mat_a {_sizes(mat_a)} and mat_b {_sizes(mat_b)}")
        _scaled_grouped_mm_v2_scale_dtype("scale_a", sa, torch.float32, "recipe_a=[4] (BlockWise1x128)")
        _scaled_grouped_mm_v2_scale_dtype("scale_b", sb, torch.float32, "recipe_b=[5] (BlockWise128x128)")
        kb, nb = (k + 127) // 128, (n + 127) // 128
        _check_scaled_grouped_mm_scale("scale_a", sa, [m, kb] if layout == "2d3d" else [groups, m, kb], recipe)
        _check_scaled_grouped_mm_scale("scale_b", sb, [groups, nb, kb], recipe)
    else:
        chk(False, lambda: f"{op}: recipe_a={_int_list(recipe_a)} ({SCALING_TYPES[ra]}) x recipe_b="
            f"{_int_list(recipe_b)} ({SCALING_TYPES[rb]}) is not supported on CPU; the CPU kernel takes RowWise x "
            "RowWise ([1] x [1]), BlockWise1x32 x BlockWise1x32 ([3] x [3], MXFP8) and BlockWise1x128 x "
            "BlockWise128x128 ([4] x [5])")
    # The recipe now stated and its scales checked, v1's checks (which tell the same recipe from these
    # scales) do the rest: the mx scales of 2-D operands, the devices and bias.
    v1_recipe, out_t = check_scaled_grouped_mm_inputs(mat_a, mat_b, sa, sb, offs, bias, None, out_dtype)
    torch._check(v1_recipe == recipe, lambda: f"{op}: internal: recipe {recipe} read as {v1_recipe}")
    return recipe, out_t

"""Ahead-of-time compilation of the Triton kernels for sm_90a, with no GPU.

Each *variant* is a launch of a kernel on representative CPU tensors (aligned
MoE-like shapes, small): its arguments come from the very function the launcher
uses (``grouped_mm._prepare``) and are bound by Triton's own binder, so the
signature, the constexprs and the divisibility/"== 1" specialisations are those
a CUDA launch with such shapes compiles. ``triton.compile`` then runs the whole
pipeline to PTX and ptxas to a cubin; nothing here queries a driver.

From each compilation: registers, stack and local memory (``cuobjdump
-res-usage`` on the cubin), spill stores/loads (the ptxas log), dynamic shared
memory (Triton's metadata), SASS instruction counts (``nvdisasm``) and PTX
``wgmma.mma_async`` count. ``benchmarks/gpu/kernels.py`` writes them to
``benchmarks/gpu/kernels.json``; ``test/test_triton_aot.py`` regenerates and
compares.

A compilation costs seconds; its entry is cached by content (the source's hash,
which covers the kernel's code, the signature, constexprs and attributes, with
the options, target and Triton version) under ``~/.cache/torch-moe-ops/triton-aot``
(``TORCH_MOE_OPS_CACHE`` overrides the root).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from . import experts as ex
from . import fp8 as f8
from . import grouped_mm as gm

TARGET = GPUTarget("cuda", 90, 32)  # sm_90a (Triton adds the "a" for 9.0)
NUM_SMS_H100 = 132  # the persistent grid of an H100 SXM (a runtime argument, not specialised)
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype
    layout: str
    make: Callable[[torch.dtype], tuple]  # dtype -> (mat_a, mat_b, offs, bias, out_dtype, a_index[, b_index])
    allow_tf32: bool = False
    tma: bool = False  # B through a TMA descriptor (what sm_90 picks for aligned 3-D weights)
    # or expert_gate_up, expert_down, expert_dgrad, expert_combine (triton/experts.py),
    # scaled_grouped_mm, quantize_fp8 (triton/fp8.py; make returns (args, kwargs) of their triton_* function)
    kernel: str = "grouped_mm"
    quant: Optional[str] = None  # expert_gate_up: act stored in float8 by this recipe (triton_expert_mlp_fp8)
    weighted: bool = False  # expert_combine: rows times their routing weights (triton_expert_mlp_fp8's combine)


def _offs(*ends):
    return torch.tensor(ends, dtype=torch.int32)


def _2d3d(dt):  # tokens (M, K) x experts' weights (G, K, N); M not a multiple of 16
    return (torch.zeros(250, 256, dtype=dt), torch.zeros(4, 256, 128, dtype=dt), _offs(50, 50, 200, 250),
            None, None, None)


def _2d3d_b_nk(dt):  # weights stored (G, N, K), passed as the transposed view (transformers' layout)
    return (torch.zeros(250, 256, dtype=dt), torch.zeros(4, 128, 256, dtype=dt).transpose(1, 2),
            _offs(50, 50, 200, 250), None, None, None)


def _2d3d_gather_bias(dt):  # grouped_mm_gather: rows of A by index, bias (G, N)
    return (torch.zeros(100, 256, dtype=dt), torch.zeros(4, 256, 128, dtype=dt), _offs(50, 50, 200, 250),
            torch.zeros(4, 128, dtype=dt), None, torch.zeros(250, dtype=torch.int64))


def _2d2d_gather(dt):  # grouped_mm_gather's 2D x 2D: K (the rows of the layer) gathered in A and B
    idx = torch.zeros(250, dtype=torch.int64)
    return (torch.zeros(100, 256, dtype=dt).t(), torch.zeros(100, 128, dtype=dt), _offs(50, 50, 200, 250),
            None, None, idx, idx)


def _2d3d_out_fp32(dt):
    a, b, offs, _, _, _ = _2d3d(dt)
    return a, b, offs, torch.zeros(4, 128, dtype=torch.float32), torch.float32, None


def _3d2d(dt):  # offs splits N
    return (torch.zeros(4, 128, 256, dtype=dt), torch.zeros(256, 256, dtype=dt), _offs(64, 64, 200, 256),
            None, None, None)


def _2d2d(dt):  # the weight gradient: X^T (a transposed view) x dY, offs splits the tokens
    return (torch.zeros(250, 256, dtype=dt).t(), torch.zeros(250, 128, dtype=dt), _offs(50, 50, 200, 250),
            None, None, None)


def _3d3d(dt):
    return torch.zeros(4, 128, 256, dtype=dt), torch.zeros(4, 256, 128, dtype=dt), None, None, None, None


_LAYOUT_MAKERS = {"2d3d": _2d3d, "2d3d_b_nk": _2d3d_b_nk, "2d3d_gather_bias": _2d3d_gather_bias,
                  "2d3d_out_fp32": _2d3d_out_fp32, "3d2d": _3d2d, "2d2d": _2d2d, "2d2d_gather": _2d2d_gather,
                  "3d3d": _3d3d}


def grouped_mm_variants() -> list:
    """bfloat16 (the MoE dtype) in every layout and option, with the weights
    through TMA where the kernel can (sm_90's choice for aligned weights) and
    through pointers (unaligned weights, other GPUs); float16 and float32 in the
    main layout (2D x 3D); float32 with and without tf32; float64 (tests and
    gradcheck on a GPU: the ops take it) in 2D x 3D."""
    out = [Variant(f"bf16_{n}", torch.bfloat16, n, f) for n, f in _LAYOUT_MAKERS.items()]
    out += [Variant(f"bf16_{n}_tma", torch.bfloat16, n, _LAYOUT_MAKERS[n], tma=True)
            for n in ("2d3d", "2d3d_b_nk", "2d3d_gather_bias", "3d3d")]
    out.append(Variant("fp16_2d3d", torch.float16, "2d3d", _2d3d))
    out.append(Variant("fp32_2d3d", torch.float32, "2d3d", _2d3d))
    out.append(Variant("fp32_2d3d_tf32", torch.float32, "2d3d", _2d3d, allow_tf32=True))
    out.append(Variant("fp64_2d3d", torch.float64, "2d3d", _2d3d))
    out.append(Variant("fp64_2d3d_tma", torch.float64, "2d3d", _2d3d, tma=True))
    return out


def _experts(activation="swiglu", interleaved=False, bias=False, k_major=False):
    """dtype -> (triton_expert_mlp's args, kwargs): 64 tokens, H = 256, I = 128,
    4 experts, top_k 2 (R = 128 rows); weights stored (E, N, K) when k_major
    (transformers' layout, passed transposed)."""
    def make(dt):
        T, H, inter, E, k = 64, 256, 128, 4, 2
        n1 = 2 * inter if activation in ("swiglu", "geglu", "swiglu_clamped") else inter
        if k_major:
            gate_up, down = torch.zeros(E, n1, H, dtype=dt).mT, torch.zeros(E, H, inter, dtype=dt).mT
        else:
            gate_up, down = torch.zeros(E, H, n1, dtype=dt), torch.zeros(E, inter, H, dtype=dt)
        src_rows, dst_rows = torch.zeros(T * k, dtype=torch.int64), torch.zeros(T, k, dtype=torch.int64)
        args = (torch.zeros(T, H, dtype=dt), src_rows, _offs(32, 32, 96, 128), dst_rows,
                torch.zeros(T, k, dtype=torch.float32), gate_up, down)
        kwargs = dict(activation=activation, gate_up_interleaved=interleaved)
        if bias:
            kwargs.update(gate_up_bias=torch.zeros(E, n1, dtype=dt), down_bias=torch.zeros(E, H, dtype=dt))
        return args, kwargs
    return make


def expert_mlp_variants() -> list:
    """The fused experts' kernels: the gate/up GEMM for every activation
    epilogue kind (split and interleaved gated, not gated), the down GEMM, the
    backward's dgrad (the activation's derivative in the epilogue), the
    combine; bfloat16 with TMA (split gate/up, weights stored (E, N, K)) and
    pointers, float16 and float32 (exact; tf32 for gate/up), float64."""
    sw, sw_tma = _experts(), _experts(k_major=True)
    clamped = _experts("swiglu_clamped", interleaved=True, bias=True, k_major=True)
    out = [
        Variant("bf16_swiglu", torch.bfloat16, "2d3d", sw, kernel="expert_gate_up"),
        Variant("bf16_swiglu_tma", torch.bfloat16, "2d3d", sw_tma, kernel="expert_gate_up", tma=True),
        Variant("bf16_swiglu_clamped_interleaved_bias", torch.bfloat16, "2d3d", clamped, kernel="expert_gate_up"),
        Variant("bf16_geglu", torch.bfloat16, "2d3d", _experts("geglu"), kernel="expert_gate_up"),
        Variant("bf16_gelu", torch.bfloat16, "2d3d", _experts("gelu"), kernel="expert_gate_up"),
        Variant("bf16_down_bias", torch.bfloat16, "2d3d", clamped, kernel="expert_down"),
        Variant("bf16_down_tma", torch.bfloat16, "2d3d", sw_tma, kernel="expert_down", tma=True),
        Variant("fp16_swiglu", torch.float16, "2d3d", sw, kernel="expert_gate_up"),
        Variant("fp16_down", torch.float16, "2d3d", sw, kernel="expert_down"),
        Variant("fp32_swiglu", torch.float32, "2d3d", sw, kernel="expert_gate_up"),
        Variant("fp32_swiglu_tf32", torch.float32, "2d3d", sw, kernel="expert_gate_up", allow_tf32=True),
        Variant("fp32_down", torch.float32, "2d3d", sw, kernel="expert_down"),
        Variant("bf16_swiglu_dgrad", torch.bfloat16, "2d3d", sw, kernel="expert_dgrad"),
        Variant("bf16_swiglu_dgrad_tma", torch.bfloat16, "2d3d", sw_tma, kernel="expert_dgrad", tma=True),
        Variant("bf16_swiglu_clamped_interleaved_dgrad", torch.bfloat16, "2d3d", clamped, kernel="expert_dgrad"),
        Variant("bf16_gelu_dgrad", torch.bfloat16, "2d3d", _experts("gelu"), kernel="expert_dgrad"),
        Variant("fp16_swiglu_dgrad", torch.float16, "2d3d", sw, kernel="expert_dgrad"),
        Variant("fp32_swiglu_dgrad", torch.float32, "2d3d", sw, kernel="expert_dgrad"),
        Variant("bf16_combine", torch.bfloat16, "", sw, kernel="expert_combine"),
        Variant("fp32_combine", torch.float32, "", sw, kernel="expert_combine"),
        # The gate/up GEMM storing act in float8 for the fp8 down GEMM (triton_expert_mlp_fp8).
        Variant("bf16_swiglu_fp8_1x128", torch.bfloat16, "2d3d", sw, kernel="expert_gate_up",
                quant="blockwise_1x128"),
        Variant("bf16_swiglu_fp8_1x128_tma", torch.bfloat16, "2d3d", sw_tma, kernel="expert_gate_up", tma=True,
                quant="blockwise_1x128"),
        Variant("bf16_swiglu_clamped_interleaved_bias_fp8_1x128", torch.bfloat16, "2d3d", clamped,
                kernel="expert_gate_up", quant="blockwise_1x128"),
        Variant("bf16_swiglu_fp8_mx_tma", torch.bfloat16, "2d3d", sw_tma, kernel="expert_gate_up", tma=True,
                quant="mx"),
        Variant("bf16_gelu_fp8_mx", torch.bfloat16, "2d3d", _experts("gelu"), kernel="expert_gate_up", quant="mx"),
        Variant("bf16_swiglu_fp8_rowwise_tma", torch.bfloat16, "2d3d", sw_tma, kernel="expert_gate_up", tma=True,
                quant="rowwise"),
        Variant("fp32_swiglu_fp8_1x128", torch.float32, "2d3d", sw, kernel="expert_gate_up",
                quant="blockwise_1x128"),
        Variant("bf16_combine_weighted", torch.bfloat16, "", sw, kernel="expert_combine", weighted=True),
        Variant("fp64_swiglu", torch.float64, "2d3d", sw, kernel="expert_gate_up"),
        Variant("fp64_down", torch.float64, "2d3d", sw, kernel="expert_down"),
        Variant("fp64_swiglu_dgrad", torch.float64, "2d3d", sw, kernel="expert_dgrad"),
        Variant("fp64_combine", torch.float64, "", sw, kernel="expert_combine"),
    ]
    return out


_E4M3, _E5M2, _E8M0 = torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu


def _f8(*shape, dtype=_E4M3):
    return torch.zeros(*shape).to(dtype)


def _e8m0(*shape):
    return torch.zeros(*shape, dtype=torch.uint8).view(_E8M0)


def _scaled(recipe: str, layout: str, b_nk: bool = True, bias: bool = False, out_dtype=None, b_dtype=None,
            quantize_out=None):
    """dtype -> triton_scaled_grouped_mm's (args, kwargs), the MoE shapes of the
    16-bit variants (M = 250 tokens, K = 256, N = 128, 4 experts), scales in the
    layouts the op takes (mx: A blocked per group of rows, 3-D B swizzled)."""
    def make(dt):
        M, K, N, G = 250, 256, 128, 4
        offs = _offs(50, 50, 200, 250)
        bt = b_dtype or dt
        w = _f8(G, N, K, dtype=bt).transpose(1, 2) if b_nk else _f8(G, K, N, dtype=bt)
        kb, nb, s = K // 128, N // 128, K // 32
        if layout == "2d3d":
            a = _f8(M, K, dtype=dt)
            sa, sb = {"rowwise": (torch.ones(M), torch.ones(G, N)),
                      "blockwise": (torch.ones(M, kb), torch.ones(G, nb, kb)),
                      "mx": (_e8m0(M + 128 * G, s), _e8m0(G, N * s))}[recipe]
            args = (a, w, sa, sb, offs)
        elif layout == "3d3d":
            a = _f8(G, 128, K, dtype=dt)
            sa, sb = {"rowwise": (torch.ones(G, 128), torch.ones(G, N)),
                      "blockwise": (torch.ones(G, 128, kb), torch.ones(G, nb, kb)),
                      "mx": (_e8m0(G, 128, s), _e8m0(G, N, s))}[recipe]
            args = (a, w, sa, sb, None)
        elif layout == "3d2d":  # rowwise only: offs splits N
            args = (_f8(G, 128, K, dtype=dt), _f8(256, K, dtype=dt).t(), torch.ones(G, 128), torch.ones(256),
                    _offs(64, 64, 200, 256))
        else:  # 2d2d, the weight gradient: dY^T (N, tokens) x X (tokens, K), offs splits the tokens
            toks = _offs(64, 64, 192, 256)
            a, b = _f8(N, 256, dtype=dt), _f8(K, 256, dtype=dt).t()
            if recipe == "rowwise":
                sa, sb = torch.ones(G * N), torch.ones(G * K)
            else:  # blocked per group along the tokens: round_up(rows, 128) x (S + 4 G)
                sa, sb = _e8m0(128, 8 + 4 * G), _e8m0(256, 8 + 4 * G)
            args = (a, b, sa, sb, toks)
        n_out = {"3d2d": 256, "2d2d": K}.get(layout, N)
        kwargs = dict(bias=torch.zeros(G, n_out) if bias else None, out_dtype=out_dtype)
        if quantize_out:
            kwargs["quantize_out"] = quantize_out
        return args, kwargs
    return make


def scaled_grouped_mm_variants() -> list:
    """The fp8 GEMM: rowwise in the four layouts (2D x 3D with B by TMA from
    either storage order, (G, N, K) being the one fp8 wgmma reads without a
    transpose, and by pointers; e5m2; bias and float32 out); DeepSeek-V3
    blockwise and MX in 2D x 3D (TMA) and 3D x 3D; MX in 2D x 2D (the weight
    gradient)."""
    V = Variant
    out = [
        V("fp8_rowwise_2d3d_tma", _E4M3, "2d3d", _scaled("rowwise", "2d3d"), kernel="scaled_grouped_mm", tma=True),
        V("fp8_rowwise_2d3d_b_kn", _E4M3, "2d3d", _scaled("rowwise", "2d3d", b_nk=False), kernel="scaled_grouped_mm"),
        V("fp8_rowwise_2d3d_b_kn_tma", _E4M3, "2d3d", _scaled("rowwise", "2d3d", b_nk=False),
          kernel="scaled_grouped_mm", tma=True),
        V("fp8_rowwise_2d3d_e5m2_bias_out_fp32_tma", _E5M2, "2d3d",
          _scaled("rowwise", "2d3d", bias=True, out_dtype=torch.float32), kernel="scaled_grouped_mm", tma=True),
        V("fp8_rowwise_2d3d_e4m3_e5m2_tma", _E4M3, "2d3d", _scaled("rowwise", "2d3d", b_dtype=_E5M2),
          kernel="scaled_grouped_mm", tma=True),
        V("fp8_rowwise_3d2d", _E4M3, "3d2d", _scaled("rowwise", "3d2d"), kernel="scaled_grouped_mm"),
        V("fp8_rowwise_2d2d", _E4M3, "2d2d", _scaled("rowwise", "2d2d"), kernel="scaled_grouped_mm"),
        V("fp8_rowwise_3d3d_tma", _E4M3, "3d3d", _scaled("rowwise", "3d3d"), kernel="scaled_grouped_mm", tma=True),
        V("fp8_blockwise_2d3d_tma", _E4M3, "2d3d", _scaled("blockwise", "2d3d"), kernel="scaled_grouped_mm",
          tma=True),
        V("fp8_blockwise_2d3d_b_kn_tma", _E4M3, "2d3d", _scaled("blockwise", "2d3d", b_nk=False),
          kernel="scaled_grouped_mm", tma=True),
        V("fp8_blockwise_3d3d_tma", _E4M3, "3d3d", _scaled("blockwise", "3d3d"), kernel="scaled_grouped_mm",
          tma=True),
        V("fp8_mx_2d3d_tma", _E4M3, "2d3d", _scaled("mx", "2d3d"), kernel="scaled_grouped_mm", tma=True),
        V("fp8_mx_3d3d_tma", _E4M3, "3d3d", _scaled("mx", "3d3d"), kernel="scaled_grouped_mm", tma=True),
        V("fp8_mx_2d2d", _E4M3, "2d2d", _scaled("mx", "2d2d"), kernel="scaled_grouped_mm"),
        # The output quantised in the epilogue for the next GEMM.
        V("fp8_blockwise_2d3d_quant_out_1x128_tma", _E4M3, "2d3d",
          _scaled("blockwise", "2d3d", quantize_out="blockwise_1x128"), kernel="scaled_grouped_mm", tma=True),
        V("fp8_rowwise_2d3d_quant_out_mx_tma", _E4M3, "2d3d", _scaled("rowwise", "2d3d", quantize_out="mx"),
          kernel="scaled_grouped_mm", tma=True),
        V("fp8_mx_2d3d_quant_out_mx_tma", _E4M3, "2d3d", _scaled("mx", "2d3d", quantize_out="mx"),
          kernel="scaled_grouped_mm", tma=True),
    ]
    return out


def _quantize(recipe: str, shape=(250, 256), transposed=False, **kwargs):
    """dtype -> triton_quantize_fp8's (args, kwargs) for x of dtype (a weight
    (G, K, N) quantised per output column when transposed)."""
    def make(dt):
        x = torch.zeros(*shape, dtype=dt)
        return (x.transpose(-2, -1) if transposed else x, recipe), dict(kwargs)
    return make


def quantize_fp8_variants() -> list:
    """The quantiser for every recipe (bfloat16 in, e4m3 out), rowwise and
    tensorwise per group of columns (offs), e5m2, MX swizzled, a transposed
    3-D weight, float32 in."""
    V = Variant
    q = "quantize_fp8"
    return [
        V("bf16_tensorwise", torch.bfloat16, "", _quantize("tensorwise"), kernel=q),
        V("bf16_tensorwise_offs", torch.bfloat16, "", _quantize("tensorwise", offs=_offs(64, 64, 200)), kernel=q),
        V("bf16_rowwise", torch.bfloat16, "", _quantize("rowwise"), kernel=q),
        V("bf16_rowwise_offs", torch.bfloat16, "", _quantize("rowwise", offs=_offs(64, 64, 200)), kernel=q),
        V("bf16_rowwise_e5m2", torch.bfloat16, "", _quantize("rowwise", float8_dtype=_E5M2), kernel=q),
        V("bf16_blockwise_1x128", torch.bfloat16, "", _quantize("blockwise_1x128"), kernel=q),
        V("bf16_blockwise_128x128_weight_transposed", torch.bfloat16, "",
          _quantize("blockwise_128x128", (4, 256, 128), transposed=True), kernel=q),
        V("bf16_mx", torch.bfloat16, "", _quantize("mx"), kernel=q),
        V("bf16_mx_swizzle", torch.bfloat16, "", _quantize("mx", swizzle=True), kernel=q),
        V("fp32_rowwise", torch.float32, "", _quantize("rowwise"), kernel=q),
    ]


def fp8_variants() -> list:
    return scaled_grouped_mm_variants() + quantize_fp8_variants()


def all_variants() -> list:
    return grouped_mm_variants() + expert_mlp_variants() + fp8_variants()


def configs_for_variant(variant: Variant) -> list:
    """Every configuration the variant's autotuner may pick (the combine has one)."""
    if variant.kernel == "grouped_mm":
        return gm.configs_for(variant.dtype)
    if variant.kernel == "scaled_grouped_mm":
        bound = _fp8_source_args(variant)[1]
        return f8.configs_for(bound["SCALE"], bound["LAYOUT"])
    if variant.kernel == "quantize_fp8":
        return [f8.QUANT_CONFIGS[variant.make(variant.dtype)[0][1]]]
    if variant.kernel == "expert_combine":
        return [ex.COMBINE_CONFIG]
    return ex.configs_for(variant.dtype, {"expert_gate_up": 0, "expert_down": 1, "expert_dgrad": 2}[variant.kernel],
                          ex.QUANT_RECIPES[variant.quant] if variant.quant else 0)


def kernel_name(variant: Variant) -> str:
    return {"grouped_mm": "grouped_mm_kernel", "expert_combine": "combine_kernel",
            "scaled_grouped_mm": "scaled_grouped_mm_kernel", "quantize_fp8": "quantize_fp8_kernel"}.get(
        variant.kernel, "expert_gemm_kernel")


def _bind(kernel, args: dict, config: triton.Config):
    """What a CUDA launch would compile: (ASTSource, options)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    launch_opts = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    params, spec, opts = binder(**args, **config.kwargs, **launch_opts)
    _, signature, constexprs, attrs = kernel._pack_args(backend, opts, params, spec, opts)
    return triton.compiler.ASTSource(kernel, signature, constexprs, attrs), launch_opts


def _fp8_source_args(variant: Variant) -> tuple:
    """(kernel, bound arguments) of an fp8 variant, from the launchers' own _prepare."""
    args, kwargs = variant.make(variant.dtype)
    if variant.kernel == "quantize_fp8":
        return f8.quantize_fp8_kernel, f8._prepare_quantize(*args, **kwargs)[2]
    _, bound = f8._prepare_scaled(*args, kwargs.get("bias"), None, kwargs.get("out_dtype"), tma=variant.tma,
                                  quantize_out=kwargs.get("quantize_out"))
    assert bool(bound["B_DESC"]) == variant.tma, variant
    bound["num_programs"] = NUM_SMS_H100
    return f8.scaled_grouped_mm_kernel, bound


def variant_source(variant: Variant, config: triton.Config):
    if variant.kernel in ("scaled_grouped_mm", "quantize_fp8"):
        return _bind(*_fp8_source_args(variant), config)
    if variant.kernel != "grouped_mm":
        return _expert_source(variant, config)
    mat_a, mat_b, offs, bias, out_dtype, a_index, b_index = (variant.make(variant.dtype) + (None,))[:7]
    gather = a_index is not None or b_index is not None
    _, args = gm._prepare(mat_a, mat_b, offs, bias, out_dtype, a_index, b_index, gather, tma=variant.tma)
    args["INPUT_PRECISION"] = "tf32" if variant.allow_tf32 else "ieee"
    args["num_programs"] = NUM_SMS_H100
    return _bind(gm.grouped_mm_kernel, args, config)


def _expert_source(variant: Variant, config: triton.Config):
    args, kwargs = variant.make(variant.dtype)
    tokens, src_rows, offs, dst_rows, weights, gate_up, down = args
    out, h, act, slot_rows = ex._allocate(tokens, src_rows, dst_rows, gate_up, down)
    if variant.kernel == "expert_combine":
        if variant.weighted:  # triton_expert_mlp_fp8's: the down GEMM's fp32 rows by dst_rows, times the weights
            return _bind(ex.combine_kernel, ex.combine_args(torch.zeros(src_rows.shape[0], tokens.shape[1]), dst_rows,
                                                            out, by_dst=True, weights=weights), config)
        return _bind(ex.combine_kernel, ex.combine_args(slot_rows, dst_rows, out), config)
    kw = {**dict(gate_up_bias=None, down_bias=None, gate_up_interleaved=False, swiglu_alpha=1.702, swiglu_limit=7.0),
          **kwargs}
    if variant.quant:
        bound = ex._gate_up_fp8(tokens, src_rows, offs, dst_rows, gate_up, down.shape[1], kw["gate_up_bias"],
                                kw["activation"], kw["gate_up_interleaved"], kw["swiglu_alpha"], kw["swiglu_limit"],
                                variant.quant, torch.float8_e4m3fn, False, "args", None, variant.tma, None)
        assert bool(bound["B_DESC"]) == variant.tma, variant
        bound["INPUT_PRECISION"] = "tf32" if variant.allow_tf32 else "ieee"
        bound["num_programs"] = NUM_SMS_H100
        return _bind(ex.expert_gemm_kernel, bound, config)
    stage = {"expert_gate_up": 0, "expert_down": 1, "expert_dgrad": 2}[variant.kernel]
    dw = torch.zeros(src_rows.shape[0], 2, dtype=ex._acc(variant.dtype))
    bound = ex.stage_args(stage, tokens, src_rows, offs, dst_rows, weights, gate_up, down, kw["gate_up_bias"],
                          kw["down_bias"], kw["activation"], kw["gate_up_interleaved"], kw["swiglu_alpha"],
                          kw["swiglu_limit"], h, act, slot_rows, tma=variant.tma, grad_out=torch.zeros_like(tokens),
                          dh=torch.empty_like(h), dw=dw)
    assert bool(bound["B_DESC"]) == variant.tma, variant
    bound["INPUT_PRECISION"] = "tf32" if variant.allow_tf32 else "ieee"
    bound["num_programs"] = NUM_SMS_H100
    return _bind(ex.expert_gemm_kernel, bound, config)


def _cache_dir() -> Path:
    root = Path(os.environ.get("TORCH_MOE_OPS_CACHE", Path.home() / ".cache" / "torch-moe-ops"))
    return root / "triton-aot"


def _run(tool: str, *args) -> str:
    return subprocess.run([str(_BIN / tool), *map(str, args)], capture_output=True, text=True, check=True).stdout


def ptxas_version() -> str:
    return _run("ptxas", "--version").strip().splitlines()[-1]


# Version of the entries' fields (2: QGMMA counted), part of the cache key.
_ANALYSIS = 2
_SASS_OP = re.compile(r"^\S+\t(?:@!?U?P\w+ )?([A-Z][A-Z0-9_]*)[.\s;]", re.M)


def _analyse(compiled, ptxas_log: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = _run("cuobjdump", "-res-usage", f.name)
    usage = dict(re.findall(r"(\w+):(\d+)", res.split("Function", 1)[1]))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    ops = _SASS_OP.findall(compiled.asm["sass"])
    ops = [o for o in ops if o != "NOP"]
    count = lambda name: sum(1 for o in ops if o == name)  # noqa: E731
    return {
        "regs": int(usage["REG"]),
        "ptxas_regs": int(regs.group(1)),
        "spill_stores": int(spill.group(1)),
        "spill_loads": int(spill.group(2)),
        "stack": int(usage["STACK"]),
        "local": int(usage["LOCAL"]),
        "smem_dynamic": compiled.metadata.shared,
        "smem_static": int(usage["SHARED"]),
        "global_scratch": compiled.metadata.global_scratch_size,
        "sass_instructions": len(ops),
        "HGMMA": count("HGMMA"),
        "QGMMA": count("QGMMA"),
        "HMMA": count("HMMA"),
        "FFMA": count("FFMA"),
        "DMMA": count("DMMA"),
        "DFMA": count("DFMA"),
        "UTMALDG": count("UTMALDG"),
        "LDGSTS": count("LDGSTS"),
        "LDL_STL": count("LDL") + count("STL"),
        "ptx_wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
    }


def compile_source(src, options: dict) -> tuple:
    """(compiled kernel, ptxas log). Compiles in a private Triton cache so that
    ptxas runs and its log is seen (a cache hit would skip it)."""
    buf = io.StringIO()
    with tempfile.TemporaryDirectory() as d, triton.knobs.cache.scope(), triton.knobs.nvidia.scope():
        triton.knobs.cache.dir = d
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(src, target=TARGET, options=options)
        compiled.asm["sass"]  # nvdisasm while the files exist
    return compiled, buf.getvalue()


def compile_entry(variant: Variant, config: triton.Config, use_cache: bool = True, keep: Optional[dict] = None) -> dict:
    """The report entry of one (variant, config), cached by content. ``keep``
    receives the PTX and SASS when compiled (tests inspect them)."""
    src, options = variant_source(variant, config)
    key = hashlib.sha256(json.dumps([src.hash(), options, str(TARGET), triton.__version__, _ANALYSIS])
                         .encode()).hexdigest()[:24]
    path = _cache_dir() / f"{variant.kernel}-{key}.json"
    if use_cache and keep is None and path.exists():
        return json.loads(path.read_text())
    compiled, log = compile_source(src, options)
    entry = {
        "kernel": kernel_name(variant),
        "variant": variant.name,
        "dtype": str(variant.dtype).replace("torch.", ""),
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        **_analyse(compiled, log),
    }
    if keep is not None:
        keep.update(ptx=compiled.asm["ptx"], sass=compiled.asm["sass"], ptxas_log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(entry))
    tmp.replace(path)
    return entry


def all_entries(use_cache: bool = True) -> list:
    """Every variant in every configuration its autotuner may pick."""
    return [compile_entry(v, c, use_cache) for v in all_variants() for c in configs_for_variant(v)]


def report(use_cache: bool = True) -> dict:
    return {
        "about": "Triton kernels compiled ahead of time for sm_90a (no GPU): per kernel variant and autotuner "
                 "configuration, registers, spills, shared memory (bytes) and SASS instruction counts. "
                 "Regenerate: python benchmarks/gpu/kernels.py (test/test_triton_aot.py compares).",
        "target": "sm_90a",
        "triton": triton.__version__,
        "ptxas": ptxas_version(),
        "kernels": all_entries(use_cache),
    }

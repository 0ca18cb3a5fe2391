"""The Triton kernels as the CUDA kernels of ``moe_ops`` ops whose schemas C++
defines (csrc/library.cpp, from native_functions.yaml; the yaml's
``CUDA: py:torch_moe_ops.triton.cuda`` says this module registers the kernel).

Two registrations per op, both made by :func:`register_cuda_kernel`:

* the dispatcher's CUDA slot: a Python kernel that calls the ``triton_<op>``
  function, which launches the compiled (autotuned) Triton kernels on CUDA
  tensors. On CPU tensors (``test/test_cuda_entries.py`` calls the slot through
  ``redispatch(DispatchKey.CUDA)``) the same function runs the kernels in
  Triton's interpreter.
* a rule for ``FunctionalTensorMode``, the mode in which torch.compile's AOT
  dispatcher traces (forward and backward): on CUDA tensors the op decomposes
  into the same function with its kernels wrapped by
  ``torch.library.wrap_triton``, so the graph Inductor receives holds the
  Triton kernels themselves (``triton_kernel_wrapper_functional``, compiled as
  user-defined Triton kernels), not an opaque call. This is the mechanism
  ``torch.library.triton_op`` uses for the ops it defines; here it is applied to
  ops defined elsewhere. On other devices, and under ``torch.export``
  (which keeps custom Triton ops whole, as ``triton_op`` does), the op stays
  one node.

The eager kernel and the traced decomposition first run the same value checks
as the former C++ CUDA entries: device-side asserts (``torch._assert_async``, no
host sync) on ``offs``, the gather indices and the routing maps, with the
messages of the CPU kernels' checks.

Wiring another op is one line, e.g. ``register_cuda_kernel("scaled_grouped_mm",
"fp8:triton_scaled_grouped_mm")``: the function (``module:name`` in this
package, imported on the first call, or a callable) must take the op's
arguments positionally and a ``_wrap`` keyword through which it passes every
kernel it launches (the convention of every ``triton_<op>`` here), and the op's
C++ ``m.impl`` at the CUDA key must be removed.

Registering imports no kernel module: ``import torch_moe_ops`` stays light, and
the first call on CUDA tensors (or the first trace) imports it.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional, Union

import torch

from .. import _checks

# Op name -> (value checks, Triton function or its "module:name"); what register_cuda_kernel registered.
REGISTERED: dict[str, tuple[Optional[Callable], Union[Callable, str]]] = {}

_LIB: Optional[torch.library.Library] = None


def _library() -> torch.library.Library:
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("moe_ops", "IMPL")  # noqa: TOR901 (kept alive by this module)
    return _LIB


def _first_tensor(args) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


@functools.lru_cache(maxsize=None)
def _resolve(spec: str) -> Callable:
    """"module:name" in this package, imported on first use."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def register_cuda_kernel(op: str, fn: Union[Callable, str], checks: Optional[Callable] = None) -> None:
    """Makes ``fn`` (a ``triton_<op>`` function, or its ``"module:name"`` in this
    package) the CUDA kernel of ``moe_ops::<op>``, seen by torch.compile as its
    Triton kernels. ``checks`` (same arguments) runs first: value checks that
    need the device."""
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
    from torch._subclasses.fake_tensor import FakeTensor

    def run(*args, **kwargs):
        return (fn if callable(fn) else _resolve(fn))(*args, **kwargs)

    # The dispatcher passes positional arguments (trailing defaults dropped) and keyword-only ones by name.
    def kernel(*args, **kwargs):
        if checks is not None:
            checks(*args, **kwargs)
        device = _first_tensor(args).device
        # Triton launches on the current device; a C++ kernel would get this guard from the dispatcher.
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return run(*args, **kwargs)
        return run(*args, **kwargs)

    def traced(*args, **kwargs):
        if checks is not None:
            checks(*args, **kwargs)
        return run(*args, **kwargs, _wrap=torch.library.wrap_triton)

    def functional_rule(mode, func, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented  # another tensor subclass: let it handle the op
        schema_args, schema_kwargs = torch._library.utils.fill_defaults(func._schema, args, kwargs)
        if custom_triton_ops_decomposition_disabled() or _first_tensor(schema_args).device.type != "cuda":
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:
            return traced(*schema_args, **schema_kwargs)

    lib = _library()
    lib.impl(op, kernel, "CUDA")
    torch.library.register_torch_dispatch(f"moe_ops::{op}", FunctionalTensorMode, functional_rule, lib=lib)
    REGISTERED[op] = (checks, fn)


# ------------------------------------------------------------ value checks
# The former C++ CUDA entries' device-side asserts, restated.


def _offs_ok(offs: torch.Tensor, extent: int) -> torch.Tensor:
    """Whether offs is non-negative, non-decreasing and at most extent: a 0-dim
    bool tensor on offs's device (no host sync)."""
    o = offs.long()
    return o.ge(0).all() & o.diff().ge(0).all() & o.le(extent).all()


def _split_size(mat_a: torch.Tensor, mat_b: torch.Tensor) -> int:
    """The extent of the dimension offs splits."""
    return {"2d3d": lambda: mat_a.shape[0], "3d2d": lambda: mat_b.shape[1], "2d2d": lambda: mat_a.shape[1],
            "3d3d": lambda: 0}[_checks.grouped_mm_layout(mat_a, mat_b)]()


def _assert_offs(mat_a, mat_b, offs, op: str = "grouped_mm") -> None:
    if offs is not None and offs.numel() > 0:
        torch._assert_async(_offs_ok(offs, _split_size(mat_a, mat_b)),
                            f"{op}: offs must be non-negative, non-decreasing and at most the grouped dimension")


def check_grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None) -> None:
    _checks.check_grouped_mm_inputs(mat_a, mat_b, offs, bias, out_dtype)
    _assert_offs(mat_a, mat_b, offs)


def check_grouped_mm_gather(mat_a, mat_b, offs, a_index=None, b_index=None, bias=None, out_dtype=None) -> None:
    a, b, _ = _checks.check_grouped_mm_gather_inputs(mat_a, mat_b, offs, a_index, b_index, bias, out_dtype)
    for name, index, size in (("a_index", a_index, mat_a.shape[_checks.grouped_mm_gather_dim(True, mat_b)]),
                              ("b_index", b_index, mat_b.shape[0])):
        if index is not None and index.numel() > 0:
            torch._assert_async((index.ge(-1) & index.lt(size)).all(),
                                f"grouped_mm_gather: {name} has an entry out of range [-1, {size})")
    _assert_offs(a, b, offs)


def check_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None,
                            out_dtype=None, use_fast_accum=False) -> None:
    _checks.check_scaled_grouped_mm_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype)
    # CPU tensors (the interpreter): the Triton function checks offs's values with the CPU kernel's messages.
    if offs is None or offs.numel() == 0 or offs.device.type == "cpu":
        return
    layout = _checks.grouped_mm_layout(mat_a, mat_b)
    if layout == "3d3d":
        return
    _assert_offs(mat_a, mat_b, offs, "scaled_grouped_mm")
    if layout == "2d2d" and scale_a.dtype == torch.float8_e8m0fnu:
        o, extent = offs.long(), _split_size(mat_a, mat_b)
        torch._assert_async((o.remainder(32).eq(0) | o.eq(extent)).all(),
                            "scaled_grouped_mm: with mx scales every group of K must hold whole 32-element blocks: "
                            f"offs must be multiples of 32 or K={extent}")
    if scale_a.dtype == torch.float8_e8m0fnu:
        assert_mx_blocked_scales(mat_a, mat_b, scale_a, scale_b, offs)


def mx_blocked_bytes_needed(offs: torch.Tensor, rows: int, s: int, dim: int) -> torch.Tensor:
    """1 + the last byte the scaled GEMM reads of an mx scale blocked per group
    (swizzle_mx_scale's layout, fp8.py's _blocked_bytes_read) as a 0-dim int64
    tensor on offs's device, computed from offs without a host sync. dim 0:
    groups of the ``rows`` rows of a 2D x 3D A, each with the ``s`` columns of
    K's 32-blocks; dim 1: groups of K's 32-blocks (2D x 2D), each over every
    row. The swizzled offset of (r, c) is a sum of a row term and an increasing
    column term, so a group's largest offset is its largest row term (in its
    last 128-row block) plus the term of its last column."""
    o = offs.long()
    starts = torch.cat([o.new_zeros(1), o[:-1]])

    def row_term(r, block_stride):  # the largest row term over rows [0, r), r >= 1
        q = (r - 1) % 128  # the last 128-block's rows 0..q; 16 * (x % 32) + 4 * ((x % 128) // 32) peaks at x % 32 = 31
        inner = torch.where(q >= 31, 496 + 4 * torch.div(q - 31, 32, rounding_mode="floor"), 16 * q)
        return torch.div(r - 1, 128, rounding_mode="floor") * block_stride + inner

    def col_term(c):  # ((c - 1) // 4) * 512 + (c - 1) % 4, c >= 1
        return torch.div(c - 1, 4, rounding_mode="floor") * 512 + (c - 1) % 4

    if dim == 0:
        sp = -(-s // 4) * 4
        r = o - starts
        held = (r > 0) & (s > 0)
        step = torch.div(r + 127, 128, rounding_mode="floor") * 128 * sp
        last = row_term(r.clamp(min=1), (sp // 4) * 512) + col_term(o.new_full(r.shape, max(s, 1)))
    else:
        c0 = torch.div(starts, 32, rounding_mode="floor")
        c = torch.div(o + 31, 32, rounding_mode="floor") - c0
        sp = torch.div(c + 3, 4, rounding_mode="floor") * 4
        held = (c > 0) & (rows > 0)
        step = -(-rows // 128) * 128 * sp
        last = row_term(o.new_full(c.shape, max(rows, 1)), torch.div(sp, 4, rounding_mode="floor") * 512) + col_term(
            c.clamp(min=1))
    base = torch.cumsum(step, 0) - step
    return torch.where(held, base + last + 1, 0).max() if o.numel() else o.new_zeros(())


def assert_mx_blocked_scales(mat_a, mat_b, scale_a, scale_b, offs) -> None:
    """The CPU check that a blocked mx scale holds enough bytes for its operand
    (fp8.py's _check_offs_values, same message less the count, which only offs's
    values give), as device-side asserts: 2D x 3D's scale_a, 2D x 2D's both."""
    layout = _checks.grouped_mm_layout(mat_a, mat_b)
    if offs is None or offs.numel() == 0 or layout not in ("2d3d", "2d2d"):
        return
    s = -(-mat_a.shape[-1] // 32)
    blocked = [(scale_a, mat_a.shape[0])] + ([(scale_b, mat_b.shape[1])] if layout == "2d2d" else [])
    for scale, rows in blocked:
        need = mx_blocked_bytes_needed(offs, rows, s, 0 if layout == "2d3d" else 1)
        torch._assert_async(need.le(scale.numel()), _checks.mx_blocked_scale_message(scale))


def _check_routing(tokens, src_rows, offs, dst_rows) -> None:
    """src_rows in [-1, T * k), dst_rows in [-1, R), offs non-decreasing in
    [0, R], and the two maps inverse of each other (permute's outputs)."""
    rows, top_k = src_rows.shape[0], dst_rows.shape[1]
    slots = tokens.shape[0] * top_k
    torch._assert_async((src_rows.ge(-1) & src_rows.lt(slots)).all(),
                        "expert_mlp: src_rows must be -1 or token * top_k + slot in [0, tokens * top_k)")
    torch._assert_async((dst_rows.ge(-1) & dst_rows.lt(rows)).all(),
                        "expert_mlp: dst_rows must be -1 or a row in [0, src_rows.size(0))")
    if offs.numel() > 0:
        torch._assert_async(_offs_ok(offs, rows),
                            "expert_mlp: offs must be non-decreasing, non-negative and at most src_rows.size(0)")
    # Each map read through the other, with a sentinel (-2, never a valid entry) past the end for
    # entries out of range, so that no read faults and an out-of-range entry fails this check too.
    dst = dst_rows.reshape(-1)
    sentinel = dst.new_full((1,), -2)
    src_of_dst = torch.cat([src_rows, sentinel]).index_select(0, torch.where(dst.ge(0) & dst.lt(rows), dst, rows))
    dst_of_src = torch.cat([dst, sentinel]).index_select(
        0, torch.where(src_rows.ge(0) & src_rows.lt(slots), src_rows, slots))
    inverse = ((dst.lt(0) | src_of_dst.eq(torch.arange(slots, device=dst.device))).all()
               & (src_rows.lt(0) | dst_of_src.eq(torch.arange(rows, device=dst.device))).all())
    torch._assert_async(inverse, "expert_mlp: src_rows and dst_rows must be inverse maps (permute's outputs)")


def check_expert_mlp(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias=None,
                     down_bias=None, activation="swiglu", gate_up_interleaved=False, swiglu_alpha=1.702,
                     swiglu_limit=7.0) -> None:
    _checks.check_expert_mlp_inputs(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                                    gate_up_bias, down_bias, activation, gate_up_interleaved)
    _check_routing(tokens, src_rows, offs, dst_rows)


def check_expert_mlp_backward(grad_out, tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                              gate_up_bias, down_bias, h, *args) -> None:
    _checks.check_expert_mlp_inputs(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                                    gate_up_bias, down_bias, args[0], args[1])
    _check_routing(tokens, src_rows, offs, dst_rows)


def _expert_mlp_backward(*args, _wrap=lambda k: k):
    # The schema's output_mask is a list; the function takes a tuple.
    return _resolve("experts:triton_expert_mlp_backward")(*args[:-1], tuple(args[-1]), _wrap=_wrap)


@functools.lru_cache(maxsize=None)
def register_all() -> None:
    """The CUDA kernels of grouped_mm, grouped_mm_gather, expert_mlp,
    expert_mlp_backward and scaled_grouped_mm (called once, by ``import
    torch_moe_ops``). quantize_fp8 keeps its C++ entry (carried upstream by
    the core series); its Triton kernel serves the fused epilogues and
    ``moe_ops_triton::quantize_fp8``."""
    register_cuda_kernel("grouped_mm", "grouped_mm:triton_grouped_mm", check_grouped_mm)
    register_cuda_kernel("grouped_mm_gather", "grouped_mm:triton_grouped_mm_gather", check_grouped_mm_gather)
    register_cuda_kernel("expert_mlp", "experts:triton_expert_mlp", check_expert_mlp)
    register_cuda_kernel("expert_mlp_backward", _expert_mlp_backward, check_expert_mlp_backward)
    register_cuda_kernel("scaled_grouped_mm", "fp8:triton_scaled_grouped_mm", check_scaled_grouped_mm)

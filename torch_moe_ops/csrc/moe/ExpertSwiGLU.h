#pragma once

// The SwiGLU rows of expert_mlp (ExpertMLP.cpp), fused: one pass over the
// rows per direction instead of a dozen ATen calls per row chunk. Project-only
// like the rest of csrc/moe/. Kernels: cpu/ExpertSwiGLUKernel.cpp, built once
// per CPU capability.
//
// h (R, 2I): gate then up, or interleaved (gate, up, gate, up, ...); float32,
// float16 or bfloat16, contiguous. Arithmetic in float32, each output rounded
// once to its dtype; every row is computed alone (d_row_weight's sum per
// vector lane, then over the lanes), so the bits do not depend on the thread
// count.

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>

#include <optional>

namespace at::native {

// a[r, j] = silu(gate[r, j]) * up[r, j]; a (R, I) contiguous, h's dtype.
using expert_swiglu_forward_fn = void (*)(const Tensor& h, bool interleaved, const Tensor& a);
DECLARE_DISPATCH(expert_swiglu_forward_fn, expert_swiglu_forward_stub);

// With g (R, I) float32 the gradient of a (before the routing weight) and
// row_weight (R,) float32 (none: every row weighs 1), per row r, with
// w = row_weight[r] and a = silu(gate) * up:
//   d_row_weight[r] = sum_j g[r, j] * a[r, j]          (if defined; float32, a fixed order)
//   aw[r, j]        = w * a[r, j]                       (if defined; h's dtype)
//   dh[r]           = d(gate, up) of (w * g[r]) . a[r]  (h's dtype and layout)
using expert_swiglu_backward_fn = void (*)(const Tensor& h, const Tensor& g, const std::optional<Tensor>& row_weight,
                                           bool interleaved, const Tensor& dh, const Tensor& aw,
                                           const Tensor& d_row_weight);
DECLARE_DISPATCH(expert_swiglu_backward_fn, expert_swiglu_backward_stub);

} // namespace at::native

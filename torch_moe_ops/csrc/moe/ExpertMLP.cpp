// moe_ops::expert_mlp and its backward (see ExpertMLP.h): the CPU kernels, a
// composition of the other moe_ops kernels through the dispatcher.
//
// What is kept between forward and backward is h (R, N1) plus the inputs;
// what the backward materialises is bounded by one (R, H) and a few (R, I)
// buffers, none of them a copy of the tokens: every token or token-gradient
// row is read in place through grouped_mm_gather.
//
// The activation and its derivative run in row chunks inside parallel_for,
// in float32 (float64 for float64) and rounded once, so their temporaries are
// cache-sized instead of (R, N1)-sized, and the bits do not depend on the
// thread count (chunks are fixed by the shapes, each row computed alone).
//
// The CUDA kernels of both ops are Triton kernels registered from Python
// (torch_moe_ops/triton/experts.py, torch_moe_ops/triton/cuda.py), so this
// composition runs on the host only: it reads the routing's values on the
// host and splits rows over threads.

#include <moe/ExpertMLP.h>
#include <moe/LargeOutputCache.h>
#include <moe/ExpertSwiGLU.h>
#include <ATen/native/GroupedMM.h>

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace at::native {

DEFINE_DISPATCH(expert_swiglu_forward_stub);
DEFINE_DISPATCH(expert_swiglu_backward_stub);

namespace {

// The other moe_ops are reached through the dispatcher, so the composition
// runs on whatever device the inputs are on.
Tensor grouped_mm_op(const Tensor& a, const Tensor& b, const std::optional<Tensor>& offs,
                     const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_ops::grouped_mm", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     const std::optional<Tensor>&, std::optional<ScalarType>)>();
  return op.call(a, b, offs, bias, out_dtype);
}

Tensor grouped_mm_gather_op(const Tensor& a, const Tensor& b, const Tensor& offs, const std::optional<Tensor>& a_index,
                            const std::optional<Tensor>& b_index, const std::optional<Tensor>& bias,
                            std::optional<ScalarType> out_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_ops::grouped_mm_gather", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     const std::optional<Tensor>&, const std::optional<Tensor>&,
                                     std::optional<ScalarType>)>();
  return op.call(a, b, offs, a_index, b_index, bias, out_dtype);
}

Tensor unpermute_op(const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_ops::unpermute", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&)>();
  return op.call(permuted, dst_rows, weights);
}

struct Activation {
  ExpertActivation kind;
  bool interleaved;
  double alpha, limit;
  int64_t inter; // I
};

ScalarType acc_type(ScalarType t) {
  return t == kDouble ? kDouble : kFloat;
}

// 16-bit GEMM outputs that feed more arithmetic stay in float32.
std::optional<ScalarType> wide_out(ScalarType t) {
  return t == kHalf || t == kBFloat16 ? std::optional<ScalarType>(kFloat) : std::nullopt;
}

std::pair<Tensor, Tensor> split_gate_up(const Tensor& h, const Activation& p) {
  if (p.interleaved) {
    return {h.slice(1, 0, 2 * p.inter, 2), h.slice(1, 1, 2 * p.inter, 2)};
  }
  return {h.narrow(1, 0, p.inter), h.narrow(1, p.inter, p.inter)};
}

// a = act(h), h in the accumulation type.
Tensor activation_forward(const Tensor& h, const Activation& p) {
  switch (p.kind) {
    case ExpertActivation::kSiLU: return at::silu(h);
    case ExpertActivation::kGeLU: return at::gelu(h);
    case ExpertActivation::kReLU: return at::relu(h);
    default: break;
  }
  auto [gate, up] = split_gate_up(h, p);
  if (p.kind == ExpertActivation::kSwiGLU) {
    return at::silu(gate) * up;
  }
  if (p.kind == ExpertActivation::kGeGLU) {
    return at::gelu(gate) * up;
  }
  // gpt-oss: gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha * gate).
  const Tensor g = gate.clamp_max(p.limit);
  return (up.clamp(-p.limit, p.limit) + 1) * (g * at::sigmoid(g * p.alpha));
}

// dL/dh from h and dL/da, in the accumulation type. Clamps pass the gradient
// strictly inside the range, 0 at the bounds, as torch.clamp's backward does
// (bfloat16 holds the limit 7 exactly: saturated gpt-oss gates sit on it).
// Selected, not multiplied by the mask, so that an infinite or NaN gradient
// (or a NaN h) outside the range gives 0 rather than inf * 0 = NaN, which the
// weight gradient's GEMM would spread over the expert's whole column.
Tensor activation_backward(const Tensor& h, const Tensor& da, const Activation& p) {
  switch (p.kind) {
    case ExpertActivation::kSiLU: return at::silu_backward(da, h);
    case ExpertActivation::kGeLU: return at::gelu_backward(da, h);
    case ExpertActivation::kReLU: return at::threshold_backward(da, h, 0);
    default: break;
  }
  auto [gate, up] = split_gate_up(h, p);
  Tensor d_gate, d_up;
  if (p.kind == ExpertActivation::kSwiGLU) {
    d_gate = at::silu_backward(da * up, gate);
    d_up = da * at::silu(gate);
  } else if (p.kind == ExpertActivation::kGeGLU) {
    d_gate = at::gelu_backward(da * up, gate);
    d_up = da * at::gelu(gate);
  } else {
    const Tensor g = gate.clamp_max(p.limit);
    const Tensor s = at::sigmoid(g * p.alpha);
    const Tensor glu = g * s;
    const Tensor up_c = up.clamp(-p.limit, p.limit);
    d_up = at::where(up.gt(-p.limit).logical_and_(up.lt(p.limit)), da * glu, 0);
    d_gate = at::where(gate.lt(p.limit), da * (up_c + 1) * (s + g * p.alpha * s * (1 - s)), 0);
  }
  if (p.interleaved) {
    return at::stack({d_gate, d_up}, 2).view({h.size(0), 2 * p.inter});
  }
  return at::cat({d_gate, d_up}, 1);
}

// Rows per chunk of the elementwise passes: float32 temporaries of a chunk
// (a few x rows x N1) stay in L2/L3 at MoE widths, and a chunk is long
// enough that the ~15 ATen calls per chunk cost little (64 rows: ~5 ms of
// call overhead per backward at a Qwen3 shape, measured).
constexpr int64_t kChunkRows = 128;

// SwiGLU in float32 (Qwen3, OLMoE, DeepSeek-V3, Mixtral) runs the fused row
// kernels (ExpertSwiGLU.h); other activations, float64, and a backward that
// adds the down bias's term to the routing weights' gradient run the ATen
// composition below, a dozen ATen calls per row chunk. Zen 5, 2 threads,
// bfloat16, bench_moe_layer's forward + backward (8192 routed rows), ms:
// OLMoE (E, N, K) 115.7 -> 111.3, Qwen3 94.5 -> 89.8 (with its down_proj
// gradient streamed), DeepSeek-V3 (E, K, N) 197.5 -> 191.1.
bool fused_swiglu(const Activation& p, ScalarType acc) {
  return p.kind == ExpertActivation::kSwiGLU && acc == kFloat;
}

// A buffer of the layer's size, from the large-output cache: the same sizes
// come back every step, and fresh pages would fault in (LargeOutputCache.h).
Tensor empty_workspace(IntArrayRef size, const TensorOptions& options) {
  return options.device().is_cpu() ? torch_moe_ops::empty_cached(size, options.dtype().toScalarType())
                                    : at::empty(size, options);
}

// fn(begin, end) over row chunks, in parallel. fn calls ATen ops, so each
// worker runs under the caller's thread-local state: at::parallel_for's
// OpenMP threads start from their own, with autograd and grad mode on and
// inference mode off. Without the caller's state, a chunk recorded autograd
// history on its slice of a shared buffer when an input required grad
// (threads racing on the buffer's grad_fn: "a leaf Variable that requires
// grad is being used in an in-place operation", now and then), and under
// torch.inference_mode() a chunk's copy into a buffer made in inference mode
// failed ("Inplace update to inference tensor outside InferenceMode").
template <typename F>
void for_row_chunks(int64_t rows, const F& fn) {
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  const at::ThreadLocalState caller;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t c = begin; c < end; ++c) {
      fn(c * kChunkRows, std::min(rows, (c + 1) * kChunkRows));
    }
  });
}

// Token of each row: src_rows / k, -1 for padding (floor division keeps -1).
Tensor token_rows(const Tensor& src_rows, int64_t top_k) {
  return at::div(src_rows, top_k, "floor");
}

// The routing's values, named as the caller passed them (the GEMMs and the
// combine below would otherwise report them as their own arguments):
// src_rows in [-1, T * k), dst_rows in [-1, R), offs non-decreasing in [0, R],
// and src_rows and dst_rows inverse maps of each other, as permute returns
// them: the forward combines through dst_rows, the backward weighs rows
// through src_rows, so maps that disagree would give gradients of another
// function. (The CUDA kernels check the same with device-side asserts,
// torch_moe_ops/triton/cuda.py.)
void check_routing_values(const Tensor& tokens, const Tensor& src_rows, const Tensor& offs,
                          const Tensor& dst_rows) {
  const int64_t rows = src_rows.size(0);
  const int64_t top_k = dst_rows.size(1);
  const int64_t slots = tokens.size(0) * top_k;
  const Tensor src = src_rows.contiguous();
  const int64_t* s = src.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK_VALUE(s[i] >= -1 && s[i] < slots, "expert_mlp: src_rows must be -1 or token * top_k + slot in [0, ",
        tokens.size(0), " * ", top_k, " = ", slots, "), got src_rows[", i, "]=", s[i]);
  }
  const Tensor dst = dst_rows.contiguous();
  const int64_t* d = dst.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < dst.numel(); ++i) {
    TORCH_CHECK_VALUE(d[i] >= -1 && d[i] < rows, "expert_mlp: dst_rows must be -1 or a row in [0, src_rows.size(0)=",
        rows, "), got dst_rows[", i / top_k, ", ", i % top_k, "]=", d[i]);
  }
  grouped_mm_check_offsets_cpu(offs, rows, "R (src_rows.size(0))", "expert_mlp");
  for (int64_t i = 0; i < dst.numel(); ++i) {
    TORCH_CHECK_VALUE(d[i] < 0 || s[d[i]] == i, "expert_mlp: src_rows and dst_rows must be inverse maps (permute's "
        "outputs), got dst_rows[", i / top_k, ", ", i % top_k, "]=", d[i], " but src_rows[", d[i], "]=", s[d[i]]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(s[r] < 0 || d[s[r]] == r, "expert_mlp: src_rows and dst_rows must be inverse maps (permute's "
        "outputs), got src_rows[", r, "]=", s[r], " but dst_rows[", s[r] / top_k, ", ", s[r] % top_k, "]=", d[s[r]]);
  }
}

bool k_major(const Tensor& w) {
  return w.stride(-2) == 1 && w.stride(-1) != 1 && w.size(-1) > 1;
}

std::tuple<Tensor, Tensor> expert_mlp_impl(
    const Tensor& tokens,
    const Tensor& src_rows,
    const Tensor& offs,
    const Tensor& dst_rows,
    const std::optional<Tensor>& weights,
    const Tensor& gate_up_proj,
    const Tensor& down_proj,
    const std::optional<Tensor>& gate_up_bias,
    const std::optional<Tensor>& down_bias,
    c10::string_view activation,
    bool gate_up_interleaved,
    double swiglu_alpha,
    double swiglu_limit) {
  expert_mlp_check_inputs(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
                          down_bias, activation, gate_up_interleaved);
  check_routing_values(tokens, src_rows, offs, dst_rows);
  const Activation p{expert_activation_from_name(activation), gate_up_interleaved, swiglu_alpha, swiglu_limit,
                     down_proj.size(1)};
  const Tensor rows = token_rows(src_rows, dst_rows.size(1));
  Tensor h = grouped_mm_gather_op(tokens, gate_up_proj, offs, rows, std::nullopt, gate_up_bias, std::nullopt);
  const int64_t r = h.size(0);
  Tensor a = empty_workspace({r, p.inter}, tokens.options());
  const auto acc = acc_type(tokens.scalar_type());
  if (fused_swiglu(p, acc)) {
    expert_swiglu_forward_stub(kCPU, h.contiguous(), p.interleaved, a);
  } else {
    for_row_chunks(r, [&](int64_t b, int64_t e) {
      a.narrow(0, b, e - b).copy_(activation_forward(h.narrow(0, b, e - b).to(acc), p));
    });
  }
  const Tensor y = grouped_mm_op(a, down_proj, offs, down_bias, std::nullopt);
  return {unpermute_op(y, dst_rows, weights), h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> expert_mlp_backward_impl(
    const Tensor& grad_out,
    const Tensor& tokens,
    const Tensor& src_rows,
    const Tensor& offs,
    const Tensor& dst_rows,
    const std::optional<Tensor>& weights,
    const Tensor& gate_up_proj,
    const Tensor& down_proj,
    const std::optional<Tensor>& gate_up_bias,
    const std::optional<Tensor>& down_bias,
    const Tensor& h,
    c10::string_view activation,
    bool gate_up_interleaved,
    double swiglu_alpha,
    double swiglu_limit,
    std::array<bool, 4> output_mask) {
  expert_mlp_check_inputs(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj, gate_up_bias,
                          down_bias, activation, gate_up_interleaved);
  TORCH_CHECK_VALUE(grad_out.sizes() == tokens.sizes() && grad_out.scalar_type() == tokens.scalar_type(),
      "expert_mlp_backward: grad_out must be ", tokens.scalar_type(), " of sizes ", tokens.sizes(), ", got ",
      grad_out.scalar_type(), " of sizes ", grad_out.sizes());
  TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == src_rows.size(0) && h.size(1) == gate_up_proj.size(2) &&
      h.scalar_type() == tokens.scalar_type(),
      "expert_mlp_backward: h must be ", tokens.scalar_type(), " of sizes (R, N1) = (", src_rows.size(0), ", ",
      gate_up_proj.size(2), "), got ", h.scalar_type(), " of sizes ", h.sizes());
  check_routing_values(tokens, src_rows, offs, dst_rows);
  const auto [need_tokens, need_weights, need_gate_up, need_down] = output_mask;
  const Activation p{expert_activation_from_name(activation), gate_up_interleaved, swiglu_alpha, swiglu_limit,
                     down_proj.size(1)};
  const auto dtype = tokens.scalar_type();
  const auto acc = acc_type(dtype);
  const int64_t r = h.size(0);
  const int64_t top_k = dst_rows.size(1);
  const Tensor rows = token_rows(src_rows, top_k);
  // Strided grad_out (an expanded .sum() gradient) is read row by row below.
  const Tensor dout = grad_out.contiguous();

  // g[r] = grad_out[token] @ down_proj[e]^T, the gradient of a[r] before the
  // routing weight: both the weight's gradient and a's come from it.
  const Tensor g = grouped_mm_gather_op(dout, down_proj.transpose(-2, -1), offs, rows, std::nullopt, std::nullopt,
                                        wide_out(dtype));
  // Routing weight of each row (0 for padding), in the accumulation type.
  Tensor row_weight;
  if (weights.has_value()) {
    // A zero appended so that padding rows (-1) read it: an index_select at
    // 0 would fail when there are no tokens at all.
    const Tensor flat = at::cat({weights->reshape({-1}).to(acc), at::zeros({1}, weights->options().dtype(acc))});
    row_weight = flat.index_select(0, at::where(src_rows.ge(0), src_rows, flat.size(0) - 1));
  }
  // Expert of each row, for the down bias's share of the weight gradient;
  // rows past offs[-1] belong to none (their y is zero, bias included).
  Tensor row_expert, row_has_expert;
  if (need_weights && weights.has_value() && down_bias.has_value()) {
    row_expert = grouped_mm_group_index(offs, r);
    row_has_expert = row_expert.lt(offs.size(0));
    row_expert.clamp_max_(std::max<int64_t>(offs.size(0) - 1, 0));
  }

  Tensor dh = empty_workspace({r, h.size(1)}, tokens.options());
  // a scaled by the routing weight: the A operand of down_proj's gradient.
  Tensor aw = need_down ? empty_workspace({r, p.inter}, tokens.options()) : Tensor();
  Tensor d_row_weight = need_weights && weights.has_value() ? at::empty({r}, g.options().dtype(acc)) : Tensor();
  if (fused_swiglu(p, acc) && !row_expert.defined()) {
    // g is grouped_mm's float32 output (wide_out), contiguous; h is the
    // caller's (any strides).
    const std::optional<Tensor> w = row_weight.defined() ? std::optional<Tensor>(row_weight) : std::nullopt;
    expert_swiglu_backward_stub(kCPU, h.contiguous(), g, w, p.interleaved, dh, aw, d_row_weight);
  } else {
    for_row_chunks(r, [&](int64_t b, int64_t e) {
      const Tensor h_c = h.narrow(0, b, e - b).to(acc);
      const Tensor g_c = g.narrow(0, b, e - b).to(acc);
      const Tensor a_c = activation_forward(h_c, p);
      Tensor da = g_c;
      if (row_weight.defined()) {
        const Tensor w_c = row_weight.narrow(0, b, e - b).unsqueeze(1);
        if (d_row_weight.defined()) {
          Tensor dw = (g_c * a_c).sum(1);
          if (row_expert.defined()) {
            // + <grad_out[token], down_bias[e]>; padding rows have weight 0 and drop out below.
            const Tensor tok = rows.narrow(0, b, e - b);
            // Padding rows (token -1) have weight 0; with no tokens at all
            // every row is padding and there is nothing to read.
            const Tensor go = dout.size(0) > 0 ? dout.index_select(0, tok.clamp_min(0)).to(acc)
                                               : at::zeros({e - b, dout.size(1)}, dout.options().dtype(acc));
            const Tensor bb = down_bias->index_select(0, row_expert.narrow(0, b, e - b)).to(acc);
            dw.add_((go * bb).sum(1).mul_(tok.ge(0).logical_and_(row_has_expert.narrow(0, b, e - b))));
          }
          d_row_weight.narrow(0, b, e - b).copy_(dw);
        }
        da = g_c * w_c;
        if (aw.defined()) aw.narrow(0, b, e - b).copy_(a_c * w_c);
      } else if (aw.defined()) {
        aw.narrow(0, b, e - b).copy_(a_c);
      }
      dh.narrow(0, b, e - b).copy_(activation_backward(h_c, da, p));
    });
  }

  Tensor grad_tokens, grad_weights, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias;
  if (need_tokens) {
    // Each token's gradient is the sum of its k rows', in slot order.
    grad_tokens = unpermute_op(grouped_mm_op(dh, gate_up_proj.transpose(-2, -1), offs, std::nullopt, std::nullopt),
                               dst_rows, std::nullopt);
  }
  if (need_weights && weights.has_value()) {
    // Dropped slots (-1) read the zero appended past the rows.
    const Tensor padded = at::cat({d_row_weight, at::zeros({1}, d_row_weight.options())});
    const Tensor dst = dst_rows.reshape({-1});
    grad_weights = padded.index_select(0, at::where(dst.ge(0), dst, r)).view(dst_rows.sizes())
                       .to(weights->scalar_type());
  }
  if (need_gate_up) {
    // Per expert: tokens[rows_e]^T @ dh_e, in the weight's own layout.
    if (k_major(gate_up_proj)) {
      grad_gate_up = grouped_mm_gather_op(dh.t(), tokens, offs, std::nullopt, rows, std::nullopt, std::nullopt)
                         .transpose(-2, -1);
    } else {
      grad_gate_up = grouped_mm_gather_op(tokens.t(), dh, offs, rows, std::nullopt, std::nullopt, std::nullopt);
    }
    if (gate_up_bias.has_value()) {
      const Tensor ones = at::ones({1, r}, dh.options());
      grad_gate_up_bias = grouped_mm_op(ones, dh, offs, std::nullopt, wide_out(dtype)).squeeze(1)
                              .to(gate_up_bias->scalar_type());
    }
  }
  if (need_down) {
    // Per expert: (w * a)_e^T @ grad_out[rows_e], in the weight's own layout.
    if (k_major(down_proj)) {
      grad_down = grouped_mm_gather_op(dout.t(), aw, offs, rows, std::nullopt, std::nullopt, std::nullopt)
                      .transpose(-2, -1);
    } else {
      grad_down = grouped_mm_gather_op(aw.t(), dout, offs, std::nullopt, rows, std::nullopt, std::nullopt);
    }
    if (down_bias.has_value()) {
      // Per expert: sum over its rows of w * grad_out[token], a 1-row grouped
      // GEMM. Its operands share a dtype, so the weights are rounded to the
      // tokens' dtype first (2^-9 relative in bf16); the sum is fp32.
      const Tensor w_rows = (row_weight.defined() ? row_weight : src_rows.ge(0).to(acc)).to(dtype).unsqueeze(0);
      grad_down_bias = grouped_mm_gather_op(w_rows, dout, offs, std::nullopt, rows, std::nullopt, wide_out(dtype))
                           .squeeze(1).to(down_bias->scalar_type());
    }
  }
  const auto none = [&] { return at::empty({0}, tokens.options()); };
  return {grad_tokens.defined() ? grad_tokens : none(),
          grad_weights.defined() ? grad_weights : none(),
          grad_gate_up.defined() ? grad_gate_up : none(),
          grad_down.defined() ? grad_down : none(),
          grad_gate_up_bias.defined() ? grad_gate_up_bias : none(),
          grad_down_bias.defined() ? grad_down_bias : none()};
}

} // namespace

std::tuple<Tensor, Tensor> expert_mlp(
    const Tensor& tokens, const Tensor& src_rows, const Tensor& offs, const Tensor& dst_rows,
    const std::optional<Tensor>& weights, const Tensor& gate_up_proj, const Tensor& down_proj,
    const std::optional<Tensor>& gate_up_bias, const std::optional<Tensor>& down_bias, c10::string_view activation,
    bool gate_up_interleaved, double swiglu_alpha, double swiglu_limit) {
  return expert_mlp_impl(tokens, src_rows, offs, dst_rows, weights, gate_up_proj, down_proj,
                         gate_up_bias, down_bias, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> expert_mlp_backward(
    const Tensor& grad_out, const Tensor& tokens, const Tensor& src_rows, const Tensor& offs, const Tensor& dst_rows,
    const std::optional<Tensor>& weights, const Tensor& gate_up_proj, const Tensor& down_proj,
    const std::optional<Tensor>& gate_up_bias, const std::optional<Tensor>& down_bias, const Tensor& h,
    c10::string_view activation, bool gate_up_interleaved, double swiglu_alpha, double swiglu_limit,
    std::array<bool, 4> output_mask) {
  return expert_mlp_backward_impl(grad_out, tokens, src_rows, offs, dst_rows, weights, gate_up_proj,
                                  down_proj, gate_up_bias, down_bias, h, activation, gate_up_interleaved, swiglu_alpha,
                                  swiglu_limit, output_mask);
}

} // namespace at::native

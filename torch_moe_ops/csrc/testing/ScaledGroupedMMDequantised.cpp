// Test-only op, torch.ops.moe_ops_testing.scaled_grouped_mm_dequantised: the
// computation of _scaled_grouped_mm's CPU entry in the upstream series' first
// PR of that op (core/0006c1), before its chunked kernel (core/0006c1k)
// replaces it. patches/fp8_stages.ENTRY_DEQUANTISED carries
// scaled_grouped_mm_dequantised from this file into that PR's
// MoEScaledGroupedMM.cpp in place of the kernel's call, so the code the PR
// carries is the code test_fp8 runs here (against the float64 reference and
// the kernel). Rowwise scales, 2D x 3D and 3D x 3D: what that PR accepts. Not
// part of the moe_ops library.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEScaledGroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace at::native {

// Rowwise scales in 2D x 3D and 3D x 3D through ATen operations on whole
// operands: float8 widened to bfloat16 (exact), multiplied by _grouped_mm's
// CPU entry into float32, then (acc * scale_a) * scale_b + bias rounded once
// into out (zeroed).
static void scaled_grouped_mm_dequantised(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, const Tensor& out) {
  Tensor acc = grouped_mm_cpu(mat_a.to(kBFloat16), mat_b.to(kBFloat16), offs, std::nullopt, kFloat);
  Tensor sa = scale_a.unsqueeze(-1), sb = scale_b.unsqueeze(-2), dst = out;
  Tensor bias_f = bias.has_value() ? bias->to(kFloat).unsqueeze(-2) : Tensor();
  if (mat_a.dim() == 2) {  // the rows groups cover (the rest stay 0), each with its group's scale_b and bias
    const int64_t rows = offs->size(0) > 0 ? (*offs)[-1].item<int64_t>() : 0;
    const Tensor gid = grouped_mm_group_index(*offs, rows);
    acc = acc.narrow(0, 0, rows), sa = sa.narrow(0, 0, rows), dst = out.narrow(0, 0, rows);
    sb = scale_b.index_select(0, gid);
    if (bias_f.defined()) bias_f = bias_f.squeeze(-2).index_select(0, gid);
  }
  acc = acc.mul(sa).mul(sb);
  dst.copy_(bias_f.defined() ? acc.add(bias_f) : acc);
}

namespace {

// The op: the entry's checks (scaled_grouped_mm_check_inputs, which accepts
// every recipe and layout), then this PR-stage's limits.
Tensor scaled_grouped_mm_dequantised_op(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype) {
  const auto recipe =
      scaled_grouped_mm_check_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias, std::nullopt, out_dtype);
  TORCH_CHECK_VALUE(recipe == ScaledGroupedMMRecipe::kRowwise && mat_b.dim() == 3,
      "moe_ops_testing.scaled_grouped_mm_dequantised: rowwise scales in the 2D x 3D and 3D x 3D layouts only, "
      "got scale_a of dtype ", scale_a.scalar_type(), " and mat_b of sizes ", mat_b.sizes());
  Tensor out = at::zeros(grouped_mm_out_size(mat_a, mat_b, offs),
                         mat_a.options().dtype(scaled_grouped_mm_out_dtype(out_dtype)));
  if (out.numel() > 0) {
    scaled_grouped_mm_dequantised(mat_a, mat_b, scale_a, scale_b, offs, bias, out);
  }
  return out;
}

} // namespace
} // namespace at::native

TORCH_LIBRARY_FRAGMENT(moe_ops_testing, m) {
  m.def(
      "scaled_grouped_mm_dequantised(Tensor mat_a, Tensor mat_b, Tensor scale_a, Tensor scale_b, Tensor? offs=None, "
      "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops_testing, CPU, m) {
  m.impl("scaled_grouped_mm_dequantised", &at::native::scaled_grouped_mm_dequantised_op);
}

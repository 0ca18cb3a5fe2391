// CUDA entry point of scaled_grouped_mm (semantics in ATen/native/MoEScaledGroupedMM.h).
//
// e4m3 operands in the cases upstream's kernels take (rowwise on sm_90+; MX
// on sm_100 in 2D x 3D and 2D x 2D, whose scale layouts are upstream's; bfloat16
// out, no bias, row-major A and column-major B with 16-byte aligned strides)
// go to aten::_scaled_grouped_mm. Everything else (MX and blockwise scales on
// Hopper, e5m2, bias, float32 out, other strides) runs as its
// definition: the operands are widened by dequantize_fp8 (float8 -> bfloat16
// is exact, and so is an MX power-of-two scale folded in; blockwise scales
// widen to float32), multiplied by grouped_mm in float32, and the rowwise
// scales and bias are applied to the float32 product, rounded once: the CPU
// kernel's arithmetic, with operand-sized temporaries. This half is
// device-generic ATen code: test_fp8 runs it on CPU tensors through the
// dispatcher's CUDA slot.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEQuantize.h>
#include <ATen/native/MoEScaledGroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/_scaled_grouped_mm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/where.h>

namespace at::native {
namespace {

// grouped_mm through the dispatcher: on CUDA tensors its Triton kernel
// (registered from Python), on CPU tensors (test_fp8's runs of this entry) its
// CPU kernel.
Tensor grouped_mm_op(const Tensor& a, const Tensor& b, const std::optional<Tensor>& offs,
                     std::optional<ScalarType> out_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_ops::grouped_mm", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     const std::optional<Tensor>&, std::optional<ScalarType>)>();
  return op.call(a, b, offs, std::nullopt, out_dtype);
}

bool upstream_operand_ok(const Tensor& t, bool row_major) {
  const int64_t d = t.dim();
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  if (d == 3 && t.stride(0) % 16 != 0) return false;
  return row_major ? t.stride(d - 1) == 1 && t.stride(d - 2) % 16 == 0
                   : t.stride(d - 2) == 1 && t.stride(d - 1) % 16 == 0;
}

bool upstream_supports(const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
                       const std::optional<Tensor>& bias, ScaledGroupedMMRecipe recipe, ScalarType out_t) {
  if (!mat_a.is_cuda() || recipe == ScaledGroupedMMRecipe::kBlockwise || bias.has_value() || out_t != kBFloat16) {
    return false;
  }
  const auto* props = at::cuda::getCurrentDeviceProperties();
  if (recipe == ScaledGroupedMMRecipe::kMX) {
    // sm_100's MX grouped GEMM: 2D x 3D and 2D x 2D, the 3-D weight's scale swizzled.
    const bool layout_ok = mat_a.dim() == 2 && (mat_b.dim() == 2 || scale_b.dim() == 2);
    if (props->major < 10 || !layout_ok) return false;
  }
  return props->major >= 9 && mat_a.scalar_type() == kFloat8_e4m3fn && mat_b.scalar_type() == kFloat8_e4m3fn &&
      mat_a.size(-1) % 16 == 0 && mat_b.size(-1) % 16 == 0 && scale_a.is_contiguous() && scale_b.is_contiguous() &&
      upstream_operand_ok(mat_a, /*row_major=*/true) && upstream_operand_ok(mat_b, /*row_major=*/false);
}

// Per-group rows of a (G, X) tensor spread over the split dimension: row gid[i]
// for index i, zeros past offs[-1]. (size, X)
Tensor spread(const Tensor& per_group, const Tensor& gid) {
  return at::constant_pad_nd(per_group, {0, 0, 0, 1}, 0).index_select(0, gid);
}

// (acc * sa) * sb + bias on the float32 product, per layout; elements no
// group covers are 0. sa/sb undefined: scales already applied.
Tensor epilogue(Tensor acc, GroupedMMLayout layout, const Tensor& sa, const Tensor& sb, const std::optional<Tensor>& offs,
                const std::optional<Tensor>& bias, int64_t groups) {
  const bool scaled = sa.defined();
  const Tensor bias_f = bias.has_value() ? bias->to(kFloat) : Tensor();
  switch (layout) {
    case GroupedMMLayout::k2d3d: {  // acc (M, N); rows split by offs
      const Tensor gid = grouped_mm_group_index(*offs, acc.size(0));
      if (scaled) acc = acc.mul(sa.unsqueeze(1)).mul(spread(sb, gid));
      if (bias_f.defined()) acc = acc.add(spread(bias_f, gid));
      return at::where(gid.lt(groups).unsqueeze(1), acc, 0.0);
    }
    case GroupedMMLayout::k3d2d: {  // acc (M, N); columns split by offs
      const Tensor gid = grouped_mm_group_index(*offs, acc.size(1));
      if (scaled) acc = acc.mul(spread(sa, gid).t()).mul(sb.unsqueeze(0));
      if (bias_f.defined()) {
        acc = acc.add(at::constant_pad_nd(bias_f, {0, 0, 0, 1}, 0).gather(0, gid.unsqueeze(0)));
      }
      return at::where(gid.lt(groups).unsqueeze(0), acc, 0.0);
    }
    case GroupedMMLayout::k2d2d:
    case GroupedMMLayout::k3d3d: {  // acc (G, M, N)
      if (scaled) {
        acc = acc.mul(sa.reshape({groups, -1, 1})).mul(sb.reshape({groups, 1, -1}));
      }
      if (bias_f.defined()) acc = acc.add(bias_f.unsqueeze(1));
      return acc;
    }
  }
  return acc;
}

} // namespace

Tensor scaled_grouped_mm_cuda(
    const Tensor& mat_a, const Tensor& mat_b, const Tensor& scale_a, const Tensor& scale_b,
    const std::optional<Tensor>& offs, const std::optional<Tensor>& bias, const std::optional<Tensor>& scale_result,
    std::optional<ScalarType> out_dtype, bool use_fast_accum) {
  const auto recipe =
      scaled_grouped_mm_check_inputs(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype);
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const auto out_t = scaled_grouped_mm_out_dtype(out_dtype);
  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);
  if (offs.has_value() && offs->numel() > 0 && recipe == ScaledGroupedMMRecipe::kMX &&
      layout == GroupedMMLayout::k2d2d) {
    // The value checks grouped_mm cannot make: MX blocks may not straddle groups of K.
    const Tensor o = offs->to(kLong);
    const int64_t k = mat_a.size(-1);
    at::_assert_async(o.remainder(32).eq(0).logical_or(o.eq(k)).all(),
        "scaled_grouped_mm: with mx scales every group of K must hold whole 32-element blocks: offs must be "
        "multiples of 32 or K=" + std::to_string(k));
  }

  if (upstream_supports(mat_a, mat_b, scale_a, scale_b, bias, recipe, out_t)) {
    Tensor out = at::_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs, std::nullopt, std::nullopt, out_t,
                                        use_fast_accum);
    if (layout == GroupedMMLayout::k2d3d || layout == GroupedMMLayout::k3d2d) {
      grouped_mm_zero_uncovered_cuda(out, *offs, /*split_rows=*/layout == GroupedMMLayout::k2d3d);
    }
    return fp8_dense_output(out);
  }

  // B's scales run along K of its transpose (quantize_fp8(mat_b^T) made them).
  const auto widen_b = [&](const char* recipe_name, ScalarType t, bool swizzle) {
    return dequantize_fp8_cuda(mat_b.transpose(-2, -1), scale_b, recipe_name, t, std::nullopt, swizzle)
        .transpose(-2, -1);
  };
  Tensor a, b, sa, sb;
  switch (recipe) {
    case ScaledGroupedMMRecipe::kRowwise:
      a = mat_a.to(kBFloat16);
      b = mat_b.to(kBFloat16);
      sa = scale_a;
      sb = scale_b;
      break;
    case ScaledGroupedMMRecipe::kMX: {
      // 2-D operands' scales come blocked per group: back to the plain grid.
      const int64_t s = (mat_a.size(-1) + 31) / 32, dim = layout == GroupedMMLayout::k2d2d ? 1 : 0;
      const Tensor sa2 = mat_a.dim() == 2 ? unswizzle_mx_scale(scale_a, mat_a.size(0), s, *offs, dim) : scale_a;
      a = dequantize_fp8_cuda(mat_a, sa2, "mx", kBFloat16, std::nullopt, mat_a.dim() == 3 && scale_a.dim() == 2);
      if (mat_b.dim() == 2) {
        const Tensor sb2 = unswizzle_mx_scale(scale_b, mat_b.size(1), s, *offs, dim);
        b = dequantize_fp8_cuda(mat_b.t(), sb2, "mx", kBFloat16, std::nullopt, false).t();
      } else {
        b = widen_b("mx", kBFloat16, scale_b.dim() == 2);
      }
      break;
    }
    case ScaledGroupedMMRecipe::kBlockwise:
      a = dequantize_fp8_cuda(mat_a, scale_a, "blockwise_1x128", kFloat, std::nullopt, false);
      b = widen_b("blockwise_128x128", kFloat, false);
      break;
  }
  const std::optional<Tensor> group_offs = layout == GroupedMMLayout::k3d3d ? std::nullopt : offs;
  if (!sa.defined() && !bias.has_value() && out_t == kBFloat16 && a.scalar_type() == kBFloat16) {
    return fp8_dense_output(grouped_mm_op(a, b, group_offs, kBFloat16));  // rounded once, in the GEMM
  }
  const Tensor acc = grouped_mm_op(a, b, group_offs, kFloat);
  return fp8_dense_output(epilogue(acc, layout, sa, sb, offs, bias, groups).to(out_t));
}

} // namespace at::native

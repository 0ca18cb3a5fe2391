// Entry points of _grouped_mm: the CPU kernel's (validate, allocate, run
// grouped_mm_stub), and the device-generic loop of ATen matmuls that the CUDA
// entry falls back to where upstream's grouped GEMM does not apply.

#include <ATen/native/GroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

namespace at::native {

DEFINE_DISPATCH(grouped_mm_stub);

// Zeroes the rows (2D x 3D) or columns (3D x 2D) of out at or past offs[-1],
// which no group covers (upstream's grouped GEMM leaves them unwritten):
// offs[-1] is compared on the device, no host sync.
void grouped_mm_zero_uncovered(const Tensor& out, GroupedMMLayout layout, const std::optional<Tensor>& offs) {
  if (out.numel() == 0 || (layout != GroupedMMLayout::k2d3d && layout != GroupedMMLayout::k3d2d)) {
    return;
  }
  const int64_t dim = layout == GroupedMMLayout::k2d3d ? 0 : 1;
  const Tensor covered = offs->numel() > 0 ? offs->select(0, -1).to(kLong) : at::zeros({}, offs->options().dtype(kLong));
  const Tensor uncovered = at::arange(out.size(dim), covered.options()).ge(covered);
  out.masked_fill_(dim == 0 ? uncovered.unsqueeze(1) : uncovered.unsqueeze(0), 0);
}

namespace {

// One group's product in the compute dtype, its bias row added before the
// single rounding to the output dtype (as the CPU kernel adds it to its
// accumulator).
Tensor grouped_mm_group(const Tensor& a, const Tensor& b, const std::optional<Tensor>& bias_row, ScalarType compute) {
  const Tensor ac = a.to(compute);
  const Tensor bc = b.to(compute);
  return bias_row.has_value() ? at::addmm(bias_row->to(compute), ac, bc) : at::mm(ac, bc);
}

} // namespace

Tensor grouped_mm_fallback(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const auto out_t = grouped_mm_out_dtype(mat_a, out_dtype);
  // 16-bit operands are widened to float32 (their products are exact there)
  // and each group's sum, bias included, rounds once to the output dtype: the
  // CPU kernel's numerics, whatever a backend's 16-bit matmul does with the
  // bias or the accumulator. The copies cost memory traffic, not flops.
  const auto compute = mat_a.scalar_type() == kDouble ? kDouble : kFloat;
  const auto size = grouped_mm_out_size(mat_a, mat_b, offs);
  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, out_t, mat_a.device()),
                                 mat_a.options().dtype(out_t));
  // Group g's bias, its entries from..from+n (3D x 2D: the columns g owns).
  auto bias_row = [&](int64_t g, int64_t from, int64_t n) {
    return bias.has_value() ? std::optional<Tensor>((*bias)[g].narrow(0, from, n)) : std::nullopt;
  };
  if (layout == GroupedMMLayout::k3d3d) {
    const Tensor a = mat_a.to(compute), b = mat_b.to(compute);
    return out.copy_(bias.has_value() ? at::baddbmm(bias->to(compute).unsqueeze(1), a, b) : at::bmm(a, b));
  }
  // The group ends on the host, checked as the CPU kernel checks them.
  const Tensor ends = offs->to(kCPU);
  grouped_mm_check_offsets_cpu(ends, grouped_mm_split_size(mat_a, mat_b), grouped_mm_split_name(layout));
  const int64_t n_out = out.size(-1);
  for (int64_t g = 0, start = 0; g < ends.size(0); ++g) {
    const int64_t end = ends.const_data_ptr<int32_t>()[g * ends.stride(0)], len = end - start;
    if (layout == GroupedMMLayout::k2d3d && len > 0) {  // rows start:end of A times B[g]
      out.narrow(0, start, len).copy_(
          grouped_mm_group(mat_a.narrow(0, start, len), mat_b[g], bias_row(g, 0, n_out), compute));
    } else if (layout == GroupedMMLayout::k3d2d && len > 0) {  // A[g] times columns start:end of B
      out.narrow(1, start, len).copy_(
          grouped_mm_group(mat_a[g], mat_b.narrow(1, start, len), bias_row(g, start, len), compute));
    } else if (layout == GroupedMMLayout::k2d2d) {  // the K slice start:end; an empty one gives zeros (+ bias)
      out[g].copy_(grouped_mm_group(mat_a.narrow(1, start, len), mat_b.narrow(0, start, len),
                                    bias_row(g, 0, n_out), compute));
    }
    start = end;
  }
  grouped_mm_zero_uncovered(out, layout, offs);
  return out;
}

Tensor grouped_mm_empty_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    ScalarType out_dtype) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const int64_t covered = offs.has_value()
      ? grouped_mm_check_offsets_cpu(*offs, grouped_mm_split_size(mat_a, mat_b), grouped_mm_split_name(layout))
      : 0;
  const auto size = grouped_mm_out_size(mat_a, mat_b, offs);
  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, out_dtype, mat_a.device()),
                                 mat_a.options().dtype(out_dtype));
  // What no group covers is zero, never uninitialised memory.
  grouped_mm_zero_past_cpu(out, layout, covered);
  return out;
}

Tensor grouped_mm_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);
  Tensor out = grouped_mm_empty_cpu(mat_a, mat_b, offs, grouped_mm_out_dtype(mat_a, out_dtype));
  if (out.numel() > 0) {
    grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, std::nullopt, std::nullopt, out);
  }
  return out;
}

} // namespace at::native

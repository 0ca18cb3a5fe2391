// CUDA entry of _grouped_mm: the checks grouped_mm_cpu runs (GroupedMM.h:
// the same errors, types and messages), then upstream's CUTLASS grouped GEMM
// (at::cuda::detail::bf16bf16_grouped_mm) where it applies, with the output
// elements no group covers zeroed after it (it leaves them unwritten), or
// else a device-generic loop of ATen matmuls that does everything the CPU
// kernel does (float64, float16, bias, float32 output, any strides). Only the
// fast path needs a GPU: the rest is device-generic ATen code, which the tests
// run on CPU tensors.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/cuda/GroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/cuda/GroupMM.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

namespace at::native {

namespace {

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

Tensor grouped_mm_cuda(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);
  bool device_ok = false;
  if (mat_a.is_cuda()) {
    // The devices upstream's CUTLASS grouped GEMM is built for.
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    device_ok = (prop->major == 9 && prop->minor == 0) || prop->major == 10;
  }
  if (!grouped_mm_cuda_fast_path(mat_a, mat_b, offs, bias, out_dtype, device_ok)) {
    return grouped_mm_fallback(mat_a, mat_b, offs, bias, out_dtype);
  }
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const auto size = grouped_mm_out_size(mat_a, mat_b, offs);
  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, kBFloat16, mat_a.device()),
                                 mat_a.options().dtype(kBFloat16));
  if (offs.has_value() && offs->numel() > 0) {
    // The CPU kernel's value check, on the device: no host sync.
    at::_assert_async(grouped_mm_offs_ok(offs->to(kLong), grouped_mm_split_size(mat_a, mat_b)),
        "grouped_mm: offs must be non-negative, non-decreasing and at most the grouped dimension");
  }
  if (out.numel() == 0) {
    return out;
  }
  if (layout == GroupedMMLayout::k2d2d) {
    // A group with an empty K slice owns a zero block, which nothing says the
    // grouped kernel writes (upstream zero-fills it on ROCm): one memset.
    out.zero_();
  }
  at::cuda::detail::bf16bf16_grouped_mm(mat_a, mat_b, offs, std::nullopt, out);
  grouped_mm_zero_uncovered(out, layout, offs);
  return out;
}

} // namespace at::native

// CUDA entry point of grouped_mm.
//
// Routes to upstream's CUTLASS/cuBLAS grouped GEMM (aten::_grouped_mm) where
// that supports the case (bf16 in and out, no bias, 16-byte aligned strides,
// sm90+), and to a per-group fallback otherwise. After upstream's GEMM the
// output elements no group covers are zeroed by a kernel that reads offs[-1]
// on the device (the fallback starts from zeros), and offs is validated with a
// device-side assert: no host sync on the fast path. Hopper kernels of our own
// replace the routing in a later change.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/cuda/GroupedMM.cuh>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>

namespace at::native {
namespace {

template <typename scalar_t>
__global__ void zero_uncovered_kernel(scalar_t* out, int64_t rows, int64_t cols, int64_t rs, int64_t cs,
                                      const int32_t* covered, bool split_rows) {
  moe_cuda::grouped_mm_zero_uncovered_thread(moe_cuda::this_thread(), out, rows, cols, rs, cs, covered, split_rows);
}

} // namespace

void grouped_mm_zero_uncovered_cuda(const Tensor& out, const Tensor& offs, bool split_rows) {
  if (out.numel() == 0) return;
  const int32_t* covered = offs.numel() > 0 ? offs.const_data_ptr<int32_t>() + (offs.size(0) - 1) * offs.stride(0) : nullptr;
  const auto grid = moe_cuda::grouped_mm_zero_uncovered_launch(out.numel());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, out.scalar_type(), "grouped_mm_zero_uncovered", [&] {
    zero_uncovered_kernel<scalar_t><<<grid.blocks, grid.threads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), out.size(0), out.size(1), out.stride(0), out.stride(1), covered, split_rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

bool upstream_strides_ok(const Tensor& t) {
  const int64_t align = 16 / t.element_size();
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  const int64_t d = t.dim();
  const bool row_major = t.stride(d - 1) == 1 && t.stride(d - 2) % align == 0 && t.stride(d - 2) >= t.size(d - 1);
  const bool col_major = t.stride(d - 2) == 1 && t.stride(d - 1) % align == 0 && t.stride(d - 1) >= t.size(d - 2);
  if (d == 3 && t.stride(0) % align != 0) return false;
  return row_major || col_major;
}

bool upstream_supports(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& bias, ScalarType out_t) {
  // CPU tensors reach here when test/test_cuda_entries.py calls this entry
  // through the dispatcher's CUDA slot; they take the fallback, which is
  // device-generic ATen code.
  if (!mat_a.is_cuda()) return false;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return props->major >= 9 && mat_a.scalar_type() == kBFloat16 && out_t == kBFloat16 && !bias.has_value() &&
      upstream_strides_ok(mat_a) && upstream_strides_ok(mat_b);
}

Tensor fallback(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& offs,
                const std::optional<Tensor>& bias, ScalarType out_t) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const auto acc = mat_a.scalar_type() == kDouble ? kDouble : kFloat;
  const auto size = grouped_mm_out_size(mat_a, mat_b, offs);
  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, out_t, mat_a.device()),
                                 mat_a.options().dtype(out_t)).zero_();
  const int64_t groups = grouped_mm_num_groups(mat_a, mat_b, offs);
  // NOTE: host sync: the fallback needs the group boundaries on the host.
  Tensor offs_cpu = offs.has_value() ? offs->cpu() : Tensor();
  int64_t start = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t end = offs_cpu.defined() ? offs_cpu[g].item<int64_t>() : 0;
    Tensor a, b, o;
    std::optional<Tensor> bias_g;
    switch (layout) {
      case GroupedMMLayout::k2d3d: a = mat_a.narrow(0, start, end - start); b = mat_b[g]; o = out.narrow(0, start, end - start); break;
      case GroupedMMLayout::k3d2d: a = mat_a[g]; b = mat_b.narrow(1, start, end - start); o = out.narrow(1, start, end - start); break;
      case GroupedMMLayout::k2d2d: a = mat_a.narrow(1, start, end - start); b = mat_b.narrow(0, start, end - start); o = out[g]; break;
      case GroupedMMLayout::k3d3d: a = mat_a[g]; b = mat_b[g]; o = out[g]; break;
    }
    Tensor r = at::mm(a.to(acc), b.to(acc));
    if (bias.has_value()) {
      Tensor bg = (*bias)[g];
      if (layout == GroupedMMLayout::k3d2d) bg = bg.narrow(0, start, end - start);
      r.add_(bg.to(acc));
    }
    o.copy_(r);
    start = end;
  }
  return out;
}

} // namespace

Tensor grouped_mm_cuda(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  const auto out_t = grouped_mm_out_dtype(mat_a, out_dtype);
  if (offs.has_value() && offs->numel() > 0) {
    const int64_t split = grouped_mm_split_size(mat_a, mat_b);
    at::_assert_async(grouped_mm_offs_ok(offs->to(kLong), split),
                      "grouped_mm: offs must be non-negative, non-decreasing and at most the grouped dimension");
  }
  if (!upstream_supports(mat_a, mat_b, bias, out_t)) {
    return fallback(mat_a, mat_b, offs, bias, out_t);
  }
  Tensor out = at::_grouped_mm(mat_a, mat_b, offs, std::nullopt, out_t);
  if (layout == GroupedMMLayout::k2d3d) {
    grouped_mm_zero_uncovered_cuda(out, *offs, /*split_rows=*/true);
  } else if (layout == GroupedMMLayout::k3d2d) {
    grouped_mm_zero_uncovered_cuda(out, *offs, /*split_rows=*/false);
  }
  return out;
}

// The gathered operands are materialised here (index_select, -1 entries
// zeroed) and run through grouped_mm_cuda; the CPU kernel reads them in
// place. A Hopper kernel that gathers inside its TMA loads replaces this in a
// later change.
Tensor grouped_mm_gather_cuda(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const Tensor& offs,
    const std::optional<Tensor>& a_index,
    const std::optional<Tensor>& b_index,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_gather_check_inputs(mat_a, mat_b, offs, a_index, b_index, bias, out_dtype);
  const auto gather = [](const Tensor& mat, const Tensor& index, int64_t dim, const char* name) {
    const int64_t size = mat.size(dim);
    const Tensor ok = index.ge(-1).logical_and(index.lt(size)).all();
    at::_assert_async(ok, std::string("grouped_mm_gather: ") + name + " has an entry out of range [-1, " +
                              std::to_string(size) + ")");
    if (size == 0) {  // every entry is -1 (asserted): nothing to select from
      auto shape = mat.sizes().vec();
      shape[dim] = index.size(0);
      return at::zeros(shape, mat.options());
    }
    const Tensor dropped = index.lt(0);
    Tensor picked = at::index_select(mat, dim, index.clamp_min(0));
    // -1 reads zeros, not 0 * mat[0] (NaN where mat[0] holds an inf or a NaN).
    return picked.masked_fill_(dropped.unsqueeze(1 - dim), 0);
  };
  const Tensor a =
      a_index.has_value() ? gather(mat_a, *a_index, grouped_mm_gather_dim(true, mat_a, mat_b), "a_index") : mat_a;
  const Tensor b = b_index.has_value() ? gather(mat_b, *b_index, 0, "b_index") : mat_b;
  return grouped_mm_cuda(a, b, offs, bias, out_dtype);
}

} // namespace at::native

// Zeroes the output elements no group covers (rows or columns past offs[-1])
// after upstream's grouped GEMMs (aten::_grouped_mm, aten::_scaled_grouped_mm),
// which leave them unwritten: a kernel that reads offs[-1] on the device, no
// host sync. grouped_mm's own CUDA kernels are Triton kernels
// (torch_moe_ops/triton/grouped_mm.py) that write every element.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/cuda/GroupedMM.cuh>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
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

} // namespace at::native

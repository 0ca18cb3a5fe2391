// CUDA entry point and kernels of _moe_permute, with no host syncs: the
// output size comes from the shapes (see MoEPermute.h), the offsets are
// computed on the device, and expert ids are checked with a device-side
// assert. Deterministic: the ranks are computed per chunk of (token, slot)
// pairs in order.
//
//   (1) per-chunk histograms, (2) one block scans experts x chunks into group
//   starts and offs, (3) per-chunk row assignment in (token, slot) order, (4)
//   a row gather over destination rows that also zeroes padding and unused
//   rows: every output row is written once.
//
// The kernels are shells around the bodies in cuda/MoEPermute.cuh, which the
// CPU build compiles too: test/test_routing_device_logic.py runs them over
// the whole launch grid on the host against the CPU kernel.

#include <ATen/native/MoEPermute.h>
#include <ATen/native/cuda/MoEPermute.cuh>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

namespace at::native {
namespace {

using namespace moe_cuda;

__global__ void fill_minus_one_kernel(int64_t* p, int64_t n) {
  fill_minus_one_thread(this_thread(), p, n);
}

template <typename index_t>
__global__ void permute_histogram_kernel(
    const index_t* ids, int64_t pairs, int64_t num_experts, int64_t first_expert, int64_t num_local,
    int32_t* hist /* chunks x L */) {
  const int64_t bad = permute_histogram_thread(this_thread(), ids, pairs, num_experts, first_expert, num_local, hist);
  CUDA_KERNEL_ASSERT(bad < 0 && "permute: expert_ids must be in [0, num_experts)");
}

__global__ void permute_scan_kernel(
    int32_t* hist, int64_t chunks, int64_t num_local, int64_t alignment, int32_t* offs, int32_t* group_start) {
  const ThreadPos pos = this_thread();
  permute_scan_counts_thread(pos, hist, chunks, num_local, offs);
  __syncthreads();
  permute_scan_place_thread(pos, num_local, alignment, offs, group_start);
}

template <typename index_t>
__global__ void permute_assign_kernel(
    const index_t* ids, int64_t pairs, int64_t first_expert, int64_t num_local, const int32_t* hist,
    const int32_t* group_start, int64_t* dst, int64_t* src) {
  permute_assign_thread(this_thread(), ids, pairs, first_expert, num_local, hist, group_start, dst, src);
}

__global__ void permute_gather_kernel(
    const char* tokens, int64_t in_stride_bytes, int64_t row_bytes, int64_t top_k, const int64_t* src, char* out,
    int64_t rows) {
  permute_gather_thread(this_thread(), tokens, in_stride_bytes, row_bytes, top_k, src, out, rows);
}

} // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_cuda(
    const Tensor& tokens_in, const Tensor& expert_ids_in, int64_t num_experts, int64_t alignment,
    int64_t first_expert, std::optional<int64_t> num_local_experts) {
  permute_check_inputs(tokens_in, expert_ids_in, num_experts, alignment, first_expert, num_local_experts);
  const Tensor tokens = tokens_in.stride(1) == 1 ? tokens_in : tokens_in.contiguous();
  const Tensor expert_ids = expert_ids_in.contiguous();
  const int64_t num_local = permute_num_local(num_experts, first_expert, num_local_experts);
  const int64_t top_k = expert_ids.size(1);
  const int64_t pairs = expert_ids.numel();
  const int64_t rows = permute_num_rows(tokens.size(0), top_k, num_local, alignment);
  Tensor permuted = at::empty({rows, tokens.size(1)}, tokens.options());
  Tensor dst_rows = at::empty(expert_ids.sizes(), expert_ids.options().dtype(kLong));
  Tensor src_rows = at::empty({rows}, expert_ids.options().dtype(kLong));
  Tensor offs = at::empty({num_local}, expert_ids.options().dtype(kInt));
  const int64_t chunks = permute_num_chunks(pairs);
  Tensor hist = at::zeros({chunks, num_local}, expert_ids.options().dtype(kInt));
  Tensor group_start = at::empty({num_local}, expert_ids.options().dtype(kInt));
  auto stream = at::cuda::getCurrentCUDAStream();

  if (rows > 0) {
    const Launch fill = fill_minus_one_launch(rows);
    fill_minus_one_kernel<<<fill.blocks, fill.threads, 0, stream>>>(src_rows.mutable_data_ptr<int64_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_permute_cuda", [&] {
    const index_t* ids = expert_ids.const_data_ptr<index_t>();
    const Launch per_chunk = permute_chunks_launch(pairs), scan = permute_scan_launch();
    permute_histogram_kernel<index_t><<<per_chunk.blocks, per_chunk.threads, 0, stream>>>(
        ids, pairs, num_experts, first_expert, num_local, hist.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    permute_scan_kernel<<<scan.blocks, scan.threads, 0, stream>>>(
        hist.mutable_data_ptr<int32_t>(), chunks, num_local, alignment, offs.mutable_data_ptr<int32_t>(),
        group_start.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    permute_assign_kernel<index_t><<<per_chunk.blocks, per_chunk.threads, 0, stream>>>(
        ids, pairs, first_expert, num_local, hist.const_data_ptr<int32_t>(), group_start.const_data_ptr<int32_t>(),
        dst_rows.mutable_data_ptr<int64_t>(), src_rows.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (rows > 0 && tokens.size(1) > 0) {
    const Launch gather = permute_gather_launch(rows);
    permute_gather_kernel<<<gather.blocks, gather.threads, 0, stream>>>(
        static_cast<const char*>(tokens.const_data_ptr()), tokens.stride(0) * tokens.element_size(),
        tokens.size(1) * tokens.element_size(), top_k, src_rows.const_data_ptr<int64_t>(),
        static_cast<char*>(permuted.mutable_data_ptr()), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {permuted, dst_rows, src_rows, offs};
}

} // namespace at::native

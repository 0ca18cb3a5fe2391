#pragma once

// What the host-compilable kernel bodies of the MoE CUDA kernels share (see
// cuda/MoERouting.cuh): a thread's place in a 1-D launch and the launch
// geometry.
//
// A kernel here is a thin __global__ shell that reads its ThreadPos and calls
// a body written as a C10_HOST_DEVICE function (__host__ __device__ under
// nvcc, a plain inline function for a host compiler). The same bodies are
// compiled into the CPU build, where a test driver walks every block and
// thread of the kernel's launch in sequence: the indexing, chunking, scans and
// reductions of the kernels are then tested on any machine. The launch
// geometry lives here so that the driver walks the grid the entry launches.

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace at::native::moe_cuda {

// blockIdx.x, blockDim.x, threadIdx.x and gridDim.x of one thread, int64 so
// that products of them do not overflow.
struct ThreadPos {
  int64_t block, threads, thread, blocks;
  C10_HOST_DEVICE int64_t global() const { return block * threads + thread; }
  C10_HOST_DEVICE int64_t stride() const { return blocks * threads; }
};

#if defined(__CUDACC__)
__device__ inline ThreadPos this_thread() {
  return {static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(blockDim.x), static_cast<int64_t>(threadIdx.x),
          static_cast<int64_t>(gridDim.x)};
}
#endif

struct Launch {
  int64_t blocks, threads;
};

// Grids of grid-stride kernels are capped at this many blocks; the host
// driver takes a smaller cap so that tests reach the stride loops.
constexpr int64_t kMaxGridBlocks = 65535;

// A grid for a kernel that strides over n items (at least one block).
inline Launch grid_stride_launch(int64_t n, int64_t threads, int64_t max_blocks = kMaxGridBlocks) {
  return {std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, max_blocks)), threads};
}

// A grid of one thread per item, uncapped (the kernel has no stride loop).
inline Launch one_thread_per_item_launch(int64_t n, int64_t threads) {
  return {std::max<int64_t>(1, (n + threads - 1) / threads), threads};
}

} // namespace at::native::moe_cuda

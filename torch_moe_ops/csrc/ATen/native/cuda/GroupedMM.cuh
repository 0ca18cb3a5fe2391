#pragma once

// The body of grouped_mm's zero-uncovered kernel (cuda/GroupedMM.cu), compiled
// for the device and for the host (see cuda/MoEThreadPos.cuh): the CPU build
// runs it over its whole launch grid in test/test_cuda_entries.py.

#include <ATen/native/cuda/MoEThreadPos.cuh>

#include <c10/macros/Macros.h>

#include <cstdint>

namespace at::native::moe_cuda {

constexpr int64_t kZeroUncoveredThreads = 256;
constexpr int64_t kZeroUncoveredMaxBlocks = 4096;

// Zeroes out[i, j] (a rows x cols view with strides rs, cs) wherever the index
// along the grouped dimension (i if split_rows else j) is >= *covered, the
// last group end read on the device (covered == nullptr: no groups, all of
// out). A grid-stride loop over the elements.
template <typename scalar_t>
C10_HOST_DEVICE inline void grouped_mm_zero_uncovered_thread(ThreadPos pos, scalar_t* out, int64_t rows, int64_t cols,
                                                             int64_t rs, int64_t cs, const int32_t* covered,
                                                             bool split_rows) {
  const int64_t limit = covered != nullptr ? static_cast<int64_t>(*covered) : 0;
  const int64_t total = rows * cols;
  for (int64_t idx = pos.global(); idx < total; idx += pos.stride()) {
    const int64_t i = idx / cols;
    const int64_t j = idx % cols;
    if ((split_rows ? i : j) >= limit) {
      out[i * rs + j * cs] = scalar_t(0);
    }
  }
}

inline Launch grouped_mm_zero_uncovered_launch(int64_t total, int64_t max_blocks = kZeroUncoveredMaxBlocks) {
  return grid_stride_launch(total, kZeroUncoveredThreads, max_blocks);
}

} // namespace at::native::moe_cuda

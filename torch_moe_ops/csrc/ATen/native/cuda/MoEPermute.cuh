#pragma once

// The bodies of _moe_permute's CUDA kernels (cuda/MoEPermute.cu), host and
// device code alike (see cuda/MoERouting.cuh).

#include <ATen/native/cuda/MoERouting.cuh>
#include <ATen/native/cuda/MoEThreadPos.cuh>

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace at::native::moe_cuda {

constexpr int64_t kScanThreads = 1024;  // the scan: one block, an expert per thread
// (token, slot) pairs per permute chunk: one thread assigns a chunk's rows in
// order, so chunks stay short.
constexpr int64_t kChunk = 64;

// A 16-byte unit of permute's row copy.
#if defined(__CUDACC__)
using Vec16 = uint4;
#else
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};
#endif

// (0) src_rows = -1; (1) per-chunk histograms, a chunk of kChunk (token,
// slot) pairs per thread; (2) one block scans experts x chunks into each
// chunk's first row in each group, the group starts and offs; (3) per-chunk
// row assignment in (token, slot) order; (4) a row gather over destination
// rows that also zeroes padding and unused rows: every output row is written
// once.

inline int64_t permute_num_chunks(int64_t pairs) {
  return std::max<int64_t>(1, (pairs + kChunk - 1) / kChunk);
}

C10_HOST_DEVICE inline void fill_minus_one_thread(ThreadPos pos, int64_t* p, int64_t n) {
  for (int64_t i = pos.global(); i < n; i += pos.stride()) p[i] = -1;
}

inline Launch fill_minus_one_launch(int64_t n, int64_t max_blocks = kMaxGridBlocks) {
  return grid_stride_launch(n, kThreads, max_blocks);
}

// (1) The histogram of the thread's chunk into hist (chunks x num_local).
// Returns the first pair of the chunk whose expert id is outside
// [0, num_experts), else -1: the kernel asserts on it.
template <typename index_t>
C10_HOST_DEVICE inline int64_t permute_histogram_thread(ThreadPos pos, const index_t* ids, int64_t pairs,
                                                        int64_t num_experts, int64_t first_expert, int64_t num_local,
                                                        int32_t* hist) {
  const int64_t c = pos.global();
  if (c * kChunk >= pairs) return -1;
  const int64_t end = pairs < (c + 1) * kChunk ? pairs : (c + 1) * kChunk;
  for (int64_t i = c * kChunk; i < end; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    if (e < 0 || e >= num_experts) return i;
    const int64_t local = e - first_expert;
    if (local >= 0 && local < num_local) ++hist[c * num_local + local];
  }
  return -1;
}

inline Launch permute_chunks_launch(int64_t pairs) {
  return one_thread_per_item_launch(permute_num_chunks(pairs), kThreads);
}

// (2), first phase, every thread: expert e's per-chunk counts become each
// chunk's offset inside the group (exclusive prefix); offs[e] keeps the
// group's count for the second phase.
C10_HOST_DEVICE inline void permute_scan_counts_thread(ThreadPos pos, int32_t* hist, int64_t chunks, int64_t num_local,
                                                       int32_t* offs) {
  for (int64_t e = pos.thread; e < num_local; e += pos.threads) {
    int32_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = hist[c * num_local + e];
      hist[c * num_local + e] = running;
      running += n;
    }
    offs[e] = running;
  }
}

// (2), second phase, after a barrier: thread 0 places the groups one after
// another, each padded to a multiple of alignment rows.
C10_HOST_DEVICE inline void permute_scan_place_thread(ThreadPos pos, int64_t num_local, int64_t alignment,
                                                      int32_t* offs, int32_t* group_start) {
  if (pos.thread != 0) return;
  int64_t start = 0;
  for (int64_t e = 0; e < num_local; ++e) {
    const int64_t end = (start + offs[e] + alignment - 1) / alignment * alignment;
    group_start[e] = static_cast<int32_t>(start);
    offs[e] = static_cast<int32_t>(end);
    start = end;
  }
}

inline Launch permute_scan_launch() {
  return {1, kScanThreads};
}

// (3) The rows of the thread's chunk, in (token, slot) order.
template <typename index_t>
C10_HOST_DEVICE inline void permute_assign_thread(ThreadPos pos, const index_t* ids, int64_t pairs,
                                                  int64_t first_expert, int64_t num_local, const int32_t* hist,
                                                  const int32_t* group_start, int64_t* dst, int64_t* src) {
  const int64_t c = pos.global();
  if (c * kChunk >= pairs) return;
  const int64_t end = pairs < (c + 1) * kChunk ? pairs : (c + 1) * kChunk;
  for (int64_t i = c * kChunk; i < end; ++i) {
    const int64_t local = static_cast<int64_t>(ids[i]) - first_expert;
    if (local < 0 || local >= num_local) {
      dst[i] = -1;
      continue;
    }
    // Rows already taken in this group by the chunk: a short scan back over
    // the chunk keeps the per-thread state O(1).
    int64_t rank = 0;
    for (int64_t p = c * kChunk; p < i; ++p) rank += (static_cast<int64_t>(ids[p]) - first_expert == local);
    const int64_t r = static_cast<int64_t>(group_start[local]) + hist[c * num_local + local] + rank;
    dst[i] = r;
    src[r] = i;
  }
}

// (4) Whether a row copy can move 16 bytes at a time.
C10_HOST_DEVICE inline bool permute_gather_vectorised(const char* tokens, int64_t in_stride_bytes, int64_t row_bytes,
                                                      const char* out) {
  return row_bytes % 16 == 0 && in_stride_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(tokens) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

// (4) A block per destination row (striding over rows), threads across the
// row: the source token's row, or zeros for padding and unused rows.
C10_HOST_DEVICE inline void permute_gather_thread(ThreadPos pos, const char* tokens, int64_t in_stride_bytes,
                                                  int64_t row_bytes, int64_t top_k, const int64_t* src, char* out,
                                                  int64_t rows) {
  const bool vec = permute_gather_vectorised(tokens, in_stride_bytes, row_bytes, out);
  for (int64_t r = pos.block; r < rows; r += pos.blocks) {
    const int64_t s = src[r];
    char* o = out + r * row_bytes;
    const char* in = s >= 0 ? tokens + (s / top_k) * in_stride_bytes : nullptr;
    if (vec) {
      for (int64_t i = pos.thread; i < row_bytes / 16; i += pos.threads) {
        reinterpret_cast<Vec16*>(o)[i] = in != nullptr ? reinterpret_cast<const Vec16*>(in)[i] : Vec16{};
      }
    } else {
      for (int64_t i = pos.thread; i < row_bytes; i += pos.threads) o[i] = in != nullptr ? in[i] : char(0);
    }
  }
}

inline Launch permute_gather_launch(int64_t rows, int64_t max_blocks = kMaxGridBlocks) {
  return {std::max<int64_t>(1, std::min<int64_t>(rows, max_blocks)), kThreads};
}

} // namespace at::native::moe_cuda

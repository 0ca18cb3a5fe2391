#pragma once

// The bodies of the CUDA kernels of _moe_unpermute and its backward
// (cuda/MoEUnpermute.cu), host and device code alike (see
// cuda/MoERouting.cuh).

#include <ATen/native/cuda/MoERouting.cuh>
#include <ATen/native/cuda/MoEThreadPos.cuh>

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace at::native::moe_cuda {

static_assert((kThreads & (kThreads - 1)) == 0, "the weight-gradient tree reduction halves the block");

// Reads a weight stored as float32 or as the data dtype.
template <typename scalar_t, typename acc_t>
struct WeightReader {
  const float* f32;
  const scalar_t* same;
  C10_HOST_DEVICE acc_t operator()(int64_t i) const {
    return f32 != nullptr ? static_cast<acc_t>(f32[i]) : static_cast<acc_t>(same[i]);
  }
};

// A block per token t, threads across the hidden dimension: the sum of the
// token's rows in slot order, rounded once. Returns false when a dst row is
// outside [-1, rows): the kernel asserts on it.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline bool unpermute_thread(ThreadPos pos, const scalar_t* in, int64_t in_stride, int64_t rows,
                                             const int64_t* dst, int64_t top_k, int64_t hidden,
                                             WeightReader<scalar_t, acc_t> w, bool weighted, scalar_t* out) {
  const int64_t t = pos.block;
  for (int64_t h = pos.thread; h < hidden; h += pos.threads) {
    acc_t acc = 0;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t r = dst[t * top_k + j];
      if (r < -1 || r >= rows) return false;
      if (r < 0) continue;
      const acc_t x = static_cast<acc_t>(in[r * in_stride + h]);
      acc += weighted ? mul_rn(w(t * top_k + j), x) : x;
    }
    out[t * hidden + h] = static_cast<scalar_t>(acc);
  }
  return true;
}

inline Launch unpermute_launch(int64_t tokens) {
  return {tokens, kThreads};
}

// unpermute_backward, rows: a block per entry p of the stably sorted dst_rows;
// the first block of each run of equal rows sums the gradients of the slots
// that read the row, in slot order, rounded once (permute reads each row at
// most once; any other index may repeat rows, and a write per slot would then
// race). Returns false when a row is outside [-1, rows).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline bool unpermute_backward_rows_thread(ThreadPos pos, const scalar_t* g, const int64_t* sorted_rows,
                                                           const int64_t* slot_of, int64_t n, int64_t rows,
                                                           int64_t top_k, int64_t hidden,
                                                           WeightReader<scalar_t, acc_t> w, bool weighted,
                                                           scalar_t* gp) {
  const int64_t p = pos.block;
  const int64_t r = sorted_rows[p];
  if (r < -1 || r >= rows) return false;
  if (r < 0 || (p > 0 && sorted_rows[p - 1] == r)) return true;
  for (int64_t h = pos.thread; h < hidden; h += pos.threads) {
    acc_t acc = 0;
    for (int64_t q = p; q < n && sorted_rows[q] == r; ++q) {
      const int64_t i = slot_of[q];
      const acc_t gv = static_cast<acc_t>(g[(i / top_k) * hidden + h]);
      acc += weighted ? mul_rn(w(i), gv) : gv;
    }
    gp[r * hidden + h] = static_cast<scalar_t>(acc);
  }
  return true;
}

// unpermute_backward, weights: a block per (token, slot) i; this thread's
// part of <grad_output[t], permuted[dst[i]]> (0 for a dropped slot), summed
// over the block by block_tree_reduce_step.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t unpermute_backward_weights_partial(ThreadPos pos, const scalar_t* g, const int64_t* dst,
                                                                int64_t top_k, int64_t hidden, const scalar_t* x) {
  const int64_t i = pos.block;
  const int64_t t = i / top_k;
  const int64_t r = dst[i];
  acc_t dot = 0;
  if (r >= 0) {
    for (int64_t h = pos.thread; h < hidden; h += pos.threads) {
      dot += mul_rn(static_cast<acc_t>(g[t * hidden + h]), static_cast<acc_t>(x[r * hidden + h]));
    }
  }
  return dot;
}

// One level of a block's tree reduction over partial[0, 2s): a fixed order,
// so the sum does not depend on scheduling. Levels are separated by barriers.
template <typename acc_t>
C10_HOST_DEVICE inline void block_tree_reduce_step(ThreadPos pos, acc_t* partial, int64_t s) {
  if (pos.thread < s) partial[pos.thread] += partial[pos.thread + s];
}

inline Launch unpermute_backward_launch(int64_t slots) {
  return {slots, kThreads};
}

} // namespace at::native::moe_cuda

#pragma once

// What the CUDA kernels of the MoE routing ops share (cuda/MoEPermute.cuh,
// cuda/MoEUnpermute.cuh, cuda/MoERouterTopk.cuh). Each op's kernel bodies are
// written one function per thread (or per phase between two __syncthreads),
// compiled for the device by nvcc and for the host by any C++ compiler (see
// cuda/MoEThreadPos.cuh). The host build runs them over every block and
// thread of the launch in test/test_routing_device_logic.py and compares with
// the CPU kernels. What that walk cannot show, and a GPU run must: that the
// barriers between the phases are where the kernels put them (the walk runs
// phases one after another), atomics (the walk adds in order), the memory
// model, the device's exp, and the launch limits of a real device.
//
// Floating-point: every product that feeds a sum goes through mul_rn, which
// nvcc may not contract into an FMA (it does so by default for a * b + c,
// rounding once where the CPU kernels round twice); so the device gives the
// bits of this code on the host. Only exp differs between the two (the
// device's expf is within 2 ulp, glibc's within 1): router weights agree to
// rounding, everything else bit for bit.

#include <ATen/native/cuda/MoEThreadPos.cuh>

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda/std/limits>
#endif

namespace at::native::moe_cuda {

// Threads of the row kernels (permute's gather, unpermute and its backward),
// across the hidden dimension; shared by the launches and the host walk.
constexpr int64_t kThreads = 256;

// ------------------------------------------------------------------ arithmetic

template <typename T>
C10_HOST_DEVICE inline T exp_(T x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline bool isnan_(T x) {
#if defined(__CUDA_ARCH__)
  return isnan(x);
#else
  return std::isnan(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T neg_inf() {
#if defined(__CUDA_ARCH__)
  return -::cuda::std::numeric_limits<T>::infinity();
#else
  return -std::numeric_limits<T>::infinity();
#endif
}

// std::max as the CPU kernel uses it: a NaN b leaves a.
template <typename T>
C10_HOST_DEVICE inline T max_(T a, T b) {
  return a < b ? b : a;
}

// a * b rounded on its own (see the top comment).
template <typename T>
C10_HOST_DEVICE inline T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

} // namespace at::native::moe_cuda

#pragma once

// Brgemm engine of the CPU grouped mm kernel (cpu/GroupedMMKernel.cpp), for
// bfloat16 and float16 on CPUs where cpublas::could_pack holds (AMX-BF16,
// AMX-FP16): there ATen's batch-reduce GEMM (oneDNN's ukernel) runs the
// tiles on the matrix units, which the AVX-512 micro-kernels cannot use.
// Without packing (AVX-512 only, e.g. Zen 4) brgemm ran at 0.18-0.27x of the
// dense rate on routed shapes against 0.56-0.89x for the micro-kernels, so
// the kernel picks this engine only where the CPU packs.
//
// A tile (one group, kBrgemmNB output columns) packs its weight block once
// (K x NB, VNNI pairs along K: cpublas::pack) and reuses it for every row
// block of its group, as the micro-kernels reuse their streamed block. Each
// brgemm call sums all of K into a float32 block, rounded once by the shared
// epilogue (bias added there), so the bits depend on the shapes and the CPU,
// never on the thread count.
//
// The engine is written against a primitives type (pack, gemm, release), so
// that its staging, padding and epilogue can be checked on any CPU against a
// scalar model of the same contract, or through float32 brgemm (no packing).

#include <ATen/native/CPUBlas.h>
#include <ATen/native/cpu/GroupedMMKernelUtils.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace at::native {
namespace {

// Output columns per tile (one packed weight block) and rows per brgemm call:
// a 32 x 64 float32 block (8 KB) and a K x 64 16-bit weight block stay in L2.
constexpr int64_t kBrgemmNB = 64;
constexpr int64_t kBrgemmMB = 32;

// ATen's cpublas::pack / brgemm. float32 takes B unpacked (is_vnni=false)
// and needs no AMX; the kernel instantiates the 16-bit types only.
struct CpublasBrgemm {
  template <typename T>
  static constexpr bool vnni() {
    return !std::is_same_v<T, float>;
  }
  template <typename T>
  static bool available() {
    // could_pack asks oneDNN about the CPU, and every grouped mm call asks:
    // the answer never changes within a process.
    static const bool ok = std::is_same_v<T, float> || cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
    return ok;
  }
  // out (K x N, packed, leading dimension N) from row-major in (ld_in).
  template <typename T>
  static void pack(int64_t k, int64_t n, const T* in, int64_t ld_in, T* out) {
    const auto dt = c10::CppTypeToScalarType<T>::value;
    cpublas::pack(k, n, ld_in, n, dt, dt, in, out);
  }
  // C (M x N, ldc) = A (M x K, lda) B (K x N, ldb; packed when vnni).
  template <typename T>
  static void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                   float* c, int64_t ldc) {
    cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/false, a, b, c, /*is_vnni=*/vnni<T>());
  }
  template <typename T>
  static void release() {
    cpublas::brgemm_release(vnni<T>());
  }
};

constexpr int64_t brgemm_k(int64_t k, bool vnni) {
  // VNNI packs K in pairs (two 16-bit values per 32-bit lane): an odd K is
  // padded with a zero row of B and a zero column of A.
  return vnni ? (k + 1) / 2 * 2 : k;
}

template <typename Brgemm, typename scalar_t, typename out_t>
void brgemm_scratch(const Problem<scalar_t, out_t, float>& p, const Tile& t, ScratchBytes& s) {
  const int64_t kp = brgemm_k(p.k, Brgemm::template vnni<scalar_t>());
  const auto e = static_cast<int64_t>(sizeof(scalar_t));
  // a: a copied row block; b: the staged row-major weight block, then its
  // packed copy; acc: one float32 row block.
  s.at_least(std::min(kBrgemmMB, p.m) * kp * e, 2 * kp * t.nb * e, kBrgemmMB * t.nb * 4);
}

template <typename Brgemm, typename scalar_t, typename out_t>
void run_tile_brgemm(const Problem<scalar_t, out_t, float>& p, const Tile& t, ThreadBuffers& buf) {
  constexpr bool kVnni = Brgemm::template vnni<scalar_t>();
  const int64_t k = p.k;
  const int64_t nb = t.nb;
  const int64_t kp = brgemm_k(k, kVnni);
  scalar_t* staged = workspace<scalar_t>(buf.b, 2 * kp * nb);
  scalar_t* packed = staged + kp * nb;

  // The weight block row-major with unit column stride: in place when the
  // caller's B already is (K, N) storage with even K, else staged (the
  // (G, N, K) storage of real models' weights is transposed here, 16 x 16).
  const scalar_t* b = p.b + t.n0 * p.b_cs;
  const scalar_t* rows = staged;
  int64_t ld_rows = nb;
  if (p.b_idx == nullptr && p.b_cs == 1 && kp == k && k > 1 && p.b_rs >= nb) {
    rows = b;
    ld_rows = p.b_rs;
  } else {
    if (p.b_idx != nullptr) {
      gather_rows(staged, nb, b, p.b_idx, p.b_rs, p.b_cs, k, nb, nb);
    } else {
      gather_block(staged, nb, b, p.b_rs, p.b_cs, k, nb, nb);
    }
    std::fill(staged + k * nb, staged + kp * nb, scalar_t(0));
  }
  const scalar_t* b_ptr = rows;
  int64_t ldb = ld_rows;
  if constexpr (kVnni) {
    Brgemm::template pack<scalar_t>(kp, nb, rows, ld_rows, packed);
    b_ptr = packed;
    ldb = nb;
  }

  float* acc = workspace<float>(buf.acc, kBrgemmMB * nb);
  const bool a_in_place = p.a_cs == 1 && !p.a_gathered() && kp == k && p.m > 1 && p.a_rs >= k;
  for (int64_t m0 = 0; m0 < p.m; m0 += kBrgemmMB) {
    const int64_t mb = std::min(kBrgemmMB, p.m - m0);
    const scalar_t* a_ptr;
    int64_t lda;
    if (a_in_place) {
      a_ptr = p.a + m0 * p.a_rs;
      lda = p.a_rs;
    } else {
      scalar_t* w = workspace<scalar_t>(buf.a, mb * kp);
      load_a_block(w, kp, p, m0, mb, 0, k);
      a_ptr = w;
      lda = kp;
    }
    Brgemm::template gemm<scalar_t>(mb, nb, kp, a_ptr, lda, b_ptr, ldb, acc, nb);
    store_tile<out_t>(p, m0, mb, t.n0, nb, acc, nb);
  }
}

} // namespace
} // namespace at::native

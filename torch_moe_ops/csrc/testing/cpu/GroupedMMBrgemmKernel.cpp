// The per-capability half of torch.ops.moe_ops_testing.grouped_mm_brgemm
// (testing/GroupedMMBrgemm.cpp): the engine header is native/cpu/ code,
// compiled once per CPU capability like the kernel that uses it.

#include <testing/GroupedMMBrgemm.h>

#include <ATen/native/cpu/GroupedMMBrgemm.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <type_traits>
#include <vector>

namespace at::native {
namespace {

struct ReferenceBrgemm {
  template <typename T>
  static constexpr bool vnni() {
    return !std::is_same_v<T, float>;
  }
  template <typename T>
  static bool available() {
    return true;
  }
  // Pairs of K rows interleaved: out[(k / 2) * 2n + 2j + k % 2] = in[k, j].
  template <typename T>
  static void pack(int64_t k, int64_t n, const T* in, int64_t ld_in, T* out) {
    TORCH_CHECK(k % 2 == 0, "ReferenceBrgemm::pack: K must be even (the engine pads it), got ", k);
    for (int64_t r = 0; r < k; ++r) {
      for (int64_t j = 0; j < n; ++j) out[(r / 2) * 2 * n + 2 * j + r % 2] = in[r * ld_in + j];
    }
  }
  template <typename T>
  static void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                   float* c, int64_t ldc) {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        float sum = 0;
        for (int64_t r = 0; r < k; ++r) {
          const T bv = vnni<T>() ? b[(r / 2) * 2 * ldb + 2 * j + r % 2] : b[r * ldb + j];
          sum += static_cast<float>(a[i * lda + r]) * static_cast<float>(bv);
        }
        c[i * ldc + j] = sum;
      }
    }
  }
  template <typename T>
  static void release() {}
};

template <typename Brgemm, typename scalar_t, typename out_t>
void run_one_group(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& bias,
                   const std::optional<Tensor>& a_index, Tensor& out) {
  TORCH_CHECK(Brgemm::template available<scalar_t>(),
      "grouped_mm_brgemm: cpublas::could_pack(", mat_a.scalar_type(),
      ") is false on this CPU: the packed brgemm path needs AMX");
  Problem<scalar_t, out_t, float> p{};
  p.m = out.size(0);
  p.n = out.size(1);
  p.k = mat_a.size(1);
  p.a = mat_a.const_data_ptr<scalar_t>();
  p.a_rs = mat_a.stride(0);
  p.a_cs = mat_a.stride(1);
  p.b = mat_b.const_data_ptr<scalar_t>();
  p.b_rs = mat_b.stride(0);
  p.b_cs = mat_b.stride(1);
  p.c = out.data_ptr<out_t>();
  p.c_rs = out.stride(0);
  p.bias = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  p.a_row_idx = a_index.has_value() ? a_index->const_data_ptr<int64_t>() : nullptr;
  if (p.m == 0 || p.n == 0) return;
  std::vector<Tile> tiles;
  for (int64_t n0 = 0; n0 < p.n; n0 += kBrgemmNB) tiles.push_back({0, n0, std::min(kBrgemmNB, p.n - n0), 0.0});
  if (p.k == 0) {
    for (const Tile& t : tiles) store_bias_only<out_t>(p, t.n0, t.nb);
    return;
  }
  ScratchBytes need;
  for (const Tile& t : tiles) brgemm_scratch<Brgemm>(p, t, need);
  const Tensor scratch = at::empty({need.slice()}, at::kByte);
  ThreadBuffers buf = need.regions(reinterpret_cast<char*>(scratch.data_ptr()));
  for (const Tile& t : tiles) run_tile_brgemm<Brgemm>(p, t, buf);
  Brgemm::template release<scalar_t>();
}

void grouped_mm_brgemm_kernel(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& bias,
                              const std::optional<Tensor>& a_index, Tensor& out, bool reference) {
  const ScalarType dtype = mat_a.scalar_type();
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (out.scalar_type() == dtype) {
      if (reference) {
        run_one_group<ReferenceBrgemm, scalar_t, scalar_t>(mat_a, mat_b, bias, a_index, out);
      } else {
        run_one_group<CpublasBrgemm, scalar_t, scalar_t>(mat_a, mat_b, bias, a_index, out);
      }
    } else if constexpr (!std::is_same_v<scalar_t, float>) {
      if (reference) {
        run_one_group<ReferenceBrgemm, scalar_t, float>(mat_a, mat_b, bias, a_index, out);
      } else {
        run_one_group<CpublasBrgemm, scalar_t, float>(mat_a, mat_b, bias, a_index, out);
      }
    }
  };
  if (dtype == kFloat) {
    run(float{});
  } else if (dtype == kBFloat16) {
    run(BFloat16{});
  } else {
    run(Half{});
  }
}

} // namespace

ALSO_REGISTER_AVX512_DISPATCH(grouped_mm_brgemm_stub, &grouped_mm_brgemm_kernel)

} // namespace at::native

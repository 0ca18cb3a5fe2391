// Test-only op, torch.ops.moe_ops_testing.grouped_mm_brgemm: the brgemm
// engine of the CPU grouped mm kernel (native/cpu/GroupedMMBrgemm.h) on one
// group, (M, K) x (K, N), tile by tile as the kernel runs it, through either
// set of primitives:
//   "cpublas": ATen's cpublas::pack / brgemm, as the kernel calls them:
//     float32 on any x86 CPU (brgemm without packing), bfloat16 / float16
//     only where cpublas::could_pack holds (AMX; refused elsewhere);
//   "reference": a scalar model of the same contract (B packed in pairs
//     along K, as VNNI), so that the engine's staging of strided and
//     transposed weights, gathered rows, odd-K padding and epilogue run on
//     any CPU.
// The kernel itself picks the engine only where could_pack holds. Not part
// of the moe_ops library and not carried upstream.

#include <testing/GroupedMMBrgemm.h>

#include <ATen/native/CPUBlas.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace at::native {

DEFINE_DISPATCH(grouped_mm_brgemm_stub);

namespace {

Tensor grouped_mm_brgemm(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& a_index, std::optional<ScalarType> out_dtype,
                         c10::string_view primitives) {
  TORCH_CHECK_VALUE(mat_a.dim() == 2 && mat_b.dim() == 2, "grouped_mm_brgemm: mat_a and mat_b must be 2-D, got ",
      mat_a.sizes(), " and ", mat_b.sizes());
  TORCH_CHECK_VALUE(mat_a.size(1) == mat_b.size(0), "grouped_mm_brgemm: mat_a ", mat_a.sizes(), " and mat_b ",
      mat_b.sizes(), " differ in K");
  const auto dtype = mat_a.scalar_type();
  TORCH_CHECK_VALUE(dtype == mat_b.scalar_type() && (dtype == kFloat || dtype == kBFloat16 || dtype == kHalf),
      "grouped_mm_brgemm: mat_a and mat_b must both be float32, bfloat16 or float16, got ", dtype, " and ",
      mat_b.scalar_type());
  const ScalarType out_t = out_dtype.value_or(dtype);
  TORCH_CHECK_VALUE(out_t == dtype || out_t == kFloat, "grouped_mm_brgemm: out_dtype must be ", dtype,
      " or float32, got ", out_t);
  const int64_t n = mat_b.size(1);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == kFloat &&
        bias->is_contiguous(), "grouped_mm_brgemm: bias must be a contiguous float32 (", n, ",), got ",
        bias->scalar_type(), " ", bias->sizes());
  }
  int64_t m = mat_a.size(0);
  if (a_index.has_value()) {
    TORCH_CHECK_VALUE(a_index->dim() == 1 && a_index->scalar_type() == kLong && a_index->is_contiguous(),
        "grouped_mm_brgemm: a_index must be a contiguous 1-D int64 tensor, got ", a_index->scalar_type(), " ",
        a_index->sizes());
    const int64_t* idx = a_index->const_data_ptr<int64_t>();
    for (int64_t r = 0; r < a_index->numel(); ++r) {
      TORCH_CHECK_INDEX(idx[r] >= -1 && idx[r] < mat_a.size(0), "grouped_mm_brgemm: a_index[", r, "]=", idx[r],
          " is out of range for mat_a with ", mat_a.size(0), " rows (-1 reads zeros)");
    }
    m = a_index->numel();
  }
  const bool reference = primitives == "reference";
  TORCH_CHECK_VALUE(reference || primitives == "cpublas",
      "grouped_mm_brgemm: primitives must be \"cpublas\" or \"reference\", got \"", std::string(primitives), "\"");
  Tensor out = at::empty({m, n}, mat_a.options().dtype(out_t));
  grouped_mm_brgemm_stub(kCPU, mat_a, mat_b, bias, a_index, out, reference);
  return out;
}

// Whether the kernel would choose the brgemm engine for this dtype here.
bool brgemm_could_pack(ScalarType dtype) {
  return cpublas::could_pack(dtype);
}

} // namespace
} // namespace at::native

TORCH_LIBRARY_FRAGMENT(moe_ops_testing, m) {
  m.def(
      "grouped_mm_brgemm(Tensor mat_a, Tensor mat_b, Tensor? bias=None, Tensor? a_index=None, "
      "ScalarType? out_dtype=None, str primitives=\"reference\") -> Tensor");
  m.def("brgemm_could_pack(ScalarType dtype) -> bool", &at::native::brgemm_could_pack);
}

TORCH_LIBRARY_IMPL(moe_ops_testing, CPU, m) {
  m.impl("grouped_mm_brgemm", &at::native::grouped_mm_brgemm);
}

// Test-only op, torch.ops.moe_ops_testing.fp8_decode: the float8 decoders of
// ATen/native/cpu/MoEFp8Avx512.h on a run of codes (Fp8Decode.h). Not part
// of the moe_ops library.

#include <testing/Fp8Decode.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace at::native {

DEFINE_DISPATCH(fp8_decode_stub);

namespace {

std::tuple<Tensor, Tensor> fp8_decode(const Tensor& codes, bool e5m2, c10::string_view decoder) {
  TORCH_CHECK_VALUE(codes.dim() == 1 && codes.scalar_type() == kByte && codes.is_contiguous(),
      "moe_ops_testing.fp8_decode: codes must be a contiguous 1-D uint8 tensor, got ", codes.scalar_type(), " ",
      codes.sizes(), " with strides ", codes.strides());
  const bool byte_tables = decoder == "byte_tables";
  TORCH_CHECK_VALUE(byte_tables || decoder == "byte_arithmetic",
      "moe_ops_testing.fp8_decode: decoder must be \"byte_arithmetic\" or \"byte_tables\", got \"",
      std::string(decoder), "\"");
  Tensor words = at::empty({codes.numel()}, codes.options().dtype(kShort));
  Tensor bytes = at::empty({2, codes.numel()}, codes.options());
  TORCH_CHECK(fp8_decode_stub(kCPU, codes, e5m2, byte_tables, words, bytes),
      "moe_ops_testing.fp8_decode: the decoders are in the AVX512 build of the kernels only, and this process "
      "runs another (ATEN_CPU_CAPABILITY, or a CPU without AVX-512)");
  return {words, bytes};
}

} // namespace
} // namespace at::native

TORCH_LIBRARY_FRAGMENT(moe_ops_testing, m) {
  m.def("fp8_decode(Tensor codes, bool e5m2, str decoder) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_ops_testing, CPU, m) {
  m.impl("fp8_decode", &at::native::fp8_decode);
}

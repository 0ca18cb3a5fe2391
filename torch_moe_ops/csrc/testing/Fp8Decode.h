#pragma once

// Test-only: the float8 -> bfloat16 decoders of ATen/native/cpu/MoEFp8Avx512.h
// (testing/Fp8Decode.cpp's op, testing/cpu/Fp8DecodeKernel.cpp's
// per-capability kernel). The kernels pick a decoder by the CPU; this runs
// either on any codes, so that both are checked on a CPU that has both.

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>

namespace at::native {

// words (n,) int16 = decoder.run over codes (n,) uint8, 64 at a time;
// bytes (2, n) uint8 = decoder's low and high bytes of the same. False
// where the build has no decoders (not the AVX512 one).
using fp8_decode_fn = bool (*)(const Tensor& codes, bool e5m2, bool byte_tables, Tensor& words, Tensor& bytes);
DECLARE_DISPATCH(fp8_decode_fn, fp8_decode_stub);

} // namespace at::native

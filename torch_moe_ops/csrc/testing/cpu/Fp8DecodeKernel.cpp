// The per-capability half of torch.ops.moe_ops_testing.fp8_decode
// (testing/Fp8Decode.cpp): the decoders are native/cpu/ code, compiled once
// per CPU capability like the kernels that use them.

#include <testing/Fp8Decode.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/native/cpu/MoEFp8Avx512.h>
#endif

#include <cstdint>

namespace at::native {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive on unmasked intrinsics
#endif

template <typename Decoder>
inline __attribute__((always_inline)) void decode_with(const Decoder& decode, const uint8_t* src, int64_t n,
                                                       int16_t* words, uint8_t* lo, uint8_t* hi) {
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 m = moe_lanes64(n, i);
    __m512i v[2], l, h;
    decode.run(src + i, m, v);
    _mm512_mask_storeu_epi16(words + i, static_cast<__mmask32>(m), v[0]);
    _mm512_mask_storeu_epi16(words + i + 32, static_cast<__mmask32>(m >> 32), v[1]);
    decode(_mm512_maskz_loadu_epi8(m, src + i), l, h);
    _mm512_mask_storeu_epi8(lo + i, m, l);
    _mm512_mask_storeu_epi8(hi + i, m, h);
  }
}

template <bool kE5M2>
MOE_FP8_VBMI void decode_byte_tables(const uint8_t* src, int64_t n, int16_t* words, uint8_t* lo, uint8_t* hi) {
  decode_with(MoEFp8ToBf16Vbmi<kE5M2>{}, src, n, words, lo, hi);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

bool fp8_decode_kernel(const Tensor& codes, bool e5m2, bool byte_tables, Tensor& words, Tensor& bytes) {
#if defined(CPU_CAPABILITY_AVX512)
  const uint8_t* src = codes.const_data_ptr<uint8_t>();
  const int64_t n = codes.numel();
  int16_t* w = words.data_ptr<int16_t>();
  uint8_t* lo = bytes.data_ptr<uint8_t>();
  uint8_t* hi = lo + n;
  if (byte_tables) {
    TORCH_CHECK(moe_cpu_has_avx512_vbmi(), "moe_ops_testing.fp8_decode: decoder \"byte_tables\" needs a CPU with "
                "AVX512_VBMI, and this one has none");
    e5m2 ? decode_byte_tables<true>(src, n, w, lo, hi) : decode_byte_tables<false>(src, n, w, lo, hi);
  } else {
    moe_with_fp8_decoder(e5m2, [&](const auto& decode) { decode_with(decode, src, n, w, lo, hi); });
  }
  return true;
#else
  return false;
#endif
}

} // namespace

ALSO_REGISTER_AVX512_DISPATCH(fp8_decode_stub, &fp8_decode_kernel)

} // namespace at::native

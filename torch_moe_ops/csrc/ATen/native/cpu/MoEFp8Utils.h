#pragma once

// float8 decoding shared by the CPU kernels of this directory (quantize,
// scaled grouped mm): exact tables and the e8m0 scale format. In the
// CPU_CAPABILITY namespace, so each capability's build keeps its own copy.

#include <c10/core/ScalarType.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/bit_cast.h>

#include <array>
#include <cstdint>
#include <limits>

namespace at::native {
inline namespace CPU_CAPABILITY {

// 256-entry float8 -> float32 table (e4m3fn or e5m2), from c10's exact conversions.
inline const float* moe_fp8_table(ScalarType t) {
  static const auto tables = [] {
    std::array<std::array<float, 256>, 2> out{};
    for (int i = 0; i < 256; ++i) {
      out[0][i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
      out[1][i] = static_cast<float>(c10::Float8_e5m2(static_cast<uint8_t>(i), c10::Float8_e5m2::from_bits()));
    }
    return out;
  }();
  return t == kFloat8_e5m2 ? tables[1].data() : tables[0].data();
}

// e8m0 -> float32: 2^(b - 127); 0 is the denormal 2^-127, 0xFF is NaN.
inline float moe_e8m0_to_float(uint8_t b) {
  if (b == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  if (b == 0) return c10::bit_cast<float>(0x00400000u);
  return c10::bit_cast<float>(static_cast<uint32_t>(b) << 23);
}

} // namespace CPU_CAPABILITY
} // namespace at::native

// bf16 <-> fp32 conversions shared by the CPU kernels. bf16 is the upper half of an fp32;
// rounding to bf16 is round-to-nearest-even, NaN stays a (quiet) NaN. Branch-free, so loops
// over them vectorise.
#pragma once

#include <cstdint>
#include <cstring>

namespace pagoda_bf16 {

inline float to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t from_f32(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint16_t nan = static_cast<uint16_t>((bits >> 16) | 0x40);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);  // ties to even
  const uint16_t rounded = static_cast<uint16_t>((bits + rounding) >> 16);
  return (bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
}

}  // namespace pagoda_bf16

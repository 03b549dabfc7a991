// fp8 e4m3 (the "fn" variant: no infinities, 0x7F / 0xFF are NaN, largest finite 448) <-> fp32,
// for the KV cache's --kv-cache-dtype fp8 (Micikevicius et al., "FP8 Formats for Deep
// Learning", 2022). Unscaled: a value is stored as itself, rounded to 3 mantissa bits.
//
// Invariants: from_f32 rounds to nearest, ties to even, as torch's .to(torch.float8_e4m3fn)
// does, and saturates (|x| >= 464 and +-inf become +-448; NaN becomes +-448 too, where torch
// would keep NaN), so a written cache never holds a NaN; to_f32 is exact. Branch-free, so
// loops over them vectorise.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pagoda_fp8 {

constexpr uint32_t kMaxFinite = 0x7e;      // 448
constexpr uint32_t kMinNormal = 0x3c800000u;  // 2^-6 as fp32 bits
// e4m3 bits moved under an fp16's exponent read as that fp16 are the value / 256 (subnormals
// included: e4m3 subnormals land on fp16 subnormals), so fp16 hardware conversion widens them.
constexpr float kFp16Scale = 256.0f;

// Exact: a normal e4m3 (exponent field e > 0) is rebuilt as an fp32 with exponent e - 7 + 127
// and the 3 mantissa bits on top; a subnormal one is m x 2^-9, a normal fp32. No step
// computes on an fp32 subnormal, which costs a microcode assist per instruction on Intel cores.
inline float to_f32(uint8_t b) {
  const uint32_t e = (b >> 3) & 0xfu, m = b & 7u;
  const uint32_t normal_bits = ((e + 120u) << 23) | (m << 20);
  float normal;
  std::memcpy(&normal, &normal_bits, sizeof(normal));
  const float mag = e != 0 ? normal : static_cast<float>(m) * 0.001953125f;  // 2^-9
  return (b & 0x80) != 0 ? -mag : mag;
}

inline uint8_t from_f32(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t a = bits & 0x7fffffffu;
  // Normal range: keep 3 mantissa bits (round to nearest even), rebias the exponent 127 -> 7.
  const uint32_t rounded = a + 0x7ffffu + ((a >> 20) & 1u);
  const uint32_t normal = (rounded >> 20) - (120u << 3);
  // Below 2^-6: a multiple of 2^-9; fp32 adds of 1.5 * 2^23 round to an integer, ties to even.
  float af;
  std::memcpy(&af, &a, sizeof(af));
  const float m = (af * 512.0f + 12582912.0f) - 12582912.0f;
  const uint32_t sub = static_cast<uint32_t>(m);
  uint32_t v = a < kMinNormal ? sub : normal;
  v = a >= 0x7f800000u || v > kMaxFinite ? kMaxFinite : v;  // saturate (inf and NaN too)
  return static_cast<uint8_t>(sign | v);
}

#if defined(__AVX512F__)
// 16 e4m3 bytes widened to fp32, exactly: each byte becomes fp16 bits (byte << 8, arithmetic
// shift right by one, bit 14 cleared), which the F16C conversion widens (no fp32 subnormal is
// ever computed on), then times 256.
inline __m512 widen16(__m128i bytes) {
  const __m256i w = _mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 8);
  const __m256i h = _mm256_and_si256(_mm256_srai_epi16(w, 1), _mm256_set1_epi16(-16385));
  return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(kFp16Scale));
}
#endif

}  // namespace pagoda_fp8

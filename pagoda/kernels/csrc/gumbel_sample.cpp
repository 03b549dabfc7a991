// Random sampling in one pass over the logits: the Gumbel-max trick.
//
// argmax_v (logit_v + G_v), with G_v = -log(-log U_v) independent standard Gumbel noise, is a
// draw from softmax(logits) (Gumbel 1954; Maddison et al., "A* Sampling", 2014). Tokens that a
// filter removed hold -inf and are never drawn. Done here instead of softmax, torch's
// exponential_ and an argmax, which on a 2-core CPU took ~100 ms for a 64 x 49152 batch
// (exponential_ alone ~95 ms); this is one pass, a few ms.
//
// The noise is a pure function of (key, token index): U_v comes from a counter-based hash of
// the row's 64-bit key and v, so a row's draw does not depend on the rest of its batch, the
// thread count or the instruction set. The Python reference (pagoda/worker/gumbel.py) computes
// the same noise with integer tensor ops; the tests hold the two to the same tokens.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "bf16.h"

namespace pagoda_gumbel {

constexpr int kLanes = 16;

// murmur3's 32-bit finaliser: a bijection with full avalanche.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// U in (0, 1): an odd multiple of 2^-24 (24 bits: exact in fp32), never 0 or 1.
inline float uniform(uint32_t index, uint32_t k0, uint32_t k1) {
  const uint32_t h = fmix32(fmix32(index * 0x9E3779B1u + k0) ^ k1);
  return static_cast<float>(((h >> 9) << 1) | 1u) * (1.0f / 16777216.0f);  // / 2^24
}

// log(x) for positive normal x, branch-free so loops of it vectorise: x = 2^e * m with m in
// [sqrt(1/2), sqrt(2)), log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172, by its series
// to t^9 (the next term is below 3e-10). Relative error about 1e-7.
inline float log_pos(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;
  float m;
  std::memcpy(&m, &mbits, sizeof m);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  const float series = t * (2.0f + t2 * (2.0f / 3 + t2 * (2.0f / 5 + t2 * (2.0f / 7 + t2 * (2.0f / 9)))));
  return static_cast<float>(e) * 0.69314718f + series;
}

inline float gumbel(uint32_t index, uint32_t k0, uint32_t k1) {
  return -log_pos(-log_pos(uniform(index, k0, k1)));
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return pagoda_bf16::to_f32(p[i]); }

// argmax_v (row[v] + G_v); ties to the lowest index; NaN logits are skipped (a row of only
// -inf or NaN gives 0).
template <typename T>
int64_t draw_row(const T* row, int64_t vocab, uint64_t key) {
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float best[kLanes];
  int32_t where[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    best[j] = neg_inf;
    where[j] = static_cast<int32_t>(vocab);  // "none yet": past every index
  }
  const int32_t n = static_cast<int32_t>(vocab);
  int32_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    float score[kLanes];
    for (int j = 0; j < kLanes; ++j)
      score[j] = load(row, i + j) + gumbel(static_cast<uint32_t>(i + j), k0, k1);
    for (int j = 0; j < kLanes; ++j) {
      const bool better = score[j] > best[j];   // false for NaN
      best[j] = better ? score[j] : best[j];
      where[j] = better ? i + j : where[j];
    }
  }
  float top = neg_inf;
  int32_t arg = n;
  for (int j = 0; j < kLanes; ++j)
    if (best[j] > top || (best[j] == top && where[j] < arg)) {
      top = best[j];
      arg = where[j];
    }
  for (; i < n; ++i) {
    const float s = load(row, i) + gumbel(static_cast<uint32_t>(i), k0, k1);
    if (s > top) {
      top = s;
      arg = i;
    }
  }
  return arg == n ? 0 : arg;
}

// out (R,) int64 <- one draw per row of logits (R, V) (fp32 or bf16, unit stride along V,
// any row stride), row r keyed by keys[r].
void gumbel_argmax(at::Tensor out, at::Tensor logits, at::Tensor keys) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (R, V), unit stride");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "logits must be float32 or bfloat16");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab < (int64_t{1} << 31), "vocabulary size out of range");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.is_contiguous() && keys.numel() == rows,
              "keys must be contiguous int64 (R,)");
  TORCH_CHECK(out.scalar_type() == at::kLong && out.is_contiguous() && out.numel() == rows,
              "out must be contiguous int64 (R,)");
  const int64_t stride = logits.stride(0);
  const auto* key = reinterpret_cast<const uint64_t*>(keys.data_ptr<int64_t>());
  int64_t* dst = out.data_ptr<int64_t>();
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (bf16) {
        const auto* row = reinterpret_cast<const uint16_t*>(logits.data_ptr()) + r * stride;
        dst[r] = draw_row(row, vocab, key[r]);
      } else {
        dst[r] = draw_row(logits.data_ptr<float>() + r * stride, vocab, key[r]);
      }
    }
  });
}

// The noise itself, (R, V) fp32, for tests: noise[r, v] = G(keys[r], v).
void gumbel_noise(at::Tensor out, at::Tensor keys) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "out must be contiguous float32 (R, V)");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.is_contiguous() &&
                  keys.numel() == out.size(0), "keys must be contiguous int64 (R,)");
  const int64_t vocab = out.size(1);
  const auto* key = reinterpret_cast<const uint64_t*>(keys.data_ptr<int64_t>());
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < out.size(0); ++r) {
    const uint32_t k0 = static_cast<uint32_t>(key[r]), k1 = static_cast<uint32_t>(key[r] >> 32);
    for (int64_t v = 0; v < vocab; ++v)
      dst[r * vocab + v] = gumbel(static_cast<uint32_t>(v), k0, k1);
  }
}

}  // namespace pagoda_gumbel

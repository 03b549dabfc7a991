// Fused elementwise kernels for the CPU bf16 path: RMSNorm (optionally after a residual add),
// rotary embedding in place, and SiLU(gate) * up. Each makes one pass over its rows where the
// PyTorch reference makes five to eight, allocating a temporary per pass.
//
// They reproduce the reference's roundings: every intermediate that PyTorch rounds to bf16
// is rounded to bf16 here too (round to nearest even), so outputs match the reference up to
// the order of the fp32 sum inside RMSNorm.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "bf16.h"

namespace pagoda_fused {

inline float bf16_to_f32(uint16_t h) { return pagoda_bf16::to_f32(h); }
inline uint16_t f32_to_bf16(float f) { return pagoda_bf16::from_f32(f); }
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

constexpr int64_t kGrain = 16;  // rows per parallel task

// exp(x) for float, branch-free so that loops over it vectorise: 2^n * p(f) with
// x = n ln2 + f, |f| <= ln2 / 2 (Cody-Waite split of ln2) and a degree-6 polynomial for e^f.
// Within 2 ulp of std::exp over [-87, 88]; the bf16 rounding that follows hides that.
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Sum of squares with 16 independent partial sums, so that the loop vectorises.
inline float sum_squares(const uint16_t* src, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = bf16_to_f32(src[i + j]);
      acc[j] += v * v;
    }
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  for (; i < n; ++i) {
    const float v = bf16_to_f32(src[i]);
    sum += v * v;
  }
  return sum;
}

void check_bf16_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

// out = w * bf16(x * rsqrt(mean(x^2) + eps)), per row. If residual is given, first
// residual = bf16(residual + x) in place, and the norm is taken of the new residual.
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out,
                   at::Tensor* residual) {
  check_bf16_rows(x, "x");
  check_bf16_rows(out, "out");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "weight must be contiguous bfloat16");
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(weight.numel() == dim && out.size(0) == rows && out.size(1) == dim,
              "shapes of x, weight and out disagree");
  if (residual != nullptr) {
    check_bf16_rows(*residual, "residual");
    TORCH_CHECK(residual->size(0) == rows && residual->size(1) == dim, "residual shape");
  }
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto* xr = reinterpret_cast<const uint16_t*>(x.data_ptr()) + r * x.stride(0);
      auto* outr = reinterpret_cast<uint16_t*>(out.data_ptr()) + r * out.stride(0);
      const uint16_t* src = xr;
      if (residual != nullptr) {
        auto* res = reinterpret_cast<uint16_t*>(residual->data_ptr()) + r * residual->stride(0);
        for (int64_t i = 0; i < dim; ++i)
          res[i] = f32_to_bf16(bf16_to_f32(res[i]) + bf16_to_f32(xr[i]));
        src = res;
      }
      float sum = sum_squares(src, dim);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
      for (int64_t i = 0; i < dim; ++i) {
        float normed = round_bf16(bf16_to_f32(src[i]) * inv);
        outr[i] = f32_to_bf16(bf16_to_f32(w[i]) * normed);
      }
    }
  });
}

void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps) {
  rms_norm_rows(x, weight, eps, out, nullptr);
}

void add_rms_norm(at::Tensor out, at::Tensor residual, at::Tensor x, at::Tensor weight,
                  double eps) {
  rms_norm_rows(x, weight, eps, out, &residual);
}

// Rotate-half RoPE in place on x: (T, heads, D) bf16 with contiguous heads and head dims
// (any token stride). table: (P, D) fp32 cos in [:, :D] ... given as cos (P, D), sin (P, D).
// x = bf16(bf16(x * c) + bf16(rot(x) * s)) with c, s = bf16(cos), bf16(sin).
void rope_one(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
              const int64_t* pos, int64_t tokens) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3, "q/k must be (T, H, D) bf16");
  const int64_t heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == dim, "q/k heads must be contiguous");
  TORCH_CHECK(cos.size(1) == dim && sin.size(1) == dim, "cos/sin width must be head_dim");
  const float* c0 = cos.data_ptr<float>();
  const float* s0 = sin.data_ptr<float>();
  auto* base = reinterpret_cast<uint16_t*>(x.data_ptr());
  const int64_t positions = cos.size(0);
  at::parallel_for(0, tokens, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = pos[t];
      TORCH_CHECK(p >= 0 && p < positions, "position out of the RoPE table");
      const float* c = c0 + p * dim;
      const float* s = s0 + p * dim;
      for (int64_t h = 0; h < heads; ++h) {
        uint16_t* v = base + t * x.stride(0) + h * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = bf16_to_f32(v[i]), b = bf16_to_f32(v[i + half]);
          const float ca = round_bf16(c[i]), sa = round_bf16(s[i]);
          const float cb = round_bf16(c[i + half]), sb = round_bf16(s[i + half]);
          // rotate_half(x) = [-b, a]
          const float lo = round_bf16(a * ca) + round_bf16(-b * sa);
          const float hi = round_bf16(b * cb) + round_bf16(a * sb);
          v[i] = f32_to_bf16(lo);
          v[i + half] = f32_to_bf16(hi);
        }
      }
    }
  });
}

void rope(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin, at::Tensor positions) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "cos/sin must be contiguous float32");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "positions must be contiguous int64");
  const int64_t tokens = positions.numel();
  TORCH_CHECK(q.size(0) == tokens && k.size(0) == tokens, "q/k rows must match positions");
  const int64_t* pos = positions.data_ptr<int64_t>();
  rope_one(q, cos, sin, pos, tokens);
  rope_one(k, cos, sin, pos, tokens);
}

// out = bf16(bf16(silu(gate)) * up) where gate_up = [gate | up] along the last dim.
void silu_mul(at::Tensor out, at::Tensor gate_up) {
  check_bf16_rows(gate_up, "gate_up");
  check_bf16_rows(out, "out");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(out.size(0) == rows && out.size(1) == inter, "out must be (T, I)");
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto* g = reinterpret_cast<const uint16_t*>(gate_up.data_ptr()) + r * gate_up.stride(0);
      const uint16_t* u = g + inter;
      auto* o = reinterpret_cast<uint16_t*>(out.data_ptr()) + r * out.stride(0);
      for (int64_t i = 0; i < inter; ++i) {
        const float x = bf16_to_f32(g[i]);
        const float act = round_bf16(x / (1.f + fast_exp(-x)));
        o[i] = f32_to_bf16(act * bf16_to_f32(u[i]));
      }
    }
  });
}

// Row-wise argmax of bf16 logits (N, V) into int64 (N,), the first index on ties, as
// torch.argmax. 16 lanes keep their own best value and index, so the scan vectorises.
void argmax_rows(at::Tensor out, at::Tensor logits) {
  check_bf16_rows(logits, "logits");
  TORCH_CHECK(out.scalar_type() == at::kLong && out.is_contiguous() &&
                  out.numel() == logits.size(0), "out must be contiguous int64 (N,)");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab < (int64_t{1} << 31), "vocabulary size out of range");
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    constexpr int kLanes = 16;
    for (int64_t r = begin; r < end; ++r) {
      const auto* src = reinterpret_cast<const uint16_t*>(logits.data_ptr()) + r * logits.stride(0);
      float best[kLanes];
      int32_t where[kLanes];
      int32_t nans[kLanes];
      for (int j = 0; j < kLanes; ++j) {
        best[j] = -std::numeric_limits<float>::infinity();
        where[j] = static_cast<int32_t>(vocab);  // "none yet": larger than any index
        nans[j] = 0;
      }
      int32_t i = 0;
      const int32_t n = static_cast<int32_t>(vocab);
      for (; i + kLanes <= n; i += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const float v = bf16_to_f32(src[i + j]);
          const bool better = v > best[j];
          best[j] = better ? v : best[j];
          where[j] = better ? i + j : where[j];
          nans[j] += v != v;
        }
      int32_t any_nan = 0;
      for (int j = 0; j < kLanes; ++j) any_nan += nans[j];
      float top = -std::numeric_limits<float>::infinity();
      int32_t arg = n;
      for (int j = 0; j < kLanes; ++j)
        if (best[j] > top || (best[j] == top && where[j] < arg)) {
          top = best[j];
          arg = where[j];
        }
      for (; i < n; ++i) {
        const float v = bf16_to_f32(src[i]);
        any_nan += v != v;
        if (v > top) {
          top = v;
          arg = i;
        }
      }
      if (any_nan > 0 || arg == n) {  // torch's rule: the first NaN wins; all -inf: index 0
        arg = 0;
        for (int32_t k = 0; k < n; ++k)
          if (std::isnan(bf16_to_f32(src[k]))) {
            arg = k;
            break;
          }
      }
      dst[r] = arg;
    }
  });
}

}  // namespace pagoda_fused

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

namespace pagoda_fused {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

constexpr int64_t kGrain = 16;  // rows per parallel task

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
      float sum = 0.f;
      for (int64_t i = 0; i < dim; ++i) {
        float v = bf16_to_f32(src[i]);
        sum += v * v;
      }
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
        const float act = round_bf16(x / (1.f + std::exp(-x)));
        o[i] = f32_to_bf16(act * bf16_to_f32(u[i]));
      }
    }
  });
}

}  // namespace pagoda_fused

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
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"

namespace pagoda_fused {

inline float bf16_to_f32(uint16_t h) { return pagoda_bf16::to_f32(h); }
inline uint16_t f32_to_bf16(float f) { return pagoda_bf16::from_f32(f); }
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

constexpr int64_t kGrain = 16;  // rows per parallel task

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 lanes at a time. The same roundings as the scalar code: bf16 -> fp32 is exact (a shift),
// fp32 -> bf16 rounds to nearest even and keeps NaN a quiet NaN, as pagoda_bf16::from_f32.
#define PAGODA_FUSED_AVX512 1
namespace v16 {
inline __m512 load(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// f rounded to bf16, kept as the upper 16 bits of each 32-bit lane (lower half zero).
#if defined(__AVX512BF16__)
// vcvtneps2bf16 rounds to nearest even and quiets NaN as from_f32 does; it also flushes
// fp32 denormals (below 1.2e-38 in magnitude) to zero, which from_f32 keeps.
inline __m256i pack(__m512 f) { return (__m256i)_mm512_cvtneps_pbh(f); }
inline __m512 round(__m512 f) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(pack(f)), 16));
}
#else
inline __m512i round_bits(__m512 f) {
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  const __m512i r = _mm512_mask_mov_epi32(up, nan, quiet);
  return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}
inline __m256i pack(__m512 f) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bits(f), 16)); }
inline __m512 round(__m512 f) { return _mm512_castsi512_ps(round_bits(f)); }
#endif
inline __m512 neg(__m512 f) {  // flips the sign bit, as unary minus
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(f),
                                              _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}
inline void store(uint16_t* p, __m512 f) {  // f rounded to bf16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack(f));
}
// exp(x), x clamped to [-87, 88] as fast_exp; Cody-Waite reduction, degree-6 polynomial.
inline __m512 exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
}  // namespace v16
#endif

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

// One row of (add +) RMSNorm: if res is given, res = bf16(res + x) first and the norm is of
// res. out = bf16(w * bf16(src * rsqrt(mean(src^2) + eps))).
inline void norm_row_scalar(const uint16_t* xr, uint16_t* res, const uint16_t* w, float eps,
                            int64_t dim, uint16_t* outr) {
  const uint16_t* src = xr;
  if (res != nullptr) {
    for (int64_t i = 0; i < dim; ++i) res[i] = f32_to_bf16(bf16_to_f32(res[i]) + bf16_to_f32(xr[i]));
    src = res;
  }
  const float sum = sum_squares(src, dim);
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) {
    const float normed = round_bf16(bf16_to_f32(src[i]) * inv);
    outr[i] = f32_to_bf16(bf16_to_f32(w[i]) * normed);
  }
}

inline void norm_row(const uint16_t* xr, uint16_t* res, const uint16_t* w, float eps,
                     int64_t dim, uint16_t* outr) {
#if defined(PAGODA_FUSED_AVX512)
  if (dim % 16 == 0) {
    const uint16_t* src = res != nullptr ? res : xr;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < dim; i += 16) {
      __m512 v = v16::load(xr + i);
      if (res != nullptr) {
        v = v16::round(_mm512_add_ps(v16::load(res + i), v));
        v16::store(res + i, v);
      }
      if ((i / 16) % 2 == 0) acc0 = _mm512_fmadd_ps(v, v, acc0);
      else acc1 = _mm512_fmadd_ps(v, v, acc1);
    }
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(sum / static_cast<float>(dim) + eps));
    for (i = 0; i < dim; i += 16) {
      const __m512 normed = v16::round(_mm512_mul_ps(v16::load(src + i), inv));
      v16::store(outr + i, _mm512_mul_ps(v16::load(w + i), normed));
    }
    return;
  }
#endif
  norm_row_scalar(xr, res, w, eps, dim, outr);
}

void check_bf16_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16");
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) == 1),
              name, " must be 2-D with contiguous rows");
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
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto* xr = reinterpret_cast<const uint16_t*>(x.data_ptr()) + r * x.stride(0);
      auto* outr = reinterpret_cast<uint16_t*>(out.data_ptr()) + r * out.stride(0);
      uint16_t* res = residual == nullptr
          ? nullptr
          : reinterpret_cast<uint16_t*>(residual->data_ptr()) + r * residual->stride(0);
      norm_row(xr, res, w, feps, dim, outr);
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

// Rotate the `heads` heads (contiguous, `dim` each) of one token in place by the angles of
// its position: c, s are that position's fp32 cos and sin rows (rounded to bf16 here, as
// the reference casts the table to the activations' dtype).
inline void rope_token(uint16_t* v0, int64_t heads, int64_t dim, const float* c, const float* s) {
  const int64_t half = dim / 2;
#if defined(PAGODA_FUSED_AVX512)
  if (half % 16 == 0 && half <= 128) {
    __m512 ca[8], sa[8], cb[8], sb[8];  // the position's angles, 16 at a time
    const int64_t nc = half / 16;
    for (int64_t j = 0; j < nc; ++j) {
      ca[j] = v16::round(_mm512_loadu_ps(c + 16 * j));
      sa[j] = v16::round(_mm512_loadu_ps(s + 16 * j));
      cb[j] = v16::round(_mm512_loadu_ps(c + half + 16 * j));
      sb[j] = v16::round(_mm512_loadu_ps(s + half + 16 * j));
    }
    for (int64_t h = 0; h < heads; ++h) {
      uint16_t* v = v0 + h * dim;
      for (int64_t j = 0; j < nc; ++j) {
        const __m512 a = v16::load(v + 16 * j), b = v16::load(v + half + 16 * j);
        // rotate_half(x) = [-b, a]
        const __m512 lo = _mm512_add_ps(v16::round(_mm512_mul_ps(a, ca[j])),
                                        v16::round(_mm512_mul_ps(v16::neg(b), sa[j])));
        const __m512 hi = _mm512_add_ps(v16::round(_mm512_mul_ps(b, cb[j])),
                                        v16::round(_mm512_mul_ps(a, sb[j])));
        v16::store(v + 16 * j, lo);
        v16::store(v + half + 16 * j, hi);
      }
    }
    return;
  }
#endif
  for (int64_t h = 0; h < heads; ++h) {
    uint16_t* v = v0 + h * dim;
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

// Rotate-half RoPE in place on x: (T, heads, D) bf16 with contiguous heads and head dims
// (any token stride). table: (P, D) fp32 cos in [:, :D] ... given as cos (P, D), sin (P, D).
// x = bf16(bf16(x * c) + bf16(rot(x) * s)) with c, s = bf16(cos), bf16(sin).
void rope_one(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
              const int64_t* pos, int64_t tokens) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3, "q/k must be (T, H, D) bf16");
  const int64_t heads = x.size(1), dim = x.size(2);
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
      rope_token(base + t * x.stride(0), heads, dim, c0 + p * dim, s0 + p * dim);
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

// out = bf16(bf16(act(gate)) * up) for each row of gate_up = [gate | up] (the last dim): the
// row loop of the gated MLPs. ``vec`` maps 16 fp32 gates to their activation (AVX-512 builds),
// ``scalar`` one gate (the tail, and every element elsewhere); both unrounded.
template <class Vec, class Scalar>
void gated_rows(at::Tensor out, at::Tensor gate_up, [[maybe_unused]] Vec vec, Scalar scalar) {
  check_bf16_rows(gate_up, "gate_up");
  check_bf16_rows(out, "out");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(out.size(0) == rows && out.size(1) == inter, "out must be (T, I)");
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto* g = reinterpret_cast<const uint16_t*>(gate_up.data_ptr()) + r * gate_up.stride(0);
      const uint16_t* u = g + inter;
      auto* o = reinterpret_cast<uint16_t*>(out.data_ptr()) + r * out.stride(0);
      int64_t i = 0;
#if defined(PAGODA_FUSED_AVX512)
      for (; i + 16 <= inter; i += 16) {
        const __m512 act = v16::round(vec(v16::load(g + i)));
        v16::store(o + i, _mm512_mul_ps(act, v16::load(u + i)));
      }
#endif
      for (; i < inter; ++i) {
        const float act = round_bf16(scalar(bf16_to_f32(g[i])));
        o[i] = f32_to_bf16(act * bf16_to_f32(u[i]));
      }
    }
  });
}

#if defined(PAGODA_FUSED_AVX512)
#define PAGODA_VEC_ACT(body) [](__m512 x) { body }
#else
#define PAGODA_VEC_ACT(body) nullptr
#endif

// SiLU (SwiGLU): silu(x) = x / (1 + exp(-x)).
void silu_mul(at::Tensor out, at::Tensor gate_up) {
  gated_rows(
      out, gate_up,
      PAGODA_VEC_ACT(return _mm512_div_ps(
                         x, _mm512_add_ps(_mm512_set1_ps(1.f), v16::exp(v16::neg(x))));),
      [](float x) { return x / (1.f + fast_exp(-x)); });
}

// GELU, tanh approximation (GeGLU, Gemma): gelu_tanh(x) = x / 2 * (1 + tanh(z)),
// z = sqrt(2 / pi) * (x + 0.044715 x^3). PyTorch adds 1 to tanh(z) rounded to fp32, which for z
// below about -9 cancels to 0 (its answer is -0) and elsewhere keeps tanh's rounding near -1.
// To keep those roundings: 1 + tanh(z) = 2 / (1 + exp(-2 z)) computed accurately, then
// tanh(z) = that - 1 rounded to fp32, then 1 + tanh(z) (exact); and, as PyTorch's vectorised
// tanh does, tanh(z) = +-1 exactly beyond |z| = kTanhSaturates.
constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK1 = 0.044715f;
constexpr float kTanhSaturates = 8.664339742f;

#if defined(PAGODA_FUSED_AVX512)
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  // -2z, and exp(-2z)
  const __m512 z2 = _mm512_mul_ps(_mm512_set1_ps(-2.f * kGeluK0),
                                  _mm512_fmadd_ps(_mm512_set1_ps(kGeluK1), x3, x));
  const __m512 e = v16::exp(z2);
  __m512 t = _mm512_sub_ps(_mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(one, e)), one);
  const __mmask16 saturated =
      _mm512_cmp_ps_mask(_mm512_abs_ps(z2), _mm512_set1_ps(2.f * kTanhSaturates), _CMP_GT_OQ);
  // +-1 with tanh's sign, the opposite of -2z's.
  const __mmask16 positive = _mm512_cmp_ps_mask(z2, _mm512_setzero_ps(), _CMP_LT_OQ);
  t = _mm512_mask_blend_ps(saturated, t, _mm512_mask_blend_ps(positive, _mm512_set1_ps(-1.f), one));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(one, t));
}
#endif

inline float gelu_tanh1(float x) {
  const float z = kGeluK0 * (x + kGeluK1 * x * x * x);
  const float t = std::fabs(z) > kTanhSaturates ? (z < 0 ? -1.f : 1.f)
                                                : 2.f / (1.f + fast_exp(-2.f * z)) - 1.f;
  return 0.5f * x * (1.f + t);
}

void gelu_tanh_mul(at::Tensor out, at::Tensor gate_up) {
  gated_rows(out, gate_up, PAGODA_VEC_ACT(return gelu_tanh16(x);), gelu_tanh1);
}

#undef PAGODA_VEC_ACT

#if defined(PAGODA_FUSED_AVX512)
// The vector part of a row's argmax: lane j keeps the best value among elements j mod 16 (the
// first on ties) and its index, and counts NaNs. Four sets of lanes run side by side (their
// compare chains are independent) and are merged at the end, lower index first on ties.
// Returns how many elements it covered (a multiple of 16).
inline int32_t argmax_lanes(const uint16_t* src, int32_t n, float* best, int32_t* where,
                            int32_t* nans) {
  constexpr int kSets = 4;
  __m512 b[kSets];
  __m512i w[kSets];
  __mmask16 nan_seen = 0;
  for (int k = 0; k < kSets; ++k) {
    b[k] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    w[k] = _mm512_set1_epi32(n);
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int32_t i = 0;
  for (; i + 16 * kSets <= n; i += 16 * kSets) {
    for (int k = 0; k < kSets; ++k) {
      const __m512 v = v16::load(src + i + 16 * k);
      const __mmask16 better = _mm512_cmp_ps_mask(v, b[k], _CMP_GT_OQ);
      b[k] = _mm512_mask_mov_ps(b[k], better, v);
      w[k] = _mm512_mask_mov_epi32(w[k], better, _mm512_add_epi32(lane, _mm512_set1_epi32(i + 16 * k)));
      nan_seen |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
  }
  for (int k = 1; k < kSets; ++k) {  // merge: larger value, or equal value at a lower index
    const __mmask16 gt = _mm512_cmp_ps_mask(b[k], b[0], _CMP_GT_OQ);
    const __mmask16 eq = _mm512_cmp_ps_mask(b[k], b[0], _CMP_EQ_OQ);
    const __mmask16 lower = _mm512_cmp_epi32_mask(w[k], w[0], _MM_CMPINT_LT);
    const __mmask16 take = gt | (eq & lower);
    b[0] = _mm512_mask_mov_ps(b[0], take, b[k]);
    w[0] = _mm512_mask_mov_epi32(w[0], take, w[k]);
  }
  _mm512_storeu_ps(best, b[0]);
  _mm512_storeu_si512(where, w[0]);
  for (int j = 0; j < 16; ++j) nans[j] = (nan_seen >> j) & 1;
  return i;
}
#endif

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
#if defined(PAGODA_FUSED_AVX512)
      i = argmax_lanes(src, n, best, where, nans);
#endif
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

// Column-wise argmax of transposed bf16 logits (V, N) into int64 (N,): the same answer as
// argmax_rows on the (N, V) transpose (first index on ties, the first NaN wins, all -inf gives
// 0). Threads scan disjoint ranges of the vocabulary for every column, and the ranges' winners
// are merged in vocabulary order, so ties still go to the lowest index.
void argmax_cols(at::Tensor out, at::Tensor logits_t) {
  check_bf16_rows(logits_t, "logits_t");
  const int64_t vocab = logits_t.size(0), cols = logits_t.size(1);
  TORCH_CHECK(out.scalar_type() == at::kLong && out.is_contiguous() && out.numel() == cols,
              "out must be contiguous int64 (N,)");
  TORCH_CHECK(vocab > 0 && vocab < (int64_t{1} << 31), "vocabulary size out of range");
  const auto* src = reinterpret_cast<const uint16_t*>(logits_t.data_ptr());
  const int64_t stride = logits_t.stride(0);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), vocab / 1024));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // Per part and column: best value, its index, and the first NaN's index (vocab: none).
  std::vector<float> best(parts * cols, neg_inf);
  std::vector<int32_t> where(parts * cols, static_cast<int32_t>(vocab));
  std::vector<int32_t> nan_at(parts * cols, static_cast<int32_t>(vocab));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      const int64_t v0 = vocab * part / parts, v1 = vocab * (part + 1) / parts;
      float* b = best.data() + part * cols;
      int32_t* w = where.data() + part * cols;
      int32_t* nz = nan_at.data() + part * cols;
      int64_t c = 0;
#if defined(PAGODA_FUSED_AVX512)
      for (; c + 16 <= cols; c += 16) {
        __m512 vb = _mm512_set1_ps(neg_inf);
        __m512i vw = _mm512_set1_epi32(static_cast<int>(vocab));
        __m512i vn = vw;
        for (int64_t v = v0; v < v1; ++v) {
          const __m512 x = v16::load(src + v * stride + c);
          const __m512i iv = _mm512_set1_epi32(static_cast<int>(v));
          const __mmask16 better = _mm512_cmp_ps_mask(x, vb, _CMP_GT_OQ);
          vb = _mm512_mask_mov_ps(vb, better, x);
          vw = _mm512_mask_mov_epi32(vw, better, iv);
          const __mmask16 first_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) &
              _mm512_cmpeq_epi32_mask(vn, _mm512_set1_epi32(static_cast<int>(vocab)));
          vn = _mm512_mask_mov_epi32(vn, first_nan, iv);
        }
        _mm512_storeu_ps(b + c, vb);
        _mm512_storeu_si512(w + c, vw);
        _mm512_storeu_si512(nz + c, vn);
      }
#endif
      for (int64_t v = v0; v < v1; ++v) {
        for (int64_t j = c; j < cols; ++j) {
          const float x = bf16_to_f32(src[v * stride + j]);
          if (x > b[j]) {
            b[j] = x;
            w[j] = static_cast<int32_t>(v);
          }
          if (x != x && nz[j] == vocab) nz[j] = static_cast<int32_t>(v);
        }
      }
    }
  });
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t j = 0; j < cols; ++j) {
    float top = neg_inf;
    int64_t arg = vocab, nan_first = vocab;
    for (int64_t part = 0; part < parts; ++part) {  // in vocabulary order
      const int64_t k = part * cols + j;
      if (best[k] > top) {
        top = best[k];
        arg = where[k];
      }
      if (nan_first == vocab && nan_at[k] < vocab) nan_first = nan_at[k];
    }
    dst[j] = nan_first < vocab ? nan_first : (arg == vocab ? 0 : arg);
  }
}

}  // namespace pagoda_fused

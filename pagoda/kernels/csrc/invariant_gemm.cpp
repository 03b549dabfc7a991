// A bf16 linear layer whose reduction order is fixed per output element (--deterministic):
// out[m, n] = bf16(bias[n] + sum over k of x[m, k] * w[n, k]), the sum taken in fp32 over
// k = 0, 1 | 2, 3 | 4, 5 | ... in that order, in one accumulator, whatever M, whichever rows
// share the call and however the columns are split over threads. So a row's result does not
// depend on the batch it is in (batch invariance), by construction rather than by measurement.
//
// The weight is packed once (models/batch_invariant.pack_weight) into blocks of 32 output columns, k in
// pairs: packed[b, p, j] = (w[32 b + j, 2 p], w[32 b + j, 2 p + 1]) as one 32-bit word, the
// layout AVX512-BF16's vdpbf16ps reads (lane j: acc += a0 * b0 + a1 * b1). The kernel computes
// tiles of up to 8 rows x 32 columns in registers; a tail of fewer rows runs the same
// instructions per element. Threads split the column blocks.
//
// Without AVX512-BF16 (or when asked, so tests run it anywhere) the portable loop keeps a
// fixed order of its own (products exact in fp32, pairs summed, then added), one row at a time
// through one code path. The two paths are each invariant; they need not agree bit for bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "bf16.h"

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace pagoda_invariant {
namespace {

constexpr int64_t NB = 32;  // output columns per block (two zmm of fp32)
constexpr int64_t MR = 8;   // rows per register tile

#if defined(__AVX512BF16__)
template <int R>
void tile(const uint32_t* x, int64_t x_stride, const uint32_t* w, int64_t kp, const float* bias,
          uint16_t* out, int64_t o_stride, int64_t cols) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * NB);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * NB + 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * x_stride + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
    }
  }
  const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
  const __mmask16 m0 = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xffff
                       : cols <= 16 ? 0
                                    : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  for (int r = 0; r < R; ++r) {
    uint16_t* o = out + r * o_stride;
    const __m256i h0 = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][0], b0));
    const __m256i h1 = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][1], b1));
    _mm256_mask_storeu_epi16(o, m0, h0);
    _mm256_mask_storeu_epi16(o + 16, m1, h1);
  }
}

void rows(const uint32_t* x, int64_t x_stride, const uint32_t* w, int64_t kp, const float* bias,
          uint16_t* out, int64_t o_stride, int64_t cols, int64_t r) {
  switch (r) {
    case 1: return tile<1>(x, x_stride, w, kp, bias, out, o_stride, cols);
    case 2: return tile<2>(x, x_stride, w, kp, bias, out, o_stride, cols);
    case 3: return tile<3>(x, x_stride, w, kp, bias, out, o_stride, cols);
    case 4: return tile<4>(x, x_stride, w, kp, bias, out, o_stride, cols);
    case 5: return tile<5>(x, x_stride, w, kp, bias, out, o_stride, cols);
    case 6: return tile<6>(x, x_stride, w, kp, bias, out, o_stride, cols);
    case 7: return tile<7>(x, x_stride, w, kp, bias, out, o_stride, cols);
    default: return tile<8>(x, x_stride, w, kp, bias, out, o_stride, cols);
  }
}
#endif

// One row at a time, one code path: the same arithmetic for every row.
void one_row(const uint32_t* x, const uint32_t* w, int64_t kp, const float* bias, uint16_t* out,
             int64_t cols) {
  float acc[NB] = {0.f};
  for (int64_t p = 0; p < kp; ++p) {
    const float x0 = pagoda_bf16::to_f32(static_cast<uint16_t>(x[p] & 0xffffu));
    const float x1 = pagoda_bf16::to_f32(static_cast<uint16_t>(x[p] >> 16));
    for (int64_t j = 0; j < NB; ++j) {
      const uint32_t pair = w[p * NB + j];
      const float a = x0 * pagoda_bf16::to_f32(static_cast<uint16_t>(pair & 0xffffu));
      const float b = x1 * pagoda_bf16::to_f32(static_cast<uint16_t>(pair >> 16));
      volatile float s = a + b;  // no contraction into an FMA: one rounding order everywhere
      acc[j] = acc[j] + s;
    }
  }
  for (int64_t j = 0; j < cols; ++j) out[j] = pagoda_bf16::from_f32(acc[j] + bias[j]);
}

void portable_rows(const uint32_t* x, int64_t x_stride, const uint32_t* w, int64_t kp,
                   const float* bias, uint16_t* out, int64_t o_stride, int64_t cols, int64_t r) {
  for (int64_t i = 0; i < r; ++i) one_row(x + i * x_stride, w, kp, bias, out + i * o_stride, cols);
}

}  // namespace

bool native() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// out: (M, N) bf16; x: (M, K) bf16 with unit stride in K; packed from pack(); bias: (N_pad,)
// fp32 (zeros where the layer has none), N_pad = 32 * blocks. portable: the portable loop even
// where AVX512-BF16 is compiled in.
void linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
            bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "x must be a (M, K) bfloat16 tensor with contiguous rows");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kBFloat16 && out.stride(1) == 1,
              "out must be a (M, N) bfloat16 tensor with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NB && packed.is_contiguous(),
              "packed must be (blocks, K / 2, 32) int32 (batch_invariant.pack_weight)");
  const int64_t m = x.size(0), n = out.size(1), kp = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK(x.size(1) == 2 * kp && out.size(0) == m && n <= blocks * NB && n > (blocks - 1) * NB,
              "shapes do not match: x ", x.sizes(), ", out ", out.sizes(), ", packed ",
              packed.sizes());
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                  bias.numel() == blocks * NB,
              "bias must be a contiguous fp32 tensor of ", blocks * NB, " values");
  TORCH_CHECK(x.stride(0) % 2 == 0, "x's row stride must be even");
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data_ptr());
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr());
  const float* bp = bias.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t xs = x.stride(0) / 2, os = out.stride(0);
#if defined(__AVX512BF16__)
  const auto run = portable ? portable_rows : rows;
#else
  const auto run = portable_rows;
#endif
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t cols = std::min<int64_t>(NB, n - b * NB);
      for (int64_t r0 = 0; r0 < m; r0 += MR) {
        const int64_t r = std::min<int64_t>(MR, m - r0);
        run(xp + r0 * xs, xs, wp + b * kp * NB, kp, bp + b * NB, op + r0 * os + b * NB, os, cols,
             r);
      }
    }
  });
}

}  // namespace pagoda_invariant

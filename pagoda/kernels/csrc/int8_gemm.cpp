// Weight-only int8 linear for small steps: y (T, N) = x (T, K) @ W^T with
// W[n, k] = scale[n, g] * code[n, k] + offset[n, g], g = k / group (group 16 or 32), the
// weights as a quantized file stores them (GGUF's Q8_0, K-quants' 5- and 6-bit codes).
// Activations stay as they are (bf16 or fp32; nothing is quantized on the fly), so the result
// is the dequantized weights' product up to the order of the fp32 sums:
//     y[t, n] = sum over g of scale[n, g] * dot_g + offset[n, g] * xsum_g,
//     dot_g = sum over k in g of x[t, k] * code[n, k]   (each product exact in fp32),
//     xsum_g = sum over k in g of x[t, k]                (once per row and group).
// Invariant: every product of a code and an input is exact (a code is an integer of at most 8
// bits, exact in bf16 and fp32), the sums are fp32, the output is rounded once, and only the
// N real columns of y are written (padding rows of the packed weight are never stored).
//
// Layout (models/cpu_int8.py packs it at load): blocks of 16 output rows, inputs in pairs,
//     codes[b, p, j, e] = code[16 b + j, 2 p + e]      (blocks, K / 2, 16, 2) int8
//     scale[b, g, j]    = scale[16 b + j, g]           (blocks, K / group, 16) fp32
// (offset like scale, or absent), padding rows zero. One block reads its K * 16 codes as one
// stream: 32 bytes per input pair, which is what vdpbf16ps multiplies (lane j: the pair of row
// 16 b + j). A call streams the codes once; rows of x are tiled in registers over them.
//
// Paths, chosen at run time from what the CPU has (``isa`` forces one, for tests):
//  - AVX512-BF16, bf16 x: 32 codes widened to fp32, narrowed to bf16 pairs (exact), one
//    vdpbf16ps per pair of inputs and row;
//  - AVX-512F: codes widened to fp32, FMAs against (x[2p], x[2p + 1]) broadcast as a pair,
//    lanes (row j, parity e) folded per block;
//  - AVX2 + FMA: the same in 8 lanes;
//  - portable C++ loops.
// Each vector path is compiled with its own target attribute, so one build holds them all.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define PAGODA_I8_X86 1
#include <immintrin.h>
#endif

#include "bf16.h"

namespace pagoda_int8 {

namespace {

constexpr int64_t NB = 16;  // output rows per block
// Codes are prefetched this far ahead of the pair being read (one cache line per two pairs):
// on Zen 4 the hardware prefetcher alone read cold weights more slowly (docs/benchmarks.md).
// A prefetch past the end of the codes is harmless (it never faults).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kGrainBytes = 1 << 16;  // codes a task reads at least

enum Isa : int64_t { kAuto = 0, kPortable = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Bf16 = 4 };

// What one call computes over: pointers and sizes, checked by the caller.
struct Problem {
  int64_t T, N, K, group, blocks;
  const int8_t* codes;   // (blocks, K / 2, 16, 2)
  const float* scale;    // (blocks, G, 16)
  const float* offset;   // (blocks, G, 16) or nullptr
  const float* xf;       // (T, K) fp32 rows, stride K (fp32 paths), or nullptr
  const uint16_t* xb;    // (T, ldx) bf16 rows (the vdpbf16ps path), or nullptr
  int64_t ldx;
  const float* xsum;     // (T, G) group sums of x, or nullptr (no offset)
  void* out;             // (T, ldo), fp32 or bf16
  int64_t ldo;
  bool out_bf16;
  int64_t G() const { return K / group; }
  const int8_t* block_codes(int64_t b) const { return codes + b * K * NB; }
  const float* block_scale(int64_t b) const { return scale + b * G() * NB; }
  const float* block_offset(int64_t b) const {
    return offset == nullptr ? nullptr : offset + b * G() * NB;
  }
  int64_t cols(int64_t b) const { return std::min<int64_t>(NB, N - b * NB); }
};

// Row t's 16 results of block b to out (only the real columns), rounded once.
void store_row(const Problem& P, int64_t t, int64_t b, const float* acc) {
  const int64_t n = P.cols(b);
  if (P.out_bf16) {
    uint16_t* o = static_cast<uint16_t*>(P.out) + t * P.ldo + b * NB;
    for (int64_t j = 0; j < n; ++j) o[j] = pagoda_bf16::from_f32(acc[j]);
  } else {
    float* o = static_cast<float*>(P.out) + t * P.ldo + b * NB;
    std::memcpy(o, acc, static_cast<size_t>(n) * sizeof(float));
  }
}

// ------------------------------------------------------------------------------ portable
void block_portable(const Problem& P, int64_t b) {
  const int64_t G = P.G(), half = P.group / 2;
  const int8_t* c = P.block_codes(b);
  const float* s = P.block_scale(b);
  const float* o = P.block_offset(b);
  for (int64_t t = 0; t < P.T; ++t) {
    const float* x = P.xf + t * P.K;
    float acc[NB] = {0.f};
    for (int64_t g = 0; g < G; ++g) {
      float dot[NB] = {0.f};
      for (int64_t p = g * half; p < (g + 1) * half; ++p) {
        const int8_t* cp = c + p * 2 * NB;
        const float x0 = x[2 * p], x1 = x[2 * p + 1];
        for (int64_t j = 0; j < NB; ++j)
          dot[j] += x0 * static_cast<float>(cp[2 * j]) + x1 * static_cast<float>(cp[2 * j + 1]);
      }
      for (int64_t j = 0; j < NB; ++j) {
        acc[j] += s[g * NB + j] * dot[j];
        if (o != nullptr) acc[j] += o[g * NB + j] * P.xsum[t * G + g];
      }
    }
    store_row(P, t, b, acc);
  }
}

#if defined(PAGODA_I8_X86)
#define PAGODA_I8_AVX2 __attribute__((target("avx2,fma")))
#define PAGODA_I8_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define PAGODA_I8_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

inline void prefetch(const int8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// ------------------------------------------------------------------------------ AVX2 + FMA
// A pair's 32 codes are four vectors of 8 lanes, (row 4q + i, parity e) in lane 2i + e.
// Per group, hadd of quarters (0, 1) and (2, 3) sums the parities into rows in the order
// (0, 1, 4, 5, 2, 3, 6, 7) of each half; the scales are permuted to match, and the block's
// results put back in row order at its end.
constexpr int MT2 = 2;  // rows per register tile

template <int M>
PAGODA_I8_AVX2 void tile_avx2(const Problem& P, int64_t b, int64_t t0) {
  const int64_t G = P.G(), half = P.group / 2;
  const int8_t* c = P.block_codes(b);
  const float* s = P.block_scale(b);
  const float* o = P.block_offset(b);
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);  // hadd's row order
  __m256 acc[M][2];
  for (int t = 0; t < M; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 dot[M][4];
    for (int t = 0; t < M; ++t)
      for (int q = 0; q < 4; ++q) dot[t][q] = _mm256_setzero_ps();
    for (int64_t p = g * half; p < (g + 1) * half; ++p) {
      const int8_t* cp = c + p * 2 * NB;
      if ((p & 1) == 0) prefetch(cp + kPrefetchBytes);
      __m256 w[4];
      for (int q = 0; q < 4; ++q) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + 8 * q));
        w[q] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
      }
      for (int t = 0; t < M; ++t) {
        double pair;
        std::memcpy(&pair, P.xf + (t0 + t) * P.K + 2 * p, sizeof(pair));
        const __m256 xv = _mm256_castpd_ps(_mm256_set1_pd(pair));  // (x0, x1) x 4
        for (int q = 0; q < 4; ++q) dot[t][q] = _mm256_fmadd_ps(w[q], xv, dot[t][q]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + g * NB + 8 * h), order);
      const __m256 ov = o == nullptr ? _mm256_setzero_ps()
                                     : _mm256_permutevar8x32_ps(
                                           _mm256_loadu_ps(o + g * NB + 8 * h), order);
      for (int t = 0; t < M; ++t) {
        const __m256 d = _mm256_hadd_ps(dot[t][2 * h], dot[t][2 * h + 1]);
        acc[t][h] = _mm256_fmadd_ps(sv, d, acc[t][h]);
        if (o != nullptr)
          acc[t][h] = _mm256_fmadd_ps(ov, _mm256_set1_ps(P.xsum[(t0 + t) * G + g]), acc[t][h]);
      }
    }
  }
  const __m256i back = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);  // its own inverse
  for (int t = 0; t < M; ++t) {
    alignas(32) float row[NB];
    _mm256_store_ps(row, _mm256_permutevar8x32_ps(acc[t][0], back));
    _mm256_store_ps(row + 8, _mm256_permutevar8x32_ps(acc[t][1], back));
    store_row(P, t0 + t, b, row);
  }
}

PAGODA_I8_AVX2 void block_avx2(const Problem& P, int64_t b) {
  int64_t t = 0;
  for (; t + MT2 <= P.T; t += MT2) tile_avx2<MT2>(P, b, t);
  if (t < P.T) tile_avx2<1>(P, b, t);
}

// ------------------------------------------------------------------------------ AVX-512F
// A pair's 32 codes are two vectors: lo = rows 0..7, hi = rows 8..15, lane 2i + e = (row i,
// parity e). Per group the scales are spread to (row, parity) lanes; the offset term is added
// as offset * (xsum / 2) to both parities (exact halving), and each block folds the parity
// lanes at its end.
constexpr int MT5 = 6;

template <int M>
PAGODA_I8_AVX512 void tile_avx512(const Problem& P, int64_t b, int64_t t0) {
  const int64_t G = P.G(), half = P.group / 2;
  const int8_t* c = P.block_codes(b);
  const float* s = P.block_scale(b);
  const float* o = P.block_offset(b);
  const __m512i spread_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i spread_hi = _mm512_add_epi32(spread_lo, _mm512_set1_epi32(8));
  __m512 acc[M][2];
  for (int t = 0; t < M; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 dot[M][2];
    for (int t = 0; t < M; ++t) dot[t][0] = dot[t][1] = _mm512_setzero_ps();
    for (int64_t p = g * half; p < (g + 1) * half; ++p) {
      const int8_t* cp = c + p * 2 * NB;
      if ((p & 1) == 0) prefetch(cp + kPrefetchBytes);
      const __m512 lo = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp))));
      const __m512 hi = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + 16))));
      for (int t = 0; t < M; ++t) {
        double pair;
        std::memcpy(&pair, P.xf + (t0 + t) * P.K + 2 * p, sizeof(pair));
        const __m512 xv = _mm512_castpd_ps(_mm512_set1_pd(pair));
        dot[t][0] = _mm512_fmadd_ps(lo, xv, dot[t][0]);
        dot[t][1] = _mm512_fmadd_ps(hi, xv, dot[t][1]);
      }
    }
    const __m512 sv = _mm512_loadu_ps(s + g * NB);
    const __m512 s_lo = _mm512_permutexvar_ps(spread_lo, sv);
    const __m512 s_hi = _mm512_permutexvar_ps(spread_hi, sv);
    for (int t = 0; t < M; ++t) {
      acc[t][0] = _mm512_fmadd_ps(s_lo, dot[t][0], acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(s_hi, dot[t][1], acc[t][1]);
    }
    if (o != nullptr) {
      const __m512 ov = _mm512_loadu_ps(o + g * NB);
      const __m512 o_lo = _mm512_permutexvar_ps(spread_lo, ov);
      const __m512 o_hi = _mm512_permutexvar_ps(spread_hi, ov);
      for (int t = 0; t < M; ++t) {
        const __m512 h = _mm512_set1_ps(0.5f * P.xsum[(t0 + t) * G + g]);
        acc[t][0] = _mm512_fmadd_ps(o_lo, h, acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(o_hi, h, acc[t][1]);
      }
    }
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                         30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int t = 0; t < M; ++t) {
    alignas(64) float row[NB];
    const __m512 r = _mm512_add_ps(_mm512_permutex2var_ps(acc[t][0], even, acc[t][1]),
                                   _mm512_permutex2var_ps(acc[t][0], odd, acc[t][1]));
    _mm512_store_ps(row, r);
    store_row(P, t0 + t, b, row);
  }
}

PAGODA_I8_AVX512 void block_avx512(const Problem& P, int64_t b) {
  int64_t t = 0;
  for (; t + MT5 <= P.T; t += MT5) tile_avx512<MT5>(P, b, t);
  switch (P.T - t) {
    case 5: return tile_avx512<5>(P, b, t);
    case 4: return tile_avx512<4>(P, b, t);
    case 3: return tile_avx512<3>(P, b, t);
    case 2: return tile_avx512<2>(P, b, t);
    case 1: return tile_avx512<1>(P, b, t);
    default: return;
  }
}

// ------------------------------------------------------------------------------ AVX512-BF16
// A pair's 32 codes widened to fp32 and narrowed to bf16 (exact: |code| <= 128) as one
// vector of 16 (code[j, 2p], code[j, 2p + 1]) pairs: lane j is row j, and vdpbf16ps against
// the broadcast word (x[2p], x[2p + 1]) adds both products (exact) to it. Tiles of up to 16
// rows: their dot products stay in registers through a group; the running sums, touched
// once a group, may live in memory.
constexpr int MTB = 16;

template <int M>
PAGODA_I8_BF16 void tile_bf16(const Problem& P, int64_t b, int64_t t0) {
  const int64_t G = P.G(), half = P.group / 2;
  const int8_t* c = P.block_codes(b);
  const float* s = P.block_scale(b);
  const float* o = P.block_offset(b);
  __m512 acc[M];
  for (int t = 0; t < M; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 dot[M];
    for (int t = 0; t < M; ++t) dot[t] = _mm512_setzero_ps();
    for (int64_t p = g * half; p < (g + 1) * half; ++p) {
      const int8_t* cp = c + p * 2 * NB;
      if ((p & 1) == 0) prefetch(cp + kPrefetchBytes);
      const __m512 lo = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp))));
      const __m512 hi = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + 16))));
      const __m512bh w = _mm512_cvtne2ps_pbh(hi, lo);  // lo's 16 bf16 first
      for (int t = 0; t < M; ++t) {
        uint32_t pair;
        std::memcpy(&pair, P.xb + (t0 + t) * P.ldx + 2 * p, sizeof(pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        dot[t] = _mm512_dpbf16_ps(dot[t], xv, w);
      }
    }
    const __m512 sv = _mm512_loadu_ps(s + g * NB);
    for (int t = 0; t < M; ++t) acc[t] = _mm512_fmadd_ps(sv, dot[t], acc[t]);
    if (o != nullptr) {
      const __m512 ov = _mm512_loadu_ps(o + g * NB);
      for (int t = 0; t < M; ++t)
        acc[t] = _mm512_fmadd_ps(ov, _mm512_set1_ps(P.xsum[(t0 + t) * G + g]), acc[t]);
    }
  }
  const __mmask16 m = static_cast<__mmask16>((1u << P.cols(b)) - 1u);
  for (int t = 0; t < M; ++t) {
    uint16_t* out = static_cast<uint16_t*>(P.out) + (t0 + t) * P.ldo + b * NB;
    _mm256_mask_storeu_epi16(out, m, (__m256i)_mm512_cvtneps_pbh(acc[t]));
  }
}

PAGODA_I8_BF16 void block_bf16(const Problem& P, int64_t b) {
  int64_t t = 0;
  for (; t + MTB <= P.T; t += MTB) tile_bf16<MTB>(P, b, t);
  switch (P.T - t) {
    case 15: return tile_bf16<15>(P, b, t);
    case 14: return tile_bf16<14>(P, b, t);
    case 13: return tile_bf16<13>(P, b, t);
    case 12: return tile_bf16<12>(P, b, t);
    case 11: return tile_bf16<11>(P, b, t);
    case 10: return tile_bf16<10>(P, b, t);
    case 9: return tile_bf16<9>(P, b, t);
    case 8: return tile_bf16<8>(P, b, t);
    case 7: return tile_bf16<7>(P, b, t);
    case 6: return tile_bf16<6>(P, b, t);
    case 5: return tile_bf16<5>(P, b, t);
    case 4: return tile_bf16<4>(P, b, t);
    case 3: return tile_bf16<3>(P, b, t);
    case 2: return tile_bf16<2>(P, b, t);
    case 1: return tile_bf16<1>(P, b, t);
    default: return;
  }
}
#endif  // PAGODA_I8_X86

bool cpu_has(Isa isa) {
  switch (isa) {
    case kPortable: return true;
#if defined(PAGODA_I8_X86)
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case kAvx512Bf16: return cpu_has(kAvx512) && __builtin_cpu_supports("avx512bf16");
#endif
    default: return false;
  }
}

// The path a call takes: ``isa`` if forced (it must be on this CPU), else the best one; the
// vdpbf16ps path only takes bf16 inputs (fp32 inputs take the AVX-512F one instead).
Isa choose(int64_t isa, bool x_bf16) {
  if (isa != kAuto) {
    TORCH_CHECK(isa >= kPortable && isa <= kAvx512Bf16, "int8_linear: unknown isa ", isa);
    TORCH_CHECK(cpu_has(static_cast<Isa>(isa)), "int8_linear: isa ", isa,
                " is not available on this CPU");
    TORCH_CHECK(isa != kAvx512Bf16 || x_bf16, "int8_linear: the avx512_bf16 path takes bf16 x");
    return static_cast<Isa>(isa);
  }
  for (Isa i : {kAvx512Bf16, kAvx512, kAvx2})
    if (cpu_has(i) && (i != kAvx512Bf16 || x_bf16)) return i;
  return kPortable;
}

void run_blocks(const Problem& P, Isa isa) {
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (P.K * NB));
  at::parallel_for(0, P.blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      switch (isa) {
#if defined(PAGODA_I8_X86)
        case kAvx512Bf16: block_bf16(P, b); break;
        case kAvx512: block_avx512(P, b); break;
        case kAvx2: block_avx2(P, b); break;
#endif
        default: block_portable(P, b);
      }
    }
  });
}

}  // namespace

// out (T, N) = x (T, K) @ W^T for W packed as above (the file's header). x and out: one dtype,
// fp32 or bf16, contiguous rows; ``isa``: 0 the best path, else the one forced (for tests).
void linear(at::Tensor out, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
            const c10::optional<at::Tensor>& offset, int64_t group, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "int8_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1,
              "int8_linear: x and out must be 2-D with contiguous rows");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "int8_linear: x must be float32 or bfloat16");
  TORCH_CHECK(out.scalar_type() == dtype, "int8_linear: out must have x's dtype");
  TORCH_CHECK(group == 16 || group == 32, "int8_linear: group must be 16 or 32");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 4 && codes.size(2) == NB &&
                  codes.size(3) == 2 && codes.is_contiguous(),
              "int8_linear: codes must be contiguous (blocks, K / 2, 16, 2) int8");
  const int64_t T = x.size(0), K = x.size(1), N = out.size(1), blocks = codes.size(0);
  TORCH_CHECK(out.size(0) == T && codes.size(1) * 2 == K && K % group == 0,
              "int8_linear: x (T, K), out (T, N) and codes (blocks, K / 2, 16, 2) disagree");
  TORCH_CHECK(N <= blocks * NB && N > (blocks - 1) * NB, "int8_linear: ", N,
              " output columns for ", blocks, " blocks of 16");
  auto check_groups = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 3 &&
                    t.size(0) == blocks && t.size(1) == K / group && t.size(2) == NB,
                "int8_linear: ", name, " must be contiguous (blocks, K / group, 16) float32");
  };
  check_groups(scale, "scale");
  const bool has_offset = offset.has_value() && offset->defined();
  if (has_offset) check_groups(*offset, "offset");
  if (T == 0 || N == 0) return;
  const bool x_bf16 = dtype == at::kBFloat16;
  const Isa path = choose(isa, x_bf16);

  Problem P{T, N, K, group, blocks, codes.data_ptr<int8_t>(), scale.data_ptr<float>(),
            has_offset ? offset->data_ptr<float>() : nullptr, nullptr, nullptr, x.stride(0),
            nullptr, out.data_ptr(), out.stride(0), x_bf16};
  // The fp32 paths read x as fp32 rows (bf16 widened once here); every path reads the group
  // sums of x where there is an offset.
  std::vector<float> xf_buf, xsum_buf;
  const bool need_f32 = path != kAvx512Bf16;
  if (need_f32 || has_offset) {
    xf_buf.resize(static_cast<size_t>(T * K));
    for (int64_t t = 0; t < T; ++t) {
      float* dst = xf_buf.data() + t * K;
      if (x_bf16) {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr()) + t * x.stride(0);
        for (int64_t k = 0; k < K; ++k) dst[k] = pagoda_bf16::to_f32(src[k]);
      } else {
        std::memcpy(dst, x.data_ptr<float>() + t * x.stride(0), K * sizeof(float));
      }
    }
    P.xf = xf_buf.data();
  }
  if (has_offset) {
    const int64_t G = K / group;
    xsum_buf.assign(static_cast<size_t>(T * G), 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xf_buf[t * K + k];
        xsum_buf[t * G + g] = s;
      }
    P.xsum = xsum_buf.data();
  }
  if (path == kAvx512Bf16) {
    TORCH_CHECK(x.stride(0) % 2 == 0, "int8_linear: bf16 x's row stride must be even");
    P.xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  }
  run_blocks(P, path);
}

// The paths this CPU can run, as ``isa`` numbers (1 portable, 2 avx2, 3 avx512,
// 4 avx512_bf16), best last.
std::vector<int64_t> available() {
  std::vector<int64_t> out;
  for (Isa i : {kPortable, kAvx2, kAvx512, kAvx512Bf16})
    if (cpu_has(i)) out.push_back(i);
  return out;
}

}  // namespace pagoda_int8

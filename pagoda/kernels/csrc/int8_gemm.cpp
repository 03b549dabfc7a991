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
// or, for codes of 4 bits (0..15: Q4_1, Q4_K; Q4_0's signed ones come shifted, with an
// offset), two a byte, half the bytes to read: input pairs 2 q and 2 q + 1 share 32 bytes,
// the first pair's code in the low nibble and the second's in the high one, each in the
// int8 order above (byte i = 2 j + e):
//     codes[b, q, i] = c8[b, 2 q, i] | c8[b, 2 q + 1, i] << 4      (blocks, K / 4, 32) uint8
// (passed as (blocks, K / 2, 16)), which every path unpacks in registers before the same
// arithmetic; the AVX512-BF16 one makes a pair's bf16 codes in two ops (tile_bf16).
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
  bool nibbles;          // 4-bit codes, two a byte (blocks, K / 2, 16)
  const int8_t* codes;   // (blocks, K / 2, 16, 2), or nibbles
  const float* scale;    // (blocks, G, 16)
  const float* offset;   // (blocks, G, 16) or nullptr
  const float* xf;       // (T, K) fp32 rows, stride K (fp32 paths), or nullptr
  const uint16_t* xb;    // (T, ldx) bf16 rows (the vdpbf16ps path), or nullptr
  int64_t ldx;
  const float* xsum;     // (T, G) group sums of x, or nullptr (not needed)
  void* out;             // (T, ldo), fp32 or bf16
  int64_t ldo;
  bool out_bf16;
  int64_t code_bias = -1;  // >= 0: every code + code_bias lies in 0..127 (the bf16 path's
                           // exponent trick, tile_bf16_small); -1: not so (8-bit codes)
  int64_t G() const { return K / group; }
  int64_t pair_bytes() const { return nibbles ? NB : 2 * NB; }  // one input pair's codes
  const int8_t* block_codes(int64_t b) const { return codes + b * (K / 2) * pair_bytes(); }
  // Where input pair p's codes start in a block's (for nibbles: the 32 bytes it shares).
  const int8_t* pair_codes(const int8_t* block, int64_t p) const {
    return nibbles ? block + (p >> 1) * 2 * NB : block + p * 2 * NB;
  }
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
// Row j's code of parity e in input pair p of a block's codes.
inline int code_at(const Problem& P, const int8_t* block, int64_t p, int64_t j, int e) {
  const int8_t* cp = P.pair_codes(block, p);
  if (!P.nibbles) return cp[2 * j + e];
  const unsigned v = static_cast<uint8_t>(cp[2 * j + e]);
  return static_cast<int>((p & 1) ? v >> 4 : v & 15u);
}

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
        const float x0 = x[2 * p], x1 = x[2 * p + 1];
        for (int64_t j = 0; j < NB; ++j)
          dot[j] += x0 * static_cast<float>(code_at(P, c, p, j, 0)) +
                    x1 * static_cast<float>(code_at(P, c, p, j, 1));
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

// Input pair p's 32 codes (of a block's ``c``) as int8 in (row, parity) order: rows 0..7 in
// ``first``, 8..15 in ``second`` (4-bit codes: the pair's nibble of each shared byte; 0..15
// read the same as int8). SSE2 only, so it inlines into every path.
template <bool NIB>
inline void load_pair(const Problem& P, const int8_t* c, int64_t p, __m128i& first,
                      __m128i& second) {
  const int8_t* cp = P.pair_codes(c, p);
  if constexpr (NIB) {
    const __m128i shift = _mm_cvtsi32_si128(static_cast<int>((p & 1) * 4));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cp));
    const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + 16));
    first = _mm_and_si128(_mm_srl_epi16(v0, shift), mask);
    second = _mm_and_si128(_mm_srl_epi16(v1, shift), mask);
  } else {
    first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cp));
    second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + 16));
  }
}

// ------------------------------------------------------------------------------ AVX2 + FMA
// A pair's 32 codes are four vectors of 8 lanes, (row 4q + i, parity e) in lane 2i + e.
// Per group, hadd of quarters (0, 1) and (2, 3) sums the parities into rows in the order
// (0, 1, 4, 5, 2, 3, 6, 7) of each half; the scales are permuted to match, and the block's
// results put back in row order at its end.
constexpr int MT2 = 2;  // rows per register tile

template <int M, bool NIB>
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
      if ((p & 1) == 0) prefetch(P.pair_codes(c, p) + kPrefetchBytes);
      __m128i first, second;
      load_pair<NIB>(P, c, p, first, second);
      const __m128i quarter[4] = {first, _mm_srli_si128(first, 8), second,
                                  _mm_srli_si128(second, 8)};
      __m256 w[4];
      for (int q = 0; q < 4; ++q) w[q] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(quarter[q]));
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

template <bool NIB>
PAGODA_I8_AVX2 void block_avx2(const Problem& P, int64_t b) {
  int64_t t = 0;
  for (; t + MT2 <= P.T; t += MT2) tile_avx2<MT2, NIB>(P, b, t);
  if (t < P.T) tile_avx2<1, NIB>(P, b, t);
}

// ------------------------------------------------------------------------------ AVX-512F
// A pair's 32 codes are two vectors: lo = rows 0..7, hi = rows 8..15, lane 2i + e = (row i,
// parity e). Per group the scales are spread to (row, parity) lanes; the offset term is added
// as offset * (xsum / 2) to both parities (exact halving), and each block folds the parity
// lanes at its end.
constexpr int MT5 = 6;

template <int M, bool NIB>
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
      if ((p & 1) == 0) prefetch(P.pair_codes(c, p) + kPrefetchBytes);
      __m128i first, second;
      load_pair<NIB>(P, c, p, first, second);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(first));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(second));
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

template <bool NIB>
PAGODA_I8_AVX512 void block_avx512(const Problem& P, int64_t b) {
  int64_t t = 0;
  for (; t + MT5 <= P.T; t += MT5) tile_avx512<MT5, NIB>(P, b, t);
  switch (P.T - t) {
    case 5: return tile_avx512<5, NIB>(P, b, t);
    case 4: return tile_avx512<4, NIB>(P, b, t);
    case 3: return tile_avx512<3, NIB>(P, b, t);
    case 2: return tile_avx512<2, NIB>(P, b, t);
    case 1: return tile_avx512<1, NIB>(P, b, t);
    default: return;
  }
}

// ------------------------------------------------------------------------------ AVX512-BF16
// A pair's 32 codes as one vector of 16 (code[j, 2p], code[j, 2p + 1]) bf16 pairs: lane j is
// row j, and vdpbf16ps against the broadcast word (x[2p], x[2p + 1]) adds both products
// (exact) to it. Two ways to make the bf16 codes:
//  - any int8 code: widened to fp32 and narrowed to bf16 (exact: |code| <= 128);
//  - codes of at most 7 bits (SMALL: code + code_bias in 0..127): the bf16 with bits
//    0x4300 | v is exactly 128 + v (exponent 7, mantissa v), so two integer ops (widen to 16
//    bits, or in the exponent; one more to add the bias) make them, and vdpbf16ps sums
//    x * (128 + code_bias + code). The excess, (128 + code_bias) times the group's sum of x,
//    comes off once a group with the scale: the rounding of the fp32 sums then scales with
//    128 + code rather than code (about 2^-20 of the result; bf16 out rounds at 2^-8).
// Tiles of up to 16 rows; their dot products stay in registers through a group, the running
// sums, touched once a group, may live in memory. A tile of few rows keeps CHAINS partial dot
// products per row (pairs taken in turn), so the adds do not wait on one another (at one row,
// a single chain of vdpbf16ps is bound by its latency, not by reading the codes).
constexpr int MTB = 16;

// Input pairs p0 .. p0 + 3's codes as bf16 (p0 a multiple of 4).
template <bool NIB, bool SMALL>
PAGODA_I8_BF16 inline void bf16_codes(const Problem& P, const int8_t* c, int64_t p0,
                                      __m512i bias, __m512bh w[4]) {
  const __m512i exponent = _mm512_set1_epi16(0x4300);
  if constexpr (NIB && SMALL) {  // code_bias 0: (byte & 15) | 0x4300 and (byte >> 4) | 0x4300
    const __m512i low4 = _mm512_set1_epi16(0x000f);
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(P.pair_codes(c, p0 + 2 * h)));
      const __m512i w16 = _mm512_cvtepu8_epi16(v);
      w[2 * h] = (__m512bh)_mm512_ternarylogic_epi32(w16, low4, exponent, 0xEA);  // a&b | c
      w[2 * h + 1] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w16, 4), exponent);
    }
  } else {
    for (int i = 0; i < 4; ++i) {
      __m128i first, second;
      load_pair<NIB>(P, c, p0 + i, first, second);
      if constexpr (SMALL) {  // int8 codes of at most 7 bits
        const __m512i w16 = _mm512_cvtepi8_epi16(_mm256_set_m128i(second, first));
        w[i] = (__m512bh)_mm512_or_si512(_mm512_add_epi16(w16, bias), exponent);
      } else {
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(first));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(second));
        w[i] = _mm512_cvtne2ps_pbh(hi, lo);  // lo's 16 bf16 first
      }
    }
  }
}

template <int M, bool NIB, bool SMALL>
PAGODA_I8_BF16 void tile_bf16(const Problem& P, int64_t b, int64_t t0) {
  constexpr int CHAINS = M >= 4 ? 1 : (M >= 2 ? 2 : 4);
  const int64_t G = P.G(), half = P.group / 2;  // half: 8 or 16 pairs, taken 4 at a time
  const int8_t* c = P.block_codes(b);
  const float* s = P.block_scale(b);
  const float* o = P.block_offset(b);
  const __m512i bias = _mm512_set1_epi16(static_cast<int16_t>(SMALL ? P.code_bias : 0));
  const __m512 excess = _mm512_set1_ps(-(128.f + static_cast<float>(P.code_bias)));
  __m512 acc[M];
  for (int t = 0; t < M; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 dot[CHAINS][M];
    for (int u = 0; u < CHAINS; ++u)
      for (int t = 0; t < M; ++t) dot[u][t] = _mm512_setzero_ps();
    for (int64_t p0 = g * half; p0 < (g + 1) * half; p0 += 4) {
      const int8_t* ahead = P.pair_codes(c, p0) + kPrefetchBytes;
      prefetch(ahead);
      if (!NIB) prefetch(ahead + 64);
      __m512bh w[4];
      bf16_codes<NIB, SMALL>(P, c, p0, bias, w);
      for (int i = 0; i < 4; ++i) {
        const int u = i % CHAINS;
        for (int t = 0; t < M; ++t) {
          uint32_t pair;
          std::memcpy(&pair, P.xb + (t0 + t) * P.ldx + 2 * (p0 + i), sizeof(pair));
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
          dot[u][t] = _mm512_dpbf16_ps(dot[u][t], xv, w[i]);
        }
      }
    }
    for (int u = 1; u < CHAINS; ++u)
      for (int t = 0; t < M; ++t) dot[0][t] = _mm512_add_ps(dot[0][t], dot[u][t]);
    const __m512 sv = _mm512_loadu_ps(s + g * NB);
    for (int t = 0; t < M; ++t) acc[t] = _mm512_fmadd_ps(sv, dot[0][t], acc[t]);
    if (SMALL) {
      const __m512 sx = _mm512_mul_ps(sv, excess);
      for (int t = 0; t < M; ++t)
        acc[t] = _mm512_fmadd_ps(sx, _mm512_set1_ps(P.xsum[(t0 + t) * G + g]), acc[t]);
    }
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

template <bool NIB, bool SMALL>
PAGODA_I8_BF16 void block_bf16(const Problem& P, int64_t b) {
  int64_t t = 0;
  for (; t + MTB <= P.T; t += MTB) tile_bf16<MTB, NIB, SMALL>(P, b, t);
  switch (P.T - t) {
    case 15: return tile_bf16<15, NIB, SMALL>(P, b, t);
    case 14: return tile_bf16<14, NIB, SMALL>(P, b, t);
    case 13: return tile_bf16<13, NIB, SMALL>(P, b, t);
    case 12: return tile_bf16<12, NIB, SMALL>(P, b, t);
    case 11: return tile_bf16<11, NIB, SMALL>(P, b, t);
    case 10: return tile_bf16<10, NIB, SMALL>(P, b, t);
    case 9: return tile_bf16<9, NIB, SMALL>(P, b, t);
    case 8: return tile_bf16<8, NIB, SMALL>(P, b, t);
    case 7: return tile_bf16<7, NIB, SMALL>(P, b, t);
    case 6: return tile_bf16<6, NIB, SMALL>(P, b, t);
    case 5: return tile_bf16<5, NIB, SMALL>(P, b, t);
    case 4: return tile_bf16<4, NIB, SMALL>(P, b, t);
    case 3: return tile_bf16<3, NIB, SMALL>(P, b, t);
    case 2: return tile_bf16<2, NIB, SMALL>(P, b, t);
    case 1: return tile_bf16<1, NIB, SMALL>(P, b, t);
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
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (P.K / 2 * P.pair_bytes()));
  at::parallel_for(0, P.blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      switch (isa) {
#if defined(PAGODA_I8_X86)
        case kAvx512Bf16:
          if (P.code_bias >= 0)
            P.nibbles ? block_bf16<true, true>(P, b) : block_bf16<false, true>(P, b);
          else
            P.nibbles ? block_bf16<true, false>(P, b) : block_bf16<false, false>(P, b);
          break;
        case kAvx512: P.nibbles ? block_avx512<true>(P, b) : block_avx512<false>(P, b); break;
        case kAvx2: P.nibbles ? block_avx2<true>(P, b) : block_avx2<false>(P, b); break;
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
            const c10::optional<at::Tensor>& offset, int64_t group, int64_t isa,
            int64_t code_bias) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "int8_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1,
              "int8_linear: x and out must be 2-D with contiguous rows");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "int8_linear: x must be float32 or bfloat16");
  TORCH_CHECK(out.scalar_type() == dtype, "int8_linear: out must have x's dtype");
  TORCH_CHECK(group == 16 || group == 32, "int8_linear: group must be 16 or 32");
  TORCH_CHECK(code_bias >= -1 && code_bias <= 128, "int8_linear: code_bias must be -1..128");
  const bool nibbles = codes.dim() == 3;
  TORCH_CHECK(codes.is_contiguous() && codes.size(2) == NB &&
                  (nibbles ? codes.scalar_type() == at::kByte
                           : codes.scalar_type() == at::kChar && codes.dim() == 4 &&
                                 codes.size(3) == 2),
              "int8_linear: codes must be contiguous (blocks, K / 2, 16, 2) int8, or "
              "(blocks, K / 2, 16) uint8 for 4-bit codes two a byte");
  TORCH_CHECK(!nibbles || code_bias <= 0, "int8_linear: 4-bit codes take code_bias 0 (or -1)");
  const int64_t T = x.size(0), K = x.size(1), N = out.size(1), blocks = codes.size(0);
  TORCH_CHECK(out.size(0) == T && codes.size(1) * 2 == K && K % group == 0,
              "int8_linear: x (T, K), out (T, N) and codes (blocks, K / 2, 16, ...) disagree");
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

  Problem P{T, N, K, group, blocks, nibbles, static_cast<const int8_t*>(codes.data_ptr()),
            scale.data_ptr<float>(),
            has_offset ? offset->data_ptr<float>() : nullptr, nullptr, nullptr, x.stride(0),
            nullptr, out.data_ptr(), out.stride(0), x_bf16};
  // The fp32 paths read x as fp32 rows (bf16 widened once here); every path reads the group
  // sums of x where there is an offset, and the bf16 path for small codes too.
  std::vector<float> xf_buf, xsum_buf;
  const bool need_f32 = path != kAvx512Bf16;
  if (path == kAvx512Bf16) P.code_bias = code_bias;
  const bool need_sums = has_offset || P.code_bias >= 0;
  if (need_f32 || need_sums) {
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
  if (need_sums) {
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

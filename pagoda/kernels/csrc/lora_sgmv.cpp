// The grouped LoRA delta of a mixed batch on the CPU: Punica's SGMV (Chen et al., "Punica:
// Multi-Tenant LoRA Serving", MLSys'24) as a shrink and an expand over row segments.
//
// For each segment (start, rows, slot) of `segments` (G, 3) int32, with adapters stacked in
// a (S, R, K) and b (S, N, R):
//     out[start : start + rows] += (x[start : start + rows] @ a[slot].T) @ b[slot].T
// Invariant: only the rows of out inside a segment are written, and a segment reads a[slot]
// and b[slot] of its own slot only (no vector load runs past a row of A, a row of B or the
// last column of out: tails are masked or copied), so NaN in another slot, or in rows outside
// the segments, never reaches the output. Every segment is checked before any work.
//
// One call does every segment in two parallel passes, h kept between them:
//  1. shrink: h (rows, R) = x_seg (rows, K) @ A^T. Work items are (segment, chunk of rows,
//     block of MA rows of A); an item keeps its A rows in L1 while MR rows of x at a time stream
//     by, MR x MA dot products over K held in vector accumulators, summed across lanes at the
//     end.
//  2. expand: out_seg (rows, N) += h @ B^T. Work items are (segment, chunk of rows, block of
//     NB columns); an item first packs its B block transposed, (R, NB) (in-register W x W
//     transposes), then for MR_E rows at a time accumulates h[i, r] * Bt[r, :] (a broadcast
//     times a vector, over r) in registers and adds the result to out once.
// Consecutive items of a thread share a segment, so its slot's A and B stay in cache.
//
// fp32 runs in fp32 throughout. bf16 sums in fp32 and rounds once, when the delta is added to
// out (to nearest, ties to even). Where the CPU has AVX512-BF16 both passes multiply bf16 pairs
// with vdpbf16ps (each product exact, fp32 sums), h then rounded to bf16 between the passes, as
// the reference rounds it; elsewhere bf16 is widened on load (a shift) and h stays fp32.
//
// The instruction set is chosen at compile time (the flags ext.py builds with): AVX-512 (16
// lanes; + BF16), AVX2 + FMA (8 lanes, e.g. Zen 3), or plain C++ loops the compiler vectorises
// as it can. Tile sizes follow the vector registers each has.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bf16.h"

namespace pagoda_lora {

namespace {

using bf16_t = uint16_t;  // bf16 bits, as in bf16.h

inline float widen(float v) { return v; }
inline float widen(bf16_t v) { return pagoda_bf16::to_f32(v); }

// ------------------------------------------------------------------------------------------
// The vector type of this build: V holds W fp32 lanes. load() widens bf16; load_part() reads
// only the first n (< W) elements and zeroes the other lanes.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAGODA_LORA_ISA "avx512"
#define PAGODA_LORA_AVX512 1
#if defined(__AVX512BF16__)
#define PAGODA_LORA_DPBF16 1  // vdpbf16ps: bf16 pairs, products exact, fp32 sums
#endif
constexpr int W = 16;
using V = __m512;
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float f) { return _mm512_set1_ps(f); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(V v) { return _mm512_reduce_add_ps(v); }
inline __m256 fold(V v) {  // (lo 8 + hi 8) lanes
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V widen16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline V load(const bf16_t* p) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline V load_part(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline V load_part(const bf16_t* p, int64_t n) {
  return widen16(_mm256_maskz_loadu_epi16(first(n), p));
}

// Rows r[0..15] (16 lanes each) to columns, in place: r[q] lane j = old r[j] lane q.
inline void transpose(V r[W]) {
  V t[W];
  for (int i = 0; i < 8; ++i) {  // per 128-bit block: (r2i[0], r2i+1[0], r2i[1], r2i+1[1]), ...
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + e], block b: element 4b + e of rows 4i .. 4i + 3
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int e = 0; e < 4; ++e) {  // gather block b of the four groups: column 4b + e
    const V u0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x44);
    const V u1 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xEE);
    const V u2 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x44);
    const V u3 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xEE);
    t[e] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[4 + e] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    t[8 + e] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[12 + e] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
  for (int q = 0; q < W; ++q) r[q] = t[q];
}

#elif defined(__AVX2__) && defined(__FMA__)
#define PAGODA_LORA_ISA "avx2"
constexpr int W = 8;
using V = __m256;
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float f) { return _mm256_set1_ps(f); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 fold(V v) { return v; }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const bf16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <class T>
inline V load_part(const T* p, int64_t n) {
  alignas(32) float tmp[W] = {0.f};
  for (int64_t i = 0; i < n; ++i) tmp[i] = widen(p[i]);
  return _mm256_load_ps(tmp);
}

// Rows r[0..7] to columns, in place.
inline void transpose(V r[W]) {
  V t[W], s[W];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // s[4i + e], 128-bit half c: element 4c + e of rows 4i .. 4i + 3
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int e = 0; e < 4; ++e) {
    r[e] = _mm256_permute2f128_ps(s[e], s[4 + e], 0x20);
    r[4 + e] = _mm256_permute2f128_ps(s[e], s[4 + e], 0x31);
  }
}

#else
#define PAGODA_LORA_ISA "generic"
constexpr int W = 8;
struct V {
  float v[W];
};
inline V zero() { return V{}; }
inline V set1(float f) {
  V r;
  for (int i = 0; i < W; ++i) r.v[i] = f;
  return r;
}
inline V fma(V a, V b, V c) {
  for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline float sum(V v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v.v[i];
  return s;
}
inline void store(float* p, V v) { std::memcpy(p, v.v, sizeof(v.v)); }
template <class T>
inline V load(const T* p) {
  V r;
  for (int i = 0; i < W; ++i) r.v[i] = widen(p[i]);
  return r;
}
template <class T>
inline V load_part(const T* p, int64_t n) {
  V r{};
  for (int64_t i = 0; i < n; ++i) r.v[i] = widen(p[i]);
  return r;
}
inline void transpose(V r[W]) {
  for (int i = 0; i < W; ++i)
    for (int j = i + 1; j < W; ++j) std::swap(r[i].v[j], r[j].v[i]);
}
#endif

// out[0..3] = the lane sums of v0..v3 (with vectors: a 256-bit fold, then three horizontal
// adds, where four separate sums take about twice the instructions).
inline void sum4(V v0, V v1, V v2, V v3, float* out) {
#if defined(PAGODA_LORA_AVX512) || (defined(__AVX2__) && defined(__FMA__))
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(v0), fold(v1)),
                                  _mm256_hadd_ps(fold(v2), fold(v3)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  out[0] = sum(v0), out[1] = sum(v1), out[2] = sum(v2), out[3] = sum(v3);
#endif
}

// o[0 .. min(n, W)) += d's lanes, rounded once to o's dtype (bf16: to nearest, ties to even,
// NaN kept a quiet NaN, as pagoda_bf16::from_f32); nothing past o[n - 1] is read or written.
#if defined(PAGODA_LORA_AVX512)
inline __m256i to_bf16(V f) {
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
  const __m512i r = _mm512_mask_mov_epi32(up, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), quiet);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
inline void add_to(float* o, V d, int64_t n) {
  if (n >= W) return _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), d));
  _mm512_mask_storeu_ps(o, first(n), _mm512_add_ps(load_part(o, n), d));
}
inline void add_to(bf16_t* o, V d, int64_t n) {
  if (n >= W) {
    const V sum = _mm512_add_ps(load(o), d);
    return _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), to_bf16(sum));
  }
  _mm256_mask_storeu_epi16(o, first(n), to_bf16(_mm512_add_ps(load_part(o, n), d)));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m128i to_bf16(V f) {
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  const __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(up, quiet, nan), 16);
  // 32 -> 16 bits per 128-bit half, then the halves' low quadwords together.
  const __m256i packed = _mm256_packus_epi32(r, r);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
// A partial vector goes through memory, out of line: inlined, gcc would keep the caller's
// accumulators in memory too (a store each step of the expand loop).
template <class T>
__attribute__((noinline)) void add_part(T* o, V d, int64_t n) {
  alignas(32) float tmp[W];
  _mm256_store_ps(tmp, d);
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (std::is_same_v<T, float>) {
      o[j] += tmp[j];
    } else {
      o[j] = pagoda_bf16::from_f32(pagoda_bf16::to_f32(o[j]) + tmp[j]);
    }
  }
}
inline void add_to(float* o, V d, int64_t n) {
  if (n >= W) return _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), d));
  add_part(o, d, n);
}
inline void add_to(bf16_t* o, V d, int64_t n) {
  if (n >= W) {
    const __m128i r = to_bf16(_mm256_add_ps(load(o), d));
    return _mm_storeu_si128(reinterpret_cast<__m128i*>(o), r);
  }
  add_part(o, d, n);
}
#else
inline void add_to(float* o, V d, int64_t n) {
  for (int64_t j = 0; j < std::min<int64_t>(n, W); ++j) o[j] += d.v[j];
}
inline void add_to(bf16_t* o, V d, int64_t n) {
  for (int64_t j = 0; j < std::min<int64_t>(n, W); ++j)
    o[j] = pagoda_bf16::from_f32(pagoda_bf16::to_f32(o[j]) + d.v[j]);
}
#endif

// ------------------------------------------------------------------------------------------
// Blocking: MR x MA dot products per shrink tile, MR_E rows x NV vectors per expand tile, as
// many accumulators as the build's vector registers hold (32 with AVX-512, 16 otherwise); the
// vdpbf16ps tiles (_DP) have their own (measured best on Zen 4).
#if defined(PAGODA_LORA_AVX512)
constexpr int MR = 6, MA = 4, MR_E = 6, NV = 2;
#else
constexpr int MR = 2, MA = 4, MR_E = 6, NV = 2;
#endif
constexpr int MR_DP = 4, MR_E_DP = 4, NV_DP = 6;
constexpr int NB = NV * W, NB_DP = NV_DP * W;  // columns per expand work item

// Whether a pass runs on vdpbf16ps: the shrink of bf16 x, the expand of a bf16 h.
template <class T>
constexpr bool kDp =
#if defined(PAGODA_LORA_DPBF16)
    std::is_same_v<T, bf16_t>;
#else
    false;
#endif
constexpr int64_t kRowChunk = 64;  // rows per work item (bounds the imbalance between threads)
constexpr int64_t kMinTaskMacs = 1 << 16;  // multiply-adds under which a pass stays serial

// A segment, checked, with the offset of its first row in h.
struct Seg {
  int64_t start, rows, slot, h_row;
};

// A work item of either pass: rows [row0, row0 + rows) of segment seg, and its block of A's
// rows (shrink) or of out's columns (expand) starting at col0.
struct Item {
  int64_t seg, row0, rows, col0;
};

// f(std::integral_constant<int, m>, i) over rows [0, rows) in tiles of M rows, the last tile
// of rows % M (each tile size its own instantiation, so accumulators stay in registers).
template <int M, class F>
inline void tail_tile(int64_t left, int64_t i, F& f) {
  if constexpr (M > 0) {
    if (left == M) return f(std::integral_constant<int, M>{}, i);
    tail_tile<M - 1>(left, i, f);
  }
}
template <int M, class F>
inline void row_tiles(int64_t rows, F f) {
  int64_t i = 0;
  for (; i + M <= rows; i += M) f(std::integral_constant<int, M>{}, i);
  tail_tile<M - 1>(rows - i, i, f);
}

// f(std::integral_constant<int, i>) for i = 0 .. N - 1, unrolled at compile time.
template <class F, int... I>
inline void unrolled(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline void static_for(F f) {
  unrolled(f, std::make_integer_sequence<int, N>{});
}

// o (MRt rows, stride ldo) += acc over nn columns. Every index a constant (a runtime loop here
// makes gcc keep acc in memory, a store per accumulator each step of the loop that fills it).
template <int MRt, int NVt, class T>
inline void add_tile(V (&acc)[MRt][NVt], T* o, int64_t ldo, int64_t nn) {
  static_for<MRt>([&](auto i) {
    static_for<NVt>([&](auto c) {
      if (c * W < nn) add_to(o + i * ldo + c * W, acc[i][c], nn - c * W);
    });
  });
}

// ---------------------------------------------------------------------------------- shrink
// h[i * ldh + j] = the lane sum of acc[i][j], as fp32 or rounded to bf16.
inline void put(float* h, const float* v, int n) { std::memcpy(h, v, n * sizeof(float)); }
inline void put(bf16_t* h, const float* v, int n) {
  for (int j = 0; j < n; ++j) h[j] = pagoda_bf16::from_f32(v[j]);
}
template <int MRt, int MAt, class H>
inline void store_sums(V (&acc)[MRt][MAt], H* h, int64_t ldh) {
  for (int i = 0; i < MRt; ++i) {
    alignas(16) float sums[MAt];
    int j = 0;
    for (; j + 4 <= MAt; j += 4)
      sum4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3], sums + j);
    for (; j < MAt; ++j) sums[j] = sum(acc[i][j]);
    put(h + i * ldh, sums, MAt);
  }
}

// h[i * ldh + j] = x_i . a_j over K, for MRt rows of x (stride ldx), MAt rows of a (stride K).
template <int MRt, int MAt, class T, class H>
inline void shrink_tile(const T* x, int64_t ldx, const T* a, int64_t K, H* h, int64_t ldh) {
  V acc[MRt][MAt];
  for (int i = 0; i < MRt; ++i)
    for (int j = 0; j < MAt; ++j) acc[i][j] = zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V av[MAt];
    for (int j = 0; j < MAt; ++j) av[j] = load(a + j * K + k);
    for (int i = 0; i < MRt; ++i) {
      const V xv = load(x + i * ldx + k);
      for (int j = 0; j < MAt; ++j) acc[i][j] = fma(xv, av[j], acc[i][j]);
    }
  }
  if (k < K) {
    V av[MAt];
    for (int j = 0; j < MAt; ++j) av[j] = load_part(a + j * K + k, K - k);
    for (int i = 0; i < MRt; ++i) {
      const V xv = load_part(x + i * ldx + k, K - k);
      for (int j = 0; j < MAt; ++j) acc[i][j] = fma(xv, av[j], acc[i][j]);
    }
  }
  store_sums(acc, h, ldh);
}

#if defined(PAGODA_LORA_DPBF16)
// acc[i][j] += 32 products of bf16 x_i and a_j at k, each exact, summed in fp32 (vdpbf16ps);
// only the first n (<= 32) elements are read.
template <int MRt, int MAt, bool kFull>
inline void dp_step(const bf16_t* x, int64_t ldx, const bf16_t* a, int64_t K, int64_t k,
                    int64_t n, __m512 (&acc)[MRt][MAt]) {
  const __mmask32 m = kFull ? ~__mmask32{0} : static_cast<__mmask32>((1ull << n) - 1u);
  __m512bh av[MAt];
  for (int j = 0; j < MAt; ++j)
    av[j] = (__m512bh)(kFull ? _mm512_loadu_si512(a + j * K + k)
                             : _mm512_maskz_loadu_epi16(m, a + j * K + k));
  for (int i = 0; i < MRt; ++i) {
    const bf16_t* xp = x + i * ldx + k;
    const __m512bh xv =
        (__m512bh)(kFull ? _mm512_loadu_si512(xp) : _mm512_maskz_loadu_epi16(m, xp));
    for (int j = 0; j < MAt; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, av[j]);
  }
}

template <int MRt, int MAt, class H>
inline void shrink_tile_dp(const bf16_t* x, int64_t ldx, const bf16_t* a, int64_t K, H* h,
                           int64_t ldh) {
  constexpr int64_t P = 32;  // bf16 per vector
  __m512 acc[MRt][MAt];
  for (int i = 0; i < MRt; ++i)
    for (int j = 0; j < MAt; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + P <= K; k += P) dp_step<MRt, MAt, true>(x, ldx, a, K, k, P, acc);
  if (k < K) dp_step<MRt, MAt, false>(x, ldx, a, K, k, K - k, acc);
  store_sums(acc, h, ldh);
}
#endif

template <int MRt, int MAt, class T, class H>
inline void shrink_dispatch(const T* x, int64_t ldx, const T* a, int64_t K, H* h, int64_t ldh) {
#if defined(PAGODA_LORA_DPBF16)
  if constexpr (std::is_same_v<T, bf16_t>) return shrink_tile_dp<MRt, MAt>(x, ldx, a, K, h, ldh);
#endif
  shrink_tile<MRt, MAt>(x, ldx, a, K, h, ldh);
}

// MRt rows of x against na (<= MA) rows of a.
template <int MRt, class T, class H>
inline void shrink_rows(const T* x, int64_t ldx, const T* a, int64_t na, int64_t K, H* h,
                        int64_t ldh) {
  if (na == MA) return shrink_dispatch<MRt, MA>(x, ldx, a, K, h, ldh);
  for (int64_t j = 0; j < na; ++j) shrink_dispatch<MRt, 1>(x, ldx, a + j * K, K, h + j, ldh);
}

// One shrink item: h rows of the chunk, columns [col0, col0 + MA) of R (h: stride ldh >= R).
template <class T, class H>
void shrink_item(const Item& it, const Seg& s, const T* x, int64_t ldx, const T* a, int64_t R,
                 int64_t K, H* h, int64_t ldh) {
  const T* a_blk = a + (s.slot * R + it.col0) * K;  // (na, K)
  const int64_t na = std::min<int64_t>(MA, R - it.col0);
  const T* xr = x + (s.start + it.row0) * ldx;  // (rows, K), stride ldx
  H* hr = h + (s.h_row + it.row0) * ldh + it.col0;
  row_tiles<kDp<T> ? MR_DP : MR>(it.rows, [&](auto m, int64_t i) {
    shrink_rows<decltype(m)::value>(xr + i * ldx, ldx, a_blk, na, K, hr + i * ldh, ldh);
  });
}

// ---------------------------------------------------------------------------------- expand
// bt (R, NB) fp32 = B[n0 : n0 + nn, :]^T for the nn (<= NB) rows of b_slot (N, R) from n0;
// columns nn .. NB are zero.
template <class T>
void pack_bt(const T* b_slot, int64_t n0, int64_t nn, int64_t R, float* bt) {
  for (int64_t j0 = 0; j0 < NB; j0 += W) {
    for (int64_t r0 = 0; r0 < R; r0 += W) {
      const int64_t nr = std::min<int64_t>(W, R - r0);
      V t[W];
      for (int64_t j = 0; j < W; ++j) {
        const T* row = b_slot + (n0 + j0 + j) * R + r0;
        t[j] = j0 + j >= nn ? zero() : (nr == W ? load(row) : load_part(row, nr));
      }
      transpose(t);  // t[q]: column r0 + q of this W x W block
      for (int64_t q = 0; q < nr; ++q) store(bt + (r0 + q) * NB + j0, t[q]);
    }
  }
}

// o (MRt rows, stride ldo; nn columns) += h (MRt rows, stride R) @ bt (R, NB).
template <int MRt, class T>
inline void expand_tile(const float* h, int64_t R, const float* bt, T* o, int64_t ldo,
                        int64_t nn) {
  V acc[MRt][NV];
  for (int i = 0; i < MRt; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = zero();
  for (int64_t r = 0; r < R; ++r) {
    V bv[NV];
    for (int c = 0; c < NV; ++c) bv[c] = load(bt + r * NB + c * W);
    for (int i = 0; i < MRt; ++i) {
      const V hv = set1(h[i * R + r]);
      for (int c = 0; c < NV; ++c) acc[i][c] = fma(hv, bv[c], acc[i][c]);
    }
  }
  add_tile(acc, o, ldo, nn);
}

#if defined(PAGODA_LORA_DPBF16)
// The bf16 expand: h rounded to bf16 (as the reference rounds it) and paired, (h[2p], h[2p+1])
// one 32-bit word, against B's pairs (B[n, 2p], B[n, 2p + 1]), which are adjacent in memory:
// viewed as 32-bit words, b_slot is (N, ceil(R / 2)), and its transpose is the layout
// vdpbf16ps wants. bt2 (P, NB_DP) words = those of rows n0 .. n0 + nn; an odd R's last word
// has a zero upper half (masked loads), columns nn .. NB_DP are zero.
void pack_bt2(const bf16_t* b_slot, int64_t n0, int64_t nn, int64_t R, uint32_t* bt2) {
  const int64_t P = (R + 1) / 2;
  for (int64_t j0 = 0; j0 < NB_DP; j0 += W) {
    for (int64_t p0 = 0; p0 < P; p0 += W) {
      const int64_t left = std::min<int64_t>(2 * W, R - 2 * p0);  // bf16 of a row in this block
      const __mmask32 m = static_cast<__mmask32>((1ull << left) - 1u);
      V t[W];
      for (int64_t j = 0; j < W; ++j) {
        const bf16_t* row = b_slot + (n0 + j0 + j) * R + 2 * p0;
        t[j] = j0 + j >= nn ? zero() : _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, row));
      }
      transpose(t);  // t[q]: word column p0 + q
      for (int64_t q = 0; q < std::min<int64_t>(W, P - p0); ++q)
        _mm512_storeu_ps(reinterpret_cast<float*>(bt2 + (p0 + q) * NB_DP + j0), t[q]);
    }
  }
}

// o (MRt rows, stride ldo; nn columns) += h2 (MRt rows of P words) @ bt2 (P, NB_DP words).
template <int MRt>
inline void expand_tile_dp(const uint32_t* h2, int64_t P, const uint32_t* bt2, bf16_t* o,
                           int64_t ldo, int64_t nn) {
  V acc[MRt][NV_DP];
  for (int i = 0; i < MRt; ++i)
    for (int c = 0; c < NV_DP; ++c) acc[i][c] = zero();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh bv[NV_DP];
    for (int c = 0; c < NV_DP; ++c)
      bv[c] = (__m512bh)_mm512_loadu_si512(bt2 + p * NB_DP + c * W);
    for (int i = 0; i < MRt; ++i) {
      const __m512bh hv = (__m512bh)_mm512_set1_epi32(static_cast<int>(h2[i * P + p]));
      for (int c = 0; c < NV_DP; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], hv, bv[c]);
    }
  }
  add_tile(acc, o, ldo, nn);
}
#endif

// One expand item: out rows of the chunk, columns [col0, col0 + NB) of N (NB_DP on
// vdpbf16ps). h: fp32 (rows, R), or bf16 (rows, R rounded up to even) for the vdpbf16ps tile;
// pack: room for B's block.
template <class T, class H>
void expand_item(const Item& it, const Seg& s, const T* b, int64_t N, int64_t R, const H* h,
                 T* out, int64_t ldo, float* pack) {
  const int64_t nn = std::min<int64_t>(kDp<H> ? NB_DP : NB, N - it.col0);
  T* o = out + (s.start + it.row0) * ldo + it.col0;
#if defined(PAGODA_LORA_DPBF16)
  if constexpr (std::is_same_v<H, bf16_t>) {
    const int64_t P = (R + 1) / 2;
    auto* bt2 = reinterpret_cast<uint32_t*>(pack);
    pack_bt2(b + s.slot * N * R, it.col0, nn, R, bt2);
    const auto* h2 = reinterpret_cast<const uint32_t*>(h + (s.h_row + it.row0) * 2 * P);
    return row_tiles<MR_E_DP>(it.rows, [&](auto m, int64_t i) {
      expand_tile_dp<decltype(m)::value>(h2 + i * P, P, bt2, o + i * ldo, ldo, nn);
    });
  }
#endif
  if constexpr (std::is_same_v<H, float>) {
    pack_bt(b + s.slot * N * R, it.col0, nn, R, pack);
    const float* hr = h + (s.h_row + it.row0) * R;
    row_tiles<MR_E>(it.rows, [&](auto m, int64_t i) {
      expand_tile<decltype(m)::value>(hr + i * R, R, pack, o + i * ldo, ldo, nn);
    });
  }
}

// ---------------------------------------------------------------------------------- driver
// Items (segment, row chunk, block of `width` along `extent`), in segment order: consecutive
// items of a thread's range share the segment's slot, whose A and B stay in cache.
std::vector<Item> items(const std::vector<Seg>& segs, int64_t extent, int64_t width) {
  std::vector<Item> out;
  for (int64_t g = 0; g < static_cast<int64_t>(segs.size()); ++g)
    for (int64_t r0 = 0; r0 < segs[g].rows; r0 += kRowChunk)
      for (int64_t c0 = 0; c0 < extent; c0 += width)
        out.push_back({g, r0, std::min(kRowChunk, segs[g].rows - r0), c0});
  return out;
}

// Items per task so that a task does at least kMinTaskMacs (all in one when the pass is small).
int64_t grain(int64_t num_items, int64_t macs) {
  if (num_items == 0) return 1;
  const int64_t per_item = std::max<int64_t>(1, macs / num_items);
  return std::max<int64_t>(1, kMinTaskMacs / per_item);
}

// The two passes, h of type H between them: fp32 (rows, R), or bf16 (rows, R rounded up to
// even, the pad column zero) where the expand runs on vdpbf16ps.
template <class T, class H>
void run(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
         const std::vector<Seg>& segs, int64_t total_rows) {
  const int64_t K = x.size(1), N = out.size(1), R = a.size(1);
  const int64_t ldh = std::is_same_v<H, float> ? R : R + R % 2;
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* ap = static_cast<const T*>(a.data_ptr());
  const T* bp = static_cast<const T*>(b.data_ptr());
  T* op = static_cast<T*>(out.data_ptr());
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  std::vector<H> h(static_cast<size_t>(total_rows * ldh));  // zeroed: an odd R's pad column

  const std::vector<Item> shrink = items(segs, R, MA);
  const int64_t n_shrink = static_cast<int64_t>(shrink.size());
  at::parallel_for(0, n_shrink, grain(n_shrink, total_rows * R * K), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Item& it = shrink[i];
      shrink_item(it, segs[it.seg], xp, ldx, ap, R, K, h.data(), ldh);
    }
  });
  const std::vector<Item> expand = items(segs, N, kDp<H> ? NB_DP : NB);
  const int64_t n_expand = static_cast<int64_t>(expand.size());
  at::parallel_for(0, n_expand, grain(n_expand, total_rows * R * N), [&](int64_t lo, int64_t hi) {
    std::vector<float> pack(static_cast<size_t>((R + 1) * std::max(NB, NB_DP)));  // B's block
    for (int64_t i = lo; i < hi; ++i) {
      const Item& it = expand[i];
      expand_item(it, segs[it.seg], bp, N, R, h.data(), op, ldo, pack.data());
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1), name,
              " must be 2-D with contiguous rows");
}

// The segments, checked against out's rows and the slots (nothing runs if one is bad).
std::vector<Seg> read_segments(const at::Tensor& segments, int64_t T, int64_t S,
                               int64_t* total_rows) {
  TORCH_CHECK(segments.scalar_type() == at::kInt && segments.dim() == 2 &&
                  segments.size(1) == 3 && segments.is_contiguous(),
              "segments must be a contiguous (G, 3) int32 tensor");
  const int32_t* p = segments.data_ptr<int32_t>();
  std::vector<Seg> segs;
  *total_rows = 0;
  for (int64_t g = 0; g < segments.size(0); ++g) {
    const int64_t start = p[3 * g], rows = p[3 * g + 1], slot = p[3 * g + 2];
    TORCH_CHECK(start >= 0 && rows >= 0 && start + rows <= T, "segment ", g, " rows [", start,
                ", ", start + rows, ") outside the ", T, " rows");
    TORCH_CHECK(slot >= 0 && slot < S, "segment ", g, " slot ", slot, " outside [0, ", S, ")");
    if (rows == 0) continue;
    segs.push_back({start, rows, slot, *total_rows});
    *total_rows += rows;
  }
  return segs;
}

}  // namespace

// out (T, N) += per segment (x rows (rows, K) @ a[slot] (R, K)^T) @ b[slot] (N, R)^T, in place.
void lora_sgmv(at::Tensor out, at::Tensor x, at::Tensor a, at::Tensor b, at::Tensor segments) {
  check_rows(out, "out");
  check_rows(x, "x");
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "out must be float32 or bfloat16");
  TORCH_CHECK(x.scalar_type() == dtype && a.scalar_type() == dtype && b.scalar_type() == dtype,
              "out, x, a and b must share one dtype");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.is_contiguous() && b.is_contiguous() &&
                  a.device().is_cpu() && b.device().is_cpu(),
              "a (S, R, K) and b (S, N, R) must be contiguous CPU tensors");
  const int64_t T = out.size(0), N = out.size(1), K = x.size(1);
  const int64_t S = a.size(0), R = a.size(1);
  TORCH_CHECK(x.size(0) == T, "x and out must have the same rows");
  TORCH_CHECK(a.size(2) == K, "a must be (S, R, K) with K = x.size(1)");
  TORCH_CHECK(b.size(0) == S && b.size(1) == N && b.size(2) == R,
              "b must be (S, N, R) with N = out.size(1) and a's S and R");
  int64_t total_rows = 0;
  const std::vector<Seg> segs = read_segments(segments, T, S, &total_rows);
  if (segs.empty() || R == 0 || N == 0) return;
  if (dtype == at::kFloat) return run<float, float>(out, x, a, b, segs, total_rows);
#if defined(PAGODA_LORA_DPBF16)
  run<bf16_t, bf16_t>(out, x, a, b, segs, total_rows);
#else
  run<bf16_t, float>(out, x, a, b, segs, total_rows);
#endif
}

// The instruction set this file was compiled for (for benchmark reports).
std::string isa() {
#if defined(PAGODA_LORA_DPBF16)
  return std::string(PAGODA_LORA_ISA) + "+bf16";
#else
  return PAGODA_LORA_ISA;
#endif
}

}  // namespace pagoda_lora

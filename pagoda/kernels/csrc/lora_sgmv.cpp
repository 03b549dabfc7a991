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
// One call does every segment in two parallel passes (h stays fp32 between them):
//  1. shrink: h (rows, R) = x_seg (rows, K) @ A^T. Work items are (segment, chunk of rows,
//     block of MA rows of A); an item keeps its A rows in L1 while MR x rows at a time stream
//     by, MR x MA dot products over K held in vector accumulators.
//  2. expand: out_seg (rows, N) += h @ B^T. Work items are (segment, chunk of rows, block of
//     NB columns); an item first packs its B block transposed into fp32 (R, NB) (an in-register
//     W x W transpose), then for MR rows at a time accumulates h[i, r] * Bt[r, :] (broadcast
//     times vector, over r) in registers and adds the result to out once.
// bf16 is widened to fp32 on load (a shift) and the sum is rounded once, when added to out; on
// AVX512-BF16 builds the shrink multiplies bf16 pairs exactly with vdpbf16ps (fp32 sums).
//
// The instruction set is chosen at compile time (the flags ext.py builds with): AVX-512 (16
// lanes), AVX2 + FMA (8 lanes), or plain C++ loops the compiler vectorises as it can.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
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
constexpr int W = 16;
using V = __m512;
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float f) { return _mm512_set1_ps(f); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(V v) { return _mm512_reduce_add_ps(v); }
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

// ------------------------------------------------------------------------------------------
// Blocking. MR x MA dot products per shrink tile; MR_E rows x NB columns per expand tile.
constexpr int MR = 4;
constexpr int MA = 4;
constexpr int MR_E = 6;
constexpr int NV = 2;            // vectors per expand tile row
constexpr int NB = NV * W;       // columns per expand work item
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

// ---------------------------------------------------------------------------------- shrink
// h[i * R + j] = x_i . a_j over K, for MRt rows of x (stride ldx) and MAt rows of a (stride K).
template <int MRt, int MAt, class T>
inline void shrink_tile(const T* x, int64_t ldx, const T* a, int64_t K, float* h, int64_t R) {
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
  for (int i = 0; i < MRt; ++i)
    for (int j = 0; j < MAt; ++j) h[i * R + j] = sum(acc[i][j]);
}

#if defined(PAGODA_LORA_AVX512) && defined(__AVX512BF16__)
#define PAGODA_LORA_DPBF16 1
// bf16 x and a: 32 products per instruction, each exact, summed in fp32 (vdpbf16ps).
template <int MRt, int MAt>
inline void shrink_tile_dp(const bf16_t* x, int64_t ldx, const bf16_t* a, int64_t K, float* h,
                           int64_t R) {
  constexpr int64_t P = 32;  // bf16 per vector
  __m512 acc[MRt][MAt];
  for (int i = 0; i < MRt; ++i)
    for (int j = 0; j < MAt; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += P) {
    const __mmask32 m = K - k >= P ? ~__mmask32{0} : static_cast<__mmask32>((1u << (K - k)) - 1u);
    __m512bh av[MAt];
    for (int j = 0; j < MAt; ++j) av[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, a + j * K + k);
    for (int i = 0; i < MRt; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + i * ldx + k);
      for (int j = 0; j < MAt; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, av[j]);
    }
  }
  for (int i = 0; i < MRt; ++i)
    for (int j = 0; j < MAt; ++j) h[i * R + j] = _mm512_reduce_add_ps(acc[i][j]);
}
#endif

template <int MRt, int MAt, class T>
inline void shrink_dispatch(const T* x, int64_t ldx, const T* a, int64_t K, float* h, int64_t R) {
#if defined(PAGODA_LORA_DPBF16)
  if constexpr (std::is_same_v<T, bf16_t>) {
    shrink_tile_dp<MRt, MAt>(x, ldx, a, K, h, R);
    return;
  }
#endif
  shrink_tile<MRt, MAt>(x, ldx, a, K, h, R);
}

// MRt rows of x against na (<= MA) rows of a.
template <int MRt, class T>
inline void shrink_rows(const T* x, int64_t ldx, const T* a, int64_t na, int64_t K, float* h,
                        int64_t R) {
  if (na == MA) return shrink_dispatch<MRt, MA>(x, ldx, a, K, h, R);
  for (int64_t j = 0; j < na; ++j) shrink_dispatch<MRt, 1>(x, ldx, a + j * K, K, h + j, R);
}

// One shrink item: h rows of the chunk, columns [col0, col0 + MA) of R.
template <class T>
void shrink_item(const Item& it, const Seg& s, const T* x, int64_t ldx, const T* a, int64_t R,
                 int64_t K, float* h) {
  const T* a_blk = a + (s.slot * R + it.col0) * K;  // (na, K)
  const int64_t na = std::min<int64_t>(MA, R - it.col0);
  const T* xr = x + (s.start + it.row0) * ldx;  // (rows, K), stride ldx
  float* hr = h + (s.h_row + it.row0) * R + it.col0;
  int64_t i = 0;
  for (; i + MR <= it.rows; i += MR) shrink_rows<MR>(xr + i * ldx, ldx, a_blk, na, K, hr + i * R, R);
  for (; i < it.rows; ++i) shrink_rows<1>(xr + i * ldx, ldx, a_blk, na, K, hr + i * R, R);
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

// acc (MRt, NB) = h (MRt rows, stride R) @ bt (R, NB).
template <int MRt>
inline void expand_tile(const float* h, int64_t R, const float* bt, float* acc_out) {
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
  for (int i = 0; i < MRt; ++i)
    for (int c = 0; c < NV; ++c) store(acc_out + i * NB + c * W, acc[i][c]);
}

// out row += delta (fp32) over nn columns, rounded once to out's dtype.
inline void add_row(float* o, const float* d, int64_t nn) {
  for (int64_t j = 0; j < nn; ++j) o[j] += d[j];
}
inline void add_row(bf16_t* o, const float* d, int64_t nn) {
  for (int64_t j = 0; j < nn; ++j) o[j] = pagoda_bf16::from_f32(pagoda_bf16::to_f32(o[j]) + d[j]);
}

template <int MRt, class T>
inline void expand_rows(const float* h, int64_t R, const float* bt, T* o, int64_t ldo,
                        int64_t nn) {
  alignas(64) float acc[MRt * NB];
  expand_tile<MRt>(h, R, bt, acc);
  for (int i = 0; i < MRt; ++i) add_row(o + i * ldo, acc + i * NB, nn);
}

// One expand item: out rows of the chunk, columns [col0, col0 + NB) of N.
template <class T>
void expand_item(const Item& it, const Seg& s, const T* b, int64_t N, int64_t R, const float* h,
                 T* out, int64_t ldo, float* bt) {
  const int64_t nn = std::min<int64_t>(NB, N - it.col0);
  pack_bt(b + s.slot * N * R, it.col0, nn, R, bt);
  const float* hr = h + (s.h_row + it.row0) * R;
  T* o = out + (s.start + it.row0) * ldo + it.col0;
  int64_t i = 0;
  for (; i + MR_E <= it.rows; i += MR_E) expand_rows<MR_E>(hr + i * R, R, bt, o + i * ldo, ldo, nn);
  for (; i < it.rows; ++i) expand_rows<1>(hr + i * R, R, bt, o + i * ldo, ldo, nn);
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

template <class T>
void run(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
         const std::vector<Seg>& segs, int64_t total_rows) {
  const int64_t K = x.size(1), N = out.size(1), R = a.size(1);
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* ap = static_cast<const T*>(a.data_ptr());
  const T* bp = static_cast<const T*>(b.data_ptr());
  T* op = static_cast<T*>(out.data_ptr());
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  std::vector<float> h(static_cast<size_t>(total_rows * R));  // (rows of all segments, R)

  const std::vector<Item> shrink = items(segs, R, MA);
  at::parallel_for(0, static_cast<int64_t>(shrink.size()),
                   grain(static_cast<int64_t>(shrink.size()), total_rows * R * K), [&](int64_t lo, int64_t hi) {
                     for (int64_t i = lo; i < hi; ++i) {
                       const Item& it = shrink[i];
                       shrink_item(it, segs[it.seg], xp, ldx, ap, R, K, h.data());
                     }
                   });
  const std::vector<Item> expand = items(segs, N, NB);
  at::parallel_for(0, static_cast<int64_t>(expand.size()),
                   grain(static_cast<int64_t>(expand.size()), total_rows * R * N), [&](int64_t lo, int64_t hi) {
                     std::vector<float> bt(static_cast<size_t>(R * NB));  // (R, NB)
                     for (int64_t i = lo; i < hi; ++i) {
                       const Item& it = expand[i];
                       expand_item(it, segs[it.seg], bp, N, R, h.data(), op, ldo, bt.data());
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
  if (dtype == at::kFloat) {
    run<float>(out, x, a, b, segs, total_rows);
  } else {
    run<bf16_t>(out, x, a, b, segs, total_rows);
  }
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

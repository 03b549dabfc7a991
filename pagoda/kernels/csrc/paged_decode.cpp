// Paged decode attention on the CPU: PagedAttention (Kwon et al., SOSP'23) read straight from
// the blocks, with a flash-decoding style online softmax (running max, running sum and an fp32
// accumulator per query head; cf. FlashAttention / Flash-Decoding, Dao et al. 2022-23).
//
// Invariant: for sequence b, only the K/V rows of tokens [start_b, seq_lens[b]) are read, token
// i at block block_tables[b][i / block_size], offset i % block_size, and each (token, KV head)
// row is fetched from memory once (groups of more than 4 query heads re-read it from L1). No
// other cache slot (padding entries of the block table, the unused tail of the last block,
// blocks of other sequences, tokens before the window) is ever read, so garbage or NaN there
// cannot reach the output. (Prefetch hints touch only rows that will be read.)
//
// Two options (Gemma 2/3, Mistral): a sliding `window` W > 0 makes start_b = max(0, seq_lens[b]
// - W), so the query (at position seq_lens[b] - 1) sees the W keys (p - W, p]; the entries of
// the block table before block start_b / block_size are neither read nor checked (they may
// name a shared null block), and the rows of the first block before start_b are skipped, not
// masked. Without one, start_b = 0. A `softcap` c > 0 replaces each scaled score s (fp32) with
// c * tanh(s / c) before the online softmax. Both 0: off (and the tile loop is unchanged but for
// one untaken branch per tile).
//
// Work units are (sequence, KV heads, token range): all KV heads of a sequence when there are
// enough sequences to keep the threads busy (blocks are then consumed front to back), else one
// KV head, and contexts are split into chunks when even that leaves too few units; the chunks'
// partial (max, sum, accumulator) are merged at the end (flash-decoding). With a key_split > 0
// (--deterministic) units are always one KV head and contexts always split every key_split
// tokens from their first key, so a row's arithmetic is fixed by its own context. Threads take units
// dynamically, longest first. Within a unit, tokens go in tiles of TILE rows: each K row is
// used by all G = H / Hkv query heads of its KV head (grouped-query attention) while it is in
// registers, the tile's scores (G x TILE) are exponentiated against the running max, then each
// V row is accumulated into the G outputs.
//
// Two implementations of the tile steps share that driver:
//  * GenericKernel: plain loops that gcc/clang auto-vectorise at -O3 (bf16 -> fp32 is a 16-bit
//    shift, dot products keep 16 independent partial sums, exp is a polynomial); used without
//    AVX-512, and for head dims the AVX-512 code does not specialise.
//  * Avx512Kernel (head dims 64 and 128, when compiled with AVX-512): intrinsics; queries or
//    accumulators of up to 4 heads stay in registers while rows stream by; 16 dot products are
//    reduced together by a transposing shuffle tree; with AVX512-BF16, q.k of bf16 data uses
//    vdpbf16ps (exact bf16 products, fp32 sums).
// The build picks whichever the compiler flags allow (-march=native where it works).
// An fp8 e4m3 cache (--kv-cache-dtype fp8) holds one byte per value under bf16 or fp32 queries:
// rows are widened to fp32 as they are loaded (fp8.h), and the products run in fp32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include "bf16.h"
#include "fp8.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <type_traits>

namespace {

constexpr int64_t TILE = 64;        // tokens per online-softmax step
constexpr int LANES = 16;           // independent partial sums in dot products
constexpr int64_t MIN_CHUNK = 128;  // never split a context into chunks shorter than this
constexpr int64_t SERIAL_BELOW = 4096;  // (tokens x KV heads) under which one thread does all
// Software prefetch: each pass over a tile (the scores of one KV head, its V accumulation)
// requests, row by row, what the same pass will read in the next tile (or the next unit's
// first one), so the requests are spread as evenly as the reads. (Requesting a whole tile's
// rows, or rows further ahead, in one burst fills the core's miss buffers: the prefetch
// instructions then stall the work they should overlap.) Locality 1 (prefetcht2): into L2,
// sparing L1.
constexpr int PREFETCH_LOCALITY = 1;
// A function that only prefetches looks side-effect free to gcc's IPA, which then deletes
// the calls; forcing it inline keeps the prefetches inside the loops that use them.
#if defined(__GNUC__)
#define PAGODA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PAGODA_ALWAYS_INLINE inline
#endif

// ---------------------------------------------------------------------------------------------
// Element conversions. Storage types: float, uint16_t (bf16 bits), c10::Half.

inline float bf16_bits_to_float(uint16_t h) { return pagoda_bf16::to_f32(h); }
inline uint16_t float_to_bf16_bits(float f) { return pagoda_bf16::from_f32(f); }

template <typename T>
struct Conv;

template <>
struct Conv<float> {
  // Returns a pointer to n floats equal to src (src itself: no copy needed).
  static inline const float* load(const float* src, float* /*buf*/, int64_t /*n*/) { return src; }
  static inline void store(float* dst, const float* src, float mul, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mul;
  }
};

template <>
struct Conv<uint16_t> {
  static inline const float* load(const uint16_t* __restrict src, float* __restrict buf,
                                  int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u = static_cast<uint32_t>(src[i]) << 16;
      float f;
      std::memcpy(&f, &u, sizeof(f));
      buf[i] = f;
    }
    return buf;
  }
  static inline void store(uint16_t* dst, const float* src, float mul, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16_bits(src[i] * mul);
  }
};

// fp8 e4m3 (a --kv-cache-dtype fp8 cache; rows are only read, never stored).
template <>
struct Conv<uint8_t> {
  static inline const float* load(const uint8_t* __restrict src, float* __restrict buf,
                                  int64_t n) {
    for (int64_t i = 0; i < n; ++i) buf[i] = pagoda_fp8::to_f32(src[i]);
    return buf;
  }
};

template <>
struct Conv<c10::Half> {
  static inline const float* load(const c10::Half* __restrict src, float* __restrict buf,
                                  int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
  static inline void store(c10::Half* dst, const float* src, float mul, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i] * mul);
  }
};

// ---------------------------------------------------------------------------------------------
// Vectorisable helpers. KD > 0: the head dim is a compile-time constant, else it is `n`.

template <int KD>
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  const int64_t d = KD > 0 ? KD : n;
  float part[LANES] = {0.f};
  int64_t i = 0;
  for (; i + LANES <= d; i += LANES) {
    for (int j = 0; j < LANES; ++j) part[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; j < LANES && i < d; ++i, ++j) part[j] += a[i] * b[i];
  for (int j = 0; j < 8; ++j) part[j] += part[j + 8];
  for (int j = 0; j < 4; ++j) part[j] += part[j + 4];
  return (part[0] + part[2]) + (part[1] + part[3]);
}

template <int KD>
inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  const int64_t d = KD > 0 ? KD : n;
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

template <int KD>
inline void scale_inplace(float* __restrict y, float a, int64_t n) {
  const int64_t d = KD > 0 ? KD : n;
  for (int64_t i = 0; i < d; ++i) y[i] *= a;
}

inline float max_of(const float* x, int64_t n) {
  float part[LANES];
  for (int j = 0; j < LANES; ++j) part[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int j = 0; j < LANES; ++j) part[j] = x[i + j] > part[j] ? x[i + j] : part[j];
  }
  for (int j = 0; j < LANES && i < n; ++i, ++j) part[j] = x[i] > part[j] ? x[i] : part[j];
  float m = part[0];
  for (int j = 1; j < LANES; ++j) m = part[j] > m ? part[j] : m;
  return m;
}

// One exp(v - shift) for v - shift <= 0 (a score minus the running max). Cephes-style expf:
// 2^n * p(r), |r| <= ln2/2, relative error ~1e-7; arguments below -87 are clamped
// (exp(-87) ~ 1.6e-38 is negligible next to the max term, which is 1).
inline float exp_poly(float v) {
  v = v < -87.0f ? -87.0f : v;
  const float fn = std::floor(v * 1.44269504088896341f + 0.5f);
  const float r = (v - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(fn) + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof(s));
  return p * s;
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum.
inline float exp_shift_sum(float* __restrict x, float shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_poly(x[i] - shift);
  float part[LANES] = {0.f};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int j = 0; j < LANES; ++j) part[j] += x[i + j];
  }
  for (int j = 0; j < LANES && i < n; ++i, ++j) part[j] += x[i];
  float s = 0.f;
  for (int j = 0; j < LANES; ++j) s += part[j];
  return s;
}

// x[i] = cap * tanh(x[i] / cap) for i < n (attention-logit soft-capping), as
// sign(y) (1 - e) / (1 + e) with e = exp(-2 |y|) <= 1, y = x / cap: no overflow, and an
// absolute error of a few ulp of 1 (times cap) near 0. NaN stays NaN.
inline void soft_cap_portable(float* __restrict x, int64_t n, float cap) {
  const float inv = 1.0f / cap;
  for (int64_t i = 0; i < n; ++i) {
    const float y = x[i] * inv;
    const float e = exp_poly(-2.0f * std::fabs(y));
    x[i] = std::copysign(cap * ((1.0f - e) / (1.0f + e)), y);
  }
}

// ---------------------------------------------------------------------------------------------

struct Unit {
  int64_t b;       // sequence
  int64_t k0, k1;  // KV heads [k0, k1)
  int64_t t0, t1;  // token range [t0, t1) of its context
  int64_t part;    // index into the partial buffers, or -1: write the final output directly
};

struct Problem {
  int64_t B, H, Hkv, G, D, block_size, W, num_blocks;
  const int64_t* block_tables;  // (B, W) contiguous
  const int64_t* seq_lens;      // (B,)
  // Strides in elements.
  int64_t q_sb, q_sh;
  int64_t o_sb, o_sh;
  int64_t c_skv, c_sblk, c_stok, c_sh;
  float scale;
  int64_t window;  // > 0: keys [len - window, len) only
  float softcap;   // > 0: scores s -> softcap * tanh(s / softcap)
  int64_t key_split;  // > 0: fixed key chunks of this many tokens (batch-invariant mode)
};

// First token of sequence b's context that its query sees.
inline int64_t key_start(const Problem& P, int64_t b) {
  return P.window > 0 ? std::max<int64_t>(0, P.seq_lens[b] - P.window) : 0;
}

// Requests the cache lines of [row, row + bytes), each once.
PAGODA_ALWAYS_INLINE void prefetch_row(const void* row, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(row) & ~uintptr_t{63};
  const uintptr_t last = (reinterpret_cast<uintptr_t>(row) + bytes - 1) & ~uintptr_t{63};
  for (uintptr_t a = first; a <= last; a += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, PREFETCH_LOCALITY);
  }
}

// Rows of the next tile to request while this one is computed: row i of the next tile is
// requested while row i of this tile is processed, which spreads the requests over the work
// (rows of different blocks are scattered, so the hardware prefetcher cannot guess them).
template <typename T>
struct Ahead {
  const T* const* rows;  // row pointers of the next tile (0 of them: nothing to fetch)
  int64_t n;
  int64_t offset;        // elements from a row pointer to the first one wanted
  int64_t bytes;         // bytes wanted from there (one KV head of that token)
  PAGODA_ALWAYS_INLINE void at(int64_t i) const {
    if (i < n) prefetch_row(rows[i] + offset, bytes);
  }
  PAGODA_ALWAYS_INLINE void rest(int64_t from) const {
    for (int64_t i = from; i < n; ++i) prefetch_row(rows[i] + offset, bytes);
  }
};

// Per-thread scratch memory (fp32): per query head (all H of them) its query, running
// output, max and sum; per KV head pass (G query heads) a tile of scores and buffers.
struct Scratch {
  std::vector<float> mem;
  float *qf, *acc, *m, *l, *scores, *part, *kbuf, *vbuf;
  // Every buffer starts on a 64-byte boundary: a 512-bit access that straddles two cache
  // lines costs two.
  static int64_t up(int64_t n) { return (n + 15) / 16 * 16; }
  Scratch(int64_t H, int64_t G, int64_t D)
      : mem(2 * up(H * D) + 2 * up(H) + up(G * TILE) + G * 256 + 2 * up(D) + 16) {
    float* p = mem.data();
    p += (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(float);
    qf = p;            p += up(H * D);     // queries (pre-scaled fp32, or raw bf16 for vdpbf16ps)
    acc = p;           p += up(H * D);     // running (unnormalised) outputs
    m = p;             p += up(H);         // running max per head
    l = p;             p += up(H);         // running sum per head
    scores = p;        p += up(G * TILE);  // one tile's scores, then probabilities
    part = p;          p += G * 256;       // 16 x 16 partial dot products per head (AVX-512 fp32)
    kbuf = p;          p += up(D);
    vbuf = p;
  }
};

// Portable tile kernels: plain loops that compilers auto-vectorise. KD: head dim or 0.
// T: the cache's element type; Q: the queries' (the same, or bf16 / fp32 over an fp8 cache).
template <typename T, int KD, typename Q = T>
struct GenericKernel {
  static void load_q(const Q* qrow, float scale, float* qf, Scratch& s, int64_t D) {
    const float* src = Conv<Q>::load(qrow, s.kbuf, D);
    for (int64_t d = 0; d < D; ++d) qf[d] = src[d] * scale;
  }
  // scores[g * TILE + i] = q_g . k_i (k_i = krow[i] + hoff), each K row loaded once for all
  // G heads.
  static void scores(const T* const* krow, int64_t hoff, int64_t n, int64_t G, int64_t D,
                     const float* qf, Scratch& s, const Ahead<T>& ahead,
                     float /*scale: q is pre-scaled*/) {
    for (int64_t i = 0; i < n; ++i) {
      ahead.at(i);
      const float* k = Conv<T>::load(krow[i] + hoff, s.kbuf, D);
      for (int64_t g = 0; g < G; ++g) s.scores[g * TILE + i] = dot<KD>(qf + g * D, k, D);
    }
  }
  static float tile_max(const float* x, int64_t n) { return max_of(x, n); }
  static float exp_sum(float* x, float shift, int64_t n) { return exp_shift_sum(x, shift, n); }
  static void rescale(float* acc, float alpha, int64_t D) { scale_inplace<KD>(acc, alpha, D); }
  // acc_g += sum_i p[g][i] v_i (v_i = vrow[i] + hoff), each V row loaded once for all G heads.
  static void accumulate(const T* const* vrow, int64_t hoff, int64_t n, int64_t G, int64_t D,
                         float* acc, Scratch& s, const Ahead<T>& ahead) {
    for (int64_t i = 0; i < n; ++i) {
      ahead.at(i);
      const float* v = Conv<T>::load(vrow[i] + hoff, s.vbuf, D);
      for (int64_t g = 0; g < G; ++g) axpy<KD>(acc + g * D, s.scores[g * TILE + i], v, D);
    }
  }
};

// Calls f(std::integral_constant<int, n>) for a runtime 1 <= n <= N.
template <int N, typename F>
PAGODA_ALWAYS_INLINE void dispatch_upto(int n, F&& f) {
  if constexpr (N >= 1) {
    if (n == N) {
      f(std::integral_constant<int, N>{});
    } else {
      dispatch_upto<N - 1>(n, f);
    }
  }
}

#if defined(__AVX512F__)

// AVX-512 tile kernels for head dims 16 * NC.
template <typename T>
struct Load512;
template <>
struct Load512<float> {
  static inline __m512 at(const float* p) { return _mm512_loadu_ps(p); }
};
template <>
struct Load512<uint16_t> {  // bf16: widen to 32 bits and shift into the high half
  static inline __m512 at(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};
template <>
struct Load512<c10::Half> {
  static inline __m512 at(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};
template <>
struct Load512<uint8_t> {  // fp8 e4m3, widened exactly (fp8.h)
  static inline __m512 at(const uint8_t* p) {
    return pagoda_fp8::widen16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// exp(x) as in exp_poly, 16 lanes; the exponent is applied with vscalefps. NaN propagates.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // max_ps returns its 2nd operand on NaN
  const __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, fn);
}

// soft_cap_portable, 16 lanes at a time (a masked tail); the division is a reciprocal
// estimate refined by one Newton step (relative error ~1e-7).
inline void soft_cap_avx512(float* x, int64_t n, float cap) {
  const __m512 inv = _mm512_set1_ps(1.0f / cap), vcap = _mm512_set1_ps(cap);
  const __m512 one = _mm512_set1_ps(1.0f), m2 = _mm512_set1_ps(-2.0f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), inv);
    const __m512 e = exp512(_mm512_mul_ps(m2, _mm512_abs_ps(y)));
    const __m512 den = _mm512_add_ps(one, e);
    __m512 r = _mm512_rcp14_ps(den);
    r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(den, r, one), r);
    const __m512 t = _mm512_mul_ps(_mm512_mul_ps(vcap, _mm512_sub_ps(one, e)), r);
    const __m512i s = _mm512_and_si512(_mm512_castps_si512(y), sign);
    _mm512_mask_storeu_ps(x + j, k, _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), s)));
  }
}

// The transposing reduction of 16 rows of 16 partial sums to the 16 row sums (45 shuffles and
// adds for 16 dot products instead of 16 separate horizontal sums), in two steps so that the
// first can run on rows still in registers, four at a time.
// Step 1: rows a, b, c, d -> per 128-bit lane: that lane's partial sums of a, b, c, d.
inline __m512 fold4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], and the same of c, d
  const __m512d ab = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)));
  const __m512d cd = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d)));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
}
// Step 2: fold4 of rows 0-3, 4-7, 8-11, 12-15 -> the 16 row sums, in order.
inline __m512 fold16(__m512 x0, __m512 x1, __m512 x2, __m512 x3) {
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x2, x3, _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x2, x3, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1)));
}
// v: 16 rows of 16 floats. Returns the 16 row sums, in order.
inline __m512 row_sums16(const float* v) {
  __m512 x[4];
  for (int k = 0; k < 4; ++k) {
    const float* r = v + 64 * k;
    x[k] = fold4(_mm512_load_ps(r), _mm512_load_ps(r + 16), _mm512_load_ps(r + 32),
                 _mm512_load_ps(r + 48));
  }
  return fold16(x[0], x[1], x[2], x[3]);
}

inline __mmask16 lanes_below(int64_t n) {  // mask of the first min(n, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// T: the cache's element type; Q: the queries' (the same, or bf16 / fp32 over an fp8 cache).
template <typename T, int NC, typename Q = T>
struct Avx512Kernel {
  static constexpr int64_t D = 16 * NC;
#if defined(__AVX512BF16__)
  // bf16 caches: q . k with vdpbf16ps straight on the bf16 rows (products of two bf16 are
  // exact in fp32, sums are fp32), no widening of K; the scale is applied to the sums.
  static constexpr bool kDpBf16 = std::is_same_v<T, uint16_t> && std::is_same_v<Q, uint16_t>;
#else
  static constexpr bool kDpBf16 = false;
#endif

  static void load_q(const Q* qrow, float scale, float* qf, Scratch&, int64_t) {
    if constexpr (kDpBf16) {
      std::memcpy(qf, qrow, D * sizeof(uint16_t));  // raw bf16, unscaled
    } else {
      const __m512 vs = _mm512_set1_ps(scale);
      for (int c = 0; c < NC; ++c) {
        _mm512_storeu_ps(qf + 16 * c, _mm512_mul_ps(Load512<Q>::at(qrow + 16 * c), vs));
      }
    }
  }

  // Heads handled per pass, so that their queries (QK) or accumulators (PV) stay in registers
  // while the rows stream by (a K or V row is read from memory in the first pass; further
  // passes, only for large G, find it in L1).
  static constexpr int QREGS = kDpBf16 ? NC / 2 : NC;  // registers per query
  static constexpr int GQ = std::clamp(16 / QREGS, 1, 4);
  static constexpr int GV = std::clamp(16 / NC, 1, 4);

#if defined(__AVX512BF16__)
  // bf16: out[g * TILE + j] = scale * (q_g . k_j) for the GB queries at qf and rows j < 16 of
  // nj (at krow[j] + hoff; rows from nj on give 0), by vdpbf16ps into 16-lane partial sums.
  // The reduction runs in registers: each group of four rows is folded (fold4) as soon as
  // its partial sums exist, and the four groups' results once at the end (fold16), so no
  // partial sum goes through memory (a store and a load per row and head before).
  template <int GB>
  static void scores16_heads(const T* const* krow, int64_t hoff, int64_t nj, const float* qf,
                             float* out, __m512 vs) {
    __m512 xr[GB][4];
    constexpr int NB = NC / 2;  // 32 bf16 per register
    __m512bh qr[GB][NB];
#pragma GCC unroll 16
    for (int g = 0; g < GB; ++g) {
      const uint16_t* qg = reinterpret_cast<const uint16_t*>(qf + g * D);
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) qr[g][c] = (__m512bh)_mm512_loadu_si512(qg + 32 * c);
    }
#pragma GCC unroll 4
    for (int64_t j0 = 0; j0 < 16; j0 += 4) {
      __m512 a[GB][4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
#pragma GCC unroll 16
        for (int g = 0; g < GB; ++g) a[g][r] = _mm512_setzero_ps();
        if (j0 + r >= nj) continue;
        const T* k = krow[j0 + r] + hoff;
        __m512bh kr[NB];
#pragma GCC unroll 16
        for (int c = 0; c < NB; ++c) kr[c] = (__m512bh)_mm512_loadu_si512(k + 32 * c);
#pragma GCC unroll 16
        for (int g = 0; g < GB; ++g) {
#pragma GCC unroll 16
          for (int c = 0; c < NB; ++c) a[g][r] = _mm512_dpbf16_ps(a[g][r], qr[g][c], kr[c]);
        }
      }
#pragma GCC unroll 16
      for (int g = 0; g < GB; ++g) xr[g][j0 / 4] = fold4(a[g][0], a[g][1], a[g][2], a[g][3]);
    }
#pragma GCC unroll 16
    for (int g = 0; g < GB; ++g) {
      const __m512 r = fold16(xr[g][0], xr[g][1], xr[g][2], xr[g][3]);
      _mm512_storeu_ps(out + g * TILE, _mm512_mul_ps(r, vs));
    }
  }
#endif

  // part[(g * 16 + j) * 16 ...]: the 16-lane partial dot products of query g (of GB, at qf)
  // with row j (of nj, at krow[j] + hoff); rows widened to fp32 (all but kDpBf16).
  template <int GB>
  static void dots(const T* const* krow, int64_t hoff, int64_t nj, const float* qf,
                   float* part) {
    __m512 qr[GB][NC];
#pragma GCC unroll 16
    for (int g = 0; g < GB; ++g) {
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) qr[g][c] = _mm512_loadu_ps(qf + g * D + 16 * c);
    }
    for (int64_t j = 0; j < nj; ++j) {
      const T* k = krow[j] + hoff;
      __m512 kr[NC];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) kr[c] = Load512<T>::at(k + 16 * c);
#pragma GCC unroll 16
      for (int g = 0; g < GB; ++g) {
        __m512 a = _mm512_mul_ps(qr[g][0], kr[0]);
#pragma GCC unroll 16
        for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qr[g][c], kr[c], a);
        _mm512_store_ps(part + (g * 16 + j) * 16, a);
      }
    }
  }

  // Scores of rows [0, nj) (nj <= 16) for the G heads, times the scale, into
  // out[g * TILE + j] (16 of them: rows from nj on give 0): scores16_heads for all G heads,
  // GQB at a time. GQB: as many as keep queries (NB
  // registers each), a group's partial sums (4 each), the folded groups (4 each) and a K row
  // in the 32 registers: 3 heads for head dim 64, 2 for 128.
  static constexpr int GQB = std::clamp((32 - NC / 2) / (NC / 2 + 8), 1, 4);
  static void scores16_bf16(const T* const* krow, int64_t hoff, int64_t nj, int64_t G,
                            const float* qf, float* out, __m512 vs) {
#if defined(__AVX512BF16__)
    for (int64_t g0 = 0; g0 < G; g0 += GQB) {
      const int gb = static_cast<int>(std::min<int64_t>(GQB, G - g0));
      dispatch_upto<GQB>(gb, [&](auto c) {
        scores16_heads<decltype(c)::value>(krow, hoff, nj, qf + g0 * D, out + g0 * TILE, vs);
      });
    }
#else
    (void)krow, (void)hoff, (void)nj, (void)G, (void)qf, (void)out, (void)vs;
#endif
  }

  static void scores(const T* const* krow, int64_t hoff, int64_t n, int64_t G, int64_t,
                     const float* qf, Scratch& s, const Ahead<T>& ahead, float scale) {
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, n - j0);
      for (int64_t j = 0; j < 16; ++j) ahead.at(j0 + j);
      if constexpr (kDpBf16) {
        scores16_bf16(krow + j0, hoff, nj, G, qf, s.scores + j0, vs);
      } else {
        for (int64_t g0 = 0; g0 < G; g0 += GQ) {
          const int gb = static_cast<int>(std::min<int64_t>(GQ, G - g0));
          dispatch_upto<GQ>(gb, [&](auto c) {
            dots<decltype(c)::value>(krow + j0, hoff, nj, qf + g0 * D, s.part + g0 * 256);
          });
        }
        for (int64_t j = nj; j < 16; ++j) {
          for (int64_t g = 0; g < G; ++g) _mm512_store_ps(s.part + (g * 16 + j) * 16, _mm512_setzero_ps());
        }
        for (int64_t g = 0; g < G; ++g) {
          _mm512_storeu_ps(s.scores + g * TILE + j0, row_sums16(s.part + g * 256));
        }
      }
    }
  }
  static float tile_max(const float* x, int64_t n) {
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; j += 16) {
      mx = _mm512_mask_max_ps(mx, lanes_below(n - j), _mm512_loadu_ps(x + j), mx);
    }
    return _mm512_reduce_max_ps(mx);
  }
  static float exp_sum(float* x, float shift, int64_t n) {
    const __m512 vs = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vs));
      _mm512_storeu_ps(x + j, e);  // x has room for whole groups of 16
      sum = _mm512_mask_add_ps(sum, lanes_below(n - j), sum, e);
    }
    return _mm512_reduce_add_ps(sum);
  }
  static void rescale(float* acc, float alpha, int64_t) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), va));
  }
  // acc[g] += sum_i p[g * TILE + i] v_i for GB heads, v_i = vrow[i] + hoff widened in
  // registers; the GB x NC accumulators stay in registers over the tile. With few of them,
  // even and odd rows use separate accumulators so enough independent FMA chains are in flight.
  template <int GB>
  static void pv(const T* const* vrow, int64_t hoff, int64_t n, const float* p, float* acc,
                 const Ahead<T>& ahead) {
    constexpr int SETS = GB * NC <= 8 ? 2 : 1;
    __m512 a[SETS][GB][NC];
#pragma GCC unroll 16
    for (int g = 0; g < GB; ++g) {
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) {
        a[0][g][c] = _mm512_loadu_ps(acc + g * D + 16 * c);
        if constexpr (SETS > 1) a[SETS - 1][g][c] = _mm512_setzero_ps();
      }
    }
    int64_t i = 0;
    for (; i + SETS <= n; i += SETS) {
#pragma GCC unroll 2
      for (int k = 0; k < SETS; ++k) {
        ahead.at(i + k);
        const T* v = vrow[i + k] + hoff;
        __m512 vr[NC];
#pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) vr[c] = Load512<T>::at(v + 16 * c);
#pragma GCC unroll 16
        for (int g = 0; g < GB; ++g) {
          const __m512 pi = _mm512_set1_ps(p[g * TILE + i + k]);
#pragma GCC unroll 16
          for (int c = 0; c < NC; ++c) a[k][g][c] = _mm512_fmadd_ps(pi, vr[c], a[k][g][c]);
        }
      }
    }
    if (i < n) {
      ahead.at(i);
      const T* v = vrow[i] + hoff;
      __m512 vr[NC];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) vr[c] = Load512<T>::at(v + 16 * c);
#pragma GCC unroll 16
      for (int g = 0; g < GB; ++g) {
        const __m512 pi = _mm512_set1_ps(p[g * TILE + i]);
#pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) a[0][g][c] = _mm512_fmadd_ps(pi, vr[c], a[0][g][c]);
      }
    }
#pragma GCC unroll 16
    for (int g = 0; g < GB; ++g) {
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) {
        if constexpr (SETS > 1) a[0][g][c] = _mm512_add_ps(a[0][g][c], a[SETS - 1][g][c]);
        _mm512_storeu_ps(acc + g * D + 16 * c, a[0][g][c]);
      }
    }
  }

  static void accumulate(const T* const* vrow, int64_t hoff, int64_t n, int64_t G, int64_t,
                         float* acc, Scratch& s, const Ahead<T>& ahead) {
    const Ahead<T> none{ahead.rows, 0, 0, 0};
    for (int64_t g0 = 0; g0 < G; g0 += GV) {
      const int gb = static_cast<int>(std::min<int64_t>(GV, G - g0));
      // Only the first pass over the rows (more heads than GV take several) prefetches.
      dispatch_upto<GV>(gb, [&](auto c) {
        pv<decltype(c)::value>(vrow, hoff, n, s.scores + g0 * TILE, acc + g0 * D,
                               g0 == 0 ? ahead : none);
      });
    }
  }
};
#endif  // __AVX512F__

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
// AVX2 tile kernels for head dims 8 * NC (CPUs without AVX-512, such as AMD Zen 2/3): the
// AVX-512 kernels' scheme at 8 lanes. Scores: 8-lane partial dot products of 8 rows, summed
// by one transposing reduction; probabilities times V with the accumulators in registers.
template <typename T>
struct Load256;
template <>
struct Load256<float> {
  static inline __m256 at(const float* p) { return _mm256_loadu_ps(p); }
};
template <>
struct Load256<uint16_t> {  // bf16: widen to 32 bits and shift into the high half
  static inline __m256 at(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};
template <>
struct Load256<c10::Half> {
  static inline __m256 at(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// exp(x) as in exp_poly, 8 lanes; 2^n is built in the exponent bits. NaN propagates.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // max_ps returns its 2nd operand on NaN
  const __m256 fn = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fn),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// v: 8 rows of 8 floats. Returns the 8 row sums, in order (a transposing reduction).
inline __m256 row_sums8(const float* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_load_ps(v), _mm256_load_ps(v + 8));
  const __m256 b = _mm256_hadd_ps(_mm256_load_ps(v + 16), _mm256_load_ps(v + 24));
  const __m256 c = _mm256_hadd_ps(_mm256_load_ps(v + 32), _mm256_load_ps(v + 40));
  const __m256 d = _mm256_hadd_ps(_mm256_load_ps(v + 48), _mm256_load_ps(v + 56));
  const __m256 ab = _mm256_hadd_ps(a, b);  // per 128-bit lane: half sums of rows 0..3
  const __m256 cd = _mm256_hadd_ps(c, d);  // ... of rows 4..7
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20),
                       _mm256_permute2f128_ps(ab, cd, 0x31));
}

// Lanes [0, n) all ones (n <= 8), for sums over a partial group.
inline __m256 lanes_below8(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx));
}

template <typename T, int NC>
struct Avx2Kernel {
  static constexpr int64_t D = 8 * NC;
  // Heads per pass of the V rows, so that their GV x NC accumulators fit the 16 registers.
  static constexpr int GV = std::clamp(12 / NC, 1, 4);

  static void load_q(const T* qrow, float scale, float* qf, Scratch&, int64_t) {
    const __m256 vs = _mm256_set1_ps(scale);
    for (int c = 0; c < NC; ++c) {
      _mm256_storeu_ps(qf + 8 * c, _mm256_mul_ps(Load256<T>::at(qrow + 8 * c), vs));
    }
  }

  // part[(g * 8 + j) * 8 ...]: the 8-lane partial dot products of query g with row j (of
  // nj, at krow[j] + hoff); each K row is loaded once for all G heads (queries from L1).
  static void dots(const T* const* krow, int64_t hoff, int64_t nj, int64_t G, const float* qf,
                   float* part) {
    for (int64_t j = 0; j < nj; ++j) {
      const T* k = krow[j] + hoff;
      for (int64_t g = 0; g < G; ++g) {
        const float* q = qf + g * D;
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(q), Load256<T>::at(k));
        __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(q + 8), Load256<T>::at(k + 8));
#pragma GCC unroll 16
        for (int c = 2; c + 1 < NC; c += 2) {
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), Load256<T>::at(k + 8 * c), a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c + 8), Load256<T>::at(k + 8 * c + 8),
                               a1);
        }
        _mm256_store_ps(part + (g * 8 + j) * 8, _mm256_add_ps(a0, a1));
      }
    }
  }

  static void scores(const T* const* krow, int64_t hoff, int64_t n, int64_t G, int64_t,
                     const float* qf, Scratch& s, const Ahead<T>& ahead,
                     float /*scale: q is pre-scaled*/) {
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      const int64_t nj = std::min<int64_t>(8, n - j0);
      for (int64_t j = 0; j < 8; ++j) ahead.at(j0 + j);
      dots(krow + j0, hoff, nj, G, qf, s.part);
      for (int64_t j = nj; j < 8; ++j) {
        for (int64_t g = 0; g < G; ++g) _mm256_store_ps(s.part + (g * 8 + j) * 8, _mm256_setzero_ps());
      }
      for (int64_t g = 0; g < G; ++g) {
        _mm256_storeu_ps(s.scores + g * TILE + j0, row_sums8(s.part + g * 64));
      }
    }
  }
  static float tile_max(const float* x, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    int64_t j = 0;
    if (n >= 8) {
      __m256 mx = _mm256_loadu_ps(x);
      for (j = 8; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(x + j));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mx);
      for (float v : lanes) m = v > m ? v : m;
    }
    for (; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
  }
  static float exp_sum(float* x, float shift, int64_t n) {
    const __m256 vs = _mm256_set1_ps(shift);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), vs));
      _mm256_storeu_ps(x + j, e);  // x has room for whole groups of 16
      sum = _mm256_add_ps(sum, n - j >= 8 ? e : _mm256_and_ps(e, lanes_below8(n - j)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, sum);
    float s = 0.f;
    for (float v : lanes) s += v;
    return s;
  }
  static void rescale(float* acc, float alpha, int64_t) {
    const __m256 va = _mm256_set1_ps(alpha);
    for (int c = 0; c < NC; ++c) {
      _mm256_storeu_ps(acc + 8 * c, _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * c), va));
    }
  }
  // acc[g] += sum_i p[g * TILE + i] v_i for GB heads; the GB x NC accumulators stay in
  // registers over the tile, each V row widened chunk by chunk.
  template <int GB>
  static void pv(const T* const* vrow, int64_t hoff, int64_t n, const float* p, float* acc) {
    __m256 a[GB][NC];
#pragma GCC unroll 16
    for (int g = 0; g < GB; ++g) {
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) a[g][c] = _mm256_loadu_ps(acc + g * D + 8 * c);
    }
    for (int64_t i = 0; i < n; ++i) {
      const T* v = vrow[i] + hoff;
      __m256 pi[GB];
#pragma GCC unroll 4
      for (int g = 0; g < GB; ++g) pi[g] = _mm256_set1_ps(p[g * TILE + i]);
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) {
        const __m256 vc = Load256<T>::at(v + 8 * c);
#pragma GCC unroll 4
        for (int g = 0; g < GB; ++g) a[g][c] = _mm256_fmadd_ps(pi[g], vc, a[g][c]);
      }
    }
#pragma GCC unroll 16
    for (int g = 0; g < GB; ++g) {
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) _mm256_storeu_ps(acc + g * D + 8 * c, a[g][c]);
    }
  }

  static void accumulate(const T* const* vrow, int64_t hoff, int64_t n, int64_t G, int64_t,
                         float* acc, Scratch& s, const Ahead<T>& ahead) {
    for (int64_t i = 0; i < n; ++i) ahead.at(i);
    for (int64_t g0 = 0; g0 < G; g0 += GV) {
      const int gb = static_cast<int>(std::min<int64_t>(GV, G - g0));
      dispatch_upto<GV>(gb, [&](auto c) {
        pv<decltype(c)::value>(vrow, hoff, n, s.scores + g0 * TILE, acc + g0 * D);
      });
    }
  }
};
#endif  // AVX2 without AVX-512

inline void soft_cap(float* x, int64_t n, float cap) {
#if defined(__AVX512F__)
  soft_cap_avx512(x, n, cap);
#else
  soft_cap_portable(x, n, cap);
#endif
}

// Row pointers of tokens [t, t + n) of unit u, n = min(TILE, u.t1 - t): walks the block table
// (one table read per block, no division per token). Returns n.
template <typename T>
inline int64_t tile_rows(const Problem& P, const T* cache, const Unit& u, int64_t t,
                         const T** krow, const T** vrow) {
  const int64_t n = std::min(TILE, u.t1 - t);
  const int64_t* table = P.block_tables + u.b * P.W;
  const T* kbase = cache;
  const T* vbase = cache + P.c_skv;
  int64_t j = t / P.block_size;
  int64_t off = t - j * P.block_size;
  int64_t i = 0;
  while (i < n) {
    const int64_t base = table[j] * P.c_sblk;
    const int64_t stop = std::min(n, i + P.block_size - off);
    for (int64_t r = base + off * P.c_stok; i < stop; ++i, r += P.c_stok) {
      krow[i] = kbase + r;
      vrow[i] = vbase + r;
    }
    ++j;
    off = 0;
  }
  return n;
}

template <typename T, typename K, typename Q>
void run_unit(const Problem& P, const Unit& u, const Unit* next, const Q* q, const T* cache,
              Q* out, Scratch& s, float* part_m, float* part_l, float* part_acc) {
  const int64_t G = P.G;
  const int64_t D = P.D;
  const int64_t hq0 = u.k0 * G;            // first query head of the unit
  const int64_t nh = (u.k1 - u.k0) * G;    // its query heads
  for (int64_t h = 0; h < nh; ++h) {
    K::load_q(q + u.b * P.q_sb + (hq0 + h) * P.q_sh, P.scale, s.qf + h * D, s, D);
    s.m[h] = -std::numeric_limits<float>::infinity();
    s.l[h] = 0.f;
  }
  std::fill(s.acc, s.acc + nh * D, 0.f);

  // Double-buffered row pointers: while a tile is computed, the next one (or the next unit's
  // first one) is being fetched, KV head by KV head (units have equally many KV heads).
  const T* rows[4][TILE];
  const int64_t head_bytes = D * static_cast<int64_t>(sizeof(T));
  int cur = 0;
  int64_t n = tile_rows(P, cache, u, u.t0, rows[0], rows[1]);
  for (int64_t t = u.t0; t < u.t1; t += TILE) {
    const T** krow = rows[2 * cur];
    const T** vrow = rows[2 * cur + 1];
    const T** knext = rows[2 - 2 * cur];
    const T** vnext = rows[3 - 2 * cur];
    int64_t n_next = 0;
    Ahead<T> k_ahead{knext, 0, 0, 0}, v_ahead{vnext, 0, 0, 0};
    if (t + TILE < u.t1) {
      n_next = tile_rows(P, cache, u, t + TILE, knext, vnext);
      k_ahead = {knext, n_next, u.k0 * P.c_sh, head_bytes};
      v_ahead = {vnext, n_next, u.k0 * P.c_sh, head_bytes};
    } else if (next != nullptr) {
      const int64_t nn = tile_rows(P, cache, *next, next->t0, knext, vnext);
      k_ahead = {knext, nn, next->k0 * P.c_sh, head_bytes};
      v_ahead = {vnext, nn, next->k0 * P.c_sh, head_bytes};
    }
    for (int64_t kvh = u.k0; kvh < u.k1; ++kvh) {
      const int64_t hoff = kvh * P.c_sh;
      // This pass's K (then V) rows of the next tile: those of the same KV head position.
      const int64_t ahead_off = (kvh - u.k0) * P.c_sh;
      const Ahead<T> kh{k_ahead.rows, k_ahead.n, k_ahead.offset + ahead_off, head_bytes};
      const Ahead<T> vh{v_ahead.rows, v_ahead.n, v_ahead.offset + ahead_off, head_bytes};
      float* qf = s.qf + (kvh - u.k0) * G * D;
      float* acc = s.acc + (kvh - u.k0) * G * D;
      float* m = s.m + (kvh - u.k0) * G;
      float* l = s.l + (kvh - u.k0) * G;
      K::scores(krow, hoff, n, G, D, qf, s, kh, P.scale);
      kh.rest(n);
      if (P.softcap > 0.f) {
        for (int64_t g = 0; g < G; ++g) soft_cap(s.scores + g * TILE, n, P.softcap);
      }
      // Online softmax: new max, rescale the running sum and accumulator, exponentiate.
      for (int64_t g = 0; g < G; ++g) {
        float* sc = s.scores + g * TILE;
        const float m_old = m[g];
        const float m_new = std::max(m_old, K::tile_max(sc, n));
        if (m_new != m_old) {
          const float alpha = std::isinf(m_old) && m_old < 0 ? 0.f : std::exp(m_old - m_new);
          l[g] *= alpha;
          K::rescale(acc + g * D, alpha, D);
          m[g] = m_new;
        }
        l[g] += K::exp_sum(sc, m_new, n);
      }
      K::accumulate(vrow, hoff, n, G, D, acc, s, vh);
      vh.rest(n);
    }
    cur ^= 1;
    n = n_next;
  }

  if (u.part < 0) {
    for (int64_t h = 0; h < nh; ++h) {
      Q* orow = out + u.b * P.o_sb + (hq0 + h) * P.o_sh;
      Conv<Q>::store(orow, s.acc + h * D, 1.0f / s.l[h], D);
    }
  } else {
    const int64_t H = P.H;
    for (int64_t h = 0; h < nh; ++h) {
      part_m[u.part * H + hq0 + h] = s.m[h];
      part_l[u.part * H + hq0 + h] = s.l[h];
    }
    std::memcpy(part_acc + (u.part * H + hq0) * D, s.acc, sizeof(float) * nh * D);
  }
}

template <typename T, typename K, typename Q = T>
void run_all(const Problem& P, const Q* q, const T* cache, Q* out) {
  const int64_t H = P.H;
  const int64_t D = P.D;
  int64_t total = 0;  // tokens x KV heads to read
  for (int64_t b = 0; b < P.B; ++b) total += (P.seq_lens[b] - key_start(P, b)) * P.Hkv;
  // Tiny steps run on the calling thread: waking the others would cost more than they save.
  const int64_t nthreads = total < SERIAL_BELOW ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t want_units = 4 * nthreads;

  // A unit takes all KV heads of a sequence when there are enough sequences (each block is
  // then read front to back), else one KV head; if that still leaves too few units to keep
  // every thread busy with balanced work, contexts are split into chunks.
  // With a fixed key_split (batch-invariant mode) a row's units, and so the order in which its
  // partial softmax states are merged, depend on its own context only, never on the batch.
  const bool fixed = P.key_split > 0;
  const int64_t heads_per_unit = (!fixed && (P.B >= want_units || nthreads == 1)) ? P.Hkv : 1;
  int64_t chunk = fixed ? P.key_split : std::numeric_limits<int64_t>::max();
  if (!fixed && nthreads > 1 && P.B * (P.Hkv / heads_per_unit) < want_units) {
    chunk = std::max<int64_t>(MIN_CHUNK, (total + want_units - 1) / want_units);
    chunk = (chunk + TILE - 1) / TILE * TILE;
  }

  std::vector<Unit> units;
  units.reserve(P.B * P.Hkv);
  int64_t num_parts = 0;
  for (int64_t b = 0; b < P.B; ++b) {
    const int64_t len = P.seq_lens[b], start = key_start(P, b);
    for (int64_t k0 = 0; k0 < P.Hkv; k0 += heads_per_unit) {
      const int64_t k1 = k0 + heads_per_unit;
      if (len - start <= chunk) {
        units.push_back({b, k0, k1, start, len, -1});
      } else {
        for (int64_t t0 = start; t0 < len; t0 += chunk) {
          units.push_back({b, k0, k1, t0, std::min(len, t0 + chunk), num_parts++});
        }
      }
    }
  }
  std::vector<float> part_m(num_parts * H), part_l(num_parts * H), part_acc(num_parts * H * D);

  // Dynamic scheduling, longest units first: a thread claims its next unit before running
  // the current one (so it can prefetch the next unit's first rows). This balances ragged
  // lengths, and a thread that the OS preempts does not hold the others up.
  const int64_t nu = static_cast<int64_t>(units.size());
  std::vector<int64_t> order(nu);
  for (int64_t i = 0; i < nu; ++i) order[i] = i;
  auto cost = [&](int64_t i) { return (units[i].t1 - units[i].t0) * (units[i].k1 - units[i].k0); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost(x) > cost(y); });
  std::atomic<int64_t> counter{0};
  const int64_t ntasks = std::min(nthreads, nu);
  at::parallel_for(0, ntasks, 1, [&](int64_t, int64_t) {
    Scratch scratch(H, P.G, D);
    int64_t cur = counter.fetch_add(1, std::memory_order_relaxed);
    while (cur < nu) {
      const int64_t nxt = counter.fetch_add(1, std::memory_order_relaxed);
      const Unit* next = nxt < nu ? &units[order[nxt]] : nullptr;
      run_unit<T, K, Q>(P, units[order[cur]], next, q, cache, out, scratch, part_m.data(),
                        part_l.data(), part_acc.data());
      cur = nxt;
    }
  });
  if (num_parts == 0) return;

  // Merge the chunks of each split (sequence, KV heads) item, per query head h:
  // o = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, M = max_c m_c.
  std::vector<float> merged(D);
  for (int64_t i = 0; i < nu;) {
    const Unit& first = units[i];
    int64_t j = i + 1;
    while (j < nu && units[j].b == first.b && units[j].k0 == first.k0) ++j;
    if (first.part >= 0) {
      for (int64_t h = first.k0 * P.G; h < first.k1 * P.G; ++h) {
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t k = i; k < j; ++k) M = std::max(M, part_m[units[k].part * H + h]);
        float L = 0.f;
        std::fill(merged.begin(), merged.end(), 0.f);
        for (int64_t k = i; k < j; ++k) {
          const int64_t p = units[k].part;
          const float w = std::exp(part_m[p * H + h] - M);
          L += w * part_l[p * H + h];
          axpy<0>(merged.data(), w, part_acc.data() + (p * H + h) * D, D);
        }
        Conv<Q>::store(out + first.b * P.o_sb + h * P.o_sh, merged.data(), 1.0f / L, D);
      }
    }
    i = j;
  }
}

template <typename T>
void dispatch_dim(const Problem& P, const void* q, const void* cache, void* out, bool portable) {
  const T* qt = static_cast<const T*>(q);
  const T* ct = static_cast<const T*>(cache);
  T* ot = static_cast<T*>(out);
#if defined(__AVX512F__)
  if (!portable) switch (P.D) {
    case 64: return run_all<T, Avx512Kernel<T, 4>>(P, qt, ct, ot);
    case 128: return run_all<T, Avx512Kernel<T, 8>>(P, qt, ct, ot);
    default: break;
  }
  return run_all<T, GenericKernel<T, 0>>(P, qt, ct, ot);  // rare head dims, and tests
#else
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (!portable) switch (P.D) {
    case 64: return run_all<T, Avx2Kernel<T, 8>>(P, qt, ct, ot);
    case 128: return run_all<T, Avx2Kernel<T, 16>>(P, qt, ct, ot);
    default: break;
  }
#endif
  // Otherwise the portable kernels, with the common head dims as compile-time constants.
  (void)portable;
  switch (P.D) {
    case 64: return run_all<T, GenericKernel<T, 64>>(P, qt, ct, ot);
    case 128: return run_all<T, GenericKernel<T, 128>>(P, qt, ct, ot);
    default: return run_all<T, GenericKernel<T, 0>>(P, qt, ct, ot);
  }
#endif
}

// An fp8 (e4m3) cache under Q (bf16 or fp32) queries and outputs: the AVX-512 tile kernels
// widen its rows in registers; without AVX-512, the portable ones.
template <typename Q>
void dispatch_fp8(const Problem& P, const void* q, const void* cache, void* out, bool portable) {
  const Q* qt = static_cast<const Q*>(q);
  const uint8_t* ct = static_cast<const uint8_t*>(cache);
  Q* ot = static_cast<Q*>(out);
#if defined(__AVX512F__)
  if (!portable) switch (P.D) {
    case 64: return run_all<uint8_t, Avx512Kernel<uint8_t, 4, Q>, Q>(P, qt, ct, ot);
    case 128: return run_all<uint8_t, Avx512Kernel<uint8_t, 8, Q>, Q>(P, qt, ct, ot);
    default: break;
  }
#endif
  (void)portable;
  switch (P.D) {
    case 64: return run_all<uint8_t, GenericKernel<uint8_t, 64, Q>, Q>(P, qt, ct, ot);
    case 128: return run_all<uint8_t, GenericKernel<uint8_t, 128, Q>, Q>(P, qt, ct, ot);
    default: return run_all<uint8_t, GenericKernel<uint8_t, 0, Q>, Q>(P, qt, ct, ot);
  }
}

// out: (B, H, D), q: (B, H, D), kv_cache: (2, num_blocks, block_size, Hkv, D), all of one
// dtype (or an fp8 e4m3 cache under bf16 or fp32 q and out) with unit stride in the last dim;
// block_tables: (B, W) int64 contiguous; seq_lens: (B,) int64 contiguous. Writes every element
// of out.
void paged_decode_impl(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                       int64_t window, double softcap, bool portable, int64_t key_split) {
  TORCH_CHECK(key_split >= 0 && key_split % TILE == 0,
              "key_split must be 0 (adaptive) or a multiple of ", TILE, ", got ", key_split);
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no sliding window), got ", window);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "softcap must be a finite number >= 0 (0: no soft-capping), got ", softcap);
  TORCH_CHECK(q.dim() == 3, "q must be (B, H, D), got ", q.sizes());
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "kv_cache must be (2, num_blocks, block_size, Hkv, D), got ", kv_cache.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu() && out.device().is_cpu() &&
                  block_tables.device().is_cpu() && seq_lens.device().is_cpu(),
              "all tensors must be on the CPU");
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn &&
                   (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat);
  TORCH_CHECK((q.scalar_type() == kv_cache.scalar_type() || fp8) &&
                  out.scalar_type() == q.scalar_type(),
              "q and out must share a dtype, and kv_cache have it too (or be float8_e4m3fn "
              "under bfloat16 or float32 queries); got q ", q.scalar_type(), ", kv_cache ",
              kv_cache.scalar_type(), ", out ", out.scalar_type());
  TORCH_CHECK(q.stride(2) == 1 && kv_cache.stride(4) == 1 && out.stride(2) == 1,
              "the head dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
                  block_tables.is_contiguous(),
              "block_tables must be a contiguous (B, W) int64 tensor");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.dim() == 1 &&
                  seq_lens.is_contiguous(),
              "seq_lens must be a contiguous (B,) int64 tensor");

  Problem P;
  P.B = q.size(0);
  P.H = q.size(1);
  P.D = q.size(2);
  P.num_blocks = kv_cache.size(1);
  P.block_size = kv_cache.size(2);
  P.Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == P.D, "kv_cache head dim ", kv_cache.size(4), " != q's ", P.D);
  TORCH_CHECK(P.Hkv > 0 && P.H % P.Hkv == 0, "H (", P.H, ") must be a multiple of Hkv (", P.Hkv,
              ")");
  TORCH_CHECK(block_tables.size(0) == P.B && seq_lens.size(0) == P.B,
              "block_tables and seq_lens must have B rows");
  P.G = P.H / P.Hkv;
  P.W = block_tables.size(1);
  P.block_tables = block_tables.data_ptr<int64_t>();
  P.seq_lens = seq_lens.data_ptr<int64_t>();
  P.q_sb = q.stride(0);
  P.q_sh = q.stride(1);
  P.o_sb = out.stride(0);
  P.o_sh = out.stride(1);
  P.c_skv = kv_cache.stride(0);
  P.c_sblk = kv_cache.stride(1);
  P.c_stok = kv_cache.stride(2);
  P.c_sh = kv_cache.stride(3);
  P.scale = static_cast<float>(scale);
  P.window = window;
  P.softcap = static_cast<float>(softcap);
  P.key_split = key_split;
  if (P.B == 0 || P.H == 0 || P.D == 0) return;

  // Validate every block id that will be dereferenced: a bad one must raise, not read memory.
  // (Those before a window are never dereferenced.)
  for (int64_t b = 0; b < P.B; ++b) {
    const int64_t len = P.seq_lens[b];
    TORCH_CHECK(len >= 1 && len <= P.W * P.block_size, "seq_lens[", b, "] = ", len,
                " is outside [1, ", P.W * P.block_size, "] (block table width x block size)");
    const int64_t nb = (len + P.block_size - 1) / P.block_size;
    for (int64_t j = key_start(P, b) / P.block_size; j < nb; ++j) {
      const int64_t id = P.block_tables[b * P.W + j];
      TORCH_CHECK(id >= 0 && id < P.num_blocks, "block_tables[", b, "][", j, "] = ", id,
                  " is outside [0, ", P.num_blocks, ")");
    }
  }

  if (fp8) {
    if (q.scalar_type() == at::kFloat) {
      dispatch_fp8<float>(P, q.data_ptr(), kv_cache.data_ptr(), out.data_ptr(), portable);
    } else {
      dispatch_fp8<uint16_t>(P, q.data_ptr(), kv_cache.data_ptr(), out.data_ptr(), portable);
    }
    return;
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_dim<float>(P, q.data_ptr(), kv_cache.data_ptr(), out.data_ptr(), portable);
      break;
    case at::kBFloat16:
      dispatch_dim<uint16_t>(P, q.data_ptr(), kv_cache.data_ptr(), out.data_ptr(), portable);
      break;
    case at::kHalf:
      dispatch_dim<c10::Half>(P, q.data_ptr(), kv_cache.data_ptr(), out.data_ptr(), portable);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", q.scalar_type(), " (float32, bfloat16, float16)");
  }
}

void paged_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                  int64_t window, double softcap, int64_t key_split) {
  paged_decode_impl(out, q, kv_cache, block_tables, seq_lens, scale, window, softcap, false,
                    key_split);
}

// The same, always with the portable (auto-vectorised) tile kernels: lets the tests check
// that path on machines where the AVX-512 one is used.
void paged_decode_portable(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           double scale, int64_t window, double softcap, int64_t key_split) {
  paged_decode_impl(out, q, kv_cache, block_tables, seq_lens, scale, window, softcap, true,
                    key_split);
}

std::string build_info() {
  std::string s;
#if defined(__AVX512F__)
  s += "avx512f ";
#endif
#if defined(__AVX512BF16__)
  s += "avx512bf16 ";
#endif
#if defined(__AMX_BF16__)
  s += "amx-bf16 ";
#endif
#if defined(__AVX2__)
  s += "avx2 ";
#endif
#if defined(__F16C__)
  s += "f16c ";
#endif
#if defined(_OPENMP)
  s += "openmp ";
#endif
  return s.empty() ? std::string("generic") : s.substr(0, s.size() - 1);
}

}  // namespace

// Fused elementwise kernels (fused_ops.cpp), exported from this module too.
namespace pagoda_fused {
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps);
void add_rms_norm(at::Tensor out, at::Tensor residual, at::Tensor x, at::Tensor weight,
                  double eps);
void rope(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin, at::Tensor positions);
void silu_mul(at::Tensor out, at::Tensor gate_up);
void gelu_tanh_mul(at::Tensor out, at::Tensor gate_up);
void argmax_rows(at::Tensor out, at::Tensor logits);
void argmax_cols(at::Tensor out, at::Tensor logits_t);
}  // namespace pagoda_fused

// Mixed-batch paged attention on AMX tiles (amx_attention.cpp).
namespace pagoda_amx {
bool available();
bool bf16_available();
void paged_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache, at::Tensor query_start,
                     at::Tensor context_lens, at::Tensor block_tables, double scale,
                     int64_t window, double softcap, bool amx);
}  // namespace pagoda_amx

// Structured outputs: the grammar's forbidden tokens to -inf (token_mask.cpp).
namespace pagoda_mask {
void apply_token_bitmask(at::Tensor logits, at::Tensor words, at::Tensor rows);
}  // namespace pagoda_mask

// Gumbel-max random sampling (gumbel_sample.cpp).
namespace pagoda_gumbel {
void gumbel_argmax(at::Tensor out, at::Tensor logits, at::Tensor keys);
void gumbel_noise(at::Tensor out, at::Tensor keys);
}  // namespace pagoda_gumbel

// The batch-invariant bf16 linear (invariant_gemm.cpp).
namespace pagoda_invariant {
bool native();
void linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
            bool portable);
}  // namespace pagoda_invariant

// The KV-cache write (kv_write.cpp).
namespace pagoda_kv {
void write_kv(at::Tensor kv_cache, at::Tensor k, at::Tensor v, at::Tensor slot_mapping);
}  // namespace pagoda_kv

// The grouped LoRA delta, Punica's SGMV shrink / expand (lora_sgmv.cpp).
namespace pagoda_lora {
void lora_sgmv(at::Tensor out, at::Tensor x, at::Tensor a, at::Tensor b, at::Tensor segments);
std::string isa();
}  // namespace pagoda_lora

// The weight-only int8 linear of quantized GGUF tensors (int8_gemm.cpp).
namespace pagoda_int8 {
void linear(at::Tensor out, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
            const c10::optional<at::Tensor>& offset, int64_t group, int64_t isa,
            int64_t code_bias);
std::vector<int64_t> available();
}  // namespace pagoda_int8

// Suffix decoding's trie (suffix_trie.cpp): a class, bound there.
namespace pagoda_suffix {
void bind(py::module_& m);
}  // namespace pagoda_suffix

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Paged decode attention for the CPU (PagedAttention + online softmax).";
  m.def("paged_decode", &paged_decode, "Paged decode attention; writes out in place.",
        py::arg("out"), py::arg("q"), py::arg("kv_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("window") = 0, py::arg("softcap") = 0.0,
        py::arg("key_split") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_portable", &paged_decode_portable,
        "paged_decode with the portable tile kernels (for tests).", py::arg("out"), py::arg("q"),
        py::arg("kv_cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"),
        py::arg("window") = 0, py::arg("softcap") = 0.0, py::arg("key_split") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("build_info", &build_info, "Instruction sets this build was compiled for.");
  m.def("rms_norm", &pagoda_fused::rms_norm, "RMSNorm of bf16 rows into out.",
        py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &pagoda_fused::add_rms_norm,
        "residual += x (in place), then out = RMSNorm(residual); bf16 rows.", py::arg("out"),
        py::arg("residual"), py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rope", &pagoda_fused::rope, "Rotate-half RoPE on bf16 q and k in place.",
        py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("positions"),
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &pagoda_fused::silu_mul, "out = silu(gate) * up for bf16 [gate | up] rows.",
        py::arg("out"), py::arg("gate_up"), py::call_guard<py::gil_scoped_release>());
  m.def("gelu_tanh_mul", &pagoda_fused::gelu_tanh_mul,
        "out = gelu_tanh(gate) * up for bf16 [gate | up] rows (GeGLU).", py::arg("out"),
        py::arg("gate_up"), py::call_guard<py::gil_scoped_release>());
  m.def("argmax_rows", &pagoda_fused::argmax_rows, "Row-wise argmax of bf16 logits.",
        py::arg("out"), py::arg("logits"), py::call_guard<py::gil_scoped_release>());
  m.def("argmax_cols", &pagoda_fused::argmax_cols,
        "Column-wise argmax of transposed bf16 logits (V, N).", py::arg("out"),
        py::arg("logits_t"), py::call_guard<py::gil_scoped_release>());
  m.def("amx_available", &pagoda_amx::available,
        "True when this build has the AMX kernel and the CPU and OS allow AMX.");
  m.def("bf16_attention_available", &pagoda_amx::bf16_available,
        "True when this build has the prefill kernel on AVX512-BF16 (no AMX needed).");
  m.def("amx_paged_attention", &pagoda_amx::paged_attention,
        "Paged attention of a mixed batch (decodes and prefill chunks) on AMX tiles, or with "
        "amx=False on AVX512-BF16; writes out.",
        py::arg("out"), py::arg("q"), py::arg("kv_cache"), py::arg("query_start"),
        py::arg("context_lens"), py::arg("block_tables"), py::arg("scale"),
        py::arg("window") = 0, py::arg("softcap") = 0.0, py::arg("amx") = true,
        py::call_guard<py::gil_scoped_release>());
  m.def("apply_token_bitmask", &pagoda_mask::apply_token_bitmask,
        "Set logits[rows[m], v] = -inf where bit v of words[m] is 0, in place.",
        py::arg("logits"), py::arg("words"), py::arg("rows"));
  m.def("gumbel_argmax", &pagoda_gumbel::gumbel_argmax,
        "One draw per row of softmax(logits) by the Gumbel-max trick, noise keyed per row.",
        py::arg("out"), py::arg("logits"), py::arg("keys"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gumbel_noise", &pagoda_gumbel::gumbel_noise,
        "The Gumbel noise gumbel_argmax adds, (R, V) fp32 (for tests).", py::arg("out"),
        py::arg("keys"), py::call_guard<py::gil_scoped_release>());
  m.def("write_kv", &pagoda_kv::write_kv, "Copy new K/V rows into their cache slots.",
        py::arg("kv_cache"), py::arg("k"), py::arg("v"), py::arg("slot_mapping"),
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_sgmv", &pagoda_lora::lora_sgmv,
        "out[start:start+rows] += (x[start:start+rows] @ a[slot].T) @ b[slot].T per segment "
        "(start, rows, slot) of the (G, 3) int32 segments; in place.",
        py::arg("out"), py::arg("x"), py::arg("a"), py::arg("b"), py::arg("segments"),
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_isa", &pagoda_lora::isa, "Instruction set lora_sgmv was compiled for.");
  m.def("invariant_gemm_native", &pagoda_invariant::native,
        "True when the batch-invariant linear runs on AVX512-BF16 (else a portable loop).");
  m.def("invariant_linear", &pagoda_invariant::linear,
        "out = x @ W.T + bias with a reduction order fixed per output element; portable: the "
        "portable loop even where AVX512-BF16 is compiled in.",
        py::arg("out"), py::arg("x"), py::arg("packed"), py::arg("bias"),
        py::arg("portable") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear", &pagoda_int8::linear,
        "out = x @ W.T for W as int8 codes with a scale (and an offset) per group, packed in "
        "blocks of 16 rows (models/cpu_int8.py); isa 0: the best path, else the one forced.",
        py::arg("out"), py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("offset"),
        py::arg("group"), py::arg("isa") = 0, py::arg("code_bias") = -1,
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_isas", &pagoda_int8::available,
        "The int8_linear paths this CPU runs (1 portable, 2 avx2, 3 avx512, 4 avx512_bf16).");
  pagoda_suffix::bind(m);
}

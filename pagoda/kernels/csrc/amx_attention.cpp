// Paged attention for a mixed batch (decodes and prefill chunks) on Intel AMX: PagedAttention
// (Kwon et al., SOSP'23) read through block tables, with FlashAttention's online softmax
// (Dao et al., 2022) over blocks of 64 keys, the two matrix products on the AMX tile unit.
//
// Invariant: query i of sequence n (rows [query_start[n], query_start[n + 1]) of q) sits at
// position p = context_len[n] - query_len + i and sees exactly the keys [lo(p), p] of its own
// sequence, read through block_tables[n] after the step's K/V were written; lo(p) = 0, or
// max(0, p - window + 1) with a sliding `window` > 0 (the W keys (p - W, p]). Keys at or past
// context_len, and keys before the window of a unit's first query, are never read from the
// cache (nor their block-table entries checked: they may name a shared null block); their
// slots in the work buffers are zeros, and they are masked. So garbage in unused slots cannot
// reach the output. With `softcap` c > 0, each scaled score s (fp32) becomes c * tanh(s / c)
// before the softmax.
//
// Work units are (sequence, KV head, up to kUnitRows query rows), where the rows of a KV head
// are its G = H / Hkv query heads for each query token (row r = token r / G, head r % G), so
// grouped-query attention reads each K/V row once for all G heads. A unit first copies the
// keys it needs into two AMX-friendly buffers:
//   Kt: per 16 keys and 32 dims, the 16 x 16 transpose of (key, dim pair) words, so that
//       Q (16 rows x 32 dims) . Kt is one TDPBF16PS giving the 16 x 16 scores;
//   Vt: per 32 keys and 16 dims, key pairs interleaved ("VNNI" layout), so that
//       P (16 rows x 32 keys, bf16) . Vt is one TDPBF16PS giving 16 rows x 16 dims.
// Then, per tile of 16 rows and per block of 64 keys that any of its rows sees (with a window,
// only blocks meeting [min_pos - W + 1, max_pos]): scores on the tiles, the soft cap, the causal
// and window masks and online softmax in AVX-512 (fp32; probabilities rounded to bf16 for the second product, as
// PyTorch's CPU flash attention does), P . V on the tiles, and the fp32 accumulator rescaled.
// Threads take units dynamically, largest first. An fp8 (e4m3) cache is widened to bf16 as the
// buffers are filled (exactly: e4m3 values are bf16 values), so the products are unchanged.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "fp8.h"

// Without AMX (AMD Zen 4 / Zen 5, Xeons whose OS refuses the tiles) the same kernel runs its
// two products with AVX512-BF16's VDPBF16PS on the same buffers: a Kt row (16 keys x one dim
// pair) against a query's dim pair broadcast gives 16 scores' partial sums, a Vt row (16 dims
// x one key pair) against a row's probability pair broadcast 16 outputs'.
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__linux__)
#define PAGODA_BF16_ATTENTION 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define PAGODA_AMX 1
#endif
#endif

namespace pagoda_amx {

#if defined(PAGODA_BF16_ATTENTION)
namespace {

constexpr int64_t kRows = 16;        // rows of a tile
constexpr int64_t kKeyBlock = 64;    // keys per softmax step (four score tiles)
constexpr int64_t kUnitRows = 256;   // query rows per work unit (16 row tiles)
constexpr int kTileBytes = 64;       // bytes per tile row: 32 bf16 or 16 fp32
constexpr int64_t kTileElems = kRows * 32;  // bf16 elements of one tile
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

#if defined(PAGODA_AMX)
// Tile registers (every one 16 rows x 64 bytes): 0, 1, 6, 7 the scores of four 16-key groups,
// then the P.V products of four 16-dim groups; 2 a Q chunk; 4 a Kt or Vt tile; 5 and 3 the
// probabilities of the block's two 32-key halves.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = kTileBytes;
      rows[t] = kRows;
    }
  }
};

#endif  // PAGODA_AMX

struct Problem {
  int64_t H, Hkv, G, D, block_size, W, num_blocks;
  const uint16_t* q;
  uint16_t* out;
  const char* cache;                     // bf16, or fp8 e4m3 when fp8
  bool fp8;
  const int64_t* query_start;
  const int64_t* context_lens;
  const int64_t* block_tables;
  int64_t q_st, o_st;                    // token strides of q and out (elements)
  int64_t c_skv, c_sblk, c_stok;         // cache strides (elements): K/V, block, token
  float scale;
  int64_t window;                        // > 0: a query at p sees keys (p - window, p] only
  float softcap;                         // > 0: scaled scores s -> softcap * tanh(s / softcap)
};

// First key that a query at position p sees.
inline int64_t first_key(const Problem& P, int64_t p) {
  return P.window > 0 ? std::max<int64_t>(0, p - P.window + 1) : 0;
}

struct Unit {
  int64_t n, h;       // sequence, KV head
  int64_t r0, r1;     // rows [r0, r1) of the sequence's query_len * G rows
  int64_t cost;
};

// Per-thread work buffers, sized for the largest unit.
struct Buffers {
  std::vector<uint16_t> mem;
  uint16_t* kt = nullptr;  // transformed keys (64-byte aligned, within mem)
  uint16_t* vt = nullptr;  // transformed values
  void reserve(int64_t elems) {  // room for `elems` elements in each of kt and vt
    mem.assign(2 * elems + 64, 0);
    auto addr = reinterpret_cast<uintptr_t>(mem.data());
    kt = mem.data() + (64 - addr % 64) % 64 / sizeof(uint16_t);
    vt = kt + elems;
  }
  alignas(64) uint16_t qs[8][kTileElems];     // Q tile: D / 32 chunks of 16 rows x 32 dims
  alignas(64) float s[kRows * kKeyBlock];      // scores of a key block
  alignas(64) uint16_t p[kRows * kKeyBlock];   // probabilities (bf16)
  alignas(64) float o[kRows * 256];            // P.V of a key block, 16 rows x D
  alignas(64) float acc[kRows * 256];          // running outputs
  alignas(64) float m[kRows];                  // running maxima (raw scores)
  alignas(64) float l[kRows];                  // running sums
  alignas(64) float alpha[kRows];              // this block's rescale of acc and l
  int64_t pos[kRows];
};

// The K row of token t (its V row is kv_offset bytes on): bytes of the cache's dtype.
template <bool FP8>
inline const char* key_row(const Problem& P, int64_t n, int64_t h, int64_t t) {
  const int64_t block = P.block_tables[n * P.W + t / P.block_size];
  const int64_t elem = FP8 ? 1 : 2;
  return P.cache + (block * P.c_sblk + (t % P.block_size) * P.c_stok + h * P.D) * elem;
}

// Dims [32c, 32c + 32) of a row as 32 bf16.
template <bool FP8>
inline __m512i load32(const char* row, int64_t c) {
  if constexpr (FP8) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * c));
    const __m512 lo = pagoda_fp8::widen16(_mm256_castsi256_si128(b));
    const __m512 hi = pagoda_fp8::widen16(_mm256_extracti128_si256(b, 1));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);   // exact: e4m3 values are bf16 values
  } else {
    return _mm512_loadu_si512(row + 64 * c);
  }
}

// 16 x 16 transpose of 32-bit words: rows r[0..15] -> columns, in place.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + x], lane L: column 4L + x of rows 4i .. 4i + 3
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int x = 0; x < 4; ++x) {
    const __m512i lo_a = _mm512_shuffle_i32x4(u[x], u[4 + x], 0x44);
    const __m512i hi_a = _mm512_shuffle_i32x4(u[x], u[4 + x], 0xEE);
    const __m512i lo_b = _mm512_shuffle_i32x4(u[8 + x], u[12 + x], 0x44);
    const __m512i hi_b = _mm512_shuffle_i32x4(u[8 + x], u[12 + x], 0xEE);
    r[0 + x] = _mm512_shuffle_i32x4(lo_a, lo_b, 0x88);
    r[4 + x] = _mm512_shuffle_i32x4(lo_a, lo_b, 0xDD);
    r[8 + x] = _mm512_shuffle_i32x4(hi_a, hi_b, 0x88);
    r[12 + x] = _mm512_shuffle_i32x4(hi_a, hi_b, 0xDD);
  }
}

// Kt and Vt for keys [base, nkeys) of (n, h), base a multiple of kKeyBlock, zero-padded to a
// whole key block; keys before kstart (>= base) are zeros too, never read.
//   Kt: group g (keys base + 16g..), chunk c (dims 32c..): 16 rows (dim pairs) x 16 keys x 2 bf16.
//   Vt: block b (keys base + 32b..), group e (dims 16e..): 16 rows (key pairs) x 16 dims x 2 bf16.
template <bool FP8>
void transform_kv(const Problem& P, int64_t n, int64_t h, int64_t base, int64_t kstart,
                  int64_t nkeys, Buffers& buf) {
  const int64_t D = P.D, chunks = D / 32;
  const int64_t padded = (nkeys - base + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const int64_t kv_offset = P.c_skv * (FP8 ? 1 : 2);   // bytes from a K row to its V row
  uint16_t* kt = buf.kt;
  uint16_t* vt = buf.vt;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t g = 0; g < padded / 16; ++g) {
    const char* rows[16];
    for (int64_t t = 0; t < 16; ++t) {
      const int64_t key = base + 16 * g + t;
      rows[t] = key >= kstart && key < nkeys ? key_row<FP8>(P, n, h, key) : nullptr;
    }
    if (base + 16 * g + 16 < nkeys) {  // prefetch the next group's rows
      for (int64_t t = 0; t < 16; ++t) {
        const int64_t key = std::clamp(base + 16 * g + 16 + t, kstart, nkeys - 1);
        const char* k = key_row<FP8>(P, n, h, key);
        _mm_prefetch(k, _MM_HINT_T0);
        _mm_prefetch(k + kv_offset, _MM_HINT_T0);
      }
    }
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t)
        r[t] = rows[t] ? load32<FP8>(rows[t], c) : zero;
      transpose16(r);
      uint16_t* dst = kt + (g * chunks + c) * kTileElems;
      for (int k = 0; k < 16; ++k) _mm512_store_si512(dst + 32 * k, r[k]);
    }
    // Values of the same 16 keys: 8 key pairs, each interleaved per 16 dims.
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                            40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                            1, 32, 0);
    const __m512i hi_idx = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57,
                                            25, 56, 24, 55, 23, 54, 22, 53, 21, 52, 20, 51, 19,
                                            50, 18, 49, 17, 48, 16);
    const int64_t block = g / 2, pair0 = (g % 2) * 8;
    for (int64_t j = 0; j < 8; ++j) {
      const char* a = rows[2 * j] ? rows[2 * j] + kv_offset : nullptr;
      const char* b = rows[2 * j + 1] ? rows[2 * j + 1] + kv_offset : nullptr;
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512i va = a ? load32<FP8>(a, c) : zero;
        const __m512i vb = b ? load32<FP8>(b, c) : zero;
        uint16_t* d0 = vt + (block * (D / 16) + 2 * c) * kTileElems + (pair0 + j) * 32;
        _mm512_store_si512(d0, _mm512_permutex2var_epi16(va, lo_idx, vb));
        _mm512_store_si512(d0 + kTileElems, _mm512_permutex2var_epi16(va, hi_idx, vb));
      }
    }
  }
}

// 2^x for x <= 0: 2^n * p(f), n = round(x), |f| <= 1/2, degree-5 Taylor polynomial (relative
// error < 3e-6, far below the bf16 rounding of the probabilities). Arguments at or below -125
// (and -inf) give exactly 0, so no denormal is ever produced (each would cost a microcode
// assist).
inline __m512 exp2_neg(__m512 x) {
  const __m512 floor = _mm512_set1_ps(-125.f);
  const __mmask16 live = _mm512_cmp_ps_mask(x, floor, _CMP_GT_OQ);
  x = _mm512_max_ps(x, floor);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3333558e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// Raw scores (before scaling) of the tile's rows against the buffers' key block kb into s
// (16 rows x 64 fp32), on AVX512-BF16: per 16-key group, 16 row accumulators summed over the
// head dim's pairs, each Kt row loaded once for the 16 rows.
inline void scores_avx512(const Buffers& buf, int64_t kb, int64_t chunks, float* s) {
  const uint16_t* kt = buf.kt + 4 * kb * chunks * kTileElems;
  for (int64_t j = 0; j < 4; ++j) {
    __m512 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const uint16_t* tile = kt + (j * chunks + c) * kTileElems;  // 16 dim pairs x 16 keys
      const uint32_t* q = reinterpret_cast<const uint32_t*>(buf.qs[c]);  // 16 rows x 16 pairs
      for (int k = 0; k < 16; ++k) {
        const __m512bh keys = (__m512bh)_mm512_load_si512(tile + 32 * k);
        for (int r = 0; r < kRows; ++r) {
          const __m512bh pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * 16 + k]));
          acc[r] = _mm512_dpbf16_ps(acc[r], keys, pair);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) _mm512_store_ps(s + r * kKeyBlock + 16 * j, acc[r]);
  }
}

#if defined(PAGODA_AMX)
// The same on the AMX tiles: four 16-key tiles, each summed over the head dim's 32-dim chunks.
inline void scores_amx(const Buffers& buf, int64_t kb, int64_t chunks, float* s) {
  const uint16_t* kt = buf.kt + 4 * kb * chunks * kTileElems;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(2, buf.qs[c], kTileBytes);
    _tile_loadd(4, kt + (0 * chunks + c) * kTileElems, kTileBytes);
    _tile_dpbf16ps(0, 2, 4);
    _tile_loadd(4, kt + (1 * chunks + c) * kTileElems, kTileBytes);
    _tile_dpbf16ps(1, 2, 4);
    _tile_loadd(4, kt + (2 * chunks + c) * kTileElems, kTileBytes);
    _tile_dpbf16ps(6, 2, 4);
    _tile_loadd(4, kt + (3 * chunks + c) * kTileElems, kTileBytes);
    _tile_dpbf16ps(7, 2, 4);
  }
  constexpr int kStride = kKeyBlock * sizeof(float);
  _tile_stored(0, s, kStride);
  _tile_stored(1, s + 16, kStride);
  _tile_stored(6, s + 32, kStride);
  _tile_stored(7, s + 48, kStride);
}
#endif  // PAGODA_AMX

// cap * tanh(x * mul / cap), as sign (1 - e) / (1 + e) with e = 2^(-2 |y| log2 e) <= 1; the
// division is a reciprocal estimate and one Newton step (relative error ~1e-7).
inline __m512 soft_cap(__m512 x, float mul, float cap) {
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(mul / cap));
  const __m512 e = exp2_neg(_mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(-2.88539008f)));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 den = _mm512_add_ps(one, e);
  __m512 r = _mm512_rcp14_ps(den);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(den, r, one), r);
  const __m512 t = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(cap), _mm512_sub_ps(one, e)), r);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
}

// Online softmax over key block kb (keys 64 kb ..) for the tile's `rows` valid rows, in base 2
// (the scale times log2(e) folded into one multiply-add; with a soft cap, the capped scores
// are computed first and the multiplier is log2(e) alone). Keys past a row's position are
// masked where the block reaches past the tile's first position, and with a window, keys
// before a row's window where the block starts before the last row's window. Pass 1 finds each
// row's block maximum; the running maxima, rescales and sums are then updated for all 16 rows
// as vectors; pass 2 writes the bf16 probabilities. (A row that sees no key of the block, only
// possible with a window, gets probabilities and alpha 0: exp2_neg maps the NaN of -inf - -inf
// to 0.)
inline void softmax_block(Buffers& buf, int64_t rows, int64_t kb, const Problem& P) {
  constexpr float kLog2e = 1.44269504088896341f;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool capped = P.softcap > 0.f;
  const float mul = capped ? 1.f : P.scale;
  const __m512 c = _mm512_set1_ps(mul * kLog2e);
  const bool diagonal = kKeyBlock * kb + kKeyBlock - 1 > buf.pos[0];
  const bool before = P.window > 0 && kKeyBlock * kb < first_key(P, buf.pos[rows - 1]);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) float rowmax[kRows], rowsum[kRows];
  for (int64_t r = 0; r < rows; ++r) {
    float* s = buf.s + r * kKeyBlock;
    __m512 x[4];
    for (int j = 0; j < 4; ++j) x[j] = _mm512_load_ps(s + 16 * j);
    if (capped) {
      for (int j = 0; j < 4; ++j) x[j] = soft_cap(x[j], P.scale, P.softcap);
    }
    if (diagonal || before) {
      const __m512i pos = _mm512_set1_epi32(static_cast<int>(buf.pos[r]));
      const __m512i lo = _mm512_set1_epi32(static_cast<int>(first_key(P, buf.pos[r])));
      for (int j = 0; j < 4; ++j) {
        const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(
            static_cast<int>(kKeyBlock * kb + 16 * j)));
        const __mmask16 seen = _mm512_cmp_epi32_mask(key, pos, _MM_CMPINT_LE) &
                               _mm512_cmp_epi32_mask(key, lo, _MM_CMPINT_NLT);
        x[j] = _mm512_mask_mov_ps(_mm512_set1_ps(neg_inf), seen, x[j]);
      }
    }
    if (capped || diagonal || before) {
      for (int j = 0; j < 4; ++j) _mm512_store_ps(s + 16 * j, x[j]);
    }
    rowmax[r] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(x[0], x[1]),
                                                   _mm512_max_ps(x[2], x[3])));
  }
  for (int64_t r = rows; r < kRows; ++r) rowmax[r] = 0.f;  // padding rows: anything finite
  const __m512 m_old = _mm512_load_ps(buf.m);
  const __m512 m_new = _mm512_max_ps(m_old, _mm512_load_ps(rowmax));
  // A row's first block: m_old = -inf, alpha = 0 (acc and l are still zero).
  _mm512_store_ps(buf.alpha, exp2_neg(_mm512_mul_ps(_mm512_sub_ps(m_old, m_new), c)));
  _mm512_store_ps(buf.m, m_new);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = buf.s + r * kKeyBlock;
    const __m512 mc = _mm512_set1_ps(buf.m[r] * mul * kLog2e);
    __m512 p[4];
    for (int j = 0; j < 4; ++j) p[j] = exp2_neg(_mm512_fmsub_ps(_mm512_load_ps(s + 16 * j), c, mc));
    rowsum[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(p[0], p[1]),
                                                   _mm512_add_ps(p[2], p[3])));
    uint16_t* dst = buf.p + r * kKeyBlock;
    _mm512_store_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
    _mm512_store_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(p[3], p[2]));
  }
  for (int64_t r = rows; r < kRows; ++r) {
    rowsum[r] = 0.f;
    _mm512_store_si512(buf.p + r * kKeyBlock, _mm512_setzero_si512());
    _mm512_store_si512(buf.p + r * kKeyBlock + 32, _mm512_setzero_si512());
  }
  _mm512_store_ps(buf.l, _mm512_fmadd_ps(_mm512_load_ps(buf.l), _mm512_load_ps(buf.alpha),
                                         _mm512_load_ps(rowsum)));
}

// acc = acc * alpha + P . V for the buffers' key block kb on AVX512-BF16: per 16-dim group,
// 16 row accumulators started from the rescaled acc, over the block's 32 key pairs, each Vt
// row loaded once for the 16 rows (padding rows have zero probabilities and accumulators).
inline void accumulate_avx512(Buffers& buf, int64_t kb, int64_t D) {
  const int64_t groups = D / 16;
  const uint16_t* v0 = buf.vt + (2 * kb) * groups * kTileElems;  // keys 64 kb ..
  const uint32_t* p = reinterpret_cast<const uint32_t*>(buf.p);  // row r: 32 key pairs
  for (int64_t e = 0; e < groups; ++e) {
    __m512 acc[kRows];
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm512_mul_ps(_mm512_load_ps(buf.acc + r * D + 16 * e),
                             _mm512_set1_ps(buf.alpha[r]));
    }
    for (int64_t half = 0; half < 2; ++half) {
      const uint16_t* tile = v0 + (half * groups + e) * kTileElems;  // 16 key pairs x 16 dims
      for (int k = 0; k < 16; ++k) {
        const __m512bh values = (__m512bh)_mm512_load_si512(tile + 32 * k);
        for (int r = 0; r < kRows; ++r) {
          const __m512bh pair =
              (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * 32 + half * 16 + k]));
          acc[r] = _mm512_dpbf16_ps(acc[r], values, pair);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) _mm512_store_ps(buf.acc + r * D + 16 * e, acc[r]);
  }
}

#if defined(PAGODA_AMX)
// P . V for the 16-dim groups e and e + 1 of one key block into tiles C0, C1, stored to o:
// each sums the block's two 32-key halves (P halves in tiles 5 and 3, V tiles loaded into 4).
// A macro, not a template: the tile intrinsics paste their register numbers into the
// assembly text, so they must be literals.
#define PAGODA_PV_TWO_GROUPS(C0, C1, v0, v1, e, o, stride)     \
  do {                                                          \
    _tile_zero(C0);                                             \
    _tile_zero(C1);                                             \
    _tile_loadd(4, (v0) + (e) * kTileElems, kTileBytes);            \
    _tile_dpbf16ps(C0, 5, 4);                                   \
    _tile_loadd(4, (v1) + (e) * kTileElems, kTileBytes);            \
    _tile_dpbf16ps(C0, 3, 4);                                   \
    _tile_loadd(4, (v0) + ((e) + 1) * kTileElems, kTileBytes);      \
    _tile_dpbf16ps(C1, 5, 4);                                   \
    _tile_loadd(4, (v1) + ((e) + 1) * kTileElems, kTileBytes);      \
    _tile_dpbf16ps(C1, 3, 4);                                   \
    _tile_stored(C0, (o) + 16 * (e), stride);                   \
    _tile_stored(C1, (o) + 16 * ((e) + 1), stride);             \
  } while (0)

// acc = acc * alpha + P . V for the buffers' key block kb: P as two 16 x 32-key tiles, V per 32 keys and
// 16 dims; four 16-dim groups at a time (D is a multiple of 32: 2 or 4 groups per pass).
inline void accumulate_amx(Buffers& buf, int64_t rows, int64_t kb, int64_t D) {
  const int64_t groups = D / 16;
  const uint16_t* v0 = buf.vt + (2 * kb) * groups * kTileElems;   // keys 64 kb ..
  const uint16_t* v1 = v0 + groups * kTileElems;                   // keys 64 kb + 32 ..
  constexpr int kPStride = kKeyBlock * sizeof(uint16_t);
  _tile_loadd(5, buf.p, kPStride);
  _tile_loadd(3, buf.p + 32, kPStride);
  const int kOStride = static_cast<int>(D * sizeof(float));
  for (int64_t e0 = 0; e0 < groups; e0 += 4) {
    PAGODA_PV_TWO_GROUPS(0, 1, v0, v1, e0, buf.o, kOStride);
    if (groups - e0 >= 4) PAGODA_PV_TWO_GROUPS(6, 7, v0, v1, e0 + 2, buf.o, kOStride);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 a = _mm512_set1_ps(buf.alpha[r]);
    float* acc = buf.acc + r * D;
    const float* o = buf.o + r * D;
    for (int64_t d = 0; d < D; d += 16)
      _mm512_store_ps(acc + d, _mm512_fmadd_ps(_mm512_load_ps(acc + d), a, _mm512_load_ps(o + d)));
  }
}

#endif  // PAGODA_AMX

// Rows [t0, t0 + rows) of unit u: one tile, over every key block any of its rows sees; the
// unit's buffers start at key block kb0. AMX: the products on the tiles, else AVX512-BF16.
template <bool AMX>
void run_tile(const Problem& P, const Unit& u, int64_t t0, int64_t rows, int64_t kb0,
              Buffers& buf) {
  const int64_t D = P.D, G = P.G, chunks = D / 32;
  const int64_t qstart = P.query_start[u.n];
  const int64_t qlen = P.query_start[u.n + 1] - qstart;
  const int64_t first_pos = P.context_lens[u.n] - qlen;
  for (int64_t c = 0; c < chunks; ++c) std::memset(buf.qs[c], 0, sizeof(buf.qs[c]));
  int64_t max_pos = 0;
  for (int64_t r = 0; r < kRows; ++r) {
    buf.m[r] = -std::numeric_limits<float>::infinity();
    buf.l[r] = 0.f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = t0 + r, i = row / G, g = row % G;
    const uint16_t* src = P.q + (qstart + i) * P.q_st + (u.h * G + g) * D;
    for (int64_t c = 0; c < chunks; ++c) std::memcpy(buf.qs[c] + r * 32, src + 32 * c, 64);
    buf.pos[r] = first_pos + i;
    max_pos = std::max(max_pos, buf.pos[r]);
  }
  std::memset(buf.acc, 0, sizeof(float) * kRows * D);
  const int64_t blocks = max_pos / kKeyBlock + 1;
  for (int64_t kb = std::max(kb0, first_key(P, buf.pos[0]) / kKeyBlock); kb < blocks; ++kb) {
#if defined(PAGODA_AMX)
    if constexpr (AMX) {
      scores_amx(buf, kb - kb0, chunks, buf.s);
      softmax_block(buf, rows, kb, P);
      accumulate_amx(buf, rows, kb - kb0, D);
      continue;
    }
#endif
    scores_avx512(buf, kb - kb0, chunks, buf.s);
    softmax_block(buf, rows, kb, P);
    accumulate_avx512(buf, kb - kb0, D);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = t0 + r, i = row / G, g = row % G;
    uint16_t* dst = P.out + (qstart + i) * P.o_st + (u.h * G + g) * D;
    const __m512 inv = _mm512_set1_ps(1.f / buf.l[r]);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_load_ps(buf.acc + r * D + d), inv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// Keys [kstart, kend) that the query rows [r0, r1) of sequence n see, and the first key of
// the key block kstart falls in (where the unit's buffers start).
struct KeySpan {
  int64_t base, kstart, kend;
};
inline KeySpan unit_keys(const Problem& P, int64_t n, int64_t r0, int64_t r1) {
  const int64_t qlen = P.query_start[n + 1] - P.query_start[n];
  const int64_t first_pos = P.context_lens[n] - qlen;
  const int64_t kstart = first_key(P, first_pos + r0 / P.G);
  return {kstart / kKeyBlock * kKeyBlock, kstart, first_pos + (r1 - 1) / P.G + 1};
}

template <bool AMX>
void run_unit(const Problem& P, const Unit& u, Buffers& buf) {
  const KeySpan k = unit_keys(P, u.n, u.r0, u.r1);
  if (P.fp8) {
    transform_kv<true>(P, u.n, u.h, k.base, k.kstart, k.kend, buf);
  } else {
    transform_kv<false>(P, u.n, u.h, k.base, k.kstart, k.kend, buf);
  }
  for (int64_t t0 = u.r0; t0 < u.r1; t0 += kRows)
    run_tile<AMX>(P, u, t0, std::min<int64_t>(kRows, u.r1 - t0), k.base / kKeyBlock, buf);
}

#if defined(PAGODA_AMX)
bool request_amx() {
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool cpu_has_amx_bf16() {
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  return ((edx >> 22) & 1) && ((edx >> 24) & 1);  // AMX-BF16, AMX-TILE
}
#endif  // PAGODA_AMX

}  // namespace

bool available() {
#if defined(PAGODA_AMX)
  static const bool ok = cpu_has_amx_bf16() && request_amx();
  return ok;
#else
  return false;
#endif
}

bool bf16_available() { return true; }  // built with AVX512-BF16 for this very CPU

void paged_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache, at::Tensor query_start,
                     at::Tensor context_lens, at::Tensor block_tables, double scale,
                     int64_t window, double softcap, bool amx) {
  TORCH_CHECK(!amx || available(), "AMX is not available on this CPU or was refused by the kernel");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no sliding window), got ", window);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "softcap must be a finite number >= 0 (0: no soft-capping), got ", softcap);
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
                  (kv_cache.scalar_type() == at::kBFloat16 || fp8),
              "q and out must be bfloat16, kv_cache bfloat16 or float8_e4m3fn");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be (T, H, D)");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be contiguous (2, num_blocks, block_size, Hkv, D)");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(D % 32 == 0 && D <= 256 && kv_cache.size(4) == D,
              "head dim must be a multiple of 32, at most 256, and match the cache's");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && out.stride(2) == 1 && out.stride(1) == D,
              "q and out heads must be contiguous within a token");
  for (const auto* t : {&query_start, &context_lens, &block_tables}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                "query_start, context_lens and block_tables must be contiguous int64");
  }
  const int64_t N = context_lens.numel();
  TORCH_CHECK(query_start.numel() == N + 1 && block_tables.dim() == 2 &&
                  block_tables.size(0) == N, "query_start (N + 1,), block_tables (N, W)");
  Problem P{H, Hkv, H / Hkv, D, kv_cache.size(2), block_tables.size(1), kv_cache.size(1),
            reinterpret_cast<const uint16_t*>(q.data_ptr()),
            reinterpret_cast<uint16_t*>(out.data_ptr()),
            static_cast<const char*>(kv_cache.data_ptr()), fp8,
            query_start.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
            block_tables.data_ptr<int64_t>(), q.stride(0), out.stride(0),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            static_cast<float>(scale), window, static_cast<float>(softcap)};
  TORCH_CHECK(P.query_start[0] == 0 && P.query_start[N] <= T, "query_start out of range");
  std::vector<Unit> units;
  int64_t max_keys = 0;  // of a unit's buffers
  for (int64_t n = 0; n < N; ++n) {
    const int64_t qlen = P.query_start[n + 1] - P.query_start[n], ctx = P.context_lens[n];
    TORCH_CHECK(qlen >= 0 && qlen <= ctx, "sequence ", n, ": query_len ", qlen,
                " must lie in [0, context_len = ", ctx, "]");
    const int64_t nb = (ctx + P.block_size - 1) / P.block_size;
    TORCH_CHECK(nb <= P.W, "sequence ", n, ": context needs ", nb, " blocks, the table has ", P.W);
    // Blocks before the first query's window are never read: not checked.
    for (int64_t j = first_key(P, ctx - qlen) / P.block_size; j < nb; ++j) {
      const int64_t id = P.block_tables[n * P.W + j];
      TORCH_CHECK(id >= 0 && id < P.num_blocks, "block_tables[", n, "][", j, "] = ", id,
                  " is outside [0, ", P.num_blocks, ")");
    }
    if (qlen == 0) continue;
    const int64_t rows = qlen * P.G;
    for (int64_t r0 = 0; r0 < rows; r0 += kUnitRows) {
      const int64_t r1 = std::min(rows, r0 + kUnitRows);
      const KeySpan k = unit_keys(P, n, r0, r1);
      max_keys = std::max(max_keys, k.kend - k.base);
      for (int64_t h = 0; h < Hkv; ++h) {
        units.push_back({n, h, r0, r1, (k.kend - k.kstart) * (16 + (r1 - r0))});
      }
    }
  }
  if (units.empty()) return;
  std::sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  const int64_t padded = (max_keys + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), units.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    auto buf = std::make_unique<Buffers>();
    buf->reserve(padded * D);
#if defined(PAGODA_AMX)
    if (amx) {
      TileConfig cfg;
      _tile_loadconfig(&cfg);
      for (int64_t i = next++; i < static_cast<int64_t>(units.size()); i = next++)
        run_unit<true>(P, units[i], *buf);
      _tile_release();
      return;
    }
#endif
    for (int64_t i = next++; i < static_cast<int64_t>(units.size()); i = next++)
      run_unit<false>(P, units[i], *buf);
  });
}

#else  // neither AMX nor AVX512-BF16 in this build

bool available() { return false; }
bool bf16_available() { return false; }

void paged_attention(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                     double, int64_t, double, bool) {
  TORCH_CHECK(false, "this build of the extension has no AVX512-BF16 (or AMX) attention kernel");
}

#endif

}  // namespace pagoda_amx

// Structured outputs: -inf on the logits a request's grammar forbids, in place.
//
// The grammar library (llguidance) gives each constrained row a bitmask, one bit per
// vocabulary entry in little-endian 32-bit words (bit b of word w: token 32 w + b allowed).
// Unpacking it into a (R, V) bool tensor and masked_fill took ~4-6 ms for 32 x 49152 on a
// 2-core CPU; here a row costs one pass over its words, writing only forbidden entries, and
// a word whose 32 tokens are all allowed costs nothing, one with all forbidden a plain fill.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace pagoda_mask {

template <typename T>
void mask_row(T* row, const int32_t* words, int64_t num_words, int64_t vocab, T neg_inf) {
  for (int64_t w = 0; w < num_words; ++w) {
    const uint32_t word = static_cast<uint32_t>(words[w]);
    if (word == 0xFFFFFFFFu) continue;
    const int64_t base = w * 32;
    if (word == 0 && base + 32 <= vocab) {  // all 32 forbidden (most words in a tight state)
      for (int b = 0; b < 32; ++b) row[base + b] = neg_inf;
      continue;
    }
    for (int b = 0; b < 32; ++b) {
      const int64_t v = base + b;
      if (v >= vocab) return;
      if (!((word >> b) & 1u)) row[v] = neg_inf;
    }
  }
}

// logits (S, V) float32 or bfloat16 with unit stride; words (M, W) int32 contiguous; rows
// (M,) int64: words[m] masks logits[rows[m]]. Tokens past 32 W are forbidden too.
void apply_token_bitmask(at::Tensor logits, at::Tensor words, at::Tensor rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (S, V), unit stride");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "logits must be float32 or bfloat16");
  TORCH_CHECK(words.dim() == 2 && words.is_contiguous() && words.scalar_type() == at::kInt,
              "words must be contiguous int32 (M, W)");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                  rows.numel() == words.size(0), "rows must be contiguous int64 (M,)");
  const int64_t vocab = logits.size(1), num_words = words.size(1), stride = logits.stride(0);
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t m = 0; m < rows.numel(); ++m)
    TORCH_CHECK(row_ids[m] >= 0 && row_ids[m] < logits.size(0), "row out of range");
  const int32_t* all_words = words.data_ptr<int32_t>();
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  at::parallel_for(0, rows.numel(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* w = all_words + m * num_words;
      const int64_t covered = num_words * 32;
      if (bf16) {
        auto* row = reinterpret_cast<uint16_t*>(logits.data_ptr()) + row_ids[m] * stride;
        mask_row<uint16_t>(row, w, num_words, vocab, 0xFF80u);  // bf16 -inf
        for (int64_t v = covered; v < vocab; ++v) row[v] = 0xFF80u;
      } else {
        float* row = logits.data_ptr<float>() + row_ids[m] * stride;
        const float neg_inf = -std::numeric_limits<float>::infinity();
        mask_row<float>(row, w, num_words, vocab, neg_inf);
        for (int64_t v = covered; v < vocab; ++v) row[v] = neg_inf;
      }
    }
  });
}

}  // namespace pagoda_mask

// The KV-cache write of paged attention (PagedAttention, Kwon et al., SOSP'23): each new
// token's K and V rows are copied into the cache slot the scheduler gave it.
//
// Invariant: row t of k and v lands at slot slot_mapping[t] (block slot / block_size, offset
// slot % block_size) of kv_cache[0] and kv_cache[1]; nothing else in the cache is written.
// Every slot is bounds-checked before the first copy, so a bad slot raises and writes nothing.
// An fp8 (e4m3) cache takes bf16 or fp32 rows, rounded on the way in (fp8.h); other caches
// take rows of their own dtype, copied.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bf16.h"
#include "fp8.h"

namespace pagoda_kv {

namespace {

constexpr int64_t kGrain = 64;  // tokens per parallel task

bool rounds_to_fp8(const at::Tensor& x, const at::Tensor& kv_cache) {
  return kv_cache.scalar_type() == at::kFloat8_e4m3fn &&
         (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat);
}

void check_rows(const at::Tensor& x, const at::Tensor& kv_cache, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be (T, Hkv, D)");
  TORCH_CHECK(x.scalar_type() == kv_cache.scalar_type() || rounds_to_fp8(x, kv_cache), name,
              " and kv_cache dtypes differ (", x.scalar_type(), ", ", kv_cache.scalar_type(),
              ")");
  TORCH_CHECK(x.size(1) == kv_cache.size(3) && x.size(2) == kv_cache.size(4),
              name, " heads or head dim differ from the cache's");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, "'s heads must be contiguous within a token");
}

// One token's row of n values, rounded into an fp8 cache row.
template <typename S>
void round_row(uint8_t* __restrict dst, const S* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<S, float>) {
      dst[i] = pagoda_fp8::from_f32(src[i]);
    } else {
      dst[i] = pagoda_fp8::from_f32(pagoda_bf16::to_f32(src[i]));
    }
  }
}

template <typename S>
void write_rounded(uint8_t* k_cache, uint8_t* v_cache, const at::Tensor& k, const at::Tensor& v,
                   const int64_t* slots, int64_t tokens, int64_t row) {
  const S* k_src = static_cast<const S*>(k.data_ptr());
  const S* v_src = static_cast<const S*>(v.data_ptr());
  const int64_t ks = k.stride(0), vs = v.stride(0);
  at::parallel_for(0, tokens, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      round_row(k_cache + slots[t] * row, k_src + t * ks, row);
      round_row(v_cache + slots[t] * row, v_src + t * vs, row);
    }
  });
}

}  // namespace

// kv_cache: (2, num_blocks, block_size, Hkv, D) contiguous; k, v: (T, Hkv, D) with each
// token's heads contiguous (any token stride), of the cache's dtype (an fp8 cache: bf16 or
// fp32, k and v alike); slot_mapping: (T,) int64.
void write_kv(at::Tensor kv_cache, at::Tensor k, at::Tensor v, at::Tensor slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be contiguous (2, num_blocks, block_size, Hkv, D)");
  check_rows(k, kv_cache, "k");
  check_rows(v, kv_cache, "v");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous(), "slot_mapping must be contiguous int64 (T,)");
  const int64_t tokens = slot_mapping.numel();
  TORCH_CHECK(k.size(0) == tokens && v.size(0) == tokens, "k, v and slot_mapping lengths differ");
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t],
                " is outside [0, ", num_slots, ")");
  }
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v dtypes differ");
  if (rounds_to_fp8(k, kv_cache)) {
    const int64_t row = k.size(1) * k.size(2);
    auto* k_cache = static_cast<uint8_t*>(kv_cache.data_ptr());
    auto* v_cache = k_cache + num_slots * row;
    if (k.scalar_type() == at::kFloat) {
      write_rounded<float>(k_cache, v_cache, k, v, slots, tokens, row);
    } else {
      write_rounded<uint16_t>(k_cache, v_cache, k, v, slots, tokens, row);
    }
    return;
  }
  const int64_t elem = kv_cache.element_size();
  const int64_t row_bytes = k.size(1) * k.size(2) * elem;
  auto* k_cache = static_cast<char*>(kv_cache.data_ptr());
  auto* v_cache = k_cache + num_slots * row_bytes;
  const auto* k_src = static_cast<const char*>(k.data_ptr());
  const auto* v_src = static_cast<const char*>(v.data_ptr());
  const int64_t k_stride = k.stride(0) * elem, v_stride = v.stride(0) * elem;
  at::parallel_for(0, tokens, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(k_cache + slots[t] * row_bytes, k_src + t * k_stride, row_bytes);
      std::memcpy(v_cache + slots[t] * row_bytes, v_src + t * v_stride, row_bytes);
    }
  });
}

}  // namespace pagoda_kv

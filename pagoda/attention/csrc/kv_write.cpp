// The KV-cache write of paged attention (PagedAttention, Kwon et al., SOSP'23): each new
// token's K and V rows are copied into the cache slot the scheduler gave it.
//
// Invariant: row t of k and v lands at slot slot_mapping[t] (block slot / block_size, offset
// slot % block_size) of kv_cache[0] and kv_cache[1]; nothing else in the cache is written.
// Every slot is bounds-checked before the first copy, so a bad slot raises and writes nothing.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

namespace pagoda_kv {

namespace {

constexpr int64_t kGrain = 64;  // tokens per parallel task

void check_rows(const at::Tensor& x, const at::Tensor& kv_cache, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be (T, Hkv, D)");
  TORCH_CHECK(x.scalar_type() == kv_cache.scalar_type(), name, " and kv_cache dtypes differ");
  TORCH_CHECK(x.size(1) == kv_cache.size(3) && x.size(2) == kv_cache.size(4),
              name, " heads or head dim differ from the cache's");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, "'s heads must be contiguous within a token");
}

}  // namespace

// kv_cache: (2, num_blocks, block_size, Hkv, D) contiguous; k, v: (T, Hkv, D) with each
// token's heads contiguous (any token stride); slot_mapping: (T,) int64.
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

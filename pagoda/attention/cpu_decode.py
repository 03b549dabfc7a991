"""A C++ CPU kernel for paged decode attention (PagedAttention, Kwon et al., SOSP'23), with a
flash-decoding style online softmax (running max, running sum and an fp32 accumulator).

Invariant: a query of sequence ``b`` reads exactly the K/V rows of tokens
``[start, seq_lens[b])`` through its block table (token ``i`` at block
``block_tables[b, i // block_size]``, offset ``i % block_size``), each row once per (sequence,
KV head) and straight from the blocks: no padded copy of the context is made, and no other
cache slot is touched, so garbage in slots outside a sequence's context can never reach its
output. ``start`` is 0, or ``max(0, seq_lens[b] - window)`` with a sliding ``window`` > 0:
table entries of blocks wholly before it are not even read (they may name a null block).
With ``softcap`` c > 0, each scaled score s becomes ``c * tanh(s / c)`` before the softmax.

The kernel (``kernels/csrc/paged_decode.cpp``) runs (sequence, KV heads, token range) work units on
torch's intra-op threads (``at::parallel_for``; ``torch.set_num_threads`` applies). Each unit
serves the ``G = H // Hkv`` query heads of a KV head together (grouped-query attention), so a
row is fetched once for all of them, in tiles of 64 tokens: scores of the tile, online-softmax
update, then accumulation of V. bf16 is widened to fp32 with a bit shift (or multiplied with
``vdpbf16ps`` where AVX512-BF16 exists). When there are too few sequences to keep the threads
busy, long contexts are split into chunks whose partial softmax states are merged
(flash-decoding). Rows of upcoming tiles are prefetched, since blocks are scattered.

The kernel lives in the one C++ extension of ``pagoda/kernels/`` (built and loaded by
``kernels/ext.py``); this module is its attention-side wrapper. Calling it where the extension
is not built raises (``ext.available()`` says whether it is).
"""

from __future__ import annotations

from typing import Optional

import torch

from pagoda.kernels import ext


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: Optional[torch.Tensor] = None,
    *,
    window: int = 0,
    softcap: float = 0.0,
    key_split: int = 0,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over its paged context.

    q: (B, H, D), dtype of the cache (over a ``float8_e4m3fn`` cache: bfloat16 or float32);
    kv_cache: (2, num_blocks, block_size, Hkv, D) with K at
    index 0 and V at 1 (any strides but a contiguous head dim); block_tables: (B, W) int64,
    padded arbitrarily past each sequence's blocks; seq_lens: (B,) int64, the context length
    including the new token (1 <= seq_lens[b] <= W * block_size). Query head ``h`` attends with
    KV head ``h // (H // Hkv)``. Returns (B, H, D) in q's dtype, written into ``out`` if given
    (then ``out`` must be (B, H, D) with q's dtype and a contiguous head dim).
    ``window`` > 0: the query (at position ``seq_lens[b] - 1``) sees only the last ``window``
    tokens, and the table entries of blocks wholly before them are ignored; ``softcap`` > 0:
    scores s are capped to ``softcap * tanh(s / softcap)``; 0 turns either off.
    ``key_split`` > 0 (a multiple of 64): each row's keys are split every ``key_split`` tokens
    from its first and the parts merged in order, whatever the batch (``--deterministic``);
    0: the split adapts to the batch and the threads.
    Supported dtypes: float32, bfloat16, float16. Raises RuntimeError if the extension is not
    available (check ``ext.available()`` first) or on bad shapes, out-of-range block ids, a
    negative window or a negative or non-finite softcap.
    """
    return _call(
        "paged_decode", q, kv_cache, block_tables, seq_lens, scale, out, window, softcap, key_split
    )


def _call(
    fn: str,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: Optional[torch.Tensor],
    window: int = 0,
    softcap: float = 0.0,
    key_split: int = 0,
) -> torch.Tensor:
    """Run the extension's ``fn`` (``paged_decode``, or ``paged_decode_portable``, which always
    uses the auto-vectorised tile code instead of the AVX-512 one: for tests)."""
    mod = ext.require_extension()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_tables.dtype != torch.int64 or not block_tables.is_contiguous():
        block_tables = block_tables.to(torch.int64).contiguous()
    if seq_lens.dtype != torch.int64 or not seq_lens.is_contiguous():
        seq_lens = seq_lens.to(torch.int64).contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    getattr(mod, fn)(
        out,
        q,
        kv_cache,
        block_tables,
        seq_lens,
        float(scale),
        int(window),
        float(softcap),
        int(key_split),
    )
    return out

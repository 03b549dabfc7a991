"""AttentionMetadata: where a step's tokens go in the paged KV cache, and what they attend to.

A step's batch is laid out decode-form requests first (one query token each), then prefill
chunks (several query tokens whose earlier context may already sit in the cache):

    tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1]
              decodes     prefill 0    prefill 1
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillChunk:
    query_start: int        # first row of this chunk in the batch
    query_len: int          # tokens computed now
    context_len: int        # tokens attended to: already computed + query_len
    block_table: torch.Tensor  # (num_blocks_needed,) int64 block ids


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # (T,) int64: block_id * block_size + offset, per token
    num_decode_tokens: int              # rows [0, num_decode_tokens) are decodes
    decode_block_tables: torch.Tensor   # (D, max_blocks) int64, padded with block 0
    decode_seq_lens: torch.Tensor       # (D,) int64, context length including the new token
    decode_max_seq_len: int
    prefills: list[PrefillChunk]
    block_size: int

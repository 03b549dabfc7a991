"""AttentionMetadata: where a step's tokens go in the paged KV cache, and what they attend to.

A step's batch is laid out decode-form requests first (one query token each), then prefill
chunks (several query tokens whose earlier context may already sit in the cache):

    tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1]
              decodes     prefill 0    prefill 1
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


@dataclass
class PackedPrefills:
    """A step's prefill chunks as one set of tensors (the input of the Triton prefill kernel and
    of the CPU's AMX kernel).

    Chunk ``n`` owns rows ``[query_start_loc[n], query_start_loc[n + 1])`` of the prefill part
    of the batch (counted from the first prefill row); its queries sit at positions
    ``context_lens[n] - query_len + i``.
    """
    query_start_loc: torch.Tensor   # (N + 1,) int64, cumulative query lengths from 0
    context_lens: torch.Tensor      # (N,) int64: tokens already cached + query_len
    block_tables: torch.Tensor      # (N, W) int64, padded with block 0
    max_query_len: int


@dataclass
class DeviceAttentionMetadata(AttentionMetadata):
    """What the model runner builds for the fast kernels: the reference's metadata plus the
    packed prefills (built once per step with the rest, so no per-layer packing; the Triton
    kernels on CUDA, the AMX kernel on CPU) and, in a CUDA graph, the fixed flash-decoding
    split count the graph was captured with."""
    packed_prefills: Optional[PackedPrefills] = None
    decode_num_splits: Optional[int] = None


def pack_prefills(meta: AttentionMetadata, device: torch.device) -> Optional[PackedPrefills]:
    """Pack ``meta.prefills`` into tensors on ``device`` (None without prefill chunks)."""
    chunks = meta.prefills
    if not chunks:
        return None
    first = chunks[0].query_start
    starts = [c.query_start - first for c in chunks]
    starts.append(starts[-1] + chunks[-1].query_len)
    width = max(int(c.block_table.numel()) for c in chunks)
    tables = torch.zeros((len(chunks), width), dtype=torch.int64)        # (N, W)
    for i, c in enumerate(chunks):
        tables[i, :c.block_table.numel()] = c.block_table.cpu()
    return PackedPrefills(
        query_start_loc=torch.tensor(starts, dtype=torch.int64).to(device),
        context_lens=torch.tensor([c.context_len for c in chunks], dtype=torch.int64).to(device),
        block_tables=tables.to(device),
        max_query_len=max(c.query_len for c in chunks))

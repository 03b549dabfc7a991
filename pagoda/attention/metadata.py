"""AttentionMetadata: where a step's tokens go in the paged KV cache, and what they attend to.

A step's batch is laid out decode-form requests first (one query token each), then prefill
chunks (several query tokens whose earlier context may already sit in the cache):

    tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1]
              decodes     prefill 0    prefill 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch


@dataclass
class PrefillChunk:
    query_start: int  # first row of this chunk in the batch
    query_len: int  # tokens computed now
    context_len: int  # tokens attended to: already computed + query_len
    block_table: torch.Tensor  # (num_blocks_needed,) int64 block ids


@dataclass
class PackedPrefills:
    """A step's prefill chunks as one set of tensors (the input of the Triton prefill kernel and
    of the CPU's AMX kernel).

    Chunk ``n`` owns rows ``[query_start_loc[n], query_start_loc[n + 1])`` of the prefill part
    of the batch (counted from the first prefill row); its queries sit at positions
    ``context_lens[n] - query_len + i``.
    """

    query_start_loc: torch.Tensor  # (N + 1,) int64, cumulative query lengths from 0
    context_lens: torch.Tensor  # (N,) int64: tokens already cached + query_len
    block_tables: torch.Tensor  # (N, W) int64, padded with block 0
    max_query_len: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: block_id * block_size + offset, per token
    num_decode_tokens: int  # rows [0, num_decode_tokens) are decodes
    decode_block_tables: torch.Tensor  # (D, max_blocks) int64, padded with block 0
    decode_seq_lens: torch.Tensor  # (D,) int64, context length including the new token
    decode_max_seq_len: int
    prefills: list[PrefillChunk]
    block_size: int
    # The prefill chunks packed for the fast kernels (the Triton prefill, the CPU's AMX
    # kernel): the model runner packs them once per step with the rest of its inputs.
    packed_prefills: Optional[PackedPrefills] = None
    # In a CUDA graph, the fixed flash-decoding split count the graph was captured with.
    decode_num_splits: Optional[int] = None
    # The sliding-window layers' own slots and tables when their KV is kept apart
    # (core/sliding_kv.py): the same rows, in their pool's blocks.
    sliding: Optional["AttentionMetadata"] = None
    # Every query row as a sequence of its own (--deterministic): built once per step.
    row_contexts: Optional["RowContexts"] = None

    def for_window(self, window: int) -> "AttentionMetadata":
        """The metadata a layer with sliding window ``window`` (0: none) reads and writes."""
        return self.sliding if window and self.sliding is not None else self

    def rows(self) -> "RowContexts":
        """Every query row, decode or prefill, as a decode kernel's sequence (built on first
        use and kept, so the layers of a step share it)."""
        if self.row_contexts is None:
            self.row_contexts = row_contexts(self)
        return self.row_contexts

    def packed(self, device: torch.device) -> Optional[PackedPrefills]:
        """The packed prefill chunks (None without any): the runner's, or, for metadata built
        by hand, packed here once and kept, so the layers of a step share them."""
        if self.packed_prefills is None and self.prefills:
            self.packed_prefills = pack_prefills(self, device)
        return self.packed_prefills


class ChunkSpan(NamedTuple):
    """A prefill chunk as host integers, before any tensor: what the model runner gathers."""

    row: int  # first row of the chunk in the batch
    query_len: int  # tokens computed now
    context_len: int  # tokens attended to: already computed + query_len
    blocks: list[int]  # the block ids holding tokens [0, context_len)


def packed_lists(spans: Sequence[ChunkSpan]) -> tuple[list[int], list[int], list[list[int]]]:
    """The contents of :class:`PackedPrefills` as host lists: query starts counted from the
    first chunk's row (N + 1), context lengths (N) and unpadded block tables (N)."""
    first = spans[0].row if spans else 0
    starts = [s.row - first for s in spans]
    if spans:
        starts.append(starts[-1] + spans[-1].query_len)
    return starts, [s.context_len for s in spans], [s.blocks for s in spans]


def pack_spans(spans: Sequence[ChunkSpan], device: torch.device) -> Optional[PackedPrefills]:
    """Pack chunks into tensors on ``device`` (None without chunks)."""
    if not spans:
        return None
    starts, context_lens, blocks = packed_lists(spans)
    width = max(len(b) for b in blocks)
    tables = [b + [0] * (width - len(b)) for b in blocks]  # (N, W)
    return PackedPrefills(
        query_start_loc=torch.tensor(starts, dtype=torch.int64, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int64, device=device),
        max_query_len=max(s.query_len for s in spans),
    )


def pack_prefills(meta: AttentionMetadata, device: torch.device) -> Optional[PackedPrefills]:
    """Pack ``meta.prefills`` into tensors on ``device`` (None without prefill chunks)."""
    return pack_spans(
        [
            ChunkSpan(c.query_start, c.query_len, c.context_len, c.block_table.tolist())
            for c in meta.prefills
        ],
        device,
    )


@dataclass
class RowContexts:
    """Each query row of a step seen as one decode query over its own context: the row at
    position p of its sequence reads tokens [0, p] through its sequence's block table. A
    prefill chunk of 3 rows after 5 cached tokens becomes 3 rows of seq_lens 6, 7, 8::

        cached: [t0 .. t4] | chunk: [t5 t6 t7]   ->   t5: [0, 6)  t6: [0, 7)  t7: [0, 8)
    """

    block_tables: torch.Tensor  # (T, W) int64, padded with block 0
    seq_lens: torch.Tensor  # (T,) int64: the row's position + 1


def row_contexts(meta: AttentionMetadata) -> RowContexts:
    """The decode rows as they are, then each prefill chunk's rows with their own lengths."""
    device = meta.decode_block_tables.device  # the step's (CUDA's rows are built there)
    tables = [meta.decode_block_tables.to(torch.int64)]
    lens = [meta.decode_seq_lens.to(torch.int64)]
    for c in meta.prefills:
        first = c.context_len - c.query_len + 1
        lens.append(torch.arange(first, c.context_len + 1, dtype=torch.int64, device=device))
        tables.append(c.block_table.to(device, torch.int64).expand(c.query_len, -1))
    width = max(int(t.shape[1]) for t in tables)
    padded = [torch.nn.functional.pad(t, (0, width - int(t.shape[1]))) for t in tables]
    return RowContexts(torch.cat(padded).contiguous(), torch.cat(lens).contiguous())

"""CUDA graphs for decode-only steps: one graph per padded batch size, captured at start-up.

A decode step launches a few hundred small kernels (28 layers x norms, projections, RoPE,
attention) whose launch cost, not their work, bounds a small batch. A CUDA graph replays the
whole forward as one launch. Graphs have fixed shapes and addresses, so each batch size of a
ladder (1, 2, 4, 8, 16, 32, ... up to max_num_seqs) gets its own static input buffers; a step of
B decodes runs the smallest graph of at least B rows, the extra rows padded so that they are
harmless:

    rows          [ r0 r1 r2 | pad ]     B = 3 real rows run in the graph of 4
    slot_mapping  [ s0 s1 s2 |  -1 ]     -1: the KV write skips the row
    seq_lens      [ l0 l1 l2 |   1 ]     a pad row attends to one (finite) cached token
    input_ids     [ t0 t1 t2 |   0 ]

Invariant: a replay computes exactly what the eager forward computes for the real rows (the
flash-decoding split count is fixed per graph, and the decode kernel's partition adapts to each
sequence's length inside the kernel, so the result does not depend on the capture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pagoda.attention.metadata import AttentionMetadata
from pagoda.models.base import CausalLM
from pagoda.utils import cdiv
from pagoda.worker.host_buffer import pack_ints

logger = logging.getLogger(__name__)

PAD_SLOT = -1  # the KV-cache write skips rows with a negative slot
PAD_SEQ_LEN = 1  # a padded row attends to one token (block 0, offset 0)
HEAD_ROWS = 4  # input_ids, positions, slot_mapping, seq_lens


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 ... up to max_num_seqs (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    head: torch.Tensor  # (4, B) int64: input_ids, positions, slot_mapping, seq_lens
    block_tables: torch.Tensor  # (B, W) int64
    hidden: torch.Tensor  # (B, E), the forward's output (in the graphs' memory pool)


class DecodeGraphs:
    """Captures the model forward for decode-only batches and replays it."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.device = block_size, device
        self.max_model_len = max_model_len
        self.max_blocks = cdiv(max_model_len, block_size)
        self.sizes = batch_size_ladder(max_num_seqs)
        self.graphs: dict[int, _Graph] = {}

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def padded_size(self, batch: int) -> Optional[int]:
        """The smallest captured size >= batch (None if the batch is too large)."""
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so the smaller graphs reuse the first one's memory pool."""
        pool: Optional[torch.cuda._POOL_HANDLE] = None
        for size in reversed(self.sizes):
            self.graphs[size] = self._capture_one(size, pool)
            pool = self.graphs[size].graph.pool()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("captured %d CUDA graphs for decode batches %s", len(self.sizes), self.sizes)

    def _metadata(self, head: torch.Tensor, block_tables: torch.Tensor) -> AttentionMetadata:
        from pagoda.attention.triton_attention import default_num_splits

        batch = head.shape[1]
        splits = default_num_splits(
            batch, self.model.arch.num_kv_heads, self.max_model_len, self.device
        )
        return AttentionMetadata(
            slot_mapping=head[2],
            num_decode_tokens=batch,
            decode_block_tables=block_tables,
            decode_seq_lens=head[3],
            decode_max_seq_len=self.max_model_len,
            prefills=[],
            block_size=self.block_size,
            packed_prefills=None,
            decode_num_splits=splits,
        )

    def _static_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph's input buffers, (4, B) and (B, W), holding a harmless all-pad batch."""
        head = torch.zeros((HEAD_ROWS, size), dtype=torch.int64, device=self.device)
        head[2].fill_(PAD_SLOT)  # warm-up and capture write nothing to the KV cache
        head[3].fill_(PAD_SEQ_LEN)
        block_tables = torch.zeros((size, self.max_blocks), dtype=torch.int64, device=self.device)
        return head, block_tables

    def _capture_one(self, size: int, pool: Optional[torch.cuda._POOL_HANDLE]) -> _Graph:
        head, block_tables = self._static_inputs(size)
        meta = self._metadata(head, block_tables)
        # Warm-up: compiles the Triton kernels for these shapes outside the capture.
        self.model(head[0], head[1], self.kv_caches, meta)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self.model(head[0], head[1], self.kv_caches, meta)  # (B, E)
        return _Graph(graph, head, block_tables, hidden)

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        fill: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """Replay the graph for these B decode rows; returns their hidden states (B, E), a view
        of the graph's output (valid until the next replay). ``fill`` may write input ids
        on the device into the graph's input buffer (B_pad,) before the replay."""
        batch = len(input_ids)
        size = self.padded_size(batch)
        assert size is not None, f"no CUDA graph for a batch of {batch}"
        g = self.graphs[size]
        pad = size - batch
        width = max(len(t) for t in block_tables)
        buf, sizes = pack_ints(
            [
                input_ids + [0] * pad,
                positions + [0] * pad,
                slots + [PAD_SLOT] * pad,
                seq_lens + [PAD_SEQ_LEN] * pad,
                (block_tables, width),
            ],
            pin=self.device.type == "cuda",
        )
        head = sum(sizes[:HEAD_ROWS])
        g.head.copy_(buf[:head].view(HEAD_ROWS, size), non_blocking=True)  # (4, B_pad)
        # Columns past w keep stale (valid) block ids: no row reads past its seq_len.
        g.block_tables[:batch, :width].copy_(buf[head:].view(batch, width), non_blocking=True)
        if fill is not None:
            fill(g.head[0])
        g.graph.replay()
        return g.hidden[:batch]

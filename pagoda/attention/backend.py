"""Which paged-attention implementation (PagedAttention, Kwon et al., SOSP'23) a layer runs.

- CUDA: the Triton kernels (``triton_attention.py``: FlashAttention-2 style prefill,
  Flash-Decoding decode, slot-mapping write), when triton imports.
- CPU, or CUDA without triton: the PyTorch reference (``torch_ref.py``), whose decode rows go
  to the C++ kernel (``cpu_decode.py``) on CPU. Unchanged by this switch.
- ``PAGODA_ATTENTION=torch`` forces the reference everywhere.

Every backend keeps the reference's invariant: new K/V are written at ``slot_mapping`` first,
then each query sees exactly its own sequence's tokens ``[0, context_len)``.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from pagoda.attention import torch_ref
from pagoda.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

ATTENTION_BACKEND_ENV = torch_ref.ATTENTION_BACKEND_ENV   # "torch": the reference everywhere


@dataclass
class PackedPrefills:
    """A step's prefill chunks as one set of tensors (the Triton prefill kernel's input).

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
    """What the CUDA model runner builds: the reference's metadata plus the packed prefills
    (built on the host with the rest, so no per-layer packing) and, in a CUDA graph, the fixed
    flash-decoding split count the graph was captured with."""
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


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the Triton kernels import (triton installed, a backend for it)."""
    try:
        from pagoda.attention import triton_attention  # noqa: F401
    except Exception as e:  # ImportError, or a triton that cannot find its backend
        logger.warning("Triton attention unavailable, CUDA uses the PyTorch reference: %s", e)
        return False
    return True


def use_triton(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get(ATTENTION_BACKEND_ENV) == "torch":
        return False
    return triton_available()


def backend_name(device: torch.device) -> str:
    """For logs and benchmark reports."""
    if use_triton(device):
        return "triton"
    if torch_ref.use_cpu_decode_kernel(device):
        return "torch+cpp-decode"
    return "torch"


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (T, H, D); k, v: (T, Hkv, D); kv_cache: (2, num_blocks, block_size, Hkv, D).
    Returns (T, H, D)."""
    if q.is_cuda and use_triton(q.device):
        from pagoda.attention import triton_attention

        packed = getattr(meta, "packed_prefills", None)
        splits = getattr(meta, "decode_num_splits", None)
        return triton_attention.paged_attention(q, k, v, kv_cache, meta, scale, packed, splits)
    return torch_ref.paged_attention(q, k, v, kv_cache, meta, scale)

"""Which paged-attention implementation (PagedAttention, Kwon et al., SOSP'23) a layer runs.

- CUDA: the Triton kernels (``triton_attention.py``: FlashAttention-2 style prefill,
  Flash-Decoding decode, slot-mapping write), when triton imports.
- CPU: the C++ kernels (``cpu_attention.py``: KV write, decode kernel, and the AMX kernel for
  bf16 prefill chunks where the CPU has AMX), when the extension builds.
- Otherwise (CUDA without triton, CPU without a compiler): the PyTorch reference
  (``torch_ref.py``).
- ``PAGODA_ATTENTION=torch`` forces the reference everywhere.

Every backend keeps the reference's invariant: new K/V are written at ``slot_mapping`` first,
then each query sees exactly its own sequence's tokens ``[0, context_len)``.

A KV cache in a narrower dtype than the model's (``--kv-cache-dtype bfloat16`` with fp32
weights, CPU only) runs the layer's attention in the cache's dtype: q, k and v are rounded to
it, and the output is widened back. Decode then reads half the bytes per cached token. An fp8
cache (``--kv-cache-dtype fp8``, e4m3, CPU and CUDA) stores only K and V rounded; the queries and
the arithmetic keep the model's dtype, and decode reads one byte per value.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from pagoda.attention import cpu_attention, torch_ref
from pagoda.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

ATTENTION_BACKEND_ENV = cpu_attention.ATTENTION_BACKEND_ENV  # "torch": the reference everywhere


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
    if cpu_attention.use_cpu_kernels(device):
        return cpu_attention.backend_name()
    return "torch"


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (T, H, D); k, v: (T, Hkv, D); kv_cache: (2, num_blocks, block_size, Hkv, D).
    Returns (T, H, D)."""
    if kv_cache.dtype != q.dtype and kv_cache.dtype != torch_ref.FP8:
        narrow = kv_cache.dtype
        return paged_attention(q.to(narrow), k.to(narrow), v.to(narrow), kv_cache, meta,
                               scale).to(q.dtype)
    if q.is_cuda and use_triton(q.device):
        from pagoda.attention import triton_attention

        packed = getattr(meta, "packed_prefills", None)
        splits = getattr(meta, "decode_num_splits", None)
        return triton_attention.paged_attention(q, k, v, kv_cache, meta, scale, packed, splits)
    if cpu_attention.use_cpu_kernels(q.device):
        return cpu_attention.paged_attention(q, k, v, kv_cache, meta, scale)
    return torch_ref.paged_attention(q, k, v, kv_cache, meta, scale)

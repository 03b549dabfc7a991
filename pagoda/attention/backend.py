"""Which paged-attention implementation (PagedAttention, Kwon et al., SOSP'23) a layer runs.

- CUDA: the Triton kernels (``triton_attention.py``: FlashAttention-2 style prefill,
  Flash-Decoding decode, slot-mapping write), when triton imports.
- CPU: the C++ kernels (``cpu_attention.py``: KV write, decode kernel, and the AMX kernel for
  bf16 prefill chunks where the CPU has AMX), when the extension builds.
- Otherwise (CUDA without triton, CPU without a compiler): the PyTorch reference
  (``torch_ref.py``).
- ``PAGODA_ATTENTION=torch`` forces the reference everywhere.

The choice is made once per model, when it is built (:func:`select`, which reads the switches
``PAGODA_ATTENTION`` and ``PAGODA_AMX``), and bound to its layers: a layer's forward calls
the chosen :class:`AttentionBackend` without asking again.

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
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from pagoda import envs
from pagoda.attention import cpu_attention, torch_ref
from pagoda.attention.metadata import AttentionMetadata
from pagoda.kernels.ext import available as ext_available

logger = logging.getLogger(__name__)

ATTENTION_BACKEND_ENV = cpu_attention.ATTENTION_BACKEND_ENV  # "torch": the reference everywhere


class AttentionFn(Protocol):
    """(q, k, v, kv_cache, meta, scale) -> (T, H, D); q: (T, H, D), k, v: (T, Hkv, D),
    kv_cache: (2, num_blocks, block_size, Hkv, D). ``window`` > 0: a query at position p sees
    keys (p - window, p] only (sliding-window layers); ``softcap`` > 0: each scaled score s
    becomes softcap * tanh(s / softcap) before the softmax."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        *,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class AttentionBackend:
    """One layer's paged attention as chosen for a model."""

    name: str  # for logs and benchmark reports
    forward: AttentionFn
    uses_packed_prefills: bool = False  # reads ``meta.packed(...)`` (the runner packs them)


TORCH = AttentionBackend("torch", torch_ref.paged_attention)


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
    if device.type != "cuda" or envs.ATTENTION_REFERENCE():
        return False
    return triton_available()


def backend_name(device: torch.device) -> str:
    """For logs and benchmark reports."""
    if use_triton(device):
        return "triton"
    if cpu_attention.use_cpu_kernels(device):
        return cpu_attention.backend_name()
    return "torch"


def triton_backend() -> AttentionBackend:
    """The Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1)."""
    from pagoda.attention import triton_attention

    return AttentionBackend("triton", triton_attention.paged_attention, True)


def cpu_backend(prefill: str) -> AttentionBackend:
    """The C++ kernels, prefill chunks on the tile kernel (AMX or AVX512-BF16) or on the
    reference's SDPA (``cpu_attention.prefill_kernel``)."""
    forward = functools.partial(cpu_attention.attend, prefill=prefill)
    return AttentionBackend(cpu_attention.backend_name(prefill), forward, prefill != "sdpa")


def invariant_backend(device: torch.device) -> AttentionBackend:
    """The batch-invariant attention (``--deterministic``): the Triton kernels' where
    :func:`use_triton`, else the C++ CPU kernel's."""
    if use_triton(device):
        from pagoda.attention import triton_attention

        return AttentionBackend("triton-invariant", triton_attention.paged_attention_invariant)
    if device.type != "cpu" or not ext_available():
        raise RuntimeError(
            "--deterministic needs the C++ CPU kernels (pagoda/kernels: a C++ compiler)"
        )
    return AttentionBackend("cpp-invariant", cpu_attention.attend_invariant)


def select(
    device: torch.device,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    head_dim: int,
    deterministic: bool = False,
) -> AttentionBackend:
    """The backend for q, k, v of ``dtype`` (the model's) over a cache of ``kv_dtype``. Reads
    the switches now: call once, when the model is built. ``deterministic``: every row on
    a decode kernel with a fixed split of the keys (:func:`invariant_backend`: Triton's on
    CUDA, else the C++ one; raises RuntimeError on a CPU where the extension is not built)."""
    if kv_dtype != dtype and kv_dtype != torch_ref.FP8:
        inner = select(device, kv_dtype, kv_dtype, head_dim, deterministic)
        return in_cache_dtype(inner, kv_dtype)
    if deterministic:
        return invariant_backend(device)
    if use_triton(device):
        return triton_backend()
    if cpu_attention.use_cpu_kernels(device):
        return cpu_backend(cpu_attention.prefill_kernel(device, dtype, kv_dtype, head_dim))
    return TORCH


def in_cache_dtype(inner: AttentionBackend, narrow: torch.dtype) -> AttentionBackend:
    """``inner`` over a cache of a narrower float: q, k and v rounded to it, the output
    widened back to q's dtype."""
    forward = inner.forward

    def narrowed(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        *,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        o = forward(
            q.to(narrow),
            k.to(narrow),
            v.to(narrow),
            kv_cache,
            meta,
            scale,
            window=window,
            softcap=softcap,
        )
        return o.to(q.dtype)

    return replace(inner, forward=narrowed)

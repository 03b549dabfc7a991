"""Paged attention on the CPU with the C++ kernels (PagedAttention, Kwon et al., SOSP'23).

One layer's attention over a mixed batch, in three calls into the C++ extension
(``kernels/ext.py`` builds it; the decode call goes through ``cpu_decode.py``):

1. the KV write: each new token's K/V row copied to its ``slot_mapping`` slot
   (``kernels/csrc/kv_write.cpp``; rounded to e4m3 for an fp8 cache), for the whole batch before any
   row attends;
2. decode rows: the flash-decoding kernel (``kernels/csrc/paged_decode.cpp``), which streams each
   sequence's K/V rows once for all query heads of a KV head;
3. prefill chunks: on CPUs with AMX and bf16 activations, one call of the AMX kernel
   (``kernels/csrc/amx_attention.cpp``: FlashAttention-style, the two products on the tile unit) for
   every chunk of the step, reading the context through the block tables (an fp8 cache is
   widened to bf16 as it is read, a fresh chunk's own K/V included); elsewhere the PyTorch
   reference (fused SDPA per chunk; with a window, it gathers no block wholly before it).

Under ``--deterministic`` (:func:`attend_invariant`) every query row, decode or prefill, goes to
the decode kernel as a sequence of its own (``metadata.RowContexts``), its keys split every
``KEY_SPLIT`` tokens and the parts merged in order: a row's arithmetic is then fixed by its own
context, whatever its batch, its chunk's boundaries, or whether its keys were cached before this
step or written in it (batch-invariance; docs/deterministic.md).

Invariant (the reference's, ``torch_ref.py``): new K/V are written first, then a query at
position ``p`` of a sequence sees exactly that sequence's tokens ``[0, p]``, or with a sliding
``window`` W > 0 (Mistral, Gemma 2/3's local layers) only ``(p - W, p]``; both kernels skip the
blocks wholly before a window without reading them (their block-table entries may name a null
block) and mask the rest. With ``softcap`` c > 0 (Gemma 2), each scaled score s becomes
``c * tanh(s / c)`` (in fp32) before the softmax. 0 turns either off.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from pagoda import envs
from pagoda.attention import cpu_decode, torch_ref
from pagoda.attention.metadata import AttentionMetadata
from pagoda.kernels import ext

# "torch" forces the pure-PyTorch reference even where the C++ kernels are available.
ATTENTION_BACKEND_ENV = envs.ATTENTION_REFERENCE.name
# "0" keeps prefill chunks on the PyTorch reference even where the AMX kernel could run.
AMX_ENV = envs.AMX.name
# "0" keeps them on the reference where AMX does not take them (no AVX512-BF16 kernel).
BF16_ATTENTION_ENV = envs.BF16_ATTENTION.name
AMX_HEAD_DIM_MULTIPLE = 32  # a tile row holds 32 bf16 dims
AMX_MAX_HEAD_DIM = 256
PREFILL_NAMES = {"amx": "amx-prefill", "avx512": "avx512bf16-prefill", "sdpa": "sdpa"}
KEY_SPLIT = 256  # --deterministic: keys per part of a row's softmax (a multiple of 64)


def use_cpu_kernels(device: torch.device) -> bool:
    """True on CPU when the extension is built (and the reference is not forced)."""
    if device.type != "cpu" or envs.ATTENTION_REFERENCE():
        return False
    return ext.available()


@functools.lru_cache(maxsize=None)
def _amx_supported() -> bool:
    mod = ext.extension()
    return mod is not None and bool(mod.amx_available())


def _amx_enabled() -> bool:
    """The CPU and OS allow AMX, the build has the kernel, and PAGODA_AMX does not refuse it."""
    return envs.AMX() and _amx_supported()


def use_amx(
    device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None, amx: bool = True
) -> bool:
    """True when prefill chunks of this device, dtype (and head dim, if given) go to the AMX
    kernel: bf16, head dims that are multiples of 32 up to 256. ``amx`` False: whether they
    could go to the tile kernel at all (its AVX512-BF16 form, AMX aside)."""
    if head_dim is not None and (head_dim % AMX_HEAD_DIM_MULTIPLE or head_dim > AMX_MAX_HEAD_DIM):
        return False
    if dtype != torch.bfloat16 or not use_cpu_kernels(device):
        return False
    return _amx_enabled() if amx else True


@functools.lru_cache(maxsize=None)
def _bf16_kernel_supported() -> bool:
    mod = ext.extension()
    return mod is not None and bool(mod.bf16_attention_available())


def prefill_kernel(
    device: torch.device,
    q_dtype: torch.dtype,
    kv_dtype: torch.dtype,
    head_dim: Optional[int] = None,
) -> str:
    """Where prefill chunks with queries of ``q_dtype`` over a cache of ``kv_dtype`` go:
    "amx" (the tile kernel on AMX), "avx512" (the same kernel's products on AVX512-BF16),
    both for bf16 queries over a bf16 or fp8 (e4m3) cache, or "sdpa" (the reference)."""
    if kv_dtype not in (q_dtype, torch_ref.FP8):
        return "sdpa"
    if use_amx(device, q_dtype, head_dim):
        return "amx"
    if use_amx(device, q_dtype, head_dim, amx=False) and envs.BF16_ATTENTION():
        return "avx512" if _bf16_kernel_supported() else "sdpa"
    return "sdpa"


def backend_name(prefill: Optional[str] = None) -> str:
    """For logs and benchmark reports: where prefill chunks go (None: where the CPU and the
    switches send bf16 chunks of head dim 64)."""
    if prefill is None:
        prefill = prefill_kernel(torch.device("cpu"), torch.bfloat16, torch.bfloat16, 64)
    return f"cpp-decode+{PREFILL_NAMES[prefill]}"


def paged_attention(
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
    """q: (T, H, D); k, v: (T, Hkv, D); kv_cache: (2, num_blocks, block_size, Hkv, D).
    Returns (T, H, D). Prefill chunks go where :func:`prefill_kernel` says, asked now (a
    model asks once and binds :func:`attend`: ``backend.select``)."""
    prefill = prefill_kernel(q.device, q.dtype, kv_cache.dtype, q.shape[-1])
    return attend(q, k, v, kv_cache, meta, scale, prefill=prefill, window=window, softcap=softcap)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    prefill: str,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """:func:`paged_attention` with the prefill path chosen: "amx" or "avx512", the tile
    kernel over the packed chunks (``meta.packed``), "sdpa" the reference's SDPA per chunk."""
    if window < 0 or not softcap >= 0.0 or math.isinf(softcap):
        raise ValueError(
            f"window must be >= 0 and softcap a finite number >= 0 (0: off); "
            f"got window={window}, softcap={softcap}"
        )
    kernels = ext.require_extension()
    kernels.write_kv(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    d = meta.num_decode_tokens
    if d:
        cpu_decode.paged_decode_attention(
            q[:d],
            kv_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            scale,
            out=out[:d],
            window=window,
            softcap=softcap,
        )
    if not meta.prefills:
        return out
    if prefill != "sdpa":
        packed = meta.packed(q.device)
        assert packed is not None  # there are prefill chunks
        first = meta.prefills[0].query_start
        kernels.amx_paged_attention(
            out[first:],
            q[first:],
            kv_cache,
            packed.query_start_loc,
            packed.context_lens,
            packed.block_tables,
            float(scale),
            int(window),
            float(softcap),
            prefill == "amx",
        )
    else:  # the reference skips the blocks wholly before each chunk's window itself
        torch_ref.prefill_chunks(
            q, k, v, kv_cache, meta, scale, out, window=window, softcap=softcap
        )
    return out


def attend_invariant(
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
    """:func:`paged_attention`, batch-invariant: the KV write, then one decode-kernel call in
    which every row (decodes and prefill chunks alike) reads its own context from the cache
    with the fixed ``KEY_SPLIT``. q: (T, H, D) -> (T, H, D)."""
    ext.require_extension().write_kv(kv_cache, k, v, meta.slot_mapping)
    rows = meta.rows()
    return cpu_decode.paged_decode_attention(
        q,
        kv_cache,
        rows.block_tables,
        rows.seq_lens,
        scale,
        window=window,
        softcap=softcap,
        key_split=KEY_SPLIT,
    )

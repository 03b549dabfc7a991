"""Paged attention in plain PyTorch (PagedAttention, Kwon et al., SOSP'23): the reference
backend, correct on CPU and CUDA.

K/V are read only through block tables. Invariant: before attending, each new token's K/V is
written to ``slot_mapping``, so a query sees exactly the tokens ``[0, context_len)`` of its
own sequence and nothing from padding or other requests.

An fp8 cache (``torch.float8_e4m3fn``, ``--kv-cache-dtype fp8``) stores K/V rounded to e4m3
(saturating at +-448, no scale); what is read from it is widened to the queries' dtype. A
prefill chunk with nothing cached before it attends over its own K/V as computed (unrounded);
the AMX kernel reads even those back from the cache, rounded.

Two per-layer options (Gemma 2/3, Mistral): a sliding ``window`` W > 0 lets the query at
position p see only keys (p - W, p]; a ``softcap`` c > 0 bends each scaled score s to
c * tanh(s / c) before the softmax. Both default to off (0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.attention.metadata import AttentionMetadata
from pagoda.utils import cdiv

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: fp8 rounds to nearest even, saturating at +-448."""
    if dtype == FP8:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x.to(dtype)


def write_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new K/V. kv_cache: (2, num_blocks, block_size, Hkv, D); k, v: (T, Hkv, D)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k, v = to_cache_dtype(k, kv_cache.dtype), to_cache_dtype(v, kv_cache.dtype)
    if kv_cache.dtype == FP8:  # index_copy_ has no fp8 kernel: copy the bytes
        kv_cache, k, v = kv_cache.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


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
    """q: (T, H, D); k, v: (T, Hkv, D). Returns (T, H, D)."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    d = meta.num_decode_tokens
    if d:
        out[:d] = decode_attention(
            q[:d],
            kv_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            meta.decode_max_seq_len,
            scale,
            window=window,
            softcap=softcap,
        )
    prefill_chunks(q, k, v, kv_cache, meta, scale, out, window=window, softcap=softcap)
    return out


def prefill_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    *,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    """Attention of each prefill chunk (K/V already written) into its rows of ``out``."""
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        if chunk.context_len == chunk.query_len:
            # Nothing cached before this chunk: its own K/V is the whole context.
            out[rows] = causal_attention(q[rows], k[rows], v[rows], scale, window, softcap)
        else:
            out[rows] = prefill_attention(
                q[rows], kv_cache, chunk.block_table, chunk.context_len, scale, window, softcap
            )


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache: (num_blocks, bs, Hkv, D); block_table: (..., nb) -> (..., nb * bs, Hkv, D)."""
    blocks = cache[block_table]  # (..., nb, bs, Hkv, D)
    return blocks.flatten(-4, -3)  # (..., nb * bs, Hkv, D)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """A query chunk after ``context_len - Q`` cached tokens. q: (Q, H, D) -> (Q, H, D).
    With a window, the blocks wholly before the first query's window are not gathered (the
    mask depends on positions relative to the last key, so it is unchanged)."""
    if window:
        block_size = kv_cache.shape[2]
        skip = max(0, context_len - q.shape[0] - window + 1) // block_size
        block_table, context_len = block_table[skip:], context_len - skip * block_size
    k = _gather_context(kv_cache[0], block_table)[:context_len]  # (C, Hkv, D)
    v = _gather_context(kv_cache[1], block_table)[:context_len]
    return causal_attention(q, k.to(q.dtype), v.to(q.dtype), scale, window, softcap)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q: (Q, H, D); k, v: (C, Hkv, D) with C >= Q; query i sits at position C - Q + i."""
    if softcap:
        return _masked_attention(q, k, v, scale, window, softcap)
    query_len, context_len = q.shape[0], k.shape[0]
    # 4-D inputs take PyTorch's fused (flash) kernel, which serves each KV head's group of
    # query heads itself (enable_gqa): no repeated copy of K/V. (The 3-D form of enable_gqa
    # falls back to a path several times slower on CPU.)
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
    kh = k.transpose(0, 1).unsqueeze(0)  # (1, Hkv, C, D)
    vh = v.transpose(0, 1).unsqueeze(0)
    if query_len == context_len and not window:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = _visible(query_len, context_len, window, q.device)  # (Q, C)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)  # (Q, H, D)


def _masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    """:func:`causal_attention` with a sliding window and/or soft-capped scores, in plain
    matmuls (SDPA has no soft-cap): each KV head's group of query heads at once."""
    query_len, context_len = q.shape[0], k.shape[0]
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    qg = q.reshape(query_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("qhgd,khd->hgqk", qg.float(), k.float()) * scale  # (Hkv, G, Q, C)
    scores = _soft_cap(scores, softcap)
    scores.masked_fill_(~_visible(query_len, context_len, window, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float())
    return out.reshape(query_len, num_heads, head_dim).to(q.dtype)


def _visible(query_len: int, context_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(Q, C) bool: query i (at position C - Q + i) sees key j: j <= its position, and within
    the window when there is one."""
    q_pos = torch.arange(context_len - query_len, context_len, device=device)
    k_pos = torch.arange(context_len, device=device)
    visible = k_pos[None, :] <= q_pos[:, None]
    if window:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    return visible


def _soft_cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """c * tanh(s / c) (Gemma 2's attention logit soft-capping); s unchanged when c is 0."""
    return torch.tanh(scores / softcap) * softcap if softcap else scores


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    *,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """One query per sequence, all sequences in one batched matmul. q: (B, H, D);
    block_tables: (B, W); seq_lens: (B,) context lengths including the new token."""
    batch, num_heads, head_dim = q.shape
    block_size = kv_cache.shape[2]
    tables = block_tables[:, : cdiv(max_seq_len, block_size)]
    k = _gather_context(kv_cache[0], tables).to(q.dtype)  # (B, L, Hkv, D)
    v = _gather_context(kv_cache[1], tables).to(q.dtype)
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    qg = q.view(batch, num_kv_heads, group, head_dim)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float()  # (B, Hkv, G, L)
    scores = _soft_cap(scores.mul_(scale), softcap)
    positions = torch.arange(k.shape[1], device=q.device)
    pad = positions[None, :] >= seq_lens[:, None]  # (B, L)
    if window:
        pad |= positions[None, :] < seq_lens[:, None] - window
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # (B, Hkv, G, D)
    return out.reshape(batch, num_heads, head_dim)

"""Sliding-window and soft-capped paged attention (Gemma 2/3, Mistral) in every backend, against
an fp64 dense reference.

The contract (``backend.AttentionFn``): with ``window`` W > 0 the query at position p sees
exactly keys (p - W, p] of its own sequence; with ``softcap`` c > 0 each scaled score s becomes
c * tanh(s / c) before the softmax. A mixed batch: decodes with contexts shorter and longer
than W, a fresh prompt longer than W, chunks after cached context, with random non-contiguous
block tables and every unused cache slot poisoned, so a read outside the window or outside
the sequence shows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from pagoda.attention import cpu_attention, torch_ref
from pagoda.attention.metadata import AttentionMetadata, PrefillChunk

from kv_poison import poison_unused
from native import needs_ext

pytestmark = pytest.mark.usefixtures("random_seed")

BF16 = torch.bfloat16


@dataclass
class Case:
    q: torch.Tensor  # (T, H, D)
    k: torch.Tensor  # (T, Hkv, D): the step's new K/V
    v: torch.Tensor
    cache: torch.Tensor  # (2, NB, BS, Hkv, D), the context before this step, poisoned elsewhere
    meta: AttentionMetadata
    seqs: list[tuple[int, int]]  # (query_len, context_len) per sequence, decodes first
    tables: list[list[int]]


def make_case(
    seqs: list[tuple[int, int]], num_decodes: int, heads: int, kv_heads: int, dim: int,
    block_size: int, dtype: torch.dtype, poison: bool = True,
) -> Case:
    """seqs: (query_len, context_len), the first ``num_decodes`` with query_len 1. ``poison``:
    NaN / huge values in every slot no context owns (else zeros: the reference backend reads
    padding and masks it, which NaN would survive)."""
    per_seq = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = 1 + sum(per_seq) + 2
    ids = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables = [[ids.pop() for _ in range(n)] for n in per_seq]
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    slots: list[int] = []
    for (qlen, ctx), table in zip(seqs, tables, strict=True):
        for p in range(ctx):
            used[table[p // block_size], p % block_size] = True
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - qlen, ctx)]
    if poison:
        poison_unused(cache, used)
    else:
        cache[:, ~used] = 0.0
    t = len(slots)
    width = max(per_seq) + 1
    dec_tables = torch.zeros(num_decodes, width, dtype=torch.int64)
    for i in range(num_decodes):
        dec_tables[i, : len(tables[i])] = torch.tensor(tables[i])
    chunks, row = [], num_decodes
    for (qlen, ctx), table in list(zip(seqs, tables, strict=True))[num_decodes:]:
        chunks.append(PrefillChunk(row, qlen, ctx, torch.tensor(table)))
        row += qlen
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decode_tokens=num_decodes,
        decode_block_tables=dec_tables,
        decode_seq_lens=torch.tensor([ctx for _, ctx in seqs[:num_decodes]], dtype=torch.int64),
        decode_max_seq_len=max([ctx for _, ctx in seqs[:num_decodes]], default=0),
        prefills=chunks, block_size=block_size)
    return Case(
        q=torch.randn(t, heads, dim).to(dtype), k=torch.randn(t, kv_heads, dim).to(dtype),
        v=torch.randn(t, kv_heads, dim).to(dtype), cache=cache.to(dtype), meta=meta, seqs=seqs,
        tables=tables)


def dense_reference(case: Case, scale: float, window: int, softcap: float) -> torch.Tensor:
    """fp64: each sequence's whole K/V (cached context, then the step's new rows), each query
    over the keys its position may see."""
    cache = case.cache.double()
    heads, kv_heads = case.q.shape[1], case.k.shape[1]
    group = heads // kv_heads
    bs = cache.shape[2]
    out = torch.empty(case.q.shape, dtype=torch.float64)
    row = 0
    for (qlen, ctx), table in zip(case.seqs, case.tables, strict=True):
        pos = torch.arange(ctx)
        blocks = torch.tensor(table)[pos // bs]
        k = cache[0][blocks, pos % bs].clone()  # (C, Hkv, D)
        v = cache[1][blocks, pos % bs].clone()
        rows = slice(row, row + qlen)
        k[ctx - qlen :] = case.k[rows].double()
        v[ctx - qlen :] = case.v[rows].double()
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", case.q[rows].double(), k) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        q_pos = torch.arange(ctx - qlen, ctx)
        hidden = pos[None, :] > q_pos[:, None]
        if window:
            hidden |= pos[None, :] <= q_pos[:, None] - window
        s.masked_fill_(hidden, float("-inf"))
        out[rows] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
        row += qlen
    return out


def mixed_seqs(window: int, block_size: int) -> tuple[list[tuple[int, int]], int]:
    """Decodes shorter than, equal to and well past the window; a fresh prompt past it; chunks
    after cached context that start inside and past it; and one random chunk."""
    rnd = random.Random(int(torch.randint(0, 2**31, ()).item()))
    w = window or 40
    decodes = [(1, 1), (1, w - 1), (1, w), (1, w + 1), (1, 3 * w + block_size + 3)]
    ctx = rnd.randint(1, 4 * w)
    prefills = [(2 * w + 5, 2 * w + 5), (7, w + 3), (w + 9, 3 * w), (1, 2 * w),
                (rnd.randint(1, ctx), ctx)]
    return decodes + prefills, len(decodes)


WINDOWS_CAPS = [(0, 0.0), (32, 0.0), (0, 5.0), (37, 5.0), (1, 0.0)]
IDS = ["plain", "window", "softcap", "window+softcap", "window1"]


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "NaN/inf reached the output (a read outside the window?)"
    tol = 2e-2 if dtype == BF16 else 1e-4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("window, softcap", WINDOWS_CAPS, ids=IDS)
def test_reference_backend(window, softcap):
    seqs, d = mixed_seqs(window, 16)
    case = make_case(seqs, d, 8, 2, 32, 16, torch.float32, poison=False)
    out = torch_ref.paged_attention(case.q, case.k, case.v, case.cache.clone(), case.meta,
                                    32**-0.5, window=window, softcap=softcap)
    check(out, dense_reference(case, 32**-0.5, window, softcap), torch.float32)


@needs_ext
@pytest.mark.parametrize("window, softcap", WINDOWS_CAPS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_cpu_backend(window, softcap, dtype, amx):
    """The C++ decode kernel, and the AMX kernel (or the reference's prefill without it)."""
    seqs, d = mixed_seqs(window, 16)
    case = make_case(seqs, d, 8, 2, 64, 16, dtype)
    out = cpu_attention.attend(case.q, case.k, case.v, case.cache.clone(), case.meta, 0.125,
                               amx=amx and dtype == BF16, window=window, softcap=softcap)
    check(out, dense_reference(case, 0.125, window, softcap), dtype)


def test_softcap_bounds_the_scores():
    """With huge q.k products, capped scores stay within (-c, c): the output is a mix of
    several values, not the single argmax key an uncapped softmax would pick."""
    seqs = [(4, 4)]
    case = make_case(seqs, 0, 1, 1, 8, 16, torch.float32, poison=False)
    case.q.mul_(1e4)
    capped = torch_ref.paged_attention(case.q, case.k, case.v, case.cache.clone(), case.meta,
                                       1.0, softcap=1.0)
    plain = torch_ref.paged_attention(case.q, case.k, case.v, case.cache.clone(), case.meta, 1.0)
    ref = dense_reference(case, 1.0, 0, 1.0)
    check(capped, ref, torch.float32)
    assert not torch.allclose(capped, plain, atol=1e-3)

"""Tests of the C++ CPU paged decode attention kernel (PagedAttention, Kwon et al., SOSP'23,
with a flash-decoding style online softmax) against an fp64 reference on a gathered copy.

The invariant under test: a sequence's output depends only on the K/V rows of its tokens
``[0, seq_len)`` found through its block table. Every other cache slot (unused blocks, the
padding block 0 that block tables are padded with, the tail of each last block) holds NaN or
huge values, and the output buffer starts as NaN, so a stray read or a missed write shows.
Inputs are fresh random each run.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from pagoda.attention import cpu_decode  # noqa: E402
from pagoda.kernels import ext  # noqa: E402
from pagoda.attention.metadata import AttentionMetadata  # noqa: E402
from pagoda.attention.torch_ref import decode_attention  # noqa: E402

from kv_poison import poison_unused  # noqa: E402

from native import needs_ext  # noqa: E402

pytestmark = [needs_ext, pytest.mark.usefixtures("random_seed")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype, extra_blocks: int = 3
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q and cache; block ids are a random permutation of 1..N (block 0, the padding
    target, and the spare blocks belong to nobody). Unread slots hold NaN or huge values."""
    batch = len(seq_lens)
    per_seq = [-(-n // block_size) for n in seq_lens]
    width = max(per_seq) + 2
    num_blocks = 1 + sum(per_seq) + extra_blocks
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float32)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    ids = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables = torch.zeros(batch, width, dtype=torch.int64)
    for b, (n, nb) in enumerate(zip(seq_lens, per_seq)):
        for j in range(nb):
            blk = ids.pop()
            tables[b, j] = blk
            used[blk, :min(block_size, n - j * block_size)] = True
    poison_unused(kv, used)   # NaN / huge values in every slot outside all contexts
    kv = kv.to(dtype)
    q = torch.randn(batch, num_heads, head_dim).to(dtype)
    return q, kv, tables, torch.tensor(seq_lens, dtype=torch.int64)


def reference(q: torch.Tensor, kv: torch.Tensor, tables: torch.Tensor, seq_lens: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Plain fp64 attention over each sequence's gathered context (slots past a sequence's
    length are zeroed in the copy and masked out of the softmax)."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv.shape[2], kv.shape[3]
    group = num_heads // num_kv_heads
    pos = torch.arange(int(seq_lens.max()))
    valid = pos[None, :] < seq_lens[:, None]                                # (B, L)
    blocks = tables[:, pos // block_size]                                   # (B, L)
    k = kv[0][blocks, pos % block_size].double()                            # (B, L, Hkv, D)
    v = kv[1][blocks, pos % block_size].double()
    k = torch.where(valid[:, :, None, None], k, 0.0).permute(0, 2, 3, 1)    # (B, Hkv, D, L)
    v = torch.where(valid[:, :, None, None], v, 0.0).permute(0, 2, 1, 3)    # (B, Hkv, L, D)
    qg = q.double().view(batch, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k) * scale                                    # (B, Hkv, G, L)
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)                    # (B, Hkv, G, D)
    return out.reshape(batch, num_heads, head_dim)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN/inf reached the output (a stray read or no write)"
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"max abs error {err}"


def lens_for(block_size: int) -> list[int]:
    """Ragged: a single token, block multiples, non-multiples, a long context, random ones."""
    rand = torch.randint(2, 300, (2,)).tolist()
    return [1, block_size, 3 * block_size, 5 * block_size + 1 + int(torch.randint(0, 7, ())),
            1000 + int(torch.randint(0, 30, ())), *rand]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_matches_reference(block_size: int, group: int, head_dim: int,
                           dtype: torch.dtype) -> None:
    num_kv_heads = 2
    q, kv, tables, seq_lens = make_inputs(lens_for(block_size), group * num_kv_heads,
                                          num_kv_heads, head_dim, block_size, dtype)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full_like(q, float("nan"))
    got = cpu_decode.paged_decode_attention(q, kv, tables, seq_lens, scale, out=out)
    assert got is out
    check(out, reference(q, kv, tables, seq_lens, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_portable_path_and_odd_head_dim(head_dim: int, dtype: torch.dtype) -> None:
    """The auto-vectorised tile code (used without AVX-512, and for head dims the AVX-512 code
    does not cover) gives the same answers."""
    q, kv, tables, seq_lens = make_inputs(lens_for(16), 9, 3, head_dim, 16, dtype)
    scale = 1.0 / math.sqrt(head_dim)
    ref = reference(q, kv, tables, seq_lens, scale)
    for fn in ("paged_decode", "paged_decode_portable"):
        out = torch.full_like(q, float("nan"))
        cpu_decode._call(fn, q, kv, tables, seq_lens, scale, out)
        check(out, ref, dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_long_context_split_over_threads(threads: int) -> None:
    """Few (sequence, KV head) items and long contexts: chunks merged flash-decoding style."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens in ([6000], [4500, 7]):
            q, kv, tables, seq_lens = make_inputs(lens, 4, 1, 64, 16, torch.float32)
            out = cpu_decode.paged_decode_attention(q, kv, tables, seq_lens, 0.125)
            check(out, reference(q, kv, tables, seq_lens, 0.125), torch.float32)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_work_split(threads: int) -> None:
    """Whatever the split (all KV heads of a sequence per unit, one KV head per unit, contexts
    cut into chunks, which depends on batch size vs threads), both tile implementations agree
    with the reference."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens in ([5, 700, 33, 1, 64, 129, 250, 16, 90, 400, 3, 77, 31], [900, 1300],
                     [2500], [40, 3], [500, 600, 700, 800, 900]):
            for dtype in (torch.float32, torch.bfloat16):
                q, kv, tables, seq_lens = make_inputs(lens, 6, 2, 64, 16, dtype)
                ref = reference(q, kv, tables, seq_lens, 0.125)
                for fn in ("paged_decode", "paged_decode_portable"):
                    out = torch.full_like(q, float("nan"))
                    cpu_decode._call(fn, q, kv, tables, seq_lens, 0.125, out)
                    check(out, ref, dtype)
    finally:
        torch.set_num_threads(old)


def test_matches_torch_reference_backend() -> None:
    """Same answer as ``torch_ref.decode_attention`` on a clean (unpoisoned) bf16 cache."""
    lens = [17, 64, 300, 1]
    q, kv, tables, seq_lens = make_inputs(lens, 9, 3, 64, 16, torch.bfloat16)
    kv = torch.nan_to_num(kv.float(), nan=0.0, posinf=0.0).to(torch.bfloat16)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.int64),
                             num_decode_tokens=len(lens), decode_block_tables=tables,
                             decode_seq_lens=seq_lens, decode_max_seq_len=max(lens),
                             prefills=[], block_size=16)
    ref = decode_attention(q, kv, tables, seq_lens, max(lens), 0.125)
    out = cpu_decode.paged_decode_attention(q, kv, tables, seq_lens, 0.125)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out.float() - ref.float()).abs().max().item() < 2e-2


def test_strided_q_and_out_views() -> None:
    """q and out may be views with a contiguous head dim (e.g. slices of a fused buffer)."""
    q_big = torch.randn(5, 6, 2 * 64)
    q = q_big[..., 64:]                                   # (5, 6, 64), strides (768, 128, 1)
    _, kv, tables, seq_lens = make_inputs([3, 40, 100, 1, 77], 6, 2, 64, 16, torch.float32)
    out_big = torch.full((5, 6, 3 * 64), float("nan"))
    out = out_big[..., 64:128]
    cpu_decode.paged_decode_attention(q, kv, tables, seq_lens, 0.125, out=out)
    check(out, reference(q, kv, tables, seq_lens, 0.125), torch.float32)
    assert out_big[..., :64].isnan().all() and out_big[..., 128:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_cache_view(dtype: torch.dtype) -> None:
    """A cache view with gaps between heads and tokens (e.g. a slice of a wider buffer): the
    gaps hold NaN and are never read; int32 block tables are accepted too."""
    q, kv, tables, seq_lens = make_inputs([1, 16, 45, 300, 999], 8, 2, 64, 16, dtype)
    wide = torch.full((*kv.shape[:-1], 3 * 64), float("nan"), dtype=dtype)
    wide[..., 64:128] = kv
    view = wide[..., 64:128]                 # strides: head 192, token 384, ...
    ref = reference(q, kv, tables, seq_lens, 0.125)
    for fn in ("paged_decode", "paged_decode_portable"):
        out = torch.full_like(q, float("nan"))
        cpu_decode._call(fn, q, view, tables.to(torch.int32), seq_lens, 0.125, out)
        check(out, ref, dtype)


def test_empty_batch() -> None:
    q = torch.empty(0, 9, 64)
    kv = torch.zeros(2, 4, 16, 3, 64)
    out = cpu_decode.paged_decode_attention(q, kv, torch.zeros(0, 2, dtype=torch.int64),
                                            torch.zeros(0, dtype=torch.int64), 0.125)
    assert out.shape == (0, 9, 64)


@pytest.mark.parametrize("bad, match", [
    ("block_id", "block_tables"), ("too_long", "seq_lens"), ("zero_len", "seq_lens"),
    ("dtype", "dtype"), ("heads", "multiple"),
])
def test_bad_inputs_raise(bad: str, match: str) -> None:
    q, kv, tables, seq_lens = make_inputs([20, 5], 4, 2, 64, 16, torch.float32)
    if bad == "block_id":
        tables[0, 1] = kv.shape[1]
    elif bad == "too_long":
        seq_lens[1] = tables.shape[1] * 16 + 1
    elif bad == "zero_len":
        seq_lens[1] = 0
    elif bad == "dtype":
        q = q.to(torch.bfloat16)
    elif bad == "heads":
        q = torch.randn(2, 3, 64)
    with pytest.raises(RuntimeError, match=match):
        cpu_decode.paged_decode_attention(q, kv, tables, seq_lens, 0.125)


def test_build_info() -> None:
    info = ext.build_info()
    assert info["available"] is True and isinstance(info["isa"], str)
    assert ext.unavailable_reason() is None

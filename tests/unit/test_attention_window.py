"""Sliding-window and soft-capped paged attention (Gemma 2/3, Mistral) in every backend, against
an fp64 dense reference; and each C++ kernel on its own (decode, its portable variant, AMX)
with the block-table entries before a window pointing at a null block full of NaN, which they
must never read.

The contract (``backend.AttentionFn``): with ``window`` W > 0 the query at position p sees
exactly keys (p - W, p] of its own sequence; with ``softcap`` c > 0 each scaled score s becomes
c * tanh(s / c) before the softmax. A mixed batch: decodes with contexts shorter and longer
than W, a fresh prompt longer than W, chunks after cached context, with random non-contiguous
block tables and every unused cache slot poisoned, so a read outside the window or outside
the sequence shows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from pagoda.attention import cpu_attention, cpu_decode, torch_ref
from pagoda.kernels import ext
from pagoda.attention.metadata import AttentionMetadata, PrefillChunk

from kv_poison import poison_unused
from native import needs_amx, needs_ext

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
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(ctx - qlen, ctx)]
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
    n = max(w, 24)  # lengths well past a tiny window too
    decodes = [(1, 1), (1, max(1, w - 1)), (1, w), (1, w + 1), (1, 3 * n + block_size + 3)]
    ctx = rnd.randint(1, 4 * n)
    prefills = [(2 * n + 5, 2 * n + 5), (7, n + 3), (n + 9, 3 * n), (1, 2 * n),
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
                               prefill=prefill_path(dtype), window=window, softcap=softcap)
    check(out, dense_reference(case, 0.125, window, softcap), dtype)


def prefill_path(dtype: torch.dtype) -> str:
    """Where the switches (set by the ``amx`` fixture) send prefill chunks of this dtype."""
    return cpu_attention.prefill_kernel(torch.device("cpu"), dtype, dtype, 64)


def null_before_window(case: Case, window: int) -> None:
    """Point every table entry of a block wholly before the first query's window at block 0
    (owned by no sequence, so poisoned), as the engine will with a null block."""
    bs = case.cache.shape[2]
    for i, (_, ctx) in enumerate(case.seqs[: case.meta.num_decode_tokens]):
        case.meta.decode_block_tables[i, : max(0, ctx - window) // bs] = 0
    for chunk in case.meta.prefills:
        chunk.block_table[: max(0, chunk.context_len - chunk.query_len - window + 1) // bs] = 0


@needs_ext
@pytest.mark.parametrize("window, softcap", [(32, 0.0), (37, 5.0), (1, 0.0)],
                         ids=["window", "window+softcap", "window1"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_cpu_backend_never_reads_before_the_window(window, softcap, dtype, amx):
    """The whole CPU backend (decode kernel, then the AMX kernel or the reference prefill)
    with the table entries before each window naming a poisoned block: finite, right."""
    seqs, d = mixed_seqs(window, 16)
    case = make_case(seqs, d, 8, 2, 64, 16, dtype)
    null_before_window(case, window)
    out = cpu_attention.attend(case.q, case.k, case.v, case.cache.clone(), case.meta, 0.125,
                               prefill=prefill_path(dtype), window=window, softcap=softcap)
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


# ---------------------------------------------------------------------------------------------
# The kernels on their own: table entries of blocks wholly before the window name a null block
# (block 0) full of NaN, as the engine's will; the slots of the window's first block before
# it are poisoned too.


def first_key(pos: int, window: int) -> int:
    return max(0, pos - window + 1) if window else 0


def windowed_cache(
    seqs: list[tuple[int, int]], window: int, kv_heads: int, dim: int, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cache and block tables for (query_len, context_len) sequences: block 0 all NaN and
    the target of every entry before the first query's window; every slot outside the keys some
    query of its sequence sees ([first_key(first query), context_len)) poisoned."""
    per_seq = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = 1 + sum(per_seq) + 2
    ids = (torch.randperm(num_blocks - 1) + 1).tolist()
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    tables = torch.zeros(len(seqs), max(per_seq) + 1, dtype=torch.int64)
    for n, ((qlen, ctx), nb) in enumerate(zip(seqs, per_seq, strict=True)):
        start = first_key(ctx - qlen, window)
        for j in range(start // block_size, nb):
            tables[n, j] = ids.pop()
        for p in range(start, ctx):
            used[tables[n, p // block_size], p % block_size] = True
    poison_unused(cache, used)
    cache[:, 0] = float("nan")
    return cache, tables


def windowed_reference(
    q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, seqs: list[tuple[int, int]],
    scale: float, window: int, softcap: float,
) -> torch.Tensor:
    """fp64, gathering only the keys each sequence's queries may see."""
    heads, bs, kv_heads = q.shape[1], cache.shape[2], cache.shape[3]
    out = torch.empty(q.shape, dtype=torch.float64)
    row = 0
    for n, (qlen, ctx) in enumerate(seqs):
        pos = torch.arange(first_key(ctx - qlen, window), ctx)
        blocks = tables[n, pos // bs]
        k = cache[0][blocks, pos % bs].double().repeat_interleave(heads // kv_heads, 1)
        v = cache[1][blocks, pos % bs].double().repeat_interleave(heads // kv_heads, 1)
        rows = slice(row, row + qlen)
        s = torch.einsum("qhd,khd->hqk", q[rows].double(), k) * scale
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


def check_kernel(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(out).all(), "NaN/inf reached the output (a read before the window?)"
    err = (out.double() - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max abs error {err}"


# (query dtype, cache dtype, tolerance)
DECODE_DTYPES = {
    "fp32": (torch.float32, torch.float32, 1e-5),
    "bf16": (BF16, BF16, 1e-2),
    "fp16": (torch.float16, torch.float16, 2e-3),
    "fp8": (BF16, torch_ref.FP8, 1e-2),
}
KERNEL_CASES = [(37, 0.0), (1, 0.0), (16, 0.0), (0, 5.0), (53, 2.0)]
KERNEL_IDS = ["window37", "window1", "window16", "softcap", "window53+softcap"]


def decode_lens(window: int) -> list[int]:
    w = window or 40
    return [1, w, w + 1, 300 + int(torch.randint(0, 50, ())), 1000, 17]


def run_decode(fn: str, q, cache, tables, lens, scale, window, softcap) -> torch.Tensor:
    out = torch.full_like(q, float("nan"))
    got = cpu_decode._call(fn, q, cache, tables, torch.tensor(lens), scale, out, window, softcap)
    assert got is out
    return out


@needs_ext
@pytest.mark.parametrize("window, softcap", KERNEL_CASES, ids=KERNEL_IDS)
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("dtype", list(DECODE_DTYPES))
@pytest.mark.parametrize("fn", ["paged_decode", "paged_decode_portable"])
def test_decode_kernel_never_reads_before_the_window(fn, dtype, head_dim, window, softcap):
    """Both tile implementations (AVX-512 for head dims 64 and 128, the generic code for 96 and
    in the portable variant), every cache dtype, GQA 3: the right answer, nothing read from the
    null block. q is scaled up so that the soft cap changes the answer."""
    q_dtype, kv_dtype, tol = DECODE_DTYPES[dtype]
    lens = decode_lens(window)
    seqs = [(1, n) for n in lens]
    cache, tables = windowed_cache(seqs, window, 2, head_dim, 16)
    cache = cache.to(kv_dtype)
    q = (4 * torch.randn(len(lens), 6, head_dim)).to(q_dtype)
    scale = head_dim**-0.5
    out = run_decode(fn, q, cache, tables, lens, scale, window, softcap)
    ref = windowed_reference(q, cache, tables, seqs, scale, window, softcap)
    check_kernel(out, ref, tol)
    if softcap:  # the cap matters here: the uncapped answer is far off
        plain = windowed_reference(q, cache, tables, seqs, scale, window, 0.0)
        assert (plain - ref).abs().max() > 0.1


@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_window_split_over_threads(threads):
    """Windows long enough that the contexts are cut into chunks (which then start mid-block,
    at the window's start) and merged, for every thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens, window in (([6000], 2500), ([5000, 300], 2100), ([4500, 7, 2200], 2047)):
            seqs = [(1, n) for n in lens]
            cache, tables = windowed_cache(seqs, window, 2, 64, 16)
            q = torch.randn(len(lens), 4, 64)
            ref = windowed_reference(q, cache, tables, seqs, 0.125, window, 3.0)
            for fn in ("paged_decode", "paged_decode_portable"):
                out = run_decode(fn, q, cache, tables, lens, 0.125, window, 3.0)
                check_kernel(out, ref, 1e-5)
    finally:
        torch.set_num_threads(old)


@needs_amx
@pytest.mark.parametrize("window, softcap", KERNEL_CASES + [(64, 0.0), (300, 1.5)],
                         ids=KERNEL_IDS + ["window64", "window300+softcap"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_amx_kernel_never_reads_before_the_window(fp8, group, head_dim, window, softcap):
    """Whole prompts past the window, chunks after cached context starting inside and past it,
    single-token rows; units of 256 rows whose tiles start at different windows."""
    w = max(window, 24)
    ctx = int(torch.randint(1, 700, ()))
    seqs = [(300, 300), (7, w + 3), (150, 3 * w + 200), (1, 700), (1, 1), (2 * w, 2 * w),
            (int(torch.randint(1, ctx + 1, ())), ctx)]
    cache, tables = windowed_cache(seqs, window, 2, head_dim, 16)
    cache = cache.to(torch_ref.FP8 if fp8 else BF16)
    starts = torch.tensor([0] + [sum(q for q, _ in seqs[: i + 1]) for i in range(len(seqs))])
    q = (2 * torch.randn(int(starts[-1]), 2 * group, head_dim)).to(BF16)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    ext.require_extension().amx_paged_attention(
        out, q, cache, starts, torch.tensor([c for _, c in seqs]), tables, scale, window, softcap)
    check_kernel(out, windowed_reference(q, cache, tables, seqs, scale, window, softcap), 2e-2)


@needs_ext
def test_bad_options_raise():
    """A negative window, or a negative, NaN or infinite soft cap, is refused by every entry
    point, with a message that names it."""
    seqs = [(1, 40)]
    cache, tables = windowed_cache(seqs, 0, 1, 64, 16)
    q = torch.randn(1, 2, 64)
    lens = torch.tensor([40])
    bad = [(-1, 0.0, "window"), (0, -1.0, "softcap"), (0, math.nan, "softcap"),
           (0, math.inf, "softcap")]
    for window, softcap, name in bad:
        for fn in ("paged_decode", "paged_decode_portable"):
            with pytest.raises(RuntimeError, match=name):
                cpu_decode._call(fn, q, cache, tables, lens, 0.125, None, window, softcap)
        case = make_case([(1, 40), (3, 3)], 1, 2, 1, 64, 16, BF16, poison=False)
        with pytest.raises(ValueError, match="softcap"):
            cpu_attention.attend(case.q, case.k, case.v, case.cache, case.meta, 0.125,
                                 prefill="sdpa", window=window, softcap=softcap)
        mod = ext.require_extension()
        for tiles in [True] * mod.amx_available() + [False] * mod.bf16_attention_available():
            out = torch.empty(3, 2, 64, dtype=BF16)
            with pytest.raises(RuntimeError, match=name):
                mod.amx_paged_attention(
                    out, out.clone(), cache.to(BF16), torch.tensor([0, 3]), torch.tensor([40]),
                    tables, 0.125, window, softcap, tiles)

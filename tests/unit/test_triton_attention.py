"""The Triton paged-attention kernels against the PyTorch reference (attention/torch_ref.py).

On a machine without CUDA the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set here before triton is imported); with CUDA and no interpreter
(scripts/gpu_check.sh) the same tests run the compiled kernels on the GPU.

Every run draws fresh random inputs (the seed is in each failure message): ragged context
lengths, some multiples of the block size and some not, block tables that are random
permutations of the pool, block sizes 16 and 32, GQA ratios 1, 3 and 8. Slots no sequence owns
hold NaN (so a kernel reading outside a context is caught) and outputs start as NaN (so an
element a kernel forgets to write is caught). The reference runs in fp32 on a clean copy of the
cache (zeros where the poisoned one has NaN: the reference gathers padded blocks).

An fp8 (e4m3) cache: the write must round bit for bit as the reference does (torch's conversion
of the value clamped to +-448), over every e4m3 value, the ties between neighbours, values just
off them, subnormals and values past +-448, from fp32, bf16 and fp16 rows. Prefill and decode
over it, with bf16 and fp32 queries, are checked against the reference run on the same e4m3
values (its clean cache is an fp8 one too, which it widens as it reads): the widening is exact,
so the tolerances are those of the queries' dtype. Unowned slots hold the NaN byte 0x7F.
"""
from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from pagoda.attention import torch_ref  # noqa: E402
from pagoda.attention import triton_attention as ta  # noqa: E402
from pagoda.attention.metadata import AttentionMetadata, PrefillChunk  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
HEAD_DIM = 32
NUM_KV_HEADS = 2
SPARE_BLOCKS = 3   # blocks no sequence owns: all NaN in the poisoned cache
# max |kernel - reference| / max |reference|
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}
FP8 = torch_ref.FP8
# fp8 K/V are drawn as randn * FP8_SPREAD, so that they reach e4m3's coarser binades (steps of
# 0.5 from 4 up) as well as its subnormals.
FP8_SPREAD = 3.0

BLOCK_SIZES = [16, 32]
GROUPS = [1, 3, 8]
DTYPES = [torch.float32, torch.bfloat16]
CACHES = [False, True]             # fp8: an e4m3 cache under queries of the dtype
CACHE_IDS = ["kv-same", "kv-fp8"]


def fresh_seed() -> int:
    return random.SystemRandom().randrange(1 << 31)


class PagedCase:
    """Sequences of given lengths in a pool whose blocks are handed out in random order; the
    cache in ``dtype`` (the queries') or, ``fp8``, in e4m3."""

    def __init__(self, seq_lens: list[int], block_size: int, group: int, dtype: torch.dtype,
                 seed: int, fp8: bool = False) -> None:
        self.seed, self.block_size, self.dtype = seed, block_size, dtype
        self.cache_dtype = FP8 if fp8 else dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.seq_lens = seq_lens
        self.num_heads = NUM_KV_HEADS * group
        counts = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(counts) + SPARE_BLOCKS
        order = torch.randperm(num_blocks, generator=self.gen).tolist()
        self.tables: list[list[int]] = []
        for c in counts:
            self.tables.append(order[:c])
            order = order[c:]
        self.spare = order
        shape = (2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
        # The reference's cache: fp32 (or the same e4m3 values); the kernel's: NaN elsewhere.
        self.clean = torch.zeros(shape, dtype=FP8 if fp8 else torch.float32)
        self.poisoned = torch.full(shape, float("nan"), dtype=self.cache_dtype)
        for table, n in zip(self.tables, seq_lens):
            for i in range(n):
                b, off = table[i // block_size], i % block_size
                kv = self.cache_rows(2, NUM_KV_HEADS, HEAD_DIM)
                self.poisoned[:, b, off] = kv
                self.clean[:, b, off] = kv.to(self.clean.dtype)
        self.poisoned = self.poisoned.to(DEVICE)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)

    def cache_rows(self, *shape: int) -> torch.Tensor:
        """Random K/V values as the cache holds them (fp8: spread, then rounded)."""
        if self.cache_dtype == FP8:
            return torch_ref.to_cache_dtype(self.randn(*shape) * FP8_SPREAD, FP8)
        return self.randn(*shape).to(self.cache_dtype)

    def padded_tables(self, width: int) -> torch.Tensor:
        """(B, width) int64, padded with a spare (NaN) block: padding must never be read."""
        pad = self.spare[0]
        return torch.tensor([t + [pad] * (width - len(t)) for t in self.tables],
                            dtype=torch.int64)

    def message(self, what: str) -> str:
        return (f"{what}: seed={self.seed} seq_lens={self.seq_lens} block_size={self.block_size} "
                f"heads={self.num_heads}/{NUM_KV_HEADS} dtype={self.dtype} "
                f"cache={self.cache_dtype}")


def ragged_lens(rng: random.Random, count: int, block_size: int, longest: int) -> list[int]:
    """Context lengths: an exact multiple of the block size, one less, one more, and random."""
    lens = [2 * block_size, block_size - 1, block_size + 1, 1]
    lens += [rng.randint(1, longest) for _ in range(max(0, count - len(lens)))]
    rng.shuffle(lens)
    return lens[:count]


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """x's bytes, to compare bit for bit (torch.equal has no fp8 kernel; NaN != NaN)."""
    return x.cpu().contiguous().view(torch.uint8)


def same_values(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal values (-0 == 0), NaN exactly where want has NaN."""
    got = got.cpu().float()
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "kernel left unwritten (NaN) elements or read NaN slots"
    return float((got.float().cpu() - want).abs().max() / want.abs().max().clamp(min=1e-6))


# ------------------------------------------------------------------------------------ KV write
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_matches_reference(block_size, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    num_blocks, num_tokens = 6, 23
    shape = (2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    cache = torch.full(shape, float("nan"), dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    # v as a strided view (as it comes out of the fused QKV projection).
    qkv = torch.randn((num_tokens, 3, NUM_KV_HEADS, HEAD_DIM), generator=gen).to(dtype)
    k, v = qkv[:, 1], qkv[:, 2]                                   # (T, Hkv, D), non-contiguous
    want = cache.clone()
    torch_ref.write_kv(want, k, v, slots)
    got = cache.to(DEVICE)
    ta.write_kv_cache(got, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    assert torch.equal(got.cpu().nan_to_num(7.0), want.nan_to_num(7.0)), f"seed={seed}"


@pytest.mark.parametrize("fp8", CACHES, ids=CACHE_IDS)
def test_write_kv_cache_skips_negative_slots(fp8):
    """Padded rows of a CUDA-graph batch carry slot -1 and must write nothing."""
    block_size = 16
    cache_dtype = FP8 if fp8 else torch.float32
    cache = torch.full((2, 2, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"),
                       dtype=cache_dtype)
    k = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    v = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    slots = torch.tensor([5, -1, 17])
    got = cache.to(DEVICE)
    ta.write_kv_cache(got, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    got = got.cpu()
    want_k = torch_ref.to_cache_dtype(k, cache_dtype)
    want_v = torch_ref.to_cache_dtype(v, cache_dtype)
    assert torch.equal(as_bytes(got[0, 0, 5]), as_bytes(want_k[0]))
    assert torch.equal(as_bytes(got[1, 1, 1]), as_bytes(want_v[2]))
    written = torch.zeros(2, 2, block_size, dtype=torch.bool)
    written[:, 0, 5] = written[:, 1, 1] = True
    assert torch.isnan(got[~written].float()).all()


def e4m3_hard_values(gen: torch.Generator) -> torch.Tensor:
    """fp32, both signs: every finite e4m3 value, the midpoints between neighbours (exact ties:
    to even), values just off them, subnormals, values past 448 (to 448, inf too) and random
    ones over many magnitudes; shuffled."""
    every = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    every = every[every.isfinite()].unique()                    # ascending, 0 once
    mid = (every[1:] + every[:-1]) / 2
    near = torch.cat([mid * (1 + 2.0 ** -12), mid * (1 - 2.0 ** -12)])
    big = torch.tensor([448.0, 449.0, 463.9, 464.0, 465.0, 480.0, 1e4, 3e38, float("inf")])
    tiny = torch.tensor([2.0 ** -10, 2.0 ** -9 * 1.5, 2.0 ** -9 * 2.5, 2.0 ** -6 * 0.999,
                         1e-30, 1e-40, 0.0])
    rand = (torch.randn(2048, generator=gen)
            * torch.exp2(torch.randint(-14, 12, (2048,), generator=gen).float()))
    x = torch.cat([every, mid, near, big, tiny, rand])
    x = torch.cat([x, -x])
    return x[torch.randperm(x.numel(), generator=gen)]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_write_kv_cache_fp8_rounds_like_reference(block_size, dtype):
    """Bit for bit torch_ref's rounding into an fp8 cache, at random slots of strided rows;
    every other slot keeps its NaN bytes."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = e4m3_hard_values(gen).to(dtype)    # fp16: past 65504 is inf, which saturates too
    row = NUM_KV_HEADS * HEAD_DIM
    num_tokens = x.numel() // (2 * row)
    qkv = torch.randn((num_tokens, 3, NUM_KV_HEADS, HEAD_DIM), generator=gen).to(dtype)
    qkv[:, 1:] = x[:num_tokens * 2 * row].view(num_tokens, 2, NUM_KV_HEADS, HEAD_DIM)
    k, v = qkv[:, 1], qkv[:, 2]                                   # (T, Hkv, D), non-contiguous
    num_blocks = -(-num_tokens // block_size) + SPARE_BLOCKS
    cache = torch.full((2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"),
                       dtype=FP8)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    want = cache.clone()
    torch_ref.write_kv(want, k, v, slots)
    got = cache.to(DEVICE)
    ta.write_kv_cache(got, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    got_b, want_b = as_bytes(got), as_bytes(want)
    bad = (got_b != want_b).nonzero()
    assert bad.numel() == 0, (f"seed={seed} dtype={dtype}: {bad.shape[0]} bytes differ, first "
                              f"at {bad[0].tolist()}: {got_b[tuple(bad[0])]} != "
                              f"{want_b[tuple(bad[0])]}")


def test_write_kv_cache_fp8_specials():
    """Saturation, signed zero, ties to even below e4m3's smallest normal, NaN kept NaN."""
    x = torch.tensor([1e6, -1e6, float("inf"), float("-inf"), 448.0, -464.0, -0.0,
                      2.0 ** -10, 3 * 2.0 ** -10, 5 * 2.0 ** -10, 1e-40, float("nan")])
    want = [0x7E, 0xFE, 0x7E, 0xFE, 0x7E, 0xFE, 0x80, 0x00, 0x02, 0x02, 0x00]
    n = x.numel()
    k = x.view(n, 1, 1).expand(n, NUM_KV_HEADS, HEAD_DIM).contiguous()
    cache = torch.zeros((2, 1, 16, NUM_KV_HEADS, HEAD_DIM), dtype=FP8).to(DEVICE)
    ta.write_kv_cache(cache, k.to(DEVICE), (-k).to(DEVICE), torch.arange(n).to(DEVICE))
    got = as_bytes(cache)[:, 0, :n]                                 # (2, n, Hkv, D)
    assert (got[0, :-1] == torch.tensor(want, dtype=torch.uint8).view(-1, 1, 1)).all()
    assert (got[1, :-1] == (torch.tensor(want) ^ 0x80).to(torch.uint8).view(-1, 1, 1)).all()
    assert ((got[:, -1] & 0x7F) == 0x7F).all(), "NaN must stay NaN, as torch's conversion keeps"


def test_fp8_cache_refuses_other_dtypes():
    cache = torch.zeros((2, 1, 16, NUM_KV_HEADS, HEAD_DIM), dtype=FP8).to(DEVICE)
    k = torch.zeros((1, NUM_KV_HEADS, HEAD_DIM), dtype=torch.float64).to(DEVICE)
    with pytest.raises(ValueError, match="differs"):
        ta.write_kv_cache(cache, k, k, torch.zeros(1, dtype=torch.int64).to(DEVICE))
    q = torch.zeros((1, NUM_KV_HEADS, HEAD_DIM), dtype=torch.float64).to(DEVICE)
    with pytest.raises(ValueError, match="differs"):
        ta.paged_decode_attention(q, cache, torch.zeros((1, 1), dtype=torch.int64).to(DEVICE),
                                  torch.ones(1, dtype=torch.int64).to(DEVICE), 0.125)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_cache_widens_exactly(dtype):
    """A context of one token returns its V row itself (softmax weight 1), through decode and
    prefill alike: every e4m3 byte, subnormals and -0 included, read back exactly, and the NaN
    bytes as NaN (what makes the NaN-poisoned slots of the other tests catch stray reads). K
    rows hold every finite value (a NaN there would turn the whole row NaN)."""
    v_bytes = torch.arange(256, dtype=torch.uint8)
    finite = v_bytes[v_bytes.view(FP8).float().isfinite()]            # 254 bytes
    k_bytes = torch.cat([finite, finite[:2]])
    row = NUM_KV_HEADS * HEAD_DIM
    num_seqs = 256 // row
    block_size = 16
    cache = torch.full((2, num_seqs + SPARE_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM),
                       float("nan"), dtype=FP8)
    cache[0, :num_seqs, 0] = k_bytes.view(FP8).view(num_seqs, NUM_KV_HEADS, HEAD_DIM)
    cache[1, :num_seqs, 0] = v_bytes.view(FP8).view(num_seqs, NUM_KV_HEADS, HEAD_DIM)
    want = v_bytes.view(FP8).float().view(num_seqs, NUM_KV_HEADS, 1, HEAD_DIM).expand(
        num_seqs, NUM_KV_HEADS, 3, HEAD_DIM).reshape(num_seqs, 3 * NUM_KV_HEADS, HEAD_DIM)
    q = torch.randn(num_seqs, 3 * NUM_KV_HEADS, HEAD_DIM).to(dtype).to(DEVICE)
    cache, tables = cache.to(DEVICE), torch.arange(num_seqs).view(-1, 1).to(DEVICE)
    ones = torch.ones(num_seqs, dtype=torch.int64).to(DEVICE)
    # Outputs start at 1000, no e4m3 value (NaN, the other tests' start, is expected here).
    out = torch.full(q.shape, 1000.0, dtype=dtype, device=DEVICE)
    ta.paged_decode_attention(q, cache, tables, ones, 0.125, out=out, num_splits=1)
    assert same_values(out, want), "decode"
    chunks = [PrefillChunk(i, 1, 1, tables[i]) for i in range(num_seqs)]
    meta = AttentionMetadata(torch.empty(0, dtype=torch.int64), 0,
                             torch.empty(0, 0, dtype=torch.int64),
                             torch.empty(0, dtype=torch.int64), 0, chunks, block_size)
    out = torch.full(q.shape, 1000.0, dtype=dtype, device=DEVICE)
    ta.paged_prefill_attention(q, cache, ta.pack_prefills(meta, DEVICE), 0.125, out)
    assert same_values(out, want), "prefill"


# -------------------------------------------------------------------------------------- decode
def decode_reference(case: PagedCase, q: torch.Tensor, scale: float) -> torch.Tensor:
    width = max(len(t) for t in case.tables)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64), num_decode_tokens=q.shape[0],
        decode_block_tables=case.padded_tables(width),
        decode_seq_lens=torch.tensor(case.seq_lens), decode_max_seq_len=max(case.seq_lens),
        prefills=[], block_size=case.block_size)
    return torch_ref.decode_attention(q.float(), case.clean,
        meta.decode_block_tables, meta.decode_seq_lens, meta.decode_max_seq_len, scale)


@pytest.mark.parametrize("fp8", CACHES, ids=CACHE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(block_size, group, dtype, fp8):
    seed = fresh_seed()
    rng = random.Random(seed)
    lens = ragged_lens(rng, 5, block_size, 4 * block_size + 7)
    case = PagedCase(lens, block_size, group, dtype, seed, fp8)
    q = case.randn(len(lens), case.num_heads, HEAD_DIM).to(dtype)         # (B, H, D)
    scale = HEAD_DIM ** -0.5
    want = decode_reference(case, q, scale)
    width = max(len(t) for t in case.tables) + 1      # one padding column at least
    tables = case.padded_tables(width).to(DEVICE)
    seq_lens = torch.tensor(lens).to(DEVICE)
    # One split (straight to the output), several (with the reduce step), and the default.
    for num_splits in (1, 3, None):
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
        ta.paged_decode_attention(q.to(DEVICE), case.poisoned, tables, seq_lens, scale,
                                  out=out, num_splits=num_splits)
        err = relative_error(out, want)
        assert err <= TOLERANCE[dtype], case.message(f"num_splits={num_splits} err={err:.2e}")


def test_decode_splits_longer_than_some_contexts():
    """More splits than a short sequence has tiles: its empty splits must be skipped in the
    reduce step, not merged as garbage."""
    seed = fresh_seed()
    case = PagedCase([1, 200, 64, 65], 16, 3, torch.float32, seed)
    q = case.randn(4, case.num_heads, HEAD_DIM)
    want = decode_reference(case, q, 0.2)
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    ta.paged_decode_attention(q.to(DEVICE), case.poisoned, case.padded_tables(13).to(DEVICE),
                              torch.tensor(case.seq_lens).to(DEVICE), 0.2, out=out,
                              num_splits=8)
    err = relative_error(out, want)
    assert err <= TOLERANCE[torch.float32], case.message(f"err={err:.2e}")


# ------------------------------------------------------------------------------------- prefill
def prefill_chunks(rng: random.Random, case: PagedCase) -> list[tuple[int, int]]:
    """(query_len, context_len) per sequence: some chunks start at 0, others follow cached
    tokens; a few are single rows."""
    out = []
    for n in case.seq_lens:
        cached = rng.choice([0, n // 2, max(0, n - 1), rng.randint(0, n - 1)])
        out.append((n - cached, n))
    return out


@pytest.mark.parametrize("fp8", CACHES, ids=CACHE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_matches_reference(block_size, group, dtype, fp8):
    seed = fresh_seed()
    rng = random.Random(seed)
    lens = ragged_lens(rng, 4, block_size, 3 * block_size + 5)
    case = PagedCase(lens, block_size, group, dtype, seed, fp8)
    spans = prefill_chunks(rng, case)
    total = sum(q for q, _ in spans)
    q = case.randn(total, case.num_heads, HEAD_DIM).to(dtype)             # (P, H, D)
    scale = HEAD_DIM ** -0.5
    chunks, wants, row = [], [], 0
    for (query_len, context_len), table in zip(spans, case.tables):
        rows = slice(row, row + query_len)
        chunks.append(PrefillChunk(row, query_len, context_len, torch.tensor(table)))
        wants.append(torch_ref.prefill_attention(q[rows].float(), case.clean,
                                                  torch.tensor(table), context_len, scale))
        row += query_len
    want = torch.cat(wants)                                                # (P, H, D)
    meta = AttentionMetadata(torch.empty(0, dtype=torch.int64), 0,
                             torch.empty(0, 0, dtype=torch.int64),
                             torch.empty(0, dtype=torch.int64), 0, chunks, block_size)
    packed = ta.pack_prefills(meta, DEVICE)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    ta.paged_prefill_attention(q.to(DEVICE), case.poisoned, packed, scale, out)
    err = relative_error(out, want)
    assert err <= TOLERANCE[dtype], case.message(f"spans={spans} err={err:.2e}")


# --------------------------------------------------------------------------- whole layer, mixed
def cached_layer_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cache: torch.Tensor, meta: AttentionMetadata,
                           scale: float) -> torch.Tensor:
    """torch_ref.paged_attention, except that every prefill chunk reads its K/V back from the
    cache, as the Triton prefill does: over an fp8 cache even a chunk that starts its sequence
    attends over its own K/V rounded (torch_ref takes them as computed there)."""
    torch_ref.write_kv(cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    d = meta.num_decode_tokens
    out[:d] = torch_ref.decode_attention(q[:d], cache,
        meta.decode_block_tables, meta.decode_seq_lens, meta.decode_max_seq_len, scale)
    for c in meta.prefills:
        rows = slice(c.query_start, c.query_start + c.query_len)
        out[rows] = torch_ref.prefill_attention(q[rows], cache, c.block_table, c.context_len,
                                                 scale)
    return out


@pytest.mark.parametrize("fp8", CACHES, ids=CACHE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_matches_reference(dtype, fp8):
    """Decodes then prefill chunks in one batch, through the layer entry point: the new
    tokens' K/V are written first, then every row attends, as torch_ref.paged_attention."""
    seed = fresh_seed()
    rng = random.Random(seed)
    block_size, group = 16, 3
    lens = [rng.randint(1, 70) for _ in range(3)] + [rng.randint(2, 70) for _ in range(2)]
    case = PagedCase(lens, block_size, group, dtype, seed, fp8)
    num_decodes = 3
    query_lens = [1] * num_decodes + [rng.randint(2, n) for n in lens[num_decodes:]]
    slots, chunks, row = [], [], 0
    for i, (n, ql, table) in enumerate(zip(lens, query_lens, case.tables)):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(n - ql, n)]
        if i >= num_decodes:
            chunks.append(PrefillChunk(row, ql, n, torch.tensor(table)))
        row += ql
    total = row
    q = case.randn(total, case.num_heads, HEAD_DIM).to(dtype)              # (T, H, D)
    spread = FP8_SPREAD if fp8 else 1.0
    k = (case.randn(total, NUM_KV_HEADS, HEAD_DIM) * spread).to(dtype)     # (T, Hkv, D)
    v = (case.randn(total, NUM_KV_HEADS, HEAD_DIM) * spread).to(dtype)
    width = max(len(t) for t in case.tables)

    def meta_on(device: torch.device) -> AttentionMetadata:
        dev_chunks = [PrefillChunk(c.query_start, c.query_len, c.context_len,
                                   c.block_table.to(device)) for c in chunks]
        return AttentionMetadata(
            torch.tensor(slots).to(device), num_decodes,
            case.padded_tables(width)[:num_decodes].to(device),
            torch.tensor(lens[:num_decodes]).to(device), max(lens[:num_decodes]), dev_chunks,
            block_size)

    clean = case.clean.clone()
    reference = cached_layer_reference if fp8 else torch_ref.paged_attention
    want = reference(q.float(), k.float(), v.float(), clean, meta_on(torch.device("cpu")),
                     0.125)
    got = ta.paged_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), case.poisoned,
                             meta_on(DEVICE), 0.125)
    err = relative_error(got, want)
    assert err <= TOLERANCE[dtype], case.message(f"query_lens={query_lens} err={err:.2e}")
    # The new tokens' K/V went to their slots (rounded there, into an fp8 cache).
    written = case.poisoned.cpu().view(2, -1, NUM_KV_HEADS, HEAD_DIM)[:, torch.tensor(slots)]
    for got_rows, rows in ((written[0], k), (written[1], v)):
        want_rows = torch_ref.to_cache_dtype(rows, case.cache_dtype)
        assert torch.equal(as_bytes(got_rows), as_bytes(want_rows)), f"seed={seed}"


def test_default_num_splits_fills_the_gpu_but_not_past_the_context():
    sm = ta.DEFAULT_SM_COUNT
    assert ta.default_num_splits(1, 8, 8192, torch.device("cpu")) == ta.MAX_DECODE_SPLITS
    assert ta.default_num_splits(1, 8, 10, torch.device("cpu")) == 1
    assert ta.default_num_splits(256, 8, 8192, torch.device("cpu")) == 1
    many = ta.default_num_splits(4, 8, 8192, torch.device("cpu"))
    assert 1 < many <= ta.MAX_DECODE_SPLITS and many == min(
        ta.MAX_DECODE_SPLITS, ta.DECODE_PROGRAMS_PER_SM * sm // 32)


# ------------------------------------------------------------- sliding window and soft-capping
# The contract of backend.AttentionFn: with window W > 0 the query at position p sees exactly
# keys (p - W, p] of its sequence; with softcap c > 0 each scaled score s becomes c·tanh(s / c)
# before the softmax. Checked against an fp64 dense reference over each sequence's whole K/V.
# Every block wholly before the window of a sequence's first query is a table entry pointing
# at a NaN block, and the slots before that window in its first live block are NaN too: a
# kernel that loads any key no query of the step may see turns the output NaN.
WINDOW_CAPS = [(37, 0.0), (0, 5.0), (24, 5.0), (1, 0.0)]
WINDOW_CAP_IDS = ["window37", "softcap5", "window24+softcap5", "window1"]
# Queries drawn this much larger than K, so that scores reach past the cap (std about 3 here).
SOFTCAP_Q_SPREAD = 3.0


class WindowCase:
    """Sequences ``(query_len, context_len)``, each with its whole K/V drawn up front, in a pool
    of blocks handed out in random order. The cache holds each sequence's keys from the first
    one its first query sees up to ``context_len`` (``cached_only``: up to the step's queries,
    whose K/V the layer writes itself); NaN everywhere else, out-of-window table entries
    included (they point at a spare NaN block). K/V hold e4m3 values with ``fp8`` (the cache
    is e4m3 then; the queries' dtype holds them exactly)."""

    def __init__(self, seqs: list[tuple[int, int]], window: int, softcap: float,
                 block_size: int, group: int, dtype: torch.dtype, seed: int, fp8: bool = False,
                 cached_only: bool = False) -> None:
        self.seqs, self.window, self.softcap, self.seed = seqs, window, softcap, seed
        self.block_size, self.group, self.dtype, self.fp8 = block_size, group, dtype, fp8
        gen = torch.Generator().manual_seed(seed)
        self.num_heads = NUM_KV_HEADS * group
        counts = [-(-ctx // block_size) for _, ctx in seqs]
        num_blocks = sum(counts) + SPARE_BLOCKS
        order = torch.randperm(num_blocks, generator=gen).tolist()
        self.nan_block = order.pop()
        cache_dtype = FP8 if fp8 else dtype
        cache = torch.full((2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"),
                           dtype=cache_dtype)
        self.kv: list[torch.Tensor] = []          # per sequence (2, C, Hkv, D), in dtype
        self.tables: list[list[int]] = []
        for (query_len, ctx), count in zip(seqs, counts):
            kv = torch.randn((2, ctx, NUM_KV_HEADS, HEAD_DIM), generator=gen)
            kv = torch_ref.to_cache_dtype(kv * FP8_SPREAD, FP8) if fp8 else kv
            self.kv.append(kv.to(dtype))
            table, order = order[:count], order[count:]
            lo = self.first_visible(ctx - query_len)
            pos = torch.arange(lo, ctx - query_len if cached_only else ctx)
            blocks = torch.tensor(table, dtype=torch.int64)[pos // block_size]
            cache[:, blocks, pos % block_size] = kv[:, pos].to(cache_dtype)
            # Blocks wholly before the window: the engine may have freed them.
            dead = lo // block_size
            self.tables.append([self.nan_block] * dead + table[dead:])
        self.cache = cache.to(DEVICE)
        spread = SOFTCAP_Q_SPREAD if softcap else 1.0
        total = sum(q for q, _ in seqs)
        self.q = (torch.randn((total, self.num_heads, HEAD_DIM), generator=gen)
                  * spread).to(dtype)              # (T, H, D)

    def first_visible(self, pos: int) -> int:
        """The first key the query at ``pos`` sees."""
        return max(0, pos - self.window + 1) if self.window else 0

    def new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's new K and V rows (T, Hkv, D): each sequence's last query_len tokens."""
        rows = [kv[:, ctx - q:] for kv, (q, ctx) in zip(self.kv, self.seqs)]
        both = torch.cat(rows, dim=1)
        return both[0], both[1]

    def slot_mapping(self) -> torch.Tensor:
        slots = []
        for table, (q, ctx) in zip(self.tables, self.seqs):
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(ctx - q, ctx)]
        return torch.tensor(slots, dtype=torch.int64)

    def padded_tables(self, seqs: slice) -> torch.Tensor:
        """(B, width + 1) int64, padded with the NaN block: padding must never be read."""
        tables = self.tables[seqs]
        width = max(len(t) for t in tables) + 1
        return torch.tensor([t + [self.nan_block] * (width - len(t)) for t in tables],
                            dtype=torch.int64)

    def chunks(self, first: int) -> list[PrefillChunk]:
        """Sequences ``first`` on as prefill chunks, their rows counted from ``first``'s."""
        out, row = [], sum(q for q, _ in self.seqs[:first])
        for (q, ctx), table in zip(self.seqs[first:], self.tables[first:]):
            out.append(PrefillChunk(row, q, ctx, torch.tensor(table).to(DEVICE)))
            row += q
        return out

    def reference(self, scale: float) -> torch.Tensor:
        """fp64 (T, H, D): every query over the keys of its sequence its position may see."""
        out, row = [], 0
        for (query_len, ctx), kv in zip(self.seqs, self.kv):
            k, v = kv.double().repeat_interleave(self.group, dim=2)   # (C, H, D) each
            q = self.q[row:row + query_len].double()                   # (Q, H, D)
            s = torch.einsum("qhd,khd->hqk", q, k) * scale
            if self.softcap:
                s = self.softcap * torch.tanh(s / self.softcap)
            q_pos = torch.arange(ctx - query_len, ctx)[:, None]
            k_pos = torch.arange(ctx)[None, :]
            hidden = k_pos > q_pos
            if self.window:
                hidden |= k_pos <= q_pos - self.window
            s = s.masked_fill(hidden, float("-inf"))
            out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
            row += query_len
        return torch.cat(out)

    def message(self, what: str) -> str:
        return (f"{what}: seed={self.seed} seqs={self.seqs} window={self.window} "
                f"softcap={self.softcap} block_size={self.block_size} "
                f"heads={self.num_heads}/{NUM_KV_HEADS} dtype={self.dtype} fp8={self.fp8}")


def window_decodes(rng: random.Random, window: int, block_size: int) -> list[tuple[int, int]]:
    """Contexts shorter than, equal to and past the window, one well past it, one random."""
    w, long = window or 40, max(window, 24)
    lens = [1, w - 1, w, w + 1, 3 * long + block_size + 3, rng.randint(1, 4 * long)]
    return [(1, n) for n in lens if n >= 1]


def window_prefills(rng: random.Random, window: int) -> list[tuple[int, int]]:
    """A fresh prompt past the window (more rows than one query tile), chunks after cached
    context starting inside and past the window, a single row, one random chunk."""
    w = max(window, 24)
    ctx = rng.randint(1, 4 * w)
    return [(2 * w + 5, 2 * w + 5), (7, w + 3), (w + 9, 3 * w), (1, 2 * w),
            (rng.randint(1, ctx), ctx)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window, softcap", WINDOW_CAPS, ids=WINDOW_CAP_IDS)
def test_prefill_window_softcap(window, softcap, dtype):
    seed = fresh_seed()
    rng = random.Random(seed)
    seqs = window_prefills(rng, window)
    case = WindowCase(seqs, window, softcap, 16, 3, dtype, seed)
    meta = AttentionMetadata(torch.empty(0, dtype=torch.int64), 0,
                             torch.empty(0, 0, dtype=torch.int64),
                             torch.empty(0, dtype=torch.int64), 0, case.chunks(0), 16)
    out = torch.full(case.q.shape, float("nan"), dtype=dtype, device=DEVICE)
    scale = HEAD_DIM ** -0.5
    ta.paged_prefill_attention(case.q.to(DEVICE), case.cache, ta.pack_prefills(meta, DEVICE),
                               scale, out, window=window, softcap=softcap)
    err = relative_error(out, case.reference(scale))
    assert err <= TOLERANCE[dtype], case.message(f"err={err:.2e}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window, softcap", WINDOW_CAPS, ids=WINDOW_CAP_IDS)
def test_decode_window_softcap(window, softcap, dtype):
    """One split, a few, more than the window has tiles (empty splits), and the default."""
    seed = fresh_seed()
    rng = random.Random(seed)
    seqs = window_decodes(rng, window, 16)
    case = WindowCase(seqs, window, softcap, 16, 3, dtype, seed)
    tables = case.padded_tables(slice(None)).to(DEVICE)
    seq_lens = torch.tensor([ctx for _, ctx in seqs]).to(DEVICE)
    scale = HEAD_DIM ** -0.5
    want = case.reference(scale)
    for num_splits in (1, 2, 3, 16, None):
        out = torch.full(case.q.shape, float("nan"), dtype=dtype, device=DEVICE)
        ta.paged_decode_attention(case.q.to(DEVICE), case.cache, tables, seq_lens, scale,
                                  out=out, num_splits=num_splits, window=window,
                                  softcap=softcap)
        err = relative_error(out, want)
        assert err <= TOLERANCE[dtype], case.message(f"num_splits={num_splits} err={err:.2e}")


LAYER_DTYPES = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
LAYER_DTYPE_IDS = ["fp32", "bf16", "bf16-kv-fp8"]


@pytest.mark.parametrize("dtype, fp8", LAYER_DTYPES, ids=LAYER_DTYPE_IDS)
@pytest.mark.parametrize("window, softcap", WINDOW_CAPS, ids=WINDOW_CAP_IDS)
def test_mixed_batch_window_softcap(window, softcap, dtype, fp8):
    """The layer entry point on decodes then prefill chunks: the step's K/V written first
    (at in-window slots), then every row attends; with the default split count and with a
    fixed one (a CUDA graph's) larger than the window's tiles."""
    seed = fresh_seed()
    rng = random.Random(seed)
    decodes = window_decodes(rng, window, 16)
    seqs = decodes + window_prefills(rng, window)
    scale = 0.125
    for num_splits in (None, 7):
        case = WindowCase(seqs, window, softcap, 16, 2, dtype, seed, fp8, cached_only=True)
        d = len(decodes)
        meta = AttentionMetadata(
            case.slot_mapping().to(DEVICE), d, case.padded_tables(slice(0, d)).to(DEVICE),
            torch.tensor([ctx for _, ctx in decodes]).to(DEVICE),
            max(ctx for _, ctx in decodes), case.chunks(d), 16, decode_num_splits=num_splits)
        k, v = case.new_kv()
        got = ta.paged_attention(case.q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), case.cache,
                                 meta, scale, window=window, softcap=softcap)
        err = relative_error(got, case.reference(scale))
        assert err <= TOLERANCE[dtype], case.message(f"num_splits={num_splits} err={err:.2e}")


def test_window_and_softcap_must_not_be_negative():
    q = torch.zeros((1, NUM_KV_HEADS, HEAD_DIM)).to(DEVICE)
    cache = torch.zeros((2, 1, 16, NUM_KV_HEADS, HEAD_DIM)).to(DEVICE)
    table, one = torch.zeros((1, 1), dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    for bad in ({"window": -1}, {"softcap": -1.0}):
        with pytest.raises(ValueError, match=">= 0"):
            ta.paged_decode_attention(q, cache, table.to(DEVICE), one.to(DEVICE), 0.1, **bad)

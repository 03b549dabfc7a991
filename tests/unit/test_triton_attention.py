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

BLOCK_SIZES = [16, 32]
GROUPS = [1, 3, 8]
DTYPES = [torch.float32, torch.bfloat16]


def fresh_seed() -> int:
    return random.SystemRandom().randrange(1 << 31)


class PagedCase:
    """Sequences of given lengths in a pool whose blocks are handed out in random order."""

    def __init__(self, seq_lens: list[int], block_size: int, group: int, dtype: torch.dtype,
                 seed: int) -> None:
        self.seed, self.block_size, self.dtype = seed, block_size, dtype
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
        self.clean = torch.zeros(shape)                                  # fp32 reference cache
        self.poisoned = torch.full(shape, float("nan"), dtype=dtype)     # what the kernel sees
        for table, n in zip(self.tables, seq_lens):
            for i in range(n):
                b, off = table[i // block_size], i % block_size
                kv = self.randn(2, NUM_KV_HEADS, HEAD_DIM).to(dtype)
                self.poisoned[:, b, off] = kv
                self.clean[:, b, off] = kv.float()
        self.poisoned = self.poisoned.to(DEVICE)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)

    def padded_tables(self, width: int) -> torch.Tensor:
        """(B, width) int64, padded with a spare (NaN) block: padding must never be read."""
        pad = self.spare[0]
        return torch.tensor([t + [pad] * (width - len(t)) for t in self.tables],
                            dtype=torch.int64)

    def message(self, what: str) -> str:
        return (f"{what}: seed={self.seed} seq_lens={self.seq_lens} block_size={self.block_size} "
                f"heads={self.num_heads}/{NUM_KV_HEADS} dtype={self.dtype}")


def ragged_lens(rng: random.Random, count: int, block_size: int, longest: int) -> list[int]:
    """Context lengths: an exact multiple of the block size, one less, one more, and random."""
    lens = [2 * block_size, block_size - 1, block_size + 1, 1]
    lens += [rng.randint(1, longest) for _ in range(max(0, count - len(lens)))]
    rng.shuffle(lens)
    return lens[:count]


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


def test_write_kv_cache_skips_negative_slots():
    """Padded rows of a CUDA-graph batch carry slot -1 and must write nothing."""
    block_size = 16
    cache = torch.full((2, 2, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    k = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    v = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    slots = torch.tensor([5, -1, 17])
    got = cache.to(DEVICE)
    ta.write_kv_cache(got, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    got = got.cpu()
    assert torch.equal(got[0, 0, 5], k[0]) and torch.equal(got[1, 1, 1], v[2])
    written = torch.zeros(2, 2, block_size, dtype=torch.bool)
    written[:, 0, 5] = written[:, 1, 1] = True
    assert torch.isnan(got[~written]).all()


# -------------------------------------------------------------------------------------- decode
def decode_reference(case: PagedCase, q: torch.Tensor, scale: float) -> torch.Tensor:
    width = max(len(t) for t in case.tables)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64), num_decode_tokens=q.shape[0],
        decode_block_tables=case.padded_tables(width),
        decode_seq_lens=torch.tensor(case.seq_lens), decode_max_seq_len=max(case.seq_lens),
        prefills=[], block_size=case.block_size)
    return torch_ref._decode_attention(q.float(), case.clean, meta, scale)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(block_size, group, dtype):
    seed = fresh_seed()
    rng = random.Random(seed)
    lens = ragged_lens(rng, 5, block_size, 4 * block_size + 7)
    case = PagedCase(lens, block_size, group, dtype, seed)
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


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_matches_reference(block_size, group, dtype):
    seed = fresh_seed()
    rng = random.Random(seed)
    lens = ragged_lens(rng, 4, block_size, 3 * block_size + 5)
    case = PagedCase(lens, block_size, group, dtype, seed)
    spans = prefill_chunks(rng, case)
    total = sum(q for q, _ in spans)
    q = case.randn(total, case.num_heads, HEAD_DIM).to(dtype)             # (P, H, D)
    scale = HEAD_DIM ** -0.5
    chunks, wants, row = [], [], 0
    for (query_len, context_len), table in zip(spans, case.tables):
        rows = slice(row, row + query_len)
        chunks.append(PrefillChunk(row, query_len, context_len, torch.tensor(table)))
        wants.append(torch_ref._prefill_attention(q[rows].float(), case.clean,
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
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_matches_reference(dtype):
    """Decodes then prefill chunks in one batch, through the layer entry point: the new
    tokens' K/V are written first, then every row attends, as torch_ref.paged_attention."""
    seed = fresh_seed()
    rng = random.Random(seed)
    block_size, group = 16, 3
    lens = [rng.randint(1, 70) for _ in range(3)] + [rng.randint(2, 70) for _ in range(2)]
    case = PagedCase(lens, block_size, group, dtype, seed)
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
    k = case.randn(total, NUM_KV_HEADS, HEAD_DIM).to(dtype)                # (T, Hkv, D)
    v = case.randn(total, NUM_KV_HEADS, HEAD_DIM).to(dtype)
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
    want = torch_ref.paged_attention(q.float(), k.float(), v.float(), clean, meta_on(
        torch.device("cpu")), 0.125)
    got = ta.paged_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), case.poisoned,
                             meta_on(DEVICE), 0.125)
    err = relative_error(got, want)
    assert err <= TOLERANCE[dtype], case.message(f"query_lens={query_lens} err={err:.2e}")
    # The new tokens' K/V went to their slots.
    written = case.poisoned.cpu().view(2, -1, NUM_KV_HEADS, HEAD_DIM)[:, torch.tensor(slots)]
    assert torch.equal(written[0], k) and torch.equal(written[1], v), f"seed={seed}"


def test_default_num_splits_fills_the_gpu_but_not_past_the_context():
    sm = ta.DEFAULT_SM_COUNT
    assert ta.default_num_splits(1, 8, 8192, torch.device("cpu")) == ta.MAX_DECODE_SPLITS
    assert ta.default_num_splits(1, 8, 10, torch.device("cpu")) == 1
    assert ta.default_num_splits(256, 8, 8192, torch.device("cpu")) == 1
    many = ta.default_num_splits(4, 8, 8192, torch.device("cpu"))
    assert 1 < many <= ta.MAX_DECODE_SPLITS and many == min(
        ta.MAX_DECODE_SPLITS, ta.DECODE_PROGRAMS_PER_SM * sm // 32)

"""The AMX paged-attention kernel (csrc/amx_attention.cpp) for prefill chunks, and the C++ KV
write (csrc/kv_write.cpp), against fp64 references.

The invariant under test: query i of a chunk (position context_len - query_len + i) sees
exactly the keys [0, position] of its own sequence, found through its block table. Every
other cache slot holds NaN or huge values and the output starts as NaN, so a stray read or a
missed write shows. Inputs are fresh random each run: ragged chunks with and without cached
context, random non-contiguous block tables, GQA ratios 1, 3 and 8, block sizes 1, 16 and 32,
head dims 64 and 128.
"""
from __future__ import annotations

import random

import pytest
import torch

from pagoda.attention import cpu_attention, torch_ref
from pagoda.kernels import ext
from pagoda.attention.metadata import AttentionMetadata, PrefillChunk, pack_prefills

from kv_poison import poison_unused
from native import cpu_flags, needs_amx, needs_ext, tile_kernels

BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("random_seed")


def make_case(chunks: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int) -> dict:
    """chunks: (query_len, context_len) per sequence. Returns q (T, H, D) bf16, a poisoned
    cache, and the packed tensors; block ids are a random permutation (block 0 unused)."""
    per_seq = [-(-ctx // block_size) for _, ctx in chunks]
    num_blocks = 1 + sum(per_seq) + 3
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    ids = (torch.randperm(num_blocks - 1) + 1).tolist()
    width = max(per_seq) + 1
    tables = torch.zeros(len(chunks), width, dtype=torch.int64)
    for n, ((_, ctx), nb) in enumerate(zip(chunks, per_seq)):
        for j in range(nb):
            blk = ids.pop()
            tables[n, j] = blk
            used[blk, :min(block_size, ctx - j * block_size)] = True
    poison_unused(kv, used)   # NaN / huge values in every slot outside all contexts
    starts = [0]
    for qlen, _ in chunks:
        starts.append(starts[-1] + qlen)
    q = torch.randn(starts[-1], num_heads, head_dim).to(BF16)
    return dict(q=q, kv=kv.to(BF16), tables=tables, starts=torch.tensor(starts),
                ctx=torch.tensor([c for _, c in chunks]), chunks=chunks)


def reference(case: dict, scale: float) -> torch.Tensor:
    """fp64 causal attention of each chunk over its gathered context."""
    q, kv, tables = case["q"], case["kv"], case["tables"]
    num_heads, block_size, num_kv_heads = q.shape[1], kv.shape[2], kv.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for n, (qlen, ctx) in enumerate(case["chunks"]):
        pos = torch.arange(ctx)
        blocks = tables[n, pos // block_size]
        k = kv[0][blocks, pos % block_size].double().repeat_interleave(group, dim=1)  # (C, H, D)
        v = kv[1][blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        rows = slice(int(case["starts"][n]), int(case["starts"][n + 1]))
        s = torch.einsum("qhd,khd->hqk", q[rows].double(), k) * scale            # (H, Q, C)
        q_pos = torch.arange(ctx - qlen, ctx)
        s.masked_fill_(pos[None, :] > q_pos[:, None], float("-inf"))
        out[rows] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
    return out


def run_amx(case: dict, scale: float, amx: bool = True) -> torch.Tensor:
    """The tile kernel, its products on AMX (``amx``) or on AVX512-BF16."""
    out = torch.full(case["q"].shape, float("nan"), dtype=BF16)
    ext.extension().amx_paged_attention(out, case["q"], case["kv"], case["starts"],
                                        case["ctx"], case["tables"], scale, amx=amx)
    return out


def ragged_chunks(block_size: int) -> list[tuple[int, int]]:
    """Whole prompts, chunks after cached context (aligned to blocks or not), single-token
    queries, and random ones."""
    rnd = random.Random(int(torch.randint(0, 2**31, ()).item()))
    fixed = [(1, 1), (17, 17), (64, 64), (65, 65), (5, 3 * block_size + 5), (1, 77),
             (40, 40 + 2 * block_size), (130, 300)]
    extra = []
    for _ in range(3):
        ctx = rnd.randint(1, 400)
        extra.append((rnd.randint(1, ctx), ctx))
    return fixed + extra


@pytest.mark.parametrize("tiles", tile_kernels())
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (16, 2, 128)],
                         ids=["mha", "gqa3", "gqa8-d128"])
def test_amx_prefill_matches_reference(block_size, heads, kv_heads, head_dim, tiles):
    case = make_case(ragged_chunks(block_size), heads, kv_heads, head_dim, block_size)
    scale = head_dim ** -0.5
    out = run_amx(case, scale, amx=tiles)
    assert torch.isfinite(out).all(), "NaN/inf reached the output (a stray read or no write)"
    ref = reference(case, scale)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1.5e-2 * max(1.0, ref.abs().max().item()), f"max abs error {err}"


@pytest.mark.parametrize("tiles", tile_kernels())
def test_amx_prefill_is_causal_within_a_chunk(tiles):
    """Changing the last token's K/V must leave every earlier query's output unchanged."""
    case = make_case([(50, 50)], 9, 3, 64, 16)
    before = run_amx(case, 0.125, amx=tiles)
    last_block = case["tables"][0, 49 // 16]
    case["kv"][:, last_block, 49 % 16] = 100.0
    after = run_amx(case, 0.125, amx=tiles)
    assert torch.equal(before[:49], after[:49])
    assert not torch.equal(before[49], after[49])


@pytest.mark.parametrize("tiles", tile_kernels())
def test_amx_bad_inputs_raise_with_the_reason(tiles):
    case = make_case([(4, 20)], 9, 3, 64, 16)
    mod = ext.extension()
    out = torch.empty_like(case["q"])
    bad_tables = case["tables"].clone()
    bad_tables[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="outside"):
        mod.amx_paged_attention(out, case["q"], case["kv"], case["starts"], case["ctx"],
                                bad_tables, 0.125, amx=tiles)
    with pytest.raises(RuntimeError, match="query_len"):
        mod.amx_paged_attention(out, case["q"], case["kv"], case["starts"],
                                torch.tensor([3]), case["tables"], 0.125, amx=tiles)
    with pytest.raises(RuntimeError, match="bfloat16"):
        mod.amx_paged_attention(out.float(), case["q"].float(), case["kv"], case["starts"],
                                case["ctx"], case["tables"], 0.125, amx=tiles)


@needs_ext
def test_cpu_backend_mixed_batch_matches_the_reference_backend(amx):
    """A whole layer (decodes, a fresh prompt, a chunk after cached context) through the CPU
    backend (C++ write, decode kernel, and the AMX prefill or, without it, the reference
    prefill) equals torch_ref's on the same inputs."""
    assert cpu_attention.use_amx(torch.device("cpu"), BF16, 64) is amx
    assert (cpu_attention.prefill_kernel(torch.device("cpu"), BF16, BF16, 64) == "amx") is amx
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    bs, heads, kv_heads, dim = 16, 9, 3, 64
    num_blocks = 40
    clean = torch.randn(2, num_blocks, bs, kv_heads, dim).to(BF16)
    ids = torch.randperm(num_blocks - 1) + 1
    tables = [ids[0:4], ids[4:6], ids[6:9], ids[9:14]]
    # rows: two decodes (contexts 50 and 20), a 30-token prompt, a 25-token chunk after 40.
    seqs = [(1, 50), (1, 20), (30, 30), (25, 65)]
    slots, starts = [], 0
    for (qlen, ctx), table in zip(seqs, tables):
        for p in range(ctx - qlen, ctx):
            slots.append(int(table[p // bs]) * bs + p % bs)
    t = len(slots)
    q = torch.randn(t, heads, dim).to(BF16)
    k = torch.randn(t, kv_heads, dim).to(BF16)
    v = torch.randn(t, kv_heads, dim).to(BF16)
    width = max(len(x) for x in tables)
    dec_tables = torch.zeros(2, width, dtype=torch.int64)
    for i in range(2):
        dec_tables[i, :len(tables[i])] = tables[i]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decode_tokens=2, decode_block_tables=dec_tables,
        decode_seq_lens=torch.tensor([50, 20]), decode_max_seq_len=50,
        prefills=[PrefillChunk(2, 30, 30, tables[2][:2]), PrefillChunk(32, 25, 65, tables[3])],
        block_size=bs)
    assert pack_prefills(meta, torch.device("cpu")) is not None
    fast_cache, ref_cache = clean.clone(), clean.float()
    fast = cpu_attention.paged_attention(q, k, v, fast_cache, meta, dim ** -0.5)
    ref = torch_ref.paged_attention(q.float(), k.float(), v.float(), ref_cache, meta,
                                    dim ** -0.5)
    assert torch.equal(fast_cache.float(), ref_cache)                # the same K/V written
    torch.testing.assert_close(fast.float(), ref, rtol=2e-2, atol=2e-2)


@needs_ext
def test_kv_write_copies_strided_rows_to_their_slots_only():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    cache = torch.randn(2, 12, 16, 3, 64, generator=g).to(BF16)
    qkv = torch.randn(20, (9 + 6) * 64, generator=g).to(BF16)       # k, v: strided views
    k = qkv[:, 9 * 64:12 * 64].view(20, 3, 64)
    v = qkv[:, 12 * 64:].view(20, 3, 64)
    slots = torch.randperm(12 * 16, generator=g)[:20]
    want = cache.clone()
    torch_ref.write_kv(want, k, v, slots)
    ext.extension().write_kv(cache, k, v, slots)
    assert torch.equal(cache, want)


@needs_ext
def test_kv_write_rejects_a_bad_slot_before_writing_anything():
    cache = torch.zeros(2, 4, 16, 3, 64, dtype=BF16)
    k = torch.ones(3, 3, 64, dtype=BF16)
    with pytest.raises(RuntimeError, match="slot_mapping"):
        ext.extension().write_kv(cache, k, k, torch.tensor([0, 5, 64]))
    assert not cache.any()


@needs_ext
def test_head_dims_the_amx_kernel_cannot_take_go_to_the_reference(amx):
    """Head dim 16 (tiny test models): use_amx says no, and the CPU backend's answer still
    matches the reference."""
    cpu = torch.device("cpu")
    assert cpu_attention.use_amx(cpu, BF16, 64) is amx and cpu_attention.use_amx(cpu, BF16, 128) is amx
    assert not cpu_attention.use_amx(cpu, BF16, 16) and not cpu_attention.use_amx(cpu, BF16, 48)
    assert not cpu_attention.use_amx(cpu, torch.float32, 64)
    case = make_case([(12, 12)], 4, 2, 16, 16)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([int(case["tables"][0, 0]) * 16 + i for i in range(12)]),
        num_decode_tokens=0, decode_block_tables=torch.zeros(0, 0, dtype=torch.int64),
        decode_seq_lens=torch.zeros(0, dtype=torch.int64), decode_max_seq_len=0,
        prefills=[PrefillChunk(0, 12, 12, case["tables"][0, :1])], block_size=16)
    k = torch.randn(12, 2, 16).to(BF16)
    v = torch.randn(12, 2, 16).to(BF16)
    out = cpu_attention.paged_attention(case["q"], k, v, case["kv"].clone(), meta, 0.25)
    ref = torch_ref.paged_attention(case["q"].float(), k.float(), v.float(),
                                    case["kv"].float(), meta, 0.25)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


# Instruction sets of the CPU (as /proc/cpuinfo names them) that a -march=native build must
# have compiled for (as build_info names them).
NATIVE_ISA = {"avx512f": "avx512f", "avx512_bf16": "avx512bf16", "amx_bf16": "amx-bf16",
              "avx2": "avx2"}


@needs_ext
def test_the_native_build_is_in_use():
    """The extension falls back to portable flags when the -march=native build fails; that
    would silently drop the AVX-512 and AMX kernels (and skip their tests). On every CPU the
    build in use covers each instruction set the CPU has, and AMX runs where the CPU has it."""
    flags = cpu_flags()
    info = ext.build_info()
    assert info["available"], info
    isa = info["isa"].split()
    for cpu_name, build_name in NATIVE_ISA.items():
        if cpu_name in flags:
            assert build_name in isa, (cpu_name, info)
    assert bool(ext.extension().amx_available()) == ("amx_bf16" in flags
                                                            and "amx_tile" in flags), info

"""Tests of the fp8 (e4m3) KV cache's kernels (``--kv-cache-dtype fp8``): the rounding of the
C++ KV write against torch's own conversion, and the C++ decode kernel over an fp8 cache
against an fp64 reference on the cache's exact values, with every unused slot poisoned.

Invariants under test: the write rounds each value to the nearest e4m3 (ties to even),
saturating at +-448, and touches no slot outside ``slot_mapping``; decode over an fp8 cache
reads only each sequence's own tokens, widening them exactly, with bf16 or fp32 queries; so
does the AMX prefill kernel over an fp8 cache.
Inputs are fresh random each run.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from pagoda.attention import cpu_decode, torch_ref  # noqa: E402
from pagoda.kernels import ext  # noqa: E402
from pagoda.attention.metadata import AttentionMetadata  # noqa: E402

from native import needs_ext, tile_kernels  # noqa: E402
from test_amx_attention import make_case, ragged_chunks, run_amx  # noqa: E402
from test_amx_attention import reference as amx_reference  # noqa: E402
from test_cpu_decode import check, lens_for, make_inputs, reference  # noqa: E402

pytestmark = [needs_ext, pytest.mark.usefixtures("random_seed")]

FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def every_e4m3_value() -> torch.Tensor:
    """The 254 finite non-NaN e4m3 values (as fp32), ascending."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    return values[values.isfinite()].unique()


def hard_values(dtype: torch.dtype) -> torch.Tensor:
    """Every e4m3 value, the midpoints between neighbours (exact ties), values just off the
    midpoints, subnormals, values past 448 and random ones over many magnitudes."""
    v = every_e4m3_value()
    mid = (v[1:] + v[:-1]) / 2
    near = torch.cat([mid * (1 + 2.0 ** -12), mid * (1 - 2.0 ** -12)])
    big = torch.tensor([448.0, 449.0, 463.9, 464.0, 465.0, 480.0, 1e4, 3e38])
    tiny = torch.tensor([2.0 ** -10, 2.0 ** -9 * 1.5, 2.0 ** -9 * 2.5, 1e-30, 0.0])
    rand = torch.randn(4096) * torch.exp2(torch.randint(-12, 10, (4096,)).float())
    x = torch.cat([v, mid, near, big, -big, tiny, -tiny, rand])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_write_rounds_like_torch(dtype: torch.dtype) -> None:
    """Bit for bit the reference's rounding (torch's conversion of the value clamped to
    +-448), through the C++ write at random slots; every other slot is left as it was."""
    x = hard_values(dtype)
    heads, dim = 2, 8
    x = x[: x.numel() // (heads * dim) * heads * dim].view(-1, heads, dim)
    k, v = x, -x.flip(0)
    tokens = k.shape[0]
    block_size, num_blocks = 16, -(-tokens // 16) + 3
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    fill = torch.randint(0, 256, (2, num_blocks, block_size, heads, dim), dtype=torch.uint8)
    cache = fill.clone().view(FP8)
    ext.extension().write_kv(cache, k, v, slots)
    got = cache.view(torch.uint8).view(2, -1, heads, dim)
    want_k = torch_ref.to_cache_dtype(k, FP8).view(torch.uint8)
    want_v = torch_ref.to_cache_dtype(v, FP8).view(torch.uint8)
    assert torch.equal(got[0, slots], want_k)
    assert torch.equal(got[1, slots], want_v)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(got[:, untouched], fill.view(2, -1, heads, dim)[:, untouched])


def test_write_saturates_and_keeps_sign() -> None:
    x = torch.tensor([1e6, -1e6, float("inf"), float("-inf"), 448.0, -0.0]).view(6, 1, 1)
    cache = torch.zeros(2, 1, 8, 1, 1, dtype=FP8)
    ext.extension().write_kv(cache, x, x, torch.arange(6))
    assert cache[0, 0, :6, 0, 0].float().tolist() == [448.0, -448.0, 448.0, -448.0, 448.0, 0.0]
    assert cache[0, 0, 5].view(torch.uint8).item() == 0x80   # -0 keeps its sign


def test_write_rejects_other_dtypes() -> None:
    cache = torch.zeros(2, 1, 4, 1, 8, dtype=FP8)
    k = torch.zeros(1, 1, 8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ext.extension().write_kv(cache, k, k, torch.zeros(1, dtype=torch.int64))


def fp8_inputs(seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
               q_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """make_inputs' poisoned random cache, rounded to fp8 (NaN and huge values become NaN),
    with queries in ``q_dtype``; K/V are scaled so that the rounding is not the whole story."""
    q, kv, tables, lens = make_inputs(seq_lens, heads, kv_heads, head_dim, block_size,
                                      torch.float32)
    kv = (kv * 3).to(FP8)
    return q.to(q_dtype), kv, tables, lens


@pytest.mark.parametrize("q_dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_matches_reference(block_size: int, group: int, head_dim: int,
                                  q_dtype: torch.dtype) -> None:
    q, kv, tables, lens = fp8_inputs(lens_for(block_size), 2 * group, 2, head_dim, block_size,
                                     q_dtype)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full_like(q, float("nan"))
    got = cpu_decode.paged_decode_attention(q, kv, tables, lens, scale, out=out)
    assert got is out
    check(out, reference(q, kv, tables, lens, scale), q_dtype)


@pytest.mark.parametrize("q_dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_portable_path_and_odd_head_dim(head_dim: int, q_dtype: torch.dtype) -> None:
    """The auto-vectorised tile code (CPUs without AVX-512, head dims the AVX-512 code does
    not cover) over an fp8 cache."""
    q, kv, tables, lens = fp8_inputs(lens_for(16), 9, 3, head_dim, 16, q_dtype)
    scale = 1.0 / math.sqrt(head_dim)
    ref = reference(q, kv, tables, lens, scale)
    for fn in ("paged_decode", "paged_decode_portable"):
        out = torch.full_like(q, float("nan"))
        cpu_decode._call(fn, q, kv, tables, lens, scale, out)
        check(out, ref, q_dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_long_contexts_split_over_threads(threads: int) -> None:
    """Few long sequences: contexts split into chunks whose partial softmax states merge."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, kv, tables, lens = fp8_inputs([3000, 1777], 9, 3, 64, 16, torch.bfloat16)
        out = cpu_decode.paged_decode_attention(q, kv, tables, lens, 0.125)
    finally:
        torch.set_num_threads(old)
    check(out, reference(q, kv, tables, lens, 0.125), torch.bfloat16)


def test_torch_reference_backend_agrees() -> None:
    """``torch_ref``'s decode over an fp8 cache (what PAGODA_ATTENTION=torch runs) widens the
    same values: it agrees with the kernel."""
    lens = [5, 40, 333]
    q, kv, tables, seq_lens = fp8_inputs(lens, 9, 3, 64, 16, torch.float32)
    kv = torch.nan_to_num(kv.float(), nan=0.0).to(FP8)   # the reference pads with real slots
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), num_decode_tokens=len(lens),
        decode_block_tables=tables, decode_seq_lens=seq_lens, decode_max_seq_len=max(lens),
        block_size=16, prefills=[])
    ref = torch_ref.decode_attention(q, kv,
        meta.decode_block_tables, meta.decode_seq_lens, meta.decode_max_seq_len, 0.125)
    out = cpu_decode.paged_decode_attention(q, kv, tables, seq_lens, 0.125)
    check(out, ref.double(), torch.float32)


def test_other_query_dtypes_raise() -> None:
    q, kv, tables, lens = fp8_inputs([20, 5], 4, 2, 64, 16, torch.float16)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        cpu_decode.paged_decode_attention(q, kv, tables, lens, 0.125)


@pytest.mark.parametrize("tiles", tile_kernels())
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (16, 2, 128)],
                         ids=["gqa3", "gqa8-d128"])
def test_amx_prefill_over_fp8_matches_reference(block_size, heads, kv_heads, head_dim, tiles):
    """The AMX prefill kernel widens an fp8 cache exactly: the same answer as fp64 attention
    over the cache's values (poisoned unused slots turn NaN in fp8 and must stay unread)."""
    case = make_case(ragged_chunks(block_size), heads, kv_heads, head_dim, block_size)
    case["kv"] = (case["kv"].float() * 3).to(FP8)
    scale = head_dim ** -0.5
    out = run_amx(case, scale, amx=tiles)
    assert torch.isfinite(out).all(), "NaN/inf reached the output (a stray read or no write)"
    ref = amx_reference(case, scale)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1.5e-2 * max(1.0, ref.abs().max().item()), f"max abs error {err}"

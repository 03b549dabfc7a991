"""Paged attention in Triton for CUDA: the KV-cache write, a causal prefill kernel over a paged
context (FlashAttention-2, Dao 2023) and a split-context decode kernel (Flash-Decoding, Dao et
al. 2023), all reading K/V only through block tables (PagedAttention, Kwon et al., SOSP'23).

Invariant (the same as the PyTorch reference, ``torch_ref.py``): a query row of a sequence sees
exactly the K/V of tokens ``[0, context_len)`` of that sequence, token ``i`` living at block
``block_table[i // block_size]``, offset ``i % block_size``; no other cache slot is read, so
garbage in slots a sequence does not own never reaches its output. Softmax statistics and
accumulators are fp32 whatever the cache dtype.

Two per-layer options (Gemma 2/3, Mistral; the contract of ``backend.AttentionFn``), each a
constexpr flag so that a layer without them compiles to the plain kernels. A sliding
``window`` W > 0: the query at position p sees keys (p - W, p] only. The prefill starts each
query tile's KV loop at the first key its first row sees and masks the window's edge per
element, as the causal one; the decode splits only [max(0, seq_len - W), seq_len) among its
programs (splits past its end stay empty and the reduce skips them). So no key before the
window of a step's first query is ever loaded, and a block wholly before it may be freed:
its table entry is never read. A ``softcap`` c > 0: each score s = scale·q·k becomes
c·tanh(s / c) before the softmax; the kernels work in log2 units (exp2), so they compute
c·log2(e)·tanh(s / c), the cap applied to the true score.

Layouts follow ``metadata.py``: ``kv_cache`` is (2, num_blocks, block_size, Hkv, D) with K at 0
and V at 1 (head dim contiguous); q is (T, H, D); query head ``h`` reads KV head
``h // (H // Hkv)``. The decode kernel serves the ``G = H // Hkv`` query heads of a KV head in
one program, so each K/V row is loaded once for all of them (GQA without repeating K/V).

An fp8 cache (``torch.float8_e4m3fn``, ``--kv-cache-dtype fp8``; the contract of
``torch_ref.py``) stores K and V rounded to e4m3, to nearest with ties to even and saturating at
+-448 (NaN stays NaN, as torch's conversion keeps it); prefill and decode widen what they load,
exactly, to the queries' dtype, which stays as it is, with the same fp32 softmax and
accumulators; the output is in q's dtype. A prefill chunk reads even its own new K/V back from
the cache, rounded (as the CPU's AMX kernel does; torch_ref uses them as computed there).

The kernels see such a cache as its bytes (a uint8 view) and encode and decode e4m3 with
integer and fp32 arithmetic (:func:`_e4m3_encode`, :func:`_e4m3_decode`), not Triton's
``tl.float8e4nv`` casts. Compiled for sm_90 those casts are right (``cvt.rn.satfinite``), but
the interpreter's are not (Triton 3.7): its fp32 -> e4m3 rounds ties away from zero, loses the
carry of a round-up (1.9375 became 1.0), truncates subnormals, does not saturate (464 became
NaN, 500 and inf 256) and turns NaN into 384; its e4m3 -> fp32 reads the NaN bytes 0x7F / 0xFF
as +-480. The arithmetic computes the same in both modes, so what the interpreter tests check
is what the GPU runs, at the price of a few integer ops per value over the hardware
conversion.

Under ``--deterministic`` (:func:`paged_attention_invariant`) every query row, decode or prefill,
is a decode query over its own context, its keys split every ``KEY_SPLIT`` tokens from its
first and the parts merged in order by the reduce kernel (one loop, never a tree), with tiles
of a fixed size: a row's arithmetic then depends on its own keys only (batch-invariance, as the
CPU's ``cpu_attention.attend_invariant``; docs/deterministic.md).

Importing this module needs triton; set ``TRITON_INTERPRET=1`` before importing triton to run
the kernels on CPU tensors (the tests do).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from pagoda.attention.metadata import AttentionMetadata, PackedPrefills, pack_prefills
from pagoda.kernels.triton_gemm import mma, upcast_dots

LOG2_E = 1.4426950408889634
LOG2_E_K = tl.constexpr(LOG2_E)  # the same, for the kernels (a @triton.jit function reads
# constexpr globals only)
# Tile sizes. tl.dot needs every dimension >= 16 on the GPU.
MIN_DOT_DIM = 16
PREFILL_BLOCK_M = 64  # query rows per prefill program
PREFILL_BLOCK_N = 64  # context tokens per prefill tile
DECODE_BLOCK_N = 64  # context tokens per decode tile
KEY_SPLIT = 256  # --deterministic: keys per part of a row's softmax (a multiple of the tile)
# fp32 dots with exact (IEEE) products run on FMA units, not tensor cores, and hold far more
# per thread: at the tiles above they spill registers (ptxas, sm_90, head dim 128; see
# tests/unit/test_triton_compile.py), so fp32 takes smaller ones.
PREFILL_BLOCK_M_FP32 = 32
PREFILL_BLOCK_N_FP32 = 32
DECODE_BLOCK_N_FP32 = 16
# Flash-decoding: split each context over this many programs at most, aiming for about this
# many programs per streaming multiprocessor so the whole GPU streams K/V.
MAX_DECODE_SPLITS = 16
DECODE_PROGRAMS_PER_SM = 4
DEFAULT_SM_COUNT = 132  # H100 SXM, used where no CUDA device can be asked
# fp8 (e4m3fn) cache: the dtype, the rows an fp8 cache takes (rounded on the way in), and the
# queries that can attend over it (what it holds widens exactly to each).
FP8 = torch.float8_e4m3fn
FP8_SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32 queries over an fp8 cache: at Triton's default launch (4 warps, 3 stages) ptxas spills
# kilobytes of registers around the FMA dots (sm_90, Triton 3.7; any elementwise op between an
# fp32 tile's load and an IEEE dot does that, the widening here included). These do not spill
# (tests/unit/test_triton_compile.py); the prefill gives up software pipelining for it.
FP8_FP32_LAUNCH = {
    "prefill": {"num_warps": 8, "num_stages": 1},
    "decode": {"num_warps": 8, "num_stages": 3},
}
# The kernels' e4m3 arithmetic (constexpr: a @triton.jit function reads no other globals).
E4M3_MAX = tl.constexpr(0x7E)  # 448, the largest finite e4m3
E4M3_NAN = tl.constexpr(0x7F)  # e4m3fn has no infinities; 0x7F and 0xFF are NaN
F32_MIN_NORMAL_E4M3 = tl.constexpr(0x3C800000)  # 2^-6 as fp32 bits: e4m3's smallest normal
F32_INF = tl.constexpr(0x7F800000)
# fp32's exponent bias 127 becomes e4m3's 7, in the (exponent << 3 | mantissa) code.
E4M3_REBIAS = tl.constexpr((127 - 7) << 3)
# 1.5 * 2^14: added to |x| < 2^-6, a sum whose fp32 ulp is 2^-9, e4m3's subnormal step, so the
# add itself rounds x to a multiple of it, ties to even.
E4M3_SUBNORMAL_ROUNDER = tl.constexpr(24576.0)


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (Triton has no portable tanh): (1 - t) / (1 + t) with
    t = e^(-2|x|) <= 1, so it neither overflows nor loses small |x| to cancellation."""
    t = tl.exp2(tl.abs(x) * (-2.0 * LOG2_E_K))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _log2_scores(qk, scale_log2, softcap_log2, HAS_SOFTCAP: tl.constexpr):
    """q·k -> the scaled score in log2 units (the kernels exponentiate with exp2). Soft-capped:
    c·tanh(s / c)·log2(e) for the true score s = scale·q·k, written with c' = c·log2(e) and
    scale' = scale·log2(e) as c'·tanh(q·k·scale' / c') (scale' / c' = scale / c)."""
    if HAS_SOFTCAP:
        s = softcap_log2 * _tanh(qk * (scale_log2 / softcap_log2))
    else:
        s = qk * scale_log2
    return s


@triton.jit
def _window_start(seq_len, window, HAS_WINDOW: tl.constexpr):
    """The first key the last of ``seq_len`` tokens sees: max(0, seq_len - window) with a
    sliding window, else 0."""
    if HAS_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    else:
        start = seq_len * 0
    return start


@triton.jit
def _split_len(num_keys, NUM_SPLITS: tl.constexpr, KEY_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per flash-decoding split of a row that sees ``num_keys``: KEY_SPLIT > 0 fixes it
    (``--deterministic``: the parts of a row then depend on its own keys only), else the
    split count's share, rounded up to whole tiles (it adapts to the row and the grid)."""
    if KEY_SPLIT > 0:
        split_len = num_keys * 0 + KEY_SPLIT  # a tensor like the other branch's, not a constexpr
    else:
        split_len = tl.cdiv(tl.cdiv(num_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return split_len


@triton.jit
def _e4m3_encode(x):
    """fp32 -> e4m3fn bytes (uint8): to nearest, ties to even, saturating at +-448 (inf too),
    NaN to NaN; the sign kept (-0 too). As torch's ``x.clamp(-448, 448).to(float8_e4m3fn)``,
    in integer and fp32 arithmetic that Triton's interpreter and the GPU compute alike."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80  # fp32's sign bit, e4m3's bit 7
    mag = bits & 0x7FFFFFFF
    a = tl.minimum(mag, F32_INF)  # inf and NaN: no int32 overflow below
    # From 2^-6 up: keep 3 mantissa bits, rounding to nearest even (the carry of a round-up
    # bumps the exponent, as it should), then rebias the exponent.
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - E4M3_REBIAS
    # Below 2^-6: a multiple m of 2^-9 (m = 8 is 2^-6, code 8: right too). Larger values are
    # capped so that this unused branch stays finite (no overflow in the int conversion).
    af = tl.minimum(a, F32_MIN_NORMAL_E4M3).to(tl.float32, bitcast=True)
    sub = (((af + E4M3_SUBNORMAL_ROUNDER) - E4M3_SUBNORMAL_ROUNDER) * 512.0).to(tl.int32)
    code = tl.minimum(tl.where(a < F32_MIN_NORMAL_E4M3, sub, normal), E4M3_MAX)
    code = tl.where(mag > F32_INF, E4M3_NAN, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def _e4m3_decode(b):
    """e4m3fn bytes (uint8) -> fp32, exactly; 0x7F and 0xFF are NaN. The bits placed under an
    fp16's (5-bit exponent, bias 15) read as the value / 256, e4m3 subnormals landing on fp16
    subnormals, which the fp16 -> fp32 conversion widens exactly: no fp32 subnormal is ever
    computed on, so nothing depends on whether a backend flushes those."""
    i = b.to(tl.int32)
    h = ((i & 0x80) << 8) | ((i & 0x7F) << 7)
    x = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return tl.where((i & 0x7F) == E4M3_NAN, float("nan"), x)


@triton.jit
def _load_kv(ptrs, mask, FP8_CACHE: tl.constexpr):
    """K or V values from the cache, zero where masked; an fp8 cache's bytes widened to fp32
    (the caller narrows them, exactly, to the queries' dtype)."""
    if FP8_CACHE:
        x = _e4m3_decode(tl.load(ptrs, mask=mask, other=0))
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8_CACHE: tl.constexpr,
):
    """One program per token: copy its (Hkv, D) K and V rows to its slot (negative: skip);
    into an fp8 cache (seen as bytes), rounded."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)  # (BH, BD)
        dst = (
            (slot // BLOCK_SIZE) * stride_cb
            + (slot % BLOCK_SIZE) * stride_cs
            + h[:, None] * stride_ch
            + d[None, :]
        )
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        if FP8_CACHE:
            k = _e4m3_encode(k.to(tl.float32))
            v = _e4m3_encode(v.to(tl.float32))
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    query_start_ptr,
    context_lens_ptr,
    block_tables_ptr,
    scale_log2,
    window,
    softcap_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Program (query tile, chunk, query head): FlashAttention-2 over the chunk's paged
    context, causal with the diagonal shifted by the tokens cached before the chunk.

        context:  [ 0 ........ context_len - query_len | query rows ... context_len )
        row i sees keys [0, context_len - query_len + i]

    HAS_WINDOW: row i at position p sees keys (p - window, p] only. The KV loop of a tile
    starts at the first key its first row sees and ends after the last row's position; rows
    further down mask the keys below their own window, as every row masks those past its
    diagonal. Keys below the first row's window are never loaded: their blocks may be gone.

        keys:     0 ....... kv_lo ...................... kv_end
        row 0                [ p0 - window + 1  ...  p0 ]
        row BM-1                      [ p0 + BM - window  ...  p0 + BM - 1 ]

    HAS_SOFTCAP: each score s = scale·q·k becomes c·tanh(s / c) (``softcap_log2`` = c·log2 e).
    """
    tile, n, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(query_start_ptr + n)
    query_len = tl.load(query_start_ptr + n + 1) - q_start
    if tile * BLOCK_M < query_len:
        context_len = tl.load(context_lens_ptr + n)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        row_ok = rows < query_len
        q_pos = context_len - query_len + rows  # (BM,)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_off = (q_start + rows)[:, None].to(tl.int64) * stride_qt + head * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys past the tile's last query position are masked for every row: stop there.
        kv_end = tl.minimum(
            context_len, context_len - query_len + tl.minimum((tile + 1) * BLOCK_M, query_len)
        )
        # Keys before the window of the tile's first row are masked for every row: start past.
        kv_lo = _window_start(context_len - query_len + tile * BLOCK_M + 1, window, HAS_WINDOW)
        for k0 in range(kv_lo, kv_end, BLOCK_N):
            cols = k0 + tl.arange(0, BLOCK_N)  # (BN,)
            col_ok = cols < kv_end
            blocks = tl.load(
                block_tables_ptr + n * stride_bt + cols // BLOCK_SIZE, mask=col_ok, other=0
            ).to(tl.int64)
            kv_off = (
                blocks * stride_cb + (cols % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
            )  # (BN,)
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = _load_kv(k_cache_ptr + kv_off[:, None] + d[None, :], kv_mask, FP8_CACHE).to(q.dtype)
            s = mma(q, tl.trans(k), IEEE, UPCAST)  # (BM, BN)
            s = _log2_scores(s, scale_log2, softcap_log2, HAS_SOFTCAP)
            visible = col_ok[None, :] & (cols[None, :] <= q_pos[:, None])  # (BM, BN)
            if HAS_WINDOW:
                visible = visible & (cols[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            if HAS_WINDOW:
                # A row whose window starts past this tile sees none of it (m_new = -inf):
                # exponentiate against 0 so that its state stays zero, not exp2(-inf + inf).
                m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_exp = m_new  # every row sees key 0 in the first tile: finite from the start
            alpha = tl.exp2(m_i - m_exp)
            p = tl.exp2(s - m_exp[:, None])  # (BM, BN)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_kv(v_cache_ptr + kv_off[:, None] + d[None, :], kv_mask, FP8_CACHE).to(q.dtype)
            pv = mma(p.to(v.dtype), v, IEEE, UPCAST)  # (BM, BD)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if HAS_WINDOW:
            # Padding rows past the chunk may see no key at all; the others see their own.
            l_i = tl.where(row_ok, l_i, 1.0)
        o = acc / l_i[:, None]
        o_off = (q_start + rows)[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :]
        tl.store(
            out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :]
        )


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    scale_log2,
    window,
    softcap_log2,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    NUM_SPLITS: tl.constexpr,
    KEY_SPLIT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Program (sequence, KV head, split): the G query heads of the KV head over the split's
    share of the keys they see, [lo, seq_len) with lo = max(0, seq_len - window) under
    HAS_WINDOW, else 0. Split s covers keys [lo + s * L, min(lo + (s + 1) * L, seq_len)) with
    L = ceil(ceil((seq_len - lo) / NUM_SPLITS) / BLOCK_N) * BLOCK_N, so the partition adapts
    to each sequence and the grid depends on nothing but the batch size (CUDA graphs); a split
    past the end does nothing, and no key below lo is loaded (its block may be gone). KEY_SPLIT
    > 0 fixes L = KEY_SPLIT (``--deterministic``; NUM_SPLITS then only bounds the parts).

        keys:    0 ....... lo [ split 0 | split 1 | split 2 ) seq_len      (splits 3.. empty)

    With one split the result is final and goes straight to ``out``; otherwise the normalised
    partial output and its log2-sum-exp go to ``mid_o`` / ``mid_lse`` for
    :func:`_decode_reduce_kernel`. HAS_SOFTCAP: as in :func:`_prefill_kernel`."""
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = _window_start(seq_len, window, HAS_WINDOW)
    split_len = _split_len(seq_len - lo, NUM_SPLITS, KEY_SPLIT, BLOCK_N)
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if start < end:
        g = tl.arange(0, BLOCK_G)
        heads = kv_head * GROUP + g  # (BG,)
        g_ok = g < GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BG, BD)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for t0 in range(start, end, BLOCK_N):
            cols = t0 + tl.arange(0, BLOCK_N)  # (BN,)
            col_ok = cols < end
            blocks = tl.load(
                block_tables_ptr + b * stride_bt + cols // BLOCK_SIZE, mask=col_ok, other=0
            ).to(tl.int64)
            kv_off = (
                blocks * stride_cb + (cols % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
            )  # (BN,)
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = _load_kv(k_cache_ptr + kv_off[:, None] + d[None, :], kv_mask, FP8_CACHE).to(q.dtype)
            s = mma(q, tl.trans(k), IEEE, UPCAST)  # (BG, BN)
            s = _log2_scores(s, scale_log2, softcap_log2, HAS_SOFTCAP)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the tile has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])  # (BG, BN)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_kv(v_cache_ptr + kv_off[:, None] + d[None, :], kv_mask, FP8_CACHE).to(q.dtype)
            pv = mma(p.to(v.dtype), v, IEEE, UPCAST)  # (BG, BD)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        o = acc / l_i[:, None]  # (BG, BD)
        mask = g_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            tl.store(
                out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=mask,
            )
        else:
            mo = b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + d[None, :]
            tl.store(mid_o_ptr + mo, o, mask=mask)
            tl.store(
                mid_lse_ptr + b * stride_mlb + heads * stride_mlh + split,
                m_i + tl.log2(l_i),
                mask=g_ok,
            )


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    window,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    KEY_SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Program (sequence, query head): merge the non-empty splits' partial softmax states
    (the partition of :func:`_decode_split_kernel`; seq_len >= 1, so split 0 is never empty).
    A row with one non-empty split takes its output as it is, so its bits do not depend on
    whether the launch had one split or several (``--deterministic`` counts on it)."""
    b, head = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    num_keys = seq_len - _window_start(seq_len, window, HAS_WINDOW)
    split_len = _split_len(num_keys, NUM_SPLITS, KEY_SPLIT, BLOCK_N)
    num_valid = tl.cdiv(num_keys, split_len)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    mid = mid_o_ptr + b * stride_mob + head * stride_moh + d
    if num_valid == 1:  # as the split wrote it: what one split stores straight to ``out``
        res = tl.load(mid, mask=d_ok, other=0.0)
    else:
        m = tl.full([1], float("-inf"), tl.float32)
        l_sum = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s in range(0, num_valid):
            one = tl.zeros([1], tl.int32)  # a (1,) tensor, to keep m and l_sum (1,)
            lse = tl.load(mid_lse_ptr + b * stride_mlb + head * stride_mlh + s + one)  # (1,)
            o = tl.load(mid + s * stride_mos, mask=d_ok, other=0.0)  # (BD,)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * o
            l_sum = l_sum * alpha + w
            m = m_new
        res = acc / l_sum
    tl.store(
        out_ptr + b * stride_ob + head * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=d_ok
    )


# ------------------------------------------------------------------------------------ wrappers
def write_kv_cache(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """kv_cache: (2, num_blocks, block_size, Hkv, D); k, v: (T, Hkv, D) with a contiguous head
    dim; slot_mapping: (T,) int, ``block * block_size + offset``. Slots < 0 are skipped (padded
    rows of a CUDA-graph batch)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_cache(kv_cache, k)
    if v.dtype != k.dtype:
        raise ValueError(f"k and v dtypes differ ({k.dtype}, {v.dtype})")
    k_cache, v_cache = _cache_views(kv_cache)  # (NB, BS, Hkv, D) each
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2],
        FP8_CACHE=kv_cache.dtype == FP8,
    )


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    packed: PackedPrefills,
    scale: float,
    out: torch.Tensor,
    *,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of prefill chunks over their paged context (K/V already written).
    q, out: (P, H, D), the prefill rows only, chunk n at rows ``packed.query_start_loc[n:n+2]``.
    ``window`` > 0: the query at position p sees keys (p - window, p] only, and no block
    wholly before its chunk's first window is read; ``softcap`` > 0: each scaled score s
    becomes softcap * tanh(s / softcap). 0 turns either off."""
    _check_window_softcap(window, softcap)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    _check_cache(kv_cache, q)
    k_cache, v_cache = _cache_views(kv_cache)  # (NB, BS, Hkv, D) each
    num_chunks = packed.context_lens.shape[0]
    ieee = q.dtype == torch.float32
    tile_m, tile_n = (
        (PREFILL_BLOCK_M_FP32, PREFILL_BLOCK_N_FP32) if ieee else (PREFILL_BLOCK_M, PREFILL_BLOCK_N)
    )
    block_m = _dot_dim(min(tile_m, triton.next_power_of_2(packed.max_query_len)))
    grid = (triton.cdiv(packed.max_query_len, block_m), num_chunks, num_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        packed.query_start_loc,
        packed.context_lens,
        packed.block_tables,
        scale * LOG2_E,
        window,
        softcap * LOG2_E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        packed.block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=_dot_dim(triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=block_m,
        BLOCK_N=tile_n,
        IEEE=ieee,
        UPCAST=upcast_dots(q.dtype),
        FP8_CACHE=kv_cache.dtype == FP8,
        HAS_WINDOW=window > 0,
        HAS_SOFTCAP=softcap > 0,
        **_launch_options("prefill", q.dtype, kv_cache.dtype),
    )
    return out


def default_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> int:
    """Flash-decoding's split count: enough programs to fill the GPU when the batch alone does
    not, never more splits than the longest context has tiles."""
    programs = batch * num_kv_heads
    target = DECODE_PROGRAMS_PER_SM * _sm_count(device)
    want = max(1, target // max(programs, 1))
    tiles = max(1, triton.cdiv(max_seq_len, DECODE_BLOCK_N))
    return int(min(want, tiles, MAX_DECODE_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: Optional[torch.Tensor] = None,
    num_splits: Optional[int] = None,
    max_seq_len: Optional[int] = None,
    *,
    window: int = 0,
    softcap: float = 0.0,
    key_split: int = 0,
) -> torch.Tensor:
    """One query token per sequence over its paged context (the same contract as
    ``cpu_decode.paged_decode_attention``). q: (B, H, D); block_tables: (B, W) int;
    seq_lens: (B,) int, 1 <= seq_lens[b] <= W * block_size. Returns (B, H, D) in q's dtype.
    ``num_splits`` fixes the flash-decoding split count (CUDA graphs capture one); otherwise it
    follows :func:`default_num_splits` for ``max_seq_len`` (default W * block_size), or for
    the window where that is shorter. ``window`` > 0: sequence b sees only its keys
    [max(0, seq_lens[b] - window), seq_lens[b]), and its table entries before them are never
    read; ``softcap`` > 0: each scaled score s becomes softcap * tanh(s / softcap).
    ``key_split`` > 0 (a multiple of the decode tile, 64): each row's keys are split every
    ``key_split`` tokens from its first and the parts merged in order, whatever the batch
    (``--deterministic``; ``num_splits`` is then ignored)."""
    _check_window_softcap(window, softcap)
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    _check_cache(kv_cache, q)
    longest = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    if window:
        longest = min(longest, window)  # the keys one query sees, at most
    if key_split:
        if key_split % DECODE_BLOCK_N:
            raise ValueError(f"key_split ({key_split}) must be a multiple of {DECODE_BLOCK_N}")
        num_splits = triton.cdiv(longest, key_split)
    elif num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, longest, q.device)
    group = num_heads // num_kv_heads
    k_cache, v_cache = _cache_views(kv_cache)  # (NB, BS, Hkv, D) each
    if num_splits > 1:
        mid_o = torch.empty(
            (batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )  # (B, H, S, D)
        mid_lse = torch.empty(
            (batch, num_heads, num_splits), dtype=torch.float32, device=q.device
        )  # (B, H, S)
    else:
        mid_o = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)
    block_d = _dot_dim(triton.next_power_of_2(head_dim))
    ieee = q.dtype == torch.float32
    block_n = DECODE_BLOCK_N_FP32 if ieee else DECODE_BLOCK_N  # the reduce must use the same
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        mid_o,
        mid_lse,
        scale * LOG2_E,
        window,
        softcap * LOG2_E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        NUM_SPLITS=num_splits,
        KEY_SPLIT=key_split,
        GROUP=group,
        BLOCK_G=_dot_dim(triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        IEEE=ieee,
        UPCAST=upcast_dots(q.dtype),
        FP8_CACHE=kv_cache.dtype == FP8,
        HAS_WINDOW=window > 0,
        HAS_SOFTCAP=softcap > 0,
        **_launch_options("decode", q.dtype, kv_cache.dtype),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            mid_o,
            mid_lse,
            seq_lens,
            out,
            window,
            mid_o.stride(0),
            mid_o.stride(1),
            mid_o.stride(2),
            mid_lse.stride(0),
            mid_lse.stride(1),
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            KEY_SPLIT=key_split,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            HAS_WINDOW=window > 0,
        )
    return out


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
    """The whole layer's attention, as ``torch_ref.paged_attention``: write K/V at
    ``meta.slot_mapping``, then decode rows ``[0, D)`` (``meta.decode_num_splits`` splits, or
    the default) and prefill rows ``[D, T)`` (over ``meta.packed``: the runner's packing).
    q: (T, H, D); k, v: (T, Hkv, D). Returns (T, H, D). ``window``, ``softcap``: as
    ``backend.AttentionFn`` (0: off)."""
    write_kv_cache(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)  # (T, H, D)
    d = meta.num_decode_tokens
    if d:
        paged_decode_attention(
            q[:d],
            kv_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            scale,
            out=out[:d],
            num_splits=meta.decode_num_splits,
            max_seq_len=meta.decode_max_seq_len,
            window=window,
            softcap=softcap,
        )
    if meta.prefills:
        packed = meta.packed(q.device)
        assert packed is not None  # there are prefill chunks
        paged_prefill_attention(
            q[d:], kv_cache, packed, scale, out[d:], window=window, softcap=softcap
        )
    return out


def paged_attention_invariant(
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
    """:func:`paged_attention`, batch-invariant (``--deterministic``): the KV write, then one
    decode-kernel launch in which every row, decode or prefill, reads its own context from the
    cache (``metadata.RowContexts``) split every ``KEY_SPLIT`` keys. A row's arithmetic is then
    fixed by its position and its keys, whatever its batch, its chunk or its prefix hit. A
    decode-only step reads the decode tables as they are (so a CUDA graph's static buffers
    serve: the split count follows their width). q: (T, H, D) -> (T, H, D)."""
    write_kv_cache(kv_cache, k, v, meta.slot_mapping)
    if meta.prefills:
        rows = meta.rows()
        tables, lens = rows.block_tables, rows.seq_lens
    else:
        tables, lens = meta.decode_block_tables, meta.decode_seq_lens
    return paged_decode_attention(
        q, kv_cache, tables, lens, scale, window=window, softcap=softcap, key_split=KEY_SPLIT
    )


def _dot_dim(n: int) -> int:
    return max(MIN_DOT_DIM, n)


def _check_window_softcap(window: int, softcap: float) -> None:
    if window < 0 or softcap < 0:
        raise ValueError(f"window ({window}) and softcap ({softcap}) must be >= 0 (0: off)")


def _check_cache(kv_cache: torch.Tensor, x: torch.Tensor) -> None:
    """x (q, or the k/v rows to write) must have the cache's dtype, or, over an fp8 cache, one
    of ``FP8_SOURCE_DTYPES``."""
    if kv_cache.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("the head dim of the KV cache and of q/k/v must be contiguous")
    if kv_cache.dtype == FP8 and x.dtype in FP8_SOURCE_DTYPES:
        return
    if kv_cache.dtype != x.dtype:
        raise ValueError(f"KV cache dtype {kv_cache.dtype} differs from the input's {x.dtype}")


def _cache_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V halves, (NB, BS, Hkv, D) each; an fp8 cache as its bytes (uint8), which the
    kernels encode and decode themselves (see the module docstring)."""
    if kv_cache.dtype == FP8:
        kv_cache = kv_cache.view(torch.uint8)
    return kv_cache[0], kv_cache[1]


def _launch_options(kernel: str, q_dtype: torch.dtype, cache_dtype: torch.dtype) -> dict[str, int]:
    """num_warps / num_stages of a "prefill" or "decode" launch: Triton's defaults, except
    for fp32 queries over an fp8 cache (see FP8_FP32_LAUNCH)."""
    if cache_dtype == FP8 and q_dtype == torch.float32:
        return dict(FP8_FP32_LAUNCH[kernel])
    return {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


__all__ = [
    "PackedPrefills",
    "pack_prefills",
    "write_kv_cache",
    "paged_prefill_attention",
    "paged_decode_attention",
    "paged_attention",
    "paged_attention_invariant",
    "default_num_splits",
]

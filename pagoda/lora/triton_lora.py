"""The grouped LoRA delta on CUDA in Triton: Punica's SGMV (Chen et al., "Punica: Multi-Tenant
LoRA Serving", MLSys'24) as two kernels, a shrink ``h = x_seg @ a[slot].T`` into an fp32
buffer and an expand ``out_seg += h @ b[slot].T``, each over the grid (segment, row block,
column block).

Invariant: the contract of ``punica.py``. A program reads its segment's ``(start, rows, slot)``
and touches rows ``start .. start + rows`` only (row blocks past a segment's end return at
once; every load and store is masked to the segment's rows and to R, K, N), and A and B of its
slot only; so rows outside every segment keep their base output, bit for bit, and NaN in an
unused slot never reaches the output. Sums are fp32: the shrink's dot of the model dtype, h
fp32, the expand's dot in fp32 (tf32 on the GPU for 16-bit models, full fp32 for fp32 ones),
rounded once into ``out``.

Importing this module does not need triton (:func:`usable` says whether the kernels run).
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors,
as the tests do; the interpreter's fp32 -> bf16 conversion truncates, so there the final
rounding is done with integer ops (to nearest, ties to even), as on the GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from pagoda import envs
from pagoda.lora.punica import LoRABatch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the module imports, usable() is False
    _TRITON = False
else:
    _TRITON = True

_jit: Any = triton.jit if _TRITON else (lambda fn: fn)

# Read once, at import: the moment triton reads it to decorate the kernels below.
_INTERPRETED = envs.TRITON_INTERPRET()

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_M = 16  # rows of a segment per program (decode segments are short)
BLOCK_K = 64  # shrink: K per dot step
BLOCK_N = 64  # expand: columns of out per program
MAX_BLOCK_R = 64  # R per program (shrink) and per dot step (expand)


@functools.lru_cache(maxsize=None)
def usable(dtype: torch.dtype) -> bool:
    """The kernels take ``dtype`` (fp16, bf16, fp32) and triton imports; the caller checks the
    device (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    return _TRITON and dtype in DTYPES


@_jit
def _to_dtype(x, DTYPE: tl.constexpr, SOFT: tl.constexpr):
    """fp32 x in DTYPE, rounded to nearest (ties to even). SOFT: bf16 by integer ops, for the
    interpreter, whose conversion truncates."""
    if SOFT and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DTYPE)
    return x.to(DTYPE)


@_jit
def _segment(seg_ptr, g):
    """Segment g of the (G, 3) int32 table: first row, rows, slot."""
    start = tl.load(seg_ptr + 3 * g).to(tl.int64)
    rows = tl.load(seg_ptr + 3 * g + 1)
    slot = tl.load(seg_ptr + 3 * g + 2).to(tl.int64)
    return start, rows, slot


@_jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    seg_ptr,
    stride_x,
    stride_h,
    K,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (segment, row block, R block): h[rows, r] = x[rows] @ a[slot, r].T, fp32.
    UPCAST: widen 16-bit operands before the dot, for the interpreter, whose tl.dot multiplies
    bf16 bit patterns (triton-lang/triton#11584); their products are exact in fp32, so this is
    what the GPU's MMA computes."""
    start, rows, slot = _segment(seg_ptr, tl.program_id(0))
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows within the segment
    if tl.program_id(1) * BLOCK_M >= rows:
        return
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    m_ok, r_ok = m < rows, r < R
    row = start + m
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_ok = k < K
        xs = tl.load(  # (BM, BK)
            x_ptr + row[:, None] * stride_x + k[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        at = tl.load(  # (BK, BR): a[slot, r, k], transposed
            a_ptr + (slot * R + r[None, :]) * K + k[:, None],
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            xs, at = xs.to(tl.float32), at.to(tl.float32)
        acc = tl.dot(xs, at, acc, input_precision=PRECISION)
    h = h_ptr + row[:, None] * stride_h + r[None, :]
    tl.store(h, acc, mask=m_ok[:, None] & r_ok[None, :])


@_jit
def _expand_kernel(
    h_ptr,
    b_ptr,
    out_ptr,
    seg_ptr,
    stride_h,
    stride_o,
    N,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFT: tl.constexpr,
):
    """Program (segment, row block, N block): out[rows, n] += h[rows] @ b[slot, n].T."""
    start, rows, slot = _segment(seg_ptr, tl.program_id(0))
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    if tl.program_id(1) * BLOCK_M >= rows:
        return
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_ok, n_ok = m < rows, n < N
    row = start + m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # (BR,)
        r_ok = r < R
        hs = tl.load(  # (BM, BR) fp32
            h_ptr + row[:, None] * stride_h + r[None, :],
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        bt = tl.load(  # (BR, BN): b[slot, n, r], transposed
            b_ptr + (slot * N + n[None, :]) * R + r[:, None],
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(hs, bt, acc, input_precision=PRECISION)
    ok = m_ok[:, None] & n_ok[None, :]
    o = out_ptr + row[:, None] * stride_o + n[None, :]
    base = tl.load(o, mask=ok, other=0.0).to(tl.float32)
    tl.store(o, _to_dtype(base + acc, out_ptr.dtype.element_ty, SOFT), mask=ok)


def lora_sgmv(
    out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch
) -> None:
    """out (T, N) += per segment (x (T, K) rows @ a[slot] (R, K).T) @ b[slot] (N, R).T; a is
    (S, R, K), b (S, N, R), contiguous, all of out's dtype; x and out with contiguous rows."""
    if not batch.segments:
        return
    max_rows = max(rows for _, rows, _ in batch.segments)
    _, rank, k = a.shape
    n = out.shape[1]
    if max_rows == 0 or rank == 0 or n == 0:
        return
    _check(out, x, a, b)
    segments = batch.tensor(out.device)  # (G, 3) int32: start, rows, slot
    h = torch.empty(out.shape[0], rank, dtype=torch.float32, device=out.device)  # (T, R)
    grid_m = triton.cdiv(max_rows, BLOCK_M)
    block_r = min(MAX_BLOCK_R, max(16, triton.next_power_of_2(rank)))
    fp32 = out.dtype == torch.float32
    _shrink_kernel[(len(batch.segments), grid_m, triton.cdiv(rank, block_r))](
        x, a, h, segments, x.stride(0), h.stride(0), k, rank,
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
        PRECISION="ieee" if fp32 or _INTERPRETED else "tf32", UPCAST=_INTERPRETED and not fp32,
    )  # fmt: skip
    _expand_kernel[(len(batch.segments), grid_m, triton.cdiv(n, BLOCK_N))](
        h, b, out, segments, h.stride(0), out.stride(0), n, rank,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=block_r,
        PRECISION="ieee" if fp32 or _INTERPRETED else "tf32", SOFT=_INTERPRETED,
    )  # fmt: skip


def _check(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if not (x.dtype == a.dtype == b.dtype == out.dtype):
        dtypes = ", ".join(str(t.dtype) for t in (out, x, a, b))
        raise ValueError(f"out, x, a and b dtypes differ: {dtypes}")
    if out.stride(1) != 1 or x.stride(1) != 1 or not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("x and out need contiguous rows, a and b must be contiguous")

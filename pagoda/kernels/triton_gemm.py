"""A batch-invariant matrix product in Triton (``--deterministic`` on CUDA): ``x @ w.T + b`` in
which an output element's sum over K does not depend on how many rows ``x`` has (the
batch-invariance of Thinking Machines' "Defeating Nondeterminism in LLM Inference", 2025).

cuBLAS picks its kernel, tile and split of K by the call's shape, so a row can round
differently at M = 1 and M = 3. Here one compiled kernel serves every M: tiles of fixed size
``BLOCK_M x BLOCK_N``, each output tile summed over K in steps of ``BLOCK_K``, in order, into
one fp32 accumulator (no split-K, no autotuning, M not specialised), so an element's value is
a function of its row of ``x`` and its column of ``w`` only::

    out[i, j] = (..((0 + x[i, 0:BK] . w[j, 0:BK]) + x[i, BK:2BK] . w[j, BK:2BK]) + ..) + b[j]

Invariant: row ``i`` of the result depends only on ``x[i]``, ``w`` and ``b``, never on the
other rows or their number (tests/unit/test_triton_deterministic.py checks every row of calls
of 1 to 130 rows against the row alone, under ``TRITON_INTERPRET=1``).

Importing this module needs triton; set ``TRITON_INTERPRET=1`` before importing triton to run
the kernel on CPU tensors (the tests do).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagoda import envs
from pagoda.kernels.triton_fused import round_to

# Read once, at import: the moment triton reads it to decorate the kernel below.
_INTERPRETED = envs.TRITON_INTERPRET()

# One tile shape for every call: what makes the product invariant (not tuned per shape).
BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64
LAUNCH = {"num_warps": 4, "num_stages": 3}


@triton.jit
def mma(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation, for this product and the attention kernels. IEEE: exact
    fp32 products (tl.dot would use TF32 on the GPU). UPCAST: widen the (bf16) operands
    first, for Triton's interpreter, whose tl.dot multiplies bf16 bit patterns
    (triton-lang/triton#11584); bf16 products are exact in fp32, so this computes what the
    GPU's bf16 MMA does."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


def upcast_dots(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET=1, bf16 operands of tl.dot must be widened (see :func:`mma`)."""
    return dtype == torch.bfloat16 and _INTERPRETED


@triton.jit(do_not_specialize=["M"])
def _invariant_gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    SOFT: tl.constexpr,
):
    """Program (row tile, column tile): out[rows, cols] = x[rows] @ w[cols].T (+ b[cols]), the
    K loop in order. IEEE: exact fp32 products (no TF32). UPCAST / SOFT: the interpreter's
    bf16 dot and rounding (:func:`mma`, ``triton_fused.round_to``)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BM, BK)
        b = tl.load(
            w_ptr + cols[None, :] * stride_wn + ks[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # (BK, BN): w's rows as columns
        acc += mma(a, b, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    out = round_to(acc, dtype, SOFT).to(dtype)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :],
        out,
        mask=row_ok[:, None] & col_ok[None, :],
    )


def invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x: (T, K); weight: (N, K) of x's dtype (fp32, bf16 or fp16), contiguous along K; bias:
    (N,) or None. Returns (T, N) in x's dtype, each row computed as it would be alone."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the weight {weight.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("the weight must be contiguous along K")
    rows, (cols, depth) = x.shape[0], weight.shape
    out = x.new_empty(rows, cols)
    if rows == 0:
        return out
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))
    _invariant_gemm_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        rows,
        cols,
        depth,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        IEEE=x.dtype == torch.float32,
        UPCAST=upcast_dots(x.dtype),
        SOFT=_INTERPRETED,
        **LAUNCH,
    )
    return out

"""Fused GPU kernels for the decoder in Triton: RMSNorm (after a residual add), Qwen3's
per-head q/k RMSNorm with RoPE, and SiLU(gate) * up, each one launch instead of the
reference's several.

Why: a decode step at small batch is bound by kernel count, not work. The reference RMSNorm
alone is eight elementwise kernels, so the reference layer is about sixty launches, and a
CUDA graph of Qwen3-0.6B's 28 layers would spend milliseconds just stepping through them.
Fused, a layer is about a dozen.

They keep the reference's roundings (``llama.py``), so tokens match the unfused path except
where an fp32 sum's order tips a rounding:
- norms sum in fp32, round the normalised row to the dtype, then multiply by the weight in
  the dtype;
- RoPE rounds ``cos`` and ``sin`` to the dtype and rounds each product and the sum;
- SiLU rounds before the multiply.

They run on CUDA for 16-bit floats. ``PAGODA_FUSED=0`` turns them off, and fp32 keeps the
reference ops, as on the CPU (``models/ops.py`` chooses, once, when a model is built). Under
``TRITON_INTERPRET=1`` the tests run them on CPU tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagoda import envs

# Read once, at import: the moment triton reads it to decorate the kernels below.
_INTERPRETED = envs.TRITON_INTERPRET()


@triton.jit
def round_to(x, DTYPE: tl.constexpr, SOFT: tl.constexpr):
    """x (fp32) rounded to DTYPE and back: what storing an intermediate in DTYPE does.
    SOFT: round to bf16 with integer ops (to nearest, ties to even), for Triton's interpreter,
    whose fp32 -> bf16 conversion truncates; the result then converts exactly."""
    if SOFT and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFT: tl.constexpr,
):
    """One program per row. HAS_RES: res += x (rounded, stored back), then normalise res."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x = round_to(x + r, dtype, SOFT)
        tl.store(res_ptr + row * stride_r + cols, x.to(dtype), mask=ok)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = round_to(round_to(x * rstd, dtype, SOFT) * w, dtype, SOFT)
    tl.store(out_ptr + row * stride_o + cols, y.to(dtype), mask=ok)


@triton.jit
def _norm_rope_heads(
    ptr,
    w_ptr,
    cos1,
    sin1,
    cos2,
    sin2,
    t,
    stride_t,
    stride_h,
    num_heads,
    eps,
    HAS_NORM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SOFT: tl.constexpr,
):
    """Token t's heads of one tensor in place: optional RMSNorm over each head, then RoPE."""
    dtype = ptr.dtype.element_ty
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    ok = (h < num_heads)[:, None]  # (BH, 1)
    base = ptr + t * stride_t + h[:, None] * stride_h + d[None, :]  # (BH, HALF)
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    if HAS_NORM:
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)  # (BH,)
        rstd = tl.rsqrt(ss / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)[None, :]
        x1 = round_to(round_to(x1 * rstd, dtype, SOFT) * w1, dtype, SOFT)
        x2 = round_to(round_to(x2 * rstd, dtype, SOFT) * w2, dtype, SOFT)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
    y1 = round_to(round_to(x1 * cos1, dtype, SOFT) + round_to(-x2 * sin1, dtype, SOFT), dtype, SOFT)
    y2 = round_to(round_to(x2 * cos2, dtype, SOFT) + round_to(x1 * sin2, dtype, SOFT), dtype, SOFT)
    tl.store(base, y1.to(dtype), mask=ok)
    tl.store(base + HALF, y2.to(dtype), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    qw_ptr,
    kw_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    num_q_heads,
    num_k_heads,
    eps,
    HAS_NORM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    SOFT: tl.constexpr,
):
    """One program per token: its q and k heads, in place."""
    t = tl.program_id(0).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)
    row = cos_ptr + pos * stride_cos
    cos1 = round_to(tl.load(row + d), dtype, SOFT)[None, :]  # (1, HALF)
    cos2 = round_to(tl.load(row + HALF + d), dtype, SOFT)[None, :]
    row = sin_ptr + pos * stride_cos
    sin1 = round_to(tl.load(row + d), dtype, SOFT)[None, :]
    sin2 = round_to(tl.load(row + HALF + d), dtype, SOFT)[None, :]
    _norm_rope_heads(
        q_ptr,
        qw_ptr,
        cos1,
        sin1,
        cos2,
        sin2,
        t,
        stride_qt,
        stride_qh,
        num_q_heads,
        eps,
        HAS_NORM,
        HALF,
        BLOCK_HQ,
        SOFT,
    )
    _norm_rope_heads(
        k_ptr,
        kw_ptr,
        cos1,
        sin1,
        cos2,
        sin2,
        t,
        stride_kt,
        stride_kh,
        num_k_heads,
        eps,
        HAS_NORM,
        HALF,
        BLOCK_HK,
        SOFT,
    )


@triton.jit
def _silu_mul_kernel(
    gu_ptr, out_ptr, stride_gu, stride_o, inter, BLOCK: tl.constexpr, SOFT: tl.constexpr
):
    """Program (row, column block): out = SiLU(gate) * up, gate | up side by side."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=ok, other=0.0).to(tl.float32)
    act = round_to(gate / (1.0 + tl.exp(-gate)), dtype, SOFT)
    tl.store(out_ptr + row * stride_o + cols, round_to(act * up, dtype, SOFT).to(dtype), mask=ok)


SILU_BLOCK = 1024


# ------------------------------------------------------------------------------------ wrappers
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x: (T, E) -> RMSNorm(x), or with ``residual``: residual += x in place and returns
    RMSNorm(residual)."""
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows:
        res = residual if residual is not None else x
        _check_rows(x, res, out)
        _rms_norm_kernel[(rows,)](
            x,
            res,
            weight,
            out,
            x.stride(0),
            res.stride(0),
            out.stride(0),
            n,
            eps,
            HAS_RES=residual is not None,
            BLOCK=triton.next_power_of_2(n),
            SOFT=_soft_round(),
        )
    return out


def qk_norm_rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    eps: float,
) -> None:
    """In place: q (T, H, D) and k (T, Hkv, D), each head RMSNorm-ed when weights are given
    (Qwen3), then rotated; cos, sin: fp32 (P, D); positions: (T,)."""
    tokens, num_heads, head_dim = q.shape
    if tokens == 0:
        return
    if not rope_supported(head_dim):
        raise ValueError(f"fused RoPE needs a power-of-two head dim >= 2, got {head_dim}")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("fused RoPE needs contiguous head dims and matching cos/sin tables")
    has_norm = q_weight is not None
    _qk_norm_rope_kernel[(tokens,)](
        q,
        k,
        q_weight if has_norm else q,
        k_weight if has_norm else k,
        cos,
        sin,
        positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        num_heads,
        k.shape[1],
        eps,
        HAS_NORM=has_norm,
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        SOFT=_soft_round(),
    )


def rope_supported(head_dim: int) -> bool:
    """The kernel tiles half a head with tl.arange, which needs a power of two."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2I) [gate | up] -> (T, I)."""
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        if gate_up.stride(1) != 1:
            raise ValueError("silu_mul needs a contiguous last dim")
        _silu_mul_kernel[(rows, triton.cdiv(inter, SILU_BLOCK))](
            gate_up,
            out,
            gate_up.stride(0),
            out.stride(0),
            inter,
            BLOCK=SILU_BLOCK,
            SOFT=_soft_round(),
        )
    return out


def _soft_round() -> bool:
    """Under TRITON_INTERPRET=1, round to bf16 in integer ops (see _round)."""
    return _INTERPRETED


def _check_rows(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError("fused RMSNorm needs rows with a contiguous last dim")

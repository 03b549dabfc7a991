"""The decoder's elementwise ops (RMSNorm, RMSNorm after a residual add, RoPE, Qwen3's per-head
q/k RMSNorm with RoPE, SiLU(gate) * up, Gemma's GELU(gate) * up), as one set chosen per model
when it is built and bound to its layers, so the forward does no dispatch (as vLLM's
``CustomOp`` picks its implementation in ``__init__``).

Three sets:
- ``REFERENCE``: plain PyTorch, every device and dtype; fp32 always takes it (the path compared
  token for token with Hugging Face).
- CPU fused (``kernels/cpu_fused.py``, the C++ extension): bf16 on the CPU.
- Triton fused (``kernels/triton_fused.py``): 16-bit floats on CUDA (on CPU tensors under
  ``TRITON_INTERPRET=1``, as the tests bind it); RoPE fused for power-of-two head dims.
``PAGODA_FUSED=0`` keeps the reference; the switch is read when the ops are chosen.

Invariant: every set computes what the reference does with the reference's roundings, so tokens
match except where an fp32 sum's order tips a rounding. Shapes: x (T, E); q (T, H, D),
k (T, Hkv, D); cos, sin: fp32 (P, D) tables; positions (T,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pagoda import envs
from pagoda.attention.backend import triton_available
from pagoda.kernels import cpu_fused

Tensor = torch.Tensor
QK = tuple[Tensor, Tensor]
FUSED_DTYPES_CUDA = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DecoderOps:
    """One implementation of each op. ``add_rms_norm(x, residual, w, eps)`` returns
    (RMSNorm(residual + x), residual + x), the fused kernels adding into ``residual`` in
    place; the RoPE ops may rotate q and k in place and return them."""

    name: str
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], QK]
    rope: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], QK]
    # (positions, q, k, cos, sin, q_weight, k_weight, eps): per-head RMSNorm, then RoPE.
    qk_norm_rope: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float], QK]
    silu_mul: Callable[[Tensor], Tensor]
    gelu_tanh_mul: Callable[[Tensor], Tensor]  # GeGLU (Gemma)


# ----------------------------------------------------------------------------------- reference
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Over the last dim: normalise in fp32, as the reference implementation does, then scale
    in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> QK:
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rope(positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> QK:
    """Rotate-half RoPE, the table rows rounded to q's dtype."""
    c = cos[positions].unsqueeze(1).to(q.dtype)  # (T, 1, D)
    s = sin[positions].unsqueeze(1).to(q.dtype)
    return rotate(q, c, s), rotate(k, c, s)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, in x's dtype (as the reference implementation does)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def silu_mul(gate_up: Tensor) -> Tensor:
    """(T, 2I) [gate | up] -> (T, I)."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul(gate_up: Tensor) -> Tensor:
    """GeGLU (Gemma): (T, 2I) [gate | up] -> GELU(gate, tanh approximation) * up, (T, I)."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def norm_heads_then(
    rope_op: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], QK],
) -> Callable[..., QK]:
    """qk_norm_rope as the reference RMSNorm over each head of q and k, then ``rope_op``."""

    def qk_norm_rope(
        positions: Tensor,
        q: Tensor,
        k: Tensor,
        cos: Tensor,
        sin: Tensor,
        q_weight: Tensor,
        k_weight: Tensor,
        eps: float,
    ) -> QK:
        return rope_op(positions, rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin)

    return qk_norm_rope


REFERENCE = DecoderOps(
    "torch", rms_norm, add_rms_norm, rope, norm_heads_then(rope), silu_mul, gelu_tanh_mul
)


# ----------------------------------------------------------------------------------- CPU fused
# Each looks its kernel up in cpu_fused when called (so tests can count or replace them).
def _cpu_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return cpu_fused.rms_norm(x, weight, eps)


def _cpu_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> QK:
    return cpu_fused.add_rms_norm(residual, x, weight, eps), residual


def _cpu_rope(positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> QK:
    cpu_fused.rope_(q, k, cos, sin, positions)  # in place
    return q, k


def _cpu_silu_mul(gate_up: Tensor) -> Tensor:
    return cpu_fused.silu_mul(gate_up)


def _cpu_gelu_tanh_mul(gate_up: Tensor) -> Tensor:
    return cpu_fused.gelu_tanh_mul(gate_up)


# The per-head q/k norms stay the reference's: the kernel normalises (T, E) rows only.
CPU_FUSED = DecoderOps(
    "cpu-fused",
    _cpu_rms_norm,
    _cpu_add_rms_norm,
    _cpu_rope,
    norm_heads_then(_cpu_rope),
    _cpu_silu_mul,
    _cpu_gelu_tanh_mul,
)


# -------------------------------------------------------------------------------- Triton fused
def triton_ops(head_dim: int) -> DecoderOps:
    """The Triton set for a model of ``head_dim``: RoPE (with Qwen3's q/k norms) is one
    kernel where it tiles the head dim (a power of two), else the reference's."""
    from pagoda.kernels import triton_fused as tf

    def norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return tf.rms_norm(x, weight, eps)

    def add_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> QK:
        return tf.rms_norm(x, weight, eps, residual=residual), residual

    def qk_norm_rope(
        positions: Tensor,
        q: Tensor,
        k: Tensor,
        cos: Tensor,
        sin: Tensor,
        q_weight: Optional[Tensor],
        k_weight: Optional[Tensor],
        eps: float,
    ) -> QK:
        tf.qk_norm_rope_(q, k, positions, cos, sin, q_weight, k_weight, eps)  # in place
        return q, k

    def fused_rope(positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> QK:
        return qk_norm_rope(positions, q, k, cos, sin, None, None, 0.0)

    def act(gate_up: Tensor) -> Tensor:
        return tf.silu_mul(gate_up)

    if not tf.rope_supported(head_dim):
        return DecoderOps("triton", norm, add_norm, rope, norm_heads_then(rope), act, gelu_tanh_mul)
    return DecoderOps("triton", norm, add_norm, fused_rope, qk_norm_rope, act, gelu_tanh_mul)


# ------------------------------------------------------------------------------------- choice
def select(device: torch.device, dtype: torch.dtype, head_dim: int) -> DecoderOps:
    """The set for activations of ``dtype`` on ``device``. Reads ``PAGODA_FUSED`` (and loads
    the extension or imports triton) now: call once, when the model is built."""
    if not envs.FUSED():
        return REFERENCE
    if cpu_fused.enabled_for(device, dtype):
        return CPU_FUSED
    if device.type == "cuda" and dtype in FUSED_DTYPES_CUDA and triton_available():
        return triton_ops(head_dim)
    return REFERENCE

"""Fused CPU kernels for the bf16 decoder: RMSNorm (after a residual add), RoPE in place,
SiLU(gate) * up, and the greedy sampler's argmax (of rows, or of the columns of transposed
logits), each one pass instead of the reference's several (the C++ lives in
``attention/csrc/fused_ops.cpp``, built with the decode kernel).

They keep the reference's bf16 roundings, so tokens match the unfused path except where an
fp32 sum's order tips a rounding. Used only for bf16 on CPU when the extension is built;
``PAGODA_FUSED=0`` turns them off. fp32 always takes the reference ops (the path that is
compared token for token with Hugging Face). The model's layers call them through the ops set
``models/ops.py`` chooses when the model is built.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch

from pagoda.attention import cpu_decode

FUSED_ENV = "PAGODA_FUSED"


def _ext() -> Optional[ModuleType]:
    if os.environ.get(FUSED_ENV) == "0":
        return None
    return cpu_decode.extension()


def _kernels() -> ModuleType:
    """The extension for an op below, called only where :func:`enabled` holds: raises
    RuntimeError where ``PAGODA_FUSED=0`` or the extension is not built."""
    if os.environ.get(FUSED_ENV) == "0":
        raise RuntimeError(f"pagoda fused CPU ops are turned off ({FUSED_ENV}=0)")
    return cpu_decode.require_extension()


def enabled(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and _ext() is not None


def enabled_for(device: torch.device, dtype: torch.dtype) -> bool:
    """What :func:`enabled` says of tensors of ``dtype`` on ``device`` (the model's choice of
    ops, ``models/ops.py``, made once when it is built)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _ext() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (T, E) -> (T, E)."""
    out = torch.empty_like(x)
    _kernels().rms_norm(out, x, weight, eps)
    return out


def add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x in place; returns RMSNorm(residual). All (T, E)."""
    out = torch.empty_like(x)
    _kernels().add_rms_norm(out, residual, x, weight, eps)
    return out


def rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> None:
    """Rotate q (T, H, D) and k (T, Hkv, D) in place; cos, sin: fp32 (P, D)."""
    _kernels().rope(q, k, cos, sin, positions)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) bf16 -> (N,) int64, the first index on ties (as torch.argmax)."""
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _kernels().argmax_rows(out, logits)
    return out


def greedy_tokens(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of ``hidden @ weight.T`` per row: (N, E), (V, E) -> (N,).

    Computed as ``weight @ hidden.T`` (V, N) and a column argmax: with a large vocabulary and
    few rows that GEMM shape runs about 1.5x faster on the CPU than the (N, V) one, and the
    logits are never transposed back."""
    logits_t = torch.mm(weight, hidden.t())  # (V, N)
    out = torch.empty(hidden.shape[0], dtype=torch.int64)
    _kernels().argmax_cols(out, logits_t)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2I) [gate | up] -> (T, I)."""
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _kernels().silu_mul(out, gate_up)
    return out


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma): (T, 2I) [gate | up] -> GELU(gate, tanh approximation) * up, (T, I)."""
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _kernels().gelu_tanh_mul(out, gate_up)
    return out

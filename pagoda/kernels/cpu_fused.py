"""Fused CPU kernels for the bf16 decoder: RMSNorm (after a residual add), RoPE in place,
SiLU(gate) * up, and the greedy sampler's argmax (of rows, or of the columns of transposed
logits), each one pass instead of the reference's several (the C++ lives in
``kernels/csrc/fused_ops.cpp``, in the one extension ``kernels/ext.py`` builds).

They keep the reference's bf16 roundings, so tokens match the unfused path except where an
fp32 sum's order tips a rounding. Used only for bf16 on CPU when the extension is built;
``PAGODA_FUSED=0`` turns them off, read once by :func:`enabled_for` when a model's ops
(``models/ops.py``) and its runner's sampler path are chosen, never per call. fp32 always takes
the reference ops (the path that is compared token for token with Hugging Face).
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from pagoda import envs
from pagoda.kernels import ext

FUSED_ENV = envs.FUSED.name


def _ext() -> Optional[ModuleType]:
    return ext.extension()


def _kernels() -> ModuleType:
    """The extension for an op below: raises RuntimeError where it is not built."""
    return ext.require_extension()


def enabled(x: torch.Tensor) -> bool:
    """The kernels take ``x``: a CPU bf16 tensor, and the extension is built (asks no switch:
    the caller chose the fused path once, with :func:`enabled_for`)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and _ext() is not None


def enabled_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model of ``dtype`` on ``device`` takes the fused ops: bf16 on the CPU, the
    extension built and ``PAGODA_FUSED`` not "0" (read now: call once, when the model and its
    runner are built)."""
    return envs.FUSED() and device.type == "cpu" and dtype == torch.bfloat16 and _ext() is not None


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
    few rows that GEMM shape runs faster on the CPU than the (N, V) one (docs/sampling.md),
    and the logits are never transposed back."""
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

"""Random sampling by the Gumbel-max trick, with noise that is a pure function of a row key.

A draw from softmax(l) is argmax_v (l_v + G_v) with G_v = -log(-log U_v) i.i.d. standard
Gumbel (Gumbel 1954; Maddison, Tarlow and Minka, "A* Sampling", 2014). No softmax, no division,
and tokens a filter removed (l_v = -inf) are never drawn.

The uniforms come from a counter-based hash of (row key, token index) (murmur3's finaliser
applied twice), so a row's draw depends on its key alone: not on its batch, the thread count
or the instruction set. On the CPU the C++ kernel (``kernels/csrc/gumbel_sample.cpp``) does it
in one pass; :func:`noise` is the same noise in tensor ops (the reference the tests hold the
kernel to, and the path on CUDA or without the extension). The two agree to about 1e-6 (the
kernel's log is a polynomial), so they pick the same token except on near-exact ties.

Invariant: ``draw(l, keys)[r]`` is distributed as softmax(l[r]), and is the same token for the
same (logits, key) wherever the row sits in a batch.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from pagoda.kernels import ext

_M32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B1


def _ext(logits: torch.Tensor) -> Optional[ModuleType]:
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.bfloat16):
        return None
    return ext.extension()


def draw(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` (R, V) (already divided by the temperature, -inf where
    filtered out), row r's noise keyed by ``keys[r]`` (int64). Returns (R,) int64."""
    ext = _ext(logits)
    if ext is not None and logits.stride(-1) == 1:
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        ext.gumbel_argmax(out, logits, keys.to(torch.int64).contiguous())
        return out
    scores = logits.float() + noise(keys.to(logits.device), logits.shape[1])
    return scores.nan_to_num(nan=float("-inf")).argmax(dim=-1)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on uint32 values held in int64 (products wrap mod 2^64,
    which keeps their low 32 bits right)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R,) int64 keys -> (R, V) fp32 uniforms in (0, 1): odd multiples of 2^-24 (24 bits,
    exact in fp32, so never 0 or 1)."""
    k0 = (keys & _M32)[:, None]
    k1 = ((keys >> 32) & _M32)[:, None]
    index = torch.arange(vocab, dtype=torch.int64, device=keys.device)[None, :]
    h = _fmix32(_fmix32((index * _GOLDEN32 + k0) & _M32) ^ k1)
    return (((h >> 9) << 1) | 1).to(torch.float32) * 2.0**-24


def noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise (R, V), fp32, as the kernel makes it."""
    return -torch.log(-torch.log(uniforms(keys, vocab)))


def random_keys(n: int) -> torch.Tensor:
    """Fresh keys from torch's default generator (``torch.manual_seed`` replays them)."""
    return torch.randint(0, 2**62, (n,), dtype=torch.int64)

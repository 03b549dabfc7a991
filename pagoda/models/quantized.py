"""A weight as a quantized file stores it: integer codes with a scale (and an offset) per
group of consecutive inputs, kept so a layer can run the file's own values instead of a
re-rounding of their dequantized copy (GGUF's Q4_0 / Q4_1 / Q5_* / Q8_0 and K-quants).

Invariant: ``dequantize(q)`` is the file's dequantization in fp32 bit for bit, computed as
``scale * code`` rounded, then ``+ offset`` rounded (ggml's order; no fused multiply-add).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class QuantizedTensor:
    """``w[n, k] = scale[n, k // group] * codes[n, k] + offset[n, k // group]``.

    ``codes`` (N, K) int8 (Q4_0's are ``q - 8``, Q6_K's ``q - 32``, Q4_1 / Q4_K / Q5_K's
    unsigned ``q``); ``scale`` and ``offset`` (N, K // group) fp32, ``offset`` None where the
    format has none (Q4_0, Q5_0, Q6_K, Q8_0); ``bits`` the width of the codes (4, 5, 6 or 8);
    ``source`` the ggml type name it was read from ("Q4_K", ...)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: Optional[torch.Tensor]
    group: int
    bits: int
    source: str

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return n, k

    def rows(self, index: torch.Tensor) -> QuantizedTensor:
        """The same tensor with its rows taken in ``index`` order (a row permutation of the
        weight, such as llama's Q/K unpermutation)."""
        offset = None if self.offset is None else self.offset[index]
        return QuantizedTensor(
            self.codes[index], self.scale[index], offset, self.group, self.bits, self.source
        )


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The fp32 (N, K) weights ``q`` stands for."""
    n, k = q.shape
    groups = k // q.group
    w = q.codes.to(torch.float32).view(n, groups, q.group) * q.scale[..., None]
    if q.offset is not None:
        w = w + q.offset[..., None]
    return w.view(n, k)

"""A weight as a quantized file stores it: integer codes with a scale (and an offset) per
group of consecutive inputs, kept so a layer can run the file's own values instead of a
re-rounding of their dequantized copy (GGUF's Q4_0 / Q4_1 / Q5_* / Q8_0 and K-quants).

Invariant: ``dequantize(q)`` is the file's dequantization in fp32 bit for bit, computed as
``scale * code`` rounded, then ``+ offset`` rounded (ggml's order; no fused multiply-add).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

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


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """The matrices of ``parts`` stacked by rows (a fused projection's shards), in the
    smallest group of theirs (a group's scale repeated over the smaller groups it spans), with
    zero offsets for parts without one: ``dequantize`` of the result is theirs, stacked."""
    if len(parts) == 1:
        return parts[0]
    group = min(p.group for p in parts)
    if any(p.group % group for p in parts):
        raise ValueError(f"cannot stack groups of {sorted({p.group for p in parts})}")

    def spread(t: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        return t.repeat_interleave(p.group // group, dim=1)

    scale = torch.cat([spread(p.scale, p) for p in parts])
    offset = None
    if any(p.offset is not None for p in parts):
        offsets = [
            p.scale.new_zeros(p.scale.shape) if p.offset is None else p.offset for p in parts
        ]
        offset = torch.cat([spread(o, p) for o, p in zip(offsets, parts, strict=True)])
    codes = torch.cat([p.codes for p in parts])
    source = "+".join(dict.fromkeys(p.source for p in parts))
    return QuantizedTensor(codes, scale, offset, group, max(p.bits for p in parts), source)


def stored_format(tensors: Mapping[str, QuantizedTensor]) -> Optional[str]:
    """The ggml type most of ``tensors``' weights are stored in (a stacked tensor counts
    under its first shard's type), or None where there are none."""
    counts: dict[str, int] = {}
    for q in tensors.values():
        source = q.source.split("+")[0]
        counts[source] = counts.get(source, 0) + q.codes.numel()
    return max(counts, key=lambda k: counts[k]) if counts else None

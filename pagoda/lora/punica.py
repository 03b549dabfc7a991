"""The grouped LoRA delta of a mixed batch: Punica's shrink / expand over row groups (Chen et
al., "Punica: Multi-Tenant LoRA Serving", MLSys'24, its SGMV kernel).

A step's rows are laid out in segments of consecutive rows that share an adapter. For each
segment ``(start, rows, slot)`` of a linear with resident adapters stacked in ``a`` (S, R, K)
and ``b`` (S, N, R), every implementation adds to the base output in place

    out[start : start + rows] += (x[start : start + rows] @ a[slot].T) @ b[slot].T

and touches nothing else: rows outside every segment (the base model's) are left as the base
computed them, and a segment reads its own slot's A and B only (the tests poison the others).

Implementations, one chosen per model when LoRA is attached (:func:`select`), as the decoder
ops are: ``grouped_torch`` (two matmuls a segment, every device and dtype: the reference),
the C++ kernel of ``kernels/csrc/lora_sgmv.cpp`` on the CPU when it is built, and the Triton
shrink / expand kernels (``triton_lora.py``) on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Segment = tuple[int, int, int]  # (first row, rows, slot)


@dataclass
class LoRABatch:
    """The step's row groups, shared by every adapted linear of a model; set once a step by
    the model runner (empty: no row runs an adapter, the linears add nothing)."""

    segments: list[Segment] = field(default_factory=list)
    # The segments as an int32 (G, 3) tensor on the model's device, for the kernels that
    # take them so (None until a kernel asks; rebuilt when the segments change).
    _tensor: Optional[torch.Tensor] = None

    def set(self, segments: list[Segment]) -> None:
        self.segments, self._tensor = segments, None

    def tensor(self, device: torch.device) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = torch.tensor(self.segments, dtype=torch.int32).reshape(-1, 3).to(device)
        return self._tensor


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRABatch], None]


def grouped_torch(
    out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch
) -> None:
    """out (T, N) += per segment (x (T, K) rows @ a[slot] (R, K).T) @ b[slot] (N, R).T."""
    for start, rows, slot in batch.segments:
        h = x.narrow(0, start, rows) @ a[slot].t()  # (rows, R): shrink
        out.narrow(0, start, rows).addmm_(h, b[slot].t())  # (rows, N): expand, added


def select(device: torch.device, dtype: torch.dtype) -> Kernel:
    """The implementation for adapted linears of ``dtype`` on ``device``."""
    if device.type == "cpu":
        from pagoda.kernels import cpu_lora

        if cpu_lora.available():
            return cpu_lora.lora_sgmv
    if device.type == "cuda":
        from pagoda.lora import triton_lora

        if triton_lora.usable(dtype):
            return triton_lora.lora_sgmv
    return grouped_torch

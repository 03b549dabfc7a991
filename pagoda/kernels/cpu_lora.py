"""The grouped LoRA delta on the CPU: Punica's SGMV shrink / expand (Chen et al., "Punica:
Multi-Tenant LoRA Serving", MLSys'24) in one C++ call per linear
(``kernels/csrc/lora_sgmv.cpp``, in the one extension ``kernels/ext.py`` builds).

Invariant: the contract of ``lora/punica.py`` — per segment ``(start, rows, slot)``,
``out[start : start + rows] += (x[start : start + rows] @ a[slot].T) @ b[slot].T``; rows
outside every segment are not written and a segment reads only its own slot. fp32 and bf16
(bf16 sums in fp32 and rounds once, when the delta is added to ``out``; on CPUs with
AVX512-BF16 h is rounded to bf16 between shrink and expand, as the reference rounds it).

The batch is typed by what the kernel reads (:class:`Segments`, which ``punica.LoRABatch``
is), so this ground-floor module does not import ``pagoda.lora``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pagoda.kernels import ext


class Segments(Protocol):
    """The step's row groups: ``segments`` as (start, rows, slot), and as a (G, 3) int32
    tensor on a device."""

    segments: list[tuple[int, int, int]]

    def tensor(self, device: torch.device) -> torch.Tensor: ...


def available() -> bool:
    """True when the C++ extension (and so this kernel) is built."""
    return ext.available()


def lora_sgmv(
    out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: Segments
) -> None:
    """out (T, N) += per segment (x (T, K) rows @ a[slot] (R, K).T) @ b[slot] (N, R).T; a is
    (S, R, K), b (S, N, R), contiguous, all of out's dtype."""
    if not batch.segments:
        return
    segments = batch.tensor(out.device)  # (G, 3) int32: start, rows, slot
    ext.require_extension().lora_sgmv(out, x, a, b, segments)

"""Adapted linears: the base linear once for every row of a step, then each adapter's delta
on its own rows (``punica.py``), from resident slots.

:func:`attach_lora` wraps each linear an adapter may change (``adapter.targets_for``) in a
:class:`LoRALinear`, whatever form the base took when the model was prepared (dense, packed
for oneDNN, 4-bit), after that preparation: the base weights are never copied or merged.
Each wrapped linear holds ``num_slots`` adapters' A (S, R, K) and B (S, N, R), zero where a
slot is empty or an adapter's rank is smaller; all share one :class:`punica.LoRABatch`.
Invariant: a row outside the step's segments gets exactly the base linear's output.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagoda.lora import punica
from pagoda.lora.adapter import LoRALayer, Target, targets_for
from pagoda.models.base import CausalLM


class LoRALinear(nn.Module):
    """A base linear plus the deltas of the adapters resident in its slots."""

    a: torch.Tensor  # (S, R, K): each slot's A, R = max rank x shards
    b: torch.Tensor  # (S, N, R): each slot's B, the scale folded in

    def __init__(
        self,
        base: nn.Module,
        target: Target,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        batch: punica.LoRABatch,
        kernel: punica.Kernel,
    ) -> None:
        super().__init__()
        self.base = base
        self.target = target
        rank = max_rank * len(target.shards)  # each shard may have its own rank
        k, n = target.in_features, target.out_features
        self.register_buffer("a", torch.zeros(num_slots, rank, k, dtype=dtype, device=device))
        self.register_buffer("b", torch.zeros(num_slots, n, rank, dtype=dtype, device=device))
        self.batch, self.kernel = batch, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N)."""
        out = self.base(x)
        if self.batch.segments:
            self.kernel(out, x, self.a, self.b, self.batch)
        return out

    @torch.no_grad()
    def load_slot(self, slot: int, layer: Optional[LoRALayer]) -> None:
        """Hold ``layer`` (None: nothing, this linear is not adapted) in ``slot``."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if layer is not None:
            r = layer.rank
            self.a[slot, :r].copy_(layer.a)
            self.b[slot, :, :r].copy_(layer.b)


def attach_lora(
    model: CausalLM,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
    kernel: Optional[punica.Kernel] = None,
) -> tuple[dict[str, LoRALinear], punica.LoRABatch]:
    """Wrap every adaptable linear of ``model`` (its final, prepared form) in place; returns
    the wrapped linears by layer path and the batch they share."""
    batch = punica.LoRABatch()
    kernel = kernel or punica.select(device, dtype)
    wrapped: dict[str, LoRALinear] = {}
    for path, target in targets_for(model.arch).items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, name)
        layer = LoRALinear(base, target, num_slots, max_rank, dtype, device, batch, kernel)
        setattr(parent, name, layer)
        wrapped[path] = layer
    return wrapped, batch

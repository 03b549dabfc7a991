"""Adapted linears: the base linear once for every row of a step, then each adapter's delta
on its own rows (``punica.py``), from resident slots.

:func:`attach_lora` wraps each linear an adapter may change (``adapter.targets_for``) in a
:class:`LoRALinear`, whatever form the base took when the model was prepared (dense, packed
for oneDNN, 4-bit), after that preparation: the base weights are never copied or merged.
Each wrapped linear holds, per output shard, ``num_slots`` adapters' A (S, r, K) and B
(S, n, r), zero where a slot is empty or an adapter's rank is smaller; all share one
:class:`punica.LoRABatch`.
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
    """A base linear plus the deltas of the adapters resident in its slots, shard by shard
    (q, k, v of a fused ``qkv_proj``; gate, up of ``gate_up_proj``; one for the others): a
    shard's slots hold its A (S, r, K) and B (S, n, r), and its delta is added to its own
    columns of the output, so no slot holds a zero block for another shard's rows."""

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
        k = target.in_features
        # (A (S, r, K), B (S, n, r), first output column, columns) per shard
        self.shards: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        for i, n in enumerate(target.shards):
            a = torch.zeros(num_slots, max_rank, k, dtype=dtype, device=device)
            b = torch.zeros(num_slots, n, max_rank, dtype=dtype, device=device)
            self.register_buffer(f"a{i}", a)
            self.register_buffer(f"b{i}", b)
            self.shards.append((a, b, target.shard_offset(i), n))
        self.batch, self.kernel = batch, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N)."""
        out = self.base(x)
        if self.batch.segments:
            whole = len(self.shards) == 1
            for a, b, first, n in self.shards:
                cols = out if whole else out.narrow(1, first, n)  # (T, n), rows of stride N
                self.kernel(cols, x, a, b, self.batch)
        return out

    @torch.no_grad()
    def load_slot(self, slot: int, layer: Optional[LoRALayer]) -> None:
        """Hold ``layer`` (None: nothing, this linear is not adapted) in ``slot``."""
        for i, (a, b, _, _) in enumerate(self.shards):
            a[slot].zero_()
            b[slot].zero_()
            shard = layer.shards[i] if layer is not None else None
            if shard is not None:
                a[slot, : shard.rank].copy_(shard.a)
                b[slot, :, : shard.rank].copy_(shard.b)


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

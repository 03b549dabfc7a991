"""Which adapters sit in the model's slots, and which are kept read on the host.

Two bounded sets, each least-recently-used first out:

- resident (``--max-loras`` slots): adapters whose weights are in every adapted linear's
  stacks, ready for a step. An adapter a live request runs under is pinned: never evicted.
- host (``--max-cpu-loras``): adapters read from disk and checked (``adapter.read_adapter``),
  so that making one resident again is a copy, not a read.

The scheduler admits requests of at most ``--max-loras`` distinct adapters at once
(``core/scheduler.py``), so the adapters of live requests always fit the slots.
Invariant: ``slot_of`` maps each resident adapter id to one slot, and the slot's stacks hold
that adapter's weights (zero where it adapts nothing).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Mapping

from pagoda.lora import punica
from pagoda.lora.adapter import Adapter, read_adapter, targets_for
from pagoda.lora.layers import LoRALinear
from pagoda.lora_request import LoRARequest
from pagoda.models.config import ModelArch

AdapterReader = Callable[[LoRARequest], Adapter]


def adapter_reader(arch: ModelArch, max_rank: int) -> AdapterReader:
    """Reads a request's adapter (a directory, or a Hub id fetched through the Hub cache),
    checked against a base of ``arch``."""
    targets = targets_for(arch)

    def read(lora: LoRARequest) -> Adapter:
        from pagoda.models.hub import resolve_adapter

        return read_adapter(resolve_adapter(lora.lora_path), targets, max_rank)

    return read


class LoRASlots:
    def __init__(
        self,
        layers: Mapping[str, LoRALinear],
        batch: punica.LoRABatch,
        num_slots: int,
        max_cpu_loras: int,
        read: AdapterReader,
    ) -> None:
        self.layers, self.batch = layers, batch
        self.num_slots, self.max_cpu_loras = num_slots, max_cpu_loras
        self.read = read
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first
        self.host: OrderedDict[int, Adapter] = OrderedDict()  # adapter id -> weights, LRU first
        self.loads = 0  # adapters copied into a slot (a test reads it)

    def set_step(self, rows: Iterable[tuple[int, int, LoRARequest]], pinned: set[int]) -> None:
        """The step's adapted rows, ``(first row, rows, adapter)`` in row order: their
        adapters made resident (evicting unpinned ones), then the segments set, neighbours
        of one adapter merged."""
        segments: list[punica.Segment] = []
        for start, count, lora in rows:
            slot = self.activate(lora, pinned)
            last = segments[-1] if segments else None
            if last is not None and last[2] == slot and last[0] + last[1] == start:
                segments[-1] = (last[0], last[1] + count, slot)
            else:
                segments.append((start, count, slot))
        self.batch.set(segments)

    def activate(self, lora: LoRARequest, pinned: set[int]) -> int:
        """The slot holding ``lora``, copying it in first if it is not resident."""
        lid = lora.lora_int_id
        if lid in self.slot_of:
            self.slot_of.move_to_end(lid)
            return self.slot_of[lid]
        slot = self._free_slot(pinned | {lid})
        adapter = self._host_copy(lora)
        for path, layer in self.layers.items():
            layer.load_slot(slot, adapter.layers.get(path))
        self.slot_of[lid] = slot
        self.loads += 1
        return slot

    def prefetch(self, lora: LoRARequest) -> None:
        """Read ``lora`` into the host set now (at intake: a bad adapter fails its request,
        not a step); AdapterError naming what was wrong."""
        self._host_copy(lora)

    def forget(self, lora_int_id: int) -> None:
        """Drop an unloaded adapter's host copy (its slot is reused when needed)."""
        self.host.pop(lora_int_id, None)
        self.slot_of.pop(lora_int_id, None)

    def _free_slot(self, pinned: set[int]) -> int:
        used = set(self.slot_of.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            return free[0]
        victim = next((lid for lid in self.slot_of if lid not in pinned), None)
        if victim is None:
            raise RuntimeError(
                f"all {self.num_slots} LoRA slots hold adapters of live requests "
                "(the scheduler admits at most --max-loras adapters at once)"
            )
        return self.slot_of.pop(victim)

    def _host_copy(self, lora: LoRARequest) -> Adapter:
        lid = lora.lora_int_id
        adapter = self.host.get(lid)
        if adapter is None:
            adapter = self.read(lora)
            self.host[lid] = adapter
            while len(self.host) > self.max_cpu_loras:
                self.host.popitem(last=False)
        self.host.move_to_end(lid)
        return adapter

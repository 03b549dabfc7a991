"""Host values on their way to the device: a step's integer inputs packed into one buffer
for one copy (``pack_ints``), and small lists copied without waiting (``to_device``).

Filling the buffer through numpy is several times faster than ``torch.tensor`` on a long
Python list (a batch of 256 decodes carries tens of thousands of block ids), and on CUDA the
buffer is pinned so the copy can be asynchronous.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

# A flat list of ints, or a table: (ragged rows, width), rows left-aligned and zero-padded.
IntPart = Union[list[int], tuple[list[list[int]], int]]


def part_size(part: IntPart) -> int:
    if isinstance(part, tuple):
        rows, width = part
        return len(rows) * width
    return len(part)


def pack_ints(parts: list[IntPart], pin: bool) -> tuple[torch.Tensor, list[int]]:
    """The parts end to end in one zeroed int64 host tensor (pinned if ``pin``), tables
    row-major; returns it and each part's length in it."""
    sizes = [part_size(p) for p in parts]
    buf = torch.zeros(sum(sizes), dtype=torch.int64, pin_memory=pin)
    flat = buf.numpy()
    offset = 0
    for part, size in zip(parts, sizes, strict=True):
        view = flat[offset : offset + size]
        if isinstance(part, tuple):
            rows, width = part
            table = view.reshape(len(rows), width)
            for i, row in enumerate(rows):
                table[i, : len(row)] = row
        elif size:
            view[:] = np.fromiter(part, dtype=np.int64, count=size)
        offset += size
    return buf, sizes


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values on ``device`` without waiting for it: on CUDA a pinned buffer and an
    asynchronous copy (``torch.tensor(..., device=cuda)`` from pageable memory would wait for
    everything queued before it; the caching host allocator keeps the buffer alive until the
    copy is done)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)

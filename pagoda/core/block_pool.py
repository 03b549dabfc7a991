"""BlockPool: the mechanism of PagedAttention's memory (Kwon et al., SOSP'23).

A fixed set of KV blocks, each with a reference count, and a free list kept in the order
blocks should be reused. Invariant: every block is either free (ref count 0, on the free
list) or used (ref count = number of holders, off the free list); free + used == total.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping, Sequence


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Free blocks in reuse order (front first). An OrderedDict so that a block can
        # also leave from the middle in O(1), which prefix caching will need.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks (ref count 1 each). The caller checks num_free_blocks first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def share(self, block_ids: Iterable[int]) -> None:
        """One more holder for blocks that are already in use."""
        for b in block_ids:
            if self.ref_counts[b] < 1:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self.ref_counts[b] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """One holder fewer; a block whose count reaches 0 goes to the back of the free list."""
        for b in block_ids:
            if self.ref_counts[b] < 1:
                raise RuntimeError(f"block {b} released more often than held")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def check_invariants(self, holders: Mapping[str, Sequence[int]]) -> None:
        """Assert the pool agrees with ``holders`` (holder id -> the blocks it holds)."""
        expected = [0] * self.num_blocks
        for blocks in holders.values():
            assert len(set(blocks)) == len(blocks), f"a holder lists a block twice: {blocks}"
            for b in blocks:
                expected[b] += 1
        assert expected == self.ref_counts, "ref counts differ from the holders' block lists"
        free = set(self._free)
        assert len(free) == len(self._free)
        assert all(self.ref_counts[b] == 0 for b in free), "a block in use is on the free list"
        used = sum(1 for c in self.ref_counts if c > 0)
        assert used + len(free) == self.num_blocks, "free + used != total"

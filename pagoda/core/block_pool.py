"""BlockPool: the mechanism of PagedAttention's memory (Kwon et al., SOSP'23), with the
content-hash index that prefix caching uses.

A fixed set of KV blocks, each with a reference count, and a free list kept in eviction
order. A free block may still carry the hash of the tokens whose KV it holds: it stays
reusable (a cache hit takes it back off the free list) until allocation evicts it.
Invariants: every block is either free (ref count 0, on the free list) or used (ref count =
number of holders, off the free list); free + used == total; a hash maps to exactly one
block, and that block carries the hash.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping, Optional, Sequence

from pagoda.core.kv_events import KVEventJournal
from pagoda.core.prefix_cache import BlockHash
from pagoda.core.snapshot import (
    BLOCK_CACHED,
    BLOCK_FREE,
    BLOCK_SHARED,
    BLOCK_USED,
    BlockPoolSnapshot,
    CachedBlock,
)

# bytes(map(bool, ref_counts)) -> one state character per block, at C speed.
_HELD_STATE = bytes.maketrans(b"\x00\x01", (BLOCK_FREE + BLOCK_USED).encode())


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Free blocks in eviction order: the front is reused first. Blocks without a hash
        # (worthless once free) go to the front; cached ones to the back, so the least
        # recently used cached block is the next one evicted. An OrderedDict lets a cache
        # hit take a block out of the middle in O(1).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.block_hash: list[Optional[BlockHash]] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}  # hash -> the one block holding that KV
        # For the inspector: each named block's parent in its hash chain and its hits, and
        # a version bumped whenever either (or a name) changes, so snapshots reuse work.
        self.block_parent: list[Optional[BlockHash]] = [None] * num_blocks
        self.block_hits = [0] * num_blocks
        self.cache_version = 0
        self._cached_snapshot: tuple[int, tuple[CachedBlock, ...]] = (0, ())
        # Each named block's row for snapshots, kept as names and hits change (in naming
        # order, as ``cached``), so that a snapshot lists them without rebuilding each one.
        self._cached_rows: dict[int, CachedBlock] = {}
        self.num_evictions = 0
        self.journal: Optional[KVEventJournal] = None  # KV events, when published

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, cached ones included: allocation evicts them as it needs."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks (ref count 1 each), evicting cached ones from the front of the
        free list. The caller checks num_free_blocks first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def take(self, block_ids: Iterable[int]) -> None:
        """One more holder for blocks that hold computed KV: blocks in use (an n > 1 sibling's
        prompt) or cached free blocks (a prefix-cache hit), which leave the free list with
        their contents intact."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is None:
                    raise RuntimeError(f"block {b} is free and holds no cached KV")
                del self._free[b]
            self.ref_counts[b] += 1
            h = self.block_hash[b]
            if h is not None:
                self.block_hits[b] += 1
                self.cache_version += 1
                self._cached_rows[b] = CachedBlock(b, h, self.block_parent[b], self.block_hits[b])

    def release(self, block_ids: Iterable[int]) -> None:
        """One holder fewer. A block whose count reaches 0 becomes free: at the back of the
        free list (most recently used) if it is cached, at the front if not."""
        for b in block_ids:
            if self.ref_counts[b] < 1:
                raise RuntimeError(f"block {b} released more often than held")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None
                if self.block_hash[b] is None:
                    self._free.move_to_end(b, last=False)

    # ------------------------------------------------------------ hash index
    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The blocks of the longest run of ``hashes``, from the first, that is cached."""
        blocks = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def cache_block(
        self, block_id: int, block_hash: BlockHash, parent: Optional[BlockHash] = None
    ) -> bool:
        """Name a used block by the hash of its (now fully scheduled) tokens; ``parent`` is
        the hash of the block before it in its chain (None for a first block). When another
        block already holds the same KV (two requests computed one prefix side by side),
        the first keeps the name and this one stays anonymous. Returns whether it took it."""
        if self.ref_counts[block_id] < 1:
            raise RuntimeError(f"block {block_id} is free and cannot be cached")
        if self.block_hash[block_id] is not None or block_hash in self.cached:
            return False
        self.block_hash[block_id] = block_hash
        self.block_parent[block_id] = parent
        self.cached[block_hash] = block_id
        self._cached_rows[block_id] = CachedBlock(block_id, block_hash, parent, 0)
        self.cache_version += 1
        return True

    def reset_cache(self) -> int:
        """Forget every hash (blocks in use keep their KV, but nobody new can hit them).
        Returns how many blocks were named."""
        count = len(self.cached)
        for b in self.cached.values():
            self.block_hash[b] = self.block_parent[b] = None
            self.block_hits[b] = 0
        self.cached.clear()
        self._cached_rows.clear()
        self.cache_version += 1
        if self.journal is not None:
            self.journal.cleared()
        # Free blocks are all anonymous now: their order no longer matters for eviction.
        return count

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            del self.cached[h]
            del self._cached_rows[block_id]
            self.block_hash[block_id] = self.block_parent[block_id] = None
            self.block_hits[block_id] = 0
            self.cache_version += 1
            self.num_evictions += 1
            if self.journal is not None:
                self.journal.removed(h)

    # --------------------------------------------------------------- snapshot
    def snapshot(self, overlays: Optional[Mapping[str, Iterable[int]]] = None) -> BlockPoolSnapshot:
        """The pool block by block, for the inspector: a state character and a ref count
        per block, and the named blocks (reused while nothing named changes). ``overlays``
        (state character -> blocks) paints blocks whose holder the caller knows better:
        a lease, a pull in flight."""
        states = bytearray(bytes(map(bool, self.ref_counts)).translate(_HELD_STATE))
        free, shared = ord(BLOCK_CACHED), ord(BLOCK_SHARED)
        for b in self.cached.values():
            states[b] = shared if self.ref_counts[b] else free
        for state, blocks in (overlays or {}).items():
            for b in blocks:
                states[b] = ord(state)
        return BlockPoolSnapshot(
            self.num_blocks,
            states.decode("ascii"),
            tuple(self.ref_counts),
            self._cached_blocks(),
            self.cache_version,
            self.num_evictions,
        )

    def _cached_blocks(self) -> tuple[CachedBlock, ...]:
        version, blocks = self._cached_snapshot
        if version != self.cache_version or len(blocks) != len(self.cached):
            blocks = tuple(self._cached_rows.values())
            self._cached_snapshot = (self.cache_version, blocks)
        return blocks

    # ------------------------------------------------------------- invariants
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
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"hash index names block {b}, which holds another"
        rows = [
            CachedBlock(b, h, self.block_parent[b], self.block_hits[b])
            for h, b in self.cached.items()
        ]
        assert list(self._cached_rows.values()) == rows, "the snapshot rows differ from the index"
        named = [b for b in range(self.num_blocks) if self.block_hash[b] is not None]
        assert len(named) == len(self.cached), "a block carries a hash the index lacks"
        for b in range(self.num_blocks):
            if self.block_hash[b] is None:
                assert self.block_parent[b] is None and self.block_hits[b] == 0, (
                    f"anonymous block {b} keeps a parent or hits"
                )

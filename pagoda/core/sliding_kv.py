"""Sliding-window KV: the sliding layers' own block tables, from their own pool, holding only
the blocks some query can still see (Beltagy et al., "Longformer", 2020, for the window;
vLLM's hybrid KV cache manager for freeing what fell out of it).

In a model whose sliding layers attend to the last W tokens only (Gemma 2 and 3, interleaved
with full-attention layers), the sliding layers' KV lives in a second paged cache: their
tensors index a pool of their own, and each request has a second block table, as long as its
full-attention table. A query at position p reads keys (p - W, p], so once a request has
computed ``c`` tokens no query of it reads a block that ends at or before ``c - W + 1``: those
blocks go back to the pool (cached ones stay hittable until evicted) and their entries become
holes (``HOLE``, block 0), which no attention kernel reads::

    full table     [ f0 ][ f1 ][ f2 ][ f3 ][ f4 ][ f5 ]
    sliding table  [ -- ][ -- ][ -- ][ s3 ][ s4 ][ s5 ]     c - W + 1 falls in block 3
                     holes: given back

Invariant: a request holds exactly the sliding blocks from ``start[rid]`` to the end of its
table, every one of them in use; entries before ``start[rid]`` are holes it does not hold; and
``start[rid]`` never passes the block of the first key its next query may read.

A prefix-cache hit of ``k`` blocks needs the full layers' blocks ``[0, k)`` and the sliding
layers' blocks from the window's start to ``k``: :meth:`SlidingTables.hit_blocks` finds the
longest ``k`` for which both are cached.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pagoda.core.block_pool import BlockPool
from pagoda.core.prefix_cache import BlockHash
from pagoda.utils import cdiv

HOLE = 0  # a freed entry: any valid block id, never read (it precedes every window)


def window_start_block(num_computed: int, window: int, block_size: int) -> int:
    """The first block the next query (at position ``num_computed``) may read."""
    return max(num_computed - window + 1, 0) // block_size


def sliding_pool_blocks(window: int, block_size: int, max_num_seqs: int, token_budget: int) -> int:
    """Blocks that the sliding layers of ``max_num_seqs`` running requests can hold at once,
    at most: each holds its window's blocks from the first one a query reads (cdiv(W - 1,
    block_size) + 1, the first partly read) plus this step's new tokens (one more block for
    where they start), and a step schedules at most ``token_budget`` new tokens in all. A
    pool this size never runs short before the full layers' pool does."""
    per_request = cdiv(window - 1, block_size) + 2
    return max_num_seqs * per_request + cdiv(token_budget, block_size)


class SlidingTables:
    def __init__(self, num_blocks: int, window: int, block_size: int) -> None:
        if window < 1:
            raise ValueError(f"the sliding window must be >= 1, got {window}")
        self.pool = BlockPool(num_blocks)
        self.window = window
        self.block_size = block_size
        self.tables: dict[str, list[int]] = {}
        self.start: dict[str, int] = {}  # the first entry a request holds
        self.num_freed = 0  # blocks given back as they fell out of a window (a counter)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def held(self, request_id: str) -> list[int]:
        return self.table(request_id)[self.start.get(request_id, 0) :]

    # -------------------------------------------------------------- allocation
    def extend(
        self, request_id: str, num_blocks: int, hit: Sequence[int] = (), first: int = 0
    ) -> None:
        """Grow the table to ``num_blocks`` entries. A request being admitted on a prefix hit
        first takes ``hit``, the cached blocks of entries ``[first, first + len(hit))``,
        with holes before them. The caller checks :meth:`room` first."""
        table = self.tables.setdefault(request_id, [])
        self.start.setdefault(request_id, 0)
        if hit or first:
            assert not table, "a prefix hit goes to a request with no table"
            self.pool.take(hit)
            table.extend([HOLE] * first)
            table.extend(hit)
            self.start[request_id] = first
        needed = num_blocks - len(table)
        if needed > 0:
            table.extend(self.pool.allocate(needed))

    def room(
        self, request_id: str, num_blocks: int, hit: Sequence[int] = (), first: int = 0
    ) -> int:
        """How many more free blocks the pool has than ``extend`` with these arguments needs
        (negative: it is short)."""
        have = first + len(hit) if hit or first else len(self.table(request_id))
        revived = sum(1 for b in hit if self.pool.ref_counts[b] == 0)
        return self.pool.num_free_blocks - max(num_blocks - have, 0) - revived

    def slide(self, request_id: str, num_computed: int) -> None:
        """Give back the blocks no query of the request will read again (holes from now)."""
        table = self.tables.get(request_id)
        if not table:
            return
        start = self.start.get(request_id, 0)
        end = min(window_start_block(num_computed, self.window, self.block_size), len(table))
        if end <= start:
            return
        self.pool.release(reversed(table[start:end]))
        table[start:end] = [HOLE] * (end - start)
        self.start[request_id] = end
        self.num_freed += end - start

    def trim(self, request_id: str, num_computed: int) -> None:
        """Rolled-back drafts: drop the entries past ``num_computed`` tokens (the full
        table's trim). The next query, at ``num_computed``, must find its window held."""
        table = self.tables.get(request_id)
        if not table:
            return
        self.check_window(request_id, num_computed)
        keep = cdiv(num_computed, self.block_size)
        if len(table) <= keep:
            return
        extra = table[keep:]
        del table[keep:]
        self.pool.release(reversed(extra))

    def free(self, request_id: str) -> None:
        """Give back every block the request holds."""
        held = self.held(request_id)
        self.tables.pop(request_id, None)
        self.start.pop(request_id, None)
        self.pool.release(reversed(held))

    # ------------------------------------------------------------ prefix cache
    def name(
        self, request_id: str, index: int, block_hash: BlockHash, parent: Optional[BlockHash]
    ) -> bool:
        """Name entry ``index`` as its full-attention twin is named (same tokens, same hash),
        unless it is a hole already (slid out before its last token was known). Returns
        whether it took the name (for the KV events)."""
        if index < self.start.get(request_id, 0):
            return False
        return self.pool.cache_block(self.tables[request_id][index], block_hash, parent)

    def hit_blocks(self, hashes: Sequence[BlockHash], num_full: int) -> tuple[int, int, list[int]]:
        """The longest hit of ``k <= num_full`` blocks whose window is cached here: returns
        ``k``, the window's first entry and its cached blocks. A missing block ``j`` rules out
        every ``k`` whose window covers it, so ``k`` drops to ``j`` and the search goes on."""
        k = num_full
        while k > 0:
            first = window_start_block(k * self.block_size, self.window, self.block_size)
            blocks = [self.pool.cached.get(h) for h in hashes[first:k]]
            missing = [first + i for i, b in enumerate(blocks) if b is None]
            if not missing:
                return k, first, [b for b in blocks if b is not None]
            k = missing[-1]
        return 0, 0, []

    # ------------------------------------------------------------- invariants
    def check_window(self, request_id: str, num_computed: int) -> None:
        """The window of a query at ``num_computed`` starts at or after the first held entry."""
        start = self.start.get(request_id, 0)
        first = window_start_block(num_computed, self.window, self.block_size)
        assert start <= first, (
            f"{request_id}: a query at {num_computed} reads block {first}, given back already "
            f"(the window holds blocks from {start})"
        )

    def check_invariants(self, full_tables: dict[str, list[int]]) -> None:
        self.pool.check_invariants({rid: self.held(rid) for rid in self.tables})
        for rid, table in self.tables.items():
            assert len(table) == len(full_tables.get(rid, [])), f"{rid}: tables differ in length"
            assert all(b == HOLE for b in table[: self.start.get(rid, 0)]), f"{rid}: not a hole"

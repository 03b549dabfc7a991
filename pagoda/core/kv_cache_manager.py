"""KVCacheManager: per-request block tables on top of the BlockPool (PagedAttention), and
the per-request side of prefix caching.

A request's block table covers its first ``len(blocks) * block_size`` token positions;
token ``i`` lives in block ``blocks[i // block_size]`` at offset ``i % block_size``.
Invariant: a request holds exactly ``ceil(tokens it has scheduled / block_size)`` blocks,
and with prefix caching on, every full block it has scheduled is named by its chain hash
(unless another block already holds that name).

A model with sliding-window layers may keep their KV apart (``sliding``, see sliding_kv.py):
then each request has a second table, as long as the first, that holds only the blocks its
window still reaches, and every allocation, hit, trim and free covers both tables.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from pagoda.core.block_pool import BlockPool
from pagoda.core.kv_events import (
    FULL_ATTENTION,
    SLIDING_WINDOW,
    CacheGroup,
    KVCacheEvent,
    KVEventJournal,
)
from pagoda.core.prefix_cache import extend_block_hashes, root_hash
from pagoda.core.sliding_kv import SlidingTables
from pagoda.request import Request
from pagoda.utils import cdiv


def num_kept(request: Request) -> int:
    """Tokens of the request whose KV is certainly kept: those computed, less the drafts
    in flight (async scheduling), which a rollback may yet take back."""
    return request.num_computed_tokens - len(request.spec_token_ids)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = False,
        model_key: str = "",
        sliding: Optional[SlidingTables] = None,
        events: bool = False,
    ) -> None:
        """``events``: keep a journal of hashes entering and leaving the prefix cache, for
        KV events (kv_events.py); with a sliding layers' pool, of both pools, as two groups."""
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.model_key = model_key  # enters every hash chain: one model's KV is not another's
        self.req_blocks: dict[str, list[int]] = {}
        self._num_named: dict[str, int] = {}  # leading blocks of a request already hashed in
        self.journal: Optional[KVEventJournal] = None  # KV events, when published
        self.sliding = sliding  # the sliding layers' tables, when kept apart
        if events:
            self._start_journal()

    def _start_journal(self) -> None:
        if self.sliding is None:
            self.journal = self.pool.journal = KVEventJournal()
            return
        self.journal = self.pool.journal = KVEventJournal(CacheGroup(0, FULL_ATTENTION))
        group = CacheGroup(1, SLIDING_WINDOW, self.sliding.window)
        self.sliding.pool.journal = self.journal.for_group(group)

    def take_events(self) -> list[KVCacheEvent]:
        return self.journal.take() if self.journal is not None else []

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def sliding_block_ids(self, request_id: str) -> list[int]:
        """The sliding layers' table (holes before the window); empty without one."""
        return self.sliding.table(request_id) if self.sliding is not None else []

    def slide(self, request: Request) -> None:
        """Give back the sliding-layer blocks that fell out of the request's window. Drafts
        in flight (async scheduling) count as computed but may all be rejected, which moves
        the next query back to the first of them; so the window is placed after the tokens
        certainly kept (window 8, blocks of 4):

            position   0 .. 12 | 13 14 15 | 16 .. 19 | d20 d21 d22 d23 |
            block         0..2 |    3     |    4     |        5        |
            next query at 24 (all kept):  first key 17, block 4
            next query at 20 (all rejected): first key 13, block 3   <- still held
        """
        if self.sliding is not None:
            self.sliding.slide(request.request_id, num_kept(request))

    # ------------------------------------------------------------- prefix hits
    def get_computed_blocks(self, request: Request) -> list[int]:
        """The cached blocks a new request can start on: the longest run of its full blocks,
        from the first, whose hashes are cached. It never covers the last token, which must
        be computed to give the logits, so a fully cached prompt still computes one token:

            tokens   [ b0 ][ b1 ][ b2 ][ b3 ]      all four blocks cached
            hit      [ b0 ][ b1 ][ b2 ]            b3 holds the last token: recomputed
        """
        if not self.enable_prefix_caching:
            return []
        self._extend_hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = self.pool.lookup(request.block_hashes[:max_blocks])
        if self.sliding is not None:  # and the sliding layers' window before the hit
            num_hit, _, _ = self.sliding.hit_blocks(request.block_hashes, len(blocks))
            del blocks[num_hit:]
        return blocks

    def sibling_blocks(self, request: Request, donor: Request) -> list[int]:
        """Without prefix caching, an n > 1 sibling can still start on the full blocks its
        donor has computed of their common prompt (never the last prompt token's block)."""
        if self.sliding is not None:
            return []  # the donor's window has moved on: its sliding blocks are gone
        computed = min(request.num_prompt_tokens, donor.num_computed_tokens)
        num_full = min(computed // self.block_size, (request.num_tokens - 1) // self.block_size)
        return self.block_ids(donor.request_id)[: max(num_full, 0)]

    # -------------------------------------------------------------- allocation
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Sequence[int] = (),
        name_blocks: bool = True,
    ) -> Optional[list[int]]:
        """Make room for ``num_new_tokens`` more tokens; return the newly allocated block ids,
        or None (changing nothing) when the pool is short. A request being admitted may
        first take ``computed_blocks`` (a prefix hit or a sibling's prompt), which count as
        computed tokens ahead of the new ones:

            |<- computed_blocks ->|<- num_computed ->|<---- new ---->|
            [ block 0 ][ block 1 ][ block 2 ][ bl|ock 3 ][ block 4 ]   <- blocks after the call
                 taken, not computed          ^ request.num_computed_tokens (+ hit tokens)

        Cached free blocks count as free here: allocation evicts them (least recently used
        first) before the caller ever has to preempt a running request. ``name_blocks=False``
        leaves the new blocks out of the prefix cache (their KV will come from elsewhere;
        see ``name_blocks``).
        """
        blocks = self.req_blocks.get(request.request_id, [])
        if not computed_blocks and blocks:
            # The common decode step: the new tokens fit in the blocks the request holds.
            num_tokens = request.num_computed_tokens + num_new_tokens
            if num_tokens <= len(blocks) * self.block_size:  # (and the sliding table's)
                if name_blocks:
                    self.name_blocks(request, num_tokens)
                return []
        assert not (computed_blocks and blocks), "computed blocks go to a request with none"
        num_tokens = (
            request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        )
        needed = max(self.num_blocks_for(num_tokens) - len(blocks) - len(computed_blocks), 0)
        revived = sum(1 for b in computed_blocks if self.pool.ref_counts[b] == 0)
        if needed + revived > self.pool.num_free_blocks:
            return None
        if not self._extend_sliding(
            request, len(blocks) + len(computed_blocks) + needed, len(computed_blocks)
        ):
            return None
        self.pool.take(computed_blocks)
        new_blocks = self.pool.allocate(needed)
        blocks = self.req_blocks.setdefault(request.request_id, blocks)
        blocks.extend(computed_blocks)
        blocks.extend(new_blocks)
        if computed_blocks:
            self._num_named[request.request_id] = len(computed_blocks)
        if name_blocks:
            self.name_blocks(request, num_tokens)
        return new_blocks

    def _extend_sliding(self, request: Request, num_blocks: int, num_hit: int) -> bool:
        """Grow the sliding table to ``num_blocks`` entries, the window before a hit of
        ``num_hit`` blocks taken from the cache; False (changing nothing) if short."""
        if self.sliding is None:
            return True
        rid = request.request_id
        first = 0
        hit: list[int] = []
        if num_hit:
            k, first, hit = self.sliding.hit_blocks(request.block_hashes, num_hit)
            assert k == num_hit, "a hit whose sliding window is not cached"
        if self.sliding.room(rid, num_blocks, hit, first) < 0:
            return False
        self.sliding.extend(rid, num_blocks, hit, first)
        return True

    def name_blocks(self, request: Request, num_tokens: int) -> None:
        """Hash in the blocks that ``num_tokens`` scheduled tokens fill. They are named when
        scheduled, before the forward pass writes them: a request admitted later in the same
        step may hit them, which is safe because every layer writes the whole batch's K/V
        before any row attends (see attention/torch_ref.py), and steps run in order. A block
        whose last token is a placeholder (sampled by a step in flight) is named at the next
        step, when its tokens are all known."""
        if not self.enable_prefix_caching:
            return
        num_tokens = min(num_tokens, request.num_tokens)
        num_full = num_tokens // self.block_size
        start = self._num_named.get(request.request_id, 0)
        if num_full <= start:
            return
        self._extend_hashes(request, num_tokens)
        rid, hashes = request.request_id, request.block_hashes
        blocks = self.req_blocks[rid]
        named: list[int] = []  # the blocks that took their names, in each pool
        slid: list[int] = []
        for i in range(start, num_full):
            parent = hashes[i - 1] if i else None
            if self.sliding is not None and self.sliding.name(rid, i, hashes[i], parent):
                slid.append(i)
            if self.pool.cache_block(blocks[i], hashes[i], parent):
                named.append(i)
        self._stored(request, named, self.journal)
        if self.sliding is not None:
            self._stored(request, slid, self.sliding.pool.journal)
        self._num_named[rid] = num_full

    def _stored(
        self, request: Request, named: list[int], journal: Optional[KVEventJournal]
    ) -> None:
        """Journal the hashes of a request's blocks ``named`` (increasing indexes): an event
        per run of consecutive ones."""
        if journal is None:
            return
        start = 0
        for k in range(1, len(named) + 1):
            if k == len(named) or named[k] != named[k - 1] + 1:
                self._stored_run(request, named[start], named[k - 1] + 1, journal)
                start = k

    def _stored_run(self, request: Request, first: int, end: int, journal: KVEventJournal) -> None:
        bs, hashes = self.block_size, request.block_hashes
        journal.stored(
            hashes[first:end],
            hashes[first - 1] if first else None,
            request.all_token_ids[first * bs : end * bs],
            bs,
            request.cache_salt,
            request.lora,
        )

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        if len(request.block_hashes) < num_tokens // self.block_size:
            adapter = request.lora.cache_key if request.lora is not None else None
            root = root_hash(self.model_key, request.cache_salt, adapter)
            extend_block_hashes(
                request.block_hashes, root, request.all_token_ids, self.block_size, num_tokens
            )

    def trim(self, request: Request) -> None:
        """Speculative decoding rolled ``num_computed_tokens`` back over rejected drafts:
        give back the blocks that held only those. Only accepted tokens were ever named
        (names stop at the request's known tokens), so no cached block goes:

            computed  [ b0 ][ b1 ][ b2 | rejected ][ rejected ]   <- before
            kept      [ b0 ][ b1 ][ b2 ]                            freed: the last block
        """
        if self.sliding is not None:
            self.sliding.trim(request.request_id, request.num_computed_tokens)
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        keep = self.num_blocks_for(request.num_computed_tokens)
        if len(blocks) <= keep:
            return
        assert self._num_named.get(request.request_id, 0) <= keep, "trimming a named block"
        extra = blocks[keep:]
        del blocks[keep:]
        self.pool.release(reversed(extra))

    # ------------------------------------------------------------------- free
    def free(self, request: Request) -> None:
        """Give back all of the request's blocks, tail first: within a chain the tail blocks
        reach the free list first, so they are evicted before the prefix they extend."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self._num_named.pop(request.request_id, None)
        self.pool.release(reversed(blocks))
        if self.sliding is not None:
            self.sliding.free(request.request_id)

    def rename_holder(self, request_id: str, holder: str) -> None:
        """Hand a request's blocks to another holder (a lease) unchanged."""
        assert self.sliding is None, "KV transfer keeps one table (the engine turns sliding off)"
        self.req_blocks[holder] = self.req_blocks.pop(request_id)
        self._num_named.pop(request_id, None)

    def free_holder(self, holder: str) -> None:
        self.pool.release(reversed(self.req_blocks.pop(holder, [])))

    def reset_prefix_cache(self) -> int:
        """Forget every cached block; returns how many there were."""
        if self.sliding is not None:
            self.sliding.pool.reset_cache()
        return self.pool.reset_cache()

    def check_invariants(self) -> None:
        self.pool.check_invariants(self.req_blocks)
        if self.sliding is not None:
            self.sliding.check_invariants(self.req_blocks)
        if self.enable_prefix_caching:
            self._check_naming()

    def check_windows(self, requests: Iterable[Request]) -> None:
        """Each request's next query, however many drafts in flight are rejected, finds its
        sliding window held (sliding_kv.py's invariant)."""
        if self.sliding is not None:
            for request in requests:
                self.sliding.check_window(request.request_id, num_kept(request))

    def _check_naming(self) -> None:
        for rid, blocks in self.req_blocks.items():
            assert self._num_named.get(rid, 0) <= len(blocks), f"{rid} names blocks it lacks"

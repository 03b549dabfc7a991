"""Snapshots the core makes of itself for the inspector (``GET /inspect``): what each step
computed, the block pool block by block, and every live request with its block table.

They are immutable copies made on the engine thread, so the HTTP side reads them while the
engine keeps stepping. Compact by design: a pool of 10,000+ blocks is one character of state
and one ref count per block, plus one small tuple per cached block.
Invariant: in a pool snapshot, ``states``, ``ref_counts`` and ``cached`` describe the same
instant (one engine-thread call made them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast

from pagoda.core.prefix_cache import BlockHash

# One character per block, in ``BlockPoolSnapshot.states``.
BLOCK_FREE = "f"  # free, holds nothing worth keeping: the next to be allocated
BLOCK_CACHED = "c"  # free but named by its hash: a prefix-cache entry, evictable
BLOCK_USED = "u"  # held by running requests
BLOCK_SHARED = "s"  # held by running requests and named: others may hit it
BLOCK_LEASED = "l"  # prefill: held for a decode instance to pull (a lease)
BLOCK_LOADING = "p"  # decode: being filled by a pull from a prefill instance
BLOCK_STATES = {
    BLOCK_FREE: "free",
    BLOCK_CACHED: "cached (evictable)",
    BLOCK_USED: "in use",
    BLOCK_SHARED: "in use, cached",
    BLOCK_LEASED: "leased",
    BLOCK_LOADING: "loading",
}


@dataclass(frozen=True)
class StepTokens:
    """What one step computed, by kind; made by the scheduler when it schedules the step.

    A row of one token after the prompt is a decode; the rest is prefill (a chunk of a
    prompt, or a whole one), or recompute when the request was preempted before. Draft tokens
    (speculative decoding) are counted apart from their row's one token."""

    decode: int = 0
    prefill: int = 0
    recompute: int = 0
    spec: int = 0
    budget: int = 0  # the step's token budget
    preemptions: int = 0  # requests preempted while scheduling this step
    running: int = 0  # after scheduling
    waiting: int = 0
    loading: int = 0

    @property
    def total(self) -> int:
        return self.decode + self.prefill + self.recompute + self.spec


class CachedBlock(tuple[int, BlockHash, Optional[BlockHash], int]):
    """A block named in the prefix cache, a node of the tree of hash chains:
    ``(block_id, block_hash, parent, hits)``, where ``parent`` is the previous block's hash
    in its chain (None: the first) and ``hits`` the times a request started on it (a
    prefix-cache hit) since it was named.

    ``CachedBlock(...)`` makes a plain ``tuple`` (this class only names its fields, for type
    checkers and readers; read them by unpacking). A snapshot lists every named block, and
    while a viewer watches a busy server that is thousands of tuples a second, each living
    until the next snapshot. The garbage collector stops tracking a plain tuple of ints and
    bytes at its first pass, but tracks a tuple subclass (a NamedTuple) for life: those were
    promoted to the oldest generation and set off full collections of the whole heap (long
    ones with torch loaded, the engine stalled), several times as many as without a viewer
    (docs/inspector.md, "What a viewer costs", has the measurements).
    """

    __slots__ = ()

    def __new__(
        cls, block_id: int, block_hash: BlockHash, parent: Optional[BlockHash], hits: int
    ) -> CachedBlock:
        return cast(CachedBlock, (block_id, block_hash, parent, hits))


@dataclass(frozen=True)
class BlockPoolSnapshot:
    num_blocks: int
    states: str  # one BLOCK_* character per block
    ref_counts: tuple[int, ...]
    cached: tuple[CachedBlock, ...]  # every named block, in no particular order
    cache_version: int  # changes whenever ``cached`` would (names, hits)
    num_evictions: int


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    request_id: str
    status: str  # RequestStatus.value: waiting, running, preempted, waiting_for_remote_kv
    num_computed_tokens: int
    num_tokens: int  # prompt + output so far
    num_prompt_tokens: int
    num_output_tokens: int
    max_tokens: int
    num_cached_tokens: Optional[int]  # prompt tokens hit in the prefix cache (once admitted)
    num_preemptions: int
    block_ids: tuple[int, ...]  # its block table, in order
    arrival_time: float  # monotonic


@dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    """Prefill: a finished request's blocks, kept until a decode instance pulls them."""

    lease_id: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class SchedulerSnapshot:
    pool: BlockPoolSnapshot
    block_size: int
    token_budget: int
    max_num_seqs: int
    prefix_caching: bool
    requests: tuple[RequestSnapshot, ...]  # running (admission order), loading, waiting
    leases: tuple[LeaseSnapshot, ...]

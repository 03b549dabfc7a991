"""KV cache events: the journal of what enters and leaves the prefix cache, as vLLM publishes
it for KV-aware routers (vLLM's ``vllm/distributed/kv_events.py``; consumed by vllm-router's
``kv_aware`` policy, llm-d's precise prefix-cache scorer and NVIDIA Dynamo's KV router).

``BlockStored`` when full blocks take a hash (a run of consecutive blocks of one request, with
the hash of the block before them and their tokens), ``BlockRemoved`` when eviction takes a
hash away, ``AllBlocksCleared`` when the prefix cache is reset. Invariant: replaying the
journal from the start gives exactly the set of hashes the block pool holds
(:func:`replay`; the tests check it after random workloads with evictions and resets).

A model whose sliding-window layers keep their own pool (``sliding_kv.py``) journals both
pools, each as a KV cache group, as vLLM's hybrid KV cache manager does: ``group_idx`` 0 the
full-attention layers', 1 the sliding layers' (with the window), so a router can require,
as the engine does, the window before a prefix hit to be cached too. A model with one pool
leaves the group out.

Hashes go out as vLLM's do: the last 8 bytes of the block's digest as an unsigned big-endian
integer (pagoda's digests are blake2b-256 of (parent, tokens); vLLM's are sha256 of the same
shape, so the two engines' numbers differ, and a router compares only an engine's own).
:class:`CachedBlocks` keeps the state a journal replays to, in a form that can be journaled
again from nothing (the publisher's answer to a subscriber that missed more batches than it
keeps).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence, Union

from pagoda.core.prefix_cache import BlockHash
from pagoda.lora_request import LoRARequest

# The medium of an engine's own KV cache, as vLLM names it on every device ("GPU"): routers
# treat other media (CPU offload, disk) as slower tiers.
MEDIUM = "GPU"
# vLLM's KVCacheSpecKind values for the two kinds of group pagoda has.
FULL_ATTENTION = "full_attention"
SLIDING_WINDOW = "sliding_window"

ExtraKey = Optional[tuple[str, ...]]


def external_hash(block_hash: BlockHash) -> int:
    """A block's hash as events carry it: its last 8 bytes, big-endian, unsigned."""
    return int.from_bytes(block_hash[-8:], "big")


@dataclass(frozen=True)
class CacheGroup:
    """One of an engine's KV caches that events name apart (vLLM's ``group_idx`` and the
    group's kv-cache spec)."""

    idx: int
    kind: str  # FULL_ATTENTION | SLIDING_WINDOW
    sliding_window: Optional[int] = None  # tokens a query sees, for SLIDING_WINDOW


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: Optional[int]  # None for a chain's first block
    token_ids: list[int]  # the blocks' tokens, block after block
    block_size: int
    medium: str = MEDIUM
    lora_name: Optional[str] = None  # the adapter the blocks' KV was computed under
    lora_id: Optional[int] = None
    # Per block, what else its hash depends on (vLLM: multimodal hashes, LoRA, cache_salt):
    # ("cache_salt",) on the first block of a salted chain, else None. None: none at all.
    extra_keys: Optional[list[ExtraKey]] = None
    group_idx: Optional[int] = None  # None: the engine has one pool
    kv_cache_spec_kind: Optional[str] = None
    kv_cache_spec_sliding_window: Optional[int] = None


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = MEDIUM
    group_idx: Optional[int] = None


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KVCacheEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventJournal:
    """Events in the order they happened, until the engine takes them (once per step). A
    pool of a group journals through :meth:`for_group`, into the same list, in order."""

    def __init__(
        self, group: Optional[CacheGroup] = None, events: Optional[list[KVCacheEvent]] = None
    ) -> None:
        self.group = group
        self._events: list[KVCacheEvent] = [] if events is None else events

    def for_group(self, group: CacheGroup) -> KVEventJournal:
        """A journal of ``group``'s events, kept in this one's list."""
        return KVEventJournal(group, self._events)

    def stored(
        self,
        hashes: Sequence[BlockHash],
        parent: Optional[BlockHash],
        token_ids: list[int],
        block_size: int,
        cache_salt: Optional[str] = None,
        lora: Optional[LoRARequest] = None,
    ) -> None:
        extra: Optional[list[ExtraKey]] = None
        if cache_salt is not None and parent is None:
            extra = [(cache_salt,)] + [None] * (len(hashes) - 1)
        group = self.group
        self._events.append(
            BlockStored(
                [external_hash(h) for h in hashes],
                None if parent is None else external_hash(parent),
                token_ids,
                block_size,
                lora_name=lora.lora_name if lora is not None else None,
                lora_id=lora.lora_int_id if lora is not None else None,
                extra_keys=extra,
                group_idx=group.idx if group else None,
                kv_cache_spec_kind=group.kind if group else None,
                kv_cache_spec_sliding_window=group.sliding_window if group else None,
            )
        )

    def removed(self, block_hash: BlockHash) -> None:
        group_idx = self.group.idx if self.group else None
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved) and last.group_idx == group_idx:
            last.block_hashes.append(external_hash(block_hash))  # one allocation's evictions
        else:
            self._events.append(BlockRemoved([external_hash(block_hash)], group_idx=group_idx))

    def cleared(self) -> None:
        """The cache was reset (every pool of an engine at once: one event for them all)."""
        if not (self._events and isinstance(self._events[-1], AllBlocksCleared)):
            self._events.append(AllBlocksCleared())

    def take(self) -> list[KVCacheEvent]:
        events = list(self._events)
        self._events.clear()  # in place: the groups' journals share the list
        return events


def replay(
    events: Iterable[KVCacheEvent], held: Optional[set[int]] = None, group_idx: Optional[int] = None
) -> set[int]:
    """The set of hashes of group ``group_idx`` (None: an engine with one pool) a subscriber
    holds after ``events`` (from ``held``, or empty)."""
    hashes = set() if held is None else held
    for event in events:
        if isinstance(event, AllBlocksCleared):
            hashes.clear()
        elif event.group_idx != group_idx:
            continue
        elif isinstance(event, BlockStored):
            hashes.update(event.block_hashes)
        else:
            hashes.difference_update(event.block_hashes)
    return hashes


class _Block(NamedTuple):
    parent: Optional[int]
    tokens: array  # the block's token ids, 4 bytes each
    block_size: int
    extra_key: ExtraKey
    group: Optional[CacheGroup]
    lora: tuple[Optional[int], Optional[str]] = (None, None)  # (lora_id, lora_name)


class CachedBlocks:
    """The blocks a journal says are cached, per group, with what it takes to announce them
    again. :meth:`as_events` gives a journal (``AllBlocksCleared``, then ``BlockStored``
    events, each block after its parent) that replays to the same state from any state."""

    def __init__(self) -> None:
        self._blocks: dict[tuple[Optional[int], int], _Block] = {}  # (group_idx, hash) ->

    def __len__(self) -> int:
        return len(self._blocks)

    def apply(self, events: Iterable[KVCacheEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(event)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self._blocks.pop((event.group_idx, h), None)
            else:
                self._blocks.clear()

    def _stored(self, event: BlockStored) -> None:
        size, parent = event.block_size, event.parent_block_hash
        group = _event_group(event)
        for i, h in enumerate(event.block_hashes):
            extra = event.extra_keys[i] if event.extra_keys else None
            tokens = array("I", event.token_ids[i * size : (i + 1) * size])
            lora = (event.lora_id, event.lora_name)
            self._blocks.setdefault(
                (event.group_idx, h), _Block(parent, tokens, size, extra, group, lora)
            )
            parent = h

    def copy(self) -> CachedBlocks:
        out = CachedBlocks()
        out._blocks = dict(self._blocks)
        return out

    def as_events(self) -> list[KVCacheEvent]:
        """``AllBlocksCleared`` and a ``BlockStored`` per run of blocks, parents first."""
        events: list[KVCacheEvent] = [AllBlocksCleared()]
        run: list[tuple[int, _Block]] = []
        for h, block in self._parents_first():
            if run and not _extends(run, block):
                events.append(_run_event(run))
                run = []
            run.append((h, block))
        if run:
            events.append(_run_event(run))
        return events

    def _parents_first(self) -> Iterator[tuple[int, _Block]]:
        """Every block, each after its parent where the parent is cached in its group: a
        depth-first walk from the chains' first cached blocks, so chains come out whole;
        group by group, the full layers' (0) first, where the others' parents are."""
        children: dict[tuple[Optional[int], int], list[int]] = {}
        roots: list[tuple[Optional[int], int]] = []
        for (g, h), block in self._blocks.items():
            if block.parent is not None and (g, block.parent) in self._blocks:
                children.setdefault((g, block.parent), []).append(h)
            else:
                roots.append((g, h))
        roots.sort(key=lambda key: -1 if key[0] is None else key[0])  # (stable)
        stack = roots[::-1]
        while stack:
            g, h = stack.pop()
            yield h, self._blocks[(g, h)]
            stack.extend((g, c) for c in reversed(children.get((g, h), [])))


def _event_group(event: BlockStored) -> Optional[CacheGroup]:
    if event.group_idx is None:
        return None
    kind = event.kv_cache_spec_kind or FULL_ATTENTION
    return CacheGroup(event.group_idx, kind, event.kv_cache_spec_sliding_window)


def _extends(run: list[tuple[int, _Block]], block: _Block) -> bool:
    """Whether ``block`` continues ``run``'s chain in one event (same group and size, no
    key of its own)."""
    last_hash, last = run[-1]
    return (
        block.parent == last_hash
        and block.group == last.group
        and block.block_size == last.block_size
        and block.lora == last.lora
        and block.extra_key is None
    )


def _run_event(run: list[tuple[int, _Block]]) -> BlockStored:
    first = run[0][1]
    extra = [b.extra_key for _, b in run]
    group = first.group
    return BlockStored(
        [h for h, _ in run],
        first.parent,
        [t for _, b in run for t in b.tokens],
        first.block_size,
        lora_name=first.lora[1],
        lora_id=first.lora[0],
        extra_keys=extra if any(k is not None for k in extra) else None,
        group_idx=group.idx if group else None,
        kv_cache_spec_kind=group.kind if group else None,
        kv_cache_spec_sliding_window=group.sliding_window if group else None,
    )

"""KV cache events: the journal of what enters and leaves the prefix cache, as vLLM publishes
it for KV-aware routers (vLLM's ``vllm/distributed/kv_events.py``; consumed by vllm-router's
``kv_aware`` policy, llm-d's precise prefix-cache scorer and NVIDIA Dynamo's KV router).

``BlockStored`` when full blocks take a hash (a run of consecutive blocks of one request, with
the hash of the block before them and their tokens), ``BlockRemoved`` when eviction takes a
hash away, ``AllBlocksCleared`` when the prefix cache is reset. Invariant: replaying the
journal from the start gives exactly the set of hashes the block pool holds
(:func:`replay`; the tests check it after random workloads with evictions and resets).

Hashes go out as vLLM's do: the last 8 bytes of the block's digest as an unsigned big-endian
integer (pagoda's digests are blake2b-256 of (parent, tokens); vLLM's are sha256 of the same
shape, so the two engines' numbers differ, and a router compares only an engine's own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from pagoda.core.prefix_cache import BlockHash

# The medium of an engine's own KV cache, as vLLM names it on every device ("GPU"): routers
# treat other media (CPU offload, disk) as slower tiers.
MEDIUM = "GPU"


def external_hash(block_hash: BlockHash) -> int:
    """A block's hash as events carry it: its last 8 bytes, big-endian, unsigned."""
    return int.from_bytes(block_hash[-8:], "big")


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: Optional[int]  # None for a chain's first block
    token_ids: list[int]  # the blocks' tokens, block after block
    block_size: int
    medium: str = MEDIUM
    lora_name: Optional[str] = None
    # Per block, what else its hash depends on (vLLM: multimodal hashes, LoRA, cache_salt):
    # ("cache_salt",) on the first block of a salted chain, else None. None: none at all.
    extra_keys: Optional[list[Optional[tuple[str, ...]]]] = None


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = MEDIUM


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KVCacheEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventJournal:
    """Events in the order they happened, until the engine takes them (once per step)."""

    def __init__(self) -> None:
        self._events: list[KVCacheEvent] = []

    def stored(
        self,
        hashes: Sequence[BlockHash],
        parent: Optional[BlockHash],
        token_ids: list[int],
        block_size: int,
        cache_salt: Optional[str] = None,
    ) -> None:
        extra: Optional[list[Optional[tuple[str, ...]]]] = None
        if cache_salt is not None and parent is None:
            extra = [(cache_salt,)] + [None] * (len(hashes) - 1)
        self._events.append(
            BlockStored(
                [external_hash(h) for h in hashes],
                None if parent is None else external_hash(parent),
                token_ids,
                block_size,
                extra_keys=extra,
            )
        )

    def removed(self, block_hash: BlockHash) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved):  # evictions of one allocation: one event
            last.block_hashes.append(external_hash(block_hash))
        else:
            self._events.append(BlockRemoved([external_hash(block_hash)]))

    def cleared(self) -> None:
        self._events.append(AllBlocksCleared())

    def take(self) -> list[KVCacheEvent]:
        events, self._events = self._events, []
        return events


def replay(events: Iterable[KVCacheEvent], held: Optional[set[int]] = None) -> set[int]:
    """The set of hashes a subscriber holds after ``events`` (from ``held``, or empty)."""
    hashes = set() if held is None else held
    for event in events:
        if isinstance(event, BlockStored):
            hashes.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            hashes.difference_update(event.block_hashes)
        else:
            hashes.clear()
    return hashes

"""``pagoda router --policy cache_aware``: send a request where its prefix is cached, unless that
instance is too much busier than the others.

For each instance the router estimates the work a request would wait for there:

    cost = (prompt - cached prefix) + load_weight * load * prompt

(the prompt and the prefix in chunks of text or KV blocks, ``load`` the requests in flight
there: the router's own, plus those the instance's /metrics last counted running or waiting
beyond them, sent by other clients or routers), and picks the cheapest. A hot prefix so
draws its traffic to the instance holding it until that instance has about
``1 / load_weight`` more requests in flight than an idle one, then spills over (and the
other instance caches it too). The prefix comes from the instances' KV events where the
router subscribes to them (precise), else from the text the router has sent each instance
(approximate); see ``prefix_index.py``.
Invariant: with no prefix cached anywhere the choice is the least loaded instance, as the
``least_outstanding`` policy's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Protocol, Sequence

from pagoda.entrypoints.router.prefix_index import (
    ApproxPrefixIndex,
    EventPrefixIndex,
    request_text,
    text_chunk_names,
    token_block_names,
)

DEFAULT_LOAD_WEIGHT = 0.25

Tokenize = Callable[[dict[str, Any]], Awaitable[Optional[list[int]]]]


class Candidate(Protocol):
    url: str

    @property
    def load(self) -> int:
        """Requests in flight there: the router's own, plus those the instance last
        reported that did not come through this router."""
        ...


@dataclass
class Names:
    """A request's prefix names: text chunks (approximate) or KV blocks (precise)."""

    names: list[bytes]
    precise: bool


class CacheAwarePolicy:
    def __init__(
        self,
        approx: ApproxPrefixIndex,
        precise: Optional[EventPrefixIndex] = None,
        load_weight: float = DEFAULT_LOAD_WEIGHT,
    ) -> None:
        self.approx = approx
        self.precise = precise
        self.load_weight = load_weight

    async def names(self, body: dict[str, Any], tokenize: Tokenize) -> Names:
        """The request's names: its tokens' blocks when the instances publish events (and
        their block size is known), else its text's chunks."""
        if self.precise is not None and self.precise.block_size is not None:
            tokens = await tokenize(body)
            if tokens is not None:
                salt = body.get("cache_salt")
                salt = salt if isinstance(salt, str) else None
                return Names(token_block_names(tokens, self.precise.block_size, salt), True)
        return Names(text_chunk_names(request_text(body)), False)

    def match(self, instance: str, names: Names) -> int:
        if names.precise:
            assert self.precise is not None  # precise names come from its block size
            return self.precise.match(instance, names.names)
        return self.approx.match(instance, names.names)

    def pick(self, candidates: Sequence[Candidate], names: Names) -> Candidate:
        length = len(names.names)
        if not length:
            return min(candidates, key=lambda c: c.load)

        def cost(c: Candidate) -> tuple[float, int, int]:
            work = length - self.match(c.url, names) + self.load_weight * c.load * length
            # Ties (a prefix cached nowhere): the less busy, then the one holding less, so
            # new prefixes spread over the instances.
            return work, c.load, self.held(c.url, names.precise)

        return min(candidates, key=cost)

    def held(self, instance: str, precise: bool) -> int:
        if precise:
            assert self.precise is not None
            return self.precise.size(instance)
        return self.approx.size(instance)

    def routed(self, instance: str, names: Names) -> None:
        """Remember where the request went (the approximate index learns only from this)."""
        if not names.precise:
            self.approx.routed(instance, names.names)

    def drop(self, instance: str) -> None:
        """An instance died: what it held is gone."""
        self.approx.drop(instance)
        if self.precise is not None:
            self.precise.drop(instance)

"""The speculator: proposes each step's drafts and decides how many of them to verify.

It sits beside the scheduler (which calls it once a step, after scheduling the step's
ordinary tokens, with the budget left) and knows no tensors. A decode row that takes k
drafts becomes k + 1 query tokens in the same batch; the worker samples every position as
it would without speculation and keeps the drafts up to the first that differs from the
sample, plus that sample (``worker/spec_verify.py``). The scheduler rolls the rejected
tokens' KV back through ``num_computed_tokens`` and frees blocks held only for them.

How many drafts pay (``policy.py``) depends on the step: at batch 1 a decode step reads all
the weights for one token and verifying a few more costs little; in a large batch each
token costs about as much as the model's FLOPs, and drafts that are rejected are waste.
Invariant: drafts never take budget the step's ordinary tokens needed (they are planned
last), never run a request past ``max_tokens`` or the context, and a request whose drafts
are in flight is not scheduled again until its tokens are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from pagoda.config import SpeculativeConfig
from pagoda.request import Request
from pagoda.spec_decode.ngram import NgramIndex
from pagoda.spec_decode.policy import Candidate, SpecPolicy, StepCostModel, StepShape
from pagoda.spec_decode.suffix import (
    Draft,
    GlobalSuffixes,
    RequestSuffixes,
    SuffixTrie,
    TrieFactory,
)

# A filter over a request's drafts: the longest prefix its grammar allows (structured outputs).
DraftFilter = Callable[[str, list[int]], int]


class Proposer(Protocol):
    def propose(self, request: Request, k: int) -> Draft: ...

    def finish(self, request: Request) -> None: ...


class NgramProposer:
    """Prompt lookup over each request's own tokens (``ngram.py``)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, NgramIndex] = {}

    def propose(self, request: Request, k: int) -> Draft:
        index = self._index.get(request.request_id)
        if index is None:
            index = self._index[request.request_id] = NgramIndex(self.min_n, self.max_n)
        index.extend(request.all_token_ids)
        return Draft(index.propose(k), [])

    def finish(self, request: Request) -> None:
        self._index.pop(request.request_id, None)


class SuffixProposer:
    """Suffix decoding (``suffix.py``): the better of the request's own trie and the global
    trie of recent outputs, by expected accepted length."""

    def __init__(self, config: SpeculativeConfig, make_trie: TrieFactory = SuffixTrie) -> None:
        self.depth = config.suffix_decoding_max_tree_depth
        self.factor = config.suffix_decoding_max_spec_factor
        self.min_prob = config.suffix_decoding_min_token_prob
        self.make_trie = make_trie
        self._own: dict[str, RequestSuffixes] = {}
        self.recent = GlobalSuffixes(
            self.depth, config.suffix_decoding_max_cached_requests, make_trie
        )

    def propose(self, request: Request, k: int) -> Draft:
        """The best-scoring draft of both tries, each matched at a few lengths: the longest
        match leaves the least depth below it, a shorter one may draft further."""
        own = self._own.get(request.request_id)
        if own is None:
            own = self._own[request.request_id] = RequestSuffixes(self.depth, self.make_trie)
        own.extend(request.all_token_ids)
        best = Draft([], [])
        context = request.all_token_ids[-(self.depth - 1) :]
        for max_len in self._match_lengths():
            node, length = own.longest_match(max_len)
            best = _better(best, own.draft(node, self._limit(k, length), self.min_prob))
            longest = length
            if len(self.recent):
                node, length = self.recent.longest_match(context, max_len)
                draft = self.recent.draft(node, self._limit(k, length), self.min_prob)
                best = _better(best, draft)
                longest = max(longest, length)
            if len(best.tokens) >= k or longest < max_len:
                break  # as long as asked for, or no match a shorter limit would change
        return best

    def _match_lengths(self) -> tuple[int, ...]:
        """The longest matches tried: up to the whole depth but one, a half, a quarter."""
        return tuple(dict.fromkeys(max(1, (self.depth - 1) // d) for d in (1, 2, 4)))

    def _limit(self, k: int, match_len: int) -> int:
        """A draft is at most ``factor`` times as long as the match it follows."""
        return min(k, math.ceil(self.factor * match_len)) if match_len else 0

    def finish(self, request: Request) -> None:
        self._own.pop(request.request_id, None)
        self.recent.add(request.request_id, request.output_token_ids)


def _better(a: Draft, b: Draft) -> Draft:
    return b if b.score > a.score else a


@dataclass
class SpecStats:
    """Counters with vLLM's meanings: a draft is one request's drafts of one step."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        while len(self.accepted_per_position) < proposed:
            self.accepted_per_position.append(0)
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def copy(self) -> SpecStats:
        return SpecStats(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            list(self.accepted_per_position),
        )

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verified row yields per step: the accepted drafts plus the one sample."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class Speculator:
    def __init__(
        self,
        config: SpeculativeConfig,
        cost: Optional[StepCostModel] = None,
        make_trie: TrieFactory = SuffixTrie,
    ) -> None:
        """``make_trie``: suffix decoding's trie (the engine passes the C++ one where its
        extension is built; the Python one is the reference)."""
        self.config = config
        self.k = config.num_tokens
        self.make_trie = make_trie
        self.proposer: Proposer = (
            NgramProposer(config.lookup_min, config.lookup_max)
            if config.method == "ngram"
            else SuffixProposer(config, make_trie)
        )
        self.policy = SpecPolicy(cost, adaptive=config.adaptive)
        self.stats = SpecStats()
        self.draft_filter: Optional[DraftFilter] = None  # set by the engine (grammars)

    def plan(
        self, requests: list[Request], budget: int, step: StepShape, max_model_len: int
    ) -> dict[str, list[int]]:
        """Drafts for some of ``requests`` (decode rows of this step, their last token
        known), at most ``budget`` tokens in all: request id -> draft tokens."""
        if budget <= 0:
            return {}
        candidates = []
        for request in requests:
            if not self.policy.may_pay(request.request_id, request.num_tokens, step):
                continue  # not even its likeliest draft token would: no proposal needed
            k = min(
                self.k,
                request.max_tokens - request.num_output_tokens - 1,
                max_model_len - request.num_tokens - 1,
            )
            if k <= 0:
                continue
            draft = self.proposer.propose(request, k)
            tokens = draft.tokens[:k]
            if tokens and self.draft_filter is not None:
                tokens = tokens[: self.draft_filter(request.request_id, tokens)]
            if tokens:
                candidates.append(Candidate(request.request_id, tokens, request.num_tokens))
        if not candidates:
            return {}
        return self.policy.choose(candidates, budget, step)

    def worth_waiting(self, request: Request) -> bool:
        """Async scheduling: drafts need the request's last token, which a step in flight
        still holds; a request that waits a step for it decodes every other step instead,
        which pays when its drafts should yield more than one token. (Its draft is proposed
        from the tokens known so far, one short; the rate is optimistic until tried.)"""
        draft = self.proposer.propose(request, self.k).tokens
        if not draft:
            return False
        a = self.policy.optimistic_rate(request.request_id)
        return sum(a ** (j + 1) for j in range(len(draft))) > 1.0

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        self.stats.record(proposed, accepted)
        self.policy.observe(request_id, proposed, accepted)

    def finish(self, request: Request) -> None:
        self.proposer.finish(request)
        self.policy.forget(request.request_id)

"""A draft proposer for speculative-decoding tests that knows the answer.

Drafts from a tiny random model's own text are accepted only where it happens to repeat
itself, so a test that relies on them may verify nothing. The oracle drafts the reference
output (pagoda's without speculation, or transformers'), each token wrong with probability
``error``: long accepted runs and rejections both happen wherever a test needs them."""
from __future__ import annotations

import random
from typing import Any, Sequence

from pagoda.spec_decode.suffix import Draft
from tiny_models import TINY_VOCAB

# (prompt token ids, sibling index) -> that completion's reference tokens
Refs = dict[tuple[tuple[int, ...], int], list[int]]


class Oracle:
    """Drafts the reference output of each request (by prompt and sibling, else the first
    sibling's), each token wrong with probability ``error``."""

    def __init__(self, refs: Refs, error: float, seed: int = 0) -> None:
        self.refs, self.error, self.rng = refs, error, random.Random(seed)

    def propose(self, request: Any, k: int) -> Draft:
        key = tuple(request.prompt_token_ids)
        ref = self.refs.get((key, request.seed_offset), self.refs.get((key, 0), []))
        done = request.num_output_tokens
        tokens = [(t + 1) % TINY_VOCAB if self.rng.random() < self.error else t
                  for t in ref[done:done + k]]
        return Draft(tokens, [])

    def finish(self, request: Any) -> None:
        pass


def with_oracle_tokens(llm: Any, prompts: Sequence[Sequence[int]],
                       refs: Sequence[Sequence[int]], error: float = 0.3) -> Any:
    """Replace ``llm``'s proposer by an oracle of one reference completion per prompt."""
    table: Refs = {(tuple(p), 0): list(r) for p, r in zip(prompts, refs, strict=True)}
    llm.engine.scheduler.spec.proposer = Oracle(table, error)
    return llm


def with_oracle(llm: Any, prompts: Sequence[Sequence[int]], outs: Sequence[Any],
                error: float = 0.3) -> Any:
    """The same from pagoda's outputs (``RequestOutput``s, every sibling of each)."""
    table: Refs = {}
    for p, out in zip(prompts, outs, strict=True):
        for comp in out.outputs:
            table[(tuple(p), comp.index)] = list(comp.token_ids)
    llm.engine.scheduler.spec.proposer = Oracle(table, error)
    return llm

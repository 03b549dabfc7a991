"""When to speculate: each step, which decode rows get drafts and how many.

A step's time grows with its tokens, and at batch 1 on a CPU hardly at all (the weights are
read once for the whole batch); each draft token adds its expected yield, the chance that it
and the drafts before it are all accepted. The policy adds draft tokens, best yield per
second first, while each raises the step's expected tokens per second:

    rate = (rows that sample + sum of the yields taken) / (step time + their costs)

so a draft is taken exactly when its yield per second of cost beats the step's rate so far.
Yields come from each request's acceptance so far (smoothed toward the rate of all
requests); costs from a :class:`StepCostModel` the engine times at start. A request whose
drafts are declined slowly forgets its history, so one that starts repeating itself gets
tried again. Invariant: with the same inputs the choice is the same (no randomness), and a
draft's tokens are taken in order (a prefix of its proposal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

PRIOR_WEIGHT = 4.0  # pseudo-drafts at the global rate in a request's estimate
DECLINE_DECAY = 0.9  # a declined request's history fades by this each step
GLOBAL_EMA = 0.02  # the global rate's update weight per verified draft
INITIAL_RATE = 0.5
MAX_OPTIMISTIC_RATE = 0.95


@dataclass(frozen=True)
class StepCostModel:
    """Seconds of a step: ``base + per_token * tokens + per_context * context``, where
    ``context`` counts the tokens the step's decode rows attend to (a draft row reads its
    request's KV like a decode row)."""

    base_s: float
    per_token_s: float
    per_context_s: float

    def seconds(self, tokens: int, context: int) -> float:
        return self.base_s + self.per_token_s * tokens + self.per_context_s * context

    def draft_cost(self, context_len: int) -> float:
        return self.per_token_s + self.per_context_s * context_len


@dataclass
class Candidate:
    request_id: str
    tokens: list[int]  # the proposal, in order
    context_len: int  # tokens before its first draft (the request's tokens)


@dataclass(frozen=True)
class StepShape:
    """The step as scheduled before drafts."""

    num_tokens: int
    num_samples: int  # rows that sample a token
    context: int  # tokens its decode rows attend to


class SpecPolicy:
    def __init__(self, cost: Optional[StepCostModel], adaptive: bool = True) -> None:
        self.cost = cost
        self.adaptive = adaptive and cost is not None
        self.global_rate = INITIAL_RATE
        self._seen: dict[str, list[float]] = {}  # request id -> [accepted, proposed]

    def rate(self, request_id: str) -> float:
        """The estimated chance that one more draft token is accepted."""
        accepted, proposed = self._seen.get(request_id, (0.0, 0.0))
        return (accepted + PRIOR_WEIGHT * self.global_rate) / (proposed + PRIOR_WEIGHT)

    def optimistic_rate(self, request_id: str) -> float:
        """:meth:`rate` plus a bonus that shrinks as its drafts are tested (optimism in the
        face of uncertainty: an untried request is worth one try)."""
        _, tested = self._seen.get(request_id, (0.0, 0.0))
        return min(MAX_OPTIMISTIC_RATE, self.rate(request_id) + 0.5 / math.sqrt(tested + 1))

    def may_pay(self, request_id: str, context_len: int, step: StepShape) -> bool:
        """Whether a first draft token of this request could raise the step's rate (if
        not, no later one can: they yield less and cost more)."""
        if not self.adaptive:
            return True
        assert self.cost is not None  # adaptive needs it
        gain = step.num_samples / self.cost.seconds(step.num_tokens, step.context)
        if self.rate(request_id) / self.cost.draft_cost(context_len + 1) > gain:
            return True
        self._decline(request_id)
        return False

    def choose(
        self, candidates: list[Candidate], budget: int, step: StepShape
    ) -> dict[str, list[int]]:
        """Request id -> the drafts to verify this step (at most ``budget`` tokens)."""
        if not self.adaptive:
            return _take_in_order(candidates, budget)
        assert self.cost is not None  # adaptive needs it
        items = []  # (yield per second, yield, cost, candidate index)
        for i, c in enumerate(candidates):
            a, p = self.rate(c.request_id), 1.0
            for j in range(len(c.tokens)):
                p *= a
                cost = self.cost.draft_cost(c.context_len + j + 1)
                items.append((p / cost, p, cost, i))
        items.sort(key=lambda item: -item[0])  # stable: a draft's tokens stay in order
        gain = float(step.num_samples)
        seconds = self.cost.seconds(step.num_tokens, step.context)
        taken = [0] * len(candidates)
        for ratio, p, cost, i in items[:budget]:
            if ratio * seconds <= gain:
                break  # this and every later item would lower tokens per second
            gain, seconds = gain + p, seconds + cost
            taken[i] += 1
        for c, n in zip(candidates, taken, strict=True):
            if not n:
                self._decline(c.request_id)
        return {c.request_id: c.tokens[:n] for c, n in zip(candidates, taken, strict=True) if n}

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        """A verified draft: ``accepted`` of its ``proposed`` tokens matched. A token after a
        rejected one was never tested: only the tested ones count."""
        tested = min(proposed, accepted + 1)
        seen = self._seen.setdefault(request_id, [0.0, 0.0])
        seen[0] += accepted
        seen[1] += tested
        self.global_rate += GLOBAL_EMA * (accepted / tested - self.global_rate)

    def forget(self, request_id: str) -> None:
        self._seen.pop(request_id, None)

    def _decline(self, request_id: str) -> None:
        seen = self._seen.get(request_id)
        if seen is not None:
            seen[0] *= DECLINE_DECAY
            seen[1] *= DECLINE_DECAY


def _take_in_order(candidates: list[Candidate], budget: int) -> dict[str, list[int]]:
    """Not adaptive: every proposal whole, in order, while the budget lasts."""
    chosen = {}
    for c in candidates:
        if budget <= 0:
            break
        chosen[c.request_id] = c.tokens[:budget]
        budget -= len(chosen[c.request_id])
    return chosen

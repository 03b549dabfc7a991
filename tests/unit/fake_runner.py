"""A model runner stand-in for scheduler tests: no torch, deterministic 'sampling'."""
from __future__ import annotations

import random

from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagoda.core.scheduler import Scheduler
from pagoda.spec_decode.suffix import Draft
from pagoda.worker.spec_verify import accept


def fake_token(request_id: str, position: int) -> int:
    """A token that depends only on the request and position (never EOS=1 unless asked)."""
    return 10 + (sum(map(ord, request_id)) * 31 + position * 7) % 50


class FakeRunner:
    """Checks each step against the scheduler's state and samples fake tokens.

    It also keeps a fake KV cache: each slot holds the identity of the token sequence up to
    and including the token whose "KV" was written there, as real KV depends on exactly
    that. Like the real runner it writes the whole batch first, then checks that every
    scheduled request sees its own sequence in every slot it attends to: a prefix-cache
    hit on the wrong block, or on one nobody computed, fails here.

    With the sliding layers' KV apart (``kv.sliding``), it keeps their slots too, written
    through the sliding table, and checks them over each query's window: a block freed too
    early, or a hole where the window still reads, fails here.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.known: set[str] = set()
        self.steps: list[SchedulerOutput] = []
        self.slots: dict[int, tuple[int, ...]] = {}   # slot -> the tokens its KV stands for
        self.sliding_slots: dict[int, tuple[int, ...]] = {}  # the same, sliding layers' pool
        self.tokens_computed = 0
        self.placeholder_inputs = 0   # tokens computed whose value a step in flight samples

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(out)
        self.known -= out.finished_request_ids | out.preempted_request_ids
        for new in out.new_requests:
            assert new.request_id not in self.known, "runner told twice about a new request"
            self.known.add(new.request_id)
        for cached in out.cached_requests:
            assert cached.request_id in self.known, "cached data for a request the runner lacks"
        sampled = {}
        kv = self.scheduler.kv
        for rid, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            assert n >= 1
            # The scheduler counts scheduled tokens as computed as soon as it schedules them.
            end = req.num_computed_tokens
            tokens = self._tokens(req)
            assert end <= len(tokens), "scheduled past the known tokens"
            assert len(kv.block_ids(rid)) * kv.block_size >= end, "no slot for a scheduled token"
            if req.spec_token_ids:  # drafts follow the request's last token, which is known
                assert end - n == req.num_tokens - 1 and n == 1 + len(req.spec_token_ids)
            for pos in range(end - n, end):
                self.slots[self._slot(rid, pos)] = tuple(tokens[:pos + 1])
                if kv.sliding is not None:
                    self.sliding_slots[self._sliding_slot(rid, pos)] = tuple(tokens[:pos + 1])
            self.tokens_computed += n
            self.placeholder_inputs += end > req.num_tokens
        for rid in out.num_scheduled_tokens:
            req = self.scheduler.requests[rid]
            end, tokens = req.num_computed_tokens, self._tokens(req)
            for pos in range(end):
                assert self.slots.get(self._slot(rid, pos)) == tuple(tokens[:pos + 1]), \
                    f"{rid} attends to wrong or missing KV at position {pos}"
            if kv.sliding is not None:  # the first query's window, to the end
                first = max(end - out.num_scheduled_tokens[rid] - kv.sliding.window + 1, 0)
                for pos in range(first, end):
                    assert self.sliding_slots.get(self._sliding_slot(rid, pos)) == tuple(
                        tokens[:pos + 1]), f"{rid}: wrong sliding-layer KV at position {pos}"
            drafts = req.spec_token_ids
            if req.num_output_placeholders and end == req.num_tokens_with_placeholders - 1 + len(
                    drafts):
                # Its placeholder for this step's token; with drafts, a sample at each of
                # their positions too, kept as the real runner keeps them.
                first = end - len(drafts)
                samples = [fake_token(rid, first + j) for j in range(len(drafts) + 1)]
                sampled[rid] = accept(drafts, samples)
        return ModelRunnerOutput(sampled_token_ids=sampled)

    @staticmethod
    def _tokens(req) -> list[int]:
        """The request's tokens, with the one a step in flight samples (async scheduling):
        a fake token depends only on its position, so it is known here already; or with
        the drafts being verified after them."""
        if req.spec_token_ids:
            return [*req.all_token_ids, *req.spec_token_ids]
        if req.num_computed_tokens > req.num_tokens:
            return [*req.all_token_ids, fake_token(req.request_id, req.num_tokens)]
        return list(req.all_token_ids)

    def _slot(self, rid: str, pos: int) -> int:
        kv = self.scheduler.kv
        return kv.block_ids(rid)[pos // kv.block_size] * kv.block_size + pos % kv.block_size

    def _sliding_slot(self, rid: str, pos: int) -> int:
        kv = self.scheduler.kv
        block = kv.sliding_block_ids(rid)[pos // kv.block_size]
        return block * kv.block_size + pos % kv.block_size


def run_step(scheduler: Scheduler, runner: FakeRunner) -> list:
    """The engine core's step, on the fake runner: its outputs, then those of requests that
    finished outside it."""
    out = scheduler.schedule()
    res = runner.execute(out)
    return scheduler.update_from_output(out, res) + scheduler.take_pending_outputs()


class AsyncDriver:
    """The engine's step loop with async scheduling, on the fake runner: step N+1 is
    scheduled and run before step N's output is taken in (the fake "samples" at once, but
    the scheduler hears of it one step late, as it does from a GPU)."""

    def __init__(self, scheduler: Scheduler, runner: FakeRunner) -> None:
        self.scheduler, self.runner = scheduler, runner
        self.in_flight = None

    @property
    def busy(self) -> bool:
        # (The engine keeps stepping while a user request lacks its final output.)
        return (self.scheduler.has_unfinished_requests() or self.in_flight is not None
                or bool(self.scheduler._pending))

    def step(self) -> list:
        out = self.scheduler.schedule()
        res = self.runner.execute(out)
        previous, self.in_flight = self.in_flight, (None if out.is_empty else (out, res))
        outputs = self.scheduler.update_from_output(*previous) if previous else []
        return outputs + self.scheduler.take_pending_outputs()


class OracleDrafts:
    """A proposer that knows the fake tokens to come and gets each wrong with probability
    ``error``: some drafts are accepted whole, some cut at a wrong token."""

    def __init__(self, error: float = 0.3, seed: int = 0) -> None:
        self.error, self.rng = error, random.Random(seed)
        self.finished: list[str] = []

    def propose(self, request, k: int) -> Draft:
        n = request.num_tokens
        tokens = [fake_token(request.request_id, n + j) for j in range(k)]
        tokens = [t + 1 if self.rng.random() < self.error else t for t in tokens]
        return Draft(tokens, [])

    def finish(self, request) -> None:
        self.finished.append(request.request_id)

"""A model runner stand-in for scheduler tests: no torch, deterministic 'sampling'."""
from __future__ import annotations

from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagoda.core.scheduler import Scheduler


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
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.known: set[str] = set()
        self.steps: list[SchedulerOutput] = []
        self.slots: dict[int, tuple[int, ...]] = {}   # slot -> the tokens its KV stands for
        self.tokens_computed = 0

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
            end = req.num_computed_tokens + n
            assert end <= req.num_tokens, "scheduled past the known tokens"
            assert len(kv.block_ids(rid)) * kv.block_size >= end, "no slot for a scheduled token"
            for pos in range(req.num_computed_tokens, end):
                self.slots[self._slot(rid, pos)] = tuple(req.all_token_ids[:pos + 1])
            self.tokens_computed += n
        for rid, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            end = req.num_computed_tokens + n
            for pos in range(end):
                assert self.slots.get(self._slot(rid, pos)) == tuple(req.all_token_ids[:pos + 1]), \
                    f"{rid} attends to wrong or missing KV at position {pos}"
            if end == req.num_tokens:
                sampled[rid] = fake_token(rid, end)
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def _slot(self, rid: str, pos: int) -> int:
        kv = self.scheduler.kv
        return kv.block_ids(rid)[pos // kv.block_size] * kv.block_size + pos % kv.block_size


def run_step(scheduler: Scheduler, runner: FakeRunner) -> list:
    out = scheduler.schedule()
    res = runner.execute(out)
    return scheduler.update_from_output(out, res)

"""Async scheduling at the scheduler level: step N+1 is scheduled before step N's tokens are
taken in, its decodes running on placeholders. Whatever the workload (chunked prefill,
preemption, prefix hits, stop tokens, aborts), every request gets the same tokens and
finish reason as with synchronous steps, and no block leaks."""
from __future__ import annotations

import os
import random
import sys

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import AsyncDriver, FakeRunner, fake_token, run_step  # noqa: E402

from pagoda.config import SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

EOS = (1,)


def make(num_blocks: int, block_size: int = 4, budget: int = 24, max_seqs: int = 6,
         caching: bool = True) -> tuple[Scheduler, FakeRunner]:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching, model_key="m")
    sched = Scheduler(SchedulerConfig(budget, max_seqs, 512, True), kv)
    return sched, FakeRunner(sched)


def workload(seed: int) -> list[Request]:
    """Prompts sharing prefixes (prefix hits), some with a stop token a fake token can hit."""
    rng = random.Random(seed)
    shared = [300 + i for i in range(12)]
    requests = []
    for i in range(10):
        prompt = shared[:rng.randrange(0, 13)] + [rng.randrange(100, 200)
                                                  for _ in range(rng.randrange(1, 20))]
        stop = [fake_token(f"r{i}", p) for p in range(len(prompt) + 2, len(prompt) + 9)][:1]
        params = SamplingParams(temperature=0, max_tokens=rng.randrange(1, 12),
                                stop_token_ids=stop if i % 3 == 0 else [])
        requests.append(Request(f"r{i}", prompt, params, EOS, params.max_tokens))
    return requests


def run(num_blocks: int, use_async: bool, seed: int, caching: bool = True):
    sched, runner = make(num_blocks, caching=caching)
    driver = AsyncDriver(sched, runner)
    for r in workload(seed):
        sched.add_request(r)
    got: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for _ in range(2000):
        if not driver.busy:
            break
        outs = driver.step() if use_async else run_step(sched, runner)
        for out in outs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason:
                assert out.request_id not in reasons, "finished twice"
                reasons[out.request_id] = out.finish_reason
        sched.check_invariants()
    assert not driver.busy, "requests left after draining"
    assert sched.kv.pool.num_free_blocks == num_blocks, "a block leaked"
    return got, reasons, sched.num_preemptions, runner.placeholder_inputs


def test_async_steps_run_on_placeholders_and_match_sync():
    for seed in range(4):
        sync = run(200, use_async=False, seed=seed)
        asyn = run(200, use_async=True, seed=seed)
        assert asyn[:2] == sync[:2]
        assert asyn[3] > 0, "no step ran while another's token was still in flight"
        assert sync[3] == 0


def test_async_with_preemption_matches_an_unconstrained_run():
    for caching in (True, False):
        big = run(200, use_async=False, seed=5, caching=caching)
        small = run(14, use_async=True, seed=5, caching=caching)
        assert small[2] > 0, "the small cache did not force a preemption"
        assert small[:2] == big[:2]


def test_length_end_is_not_scheduled_past():
    """A request whose in-flight token is its last by max_tokens gets no further step."""
    sched, runner = make(64)
    driver = AsyncDriver(sched, runner)
    p = SamplingParams(temperature=0, max_tokens=3)
    sched.add_request(Request("a", [5, 6, 7], p, EOS, 3))
    steps = []
    while driver.busy:
        driver.step()
        steps.append(runner.steps[-1].num_scheduled_tokens.get("a", 0))
    assert runner.tokens_computed == 3 + 2      # the prompt, then 2 decodes: nothing wasted
    assert steps[:3] == [3, 1, 1] and not any(steps[3:])


def test_stop_token_costs_one_dropped_step():
    sched, runner = make(64)
    driver = AsyncDriver(sched, runner)
    stop = fake_token("a", 4)                  # the second sampled token
    p = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop])
    sched.add_request(Request("a", [5, 6, 7], p, EOS, 10))
    got = []
    while driver.busy:
        for out in driver.step():
            got.extend(out.new_token_ids)
    assert got == [fake_token("a", 3), stop]
    assert runner.tokens_computed == 3 + 2      # the decode after the stop was computed, dropped
    assert sched.kv.pool.num_free_blocks == 64


class AsyncSchedulerMachine(RuleBasedStateMachine):
    """Any interleaving of add / async step / abort keeps the invariants, ends every
    request once with the tokens it asked for, and leaks no block."""

    def __init__(self):
        super().__init__()
        self.sched, self.runner = make(num_blocks=12, block_size=2, budget=9, max_seqs=4)
        self.driver = AsyncDriver(self.sched, self.runner)
        self.next_id = 0
        self.finished: set[str] = set()
        self.aborted: set[str] = set()
        self.expected_len: dict[str, int] = {}
        self.got: dict[str, int] = {}

    @rule(prompt_len=st.integers(1, 30), max_tokens=st.integers(1, 8))
    def add(self, prompt_len, max_tokens):
        rid = f"q{self.next_id}"
        self.next_id += 1
        p = SamplingParams(temperature=0, max_tokens=max_tokens)
        self.sched.add_request(Request(rid, [200 + i % 7 for i in range(prompt_len)], p, EOS,
                                       max_tokens))
        self.expected_len[rid] = max_tokens

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            self._take(self.driver.step())

    def _take(self, outs):
        for out in outs:
            assert out.request_id not in self.aborted, "output after the abort"
            self.got[out.request_id] = self.got.get(out.request_id, 0) + len(out.new_token_ids)
            if out.finish_reason:
                assert out.request_id not in self.finished, "finished twice"
                self.finished.add(out.request_id)
                if out.finish_detail is None:
                    assert self.got[out.request_id] == self.expected_len[out.request_id]

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        self.sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
        self.aborted.add(rid)

    @invariant()
    def consistent(self):
        self.sched.check_invariants()
        for r in self.sched.requests.values():
            assert r.num_output_placeholders in (0, 1), "a token waits on two steps"

    def teardown(self):
        for _ in range(1000):
            if not self.driver.busy:
                break
            self._take(self.driver.step())
        assert not self.driver.busy
        assert set(self.expected_len) == self.finished | self.aborted
        assert self.sched.kv.pool.num_free_blocks == self.sched.kv.pool.num_blocks


TestAsyncSchedulerMachine = AsyncSchedulerMachine.TestCase
TestAsyncSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=30,
                                              deadline=None)

"""Async scheduling at the scheduler level: step N+1 is scheduled before step N's tokens are
taken in, its decodes running on placeholders. Whatever the workload (chunked prefill,
preemption, prefix hits, stop tokens, aborts), every request gets the same tokens and
finish reason as with synchronous steps, and no block leaks. (The hypothesis state machine
of tests/unit/test_scheduler.py also runs with async steps.)"""
from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import AsyncDriver, FakeRunner, fake_token, run_step  # noqa: E402

from pagoda.config import SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.request import Request  # noqa: E402
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

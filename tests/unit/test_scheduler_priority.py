"""The ``priority`` scheduling policy (vLLM's ``--scheduling-policy priority``) on the fake
runner: waiting requests are admitted by (priority, arrival); when blocks run out the
running request of the lowest priority is preempted, not the newest; a waiting request
preempts running ones of strictly lower priority to be admitted, never an equal one; and
every request still finishes with the tokens it would have had (recompute)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, fake_token, run_step  # noqa: E402

from pagoda.config import SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

EOS = (1,)


def make(policy, num_blocks=64, max_seqs=8):
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=False, model_key="m")
    sched = Scheduler(SchedulerConfig(64, max_seqs, 512, True, policy), kv)
    return sched, FakeRunner(sched)


def req(rid, prompt_len, priority=0, max_tokens=4, arrival=0.0):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, [200 + i % 50 for i in range(prompt_len)], params, EOS, max_tokens,
                   arrival, priority=priority)


def admitted_order(sched, runner):
    """Request ids in the order they first ran, the queue drained."""
    order = []
    while sched.has_unfinished_requests():
        run_step(sched, runner)
        order += [r.request_id for r in sched.running if r.request_id not in order]
        sched.check_invariants()
    return order


def drain_and_check(sched, runner, requests):
    """Run to the end: every request finishes by length with the tokens it would have had
    without preemption (the fake runner's token of each position)."""
    while sched.has_unfinished_requests():
        run_step(sched, runner)
        sched.check_invariants()
    for r in requests:
        outputs = r.all_token_ids[r.num_prompt_tokens:]
        assert outputs == [fake_token(r.request_id, r.num_prompt_tokens + i)
                           for i in range(r.max_tokens)], r.request_id
        assert r.status is RequestStatus.FINISHED_LENGTH


@pytest.mark.parametrize("policy, want", [("fcfs", ["p2", "p0", "p1"]),
                                          ("priority", ["p0", "p1", "p2"])])
def test_waiting_requests_are_admitted_by_priority_then_arrival(policy, want):
    sched, runner = make(policy, max_seqs=1)
    for i, (rid, prio) in enumerate([("p2", 2), ("p0", 0), ("p1", 1)]):
        sched.add_request(req(rid, 6, priority=prio, arrival=float(i)))
    assert admitted_order(sched, runner) == want


@pytest.mark.parametrize("policy, victim", [("fcfs", "high"), ("priority", "low")])
def test_the_lowest_priority_running_request_is_preempted(policy, victim):
    """low (priority 5) runs first, high (priority 0) joins; their decodes outgrow the
    pool: fcfs preempts the newest (high), priority the lowest (low)."""
    sched, runner = make(policy, num_blocks=8)
    low, high = req("low", 8, 5, max_tokens=12), req("high", 8, 0, max_tokens=12, arrival=1.0)
    sched.add_request(low)
    run_step(sched, runner)
    sched.add_request(high)
    while not (low.num_preemptions or high.num_preemptions):
        run_step(sched, runner)
        sched.check_invariants()
    assert [r.request_id for r in (low, high) if r.num_preemptions] == [victim]
    drain_and_check(sched, runner, [low, high])


@pytest.mark.parametrize("waiting_priority, preempts", [(0, True), (5, False)])
def test_a_waiting_request_preempts_only_a_lower_priority(waiting_priority, preempts):
    sched, runner = make("priority", num_blocks=8)
    running = req("running", 24, priority=5, max_tokens=8)
    sched.add_request(running)
    run_step(sched, runner)  # holds 7 of the 8 blocks
    new = req("new", 12, priority=waiting_priority, arrival=1.0)
    sched.add_request(new)
    out = sched.schedule()
    assert ("new" in out.num_scheduled_tokens) is preempts
    assert (running.status is RequestStatus.PREEMPTED) is preempts
    sched.update_from_output(out, runner.execute(out))
    sched.check_invariants()
    drain_and_check(sched, runner, [running, new])

"""Short prefills first: a prompt with little left to compute (a prefix-cache hit) starts
at the next step instead of waiting behind longer prompts; the head of the queue is passed
a bounded number of times, short work takes at most half a step's budget, and the priority
policy is left as it was."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, run_step  # noqa: E402

from pagoda.config import EngineArgs, SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.request import Request  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

EOS = (1,)
SHARED = [300 + i for i in range(96)]  # a prefix of 24 blocks of 4


def make(short, budget=64, max_seqs=16, policy="fcfs", blocks=1024):
    kv = KVCacheManager(blocks, 4, enable_prefix_caching=True, model_key="m")
    config = SchedulerConfig(budget, max_seqs, 4096, True, policy, short_prefill_tokens=short)
    sched = Scheduler(config, kv)
    return sched, FakeRunner(sched)


def req(rid, prompt, max_tokens=4, priority=0):
    p = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Request(rid, prompt, p, EOS, max_tokens, priority=priority)


def long_prompt(seed, n=400):
    return [1000 + (seed * 7919 + i * 31) % 20000 for i in range(n)]


def run_until_done(sched, runner, limit=2000):
    for _ in range(limit):
        if not sched.has_unfinished_requests():
            return
        run_step(sched, runner)
        sched.check_invariants()
    raise AssertionError("did not finish")


def started_at(runner, rid):
    return next(i for i, s in enumerate(runner.steps) if rid in s.num_scheduled_tokens)


def warm_cache(sched, runner):
    """Compute SHARED + a tail once, so its blocks are cached."""
    sched.add_request(req("warm", SHARED + [7, 8, 9], max_tokens=1))
    run_until_done(sched, runner)


def hit_and_long(short):
    """Two long prompts arrive, then a prompt whose 96 shared tokens are cached (8 left)."""
    sched, runner = make(short)
    warm_cache(sched, runner)
    base = len(runner.steps)
    sched.add_request(req("long0", long_prompt(0)))
    sched.add_request(req("long1", long_prompt(1)))
    run_step(sched, runner)
    sched.add_request(req("hit", SHARED + [11, 12, 13, 14, 15, 16, 17, 18]))
    run_until_done(sched, runner)
    return sched, runner, base


def test_a_cache_hit_starts_at_the_next_step_not_behind_long_prompts():
    sched, runner, base = hit_and_long(short=16)
    assert started_at(runner, "hit") == base + 1
    hit_step = runner.steps[base + 1]
    assert hit_step.num_scheduled_tokens["hit"] == 8  # only what the cache lacks
    # the long prompt kept the rest of that step's budget
    assert sum(hit_step.num_scheduled_tokens.values()) == 64
    # without the policy it waits until both long prompts are in (400 + 400 over 64-token steps)
    _, fcfs, fbase = hit_and_long(short=None)
    assert started_at(fcfs, "hit") - fbase > 10


def test_short_work_takes_at_most_half_the_budget():
    sched, runner = make(short=16, budget=64)
    warm_cache(sched, runner)
    base = len(runner.steps)
    sched.add_request(req("long", long_prompt(4)))
    run_step(sched, runner)
    for i in range(8):  # eight hits of 8 tokens each: 64 tokens of short work
        sched.add_request(req(f"hit{i}", SHARED + [20 + i] * 8))
    run_step(sched, runner)
    step = runner.steps[base + 1]
    short = sum(n for rid, n in step.num_scheduled_tokens.items() if rid.startswith("hit"))
    assert short == 32  # four hits: half the budget
    assert step.num_scheduled_tokens["long"] == 32
    run_until_done(sched, runner)


def test_the_head_is_passed_a_bounded_number_of_times():
    """The head (a long prompt that does not fit while another runs) is passed by short
    requests at most max_num_seqs times; then the queue holds behind it and it runs."""
    sched, runner = make(short=16, budget=64, max_seqs=3, blocks=140)
    warm_cache(sched, runner)
    sched.add_request(req("big0", long_prompt(5), max_tokens=200))
    run_step(sched, runner)
    big1 = req("big1", long_prompt(6), max_tokens=4)
    sched.add_request(big1)  # waits: no blocks for both
    admitted, n = False, 0
    for _ in range(600):
        sched.add_request(req(f"hit{n}", SHARED + [40 + n % 50] * 8, max_tokens=2))
        n += 1
        run_step(sched, runner)
        sched.check_invariants()
        if sched.requests.get("big1") is None or sched.requests["big1"] in sched.running:
            admitted = True
            break
    assert admitted, "the head starved"
    assert big1.short_passes == 3  # passed max_num_seqs times, then the queue held
    run_until_done(sched, runner)


def test_priority_policy_is_not_reordered():
    sched, runner = make(short=16, policy="priority")
    warm_cache(sched, runner)
    base = len(runner.steps)
    sched.add_request(req("long0", long_prompt(0)))
    sched.add_request(req("long1", long_prompt(1)))
    run_step(sched, runner)
    sched.add_request(req("hit", SHARED + [11] * 8, priority=0))
    run_until_done(sched, runner)
    assert started_at(runner, "hit") - base > 10


def test_engine_default_is_a_quarter_of_the_budget_and_zero_turns_it_off():
    assert EngineArgs(max_num_batched_tokens=512).scheduler_config(4096).short_prefill_tokens == 128
    off = EngineArgs(max_num_batched_tokens=512, short_prefill_tokens=0)
    assert off.scheduler_config(4096).short_prefill_tokens is None
    set_ = EngineArgs(max_num_batched_tokens=512, short_prefill_tokens=40)
    assert set_.scheduler_config(4096).short_prefill_tokens == 40


def test_a_prompt_is_not_cut_to_leave_a_short_tail():
    """A prompt that overflows the budget by a short tail runs whole in one step (at most
    short_prefill_tokens past the budget); a longer overflow is cut at the budget."""
    sched, runner = make(short=16, budget=64)
    sched.add_request(req("tail", long_prompt(7, n=70)))
    run_step(sched, runner)
    assert runner.steps[0].num_scheduled_tokens == {"tail": 70}
    sched, runner = make(short=16, budget=64)
    sched.add_request(req("cut", long_prompt(8, n=100)))
    run_step(sched, runner)
    run_step(sched, runner)
    assert [s.num_scheduled_tokens["cut"] for s in runner.steps] == [64, 36]
    sched, runner = make(short=None, budget=64)
    sched.add_request(req("fcfs", long_prompt(7, n=70)))
    run_step(sched, runner)
    assert runner.steps[0].num_scheduled_tokens == {"fcfs": 64}
    run_until_done(sched, runner)

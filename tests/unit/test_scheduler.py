import sys
import os

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, precondition

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import AsyncDriver, FakeRunner, fake_token, run_step  # noqa: E402

from pagoda.config import SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

EOS = (1,)


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True, max_len=512,
         caching=False):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching, model_key="m")
    sched = Scheduler(SchedulerConfig(budget, max_seqs, max_len, chunked), kv)
    return sched, FakeRunner(sched)


def req(rid, prompt_len, max_tokens=4, **params):
    p = SamplingParams(temperature=0, max_tokens=max_tokens, **params)
    return Request(rid, [200 + i % 50 for i in range(prompt_len)], p, EOS, max_tokens)


def drain(sched, runner, max_steps=10_000):
    finished = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        for out in run_step(sched, runner):
            if out.finish_reason:
                finished[out.request_id] = out.finish_reason
        sched.check_invariants()
    assert not sched.has_unfinished_requests(), "requests left after draining"
    return finished


def test_decodes_first_then_prefill_chunks_within_budget():
    sched, runner = make(budget=10)
    sched.add_request(req("a", 3, max_tokens=20))
    run_step(sched, runner)                        # a: prefill 3 -> first token
    sched.add_request(req("b", 25))
    out = sched.schedule()
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 9)]
    assert out.total_num_scheduled_tokens == 10
    runner.execute(out)


def test_chunked_prefill_keeps_decodes_running():
    sched, runner = make(budget=8)
    sched.add_request(req("d", 2, max_tokens=50))
    run_step(sched, runner)
    sched.add_request(req("long", 40))
    chunks = []
    while sched.requests["long"].num_computed_tokens < 40:
        out = sched.schedule()
        assert out.num_scheduled_tokens.get("d") == 1, "the decode was stalled"
        chunks.append(out.num_scheduled_tokens["long"])
        sched.update_from_output(out, runner.execute(out))
    assert chunks == [7, 7, 7, 7, 7, 5]


def test_without_chunked_prefill_a_prompt_goes_whole():
    sched, runner = make(budget=8, chunked=False, max_len=64)
    sched.add_request(req("d", 2, max_tokens=50))
    run_step(sched, runner)
    sched.add_request(req("long", 40))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"d": 1, "long": 40}  # budget grows to max_model_len


def test_max_num_seqs_limits_running():
    sched, runner = make(max_seqs=2)
    for i in range(4):
        sched.add_request(req(f"r{i}", 3))
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}


def test_fcfs_head_of_line_blocks_later_requests():
    sched, runner = make(num_blocks=4, block_size=4, budget=64)
    sched.add_request(req("a", 10, max_tokens=2))   # 3 blocks
    sched.add_request(req("b", 10, max_tokens=2))   # would need 3 more: only 1 free
    sched.add_request(req("c", 2, max_tokens=2))    # would fit, but must not overtake b
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"a"}


def test_preemption_takes_the_newest_and_everything_finishes():
    sched, runner = make(num_blocks=8, block_size=4, budget=64, max_seqs=8)
    for i in range(4):
        sched.add_request(req(f"r{i}", 6, max_tokens=6))
    finished = drain(sched, runner)
    assert sched.num_preemptions > 0
    assert finished == {f"r{i}": "length" for i in range(4)}
    assert sched.kv.pool.num_free_blocks == 8


def test_preempted_request_is_the_most_recent_admission():
    sched, runner = make(num_blocks=5, block_size=4, budget=64)
    sched.add_request(req("old", 7, max_tokens=20))
    sched.add_request(req("new", 7, max_tokens=20))
    run_step(sched, runner)                       # both admitted: 2 + 2 blocks
    for _ in range(12):
        run_step(sched, runner)
        if sched.num_preemptions:
            break
    assert sched.requests["new"].status in (RequestStatus.PREEMPTED, RequestStatus.WAITING)
    assert sched.requests["old"].status is RequestStatus.RUNNING


def test_outputs_after_preemption_match_an_unconstrained_run():
    def tokens(num_blocks):
        sched, runner = make(num_blocks=num_blocks, block_size=2, budget=16)
        for i in range(5):
            sched.add_request(req(f"r{i}", 5 + i, max_tokens=7))
        seen = {}
        while sched.has_unfinished_requests():
            for out in run_step(sched, runner):
                seen.setdefault(out.request_id, []).extend(out.new_token_ids)
        return seen, sched.num_preemptions

    small, preemptions = tokens(9)
    big, none = tokens(200)
    assert preemptions > 0 and none == 0
    assert small == big


def test_request_that_cannot_fit_alone_finishes_with_a_reason():
    sched, runner = make(num_blocks=3, block_size=4, budget=64)
    sched.add_request(req("huge", 20))                      # 6 blocks for the prompt alone
    sched.add_request(req("grows", 10, max_tokens=10))      # prompt fits, output does not
    outs = {}
    while sched.has_unfinished_requests():
        for o in run_step(sched, runner):
            if o.finish_reason:
                outs[o.request_id] = o
    assert outs["huge"].finish_reason == "length" and "KV blocks" in outs["huge"].finish_detail
    assert outs["grows"].finish_reason == "length"
    assert "KV cache is full" in outs["grows"].finish_detail
    assert sched.kv.pool.num_free_blocks == 3


def test_eos_stop_token_and_min_tokens():
    sched, runner = make()
    sched.add_request(req("s", 3, max_tokens=10, stop_token_ids=[fake_token("s", 4)]))
    finished = drain(sched, runner)
    assert finished == {"s": "stop"}
    sched.add_request(req("m", 3, max_tokens=10, min_tokens=3,
                          stop_token_ids=[fake_token("m", 4)]))
    finished = drain(sched, runner)
    assert finished == {"m": "length"}  # the stop token came before min_tokens: ignored


def test_abort_frees_blocks_and_tells_the_runner():
    sched, runner = make()
    sched.add_request(req("a", 9, max_tokens=30))
    sched.add_request(req("b", 9, max_tokens=30))
    run_step(sched, runner)
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    sched.check_invariants()
    out = sched.schedule()
    assert "a" in out.finished_request_ids and "a" not in out.num_scheduled_tokens
    runner.execute(out)
    sched.finish_requests(["b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


def test_duplicate_request_id_is_refused():
    sched, _ = make()
    sched.add_request(req("x", 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(req("x", 3))


class SchedulerMachine(RuleBasedStateMachine):
    """After any sequence of add / step / abort, the invariants hold and nothing is lost:
    every request ends once, with the tokens it asked for, or is aborted and heard of no
    more. ``use_async``: steps as the engine takes them with async scheduling; ``caching``:
    with prefix caching (the prompts share prefixes, and the fake runner checks every hit's
    KV)."""
    use_async = False
    caching = False

    def __init__(self):
        super().__init__()
        self.sched, self.runner = make(num_blocks=12, block_size=2, budget=9, max_seqs=4,
                                       caching=self.caching)
        self.driver = AsyncDriver(self.sched, self.runner) if self.use_async else None
        self.next_id = 0
        self.finished: set[str] = set()
        self.aborted: set[str] = set()
        self.added: set[str] = set()
        self.expected_len: dict[str, int] = {}
        self.got: dict[str, int] = {}

    @rule(prompt_len=st.integers(1, 30), max_tokens=st.integers(1, 8))
    def add(self, prompt_len, max_tokens):
        rid = f"q{self.next_id}"
        self.next_id += 1
        self.sched.add_request(req(rid, prompt_len, max_tokens=max_tokens))
        self.added.add(rid)
        self.expected_len[rid] = max_tokens

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            self._take(self._one_step())

    def _one_step(self) -> list:
        return self.driver.step() if self.driver else run_step(self.sched, self.runner)

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
        # Every request either ended or is still queued / running: none is lost.
        # (A request too big for the whole cache finishes at once; its output is pending.)
        pending = {o.request_id for o in self.sched._pending}
        assert self.added == self.finished | self.aborted | set(self.sched.requests) | pending
        assert len(self.sched.running) <= 4
        for r in self.sched.requests.values():
            assert r.num_output_placeholders in (0, 1), "a token waits on two steps"

    def teardown(self):
        for _ in range(1000):
            busy = self.driver.busy if self.driver else (self.sched.has_unfinished_requests()
                                                         or self.sched._pending)
            if not busy:
                break
            self._take(self._one_step())
            self.sched.check_invariants()
        assert self.added == self.finished | self.aborted, "a queued request never finished"
        assert self.sched.kv.pool.num_free_blocks == self.sched.kv.pool.num_blocks


class AsyncSchedulerMachine(SchedulerMachine):
    use_async = True


class AsyncCachingSchedulerMachine(SchedulerMachine):
    use_async = True
    caching = True


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestAsyncSchedulerMachine = AsyncSchedulerMachine.TestCase
TestAsyncSchedulerMachine.settings = TestSchedulerMachine.settings
TestAsyncCachingSchedulerMachine = AsyncCachingSchedulerMachine.TestCase
TestAsyncCachingSchedulerMachine.settings = TestSchedulerMachine.settings


# ------------------------------------------------------------------- n > 1 siblings
def siblings_of(rid, prompt_len, n, max_tokens=4):
    first = req(rid, prompt_len, max_tokens)
    return first, [Request(f"{rid}:{i}", first.prompt_token_ids, first.sampling_params, EOS,
                           max_tokens, prefix_donor=rid) for i in range(1, n)]


def test_siblings_wait_for_the_prompt_then_go_first_in_order():
    sched, runner = make(budget=8, caching=True)
    first, sibs = siblings_of("a", 24, 3)  # three full chunks: no room for "late"
    sched.add_request(first, sibs)
    sched.add_request(req("late", 6))
    seen_waiting = []
    while first.num_output_tokens == 0:
        seen_waiting.append([r.request_id for r in sched.waiting])
        run_step(sched, runner)
        sched.check_invariants()
    assert all("a:1" not in w and "a:2" not in w for w in seen_waiting), "released too early"
    # Released at the front, in order, ahead of the request that came later.
    assert [r.request_id for r in sched.waiting][:3] == ["a:1", "a:2", "late"]
    out = sched.schedule()
    assert sched.requests["a:1"].num_cached_tokens == 20  # the full blocks but the last token's
    sched.update_from_output(out, runner.execute(out))
    assert set(drain(sched, runner)) == {"a", "a:1", "a:2", "late"}


def test_siblings_of_an_aborted_request_are_dropped():
    sched, runner = make(budget=8)
    first, sibs = siblings_of("a", 20, 3)
    sched.add_request(first, sibs)
    run_step(sched, runner)  # a chunk of the prompt: no token yet
    sched.finish_requests(["a", "a:1", "a:2"], RequestStatus.FINISHED_ABORTED)
    sched.check_invariants()
    assert not sched.has_unfinished_requests() and not sched.waiting


def test_siblings_of_a_request_too_big_end_too():
    sched, runner = make(num_blocks=4, block_size=4)
    first, sibs = siblings_of("big", 40, 2)
    sched.add_request(first, sibs)
    assert not sched.has_unfinished_requests()
    done = {o.request_id: o.finish_reason for o in sched.take_pending_outputs()}
    assert done == {"big": "length", "big:1": "length"}

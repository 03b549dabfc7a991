"""Prefix caching on the scheduler side: hash chains, hits, eviction, and invariants under
random operation sequences. No model: tests/unit/fake_runner.py checks every attended KV slot."""
import sys
import os

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, run_step  # noqa: E402

from pagoda.config import SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.prefix_cache import extend_block_hashes, hash_block, root_hash  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

EOS = (1,)
BS = 4


def make(num_blocks=64, budget=32, max_seqs=8, chunked=True, caching=True):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=caching, model_key="m")
    sched = Scheduler(SchedulerConfig(budget, max_seqs, 512, chunked), kv)
    return sched, FakeRunner(sched)


def req(rid, tokens, max_tokens=4, salt=None, **params):
    p = SamplingParams(temperature=0, max_tokens=max_tokens, **params)
    return Request(rid, list(tokens), p, EOS, max_tokens, cache_salt=salt)


def drain(sched, runner):
    outputs = {}
    while sched.has_unfinished_requests():
        for out in run_step(sched, runner):
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        sched.check_invariants()
    return outputs


PREFIX = list(range(100, 124))  # 24 tokens = 6 full blocks


# ------------------------------------------------------------------ hash chain
def test_same_tokens_after_a_different_parent_hash_differently():
    root = root_hash("m")
    a = hash_block(root, [1, 2, 3, 4])
    b = hash_block(root, [9, 9, 9, 9])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(b, [5, 6, 7, 8])
    assert hash_block(a, [5, 6, 7, 8]) == hash_block(hash_block(root, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_root_carries_model_and_salt():
    assert root_hash("m") == root_hash("m")
    assert root_hash("m") != root_hash("other-model")
    assert root_hash("m") != root_hash("m", "tenant-a")
    assert root_hash("m", "tenant-a") != root_hash("m", "tenant-b")
    assert root_hash("m", "") != root_hash("m")  # an empty salt is still a salt


def test_token_encoding_is_unambiguous():
    root = root_hash("m")
    assert hash_block(root, [1, 2]) != hash_block(root, [2 * 256 + 1])
    assert hash_block(root, [1, 2]) != hash_block(root, [1, 2, 0])


def test_extend_block_hashes_only_covers_full_blocks_and_is_incremental():
    root = root_hash("m")
    tokens = list(range(10))
    hashes: list[bytes] = []
    extend_block_hashes(hashes, root, tokens, BS, num_tokens=5)
    assert len(hashes) == 1
    extend_block_hashes(hashes, root, tokens, BS)
    assert len(hashes) == 2
    assert hashes[1] == hash_block(hash_block(root, tokens[:4]), tokens[4:8])


# ------------------------------------------------------------------ manager
def test_hit_takes_the_longest_cached_run_and_never_the_last_token():
    sched, runner = make()
    sched.add_request(req("a", PREFIX + [7, 7]))           # 26 tokens: 6 full blocks
    drain(sched, runner)
    b = req("b", PREFIX + [8, 8, 8])                       # shares 6 blocks
    c = req("c", PREFIX)                                    # the prefix exactly: 5 blocks
    d = req("d", PREFIX[:8] + [5] * 16)                     # diverges in block 2
    e = req("e", PREFIX[:11] + [5] * 6)                     # diverges at block 2's last token
    for r in (b, c, d, e):
        sched.add_request(r)
    drain(sched, runner)
    assert [r.num_cached_tokens for r in (b, c, d, e)] == [24, 20, 8, 8]
    assert sched.prefix_cache_hits == 24 + 20 + 8 + 8
    assert sched.prefix_cache_queries == 26 + 27 + 24 + 24 + 17


def test_fully_cached_prompt_still_computes_its_last_token():
    sched, runner = make()
    sched.add_request(req("a", PREFIX))
    drain(sched, runner)
    sched.add_request(req("b", PREFIX))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"b": 4}             # the last block is recomputed
    assert out.new_requests[0].num_computed_tokens == 20
    runner.execute(out)


def test_salt_isolates_tenants():
    sched, runner = make()
    sched.add_request(req("a", PREFIX, salt="tenant-a"))
    drain(sched, runner)
    others = [req("none", PREFIX), req("b", PREFIX, salt="tenant-b"),
              req("a2", PREFIX, salt="tenant-a")]
    for r in others:
        sched.add_request(r)
    drain(sched, runner)
    assert [r.num_cached_tokens for r in others] == [0, 0, 20]


def test_caching_off_reuses_nothing():
    sched, runner = make(caching=False)
    sched.add_request(req("a", PREFIX))
    drain(sched, runner)
    b = req("b", PREFIX)
    sched.add_request(b)
    drain(sched, runner)
    assert b.num_cached_tokens == 0 and sched.kv.pool.num_cached_blocks == 0


def test_same_step_admission_reuses_what_the_first_schedules():
    sched, runner = make(budget=64)
    a, b = req("a", PREFIX + [1, 2]), req("b", PREFIX + [3])
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    # b hits the six blocks a was given in this very step; both run in one forward, where
    # the whole batch's K/V is written before anyone attends (the fake runner checks it).
    assert out.num_scheduled_tokens == {"a": 26, "b": 1}
    assert b.num_cached_tokens == 24
    runner.execute(out)


def test_chunks_become_cacheable_as_they_are_scheduled():
    sched, runner = make(budget=16)
    sched.add_request(req("a", PREFIX + [1] * 6, max_tokens=2))   # 30 tokens, two chunks
    run_step(sched, runner)                                 # a: 16 tokens -> 4 full blocks
    assert sched.kv.pool.num_cached_blocks == 4
    b = req("b", PREFIX + [2])
    sched.add_request(b)
    out = run_step(sched, runner) and runner.steps[-1]     # a: last 14; b: the 2 left over
    assert out.num_scheduled_tokens == {"a": 14, "b": 1}
    assert b.num_cached_tokens == 24                        # a's second chunk, same step
    drain(sched, runner)


def test_output_blocks_are_cacheable_for_the_next_turn():
    sched, runner = make()
    a = req("a", PREFIX[:6], max_tokens=10)
    sched.add_request(a)
    drain(sched, runner)
    history = a.all_token_ids[:-1]  # the last sampled token's KV was never computed
    assert len(history) == 15
    b = req("b", history + [42, 43])
    sched.add_request(b)
    drain(sched, runner)
    assert b.num_cached_tokens == 12                        # 3 full blocks, outputs included


def test_eviction_happens_before_preemption_lru_and_tail_first():
    sched, runner = make(num_blocks=8, budget=64)
    sched.add_request(req("a", PREFIX + [1], max_tokens=1))  # 7 blocks, 6 cached after
    drain(sched, runner)
    assert sched.kv.pool.num_cached_blocks == 6
    prefix_hashes = req_hashes(PREFIX)
    sched.add_request(req("long", list(range(300, 316)), max_tokens=12))  # 4 blocks, then 7
    run_step(sched, runner)
    # It took the two anonymous free blocks first, then evicted the prefix's two tail blocks.
    assert len(sched.kv.pool.lookup(prefix_hashes)) == 4
    sched.add_request(req("short", [9, 9, 9], max_tokens=6))  # 1 block, then 3
    drain(sched, runner)
    assert sched.num_preemptions == 0                       # evicting was always enough
    assert len(sched.kv.pool.lookup(prefix_hashes)) == 0


def req_hashes(tokens):
    hashes: list[bytes] = []
    extend_block_hashes(hashes, root_hash("m"), tokens, BS)
    return hashes


def _preemption_run(caching):
    sched, runner = make(num_blocks=10, budget=64, max_seqs=2, caching=caching)
    a = req("a", list(range(100, 116)), max_tokens=16)      # grows to 8 blocks
    b = req("b", list(range(200, 212)), max_tokens=16)      # grows to 7 blocks
    sched.add_request(a)
    sched.add_request(b)
    return drain(sched, runner), sched, runner


def test_preempted_request_recomputes_from_its_own_cached_blocks():
    outs, sched, runner = _preemption_run(caching=True)
    assert sched.num_preemptions >= 1
    plain_outs, plain_sched, plain_runner = _preemption_run(caching=False)
    assert plain_sched.num_preemptions >= 1
    assert outs == plain_outs
    # Re-admitted, it found the blocks it had computed still cached: less recomputation.
    assert runner.tokens_computed < plain_runner.tokens_computed
    assert sched.prefix_cache_hits > 0


def test_prompt_logprobs_requests_compute_every_prompt_token():
    sched, runner = make()
    sched.add_request(req("a", PREFIX))
    drain(sched, runner)
    b = req("b", PREFIX, prompt_logprobs=0)
    sched.add_request(b)
    drain(sched, runner)
    assert b.num_cached_tokens == 0


def test_reset_prefix_cache_forgets_everything():
    sched, runner = make()
    sched.add_request(req("a", PREFIX))
    drain(sched, runner)
    assert sched.kv.reset_prefix_cache() == 6
    b = req("b", PREFIX)
    sched.add_request(b)
    drain(sched, runner)
    assert b.num_cached_tokens == 0
    sched.check_invariants()


# --------------------------------------------------------- stateful: scheduler
# Overlapping prefixes that diverge mid-block and at a block's last token (position 7).
PREFIXES = [list(range(100, 112)), list(range(100, 106)) + [7] * 6,
            list(range(100, 107)) + [8] * 5, [50] * 9]


class CachingSchedulerMachine(RuleBasedStateMachine):
    """Random adds (over a few shared prefixes and salts), steps, aborts and cache resets on
    a small pool: invariants hold, the fake runner never sees wrong KV, nothing is lost."""

    def __init__(self):
        super().__init__()
        self.sched, self.runner = make(num_blocks=14, budget=9, max_seqs=4)
        self.next_id = 0
        self.added: set[str] = set()
        self.finished: set[str] = set()

    @rule(prefix=st.sampled_from(range(len(PREFIXES))), suffix=st.lists(st.integers(2, 6),
          max_size=7), max_tokens=st.integers(1, 6), salt=st.sampled_from([None, "s"]))
    def add(self, prefix, suffix, max_tokens, salt):
        rid = f"q{self.next_id}"
        self.next_id += 1
        self.sched.add_request(req(rid, PREFIXES[prefix] + suffix, max_tokens, salt))
        self.added.add(rid)

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            for out in run_step(self.sched, self.runner):
                if out.finish_reason:
                    assert out.request_id not in self.finished, "finished twice"
                    self.finished.add(out.request_id)

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        self.sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
        self.finished.add(rid)

    @rule()
    def reset(self):
        self.sched.kv.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.sched.check_invariants()
        pending = {o.request_id for o in self.sched._pending}
        assert self.added == self.finished | set(self.sched.requests) | pending

    def teardown(self):
        drain(self.sched, self.runner)
        pool = self.sched.kv.pool
        assert pool.num_free_blocks == pool.num_blocks


TestCachingSchedulerMachine = CachingSchedulerMachine.TestCase
TestCachingSchedulerMachine.settings = settings(max_examples=80, stateful_step_count=30,
                                                deadline=None)


# -------------------------------------------------------------- stateful: pool
class CachingPoolMachine(RuleBasedStateMachine):
    """The block pool and manager alone: allocate, cache, free, hit (touch), evict, preempt.
    Checks free + used == total, ref counts == holders, one block per hash, no block in use
    on the free list, and that a named block is only ever hit for the tokens it was named by."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(10, BS, enable_prefix_caching=True, model_key="m")
        self.live: dict[str, Request] = {}
        self.named_by: dict[bytes, tuple[int, ...]] = {}
        self.next_id = 0

    def _admit(self, r: Request) -> None:
        hit = self.kv.get_computed_blocks(r)
        for i, b in enumerate(hit):
            assert self.kv.pool.block_hash[b] == r.block_hashes[i]
        n = r.num_tokens - len(hit) * BS
        if self.kv.allocate_slots(r, n, hit) is not None:
            r.num_computed_tokens = r.num_tokens
            self.live[r.request_id] = r
            for i, h in enumerate(r.block_hashes):
                content = (r.cache_salt, *r.all_token_ids[:(i + 1) * BS])
                assert self.named_by.setdefault(h, content) == content, "hash collision"

    @rule(prefix=st.sampled_from(range(len(PREFIXES))), extra=st.integers(0, 9),
          salt=st.sampled_from([None, "s"]))
    def admit(self, prefix, extra, salt):
        rid = f"r{self.next_id}"
        self.next_id += 1
        self._admit(req(rid, PREFIXES[prefix] + [3] * extra, salt=salt))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 6))
    def grow(self, data, n):
        r = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        for _ in range(n):
            r.append_output_token(4)
        if self.kv.allocate_slots(r, n) is not None:
            r.num_computed_tokens = r.num_tokens

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        r = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.kv.free(r)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt_and_readmit(self, data):
        r = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.kv.free(r)
        r.num_computed_tokens = 0
        self._admit(r)

    @rule(n=st.integers(1, 10))
    def evict_by_allocating(self, n):
        pool = self.kv.pool
        if n <= pool.num_free_blocks:
            blocks = pool.allocate(n)
            assert all(pool.block_hash[b] is None for b in blocks), "evicted block kept its hash"
            pool.release(blocks)

    @rule()
    def reset(self):
        self.kv.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.kv.check_invariants()
        pool = self.kv.pool
        assert len(set(pool.cached.values())) == len(pool.cached), "a block under two hashes"


TestCachingPoolMachine = CachingPoolMachine.TestCase
TestCachingPoolMachine.settings = settings(max_examples=80, stateful_step_count=40,
                                           deadline=None)

"""The sliding-window layers' own block tables (core/sliding_kv.py) under the real scheduler:
blocks behind every window go back to their pool, a prefix hit needs the window before it
cached, allocation is all or nothing across both pools, and the fake runner (which keeps
fake KV for both tables) sees every query's window intact through chunked prefill,
preemption, prefix caching, async scheduling and speculation (drafts rolled back)."""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import AsyncDriver, FakeRunner, OracleDrafts, fake_token, run_step  # noqa: E402

from pagoda.config import SchedulerConfig, SpeculativeConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.prefix_cache import extend_block_hashes, root_hash  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.core.sliding_kv import (  # noqa: E402
    HOLE,
    SlidingTables,
    sliding_pool_blocks,
    window_start_block,
)
from pagoda.request import Request  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402
from pagoda.spec_decode.speculator import Speculator  # noqa: E402

EOS = (1,)
BS, WINDOW = 4, 10


def make(num_blocks=64, sliding_blocks=16, budget=8, max_seqs=4, caching=True, window=WINDOW):
    sliding = SlidingTables(sliding_blocks, window, BS)
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=caching, model_key="m",
                        sliding=sliding)
    sched = Scheduler(SchedulerConfig(budget, max_seqs, 512, True), kv)
    return sched, FakeRunner(sched)


def with_drafts(sched, error, k=4, seed=0):
    """Speculation with the fake runner's oracle: each draft token wrong with ``error``."""
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=k, adaptive=False))
    speculator.proposer = OracleDrafts(error, seed)
    sched.spec = speculator
    return sched


def req(rid, tokens, max_tokens=6):
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(tokens), p, EOS, max_tokens)


def drain(sched, runner, step=run_step, max_steps=5_000):
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        for out in step(sched, runner):
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        sched.check_invariants()
    assert not sched.has_unfinished_requests()
    return outputs


def test_window_start_block():
    # A query at p reads keys (p - W, p]: the first is p - W + 1.
    assert window_start_block(0, WINDOW, BS) == 0
    assert window_start_block(12, WINDOW, BS) == 0  # first key 3
    assert window_start_block(13, WINDOW, BS) == 1  # first key 4
    assert window_start_block(40, WINDOW, BS) == 7  # first key 31


def test_blocks_behind_the_window_are_given_back_as_the_request_goes():
    sched, runner = make()
    sched.add_request(req("a", range(200, 260), max_tokens=20))
    sliding = sched.kv.sliding
    while sched.has_unfinished_requests():
        run_step(sched, runner)
        sched.check_invariants()
        if "a" in sliding.tables:
            r = sched.requests["a"]
            # Held: from the block the last step's first query read to the end of the table.
            assert len(sliding.held("a")) <= (WINDOW - 1 + 8) // BS + 2
            assert sliding.table("a")[: sliding.start["a"]] == [HOLE] * sliding.start["a"]
            assert len(sched.kv.block_ids("a")) * BS >= r.num_computed_tokens  # full: whole
    assert sliding.num_freed >= (80 - WINDOW) // BS - 2
    assert sliding.pool.num_used_blocks == 0 and sched.kv.pool.num_used_blocks == 0


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_random_traffic_keeps_every_window_intact(driver):
    """Shared prefixes, both pools small (so sliding blocks are evicted, hits shrink and
    requests are preempted), chunked prefill; the outputs equal an unconstrained run's."""
    rng = random.Random(5)
    trunk = [rng.randrange(20, 90) for _ in range(30)]
    prompts = [trunk[: rng.randrange(5, 30)] + [rng.randrange(20, 90)
                                               for _ in range(rng.randrange(1, 30))]
               for _ in range(24)]

    def run(num_blocks, sliding_blocks):
        sched, runner = make(num_blocks, sliding_blocks)
        for i, p in enumerate(prompts):
            sched.add_request(req(f"r{i}", p, max_tokens=rng.randrange(1, 16)))
        rng.seed(9)
        step = run_step
        if driver == "async":
            d = AsyncDriver(sched, runner)
            step = lambda s, r: d.step()  # noqa: E731
        return drain(sched, runner, step), sched

    rng.seed(9)
    wide, _ = run(512, 512)
    rng.seed(9)
    tight, sched = run(24, 9)
    assert tight == wide
    assert sched.num_preemptions > 0
    assert sched.kv.sliding.num_freed > 0 and sched.prefix_cache_hits > 0


def test_a_pool_of_sliding_pool_blocks_never_runs_short():
    """Sized by sliding_pool_blocks (every running request's window plus a step's tokens),
    the sliding pool never makes the scheduler preempt or wait: with a roomy full pool
    nobody is preempted, and the pool's peak use stays within the size."""
    rng = random.Random(2)
    size = sliding_pool_blocks(WINDOW, BS, max_num_seqs=4, token_budget=8)
    sched, runner = make(num_blocks=4096, sliding_blocks=size, caching=False)
    for i in range(20):
        sched.add_request(req(f"r{i}", [rng.randrange(20, 90) for _ in range(rng.randrange(1, 90))],
                              max_tokens=rng.randrange(1, 40)))
    peak = 0
    while sched.has_unfinished_requests():
        run_step(sched, runner)
        peak = max(peak, sched.kv.sliding.pool.num_used_blocks)
    assert sched.num_preemptions == 0
    assert peak <= size


def test_a_hit_needs_the_window_before_it_cached():
    """The second request hits its shared 32-token prefix whole while the first one's window
    blocks stay cached; with one of them evicted, the hit stops before that block."""
    sched, runner = make()
    prefix = list(range(100, 132))
    sched.add_request(req("a", prefix + [7, 8, 9], max_tokens=1))
    drain(sched, runner)
    kv, sliding = sched.kv, sched.kv.sliding
    b = req("b", prefix + [5, 6], max_tokens=1)
    assert len(kv.get_computed_blocks(b)) == 8  # blocks 0..7: 32 tokens
    # Drop block 6's name from the sliding pool's index (as an eviction would).
    hashes = b.block_hashes
    sliding.pool._evict(sliding.pool.cached[hashes[6]])
    assert len(kv.get_computed_blocks(b)) == 6  # a hit of 7 or 8 would need block 6
    sched.add_request(b)
    drain(sched, runner)


def test_hit_blocks_skips_to_below_the_missing_block():
    sliding = SlidingTables(32, WINDOW, BS)
    hashes: list[bytes] = []
    extend_block_hashes(hashes, root_hash("m"), list(range(80)), BS)
    blocks = sliding.pool.allocate(20)
    for i in (0, 1, 2, 5, 6, 7, 8, 9, 10, 11):  # 3 and 4 never cached
        sliding.pool.cache_block(blocks[i], hashes[i], hashes[i - 1] if i else None)
    # k = 12: window from block 12*4 - 9 = 39 -> block 9: 9..11 cached.
    assert sliding.hit_blocks(hashes, 12) == (12, 9, blocks[9:12])
    # k = 8: window from block (32 - 9) // 4 = 5: 5..7 cached.
    assert sliding.hit_blocks(hashes, 8)[:2] == (8, 5)
    # k = 6: window from block 3 (missing) -> k = 4 (window from 1: block 3 missing) -> k = 3.
    assert sliding.hit_blocks(hashes, 6) == (3, 0, blocks[0:3])


def test_allocation_is_all_or_nothing_across_both_pools():
    sched, _ = make(num_blocks=64, sliding_blocks=3)
    kv = sched.kv
    r = req("a", range(200, 220))
    assert kv.allocate_slots(r, 16) is None  # 4 blocks: the full pool has them, not the other
    assert kv.pool.num_used_blocks == 0 and kv.sliding.pool.num_used_blocks == 0
    assert kv.allocate_slots(r, 12) is not None
    assert kv.sliding.held("a") == kv.sliding.table("a") and len(kv.block_ids("a")) == 3
    kv.check_invariants()


def test_trim_and_free_cover_both_tables():
    sched, _ = make(caching=False)  # (drafts are never named: no names to trim here either)
    kv = sched.kv
    r = req("a", range(200, 224))
    kv.allocate_slots(r, 24)
    r.num_computed_tokens = 20
    kv.slide(r)  # first key 11: block 2
    assert kv.sliding.start["a"] == 2
    r.num_computed_tokens = 17  # first key 8: block 2 still
    kv.trim(r)  # 5 blocks kept in both
    assert len(kv.block_ids("a")) == len(kv.sliding_block_ids("a")) == 5
    kv.check_invariants()
    r.num_computed_tokens = 16  # first key 7: block 1, given back already
    with pytest.raises(AssertionError, match="reads block 1, given back already"):
        kv.trim(r)
    r.num_computed_tokens = 17
    kv.free(r)
    assert kv.pool.num_used_blocks == kv.sliding.pool.num_used_blocks == 0
    kv.check_invariants()


def test_async_rejected_drafts_keep_the_next_window():
    """The issue's case: window 8, blocks of 4, 20 tokens computed, 4 drafts in flight
    (async scheduling), all rejected. The next step is scheduled (and the windows slid)
    while the drafts are in flight; the query after the rollback is at position 20:

        position   0 .. 12 | 13 14 15 | 16 .. 19 | d20 d21 d22 d23
        block         0..2 |    3     |    4     |       5
        window of 20:        13 ................ 20      first key 13: block 3 is read

    Sliding from the 24 tokens counted with the drafts would give back block 3 (first key
    of a query at 24 is 17: block 4): the scheduler's invariant check fails, and the fake
    runner would read a hole at position 13."""
    sched = with_drafts(make(window=8, budget=32, caching=False)[0], error=1.0)
    runner = FakeRunner(sched)
    sched.add_request(req("a", range(200, 219), max_tokens=8))  # 19 prompt tokens + 1
    driver = AsyncDriver(sched, runner)
    got = drain(sched, runner, lambda s, r: driver.step())
    stats = sched.spec.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == 0
    assert got["a"] == [fake_token("a", 19 + j) for j in range(8)]


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("error", [0.0, 0.3, 1.0])
def test_async_speculation_keeps_every_window_intact(error, caching):
    """Several requests over shared prefixes, chunked prefill, a small full pool
    (preemption), drafts right and wrong at random, under async scheduling: every window
    the fake runner reads is intact and the outputs equal those of plain decoding."""
    rng = random.Random(3)
    trunk = [rng.randrange(20, 90) for _ in range(16)]
    prompts = [trunk[: rng.randrange(0, 16)] + [rng.randrange(20, 90)
                                                for _ in range(rng.randrange(3, 20))]
               for _ in range(8)]

    def run(spec, num_blocks):
        sched, runner = make(num_blocks, sliding_blocks=64, budget=12, caching=caching,
                             window=8)
        if spec:
            with_drafts(sched, error, k=5)
        for i, p in enumerate(prompts):
            sched.add_request(req(f"r{i}", p, max_tokens=14))
        driver = AsyncDriver(sched, runner)
        return drain(sched, runner, lambda s, r: driver.step()), sched

    want, _ = run(False, 512)
    got, sched = run(True, 24)
    assert got == want
    stats = sched.spec.stats
    assert stats.num_draft_tokens > 0
    assert (stats.num_accepted_tokens > 0) == (error < 1.0)
    assert (stats.num_accepted_tokens < stats.num_draft_tokens) == (error > 0.0)
    assert sched.num_preemptions > 0
    assert (sched.prefix_cache_hits > 0) == caching

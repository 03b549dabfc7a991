"""The inspector's snapshots (core/snapshot.py, engine/inspector.py) against the scheduler's
and the block pool's own state, on the fake runner: no model, no server."""
import dataclasses
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, run_step  # noqa: E402

from pagoda.config import SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.core.snapshot import BLOCK_STATES, StepTokens  # noqa: E402
from pagoda.engine.inspector import (  # noqa: E402
    HASH_HEX_CHARS,
    PUBLISH_BUDGET,
    PUBLISH_INTERVAL_S,
    PUBLISH_MAX_INTERVAL_S,
    SCHEMA,
    EngineSnapshot,
    Inspector,
    RequestDetail,
    StepLog,
    snapshot_json,
)
from pagoda.engine.stats import EngineStats  # noqa: E402
from pagoda.request import Request  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

EOS = (1,)
BS = 4


def make(num_blocks=64, budget=8, caching=True):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=caching, model_key="m")
    sched = Scheduler(SchedulerConfig(budget, 8, 512, True), kv)
    return sched, FakeRunner(sched)


def req(rid, prompt, max_tokens=3):
    p = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Request(rid, list(prompt), p, EOS, max_tokens)


SHARED = [200 + i for i in range(16)]  # four full blocks


def engine_snapshot(sched: Scheduler, version: int = 0) -> EngineSnapshot:
    stats = EngineStats(sched.make_stats(), 0, 0)
    details = {rid: RequestDetail(1.0, None, "secret prompt", "out") for rid in sched.requests}
    return EngineSnapshot(version, 2.0, "m", "both", 512, sched.inspect(), details, stats, False)


def check_consistent(sched: Scheduler) -> None:
    """Everything a snapshot says agrees with the pool and the block tables."""
    snap = sched.inspect()
    pool = sched.kv.pool
    ps = snap.pool
    assert len(ps.states) == ps.num_blocks == len(ps.ref_counts) == pool.num_blocks
    assert set(ps.states) <= set(BLOCK_STATES)
    assert list(ps.ref_counts) == pool.ref_counts
    free = sum(ps.states.count(c) for c in "fc")
    assert free == pool.num_free_blocks
    assert free + sum(1 for rc in ps.ref_counts if rc) == pool.num_blocks
    for b, (state, rc) in enumerate(zip(ps.states, ps.ref_counts)):
        assert (state in "fc") == (rc == 0), (b, state, rc)
        assert (state in "cs") == (pool.block_hash[b] is not None), (b, state)
    assert {h: b for b, h, _, _ in ps.cached} == pool.cached
    named = {h for _, h, _, _ in ps.cached}
    for block_id, _, parent, hits in ps.cached:
        assert parent is None or isinstance(parent, bytes)
        assert hits == pool.block_hits[block_id]
    holders: dict[int, int] = {}
    for r in snap.requests:
        assert list(r.block_ids) == sched.kv.block_ids(r.request_id)
        for b in r.block_ids:
            holders[b] = holders.get(b, 0) + 1
    assert holders == {b: rc for b, rc in enumerate(ps.ref_counts) if rc}
    # Every parent a running request's chain names is its previous block's hash.
    for r in snap.requests:
        hashes = sched.requests[r.request_id].block_hashes
        for i, b in enumerate(r.block_ids[: len(hashes)]):
            if pool.block_hash[b] == hashes[i]:
                assert pool.block_parent[b] == (hashes[i - 1] if i else None)
                assert hashes[i] in named


def test_snapshot_agrees_with_the_pool_step_by_step():
    sched, runner = make()
    sched.add_request(req("a", SHARED + [7, 8, 9]))
    while sched.has_unfinished_requests():
        run_step(sched, runner)
        check_consistent(sched)
        sched.check_invariants()
    sched.add_request(req("b", SHARED + [5, 6]))
    run_step(sched, runner)
    check_consistent(sched)
    snap = sched.inspect()
    (b,) = snap.requests
    assert b.num_cached_tokens == 16
    hits = {b: n for b, _, _, n in snap.pool.cached}
    assert [hits[blk] for blk in b.block_ids[:4]] == [1, 1, 1, 1]
    # The shared blocks form one chain: each names the one before as its parent.
    parents = {h: parent for _, h, parent, _ in snap.pool.cached}
    chain = [sched.kv.pool.block_hash[blk] for blk in b.block_ids[:4]]
    assert parents[chain[0]] is None
    assert [parents[h] for h in chain[1:]] == chain[:3]
    assert snap.pool.states[b.block_ids[0]] == "s"  # in use and cached


def test_step_tokens_by_kind():
    sched, runner = make(budget=8)
    sched.add_request(req("a", range(300, 312), max_tokens=4))  # 12 tokens: two chunks
    out = sched.schedule()
    assert out.step_tokens == StepTokens(0, 8, 0, 0, 8, 0, 1, 0, 0)
    sched.update_from_output(out, runner.execute(out))
    out = sched.schedule()
    assert (out.step_tokens.prefill, out.step_tokens.decode) == (4, 0)
    sched.update_from_output(out, runner.execute(out))
    out = sched.schedule()
    assert (out.step_tokens.prefill, out.step_tokens.decode) == (0, 1)


def test_preemption_and_recompute_are_counted():
    sched, runner = make(num_blocks=6, budget=64, caching=False)
    for i in range(3):
        sched.add_request(req(f"r{i}", range(300 + 10 * i, 307 + 10 * i), max_tokens=8))
    preemptions = recompute = 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        preemptions += out.step_tokens.preemptions
        recompute += out.step_tokens.recompute
        sched.update_from_output(out, runner.execute(out))
        sched.take_pending_outputs()
        check_consistent(sched)
    assert preemptions == sched.num_preemptions > 0
    assert recompute > 0


def test_json_schema_is_compact_and_hides_text():
    sched, runner = make()
    sched.add_request(req("a", SHARED + [1, 2]))
    run_step(sched, runner)
    run_step(sched, runner)
    log = StepLog()
    log.append(StepTokens(decode=1, budget=8), 3.0, 0.01)
    text = json.dumps(snapshot_json(engine_snapshot(sched), log.since(0)))
    doc = json.loads(text)
    assert "secret prompt" not in text
    assert doc["schema"] == SCHEMA
    assert doc["engine"]["num_blocks"] == 64 == len(doc["pool"]["states"])
    assert len(doc["pool"]["ref_counts"]) == 64
    (r,) = doc["requests"]
    assert r["id"] == "a" and r["block_ids"] == sched.kv.block_ids("a")
    assert "prompt" not in r
    assert doc["cache"]["fields"] == ["block_id", "hash", "parent", "hits"]
    blocks = doc["cache"]["blocks"]
    assert len(blocks) == len(sched.kv.pool.cached) == 4
    hashes = {h for _, h, _, _ in blocks}
    assert all(len(h) == HASH_HEX_CHARS for h in hashes)
    assert sum(p is None for _, _, p, _ in blocks) == 1
    assert all(p in hashes for _, _, p, _ in blocks if p is not None)
    assert doc["steps"] == [{
        "seq": 1, "time": 3.0, "duration_s": 0.01, "decode": 1, "prefill": 0, "recompute": 0,
        "spec": 0, "budget": 8, "preemptions": 0, "running": 0, "waiting": 0, "loading": 0}]
    assert doc["counters"]["num_free_blocks"] == sched.kv.pool.num_free_blocks
    assert doc["kv_transfer"] is None and doc["leases"] == []
    shown = dataclasses.replace(engine_snapshot(sched), show_text=True)
    assert snapshot_json(shown, [])["requests"][0]["prompt"] == "secret prompt"
    assert snapshot_json(shown, [], with_cache=False)["cache"] is None


def test_cached_blocks_are_reused_until_the_cache_changes():
    sched, runner = make()
    sched.add_request(req("a", SHARED + [1, 2], max_tokens=1))
    while sched.has_unfinished_requests():
        run_step(sched, runner)
    first = sched.kv.pool.snapshot().cached
    assert sched.kv.pool.snapshot().cached is first
    sched.add_request(req("b", SHARED + [3, 4], max_tokens=1))
    run_step(sched, runner)
    assert sched.kv.pool.snapshot().cached is not first  # hits changed


def test_cached_blocks_are_plain_tuples_the_collector_lets_go():
    """A snapshot's named blocks are plain tuples: the garbage collector stops tracking
    them at its first pass (a tuple subclass it would track for life, and thousands a
    second of those pushed full collections of the heap while a viewer watched)."""
    sched, runner = make()
    sched.add_request(req("a", SHARED + [1, 2], max_tokens=1))
    while sched.has_unfinished_requests():
        run_step(sched, runner)
    cached = sched.kv.pool.snapshot().cached
    assert cached and all(type(c) is tuple and len(c) == 4 for c in cached)
    gc.collect()
    assert not any(gc.is_tracked(c) for c in cached)


def test_step_log_is_a_bounded_ring_with_sequence_numbers():
    log = StepLog(capacity=4)
    for i in range(10):
        log.append(StepTokens(decode=i), float(i), 0.0)
    assert [s.seq for s in log.since(0)] == [7, 8, 9, 10]
    assert [s.seq for s in log.since(8)] == [9, 10]
    assert log.since(10) == []


def test_inspector_publishes_only_while_watched_and_at_most_at_its_rate():
    made = []

    def make_snapshot(version):
        made.append(version)
        return version

    insp = Inspector()
    t = 100.0
    for _ in range(5):
        insp.on_step(StepTokens(decode=1), t, t + 0.001, make_snapshot, idle=False)
        t += 0.01
    assert made == [] and insp.steps.last_seq == 5
    insp.viewers = 1
    for _ in range(50):  # 0.5 s of steps
        insp.on_step(StepTokens(decode=1), t, t + 0.001, make_snapshot, idle=False)
        t += 0.01
    assert 0.5 / PUBLISH_INTERVAL_S - 1 <= len(made) <= 0.5 / PUBLISH_INTERVAL_S + 1
    before = len(made)
    insp.on_step(StepTokens(decode=1), t, t + 0.001, make_snapshot, idle=True)
    assert len(made) == before + 1  # going idle always publishes
    insp.on_step(StepTokens(), t, t, make_snapshot, idle=False)
    assert insp.steps.last_seq == 56  # an empty step is not recorded



def test_snapshots_slow_down_when_they_are_dear():
    """The interval keeps snapshots and their frames within PUBLISH_BUDGET of the time,
    between PUBLISH_INTERVAL_S and PUBLISH_MAX_INTERVAL_S, from smoothed costs."""
    insp = Inspector()
    insp._pace(0.001)
    assert insp.interval == PUBLISH_INTERVAL_S  # cheap: the base rate
    for _ in range(30):
        insp._pace(0.002)
    assert abs(insp.interval - 0.002 / PUBLISH_BUDGET) < 1e-3  # 2 ms each: 0.4 s at 0.5 %
    insp.frame_cost_s = 0.001  # the server's delta for each: the interval counts it too
    insp._pace(0.002)
    assert abs(insp.interval - 0.003 / PUBLISH_BUDGET) < 1e-3
    insp.frame_cost_s = 0.0
    insp._pace(2.0)  # one snapshot caught in a long garbage collection
    assert insp.interval == PUBLISH_MAX_INTERVAL_S
    for _ in range(30):
        insp._pace(0.001)
    assert insp.interval == PUBLISH_INTERVAL_S

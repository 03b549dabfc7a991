"""KV cache events (core/kv_events.py, engine/kv_event_publisher.py): the journal replays to
exactly the block pool's cached hashes after random workloads with evictions and resets;
the wire format decodes with vLLM 0.32's own msgspec struct definitions (copied below as
the schema, the way vLLM's example subscriber does); the ZeroMQ publisher numbers batches,
replays them on request, and never blocks its caller."""
import os
import sys
import time
from typing import Any, Optional, Union

import msgspec
import pytest
import zmq
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, run_step  # noqa: E402

from pagoda.config import KVEventsConfig, SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.kv_events import (  # noqa: E402
    AllBlocksCleared, BlockRemoved, BlockStored, external_hash, replay)
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.engine.kv_event_publisher import KVEventPublisher, encode_batch  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

BS = 4
PREFIXES = [[300 + i] * 12 for i in range(3)]


# ------------------------------------------------------------------ vLLM 0.32's schema
class VEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class VKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class VBlockStored(VKVCacheEvent, tag="BlockStored"):
    block_hashes: list[Union[bytes, int]]
    parent_block_hash: Optional[Union[bytes, int]]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list[Optional[tuple[Any, ...]]]] = None
    group_idx: Optional[int] = None


class VBlockRemoved(VKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[Union[bytes, int]]
    medium: Optional[str]
    group_idx: Optional[int] = None


class VAllBlocksCleared(VKVCacheEvent, tag="AllBlocksCleared"):
    pass


class VKVEventBatch(VEventBatch):
    events: list[Union[VBlockStored, VBlockRemoved, VAllBlocksCleared]]


def test_batches_decode_with_vllms_structs_and_encode_the_same_bytes():
    events = [BlockStored([1, 2**64 - 1], None, list(range(8)), 4, extra_keys=[("salt",), None]),
              BlockStored([3], 2, [9, 9, 9, 9], 4),
              BlockRemoved([1, 3]), AllBlocksCleared()]
    payload = encode_batch(12.5, events, 0)
    batch = msgspec.msgpack.decode(payload, type=VKVEventBatch)
    assert batch.ts == 12.5 and batch.data_parallel_rank == 0
    first, second, removed, cleared = batch.events
    assert isinstance(first, VBlockStored) and first.block_hashes == [1, 2**64 - 1]
    assert first.parent_block_hash is None and first.token_ids == list(range(8))
    assert first.block_size == 4 and first.medium == "GPU" and first.extra_keys == [("salt",), None]
    assert second.parent_block_hash == 2 and second.extra_keys is None
    assert isinstance(removed, VBlockRemoved) and removed.block_hashes == [1, 3]
    assert isinstance(cleared, VAllBlocksCleared)
    # vLLM's encoder writes the very same bytes for the same batch.
    ours = msgspec.msgpack.decode(payload)
    theirs = msgspec.msgpack.decode(msgspec.msgpack.encode(batch))
    assert ours == theirs


def test_external_hash_is_the_digests_last_8_bytes():
    digest = bytes(range(32))
    assert external_hash(digest) == int.from_bytes(bytes(range(24, 32)), "big")
    assert external_hash(digest) == int.from_bytes(digest, "big") & (2**64 - 1)  # vLLM's


# ------------------------------------------------------------------- the journal replays
def make(num_blocks=14, budget=9):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True, model_key="m")
    kv.enable_events()
    sched = Scheduler(SchedulerConfig(budget, 4, 512, True), kv)
    return sched, FakeRunner(sched)


def req(rid, prompt, max_tokens, salt=None):
    p = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Request(rid, prompt, p, (1,), max_tokens, cache_salt=salt)


def cached_hashes(sched) -> set[int]:
    return {external_hash(h) for h in sched.kv.pool.cached}


class JournalMachine(RuleBasedStateMachine):
    """Random adds over shared prefixes (with and without a salt), steps, aborts and cache
    resets on a small pool, so blocks are named, hit, evicted and cleared: after every step
    the events published so far replay to exactly the pool's cached hashes."""

    def __init__(self):
        super().__init__()
        self.sched, self.runner = make()
        self.held: set[int] = set()
        self.next_id = 0
        self.stored = self.removed = 0

    def _take(self, events):
        self.stored += sum(isinstance(e, BlockStored) for e in events)
        self.removed += sum(isinstance(e, BlockRemoved) for e in events)
        replay(events, self.held)

    @rule(prefix=st.integers(0, 2), extra=st.lists(st.integers(2, 6), max_size=7),
          max_tokens=st.integers(1, 8), salt=st.sampled_from([None, "s"]))
    def add(self, prefix, extra, max_tokens, salt):
        self.sched.add_request(req(f"q{self.next_id}", PREFIXES[prefix] + extra, max_tokens, salt))
        self.next_id += 1

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            out = self.sched.schedule()
            self.sched.update_from_output(out, self.runner.execute(out))
            self.sched.take_pending_outputs()
            self._take(out.kv_cache_events)  # published once the step has run

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        self.sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)

    @rule()
    def reset(self):
        self.sched.kv.reset_prefix_cache()
        self._take(self.sched.kv.take_events())

    @invariant()
    def journal_replays_to_the_pool(self):
        assert self.held == cached_hashes(self.sched)

    def teardown(self):
        while self.sched.has_unfinished_requests():
            self.step(1)
        assert self.held == cached_hashes(self.sched)


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


def test_a_workload_with_evictions_journals_stores_and_removals():
    sched, runner = make(num_blocks=10)
    for i in range(8):
        sched.add_request(req(f"r{i}", PREFIXES[i % 3] + [7 + i] * 5, 6))
    held: set[int] = set()
    kinds = set()
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, runner.execute(out))
        sched.take_pending_outputs()
        kinds |= {type(e) for e in out.kv_cache_events}
        replay(out.kv_cache_events, held)
        assert held == cached_hashes(sched)
    assert {BlockStored, BlockRemoved} <= kinds
    assert sched.kv.pool.num_evictions > 0


def test_events_carry_parents_tokens_and_the_salt():
    sched, runner = make(num_blocks=64, budget=64)
    prompt = list(range(10, 22))  # three full blocks
    sched.add_request(req("a", prompt, 1, salt="tenant"))
    out = sched.schedule()
    (event,) = out.kv_cache_events
    hashes = sched.requests["a"].block_hashes
    assert event.block_hashes == [external_hash(h) for h in hashes]
    assert event.parent_block_hash is None and event.token_ids == prompt
    assert event.extra_keys == [("tenant",), None, None]
    sched.update_from_output(out, runner.execute(out))
    sched.add_request(req("b", prompt + list(range(40, 48)), 1))  # no salt: its own chain
    sched.add_request(req("c", prompt + list(range(50, 54)), 1, salt="tenant"))
    (b_event, c_event) = sched.schedule().kv_cache_events
    assert b_event.parent_block_hash is None and b_event.extra_keys is None
    assert len(b_event.block_hashes) == 5
    # c hits a's three blocks and names one more, whose parent is a's last.
    assert c_event.block_hashes == [external_hash(sched.requests["c"].block_hashes[3])]
    assert c_event.parent_block_hash == external_hash(hashes[2])
    assert c_event.token_ids == list(range(50, 54)) and c_event.extra_keys is None


# ------------------------------------------------------------------------ the publisher
def _sub(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.SUB)
    s.connect(endpoint)
    s.setsockopt(zmq.SUBSCRIBE, b"kv")
    return s


def test_publisher_numbers_batches_and_replays_them():
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:0",
                            replay_endpoint="tcp://127.0.0.1:0", topic="kv", buffer_steps=3)
    pub = KVEventPublisher(config)
    try:
        sub = _sub(pub.endpoint)
        time.sleep(0.3)  # a late joiner misses what was sent before it subscribed
        for i in range(5):
            pub.publish([BlockStored([i], None, [1, 2, 3, 4], 4)])
        pub.publish([])  # nothing to say: no batch
        got = []
        while len(got) < 5 and sub.poll(2000):
            topic, seq, payload = sub.recv_multipart()
            batch = msgspec.msgpack.decode(payload, type=VKVEventBatch)
            got.append((topic, int.from_bytes(seq, "big"), batch.events[0].block_hashes))
        assert got == [(b"kv", i, [i]) for i in range(5)]
        # A DEALER (a REQ socket takes one reply per request; a replay answers with many).
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", (1).to_bytes(8, "big")])  # from 1: the buffer keeps 3
        replayed = []
        while True:
            assert dealer.poll(2000), "no replay answer"
            _, seq, payload = dealer.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:
                assert payload == b""
                break
            replayed.append(int.from_bytes(seq, "big"))
        assert replayed == [2, 3, 4]
        assert pub.stats.num_replays == 1
    finally:
        pub.close()


def test_publishing_never_blocks_the_engine():
    """No subscriber, a tiny queue: 20,000 batches are numbered and queued or dropped at
    once (a slow subscriber loses messages, never the engine's time)."""
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:0",
                            max_queue_size=4, hwm=4)
    pub = KVEventPublisher(config)
    try:
        start = time.perf_counter()
        for i in range(20_000):
            pub.publish([BlockRemoved([i])])
        elapsed = time.perf_counter() - start
        assert elapsed < 10.0  # generous: the point is that it returns, not how fast
        time.sleep(0.3)
        assert pub.stats.num_dropped > 0
        assert pub.stats.num_batches + pub.stats.num_dropped <= 20_000
    finally:
        pub.close()


def test_config_is_checked_and_named_as_vllms():
    c = KVEventsConfig.from_mapping({"enable_kv_cache_events": True, "publisher": "zmq",
                                     "endpoint": "tcp://127.0.0.1:5557", "topic": "t"})
    assert c.enabled and c.topic == "t"
    assert not KVEventsConfig.from_mapping({"publisher": "zmq"}).enabled
    with pytest.raises(ValueError, match="unknown key"):
        KVEventsConfig.from_mapping({"enable_kv_cache_events": True, "port": 1})
    with pytest.raises(ValueError, match="ZeroMQ address"):
        KVEventsConfig(enable_kv_cache_events=True, endpoint="localhost:5557")

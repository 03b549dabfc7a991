"""KV cache events (core/kv_events.py, engine/kv_event_publisher.py): the journal replays to
exactly the block pool's cached hashes after random workloads with evictions and resets, and
for a model with a sliding layers' pool to both pools' (two groups), from which a router
predicts exactly the prefix hit the engine finds; the state a journal replays to, journaled
again, replays the same; the wire format decodes with vLLM's own msgspec struct definitions
(copied below as the schema, the way vLLM's example subscriber does); the ZeroMQ publisher
numbers batches, replays them on request (from before its buffer: the whole cache in one
batch), and never blocks its caller."""
import os
import sys
import threading
from typing import Any, Optional, Union

import msgspec
import pytest
import zmq
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner  # noqa: E402

from pagoda.config import KVEventsConfig, SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.kv_events import (  # noqa: E402
    AllBlocksCleared, BlockRemoved, BlockStored, CachedBlocks, external_hash, replay)
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.core.sliding_kv import SlidingTables  # noqa: E402
from pagoda.engine.kv_event_publisher import (  # noqa: E402
    KVEventPublisher, encode_batch, encode_event)
from pagoda.entrypoints.router.prefix_index import EventPrefixIndex, token_block_names  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402
from waiting import wait_for  # noqa: E402

BS = 4
PREFIXES = [[300 + i] * 12 for i in range(3)]


# ---------------------------------- vLLM's schema (0.32, and its KV cache groups' fields)
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
    kv_cache_spec_kind: Optional[str] = None
    kv_cache_spec_sliding_window: Optional[int] = None


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
              BlockRemoved([1, 3]), AllBlocksCleared(),
              BlockStored([5], None, [1, 2, 3, 4], 4, group_idx=1,
                          kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=8),
              BlockRemoved([5], group_idx=1)]
    payload = encode_batch(12.5, events, 0)
    batch = msgspec.msgpack.decode(payload, type=VKVEventBatch)
    assert batch.ts == 12.5 and batch.data_parallel_rank == 0
    first, second, removed, cleared, sliding, slid_out = batch.events
    assert isinstance(first, VBlockStored) and first.block_hashes == [1, 2**64 - 1]
    assert first.parent_block_hash is None and first.token_ids == list(range(8))
    assert first.block_size == 4 and first.medium == "GPU" and first.extra_keys == [("salt",), None]
    assert first.group_idx is None and first.kv_cache_spec_kind is None  # one pool: left out
    assert second.parent_block_hash == 2 and second.extra_keys is None
    assert isinstance(removed, VBlockRemoved) and removed.block_hashes == [1, 3]
    assert removed.group_idx is None
    assert isinstance(cleared, VAllBlocksCleared)
    assert (sliding.group_idx, sliding.kv_cache_spec_kind, sliding.kv_cache_spec_sliding_window
            ) == (1, "sliding_window", 8)
    assert isinstance(slid_out, VBlockRemoved) and slid_out.group_idx == 1
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
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True, model_key="m", events=True)
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
    the events published so far replay to exactly the pool's cached hashes, and so does the
    journal of the state they replay to (what a publisher sends a subscriber that missed
    more than its buffer)."""

    GROUP: Optional[int] = None  # the full-attention pool's group_idx (None: the only pool)

    def __init__(self):
        super().__init__()
        self.sched, self.runner = self.make()
        self.held: set[int] = set()
        self.state = CachedBlocks()
        self.next_id = 0

    @staticmethod
    def make():
        return make()

    def _take(self, events):
        replay(events, self.held, self.GROUP)
        self.state.apply(events)

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
        assert replay(self.state.as_events(), None, self.GROUP) == self.held

    def teardown(self):
        while self.sched.has_unfinished_requests():
            self.step(1)
        assert self.held == cached_hashes(self.sched)


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)

WINDOW = 6  # tokens: a query reads the blocks of its last 6 keys


def make_sliding(num_blocks=14, sliding_blocks=12, budget=9):
    """A tiny Gemma's KV: full-attention layers in one pool, sliding-window layers in their
    own (core/sliding_kv.py), small enough that both evict."""
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True, model_key="m",
                        sliding=SlidingTables(sliding_blocks, WINDOW, BS), events=True)
    sched = Scheduler(SchedulerConfig(budget, 4, 512, True), kv)
    return sched, FakeRunner(sched)


def engine_hit(sched, tokens, salt) -> int:
    """Blocks a new request of ``tokens`` would start on (both pools' rule)."""
    return len(sched.kv.get_computed_blocks(req("probe", tokens, 1, salt)))


def router_hit(index, tokens, salt) -> int:
    """What a router's index, fed the events, expects of the same request."""
    num = (len(tokens) - 1) // BS  # the engine never hits the block of the last token
    return index.match("i", token_block_names(tokens[: num * BS], BS, salt))


class SlidingJournalMachine(JournalMachine):
    """The same workload on a model whose sliding-window layers keep their own pool: each
    group's journal replays to its pool, and a router's index fed the events (or a journal
    of the state they replay to) expects exactly the prefix hit the engine finds for every
    sequence seen lately, window blocks evicted from the sliding pool included."""

    GROUP = 0

    def __init__(self):
        super().__init__()
        self.held_sliding: set[int] = set()
        self.index = EventPrefixIndex()
        self.probes: list[tuple[list[int], Optional[str]]] = []

    @staticmethod
    def make():
        return make_sliding()

    def _take(self, events):
        super()._take(events)
        replay(events, self.held_sliding, 1)
        self.index.apply("i", [encode_event(e) for e in events])
        for r in self.sched.requests.values():  # prompts and outputs so far
            self.probes = self.probes[-11:] + [(list(r.all_token_ids), r.cache_salt)]

    @invariant()
    def each_group_replays_to_its_pool(self):
        sliding = {external_hash(h) for h in self.sched.kv.sliding.pool.cached}
        assert self.held_sliding == sliding
        assert replay(self.state.as_events(), None, 1) == sliding

    @invariant()
    def the_router_expects_the_engines_hit(self):
        resynced = EventPrefixIndex()
        resynced.apply("i", [encode_event(e) for e in self.state.as_events()])
        for tokens, salt in self.probes:
            hit = engine_hit(self.sched, tokens, salt)
            assert router_hit(self.index, tokens, salt) == hit, (tokens, salt)
            assert router_hit(resynced, tokens, salt) == hit, (tokens, salt)


TestSlidingJournalMachine = SlidingJournalMachine.TestCase
TestSlidingJournalMachine.settings = settings(max_examples=60, stateful_step_count=30,
                                              deadline=None)


def test_a_sliding_model_journals_its_sliding_pool_evictions():
    """Long prompts over shared prefixes on the tiny Gemma: the sliding pool gives back and
    evicts window blocks the full pool keeps, the journal says so (group 1), and the prefix
    a router expects is the engine's, where the full layers' events alone promise more."""
    sched, runner = make_sliding(num_blocks=64, sliding_blocks=12)
    held, held_sliding = set(), set()
    index, full_only = EventPrefixIndex(), EventPrefixIndex()
    prompts = [PREFIXES[i % 3] * 2 + [7 + i] * 5 for i in range(6)]
    for i, prompt in enumerate(prompts):
        sched.add_request(req(f"r{i}", prompt, 4))
        while sched.has_unfinished_requests():
            out = sched.schedule()
            sched.update_from_output(out, runner.execute(out))
            sched.take_pending_outputs()
            events = out.kv_cache_events
            replay(events, held, 0)
            replay(events, held_sliding, 1)
            index.apply("i", [encode_event(e) for e in events])
            full_only.apply("i", [encode_event(e) for e in events if e.group_idx == 0])
    assert held == cached_hashes(sched)
    assert held_sliding == {external_hash(h) for h in sched.kv.sliding.pool.cached}
    assert sched.kv.sliding.pool.num_evictions > 0 and sched.kv.pool.num_evictions == 0
    hits = [(engine_hit(sched, p, None), router_hit(index, p, None), router_hit(full_only, p, None))
            for p in prompts]
    assert all(engine == router for engine, router, _ in hits), hits
    assert any(full > engine for engine, _, full in hits), hits


def test_a_reset_of_both_pools_is_one_event():
    sched, runner = make_sliding()
    sched.add_request(req("a", PREFIXES[0] + [5, 6, 7, 8], 1))
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    groups = {e.group_idx for e in out.kv_cache_events}
    assert groups == {0, 1}, out.kv_cache_events  # both pools named the prompt's blocks
    sched.kv.reset_prefix_cache()
    assert sched.kv.take_events() == [AllBlocksCleared()]


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


def _subscribed(pub: KVEventPublisher, sub: zmq.Socket) -> int:
    """Publish probe batches until ``sub`` receives one (a PUB drops what it sends before a
    subscription reaches it), and read them up to the last; returns how many went out."""
    def arrived() -> bool:
        pub.publish([BlockRemoved([pub.stats.num_published])])
        return bool(sub.poll(50))

    wait_for(arrived, 10, "the subscription to reach the publisher")
    last = pub.stats.num_published - 1
    while int.from_bytes(sub.recv_multipart()[1], "big") != last:
        assert sub.poll(2000), "a probe after the first one received did not arrive"
    return pub.stats.num_published


def _replay(endpoint: str, start: int) -> list[tuple[int, VKVEventBatch]]:
    """Ask a replay from ``start`` (a DEALER: a REQ socket takes one reply per request, a
    replay answers with many)."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    got = []
    while True:
        assert dealer.poll(2000), "no replay answer"
        _, seq, payload = dealer.recv_multipart()
        if int.from_bytes(seq, "big", signed=True) == -1:
            assert payload == b""
            dealer.close(linger=0)
            return got
        got.append((int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload, type=VKVEventBatch)))


def test_publisher_numbers_batches_and_replays_them():
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:0",
                            replay_endpoint="tcp://127.0.0.1:0", topic="kv", buffer_steps=3)
    pub = KVEventPublisher(config)
    try:
        sub = _sub(pub.endpoint)
        first = _subscribed(pub, sub)
        for i in range(5):
            pub.publish([BlockStored([i], None, [1, 2, 3, 4], 4)])
        pub.publish([])  # nothing to say: no batch
        got = []
        while len(got) < 5 and sub.poll(2000):
            topic, seq, payload = sub.recv_multipart()
            batch = msgspec.msgpack.decode(payload, type=VKVEventBatch)
            got.append((topic, int.from_bytes(seq, "big"), batch.events[0].block_hashes))
        assert got == [(b"kv", first + i, [i]) for i in range(5)]
        assert pub.stats.num_published == first + 5
        # Within the buffer (it keeps 3): the batches themselves.
        assert [seq for seq, _ in _replay(pub.replay_endpoint, first + 2)] == [
            first + 2, first + 3, first + 4]
        assert pub.stats.num_snapshots == 0
        # From before it: one batch, numbered as the last one gone, of the whole cache then
        # (blocks 0 and 1), then the buffered ones.
        (seq, snapshot), *rest = _replay(pub.replay_endpoint, 0)
        assert seq == first + 1 and [s for s, _ in rest] == [first + 2, first + 3, first + 4]
        cleared, *stored = snapshot.events
        assert isinstance(cleared, VAllBlocksCleared)
        assert sorted(h for e in stored for h in e.block_hashes) == [0, 1]
        assert all(isinstance(e, VBlockStored) and e.token_ids == [1, 2, 3, 4] for e in stored)
        assert pub.stats.num_replays == 2 and pub.stats.num_snapshots == 1
        sub.close(linger=0)
    finally:
        pub.close()


def test_publishing_never_blocks_the_engine():
    """The sending thread stuck on its first batch, a queue of 4: 20,000 batches are still
    numbered, kept for replay and queued or dropped by the engine's thread, which never
    waits (a slow subscriber loses messages, never the engine's time); each is sent once
    the thread is free, or counted dropped."""
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:0",
                            replay_endpoint="tcp://127.0.0.1:0", max_queue_size=4, hwm=4,
                            buffer_steps=8)
    pub = KVEventPublisher(config)
    stuck, free = threading.Event(), threading.Event()
    send = pub._send

    def stuck_send(seq: int, payload: bytes) -> None:
        stuck.set()
        free.wait()
        send(seq, payload)

    pub._send = stuck_send
    try:
        pub.publish([BlockRemoved([0])])
        wait_for(stuck.is_set, 10, "the sending thread to take the first batch")
        engine = threading.Thread(
            target=lambda: [pub.publish([BlockRemoved([i])]) for i in range(1, 20_000)])
        engine.start()
        engine.join(timeout=60)  # a blocking publish would hang here, and fail below
        assert not engine.is_alive(), "publish() blocked on a stuck sending thread"
        assert pub.stats.num_published == 20_000
        assert pub.stats.num_dropped == 20_000 - 1 - 4  # all but the one taken and 4 queued
        free.set()
        wait_for(lambda: pub.stats.num_batches == 5, 10, "the 5 batches taken to be sent")
        # Every batch was kept for replay: the last 8, after the cache as of the one before.
        assert [seq for seq, _ in _replay(pub.replay_endpoint, 0)] == list(range(19_991, 20_000))
    finally:
        free.set()
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

"""pagoda router's cache-aware policy (entrypoints/router/policy.py) and its two indexes
(entrypoints/router/prefix_index.py), and the KV event subscriber that feeds the precise one
(entrypoints/router/kv_events.py): an index built from an engine's own events matches
the blocks its prefix cache holds; the score weighs the prefix against load; a subscriber
that misses batches asks for them again and applies every batch once, in order; one that
misses more than the publisher keeps, or follows an instance that restarts, ends with
exactly the instance's cache again."""
import asyncio
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner  # noqa: E402

from pagoda.config import KVEventsConfig, SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.kv_events import BlockStored, external_hash  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.engine.kv_event_publisher import KVEventPublisher, encode_event  # noqa: E402
from pagoda.entrypoints.router.kv_events import KVEventSubscriber  # noqa: E402
from waiting import wait_for  # noqa: E402
from pagoda.entrypoints.router.prefix_index import (  # noqa: E402
    CHUNK_CHARS, ApproxPrefixIndex, EventPrefixIndex, request_text, text_chunk_names,
    token_block_names)
from pagoda.entrypoints.router.policy import CacheAwarePolicy, Names  # noqa: E402
from pagoda.request import Request  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

BS = 4


@dataclass
class Inst:
    url: str
    outstanding: int = 0
    foreign: int = 0

    @property
    def load(self) -> int:
        return self.outstanding + self.foreign


def _engine(num_blocks=12):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True, model_key="m", events=True)
    sched = Scheduler(SchedulerConfig(16, 4, 512, True), kv)
    return sched, FakeRunner(sched)


def _run(sched, runner, rid, prompt, salt=None):
    sched.add_request(Request(rid, prompt, SamplingParams(temperature=0, max_tokens=2), (1,),
                              2, cache_salt=salt))
    events = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, runner.execute(out))
        events += out.kv_cache_events
    return [encode_event(e) for e in events]


def test_the_event_index_matches_what_the_engine_holds():
    sched, runner = _engine()
    index = EventPrefixIndex()
    a = list(range(100, 116))   # four blocks
    index.apply("i", _run(sched, runner, "a", a))
    assert index.block_size == BS
    assert index.match("i", token_block_names(a, BS)) == 4
    assert index.match("i", token_block_names(a[:8] + [1, 2, 3, 4], BS)) == 2
    # The same tokens under a salt are another chain, on the engine and here.
    assert index.match("i", token_block_names(a, BS, salt="t")) == 0
    index.apply("i", _run(sched, runner, "s", a, salt="t"))
    assert index.match("i", token_block_names(a, BS, salt="t")) == 4
    # Other prompts evict blocks (12 in the pool): the index follows, block for block.
    for i in range(4):
        index.apply("i", _run(sched, runner, f"b{i}", list(range(200 + 20 * i, 216 + 20 * i))))
    assert sched.kv.pool.num_evictions > 0
    cached = {external_hash(h) for h in sched.kv.pool.cached}
    assert index.hashes("i") == cached
    assert index.size("i") == len(cached)
    assert index.match("i", token_block_names(a, BS)) < 4  # a's tail was evicted
    index.apply("i", [{"type": "AllBlocksCleared"}])
    assert index.size("i") == 0


def test_a_block_whose_parent_is_not_cached_waits_for_it():
    """A block stored before its parent (the parent's copy that had the name was evicted;
    a request ran through a reset) cannot be named until the parent is stored again."""
    index = EventPrefixIndex()
    index.apply("i", [encode_event(BlockStored([7], 999, [5, 6, 7, 8], 4))])
    assert index.size("i") == 0
    index.apply("i", [encode_event(BlockStored([999], None, [1, 2, 3, 4], 4))])
    assert index.hashes("i") == {999, 7}
    assert index.match("i", token_block_names([1, 2, 3, 4, 5, 6, 7, 8], 4)) == 2
    index.apply("i", [encode_event(BlockStored([8], 555, [9, 9, 9, 9], 4)),
                      {"type": "BlockRemoved", "block_hashes": [8]},  # gone before its parent
                      encode_event(BlockStored([555], None, [1, 1, 1, 1], 4))])
    assert index.hashes("i") == {999, 7, 555}


def test_the_approximate_index_ages_out_least_recently_routed_text():
    index = ApproxPrefixIndex(capacity=6)
    a = text_chunk_names("a" * CHUNK_CHARS * 4)
    b = text_chunk_names("b" * CHUNK_CHARS * 4)
    index.routed("i", a)
    assert index.match("i", a) == 4 and index.match("i", b) == 0
    index.routed("i", b)  # 8 chunks > 6: a's oldest two go
    assert index.match("i", b) == 4 and index.match("i", a) == 0
    assert len(text_chunk_names("x" * (CHUNK_CHARS - 1))) == 0


def test_chat_text_is_the_messages_in_order():
    body = {"messages": [{"role": "system", "content": "S"},
                         {"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert request_text(body) == "<system>S<user>U"
    assert request_text({"prompt": "P"}) == "P"


def test_cost_weighs_the_cached_prefix_against_load():
    approx = ApproxPrefixIndex()
    policy = CacheAwarePolicy(approx, load_weight=0.25)
    names = Names(text_chunk_names("z" * CHUNK_CHARS * 8), False)
    a, b = Inst("a"), Inst("b")
    approx.routed("a", names.names)
    assert policy.pick([a, b], names) is a
    a.outstanding = 3  # 8 - 8 + 0.25 * 3 * 8 = 6 < 8: still a
    assert policy.pick([a, b], names) is a
    a.outstanding = 5  # 10 > 8 (+ b's 0): the hot prefix spills over
    assert policy.pick([a, b], names) is b
    # Nothing cached anywhere: the less busy, then the one holding less.
    fresh = Names(text_chunk_names("q" * CHUNK_CHARS * 2), False)
    a.outstanding = b.outstanding = 0
    assert policy.pick([a, b], fresh) is b
    assert policy.pick([a, b], Names([], False)) in (a, b)
    # Requests the instance reports that did not come through this router count as load.
    a.outstanding, a.foreign = 2, 3
    assert policy.pick([a, b], names) is b


def test_an_instances_load_is_read_from_its_metrics():
    from pagoda.entrypoints.router.app import instance_load
    text = ("# HELP pagoda:num_requests_running Requests running.\n"
            "# TYPE pagoda:num_requests_running gauge\n"
            'pagoda:num_requests_running{model_name="m"} 3.0\n'
            "pagoda:num_requests_waiting 2.0\n"
            "pagoda:num_requests_running_other 100.0\n")
    assert instance_load(text) == 5
    assert instance_load("vllm:num_requests_running 1.0\n") is None


def test_precise_names_come_from_tokens_when_the_block_size_is_known():
    precise = EventPrefixIndex()
    policy = CacheAwarePolicy(ApproxPrefixIndex(), precise)

    async def tokenize(body):
        return list(range(10))

    names = asyncio.run(policy.names({"prompt": "x" * 200}, tokenize))
    assert not names.precise  # no event yet: the block size is unknown
    precise.apply("i", [encode_event(BlockStored([1], None, [1, 2, 3, 4], 4))])
    names = asyncio.run(policy.names({"prompt": "x", "cache_salt": "t"}, tokenize))
    assert names.precise and names.names == token_block_names(list(range(10)), 4, "t")


def _publisher(endpoint="tcp://127.0.0.1:0", replay="tcp://127.0.0.1:0", buffer_steps=10_000):
    return KVEventPublisher(KVEventsConfig(enable_kv_cache_events=True, endpoint=endpoint,
                                           replay_endpoint=replay, buffer_steps=buffer_steps))


def _stored(h: int) -> list:
    return [BlockStored([h], None, [h] * BS, BS)]


def _caught_up(sub: KVEventSubscriber, pub: KVEventPublisher) -> bool:
    return sub.stats().next_seq == pub.stats.num_published


def test_the_subscriber_replays_what_it_missed_in_order():
    """Batches published before the subscriber came (only the replay has them), then while
    its subscription travels (the PUB drops them): every one is applied, once, in order."""
    pub = _publisher()
    applied: list[int] = []
    sub = None
    try:
        for i in range(3):
            pub.publish(_stored(i))
        sub = KVEventSubscriber(pub.endpoint, lambda ev: applied.extend(
            e["block_hashes"][0] for e in ev), pub.replay_endpoint)
        wait_for(lambda: applied == [0, 1, 2], 10, "the batches from before, replayed")

        def live() -> bool:  # publish until one arrives through the subscription
            pub.publish(_stored(pub.stats.num_published))
            return sub.stats().num_batches > sub.stats().num_replayed

        wait_for(live, 10, "a batch through the live stream")
        for _ in range(3):
            pub.publish(_stored(pub.stats.num_published))
        wait_for(lambda: _caught_up(sub, pub), 10, "every batch")
        assert applied == list(range(pub.stats.num_published))
        stats = sub.stats()
        assert stats.num_batches == len(applied) and stats.num_replayed >= 3
        assert sum(stats.resyncs.values()) == 0
    finally:
        if sub is not None:
            sub.close()
        pub.close()


def _serve(sched, runner, pub: KVEventPublisher, rid: str, prompt: list[int]) -> None:
    """Run a request to the end, publishing each step's events as the engine does."""
    sched.add_request(Request(rid, prompt, SamplingParams(temperature=0, max_tokens=2), (1,), 2))
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, runner.execute(out))
        pub.publish(out.kv_cache_events)


def _cached(sched) -> set[int]:
    return {external_hash(h) for h in sched.kv.pool.cached}


def test_a_gap_longer_than_the_replay_buffer_ends_with_the_engines_cache():
    """An engine evicting on a small pool, a publisher keeping 3 batches: a subscriber that
    joins late, then one whose messages are lost for 8 batches, asks for batches the buffer
    no longer has. It gets the cache as of the last batch gone, then the rest: its index
    holds exactly the engine's blocks."""
    sched, runner = _engine(num_blocks=12)
    pub = _publisher(buffer_steps=3)
    index = EventPrefixIndex()
    sub = None
    try:
        for i in range(4):  # more batches than the buffer keeps, with evictions
            _serve(sched, runner, pub, f"a{i}", list(range(100 + 20 * i, 116 + 20 * i)))
        assert sched.kv.pool.num_evictions > 0 and pub.stats.num_published > 3
        sub = KVEventSubscriber(pub.endpoint, lambda ev: index.apply("i", ev),
                                pub.replay_endpoint)
        wait_for(lambda: index.hashes("i") == _cached(sched), 10, "the late joiner's index")
        assert pub.stats.num_snapshots == 1
        # The live stream loses 8 batches (a network outage, a full queue).
        send, lost = pub._send, set()

        def lossy_send(seq: int, payload: bytes) -> None:
            if len(lost) < 8:
                lost.add(seq)
            else:
                send(seq, payload)

        pub._send = lossy_send
        i = 0
        while len(lost) < 8 or pub.stats.num_published <= max(lost) + 1:  # one sent after
            _serve(sched, runner, pub, f"b{i}", list(range(300 + 20 * i, 316 + 20 * i)))
            i += 1
        wait_for(lambda: _caught_up(sub, pub), 10, "the subscriber past the gap")
        assert index.hashes("i") == _cached(sched)
        assert pub.stats.num_snapshots == 2 and sub.stats().num_gaps == 1
        assert sub.stats().resyncs["whole_cache"] == 2 and sub.stats().resyncs["lost"] == 0
    finally:
        if sub is not None:
            sub.close()
        pub.close()


class VLLMLikePublisher(KVEventPublisher):
    """Answers a replay as vLLM's publisher does: with the buffered batches only."""

    def _replay_from(self, start: int) -> list[tuple[int, bytes]]:
        with self._buffer_lock:
            return [(b.seq, b.payload) for b in self._replay_buffer if b.seq >= start]


def test_a_publisher_that_cannot_fill_a_gap_leaves_an_index_that_holds_less():
    """A publisher without pagoda's whole-cache batch (vLLM's) answers a replay from before
    its buffer with what it has: the subscriber clears the index first, so it never keeps
    a block the engine evicted in the batches lost."""
    sched, runner = _engine(num_blocks=12)
    pub = VLLMLikePublisher(KVEventsConfig(
        enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:0",
        replay_endpoint="tcp://127.0.0.1:0", buffer_steps=2))
    index = EventPrefixIndex()
    sub = None
    try:
        for i in range(4):
            _serve(sched, runner, pub, f"a{i}", list(range(100 + 20 * i, 116 + 20 * i)))
        sub = KVEventSubscriber(pub.endpoint, lambda ev: index.apply("i", ev),
                                pub.replay_endpoint)
        wait_for(lambda: _caught_up(sub, pub), 10, "the replay")
        assert index.hashes("i") < _cached(sched)
        assert sub.stats().resyncs["lost"] == 1
    finally:
        if sub is not None:
            sub.close()
        pub.close()


def test_a_restarted_instance_is_followed_from_its_first_batch():
    """An instance restarted on the same endpoints numbers its batches from 0 again and
    holds nothing of before: the subscriber forgets the old cache (the connection dropped)
    and applies the new instance's batches, fewer than the old one's."""
    old = _publisher()
    index = EventPrefixIndex()
    sub = KVEventSubscriber(old.endpoint, lambda ev: index.apply("i", ev), old.replay_endpoint)
    try:
        for h in range(1, 6):
            old.publish(_stored(h))
        wait_for(lambda: index.hashes("i") == {1, 2, 3, 4, 5}, 10, "the first instance's blocks")
        endpoints = (old.endpoint, old.replay_endpoint)
        old.close()
        new = _publisher(*endpoints)
        try:
            new.publish(_stored(100))
            new.publish(_stored(101))
            wait_for(lambda: index.hashes("i") == {100, 101}, 10,
                     "only the restarted instance's blocks")
            assert sub.stats().resyncs["disconnect"] + sub.stats().resyncs["restart"] >= 1
        finally:
            new.close()
    finally:
        sub.close()


def test_numbers_that_go_back_are_a_restart():
    """A new process on the same endpoint whose disconnection the subscriber did not see
    (what vllm-router goes by): a number at or below one already received."""
    pub = _publisher()
    applied: list[list[dict]] = []
    sub = KVEventSubscriber(pub.endpoint, applied.append, pub.replay_endpoint)
    try:
        def live() -> bool:
            pub.publish(_stored(pub.stats.num_published))
            return sub.stats().num_batches > sub.stats().num_replayed

        wait_for(live, 10, "a batch through the live stream")
        wait_for(lambda: _caught_up(sub, pub), 10, "every batch")
        pub.stats.num_published = 0  # what a restarted publisher does
        pub.publish(_stored(77))
        wait_for(lambda: sub.stats().resyncs["restart"] == 1, 10, "the restart seen")
        wait_for(lambda: applied[-1] == [encode_event(_stored(77)[0])], 10, "its batch 0 applied")
        assert {"type": "AllBlocksCleared"} in applied[-2]
    finally:
        sub.close()
        pub.close()


def test_resync_clears_and_asks_for_everything_again():
    pub = _publisher()
    index = EventPrefixIndex()
    sub = KVEventSubscriber(pub.endpoint, lambda ev: index.apply("i", ev), pub.replay_endpoint)
    try:
        for h in range(3):
            pub.publish(_stored(h))
        wait_for(lambda: index.hashes("i") == {0, 1, 2}, 10, "the blocks")
        index.drop("i")  # what the router does when it sees the instance fail
        sub.resync()
        wait_for(lambda: sub.stats().resyncs["asked"] == 1, 10, "the resync")
        wait_for(lambda: index.hashes("i") == {0, 1, 2}, 10, "the blocks again")
    finally:
        sub.close()
        pub.close()


class _Tok:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, chat_template):
        from jinja2 import Template
        return Template(chat_template).render(messages=messages)


def test_the_router_tokenizer_is_trusted_per_kind_after_it_agreed_and_dropped_if_not():
    from pagoda.entrypoints.router.tokenizer import RouterTokenizer
    tok = RouterTokenizer(_Tok(), _Tok.chat_template, "fake")
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    text = {"prompt": "ab"}
    assert tok.tokens(text) == [1, 97, 98]
    assert tok.tokens(chat) == [ord(c) for c in "<user>hi<assistant>"]
    assert tok.tokens({"prompt": [5, 6]}) is None and tok.tokens({"messages": [{}]}) is None
    assert not tok.trusted(text) and not tok.trusted(chat)
    tok.check(text, [1, 97, 98], [1, 97, 98])
    assert tok.trusted(text) and not tok.trusted(chat)  # chat has not been checked yet
    tok.check(chat, [1, 2], [1, 3])  # another template on the instances
    assert tok.disabled and not tok.trusted(text) and not tok.trusted(chat)


def test_the_router_counts_what_an_instance_runs_for_others_as_load():
    import httpx

    from pagoda.entrypoints.router.app import Router

    reported = {"http://a": 4, "http://b": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}"
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, text=f"pagoda:num_requests_running {reported[url]}.0\n"
                                        "pagoda:num_requests_waiting 0.0\n")

    router = Router([], ["http://a", "http://b"], "least_outstanding", 1.0)
    router.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    a, b = router.decode.instances
    a.outstanding = 1  # one of a's four is this router's
    asyncio.run(router.check_health())
    assert (a.foreign, a.load, b.load) == (3, 4, 0)
    b.outstanding = 3
    assert router.decode.pick() is b  # 3 < 4: without the report it would be a
    reported["http://a"] = 0
    asyncio.run(router.check_health())
    assert a.foreign == 0 and router.decode.pick() is a


def test_an_instance_that_fails_its_check_is_dropped_and_its_events_asked_again():
    """Its precise index goes (its cache may be gone) and its subscriber is told to
    resynchronise, once, when it goes down; what it holds when back comes from its events."""
    import httpx

    from pagoda.entrypoints.router.app import Router

    precise = EventPrefixIndex()
    cache = CacheAwarePolicy(ApproxPrefixIndex(), precise)
    router = Router([], ["http://a", "http://b"], "cache_aware", 1.0, cache=cache)
    up = {"http://a": True, "http://b": True}

    def handler(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}"
        return httpx.Response(200 if up[url] else 503, text="")

    router.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    asked: list[str] = []

    class Subscriber:
        def resync(self) -> None:
            asked.append("a")

    router.subscribers["http://a"] = Subscriber()
    precise.apply("http://a", [encode_event(BlockStored([1], None, [1, 2, 3, 4], 4))])
    asyncio.run(router.check_health())
    assert precise.size("http://a") == 1 and asked == []
    up["http://a"] = False
    for _ in range(2):  # down, and still down
        asyncio.run(router.check_health())
    assert precise.size("http://a") == 0 and asked == ["a"]
    assert not router.decode.instances[0].healthy

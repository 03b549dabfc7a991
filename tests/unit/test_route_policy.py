"""pagoda router's cache-aware policy (entrypoints/route_policy.py) and its two indexes
(entrypoints/prefix_index.py), and the KV event subscriber that feeds the precise one
(entrypoints/kv_event_subscriber.py): an index built from an engine's own events matches
the blocks its prefix cache holds; the score weighs the prefix against load; a subscriber
that misses batches asks for them again and applies every batch once, in order."""
import asyncio
import os
import sys
import time
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner  # noqa: E402

from pagoda.config import KVEventsConfig, SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.kv_events import BlockStored, external_hash  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.engine.kv_event_publisher import KVEventPublisher, encode_event  # noqa: E402
from pagoda.entrypoints.kv_event_subscriber import KVEventSubscriber  # noqa: E402
from pagoda.entrypoints.prefix_index import (  # noqa: E402
    CHUNK_CHARS, ApproxPrefixIndex, EventPrefixIndex, request_text, text_chunk_names,
    token_block_names)
from pagoda.entrypoints.route_policy import CacheAwarePolicy, Names  # noqa: E402
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
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True, model_key="m")
    kv.enable_events()
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
    assert set(index._names["i"]) == cached
    assert sum(index._held["i"].values()) == len(cached)
    assert index.match("i", token_block_names(a, BS)) < 4  # a's tail was evicted
    index.apply("i", [{"type": "AllBlocksCleared"}])
    assert index.size("i") == 0


def test_a_chain_whose_start_was_missed_is_not_indexed():
    index = EventPrefixIndex()
    index.apply("i", [encode_event(BlockStored([7], 999, [1, 2, 3, 4], 4))])
    assert index.size("i") == 0


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
    from pagoda.entrypoints.router import instance_load
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


def test_the_subscriber_replays_what_it_missed_in_order():
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:0",
                            replay_endpoint="tcp://127.0.0.1:0")
    pub = KVEventPublisher(config)
    applied: list[int] = []
    try:
        for i in range(3):  # published before anyone listens: only replay has them
            pub.publish([BlockStored([i], None, [1, 2, 3, 4], 4)])
        time.sleep(0.2)
        sub = KVEventSubscriber(pub.endpoint, lambda ev: applied.extend(
            e["block_hashes"][0] for e in ev), pub.replay_endpoint)
        time.sleep(0.5)  # it connects (a PUB drops what comes before)
        for i in range(3, 6):
            pub.publish([BlockStored([i], None, [1, 2, 3, 4], 4)])
        deadline = time.monotonic() + 5
        while len(applied) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        sub.close()
        assert applied == list(range(6))
        assert sub.num_gaps == 1 and sub.num_replayed == 3
    finally:
        pub.close()


class _Tok:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, chat_template):
        from jinja2 import Template
        return Template(chat_template).render(messages=messages)


def test_the_router_tokenizer_is_trusted_per_kind_after_it_agreed_and_dropped_if_not():
    from pagoda.entrypoints.router_tokenizer import RouterTokenizer
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

    from pagoda.entrypoints.router import Router

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

"""The scheduler's side of multi-LoRA: at most --max-loras distinct adapters run at once,
requests of another adapter wait but are never starved, and an adapter is part of a block's
identity (prefix-cache hashes and KV events)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, run_step  # noqa: E402

from pagoda.config import SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.kv_events import BlockStored, CachedBlocks  # noqa: E402
from pagoda.core.prefix_cache import _digest, root_hash  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.lora_request import LoRARequest  # noqa: E402
from pagoda.request import Request  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

EOS = (1,)
A, B, C = (LoRARequest(n, i, f"/adapters/{n}") for i, n in enumerate("abc", start=1))


def make(max_loras=2, max_seqs=8, caching=False, events=False, budget=64):
    kv = KVCacheManager(256, 4, enable_prefix_caching=caching, model_key="m", events=events)
    config = SchedulerConfig(budget, max_seqs, 512, True, max_loras=max_loras)
    sched = Scheduler(config, kv)
    return sched, FakeRunner(sched)


def req(rid, lora, prompt_len=6, max_tokens=5, prompt=None):
    p = SamplingParams(temperature=0, max_tokens=max_tokens)
    ids = prompt or [200 + i % 50 for i in range(prompt_len)]
    return Request(rid, ids, p, EOS, max_tokens, lora=lora)


def running_adapters(sched):
    return {r.lora.lora_int_id for r in sched.running if r.lora is not None}


def test_at_most_max_loras_adapters_run_and_all_finish():
    sched, runner = make(max_loras=2)
    for i in range(12):
        sched.add_request(req(f"r{i}", [A, B, C, None][i % 4]))
    widest, steps = 0, 0
    while sched.has_unfinished_requests():
        run_step(sched, runner)
        sched.check_invariants()
        widest = max(widest, len(running_adapters(sched)))
        steps += 1
        assert steps < 500
    assert widest == 2
    # base requests and requests of running adapters passed the ones that waited
    first_c = next(i for i, s in enumerate(runner.steps)
                   if any(n.lora is C for n in s.new_requests))
    assert first_c > 0


def test_a_waiting_adapter_is_not_starved_by_a_busy_one():
    """A keeps getting new requests; C waits behind the limit (max_loras 1). After
    max_num_seqs requests of A pass it, the queue holds, A drains, C runs."""
    sched, runner = make(max_loras=1, max_seqs=4)
    sched.add_request(req("a0", A, max_tokens=3))
    run_step(sched, runner)
    sched.add_request(req("c0", C, max_tokens=3))
    admitted_c_at, n = None, 1
    for step in range(200):
        sched.add_request(req(f"a{n}", A, max_tokens=3))  # A never stops arriving
        n += 1
        run_step(sched, runner)
        sched.check_invariants()
        if admitted_c_at is None and sched.requests.get("c0") in sched.running:
            admitted_c_at = step
            break
    assert admitted_c_at is not None, "c0 starved"
    assert sched.requests["c0"].lora_passes == 4  # max_num_seqs passes, then the queue held


def test_prefix_hashes_keep_adapters_apart():
    sched, runner = make(max_loras=3, caching=True)
    prompt = list(range(300, 316))
    sched.add_request(req("x", A, prompt=prompt))
    while sched.has_unfinished_requests():
        run_step(sched, runner)
    for rid, lora, hit in (("y", A, True), ("z", B, False), ("w", None, False)):
        sched.add_request(req(rid, lora, prompt=prompt))
        run_step(sched, runner)
        cached = sched.requests[rid].num_cached_tokens
        assert (cached > 0) == hit, (rid, cached)
        while sched.has_unfinished_requests():
            run_step(sched, runner)


def test_base_chains_hash_as_before_adapters():
    assert root_hash("m", None) == _digest(b"pagoda-prefix-root-v1", b"m", b"")
    assert root_hash("m", None, "1:a") != root_hash("m", None, "2:a")
    assert root_hash("m", "s", "1:a") != root_hash("m", "s")


def test_kv_events_name_the_adapter_and_replay_keeps_it():
    sched, runner = make(max_loras=2, caching=True, events=True)
    sched.add_request(req("x", B, prompt=list(range(300, 312))))
    sched.add_request(req("y", None, prompt=list(range(400, 412))))
    events = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        events += out.kv_cache_events
        sched.update_from_output(out, runner.execute(out))
    stored = [e for e in events if isinstance(e, BlockStored)]
    by_adapter = {(e.lora_id, e.lora_name) for e in stored}
    assert by_adapter == {(2, "b"), (None, None)}
    cached = CachedBlocks()
    cached.apply(events)
    replayed = [e for e in cached.as_events() if isinstance(e, BlockStored)]
    assert {(e.lora_id, e.lora_name) for e in replayed} == by_adapter

"""Async scheduling through the whole engine on a tiny random model: the host schedules and
launches step N+1 before it reads step N's tokens, whose decodes then take their input on
the device. Every request must come out exactly as with synchronous steps: greedy and
seeded sampling, penalties (which count the token in flight on the device), min_tokens,
stop tokens and strings, n > 1, logprobs and prompt logprobs, under chunked prefill and
preemption, with no block leaked."""
import math
import random

import pytest

from pagoda import LLM, SamplingParams
from pagoda.request import EngineRequest
from tiny_models import TINY_VOCAB, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_async")), "qwen3", seed=3)


def prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(n)]


def workload(stop_string: str, stop_token: int) -> tuple[list, list]:
    params = [
        SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11, max_tokens=21,
                       ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=0.05, seed=12, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=13, repetition_penalty=1.3,
                       frequency_penalty=0.4, presence_penalty=0.2, max_tokens=15,
                       ignore_eos=True),
        SamplingParams(temperature=0.0, logprobs=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=14, logprobs=2, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_token],
                       min_tokens=2),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop_string], ignore_eos=True),
        SamplingParams(temperature=0.9, seed=15, n=3, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.0, prompt_logprobs=2, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=25),            # EOS may end it
    ]
    prompts = [prompt(5 + 7 * i % 31, 40 + i) for i in range(len(params))]
    return prompts, params


def stops(tiny) -> tuple[str, int]:
    """A stop string and a stop token that the greedy continuation of their prompts hits."""
    llm = LLM(tiny, dtype="float32", async_scheduling=False)
    prompts, _ = workload("x", 0)
    a = llm.generate(prompts[6], SamplingParams(temperature=0.0, max_tokens=30))[0]
    b = llm.generate(prompts[7], SamplingParams(temperature=0.0, max_tokens=30,
                                                ignore_eos=True))[0]
    middle = len(b.text) // 2
    return b.text[middle:middle + 3], a.token_ids[min(4, len(a.token_ids) - 1)]


def run(tiny, use_async: bool, stop_string: str, stop_token: int, monkeypatch=None, **kw):
    llm = LLM(tiny, dtype="float32", async_scheduling=use_async, **kw)
    assert llm.engine.async_scheduling is use_async
    placeholders = []
    if monkeypatch is not None:
        runner = llm.engine.runner
        gather = runner._gather_inputs

        def counting(sched):
            host = gather(sched)
            placeholders.append(len(host.placeholder_rows))
            return host
        monkeypatch.setattr(runner, "_gather_inputs", counting)
    prompts, params = workload(stop_string, stop_token)
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    engine.check_invariants()
    assert engine.kv.pool.num_free_blocks == engine.num_blocks, "a block leaked"
    return outs, engine.scheduler.num_preemptions, sum(placeholders)


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
        assert [c.text for c in x.outputs] == [c.text for c in y.outputs]
        assert [c.finish_reason for c in x.outputs] == [c.finish_reason for c in y.outputs]
        assert [c.stop_reason for c in x.outputs] == [c.stop_reason for c in y.outputs]
        for cx, cy in zip(x.outputs, y.outputs):
            assert (cx.logprobs is None) == (cy.logprobs is None)
            for lx, ly in zip(cx.logprobs or [], cy.logprobs or []):
                assert lx.token_id == ly.token_id and lx.rank == ly.rank
                assert math.isclose(lx.logprob, ly.logprob, abs_tol=1e-5)
                assert [t for t, _ in lx.top] == [t for t, _ in ly.top]
        assert (x.prompt_logprobs is None) == (y.prompt_logprobs is None)
        for lx, ly in zip(x.prompt_logprobs or [], y.prompt_logprobs or []):
            assert (lx is None) == (ly is None)
            if lx is not None:
                assert lx.token_id == ly.token_id
                assert math.isclose(lx.logprob, ly.logprob, abs_tol=1e-5)


@pytest.mark.parametrize("engine_kw", [
    {},
    dict(max_num_batched_tokens=7, block_size=4),                    # chunked prefill
    dict(max_num_batched_tokens=24, block_size=4, num_kv_blocks=24),  # and preemption
    dict(max_num_batched_tokens=24, block_size=4, num_kv_blocks=24,
         enable_prefix_caching=False),
], ids=["default", "chunked", "preempt", "preempt-nocache"])
def test_async_matches_sync(tiny, engine_kw, monkeypatch):
    stop_string, stop_token = stops(tiny)
    sync, sync_preemptions, none = run(tiny, False, stop_string, stop_token, **engine_kw)
    asyn, preemptions, placeholders = run(tiny, True, stop_string, stop_token, monkeypatch,
                                          **engine_kw)
    same(asyn, sync)
    assert none == 0 and placeholders > 0, "no decode ran on a token still in flight"
    if "num_kv_blocks" in engine_kw:
        assert preemptions > 0 and sync_preemptions > 0
    assert any(o.outputs[0].finish_reason == "stop" for o in sync), "no request stopped early"


def test_async_abort_mid_flight_leaks_nothing(tiny):
    llm = LLM(tiny, dtype="float32", async_scheduling=True, block_size=4)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        engine.add_request(EngineRequest(f"r{i}", prompt(9 + i, i), params))
    for _ in range(5):
        engine.step()
    assert engine.core.has_step_in_flight
    engine.abort_request("r1")
    engine.abort_request("r3")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in ("r1", "r3"), "output for an aborted request"
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == ["r0", "r2"]
    assert all(len(o.outputs[0].token_ids) == 40 for o in done.values())
    engine.check_invariants()
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


def test_penalized_request_decodes_on_placeholders(tiny, monkeypatch):
    """Penalties need the whole history, the token in flight included: the sampler takes
    that one from the device, so a penalised request does not hold the batch back."""
    llm = LLM(tiny, dtype="float32", async_scheduling=True)
    runner = llm.engine.runner
    gather = runner._gather_inputs
    on_placeholder: dict[str, int] = {"plain": 0, "penalized": 0}

    def recording(sched):
        host = gather(sched)
        rows = set(host.placeholder_rows)
        for row, rid in enumerate(sched.num_scheduled_tokens):  # decodes: one row each, first
            if row in rows:
                on_placeholder[rid] += 1
        return host
    monkeypatch.setattr(runner, "_gather_inputs", recording)
    llm.engine.add_request(EngineRequest("plain", prompt(6, 1), SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True)))
    llm.engine.add_request(EngineRequest("penalized", prompt(6, 2), SamplingParams(
        temperature=0.0, repetition_penalty=1.5, max_tokens=5, ignore_eos=True)))
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert on_placeholder["penalized"] == 4     # every decode after the first token
    assert on_placeholder["plain"] == 11


def test_engine_goes_idle_after_a_stop_in_flight(tiny):
    """A request ended by a stop token leaves its next step (one dropped token) in flight;
    with nothing else to run, the engine reads it at once and is idle, not half-busy."""
    llm = LLM(tiny, dtype="float32", async_scheduling=True)
    ids = llm.generate(prompt(8, 9), SamplingParams(temperature=0.0, max_tokens=12,
                                                    ignore_eos=True))[0].token_ids
    out = llm.generate(prompt(8, 9), SamplingParams(temperature=0.0, max_tokens=12,
                                                    stop_token_ids=[ids[3]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == ids[:ids.index(ids[3]) + 1]
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks

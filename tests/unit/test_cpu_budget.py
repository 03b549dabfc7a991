"""The CPU server's token budget (engine/cpu_budget.py): the largest candidate whose full
step fits the target, chosen from a step timed through the engine, which the timing leaves
as it found it; offline and with ``--max-num-batched-tokens`` nothing is timed."""
from __future__ import annotations

import pytest

from pagoda.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineArgs
from pagoda.engine import cpu_budget
from pagoda.engine.build import build_engine
from tiny_models import make_model


@pytest.mark.parametrize("seconds_per_token, budget", [
    (0.5 / 2048, 2048),          # exactly on the target: still fits
    (0.5 / 2047, 1024),
    (0.5 / 600, 512),
    (0.5 / 256, 256),
    (1.0, 256),                  # nothing fits: the smallest
])
def test_choose_budget(seconds_per_token, budget):
    assert cpu_budget.choose_budget(seconds_per_token) == budget


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("budget")), "llama", seed=1)


def args(path: str, **kw) -> EngineArgs:
    return EngineArgs(model=path, dtype="float32", device="cpu", block_size=4, **kw)


def test_a_cpu_server_times_a_step_and_leaves_no_trace(tiny):
    engine = build_engine(args(tiny, serving=True))
    assert engine.scheduler.config.max_num_batched_tokens in cpu_budget.CANDIDATES
    assert engine.kv.pool.num_free_blocks == engine.num_blocks
    assert engine.kv.pool.num_cached_blocks == 0
    assert (engine.num_prompt_tokens, engine.num_generation_tokens) == (0, 0)
    assert engine.scheduler.prefix_cache_queries == 0
    assert engine.runner.states == {}   # the timing requests' states are gone
    assert not engine.has_unfinished_requests()
    engine.check_invariants()


def test_a_slow_step_gives_a_small_budget(tiny, monkeypatch):
    monkeypatch.setattr(cpu_budget, "time_prefill", lambda engine, n: 2.0)   # >= 4 ms a token
    engine = build_engine(args(tiny, serving=True))
    assert engine.scheduler.config.max_num_batched_tokens == 256


@pytest.mark.parametrize("kw, budget", [
    (dict(serving=False), DEFAULT_MAX_NUM_BATCHED_TOKENS),                 # offline
    (dict(serving=True, max_num_batched_tokens=96), 96),                   # the user's
])
def test_nothing_is_timed_offline_or_when_set(tiny, monkeypatch, kw, budget):
    def fail(engine, tokens):
        raise AssertionError("timed a step")

    monkeypatch.setattr(cpu_budget, "time_prefill", fail)
    assert build_engine(args(tiny, **kw)).scheduler.config.max_num_batched_tokens == budget


def test_a_short_max_model_len_times_a_shorter_prompt(tiny, monkeypatch):
    timed = []
    real = cpu_budget.time_prefill

    def spy(engine, tokens):
        timed.append(tokens)
        return real(engine, tokens)

    monkeypatch.setattr(cpu_budget, "time_prefill", spy)
    engine = build_engine(args(tiny, serving=True, max_model_len=64))
    assert timed == [63] and cpu_budget.TIMING_TOKENS > 63
    assert engine.scheduler.config.max_num_batched_tokens in cpu_budget.CANDIDATES

"""AsyncEngine against a fake engine (no model): admission, idle KV polling, death."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from pagoda.core.stats import SchedulerStats
from pagoda.engine.async_engine import AdmissionLimits, AsyncEngine, EngineDeadError, QueueFullError
from pagoda.engine.core import CoreStep
from pagoda.engine.stats import EngineStats
from pagoda.request import EngineRequest
from pagoda.sampling import SamplingParams


class FakeEngine:
    """Admits requests into a waiting list and never schedules them (its step raises)."""

    def __init__(self, kv_connector: object = None) -> None:
        self.kv_connector = kv_connector
        self.waiting: list[SimpleNamespace] = []
        self.last_step = CoreStep()
        self.polls = 0
        self.closed = False
        self.fail_step = False

    def add_request(self, request: EngineRequest) -> None:
        if not request.prompt_token_ids:
            raise ValueError("prompt must not be empty")
        self.waiting.append(SimpleNamespace(num_tokens=len(request.prompt_token_ids)))

    def stats(self) -> EngineStats:
        tokens = sum(r.num_tokens for r in self.waiting)
        return EngineStats(SchedulerStats(0, len(self.waiting), 0, tokens, 8, 8, 0.0, 0, 0, 0),
                           0, 0)

    def inject_fault(self) -> None:
        self.fail_step = True

    def has_unfinished_requests(self) -> bool:
        return self.fail_step

    def step(self) -> list:
        raise RuntimeError("boom")

    def abort_request(self, request_id: str) -> None:
        pass

    def poll_kv_transfers(self) -> None:
        self.polls += 1

    def close(self) -> None:
        self.closed = True


def _run(engine: FakeEngine, limits: AdmissionLimits, body) -> None:
    async def main() -> None:
        ae = AsyncEngine(engine, limits)
        ae.start()
        try:
            await body(ae)
        finally:
            ae.shutdown()
    asyncio.run(main())


def test_admission_limits_by_requests_and_tokens() -> None:
    async def body(ae: AsyncEngine) -> None:
        with pytest.raises(ValueError, match="empty"):        # refused by the engine
            await ae.add_request(EngineRequest("e", [], SamplingParams()))
        await ae.add_request(EngineRequest("a", [1] * 30, SamplingParams()))
        with pytest.raises(QueueFullError, match="prompt tokens"):
            await ae.add_request(EngineRequest("b", [1] * 20, SamplingParams()))
        await ae.add_request(EngineRequest("c", [1] * 5, SamplingParams()))
        with pytest.raises(QueueFullError, match="requests queued"):
            await ae.add_request(EngineRequest("d", [1], SamplingParams()))
        assert ae.queue_state() == (2, 35)

    _run(FakeEngine(), AdmissionLimits(max_queued_requests=2, max_queued_prompt_tokens=40), body)


def test_idle_loop_polls_kv_transfers_and_closes_the_engine() -> None:
    engine = FakeEngine(kv_connector=object())

    async def body(ae: AsyncEngine) -> None:
        while engine.polls < 3:
            await asyncio.sleep(0.01)

    _run(engine, AdmissionLimits(), body)
    assert engine.polls >= 3 and engine.closed


def test_no_kv_connector_no_polling() -> None:
    engine = FakeEngine()

    async def body(ae: AsyncEngine) -> None:
        await asyncio.sleep(0.05)

    _run(engine, AdmissionLimits(), body)
    assert engine.polls == 0


def test_step_failure_kills_and_refuses() -> None:
    engine = FakeEngine()

    async def body(ae: AsyncEngine) -> None:
        stream = await ae.add_request(EngineRequest("a", [1, 2], SamplingParams()))
        engine.fail_step = True
        await ae.add_request(EngineRequest("b", [3], SamplingParams()))  # wakes the thread: its step raises
        with pytest.raises(EngineDeadError):
            await stream.next()
        assert ae.is_dead
        with pytest.raises(EngineDeadError):
            await ae.add_request(EngineRequest("c", [1], SamplingParams()))

    _run(engine, AdmissionLimits(), body)
    assert engine.closed


class ThreadRecordingEngine(FakeEngine):
    """Notes the thread it is built on and the threads that call into it."""

    def __init__(self) -> None:
        super().__init__()
        self.built_on = threading.get_ident()
        self.called_on: set[int] = set()

    def add_request(self, request: EngineRequest) -> None:
        self.called_on.add(threading.get_ident())
        super().add_request(request)


def test_on_own_thread_builds_and_steps_on_one_thread() -> None:
    """The engine is built on the engine thread, not the caller's, and that same thread
    serves it (one OpenMP pool: see async_engine's docstring)."""
    async def main() -> None:
        ae = AsyncEngine.on_own_thread(ThreadRecordingEngine)
        engine = ae.engine
        assert engine.built_on != threading.get_ident()
        ae.start()
        try:
            await ae.add_request(EngineRequest("a", [1, 2, 3], SamplingParams()))
            assert engine.called_on == {engine.built_on}
        finally:
            ae.shutdown()
        assert engine.closed
    asyncio.run(main())


def test_on_own_thread_reraises_build_errors_and_ends_unstarted() -> None:
    def broken() -> FakeEngine:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine.on_own_thread(broken)
    ae = AsyncEngine.on_own_thread(FakeEngine)
    thread = ae._thread
    ae.shutdown(timeout=5)           # never started: the thread still ends
    assert not thread.is_alive()

"""AsyncEngine: LLMEngine.step() on one background thread, outputs streamed to asyncio.

LLMEngine is not thread-safe, so the engine thread is the only one that calls into it: the
event loop sends commands (add, abort, ...) through a queue and receives outputs, once per
step, through ``loop.call_soon_threadsafe``. Torch releases the GIL inside its kernels, so the
HTTP loop keeps serving while a step runs (docs/server.md has the measurement).

The engine is best built on the thread that steps it (:meth:`AsyncEngine.on_own_thread`, what
``pagoda serve`` does): torch runs its CPU kernels on OpenMP, and GNU OpenMP keeps a pool of
worker threads per thread that starts parallel regions. An engine built on the main thread and
stepped on another leaves two pools alive, more OpenMP threads than cores, and libgomp then
stops its workers from spinning between regions: every kernel pays a futex wake-up. Measured
on a 2-core AMX Xeon (docs/server.md), oneDNN's bf16 matmuls ran at half speed and a serving
decode step took twice as long.

Admission control lives here: a bounded waiting queue, by requests and by prompt tokens
still to compute. An exception inside a step kills the engine: every request in flight fails
with :class:`EngineDeadError` and so does every later one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Generic, Optional, Protocol, TypeVar, Union

from pagoda.engine import pacing
from pagoda.engine.core import CoreStep
from pagoda.engine.metrics import EngineMetrics
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.stats import EngineStats
from pagoda.request import EngineRequest

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how often an idle engine thread wakes to check for shutdown
KV_IDLE_POLL_S = 0.02  # ... and with a KV connector: leases expire, transfers finish
RETRY_AFTER_S = 1  # what a 429 tells the client to wait


class Engine(Protocol):
    """What the engine thread needs of an engine (``LLMEngine`` is the real one)."""

    last_step: CoreStep

    @property
    def kv_connector(self) -> Optional[object]: ...

    def add_request(self, request: EngineRequest) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def stats(self) -> EngineStats: ...

    def poll_kv_transfers(self) -> None: ...

    def inject_fault(self) -> None: ...

    def close(self) -> None: ...


E = TypeVar("E", bound=Engine)  # the engine an AsyncEngine runs: its callers see its type


class EngineDeadError(RuntimeError):
    """The engine thread died; no request can be served any more."""


class QueueFullError(RuntimeError):
    """Admission control refused a request (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class AdmissionLimits:
    max_queued_requests: Optional[int] = None  # requests not yet scheduled
    max_queued_prompt_tokens: Optional[int] = None  # prompt tokens of those, still to compute


# ---------------------------------------------------------------- commands
@dataclass
class _Add:
    request: EngineRequest
    done: asyncio.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run ``fn(engine)`` on the engine thread and hand back its result."""

    fn: Callable[[Any], Any]  # given the engine
    done: asyncio.Future


@dataclass
class _Fault:
    """Make the next step raise (debug endpoint; tests engine death)."""


_STOP = object()
_ABORTED = object()  # put on a stream when its request is aborted from the loop side
Command = Union[_Add, _Abort, _Call, _Fault, object]


@dataclass
class RequestStream:
    """The outputs of one request as the event loop sees them: newest first wins."""

    request_id: str
    num_completions: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False

    async def next(self) -> Optional[RequestOutput]:
        """The newest output (older ones are skipped: outputs are cumulative); None once
        the request is aborted. Raises EngineDeadError when the engine died."""
        item = await self.queue.get()
        while not self.queue.empty() and not _is_final(item):
            item = self.queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item is _ABORTED:
            self.finished = True
            return None
        if item.finished:
            self.finished = True
        return item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out = await self.next()
            if out is None:
                return
            yield out


def _is_final(item: Any) -> bool:
    return item is _ABORTED or isinstance(item, BaseException) or item.finished


@dataclass
class _QueueState:
    """What admission control counts, kept under one lock."""

    inbox_requests: int = 0  # added on the loop, not yet taken by the engine thread
    inbox_tokens: int = 0
    engine_waiting: int = 0  # engine's waiting queue, as of the last snapshot
    engine_waiting_tokens: int = 0

    @property
    def requests(self) -> int:
        return self.inbox_requests + self.engine_waiting

    @property
    def tokens(self) -> int:
        return self.inbox_tokens + self.engine_waiting_tokens


class AsyncEngine(Generic[E]):
    def __init__(
        self,
        engine: E,
        limits: AdmissionLimits = AdmissionLimits(),
        metrics: Optional[EngineMetrics] = None,
    ) -> None:
        self.engine = engine
        self._host: Optional[queue.Queue] = None  # on_own_thread: hands the thread its loop
        self.limits = limits
        self.metrics = metrics
        self._inbox: queue.Queue[Command] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # loop side only
        self._live: dict[str, int] = {}  # engine thread only: id -> n
        self._lock = threading.Lock()
        self._qstate = _QueueState()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self.dead_error: Optional[BaseException] = None
        self._has_kv = engine.kv_connector is not None
        self._idle_poll_s = KV_IDLE_POLL_S if self._has_kv else IDLE_POLL_S
        if metrics is not None:
            metrics.engine_alive.set(1)
            metrics.update(engine.stats())

    # -------------------------------------------------------------- lifecycle
    @classmethod
    def on_own_thread(
        cls,
        make_engine: Callable[[], E],
        limits: AdmissionLimits = AdmissionLimits(),
        metrics: Optional[EngineMetrics] = None,
    ) -> "AsyncEngine[E]":
        """Build the engine with ``make_engine()`` on a new thread, which :meth:`start` then
        has step it (see the module docstring for why). Blocks until it is built; re-raises
        what building raised."""
        built: queue.Queue = queue.Queue(maxsize=1)
        host: queue.Queue = queue.Queue(maxsize=1)

        def run() -> None:
            try:
                built.put(make_engine())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                built.put(e)
                return
            started = host.get()  # the AsyncEngine once started; None: shut down unstarted
            if started is not None:
                started._run()

        thread = threading.Thread(target=run, name="pagoda-engine", daemon=True)
        thread.start()
        engine = built.get()
        if isinstance(engine, BaseException):
            thread.join()
            raise engine
        self = cls(engine, limits, metrics)
        self._thread, self._host = thread, host
        return self

    def start(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        if self._host is not None:  # on_own_thread: the thread that built the engine
            self._host.put(self)
            return
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._host is not None and self._loop is None:
            self._host.put(None)  # built but never started: let the thread end
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop :meth:`start` was given (every command comes after it)."""
        assert self._loop is not None, "AsyncEngine.start() was not called"
        return self._loop

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    # --------------------------------------------------------- loop-side API
    async def add_request(self, request: EngineRequest) -> RequestStream:
        """Admit and queue a request (its arrival time is now if it has none); raises
        ValueError (bad request), QueueFullError (429) or EngineDeadError. The engine
        validates the prompt before this returns."""
        self._check_alive()
        self._admit(len(request.prompt_token_ids))
        request_id = request.request_id
        stream = RequestStream(request_id, request.params.n)
        self._streams[request_id] = stream
        done = self._running_loop().create_future()
        if request.arrival_time is None:
            request = replace(request, arrival_time=time.monotonic())
        self._inbox.put(_Add(request, done))
        try:
            await done
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort at once: the stream ends now, the engine frees the blocks at its next turn."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            stream.queue.put_nowait(_ABORTED)
        self._inbox.put(_Abort(request_id))

    async def call(self, fn: Callable[[E], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread (debug state, invariant checks)."""
        self._check_alive()
        done = self._running_loop().create_future()
        self._inbox.put(_Call(fn, done))
        return await done

    def inject_fault(self) -> None:
        self._inbox.put(_Fault())

    def queue_state(self) -> tuple[int, int]:
        """(requests, prompt tokens) queued but not yet scheduled."""
        with self._lock:
            return self._qstate.requests, self._qstate.tokens

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine has died: {self.dead_error!r}")

    def _admit(self, num_tokens: int) -> None:
        max_req, max_tok = self.limits.max_queued_requests, self.limits.max_queued_prompt_tokens
        with self._lock:
            q = self._qstate
            if max_req is not None and q.requests >= max_req:
                raise QueueFullError(
                    f"the server is full: {q.requests} requests queued "
                    f"(--max-queued-requests {max_req})"
                )
            if max_tok is not None and q.tokens > 0 and q.tokens + num_tokens > max_tok:
                raise QueueFullError(
                    f"the server is full: {q.tokens} prompt tokens queued; "
                    f"{num_tokens} more would pass "
                    f"--max-queued-prompt-tokens {max_tok}"
                )
            q.inbox_requests += 1
            q.inbox_tokens += num_tokens

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """On the loop: hand each output to its stream."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.queue.put_nowait(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error)
        self._streams.clear()

    # ------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox(block=not self.engine.has_unfinished_requests()):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine, loudly
            self._die(e)
        self.engine.close()  # the KV connector's threads and sockets

    def _idle_tick(self) -> None:
        """No request is live: still expire KV leases and take in finished transfers (a
        prefill instance's leases outlive its requests), and keep the gauges fresh."""
        if not self._has_kv:
            return
        self.engine.poll_kv_transfers()
        self._publish_state()

    def _step(self) -> None:
        outputs = self.engine.step()
        pacing.after_step(self.engine)
        now = time.monotonic()
        for out in outputs:
            if out.finished:
                self._live.pop(out.request_id, None)
        stats = self.engine.stats()
        if self.metrics is not None:
            self.metrics.on_step(stats, outputs, now)
        self._snapshot_queue(stats)
        if outputs:
            self._running_loop().call_soon_threadsafe(self._dispatch, outputs)

    def _drain_inbox(self, block: bool) -> bool:
        """Run every queued command; False once asked to stop."""
        while True:
            try:
                cmd = (
                    self._inbox.get(timeout=self._idle_poll_s)
                    if block
                    else self._inbox.get_nowait()
                )
            except queue.Empty:
                if block:
                    self._idle_tick()
                    continue
                return True
            if cmd is _STOP:
                return False
            self._handle(cmd)
            block = False

    def _handle(self, cmd: Command) -> None:
        if isinstance(cmd, _Add):
            self._handle_add(cmd)
        elif isinstance(cmd, _Abort):
            self._handle_abort(cmd.request_id)
        elif isinstance(cmd, _Call):
            self._resolve(cmd.done, *_run_call(cmd.fn, self.engine))
        elif isinstance(cmd, _Fault):
            self.engine.inject_fault()

    def _handle_add(self, cmd: _Add) -> None:
        error: Optional[BaseException] = None
        try:
            self.engine.add_request(cmd.request)
            self._live[cmd.request.request_id] = cmd.request.params.n
        except Exception as e:  # noqa: BLE001 - reported to the caller, the engine goes on
            error = e
        with self._lock:
            self._qstate.inbox_requests -= 1
            self._qstate.inbox_tokens -= len(cmd.request.prompt_token_ids)
        self._snapshot_queue(self.engine.stats())
        self._resolve(cmd.done, None, error)

    def _handle_abort(self, request_id: str) -> None:
        n = self._live.pop(request_id, None)
        if n is None:
            return  # finished already
        self.engine.abort_request(request_id)
        if self.metrics is not None:
            self.metrics.on_abort(request_id, n)
        self._publish_state()
        logger.debug("aborted %s", request_id)

    def _publish_state(self) -> None:
        stats = self.engine.stats()
        if self.metrics is not None:
            self.metrics.update(stats)
        self._snapshot_queue(stats)

    def _snapshot_queue(self, stats: EngineStats) -> None:
        with self._lock:
            self._qstate.engine_waiting = stats.scheduler.num_waiting
            self._qstate.engine_waiting_tokens = stats.scheduler.num_waiting_tokens
            total = self._qstate.requests
        if self.metrics is not None:
            self.metrics.waiting.set(total)

    def _resolve(self, fut: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self._running_loop().call_soon_threadsafe(settle)

    def _die(self, error: BaseException) -> None:
        """Log, fail everything in flight, then refuse every later command until stopped."""
        logger.exception("the engine died; failing all requests in flight", exc_info=error)
        dead = EngineDeadError(f"the engine died: {error!r}")
        self.dead_error = error
        if self.metrics is not None:
            self.metrics.engine_alive.set(0)
            self.metrics.running.set(0)
            self.metrics.waiting.set(0)
        self._running_loop().call_soon_threadsafe(self._fail_all, dead)
        while True:
            cmd = self._inbox.get()
            if cmd is _STOP:
                return
            if isinstance(cmd, (_Add, _Call)):
                self._resolve(cmd.done, None, dead)


def _run_call(fn: Callable[[Any], Any], engine: Engine) -> tuple[Any, Optional[BaseException]]:
    try:
        return fn(engine), None
    except Exception as e:  # noqa: BLE001 - handed back to the caller
        return None, e

"""The inspector's HTTP side: ``GET /inspect`` (the page), ``GET /inspect/state`` (one
snapshot as JSON) and ``GET /inspect/events`` (server-sent events), all read-only.

The page is static (it holds no data), so it is served without the API key; the two data
routes sit behind ``--api-key`` like every route, and the page sends the key it is given in
an ``Authorization`` header (it reads the event stream with ``fetch``, which can send one,
not ``EventSource``, which cannot). See docs/inspector.md.

Each viewer's stream reads what the engine has published (engine/inspector.py) at most
every ``PUBLISH_INTERVAL_S``; it never calls into the engine after its first snapshot, so a
slow or stalled viewer only falls behind. A stream sends a keyframe (the whole state) when
it opens and every ``KEYFRAME_INTERVAL_S``, and between them deltas (only what changed).
Every frame is made once however many viewers watch (``Feed``); a viewer adds only the
steps new to it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from pagoda.engine.inspector import (
    PUBLISH_INTERVAL_S,
    DeltaEncoder,
    EngineSnapshot,
    Inspector,
    StepRecord,
    snapshot_json,
    step_json,
)
from pagoda.entrypoints.dialect import Endpoint, ServerContext
from pagoda.entrypoints.openai.errors import OPENAI

PAGE = Path(__file__).parent / "static" / "inspect.html"
# A keyframe (the whole state, the prefix cache's every block included) this often on each
# stream, deltas between: a viewer that lost track (a page left in the background, a delta
# it could not apply) is whole again within this time.
KEYFRAME_INTERVAL_S = 30.0
DELTAS_KEPT = 8  # recent deltas kept, so a viewer a few frames behind gets them, not a keyframe
KEEPALIVE_S = 5.0  # a comment line this often on a quiet stream: a gone viewer is noticed
NO_CACHE = {"Cache-Control": "no-store"}


def page(ctx: ServerContext) -> Optional[Endpoint]:
    """The route table's ``GET /inspect`` (None: the inspector is off)."""
    if _inspector(ctx) is None:
        return None
    html = PAGE.read_text(encoding="utf-8")

    async def inspect_page() -> HTMLResponse:
        return HTMLResponse(html, headers=NO_CACHE)

    return Endpoint(inspect_page, OPENAI, include_in_schema=False)


def state(ctx: ServerContext) -> Optional[Endpoint]:
    """The route table's ``GET /inspect/state``: one snapshot as JSON."""
    inspector = _inspector(ctx)
    if inspector is None:
        return None

    async def inspect_state() -> JSONResponse:
        snap = await ctx.async_engine.call(_inspect)
        return JSONResponse(snapshot_json(snap, inspector.steps.since(0)), headers=NO_CACHE)

    return Endpoint(inspect_state, OPENAI)


def events(ctx: ServerContext) -> Optional[Endpoint]:
    """The route table's ``GET /inspect/events``: the server-sent events of a viewer."""
    inspector = _inspector(ctx)
    if inspector is None:
        return None
    feed = Feed(inspector)  # one for every viewer

    async def inspect_events() -> StreamingResponse:
        first = await ctx.async_engine.call(_publish)  # once per viewer, on connecting
        return StreamingResponse(
            _events(inspector, feed, first),
            media_type="text/event-stream",
            headers={**NO_CACHE, "X-Accel-Buffering": "no"},
        )

    return Endpoint(inspect_events, OPENAI)


def _inspector(ctx: ServerContext) -> Optional[Inspector]:
    """The engine's inspector, told whether snapshots show text (None: off, or an engine
    without one, as the fakes of tests)."""
    inspector: Optional[Inspector] = getattr(ctx.async_engine.engine, "inspector", None)
    if not ctx.config.enable_inspector or inspector is None:
        return None
    inspector.show_text = ctx.config.inspector_show_text
    return inspector


def _inspect(engine: Any) -> EngineSnapshot:
    """On the engine thread."""
    snap: EngineSnapshot = engine.inspect()
    return snap


def _publish(engine: Any) -> EngineSnapshot:
    """On the engine thread: a snapshot now, published, so that every stream shares it."""
    snap: EngineSnapshot = engine.inspector.publish(engine.inspect, time.monotonic())
    return snap


class Feed:
    """The frames every viewer shares, on the event loop: for the newest snapshot its
    keyframe and the deltas that led to it, each encoded once. A frame's JSON is kept
    without its ``steps``, which each stream adds (only the steps new to it)."""

    def __init__(self, inspector: Optional[Inspector] = None) -> None:
        self.inspector = inspector  # told what a delta costs, which paces the snapshots
        self.snap: Optional[EngineSnapshot] = None
        self._encoder: Optional[DeltaEncoder] = None
        self._deltas: deque[tuple[int, int, str]] = deque(maxlen=DELTAS_KEPT)  # base, version
        self._keyframe: Optional[tuple[int, str]] = None

    @property
    def version(self) -> int:
        return self.snap.version if self.snap is not None else -1

    def advance(self, snap: EngineSnapshot) -> None:
        """Take a newer snapshot (an older or the same one is ignored)."""
        if self.snap is not None and snap.version <= self.snap.version:
            return
        if self._encoder is None or self.snap is None:
            self._encoder = DeltaEncoder(snap)
        else:
            start = time.perf_counter()
            body = _encode(self._encoder.delta(snap))
            self._deltas.append((self.snap.version, snap.version, body))
            if self.inspector is not None:
                cost = time.perf_counter() - start
                self.inspector.frame_cost_s = 0.7 * self.inspector.frame_cost_s + 0.3 * cost
        self.snap = snap

    def keyframe(self, steps: list[StepRecord]) -> str:
        assert self.snap is not None
        if self._keyframe is None or self._keyframe[0] != self.snap.version:
            doc = snapshot_json(self.snap, [])
            del doc["steps"]
            self._keyframe = (self.snap.version, _encode(doc))
        return _event("update", self.snap.version, self._keyframe[1], steps)

    def deltas(self, have: int, steps: list[StepRecord]) -> Optional[str]:
        """The deltas from version ``have`` to the newest (the steps on the last), or None
        when they are no longer kept. At the newest already: a delta of only the steps."""
        if have == self.version:
            return _event("delta", have, _encode({"version": have, "base": have}), steps)
        chain = [d for d in self._deltas if d[0] >= have]
        if not chain or chain[0][0] != have:
            return None
        last = len(chain) - 1
        return "".join(
            _event("delta", version, body, steps if i == last else [])
            for i, (_, version, body) in enumerate(chain)
        )


async def _events(inspector: Inspector, feed: Feed, first: EngineSnapshot) -> AsyncIterator[str]:
    """One viewer's stream: a keyframe (``update``), then at most every interval, and only
    when there is a new snapshot or new steps, the deltas since (``delta``), or a keyframe
    again every ``KEYFRAME_INTERVAL_S``; a comment line now and then to keep it alive."""
    inspector.viewers += 1
    try:
        feed.advance(first)
        steps = inspector.steps.since(0)
        seq = steps[-1].seq if steps else inspector.steps.last_seq
        yield "retry: 2000\n\n"
        yield feed.keyframe(steps)
        have = feed.version
        quiet_since = keyframe_sent = time.monotonic()
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            latest = inspector.latest
            if latest is not None:
                feed.advance(latest)
            steps = inspector.steps.since(seq)
            now = time.monotonic()
            if feed.version == have and not steps:
                if now - quiet_since >= KEEPALIVE_S:
                    quiet_since = now
                    yield ": keep-alive\n\n"
                continue
            if steps:
                seq = steps[-1].seq
            frames = (
                None if now - keyframe_sent >= KEYFRAME_INTERVAL_S else feed.deltas(have, steps)
            )
            if frames is None:
                frames, keyframe_sent = feed.keyframe(steps), now
            yield frames
            have, quiet_since = feed.version, now
    finally:
        inspector.viewers -= 1


def _encode(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def _event(kind: str, version: int, body: str, steps: list[StepRecord]) -> str:
    """An SSE event: ``body`` (a JSON object) with this stream's ``steps`` added."""
    data = f'{body[:-1]},"steps":{_encode([step_json(s) for s in steps])}}}'
    return f"event: {kind}\nid: {version}\ndata: {data}\n\n"

"""The inspector's HTTP side: ``GET /inspect`` (the page), ``GET /inspect/state`` (one
snapshot as JSON) and ``GET /inspect/events`` (server-sent events), all read-only.

The page is static (it holds no data), so it is served without the API key; the two data
routes sit behind ``--api-key`` like every route, and the page sends the key it is given in
an ``Authorization`` header (it reads the event stream with ``fetch``, which can send one,
not ``EventSource``, which cannot). See docs/inspector.md.

Each viewer's stream reads what the engine has published (engine/inspector.py) at most
every ``PUBLISH_INTERVAL_S``; it never calls into the engine after its first snapshot, so a
slow or stalled viewer only falls behind (it skips snapshots, and steps that left the ring).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.inspector import (
    PUBLISH_INTERVAL_S,
    EngineSnapshot,
    Inspector,
    StepRecord,
    snapshot_json,
)

PAGE = Path(__file__).parent / "static" / "inspect.html"
# The prefix cache's blocks (the bulk of an update on a large pool: a hash, a parent and a
# hit count per named block) go to a viewer at most this often; everything else, including
# each block's state, at every update.
CACHE_INTERVAL_S = 1.0
KEEPALIVE_S = 5.0  # a comment line this often on a quiet stream: a gone viewer is noticed
NO_CACHE = {"Cache-Control": "no-store"}


def add_inspector_routes(app: FastAPI, async_engine: AsyncEngine, inspector: Inspector) -> None:
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/inspect", include_in_schema=False)
    async def inspect_page() -> HTMLResponse:
        return HTMLResponse(page, headers=NO_CACHE)

    @app.get("/inspect/state")
    async def inspect_state() -> JSONResponse:
        snap = await async_engine.call(_inspect)
        return JSONResponse(snapshot_json(snap, inspector.steps.since(0)), headers=NO_CACHE)

    @app.get("/inspect/events")
    async def inspect_events() -> StreamingResponse:
        first = await async_engine.call(_inspect)  # once per viewer, on connecting
        return StreamingResponse(
            _events(inspector, first),
            media_type="text/event-stream",
            headers={**NO_CACHE, "X-Accel-Buffering": "no"},
        )


def _inspect(engine: Any) -> EngineSnapshot:
    """On the engine thread."""
    snap: EngineSnapshot = engine.inspect()
    return snap


async def _events(inspector: Inspector, snap: EngineSnapshot) -> AsyncIterator[str]:
    """One viewer's stream: an ``update`` event (the JSON of /inspect/state, with only the
    steps new to this viewer, and ``cache`` null when unchanged, or changed less than
    ``CACHE_INTERVAL_S`` after the last one sent) at most every interval, only when
    something changed; a comment line now and then to keep the stream alive."""
    inspector.viewers += 1
    try:
        steps = inspector.steps.since(0)
        seq = steps[-1].seq if steps else inspector.steps.last_seq
        cache_version: Optional[int] = snap.scheduler.pool.cache_version
        yield "retry: 2000\n\n"
        yield _update(snap, steps, True)
        quiet_since = cache_sent = time.monotonic()
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            latest = inspector.latest
            fresh = latest is not None and latest.time > snap.time
            if fresh:
                assert latest is not None
                snap = latest
            steps = inspector.steps.since(seq)
            now = time.monotonic()
            send_cache = (
                snap.scheduler.pool.cache_version != cache_version
                and now - cache_sent >= CACHE_INTERVAL_S
            )
            if not fresh and not steps and not send_cache:
                if now - quiet_since >= KEEPALIVE_S:
                    quiet_since = now
                    yield ": keep-alive\n\n"
                continue
            if steps:
                seq = steps[-1].seq
            yield _update(snap, steps, send_cache)
            if send_cache:
                cache_version, cache_sent = snap.scheduler.pool.cache_version, now
            quiet_since = now
    finally:
        inspector.viewers -= 1


def _update(snap: EngineSnapshot, steps: list[StepRecord], with_cache: bool) -> str:
    data = json.dumps(snapshot_json(snap, steps, with_cache), separators=(",", ":"))
    return f"event: update\nid: {snap.version}\ndata: {data}\n\n"

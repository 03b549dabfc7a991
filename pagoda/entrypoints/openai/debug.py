"""``--enable-debug-endpoints``: engine internals for tests and operators, off by default.
``GET /debug/state`` (counts and ``check_invariants()``, read on the engine thread) and
``POST /debug/fault`` (the next engine step raises: tests engine death)."""

from __future__ import annotations

from typing import Any, Optional

from pagoda.entrypoints.dialect import Endpoint, ServerContext
from pagoda.entrypoints.openai.errors import OPENAI


def state(ctx: ServerContext) -> Optional[Endpoint]:
    if not ctx.config.enable_debug_endpoints:
        return None

    async def debug_state() -> dict:
        return await ctx.async_engine.call(_engine_state)

    return Endpoint(debug_state, OPENAI)


def fault(ctx: ServerContext) -> Optional[Endpoint]:
    if not ctx.config.enable_debug_endpoints:
        return None

    async def debug_fault() -> dict:
        ctx.async_engine.inject_fault()
        return {"status": "the next engine step will raise"}

    return Endpoint(debug_fault, OPENAI)


def _engine_state(engine: Any) -> dict:
    """Runs on the engine thread."""
    try:
        engine.check_invariants()
        broken = None
    except AssertionError as e:
        broken = str(e) or "an invariant does not hold"
    stats = engine.stats().scheduler
    return {
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "num_unfinished": int(engine.has_unfinished_requests()),
        "num_free_blocks": stats.num_free_blocks,
        "num_blocks": stats.num_blocks,
        "invariants_ok": broken is None,
        "invariant_error": broken,
    }

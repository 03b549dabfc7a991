"""Pacing for the loops that call ``LLMEngine.step`` (the server's engine thread, offline
generation): what to do after a step that moved nothing.

A step moves nothing in two cases. Requests may be waiting only for remote KV pulls in
flight (disaggregated decode): the loop sleeps a little instead of spinning, so the transfer
threads keep the core. Or the engine has live requests it can neither run nor finish: a bug,
and the loop fails loudly instead of spinning forever.
"""

from __future__ import annotations

import time
from typing import Any

KV_POLL_INTERVAL_S = 0.001


class EngineStalledError(RuntimeError):
    """Live requests, and a step that could neither run nor finish any of them."""


def after_step(engine: Any) -> None:
    """Call after each ``engine.step()``: sleeps or raises when the step moved nothing."""
    step = engine.last_step
    if step.progressed:
        return
    if step.waiting_for_kv:
        time.sleep(KV_POLL_INTERVAL_S)
        return
    if engine.has_unfinished_requests():
        stats = engine.stats().scheduler
        raise EngineStalledError(
            "the scheduler made no progress with requests pending: "
            f"{stats.num_waiting} waiting, {stats.num_running} running"
        )

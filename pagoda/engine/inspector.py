"""The engine's side of the inspector (``GET /inspect``): a ring of recent steps and, while
someone watches, a state snapshot made at most ``PUBLISH_INTERVAL_S`` apart.

Both are made on the engine thread by the engine itself and read from the HTTP side without
calling into it, so a viewer, fast or slow, costs the engine at most one snapshot per
interval (nothing when nobody watches), and a step costs one small record in the ring.
Invariant: step records carry consecutive sequence numbers; a reader that finds a gap knows
that many steps fell out of the ring before it read them.

``snapshot_json`` is the one place the JSON schema of ``GET /inspect/state`` is written
(documented in docs/inspector.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pagoda.core.snapshot import BLOCK_STATES, SchedulerSnapshot, StepTokens
from pagoda.engine.stats import EngineStats

SCHEMA = "pagoda.inspect/1"
STEP_LOG_CAPACITY = 2048  # steps kept for viewers (a few seconds to minutes of serving)
PUBLISH_INTERVAL_S = 0.25  # at most 4 snapshots a second, however many viewers
HASH_HEX_CHARS = 16  # a block hash is shown by its first 8 bytes


@dataclass(frozen=True)
class StepRecord:
    seq: int  # 1, 2, 3, ... per engine, counting only steps that scheduled something
    end_time: float  # monotonic
    duration_s: float  # wall time of the whole engine step (schedule, run, outputs)
    tokens: StepTokens


class StepLog:
    """A bounded ring of step records: appended by the engine thread, read by any thread."""

    def __init__(self, capacity: int = STEP_LOG_CAPACITY) -> None:
        self._ring: deque[StepRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.last_seq = 0

    def append(self, tokens: StepTokens, end_time: float, duration_s: float) -> None:
        with self._lock:
            self.last_seq += 1
            self._ring.append(StepRecord(self.last_seq, end_time, duration_s, tokens))

    def since(self, seq: int) -> list[StepRecord]:
        """The records after ``seq`` still in the ring, oldest first."""
        with self._lock:
            if self.last_seq <= seq:
                return []
            new = min(self.last_seq - seq, len(self._ring))
            return list(self._ring)[-new:]


@dataclass(frozen=True)
class RequestDetail:
    """What the output processor knows of a request: timings, and its text when shown."""

    first_scheduled_time: Optional[float]
    first_token_time: Optional[float]
    prompt: Optional[str] = None
    output: Optional[str] = None


@dataclass(frozen=True)
class EngineSnapshot:
    version: int  # the publication's number; 0 when made on demand
    time: float  # monotonic, when made
    model: str
    kv_role: str
    max_model_len: int
    scheduler: SchedulerSnapshot
    details: dict[str, RequestDetail]  # core request id -> its detail
    stats: EngineStats
    show_text: bool


class Inspector:
    """Owned by the engine: the step ring, and the latest published snapshot.

    ``viewers`` is counted by the server (event loop thread) and only read here; the engine
    publishes while it is above 0. ``show_text`` puts prompt and output text in snapshots."""

    def __init__(self, capacity: int = STEP_LOG_CAPACITY) -> None:
        self.steps = StepLog(capacity)
        self.viewers = 0
        self.show_text = False
        self.latest: Optional[EngineSnapshot] = None
        self._version = 0
        self._last_publish = 0.0

    def on_step(
        self,
        tokens: StepTokens,
        start: float,
        end: float,
        make: Callable[[int], EngineSnapshot],
        idle: bool,
    ) -> None:
        """After each engine step, on the engine thread. ``make(version)`` builds a
        snapshot; it is called only while someone watches, at most once per interval (and
        once more when the engine goes idle, so viewers see it settle)."""
        if tokens.total or tokens.preemptions:
            self.steps.append(tokens, end, end - start)
        if self.viewers > 0 and (idle or end - self._last_publish >= PUBLISH_INTERVAL_S):
            self.publish(make, end)

    def maybe_publish(self, make: Callable[[int], EngineSnapshot]) -> None:
        """From an idle engine loop (leases expire, pulls end with no step running)."""
        now = time.monotonic()
        if self.viewers > 0 and now - self._last_publish >= PUBLISH_INTERVAL_S:
            self.publish(make, now)

    def publish(self, make: Callable[[int], EngineSnapshot], now: float) -> None:
        self._version += 1
        self.latest = make(self._version)
        self._last_publish = now


# --------------------------------------------------------------------- JSON
def snapshot_json(
    snap: EngineSnapshot, steps: list[StepRecord], with_cache: bool = True
) -> dict[str, Any]:
    """The JSON of ``GET /inspect/state`` (and of each SSE update, where ``cache`` is null
    when unchanged since the client's previous update, and ``steps`` holds only new steps)."""
    sched = snap.scheduler
    pool = sched.pool
    return {
        "schema": SCHEMA,
        "version": snap.version,
        "time": snap.time,
        "engine": {
            "model": snap.model,
            "kv_role": snap.kv_role,
            "num_blocks": pool.num_blocks,
            "block_size": sched.block_size,
            "token_budget": sched.token_budget,
            "max_num_seqs": sched.max_num_seqs,
            "max_model_len": snap.max_model_len,
            "prefix_caching": sched.prefix_caching,
            "show_text": snap.show_text,
        },
        "counters": _counters(snap),
        "pool": {
            "states": pool.states,
            "ref_counts": pool.ref_counts,
            "legend": BLOCK_STATES,
        },
        "cache": _cache_json(snap) if with_cache else None,
        "requests": [_request_json(r, snap) for r in sched.requests],
        "leases": [{"id": le.lease_id, "block_ids": le.block_ids} for le in sched.leases],
        "kv_transfer": _kv_transfer_json(snap),
        "steps": [step_json(s) for s in steps],
    }


def _counters(snap: EngineSnapshot) -> dict[str, Any]:
    sched = snap.stats.scheduler
    return {
        "num_running": sched.num_running,
        "num_waiting": sched.num_waiting,
        "num_loading": sched.num_loading,
        "num_free_blocks": sched.num_free_blocks,
        "num_cached_blocks": len(snap.scheduler.pool.cached),
        "kv_usage": sched.kv_usage,
        "num_preemptions": sched.num_preemptions,
        "num_evictions": snap.scheduler.pool.num_evictions,
        "prefix_cache_queries": sched.prefix_cache_queries,
        "prefix_cache_hits": sched.prefix_cache_hits,
        "prompt_tokens": snap.stats.num_prompt_tokens,
        "generation_tokens": snap.stats.num_generation_tokens,
    }


def _hex(h: Optional[bytes]) -> Optional[str]:
    return None if h is None else h[: HASH_HEX_CHARS // 2].hex()


def _cache_json(snap: EngineSnapshot) -> dict[str, Any]:
    pool = snap.scheduler.pool
    return {
        "version": pool.cache_version,
        "fields": ["block_id", "hash", "parent", "hits"],
        "blocks": [[c.block_id, _hex(c.block_hash), _hex(c.parent), c.hits] for c in pool.cached],
    }


def _request_json(r: Any, snap: EngineSnapshot) -> dict[str, Any]:
    detail = snap.details.get(r.request_id)
    out: dict[str, Any] = {
        "id": r.request_id,
        "status": r.status,
        "num_computed_tokens": r.num_computed_tokens,
        "num_tokens": r.num_tokens,
        "num_prompt_tokens": r.num_prompt_tokens,
        "num_output_tokens": r.num_output_tokens,
        "max_tokens": r.max_tokens,
        "num_cached_tokens": r.num_cached_tokens,
        "num_preemptions": r.num_preemptions,
        "block_ids": r.block_ids,
        "arrival_time": r.arrival_time,
        "first_scheduled_time": detail.first_scheduled_time if detail else None,
        "first_token_time": detail.first_token_time if detail else None,
    }
    if snap.show_text and detail is not None:
        out["prompt"] = detail.prompt
        out["output"] = detail.output
    return out


def _kv_transfer_json(snap: EngineSnapshot) -> Optional[dict[str, Any]]:
    kv = snap.stats.kv_transfer
    if kv is None:
        return None
    return {
        "num_leases": kv.num_leases,
        "num_leases_expired": kv.num_leases_expired,
        "num_leases_released": kv.num_leases_released,
        "num_loading": snap.stats.scheduler.num_loading,
        "num_blocks_pulled": kv.num_blocks_pulled,
        "num_pulls_done": kv.num_pulls_done,
        "bytes_pulled": kv.bytes_pulled,
        "pull_seconds": kv.pull_seconds,
    }


def step_json(step: StepRecord) -> dict[str, Any]:
    t = step.tokens
    return {
        "seq": step.seq,
        "time": step.end_time,
        "duration_s": step.duration_s,
        "decode": t.decode,
        "prefill": t.prefill,
        "recompute": t.recompute,
        "spec": t.spec,
        "budget": t.budget,
        "preemptions": t.preemptions,
        "running": t.running,
        "waiting": t.waiting,
        "loading": t.loading,
    }

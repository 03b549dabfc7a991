"""The engine's side of the inspector (``GET /inspect``): a ring of recent steps and, while
someone watches, a state snapshot made at most ``PUBLISH_INTERVAL_S`` apart.

Both are made on the engine thread by the engine itself and read from the HTTP side without
calling into it, so a viewer, fast or slow, costs the engine at most one snapshot per
interval (nothing when nobody watches), and a step costs one small record in the ring.
Invariant: step records carry consecutive sequence numbers; a reader that finds a gap knows
that many steps fell out of the ring before it read them.

``snapshot_json`` is the one place the JSON schema of ``GET /inspect/state`` is written, and
``DeltaEncoder`` / ``apply_delta`` the one place its deltas are (what a viewer's stream sends
between keyframes: only what changed since the snapshot before). Both are documented in
docs/inspector.md.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter, ne, not_
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pagoda.core.snapshot import (
    BLOCK_STATES,
    CachedBlock,
    RequestSnapshot,
    SchedulerSnapshot,
    StepTokens,
)
from pagoda.core.stats import SchedulerStats
from pagoda.engine.stats import EngineStats

SCHEMA = "pagoda.inspect/1"
STEP_LOG_CAPACITY = 2048  # steps kept for viewers (a few seconds to minutes of serving)
PUBLISH_INTERVAL_S = 0.25  # at most 4 snapshots a second, however many viewers
# ... and fewer when they are dear: making a snapshot (engine thread) and its delta (the
# server's event loop, which holds the same GIL the engine needs between its kernels) take
# at most this share of the time, but one comes at least
# every PUBLISH_MAX_INTERVAL_S.
PUBLISH_BUDGET = 0.005
PUBLISH_MAX_INTERVAL_S = 1.0
HASH_HEX_CHARS = 16  # a block hash is shown by its first 8 bytes
# In a delta, two changed blocks at most this many unchanged ones apart go in one run
# (resending a few blocks is cheaper than the run's own start and brackets).
POOL_RUN_GAP = 4
CACHE_FIELDS = ["block_id", "hash", "parent", "hits"]  # a row of ``cache.blocks``


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


@dataclass(frozen=True, slots=True)
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
    publishes while it is above 0. ``show_text`` puts prompt and output text in snapshots.
    ``interval`` is the time between two publications: ``PUBLISH_INTERVAL_S``, or longer
    while a snapshot and its frame cost more than ``PUBLISH_BUDGET`` of it (a large, busy
    pool)."""

    def __init__(self, capacity: int = STEP_LOG_CAPACITY) -> None:
        self.steps = StepLog(capacity)
        self.viewers = 0
        self.show_text = False
        self.latest: Optional[EngineSnapshot] = None
        self.interval = PUBLISH_INTERVAL_S
        self._version = 0
        self._last_publish = 0.0
        self._cost_s: Optional[float] = None  # what a snapshot takes, smoothed
        # What the server takes to turn one into a frame (a delta), smoothed; set by its feed.
        self.frame_cost_s = 0.0

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
        if self.viewers > 0 and (idle or end - self._last_publish >= self.interval):
            self.publish(make, end)

    def maybe_publish(self, make: Callable[[int], EngineSnapshot]) -> None:
        """From an idle engine loop (leases expire, pulls end with no step running)."""
        now = time.monotonic()
        if self.viewers > 0 and now - self._last_publish >= self.interval:
            self.publish(make, now)

    def publish(self, make: Callable[[int], EngineSnapshot], now: float) -> EngineSnapshot:
        self._version += 1
        start = time.perf_counter()
        latest = self.latest = make(self._version)
        self._last_publish = now
        self._pace(time.perf_counter() - start)
        return latest

    def _pace(self, cost_s: float) -> None:
        """The interval that keeps snapshots within their budget of the engine thread,
        from their cost smoothed over the last few (one slowed by a garbage collection
        does not stall the page for long)."""
        prev = self._cost_s
        self._cost_s = cost = cost_s if prev is None else 0.7 * prev + 0.3 * cost_s
        cost += self.frame_cost_s
        self.interval = min(PUBLISH_MAX_INTERVAL_S, max(PUBLISH_INTERVAL_S, cost / PUBLISH_BUDGET))


# --------------------------------------------------------------------- JSON
def snapshot_json(
    snap: EngineSnapshot, steps: list[StepRecord], with_cache: bool = True
) -> dict[str, Any]:
    """The JSON of ``GET /inspect/state``, and of each keyframe (``update`` event) of
    ``GET /inspect/events`` (where ``steps`` holds only the steps new to that stream)."""
    sched = snap.scheduler
    pool = sched.pool
    return {
        "schema": SCHEMA,
        "version": snap.version,
        "time": snap.time,
        "engine": _engine_json(snap),
        "counters": _counters(snap),
        "pool": {
            "states": pool.states,
            "ref_counts": pool.ref_counts,
            "legend": BLOCK_STATES,
        },
        "cache": _cache_json(snap) if with_cache else None,
        "requests": [_request_json(r, snap) for r in sched.requests],
        "leases": _leases_json(sched),
        "kv_transfer": _kv_transfer_json(snap),
        "steps": [step_json(s) for s in steps],
    }


def _engine_json(snap: EngineSnapshot) -> dict[str, Any]:
    sched = snap.scheduler
    return {
        "model": snap.model,
        "kv_role": snap.kv_role,
        "num_blocks": sched.pool.num_blocks,
        "block_size": sched.block_size,
        "token_budget": sched.token_budget,
        "max_num_seqs": sched.max_num_seqs,
        "max_model_len": snap.max_model_len,
        "prefix_caching": sched.prefix_caching,
        "show_text": snap.show_text,
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
        "sliding_pool": _sliding_pool_json(sched),
        "prefix_cache_queries": sched.prefix_cache_queries,
        "prefix_cache_hits": sched.prefix_cache_hits,
        "prompt_tokens": snap.stats.num_prompt_tokens,
        "generation_tokens": snap.stats.num_generation_tokens,
    }


def _sliding_pool_json(sched: SchedulerStats) -> Optional[dict[str, int]]:
    """The sliding-window layers' own pool (core/sliding_kv.py); None when there is none."""
    if not sched.num_sliding_blocks:
        return None
    return {
        "num_blocks": sched.num_sliding_blocks,
        "num_free_blocks": sched.num_free_sliding_blocks,
        "num_freed": sched.num_sliding_blocks_freed,
    }


def _hex(h: Optional[bytes]) -> Optional[str]:
    return None if h is None else h[: HASH_HEX_CHARS // 2].hex()


def _cache_json(snap: EngineSnapshot) -> dict[str, Any]:
    pool = snap.scheduler.pool
    return _cache_full(pool.cached, pool.cache_version)


def _cache_full(cached: Sequence[CachedBlock], version: int) -> dict[str, Any]:
    return {"version": version, "fields": CACHE_FIELDS, "blocks": [_cache_row(c) for c in cached]}


def _cache_row(c: CachedBlock) -> tuple[int, Optional[str], Optional[str], int]:
    """A row of ``cache.blocks`` (a JSON array; a tuple here, which the garbage collector
    stops tracking at its first pass: a keyframe makes thousands)."""
    block_id, block_hash, parent, hits = c
    return block_id, _hex(block_hash), _hex(parent), hits


# A request row's fields, in order; "prompt" and "output" only with --inspector-show-text.
REQUEST_FIELDS = (
    "id",
    "status",
    "num_computed_tokens",
    "num_tokens",
    "num_prompt_tokens",
    "num_output_tokens",
    "max_tokens",
    "num_cached_tokens",
    "num_preemptions",
    "block_ids",
    "arrival_time",
    "first_scheduled_time",
    "first_token_time",
    "prompt",
    "output",
)
_BLOCK_IDS = REQUEST_FIELDS.index("block_ids")


def _request_json(r: RequestSnapshot, snap: EngineSnapshot) -> dict[str, Any]:
    return _row_json(_request_values(r, snap))


def _request_values(r: RequestSnapshot, snap: EngineSnapshot) -> tuple[Any, ...]:
    """A request row's values, in the order of ``REQUEST_FIELDS``."""
    detail = snap.details.get(r.request_id)
    values: tuple[Any, ...] = (
        r.request_id,
        r.status,
        r.num_computed_tokens,
        r.num_tokens,
        r.num_prompt_tokens,
        r.num_output_tokens,
        r.max_tokens,
        r.num_cached_tokens,
        r.num_preemptions,
        r.block_ids,
        r.arrival_time,
        detail.first_scheduled_time if detail else None,
        detail.first_token_time if detail else None,
    )
    if snap.show_text and detail is not None:
        values += (detail.prompt, detail.output)
    return values


def _row_json(values: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(REQUEST_FIELDS[: len(values)], values, strict=True))


def _leases_json(sched: SchedulerSnapshot) -> list[dict[str, Any]]:
    return [{"id": le.lease_id, "block_ids": le.block_ids} for le in sched.leases]


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


# ------------------------------------------------------------------- deltas
_BLOCK_ID, _HASH = itemgetter(0), itemgetter(1)  # of a CachedBlock
# The parts of a document a delta carries whole when they changed (each is small).
_WHOLE_PARTS = ("engine", "counters", "leases", "kv_transfer")


class DeltaEncoder:
    """What changed from one snapshot to the next, as the JSON of a ``delta`` event.

    A delta names the version it applies to (``base``) and carries only what changed:
    the blocks whose state or ref count changed (as runs), the prefix cache's names removed,
    re-counted and added, the request rows that changed (only their changed fields, a grown
    block table as its new tail), and the small parts whole when they changed. ``apply_delta``
    is its inverse: a keyframe (``snapshot_json``) of the first snapshot with the deltas of
    the next ones applied is the keyframe of the last, exactly. The encoder keeps what it
    needs of the last snapshot, so a delta costs little more than what changed (its passes
    over the whole pool and cache are C loops: numpy, map, compress).
    """

    def __init__(self, snap: EngineSnapshot) -> None:
        self.snap = snap
        self._states, self._refs = _pool_arrays(snap)
        self._rows = {r.request_id: _request_values(r, snap) for r in snap.scheduler.requests}

    def delta(self, new: EngineSnapshot) -> dict[str, Any]:
        """The delta from the last snapshot given to ``new``, which becomes the last."""
        old = self.snap
        out: dict[str, Any] = {"version": new.version, "base": old.version, "time": new.time}
        for part in _WHOLE_PARTS:
            now = _whole_part(part, new)
            if now != _whole_part(part, old):
                out[part] = now
        runs = self._pool_runs(new)
        if runs:
            out["pool"] = runs
        old_pool, new_pool = old.scheduler.pool, new.scheduler.pool
        if new_pool.cache_version != old_pool.cache_version or new_pool.cached != old_pool.cached:
            out["cache"] = _cache_delta(old_pool.cached, new_pool.cached, new_pool.cache_version)
        requests = self._requests(new)
        if requests:
            out["requests"] = requests
        self.snap = new
        return out

    def _pool_runs(self, new: EngineSnapshot) -> list[list[Any]]:
        """Runs of blocks where some state or ref count changed: ``[first block, states,
        ref counts]``, joined across gaps of up to ``POOL_RUN_GAP`` unchanged blocks."""
        pool, old = new.scheduler.pool, self.snap.scheduler.pool
        if pool.states == old.states and pool.ref_counts == old.ref_counts:
            return []
        states, refs = _pool_arrays(new)
        changed = np.flatnonzero((states != self._states) | (refs != self._refs))
        self._states, self._refs = states, refs
        if not changed.size:
            return []
        breaks = np.flatnonzero(np.diff(changed) > POOL_RUN_GAP + 1)
        starts = changed[np.concatenate(([0], breaks + 1))].tolist()
        ends = (changed[np.concatenate((breaks, [changed.size - 1]))] + 1).tolist()
        spans = zip(starts, ends, strict=True)
        return [[a, pool.states[a:b], pool.ref_counts[a:b]] for a, b in spans]

    def _requests(self, new: EngineSnapshot) -> Optional[dict[str, Any]]:
        """Rows removed (ids), rows new (whole) or changed (their id and changed fields), and
        the order of ids only when it is not the old order without the removed, followed by
        the new ones."""
        rows: dict[str, tuple[Any, ...]] = {}
        old_ids = list(self._rows)
        changed: list[dict[str, Any]] = []
        for r in new.scheduler.requests:
            values = rows[r.request_id] = _request_values(r, new)
            before = self._rows.get(r.request_id)
            if before is None:
                changed.append(_row_json(values))
            elif values != before:
                changed.append(_row_change(before, values))
        self._rows, old = rows, set(old_ids)
        removed = [rid for rid in old_ids if rid not in rows]
        order = list(rows)
        implied = [rid for rid in old_ids if rid in rows]
        implied += [row["id"] for row in changed if row["id"] not in old]
        out: dict[str, Any] = {}
        if removed:
            out["removed"] = removed
        if changed:
            out["rows"] = changed
        if order != implied:
            out["order"] = order
        return out or None


def _pool_arrays(snap: EngineSnapshot) -> tuple[np.ndarray, np.ndarray]:
    pool = snap.scheduler.pool
    states = np.frombuffer(pool.states.encode("ascii"), np.uint8)
    return states, np.fromiter(pool.ref_counts, np.int64, len(pool.ref_counts))


def _whole_part(part: str, snap: EngineSnapshot) -> Any:
    if part == "engine":
        return _engine_json(snap)
    if part == "counters":
        return _counters(snap)
    if part == "leases":
        return _leases_json(snap.scheduler)
    return _kv_transfer_json(snap)


def _row_change(old: tuple[Any, ...], new: tuple[Any, ...]) -> dict[str, Any]:
    """A request row's changed fields, with its id; a block table that only grew is sent as
    the blocks it gained (``+block_ids``)."""
    change = {"id": new[0]}
    for i in compress(range(len(new)), map(ne, old, new)):
        change[REQUEST_FIELDS[i]] = new[i]
    before, after = old[_BLOCK_IDS], new[_BLOCK_IDS]
    if "block_ids" in change and len(after) > len(before) and after[: len(before)] == before:
        del change["block_ids"]
        change["+block_ids"] = after[len(before) :]
    return change


def _cache_delta(
    old: Sequence[CachedBlock], new: Sequence[CachedBlock], version: int
) -> dict[str, Any]:
    """The prefix cache's change: ``removed`` (block ids, as the old list named them),
    ``updated`` ([index among the blocks kept, new row]) and ``added`` (rows, appended).

    The pool lists its named blocks in the order they were named (a dict's order), so the
    blocks kept are a prefix of the new list and the ones named since are its tail. Should
    that not hold, the whole part is sent instead (``blocks``, as in a keyframe). Every pass
    over the (large) lists is a C loop (map, compress): a delta costs little more than what
    changed."""
    old_hashes, new_hashes = list(map(_HASH, old)), list(map(_HASH, new))
    removed: list[int] = []
    if new_hashes[: len(old_hashes)] != old_hashes:  # some names left
        names = set(new_hashes)
        keep = list(map(names.__contains__, old_hashes))
        removed = list(map(_BLOCK_ID, compress(old, map(not_, keep))))
        old = list(compress(old, keep))
        if new_hashes[: len(old)] != list(compress(old_hashes, keep)):
            return _cache_full(new, version)
    k = len(old)
    updated = [[i, _cache_row(new[i])] for i in compress(range(k), map(ne, old, new))]
    return {
        "version": version,
        "removed": removed,
        "updated": updated,
        "added": [_cache_row(c) for c in new[k:]],
    }


def apply_delta(doc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """The document a delta leads to from ``doc``, the document of version ``delta["base"]``
    (both as JSON values). The page does the same in JavaScript (inspect.html, ``applyDelta``);
    this one is the reference the tests hold both to."""
    if doc["version"] != delta["base"]:
        raise ValueError(f"a delta from version {delta['base']} applied to {doc['version']}")
    out = {**doc, "version": delta["version"], "time": delta.get("time", doc["time"])}
    for part in _WHOLE_PARTS:
        if part in delta:
            out[part] = delta[part]
    if "pool" in delta:
        out["pool"] = _apply_pool(doc["pool"], delta["pool"])
    if "cache" in delta:
        out["cache"] = _apply_cache(doc["cache"], delta["cache"])
    if "requests" in delta:
        out["requests"] = _apply_requests(doc["requests"], delta["requests"])
    out["steps"] = delta.get("steps", [])
    return out


def _apply_pool(pool: dict[str, Any], runs: list[list[Any]]) -> dict[str, Any]:
    states, refs = list(pool["states"]), list(pool["ref_counts"])
    for start, run_states, run_refs in runs:
        states[start : start + len(run_states)] = run_states
        refs[start : start + len(run_refs)] = run_refs
    return {**pool, "states": "".join(states), "ref_counts": refs}


def _apply_cache(cache: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    if "blocks" in change:
        return change
    removed = set(change["removed"])
    blocks = [row for row in cache["blocks"] if row[0] not in removed]
    for i, row in change["updated"]:
        blocks[i] = row
    return {**cache, "version": change["version"], "blocks": blocks + change["added"]}


def _apply_requests(rows: list[dict[str, Any]], change: dict[str, Any]) -> list[dict[str, Any]]:
    by_id = {row["id"]: row for row in rows}
    for rid in change.get("removed", []):
        del by_id[rid]
    order = list(by_id)
    for part in change.get("rows", []):
        old = by_id.get(part["id"])
        if old is None:
            by_id[part["id"]] = part
            order.append(part["id"])
            continue
        row = {**old, **part}
        if "+block_ids" in row:
            row["block_ids"] = list(old["block_ids"]) + row.pop("+block_ids")
        by_id[part["id"]] = row
    return [by_id[rid] for rid in change.get("order", order)]

"""EngineStats: one snapshot of an engine, made by its parts (the scheduler's ``make_stats``,
the KV connector's ``stats``, the KV event publisher's ``make_stats``), for metrics, admission
control and the debug endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pagoda.core.stats import SchedulerStats
from pagoda.engine.kv_event_publisher import PublisherStats
from pagoda.kv_transfer.base import KVTransferStats


@dataclass(frozen=True)
class EngineStats:
    scheduler: SchedulerStats
    num_prompt_tokens: int  # totals since start
    num_generation_tokens: int
    kv_transfer: Optional[KVTransferStats] = None  # None when colocated
    kv_events: Optional[PublisherStats] = None  # None when no KV events are published
    # Pooling requests (embeddings, scores) taken, and their prompt tokens (also counted in
    # num_prompt_tokens); 0 on a generation engine.
    num_pooling_requests: int = 0
    num_pooling_tokens: int = 0

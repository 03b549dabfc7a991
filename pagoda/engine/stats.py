"""EngineStats: one snapshot of an engine, made by its parts (the scheduler's ``make_stats``,
the KV connector's ``stats``), for metrics, admission control and the debug endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pagoda.core.stats import SchedulerStats
from pagoda.kv_transfer.base import KVTransferStats


@dataclass(frozen=True)
class EngineStats:
    scheduler: SchedulerStats
    num_prompt_tokens: int  # totals since start
    num_generation_tokens: int
    kv_transfer: Optional[KVTransferStats] = None  # None when colocated

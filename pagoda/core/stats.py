"""Snapshots of the scheduler's state, made by the scheduler itself: what metrics, the debug
endpoint and the admission control read, instead of reaching into its queues and pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pagoda.spec_decode.speculator import SpecStats


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_loading: int  # disaggregated decode: waiting for their prompt's KV
    num_waiting_tokens: int  # tokens the waiting requests still have to compute
    num_blocks: int
    num_free_blocks: int
    kv_usage: float  # fraction of blocks in use (0..1)
    num_preemptions: int  # counters from here down: totals since start
    prefix_cache_queries: int  # prompt tokens of admitted requests looked up in the cache
    prefix_cache_hits: int  # of those, tokens found there
    num_kv_load_failures: int = 0
    spec: Optional[SpecStats] = None  # speculative decoding's counters (a copy), when on
    # The sliding-window layers' own pool (core/sliding_kv.py), when apart; else 0s.
    num_sliding_blocks: int = 0
    num_free_sliding_blocks: int = 0
    num_sliding_blocks_freed: int = 0  # total given back as windows moved on

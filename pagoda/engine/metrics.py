"""Prometheus metrics of the serving engine: latency histograms, queue gauges, token counters.

Names follow the Prometheus conventions (base units, ``_seconds``, ``_total`` on counters) under
the ``pagoda:`` prefix, like vLLM's ``vllm:``. The engine thread updates them after every step;
``prometheus_client`` makes that safe against the HTTP thread reading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagoda.engine.kv_event_publisher import PublisherStats
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.stats import EngineStats
from pagoda.kv_transfer.base import KVTransferStats
from pagoda.spec_decode.speculator import SpecStats

PREFIX = "pagoda:"
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class _Progress:
    """Per request: each child's token count and the time of its last token (for ITL)."""

    counts: dict[int, int] = field(default_factory=dict)
    last_time: dict[int, float] = field(default_factory=dict)


class EngineMetrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._make_histograms()
        self._make_gauges()
        self._make_counters()
        self._last: dict[str, float] = {}
        self._progress: dict[str, _Progress] = {}

    def add_vllm_names(self, model_name: str) -> None:
        """Serve the metrics vLLM's dashboards and autoscalers read under vLLM's names too
        (``vllm:…{model_name=...}``, vllm_metrics.py)."""
        from prometheus_client.metrics import MetricWrapperBase

        from pagoda.engine.vllm_metrics import VllmNames

        own = [v for v in vars(self).values() if isinstance(v, MetricWrapperBase)]
        self.registry.register(VllmNames(own, model_name))

    # --------------------------------------------------------------- creation
    def _histogram(self, name: str, doc: str, buckets: tuple) -> Histogram:
        return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

    def _make_histograms(self) -> None:
        h = self._histogram
        self.ttft = h("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = h("inter_token_latency_seconds", "Time between two output tokens.", ITL_BUCKETS)
        self.tpot = h(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ITL_BUCKETS,
        )
        self.e2e = h("e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS)
        self.queue_time = h(
            "request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS
        )
        self.prompt_len = h(
            "request_prompt_tokens", "Prompt length of finished requests.", TOKEN_BUCKETS
        )
        self.gen_len = h(
            "request_generation_tokens", "Output tokens of finished requests.", TOKEN_BUCKETS
        )

    def _make_gauges(self) -> None:
        r = self.registry
        self.running = Gauge(PREFIX + "num_requests_running", "Requests running.", registry=r)
        self.waiting = Gauge(
            PREFIX + "num_requests_waiting",
            "Requests waiting to be scheduled (engine queue + admission).",
            registry=r,
        )
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).", registry=r
        )
        self.free_blocks = Gauge(PREFIX + "kv_cache_free_blocks", "Free KV blocks.", registry=r)
        self.total_blocks = Gauge(
            PREFIX + "kv_cache_total_blocks", "KV blocks in the pool.", registry=r
        )
        self.leases_active = Gauge(
            PREFIX + "kv_leases_active",
            "Prefill: finished requests whose KV waits to be pulled.",
            registry=r,
        )
        self.engine_alive = Gauge(PREFIX + "engine_alive", "1 while the engine lives.", registry=r)

    def _make_counters(self) -> None:
        r = self.registry
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens taken in.", registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", registry=r
        )
        self.pooling_requests = Counter(
            PREFIX + "pooling_requests",
            "Pooling requests (embeddings, scores) taken in.",
            registry=r,
        )
        self.pooling_tokens = Counter(
            PREFIX + "pooling_tokens",
            "Prompt tokens of pooling requests (also in prompt_tokens).",
            registry=r,
        )
        self.prefix_queries = Counter(
            PREFIX + "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            registry=r,
        )
        self.prefix_hits = Counter(
            PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r
        )
        self.preemptions = Counter(PREFIX + "num_preemptions", "Preemptions.", registry=r)
        self.finished = Counter(
            PREFIX + "request_success",
            "Finished requests by reason.",
            ["finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            PREFIX + "request_rejected",
            "Requests refused before the engine, by reason.",
            ["reason"],
            registry=r,
        )
        # Disaggregated prefill (stay 0 on a colocated instance).
        self.leases_expired = Counter(
            PREFIX + "kv_leases_expired",
            "Prefill: leases that expired before a decode instance pulled their KV.",
            registry=r,
        )
        self.leases_released = Counter(
            PREFIX + "kv_leases_released", "Prefill: leases a decode instance ended.", registry=r
        )
        self.kv_load_failures = Counter(
            PREFIX + "kv_load_failures", "Decode: remote KV pulls that failed.", registry=r
        )
        self.kv_blocks_pulled = Counter(
            PREFIX + "kv_blocks_pulled",
            "Decode: KV blocks pulled from prefill instances.",
            registry=r,
        )
        self.kv_pulls = Counter(
            PREFIX + "kv_pulls", "Decode: remote KV pulls completed.", registry=r
        )
        self.kv_pull_bytes = Counter(
            PREFIX + "kv_pull_bytes", "Decode: bytes of KV pulled by completed pulls.", registry=r
        )
        self.kv_pull_seconds = Counter(
            PREFIX + "kv_pull_seconds",
            "Decode: seconds from posting each pull to seeing it done.",
            registry=r,
        )
        self._make_spec_counters()
        self._make_kv_event_counters()
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        for reason in ("queue_full", "bad_request", "engine_dead"):
            self.rejected.labels(reason)

    def _make_kv_event_counters(self) -> None:
        """KV cache events (stay 0 when none are published)."""
        r = self.registry
        self.kv_event_batches = Counter(
            PREFIX + "kv_events_batches",
            "KV event batches published (numbered and kept for replay): the next one's number.",
            registry=r,
        )
        self.kv_event_drops = Counter(
            PREFIX + "kv_events_dropped",
            "KV event batches the send queue or socket had no room for (replay still has them).",
            registry=r,
        )
        self.kv_event_replays = Counter(
            PREFIX + "kv_events_replays", "KV event replay requests answered.", registry=r
        )
        self.kv_event_snapshots = Counter(
            PREFIX + "kv_events_snapshots",
            "KV event replays asked from before the buffer, answered with the whole cache.",
            registry=r,
        )

    def _make_spec_counters(self) -> None:
        """Speculative decoding, with vLLM's names (stay 0 with it off)."""
        r = self.registry
        self.spec_drafts = Counter(
            PREFIX + "spec_decode_num_drafts", "Drafts verified (a request's, a step).", registry=r
        )
        self.spec_draft_tokens = Counter(
            PREFIX + "spec_decode_num_draft_tokens", "Draft tokens verified.", registry=r
        )
        self.spec_accepted = Counter(
            PREFIX + "spec_decode_num_accepted_tokens", "Draft tokens accepted.", registry=r
        )
        self.spec_accepted_per_pos = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by their position in the draft (0 = first).",
            ["position"],
            registry=r,
        )
        self.spec_rate = Gauge(
            PREFIX + "spec_decode_acceptance_rate",
            "Accepted / draft tokens since start (what vLLM logs as the acceptance rate).",
            registry=r,
        )
        self.spec_length = Gauge(
            PREFIX + "spec_decode_mean_acceptance_length",
            "Tokens a verified row yields per step: 1 + accepted / drafts, since start.",
            registry=r,
        )

    # ----------------------------------------------------------------- update
    def on_step(self, stats: EngineStats, outputs: list[RequestOutput], now: float) -> None:
        """After a step, on the engine thread: counters, gauges, per-request latencies."""
        self.update(stats)
        for out in outputs:
            self._observe_tokens(out, now)
            if out.finished:
                self._observe_finished(out)

    def update(self, stats: EngineStats) -> None:
        """Counters and gauges from an engine's stats snapshot."""
        sched = stats.scheduler
        self._add_delta(self.prompt_tokens, "prompt", stats.num_prompt_tokens)
        self._add_delta(self.generation_tokens, "generation", stats.num_generation_tokens)
        self._add_delta(self.pooling_requests, "pooling_requests", stats.num_pooling_requests)
        self._add_delta(self.pooling_tokens, "pooling_tokens", stats.num_pooling_tokens)
        self._add_delta(self.prefix_queries, "queries", sched.prefix_cache_queries)
        self._add_delta(self.prefix_hits, "hits", sched.prefix_cache_hits)
        self._add_delta(self.preemptions, "preemptions", sched.num_preemptions)
        self._add_delta(self.kv_load_failures, "kv_failures", sched.num_kv_load_failures)
        if stats.kv_transfer is not None:
            self._update_kv_transfer(stats.kv_transfer)
        if sched.spec is not None:
            self._update_spec(sched.spec)
        if stats.kv_events is not None:
            self._update_kv_events(stats.kv_events)
        self.running.set(sched.num_running)
        self.kv_usage.set(sched.kv_usage)
        self.free_blocks.set(sched.num_free_blocks)
        self.total_blocks.set(sched.num_blocks)

    def _update_kv_transfer(self, kv: KVTransferStats) -> None:
        self._add_delta(self.leases_expired, "leases_expired", kv.num_leases_expired)
        self._add_delta(self.leases_released, "leases_released", kv.num_leases_released)
        self.leases_active.set(kv.num_leases)
        self._add_delta(self.kv_blocks_pulled, "kv_pulled", kv.num_blocks_pulled)
        self._add_delta(self.kv_pulls, "kv_pulls", kv.num_pulls_done)
        self._add_delta(self.kv_pull_bytes, "kv_pull_bytes", kv.bytes_pulled)
        self._add_delta(self.kv_pull_seconds, "kv_pull_seconds", kv.pull_seconds)

    def _update_kv_events(self, kv: PublisherStats) -> None:
        self._add_delta(self.kv_event_batches, "kv_event_batches", kv.num_published)
        self._add_delta(self.kv_event_drops, "kv_event_drops", kv.num_dropped)
        self._add_delta(self.kv_event_replays, "kv_event_replays", kv.num_replays)
        self._add_delta(self.kv_event_snapshots, "kv_event_snapshots", kv.num_snapshots)

    def _update_spec(self, spec: SpecStats) -> None:
        self._add_delta(self.spec_drafts, "spec_drafts", spec.num_drafts)
        self._add_delta(self.spec_draft_tokens, "spec_draft_tokens", spec.num_draft_tokens)
        self._add_delta(self.spec_accepted, "spec_accepted", spec.num_accepted_tokens)
        for pos, count in enumerate(spec.accepted_per_position):
            counter = self.spec_accepted_per_pos.labels(str(pos))
            self._add_delta(counter, f"spec_pos_{pos}", count)
        self.spec_rate.set(spec.acceptance_rate)
        self.spec_length.set(spec.mean_accepted_length)

    def _add_delta(self, counter: Counter, key: str, value: float) -> None:
        delta = value - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._last[key] = value

    def _observe_tokens(self, out: RequestOutput, now: float) -> None:
        progress = self._progress.setdefault(out.request_id, _Progress())
        for comp in out.outputs:
            new = len(comp.token_ids) - progress.counts.get(comp.index, 0)
            if new <= 0:
                continue
            last = progress.last_time.get(comp.index)
            if last is not None:
                gap = (now - last) / new
                for _ in range(new):
                    self.itl.observe(gap)
            progress.counts[comp.index] = len(comp.token_ids)
            progress.last_time[comp.index] = now

    def _observe_finished(self, out: RequestOutput) -> None:
        self._progress.pop(out.request_id, None)
        m = out.metrics
        for hist, value in (
            (self.ttft, m.time_to_first_token),
            (self.e2e, m.e2e_latency),
            (self.queue_time, m.queue_time),
            (self.tpot, out.time_per_output_token),
        ):
            if value is not None:
                hist.observe(value)
        self.prompt_len.observe(len(out.prompt_token_ids))
        if out.pooled is not None:  # a pooling request: its vector, no completion
            self.finished.labels("stop").inc()
        for comp in out.outputs:
            self.gen_len.observe(len(comp.token_ids))
            self.finished.labels(comp.finish_reason or "abort").inc()

    def on_abort(self, request_id: str, num_completions: int) -> None:
        self._progress.pop(request_id, None)
        self.finished.labels("abort").inc(num_completions)

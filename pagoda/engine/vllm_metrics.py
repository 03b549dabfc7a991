"""pagoda's serving metrics again under vLLM's names (``vllm:…``, with vLLM's ``model_name``
label), for what reads them: vLLM's Grafana dashboard, KEDA and HPA autoscalers, and the
Kubernetes Gateway API Inference Extension's model-server protocol (llm-d's endpoint picker
reads ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc``).

A collector on the same registry renames, at each scrape, the samples of the pagoda metrics
listed in :data:`VLLM_NAMES`: the values are the same objects' values, read once, so the two
names never disagree. Invariant: every ``vllm:`` sample is a ``pagoda:`` sample renamed, with
``model_name`` added; nothing is counted twice.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# pagoda's family name (after "pagoda:") -> vLLM's names for the same family.
VLLM_NAMES: dict[str, tuple[str, ...]] = {
    "num_requests_running": ("num_requests_running",),
    "num_requests_waiting": ("num_requests_waiting",),
    # vLLM 0.10 renamed gpu_cache_usage_perc; dashboards and pickers read either
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    "prompt_tokens": ("prompt_tokens",),
    "generation_tokens": ("generation_tokens",),
    "num_preemptions": ("num_preemptions",),
    "request_success": ("request_success",),
    "prefix_cache_queries": ("prefix_cache_queries",),
    "prefix_cache_hits": ("prefix_cache_hits",),
    "time_to_first_token_seconds": ("time_to_first_token_seconds",),
    "inter_token_latency_seconds": ("inter_token_latency_seconds",),
    "time_per_output_token_seconds": (
        "time_per_output_token_seconds",
        "request_time_per_output_token_seconds",
    ),
    "e2e_request_latency_seconds": ("e2e_request_latency_seconds",),
    "request_queue_time_seconds": ("request_queue_time_seconds",),
    "request_prompt_tokens": ("request_prompt_tokens",),
    "request_generation_tokens": ("request_generation_tokens",),
    "spec_decode_num_drafts": ("spec_decode_num_drafts",),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens",),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens",),
}
PAGODA, VLLM = "pagoda:", "vllm:"


class VllmNames(Collector):
    """The listed pagoda metrics under vLLM's names, labelled with the served model."""

    def __init__(self, metrics: Iterable[MetricWrapperBase], model_name: str) -> None:
        self._metrics = [m for m in metrics if _family(m) in VLLM_NAMES]
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                for alias in VLLM_NAMES[family.name.removeprefix(PAGODA)]:
                    yield self._renamed(family, VLLM + alias)

    def describe(self) -> list[Metric]:
        return []  # names are checked at collect time only (the registry allows it)

    def _renamed(self, family: Metric, name: str) -> Metric:
        out = Metric(name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            out.add_sample(
                name + sample.name[len(family.name) :],
                {"model_name": self.model_name, **sample.labels},
                sample.value,
                sample.timestamp,
                sample.exemplar,
            )
        return out


def _family(metric: MetricWrapperBase) -> str:
    return metric._name.removeprefix(PAGODA)  # prometheus_client's one name field

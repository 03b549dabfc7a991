"""/metrics parses with prometheus_client's parser, and its counters move as they should."""
from __future__ import annotations

import httpx
from server_utils import metric_values, wait_until_idle

HISTOGRAMS = ("pagoda:time_to_first_token_seconds", "pagoda:inter_token_latency_seconds",
              "pagoda:e2e_request_latency_seconds", "pagoda:request_queue_time_seconds",
              "pagoda:time_per_output_token_seconds")
GAUGES = ("pagoda:num_requests_running", "pagoda:num_requests_waiting",
          "pagoda:kv_cache_usage_perc")
COUNTERS = ("pagoda:prompt_tokens_total", "pagoda:generation_tokens_total",
            "pagoda:prefix_cache_queries_total", "pagoda:prefix_cache_hits_total",
            "pagoda:num_preemptions_total")


def test_metrics_page_has_the_conventional_families(server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(server.url + "/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f.type for f in text_string_to_metric_families(resp.text)}
    for name in HISTOGRAMS:
        assert families[name] == "histogram", name
    for name in GAUGES:
        assert families[name] == "gauge", name
    for name in COUNTERS:
        assert families[name.removesuffix("_total")] == "counter", name
    assert families["pagoda:request_success"] == "counter"


def test_counters_move_with_requests(server, model_name: str) -> None:
    wait_until_idle(server.url)
    before = metric_values(server.url)
    prompt = [11, 12, 13, 14, 15, 16, 17]
    for _ in range(2):
        resp = httpx.post(server.url + "/v1/completions", json={
            "model": model_name, "prompt": prompt, "max_tokens": 5, "ignore_eos": True})
        assert resp.status_code == 200
    stop = httpx.post(server.url + "/v1/completions", json={
        "model": model_name, "prompt": prompt, "max_tokens": 5, "stop_token_ids": list(
            range(384)), "ignore_eos": True})
    assert stop.json()["choices"][0]["finish_reason"] == "stop"
    after = wait_until_idle(server.url)

    def delta(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert delta("pagoda:prompt_tokens_total") == 3 * len(prompt)
    assert delta("pagoda:generation_tokens_total") == 5 + 5 + 1
    assert delta('pagoda:request_success_total{finished_reason="length"}') == 2
    assert delta('pagoda:request_success_total{finished_reason="stop"}') == 1
    assert delta("pagoda:time_to_first_token_seconds_count") == 3
    assert delta("pagoda:e2e_request_latency_seconds_count") == 3
    assert delta("pagoda:inter_token_latency_seconds_count") == 4 + 4
    assert delta("pagoda:request_generation_tokens_sum") == 11
    assert delta("pagoda:prefix_cache_queries_total") == 3 * len(prompt)   # every admission
    assert after["pagoda:kv_cache_usage_perc"] == 0.0      # all freed (cached blocks count free)


def test_prefix_cache_counters_move(server, model_name: str) -> None:
    prompt = list(range(200, 240))     # 40 tokens: two full blocks can be reused
    before = metric_values(server.url)
    for _ in range(2):
        httpx.post(server.url + "/v1/completions", json={
            "model": model_name, "prompt": prompt, "max_tokens": 1}).raise_for_status()
    after = wait_until_idle(server.url)
    def delta(key: str) -> float:
        return after[key] - before[key]

    assert delta("pagoda:prefix_cache_queries_total") == 2 * len(prompt)
    assert delta("pagoda:prefix_cache_hits_total") == 32     # the second one's two blocks


def test_rejected_requests_do_not_count_as_tokens(server, model_name: str) -> None:
    before = metric_values(server.url)
    resp = httpx.post(server.url + "/v1/completions", json={
        "model": model_name, "prompt": [1] * 5000, "max_tokens": 1})
    assert resp.status_code == 400
    after = metric_values(server.url)
    assert after["pagoda:prompt_tokens_total"] == before["pagoda:prompt_tokens_total"]


# What the Gateway API Inference Extension's model-server protocol and vLLM's dashboard read:
# vLLM's name, its labels besides model_name, and pagoda's name for the same samples.
VLLM_READS = [
    ("num_requests_waiting", {}, "num_requests_waiting"),
    ("num_requests_running", {}, "num_requests_running"),
    ("kv_cache_usage_perc", {}, "kv_cache_usage_perc"),
    ("gpu_cache_usage_perc", {}, "kv_cache_usage_perc"),
    ("prompt_tokens_total", {}, "prompt_tokens_total"),
    ("generation_tokens_total", {}, "generation_tokens_total"),
    ("time_to_first_token_seconds_count", {}, "time_to_first_token_seconds_count"),
    ("e2e_request_latency_seconds_sum", {}, "e2e_request_latency_seconds_sum"),
    ("request_time_per_output_token_seconds_count", {}, "time_per_output_token_seconds_count"),
    ("request_success_total", {"finished_reason": "length"}, "request_success_total"),
]


def _key(name: str, labels: dict) -> str:
    """A sample's key as metric_values writes it."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def test_vllm_names_carry_the_same_values(server, model_name: str) -> None:
    r = httpx.post(server.url + "/v1/completions", json={
        "model": model_name, "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200
    values = wait_until_idle(server.url)
    for theirs, labels, ours in VLLM_READS:
        got = values[_key("vllm:" + theirs, {**labels, "model_name": model_name})]
        assert got == values[_key("pagoda:" + ours, labels)], theirs
    assert values[_key("vllm:generation_tokens_total", {"model_name": model_name})] > 0

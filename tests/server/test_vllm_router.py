"""pagoda behind vllm-router, the vLLM project's Rust router (``pip install vllm-router``):
``kv_aware`` fed by pagoda's KV events sends requests that share a prefix to the instance
that holds it (the instances' prefix-cache hit counters show where), ``cache_aware`` and
``round_robin`` serve, and the router's calls to the workers are answered. (Its
prefill/decode mode over pagoda's NIXL instances: tests/disagg/test_vllm_router_pd.py.)"""
from __future__ import annotations

import json
import random
import time
from typing import Iterator

import httpx
import pytest
from server_utils import (
    ServerProcess, free_port, metric_values, start_server, start_vllm_router,
    wait_until_idle)

N_REQUESTS = 6


@pytest.fixture(scope="module")
def pair(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[list[ServerProcess], list[str]]]:
    """Two pagoda instances publishing KV events; (servers, their event endpoints)."""
    logs = tmp_path_factory.mktemp("router-logs")
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    servers = [start_server(tiny_model_dir, logs, "--num-kv-blocks", "256",
                            "--kv-events-endpoint", ep) for ep in endpoints]
    yield servers, endpoints
    for s in servers:
        s.stop()
        assert "Traceback" not in s.log(), s.log()[-4000:]


def _model(server: ServerProcess) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def _hits(server: ServerProcess) -> float:
    return wait_until_idle(server.url)["pagoda:prefix_cache_hits_total"]


def _shared_prefix_prompts(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    prefix = " ".join(rng.choice(words) for _ in range(120))
    return [f"{prefix} question {i}: {rng.choice(words)}?" for i in range(N_REQUESTS)]


def test_kv_aware_sends_a_shared_prefix_where_it_is_cached(pair, tmp_path):
    """Instance 0 holds prefix A and instance 1 prefix B (each asked directly once); then
    requests of both prefixes, interleaved, go through the router: each lands where its
    prefix is cached, as the instances' prefix-cache hits show."""
    servers, endpoints = pair
    model = _model(servers[0])
    prompts = [_shared_prefix_prompts(seed=10), _shared_prefix_prompts(seed=11)]
    sources = [f"--kv-event-source={s.url}={ep}" for s, ep in zip(servers, endpoints)]
    router = start_vllm_router(
        tmp_path, "--worker-urls", *[s.url for s in servers], "--policy", "kv_aware",
        *sources, "--kv-event-block-size", "16", "--kv-event-model", model)
    try:
        time.sleep(1.0)  # the router's subscribers connect (a late joiner misses events)
        for server, group in zip(servers, prompts):
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": group[0], "max_tokens": 1})
            assert r.status_code == 200, r.text
        time.sleep(0.5)  # the events reach the router
        before = [_hits(s) for s in servers]
        for i in range(1, N_REQUESTS):
            for group in prompts:
                r = httpx.post(router.url + "/v1/completions", timeout=60, json={
                    "model": model, "prompt": group[i], "max_tokens": 4, "temperature": 0})
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 4
        gained = [_hits(s) - b for s, b in zip(servers, before)]
        prefix_tokens = len(httpx.post(servers[0].url + "/tokenize", json={
            "prompt": prompts[0][0].rsplit(" question", 1)[0]}).json()["tokens"])
        # Every routed request found its whole prefix (all but a partial last block).
        floor = (N_REQUESTS - 1) * (prefix_tokens // 16 - 1) * 16
        assert min(gained) >= floor, (gained, floor)
        assert max(gained) < 2 * floor, gained  # nobody hit the other group's prefix
    finally:
        router.stop()
    assert "decode error" not in router.log().lower(), router.log()[-3000:]


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_other_policies_serve_streaming_and_not(pair, tmp_path, policy):
    servers, _ = pair
    model = _model(servers[0])
    router = start_vllm_router(tmp_path, "--worker-urls", *[s.url for s in servers],
                               "--policy", policy)
    try:
        before = [metric_values(s.url)["pagoda:request_success_total{finished_reason=\"length\"}"]
                  for s in servers]
        for i, prompt in enumerate(_shared_prefix_prompts(seed=2)[:4]):
            body = {"model": model, "max_tokens": 5, "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}]}
            whole = httpx.post(router.url + "/v1/chat/completions", json=body, timeout=60)
            assert whole.status_code == 200, whole.text
            text = whole.json()["choices"][0]["message"]["content"]
            with httpx.stream("POST", router.url + "/v1/chat/completions", timeout=60,
                              json={**body, "stream": True}) as r:
                assert r.status_code == 200
                chunks = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                               for c in chunks if c["choices"])
            assert streamed == text
        served = [metric_values(s.url)["pagoda:request_success_total{finished_reason=\"length\"}"]
                  - b for s, b in zip(servers, before)]
        assert sum(served) == 8
        if policy == "round_robin":
            assert min(served) > 0, served
    finally:
        router.stop()

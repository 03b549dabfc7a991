"""pagoda behind vllm-router, the vLLM project's Rust router (``pip install vllm-router``):
``kv_aware`` fed by pagoda's KV events sends requests that share a prefix to the instance
that holds it (the instances' prefix-cache hit counters show where, in an order round robin
would split), ``cache_aware`` and ``round_robin`` serve, and the router's calls to the
workers are answered. (Its prefill/decode mode over pagoda's NIXL instances:
tests/disagg/test_vllm_router_pd.py.)"""
from __future__ import annotations

import json
import random
import re
from typing import Iterator

import httpx
import pytest
from server_utils import (
    ServerProcess, free_port, metric_values, start_server, start_vllm_router,
    wait_until_idle)
from waiting import wait_for

N_REQUESTS = 6


@pytest.fixture(scope="module")
def pair(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[list[ServerProcess], list[str]]]:
    """Two pagoda instances publishing KV events; (servers, their (event, replay)
    endpoints)."""
    logs = tmp_path_factory.mktemp("router-logs")
    endpoints = [(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
                 for _ in range(2)]
    servers = [start_server(tiny_model_dir, logs, "--num-kv-blocks", "256",
                            "--kv-events-endpoint", ep, "--kv-events-replay-endpoint", rp)
               for ep, rp in endpoints]
    yield servers, endpoints
    for s in servers:
        s.stop()
        assert "Traceback (most recent call last)" not in s.log(), s.log()[-4000:]


def _model(server: ServerProcess) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def _hits(server: ServerProcess) -> float:
    return wait_until_idle(server.url)["pagoda:prefix_cache_hits_total"]


def _shared_prefix_prompts(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    prefix = " ".join(rng.choice(words) for _ in range(120))
    return [f"{prefix} question {i}: {rng.choice(words)}?" for i in range(N_REQUESTS)]


# vllm-router exposes no metric of the KV events it takes; its debug log names each batch.
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LIVE_SEQ = re.compile(r"kv_index live sequence advanced source=(\S+) rank=\d+ seq=(\d+)")
# Requests routed, by prefix: runs and alternations, so round robin (from either worker)
# sends some of each prefix to the worker that does not hold it.
ORDER = "AABABBABBA"


def _router_seqs(router: ServerProcess) -> dict[str, int]:
    """The last KV event batch vllm-router took from each worker, by the worker's URL."""
    return {m[1]: int(m[2]) for m in LIVE_SEQ.finditer(ANSI.sub("", router.log()))}


def _subscribed(router: ServerProcess, server: ServerProcess, model: str) -> None:
    """Send the worker probes (one block each, no shared prefix) until the router has a
    batch of its: from then on the router's subscription gets every batch."""
    probes = iter(range(10_000))

    def seen() -> bool:
        if server.url in _router_seqs(router):
            return True
        httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": f"probe {next(probes)} " + "zeta " * 20, "max_tokens": 1})
        return False

    wait_for(seen, 60, f"vllm-router to subscribe to {server.url}'s KV events")


def _events_taken(router: ServerProcess, servers: list[ServerProcess]) -> bool:
    """Whether the router has taken the last batch each worker published."""
    seqs = _router_seqs(router)
    return all(seqs.get(s.url) == wait_until_idle(s.url)["pagoda:kv_events_batches_total"] - 1
               for s in servers)


def test_kv_aware_sends_a_shared_prefix_where_it_is_cached(pair, tmp_path):
    """The second worker holds prefix A and the first prefix B (each asked directly once),
    the router has taken every batch of their KV events (its log says so); then requests of
    both prefixes, in an order round robin would split, go through the router: each lands
    where its prefix is cached, as the workers' prefix-cache hits show."""
    servers, endpoints = pair
    model = _model(servers[0])
    prompts = {"A": _shared_prefix_prompts(seed=10), "B": _shared_prefix_prompts(seed=11)}
    holder = {"B": servers[0], "A": servers[1]}
    sources = [f"--kv-event-source={s.url}={ep}" for s, (ep, _) in zip(servers, endpoints)]
    replays = [f"--kv-event-replay-source={s.url}={rp}" for s, (_, rp) in zip(servers, endpoints)]
    router = start_vllm_router(
        tmp_path, "--worker-urls", *[s.url for s in servers], "--policy", "kv_aware",
        *sources, *replays, "--kv-event-block-size", "16", "--kv-event-model", model,
        "--log-level", "debug")
    try:
        for server in servers:
            _subscribed(router, server, model)
        for group, server in holder.items():
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": prompts[group][0], "max_tokens": 1})
            assert r.status_code == 200, r.text
        wait_for(lambda: _events_taken(router, servers), 30,
                 "vllm-router to take every KV event batch the workers published")
        before = {s.url: _hits(s) for s in servers}
        sent = {"A": 0, "B": 0}
        for group in ORDER:
            sent[group] += 1
            r = httpx.post(router.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": prompts[group][sent[group]], "max_tokens": 4,
                "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
        gained = {s.url: _hits(s) - before[s.url] for s in servers}
        prefix_tokens = len(httpx.post(servers[0].url + "/tokenize", json={
            "prompt": prompts["A"][0].rsplit(" question", 1)[0]}).json()["tokens"])
        # Every routed request found its whole prefix (all but a partial last block) where
        # it was sent: 5 of each prefix, each on its holder, nobody on the other's.
        floor = ORDER.count("A") * (prefix_tokens // 16 - 1) * 16
        for group, server in holder.items():
            assert floor <= gained[server.url] < 2 * floor, (group, gained, floor)
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

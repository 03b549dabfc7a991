"""``pagoda router --policy cache_aware`` over two replicas: requests that share a prefix go
where it is cached, approximately (from the text the router has sent) and precisely (from
the replicas' KV events); a replica that dies is routed around, before any byte reached
the client."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from server_utils import (
    REPO, ServerProcess, free_port, metric_values, start_server, wait_until_idle)

N = 5


def start_router(log_dir: Path, *args: str) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"pagoda-router-{port}.log"
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "router", "--port", str(port),
           "--health-interval", "0.5", *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ))
    router = ServerProcess(proc, port, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(router.url + "/health", timeout=2).status_code == 200:
                return router
        except httpx.HTTPError:
            time.sleep(0.2)
    router.stop()
    raise RuntimeError(f"router did not come up:\n{router.log()}")


@pytest.fixture(scope="module")
def replicas(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[list[ServerProcess], list[str]]]:
    logs = tmp_path_factory.mktemp("cache-aware-logs")
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    replays = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    servers = [start_server(tiny_model_dir, logs, "--num-kv-blocks", "256",
                            "--kv-events-endpoint", ep, "--kv-events-replay-endpoint", rp)
               for ep, rp in zip(endpoints, replays)]
    yield servers, endpoints, replays
    for s in servers:
        s.stop()


def _groups(seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    out = []
    for _ in range(2):
        prefix = " ".join(rng.choice(words) for _ in range(150))
        out.append([f"{prefix} question {i}: {rng.choice(words)}?" for i in range(N)])
    return out


def _route_groups(router: ServerProcess, servers: list[ServerProcess], seed: int
                  ) -> list[float]:
    model = httpx.get(servers[0].url + "/v1/models").json()["data"][0]["id"]
    before = [wait_until_idle(s.url)["pagoda:prefix_cache_hits_total"] for s in servers]
    groups = _groups(seed)
    for i in range(N):
        # A B, B A, A B, ...: round robin would send each prefix to both replicas.
        for group in (groups if i % 2 == 0 else groups[::-1]):
            r = httpx.post(router.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": group[i], "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200, r.text
        time.sleep(0.2)  # (precise: the step's events reach the router)
    return [wait_until_idle(s.url)["pagoda:prefix_cache_hits_total"] - b
            for s, b in zip(servers, before)]


def _floor(servers, seed: int) -> int:
    prefix = _groups(seed)[0][0].rsplit(" question", 1)[0]
    tokens = httpx.post(servers[0].url + "/tokenize", json={"prompt": prefix}).json()["tokens"]
    return (N - 1) * (len(tokens) // 16 - 1) * 16


@pytest.mark.parametrize("mode", ["approximate", "precise", "precise_tokenizer"])
def test_each_prefix_goes_where_it_is_cached(replicas, tiny_model_dir, tmp_path, mode):
    servers, endpoints, replays = replicas
    args = ["--replicas", *[s.url for s in servers], "--policy", "cache_aware"]
    if mode.startswith("precise"):
        for s, ep, rp in zip(servers, endpoints, replays):
            args += ["--kv-events", f"{s.url}={ep}", "--kv-events-replay", f"{s.url}={rp}"]
    if mode == "precise_tokenizer":  # the router tokenizes: one /tokenize, to check it
        args += ["--tokenizer", tiny_model_dir]
    router = start_router(tmp_path, *args)
    try:
        seed = {"approximate": 3, "precise": 4, "precise_tokenizer": 5}[mode]
        gained = _route_groups(router, servers, seed)
        floor = _floor(servers, seed)
        # One prefix per replica: each found its prefix N - 1 times, never the other's.
        assert min(gained) >= floor and max(gained) < 2 * floor, (gained, floor)
        m = metric_values(router.url)
        assert m["pagoda_router_cache_matched_fraction_total"] > 2 * (N - 1) * 0.8
        # (The first requests may come before any event told the router the block size:
        # those are named by text and not tokenized.)
        where = 'pagoda_router_prompt_tokenizations_total{where="%s"}'
        if mode == "precise_tokenizer":  # checked once, then the router's own
            assert m[where % "instance"] == 1 and m[where % "router"] >= N, m
        elif mode == "precise":
            assert m[where % "instance"] >= N and where % "router" not in m, m
    finally:
        router.stop()
    assert "Traceback" not in router.log(), router.log()[-3000:]


def test_a_dead_replica_is_routed_around(tiny_model_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    servers = [start_server(tiny_model_dir, logs, "--num-kv-blocks", "128") for _ in range(2)]
    # Health checked at start only (the last --health-interval wins): the router learns of
    # the death from the request that fails, not from a check that might come first.
    router = start_router(tmp_path, "--replicas", *[s.url for s in servers],
                          "--policy", "round_robin", "--health-interval", "600")
    try:
        model = httpx.get(servers[0].url + "/v1/models").json()["data"][0]["id"]
        servers[1].stop()  # the router has not noticed yet: its next turn fails over
        for i in range(4):
            r = httpx.post(router.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": f"hello {i}", "max_tokens": 2})
            assert r.status_code == 200, r.text
        assert metric_values(router.url)["pagoda_router_failovers_total"] >= 1
    finally:
        router.stop()
        for s in servers:
            s.stop()

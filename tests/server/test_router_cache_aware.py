"""``pagoda router --policy cache_aware`` over two replicas: requests that share a prefix go
where it is cached, approximately (from the text the router has sent) and precisely (from
the replicas' KV events); the precise index forgets what a replica evicts and follows a
replica that restarts; a replica that dies is routed around, before any byte reached the
client."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from server_utils import (
    REPO, ServerProcess, free_port, metric_values, start_server, wait_until_idle)
from waiting import wait_for

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

    def up() -> bool:
        try:
            return httpx.get(router.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "the router to answer /health")
    except AssertionError:
        router.stop()
        raise AssertionError(f"router did not come up:\n{router.log()}") from None
    return router


def _event_batches(router: ServerProcess, server: ServerProcess) -> tuple[float, float]:
    """(KV event batches the replica has published, the one the router expects next from
    it): equal once the router has applied them all."""
    published = wait_until_idle(server.url)["pagoda:kv_events_batches_total"]
    expected = metric_values(router.url).get(
        f'pagoda_router_kv_events_next_seq{{instance="{server.url}"}}', -1.0)
    return published, expected


def wait_events_applied(router: ServerProcess, servers: list[ServerProcess]) -> None:
    def applied() -> bool:
        return all(p == e for p, e in (_event_batches(router, s) for s in servers))

    wait_for(applied, 30, "the router to apply every KV event batch the replicas published")


def indexed_blocks(router: ServerProcess, server: ServerProcess) -> float:
    return metric_values(router.url)[f'pagoda_router_indexed_blocks{{instance="{server.url}"}}']


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


def _route_groups(router: ServerProcess, servers: list[ServerProcess], seed: int,
                  precise: bool) -> list[float]:
    model = httpx.get(servers[0].url + "/v1/models").json()["data"][0]["id"]
    before = [wait_until_idle(s.url)["pagoda:prefix_cache_hits_total"] for s in servers]
    groups = _groups(seed)
    for i in range(N):
        # A B, B A, A B, ...: round robin would send each prefix to both replicas.
        for group in (groups if i % 2 == 0 else groups[::-1]):
            r = httpx.post(router.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": group[i], "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200, r.text
        if precise:  # the router knows of the round's blocks before the next round
            wait_events_applied(router, servers)
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
        gained = _route_groups(router, servers, seed, mode.startswith("precise"))
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
    assert "Traceback (most recent call last)" not in router.log(), router.log()[-3000:]


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


def _served(server: ServerProcess) -> float:
    return wait_until_idle(server.url)['pagoda:request_success_total{finished_reason="length"}']


def _complete(url: str, model: str, prompt: str) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def _events_args(servers, endpoints) -> list[str]:
    args = []
    for s, (ep, rp) in zip(servers, endpoints):
        args += ["--kv-events", f"{s.url}={ep}", "--kv-events-replay", f"{s.url}={rp}"]
    return args


def _endpoints(n: int) -> list[tuple[str, str]]:
    return [(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
            for _ in range(n)]


SMALL_POOL = 24  # blocks of 16 tokens: about three of the prefixes below


def test_the_precise_index_forgets_what_a_replica_evicts(tiny_model_dir, tmp_path):
    """Six prefixes sent straight to replica X, whose pool holds about three: X evicts the
    first ones, its BlockRemoved events reach the router, whose index for X never holds
    more blocks than X's pool. The first prefix, routed, goes to the other replica (nothing
    holds it; that one holds less), not to X on a stale hit, and X indeed had none of it;
    the last one goes to X."""
    logs = tmp_path / "logs"
    logs.mkdir()
    endpoints = _endpoints(2)
    servers = [start_server(tiny_model_dir, logs, "--num-kv-blocks", str(SMALL_POOL),
                            "--max-model-len", "256", "--kv-events-endpoint", ep,
                            "--kv-events-replay-endpoint", rp) for ep, rp in endpoints]
    x, y = servers
    router = start_router(tmp_path, "--replicas", *[s.url for s in servers],
                          "--policy", "cache_aware", "--tokenizer", tiny_model_dir,
                          *_events_args(servers, endpoints))
    try:
        model = httpx.get(x.url + "/v1/models").json()["data"][0]["id"]
        prefixes = [_groups(seed)[0][0].rsplit(" question", 1)[0][:150] for seed in range(6)]
        stored = sum(_complete(x.url, model, p)["usage"]["prompt_tokens"] // 16
                     for p in prefixes)
        assert stored > 2 * SMALL_POOL - 8  # X evicted every block of the first ones
        wait_events_applied(router, servers)
        assert 0 < indexed_blocks(router, x) <= SMALL_POOL, (indexed_blocks(router, x), stored)
        before = [_served(s) for s in servers]
        _complete(router.url, model, prefixes[0] + " and then?")  # evicted from X
        assert [_served(s) - b for s, b in zip(servers, before)] == [0, 1]
        _complete(router.url, model, prefixes[-1] + " and then?")  # still on X
        assert [_served(s) - b for s, b in zip(servers, before)] == [1, 1]
        hits = wait_until_idle(x.url)["pagoda:prefix_cache_hits_total"]
        _complete(x.url, model, prefixes[0] + " or else?")
        assert wait_until_idle(x.url)["pagoda:prefix_cache_hits_total"] == hits  # X had none
    finally:
        router.stop()
        for s in servers:
            s.stop()
    assert "Traceback (most recent call last)" not in router.log(), router.log()[-3000:]


def test_the_precise_index_follows_a_replica_that_restarts(tiny_model_dir, tmp_path):
    """Replica X caches a prefix over several batches; it is stopped (the router forgets
    its blocks) and started again on the same ports, numbering its batches from 0: the
    router applies the new process's batches (fewer than the old one's) and its index
    holds exactly the new cache, so a request of the new prefix is routed to X."""
    logs = tmp_path / "logs"
    logs.mkdir()
    endpoints = _endpoints(2)

    def start(ep: str, rp: str, port=None) -> ServerProcess:
        return start_server(tiny_model_dir, logs, "--num-kv-blocks", "256",
                            "--kv-events-endpoint", ep, "--kv-events-replay-endpoint", rp,
                            port=port)

    servers = [start(*e) for e in endpoints]
    router = start_router(tmp_path, "--replicas", *[s.url for s in servers],
                          "--policy", "cache_aware", "--tokenizer", tiny_model_dir,
                          *_events_args(servers, endpoints))
    old = [g[0] for g in _groups(seed=7)]
    new = [g[0] for g in _groups(seed=8)]
    try:
        x = servers[0]
        model = httpx.get(x.url + "/v1/models").json()["data"][0]["id"]
        for prompt in old:
            for suffix in range(3):  # a batch (or more) a request
                _complete(x.url, model, f"{prompt} {suffix}")
        wait_events_applied(router, servers)
        assert indexed_blocks(router, x) > 0
        x.stop()
        wait_for(lambda: indexed_blocks(router, x) == 0, 30, "the router to forget X's blocks")
        servers[0] = x = start(*endpoints[0], port=x.port)
        blocks = _complete(x.url, model, new[0])["usage"]["prompt_tokens"] // 16
        wait_events_applied(router, servers)
        up = f'pagoda_router_instance_up{{instance="{x.url}"}}'
        wait_for(lambda: metric_values(router.url)[up] == 1, 30, "the router to see X up")
        assert wait_until_idle(x.url)["pagoda:kv_events_batches_total"] < 6  # fewer than before
        assert indexed_blocks(router, x) == blocks
        before = [_served(s) for s in servers]
        _complete(router.url, model, new[0] + " and then?")
        assert [_served(s) - b for s, b in zip(servers, before)] == [1, 0]
    finally:
        router.stop()
        for s in servers:
            s.stop()
    assert "Traceback (most recent call last)" not in router.log(), router.log()[-3000:]

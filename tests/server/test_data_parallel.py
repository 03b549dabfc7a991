"""``pagoda serve --data-parallel-size N``: N replicas behind the cache-aware router as one
command. The router answers (completions, chat, streaming), a repeated prefix is routed to
where it is cached, each replica gets its own core and thread count, and stopping the
command stops the replicas."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_utils import REPO, ServerProcess, _wait_up, free_port, metric_values
from waiting import wait_for

from pagoda.entrypoints.data_parallel import child_argv, core_groups, offset_endpoint


def test_core_groups_argv_and_endpoints():
    assert core_groups([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert core_groups([0, 1, 2], 2) == [[0, 1], [2]]
    assert core_groups([0, 1], 3) == [[0], [1], [0]]
    argv = ["--model", "m", "--data-parallel-size", "2", "--port=9", "--host", "h",
            "--num-threads", "4", "--kv-events-endpoint", "tcp://x:5", "--dtype", "float32"]
    assert child_argv(argv) == ["--model", "m", "--dtype", "float32"]
    assert offset_endpoint("tcp://127.0.0.1:5557", 2) == "tcp://127.0.0.1:5559"
    assert offset_endpoint("tcp://127.0.0.1:5557", 0) == "tcp://127.0.0.1:5557"
    assert offset_endpoint(None, 1) is None


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_replicas_behind_the_router_as_one_command(tiny_model_dir: str, tmp_path: Path):
    port = free_port()
    log_path = tmp_path / "dp.log"
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--model", tiny_model_dir,
           "--dtype", "float32", "--port", str(port), "--data-parallel-size", "2",
           "--num-kv-blocks", "128", "--max-model-len", "1024"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ))
    server = _wait_up(ServerProcess(proc, port, log_path), "pagoda serve -dp 2")
    try:
        replicas = _children(proc.pid)
        assert len(replicas) == 2, replicas
        cores = [os.sched_getaffinity(pid) for pid in replicas]
        available = os.sched_getaffinity(0)
        if len(available) >= 2:
            assert cores[0] != cores[1] and all(c <= available for c in cores)
        model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        prefix = "the quick brown fox jumps over the lazy dog " * 30
        for i in range(4):
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": f"{prefix} {i}", "max_tokens": 3})
            assert r.status_code == 200, r.text
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
                "model": model, "stream": True, "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}]}) as s:
            assert s.status_code == 200 and any(
                line.startswith("data: ") for line in s.iter_lines())
        m = metric_values(server.url)
        assert m["pagoda_router_cache_matched_fraction_total"] > 2.0  # 3 of 4 found it
        # The router tokenizes with the replicas' tokenizer, once checked per kind of
        # request (a completion, the chat) against a replica's /tokenize. (The first
        # completion may come before any KV event told the router the block size.)
        where = 'pagoda_router_prompt_tokenizations_total{where="%s"}'
        assert m[where % "instance"] == 2 and m[where % "router"] >= 2, m
    finally:
        server.stop()
    wait_for(lambda: not _alive(replicas), 30, "the replicas to exit with the command")


def _alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has exited, its parent gone)."""
    def running(pid: int) -> bool:
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        except FileNotFoundError:
            return False
    return [pid for pid in pids if running(pid)]

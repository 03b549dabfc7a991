"""Helpers for the server tests: start ``pagoda serve`` processes, read /metrics."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
COMMON_ARGS = ("--dtype", "float32", "--num-threads", "1", "--block-size", "16",
               "--max-model-len", "1024")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(model_dir: str, log_dir: Path, *extra: str) -> ServerProcess:
    """Start ``pagoda serve`` on a free loopback port and wait until /health answers."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--model", model_dir,
           "--port", str(port), *COMMON_ARGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:    # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    return _wait_up(ServerProcess(proc, port, log_path), "pagoda serve")


def _wait_up(server: ServerProcess, name: str) -> ServerProcess:
    """Wait until ``server`` answers /health; stop it and raise (with its log) if it exits
    or takes longer than STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} did not come up in {STARTUP_TIMEOUT_S} s:\n{server.log()}")


def metric_values(url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed by name plus its labels: 'name{k="v"}'."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_until_idle(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits; return the last sample."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metric_values(url)
        if m["pagoda:num_requests_running"] == 0 and m["pagoda:num_requests_waiting"] == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def start_vllm_router(log_dir: Path, *args: str) -> ServerProcess:
    """Start the vLLM project's Rust router (``pip install vllm-router``, in the test extra)
    on a free port with ``args``, and wait until it answers /health."""
    import shutil

    exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    port = free_port()
    log_path = log_dir / f"vllm-router-{port}.log"
    cmd = [exe, "--host", "127.0.0.1", "--port", str(port),
           "--prometheus-port", str(free_port()), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return _wait_up(ServerProcess(proc, port, log_path), "vllm-router")

"""Helpers for the server tests: start ``pagoda serve`` processes, read /metrics."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import httpx

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
COMMON_ARGS = ("--dtype", "float32", "--num-threads", "1", "--block-size", "16",
               "--max-model-len", "1024")


_handed_out: set[int] = set()
BIND_RETRIES = 3  # a server that lost its port to another socket is started again


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (where bind(0) and the source port of
    every outgoing connection come from)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on now, for a server to bind. Drawn below the
    ephemeral range, so the kernel never gives it to another socket between this call and
    the server's bind (binding port 0 and closing it would hand out exactly the ports the
    kernel picks next), and never handed out twice in one test session."""
    rng = random.SystemRandom()
    high = _ephemeral_low() - 1
    for _ in range(1000):
        port = rng.randint(high - 12000, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


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


def start_server(model_dir: str, log_dir: Path, *extra: str,
                 port: Optional[int] = None) -> ServerProcess:
    """Start ``pagoda serve`` on a free loopback port (or ``port``: a restart on the port it
    had) and wait until /health answers."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(port: int) -> ServerProcess:
        log_path = log_dir / f"server-{port}.log"
        cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--model", model_dir,
               "--port", str(port), *COMMON_ARGS, *extra]
        with open(log_path, "w") as log:    # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
        return ServerProcess(proc, port, log_path)

    if port is not None:
        return _wait_up(launch(port), "pagoda serve")
    return start_on_free_port(launch, "pagoda serve")


def start_on_free_port(launch: Callable[[int], ServerProcess], name: str) -> ServerProcess:
    """``launch(port)`` on a free port, waited on until /health answers; started again on
    another port, at most BIND_RETRIES times, if another socket took the port first."""
    for attempt in range(BIND_RETRIES):
        try:
            return _wait_up(launch(free_port()), name)
        except PortTaken:
            if attempt == BIND_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """The server exited because its port was bound by someone else first."""


def _wait_up(server: ServerProcess, name: str) -> ServerProcess:
    """Wait until ``server`` answers /health; stop it and raise (with its log) if it exits
    (PortTaken if it lost its port) or takes longer than STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            log = server.log()
            error = PortTaken if "address already in use" in log.lower() else RuntimeError
            raise error(f"{name} exited with {server.proc.returncode}:\n{log}")
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


def start_pagoda_router(log_dir: Path, *args: str) -> ServerProcess:
    """Start ``pagoda router`` with ``args`` on a free port and wait until /health answers
    (at least one instance behind it is up)."""

    def launch(port: int) -> ServerProcess:
        log_path = log_dir / f"pagoda-router-{port}.log"
        cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "router", "--port", str(port),
               *args]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        return ServerProcess(proc, port, log_path)

    return start_on_free_port(launch, "pagoda router")


def start_vllm_router(log_dir: Path, *args: str) -> ServerProcess:
    """Start the vLLM project's Rust router (``pip install vllm-router``, in the test extra)
    on a free port with ``args``, and wait until it answers /health."""
    import shutil

    exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")

    def launch(port: int) -> ServerProcess:
        log_path = log_dir / f"vllm-router-{port}.log"
        cmd = [exe, "--host", "127.0.0.1", "--port", str(port),
               "--prometheus-port", str(free_port()), *args]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return ServerProcess(proc, port, log_path)

    return start_on_free_port(launch, "vllm-router")

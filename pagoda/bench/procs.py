"""Child ``pagoda`` processes a benchmark starts (servers, routers), their start-up wait and
their Prometheus metrics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from pagoda.utils import stop_processes

STARTUP_TIMEOUT_S = 300.0


class Procs:
    """Child processes started for one setup; stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], core: Optional[str]) -> None:
        cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", *args]
        if core is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", core, *cmd]
        log = open(self.log_dir / f"{name}.log", "w")
        self.procs.append(
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        )

    def stop(self) -> None:
        stop_processes(self.procs)


def wait_healthy(url: str, procs: Procs) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs.procs):
            raise RuntimeError(f"a server exited at start-up; logs in {procs.log_dir}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up; logs in {procs.log_dir}")


def metric(url: str, name: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0

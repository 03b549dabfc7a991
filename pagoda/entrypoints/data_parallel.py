"""``pagoda serve --data-parallel-size N``: N replicas of the engine on one host and the
cache-aware router in front of them, as one command.

Each replica is a ``pagoda serve`` child process on a loopback port of its own, pinned to its
share of this process's cores (contiguous groups; with more replicas than cores, they share
round robin) and told to use that many threads. Each publishes its KV events on a port of
its own, and the router (this process, on ``--host``/``--port``) routes ``cache_aware`` on
them. A replica's ``--kv-events-endpoint`` given by the user is offset by its rank, as vLLM
offsets its data-parallel ranks' ports. Invariant: the replicas live exactly as long as this
process: they are stopped when it stops, and it stops if one of them cannot start.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

import httpx

from pagoda.utils import free_port, stop_processes

logger = logging.getLogger("pagoda.serve")

STARTUP_TIMEOUT_S = 600.0
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies
# Options this process takes for itself and gives each replica its own value of.
OWN_OPTIONS = {
    "--data-parallel-size": 1,
    "--host": 1,
    "--port": 1,
    "--num-threads": 1,
    "--kv-events-endpoint": 1,
    "--kv-events-replay-endpoint": 1,
}


def core_groups(cores: list[int], n: int) -> list[list[int]]:
    """``n`` groups of ``cores``: contiguous shares, or one core each, shared round robin
    when there are fewer cores than groups."""
    if n >= len(cores):
        return [[cores[i % len(cores)]] for i in range(n)]
    size, extra = divmod(len(cores), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        groups.append(cores[start:end])
        start = end
    return groups


def child_argv(argv: list[str]) -> list[str]:
    """``pagoda serve``'s arguments without the ones each replica gets its own value of."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in OWN_OPTIONS:
            skip = 0 if "=" in arg else OWN_OPTIONS[name]
            continue
        out.append(arg)
    return out


def offset_endpoint(endpoint: Optional[str], rank: int) -> Optional[str]:
    """vLLM's rule: a tcp endpoint's port plus the rank."""
    if endpoint is None or rank == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    base, _, port = endpoint.rpartition(":")
    return f"{base}:{int(port) + rank}"


class Replicas:
    def __init__(self, ns: argparse.Namespace, serve_argv: list[str]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self.events: list[tuple[str, str]] = []
        groups = core_groups(sorted(os.sched_getaffinity(0)), ns.data_parallel_size)
        base = child_argv(serve_argv)
        for rank, cores in enumerate(groups):
            port = free_port()
            pub = offset_endpoint(ns.kv_events_endpoint, rank) or f"tcp://127.0.0.1:{free_port()}"
            replay = offset_endpoint(ns.kv_events_replay_endpoint, rank) or (
                f"tcp://127.0.0.1:{free_port()}"
            )
            cmd = [
                sys.executable,
                "-m",
                "pagoda.entrypoints.cli",
                "serve",
                *base,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-threads",
                str(ns.num_threads or len(cores)),
                "--kv-events-endpoint",
                pub,
                "--kv-events-replay-endpoint",
                replay,
            ]
            self.procs.append(subprocess.Popen(cmd, preexec_fn=_pin(cores)))
            self.urls.append(f"http://127.0.0.1:{port}")
            self.events.append((pub, replay))

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = list(self.urls)
        while pending:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a replica exited while starting (its output is above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not come up: {pending}")
            pending = [u for u in pending if not _healthy(u)]
            time.sleep(0.5)

    def stop(self) -> None:
        stop_processes(self.procs)


def _pin(cores: list[int]) -> Callable[[], None]:
    """Run in the child before it starts: its share of the cores, and a SIGTERM from the
    kernel when this process dies, however it dies (uvicorn ends a SIGTERM-ed server by
    raising the signal again, which skips ``finally`` blocks)."""

    def pin() -> None:
        os.sched_setaffinity(0, cores)
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return pin


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _router_tokenizer(ns: argparse.Namespace) -> Optional[str]:
    """The replicas' model on disk, for the router to tokenize prompts itself (None: a
    model without a tokenizer, or one that cannot be found, so the router asks the
    replicas). Called once the replicas are up: a Hub id's files are in the cache then."""
    from pagoda.models.hub import resolve_model
    from pagoda.models.loader import default_model_path, has_tokenizer_files

    if getattr(ns, "load_format", "auto") == "dummy":
        return None
    model = getattr(ns, "model", None)
    if model is None:
        return default_model_path()
    try:
        path = resolve_model(model, getattr(ns, "gguf_file", None), weights=False).path
    except (OSError, ValueError) as e:
        logger.warning("the router asks the replicas to tokenize: %s", e)
        return None
    if path.endswith(".gguf") and os.path.isfile(path):
        return path
    return path if os.path.isdir(path) and has_tokenizer_files(path) else None


def run(ns: argparse.Namespace, serve_argv: list[str]) -> int:
    """Start the replicas, then serve the router in front of them until stopped."""
    import uvicorn

    from pagoda.entrypoints.router.app import build_app, build_router

    replicas = Replicas(ns, serve_argv)
    try:
        replicas.wait_ready()
        router_ns = argparse.Namespace(
            prefill=[],
            decode=[],
            replicas=replicas.urls,
            policy="cache_aware",
            kv_events=[
                f"{u}={pub}" for u, (pub, _) in zip(replicas.urls, replicas.events, strict=True)
            ],
            kv_events_replay=[
                f"{u}={rp}" for u, (_, rp) in zip(replicas.urls, replicas.events, strict=True)
            ],
            cache_load_weight=0.25,
            cache_index_size=200_000,
            health_interval=2.0,
            # The replicas check keys themselves: the router passes the client's on and
            # must never add one for a client that sent none.
            api_key=None,
            tokenizer=_router_tokenizer(ns),
            chat_template=getattr(ns, "chat_template", None),
        )
        router = build_router(router_ns)
        print(
            f"pagoda serve: {len(replicas.urls)} replicas behind the cache-aware router on "
            f"http://{ns.host}:{ns.port}",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(build_app(router), host=ns.host, port=ns.port, log_level="warning")
    finally:
        replicas.stop()
    return 0

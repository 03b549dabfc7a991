"""``pagoda bench disagg``: disaggregated prefill against a colocated server, same workload.

It starts, one after the other, (a) one colocated ``pagoda serve`` pinned to all the cores
given, and (b) a ``--kv-role prefill`` and a ``--kv-role decode`` instance pinned to one core
each behind ``pagoda router``; runs the same ``pagoda bench serve`` workload (default
``long-mix``) at the same arrival rate against each, and prints p50 / p99 time to first token
and inter-token latency side by side, with the KV transfer bandwidth and the per-request pull
time read from the decode instance's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import time
from pathlib import Path
from typing import Any, Optional

from pagoda.bench import serve
from pagoda.bench.procs import Procs, metric, wait_healthy
from pagoda.request import EngineRequest
from pagoda.utils import free_port


def add_args(parser: argparse.ArgumentParser) -> None:
    serve.add_args(parser)
    parser.set_defaults(dataset="long-mix", num_prompts=40, request_rate=0.5)
    g = parser.add_argument_group("instances")
    g.add_argument("--serve-model", default=None, help="model for the servers (default: bundled)")
    g.add_argument(
        "--cores",
        default="0,1",
        help="two cores: the colocated server gets both, prefill the first, decode the second",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=256,
        help="every server's per-step token budget (chunked prefill)",
    )
    g.add_argument("--log-dir", default=None, help="server logs (default: a temp folder)")
    g.add_argument(
        "--transfer-tokens",
        type=int,
        default=2000,
        help="prompt length of the raw KV transfer measurement",
    )
    g.add_argument("--transfer-repeats", type=int, default=5)


def _engine_args(ns: argparse.Namespace, threads: int) -> list[str]:
    args = [
        "--num-threads",
        str(threads),
        "--max-num-batched-tokens",
        str(ns.max_num_batched_tokens),
    ]
    return args + (["--model", ns.serve_model] if ns.serve_model else [])


def _run(ns: argparse.Namespace, url: str) -> dict[str, Any]:
    import httpx

    ns.base_url = url
    # One untimed request first: kernel choices, first allocations.
    httpx.post(
        url + "/v1/completions",
        timeout=120,
        json={
            "model": httpx.get(url + "/v1/models").json()["data"][0]["id"],
            "prompt": "warm up",
            "max_tokens": 4,
        },
    )
    results, duration, _ = asyncio.run(serve.run_benchmark(ns, serve.make_dataset(ns)))
    report = serve.compute_report(results, duration, serve.parse_goodput(ns.goodput))
    report["requests"] = [dataclasses.asdict(r) for r in results]  # (--plot, --json)
    return report


def run_colocated(ns: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    procs = Procs(log_dir)
    port = free_port()
    try:
        procs.start("colocated", ["serve", "--port", str(port), *_engine_args(ns, 2)], ns.cores)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, procs)
        return _run(ns, url)
    finally:
        procs.stop()


def run_disagg(ns: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    procs = Procs(log_dir)
    prefill_port, decode_port, router_port = free_port(), free_port(), free_port()
    secret = ["--kv-secret", secrets.token_hex(16)]
    first, second = ns.cores.split(",")[:2]
    try:
        procs.start(
            "prefill",
            [
                "serve",
                "--port",
                str(prefill_port),
                "--kv-role",
                "prefill",
                *secret,
                *_engine_args(ns, 1),
            ],
            first,
        )
        procs.start(
            "decode",
            [
                "serve",
                "--port",
                str(decode_port),
                "--kv-role",
                "decode",
                *secret,
                *_engine_args(ns, 1),
            ],
            second,
        )
        prefill, decode = (f"http://127.0.0.1:{p}" for p in (prefill_port, decode_port))
        wait_healthy(prefill, procs)
        wait_healthy(decode, procs)
        procs.start(
            "router",
            ["router", "--port", str(router_port), "--prefill", prefill, "--decode", decode],
            None,
        )
        url = f"http://127.0.0.1:{router_port}"
        wait_healthy(url, procs)
        report = _run(ns, url)
        pulls = metric(decode, "pagoda:kv_pulls_total")
        nbytes = metric(decode, "pagoda:kv_pull_bytes_total")
        seconds = metric(decode, "pagoda:kv_pull_seconds_total")
        report["kv_transfer"] = {
            "pulls": pulls,
            "bytes": nbytes,
            "seconds": seconds,
            "gb_per_s": nbytes / seconds / 1e9 if seconds else 0.0,
            "ms_per_request": 1e3 * seconds / pulls if pulls else 0.0,
            "load_failures": metric(decode, "pagoda:kv_load_failures_total"),
            "leases_expired": metric(prefill, "pagoda:kv_leases_expired_total"),
        }
        return report
    finally:
        procs.stop()


def measure_transfer(model: Optional[str], num_tokens: int, repeats: int) -> dict[str, Any]:
    """The raw pull: a prefill and a decode engine in this process (two NIXL agents over
    UCX on loopback); time from posting the READ of a prompt's blocks to seeing it done,
    polling in a tight loop (the servers notice completion only between steps)."""
    import random

    from pagoda.config import EngineArgs
    from pagoda.engine.build import build_engine
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.sampling import SamplingParams

    secret = secrets.token_hex(16)

    def engine(kv_role: str) -> LLMEngine:
        return build_engine(
            EngineArgs(model=model, kv_cache_memory=0.5, kv_secret=secret, kv_role=kv_role)
        )

    prefill = engine("prefill")
    decode = engine("decode")
    rng = random.Random(0)
    times: list[float] = []
    sizes: list[int] = []
    try:
        connector = decode.kv_connector
        assert connector is not None, "a decode instance has a KV connector"
        for i in range(repeats):
            prompt = [rng.randrange(100, prefill.arch.vocab_size - 100) for _ in range(num_tokens)]
            params = _finish(
                prefill,
                f"p{i}",
                prompt,
                SamplingParams(max_tokens=1),
                kv_transfer_params={"do_remote_decode": True},
            ).kv_transfer_params
            decode.add_request(
                EngineRequest(
                    f"d{i}", prompt, SamplingParams(max_tokens=1), kv_transfer_params=params
                )
            )
            sched = decode.scheduler.schedule()
            start = time.perf_counter()
            connector.start_loads(sched.kv_loads)
            while not (events := connector.poll()).any:
                pass
            times.append(time.perf_counter() - start)
            assert events.loaded, events.failed
            decode.model_runner.execute_model(sched)
            decode.scheduler.apply_kv_events(events)
            sizes.append(connector.stats().bytes_pulled - sum(sizes))
            while decode.has_unfinished_requests():
                decode.step()
            prefill.poll_kv_transfers()
    finally:
        prefill.close()
        decode.close()
    warm = times[1:] or times  # the first pull also connects the two agents
    mean_s = sum(warm) / len(warm)
    return {
        "prompt_tokens": num_tokens,
        "bytes": sizes[-1],
        "ms": [1e3 * t for t in times],
        "mean_ms_after_first": 1e3 * mean_s,
        "gb_per_s": sizes[-1] / mean_s / 1e9,
    }


def _finish(engine: Any, rid: str, prompt: list[int], params: Any, **kw: Any) -> Any:
    engine.add_request(EngineRequest(rid, prompt, params, **kw))
    while True:
        for out in engine.step():
            if out.finished:
                return out


def _row(label: str, a: float, b: float) -> str:
    ratio = f"{b / a:.2f}x" if a else "-"
    return f"{label:<26}{a:>12.1f}{b:>14.1f}{ratio:>10}"


def print_comparison(colo: dict[str, Any], disagg: dict[str, Any]) -> None:
    print(f"{'=' * 14} colocated (2 cores) vs disaggregated (1 + 1) {'=' * 14}")
    print(f"{'':<26}{'colocated':>12}{'disaggregated':>14}{'d / c':>10}")
    for key, label in (
        ("ttft_ms", "TTFT"),
        ("itl_ms", "ITL"),
        ("tpot_ms", "TPOT"),
        ("e2el_ms", "E2E latency"),
    ):
        for stat in ("p50", "p99"):
            print(_row(f"{label} {stat} (ms)", colo[key][stat], disagg[key][stat]))
    print(_row("output tok/s", colo["output_throughput"], disagg["output_throughput"]))
    print(_row("completed", colo["completed"], disagg["completed"]))
    kv = disagg["kv_transfer"]
    print(
        f"KV pulls: {kv['pulls']:.0f}, {kv['bytes'] / 1e6:.1f} MB in {kv['seconds']:.3f} s of "
        f"pull time: {kv['gb_per_s']:.2f} GB/s, {kv['ms_per_request']:.1f} ms per request "
        f"(posting the READ to seeing it done; includes up to one engine step); "
        f"{kv['load_failures']:.0f} failed pulls, {kv['leases_expired']:.0f} expired leases"
    )


def main(ns: argparse.Namespace) -> int:
    import tempfile

    if len(ns.cores.split(",")) < 2:
        raise ValueError("--cores needs two cores, e.g. 0,1")
    log_dir = Path(ns.log_dir or tempfile.mkdtemp(prefix="pagoda-bench-disagg-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    transfer = measure_transfer(ns.serve_model, ns.transfer_tokens, ns.transfer_repeats)
    print(
        f"raw KV pull of a {transfer['prompt_tokens']}-token prompt "
        f"({transfer['bytes'] / 1e6:.1f} MB): {transfer['mean_ms_after_first']:.1f} ms = "
        f"{transfer['gb_per_s']:.2f} GB/s (first pull, connecting: {transfer['ms'][0]:.1f} ms)",
        flush=True,
    )
    colo = run_colocated(ns, log_dir)
    disagg = run_disagg(ns, log_dir)
    print_comparison(colo, disagg)
    if ns.plot:
        from pagoda.bench.plot import plot_serving_runs

        runs = {
            "colocated (2 cores)": colo["requests"],
            "prefill + decode (1 + 1)": disagg["requests"],
        }
        title = f"bench disagg ({ns.dataset}, {ns.request_rate} req/s)"
        for path in plot_serving_runs(ns.plot, "disagg", runs, title):
            print(f"plot: {path}")
    if ns.json:
        args = {k: v for k, v in vars(ns).items() if k not in ("func", "api_key")}
        with open(ns.json, "w") as f:
            json.dump(
                {
                    "args": args,
                    "raw_transfer": transfer,
                    "colocated": colo,
                    "disaggregated": disagg,
                },
                f,
                indent=1,
                default=str,
            )
        print(f"json: {ns.json}")
    return 0 if colo["completed"] and disagg["completed"] else 1

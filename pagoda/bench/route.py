"""``pagoda bench route``: routing policies over replicas, on prefix-sharing workloads.

It starts ``--replicas`` instances of ``pagoda serve`` (each pinned to one core, one thread,
a KV pool of ``--num-kv-blocks`` so that one replica cannot hold every prefix), publishing
KV events, and for each policy a router in front of them, fresh replicas each time:
``round_robin``, ``least_outstanding``, ``cache_aware`` (approximate: from the text routed)
and ``cache_aware_precise`` (from the events; the router tokenizes, ``_tokenize``: it asks a
replica) through ``pagoda router``, and vllm-router's
``kv_aware`` on the same events when it is installed. Requests arrive as a Poisson process:
each picks one of ``--num-prefixes`` shared prefixes of ``--prefix-words`` words, adds a
question of ``--suffix-words`` and asks for ``--output-len`` tokens (``--sharing 0`` gives
every request its own prefix: what the policies cost when there is nothing to share). With
``--workload multiturn``, conversations start as a Poisson process and each sends
``--turns`` chat turns, the next once the last answer is in, every turn carrying the whole
history (notes of ``--prefix-words``, then the turns so far): each prompt extends the last.

Printed per policy: the replicas' prefix-cache hit rate (hit tokens / prompt tokens looked
up, from their /metrics), TTFT p50 / p99, output tokens/s, and the ratios to round robin.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from pagoda.bench import serve
from pagoda.bench.common import row, write_json
from pagoda.bench.procs import Procs, metric, wait_healthy
from pagoda.models.loader import default_model_path
from pagoda.utils import free_port

POLICIES = ("round_robin", "least_outstanding", "cache_aware", "cache_aware_precise", "kv_aware")
# Also runnable: the precise index fed by a replica's /tokenize instead of the router's own
# tokenizer (what --tokenizer saves).
EXTRA_POLICIES = ("cache_aware_precise_tokenize",)


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("routing benchmark")
    g.add_argument("--replicas", type=int, default=2)
    g.add_argument("--policies", default=",".join(POLICIES))
    g.add_argument("--num-prompts", type=int, default=96)
    g.add_argument("--request-rate", type=float, default=1.0, help="Poisson, requests/s")
    g.add_argument("--num-prefixes", type=int, default=8)
    g.add_argument("--prefix-words", type=int, default=760, help="about 1,000 tokens")
    g.add_argument("--suffix-words", type=int, default=48, help="about 64 tokens")
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument(
        "--workload",
        choices=["prefixes", "multiturn"],
        default="prefixes",
        help="multiturn: conversations whose every turn extends the last (chat; the next "
        "turn is sent when the answer is in)",
    )
    g.add_argument(
        "--cache-load-weight",
        type=float,
        default=None,
        help="pagoda router's --cache-load-weight for the cache_aware policies (its default)",
    )
    g.add_argument(
        "--plot", default=None, metavar="DIR", help="write TTFT / ITL CDFs per policy here"
    )
    g.add_argument("--num-conversations", type=int, default=24, help="multiturn")
    g.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation")
    g.add_argument(
        "--sharing",
        type=float,
        default=1.0,
        help="fraction of requests that take a shared prefix (0: none share)",
    )
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=320,
        help="each replica's KV pool (16-token blocks): with the defaults, about five "
        "of the eight prefixes",
    )
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--serve-model", default=None, help="default: the bundled model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-dir", default=None)
    g.add_argument("--json", default=None, metavar="PATH")


def make_dataset(ns: argparse.Namespace) -> list[serve.BenchRequest]:
    rng = random.Random(ns.seed)
    prefixes = [
        f"Document {i}. " + serve._words(rng, ns.prefix_words) for i in range(ns.num_prefixes)
    ]
    out = []
    for _ in range(ns.num_prompts):
        if rng.random() < ns.sharing:
            prefix = rng.choice(prefixes)
        else:
            prefix = "Document. " + serve._words(rng, ns.prefix_words)
        question = serve._words(rng, ns.suffix_words)
        out.append(
            serve.BenchRequest(
                f"{prefix}\nQuestion: {question}?",
                ns.prefix_words + ns.suffix_words,
                ns.output_len,
            )
        )
    return out


class Cluster(Procs):
    """Replicas (and a router) for one policy's run; stopped together."""

    def __init__(self, ns: argparse.Namespace, log_dir: Path, tag: str) -> None:
        super().__init__(log_dir)
        self.ns, self.tag = ns, tag
        self.urls: list[str] = []
        self.events: list[tuple[str, str]] = []  # (publisher, replay) per replica

    def start_replicas(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        for i in range(self.ns.replicas):
            port, pub, replay = free_port(), free_port(), free_port()
            args = [
                "serve",
                "--port",
                str(port),
                "--num-threads",
                "1",
                "--num-kv-blocks",
                str(self.ns.num_kv_blocks),
                "--max-num-batched-tokens",
                str(self.ns.max_num_batched_tokens),
                "--kv-events-endpoint",
                f"tcp://127.0.0.1:{pub}",
                "--kv-events-replay-endpoint",
                f"tcp://127.0.0.1:{replay}",
            ]
            if self.ns.serve_model:
                args += ["--model", self.ns.serve_model]
            self._spawn(
                f"replica{i}",
                [sys.executable, "-m", "pagoda.entrypoints.cli", *args],
                str(cores[i % len(cores)]),
            )
            self.urls.append(f"http://127.0.0.1:{port}")
            self.events.append((f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}"))
        for url in self.urls:
            wait_healthy(url, self)

    def start_router(self, policy: str, model: str) -> str:
        port = free_port()
        if policy == "kv_aware":
            exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
            cmd = [
                exe,
                "--port",
                str(port),
                "--prometheus-port",
                str(free_port()),
                "--worker-urls",
                *self.urls,
                "--policy",
                "kv_aware",
                "--kv-event-block-size",
                "16",
                "--kv-event-model",
                model,
            ]
            for url, (pub, replay) in zip(self.urls, self.events, strict=True):
                cmd += [
                    f"--kv-event-source={url}={pub}",
                    f"--kv-event-replay-source={url}={replay}",
                ]
        else:
            name = "cache_aware" if policy.startswith("cache_aware") else policy
            cmd = [
                sys.executable,
                "-m",
                "pagoda.entrypoints.cli",
                "router",
                "--port",
                str(port),
                "--replicas",
                *self.urls,
                "--policy",
                name,
            ]
            if policy.startswith("cache_aware_precise"):
                for url, (pub, replay) in zip(self.urls, self.events, strict=True):
                    cmd += ["--kv-events", f"{url}={pub}", "--kv-events-replay", f"{url}={replay}"]
            if self.ns.cache_load_weight is not None:
                cmd += ["--cache-load-weight", str(self.ns.cache_load_weight)]
            if policy == "cache_aware_precise":  # (_tokenize: ask a replica's /tokenize)
                cmd += ["--tokenizer", self.ns.serve_model or default_model_path()]
        self._spawn("router", cmd, None)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, self)
        return url

    def _spawn(self, name: str, cmd: list[str], core: Optional[str]) -> None:
        if core is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", core, *cmd]
        log = open(self.log_dir / f"{self.tag}-{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    def cache_counters(self) -> tuple[float, float]:
        """(prefix-cache hit tokens, tokens looked up), summed over the replicas."""
        hits = sum(metric(u, "pagoda:prefix_cache_hits_total") for u in self.urls)
        queries = sum(metric(u, "pagoda:prefix_cache_queries_total") for u in self.urls)
        return hits, queries


async def _conversation(
    client: Any, model: str, ns: argparse.Namespace, rng: random.Random, delay: float
) -> list[serve.RequestResult]:
    """One conversation: ``--turns`` chat turns, each sent once the last answer is in, each
    carrying the whole history (so its prompt extends the previous one's)."""
    await asyncio.sleep(delay)
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "Notes: " + serve._words(rng, ns.prefix_words)}
    ]
    results = []
    for _ in range(ns.turns):
        messages.append({"role": "user", "content": serve._words(rng, ns.suffix_words) + "?"})
        result, text = await _chat_turn(client, model, messages, ns.output_len)
        results.append(result)
        if not result.ok:
            break
        messages.append({"role": "assistant", "content": text})
    return results


async def _chat_turn(
    client: Any, model: str, messages: list[dict[str, str]], output_len: int
) -> tuple[serve.RequestResult, str]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "ignore_eos": True,
    }
    result, text = serve.RequestResult(), ""
    start = last = result.sent_at = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            result.error = f"HTTP {resp.status_code}"
            return result, ""
        async for line in resp.aiter_lines():
            data = serve._sse_json(line)
            if data is None:
                continue
            if data.get("usage"):
                result.prompt_tokens = data["usage"]["prompt_tokens"]
                result.output_tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    now = time.perf_counter()
                    if not text:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                text += piece
    result.e2el = time.perf_counter() - start
    result.ok = bool(text)
    return result, text


async def run_multiturn(
    ns: argparse.Namespace, base_url: str, model: str
) -> tuple[list[serve.RequestResult], float]:
    import httpx

    rng = random.Random(ns.seed)
    starts, t = [], 0.0
    for _ in range(ns.num_conversations):
        starts.append(t)
        t += rng.expovariate(ns.request_rate)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600.0) as client:
        begin = time.perf_counter()
        convs = await asyncio.gather(
            *(
                _conversation(client, model, ns, random.Random(ns.seed * 1000 + i), s)
                for i, s in enumerate(starts)
            )
        )
        elapsed = time.perf_counter() - begin
    return [r for conv in convs for r in conv], elapsed


def run_policy(
    ns: argparse.Namespace, policy: str, log_dir: Path
) -> tuple[dict[str, Any], list[serve.RequestResult]]:
    """The policy's report (and its requests, for --plot)."""
    import httpx

    cluster = Cluster(ns, log_dir, policy)
    try:
        cluster.start_replicas()
        model = httpx.get(cluster.urls[0] + "/v1/models").json()["data"][0]["id"]
        for url in cluster.urls:  # untimed: first allocations, kernel choices
            httpx.post(
                url + "/v1/completions",
                timeout=300,
                json={"model": model, "prompt": "warm up", "max_tokens": 2},
            )
        router = cluster.start_router(policy, model)
        time.sleep(1.0)  # event subscribers connect
        before = cluster.cache_counters()
        client_ns = argparse.Namespace(
            base_url=router,
            endpoint="completions",
            model=model,
            api_key=None,
            request_rate=ns.request_rate,
            burstiness=1.0,
            max_concurrency=None,
            seed=ns.seed,
            timeout=600.0,
            probe_health_ms=0.0,
        )
        if ns.workload == "multiturn":
            results, duration = asyncio.run(run_multiturn(ns, router, model))
        else:
            results, duration, _ = asyncio.run(serve.run_benchmark(client_ns, make_dataset(ns)))
        report = serve.compute_report(results, duration, {})
        hits, queries = (a - b for a, b in zip(cluster.cache_counters(), before, strict=True))
        report["hit_rate"] = hits / queries if queries else 0.0
        return report, results
    finally:
        cluster.stop()


def _workload_text(ns: argparse.Namespace) -> str:
    if ns.workload == "multiturn":
        return (
            f"{ns.num_conversations} conversations of {ns.turns} turns started at "
            f"{ns.request_rate}/s, {ns.prefix_words}-word notes, {ns.suffix_words}-word turns"
        )
    return (
        f"{ns.num_prompts} requests at {ns.request_rate}/s, {ns.num_prefixes} prefixes of "
        f"{ns.prefix_words} words, sharing {ns.sharing}"
    )


def main(ns: argparse.Namespace) -> int:
    policies = [p for p in ns.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES) - set(EXTRA_POLICIES)
    if unknown:
        raise ValueError(f"--policies: unknown {sorted(unknown)}; known: {list(POLICIES)}")
    if "kv_aware" in policies and not (
        shutil.which("vllm-router") or (Path(sys.executable).parent / "vllm-router").exists()
    ):
        print("vllm-router is not installed: kv_aware skipped", file=sys.stderr)
        policies.remove("kv_aware")
    log_dir = Path(ns.log_dir or tempfile.mkdtemp(prefix="pagoda-bench-route-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"== {ns.replicas} replicas, {_workload_text(ns)} ==")
    results: dict[str, Any] = {}
    requests: dict[str, list[dict[str, Any]]] = {}
    for policy in policies:
        results[policy], done = run_policy(ns, policy, log_dir)
        requests[policy] = [dataclasses.asdict(r) for r in done]
        r = results[policy]
        print(
            row(
                policy,
                f"hit rate {r['hit_rate']:.2f}, TTFT p50 {r['ttft_ms']['p50']:.0f} "
                f"ms p99 {r['ttft_ms']['p99']:.0f} ms, {r['output_throughput']:.1f} "
                f"tok/s, {r['failed']} failed",
            ),
            flush=True,
        )
    if "round_robin" in results:
        base = results["round_robin"]
        print("== against round robin ==")
        for policy, r in results.items():
            hit = r["hit_rate"] / base["hit_rate"] if base["hit_rate"] else float("inf")
            print(
                row(
                    policy,
                    f"hit rate {hit:.2f}x, throughput "
                    f"{r['output_throughput'] / base['output_throughput']:.2f}x, "
                    f"TTFT p99 {base['ttft_ms']['p99'] / r['ttft_ms']['p99']:.2f}x "
                    "lower",
                )
            )
    if ns.json:
        write_json(ns.json, {"command": list(sys.argv), "args": vars(ns), "results": results})
    if ns.plot:
        from pagoda.bench.plot import plot_serving_runs

        title = f"bench route ({ns.workload}, {ns.replicas} replicas, {ns.request_rate}/s)"
        for path in plot_serving_runs(ns.plot, f"route-{ns.workload}", requests, title):
            print(f"plot: {path}")
    return 0

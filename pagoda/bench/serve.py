"""``pagoda bench serve``: an online serving benchmark against any OpenAI-compatible endpoint.

Requests arrive as a gamma process (``--burstiness 1`` is Poisson) at ``--request-rate``,
optionally capped at ``--max-concurrency`` in flight; each streams its completion. It reports
requests/s, output tokens/s and mean / p50 / p90 / p99 of TTFT, TPOT (time per output token
after the first), ITL (the gap between two streamed chunks) and end-to-end latency, plus
goodput: completed requests per second that met every SLO of ``--goodput ttft:MS tpot:MS``.

Datasets: ``random`` (lengths uniform in ranges), ``prefix`` (a shared system prefix and a
random question: exercises the prefix cache), ``long-mix`` (short chat turns with occasional
``--long-input-len`` prompts: exercises chunked prefill).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Optional

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work "
    "week case point government company number group problem fact river mountain house "
    "water light music story garden city paper market energy answer table window "
    "morning question system program school family money night road voice"
).split()
SLO_KEYS = ("ttft", "tpot", "itl", "e2el")
STEP_POLL_S = 1.0  # --plot: how often the server's step records are read
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_words: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    sent_at: float = 0.0  # time.perf_counter() when it was sent

    @property
    def tpot(self) -> Optional[float]:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


# ----------------------------------------------------------------------- arguments
def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serving benchmark")
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    g.add_argument("--api-key", default=None)
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second (inf: all at once)",
    )
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrivals: 1 is Poisson, < 1 burstier",
    )
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--dataset", choices=["random", "prefix", "long-mix"], default="random")
    g.add_argument("--input-len", type=int, default=128, help="random/prefix: mean words")
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument(
        "--range-ratio",
        type=float,
        default=0.5,
        help="random: lengths uniform in [len*(1-r), len*(1+r)]",
    )
    g.add_argument("--prefix-len", type=int, default=512, help="prefix: shared words")
    g.add_argument("--long-input-len", type=int, default=2000, help="long-mix: long prompts")
    g.add_argument(
        "--long-fraction", type=float, default=0.1, help="long-mix: fraction of long prompts"
    )
    g.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="KEY:MS",
        help="SLOs, e.g. ttft:500 tpot:50 (keys: ttft tpot itl e2el)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--shape-seed",
        type=int,
        default=None,
        help="random: draw the lengths from this seed and the words from --seed, so that "
        "runs with different --seed have the same shape and share no prefix "
        "(default: both from --seed)",
    )
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument(
        "--probe-health-ms",
        type=float,
        default=0.0,
        help="also GET /health every this many ms and report its latency "
        "(how responsive the server's event loop stays under load)",
    )
    g.add_argument("--json", default=None, help="write the results here")
    g.add_argument(
        "--plot",
        default=None,
        metavar="DIR",
        help="write PNGs here: TTFT and ITL CDFs, throughput over time, and the server's "
        "step composition (from its inspector, when it has one)",
    )
    g.add_argument("--plot-label", default="pagoda", help="the run's name in the pictures")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (seconds)."""
    slos = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY in {SLO_KEYS}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
        slos[key] = ms / 1000.0
    return slos


# ------------------------------------------------------------------------ datasets
def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def _spread(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def make_dataset(ns: argparse.Namespace) -> list[BenchRequest]:
    rng = random.Random(ns.seed)
    if ns.dataset == "random" and ns.shape_seed is not None:
        shape = random.Random(ns.shape_seed)
        lengths = [
            (
                _spread(shape, ns.input_len, ns.range_ratio),
                _spread(shape, ns.output_len, ns.range_ratio),
            )
            for _ in range(ns.num_prompts)
        ]
        return [_request(rng, words, out) for words, out in lengths]
    if ns.dataset == "random":
        return [
            _request(
                rng,
                _spread(rng, ns.input_len, ns.range_ratio),
                _spread(rng, ns.output_len, ns.range_ratio),
            )
            for _ in range(ns.num_prompts)
        ]
    if ns.dataset == "prefix":
        prefix = "You are a helpful assistant. " + _words(rng, ns.prefix_len)
        return [
            BenchRequest(
                f"{prefix}\nQuestion: {_words(rng, ns.input_len)}?",
                ns.prefix_len + ns.input_len,
                ns.output_len,
            )
            for _ in range(ns.num_prompts)
        ]
    return _long_mix(rng, ns)


def _long_mix(rng: random.Random, ns: argparse.Namespace) -> list[BenchRequest]:
    """Short chat turns (32..128 words in, 64..128 out); a fraction are long documents
    (``--long-input-len`` words) with a short answer. The first long one comes early."""
    out = []
    for i in range(ns.num_prompts):
        long = rng.random() < ns.long_fraction or (i == 1 and ns.long_fraction > 0)
        if long:
            out.append(_request(rng, ns.long_input_len, 16))
        else:
            out.append(_request(rng, rng.randint(32, 128), rng.randint(64, 128)))
    return out


def _request(rng: random.Random, words: int, output_len: int) -> BenchRequest:
    return BenchRequest(_words(rng, words), words, output_len)


async def arrivals(
    n: int, rate: float, burstiness: float, rng: random.Random
) -> AsyncIterator[int]:
    """Yield 0..n-1 at gamma-distributed gaps with mean 1/rate (inf: no gaps)."""
    for i in range(n):
        yield i
        if math.isinf(rate) or i == n - 1:
            continue
        await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


# ---------------------------------------------------------------------- the client
def _payload(ns: argparse.Namespace, model: str, req: BenchRequest) -> tuple[str, dict]:
    common = {
        "model": model,
        "max_tokens": req.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if ns.endpoint == "chat":
        return "/v1/chat/completions", {
            **common,
            "messages": [{"role": "user", "content": req.prompt}],
        }
    return "/v1/completions", {**common, "prompt": req.prompt}


async def send_one(
    client: Any, ns: argparse.Namespace, model: str, req: BenchRequest
) -> RequestResult:
    path, body = _payload(ns, model, req)
    result = RequestResult()
    start = result.sent_at = time.perf_counter()
    last: Optional[float] = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body, timeout=ns.timeout) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                data = _sse_json(line)
                if data is None:
                    continue
                if "error" in data:
                    result.error = str(data["error"])
                    return result
                if data.get("usage"):
                    result.prompt_tokens = data["usage"]["prompt_tokens"]
                    result.output_tokens = data["usage"]["completion_tokens"]
                if _carries_tokens(data):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2el = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = last is not None
    if not result.ok:
        result.error = "no tokens streamed"
    return result


def _sse_json(line: str) -> Optional[dict]:
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    return json.loads(payload)


def _carries_tokens(data: dict) -> bool:
    """A chunk with text, or the one that finishes a choice (its tokens may decode to no
    text). A role-only first chat chunk carries none."""
    for choice in data.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
        if choice.get("finish_reason"):
            return True
    return False


async def first_model(client: Any) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_benchmark(
    ns: argparse.Namespace, dataset: list[BenchRequest]
) -> tuple[list[RequestResult], float, list[float]]:
    """(per-request results, wall time, /health probe latencies)."""
    import httpx

    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=ns.base_url, headers=headers, limits=limits, timeout=ns.timeout
    ) as client:
        model = ns.model or await first_model(client)
        sem = asyncio.Semaphore(ns.max_concurrency) if ns.max_concurrency else None

        async def limited(req: BenchRequest) -> RequestResult:
            if sem is None:
                return await send_one(client, ns, model, req)
            async with sem:
                return await send_one(client, ns, model, req)

        probe = HealthProbe(client, ns.probe_health_ms / 1000.0)
        start = time.perf_counter()
        tasks = []
        async for i in arrivals(
            len(dataset), ns.request_rate, ns.burstiness, random.Random(ns.seed + 1)
        ):
            tasks.append(asyncio.ensure_future(limited(dataset[i])))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        await probe.stop()
        return list(results), elapsed, probe.latencies


class HealthProbe:
    """GET /health at a fixed interval while the benchmark runs (off when interval is 0)."""

    def __init__(self, client: Any, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s
        self.latencies: list[float] = []
        self.task = asyncio.ensure_future(self._loop()) if interval_s > 0 else None

    async def _loop(self) -> None:
        while True:
            t0 = time.perf_counter()
            await self.client.get("/health")
            self.latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


# --------------------------------------------------------------------- statistics
def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, percentiles and max in milliseconds (the max shows a stall the p99 may miss)."""
    ms = [v * 1000.0 for v in values]
    out = {"mean": sum(ms) / len(ms) if ms else float("nan")}
    out.update({f"p{p}": percentile(ms, p) for p in PERCENTILES})
    out["max"] = max(ms) if ms else float("nan")
    return out


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2el, "itl": max(r.itl) if r.itl else 0.0}
    return all((v := values[k]) is None or v <= limit for k, limit in slos.items())


def compute_report(
    results: list[RequestResult], duration: float, slos: dict[str, float]
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    report: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ttft_ms": summarize([r.ttft for r in ok]),
        "tpot_ms": summarize([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": summarize([g for r in ok for g in r.itl]),
        "e2el_ms": summarize([r.e2el for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    if slos:
        good = sum(1 for r in ok if meets_slos(r, slos))
        report["goodput"] = good / duration
        report["slos_ms"] = {k: v * 1000.0 for k, v in slos.items()}
    return report


def print_report(ns: argparse.Namespace, report: dict[str, Any]) -> None:
    w = 34
    print(f"{'=' * 16} Serving Benchmark Result {'=' * 16}")
    print(
        f"{'dataset:':<{w}}{ns.dataset}  (request rate {ns.request_rate}, burstiness "
        f"{ns.burstiness}, max concurrency {ns.max_concurrency})"
    )
    for key, label in (
        ("completed", "Successful requests"),
        ("failed", "Failed requests"),
        ("duration_s", "Benchmark duration (s)"),
        ("total_input_tokens", "Total input tokens"),
        ("total_output_tokens", "Total generated tokens"),
        ("request_throughput", "Request throughput (req/s)"),
        ("output_throughput", "Output token throughput (tok/s)"),
        ("total_token_throughput", "Total token throughput (tok/s)"),
        ("goodput", "Request goodput (req/s)"),
    ):
        if key in report:
            value = report[key]
            print(
                f"{label + ':':<{w}}{value:.2f}"
                if isinstance(value, float)
                else f"{label + ':':<{w}}{value}"
            )
    for key, title in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2el_ms", "End-to-end Latency"),
        ("health_probe_ms", "GET /health latency under load"),
    ):
        if key not in report:
            continue
        print(f"{'-' * 20} {title} {'-' * 20}")
        for stat, value in report[key].items():
            print(f"{stat.capitalize() + ' (ms):':<{w}}{value:.2f}")
    for err in report["errors"]:
        print(f"error: {err}", file=sys.stderr)
    print("=" * 58)


def main(ns: argparse.Namespace) -> int:
    slos = parse_goodput(ns.goodput)
    if ns.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if not ns.request_rate > 0 or not ns.burstiness > 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    dataset = make_dataset(ns)
    if ns.plot:
        results, duration, health, steps = asyncio.run(_with_steps(ns, dataset))
    else:
        results, duration, health = asyncio.run(run_benchmark(ns, dataset))
    report = compute_report(results, duration, slos)
    if health:
        report["health_probe_ms"] = summarize(health)
    print_report(ns, report)
    if ns.json:
        args = {k: v for k, v in vars(ns).items() if k not in ("func", "api_key")}
        with open(ns.json, "w") as f:
            json.dump(
                {"args": args, "results": report, "requests": [asdict(r) for r in results]},
                f,
                indent=1,
                default=str,
            )
    if ns.plot:
        _plot(ns, results, steps)
    return 0 if report["completed"] else 1


def _plot(ns: argparse.Namespace, results: list[RequestResult], steps: list[dict]) -> None:
    from pagoda.bench import plot

    runs = {ns.plot_label: [asdict(r) for r in results]}
    written = plot.plot_serving_runs(ns.plot, "serve", runs, f"bench serve ({ns.dataset})")
    if steps:
        title = f"{ns.plot_label}: engine steps during bench serve ({len(steps)} steps)"
        written.append(plot.step_composition(f"{ns.plot}/serve-steps.png", title, steps))
    else:
        print("no step composition: the server has no inspector (GET /inspect/state)")
    for path in written:
        print(f"plot: {path}")


async def _with_steps(
    ns: argparse.Namespace, dataset: list[BenchRequest]
) -> tuple[list[RequestResult], float, list[float], list[dict]]:
    """The benchmark, and meanwhile the server's step records from its inspector (read
    every second; a server without one gives none)."""
    done = asyncio.Event()
    steps: dict[int, dict] = {}
    collector = asyncio.ensure_future(_collect_steps(ns, steps, done))
    try:
        results, duration, health = await run_benchmark(ns, dataset)
    finally:
        done.set()
        await collector
    return results, duration, health, [steps[k] for k in sorted(steps)]


async def _collect_steps(
    ns: argparse.Namespace, steps: dict[int, dict], done: asyncio.Event
) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    async with httpx.AsyncClient(base_url=ns.base_url, headers=headers, timeout=30) as client:
        first = True
        while first or not done.is_set():
            first = False
            try:
                reply = await client.get("/inspect/state")
            except httpx.HTTPError:
                return
            if reply.status_code != 200:
                return
            for step in reply.json().get("steps", []):
                steps[step["seq"]] = step
            try:
                await asyncio.wait_for(done.wait(), timeout=STEP_POLL_S)
            except asyncio.TimeoutError:
                pass
        reply = await client.get("/inspect/state")  # the last steps
        if reply.status_code == 200:
            for step in reply.json().get("steps", []):
                steps[step["seq"]] = step

"""``pagoda bench prefix``: what prefix caching buys on a workload of shared prefixes.

Requests are a few long prefixes (a system prompt, a few-shot preamble) each followed by a
unique suffix. The same prompts run with prefix caching on and off, one engine each, in one
process; then prompts of the same lengths sharing nothing run on both, to show what caching
costs when it never hits. All requests of a run arrive at once. Printed per run: time to
first token (mean, p50, p99), throughput, hit rate, and the fraction of the matmul limit
the computed work reached; then the on / off ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from pagoda.bench import flops
from pagoda.bench.common import (
    check_outputs,
    dtype_name,
    machine_info,
    measure_limits,
    print_limits,
    print_machine,
    row,
    token_id_range,
    warm_up,
    write_json,
)
from pagoda.sampling import SamplingParams


@dataclass(frozen=True)
class PrefixWorkload:
    prompts: list[list[int]]
    output_len: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prefixes", type=int, default=8)
    g.add_argument("--prefix-len", type=int, default=1024)
    g.add_argument("--suffix-len", type=int, default=64, help="unique tokens after the prefix")
    g.add_argument("--requests-per-prefix", type=int, default=8)
    g.add_argument("--output-len", type=int, default=32)
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument(
        "--no-unique-run", dest="unique_run", action="store_false", help="skip the 0%%-hit run"
    )
    g.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    g.add_argument(
        "--plot", default=None, metavar="DIR", help="write the TTFT CDFs (on vs off) here"
    )


def _check(ns: argparse.Namespace) -> None:
    for name in ("num_prefixes", "requests_per_prefix", "output_len", "suffix_len"):
        value = getattr(ns, name)
        if value < (0 if name == "suffix_len" else 1):
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= "
                f"{0 if name == 'suffix_len' else 1}, got {value}"
            )
    if ns.prefix_len < 1:
        raise ValueError(f"--prefix-len must be >= 1, got {ns.prefix_len}")


def make_workloads(
    ns: argparse.Namespace, vocab_size: int
) -> tuple[PrefixWorkload, PrefixWorkload]:
    """(shared, unique): the same prompt lengths, sharing prefixes or nothing. Shared prompts
    are interleaved across prefixes, so each prefix's first request arrives early."""
    rng = random.Random(ns.data_seed)
    lo, hi = token_id_range(vocab_size)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    prefixes = [tokens(ns.prefix_len) for _ in range(ns.num_prefixes)]
    shared = [
        prefixes[p] + tokens(ns.suffix_len)
        for _ in range(ns.requests_per_prefix)
        for p in range(ns.num_prefixes)
    ]
    unique = [tokens(ns.prefix_len + ns.suffix_len) for _ in shared]
    return PrefixWorkload(shared, ns.output_len), PrefixWorkload(unique, ns.output_len)


def run(llm: Any, work: PrefixWorkload, shape: flops.ModelShape, limit: float) -> dict:
    """One timed run from an empty prefix cache."""
    engine = llm.engine
    engine.reset_prefix_cache()
    queries0, hits0 = engine.prefix_cache_queries, engine.prefix_cache_hits
    params = SamplingParams(temperature=0.0, max_tokens=work.output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    check_outputs(outs, [work.output_len] * len(outs))
    ttfts = sorted(o.time_to_first_token for o in outs)
    cached = [o.num_cached_tokens for o in outs]
    queries = engine.prefix_cache_queries - queries0
    work_flops = sum(
        flops.request_flops(shape, len(p), work.output_len, c)
        for p, c in zip(work.prompts, cached, strict=True)
    )
    out_tokens = work.output_len * len(outs)
    return {
        "elapsed_s": elapsed,
        "requests": len(outs),
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p99_s": _pct(ttfts, 99),
        "ttfts_s": ttfts,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (work.prompt_tokens + out_tokens) / elapsed,
        "prompt_tokens": work.prompt_tokens,
        "cached_tokens": sum(cached),
        "hit_rate": (engine.prefix_cache_hits - hits0) / queries if queries else 0.0,
        "computed_flops": work_flops,
        "achieved_flops_per_s": work_flops / elapsed,
        "fraction_of_limit": work_flops / elapsed / limit,
    }


def _pct(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def print_run(title: str, r: dict) -> None:
    print(f"== {title} ==")
    print(row("elapsed s", r["elapsed_s"]))
    print(
        row(
            "TTFT mean / p50 / p99",
            f"{1e3 * r['ttft_mean_s']:.0f} / "
            f"{1e3 * r['ttft_p50_s']:.0f} / {1e3 * r['ttft_p99_s']:.0f} ms",
        )
    )
    print(row("output tokens/s", r["output_tokens_per_s"]))
    print(row("total tokens/s", r["total_tokens_per_s"]))
    print(
        row(
            "hit rate",
            f"{100 * r['hit_rate']:.1f} % "
            f"({r['cached_tokens']} of {r['prompt_tokens']} prompt tokens cached)",
        )
    )
    print(
        row(
            "fraction of limit",
            f"{100 * r['fraction_of_limit']:.2f} % "
            f"(computed work, {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s)",
        )
    )


def ratios(on: dict, off: dict) -> dict:
    return {
        "ttft_mean_off_over_on": off["ttft_mean_s"] / on["ttft_mean_s"],
        "ttft_p99_off_over_on": off["ttft_p99_s"] / on["ttft_p99_s"],
        "throughput_on_over_off": on["total_tokens_per_s"] / off["total_tokens_per_s"],
    }


def print_ratios(title: str, r: dict) -> None:
    print(f"== {title} ==")
    print(row("TTFT mean off / on", f"{r['ttft_mean_off_over_on']:.2f}x"))
    print(row("TTFT p99 off / on", f"{r['ttft_p99_off_over_on']:.2f}x"))
    print(row("throughput on / off", f"{r['throughput_on_over_off']:.2f}x"))


def main(ns: argparse.Namespace) -> int:
    from pagoda.entrypoints.cli import engine_args_from
    from pagoda.entrypoints.llm import LLM

    _check(ns)
    base = engine_args_from(ns)
    llms = {
        on: LLM(**vars(dataclasses.replace(base, enable_prefix_caching=on))) for on in (True, False)
    }
    engine = llms[True].engine
    arch, dtype = engine.arch, engine.dtype
    shape = flops.ModelShape.from_arch(arch)
    machine = machine_info()
    print_machine(machine)
    limits = measure_limits(arch, base, dtype)
    print_limits(limits, dtype)
    limit = limits[dtype_name(dtype)]["best_flops_per_s"]
    shared, unique = make_workloads(ns, arch.vocab_size)
    print("== workload ==")
    print(
        row(
            "requests",
            f"{len(shared.prompts)} = {ns.num_prefixes} prefixes x {ns.requests_per_prefix}",
        )
    )
    print(row("prompt", f"{ns.prefix_len} shared + {ns.suffix_len} unique tokens"))
    print(row("output len", ns.output_len))
    for llm in llms.values():
        warm_up(llm, arch.vocab_size)

    results: dict[str, Any] = {}
    workloads = [("shared", shared)] + ([("unique", unique)] if ns.unique_run else [])
    for name, work in workloads:
        for on in (True, False):
            key = f"{name}_caching_{'on' if on else 'off'}"
            results[key] = run(llms[on], work, shape, limit)
            print_run(f"{name} prefixes, caching {'on' if on else 'off'}", results[key])
        results[f"{name}_ratios"] = ratios(
            results[f"{name}_caching_on"], results[f"{name}_caching_off"]
        )
        print_ratios(f"{name} prefixes: on vs off", results[f"{name}_ratios"])

    if ns.plot:
        _plot(ns.plot, results, [name for name, _ in workloads])
    if ns.json:
        write_json(
            ns.json,
            {
                "command": list(sys.argv),
                "machine": machine,
                "engine_args": dataclasses.asdict(base),
                "dtype": dtype_name(dtype),
                "model": engine.model_name,
                "matmul": limits,
                "limit_flops_per_s": limit,
                "load_average_after": os.getloadavg(),
                "workload": {
                    k: getattr(ns, k)
                    for k in (
                        "num_prefixes",
                        "prefix_len",
                        "suffix_len",
                        "requests_per_prefix",
                        "output_len",
                        "data_seed",
                    )
                },
                **results,
            },
        )
        print(row("json", ns.json))
    return 0


def _plot(out_dir: str, results: dict[str, Any], workloads: list[str]) -> None:
    from pagoda.bench.plot import latency_cdf

    for name in workloads:
        series = {
            f"caching {state}": [t * 1e3 for t in results[f"{name}_caching_{state}"]["ttfts_s"]]
            for state in ("on", "off")
        }
        path = latency_cdf(
            os.path.join(out_dir, f"prefix-{name}-ttft-cdf.png"),
            f"prefix caching, {name} prefixes: time to first token (all requests at once)",
            "TTFT (ms)",
            series,
        )
        print(row("plot", path))

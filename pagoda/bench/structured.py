"""``pagoda bench structured``: what constrained decoding costs (engine/structured.py).

The same chat prompts run with and without a JSON schema, in alternating rounds (A B A B)
on one engine, every request generating up to ``--output-len`` tokens (EOS ignored; the
schema is an open-ended list, so constrained requests rarely end before that either). Printed
per mode: output tokens/s (median over rounds) and the ratio; the time to compute one
request's allowed-token mask per step (mean, p99); and compile times: the tokenizer's
conversion (once per engine), a new schema, and a cached one.

With ``--base-url`` it also sends the same prompts, all at once, to a running server's
``/v1/chat/completions``, with and without ``response_format``, alternating rounds, and prints
the output tokens/s each way as the server's ``usage`` counts them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

from pagoda.bench.common import machine_info, print_machine, row, write_json
from pagoda.sampling import SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}},
    },
    "required": ["city", "population", "landmarks"],
    "additionalProperties": False,
}


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=32)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternating")
    g.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    g.add_argument(
        "--plot", default=None, metavar="DIR", help="write tok/s and the mask times' CDF here"
    )
    g.add_argument(
        "--base-url", default=None, help="also through this server (e.g. http://127.0.0.1:8000)"
    )


class MaskTimer:
    """Times each of the engine's per-request, per-step mask computations (instrumentation:
    ``bitmasks``, what the engine core calls, one mask per call without drafts)."""

    def __init__(self, structured: Any) -> None:
        self.structured = structured
        self.seconds: list[float] = []

    def __enter__(self) -> "MaskTimer":
        self._bitmasks = self.structured.bitmasks

        def timed(request_id: str, drafts: list[int]) -> list[bytes]:
            start = time.perf_counter()
            masks = self._bitmasks(request_id, drafts)
            self.seconds.append((time.perf_counter() - start) / len(masks))
            return masks

        self.structured.bitmasks = timed
        return self

    def __exit__(self, *exc: object) -> None:
        del self.structured.bitmasks  # back to the class's method


def prompts(llm: Any, n: int) -> list[list[int]]:
    return [llm.engine.encode_chat([{"role": "user", "content": ask(i)}]) for i in range(n)]


def compile_times(engine: Any) -> dict[str, float]:
    compiler = engine.structured.compiler
    start = time.perf_counter()
    compiler.tokenizer()
    tokenizer_s = time.perf_counter() - start
    fresh = StructuredOutputsParams(json=json.dumps({**SCHEMA, "title": f"t{time.time()}"}))
    start = time.perf_counter()
    compiler.matcher(fresh)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    compiler.matcher(fresh)
    cached_s = time.perf_counter() - start
    return {"tokenizer_s": tokenizer_s, "new_schema_s": cold_s, "cached_schema_s": cached_s}


def run(llm: Any, ps: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    start = time.perf_counter()
    outs = llm.generate(ps, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "ended_by_length": sum(o.finish_reason == "length" for o in outs),
    }


CITIES = ["Lisbon", "Kyoto", "Lagos", "Quito", "Oslo", "Hanoi", "Perth", "Tunis"]


def ask(i: int) -> str:
    return (
        f"Describe {CITIES[i % len(CITIES)]} (request {i}) as JSON with its city, "
        "population and landmarks."
    )


async def _serve_round(base_url: str, n: int, output_len: int, constrained: bool) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def one(i: int) -> int:
            body: dict[str, Any] = {
                "model": model,
                "max_tokens": output_len,
                "temperature": 0,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": ask(i)}],
            }
            if constrained:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "city", "schema": SCHEMA},
                }
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
        elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def serve_rounds(ns: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict]] = {"unconstrained": [], "json_schema": []}
    asyncio.run(_serve_round(ns.base_url, 2, 4, True))  # warm-up: compiles the schema
    for _ in range(ns.rounds):
        for mode in rounds:
            rounds[mode].append(
                asyncio.run(
                    _serve_round(ns.base_url, ns.num_prompts, ns.output_len, mode == "json_schema")
                )
            )
    medians = {
        m: statistics.median(r["output_tokens_per_s"] for r in rs) for m, rs in rounds.items()
    }
    for mode, rs in rounds.items():
        rates = ", ".join(f"{r['output_tokens_per_s']:.1f}" for r in rs)
        print(row(f"server {mode} tok/s", f"{rates} (median {medians[mode]:.1f})"))
    ratio = medians["json_schema"] / medians["unconstrained"]
    print(row("server constrained / not", f"{ratio:.2f}x"))
    return {"rounds": rounds, "median_output_tokens_per_s": medians, "ratio": ratio}


def main(ns: argparse.Namespace) -> int:
    from pagoda.entrypoints.cli import engine_args_from
    from pagoda.entrypoints.llm import LLM

    base = engine_args_from(ns)
    llm = LLM(**vars(base))
    machine = machine_info()
    print_machine(machine)
    ps = prompts(llm, ns.num_prompts)
    spec = StructuredOutputsParams(json=json.dumps(SCHEMA))
    modes = {
        "unconstrained": SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True),
        "json_schema": SamplingParams(
            temperature=0.0, max_tokens=ns.output_len, ignore_eos=True, structured_outputs=spec
        ),
    }
    compiles = compile_times(llm.engine)
    for params in modes.values():  # warm-up, untimed
        llm.generate(ps[:2], params.clone(max_tokens=4), use_tqdm=False)
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    with MaskTimer(llm.engine.structured) as masks:
        for _ in range(ns.rounds):
            for mode, params in modes.items():
                rounds[mode].append(run(llm, ps, params))
    medians = {
        m: statistics.median(r["output_tokens_per_s"] for r in rs) for m, rs in rounds.items()
    }
    mask_s = sorted(masks.seconds)
    report = {
        "command": list(sys.argv),
        "machine": machine,
        "engine_args": dataclasses.asdict(base),
        "model": llm.engine.model_name,
        "rounds": rounds,
        "median_output_tokens_per_s": medians,
        "ratio_constrained_over_unconstrained": medians["json_schema"] / medians["unconstrained"],
        "mask_mean_s": statistics.fmean(mask_s) if mask_s else None,
        "mask_p99_s": mask_s[int(0.99 * (len(mask_s) - 1))] if mask_s else None,
        "masks_computed": len(mask_s),
        "compile": compiles,
    }
    print("== workload ==")
    print(row("requests", f"{len(ps)} chat prompts, {ns.output_len} output tokens each"))
    for mode, rs in rounds.items():
        rates = ", ".join(f"{r['output_tokens_per_s']:.1f}" for r in rs)
        print(row(f"{mode} tok/s", f"{rates} (median {medians[mode]:.1f})"))
    print(
        row("constrained / unconstrained", f"{report['ratio_constrained_over_unconstrained']:.2f}x")
    )
    if mask_s:
        print(
            row(
                "mask per request-step",
                f"mean {1e6 * report['mask_mean_s']:.0f} us, "
                f"p99 {1e6 * report['mask_p99_s']:.0f} us ({len(mask_s)} masks)",
            )
        )
    print(
        row(
            "compile",
            f"tokenizer {1e3 * compiles['tokenizer_s']:.0f} ms (once), new "
            f"schema {1e3 * compiles['new_schema_s']:.1f} ms, cached "
            f"{1e3 * compiles['cached_schema_s']:.3f} ms",
        )
    )
    if ns.base_url:
        report["server"] = serve_rounds(ns)
    if ns.json:
        write_json(ns.json, report)
        print(row("json", ns.json))
    if ns.plot:
        _plot(ns.plot, rounds, mask_s)
    return 0


def _plot(out_dir: str, rounds: dict[str, list[dict]], mask_s: list[float]) -> None:
    from pagoda.bench.plot import latency_cdf, mode_bars

    tok_s = {m: [r["output_tokens_per_s"] for r in rs] for m, rs in rounds.items()}
    paths = [
        mode_bars(
            os.path.join(out_dir, "structured-tokens-per-s.png"),
            "a JSON schema vs no constraint (offline)",
            "output tokens/s (bar: median; dots: rounds)",
            {"offline": tok_s},
            baseline="unconstrained",
        )
    ]
    if mask_s:
        paths.append(
            latency_cdf(
                os.path.join(out_dir, "structured-mask-cdf.png"),
                "computing one request's token mask for one step",
                "mask time (us)",
                {"llguidance mask": [1e6 * s for s in mask_s]},
                unit="us",
            )
        )
    for path in paths:
        print(row("plot", path))

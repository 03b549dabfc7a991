"""``pagoda bench spec``: speculative decoding against none, on the workloads it is for and on
the one it must not slow down (docs/speculative_decoding.md).

One engine, its speculator switched per mode (off, ngram, suffix), rounds alternating
(off, ngram, suffix, off, ...), greedy:

- **grounded**: chat prompts whose answer copies spans of a long prompt (repeat a passage,
  or return a code listing with one change), at batch 1 (one request at a time: decode
  tokens/s = output tokens / (end - first token), and TPOT) and at batch 8 (output tokens/s
  of the batch);
- **W1**: ``pagoda bench throughput``'s saturated workload (random prompt tokens, nothing
  to copy), output tokens/s.

Printed per mode: the median over rounds, its ratio to no speculation, whether the tokens
equal no speculation's, the acceptance rate and the mean accepted length (vLLM's meanings),
and at batch 1 the fraction of the decode roofline without speculation (the weights read
once a token at the measured read bandwidth), which speculation exists to exceed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

from pagoda.bench.common import (
    machine_info,
    make_workload,
    parse_len_range,
    print_machine,
    row,
    write_json,
)
from pagoda.bench.gpu import weight_bytes_per_step
from pagoda.bench.phases import read_bytes_per_s
from pagoda.config import SpeculativeConfig
from pagoda.sampling import SamplingParams
from pagoda.spec_decode.speculator import Speculator

MODES = ("off", "ngram", "suffix")

PASSAGES = [
    "A paged KV cache stores each sequence's keys and values in fixed-size blocks. A block "
    "table maps a sequence's logical positions to physical blocks, so memory is handed out "
    "as it is needed and a finished sequence gives its blocks back at once. Sequences that "
    "share a prompt can share the blocks that hold it, counting references, and a block is "
    "free again when its count reaches zero.",
    "Continuous batching schedules work one iteration at a time. When a request finishes, "
    "a waiting one takes its place at the next step instead of waiting for the whole batch "
    "to drain. Long prompts are cut into chunks so that the running requests keep getting "
    "their tokens while a new prompt is read, and the step's token budget bounds how long "
    "any one step can take.",
    "The river rises in the hills above the old mill and runs south through the town. In "
    "spring it floods the meadows on the east bank, and the farmers move their sheep to the "
    "higher fields. In summer it is slow and shallow, and children wade across it at the "
    "ford below the church. In autumn the leaves gather in the pools under the bridge.",
]
CODE = '''def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages
'''


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--methods", default="ngram,suffix", help="speculation methods to run")
    g.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternating")
    g.add_argument("--output-len", type=int, default=256, help="grounded: max output tokens")
    g.add_argument("--batch-size", type=int, default=8, help="grounded: the batched run's size")
    g.add_argument("--w1-num-prompts", type=int, default=128)
    g.add_argument("--w1-input-len", default="64:512")
    g.add_argument("--w1-output-len", default="64:256")
    g.add_argument("--skip-w1", action="store_true", help="only the grounded workload")
    g.add_argument(
        "--w1-temperature",
        type=float,
        default=0.0,
        help="W1 sampled at this temperature (seeded per request) instead of greedy",
    )
    g.add_argument("--skip-grounded", action="store_true", help="only W1")
    g.add_argument("--num-speculative-tokens", type=int, default=None, help="k for every method")
    g.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    g.add_argument(
        "--plot", default=None, metavar="DIR", help="write the tok/s per mode and workload here"
    )


def grounded_prompts() -> list[str]:
    asks = [f"Repeat the following text word for word.\n\n{p}" for p in PASSAGES]
    asks.append(
        "Here is a Python function. Return the whole function unchanged except that the "
        f"parameter `window` is renamed to `size`.\n\n{CODE}"
    )
    asks.append(f"Copy this code exactly, then explain it in one sentence.\n\n{CODE}")
    return asks


class ProposeTimer:
    """Times every draft proposal of the speculators it is attached to (instrumentation)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def attach(self, speculator: Any) -> Any:
        proposer = speculator.proposer
        propose = proposer.propose

        def timed(request: Any, k: int) -> Any:
            start = time.perf_counter()
            draft = propose(request, k)
            self.seconds.append(time.perf_counter() - start)
            return draft

        proposer.propose = timed
        return speculator

    def summary(self) -> dict:
        s = sorted(self.seconds)
        if not s:
            return {"calls": 0}
        return {
            "calls": len(s),
            "mean_s": statistics.mean(s),
            "p99_s": s[min(len(s) - 1, int(0.99 * len(s)))],
        }


def speculators(
    engine: Any, methods: list[str], k: Optional[int], timers: dict[str, ProposeTimer]
) -> dict[str, Callable[[], Optional[Speculator]]]:
    """mode -> a maker of a fresh speculator for a round (None: off), all sharing the
    engine's cost model (the engine must have been built with speculation on, so that it
    timed one). Fresh each round: the suffix method's trie of recent outputs would
    otherwise hold the previous round's answers to the same prompts."""
    base = engine.scheduler.spec
    assert base is not None, "the engine was built without speculation"

    def maker(method: str) -> Callable[[], Optional[Speculator]]:
        def make() -> Speculator:
            config = SpeculativeConfig(method=method, num_speculative_tokens=k)
            spec = Speculator(config, base.policy.cost, base.make_trie)
            spec.draft_filter = base.draft_filter
            return timers[method].attach(spec)

        return make

    out: dict[str, Callable[[], Optional[Speculator]]] = {"off": lambda: None}
    for method in methods:
        out[method] = maker(method)
    return out


def _use(engine: Any, speculator: Any) -> None:
    engine.scheduler.spec = speculator


def batch1_round(llm: Any, prompts: list[list[int]], params: SamplingParams) -> dict:
    """One request at a time: decode tokens/s over all of them, mean TPOT, the tokens."""
    decode_s, tokens, tpots, outs = 0.0, 0, [], []
    for p in prompts:
        out = llm.generate([p], params, use_tqdm=False)[0]
        end = out.metrics.finished_time or time.monotonic()
        first = out.metrics.first_token_time or end
        n = len(out.outputs[0].token_ids)
        decode_s += end - first
        tokens += n - 1
        if out.time_per_output_token is not None:
            tpots.append(out.time_per_output_token)
        outs.append(list(out.outputs[0].token_ids))
    return {
        "decode_tokens_per_s": tokens / decode_s,
        "mean_tpot_s": statistics.mean(tpots) if tpots else None,
        "tokens": outs,
    }


def batch_round(llm: Any, prompts: list[list[int]], params: SamplingParams) -> dict:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "output_tokens_per_s": n / elapsed,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
    }


def alternate(llm: Any, modes: dict[str, Any], rounds: int, run: Any, key: str) -> dict[str, Any]:
    """``rounds`` of each mode, alternating, each round on a fresh speculator; per mode the
    rounds, the median of ``key``, the ratio to "off", token identity with "off", and the
    speculators' counters."""
    engine = llm.engine
    results: dict[str, list[dict]] = {m: [] for m in modes}
    counters: dict[str, dict] = {}
    for _ in range(rounds):
        for mode, make in modes.items():
            spec = make()
            _use(engine, spec)
            results[mode].append(run())
            if spec is not None:
                _add_counters(counters.setdefault(mode, {}), spec.stats)
    _use(engine, None)
    base = statistics.median(r[key] for r in results["off"])
    report = {}
    for mode, rs in results.items():
        median = statistics.median(r[key] for r in rs)
        report[mode] = {
            "rounds": [{k: v for k, v in r.items() if k != "tokens"} for r in rs],
            "median": median,
            "ratio": median / base,
            "identical_to_off": _identical(rs[0]["tokens"], results["off"][0]["tokens"]),
            **_rates(counters.get(mode)),
        }
    return report


def _identical(got: list, want: list) -> list[int]:
    """[requests whose tokens equal no speculation's, requests]."""
    return [sum(g == w for g, w in zip(got, want, strict=True)), len(want)]


def _add_counters(acc: dict, stats: Any) -> None:
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        acc[name] = acc.get(name, 0) + getattr(stats, name)


def _rates(c: Optional[dict]) -> dict:
    if not c or not c.get("num_draft_tokens"):
        return {"acceptance_rate": None, "mean_accepted_length": None, **(c or {})}
    return {
        **c,
        "acceptance_rate": c["num_accepted_tokens"] / c["num_draft_tokens"],
        "mean_accepted_length": 1 + c["num_accepted_tokens"] / c["num_drafts"],
    }


def print_report(title: str, unit: str, report: dict, roofline: Optional[float] = None) -> None:
    print(f"== {title} ==")
    for mode, r in report.items():
        rounds = ", ".join(f"{x:.1f}" for x in _values(r))
        line = f"{rounds} (median {r['median']:.1f} {unit}, {r['ratio']:.2f}x)"
        if roofline:
            line += f", {r['median'] / roofline:.2f} of the roofline"
        print(row(mode, line))
        if mode != "off":
            rate, length = r["acceptance_rate"], r["mean_accepted_length"]
            accepted = (
                f"acceptance {rate:.2f}, mean accepted length {length:.2f}"
                if rate is not None
                else "no drafts verified"
            )
            same, total = r["identical_to_off"]
            print(row("", f"{accepted}; {same}/{total} requests' tokens equal off's"))


def _values(r: dict) -> list[float]:
    key = next(k for k in r["rounds"][0] if k.endswith("_per_s"))
    return [x[key] for x in r["rounds"]]


def decode_roofline(engine: Any) -> dict:
    """Decode tokens/s without speculation if a step cost only reading the weights once."""
    weights = weight_bytes_per_step(engine.arch, engine.dtype)
    bandwidth = read_bytes_per_s()
    return {
        "weight_bytes": weights,
        "read_bytes_per_s": bandwidth,
        "tokens_per_s": bandwidth / weights,
    }


def main(ns: argparse.Namespace) -> int:
    from pagoda.entrypoints.cli import engine_args_from
    from pagoda.entrypoints.llm import LLM

    methods = [m for m in ns.methods.split(",") if m]
    base = engine_args_from(ns)
    if base.speculative_config is None:  # times the cost model the speculators share
        base = dataclasses.replace(base, speculative_config={"method": methods[0]})
    llm = LLM(**vars(base))
    machine = machine_info()
    print_machine(machine)
    timers = {m: ProposeTimer() for m in methods}
    spec = llm.engine.scheduler.spec
    assert spec is not None  # built with speculation above
    cost = spec.policy.cost
    modes = speculators(llm.engine, methods, ns.num_speculative_tokens, timers)
    print(row("step cost model", f"{cost}"))
    roof = decode_roofline(llm.engine)
    print(row("decode roofline", f"{roof['tokens_per_s']:.1f} tok/s (weights once a token)"))
    if llm.engine.dtype != torch.float32:
        print(
            "(bf16: a verified row's positions go through the matmuls in a larger batch than a "
            "lone decode row and round differently, so near-ties may flip, as when requests "
            "join a batch; with --dtype float32 the tokens are identical)"
        )
    prompts = [llm.engine.encode_chat([{"role": "user", "content": a}]) for a in grounded_prompts()]
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len)
    llm.generate(prompts[:2], params.clone(max_tokens=8), use_tqdm=False)  # warm-up
    report: dict[str, Any] = {
        "command": list(sys.argv),
        "machine": machine,
        "engine_args": {k: v for k, v in dataclasses.asdict(base).items()},
        "model": llm.engine.model_name,
        "cost_model": dataclasses.asdict(cost) if cost is not None else None,
        "decode_roofline": roof,
    }
    if not ns.skip_grounded:
        grounded(llm, ns, modes, prompts, params, report)
    if not ns.skip_w1:
        work = make_workload(
            ns.w1_num_prompts,
            parse_len_range(ns.w1_input_len, "--w1-input-len"),
            parse_len_range(ns.w1_output_len, "--w1-output-len"),
            llm.engine.arch.vocab_size,
            0,
        )
        _w1_round(llm, work, ns.w1_temperature)  # untimed: the first run touches the KV pages
        report["w1"] = alternate(
            llm,
            modes,
            ns.rounds,
            lambda: _w1_round(llm, work, ns.w1_temperature),
            "output_tokens_per_s",
        )
        sampled = f"temperature {ns.w1_temperature}" if ns.w1_temperature else "greedy"
        title = f"W1 ({ns.w1_num_prompts} random prompts, saturated, {sampled})"
        print_report(title, "tok/s", report["w1"])
    report["proposal"] = {m: t.summary() for m, t in timers.items()}
    print("== draft proposal, per request and step ==")
    for m, t in report["proposal"].items():
        if t["calls"]:
            text = f"mean {1e6 * t['mean_s']:.0f} us, p99 {1e6 * t['p99_s']:.0f} us"
            print(row(m, f"{text} ({t['calls']} calls)"))
    if ns.json:
        write_json(ns.json, json.loads(json.dumps(report, default=str)))
    if ns.plot:
        _plot(ns.plot, report, ns.batch_size, ns.w1_num_prompts)
    return 0


def _plot(out_dir: str, report: dict, batch_size: int, w1_prompts: int) -> None:
    from pagoda.bench.plot import mode_bars

    names = {
        "grounded_batch1": "grounded, batch 1\n(decode tok/s)",
        "grounded_batch": f"grounded, batch {batch_size}\n(output tok/s)",
        "w1": f"W1, {w1_prompts} random prompts\n(output tok/s)",
    }
    groups = {
        label: {mode: _values(r) for mode, r in report[key].items()}
        for key, label in names.items()
        if key in report
    }
    path = mode_bars(
        os.path.join(out_dir, "spec-decode-tokens-per-s.png"),
        f"speculative decoding vs none ({report['model']})",
        "tokens/s (bar: median; dots: rounds)",
        groups,
    )
    print(row("plot", path))


def grounded(
    llm: Any,
    ns: argparse.Namespace,
    modes: dict,
    prompts: list[list[int]],
    params: SamplingParams,
    report: dict,
) -> None:
    report["grounded_batch1"] = alternate(
        llm, modes, ns.rounds, lambda: batch1_round(llm, prompts, params), "decode_tokens_per_s"
    )
    print_report(
        f"grounded, batch 1 ({len(prompts)} prompts one at a time), decode",
        "tok/s",
        report["grounded_batch1"],
        report["decode_roofline"]["tokens_per_s"],
    )
    batch = (prompts * ns.batch_size)[: ns.batch_size]
    report["grounded_batch"] = alternate(
        llm, modes, ns.rounds, lambda: batch_round(llm, batch, params), "output_tokens_per_s"
    )
    print_report(f"grounded, batch {ns.batch_size}", "tok/s", report["grounded_batch"])


def _w1_round(llm: Any, work: Any, temperature: float) -> dict:
    params = [
        SamplingParams(temperature=temperature, seed=i, max_tokens=n, ignore_eos=True)
        for i, n in enumerate(work.output_lens)
    ]
    start = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return {
        "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
    }

"""Pictures of benchmark runs (``--plot DIR``): latency CDFs per compared system, output
throughput over time, and a server's step composition (decode vs prefill-chunk tokens per
step against the token budget).

Drawn with matplotlib's Agg backend (files only, no display). Every function takes plain
numbers, so a bench's JSON can be drawn again later: ``pagoda bench plot A.json B.json``
compares runs of ``bench serve`` (chunked prefill on and off, two servers, ...). Invariant: a
picture shows exactly the samples it is given; none is dropped or smoothed (a CDF is the
empirical one, throughput is tokens counted per bin).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

# One colour per compared system, in the order given (matplotlib's default cycle's first).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


LOG_SPAN = 30.0  # a CDF whose samples span more than this factor gets a log x axis

# The inspector's step record keys, stacked in this order.
STEP_KINDS = (
    ("decode", "decode tokens", COLOURS[0]),
    ("prefill", "prefill-chunk tokens", COLOURS[1]),
    ("recompute", "recomputed after preemption", COLOURS[3]),
    ("spec", "draft tokens", COLOURS[2]),
)


def _colours(n: int) -> list[str]:
    return [COLOURS[i % len(COLOURS)] for i in range(n)]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib: pip install matplotlib (it is in pagoda's test extras)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cdf_points(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF: the sorted values and, for each, the fraction of values <= it."""
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def latency_cdf(
    path: str,
    title: str,
    xlabel: str,
    series: Mapping[str, Sequence[float]],
    unit: str = "ms",
) -> str:
    """One CDF curve per system (values in ``unit``), p50 and p99 marked in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, values), colour in zip(series.items(), _colours(len(series)), strict=True):
        if not values:
            continue
        xs, ys = cdf_points(values)
        p50, p99 = xs[int(0.5 * (len(xs) - 1))], xs[int(0.99 * (len(xs) - 1))]
        label = f"{name} (p50 {p50:,.0f}, p99 {p99:,.0f} {unit})"
        ax.step(xs, ys, where="post", label=label, color=colour)
    every = [v for values in series.values() for v in values if v > 0]
    if every and max(every) > LOG_SPAN * min(every):
        _log_x(ax)  # a long tail: the body and the tail both stay readable
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, plt, path)


def _log_x(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def throughput_bins(token_times: Sequence[float], bin_s: float) -> tuple[list[float], list[float]]:
    """Tokens per second in consecutive bins of ``bin_s`` from 0 (bin start times, rates)."""
    if not token_times:
        return [], []
    n_bins = int(max(token_times) // bin_s) + 1
    counts = [0] * n_bins
    for t in token_times:
        counts[int(t // bin_s)] += 1
    return [i * bin_s for i in range(n_bins)], [c / bin_s for c in counts]


def throughput_over_time(
    path: str, title: str, series: Mapping[str, Sequence[float]], bin_s: float = 1.0
) -> str:
    """Output tokens per second over the run, per system (token arrival times in s)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, times), colour in zip(series.items(), _colours(len(series)), strict=True):
        xs, ys = throughput_bins(times, bin_s)
        if xs:
            ax.step(xs, ys, where="post", label=name, color=colour)
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel(f"output tokens/s ({bin_s:g} s bins)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, plt, path)


def step_composition(path: str, title: str, steps: Sequence[Mapping[str, Any]]) -> str:
    """Per engine step: its tokens by kind stacked against the token budget, preemptions
    marked, the step's wall time below. Steps as the inspector gives them (``GET
    /inspect/state``'s ``steps``: ``decode``, ``prefill``, ``recompute``, ``spec``,
    ``budget``, ``preemptions``, ``duration_s``)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    xs = list(range(len(steps)))
    width = 1.0 if len(steps) > 200 else 0.8
    base = [0] * len(steps)
    for key, label, colour in STEP_KINDS:
        heights = [int(s.get(key, 0)) for s in steps]
        if any(heights):
            top.bar(xs, heights, width=width, bottom=base, color=colour, label=label, lw=0)
            base = [b + h for b, h in zip(base, heights, strict=True)]
    if any(s.get("budget") for s in steps):
        budgets = [int(s.get("budget") or 0) for s in steps]
        top.step(xs, budgets, where="mid", color="black", lw=1, label="token budget")
    preempted = [x for x, s in zip(xs, steps, strict=True) if s.get("preemptions")]
    if preempted:
        top.scatter(preempted, [0] * len(preempted), marker="^", color="red", label="preemption")
    top.set_ylabel("tokens in the step")
    top.set_title(title)
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(xs, [1e3 * float(s.get("duration_s", 0.0)) for s in steps], color="gray", lw=0.8)
    bottom.set_ylabel("step ms")
    bottom.set_xlabel("engine step")
    bottom.grid(alpha=0.3)
    return _save(fig, plt, path)


def mode_bars(
    path: str,
    title: str,
    ylabel: str,
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    baseline: str = "off",
) -> str:
    """Grouped bars: per workload (group), per mode, the median of its rounds (each round a
    dot), labelled with the ratio to ``baseline``'s median in the same group."""
    import statistics

    plt = _pyplot()
    modes = list(dict.fromkeys(m for g in groups.values() for m in g))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups)), 4.2))
    width = 0.8 / max(1, len(modes))
    for i, (mode, colour) in enumerate(zip(modes, _colours(len(modes)), strict=True)):
        for j, rounds in enumerate(groups.values()):
            values = list(rounds.get(mode, []))
            if not values:
                continue
            x, median = j + (i - (len(modes) - 1) / 2) * width, statistics.median(values)
            ax.bar(x, median, width=width * 0.9, color=colour, label=mode if j == 0 else None)
            ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
            base = list(rounds.get(baseline, []))
            if base and mode != baseline:
                ratio = median / statistics.median(base)
                ax.annotate(
                    f"{ratio:.2f}x",
                    (x, max(values)),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ serving runs
def token_times(request: Mapping[str, Any], origin: float) -> list[float]:
    """When each output token of a streamed request arrived, in s since ``origin``."""
    if not request.get("ok"):
        return []
    t = float(request["sent_at"]) - origin + float(request["ttft"])
    times = [t]
    for gap in request.get("itl") or []:
        t += float(gap)
        times.append(t)
    return times


def plot_serving_runs(
    out_dir: str,
    prefix: str,
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    title: Optional[str] = None,
) -> list[str]:
    """TTFT and ITL CDFs and throughput over time of streamed runs, one curve per run (each
    a list of per-request results as ``bench serve`` writes them), into ``out_dir``."""
    title = title or prefix
    ttft = {name: [r["ttft"] * 1e3 for r in rs if r.get("ok")] for name, rs in runs.items()}
    itl = {
        name: [g * 1e3 for r in rs if r.get("ok") for g in r.get("itl") or []]
        for name, rs in runs.items()
    }
    times = {}
    for name, rs in runs.items():
        sent = [float(r["sent_at"]) for r in rs if "sent_at" in r]
        origin = min(sent) if sent else 0.0
        times[name] = [t for r in rs if "sent_at" in r for t in token_times(r, origin)]
    return [
        latency_cdf(
            os.path.join(out_dir, f"{prefix}-ttft-cdf.png"),
            f"{title}: time to first token",
            "TTFT (ms)",
            ttft,
        ),
        latency_cdf(
            os.path.join(out_dir, f"{prefix}-itl-cdf.png"),
            f"{title}: inter-token latency",
            "ITL (ms)",
            itl,
        ),
        throughput_over_time(
            os.path.join(out_dir, f"{prefix}-throughput.png"), f"{title}: output throughput", times
        ),
    ]


# ------------------------------------------------------------- pagoda bench plot
def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN.json",
        help="bench serve --json files (their per-request results), one curve each",
    )
    parser.add_argument("--labels", default=None, help="comma-separated names, one per file")
    parser.add_argument("--plot", required=True, metavar="DIR", help="write the PNGs here")
    parser.add_argument("--name", default="compare", help="the PNGs' file-name prefix")
    parser.add_argument("--title", default=None)


def main(ns: argparse.Namespace) -> int:
    labels = ns.labels.split(",") if ns.labels else [os.path.basename(p) for p in ns.runs]
    if len(labels) != len(ns.runs):
        raise ValueError(f"--labels names {len(labels)} runs, {len(ns.runs)} files given")
    runs = {}
    for label, path in zip(labels, ns.runs, strict=True):
        with open(path) as f:
            data = json.load(f)
        if "requests" not in data:
            raise ValueError(f"{path}: no per-request results (write it with bench serve --json)")
        runs[label] = data["requests"]
    for written in plot_serving_runs(ns.plot, ns.name, runs, ns.title):
        print(written)
    return 0

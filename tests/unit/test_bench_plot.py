"""``--plot`` pictures (pagoda/bench/plot.py): the numbers behind them (empirical CDF,
throughput bins, token arrival times) and the files, from synthetic runs; ``pagoda bench
plot`` over bench serve JSON files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from pagoda.bench import plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _request(sent_at: float, ttft: float, itl: list[float], ok: bool = True) -> dict:
    return {"ok": ok, "sent_at": sent_at, "ttft": ttft, "itl": itl}


def test_the_numbers_behind_the_pictures():
    assert plot.cdf_points([3.0, 1.0, 2.0]) == ([1.0, 2.0, 3.0], [1 / 3, 2 / 3, 1.0])
    assert plot.throughput_bins([0.1, 0.5, 1.2, 2.9], 1.0) == ([0.0, 1.0, 2.0], [2.0, 1.0, 1.0])
    assert plot.throughput_bins([0.2, 0.3], 0.5) == ([0.0], [4.0])
    assert plot.throughput_bins([], 1.0) == ([], [])
    times = plot.token_times(_request(10.0, 0.5, [0.1, 0.2]), origin=9.0)
    assert times == pytest.approx([1.5, 1.6, 1.8])
    assert plot.token_times(_request(10.0, 0.5, [0.1], ok=False), origin=9.0) == []


def test_serving_runs_and_steps_are_drawn(tmp_path: Path):
    runs = {
        "on": [_request(100.0 + i, 0.05 * (i + 1), [0.01] * 5) for i in range(8)],
        "off": [_request(200.0 + i, 0.2 * (i + 1), [0.02] * 5) for i in range(8)],
    }
    written = plot.plot_serving_runs(str(tmp_path), "x", runs, "synthetic")
    assert [Path(p).name for p in written] == ["x-ttft-cdf.png", "x-itl-cdf.png",
                                               "x-throughput.png"]
    steps = [{"decode": i % 4, "prefill": 64 if i % 5 == 0 else 0, "recompute": 0, "spec": 0,
              "budget": 256, "preemptions": int(i == 7), "duration_s": 0.01} for i in range(30)]
    written.append(plot.step_composition(str(tmp_path / "steps.png"), "synthetic", steps))
    for p in written:
        data = Path(p).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, p


def test_bench_plot_compares_bench_serve_files(tmp_path: Path, capsys):
    from pagoda.entrypoints.cli import main

    files = []
    for name, ttft in (("a", 0.1), ("b", 0.3)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"results": {}, "requests": [
            _request(5.0 + i, ttft, [0.01, 0.02]) for i in range(4)]}))
        files.append(str(path))
    out = tmp_path / "pics"
    assert main(["bench", "plot", *files, "--labels", "chunked,whole", "--plot", str(out),
                 "--name", "chunked"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "chunked-itl-cdf.png", "chunked-throughput.png", "chunked-ttft-cdf.png"]
    capsys.readouterr()
    assert main(["bench", "plot", *files, "--labels", "one", "--plot", str(out)]) == 2
    assert "--labels names 1 runs, 2 files given" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": {}}))
    assert main(["bench", "plot", str(bad), "--plot", str(out)]) == 2
    assert "no per-request results" in capsys.readouterr().err


def test_mode_bars_and_a_cdf_in_other_units(tmp_path: Path):
    groups = {"batch 1": {"off": [10.0, 12.0, 11.0], "ngram": [40.0, 44.0, 42.0]},
              "W1": {"off": [100.0, 104.0], "ngram": [110.0, 108.0]}}
    bars = plot.mode_bars(str(tmp_path / "bars.png"), "spec", "tok/s", groups)
    cdf = plot.latency_cdf(str(tmp_path / "mask.png"), "masks", "us", {"mask": [30.0, 40.0]},
                           unit="us")
    for p in (bars, cdf):
        data = Path(p).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, p

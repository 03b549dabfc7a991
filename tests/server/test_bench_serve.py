"""``pagoda bench serve``: its pure parts, and a short run against the live server."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from pagoda.bench import serve as bench


def _ns(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    return parser.parse_args(list(argv))


def test_parse_goodput() -> None:
    assert bench.parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 0.5, "tpot": 0.05}
    for bad in (["ttft"], ["speed:5"], ["ttft:fast"], ["tpot:0"], ["e2el:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            bench.parse_goodput(bad)


def test_percentile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 90) == pytest.approx(4.6)
    assert bench.percentile(values, 100) == 5.0
    assert math.isnan(bench.percentile([], 99))


def test_datasets() -> None:
    mix = bench.make_dataset(_ns("--dataset", "long-mix", "--num-prompts", "50",
                                 "--long-input-len", "300"))
    longs = [r for r in mix if r.prompt_words == 300]
    assert 1 <= len(longs) < 25 and all(r.output_len == 16 for r in longs)
    assert all(len(r.prompt.split()) == r.prompt_words for r in mix)
    prefix = bench.make_dataset(_ns("--dataset", "prefix", "--num-prompts", "3",
                                    "--prefix-len", "20"))
    heads = {r.prompt.split("\nQuestion:")[0] for r in prefix}
    assert len(heads) == 1 and len({r.prompt for r in prefix}) == 3
    rnd = bench.make_dataset(_ns("--num-prompts", "20", "--input-len", "10",
                                 "--range-ratio", "0.5", "--seed", "3"))
    assert all(5 <= r.prompt_words <= 15 for r in rnd)
    assert rnd == bench.make_dataset(_ns("--num-prompts", "20", "--input-len", "10",
                                         "--range-ratio", "0.5", "--seed", "3"))
    # --shape-seed: the same lengths under another --seed, other words.
    a, b = (bench.make_dataset(_ns("--num-prompts", "20", "--input-len", "10", "--range-ratio",
                                   "0.5", "--seed", seed, "--shape-seed", "7"))
            for seed in ("1", "2"))
    assert [(r.prompt_words, r.output_len) for r in a] == [(r.prompt_words, r.output_len)
                                                            for r in b]
    assert len({r.prompt_words for r in a}) > 1 and all(len(r.prompt.split()) == r.prompt_words
                                                        for r in a)
    assert not {r.prompt for r in a} & {r.prompt for r in b}


def test_goodput_counts_requests_meeting_every_slo() -> None:
    fast = bench.RequestResult(ok=True, output_tokens=3, ttft=0.1, e2el=0.3, itl=[0.1, 0.1])
    slow = bench.RequestResult(ok=True, output_tokens=3, ttft=0.9, e2el=1.1, itl=[0.1, 0.1])
    failed = bench.RequestResult(ok=False, error="HTTP 429")
    report = bench.compute_report([fast, slow, failed], 2.0, {"ttft": 0.5, "tpot": 0.2})
    assert report["goodput"] == 0.5 and report["completed"] == 2 and report["failed"] == 1
    assert report["tpot_ms"]["mean"] == pytest.approx(100.0)


def test_bench_serve_against_the_server(server, tmp_path) -> None:
    out = tmp_path / "bench.json"
    ns = _ns("--base-url", server.url, "--num-prompts", "6", "--input-len", "8",
             "--output-len", "5", "--range-ratio", "0", "--request-rate", "50",
             "--goodput", "ttft:60000", "--probe-health-ms", "20", "--json", str(out),
             "--plot", str(tmp_path / "plots"))
    assert bench.main(ns) == 0
    # --plot: the CDFs, throughput over time, and the server's steps from its inspector
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["serve-itl-cdf.png", "serve-steps.png", "serve-throughput.png",
                    "serve-ttft-cdf.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    report = json.loads(out.read_text())["results"]
    assert report["completed"] == 6 and report["failed"] == 0
    assert report["total_output_tokens"] == 30
    assert report["goodput"] > 0
    assert report["itl_ms"]["p99"] >= report["itl_ms"]["p50"] > 0
    chat_out = tmp_path / "chat.json"
    chat = bench.main(_ns("--base-url", server.url, "--endpoint", "chat", "--num-prompts", "2",
                          "--output-len", "3", "--range-ratio", "0", "--json", str(chat_out)))
    assert chat == 0
    chat_report = json.loads(chat_out.read_text())
    assert chat_report["args"]["endpoint"] == "chat"
    results = chat_report["results"]
    assert results["completed"] == 2 and results["failed"] == 0
    assert results["total_output_tokens"] == 6
    assert all(r["ok"] and r["output_tokens"] == 3 and r["ttft"] > 0
               for r in chat_report["requests"])

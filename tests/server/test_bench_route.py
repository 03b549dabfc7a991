"""``pagoda bench route`` end to end on the tiny model: each policy's run starts its replicas
and router, serves every request of the same workload, and reports the replicas' hit rate;
its JSON has the fields the docs' tables come from, and their counts add up. (Which policy
hits more is the benchmark's to measure, not a test's: twelve requests decide nothing.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

N_PROMPTS, OUTPUT_LEN = 12, 4


def test_bench_route_tiny(tiny_model_dir: str, tmp_path: Path) -> None:
    from pagoda.entrypoints.cli import main

    out = tmp_path / "route.json"
    rc = main(["bench", "route", "--serve-model", tiny_model_dir, "--num-prompts",
               str(N_PROMPTS), "--request-rate", "20", "--num-prefixes", "2",
               "--prefix-words", "60", "--suffix-words", "4", "--output-len", str(OUTPUT_LEN),
               "--num-kv-blocks", "512", "--policies", "round_robin,cache_aware",
               "--log-dir", str(tmp_path / "logs"), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["args"]["policies"] == "round_robin,cache_aware"
    results = report["results"]
    assert set(results) == {"round_robin", "cache_aware"}
    for r in results.values():
        assert r["completed"] == N_PROMPTS and r["failed"] == 0 and not r["errors"]
        assert r["total_output_tokens"] == N_PROMPTS * OUTPUT_LEN  # (ignore_eos)
        assert 0 <= r["hit_rate"] <= 1
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
        assert r["request_throughput"] * r["duration_s"] == pytest.approx(N_PROMPTS)
    # The same prompts went through each policy's router: the replicas counted them alike.
    assert len({r["total_input_tokens"] for r in results.values()}) == 1

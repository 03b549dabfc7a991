"""``pagoda bench route`` end to end on the tiny model: each policy's run starts its replicas
and router, serves every request, and reports the replicas' hit rates; cache-aware routing
of two shared prefixes finds them more often than round robin."""
from __future__ import annotations

import json
from pathlib import Path


def test_bench_route_tiny(tiny_model_dir: str, tmp_path: Path) -> None:
    from pagoda.entrypoints.cli import main

    out = tmp_path / "route.json"
    rc = main(["bench", "route", "--serve-model", tiny_model_dir, "--num-prompts", "12",
               "--request-rate", "20", "--num-prefixes", "2", "--prefix-words", "60",
               "--suffix-words", "4", "--output-len", "4", "--num-kv-blocks", "512",
               "--policies", "round_robin,cache_aware", "--log-dir", str(tmp_path / "logs"),
               "--json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"round_robin", "cache_aware"}
    for r in results.values():
        assert r["completed"] == 12 and r["failed"] == 0
        assert 0 < r["hit_rate"] <= 1
    assert results["cache_aware"]["hit_rate"] > results["round_robin"]["hit_rate"]

"""Tests of ``pagoda bench throughput``: the length parser, the FLOP accounting, a tiny run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pagoda.bench import flops  # noqa: E402
from pagoda.bench.throughput import make_workload, parse_len_range, token_id_range  # noqa: E402


@pytest.mark.parametrize("text, expected", [("64:512", (64, 512)), ("7", (7, 7)),
                                            (" 3:3 ", (3, 3)), ("1:2", (1, 2))])
def test_parse_len_range_good(text: str, expected: tuple[int, int]) -> None:
    assert parse_len_range(text, "--input-len") == expected


@pytest.mark.parametrize("text", ["", "a", "1:b", "1:2:3", "0:4", "-1", "9:3", ":5", "5:"])
def test_parse_len_range_bad_names_the_argument(text: str) -> None:
    with pytest.raises(ValueError, match="--output-len"):
        parse_len_range(text, "--output-len")


def test_request_flops_by_hand() -> None:
    shape = flops.ModelShape(params_non_embedding=1000, hidden_size=8, vocab_size=10,
                             num_layers=2, num_heads=2, head_dim=4)
    # linear 2*1000*(3+2) = 10000; logits 2*8*10*2 = 320;
    # attention 4*2*4*2 = 64 per unit of context, contexts 1..5 sum to 15 -> 960.
    assert flops.request_flops(shape, 3, 2) == 11280
    # and a (1 prompt, 1 output) request: linear 2*1000*2, logits 160, contexts 1..2 -> 64*3.
    assert flops.workload_flops(shape, [3, 1], [2, 1]) == 11280 + (2 * 1000 * 2 + 160 + 64 * 3)


def test_workload_flops_length_mismatch() -> None:
    shape = flops.ModelShape(1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        flops.workload_flops(shape, [1, 2], [1])


def test_workload_is_deterministic_and_in_range() -> None:
    a = make_workload(20, (5, 9), (2, 4), vocab_size=1000, seed=3)
    b = make_workload(20, (5, 9), (2, 4), vocab_size=1000, seed=3)
    assert a == b
    lo, hi = token_id_range(1000)
    assert all(5 <= len(p) <= 9 and all(lo <= t < hi for t in p) for p in a.prompts)
    assert all(2 <= n <= 4 for n in a.output_lens)


def test_tiny_end_to_end(tmp_path: Path) -> None:
    from tiny_models import make_model

    from pagoda.entrypoints.cli import main

    model = make_model(str(tmp_path / "tiny"))
    out = tmp_path / "bench.json"
    rc = main(["bench", "throughput", "--model", model, "--num-prompts", "4",
               "--input-len", "8:16", "--output-len", "4:8", "--dtype", "float32",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("command", "machine", "engine_args", "dtype", "workload", "matmul",
                "limit_flops_per_s", "pagoda", "hf"):
        assert key in report
    assert report["dtype"] == "float32"
    assert report["hf"] is None
    assert report["async_scheduling"] is False            # the CPU default
    expected = sum(make_workload(4, (8, 16), (4, 8), 384, seed=0).output_lens)
    assert report["workload"]["output_tokens"] == expected
    result = report["pagoda"]
    assert result["output_tokens"] == expected
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "peak_rss_mib",
                "fraction_of_limit", "limit_output_tokens_per_s"):
        assert result[key] > 0


def test_bad_range_returns_error_status(capsys: pytest.CaptureFixture) -> None:
    from pagoda.entrypoints.cli import main

    rc = main(["bench", "throughput", "--model", "unused", "--input-len", "9:3"])
    assert rc == 2
    assert "--input-len" in capsys.readouterr().err


def test_cached_tokens_cost_no_linear_or_earlier_attention_flops() -> None:
    shape = flops.ModelShape(params_non_embedding=1000, hidden_size=8, vocab_size=10,
                             num_layers=2, num_heads=2, head_dim=4)
    # (3 prompt, 2 output) with 2 prompt tokens cached: linear 2*1000*3, logits 320,
    # attention 64 per unit of context over contexts 3..5 = 12 -> 768.
    assert flops.request_flops(shape, 3, 2, cached_len=2) == 6000 + 320 + 768


def test_prefix_bench_tiny_run_counts_hits_exactly(tmp_path: Path) -> None:
    from tiny_models import make_model

    from pagoda.entrypoints.cli import main

    model = make_model(str(tmp_path / "tiny"))
    out = tmp_path / "prefix.json"
    rc = main(["bench", "prefix", "--model", model, "--dtype", "float32", "--block-size", "16",
               "--num-prefixes", "2", "--prefix-len", "40", "--suffix-len", "5",
               "--requests-per-prefix", "3", "--output-len", "3", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    on, off = report["shared_caching_on"], report["shared_caching_off"]
    # Per prefix, the 2 later requests reuse its 2 full blocks (32 of its 40 tokens).
    assert on["cached_tokens"] == 2 * 2 * 32 and on["prompt_tokens"] == 6 * 45
    assert on["hit_rate"] == pytest.approx(128 / (6 * 45))
    assert off["cached_tokens"] == 0 and off["hit_rate"] == 0
    assert report["unique_caching_on"]["cached_tokens"] == 0
    assert on["computed_flops"] < off["computed_flops"]
    for key in ("ttft_mean_off_over_on", "ttft_p99_off_over_on", "throughput_on_over_off"):
        assert report["shared_ratios"][key] > 0

"""Tests of ``pagoda bench throughput``: the length parser, the FLOP accounting, a tiny run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pagoda.bench import flops  # noqa: E402
from pagoda.bench.common import make_workload, parse_len_range, token_id_range  # noqa: E402


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
    assert report["memory_read_bytes_per_s"] > 0
    phase = result["phases"]
    prompts = make_workload(4, (8, 16), (4, 8), 384, seed=0)
    # Every output token but each request's first (sampled by its prefill step) is a decode.
    assert phase["prefill_steps"] >= 1 and phase["decode_steps"] >= 1
    assert phase["decode_tokens"] <= expected - len(prompts.prompts)
    assert phase["prefill_s"] + phase["decode_s"] <= result["elapsed_s"]
    for key in ("prefill_fraction_of_limit", "decode_fraction_of_limit"):
        assert 0 < phase[key]


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


def test_phase_accounting_by_hand() -> None:
    """A prefill step (two prompts) and a decode step, summed against their own limits."""
    from types import SimpleNamespace

    import torch

    from pagoda.bench import phases

    shape = flops.ModelShape(params_non_embedding=1000, hidden_size=8, vocab_size=10,
                             num_layers=2, num_heads=2, head_dim=4)
    new = [SimpleNamespace(request_id="a", num_computed_tokens=0),
           SimpleNamespace(request_id="b", num_computed_tokens=2)]
    sched = SimpleNamespace(new_requests=new, cached_requests=[],
                            num_scheduled_tokens={"a": 3, "b": 1})
    seqs, tokens, context, attention = phases._step_shape(sched, shape)
    # a: positions 1..3 (6), b: position 3 (3); 4 * 2 * 4 * 2 = 64 per position.
    assert (seqs, tokens, context, attention) == (2, 4, 6, 64 * 9)
    arch = SimpleNamespace(num_params_non_embedding=1000, vocab_size=10, hidden_size=8,
                           num_layers=2, num_kv_heads=1, head_dim=4)
    steps = [phases.Step(2, 4, 6, 64 * 9, seconds=0.5), phases.Step(2, 2, 10, 64 * 10, 0.25)]
    got = phases.summarize(steps, arch, torch.float32, torch.bfloat16, shape,
                           limit_flops_per_s=1e4, read_limit_bytes_per_s=1e5)
    prefill_flops = 2 * 1000 * 4 + 64 * 9 + 2 * 8 * 10 * 2
    assert got["prefill_flops"] == prefill_flops
    assert got["prefill_fraction_of_limit"] == pytest.approx(prefill_flops / 0.5 / 1e4)
    # weights (1000 + 10 * 8) fp32, then 10 context tokens x 2 layers x K,V x 4 dims x bf16
    decode_bytes = 4 * 1080 + 10 * 2 * 2 * 4 * 2
    assert got["decode_bytes"] == decode_bytes
    assert got["decode_fraction_of_limit"] == pytest.approx(decode_bytes / 0.25 / 1e5)
    # A weight-bytes function (the forms a step runs) replaces the dense estimate.
    quantized = phases.summarize(steps, arch, torch.float32, torch.bfloat16, shape,
                                 limit_flops_per_s=1e4, read_limit_bytes_per_s=1e5,
                                 weight_bytes=lambda rows: 100 * rows)
    assert quantized["decode_bytes"] == 200 + 10 * 2 * 2 * 4 * 2


def test_model_weight_bytes_follow_the_forms_a_step_runs(tmp_path: Path, monkeypatch) -> None:
    """A tiny llama with 4-bit layers for steps of at most 2 rows: a 1-row step reads their
    4-bit codes, scales and zeros, a 3-row step their dense weights; norms and the output
    projection either way."""
    from tiny_models import make_model

    from pagoda import LLM
    from pagoda.bench import phases
    from pagoda.models import cpu_int4

    monkeypatch.setenv("PAGODA_INT4_MAX_ROWS", "2")
    monkeypatch.setenv("PAGODA_PACKED_LINEAR", "0")
    path = make_model(str(tmp_path / "tiny"), "llama", seed=1)
    model = LLM(path, dtype="float32", quantization="int4").engine.model_runner.model
    read = phases.model_weight_bytes(model)
    quantized = [m for m in model.layers.modules() if isinstance(m, cpu_int4.Int4Linear)]
    assert quantized and model.packed_head is None
    dense = sum(p.numel() * 4 for p in model.layers.parameters())  # the dense copies included
    head = model.output_weight.numel() * 4
    assert read(3) == dense + head
    small = sum(m.int4.packed.numel() * m.int4.packed.element_size()
                + m.int4.scale_zeros.numel() * 4 for m in quantized)
    dense_linears = sum(m.dense.weight.numel() * 4 for m in quantized)
    assert read(1) == dense - dense_linears + small + head < read(3)


def test_spec_bench_tiny_run(tmp_path: Path) -> None:
    """pagoda bench spec end to end on a tiny model in fp32: every mode reports a rate, and
    speculation's greedy tokens equal no speculation's in every workload."""
    from tiny_models import make_model

    from pagoda.entrypoints.cli import main

    model = make_model(str(tmp_path / "tiny"))
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", model, "--dtype", "float32", "--rounds", "1",
               "--output-len", "24", "--batch-size", "3", "--w1-num-prompts", "4",
               "--w1-input-len", "8:16", "--w1-output-len", "4:8", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    for workload in ("grounded_batch1", "grounded_batch", "w1"):
        modes = report[workload]
        assert set(modes) == {"off", "ngram", "suffix"}
        for mode in modes.values():
            assert mode["median"] > 0 and mode["ratio"] > 0
            same, total = mode["identical_to_off"]
            assert same == total > 0, workload
    assert report["cost_model"]["base_s"] > 0
    assert report["proposal"]["ngram"]["calls"] > 0


BENCH_MODULES_LOADED = (
    "import sys; from pagoda.entrypoints import cli; cli.build_parser({name!r}); "
    "print(sorted(m for m in sys.modules if m.startswith('pagoda.bench.')))"
)


@pytest.mark.parametrize("argv, loaded", [
    (["serve", "--port", "0"], []),
    (["--log-level", "INFO", "bench", "spec", "--rounds", "1"], ["pagoda.bench.spec"]),
    (["bench", "plot", "a.json"], ["pagoda.bench.plot"]),
])
def test_the_cli_imports_only_the_bench_that_runs(argv: list[str], loaded: list[str]) -> None:
    """`pagoda serve` imports no benchmark; `pagoda bench NAME` imports NAME's module (and
    what it imports itself)."""
    import ast
    import subprocess

    from pagoda.entrypoints.cli import bench_named

    name = bench_named(argv)
    out = subprocess.run([sys.executable, "-c", BENCH_MODULES_LOADED.format(name=name)],
                         capture_output=True, text=True, check=True).stdout
    modules = ast.literal_eval(out)  # the list of names the child printed
    assert all(m in modules for m in loaded), modules
    if not loaded:
        assert modules == []
    else:
        assert "pagoda.bench.route" not in modules and "pagoda.bench.disagg" not in modules

"""The GPU benchmark's accounting (bench/gpu.py), checked on the CPU: bandwidth by device
name, bytes per decode step, and the decode-step monitor around a real runner."""
from __future__ import annotations

import pytest
import torch

from pagoda.bench import gpu
from pagoda.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from pagoda.models.loader import load_model
from pagoda.models.presets import preset_arch
from pagoda.sampling import SamplingParams
from pagoda.models.prepare import prepare_model
from pagoda.worker.model_runner import ModelRunner
from runner_driver import run_greedy


@pytest.mark.parametrize("name, tbs", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H200", 4.8),
                                       ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9),
                                       ("NVIDIA A100-SXM4-80GB", 2.039)])
def test_bandwidth_by_device_name(name, tbs):
    assert gpu.gpu_bandwidth_tbs(name) == tbs


def test_bandwidth_override_and_unknown():
    assert gpu.gpu_bandwidth_tbs("NVIDIA H100 80GB HBM3", 3.0) == 3.0
    assert gpu.gpu_bandwidth_tbs("Some Future GPU") is None


def test_decode_bytes_for_qwen3_06b():
    arch = preset_arch("qwen3-0.6b")
    # 0.44B layer weights + the 151936 x 1024 logits matrix, in bf16.
    assert gpu.weight_bytes_per_step(arch, torch.bfloat16) == 2 * (440_401_920 + 151936 * 1024)
    # 28 layers x K,V x 8 heads x 128 x 2 bytes.
    assert gpu.kv_bytes_per_token(arch, torch.bfloat16) == 28 * 2 * 8 * 128 * 2


def test_summarize_fraction():
    arch = preset_arch("qwen3-0.6b")
    w = gpu.weight_bytes_per_step(arch, torch.bfloat16)
    kv = gpu.kv_bytes_per_token(arch, torch.bfloat16)
    steps = [gpu.DecodeStep(2, 1000, (w + 1000 * kv) / 1e12)] * 3
    out = gpu.summarize(steps, arch, torch.bfloat16, 2.0)
    assert out["median_fraction_of_bandwidth"] == pytest.approx(0.5)
    assert out["aggregate_fraction_of_bandwidth"] == pytest.approx(0.5)
    assert gpu.summarize([], arch, torch.bfloat16, 2.0) == {"decode_steps": 0}


def test_monitor_counts_decode_steps_and_contexts():
    loaded = load_model(None, torch.float32, torch.device("cpu"), load_format="dummy",
                        model_preset="tiny-llama")
    runner = ModelRunner(prepare_model(loaded.model, torch.device("cpu"), torch.float32), 16, 16)
    with gpu.DecodeStepMonitor(runner) as mon:
        run_greedy(runner, [[1, 2, 3], list(range(10, 30))], 4)
    # The prefill step is not a decode step; the 3 decode steps see contexts 4+21, 5+22, 6+23.
    assert [(s.batch, s.context_tokens) for s in mon.steps] == [(2, 25), (2, 27), (2, 29)]
    assert runner.launch.__func__ is ModelRunner.launch
    assert runner.collect.__func__ is ModelRunner.collect
    assert all(s.seconds > 0 for s in mon.steps)


def test_monitor_times_pipelined_steps_from_read_to_read(monkeypatch):
    """Async scheduling: step N+1 is launched before N is read; a decode step's time runs
    from the read before it to its own read."""
    loaded = load_model(None, torch.float32, torch.device("cpu"), load_format="dummy",
                        model_preset="tiny-llama")
    runner = ModelRunner(prepare_model(loaded.model, torch.device("cpu"), torch.float32), 16, 16)
    clock = iter(float(t) for t in range(100, 200, 10))
    monkeypatch.setattr(gpu.time, "perf_counter", lambda: next(clock))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with gpu.DecodeStepMonitor(runner) as mon:
        prefill = runner.launch(SchedulerOutput(
            [NewRequestData("a", [1, 2, 3], 3, params, (), [0], 0)], [], {"a": 3}))
        first = runner.launch(SchedulerOutput([], [CachedRequestData("a", [], 3)], {"a": 1}))
        runner.collect(prefill)                      # read at 100
        second = runner.launch(SchedulerOutput([], [CachedRequestData("a", [], 4)], {"a": 1}))
        runner.collect(first)                        # 110
        runner.collect(second)                       # 120
    assert [(s.batch, s.context_tokens, s.seconds) for s in mon.steps] == [(1, 4, 10.0),
                                                                           (1, 5, 10.0)]

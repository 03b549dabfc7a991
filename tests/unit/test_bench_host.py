"""``pagoda bench host``: the null-model engine completes every request on the runner's CUDA
input path, and the report's arithmetic (device floor, buckets, phases) is right."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from pagoda.bench import gpu, host
from pagoda.bench.host import StepRecord, summarize
from pagoda.models.presets import preset_arch
from pagoda.sampling import SamplingParams


def args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    host.add_args(parser)
    ns = parser.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_null_engine_runs_decodes_through_padded_graphs(monkeypatch):
    ns = args(max_num_seqs=6, block_size=16)
    llm = host.null_engine_llm(ns, max_model_len=128)
    graphs = llm.engine.runner.graphs
    assert graphs.sizes == [1, 2, 4, 6]
    batches: list[int] = []
    real_run = graphs.run

    def counting_run(input_ids, *rest, **kw):
        batches.append(len(input_ids))
        return real_run(input_ids, *rest, **kw)

    monkeypatch.setattr(graphs, "run", counting_run)
    prompts = [[50 + i] * (10 + 7 * i) for i in range(5)]
    lens = [3, 9, 5, 12, 7]
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                                  for n in lens], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == lens
    assert 5 in batches and 3 in batches, batches    # padded into the graphs of 6 and 4
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks   # nothing leaked


def test_summarize_device_floor_and_buckets():
    arch = preset_arch("qwen3-0.6b")
    steps = [StepRecord(1, 0, 600, 0.002, {"schedule": 0.001, "runner": 0.0005,
                                           "update": 0.0002, "outputs": 0.0003}),
             StepRecord(40, 0, 40_000, 0.004, {"runner": 0.004}),
             StepRecord(3, 512, 900, 0.010, {"runner": 0.010})]   # mixed: no decode stats
    r = summarize(steps, output_tokens=44, elapsed=0.02, arch=arch, bandwidth_tbs=2.0)
    weights = gpu.weight_bytes_per_step(arch, torch.bfloat16)
    per_token = gpu.kv_bytes_per_token(arch, torch.bfloat16)
    assert per_token == 28 * 2 * 8 * 128 * 2
    floor = (2 * weights + 40_600 * per_token) / 2e12
    assert r["decode_only_steps"] == 2
    assert r["decode_device_floor_s"] == pytest.approx(floor)
    assert r["host_over_device_floor"] == pytest.approx(0.006 / floor)
    assert r["decode_tokens_per_s_host_plus_floor"] == pytest.approx(41 / (0.006 + floor))
    assert r["host_ceiling_output_tokens_per_s"] == pytest.approx(44 / 0.02)
    assert r["decode_host_ms_by_batch"] == {"1-7": {"steps": 1, "median_ms": pytest.approx(2.0)},
                                            "32-63": {"steps": 1,
                                                      "median_ms": pytest.approx(4.0)}}
    assert r["phase_seconds"] == pytest.approx({"schedule": 0.001, "runner": 0.0145,
                                                "update": 0.0002, "outputs": 0.0003})


def test_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "host.json"
    ns = args(num_prompts=6, input_len="20:60", output_len="4:24", max_num_seqs=4,
              json=str(out))
    assert host.main(ns) == 0
    text = capsys.readouterr().out
    assert "host / device floor" in text and "host-only output tokens/s" in text
    report = json.loads(out.read_text())["host"]
    assert report["steps"] > 0 and report["decode_only_steps"] > 0
    assert report["output_tokens"] >= 6 * 4
    assert report["output_tokens"] <= 6 * 24
    # The phases split the steps' time, and the steps run inside the timed run: an ordering
    # of nested intervals, whatever the machine's speed.
    phases = report["phase_seconds"]
    assert set(phases) == {"schedule", "runner", "update", "outputs"}
    assert all(sec >= 0 for sec in phases.values()), phases
    assert 0 < sum(phases.values()) <= report["elapsed_s"] * (1 + 1e-9)
    assert report["host_over_device_floor"] > 0


def test_command_with_simulated_device_compares_sync_and_async(tmp_path, capsys):
    out = tmp_path / "host.json"
    ns = args(num_prompts=6, input_len="20:60", output_len="4:24", max_num_seqs=4,
              json=str(out), simulate_device=True)
    assert host.main(ns) == 0
    assert "async / sync output tok/s" in capsys.readouterr().out
    runs = json.loads(out.read_text())["simulated_device"]
    assert [r["async_scheduling"] for r in runs] == [False, True]
    for r in runs:
        assert 0 < r["device_busy_s"] and 0 < r["device_busy_fraction"] <= 1.0


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now

    def wait_until(self, deadline):
        self.now = max(self.now, deadline)


class FakeHandle:
    def __init__(self, samplers):
        self.samplers = samplers


class FakeRunner:
    def __init__(self, clock):
        self.clock, self.collected_at = clock, []

    def launch(self, sched):
        return FakeHandle(["r"] if sched.num_scheduled_tokens else [])

    def collect(self, handle):
        self.collected_at.append(self.clock.now)


def decode_step(context: int):
    from pagoda.core.outputs import CachedRequestData, SchedulerOutput

    return SchedulerOutput([], [CachedRequestData("r", [], context - 1)], {"r": 1})


def test_simulated_device_queues_steps_and_reading_waits(monkeypatch):
    """Launches queue on the virtual device; reading a step's tokens waits for its end."""
    clock = FakeClock()
    monkeypatch.setattr(host.time, "perf_counter", clock.perf_counter)
    arch = preset_arch("qwen3-0.6b")
    runner = FakeRunner(clock)
    device = host.SimulatedDevice(runner, arch, bandwidth_tbs=2.0, tflops=100.0)
    monkeypatch.setattr(device, "wait_until", clock.wait_until)
    step = decode_step(1000)
    seconds = device.step_seconds(step)
    weights = gpu.weight_bytes_per_step(arch, torch.bfloat16)
    per_token = gpu.kv_bytes_per_token(arch, torch.bfloat16)
    assert seconds == pytest.approx((weights + 1000 * per_token) / 2e12)
    device.install()
    first = runner.launch(step)              # t = 100: runs [100, 100 + s)
    clock.now += seconds / 2
    second = runner.launch(step)             # queued behind the first: ends at 100 + 2s
    runner.collect(first)
    assert clock.now == pytest.approx(100 + seconds)
    clock.now += seconds / 4                 # host work overlapping the second step
    runner.collect(second)
    assert clock.now == pytest.approx(100 + 2 * seconds)
    assert device.busy_s == pytest.approx(2 * seconds)
    clock.now += 5 * seconds                 # an idle device: a late launch starts at once
    third = runner.launch(step)
    runner.collect(third)
    assert clock.now == pytest.approx(100 + 8 * seconds)


def test_simulated_prefill_step_is_bound_by_compute():
    arch = preset_arch("qwen3-0.6b")
    from pagoda.core.outputs import NewRequestData, SchedulerOutput

    prefill = SchedulerOutput([NewRequestData("p", [1] * 2048, 2048, SamplingParams(), (), [],
                                              0)], [], {"p": 2048})
    device = host.SimulatedDevice(None, arch, bandwidth_tbs=3.35, tflops=989.0)
    weights = gpu.weight_bytes_per_step(arch, torch.bfloat16)
    assert device.step_seconds(prefill) == pytest.approx(weights * 2048 / 989e12)


@pytest.mark.parametrize("bad", [{"num_prompts": 0}, {"gpu_bandwidth_tbs": 0.0},
                                 {"gpu_tflops": -1.0}, {"input_len": "9:3"}])
def test_bad_arguments_are_named(bad):
    with pytest.raises(ValueError, match="|".join(k.replace("_", "-") for k in bad)):
        host.main(args(**bad))

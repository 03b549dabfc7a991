"""``pagoda bench host``: the engine's host time per step, with the model's work taken out.

On a GPU, a step is host work (schedule, build the inputs, read the sampled tokens, update
the requests, detokenize) and then device work (the forward); the two do not overlap, so
at large batches the host part alone can cap the output tokens/s. This command runs the
engine's whole step loop on the workload of ``bench throughput`` with a null model: every
forward returns zeros of the right shape, and decode-only steps go through the runner's CUDA
input path (CUDA-graph batch padding, one host buffer) with replays that do nothing. What
remains is the host's time. It runs on any machine, so the host side of the GPU target can
be measured without a GPU.

Printed: the host time per step (by decode batch size, and split into schedule / runner /
update / outputs), the output tokens/s the host alone allows, and, for the decode-only
steps, the device's least time for them (weights + KV read at the GPU's bandwidth, for the
shapes of ``--model-preset``), so host / device-floor says how much the host would add.

``--simulate-device`` adds the device's time back as a stand-in: each launched step keeps a
virtual GPU busy for its floor, queued behind the steps before it, and reading its tokens
waits until it is done. The workload then runs with synchronous steps and with async
scheduling, and the two are compared: how much of the host's time async scheduling hides.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch

from pagoda.bench import gpu
from pagoda.bench.common import (
    check_outputs,
    machine_info,
    parse_len_range,
    row,
    token_id_range,
    write_json,
)
from pagoda.config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS
from pagoda.core.outputs import SchedulerOutput
from pagoda.models.presets import preset_arch, preset_config, preset_names
from pagoda.sampling import SamplingParams
from pagoda.utils import cdiv
from pagoda.worker.cuda_graph import DecodeGraphs, _Graph

NULL_SHAPE = "tiny-qwen3"  # the null model's own shapes: small, so the host's work
NULL_LAYERS = 1  # (the CPU's argmax over its vocabulary) stays small
H100_SXM_TBS = 3.35
H100_SXM_BF16_TFLOPS = 989.0  # dense bf16 tensor-core peak
BUCKETS = (1, 8, 32, 64, 128, 256)
PHASES = ("schedule", "runner", "update", "outputs")


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=256)
    g.add_argument("--input-len", default="100:1024", help="N, or LO:HI (uniform random)")
    g.add_argument("--output-len", default="100:1024", help="N, or LO:HI (uniform random)")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS)
    g.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    g.add_argument(
        "--model-preset",
        default="qwen3-0.6b",
        choices=preset_names(),
        help="the shapes whose device time the host time is set against",
    )
    g.add_argument(
        "--gpu-bandwidth-tbs",
        type=float,
        default=H100_SXM_TBS,
        help="the GPU's memory bandwidth for the device floor (default: H100 SXM)",
    )
    g.add_argument(
        "--simulate-device",
        action="store_true",
        help="add each step's device floor as a virtual GPU's busy time, and "
        "compare synchronous steps with async scheduling",
    )
    g.add_argument(
        "--gpu-tflops",
        type=float,
        default=H100_SXM_BF16_TFLOPS,
        help="the GPU's bf16 peak for the floor of prefill steps (default: H100 SXM)",
    )
    g.add_argument("--json", default=None, metavar="PATH", help="write every number here")


# --------------------------------------------------------------------------- the null model
class _NoReplay:
    """A captured graph that does nothing when replayed."""

    def replay(self) -> None:
        pass

    def pool(self) -> None:
        return None


class NullDecodeGraphs(DecodeGraphs):
    """The runner's CUDA-graph path (padding, static buffers) with empty graphs."""

    def _capture_one(self, size: int, pool: Any) -> _Graph:
        head, tables = self._static_inputs(size)
        hidden = torch.zeros(size, self.model.arch.hidden_size, dtype=torch.bfloat16)
        # A stand-in for a torch.cuda.CUDAGraph: it has what DecodeGraphs calls of one.
        return _Graph(cast(torch.cuda.CUDAGraph, _NoReplay()), head, tables, hidden)


def null_engine_llm(
    ns: argparse.Namespace, max_model_len: int, async_scheduling: bool = False
) -> Any:
    """An engine on the CPU whose model does no work, its runner on the CUDA input path."""
    from pagoda.entrypoints.llm import LLM

    config = preset_config(NULL_SHAPE)
    config.update(num_hidden_layers=NULL_LAYERS, max_position_embeddings=max_model_len)
    blocks = ns.max_num_seqs * cdiv(max_model_len, ns.block_size)  # no preemption
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        llm = LLM(
            model=tmp,
            load_format="dummy",
            device="cpu",
            dtype="bfloat16",
            max_model_len=max_model_len,
            max_num_seqs=ns.max_num_seqs,
            max_num_batched_tokens=ns.max_num_batched_tokens,
            block_size=ns.block_size,
            num_kv_blocks=blocks,
            async_scheduling=async_scheduling,
        )
    runner = llm.engine.model_runner
    model = runner.model
    hidden_size = model.arch.hidden_size

    def null_forward(input_ids: torch.Tensor, *_: Any) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], hidden_size, dtype=torch.bfloat16)

    module = cast(torch.nn.Module, model)  # nn.Module's forward is an attribute: set it here
    module.forward = null_forward
    runner.is_cuda = True  # the packed-buffer input path and CUDA-graph padding
    runner.graphs = NullDecodeGraphs(
        model,
        runner.kv_caches,
        runner.block_size,
        min(ns.max_num_seqs, blocks),
        max_model_len,
        runner.device,
    )
    runner.graphs.capture()
    return llm


# ---------------------------------------------------------------------------- measurement
@dataclass
class StepRecord:
    decodes: int  # rows of one token
    prefill_tokens: int
    context_tokens: int  # decode-only steps: the batch's context (new token included)
    seconds: float
    phases: dict[str, float]


@dataclass
class StepTimer:
    """Times each engine step and the parts of it (instrumentation only)."""

    engine: Any
    steps: list[StepRecord] = field(default_factory=list)
    _phase: dict[str, float] = field(default_factory=dict)
    _shape: tuple[int, int, int] = (0, 0, 0)

    def install(self) -> None:
        e = self.engine
        e.scheduler.schedule = self._timed("schedule", self._noting_shape(e.scheduler.schedule))
        e.runner.launch = self._timed("runner", e.runner.launch)
        e.runner.collect = self._timed("runner", e.runner.collect)
        e.scheduler.update_from_output = self._timed("update", e.scheduler.update_from_output)
        e.step = self._timed_step(e.step)

    def _timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._phase[name] = self._phase.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    def _noting_shape(self, schedule: Callable[[], SchedulerOutput]) -> Callable:
        def wrapper() -> SchedulerOutput:
            sched = schedule()
            counts = sched.num_scheduled_tokens
            decodes = sum(1 for n in counts.values() if n == 1)
            prefill = sum(n for n in counts.values() if n > 1)
            # (the context is used for decode-only steps, where it is the whole step's)
            self._shape = (decodes, prefill, gpu.context_tokens(sched) if not prefill else 0)
            return sched

        return wrapper

    def _timed_step(self, step: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._phase, self._shape = {}, (0, 0, 0)
            start = time.perf_counter()
            result = step(*args, **kwargs)
            seconds = time.perf_counter() - start
            phases = dict(self._phase)
            phases["outputs"] = seconds - sum(phases.values())
            self.steps.append(StepRecord(*self._shape, seconds, phases))
            return result

        return wrapper


class SimulatedDevice:
    """A stand-in for the GPU's time. Each launched step keeps a virtual device busy for its
    floor: the weights and the batch's KV read at the bandwidth, or its matmul FLOPs at the
    peak, whichever is longer; a step starts when the host launches it or when the step
    before it ends, whichever is later. Reading a step's tokens waits until it is done, as
    waiting on the real device would. So the host overlaps the device exactly as far as the
    engine lets it."""

    def __init__(self, runner: Any, arch: Any, bandwidth_tbs: float, tflops: float) -> None:
        self.runner, self.arch = runner, arch
        self.weight_bytes = gpu.weight_bytes_per_step(arch, torch.bfloat16)
        self.bytes_per_s = bandwidth_tbs * gpu.TB
        self.flops_per_s = tflops * 1e12
        self.free_at = 0.0  # when the virtual device finishes its queue
        self.busy_s = 0.0
        self._done_at: dict[int, float] = {}

    def install(self) -> None:
        launch, collect = self.runner.launch, self.runner.collect

        def timed_launch(sched: SchedulerOutput) -> Any:
            handle = launch(sched)
            seconds = self.step_seconds(sched)
            if seconds:
                self.free_at = max(time.perf_counter(), self.free_at) + seconds
                self.busy_s += seconds
                self._done_at[id(handle)] = self.free_at
            return handle

        def waiting_collect(handle: Any) -> Any:
            done_at = self._done_at.pop(id(handle), 0.0)
            if handle.samplers:  # reading tokens waits; a step with none is not read
                self.wait_until(done_at)
            return collect(handle)

        self.runner.launch, self.runner.collect = timed_launch, waiting_collect

    @staticmethod
    def wait_until(deadline: float) -> None:
        """Spin, as CUDA's default event wait does with a core to spare. (Sleeping instead
        made the host's work about 2.5x slower on the 2-core dev VM: a woken core is cold.)"""
        while time.perf_counter() < deadline:
            pass

    def step_seconds(self, sched: SchedulerOutput) -> float:
        moved = gpu.decode_step_bytes(self.arch, torch.bfloat16, gpu.context_tokens(sched))
        read = moved / self.bytes_per_s
        compute = self.weight_bytes * sched.total_num_scheduled_tokens / self.flops_per_s
        return max(read, compute)  # bf16: 2 bytes a weight, 2 FLOPs a weight and token


def summarize(
    steps: list[StepRecord], output_tokens: int, elapsed: float, arch: Any, bandwidth_tbs: float
) -> dict:
    decode_only = [s for s in steps if s.decodes and not s.prefill_tokens and s.seconds > 0]
    floor = [
        gpu.decode_step_bytes(arch, torch.bfloat16, s.context_tokens) / (bandwidth_tbs * gpu.TB)
        for s in decode_only
    ]
    host_decode = sum(s.seconds for s in decode_only)
    decode_tokens = sum(s.decodes for s in decode_only)
    buckets = {}
    for lo, hi in zip(BUCKETS, BUCKETS[1:] + (10**9,), strict=True):
        sel = [s.seconds for s in decode_only if lo <= s.decodes < hi]
        if sel:
            buckets[f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}"] = {
                "steps": len(sel),
                "median_ms": 1e3 * statistics.median(sel),
            }
    phases = {p: sum(s.phases.get(p, 0.0) for s in steps) for p in PHASES}
    out = {
        "steps": len(steps),
        "elapsed_s": elapsed,
        "output_tokens": output_tokens,
        "host_ceiling_output_tokens_per_s": output_tokens / elapsed,
        "phase_seconds": phases,
        "decode_only_steps": len(decode_only),
        "decode_host_ms_by_batch": buckets,
    }
    if decode_only:
        device_s = sum(floor)
        out.update(
            {
                "decode_host_s": host_decode,
                "decode_device_floor_s": device_s,
                "host_over_device_floor": host_decode / device_s,
                "decode_tokens": decode_tokens,
                "decode_tokens_per_s_device_floor": decode_tokens / device_s,
                "decode_tokens_per_s_host_plus_floor": decode_tokens / (host_decode + device_s),
            }
        )
    return out


def print_report(ns: argparse.Namespace, r: dict) -> None:
    print(
        f"== host time per step, null model ({ns.num_prompts} prompts, in {ns.input_len}, "
        f"out {ns.output_len}, max_num_seqs {ns.max_num_seqs}) =="
    )
    print(row("steps", r["steps"]))
    print(row("elapsed s", r["elapsed_s"]))
    print(row("host-only output tokens/s", r["host_ceiling_output_tokens_per_s"]))
    total = sum(r["phase_seconds"].values()) or 1.0
    for phase, sec in r["phase_seconds"].items():
        print(row(f"  {phase} s", f"{sec:.3f} ({100 * sec / total:.0f} %)"))
    print("decode-only steps, host ms (median) by batch size:")
    for bucket, b in r["decode_host_ms_by_batch"].items():
        print(row(f"  batch {bucket}", f"{b['median_ms']:.3f} ms over {b['steps']} steps"))
    if "host_over_device_floor" in r:
        print(
            f"-- against the device floor: {ns.model_preset} weights + KV read at "
            f"{ns.gpu_bandwidth_tbs} TB/s --"
        )
        print(row("decode host s", r["decode_host_s"]))
        print(row("decode device floor s", r["decode_device_floor_s"]))
        print(row("host / device floor", r["host_over_device_floor"]))
        print(row("decode tok/s at the floor", r["decode_tokens_per_s_device_floor"]))
        print(row("decode tok/s, host + floor", r["decode_tokens_per_s_host_plus_floor"]))


def timed_generate(
    llm: Any, prompts: list, params: list[SamplingParams], instrument: Callable[[], None]
) -> tuple[float, float]:
    """Warm up, then ``instrument`` the engine and time the workload; checks every output
    and returns the run's (start, end) on ``time.perf_counter``'s clock."""
    llm.generate(
        prompts[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    instrument()
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    end = time.perf_counter()
    check_outputs(results, [_max_tokens(p) for p in params])
    return start, end


def _max_tokens(params: SamplingParams) -> int:
    assert params.max_tokens is not None, "the workload's requests each set their length"
    return params.max_tokens


def simulated_run(
    ns: argparse.Namespace,
    arch: Any,
    max_model_len: int,
    prompts: list,
    params: list,
    use_async: bool,
) -> dict:
    """The workload on the null engine with a simulated device; elapsed and device busy."""
    llm = null_engine_llm(ns, max_model_len, async_scheduling=use_async)
    device = SimulatedDevice(llm.engine.runner, arch, ns.gpu_bandwidth_tbs, ns.gpu_tflops)
    start, end = timed_generate(llm, prompts, params, device.install)
    elapsed = end - start
    # A step whose tokens are never read (the last one of an async run) is not waited for:
    # the part of the device's queue past the run's end is not time of the run.
    busy = device.busy_s - max(0.0, device.free_at - end)
    output_tokens = sum(p.max_tokens for p in params)
    return {
        "async_scheduling": use_async,
        "elapsed_s": elapsed,
        "device_busy_s": busy,
        "device_busy_fraction": busy / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
    }


def print_simulated(ns: argparse.Namespace, runs: list[dict]) -> None:
    print(
        f"-- with a simulated device ({ns.model_preset}, {ns.gpu_bandwidth_tbs} TB/s, "
        f"{ns.gpu_tflops} TFLOP/s) --"
    )
    for r in runs:
        name = "async scheduling" if r["async_scheduling"] else "synchronous steps"
        print(
            row(
                f"{name} s",
                f"{r['elapsed_s']:.3f}, output {r['output_tokens_per_s']:,.0f} "
                f"tok/s, device busy {100 * r['device_busy_fraction']:.0f} %",
            )
        )
    sync, asyn = runs
    print(
        row("async / sync output tok/s", asyn["output_tokens_per_s"] / sync["output_tokens_per_s"])
    )


def main(ns: argparse.Namespace) -> int:
    input_len = parse_len_range(ns.input_len, "--input-len")
    output_len = parse_len_range(ns.output_len, "--output-len")
    for name in ("num_prompts", "max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(ns, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not ns.gpu_bandwidth_tbs > 0:
        raise ValueError("--gpu-bandwidth-tbs must be > 0")
    if not ns.gpu_tflops > 0:
        raise ValueError("--gpu-tflops must be > 0")
    arch = preset_arch(ns.model_preset)
    max_model_len = input_len[1] + output_len[1]
    llm = null_engine_llm(ns, max_model_len)
    rng = random.Random(ns.data_seed)
    lo, hi = token_id_range(llm.engine.arch.vocab_size)
    prompts = [
        [rng.randrange(lo, hi) for _ in range(rng.randint(*input_len))]
        for _ in range(ns.num_prompts)
    ]
    outs = [rng.randint(*output_len) for _ in range(ns.num_prompts)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outs]
    timer = StepTimer(llm.engine)
    start, end = timed_generate(llm, prompts, params, timer.install)
    elapsed = end - start
    report = summarize(timer.steps, sum(outs), elapsed, arch, ns.gpu_bandwidth_tbs)
    print_report(ns, report)
    simulated = []
    if ns.simulate_device:
        simulated = [
            simulated_run(ns, arch, max_model_len, prompts, params, use_async)
            for use_async in (False, True)
        ]
        print_simulated(ns, simulated)
    if ns.json:
        write_json(
            ns.json,
            {
                "command": list(sys.argv),
                "machine": machine_info(),
                "args": {k: v for k, v in vars(ns).items() if k != "func"},
                "host": report,
                "simulated_device": simulated,
            },
        )
        print(row("json", ns.json))
    return 0

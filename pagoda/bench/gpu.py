"""GPU side of ``pagoda bench throughput``: decode steps against the memory-bandwidth limit.

A decode step of B sequences must stream every weight once (the matmuls are B-row GEMVs) and
every sequence's K/V once, so on a GPU its floor is ``bytes / memory bandwidth``:

    bytes(step) = weight bytes (non-embedding layers + the vocab x hidden logits matrix)
                + sum over the B sequences of context_len x layers x 2 x Hkv x D x dtype size

The monitor times the runner's decode-only steps (each ends by reading the sampled tokens,
a device sync, so wall time is the step's time) and reports bytes / time as a fraction of the
bandwidth, which is known per GPU model (override with ``--gpu-bandwidth-tbs``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput

TB = 1e12
# Peak HBM bandwidth by device-name fragment, most specific first (vendor data sheets).
GPU_BANDWIDTH_TBS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 4.8),
    (("GH200",), 4.0),
    (("H100", "NVL"), 3.9),
    (("H100", "PCIE"), 2.0),
    (("H100",), 3.35),  # SXM5 (HBM3), "NVIDIA H100 80GB HBM3"
    (("H800",), 3.35),
    (("B200",), 8.0),
    (("A100", "80GB"), 2.039),
    (("A100",), 1.555),
    (("L40S",), 0.864),
    (("A10G",), 0.6),
    (("L4",), 0.3),
]


def gpu_bandwidth_tbs(device_name: str, override: Optional[float] = None) -> Optional[float]:
    """The device's peak memory bandwidth in TB/s (None if unknown and not given)."""
    if override is not None:
        return override
    name = device_name.upper()
    for fragments, tbs in GPU_BANDWIDTH_TBS:
        if all(f in name for f in fragments):
            return tbs
    return None


def weight_bytes_per_step(arch: Any, dtype: torch.dtype) -> int:
    """Weights a decode step reads: every layer's, plus the logits matrix (the embedding
    lookup reads only B rows)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return (arch.num_params_non_embedding + arch.vocab_size * arch.hidden_size) * elem


def kv_bytes_per_token(arch: Any, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * elem


def decode_step_bytes(arch: Any, dtype: torch.dtype, context_tokens: int) -> int:
    """The least a decode step moves: the weights once, and the batch's whole KV."""
    return weight_bytes_per_step(arch, dtype) + context_tokens * kv_bytes_per_token(arch, dtype)


@dataclass
class DecodeStep:
    batch: int
    context_tokens: int  # sum of the batch's context lengths (new token included)
    seconds: float


def computed_before(sched: SchedulerOutput) -> dict[str, int]:
    """Each scheduled request's tokens computed before this step."""
    starts = {r.request_id: r.num_computed_tokens for r in sched.new_requests}
    starts.update((r.request_id, r.num_computed_tokens) for r in sched.cached_requests)
    return starts


def context_tokens(sched: SchedulerOutput) -> int:
    """The scheduled requests' context lengths summed, this step's tokens included."""
    starts = computed_before(sched)
    return sum(starts[rid] + n for rid, n in sched.num_scheduled_tokens.items())


@dataclass
class DecodeStepMonitor:
    """Times the decode-only steps, by wrapping the runner's ``launch`` and ``collect``
    (instrumentation only). A step's time runs from the previous step's tokens being read
    to its own: the time per step the engine sees. With synchronous steps that is host and
    device time added; with async scheduling it is the device's time wherever the host
    keeps up."""

    runner: Any
    steps: list[DecodeStep] = field(default_factory=list)
    _launch: Optional[Callable[[SchedulerOutput], Any]] = None
    _collect: Optional[Callable[[Any], ModelRunnerOutput]] = None
    _decodes: dict[int, tuple[int, int]] = field(default_factory=dict)  # handle -> shape
    _last_read: Optional[float] = None

    def __enter__(self) -> "DecodeStepMonitor":
        self._launch, self._collect = self.runner.launch, self.runner.collect
        self.runner.launch, self.runner.collect = self._timed_launch, self._timed_collect
        self._last_read = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.runner.launch, self.runner.collect = self._launch, self._collect

    def _timed_launch(self, sched: SchedulerOutput) -> Any:
        assert self._launch is not None, "used outside its with block"
        handle = self._launch(sched)
        counts = sched.num_scheduled_tokens
        if counts and all(n == 1 for n in counts.values()):
            self._decodes[id(handle)] = (len(counts), context_tokens(sched))
        return handle

    def _timed_collect(self, handle: Any) -> ModelRunnerOutput:
        assert self._collect is not None, "used outside its with block"
        out = self._collect(handle)
        now = time.perf_counter()
        shape = self._decodes.pop(id(handle), None)
        if shape is not None and self._last_read is not None:
            self.steps.append(DecodeStep(*shape, now - self._last_read))
        if handle.samplers:  # a step without samples is not waited for
            self._last_read = now
        return out


def summarize(
    steps: list[DecodeStep], arch: Any, dtype: torch.dtype, bandwidth_tbs: Optional[float]
) -> dict[str, Any]:
    """Median step, and bytes moved over time (per step, median; and over all steps)."""
    if not steps:
        return {"decode_steps": 0}
    weights = weight_bytes_per_step(arch, dtype)
    per_token = kv_bytes_per_token(arch, dtype)
    moved = [decode_step_bytes(arch, dtype, s.context_tokens) for s in steps]
    rates = [b / s.seconds for b, s in zip(moved, steps, strict=True)]
    total_bytes = sum(moved)
    total_s = sum(s.seconds for s in steps)
    median_rate = statistics.median(rates)
    aggregate_rate = total_bytes / total_s
    out: dict[str, Any] = {
        "decode_steps": len(steps),
        "median_batch": statistics.median(s.batch for s in steps),
        "median_step_ms": 1e3 * statistics.median(s.seconds for s in steps),
        "weight_bytes_per_step": weights,
        "kv_bytes_per_token": per_token,
        "median_bytes_per_s": median_rate,
        "aggregate_bytes_per_s": aggregate_rate,
        "bandwidth_bytes_per_s": bandwidth_tbs * TB if bandwidth_tbs else None,
    }
    if bandwidth_tbs:
        out["median_fraction_of_bandwidth"] = median_rate / (bandwidth_tbs * TB)
        out["aggregate_fraction_of_bandwidth"] = aggregate_rate / (bandwidth_tbs * TB)
    return out


def batch1_decode(llm: Any, prompt: list[int], output_len: int, params: Any) -> list[DecodeStep]:
    """One request alone: its decode steps (the latency a single user sees per token)."""
    with DecodeStepMonitor(llm.engine.runner) as mon:
        llm.generate([prompt], params, use_tqdm=False)
    return [s for s in mon.steps if s.batch == 1][:output_len]


def device_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "sm_count": props.multi_processor_count,
        "memory_gib": props.total_memory / (1 << 30),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }

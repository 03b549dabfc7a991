"""Prefill and decode of a CPU run, each against the limit that binds it.

A single FLOP-based fraction hides that the two phases of serving are bound by different
things. Steps that compute prompt tokens are matmul-bound: their limit is the machine's
measured matmul FLOP/s. Decode-only steps are memory-bound: each must read every weight once
(B-row GEMVs) and every running sequence's K/V once, so their limit is the measured memory
read bandwidth:

    bytes(decode step) = weight bytes (layers + the vocab x hidden logits matrix)
                       + sum over the B sequences of context_len x KV bytes per token

The weight bytes are those of the forms the step runs (:func:`model_weight_bytes`: a step of at
most a quantized layer's row limit reads its 4-bit or int8 codes with their scales, a larger
one its dense weight, packed or not; the output projection likewise), else (no model at hand)
every weight in the model's dtype.

The monitor wraps the runner's ``launch`` and ``collect`` (instrumentation only) and times
every step from the previous step's end to its own (host and compute, as synchronous CPU
steps are); a step's FLOPs follow ``flops.request_flops`` (linears for every computed token,
causal attention over its context, logits for each sampled row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from pagoda.bench import flops
from pagoda.bench.gpu import computed_before, kv_bytes_per_token, weight_bytes_per_step
from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagoda.models import cpu_bf16, cpu_int4, cpu_int8, cpu_linear

READ_BYTES = 1 << 30  # the buffer summed to measure read bandwidth (past any cache)
READ_REPEATS = 5


def read_bytes_per_s(nbytes: int = READ_BYTES, repeats: int = READ_REPEATS) -> float:
    """Best-of-``repeats`` rate of summing an fp32 buffer of ``nbytes``: streaming reads on
    all torch threads, the decode phase's limit."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


@dataclass
class Step:
    seqs: int  # sequences scheduled
    tokens: int  # tokens computed
    context_tokens: int  # their context lengths summed, this step's tokens included
    attention_flops: int  # causal attention of the computed tokens
    seconds: float

    @property
    def is_decode(self) -> bool:
        return self.tokens == self.seqs


def _step_shape(sched: SchedulerOutput, shape: flops.ModelShape) -> tuple[int, int, int, int]:
    starts = computed_before(sched)
    per_pos = 4 * shape.num_heads * shape.head_dim * shape.num_layers
    context = attention = 0
    for rid, n in sched.num_scheduled_tokens.items():
        c0 = starts[rid]
        context += c0 + n
        attention += per_pos * (n * c0 + n * (n + 1) // 2)  # positions c0 + 1 .. c0 + n
    counts = sched.num_scheduled_tokens
    return len(counts), sum(counts.values()), context, attention


@dataclass
class StepMonitor:
    """Records every step of ``runner`` while active (a ``with`` block)."""

    runner: Any
    shape: flops.ModelShape
    steps: list[Step] = field(default_factory=list)
    _launch: Optional[Callable[[SchedulerOutput], Any]] = None
    _collect: Optional[Callable[[Any], ModelRunnerOutput]] = None
    _pending: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    _last: Optional[float] = None

    def __enter__(self) -> "StepMonitor":
        self._launch, self._collect = self.runner.launch, self.runner.collect
        self.runner.launch, self.runner.collect = self._timed_launch, self._timed_collect
        self._last = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.runner.launch, self.runner.collect = self._launch, self._collect

    def _timed_launch(self, sched: SchedulerOutput) -> Any:
        if self._last is None:
            self._last = time.perf_counter()
        assert self._launch is not None, "used outside its with block"
        handle = self._launch(sched)
        if not sched.is_empty:
            self._pending[id(handle)] = _step_shape(sched, self.shape)
        return handle

    def _timed_collect(self, handle: Any) -> ModelRunnerOutput:
        assert self._collect is not None, "used outside its with block"
        out = self._collect(handle)
        now = time.perf_counter()
        shape = self._pending.pop(id(handle), None)
        if shape is not None:
            assert self._last is not None, "set by the step's launch"
            self.steps.append(Step(*shape, now - self._last))
        self._last = now
        return out


def model_weight_bytes(model: Any) -> Callable[[int], int]:
    """Weights a step of ``rows`` rows reads through ``model``'s decoder layers and output
    projection, in the forms it runs at that row count (the embedding lookup reads only the
    step's rows: not counted)."""

    def step_bytes(rows: int) -> int:
        head = model.packed_head
        head_bytes = module_bytes(head, rows) if head is not None else _nbytes(model.output_weight)
        return sum(module_bytes(layer, rows) for layer in model.layers) + head_bytes

    return step_bytes


def module_bytes(module: nn.Module, rows: int) -> int:
    """Weight bytes a call of ``rows`` rows reads through ``module`` and what it holds."""
    if isinstance(module, cpu_int4.RoutedLinear):
        counted = rows if module.route.rows is None else module.route.rows
        if counted > module.max_rows:
            return module_bytes(module.dense, rows)
        if isinstance(module, cpu_int8.Int8Linear):
            return module.int8.packed.nbytes()
        assert isinstance(module, cpu_int4.Int4Linear)
        return _nbytes(module.int4.packed) + _nbytes(module.int4.scale_zeros)
    if isinstance(module, cpu_int8.Int8Head):
        if module.quantized(rows):
            return module.int8.packed.nbytes()
        dense = module.dense
        return module_bytes(dense, rows) if dense is not None else _nbytes(module.weight)
    if isinstance(module, cpu_linear.PackedLinear):
        return module.out_features * module.in_features * module.packed.element_size()
    if isinstance(module, cpu_bf16.InvariantLinear):
        return _nbytes(module.packed) + _nbytes(module.bias32)
    own = sum(_nbytes(p) for p in module.parameters(recurse=False))
    return own + sum(module_bytes(child, rows) for child in module.children())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def summarize(
    steps: list[Step],
    arch: Any,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    shape: flops.ModelShape,
    limit_flops_per_s: float,
    read_limit_bytes_per_s: float,
    weight_bytes: Optional[Callable[[int], int]] = None,
) -> dict[str, Any]:
    """Each phase's time, work and fraction of its limit; ``weight_bytes``: the weights a
    decode step of so many rows reads (:func:`model_weight_bytes`; default: every weight in
    ``dtype``)."""
    prefill = [s for s in steps if not s.is_decode]
    decode = [s for s in steps if s.is_decode]
    linear = 2 * shape.params_non_embedding
    logits = 2 * shape.hidden_size * shape.vocab_size
    p_flops = sum(linear * s.tokens + s.attention_flops + logits * s.seqs for s in prefill)
    p_time = sum(s.seconds for s in prefill)
    per_token = kv_bytes_per_token(arch, kv_dtype)
    dense = weight_bytes_per_step(arch, dtype)
    read = weight_bytes if weight_bytes is not None else (lambda rows: dense)
    d_bytes = sum(read(s.seqs) + s.context_tokens * per_token for s in decode)
    d_time = sum(s.seconds for s in decode)
    out: dict[str, Any] = {
        "prefill_steps": len(prefill),
        "prefill_s": p_time,
        "prefill_flops": p_flops,
        "decode_steps": len(decode),
        "decode_s": d_time,
        "decode_bytes": d_bytes,
        "decode_tokens": sum(s.tokens for s in decode),
        "read_limit_bytes_per_s": read_limit_bytes_per_s,
        "limit_flops_per_s": limit_flops_per_s,
    }
    if p_time > 0:
        out["prefill_flops_per_s"] = p_flops / p_time
        out["prefill_fraction_of_limit"] = p_flops / p_time / limit_flops_per_s
    if d_time > 0:
        out["decode_bytes_per_s"] = d_bytes / d_time
        out["decode_fraction_of_limit"] = d_bytes / d_time / read_limit_bytes_per_s
    return out

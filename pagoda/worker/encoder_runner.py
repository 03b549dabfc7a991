"""EncoderRunner: the steps of an encoder-only pooling model (BERT, RoBERTa, XLM-R): each
scheduled request is a whole sequence, packed one after the other with no padding, run once
with bidirectional attention and pooled; there is no KV cache.

It has the face of ``model_runner.ModelRunner`` that the engine core uses (``launch``,
``collect``, ``forget_requests``), so the one scheduler and core serve encoders too: the engine
builds their scheduler without chunked prefill or prefix caching (a sequence's rows depend on
every other row of it, so it must be computed whole, and there is no KV to reuse), over a
nominal block pool of one block per sequence that holds no memory (``engine/build.py``).

    packed step:  [ CLS a b c SEP | CLS d SEP | CLS e f SEP ]    input_ids, token_type_ids
    positions:    [  0  1 2 3  4  |  0  1  2  |  0  1 2  3  ]    from 0 in each sequence
    pooled:          one row per sequence (pooling.pool), then Pooler.finish per request

Invariant: every request a step schedules is computed whole in that step and finished by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagoda.core.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput
from pagoda.models.base import Encoder
from pagoda.models.pooling import pool
from pagoda.pooling_params import PoolingParams
from pagoda.worker.model_runner import StepHandle
from pagoda.worker.pooler import Pooler


@dataclass
class _Sequence:
    token_ids: list[int]
    token_type_ids: Optional[list[int]]
    params: PoolingParams


class EncoderRunner:
    def __init__(self, model: Encoder, pooler: Pooler, device: torch.device) -> None:
        self.model = model
        self.pooler = pooler
        self.device = device
        self.states: dict[str, _Sequence] = {}

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> StepHandle:
        """Run and pool the step's sequences (the results wait on the device for
        ``collect``)."""
        for rid in sched.finished_request_ids | sched.preempted_request_ids:
            self.states.pop(rid, None)
        for new in sched.new_requests:
            self.states[new.request_id] = _sequence(new)
        handle = StepHandle()
        if sched.is_empty:
            return handle
        ids = list(sched.num_scheduled_tokens)
        seqs = [self.states.pop(rid) for rid in ids]  # each finishes in this step
        for rid, seq in zip(ids, seqs, strict=True):
            assert sched.num_scheduled_tokens[rid] == len(seq.token_ids), "not a whole sequence"
        lens = [len(s.token_ids) for s in seqs]
        pooled = pool(self._forward(seqs), lens, self.pooler.pooling_type)
        assert isinstance(pooled, torch.Tensor)  # (N, E): ALL is refused at build
        results = self.pooler.finish(pooled, [s.params for s in seqs])
        handle.output.pooled.update(zip(ids, results, strict=True))
        return handle

    def _forward(self, seqs: list[_Sequence]) -> torch.Tensor:
        """The packed sequences' hidden states (T, E)."""
        input_ids = [t for s in seqs for t in s.token_ids]
        positions = [p for s in seqs for p in range(len(s.token_ids))]
        types = [t for s in seqs for t in (s.token_type_ids or [0] * len(s.token_ids))]
        ints = torch.tensor([input_ids, positions, types], dtype=torch.int64)  # (3, T): one copy
        ints = ints.to(self.device, non_blocking=True)
        return self.model(ints[0], ints[1], [len(s.token_ids) for s in seqs], ints[2])

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        output = handle.output
        for rid, pooled in output.pooled.items():
            assert isinstance(pooled, torch.Tensor)
            output.pooled[rid] = pooled.cpu()
        return output

    def forget_requests(self) -> None:
        self.states.clear()


def _sequence(new: NewRequestData) -> _Sequence:
    assert new.pooling_params is not None, "an encoder serves pooling requests only"
    assert new.num_computed_tokens == 0, "an encoder computes a sequence whole"
    return _Sequence(list(new.token_ids), new.token_type_ids, new.pooling_params)

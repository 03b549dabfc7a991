"""What the engine gives back per request: texts, token ids, finish reasons, timings; for a
pooling request, its one pooled vector (``RequestOutput.pooled``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Optional, TypeVar

import torch

from pagoda.core.outputs import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"
    stop_reason: Optional[str | int] = None  # the stop string or token id that ended it
    finish_detail: Optional[str] = None  # why, when the ending is unusual
    logprobs: Optional[list[TokenLogprobs]] = None
    cumulative_logprob: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None

    @property
    def time_to_first_token(self) -> Optional[float]:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> Optional[float]:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def e2e_latency(self) -> Optional[float]:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    time_per_output_token: Optional[float] = None
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    kv_transfer_params: Optional[dict] = None  # prefill role: where the prompt's KV waits
    # A finished pooling request's result, 1-D float32 on the CPU: the embedding (truncated,
    # normalized), classify's class probabilities, or score's one score. Its ``outputs`` is
    # [] and it yields this one output only.
    pooled: Optional[torch.Tensor] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def text(self) -> str:
        """The first completion's text (the only one when n == 1)."""
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> Optional[str]:
        if not self.outputs:  # a pooling request's vector: "stop" once it is there
            return "stop" if self.pooled is not None else None
        return self.outputs[0].finish_reason

    @property
    def time_to_first_token(self) -> Optional[float]:
        return self.metrics.time_to_first_token


# --- the offline API's pooling outputs (vLLM's shapes: ``LLM.embed / classify / score``) ---


@dataclass
class PoolingOutput:
    data: torch.Tensor  # the pooled result as the engine gives it (1-D float32, CPU)


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]  # one per class (raw logits with activation=False)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


T = TypeVar("T")


@dataclass
class PoolingRequestOutput(Generic[T]):
    """One pooling request's result: ``outputs`` is one of the classes above."""

    request_id: str
    outputs: T
    prompt_token_ids: list[int]
    finished: bool = True
    num_cached_tokens: int = 0


EmbeddingRequestOutput = PoolingRequestOutput[EmbeddingOutput]
ClassificationRequestOutput = PoolingRequestOutput[ClassificationOutput]
ScoringRequestOutput = PoolingRequestOutput[ScoringOutput]

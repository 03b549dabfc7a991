"""The typed messages between the scheduler, the model runner and the engine.

The scheduler speaks in request ids, token counts and block ids; the runner turns that into
tensors and answers with sampled token ids. Nothing here holds a tensor, except a pooling
request's pooled vector, which passes through the scheduler as an opaque ``object`` it never
reads (the runner makes it, the output processor hands it out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pagoda.core.kv_events import KVCacheEvent
from pagoda.core.remote_kv import KVLoad, RemotePrefill
from pagoda.core.snapshot import StepTokens
from pagoda.lora_request import LoRARequest
from pagoda.pooling_params import PoolingParams
from pagoda.sampling import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or has forgotten, after a preemption)."""

    request_id: str
    token_ids: list[int]  # prompt + outputs so far (outputs exist after preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the blocks (shared prefix)
    seed_offset: int = 0  # n > 1: the i-th sibling samples from seed + i
    # The sliding layers' table when their KV is kept apart (core/sliding_kv.py), else [].
    sliding_block_ids: list[int] = field(default_factory=list)
    pooling_params: Optional[PoolingParams] = None  # a pooling request: pool, never sample
    token_type_ids: Optional[list[int]] = None  # cross-encoders: one segment id per token
    lora: Optional[LoRARequest] = None  # the adapter it runs under (None: the base model)


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Blocks of its table kept before the new ones: fewer than the runner holds when rolled
    # back speculative drafts freed some (the runner drops the rest of its table first).
    num_kept_blocks: Optional[int] = None
    # The sliding layers' table's new entries (its kept length is the same), else [].
    new_sliding_block_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # request id -> tokens to compute this step, in batch order (decodes first).
    num_scheduled_tokens: dict[str, int]
    # Requests the runner must forget: finished, aborted or preempted since the last step.
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)
    kv_loads: list[KVLoad] = field(default_factory=list)  # remote KV to start pulling
    # Remote leases this instance will not pull from (computed here instead): end them.
    kv_releases: list[RemotePrefill] = field(default_factory=list)
    # Speculative decoding: request id -> the draft tokens that follow its last token in
    # this step (its row has 1 + len(drafts) tokens, each position sampled).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Structured outputs: request id -> the tokens it may sample at each position it samples
    # this step (one bit each, little-endian int32 words; one mask, or one per draft + 1).
    allowed_tokens: dict[str, list[bytes]] = field(default_factory=dict)
    # KV cache events since the last step (hashes named for this step's blocks, evictions),
    # published once the step has run (its KV written).
    kv_cache_events: list[KVCacheEvent] = field(default_factory=list)
    # The step's tokens by kind (decode, prefill, recompute, drafts), for the inspector.
    step_tokens: StepTokens = field(default_factory=StepTokens)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    @property
    def has_kv_work(self) -> bool:
        """Transfers to start or end (disaggregated prefill), even with nothing to compute."""
        return bool(self.kv_loads or self.kv_releases)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class ModelRunnerOutput:
    # request id -> the tokens it gained: the one it sampled (only requests that caught up
    # this step sample) or, verifying drafts, the accepted drafts and one sample after them.
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per token
    # request id -> (first prompt position, logprobs of the tokens after it, one each).
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # request id -> the pooled vector of a pooling request whose last prompt row ran in this
    # step (a CPU tensor; opaque here).
    pooled: dict[str, object] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """What the engine hears about a request after a step."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: Optional[str | int] = None
    finish_detail: Optional[str] = None
    logprobs: Optional[list[TokenLogprobs]] = None  # one per new token
    prompt_logprobs: Optional[tuple[int, list[TokenLogprobs]]] = None
    kv_transfer_params: Optional[RemotePrefill] = None  # prefill role: where the KV waits
    pooled: Optional[object] = None  # a finished pooling request's vector (opaque here)

"""EngineRequest, what a caller asks of the engine; Request, one sequence's life in it.

:class:`EngineRequest` is the one message a request travels as from the edge (the offline
``LLM``, the server's front door) through the engine thread to ``LLMEngine.add_request``;
its fields are written once, here. The engine turns it into ``n`` :class:`Request` objects.


The one progress counter is ``num_computed_tokens``: it chases ``num_tokens`` (prompt plus
output so far). Prefill, chunked prefill, decode and recompute after preemption are all the
same rule: compute tokens ``[num_computed_tokens, num_tokens)``, then sample when caught up.
The scheduler advances the counter when it schedules the tokens, so it counts tokens whose
KV is computed or being computed by a step in flight.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from pagoda.pooling_params import PoolingParams
from pagoda.sampling import SamplingParams

if TYPE_CHECKING:
    from pagoda.core.remote_kv import KVTransferRequest, RemotePrefill
    from pagoda.lora_request import LoRARequest


@dataclass(frozen=True)
class EngineRequest:
    """A request as the engine takes it: a prompt's token ids and how to complete it
    (``SamplingParams``: generate) or what to pool from it (``PoolingParams``: one vector)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    prompt: Optional[str] = None  # the text, when the caller had one (outputs echo it)
    arrival_time: Optional[float] = None  # time.monotonic(); None: when the engine takes it
    cache_salt: Optional[str] = None  # prefix caching: only requests with the same salt share
    kv_transfer_params: Optional[dict[str, Any]] = None  # disaggregated prefill
    priority: int = 0  # --scheduling-policy priority: lower is served first
    # Cross-encoders: the segment of each prompt token (0: the query, 1: the document), as
    # the tokenizer gives them for a (query, document) pair; None: all 0.
    token_type_ids: Optional[list[int]] = None
    lora_request: Optional[LoRARequest] = None  # the LoRA adapter to run under (None: base)

    @property
    def is_pooling(self) -> bool:
        return isinstance(self.params, PoolingParams)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks given back; waits to be recomputed
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # holds blocks a transfer is filling
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"  # the client went away, or the caller aborted
    FINISHED_IGNORED = "ignored"  # can never fit in the KV cache, even alone
    FINISHED_ERROR = "error"  # could not be served (e.g. its remote KV was lost)

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> Optional[str]:
        """The OpenAI-style finish_reason ("stop", "length", "abort"), None while live."""
        if self is RequestStatus.FINISHED_IGNORED:
            return "length"
        return self.value if self.finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_IGNORED,
    RequestStatus.FINISHED_ERROR,
}


# A pooling request's sampling params: it never samples, so nothing here is ever read but the
# defaults (no logprobs, no grammar) that keep the sampling-only paths off.
NO_SAMPLING = SamplingParams(max_tokens=None)


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        max_tokens: int,
        arrival_time: Optional[float] = None,
        prefix_donor: Optional[str] = None,
        cache_salt: Optional[str] = None,
        kv_transfer: Optional[KVTransferRequest] = None,
        seed_offset: int = 0,
        priority: int = 0,
        pooling_params: Optional[PoolingParams] = None,
        token_type_ids: Optional[list[int]] = None,
        reads_every_row: bool = False,
        lora: Optional[LoRARequest] = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids  # any of them ends the request (unless ignore_eos)
        self.max_tokens = max_tokens  # resolved: min(asked, context left)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # n > 1: a sibling whose full prompt blocks this request may share on admission.
        self.prefix_donor = prefix_donor
        self.cache_salt = cache_salt  # prefix caching: only requests with the same salt share
        self.kv_transfer = kv_transfer  # disaggregated prefill: remote decode / remote prefill
        self.kv_transfer_out: Optional[RemotePrefill] = None  # prefill role: where its KV waits
        self.seed_offset = seed_offset  # n > 1: the i-th sibling samples from seed + i
        self.priority = priority  # --scheduling-policy priority: lower is served first
        # A pooling request: computes its prompt, then ends with one pooled vector (taken in
        # place of a sampled token); it never samples (``sampling_params`` is NO_SAMPLING).
        self.pooling_params = pooling_params
        self.token_type_ids = token_type_ids  # cross-encoders' segments, one per prompt token
        # Its pooling reads every prompt row (MEAN, CLS, ALL): a prefix-cache hit would skip
        # rows it needs, so it is computed whole.
        self.reads_every_row = reads_every_row
        # The LoRA adapter it runs under (None: the base model): part of its KV's identity.
        self.lora = lora
        self.lora_passes = 0  # waiting on an adapter slot: later requests admitted past it
        self.short_passes = 0  # at the head: short prefills admitted past it

        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens sampled by a step still in flight, not yet known on the host (0 or 1):
        # async scheduling schedules the next step before the last one's token is read.
        self.num_output_placeholders = 0
        # Speculative decoding: the drafts the step in flight verifies after its last token.
        # They are computed (counted in num_computed_tokens) but not known to be tokens.
        self.spec_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.stop_reason: Optional[str | int] = None  # the stop string / token that ended it
        self.finish_detail: Optional[str] = None  # human-readable why, for odd endings
        # Prefix caching: chain hashes of the full blocks of all_token_ids computed so far,
        # and how many prompt tokens came from the cache at first admission.
        self.block_hashes: list[bytes] = []
        self.num_cached_tokens: Optional[int] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """Tokens the request will have once its in-flight samples are read: the end that
        ``num_computed_tokens`` chases."""
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )

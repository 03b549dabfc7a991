"""LLMEngine: a model, its KV cache and its requests, stepped as

    core step (schedule -> run -> update)  ->  output processor (text, n > 1, outputs)

It checks each request at intake and joins the two halves of a step: ``core.py`` works in
ids and counts, ``output_processor.py`` turns them into what the user asked for. Its pieces
are built by ``build.py`` (``build_engine(args)``), in one pass, before it exists. It neither
sleeps nor watches for stalls: the loops that call :meth:`step` do (``pacing.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from pagoda.config import EngineArgs
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.remote_kv import KVTransferRequest, check_remote_prefill, parse_kv_transfer_params
from pagoda.core.scheduler import Scheduler
from pagoda.engine.core import CoreStep, EngineCore
from pagoda.engine.inspector import EngineSnapshot, Inspector
from pagoda.engine.kv_event_publisher import KVEventPublisher
from pagoda.engine.kv_plan import KVPlan
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.stats import EngineStats
from pagoda.engine.structured import StructuredOutputs
from pagoda.kv_transfer.base import KVConnectorWorker
from pagoda.models.config import ModelArch
from pagoda.pooling_params import PoolingParams
from pagoda.request import NO_SAMPLING, EngineRequest, Request
from pagoda.sampling import SamplingParams
from pagoda.worker.model_runner import ModelRunner, StepRunner
from pagoda.worker.pooler import Pooler

RunnerKind = Literal["generate", "pooling"]


@dataclass(frozen=True)
class ServedModel:
    """The model as the engine knows it: its name, shapes, tokenizer and placement."""

    name: str
    arch: ModelArch
    tokenizer: Any  # a transformers tokenizer
    chat_template: Optional[str]
    max_model_len: int
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    quantization: Optional[str]
    # What it serves (--runner): text, or pooled vectors for these tasks (embed, classify,
    # score); a generation model pools nothing.
    runner_kind: RunnerKind = "generate"
    pooling_tasks: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """What a cached block's KV depends on besides its tokens (in every prefix hash: it
        matters once KV crosses engines, as in disaggregated prefill)."""
        key = f"{self.name}:{self.dtype}"
        if self.quantization is not None:  # decode steps' KV comes from the 4-bit weights
            key = f"{key}:{self.quantization}"
        return key if self.kv_dtype == self.dtype else f"{key}:kv-{self.kv_dtype}"


@dataclass(frozen=True)
class EngineParts:
    """An engine's pieces, as ``build.py`` made them."""

    args: EngineArgs
    model: ServedModel
    plan: KVPlan  # the KV pools' sizes
    block_size: int
    kv: KVCacheManager
    scheduler: Scheduler
    runner: StepRunner
    structured: StructuredOutputs
    core: EngineCore
    output: OutputProcessor
    kv_secret: bytes  # the side channel's (disaggregated prefill; empty when colocated)
    kv_events: Optional[KVEventPublisher]
    pooler: Optional[Pooler] = None  # a pooling model's: what its pooled rows become


class LLMEngine:
    def __init__(self, parts: EngineParts) -> None:
        model = parts.model
        self.args, self.kv, self.scheduler, self.runner = (
            parts.args, parts.kv, parts.scheduler, parts.runner,
        )  # fmt: skip
        self.structured, self.core, self.output = parts.structured, parts.core, parts.output
        self.kv_events, self._kv_secret = parts.kv_events, parts.kv_secret
        self.model_name, self.arch, self.tokenizer = model.name, model.arch, model.tokenizer
        self.chat_template, self.max_model_len = model.chat_template, model.max_model_len
        self.device, self.dtype, self.kv_dtype = model.device, model.dtype, model.kv_dtype
        self.quantization, self.pooling_tasks = model.quantization, model.pooling_tasks
        self.block_size, self.num_blocks = parts.block_size, parts.plan.num_blocks
        self.sliding_blocks = parts.plan.sliding_blocks  # the sliding layers' pool, or None
        self.last_step, self.inspector = CoreStep(), Inspector()  # Inspector: GET /inspect
        # What it serves: "generate", or "pooling" (for pooling_tasks, with its pooler).
        self.runner_kind, self.pooler = model.runner_kind, parts.pooler
        self.num_prompt_tokens = self.num_pooling_requests = self.num_pooling_tokens = 0

    @property
    def class_labels(self) -> tuple[str, ...]:
        """A classifier's class names by index (empty for other models)."""
        return self.pooler.labels if self.pooler is not None else ()

    @property
    def model_runner(self) -> ModelRunner:
        """The decoder's runner, for the benchmarks that time its parts (an encoder's engine
        runs an ``EncoderRunner``)."""
        assert isinstance(self.runner, ModelRunner), "an encoder engine has no ModelRunner"
        return self.runner

    @property
    def kv_connector(self) -> Optional[KVConnectorWorker]:
        return self.core.connector

    @property
    def async_scheduling(self) -> bool:
        return self.core.async_scheduling

    # ------------------------------------------------------------------ intake
    def add_request(self, request: EngineRequest) -> None:
        """Check a request and queue it; ValueError naming what was wrong. ``priority``
        (``--scheduling-policy priority``): lower values are served first."""
        if request.request_id in self.output:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self._check_runner(request)
        if isinstance(request.params, PoolingParams):
            self._add_pooling(request, request.params)
            return
        params = self._checked_params(request, request.params)
        kv_transfer = self._validate_kv_transfer(
            request.kv_transfer_params, params, request.prompt_token_ids
        )
        now = time.monotonic() if request.arrival_time is None else request.arrival_time
        children = self._children(request, params, kv_transfer, now)
        self.output.add(request.request_id, request.prompt, children, now)
        self.core.add_request(children[0], children[1:])
        self.num_prompt_tokens += len(request.prompt_token_ids)

    def _check_runner(self, request: EngineRequest) -> None:
        """A pooling request needs a pooling engine serving its task, a generation request
        a generation engine (``--runner``)."""
        params = request.params
        if not isinstance(params, PoolingParams):
            if self.runner_kind == "pooling":
                raise ValueError(
                    f"model {self.model_name!r} is served with --runner pooling: it computes "
                    f"{_tasks_text(self.pooling_tasks)}, not text"
                )
            return
        if self.runner_kind != "pooling":
            raise ValueError(
                f"task {params.task!r} needs a pooling model: model {self.model_name!r} is "
                "served for generation (start it with --runner pooling)"
            )
        if params.task not in self.pooling_tasks:
            raise ValueError(
                f"task {params.task!r} is not supported by model {self.model_name!r}; it "
                f"serves {_tasks_text(self.pooling_tasks)}"
            )

    def _add_pooling(self, request: EngineRequest, params: PoolingParams) -> None:
        """A pooling request: one core request that computes its prompt (truncated to its
        last ``truncate_prompt_tokens``) and ends with its pooled vector."""
        assert self.pooler is not None  # _check_runner: this is a pooling engine
        self.pooler.check(params)
        self._check_common(request)
        if request.kv_transfer_params is not None:
            raise ValueError("kv_transfer_params: not for pooling requests")
        ids, types = self._pooling_prompt(request, params)
        now = time.monotonic() if request.arrival_time is None else request.arrival_time
        core_request = Request(
            request.request_id,
            ids,
            NO_SAMPLING,
            (),
            0,
            now,
            cache_salt=request.cache_salt,
            priority=request.priority,
            pooling_params=params,
            token_type_ids=types,
            reads_every_row=self.pooler.reads_every_row,
        )
        self.output.add(request.request_id, request.prompt, [core_request], now)
        self.core.add_request(core_request)
        self.num_prompt_tokens += len(ids)
        self.num_pooling_requests += 1
        self.num_pooling_tokens += len(ids)

    def _pooling_prompt(
        self, request: EngineRequest, params: PoolingParams
    ) -> tuple[list[int], Optional[list[int]]]:
        """The prompt's ids and segments as computed: its last ``truncate_prompt_tokens``, at
        most the model's context."""
        ids, types = request.prompt_token_ids, request.token_type_ids
        self._validate_token_ids(ids)
        if types is not None and (
            len(types) != len(ids) or any(type(t) is not int or t not in (0, 1) for t in types)
        ):
            raise ValueError("token_type_ids must hold one 0 or 1 per prompt token")
        keep = params.truncate_prompt_tokens
        if keep == -1:  # vLLM's: as many as the model takes
            keep = self.max_model_len
        if keep is not None and keep > self.max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens {keep} exceeds the model's {self.max_model_len} tokens"
            )
        if keep is not None and len(ids) > keep:
            ids, types = ids[-keep:], types[-keep:] if types is not None else None
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model takes at most {self.max_model_len} "
                "(truncate_prompt_tokens keeps the last ones)"
            )
        return list(ids), list(types) if types is not None else None

    def _check_common(self, request: EngineRequest) -> None:
        """What every request is checked for, generating or pooling."""
        if request.priority and self.scheduler.config.policy != "priority":
            raise ValueError(
                f"priority {request.priority} needs a server started with"
                " --scheduling-policy priority"
            )
        salt = request.cache_salt
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError("cache_salt must be a non-empty string")

    def _checked_params(self, request: EngineRequest, params: SamplingParams) -> SamplingParams:
        """The request's sampling params with its bad words tokenized, once every field the
        engine checks at intake is valid."""
        self._check_common(request)
        params = self._with_bad_word_ids(params)
        self._validate_prompt(request.prompt_token_ids, params)
        if params.structured_outputs is not None:
            self.structured.check(params.structured_outputs)  # compiled (or cached) now
        return params

    def _children(
        self,
        request: EngineRequest,
        params: SamplingParams,
        kv_transfer: Optional[KVTransferRequest],
        now: float,
    ) -> list[Request]:
        """The n core requests of a user request (``id:i`` when n > 1): the first computes
        the prompt, and the scheduler holds the others until it has, to share its blocks."""
        rid, prompt_ids = request.request_id, request.prompt_token_ids
        max_tokens = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        return [
            Request(
                rid if params.n == 1 else f"{rid}:{i}",
                prompt_ids,
                params,
                self.arch.eos_token_ids,
                max_tokens,
                now,
                prefix_donor=None if i == 0 else f"{rid}:0",
                cache_salt=request.cache_salt,
                kv_transfer=kv_transfer if i == 0 else None,
                seed_offset=i,
                priority=request.priority,
            )
            for i in range(params.n)
        ]

    def _with_bad_word_ids(self, params: SamplingParams) -> SamplingParams:
        """``bad_words`` as token sequences (as vLLM reads them: each word as written and
        after a space, the two tokenizations a word has inside a text)."""
        if not params.bad_words:
            return params
        sequences = [list(seq) for seq in params.bad_words_token_ids]
        for word in params.bad_words:
            for text in (word, " " + word.lstrip()):
                ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in sequences:
                    sequences.append(ids)
        return params.clone(bad_words_token_ids=sequences)

    def _validate_token_ids(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.arch.vocab_size
        bad = [
            t for t in prompt_token_ids if type(t) is not int or not 0 <= t < vocab
        ]  # type(): bools are not ids
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:3]}")

    def _validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._validate_token_ids(prompt_token_ids)
        vocab = self.arch.vocab_size
        for name, ids in (
            ("logit_bias", list(params.logit_bias)),
            ("allowed_token_ids", params.allowed_token_ids or []),
            ("bad_words_token_ids", [t for seq in params.bad_words_token_ids for t in seq]),
        ):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{name} token ids must be in [0, {vocab}); got {outside[:3]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; the context length is "
                f"{self.max_model_len}, leaving no room to generate"
            )
        if params.max_tokens is not None and (
            len(prompt_token_ids) + params.max_tokens > self.max_model_len
        ):
            raise ValueError(
                f"max_tokens {params.max_tokens} + prompt {len(prompt_token_ids)} "
                f"tokens exceeds the context length {self.max_model_len}"
            )

    def _validate_kv_transfer(
        self, raw: Optional[dict], params: SamplingParams, prompt_token_ids: list[int]
    ) -> Optional[KVTransferRequest]:
        kv_transfer = parse_kv_transfer_params(raw)
        if kv_transfer is None:
            return None
        role = self.args.kv_role
        if kv_transfer.do_remote_decode and role != "prefill":
            raise ValueError(
                f"kv_transfer_params.do_remote_decode needs an instance started "
                f"with --kv-role prefill (this one is {role!r})"
            )
        if kv_transfer.do_remote_decode and params.n != 1:
            raise ValueError("n must be 1 with kv_transfer_params.do_remote_decode")
        if kv_transfer.remote_prefill is not None and role != "decode":
            raise ValueError(
                f"kv_transfer_params.do_remote_prefill needs an instance started "
                f"with --kv-role decode (this one is {role!r})"
            )
        if kv_transfer.remote_prefill is not None:
            check_remote_prefill(
                kv_transfer.remote_prefill, prompt_token_ids, self.block_size, self._kv_secret
            )
        return kv_transfer

    def abort_request(self, request_id: str) -> None:
        self.core.abort(self.output.abort(request_id, time.monotonic()))

    def has_unfinished_requests(self) -> bool:
        """Requests live, or a step in flight still to be read."""
        return self.output.has_unfinished() or self.core.has_step_in_flight

    # -------------------------------------------------------------------- step
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One iteration: an output for every request that changed in it, or with
        ``final_only`` (offline generation) only for those that finished."""
        start = time.monotonic()
        core = self.last_step = self.core.step()
        done = self.output.process(core.outputs, core.scheduled, time.monotonic(), final_only)
        self.core.finish_stopped(done.stopped)
        idle = not self.has_unfinished_requests()
        self.inspector.on_step(core.tokens, start, time.monotonic(), self.inspect, idle)
        return done.outputs

    @property
    def num_generation_tokens(self) -> int:
        return self.output.num_generation_tokens

    def inject_fault(self) -> None:
        """The next step raises, as a failing model would (tests of engine death)."""
        self.core.inject_fault()

    def stats(self) -> EngineStats:
        connector = self.core.connector
        return EngineStats(
            self.scheduler.make_stats(),
            self.num_prompt_tokens,
            self.output.num_generation_tokens,
            connector.stats() if connector is not None else None,
            self.kv_events.make_stats() if self.kv_events is not None else None,
            self.num_pooling_requests,
            self.num_pooling_tokens,
        )

    def inspect(self, version: int = 0) -> EngineSnapshot:
        """The whole engine for the inspector: block pool, prefix cache, requests, counters
        (engine thread only; docs/inspector.md)."""
        show_text = self.inspector.show_text
        return EngineSnapshot(
            version,
            time.monotonic(),
            self.model_name,
            self.args.kv_role,
            self.max_model_len,
            self.scheduler.inspect(),
            self.output.details(show_text),
            self.stats(),
            show_text,
        )

    # ------------------------------------------------------------ prefix cache
    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens of admitted requests looked up in the prefix cache."""
        return self.scheduler.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, the tokens whose KV was found cached."""
        return self.scheduler.prefix_cache_hits

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (requests running keep theirs); returns how many."""
        count = self.kv.reset_prefix_cache()
        self.core.publish_pending_kv_events()
        return count

    # ------------------------------------------------------------- KV transfer
    def poll_kv_transfers(self) -> None:
        """For an idle server loop: take in finished transfers and ended leases even when
        no request is running (a prefill instance's leases outlive its requests)."""
        self.core.poll_kv_transfers()
        self.inspector.maybe_publish(self.inspect)

    def close(self) -> None:
        self.core.close()
        if self.kv_events is not None:
            self.kv_events.close()

    # ----------------------------------------------------------------- helpers
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_pair(self, query: str, doc: str) -> tuple[list[int], list[int]]:
        """A (query, document) pair tokenized together, as a cross-encoder reads it: the
        token ids and each token's segment (token_type_ids: 0 the query, 1 the document;
        all 0 for a tokenizer without segments)."""
        enc = self.tokenizer(query, text_pair=doc, add_special_tokens=True)
        ids = list(enc["input_ids"])
        types = enc.get("token_type_ids")
        return ids, list(types) if types is not None else [0] * len(ids)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: Optional[list[dict[str, Any]]] = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text of a conversation (and of the tools it may call, where the
        template renders them). ``template_kwargs``: ``add_generation_prompt`` (default
        True), ``continue_final_message``, and variables the template reads
        (``enable_thinking``, ...)."""
        if not self.chat_template:
            raise ValueError(f"model {self.model_name!r} has no chat template")
        template_kwargs.setdefault("add_generation_prompt", True)
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            chat_template=self.chat_template,
            **template_kwargs,
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: Optional[list[dict[str, Any]]] = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """The chat template's text already holds any BOS it wants: add no special tokens."""
        text = self.apply_chat_template(messages, tools, **template_kwargs)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()


def _tasks_text(tasks: frozenset[str]) -> str:
    return " and ".join(sorted(tasks)) if tasks else "nothing"

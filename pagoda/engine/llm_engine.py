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
from typing import Any, Optional

from pagoda.config import EngineArgs
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler
from pagoda.engine.core import CoreStep, EngineCore
from pagoda.engine.inspector import EngineSnapshot, Inspector
from pagoda.engine.intake import Intake
from pagoda.engine.kv_event_publisher import KVEventPublisher
from pagoda.engine.kv_plan import KVPlan
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.served_model import ServedModel
from pagoda.engine.stats import EngineStats
from pagoda.engine.structured import StructuredOutputs
from pagoda.kv_transfer.base import KVConnectorWorker
from pagoda.request import EngineRequest
from pagoda.worker.model_runner import ModelRunner, StepRunner
from pagoda.worker.pooler import Pooler


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
    intake: Intake  # the checks a request passes before it is queued
    kv_events: Optional[KVEventPublisher]
    pooler: Optional[Pooler] = None  # a pooling model's: what its pooled rows become


class LLMEngine:
    def __init__(self, parts: EngineParts) -> None:
        model = parts.model
        self.args, self.kv, self.scheduler, self.runner = (
            parts.args, parts.kv, parts.scheduler, parts.runner,
        )  # fmt: skip
        self.structured, self.core, self.output = parts.structured, parts.core, parts.output
        self.kv_events, self.intake = parts.kv_events, parts.intake
        self.model_name, self.arch, self.tokenizer = model.name, model.arch, model.tokenizer
        self.chat_template, self.max_model_len = model.chat_template, model.max_model_len
        self.device, self.dtype, self.kv_dtype = model.device, model.dtype, model.kv_dtype
        self.quantization, self.weights_format = model.quantization, model.weights_format
        self.block_size, self.num_blocks = parts.block_size, parts.plan.num_blocks
        self.sliding_blocks = parts.plan.sliding_blocks  # the sliding layers' pool, or None
        self.last_step, self.inspector = CoreStep(), Inspector()  # Inspector: GET /inspect
        self.runner_kind, self.pooler = model.runner_kind, parts.pooler  # generate | pooling
        self.pooling_tasks = model.pooling_tasks  # what a pooling runner serves
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
        """Check a request and queue it; ValueError naming what was wrong (``intake.py``)."""
        if request.request_id in self.output:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        now = time.monotonic() if request.arrival_time is None else request.arrival_time
        children = self.intake.core_requests(request, now)
        self.output.add(request.request_id, request.prompt, children, now)
        self.core.add_request(children[0], children[1:])
        prompt_tokens = children[0].num_prompt_tokens  # as computed (a pooling one truncated)
        self.num_prompt_tokens += prompt_tokens
        if children[0].pooling_params is not None:
            self.num_pooling_requests += 1
            self.num_pooling_tokens += prompt_tokens

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

    def forget_adapter(self, lora_int_id: int) -> bool:
        """An unloaded LoRA adapter's weights leave the engine, unless a live request still
        runs under it (then nothing changes: ask again later); whether they left."""
        if self.scheduler.runs_adapter(lora_int_id):
            return False
        if isinstance(self.runner, ModelRunner) and self.runner.lora is not None:
            self.runner.lora.forget(lora_int_id)
        return True

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

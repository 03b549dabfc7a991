"""LLMEngine: a model, its KV cache and its requests, stepped as

    core step (schedule -> run -> update)  ->  output processor (text, n > 1, outputs)

It builds the pieces (the model and its runner, the KV cache manager, the scheduler, the KV
connector when disaggregated), checks each request at intake, and joins the two halves of a
step: ``core.py`` works in ids and counts, ``output_processor.py`` turns them into what the
user asked for. It neither sleeps nor watches for stalls: the loops that call :meth:`step`
do (``pacing.py``).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Optional

import torch

from pagoda.config import DEFAULT_KV_CACHE_GIB, CacheConfig, EngineArgs, SpeculativeConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.remote_kv import KVTransferRequest, check_remote_prefill, parse_kv_transfer_params
from pagoda.core.scheduler import Scheduler
from pagoda.core.sliding_kv import SlidingTables
from pagoda.engine import cpu_budget, spec_timing
from pagoda.engine.core import CoreStep, EngineCore
from pagoda.engine.inspector import EngineSnapshot, Inspector
from pagoda.engine.kv_event_publisher import KVEventPublisher
from pagoda.engine.kv_plan import KVRequest, plan_pools
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.stats import EngineStats
from pagoda.engine.structured import GrammarCompiler, StructuredOutputs
from pagoda.kv_transfer.base import KVConnectorWorker
from pagoda.models.cpu_int4 import resolve_quantization
from pagoda.models.loader import load_model, resolve_dtype, resolve_kv_cache_dtype
from pagoda.models.prepare import prepare_model
from pagoda.request import Request
from pagoda.sampling import SamplingParams
from pagoda.spec_decode.speculator import Speculator
from pagoda.utils import read_chat_template
from pagoda.worker.kv_cache import (
    GIB,
    cuda_kv_budget,
    layer_counts,
    profile_activation_bytes,
)
from pagoda.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN_CAP = 8192


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.device = _resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(
            args.kv_cache_dtype, self.dtype, self.device, dtype_auto=args.dtype in (None, "auto")
        )
        self.quantization = resolve_quantization(args.quantization, self.device, self.dtype)
        torch.manual_seed(args.seed)
        loaded = load_model(
            args.model,
            self.dtype,
            self.device,
            max_positions=None,
            load_format=args.load_format,
            model_preset=args.model_preset,
            seed=args.seed,
            gguf_file=args.gguf_file,
            quantization=self.quantization,
        )
        self.model_name = loaded.name
        self.arch = loaded.arch
        self.tokenizer = loaded.tokenizer
        self.chat_template = read_chat_template(args.chat_template) or loaded.chat_template
        self.max_model_len = args.max_model_len or min(
            self.arch.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP
        )
        if self.max_model_len > self.arch.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.arch.max_position_embeddings}"
            )
        prepared = prepare_model(
            loaded.model,
            self.device,
            self.dtype,
            self.kv_dtype,
            self.quantization,
            context_len=self.max_model_len,  # picks LongRoPE's factors (Phi-3)
        )
        cache = args.cache_config()
        # CUDA: the peak of a worst-case step comes out of the KV budget (0 elsewhere).
        self._activation_bytes = profile_activation_bytes(
            prepared.model,
            args.token_budget,
            args.max_num_seqs,
            cache.block_size,
            self.dtype,
            self.device,
        )
        self.block_size = cache.block_size
        # The sliding layers' own pool, when their KV is kept apart (None: one pool).
        self.num_blocks, self.sliding_blocks = self._kv_pools(args, cache)
        # The model's identity enters every prefix-cache hash (it matters once KV crosses
        # engines, as in disaggregated prefill; within one engine the model never changes).
        self.kv = KVCacheManager(
            self.num_blocks,
            cache.block_size,
            args.enable_prefix_caching,
            model_key=self._model_key(),
            sliding=(
                SlidingTables(self.sliding_blocks, self.arch.sliding_window, cache.block_size)
                if self.sliding_blocks is not None
                else None
            ),
        )
        self.scheduler = Scheduler(args.scheduler_config(self.max_model_len), self.kv)
        self.runner = ModelRunner(
            prepared,
            self.num_blocks,
            cache.block_size,
            max_num_seqs=args.max_num_seqs,
            max_model_len=self.max_model_len,
            enforce_eager=args.enforce_eager,
            sliding_num_blocks=self.sliding_blocks,
        )
        connector = self._start_kv_transfer(args)
        async_scheduling = (
            self.device.type == "cuda" if args.async_scheduling is None else args.async_scheduling
        )
        self.structured = StructuredOutputs(
            GrammarCompiler(self.tokenizer, self.arch.vocab_size, self.arch.eos_token_ids)
        )
        self.core = EngineCore(
            self.scheduler, self.runner, connector, async_scheduling, self.structured
        )
        self.output = OutputProcessor(
            self.tokenizer, self._issued_params if args.kv_role == "prefill" else None
        )
        self.last_step = CoreStep()
        self.inspector = Inspector()  # steps and snapshots for GET /inspect
        self.num_prompt_tokens = 0
        if args.serving and args.max_num_batched_tokens is None and self.device.type == "cpu":
            budget = cpu_budget.serving_budget(self)  # runs a step: the engine is complete
            self.scheduler.config = args.scheduler_config(self.max_model_len, budget)
        self._start_speculation(args.spec_config())
        self.kv_events = self._start_kv_events(args)
        logger.info(
            "engine: %s, %s on %s, KV cache %d blocks x %d tokens = %d tokens",
            self.model_name,
            self.dtype,
            self.device,
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
        )
        if self.sliding_blocks is not None:
            logger.info(
                "sliding-window layers (window %d): their own KV pool of %d blocks",
                self.arch.sliding_window,
                self.sliding_blocks,
            )

    def _start_speculation(self, config: Optional[SpeculativeConfig]) -> None:
        """Speculative decoding: the speculator, with a step cost model timed here when it
        is adaptive (steps run: the engine is complete)."""
        if config is None:
            return
        cost = spec_timing.measure_step_costs(self) if config.adaptive else None
        speculator = Speculator(config, cost, spec_timing.suffix_trie_factory())
        speculator.draft_filter = self.structured.valid_prefix  # drafts obey grammars
        self.scheduler.enable_speculation(speculator)

    def _start_kv_events(self, args: EngineArgs) -> Optional[KVEventPublisher]:
        """KV cache events for KV-aware routers (engine/kv_event_publisher.py), when asked."""
        config = args.events_config()
        if config is None:
            return None
        if not args.enable_prefix_caching:
            raise ValueError("kv_events_config needs prefix caching (it journals its hashes)")
        publisher = KVEventPublisher(config)
        self.kv.enable_events()
        self.core.publish_kv_events = publisher.publish
        return publisher

    def _model_key(self) -> str:
        """What a cached block's KV depends on besides its tokens (in every prefix hash)."""
        key = f"{self.model_name}:{self.dtype}"
        if self.quantization is not None:  # decode steps' KV comes from the 4-bit weights
            key = f"{key}:{self.quantization}"
        return key if self.kv_dtype == self.dtype else f"{key}:kv-{self.kv_dtype}"

    def _kv_budget(self, cache: CacheConfig) -> int:
        if self.device.type == "cuda":
            return cuda_kv_budget(cache.gpu_memory_utilization, self.device, self._activation_bytes)
        return int((cache.kv_cache_memory_gib or DEFAULT_KV_CACHE_GIB) * GIB)

    def _kv_pools(self, args: EngineArgs, cache: CacheConfig) -> tuple[int, Optional[int]]:
        """(blocks of the KV pool, blocks of the sliding-window layers' own pool or None),
        planned by ``kv_plan.plan_pools`` from the budget measured here."""
        one_table = args.kv_role != "both" or self.device.type != "cpu"
        req = KVRequest(
            cache.block_size,
            self.max_model_len,
            args.max_num_seqs,
            args.token_budget,
            cache.num_blocks,
            cache.num_sliding_blocks,
            cache.hybrid,
            one_table,
        )
        memory = None if cache.num_blocks is not None else self._kv_budget(cache)
        plan = plan_pools(self.arch, self.kv_dtype, req, memory)
        full, sliding = layer_counts(self.arch)
        if full and sliding and cache.hybrid and one_table:
            logger.info(
                "sliding-window layers keep the whole context: %s",
                "KV transfer" if args.kv_role != "both" else "CUDA",
            )
        return plan.num_blocks, plan.sliding_blocks

    def _start_kv_transfer(self, args: EngineArgs) -> Optional[KVConnectorWorker]:
        """Disaggregated prefill: the NIXL connector and its side channel (roles prefill and
        decode); None when colocated."""
        self._kv_secret = b""
        if args.kv_role == "both":
            return None
        from pagoda.kv_transfer.nixl import NixlConnector
        from pagoda.kv_transfer.side_channel import resolve_secret

        self.engine_id = uuid.uuid4().hex
        config = args.kv_transfer_config(self.engine_id)
        self._kv_secret = resolve_secret(args.kv_secret)
        connector = NixlConnector(config, self._kv_secret, self.runner.kv_caches, self.kv.model_key)
        self.scheduler.enable_kv_transfer(config, connector.address)
        return connector

    @property
    def kv_connector(self) -> Optional[KVConnectorWorker]:
        return self.core.connector

    @property
    def async_scheduling(self) -> bool:
        return self.core.async_scheduling

    # ------------------------------------------------------------------ intake
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: Optional[str] = None,
        arrival_time: Optional[float] = None,
        cache_salt: Optional[str] = None,
        kv_transfer_params: Optional[dict] = None,
        priority: int = 0,
    ) -> None:
        """Check a request and queue it; ValueError naming what was wrong. ``priority``
        (``--scheduling-policy priority``): lower values are served first."""
        if request_id in self.output:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if priority and self.scheduler.config.policy != "priority":
            raise ValueError(
                f"priority {priority} needs a server started with --scheduling-policy priority"
            )
        params = self._with_bad_word_ids(params)
        self._validate_prompt(prompt_token_ids, params)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError("cache_salt must be a non-empty string")
        kv_transfer = self._validate_kv_transfer(kv_transfer_params, params, prompt_token_ids)
        if params.structured_outputs is not None:
            self.structured.check(params.structured_outputs)  # compiled (or cached) now
        max_tokens = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        now = time.monotonic() if arrival_time is None else arrival_time
        requests = [
            Request(
                request_id if params.n == 1 else f"{request_id}:{i}",
                prompt_token_ids,
                params,
                self.arch.eos_token_ids,
                max_tokens,
                now,
                prefix_donor=None if i == 0 else f"{request_id}:0",
                cache_salt=cache_salt,
                kv_transfer=kv_transfer if i == 0 else None,
                seed_offset=i,
                priority=priority,
            )
            for i in range(params.n)
        ]
        self.output.add(request_id, prompt, requests, now)
        self.core.add_request(requests[0])
        self.num_prompt_tokens += len(prompt_token_ids)

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

    def _validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.arch.vocab_size
        bad = [
            t for t in prompt_token_ids if type(t) is not int or not 0 <= t < vocab
        ]  # type(): bools are not ids
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:3]}")
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
        self.core.add_siblings(done.siblings)
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
    def _issued_params(self, request: Request) -> Optional[dict]:
        """Prefill role: the signed kv_transfer_params of a finished request's lease."""
        remote = request.kv_transfer_out
        if remote is None:
            return None
        return remote.signed(self._kv_secret, request.prompt_token_ids).to_json()

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


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available")
    return dev

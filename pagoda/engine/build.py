"""Building an engine in one pass down the floors:

    placement (device, dtypes)  ->  model (loaded, prepared)  ->  KV plan  ->  runner
    ->  calibration (token budget, speculation cost)  ->  connector  ->  scheduler
    ->  engine core  ->  LLMEngine

A pooling model (``pooling_model.py`` chooses) is built the same way without calibration (its
steps are prefills only; the budget is the user's); an encoder-only one has no KV cache at all:
its runner (``worker/encoder_runner.py``) computes whole sequences, and its scheduler counts
one nominal block per sequence, a pool that holds no memory.

Each piece is made once, with its final configuration, from the pieces above it: the
scheduler gets its speculator, remote-KV state and budget in its constructor, the core its
event sink. The measurements that settle the scheduler's configuration (the CPU server's
token budget, speculative decoding's step cost) run steps, so they run first, on calibration
engines over the same runner that are then dropped.
Invariant: nothing built is changed after it is built, and calibration leaves the runner
holding no request (the engine's KV cache manager and scheduler are new after it).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

import torch

from pagoda.config import (
    DEFAULT_KV_CACHE_GIB,
    CacheConfig,
    EngineArgs,
    SchedulerConfig,
    SpeculativeConfig,
)
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.remote_kv import RemoteKV
from pagoda.core.scheduler import Scheduler
from pagoda.core.sliding_kv import SlidingTables
from pagoda.engine import cpu_budget, spec_timing
from pagoda.engine.core import EngineCore
from pagoda.engine.intake import Intake
from pagoda.engine.kv_event_publisher import KVEventPublisher
from pagoda.engine.kv_plan import KVPlan, KVRequest, plan_pools
from pagoda.engine.llm_engine import EngineParts, LLMEngine
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.pooling_model import (
    RunnerChoice,
    choose_runner,
    decoder_pooler,
    encoder_pooler,
    encoder_view,
    parse_pooler_config,
)
from pagoda.engine.served_model import ServedModel
from pagoda.engine.structured import GrammarCompiler, StructuredOutputs
from pagoda.kv_transfer.base import KVConnectorWorker
from pagoda.models.cpu_int4 import resolve_quantization
from pagoda.models.encoder_loader import load_encoder
from pagoda.models.loader import load_model, resolve_dtype, resolve_kv_cache_dtype
from pagoda.models.prepare import PreparedModel, prepare_model
from pagoda.models.quantized import stored_format
from pagoda.request import Request
from pagoda.spec_decode.policy import StepCostModel
from pagoda.spec_decode.speculator import Speculator
from pagoda.utils import read_chat_template
from pagoda.worker.encoder_runner import EncoderRunner
from pagoda.worker.kv_cache import GIB, cuda_kv_budget, layer_counts, profile_activation_bytes
from pagoda.worker.model_runner import ModelRunner
from pagoda.worker.pooler import Pooler

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN_CAP = 8192


@dataclass(frozen=True)
class _Base:
    """What every engine of one build shares: the model, its KV plan and the runner."""

    args: EngineArgs
    model: ServedModel
    plan: KVPlan
    block_size: int
    runner: ModelRunner
    structured: StructuredOutputs
    pooler: Optional[Pooler] = None  # a pooling model's


def build_engine(args: EngineArgs) -> LLMEngine:
    """An engine for ``args``, calibrated and ready to take requests."""
    torch.manual_seed(args.seed)
    choice = choose_runner(args)
    if choice.kind == "pooling":
        _check_pooling_args(args)
    if choice.encoder:
        return _build_encoder_engine(args, choice)
    model, prepared = _load(args)
    pooler = None
    if choice.kind == "pooling":
        override = parse_pooler_config(args.pooler_config)
        weight = prepared.model.output_weight
        pooler = decoder_pooler(choice, model.arch, weight, model.tokenizer, model.dtype, override)
        model = replace(model, runner_kind="pooling", pooling_tasks=pooler.tasks)
    plan = _plan_kv(args, model, prepared)
    block_size = args.cache_config().block_size
    runner = ModelRunner(
        prepared,
        plan.num_blocks,
        block_size,
        max_num_seqs=args.max_num_seqs,
        max_model_len=model.max_model_len,
        enforce_eager=args.enforce_eager,
        sliding_num_blocks=plan.sliding_blocks,
        pooler=pooler,
    )
    base = _Base(args, model, plan, block_size, runner, _structured(model), pooler)
    if pooler is None:
        config, speculator = _calibrate(base)
    else:  # prefills only: nothing to calibrate
        config, speculator = args.scheduler_config(model.max_model_len), None
    engine = _assemble(base, config, speculator, final=True)
    _log_engine(engine)
    return engine


def _structured(model: ServedModel) -> StructuredOutputs:
    return StructuredOutputs(
        GrammarCompiler(model.tokenizer, model.arch.vocab_size, model.arch.eos_token_ids)
    )


def _check_pooling_args(args: EngineArgs) -> None:
    """What a pooling model cannot be served with, by flag."""
    if args.spec_config() is not None:
        raise ValueError("--speculative-config: a pooling model (--runner pooling) never decodes")
    if args.kv_role != "both":
        raise ValueError("--kv-role: a pooling model (--runner pooling) serves colocated only")


# ----------------------------------------------------------------------- the encoders
def _build_encoder_engine(args: EngineArgs, choice: RunnerChoice) -> LLMEngine:
    """An encoder-only pooling model (module docstring): no KV cache, no calibration."""
    if args.quantization not in (None, "none", "auto"):  # auto: an encoder keeps none
        raise ValueError(f"--quantization {args.quantization}: not for encoder models")
    if args.load_format != "auto":
        raise ValueError(f"--load-format {args.load_format}: encoder models load their weights")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    assert choice.path is not None  # an encoder is known by its config.json
    override = parse_pooler_config(args.pooler_config)
    loaded = load_encoder(choice.path, dtype, device, choice.task, override)
    pooler = encoder_pooler(loaded, choice.hf_config, dtype)
    max_len = loaded.arch.max_seq_len
    if args.max_model_len is not None and args.max_model_len > max_len:
        raise ValueError(
            f"--max-model-len {args.max_model_len} exceeds the encoder's {max_len} positions"
        )
    model = ServedModel(
        loaded.name,
        encoder_view(loaded.arch),
        loaded.tokenizer,
        None,
        args.max_model_len or max_len,
        device,
        dtype,
        dtype,
        None,
        runner_kind="pooling",
        pooling_tasks=pooler.tasks,
    )
    # Whole sequences, FCFS under the budget (which is at least one sequence: without chunked
    # prefill it grows to max_model_len); one nominal block per sequence, max_num_seqs of them.
    config = replace(args.scheduler_config(model.max_model_len), enable_chunked_prefill=False)
    plan = KVPlan(args.max_num_seqs + 1)
    kv = KVCacheManager(plan.num_blocks, model.max_model_len + 1, model_key=model.key)
    scheduler = Scheduler(config, kv)
    structured = _structured(model)
    runner = EncoderRunner(loaded.model, pooler, device)
    core = EngineCore(scheduler, runner, None, False, structured)
    parts = EngineParts(
        args=args,
        model=model,
        plan=plan,
        block_size=kv.block_size,
        kv=kv,
        scheduler=scheduler,
        runner=runner,
        structured=structured,
        core=core,
        output=OutputProcessor(model.tokenizer),
        intake=Intake(model, config.policy, structured, args.kv_role, kv.block_size, b"", pooler),
        kv_events=None,
        pooler=pooler,
    )
    logger.info(
        "engine: encoder %s (%s), %s on %s, tasks %s, no KV cache",
        model.name,
        loaded.arch.architecture,
        dtype,
        device,
        sorted(pooler.tasks),
    )
    return LLMEngine(parts)


# ----------------------------------------------------------------------------- the model
def _load(args: EngineArgs) -> tuple[ServedModel, PreparedModel]:
    """Device and dtypes resolved, the model loaded and prepared once for them."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    kv_dtype = resolve_kv_cache_dtype(
        args.kv_cache_dtype, dtype, device, dtype_auto=args.dtype in (None, "auto")
    )
    deterministic = args.is_deterministic()
    quantization = resolve_quantization(args.quantization, device, dtype, deterministic)
    loaded = load_model(
        args.model,
        dtype,
        device,
        max_positions=None,
        load_format=args.load_format,
        model_preset=args.model_preset,
        seed=args.seed,
        gguf_file=args.gguf_file,
        quantization=quantization,
    )
    arch = loaded.arch
    max_model_len = args.max_model_len or min(
        arch.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP
    )
    if max_model_len > arch.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's "
            f"max_position_embeddings {arch.max_position_embeddings}"
        )
    prepared = prepare_model(
        loaded.model,
        device,
        dtype,
        kv_dtype,
        quantization,
        context_len=max_model_len,  # picks LongRoPE's factors (Phi-3)
        lora=args.lora_config(),
        deterministic=deterministic,
        quantized=loaded.quantized,
    )
    served = ServedModel(
        loaded.name,
        arch,
        loaded.tokenizer,
        read_chat_template(args.chat_template) or loaded.chat_template,
        max_model_len,
        device,
        dtype,
        kv_dtype,
        prepared.quantization,
        weights_format=stored_format(loaded.quantized) if prepared.quantization else None,
    )
    return served, prepared


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available")
    return dev


# -------------------------------------------------------------------------- the KV plan
def _plan_kv(args: EngineArgs, model: ServedModel, prepared: PreparedModel) -> KVPlan:
    """The pools' sizes, planned by ``kv_plan.plan_pools`` from the memory measured here."""
    cache = args.cache_config()
    one_table = args.kv_role != "both" or model.device.type != "cpu"
    req = KVRequest(
        cache.block_size,
        model.max_model_len,
        args.max_num_seqs,
        args.token_budget,
        cache.num_blocks,
        cache.num_sliding_blocks,
        cache.hybrid,
        one_table,
    )
    memory = None if cache.num_blocks is not None else _kv_memory(args, cache, prepared)
    full, sliding = layer_counts(model.arch)
    if full and sliding and cache.hybrid and one_table:
        logger.info(
            "sliding-window layers keep the whole context: %s",
            "KV transfer" if args.kv_role != "both" else "CUDA",
        )
    return plan_pools(model.arch, model.kv_dtype, req, memory)


def _kv_memory(args: EngineArgs, cache: CacheConfig, prepared: PreparedModel) -> int:
    """Bytes for the KV cache: on CUDA what the device has left after the weights and a
    worst-case step's activations; elsewhere the configured size."""
    if prepared.device.type != "cuda":
        return int((cache.kv_cache_memory_gib or DEFAULT_KV_CACHE_GIB) * GIB)
    activations = profile_activation_bytes(
        prepared.model,
        args.token_budget,
        args.max_num_seqs,
        cache.block_size,
        prepared.dtype,
        prepared.device,
    )
    return cuda_kv_budget(cache.gpu_memory_utilization, prepared.device, activations)


# ------------------------------------------------------------------------- calibration
def _calibrate(base: _Base) -> tuple[SchedulerConfig, Optional[Speculator]]:
    """The scheduler's final configuration and speculator, from steps timed on calibration
    engines (a CPU server's token budget; an adaptive speculator's step cost model)."""
    args, model = base.args, base.model
    config = args.scheduler_config(model.max_model_len)
    if args.serving and args.max_num_batched_tokens is None and model.device.type == "cpu":
        budget = cpu_budget.serving_budget(_assemble(base, config))
        config = args.scheduler_config(model.max_model_len, budget)
    spec = args.spec_config()
    speculator = None
    if spec is not None:
        cost = (
            spec_timing.measure_step_costs(partial(_assemble, base, config))
            if spec.adaptive
            else None
        )
        speculator = _speculator(spec, cost, base.structured)
    base.runner.forget_requests()  # a finished timing request's state, never told
    return config, speculator


def _speculator(
    config: SpeculativeConfig, cost: Optional[StepCostModel], structured: StructuredOutputs
) -> Speculator:
    speculator = Speculator(config, cost, spec_timing.suffix_trie_factory())
    speculator.draft_filter = structured.valid_prefix  # drafts obey grammars
    return speculator


# ---------------------------------------------------------------------------- assembly
def _assemble(
    base: _Base,
    config: SchedulerConfig,
    speculator: Optional[Speculator] = None,
    final: bool = False,
) -> LLMEngine:
    """An engine over ``base``'s runner with a new KV cache manager, scheduler and core:
    the final one (with the KV connector and KV events, when configured) or one to time
    steps with."""
    args, model, plan = base.args, base.model, base.plan
    events = args.events_config() if final else None
    if events is not None and not args.enable_prefix_caching:
        raise ValueError("kv_events_config needs prefix caching (it journals its hashes)")
    kv = KVCacheManager(
        plan.num_blocks,
        base.block_size,
        args.enable_prefix_caching,
        model_key=model.key,
        sliding=(
            SlidingTables(plan.sliding_blocks, model.arch.sliding_window, base.block_size)
            if plan.sliding_blocks is not None
            else None
        ),
        events=events is not None,
    )
    secret, connector, remote = b"", None, None
    if final and args.kv_role != "both":
        secret, connector, remote = _start_kv_transfer(args, base.runner, kv)
    scheduler = Scheduler(config, kv, speculator, remote)
    publisher = KVEventPublisher(events) if events is not None else None
    core = EngineCore(
        scheduler,
        base.runner,
        connector,
        model.device.type == "cuda" if args.async_scheduling is None else args.async_scheduling,
        base.structured,
        publisher.publish if publisher is not None else None,
    )
    issued = partial(_issued_params, secret) if args.kv_role == "prefill" else None
    output = OutputProcessor(model.tokenizer, issued)
    return LLMEngine(
        EngineParts(
            args=args,
            model=model,
            plan=plan,
            block_size=base.block_size,
            kv=kv,
            scheduler=scheduler,
            runner=base.runner,
            structured=base.structured,
            core=core,
            output=output,
            intake=Intake(
                model,
                config.policy,
                base.structured,
                args.kv_role,
                base.block_size,
                secret,
                base.pooler,
                base.runner.lora.prefetch if base.runner.lora is not None else None,
            ),
            kv_events=publisher,
            pooler=base.pooler,
        )
    )


def _start_kv_transfer(
    args: EngineArgs, runner: ModelRunner, kv: KVCacheManager
) -> tuple[bytes, KVConnectorWorker, RemoteKV]:
    """Disaggregated prefill (roles prefill and decode): the side channel's secret, the NIXL
    connector over the runner's KV cache, and the scheduler's remote-KV state."""
    from pagoda.kv_transfer.nixl import NixlConnector
    from pagoda.kv_transfer.side_channel import resolve_secret

    config = args.kv_transfer_config(uuid.uuid4().hex)
    secret = resolve_secret(args.kv_secret)
    connector = NixlConnector(config, secret, runner.kv_caches, kv.model_key)
    return secret, connector, RemoteKV(config, kv, connector.address)


def _issued_params(secret: bytes, request: Request) -> Optional[dict]:
    """Prefill role: the signed kv_transfer_params of a finished request's lease."""
    remote = request.kv_transfer_out
    if remote is None:
        return None
    return remote.signed(secret, request.prompt_token_ids).to_json()


def _log_engine(engine: LLMEngine) -> None:
    logger.info(
        "engine: %s, %s on %s, KV cache %d blocks x %d tokens = %d tokens",
        engine.model_name,
        engine.dtype,
        engine.device,
        engine.num_blocks,
        engine.block_size,
        engine.num_blocks * engine.block_size,
    )
    if engine.sliding_blocks is not None:
        logger.info(
            "sliding-window layers (window %d): their own KV pool of %d blocks",
            engine.arch.sliding_window,
            engine.sliding_blocks,
        )

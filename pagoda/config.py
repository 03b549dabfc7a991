"""Engine configuration: frozen dataclasses, resolved once in one place.

Kept free of torch so that the scheduler side (``pagoda.core``) can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

from pagoda import envs

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_KV_CACHE_GIB = 2.0
SHORT_PREFILL_SHARE = 4  # by default a prefill is short with a quarter of the budget left


SCHEDULING_POLICIES = ("fcfs", "priority")
# Pooling models (vLLM's flags): which runner serves the model, and what a decoder checkpoint
# is converted to (docs/models.md, "Pooling models").
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "embed", "classify", "none")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # the per-step token budget
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority" (vLLM's --scheduling-policy)
    max_loras: Optional[int] = None  # distinct LoRA adapters running at once (None: no LoRA)
    # Prefills with at most this many tokens left go before longer ones (None: arrival order).
    short_prefill_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}")

    @property
    def step_token_budget(self) -> int:
        """Without chunked prefill a whole prompt must fit one step, so the budget grows."""
        if self.enable_chunked_prefill:
            return self.max_num_batched_tokens
        return max(self.max_num_batched_tokens, self.max_model_len)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory_gib: Optional[float] = None  # CPU: the KV pool's size in GiB
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of free memory for KV
    num_blocks: Optional[int] = None  # overrides the memory budget (tests)
    # The sliding-window layers' own pool (core/sliding_kv.py): its exact size (None: sized
    # by the engine), or kept in the one pool with the rest (``hybrid`` False).
    num_sliding_blocks: Optional[int] = None
    hybrid: bool = True

    def __post_init__(self) -> None:
        if self.num_sliding_blocks is not None and self.num_sliding_blocks < 1:
            raise ValueError(f"num_sliding_blocks must be >= 1, got {self.num_sliding_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory_gib}")


KV_ROLES = ("both", "prefill", "decode")
KV_LOAD_FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class KVTransferConfig:
    """Disaggregated prefill. ``both``: colocated, no transfers (the default)."""

    kv_role: str = "both"
    engine_id: str = ""
    lease_seconds: float = 30.0  # prefill: how long finished requests' blocks wait
    load_failure: str = "recompute"  # decode: what a failed pull does
    transfer_timeout_seconds: float = 10.0
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 0  # 0: any free port

    def __post_init__(self) -> None:
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {KV_ROLES}, got {self.kv_role!r}")
        if self.load_failure not in KV_LOAD_FAILURE_POLICIES:
            raise ValueError(
                f"kv_load_failure must be one of {KV_LOAD_FAILURE_POLICIES}, "
                f"got {self.load_failure!r}"
            )
        for name in ("lease_seconds", "transfer_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class KVEventsConfig:
    """KV cache events for KV-aware routers (engine/kv_event_publisher.py), with vLLM's
    ``KVEventsConfig`` names. pagoda binds the endpoints (a router's subscriber connects);
    the default address is the loopback's, where vLLM's is every interface."""

    enable_kv_cache_events: bool = False
    publisher: Optional[str] = None  # "zmq" | "null"; None: zmq when enabled
    endpoint: str = "tcp://127.0.0.1:5557"
    replay_endpoint: Optional[str] = None
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # the PUB socket's high-water mark, in messages
    max_queue_size: int = 100_000  # batches waiting for the sending thread
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher not in (None, "zmq", "null"):
            raise ValueError(
                f"kv_events_config.publisher must be 'zmq' or 'null', got {self.publisher!r}"
            )
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"kv_events_config.{name} must be an integer >= 1")
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None and not str(value).startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(
                    f"kv_events_config.{name} must be a ZeroMQ address (tcp://host:port, "
                    f"ipc://path), got {value!r}"
                )

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and (self.publisher or "zmq") == "zmq"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> KVEventsConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"kv_events_config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


SPEC_METHODS = ("ngram", "suffix")
# Measured with pagoda bench spec (docs/speculative_decoding.md): 8 beat 4 on grounded work at
# batch 1 (4.2x against 3.2x no speculation) and 8 (2.0x against 1.5x), W1 the same.
NGRAM_DEFAULT_TOKENS = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    """Model-free speculative decoding (``pagoda/spec_decode/``), with vLLM's keys:
    ``--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'``.

    ``num_speculative_tokens`` is the most drafts a request gets in one step; the engine
    gives each step's requests as many of them as its cost model says pay (``adaptive``,
    a pagoda key; false drafts the most every time, for measurements)."""

    method: str = "ngram"
    num_speculative_tokens: Optional[int] = None  # None: 8 (ngram), the tree depth (suffix)
    prompt_lookup_min: Optional[int] = None  # ngram: shortest match (default 2)
    prompt_lookup_max: Optional[int] = None  # ngram: longest match tried first (default 4)
    suffix_decoding_max_tree_depth: int = 24  # suffix: longest match + draft, in tokens
    suffix_decoding_max_cached_requests: int = 1000  # suffix: outputs in the global tree
    suffix_decoding_max_spec_factor: float = 1.0  # suffix: draft <= factor x match length
    suffix_decoding_min_token_prob: float = 0.1  # suffix: stop below this estimated chance
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(
                f"speculative_config.method must be one of {SPEC_METHODS}, got {self.method!r}"
            )
        positive = ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")
        for name in (*positive, "suffix_decoding_max_tree_depth"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(
                    f"speculative_config.{name} must be an integer >= 1, got {value!r}"
                )
        if self.lookup_min > self.lookup_max:
            raise ValueError(
                "speculative_config.prompt_lookup_min must be <= prompt_lookup_max, got "
                f"{self.lookup_min} > {self.lookup_max}"
            )
        if type(self.suffix_decoding_max_cached_requests) is not int or (
            self.suffix_decoding_max_cached_requests < 0
        ):
            raise ValueError("speculative_config.suffix_decoding_max_cached_requests must be >= 0")
        if not self.suffix_decoding_max_spec_factor > 0:
            raise ValueError("speculative_config.suffix_decoding_max_spec_factor must be > 0")
        if not 0 <= self.suffix_decoding_min_token_prob <= 1:
            raise ValueError("speculative_config.suffix_decoding_min_token_prob must be in [0, 1]")
        if type(self.adaptive) is not bool:
            raise ValueError("speculative_config.adaptive must be true or false")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SpeculativeConfig:
        """From vLLM's JSON keys; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**raw)

    @property
    def num_tokens(self) -> int:
        """The most drafts per request and step."""
        if self.num_speculative_tokens is not None:
            return self.num_speculative_tokens
        return (
            NGRAM_DEFAULT_TOKENS if self.method == "ngram" else self.suffix_decoding_max_tree_depth
        )

    @property
    def lookup_min(self) -> int:
        if self.prompt_lookup_min is not None:
            return self.prompt_lookup_min
        return min(2, self.prompt_lookup_max or 2)

    @property
    def lookup_max(self) -> int:
        if self.prompt_lookup_max is not None:
            return self.prompt_lookup_max
        return max(4, self.prompt_lookup_min or 4)


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (docs/lora.md), vLLM's flags: adapters resident at once (and so
    distinct adapters in a step), adapters kept read on the host, the largest rank."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None  # None: max_loras

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras ({self.max_loras})"
            )

    @property
    def host_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


@dataclass(frozen=True)
class EngineArgs:
    """Everything a user can set, as the CLI and ``LLM(...)`` take it."""

    # A directory, a .gguf file, or a Hub id ORG/NAME[@REVISION][:QUANT] (models/hub.py);
    # None: the bundled SmolLM2.
    model: Optional[str] = None
    gguf_file: Optional[str] = None  # the .gguf file of a GGUF repo (or directory) in model
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; CPU: bfloat16 also
    # "auto": a GGUF's quantized matrices as the file stores them (CPU; else, and for other
    # checkpoints, "none") | None/"none": dequantized | "int4" (CPU, small decode steps)
    quantization: Optional[str] = "auto"
    device: str = "auto"  # "auto": cuda if available, else cpu
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory: Optional[float] = None  # GiB (CPU); default DEFAULT_KV_CACHE_GIB
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: Optional[int] = None  # overrides the memory budget (tests)
    num_sliding_kv_blocks: Optional[int] = None  # the sliding layers' pool (core/sliding_kv.py)
    disable_hybrid_kv_cache_manager: bool = False  # sliding layers' KV in the one pool
    # None: DEFAULT_MAX_NUM_BATCHED_TOKENS, except a server on the CPU (``serving``), which
    # times a step at start and picks one (engine/cpu_budget.py).
    max_num_batched_tokens: Optional[int] = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    # Prefills with at most this many tokens left go before longer ones (None: a quarter of
    # the budget; 0: arrival order only). core/scheduler.py, "short prefills first".
    short_prefill_tokens: Optional[int] = None
    max_model_len: Optional[int] = None  # default: the model's, capped at 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # "priority": lower priority values served first
    seed: int = 0
    load_format: str = "auto"  # "dummy": random weights, no checkpoint files
    chat_template: Optional[str] = None  # a Jinja file (or the template's text): the model's
    model_preset: Optional[str] = None  # built-in shapes for dummy weights (models/presets.py)
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    async_scheduling: Optional[bool] = None  # None: on for CUDA, off for the CPU
    kv_role: str = "both"  # disaggregated prefill: both | prefill | decode
    kv_secret: Optional[str] = None  # side-channel secret (else $PAGODA_KV_SECRET)
    kv_lease_seconds: float = 30.0
    kv_load_failure: str = "recompute"  # recompute | fail
    kv_transfer_timeout: float = 10.0
    kv_host: str = "127.0.0.1"  # the side channel's address
    kv_port: int = 0
    serving: bool = False  # the defaults of a server (pagoda serve)
    # Speculative decoding: vLLM's dict (or a SpeculativeConfig); None: off.
    speculative_config: Union[Mapping[str, Any], SpeculativeConfig, None] = None
    # KV cache events for KV-aware routers: vLLM's dict (or a KVEventsConfig); None: off.
    kv_events_config: Union[Mapping[str, Any], KVEventsConfig, None] = None
    # Pooling models (docs/models.md): --runner auto picks pooling for *Model,
    # *EmbeddingModel and *ForSequenceClassification architectures and for encoders.
    runner: str = "auto"  # auto | generate | pooling
    convert: str = "auto"  # auto | embed | classify | none: a decoder served as a pooler
    pooler_config: Optional[Mapping[str, Any]] = None  # vLLM's keys, over the checkpoint's
    # Over the checkpoint's config.json (vLLM's --hf-overrides): a Qwen3-Reranker-style model
    # is {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token":
    # ["no", "yes"], "is_original_qwen3_reranker": true}.
    hf_overrides: Optional[Mapping[str, Any]] = None
    # Multi-LoRA (docs/lora.md): requests name an adapter (LoRARequest); vLLM's flags.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    # Batch-invariant execution (docs/deterministic.md): a request's tokens do not depend on
    # its batch-mates, chunking, prefix hits or speculation. VLLM_BATCH_INVARIANT=1 also sets
    # it (read once, by :meth:`is_deterministic`).
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"--runner must be one of {list(RUNNERS)}, got {self.runner!r}")
        if self.convert not in CONVERTS:
            raise ValueError(f"--convert must be one of {list(CONVERTS)}, got {self.convert!r}")
        if self.runner == "generate" and self.convert not in ("auto", "none"):
            raise ValueError(f"--convert {self.convert} needs --runner pooling (or auto)")
        if self.short_prefill_tokens is not None and self.short_prefill_tokens < 0:
            raise ValueError(
                f"--short-prefill-tokens must be >= 0, got {self.short_prefill_tokens}"
            )
        for name in ("pooler_config", "hf_overrides"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be a JSON object, got {value!r}")

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            self.block_size,
            self.kv_cache_memory,
            self.gpu_memory_utilization,
            self.num_kv_blocks,
            self.num_sliding_kv_blocks,
            not self.disable_hybrid_kv_cache_manager,
        )

    def is_deterministic(self) -> bool:
        """--deterministic or VLLM_BATCH_INVARIANT=1 (read now: once, when the model is
        prepared). Refuses what it cannot keep batch-invariant: int4 layers switch between
        their 4-bit and dense forms by a step's rows, and LoRA's grouped products change with
        the rows of each adapter (``--quantization auto`` is resolved to none instead)."""
        on = self.deterministic or envs.BATCH_INVARIANT()
        if on and self.quantization == "int4":
            raise ValueError(
                "--deterministic does not take --quantization int4 (its layers run the 4-bit "
                "or the dense form by the number of rows in a step)"
            )
        if on and self.enable_lora:
            raise ValueError("--deterministic does not take --enable-lora")
        return on

    def lora_config(self) -> Optional[LoRAConfig]:
        if not self.enable_lora:
            return None
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)

    def kv_transfer_config(self, engine_id: str) -> KVTransferConfig:
        return KVTransferConfig(
            self.kv_role,
            engine_id,
            self.kv_lease_seconds,
            self.kv_load_failure,
            self.kv_transfer_timeout,
            self.kv_host,
            self.kv_port,
        )

    def events_config(self) -> Optional[KVEventsConfig]:
        raw = self.kv_events_config
        if raw is not None and not isinstance(raw, KVEventsConfig):
            if not isinstance(raw, Mapping):
                raise ValueError("kv_events_config must be a JSON object (a dict)")
            raw = KVEventsConfig.from_mapping(raw)
        return raw if raw is not None and raw.enabled else None

    def spec_config(self) -> Optional[SpeculativeConfig]:
        raw = self.speculative_config
        if raw is None or isinstance(raw, SpeculativeConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError("speculative_config must be a JSON object (a dict)")
        return SpeculativeConfig.from_mapping(raw)

    @property
    def token_budget(self) -> int:
        """The per-step token budget before any measurement: the user's, or the default."""
        return self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS

    def scheduler_config(self, max_model_len: int, budget: Optional[int] = None) -> SchedulerConfig:
        budget = budget or self.token_budget
        short = self.short_prefill_tokens
        return SchedulerConfig(
            budget,
            self.max_num_seqs,
            max_model_len,
            self.enable_chunked_prefill,
            self.scheduling_policy,
            self.max_loras if self.enable_lora else None,
            budget // SHORT_PREFILL_SHARE if short is None else (short or None),
        )

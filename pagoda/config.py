"""Engine configuration: frozen dataclasses, resolved once in one place.

Kept free of torch so that the scheduler side (``pagoda.core``) can import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_KV_CACHE_GIB = 2.0


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # the per-step token budget
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

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
    gpu_memory_utilization: float = 0.9          # CUDA: fraction of free memory for KV
    num_blocks: Optional[int] = None             # overrides the memory budget (tests)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory_gib}")


@dataclass(frozen=True)
class EngineArgs:
    """Everything a user can set, as the CLI and ``LLM(...)`` take it."""
    model: Optional[str] = None            # directory or .gguf; None: the bundled SmolLM2
    dtype: str = "auto"
    device: str = "auto"                   # "auto": cuda if available, else cpu
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory: Optional[float] = None  # GiB (CPU); default DEFAULT_KV_CACHE_GIB
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: Optional[int] = None    # overrides the memory budget (tests)
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_model_len: Optional[int] = None    # default: the model's, capped at 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    seed: int = 0

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                           self.num_kv_blocks)

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, max_model_len,
                               self.enable_chunked_prefill)

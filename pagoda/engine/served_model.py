"""ServedModel: the model an engine serves, as the engine and the API layers know it (name,
shapes, tokenizer, placement, what it serves), and the key its KV depends on besides tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from pagoda.models.config import ModelArch

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
    # Under --quantization auto, the quantized file's type most of its weights are stored in
    # (Q4_1, Q4_K, Q5_0, ...), as Ollama reports a model's quantization level; else None.
    weights_format: Optional[str] = None

    @property
    def key(self) -> str:
        """What a cached block's KV depends on besides its tokens (in every prefix hash: it
        matters once KV crosses engines, as in disaggregated prefill)."""
        key = f"{self.name}:{self.dtype}"
        if self.quantization is not None:  # decode steps' KV comes from the 4-bit weights
            key = f"{key}:{self.quantization}"
        return key if self.kv_dtype == self.dtype else f"{key}:kv-{self.kv_dtype}"

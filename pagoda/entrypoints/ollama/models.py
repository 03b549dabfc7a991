"""The served model as Ollama describes its models: the names a request may give it, its
``details`` (format, family, parameter size, quantization), its size and digest, its
``model_info`` (``general.architecture``, ``<arch>.context_length``, ...) and what it can
do (``capabilities``).

Ollama names carry a tag (``smollm2:135m``, ``llama3.2:latest``): a request may name the
model by any of the server's names, or by one of them with ``:latest``; ``/api/tags`` lists
the first with ``:latest`` (or as it is, when it has a tag of its own). A LoRA adapter the
server serves (``--lora-modules``, or loaded at runtime) is named the same way, and selects
that adapter (:func:`adapter_of`). Invariant: every name this module lists is one
:func:`resolve` accepts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Optional

from pagoda.entrypoints.dialect import ServerContext
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.ollama.errors import not_found
from pagoda.lora_request import LoRARequest

LATEST = ":latest"


def tagged(name: str) -> str:
    """``name`` as Ollama lists it: with a tag (``:latest`` unless it has one)."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + LATEST


def resolve(ctx: ServerContext, model: Optional[str], required: bool = True) -> str:
    """The model a request names (the served one when it names none and none is
    required): 400 when one is required and missing, 404 when it is not served."""
    names = ctx.config.model_names
    if not model:
        if required:
            raise ApiError(400, "model is required", "model")
        return tagged(names[0])
    for name in _untagged(model):
        if name in names or ctx.door.adapters.get(name) is not None:
            return model
    raise not_found(model)


def adapter_of(ctx: ServerContext, model: str) -> Optional[LoRARequest]:
    """The LoRA adapter a name :func:`resolve` accepted selects (None: the base model)."""
    for name in _untagged(model):
        if name in ctx.config.model_names:
            return None
        lora = ctx.door.adapters.get(name)
        if lora is not None:
            return lora
    return None


def _untagged(model: str) -> list[str]:
    """The names ``model`` may stand for: itself, and without ``:latest``."""
    if model.endswith(LATEST):
        return [model, model[: -len(LATEST)]]
    return [model]


@dataclass(frozen=True)
class Description:
    """What the engine knows of its model, in Ollama's terms."""

    name: str  # as /api/tags lists it
    family: str  # the architecture (``llama``, ``qwen3``, ...)
    format: str  # "gguf" or "safetensors"
    parameters: int
    size: int  # bytes of weights
    quantization: str
    context_length: int
    digest: str

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.format,
            "family": self.family,
            "families": [self.family],
            "parameter_size": parameter_size(self.parameters),
            "quantization_level": self.quantization,
        }


def describe(ctx: ServerContext) -> Description:
    engine = ctx.door.engine
    arch = engine.arch
    root = ctx.config.model_root or ctx.config.model_names[0]
    parameters, size = _weights(engine, root)
    name = tagged(ctx.config.model_names[0])
    return Description(
        name,
        arch.model_type or "unknown",
        "gguf" if root.endswith(".gguf") else "safetensors",
        parameters,
        size,
        _quantization(engine),
        engine.max_model_len,
        hashlib.sha256(f"{name}\x00{root}".encode()).hexdigest(),
    )


def model_info(ctx: ServerContext, d: Description) -> dict[str, Any]:
    """Ollama's ``model_info``: GGUF's metadata keys, from the model's config."""
    arch = ctx.door.engine.arch
    fam = d.family
    return {
        "general.architecture": fam,
        "general.parameter_count": d.parameters,
        f"{fam}.context_length": d.context_length,
        f"{fam}.embedding_length": arch.hidden_size,
        f"{fam}.feed_forward_length": arch.intermediate_size,
        f"{fam}.block_count": arch.num_layers,
        f"{fam}.attention.head_count": arch.num_heads,
        f"{fam}.attention.head_count_kv": arch.num_kv_heads,
        f"{fam}.attention.key_length": arch.head_dim,
        f"{fam}.attention.layer_norm_rms_epsilon": arch.rms_norm_eps,
        f"{fam}.rope.freq_base": arch.rope_theta,
        f"{fam}.vocab_size": arch.vocab_size,
    }


def capabilities(ctx: ServerContext) -> list[str]:
    """``completion`` always; ``tools`` with a tool-call parser; ``thinking`` with a
    reasoning parser."""
    found = ["completion"]
    if ctx.config.tool_call_parser is not None:
        found.append("tools")
    if ctx.config.reasoning_parser is not None:
        found.append("thinking")
    return found


def parameter_size(count: int) -> str:
    """``135M``, ``1.7B``: how Ollama writes a parameter count."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(count)


def _weights(engine: Any, root: str) -> tuple[int, int]:
    """(parameters, bytes): the parameter count from the model's config (the loaded module
    holds quantized layers as codes, not parameters, and dense copies beside them); the size
    of the model's file where it is one (a GGUF, as Ollama reports it), else of the loaded
    parameters."""
    count = parameter_count(engine.arch)
    if os.path.isfile(root):
        return count, os.path.getsize(root)
    module = getattr(getattr(engine, "runner", None), "model", None)
    params = getattr(module, "parameters", None)
    if callable(params):
        size = sum(t.numel() * t.element_size() for t in params())
        if size:
            return count, size
    return count, count * 2


def parameter_count(arch: Any) -> int:
    """Every weight of the model, from its config: the layers (each expert of a MoE layer,
    not only the active ones), the embedding, and an untied output projection."""
    embed = arch.vocab_size * arch.hidden_size
    count = arch.num_params_non_embedding + embed * (1 if arch.tie_word_embeddings else 2)
    idle = getattr(arch, "num_experts", 0) - getattr(arch, "num_experts_per_tok", 0)
    if idle > 0:
        moe_layers = sum(1 for i in range(arch.num_layers) if arch.is_moe_layer(i))
        count += idle * 3 * arch.hidden_size * arch.moe_intermediate_size * moe_layers
    return count


def _quantization(engine: Any) -> str:
    """The weights' quantization (a GGUF run as stored: the type most of its weights are
    stored in, ``Q4_1``), else their dtype (``F32``, ``BF16``), as Ollama names it."""
    stored = getattr(engine, "weights_format", None)
    if stored:
        return str(stored)
    quantization = getattr(engine, "quantization", None)
    if quantization:
        return str(quantization).upper()
    dtype = str(getattr(engine, "dtype", "")).replace("torch.", "")
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(dtype, dtype.upper())

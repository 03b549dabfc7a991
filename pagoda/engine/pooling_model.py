"""Pooling models: which runner serves a checkpoint (``--runner``, ``--convert``, vLLM's rules)
and what its :class:`Pooler` does (``--pooler-config``, ``--hf-overrides``).

``--runner auto`` serves pooling for an encoder (BERT, RoBERTa, XLM-R: they have no other use)
and for architectures named ``*Model`` (``*EmbeddingModel`` among them) or
``*ForSequenceClassification``; else generation. A decoder served for pooling is converted
(``--convert``) to an embedder (its final hidden states pooled, LAST and normalized unless the
checkpoint's Sentence Transformers config or ``--pooler-config`` say otherwise) or to a
classifier whose head is rows of its output projection: ``classifier_from_token`` in
``--hf-overrides`` names the tokens, and ``is_original_qwen3_reranker`` makes the one score of
a Qwen3-Reranker, sigmoid(logit("yes") - logit("no")) at the last token, as vLLM computes it.
Invariant: every choice is made here, once, before anything is loaded; what cannot be served
is refused by a ValueError naming the flag (or the config key) that asked for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from pagoda.config import EngineArgs
from pagoda.models.config import ModelArch
from pagoda.models.encoder_config import EncoderArch
from pagoda.models.encoder_loader import LoadedEncoder
from pagoda.models.hub import resolve_model
from pagoda.models.pooling import (
    Activation,
    PoolerConfig,
    PoolingConfigError,
    PoolingType,
    resolve_pooler_config,
)
from pagoda.models.registry import ENCODERS
from pagoda.worker.pooler import Matryoshka, Pooler

# --hf-overrides keys pagoda reads (they choose the runner and the head; none changes shapes).
HF_OVERRIDE_KEYS = (
    "architectures",
    "classifier_from_token",
    "is_original_qwen3_reranker",
    "is_matryoshka",
    "matryoshka_dimensions",
)
POOLING_ARCH_SUFFIXES = ("Model", "ForSequenceClassification")  # *EmbeddingModel ends in Model
CLASSIFIER_SUFFIX = "ForSequenceClassification"


@dataclass(frozen=True)
class RunnerChoice:
    """What serves the checkpoint: generation, or pooling for ``task`` (embed / classify)."""

    kind: str  # "generate" | "pooling"
    encoder: bool = False
    task: Optional[str] = None  # pooling: "embed" or "classify"
    path: Optional[str] = None  # the local directory (Sentence Transformers files), if any
    hf_config: dict[str, Any] = field(default_factory=dict)  # config.json with the overrides


def choose_runner(args: EngineArgs) -> RunnerChoice:
    """``--runner`` / ``--convert`` resolved against the checkpoint's config.json."""
    path, config = _read_config(args)
    config = _with_overrides(config, args.hf_overrides)
    encoder = config.get("model_type") in ENCODERS
    architecture = str((config.get("architectures") or [""])[0])
    if args.runner == "generate":
        if encoder:
            raise ValueError(
                f"--runner generate: model_type {config['model_type']!r} is an encoder, which "
                "serves embeddings and scores only (--runner pooling)"
            )
        return RunnerChoice("generate", path=path, hf_config=config)
    pooling = (
        args.runner == "pooling"
        or encoder
        or args.convert in ("embed", "classify")
        or architecture.endswith(POOLING_ARCH_SUFFIXES)
    )
    if not pooling:
        return RunnerChoice("generate", path=path, hf_config=config)
    task = args.convert if args.convert in ("embed", "classify") else None
    if task is None:
        task = _native_task(config, architecture)
    return RunnerChoice("pooling", encoder, task, path, config)


def _native_task(config: dict[str, Any], architecture: str) -> str:
    if architecture.endswith(CLASSIFIER_SUFFIX) or config.get("classifier_from_token"):
        return "classify"
    return "embed"


def _read_config(args: EngineArgs) -> tuple[Optional[str], dict[str, Any]]:
    """The checkpoint's directory and config.json ({} for a GGUF file, a preset or the bundled
    model, which have none)."""
    if args.model is None or args.gguf_file is not None:
        return None, {}
    source = resolve_model(args.model, weights=args.load_format != "dummy")
    config_path = os.path.join(source.path, "config.json")
    if not os.path.isfile(config_path):
        return None, {}
    with open(config_path) as f:
        config: dict[str, Any] = json.load(f)
    return source.path, config


def _with_overrides(
    config: dict[str, Any], overrides: Optional[Mapping[str, Any]]
) -> dict[str, Any]:
    if not overrides:
        return config
    for key in overrides:
        if key not in HF_OVERRIDE_KEYS:
            known = list(HF_OVERRIDE_KEYS)
            raise ValueError(f"--hf-overrides key {key!r} is not supported; pagoda reads {known}")
    return {**config, **overrides}


def parse_pooler_config(raw: Optional[Mapping[str, Any]]) -> Optional[PoolerConfig]:
    """``--pooler-config`` (vLLM's keys); the error names the flag."""
    if raw is None:
        return None
    try:
        config = PoolerConfig.from_dict(dict(raw))
    except PoolingConfigError as e:
        raise ValueError(f"--pooler-config: {e}") from None
    if config.pooling_type is PoolingType.ALL:
        raise ValueError("--pooler-config: pooling_type 'ALL' (one vector per token) is not served")
    return config


def matryoshka(config: dict[str, Any]) -> Matryoshka:
    """Which ``dimensions`` the checkpoint was trained for (vLLM's keys): any width
    (``is_matryoshka``), a list (``matryoshka_dimensions``), or none."""
    dims = config.get("matryoshka_dimensions")
    if dims:
        return tuple(int(d) for d in dims)
    return True if config.get("is_matryoshka") else None


# --------------------------------------------------------------------------- encoders
def encoder_pooler(loaded: LoadedEncoder, config: dict[str, Any], dtype: torch.dtype) -> Pooler:
    """An encoder's pooler: its resolved pooling, and its classifier head for classify."""
    _refuse_all(loaded.pooler)
    head = loaded.model.classify if loaded.task != "embed" else None
    return Pooler(
        loaded.pooler,
        loaded.arch.hidden_size,
        dtype,
        head,
        loaded.arch.num_labels if head is not None else 0,
        loaded.activation,
        matryoshka(config),
        class_labels(config),
    )


def class_labels(config: dict[str, Any]) -> tuple[str, ...]:
    """The classes' names by index, as ``id2label`` gives them (``LABEL_i`` where it has none)."""
    names = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    count = max(names, default=-1) + 1
    return tuple(names.get(i, f"LABEL_{i}") for i in range(count))


def encoder_view(arch: EncoderArch) -> ModelArch:
    """The encoder as the engine and the API layers read a model (vocabulary, widths,
    context); it has no RoPE, no KV heads of its own and no end-of-sequence token."""
    return ModelArch(
        model_type=arch.model_type,
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_heads,
        head_dim=arch.head_dim,
        rms_norm_eps=arch.layer_norm_eps,
        rope_theta=0.0,
        rope_scaling=None,
        max_position_embeddings=arch.max_seq_len,
        tie_word_embeddings=False,
        hidden_act=arch.hidden_act,
    )


# --------------------------------------------------------------------------- decoders
def decoder_pooler(
    choice: RunnerChoice,
    arch: ModelArch,
    output_weight: torch.Tensor,
    tokenizer: Any,
    dtype: torch.dtype,
    override: Optional[PoolerConfig],
) -> Pooler:
    """A decoder converted to a pooling model (module docstring)."""
    task = choice.task or "embed"
    config = resolve_pooler_config(choice.path, task, encoder=False, override=override)
    _refuse_all(config)
    if task == "embed":
        return Pooler(config, arch.hidden_size, dtype, matryoshka=matryoshka(choice.hf_config))
    head, activation = _token_head(choice.hf_config, output_weight, tokenizer)
    return Pooler(config, arch.hidden_size, dtype, head, head.weight.shape[0], activation)


class _RowsHead:
    """Logits of a few tokens from the output projection's rows: (N, E) -> (N, L)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # (L, E)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.t()


def _token_head(
    config: dict[str, Any], output_weight: torch.Tensor, tokenizer: Any
) -> tuple[_RowsHead, Activation]:
    """``classifier_from_token``'s rows of the output projection; a Qwen3-Reranker's one row
    is "yes" - "no" (the sigmoid of the logits' difference is the softmax's P(yes))."""
    tokens = config.get("classifier_from_token")
    if not tokens:
        raise ValueError(
            "--convert classify of a decoder needs its head's tokens: --hf-overrides "
            "'{\"classifier_from_token\": [...]}' (a sequence-classification head of its own "
            "is not supported)"
        )
    ids = [_single_token(tokenizer, str(t)) for t in tokens]
    rows = output_weight[ids]  # (L, E)
    if config.get("is_original_qwen3_reranker"):
        if len(ids) != 2:
            raise ValueError(
                "--hf-overrides: is_original_qwen3_reranker needs classifier_from_token "
                '["no", "yes"] (two tokens)'
            )
        return _RowsHead((rows[1] - rows[0]).unsqueeze(0)), Activation.SIGMOID  # (1, E)
    return _RowsHead(rows), Activation.SIGMOID if len(ids) == 1 else Activation.SOFTMAX


def _single_token(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(f"--hf-overrides: classifier_from_token {token!r} is not one token")
    return int(token_id)


def _refuse_all(config: PoolerConfig) -> None:
    if config.pooling_type is PoolingType.ALL:
        raise ValueError("pooling_type 'ALL' (one vector per token) is not served")

"""Load an encoder-only model (BERT, RoBERTa, XLM-RoBERTa: ``registry.ENCODERS``) with its
tokenizer and its pooling, from a Hugging Face or Sentence Transformers directory or a Hub id.

The weights are read from safetensors under transformers' names, with the family's task prefix
(``bert.`` / ``roberta.``, as ``*ForSequenceClassification`` saves them) or without it (as
``BertModel`` and Sentence Transformers save them). Invariant: a model loads with every
parameter filled from the checkpoint, or not at all (the error names what is missing).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

from pagoda.models.base import Encoder, EncoderClass
from pagoda.models.encoder_config import EncoderArch
from pagoda.models.hub import resolve_model
from pagoda.models.loader import (
    TokenIdTokenizer,
    _check_checkpoint_dtype,
    _iter_safetensors,
    _maybe_hf_tokenizer,
    _safetensors_files,
)
from pagoda.models.pooling import (
    Activation,
    PoolerConfig,
    PoolingConfigError,
    classifier_activation,
    read_st_config,
    resolve_pooler_config,
)

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")


@dataclass
class LoadedEncoder:
    model: Encoder  # weights loaded, in eval mode
    arch: EncoderArch
    tokenizer: Any  # a transformers tokenizer (TokenIdTokenizer without tokenizer files)
    task: str  # "embed", "classify" or "score"
    pooler: PoolerConfig  # resolved for the task (pooling.resolve_pooler_config)
    activation: Activation  # what classify / score apply to the head's logits
    name: str


def load_encoder(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device = CPU,
    task: Optional[str] = None,
    pooler_override: Optional[PoolerConfig] = None,
) -> LoadedEncoder:
    """The encoder at ``path`` (a directory or a Hub id) in ``dtype`` on ``device``. ``task``
    defaults to "classify" for a checkpoint with a classifier head, else "embed"."""
    source = resolve_model(path)
    config = _read_config(source.path)
    arch = EncoderArch.from_hf_config(config)
    task = task or ("classify" if arch.num_labels else "embed")
    if task != "embed" and not arch.num_labels:
        raise PoolingConfigError(
            f"task {task!r} needs a classifier head; {arch.architecture!r} has none"
        )
    model = _empty_encoder(arch, dtype, device)
    files = _safetensors_files(source.path)
    if not files:
        raise FileNotFoundError(f"{source.path!r} has no *.safetensors files")
    model.load_weights(_iter_safetensors(files))
    tokenizer = (_maybe_hf_tokenizer(source.path) or (TokenIdTokenizer(), None))[0]
    pooler = resolve_pooler_config(source.path, task, encoder=True, override=pooler_override)
    activation = classifier_activation(config, arch.num_labels, read_st_config(source.path))
    logger.info("loaded encoder %s (%s, %s) in %s", source.path, arch.architecture, task, dtype)
    return LoadedEncoder(model, arch, tokenizer, task, pooler, activation, source.name)


def encoder_class(arch: EncoderArch) -> EncoderClass:
    module, _, name = arch.family.model_class.partition(":")
    cls: EncoderClass = getattr(importlib.import_module(module), name)
    return cls


def _read_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    with open(config_path) as f:
        config: dict[str, Any] = json.load(f)
    _check_checkpoint_dtype(config)
    return config


def _empty_encoder(arch: EncoderArch, dtype: torch.dtype, device: torch.device) -> Encoder:
    """Uninitialised weights of ``dtype`` on ``device`` (built on meta: no CPU copy)."""
    with torch.device("meta"):
        built = cast(nn.Module, encoder_class(arch)(arch))
    return cast(Encoder, built.to(dtype=dtype).to_empty(device=device).eval())

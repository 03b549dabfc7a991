"""Pooling: one vector (or score) per sequence from a packed batch's hidden states, with the
checkpoint's pooling config, and a state that pools a sequence computed over several chunks.

Which pooling a model gets, lowest precedence first (as vLLM's pooling runner decides it):

1. the task's default: ``embed`` pools the LAST token for a decoder and the CLS row for an
   encoder (vLLM's BERT / RoBERTa embedding models default to CLS), normalized;
   ``classify`` / ``score`` pool what the head reads (CLS for the encoders' heads, LAST for a
   decoder's) and apply the head's activation;
2. a Sentence Transformers checkpoint's ``modules.json``: its Pooling module's
   ``config.json`` (``pooling_mode`` "cls" / "mean" / "lasttoken", or the older
   ``pooling_mode_*`` booleans) sets the type, and a Normalize module turns normalize on
   (its absence turns it off);
3. ``--pooler-config`` JSON with vLLM's keys (``pooling_type``, ``normalize``,
   ``dimensions``, ``use_activation``).

The classifier's activation follows Sentence Transformers' ``CrossEncoder`` and vLLM: the
``activation_fn`` the checkpoint's Sentence Transformers config names, when it names one; else
a regression head (``problem_type``) gets none, one label a sigmoid, several a softmax
(``CrossEncoder`` itself returns raw logits for several labels unless ``apply_softmax``;
vLLM's ``classify`` gives probabilities, and so does pagoda).

Embeddings are truncated to ``dimensions`` (Matryoshka) first, then normalized, as vLLM does
(Sentence Transformers' ``truncate_dim`` cuts after its Normalize module: same direction,
different norm).

Invariant: pooling a sequence whole and pooling it chunk by chunk through
:class:`PoolingState` give the same vector (mean: a running fp32 sum and count; last: the
final chunk's last row; CLS: the first chunk's first row; ALL: every row, in order).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

TASKS = ("embed", "classify", "score")
ST_MODULES = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"


class PoolingType(str, Enum):
    LAST = "LAST"  # the sequence's last token (decoder embedders)
    MEAN = "MEAN"  # the average of all its tokens
    CLS = "CLS"  # its first token ([CLS] / <s>)
    ALL = "ALL"  # every token's hidden state, unpooled


class Activation(str, Enum):
    """What turns a classifier's logits into scores."""

    NONE = "none"
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"


class PoolingConfigError(ValueError):
    """A pooling config pagoda cannot follow; the message names the key."""


# Sentence Transformers' pooling modes pagoda pools with; the others (max, weightedmean,
# mean_sqrt_len_tokens, several at once) are refused by name.
_ST_MODES = {"cls": PoolingType.CLS, "mean": PoolingType.MEAN, "lasttoken": PoolingType.LAST}
_ST_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
# vLLM PoolerConfig keys pagoda does not implement (refused by name, not ignored).
_VLLM_UNSUPPORTED = (
    "task",
    "tok_pooling_type",
    "enable_chunked_processing",
    "max_embed_len",
    "logit_mean",
    "logit_sigma",
    "step_tag_id",
    "returned_token_ids",
    "softmax",
    "activation",
)
# Sentence Transformers' activation_fn names (their last component) -> pagoda's.
_ST_ACTIVATIONS = {
    "Identity": Activation.NONE,
    "Sigmoid": Activation.SIGMOID,
    "Softmax": Activation.SOFTMAX,
}


@dataclass(frozen=True)
class PoolerConfig:
    """vLLM's pooler keys; None: not said here (a lower layer's value, or the default)."""

    pooling_type: Optional[PoolingType] = None
    normalize: Optional[bool] = None  # embed: L2-normalize the vector
    dimensions: Optional[int] = None  # embed: keep the first this many (Matryoshka)
    use_activation: Optional[bool] = None  # classify / score: apply the head's activation

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoolerConfig":
        """``--pooler-config`` JSON (vLLM's keys; ``seq_pooling_type`` is a synonym of
        ``pooling_type``). Unknown and unimplemented keys are refused by name."""
        d = dict(d)
        if "seq_pooling_type" in d:
            d.setdefault("pooling_type", d.pop("seq_pooling_type"))
        known = {f.name for f in fields(cls)}
        for key in d:
            if key in _VLLM_UNSUPPORTED:
                raise PoolingConfigError(f"pooler config key {key!r} is not supported by pagoda")
            if key not in known:
                raise PoolingConfigError(
                    f"unknown pooler config key {key!r}; pagoda reads {sorted(known)}"
                )
        return cls(
            pooling_type=_pooling_type(d.get("pooling_type")),
            normalize=_optional_bool(d, "normalize"),
            dimensions=_optional_dimensions(d.get("dimensions")),
            use_activation=_optional_bool(d, "use_activation"),
        )

    def over(self, base: "PoolerConfig") -> "PoolerConfig":
        """This config's keys where set, ``base``'s elsewhere."""
        said = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{k: v for k, v in said.items() if v is not None})


def _pooling_type(value: Any) -> Optional[PoolingType]:
    if value is None:
        return None
    try:
        return PoolingType(str(value).upper())
    except ValueError:
        names = [t.value for t in PoolingType]
        raise PoolingConfigError(f"pooling_type {value!r} is not one of {names}") from None


def _optional_bool(d: dict[str, Any], key: str) -> Optional[bool]:
    value = d.get(key)
    if value is not None and not isinstance(value, bool):
        raise PoolingConfigError(f"pooler config {key!r} must be true or false, not {value!r}")
    return value


def _optional_dimensions(value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PoolingConfigError(f"dimensions must be a positive integer, not {value!r}")
    return value


def default_pooler_config(task: str, encoder: bool) -> PoolerConfig:
    """The task's pooling when neither the checkpoint nor the user says (module docstring)."""
    if task not in TASKS:
        raise PoolingConfigError(f"pooling task {task!r} is not one of {TASKS}")
    first_or_last = PoolingType.CLS if encoder else PoolingType.LAST
    if task == "embed":
        return PoolerConfig(first_or_last, normalize=True)
    return PoolerConfig(first_or_last, normalize=False, use_activation=True)


def read_st_pooler_config(path: str) -> Optional[PoolerConfig]:
    """The pooling a Sentence Transformers directory declares (``modules.json``), or None
    when ``path`` has no ``modules.json`` or no Pooling module in it."""
    modules_path = os.path.join(path, ST_MODULES)
    if not os.path.exists(modules_path):
        return None
    with open(modules_path) as f:
        modules = json.load(f)
    kinds = [str(m.get("type", "")).rpartition(".")[2] for m in modules]
    if "Pooling" not in kinds:
        return None
    for module, kind in zip(modules, kinds, strict=True):
        if kind not in ("Transformer", "Pooling", "Normalize"):
            raise PoolingConfigError(
                f"Sentence Transformers module {kind!r} ({module.get('path')!r} in "
                f"{ST_MODULES}) is not supported: pagoda pools, normalizes and truncates only"
            )
    pooling = modules[kinds.index("Pooling")]
    with open(os.path.join(path, pooling.get("path", ""), "config.json")) as f:
        config = json.load(f)
    return PoolerConfig(_st_pooling_type(config), normalize="Normalize" in kinds)


def _st_pooling_type(config: dict[str, Any]) -> PoolingType:
    """The one pooling mode of a Pooling module's config (new or legacy keys)."""
    if not config.get("include_prompt", True):
        raise PoolingConfigError("Sentence Transformers pooling with include_prompt false")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _ST_LEGACY_KEYS.items() if config.get(key)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise PoolingConfigError(
            f"Sentence Transformers pooling_mode {modes!r} is not supported; only one of "
            f"{sorted(_ST_MODES)}"
        )
    return _ST_MODES[modes[0]]


def resolve_pooler_config(
    path: Optional[str],
    task: str,
    encoder: bool,
    override: Optional[PoolerConfig] = None,
) -> PoolerConfig:
    """Defaults, then the checkpoint's Sentence Transformers config, then ``override``; every
    key set (``dimensions`` may stay None: the full width)."""
    config = default_pooler_config(task, encoder)
    st = read_st_pooler_config(path) if path is not None else None
    if st is not None and task == "embed":
        config = st.over(config)
    if override is not None:
        config = override.over(config)
    return config


def read_st_config(path: str) -> dict[str, Any]:
    """A Sentence Transformers directory's ``config_sentence_transformers.json`` ({} if none)."""
    st_path = os.path.join(path, ST_CONFIG)
    if not os.path.exists(st_path):
        return {}
    with open(st_path) as f:
        config: dict[str, Any] = json.load(f)
    return config


def classifier_activation(
    hf_config: dict[str, Any], num_labels: int, st_config: Optional[dict[str, Any]] = None
) -> Activation:
    """The activation ``classify`` / ``score`` apply to a head's logits (module docstring).
    Sentence Transformers recorded a CrossEncoder's ``activation_fn`` in three places over its
    versions: ``config_sentence_transformers.json`` (``st_config``, v6), ``config.json``'s
    ``sentence_transformers`` (v4, v5), ``sbert_ce_default_activation_function`` (before)."""
    if num_labels == 0:
        return Activation.NONE  # no head: nothing to activate
    name = (
        (st_config or {}).get("activation_fn")
        or (hf_config.get("sentence_transformers") or {}).get("activation_fn")
        or hf_config.get("sbert_ce_default_activation_function")
    )
    if name:
        kind = str(name).rpartition(".")[2]
        if kind not in _ST_ACTIVATIONS:
            raise PoolingConfigError(f"classifier activation_fn {name!r} is not supported")
        return _ST_ACTIVATIONS[kind]
    problem = hf_config.get("problem_type")
    if problem == "regression":
        return Activation.NONE
    if num_labels == 1 or problem == "multi_label_classification":
        return Activation.SIGMOID
    return Activation.SOFTMAX


# --- pooling a packed batch ------------------------------------------------------------------


def seq_starts(seq_lens: Sequence[int], device: torch.device) -> torch.Tensor:
    """(N,) int64: the first row of each packed sequence (cu_seqlens without its last)."""
    lens = torch.tensor(list(seq_lens), dtype=torch.int64, device=device)
    return torch.cumsum(lens, 0) - lens


def pool(
    hidden: torch.Tensor, seq_lens: Sequence[int], pooling_type: PoolingType
) -> torch.Tensor | list[torch.Tensor]:
    """hidden (T, E) of whole sequences packed in ``seq_lens`` order -> (N, E) in fp32 (ALL:
    a list of (L_i, E))."""
    if sum(seq_lens) != hidden.shape[0] or min(seq_lens, default=1) < 1:
        raise ValueError(f"seq_lens {list(seq_lens)} do not tile {hidden.shape[0]} rows")
    if pooling_type is PoolingType.ALL:
        return [rows.float() for rows in hidden.split(list(seq_lens))]
    starts = seq_starts(seq_lens, hidden.device)
    if pooling_type is PoolingType.CLS:
        return hidden[starts].float()
    if pooling_type is PoolingType.LAST:
        return hidden[starts + torch.tensor(list(seq_lens), device=hidden.device) - 1].float()
    seq_ids = torch.repeat_interleave(
        torch.arange(len(seq_lens), device=hidden.device),
        torch.tensor(list(seq_lens), device=hidden.device),
    )  # (T,)
    sums = hidden.new_zeros(len(seq_lens), hidden.shape[1], dtype=torch.float32)
    sums.index_add_(0, seq_ids, hidden.float())  # (N, E)
    return sums / torch.tensor(list(seq_lens), device=hidden.device).unsqueeze(1)


class PoolingState:
    """One sequence's pooling while its rows arrive in chunks (chunked prefill): feed each
    chunk's hidden rows in order with :meth:`add`, then read :meth:`result`.

        chunks:  [t0 t1 t2 | t3 t4 | t5 t6 t7]
        CLS:      t0                          the first chunk's first row
        LAST:                            t7   the final chunk's last row
        MEAN:    (sum of the rows) / 8        an fp32 running sum and count
    """

    def __init__(self, pooling_type: PoolingType) -> None:
        self.pooling_type = pooling_type
        self.count = 0  # rows seen
        self.kept: Optional[torch.Tensor] = None  # CLS: first row; LAST: latest; MEAN: sum
        self.rows: list[torch.Tensor] = []  # ALL

    def add(self, chunk: torch.Tensor) -> None:
        """chunk: (n, E), the next rows of the sequence (n >= 1)."""
        if chunk.shape[0] == 0:
            return
        kind = self.pooling_type
        # Copies, never views: the step's hidden states may be a buffer the next step reuses
        # (a CUDA graph's output), and a view would keep the whole step's rows alive.
        if kind is PoolingType.ALL:
            self.rows.append(chunk.to(torch.float32, copy=True))
        elif kind is PoolingType.CLS and self.kept is None:
            self.kept = chunk[0].to(torch.float32, copy=True)
        elif kind is PoolingType.LAST:
            self.kept = chunk[-1].to(torch.float32, copy=True)
        elif kind is PoolingType.MEAN:
            total = chunk.float().sum(0)  # (E,)
            self.kept = total if self.kept is None else self.kept + total
        self.count += chunk.shape[0]

    def result(self) -> torch.Tensor:
        """(E,) in fp32, or (L, E) for ALL."""
        if self.count == 0:
            raise ValueError("pooled a sequence with no rows")
        if self.pooling_type is PoolingType.ALL:
            return torch.cat(self.rows)
        assert self.kept is not None  # set by the first add
        if self.pooling_type is PoolingType.MEAN:
            return self.kept / self.count
        return self.kept


def add_packed(states: Sequence[PoolingState], hidden: torch.Tensor, lens: Sequence[int]) -> None:
    """Feed a packed step's rows to each sequence's state: chunk i is ``lens[i]`` rows."""
    for state, chunk in zip(states, hidden.split(list(lens)), strict=True):
        state.add(chunk)


# --- finishing -------------------------------------------------------------------------------


def finish_embeddings(pooled: torch.Tensor, config: PoolerConfig) -> torch.Tensor:
    """(N, E) pooled -> (N, dimensions or E): Matryoshka truncation, then L2 normalization."""
    dims = config.dimensions
    if dims is not None:
        if dims > pooled.shape[-1]:
            raise PoolingConfigError(
                f"dimensions {dims} is larger than the model's embedding size {pooled.shape[-1]}"
            )
        pooled = pooled[..., :dims]
    return F.normalize(pooled, p=2, dim=-1) if config.normalize else pooled


def scores(
    logits: torch.Tensor, activation: Activation, use_activation: bool = True
) -> torch.Tensor:
    """A head's logits (N, num_labels) -> scores in fp32 (a sigmoid, softmax or nothing)."""
    logits = logits.float()
    if not use_activation or activation is Activation.NONE:
        return logits
    if activation is Activation.SIGMOID:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)

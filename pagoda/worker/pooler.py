"""Pooler: what a pooling model does with a sequence's pooled hidden state, per request: an
embedding truncated (Matryoshka) and normalized, or a classifier head's scores.

The runners (``model_runner.py`` for decoders, ``encoder_runner.py`` for encoders) pool each
sequence's rows with ``models/pooling.py`` (whole, or chunk by chunk through a
:class:`PoolingState`), then :meth:`Pooler.finish` turns the pooled rows into each request's
result with its own :class:`PoolingParams` layered over the model's pooler config. The engine
checks a request against :meth:`Pooler.check` at intake, so ``finish`` never refuses.
Invariant: a result is a 1-D float32 tensor: ``dimensions`` (or the hidden size) wide for
``embed``, one score per label for ``classify``, one score for ``score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from pagoda.models.pooling import (
    Activation,
    PoolerConfig,
    PoolingType,
    finish_embeddings,
    scores,
)
from pagoda.pooling_params import PoolingParams

# A classifier head: pooled rows (N, E) in the model's dtype -> logits (N, num_labels).
Head = Callable[[torch.Tensor], torch.Tensor]
# Matryoshka: any width up to the hidden size (True), only these (a tuple), or none (None).
Matryoshka = Optional[bool | tuple[int, ...]]


@dataclass(frozen=True)
class Pooler:
    config: PoolerConfig  # resolved: pooling type, normalize, use_activation set
    hidden_size: int
    dtype: torch.dtype  # the model's: what the head reads
    head: Optional[Head] = None  # None: an embedding model
    num_labels: int = 0
    activation: Activation = Activation.NONE
    matryoshka: Matryoshka = None  # from the checkpoint's config (is_matryoshka, ...)
    labels: tuple[str, ...] = ()  # a classifier's class names (the config's id2label)

    @property
    def pooling_type(self) -> PoolingType:
        assert self.config.pooling_type is not None  # resolve_pooler_config sets it
        return self.config.pooling_type

    @property
    def reads_every_row(self) -> bool:
        """Whether pooling needs every row of the prompt (a prefix-cache hit would skip some)."""
        return self.pooling_type is not PoolingType.LAST

    @property
    def tasks(self) -> frozenset[str]:
        """embed for an embedding model; classify for a head, and score for a one-label head."""
        if self.head is None:
            return frozenset({"embed"})
        return frozenset({"classify", "score"} if self.num_labels == 1 else {"classify"})

    def check(self, params: PoolingParams) -> None:
        """ValueError naming the field if this model cannot serve ``params``."""
        if params.task not in self.tasks:
            served = " and ".join(sorted(self.tasks))
            raise ValueError(f"task {params.task!r} is not supported; this model serves {served}")
        dims = params.dimensions
        if dims is None:
            return
        if not self.matryoshka:
            raise ValueError(
                f"dimensions: the model does not support Matryoshka truncation (dimensions "
                f"{dims} asked of a {self.hidden_size}-wide embedding)"
            )
        if dims > self.hidden_size:
            raise ValueError(
                f"dimensions {dims} is larger than the model's embedding size {self.hidden_size}"
            )
        if isinstance(self.matryoshka, tuple) and dims not in self.matryoshka:
            raise ValueError(f"dimensions must be one of {list(self.matryoshka)}, got {dims}")

    def finish(self, pooled: torch.Tensor, params: Sequence[PoolingParams]) -> list[torch.Tensor]:
        """pooled (N, E) in fp32, one row per request in ``params`` order -> their results."""
        if self.head is None:
            return [self._embedding(row, p) for row, p in zip(pooled, params, strict=True)]
        logits = self.head(pooled.to(self.dtype))  # (N, num_labels)
        return [self._scores(row, p) for row, p in zip(logits, params, strict=True)]

    def _embedding(self, row: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        asked = PoolerConfig(dimensions=params.dimensions, normalize=params.normalize)
        return finish_embeddings(row.unsqueeze(0), asked.over(self.config))[0]

    def _scores(self, logits: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        use = params.activation
        if use is None:
            use = self.config.use_activation is not False
        return scores(logits.unsqueeze(0), self.activation, use)[0]

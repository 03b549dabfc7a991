"""PoolingParams: what a pooling request (an embedding, a classification, a score) asks of the
engine, vLLM's fields, validated once at the door.

A pooling request computes its prompt and returns one vector: it never samples. Every
invalid value raises ``ValueError`` whose message starts with the field's name, so the API
layer can turn it into a 400 that names the field. What the model can do (its tasks, its
width, Matryoshka support) is checked by the engine at intake, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

PoolingTask = Literal["embed", "classify", "score"]
POOLING_TASKS: tuple[PoolingTask, ...] = ("embed", "classify", "score")


@dataclass(frozen=True)
class PoolingParams:
    """vLLM's pooling parameters; None: the model's pooler config decides."""

    task: PoolingTask = "embed"
    dimensions: Optional[int] = None  # embed: keep the first this many (Matryoshka)
    normalize: Optional[bool] = None  # embed: L2-normalize; None: the model's pooler config
    activation: Optional[bool] = None  # classify / score: apply the head's activation (None: yes)
    # Keep only the prompt's last k tokens (as vLLM; -1: the model's context length); without
    # it an over-long prompt is refused.
    truncate_prompt_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {list(POOLING_TASKS)}, got {self.task!r}")
        dims, keep = self.dimensions, self.truncate_prompt_tokens
        if dims is not None and (type(dims) is not int or dims < 1):
            raise ValueError(f"dimensions must be a positive integer, got {dims!r}")
        if keep is not None and (type(keep) is not int or (keep < 1 and keep != -1)):
            raise ValueError(
                f"truncate_prompt_tokens must be a positive integer or -1, got {keep!r}"
            )
        for name in ("normalize", "activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if self.dimensions is not None and self.task != "embed":
            raise ValueError(f"dimensions applies to task 'embed' only, not {self.task!r}")

    @property
    def n(self) -> int:
        """One output per request (as ``SamplingParams.n`` reads for generation)."""
        return 1

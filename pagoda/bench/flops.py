"""FLOP accounting for a generation workload, and the machine's measured matmul FLOP/s.

The accounting counts the work a dense decoder must do, whatever the engine:

* every token computed (prompt + output, kept simple) pays ``2 x non-embedding params``;
* every output token pays ``2 x hidden x vocab`` for its logits;
* attention at context length ``c`` costs ``4 x c x heads x head_dim`` per layer per token
  (``Q.K^T`` and ``P.V``), summed over the positions ``c = 1 .. prompt + output``.

The limit is the best FLOP/s that ``torch`` reaches on a few matmuls: a square 2048^3 one and
the model's own projection shapes at a full step's batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

SQUARE = (2048, 2048, 2048)
DEFAULT_REPEATS = 5
LOGITS_BATCH_CAP = 256  # rows of the lm_head matmul: one per sequence in a step, at most this


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder that its FLOPs depend on."""

    params_non_embedding: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def from_arch(cls, arch: Any) -> "ModelShape":
        """From a :class:`pagoda.models.config.ModelArch`."""
        return cls(
            arch.num_params_non_embedding,
            arch.hidden_size,
            arch.vocab_size,
            arch.num_layers,
            arch.num_heads,
            arch.head_dim,
        )


@dataclass(frozen=True)
class MatmulResult:
    """The best rate of one ``(M, K) x (K, N)`` matmul shape."""

    m: int
    k: int
    n: int
    flops_per_s: float

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k}x{self.n}"


def request_flops(shape: ModelShape, prompt_len: int, output_len: int, cached_len: int = 0) -> int:
    """FLOPs of one request: linear layers, logits, and causal attention. The first
    ``cached_len`` prompt tokens came from the prefix cache and cost nothing."""
    tokens = prompt_len + output_len
    linear = 2 * shape.params_non_embedding * (tokens - cached_len)
    logits = 2 * shape.hidden_size * shape.vocab_size * output_len
    # c = cached_len + 1 .. tokens
    context_sum = tokens * (tokens + 1) // 2 - cached_len * (cached_len + 1) // 2
    attention = 4 * shape.num_heads * shape.head_dim * shape.num_layers * context_sum
    return linear + logits + attention


def pooling_flops(shape: ModelShape, prompt_len: int, bidirectional: bool) -> int:
    """FLOPs of one pooling request (a prefill, no logits): linear layers, and attention over
    every position (an encoder) or the positions up to each token (a decoder embedder). The
    pooler and a classifier head (a vector each) are left out."""
    linear = 2 * shape.params_non_embedding * prompt_len
    pairs = prompt_len * prompt_len if bidirectional else prompt_len * (prompt_len + 1) // 2
    attention = 4 * shape.num_heads * shape.head_dim * shape.num_layers * pairs
    return linear + attention


def workload_flops(
    shape: ModelShape, prompt_lens: Sequence[int], output_lens: Sequence[int]
) -> int:
    """The sum of :func:`request_flops` over requests."""
    if len(prompt_lens) != len(output_lens):
        raise ValueError("prompt_lens and output_lens differ in length")
    return sum(request_flops(shape, p, o) for p, o in zip(prompt_lens, output_lens, strict=True))


def model_matmul_shapes(arch: Any, batch_tokens: int, num_seqs: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the model's projections at ``batch_tokens`` rows, plus its lm_head."""
    h, q = arch.hidden_size, arch.num_heads * arch.head_dim
    kv = getattr(arch, "num_kv_heads", arch.num_heads) * arch.head_dim  # encoders: MHA
    i = arch.intermediate_size
    m = batch_tokens
    rows = max(1, min(num_seqs, LOGITS_BATCH_CAP))
    return [(m, h, q + 2 * kv), (m, q, h), (m, h, 2 * i), (m, i, h), (rows, h, arch.vocab_size)]


def time_matmul(
    m: int, k: int, n: int, dtype: torch.dtype, repeats: int = DEFAULT_REPEATS
) -> MatmulResult:
    """Best-of-``repeats`` rate of ``F.linear`` with a (N, K) weight, as the model runs it."""
    x = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    F.linear(x, w)  # warm-up: kernel selection, packing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return MatmulResult(m, k, n, 2.0 * m * k * n / best)


def measure(
    dtype: torch.dtype, shapes: Iterable[tuple[int, int, int]], repeats: int = DEFAULT_REPEATS
) -> list[MatmulResult]:
    """Time each shape (the square one first) in ``dtype``."""
    unique = list(dict.fromkeys([SQUARE, *shapes]))
    with torch.inference_mode():
        return [time_matmul(m, k, n, dtype, repeats) for m, k, n in unique]


def best(results: Sequence[MatmulResult]) -> MatmulResult:
    """The fastest shape: the limit the workload is compared with."""
    return max(results, key=lambda r: r.flops_per_s)

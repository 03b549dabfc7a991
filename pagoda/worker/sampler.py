"""Sampler: logits -> next tokens, one row per request that caught up this step.

Processing order per row: the logit bias, penalties (repetition, presence, frequency),
min_tokens masking,
the structured-outputs mask (``engine/structured.py``: tokens the request's grammar forbids
get -inf), then greedy argmax or temperature / top-k / top-p / min-p sampling. A sampled row is one
Gumbel-max draw over its filtered logits (``worker/gumbel.py``: one pass, no softmax); seeded
rows key their noise by (seed, sibling index, output index), so a seeded request samples the
same tokens whatever else shares its batch, and after a preemption.

Whether greedy rows take the fused CPU argmax (``kernels/cpu_fused.py``) is the caller's
``fused``, chosen once when the runner is built (``PAGODA_FUSED``); nothing here reads a switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional

import torch

from pagoda.core.outputs import TokenLogprobs
from pagoda.kernels import cpu_fused, ext
from pagoda.models.cpu_bf16 import InvariantLinear
from pagoda.models.cpu_int8 import Int8Head
from pagoda.sampling import SamplingParams
from pagoda.worker import gumbel
from pagoda.worker.host_buffer import to_device

_MASK64 = (1 << 64) - 1
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)
# Up to this many rows the packed output projection and a row argmax beat
# ``cpu_fused.greedy_tokens``, whose ``weight @ hidden.T`` oneDNN runs as a slower kernel at
# few columns; from a few more rows on greedy_tokens is as fast or faster (the measurements:
# docs/benchmarks.md, "Greedy at one row").
PACKED_HEAD_MAX_ROWS = 8
# The same for an output projection on pagoda's bf16 kernel (models/cpu_bf16.py, taken at load
# where it times faster than oneDNN's packed form), which keeps its lead to more rows.
KERNEL_HEAD_MAX_ROWS = 128


@dataclass
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    stop_ids_for_min_tokens: list[int]  # EOS + stop_token_ids, masked until min_tokens
    seed_offset: int = 0
    # The last output token when a step in flight samples it (async scheduling): (1,) on the
    # device, not yet in token_ids.
    pending_token: Optional[torch.Tensor] = None
    # Structured outputs: the tokens it may sample, one bit each (little-endian int32 words).
    allowed: Optional[bytes] = None
    # Speculative decoding: the drafts before this position, sampled as if already tokens.
    drafts: list[int] = field(default_factory=list)

    @property
    def num_output_tokens(self) -> int:
        pending = 0 if self.pending_token is None else 1
        return len(self.token_ids) + pending + len(self.drafts) - self.num_prompt_tokens


def greedy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: list[SamplingRow],
    packed_head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    *,
    fused: bool = True,
    invariant: bool = False,
) -> Optional[torch.Tensor]:
    """Tokens straight from the final hidden states (S, E) and the output projection (V, E)
    when every row is plain greedy on the CPU bf16 path (and ``fused``, the runner's choice):
    ``weight @ hidden.T`` and a column argmax (see ``cpu_fused.greedy_tokens``), never building
    the (S, V) logits; up to ``PACKED_HEAD_MAX_ROWS`` rows (``KERNEL_HEAD_MAX_ROWS`` for a
    projection on the bf16 kernel), ``packed_head`` (the packed projection, where there is
    one) and a row argmax. An int8 output projection
    (``models/cpu_int8.Int8Head``) runs with a row argmax for every step it takes (its own
    row limit, whatever the rows here), else its dense form as above. ``invariant``
    (``--deterministic``, where ``packed_head`` is the row-tiled projection): always
    ``packed_head`` and a row argmax, whatever the rows. None where the general path
    (``compute_logits`` then :func:`sample_tokens`) must run."""
    if not (fused and cpu_fused.enabled(hidden) and all(_plain_greedy(r) for r in rows)):
        return None
    if isinstance(packed_head, Int8Head):  # the int8 head picks its form by the step's rows
        if packed_head.quantized(hidden.shape[0]):
            return cpu_fused.argmax(packed_head(hidden))
        packed_head = packed_head.dense
    limit = (
        KERNEL_HEAD_MAX_ROWS if isinstance(packed_head, InvariantLinear) else PACKED_HEAD_MAX_ROWS
    )
    if packed_head is not None and (invariant or hidden.shape[0] <= limit):
        return cpu_fused.argmax(packed_head(hidden))
    return cpu_fused.greedy_tokens(hidden, weight)


def sample_tokens(
    logits: torch.Tensor, rows: list[SamplingRow], *, fused: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """logits: (S, V). The sampled ids (S,) and, when a row asks for logprobs, the raw
    log-probabilities (S, V), both left on the logits' device: nothing here waits for it.
    ``fused``: greedy rows may take the fused CPU argmax (the runner's choice)."""
    if all(_plain_greedy(r) for r in rows):
        return _argmax(logits, fused), None
    if all(_plain_greedy(r, masked=True) for r in rows):  # greedy under grammars only
        return _argmax(_mask_disallowed(logits, rows), fused), None
    logits = logits.float()
    raw_logprobs = (
        torch.log_softmax(logits, dim=-1)
        if any(r.params.logprobs is not None for r in rows)
        else None
    )
    logits = _apply_penalties(_apply_logit_bias(logits, rows), rows)
    logits = _mask_banned(_mask_early_stops(logits, rows), rows)
    logits = _mask_disallowed(logits, rows)
    return _choose(logits, rows), raw_logprobs


def token_logprobs(
    raw_logprobs: Optional[torch.Tensor], tokens: list[int], rows: list[SamplingRow]
) -> list[Optional[TokenLogprobs]]:
    """The sampled tokens' logprobs (and top alternatives) for the rows that ask."""
    return [
        _token_logprobs(raw_logprobs[i], tokens[i], r.params.logprobs)
        if raw_logprobs is not None and r.params.logprobs is not None
        else None
        for i, r in enumerate(rows)
    ]


def _argmax(logits: torch.Tensor, fused: bool) -> torch.Tensor:
    # Upcasting is exact and keeps the order, so argmax needs no fp32 copy of (S, V).
    if fused and logits.dim() == 2 and logits.stride(1) == 1 and cpu_fused.enabled(logits):
        return cpu_fused.argmax(logits)
    return logits.argmax(dim=-1)


def _plain_greedy(row: SamplingRow, masked: bool = False) -> bool:
    """Greedy with nothing that needs the logits themselves (logprobs, penalties, a masked
    stop token; a grammar's mask too unless ``masked``): the argmax alone decides."""
    p = row.params
    return (
        p.greedy
        and (masked or row.allowed is None)
        and not p.logit_bias
        and p.allowed_token_ids is None
        and not p.bad_words_token_ids
        and p.logprobs is None
        and not _has_penalty(p)
        and not (row.num_output_tokens < p.min_tokens and row.stop_ids_for_min_tokens)
    )


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    penalized = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
    if not penalized:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for i in penalized:
        p, row, ids = rows[i].params, logits[i], rows[i].token_ids + rows[i].drafts
        # Filtered and split on the host: a mask or bincount on the device would wait for it.
        tokens = to_device([t for t in ids if t < vocab], torch.int64, logits.device)
        outputs = to_device(
            [t for t in ids[rows[i].num_prompt_tokens :] if t < vocab], torch.int64, logits.device
        )
        pending = rows[i].pending_token
        if pending is not None:  # sampled, so < vocab; still on the device
            tokens = torch.cat([tokens, pending])
            outputs = torch.cat([outputs, pending])
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seen[tokens] = True
            scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, scaled, row))
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.zeros(vocab, dtype=row.dtype, device=logits.device)
            counts.index_add_(
                0, outputs, torch.ones(outputs.shape, dtype=row.dtype, device=logits.device)
            )
            row.sub_(p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype))
    return logits


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Add each row's ``logit_bias`` to its logits (ids past the vocabulary are ignored: the
    engine refuses them at intake). Does not write to the caller's tensor."""
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    if not biased:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for i in biased:
        bias = rows[i].params.logit_bias
        ids = [t for t in bias if t < vocab]
        logits[i].index_add_(
            0,
            to_device(ids, torch.int64, logits.device),
            to_device([float(bias[t]) for t in ids], logits.dtype, logits.device),
        )
    return logits


def _mask_banned(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """-inf outside a row's ``allowed_token_ids`` and on the tokens that would complete one
    of its bad words. Does not write to the caller's tensor."""
    touched = [
        i
        for i, r in enumerate(rows)
        if r.params.allowed_token_ids is not None or r.params.bad_words_token_ids
    ]
    if not touched:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for i in touched:
        p = rows[i].params
        if p.allowed_token_ids is not None:
            keep = torch.full((vocab,), float("-inf"), dtype=logits.dtype, device=logits.device)
            ids = to_device([t for t in p.allowed_token_ids if t < vocab], torch.int64, keep.device)
            keep[ids] = 0.0
            logits[i] += keep
        banned = _bad_word_ends(rows[i])
        if banned:
            logits[i].index_fill_(0, to_device(banned, torch.int64, logits.device), float("-inf"))
    return logits


def _bad_word_ends(row: SamplingRow) -> list[int]:
    """The tokens that would complete one of the row's bad words after its output so far
    (the token in flight and the drafts before this position included)."""
    sequences = row.params.bad_words_token_ids
    if not sequences:
        return []
    longest = max(len(seq) for seq in sequences) - 1
    tail: list[int] = []
    if longest:
        tail = row.token_ids[row.num_prompt_tokens :][-longest:]
        if row.pending_token is not None:  # async scheduling: the last token is in flight
            tail = tail + [int(row.pending_token.item())]
        tail = (tail + row.drafts)[-longest:]
    return [seq[-1] for seq in sequences if _ends_with(tail, seq[:-1])]


def _ends_with(tokens: list[int], prefix: list[int]) -> bool:
    return not prefix or (len(prefix) <= len(tokens) and tokens[-len(prefix) :] == prefix)


def _mask_early_stops(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Before min_tokens outputs, EOS and stop tokens cannot be sampled. Does not write to
    the caller's tensor."""
    cloned = False
    for i, r in enumerate(rows):
        if r.num_output_tokens < r.params.min_tokens and r.stop_ids_for_min_tokens:
            ids = [t for t in r.stop_ids_for_min_tokens if 0 <= t < logits.shape[1]]
            if not ids:
                continue
            if not cloned:
                logits, cloned = logits.clone(), True
            logits[i].index_fill_(0, to_device(ids, torch.int64, logits.device), float("-inf"))
    return logits


def _mask_disallowed(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """A copy of ``logits`` with -inf on the tokens a constrained row's grammar forbids: on
    the CPU by the C++ kernel (``kernels/csrc/token_mask.cpp``: unpacking the bits into a bool
    tensor and ``masked_fill`` cost more than the step's other sampling work,
    docs/structured_outputs.md), elsewhere by tensor ops.
    (llguidance's own torch helper goes through torch.compile: a compile on first use.)"""
    masked = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not masked:
        return logits
    words = torch.frombuffer(
        bytearray(b"".join(rows[i].allowed or b"" for i in masked)), dtype=torch.int32
    ).view(len(masked), -1)  # (M, W)
    out = logits.clone()
    ext = _native(out)
    if ext is not None and out.stride(-1) == 1:
        ext.apply_token_bitmask(out, words, torch.tensor(masked, dtype=torch.int64))
        return out
    vocab = logits.shape[1]
    bits = (words.unsqueeze(-1) >> _BIT_SHIFTS) & 1  # (M, W, 32)
    allowed = bits.view(len(masked), -1)[:, :vocab].bool().to(logits.device)  # (M, V)
    idx = to_device(masked, torch.int64, logits.device)
    return out.index_put_((idx,), out[idx].masked_fill(~allowed, float("-inf")))


def _native(logits: torch.Tensor) -> Optional[ModuleType]:
    """The C++ extension for CPU fp32/bf16 logits (None elsewhere or when it did not build)."""
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.bfloat16):
        return None
    return ext.extension()


def _choose(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    tokens = logits.argmax(dim=-1)  # (S,)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = to_device(random_rows, torch.int64, logits.device)
        filtered = _filtered_logits(logits[idx], [rows[i].params for i in random_rows])
        tokens[idx] = gumbel.draw(filtered, _row_keys([rows[i] for i in random_rows]))
    return tokens


def _filtered_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering: the logits divided by the
    temperature, -inf where a filter drops the token (R, V). Their softmax is the
    distribution a row samples from."""
    device = logits.device
    temp = to_device([p.temperature for p in params], torch.float32, device)
    logits = logits / temp[:, None]
    if any(p.top_k for p in params):
        vocab = logits.shape[1]
        # Clamped in Python: a k past int64 (valid: it keeps every token) cannot be a tensor.
        k = to_device([min(p.top_k or vocab, vocab) for p in params], torch.int64, device)
        # Exactly k tokens survive; among equal logits the lower id wins, as in argmax, so
        # that top_k=1 is greedy even on ties. A stable sort makes that order deterministic.
        order = logits.sort(dim=-1, descending=True, stable=True).indices
        keep_sorted = torch.arange(vocab, device=device)[None, :] < k[:, None]
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        logits = _top_p(logits, to_device([p.top_p for p in params], torch.float32, device))
    if any(p.min_p > 0 for p in params):
        # p_v >= min_p * p_max  <=>  l_v >= l_max + log(min_p): no softmax needed.
        min_p = to_device([p.min_p for p in params], torch.float32, device)
        floor = logits.max(dim=-1, keepdim=True).values + torch.log(min_p)[:, None]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The probabilities (R, V) a row samples from: softmax of :func:`_filtered_logits`."""
    return torch.softmax(_filtered_logits(logits, params), dim=-1)


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the mass before it already reaches top_p (the first always stays).
    # Rows with top_p == 1 keep everything: float rounding may make their cumulative mass
    # reach 1 before the tail.
    drop_sorted = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _row_keys(rows: list[SamplingRow]) -> torch.Tensor:
    """Each row's noise key (``gumbel.draw``): from (seed, sibling, output index) for a seeded
    row, so it samples the same tokens in any batch and after a preemption; fresh from
    torch's generator otherwise."""
    keys = gumbel.random_keys(len(rows))
    for i, r in enumerate(rows):
        if r.params.seed is not None:
            keys[i] = _row_seed(r.params.seed, r.seed_offset, r.num_output_tokens)
    return keys


def _row_seed(seed: int, sibling: int, step: int) -> int:
    """A well-mixed 63-bit seed for (request seed, sibling index, output index)."""
    x = (
        (seed & _MASK64)
        ^ (sibling * 0x9E3779B97F4A7C15 & _MASK64)
        ^ (step * 0xBF58476D1CE4E5B9 & _MASK64)
    )
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def _token_logprobs(logprobs: torch.Tensor, token: int, num_top: int) -> TokenLogprobs:
    """logprobs: (V,) for one row."""
    value = logprobs[token]
    rank = int((logprobs > value).sum().item()) + 1
    top: list[tuple[int, float]] = []
    if num_top:
        vals, ids = logprobs.topk(num_top)
        top = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return TokenLogprobs(token, float(value.item()), rank, top)


def prompt_token_logprobs(
    logprobs: torch.Tensor, next_tokens: list[int], num_top: int
) -> list[TokenLogprobs]:
    """logprobs: (N, V), row i predicting next_tokens[i]."""
    return [_token_logprobs(logprobs[i], t, num_top) for i, t in enumerate(next_tokens)]

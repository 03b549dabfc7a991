"""The step cost model of speculative decoding's policy, timed on this machine at start
(and the choice of suffix decoding's trie, C++ or Python).

A step's time is modelled as ``base + per_token * tokens + per_context * context``, where
``context`` sums the tokens its decode rows attend to (a verified row's k + 1 positions are
decode rows of their own, so each reads the request's KV). Measured on the 2-core AMX Xeon
with the bundled model, bf16 (median step, ms; B decode rows with k drafts each, prompts of
L tokens):

    B  L      k=0    k=1    k=2    k=4    k=8
    1  64    18.9   19.2*  19.2   19.4   21.5       * one noisy sample: 24.1
    1  1024  22.1   21.3   22.2   23.4   28.8
    16 64    24.0   26.9   30.2   41.4   59.1
    16 1024  46.2   63.0   79.6  125.5  201.0
    32 1024  72.9  102.8  141.6  235.8  404.1

so at batch 1 a draft costs about a hundredth of a step, and with 32 long rows almost a
thirtieth each: the model fits these within about 10 %. The timing runs ``GRID_ROWS`` x
``GRID_CONTEXT`` x ``GRID_DRAFTS`` steps with fixed drafts (never accepted: their cost does
not depend on it) and fits the three coefficients by least squares.
Invariant: the timing runs on an engine of its own (engine/build.py drops it) and leaves no
request in it.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable

import torch

from pagoda.config import SpeculativeConfig
from pagoda.kernels import ext
from pagoda.request import EngineRequest, Request
from pagoda.sampling import SamplingParams
from pagoda.spec_decode.policy import StepCostModel
from pagoda.spec_decode.speculator import Speculator
from pagoda.spec_decode.suffix import Draft, SuffixTrie, TrieFactory

logger = logging.getLogger(__name__)

GRID_ROWS = (1, 8)
GRID_CONTEXT = (32, 256)
GRID_DRAFTS = (0, 4)
TIMED_STEPS = 5
# Output tokens a timing request may reach: a step verifies at most max(GRID_DRAFTS) + 1.
STEPS_PER_SHAPE = 4 + len(GRID_DRAFTS) * (TIMED_STEPS + 1) * (max(GRID_DRAFTS) + 1)
MIN_COEFFICIENT_S = 1e-9  # a fitted coefficient is never taken as zero or negative


class _FixedDrafts:
    """A proposer of ``k`` copies of one token, whatever the request."""

    def __init__(self, token: int) -> None:
        self.token, self.k = token, 0

    def propose(self, request: Request, k: int) -> Draft:
        return Draft([self.token] * min(k, self.k), [])

    def finish(self, request: Request) -> None:
        pass


def measure_step_costs(make_engine: Callable[[Speculator], Any]) -> StepCostModel:
    """Time decode steps of the grid's shapes through an engine that ``make_engine`` builds
    around a speculator of fixed drafts (a calibration engine, dropped afterwards), and fit
    the model."""
    config = SpeculativeConfig(num_speculative_tokens=max(GRID_DRAFTS), adaptive=False)
    timing = Speculator(config)
    engine = make_engine(timing)
    drafts = _FixedDrafts(engine.arch.vocab_size // 2)
    timing.proposer = drafts
    samples: list[tuple[int, int, float]] = []
    for rows in GRID_ROWS:
        for context in GRID_CONTEXT:
            samples.extend(_time_shape(engine, drafts, rows, context))
    cost = fit(samples)
    logger.info(
        "speculative decoding: a step takes %.1f ms + %.3f ms a token + %.2f us a token of "
        "context (timed here)",
        1e3 * cost.base_s,
        1e3 * cost.per_token_s,
        1e6 * cost.per_context_s,
    )
    return cost


def _time_shape(
    engine: Any, drafts: _FixedDrafts, rows: int, context: int
) -> list[tuple[int, int, float]]:
    """(tokens, context, seconds) of the median of ``TIMED_STEPS`` steps (a slow step of a
    busy machine does not bend the fit): ``rows`` requests with prompts of ``context``
    tokens, decoding with each of ``GRID_DRAFTS`` drafts."""
    rng = random.Random(rows * 1000 + context)
    context = min(context, engine.max_model_len - STEPS_PER_SHAPE - 1)
    vocab = engine.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=STEPS_PER_SHAPE, ignore_eos=True)
    ids = [f"spec-timing-{rows}-{context}-{i}" for i in range(rows)]
    for rid in ids:
        prompt = [rng.randrange(vocab // 10, vocab - 1) for _ in range(context)]
        engine.add_request(EngineRequest(rid, prompt, params))
    requests = [engine.scheduler.requests[rid] for rid in ids]
    drafts.k = 0
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in requests):
        engine.step()  # the prompts, and a first decode
    samples = []
    for k in GRID_DRAFTS:
        drafts.k = k
        engine.step()  # the first step of a shape warms it
        timed = []
        for _ in range(TIMED_STEPS):
            tokens = rows * (k + 1)
            attended = sum((k + 1) * r.num_tokens + k * (k + 1) // 2 for r in requests)
            start = time.perf_counter()
            engine.step()
            timed.append((tokens, attended, time.perf_counter() - start))
        samples.append(sorted(timed, key=lambda s: s[2])[len(timed) // 2])  # the median step
    for rid in ids:
        engine.abort_request(rid)
    engine.step()  # the aborted requests leave the runner
    return samples


def suffix_trie_factory() -> TrieFactory:
    """Suffix decoding's trie: the C++ one where the CPU extension is built (far cheaper a
    token: docs/speculative_decoding.md), else the Python reference."""
    mod = ext.extension()
    native = getattr(mod, "SuffixTrie", None) if mod is not None else None
    return native if native is not None else SuffixTrie


def fit(samples: list[tuple[int, int, float]]) -> StepCostModel:
    """Least squares of seconds on (1, tokens, context)."""
    a = torch.tensor([[1.0, t, c] for t, c, _ in samples], dtype=torch.float64)
    b = torch.tensor([[s] for _, _, s in samples], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, b).solution.flatten().tolist()
    base, per_token, per_context = (max(x, MIN_COEFFICIENT_S) for x in coef)
    return StepCostModel(base, per_token, per_context)

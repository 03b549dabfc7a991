"""The per-step token budget of a server on the CPU, chosen from a step this machine times.

Every running request waits for every step, so a step's wall time is an inter-token gap of
each of them: a budget whose full prefill step lasts two seconds puts two seconds into the
p99 inter-token latency. How long a full step lasts differs by several times between the
CPUs this project runs on (with AMX or without: docs/server.md, "The token budget of a CPU
server", has the measurements).

Offline (``LLM``, ``pagoda bench throughput``) the budget that gives the most throughput is
the default, ``DEFAULT_MAX_NUM_BATCHED_TOKENS`` (the best of those measured on W1).
A server (``pagoda serve`` without ``--max-num-batched-tokens``) on the CPU times one prefill
step of ``TIMING_TOKENS`` tokens at start and takes the largest of ``CANDIDATES`` whose step,
extrapolated linearly in tokens, stays within ``TARGET_STEP_S`` (a step's time grows about
linearly in its tokens over the candidates; the docs give the measurements). vLLM's CPU
backend fixes its server's budget instead.

Invariant: the chosen budget is one of ``CANDIDATES`` (the smallest when none fits); the
timing runs on a calibration engine (engine/build.py drops it), where it leaves no request.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from pagoda.request import EngineRequest
from pagoda.sampling import SamplingParams

logger = logging.getLogger(__name__)

CANDIDATES = (2048, 1024, 512, 256)  # largest first
TIMING_TOKENS = 512  # 256 overestimates: a step's fixed costs weigh more there
TIMING_REPEATS = 2
TARGET_STEP_S = 0.5


def choose_budget(seconds_per_token: float, target_s: float = TARGET_STEP_S) -> int:
    """The largest candidate budget whose full step lasts at most ``target_s``."""
    for budget in CANDIDATES:
        if budget * seconds_per_token <= target_s:
            return budget
    return CANDIDATES[-1]


def time_prefill(engine: Any, tokens: int = TIMING_TOKENS) -> float:
    """Best wall time of a ``tokens``-token prompt computed in one step (and one token
    sampled) through ``engine``."""
    rng = random.Random(0)
    vocab = engine.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    best = float("inf")
    for i in range(TIMING_REPEATS):
        prompt = [rng.randrange(vocab // 10, vocab - 1) for _ in range(tokens)]
        start = time.perf_counter()
        engine.add_request(EngineRequest(f"budget-timing-{i}", prompt, params))
        while engine.has_unfinished_requests():
            engine.step()
        best = min(best, time.perf_counter() - start)
    return best


def serving_budget(engine: Any) -> int:
    """The budget for a CPU server: :func:`choose_budget` on a timed prefill step (of fewer
    tokens where ``max_model_len`` is shorter than ``TIMING_TOKENS``)."""
    tokens = min(TIMING_TOKENS, engine.max_model_len - 1)
    seconds = time_prefill(engine, tokens)
    budget = choose_budget(seconds / tokens)
    logger.info(
        "token budget %d: a %d-token prefill step took %.0f ms here, so a full step "
        "of %d tokens should last about %.0f ms (target %.0f ms; "
        "--max-num-batched-tokens sets it)",
        budget,
        tokens,
        1e3 * seconds,
        budget,
        1e3 * seconds * budget / tokens,
        1e3 * TARGET_STEP_S,
    )
    return budget

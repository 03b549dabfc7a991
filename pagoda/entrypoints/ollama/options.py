"""Ollama's ``options`` and ``format`` -> the engine's ``SamplingParams``.

``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``presence_penalty``
and ``frequency_penalty`` keep their names; ``num_predict`` is ``max_tokens`` (-1 and -2:
until the context is full), ``repeat_penalty`` is ``repetition_penalty``. pagoda's sampler
penalizes repeats over the whole context, Ollama's window ``repeat_last_n`` tokens: -1 (the
whole context) is served, 0 turns the penalties off as in Ollama, and any other window
beside a penalty is refused by name. What is unset keeps the engine's default, not
Ollama's Modelfile defaults. ``format`` ``"json"`` or a JSON schema constrains the answer
through the grammar engine.

Invariant: an engine error names the option as the request spelled it (``options.num_predict``,
``format``), and an option that changes nothing is reported, never dropped unnamed.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from pagoda.entrypoints.errors import ApiError, engine_value_error
from pagoda.entrypoints.field_policy import IGNORED_FIELDS_HEADER
from pagoda.entrypoints.front_door import FrontDoor
from pagoda.entrypoints.ollama.protocol import Format, GenerationFields, Options
from pagoda.sampling import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

UNTIL_FULL = (-1, -2)  # num_predict: as many tokens as the context holds
WHOLE_CONTEXT = -1  # repeat_last_n: the window pagoda's sampler penalizes over
PENALTIES_OFF = 0

# The engine's field -> the request's.
RENAMES = {
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "min_p": "options.min_p",
    "max_tokens": "options.num_predict",
    "stop": "options.stop",
    "seed": "options.seed",
    "repetition_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "structured_outputs.json": "format",
    "structured_outputs.json_object": "format",
}

_logged: set[str] = set()


def sampling_params(req: GenerationFields, door: FrontDoor) -> SamplingParams:
    """The request's sampling, its answer constrained as ``format`` asks."""
    opts = req.options or Options()
    values: dict[str, Any] = {"max_tokens": _max_tokens(opts.num_predict)}
    values.update(_penalties(opts))
    chosen = {
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "top_k": door.top_k(opts.top_k),
        "min_p": opts.min_p,
        "seed": opts.seed,
        "stop": [opts.stop] if isinstance(opts.stop, str) else opts.stop,
    }
    values.update({k: v for k, v in chosen.items() if v is not None})
    values["structured_outputs"] = structured(req.format)
    try:
        return SamplingParams(**values)
    except ValueError as e:
        raise engine_value_error(e, RENAMES, "options") from None


def _max_tokens(num_predict: Optional[int]) -> Optional[int]:
    """``num_predict`` as the engine's limit (None: until the context is full)."""
    if num_predict is None or num_predict in UNTIL_FULL:
        return None
    return num_predict


def _penalties(opts: Options) -> dict[str, float]:
    """The repeat penalties, over the whole context (the only window the sampler has)."""
    given = {
        "repetition_penalty": opts.repeat_penalty,
        "presence_penalty": opts.presence_penalty,
        "frequency_penalty": opts.frequency_penalty,
    }
    active = {k: v for k, v in given.items() if v is not None}
    window = opts.repeat_last_n
    if window == PENALTIES_OFF:
        return {}
    if window is not None and window != WHOLE_CONTEXT and _penalizes(active):
        raise ApiError(
            400,
            f"options.repeat_last_n {window} is not supported: this server penalizes "
            "repeats over the whole context (repeat_last_n -1), or not at all (0)",
            "options.repeat_last_n",
        )
    return active


def _penalizes(active: dict[str, float]) -> bool:
    neutral = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    return any(value != neutral[name] for name, value in active.items())


def structured(fmt: Optional[Format]) -> Optional[StructuredOutputsParams]:
    """``format``: ``"json"`` (any JSON object) or a JSON schema (``""``: none)."""
    if fmt is None or fmt == "":
        return None
    try:
        if fmt == "json":
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=json.dumps(fmt))
    except ValueError as e:
        raise engine_value_error(e, RENAMES, "format") from None


def report(ignored: list[str]) -> list[str]:
    """``ignored`` (declared fields that change nothing), each name logged once."""
    for name in ignored:
        if name not in _logged:
            _logged.add(name)
            logger.warning(
                "ignored %s: it changes nothing on this server (reported in the %s header)",
                name,
                IGNORED_FIELDS_HEADER,
            )
    return ignored

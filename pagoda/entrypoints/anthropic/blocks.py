"""What a message of the Messages API is made of, as both the whole answer and its stream
render it: the content blocks of an answer, the stop reason, the usage, the ids.

- ``thinking`` (the reasoning split off under ``--reasoning-parser``) with a ``signature``:
  a digest of the thinking text (pagoda verifies no signatures; clients that send thinking
  back need one), then ``text`` (the content), then one ``tool_use`` per call (``toolu_…``
  ids, the input as an object).
- ``stop_reason``: ``tool_use`` (the model stopped after calling tools), ``max_tokens``,
  ``model_context_window_exceeded`` (cut by the context's end, before ``max_tokens``),
  ``stop_sequence`` (with ``stop_sequence`` the string that ended it), else ``end_turn``.
- ``usage``: ``input_tokens`` counts the prompt tokens *not* read from the prefix cache, as
  Anthropic's does; ``cache_read_input_tokens`` those that were;
  ``cache_creation_input_tokens`` is always 0 (caching costs nothing to ask for here).

Invariant: the same answer renders to the same blocks whichever path renders it (the
signature is a function of the thinking text, not of the request).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from pagoda.entrypoints.answer import TOOL_CALLS, Answer
from pagoda.entrypoints.front_door import Usage


@dataclass(frozen=True)
class Reply:
    """How one request's message is rendered, beyond its answer."""

    model: str  # as the request named it
    shows_thinking: bool = True  # false (``display: omitted``): thinking blocks hold no text
    context_bound: bool = False  # max_tokens was cut to the room the context leaves


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def signature(thinking: str) -> str:
    """A thinking block's signature: a digest of its text (verifies nothing)."""
    return "pagoda-" + hashlib.sha256(thinking.encode("utf-8", "surrogatepass")).hexdigest()


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments (JSON text) as the ``input`` object ({} for no object)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(a: Answer, shows_thinking: bool = True) -> list[dict[str, Any]]:
    """The answer's blocks (``shows_thinking`` false: a thinking block without its text)."""
    blocks: list[dict[str, Any]] = []
    if a.reasoning:
        text = a.reasoning if shows_thinking else ""
        blocks.append({"type": "thinking", "thinking": text, "signature": signature(a.reasoning)})
    if a.content:
        blocks.append({"type": "text", "text": a.content})
    for call in a.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_use_id(),
                "name": call.name,
                "input": tool_input(call.arguments),
            }
        )
    return blocks


def stop_of(
    finish_reason: Optional[str], stop_reason: Optional[str | int], context_bound: bool = False
) -> tuple[str, Optional[str]]:
    """(``stop_reason``, ``stop_sequence``) of an answer that ended so (``context_bound``:
    its limit was the context's end, not ``max_tokens``)."""
    if finish_reason == TOOL_CALLS:
        return "tool_use", None
    if finish_reason == "length":
        return ("model_context_window_exceeded" if context_bound else "max_tokens"), None
    if finish_reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }

"""Tool-call formats whose calls are JSON: an object with a ``name`` and its ``arguments``
(or ``parameters``), alone, in a list, or after a marker; and Mistral's ``name[ARGS]{...}``.

- ``hermes`` (Hermes 2/3, Qwen2.5, Qwen3): ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>``, anywhere in the answer, as many as the model writes;
- ``llama3_json`` (Llama 3.1-3.3): the answer opens with call objects, an optional
  ``<|python_tag|>`` before them and ``;`` between them;
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of call objects (tokenizers before v11:
  Mistral 7B v0.3, Nemo), or ``name[ARGS]{...}`` (v11 on: Mistral Small 3.1+, Devstral,
  Magistral), with ``[CALL_ID]id`` between where the model writes one;
- ``phi4_mini_json`` (Phi-4-mini): ``functools[{...}, ...]``;
- the output of ``tool_choice: "required"``: the JSON list the grammar makes it write.

The arguments are the JSON the model wrote, character for character (never re-serialised),
so a stream sends them as they come and they join to exactly the finished call's.
Invariant: a call is committed once its name string is complete; before that nothing of it
is sent, and an object that ends or breaks without a name is content, verbatim.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from pagoda.entrypoints.tool_parsers.base import (
    PENDING,
    Block,
    Call,
    Calls,
    NotCall,
    Output,
    Pending,
    Piece,
    closed_by,
    encodable,
    read_leading,
    read_marked,
)
from pagoda.entrypoints.tool_parsers.json_scan import JsonScan, scan_value, skip_ws

ARGUMENT_KEYS = ("arguments", "parameters")
NO_ARGUMENTS = "{}"  # a call that ended before any arguments were written


def read_call(out: Output, start: int) -> Block:
    """The call object whose ``{`` is at ``start``."""
    text = out.text
    scan = scan_value(text, start, out.memo)
    done = scan.end is not None or scan.broken or out.final
    name = scan.member("name")
    if name is None or name.start is None or name.end is None:
        return NotCall(scan.stop) if done else PENDING
    raw = text[name.start : name.end]
    decoded = json.loads(raw) if raw.startswith('"') else None
    if not isinstance(decoded, str) or not decoded.strip() or not encodable(decoded):
        return NotCall(name.end)
    call = Call(decoded, _arguments(text, scan, done))
    if scan.end is not None:
        return Calls((call,), scan.end)
    return Calls((call,), scan.stop if scan.broken else None)


def _arguments(text: str, scan: JsonScan, done: bool) -> str:
    """The arguments' text as far as it goes (``{}`` for a finished call without any)."""
    member = scan.member(*ARGUMENT_KEYS)
    written = ""
    if member is not None and member.start is not None:
        written = text[member.start : member.end if member.end is not None else scan.stop]
    return NO_ARGUMENTS if done and not written else written


def read_call_list(out: Output, start: int) -> Block:
    """A JSON list of call objects whose ``[`` is at ``start``. Content resumes after its
    ``]``, or after the last call when something else follows it."""
    text = out.text
    calls: list[Call] = []
    i = last_end = start + 1
    while True:
        i = skip_ws(text, i)
        if i == len(text):
            return Calls(tuple(calls), None) if calls else PENDING
        if text[i] == "]":
            return Calls(tuple(calls), i + 1) if calls else NotCall(i + 1)
        if calls:
            if text[i] != ",":
                return Calls(tuple(calls), last_end)
            i = skip_ws(text, i + 1)
            if i == len(text):
                return Calls(tuple(calls), None)
        block = read_call(out, i) if text[i] == "{" else NotCall(i)
        if not isinstance(block, Calls):
            if not calls:
                return block
            return Calls(tuple(calls), None if isinstance(block, Pending) else last_end)
        calls.extend(block.calls)
        if block.end is None:
            return Calls(tuple(calls), None)
        i = last_end = block.end


# ------------------------------------------------------------------ the formats
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def read_hermes(out: Output) -> list[Piece]:
    return read_marked(out, (HERMES_OPEN,), (_hermes_block,))


def _hermes_block(out: Output, pos: int) -> Block:
    text = out.text
    i = skip_ws(text, pos)
    if i == len(text):
        return PENDING
    if text[i] != "{":
        return NotCall(i)
    block = read_call(out, i)
    if not isinstance(block, Calls) or block.end is None:
        return block
    return closed_by(out, block, HERMES_CLOSE)


PYTHON_TAG = "<|python_tag|>"
_SEPARATORS = re.compile(r"[\s;]*")


def read_llama3(out: Output) -> list[Piece]:
    return read_leading(out, _llama3_calls)


def _llama3_calls(out: Output, start: int) -> Block:
    text = out.text
    i = start
    if text.startswith(PYTHON_TAG, i):
        i = skip_ws(text, i + len(PYTHON_TAG))
    elif PYTHON_TAG.startswith(text[i:]):
        return PENDING
    calls: list[Call] = []
    last_end = i
    while True:
        if i == len(text):
            return Calls(tuple(calls), None) if calls else PENDING
        block = read_call(out, i) if text[i] == "{" else NotCall(i)
        if not isinstance(block, Calls):
            if not calls:
                return block
            return Calls(tuple(calls), None if isinstance(block, Pending) else last_end)
        calls.extend(block.calls)
        if block.end is None:
            return Calls(tuple(calls), None)
        last_end = block.end
        separators = _SEPARATORS.match(text, last_end)
        assert separators is not None
        i = separators.end()


TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]*")


def read_mistral(out: Output) -> list[Piece]:
    return read_marked(out, (TOOL_CALLS,), (_mistral_block,))


def _mistral_block(out: Output, pos: int) -> Block:
    text = out.text
    i = skip_ws(text, pos)
    if i == len(text):
        return PENDING
    if text[i] == "[":  # before v11: a list of call objects
        return read_call_list(out, i)
    name = _MISTRAL_NAME.match(text, i)
    if name is None:
        return NotCall(i)
    j, call_id = name.end(), None
    if text.startswith(CALL_ID, j):
        given = _MISTRAL_ID.match(text, j + len(CALL_ID))
        assert given is not None
        j, call_id = given.end(), given.group() or None
    if text.startswith(ARGS, j):
        j += len(ARGS)
    elif j < len(text) and text[j] == "{":  # [ARGS] decoded away
        pass
    elif not out.final and _may_open_arguments(text[j:], call_id is None):
        return PENDING
    else:
        return NotCall(j)
    return _mistral_arguments(out, name.group(), call_id, j)


def _may_open_arguments(tail: str, id_may_follow: bool) -> bool:
    return ARGS.startswith(tail) or (id_may_follow and CALL_ID.startswith(tail))


def _mistral_arguments(out: Output, name: str, call_id: Optional[str], start: int) -> Calls:
    """A v11 call, committed: its arguments are the JSON value after ``[ARGS]``."""
    text = out.text
    i = skip_ws(text, start)
    scan = scan_value(text, i, out.memo)
    done = scan.end is not None or scan.broken or out.final
    written = text[i : scan.stop]
    call = Call(name, NO_ARGUMENTS if done and not written else written, call_id)
    if scan.end is not None:
        return Calls((call,), scan.end)
    return Calls((call,), scan.stop if scan.broken else None)


FUNCTOOLS = "functools"


def read_phi4_mini(out: Output) -> list[Piece]:
    return read_marked(out, (FUNCTOOLS,), (_functools_block,))


def _functools_block(out: Output, pos: int) -> Block:
    text = out.text
    i = skip_ws(text, pos)
    if i == len(text):
        return PENDING
    return read_call_list(out, i) if text[i] == "[" else NotCall(i)


def read_required(out: Output) -> list[Piece]:
    """``tool_choice: "required"``: the answer is a JSON list of ``{"name", "parameters"}``."""
    return read_leading(out, _leading_list)


def _leading_list(out: Output, start: int) -> Block:
    return read_call_list(out, start) if out.text[start] == "[" else NotCall(start)

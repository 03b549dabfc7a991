"""Tool-call formats whose calls are Python: ``[get_weather(city="Oslo"), get_time()]``.

- ``pythonic`` (Llama 3.2, Llama 4, and Gemma 3 prompted as Google's function-calling guide
  asks): the answer opens with a Python list of calls, Llama 4's ``<|python_start|>`` /
  ``<|python_end|>`` around it where the model writes them;
- ``gemma`` (Gemma 2 and 3 prompted as Google's agentic guides ask): ```` ```tool_code ````
  fenced blocks anywhere in the answer, each holding calls (one a line, or a list), the
  text around them content.

A call takes keyword arguments whose values are literals: strings, numbers, ``True`` /
``False`` / ``None`` (and JSON's ``true`` / ``false`` / ``null``), lists, tuples and dicts of
them. The text is parsed with ``ast`` and never evaluated; the arguments are rendered as
JSON. A call goes out whole once its closing parenthesis arrives (its arguments are not
JSON as written, so there is nothing to stream before). Invariant: a call element is
decided (a call, or not one) only once it is complete or can no longer be one; before
that, it is held back.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

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
    read_leading,
    read_marked,
    render_json,
)
from pagoda.entrypoints.tool_parsers.json_scan import skip_ws

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACKETS = {"(": ")", "[": "]", "{": "}"}
_NEXT_SPECIAL = re.compile(r"""[()\[\]{}'"#]""")
_JSON_NAMES = {"true": True, "false": False, "null": None}
# A string's body after its opening quote(s), per quote character.
_TRIPLE_BODY = {q: re.compile(r"(?:[^\\]|\\.)*?" + q * 3, re.S) for q in "'\""}
_LINE_BODY = {q: re.compile(r"(?:[^\\\n" + q + r"]|\\.)*", re.S) for q in "'\""}
PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)  # what ast.parse raises


@dataclass(frozen=True)
class _Element:
    call: Call
    end: int


class NotLiteral(Exception):
    """An expression that is not a literal JSON can hold."""


def call_from_source(source: str) -> Optional[Call]:
    """The call ``source`` spells (``name(key=literal, ...)``), or None."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except PARSE_ERRORS:
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    if any(kw.arg is None for kw in node.keywords):  # **kwargs
        return None
    try:
        arguments = {kw.arg: literal(kw.value) for kw in node.keywords}
        return Call(node.func.id, render_json(arguments))
    except NotLiteral:
        return None


def literal(node: ast.expr) -> Any:
    """The JSON value of a literal expression (NotLiteral for anything else)."""
    if isinstance(node, ast.Constant) and _json_scalar(node.value):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NotLiteral
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        keys = [literal(k) if k is not None else None for k in node.keys]
        if not all(isinstance(k, str) for k in keys):
            raise NotLiteral
        return {k: literal(v) for k, v in zip(keys, node.values, strict=True)}
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise NotLiteral


def _json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int))


# ------------------------------------------------------------------ reading calls
def _call_extent(text: str, i: int) -> Union[int, Pending, None]:
    """Where the call expression at ``i`` ends (just after its closing parenthesis);
    PENDING while the text may still complete it; None when it is not a call."""
    name = _IDENTIFIER.match(text, i)
    if name is None:
        return PENDING if i == len(text) else None
    j = skip_ws(text, name.end())
    if j == len(text):
        return PENDING
    if text[j] != "(":
        return None
    closers = [")"]
    j += 1
    while closers:
        m = _NEXT_SPECIAL.search(text, j)
        if m is None:
            return PENDING
        c, j = m.group(), m.end()
        if c in _BRACKETS:
            closers.append(_BRACKETS[c])
        elif c in ")]}":
            if c != closers.pop():
                return None
        elif c == "#":
            return None  # a comment: not the one-line call we read
        else:
            end = _string_end(text, m.start())
            if not isinstance(end, int):
                return end
            j = end
    return j


def _string_end(text: str, q: int) -> Union[int, Pending, None]:
    """Where the Python string literal whose opening quote is at ``q`` ends."""
    quote = text[q]
    if (quote * 3).startswith(text[q:]) and len(text) - q < 3:
        return PENDING  # "" or "  at the end: an empty string, or a triple quote coming
    if text.startswith(quote * 3, q):
        m = _TRIPLE_BODY[quote].match(text, q + 3)
        return PENDING if m is None else m.end()
    m = _LINE_BODY[quote].match(text, q + 1)
    assert m is not None
    j = m.end()
    if j == len(text) or text[j] == "\\":
        return PENDING
    return j + 1 if text[j] == quote else None  # a newline ends the line unterminated


def _element(out: Output, i: int) -> Union[_Element, Pending, None]:
    """The call at ``i``, once it is complete (None: it is none)."""
    key = ("python call", i)
    if key in out.memo:
        return out.memo[key]  # settled by an earlier reading of the growing answer
    extent = _call_extent(out.text, i)
    if isinstance(extent, Pending):
        return None if out.final else PENDING
    call = None if extent is None else call_from_source(out.text[i:extent])
    element = None if call is None or extent is None else _Element(call, extent)
    out.memo[key] = element
    return element


def read_python_calls(out: Output, i: int, close: str, commas: bool) -> Block:
    """Calls from ``i`` up to ``close``, separated by commas (or, without ``commas``, by
    whitespace too). Content resumes after ``close``, or after the last call when
    something else follows it."""
    text = out.text
    calls: list[Call] = []
    last_end, separated = i, True
    while True:
        i = skip_ws(text, i)
        if text.startswith(close, i):
            end = i + len(close)
            return Calls(tuple(calls), end) if calls else NotCall(end)
        if not out.final and close.startswith(text[i:]):
            return Calls(tuple(calls), None) if calls else PENDING
        if not separated and text[i : i + 1] == ",":
            i, separated = i + 1, True
            continue
        if not separated and commas:
            return Calls(tuple(calls), last_end)
        element = _element(out, i)
        if not isinstance(element, _Element):
            if not calls:
                return PENDING if isinstance(element, Pending) else NotCall(i)
            return Calls(tuple(calls), None if isinstance(element, Pending) else last_end)
        calls.append(element.call)
        i = last_end = element.end
        separated = False


# ------------------------------------------------------------------ the formats
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"


def read_pythonic(out: Output) -> list[Piece]:
    return read_leading(out, _pythonic_list)


def _pythonic_list(out: Output, start: int) -> Block:
    text = out.text
    i = start
    if text.startswith(PYTHON_START, i):
        i = skip_ws(text, i + len(PYTHON_START))
    elif not out.final and PYTHON_START.startswith(text[i:]):
        return PENDING
    if i == len(text):
        return NotCall(i) if out.final else PENDING
    if text[i] != "[":
        return NotCall(i)
    block = read_python_calls(out, i + 1, "]", commas=True)
    if not isinstance(block, Calls) or block.end is None:
        return block
    return closed_by(out, block, PYTHON_END)


TOOL_CODE, FENCE = "```tool_code", "```"


def read_gemma(out: Output) -> list[Piece]:
    return read_marked(out, (TOOL_CODE,), (_tool_code_block,))


def _tool_code_block(out: Output, pos: int) -> Block:
    text = out.text
    i = skip_ws(text, pos)
    if i == len(text):
        return PENDING
    if text[i] != "[":
        return read_python_calls(out, i, FENCE, commas=False)
    block = read_python_calls(out, i + 1, "]", commas=True)
    if not isinstance(block, Calls) or block.end is None:
        return block
    return closed_by(out, block, FENCE)

"""How far a text is a JSON value, read as it grows: the scanner under the JSON tool-call
formats, which stream a call's arguments as the model writes them.

``scan_value(text, start)`` reads one value from ``start`` and says where it ends (once it
has), or how far the text is a *valid prefix* of a value: text that some continuation turns
into valid JSON. Invariant: the valid prefix is exact to the character (a number's ``1.``
is a prefix, ``1.x`` breaks at ``x``), so for any extension of a text the scan's ``stop``
only grows, and the arguments cut from it (``text[start:stop]``) only grow too; that is
what lets a stream send them before the call is complete. An object's top-level members
are recorded with where their values start and end, so a caller can pick out ``name`` and
``arguments`` without parsing the whole value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

_WS = re.compile(r"[ \t\n\r]*")
# A string's characters and complete escapes, up to its end or the first thing to look at.
_STRING_BODY = re.compile(r'[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*')
_DIGITS = re.compile(r"[0-9]*")
_ESCAPES = '"\\/bfnrt'
_HEX = "0123456789abcdefABCDEF"
_LITERALS = {"t": "true", "f": "false", "n": "null"}


@dataclass
class Member:
    """One member of the top-level object: its key and where its value starts and ends."""

    key: str
    start: Optional[int] = None  # the value's first character, once it has begun
    end: Optional[int] = None  # just after the value, once it is complete


@dataclass
class JsonScan:
    """What is known of the value at ``start``.

    ``end`` is set once the value is complete (then ``stop == end``); otherwise
    ``text[start:stop]`` is its longest valid prefix, and ``broken`` says the character at
    ``stop`` cannot continue it (else the text ran out)."""

    stop: int
    end: Optional[int] = None
    broken: bool = False
    members: list[Member] = field(default_factory=list)

    def member(self, *keys: str) -> Optional[Member]:
        """The first top-level member with one of ``keys``."""
        return next((m for m in self.members if m.key in keys), None)


class _Step(Enum):
    """What the scanner expects next."""

    VALUE = "value"
    FIRST_KEY = "first key or }"
    KEY = "key"
    COLON = ":"
    FIRST_ITEM = "first item or ]"
    AFTER = ", or a closing bracket"


@dataclass
class _Token:
    """A scalar's extent: complete at ``end``, cut by the text's end, or bad at ``end``."""

    end: int
    ran_out: bool = False
    bad: bool = False


def skip_ws(text: str, i: int) -> int:
    m = _WS.match(text, i)
    assert m is not None  # the pattern matches the empty string
    return m.end()


def string_token(text: str, i: int) -> _Token:
    """A string starting with its quote at ``i``."""
    j, n = i + 1, len(text)
    while True:
        m = _STRING_BODY.match(text, j)
        assert m is not None
        j = m.end()
        if j == n:
            return _Token(j, ran_out=True)
        c = text[j]
        if c == '"':
            return _Token(j + 1)
        if c != "\\":
            return _Token(j, bad=True)  # a raw control character
        if j + 1 == n:
            return _Token(n, ran_out=True)
        escape = text[j + 1]
        if escape in _ESCAPES:
            j += 2
        elif escape == "u":
            j += 2
            for _ in range(4):
                if j == n:
                    return _Token(n, ran_out=True)
                if text[j] not in _HEX:
                    return _Token(j, bad=True)
                j += 1
        else:
            return _Token(j + 1, bad=True)


def number_token(text: str, i: int) -> _Token:
    """A number starting at ``i`` (``-``, digits, fraction, exponent, as JSON spells them).
    A number that reaches the end of the text may go on: it has ``ran_out``."""
    n = len(text)
    j = i + 1 if text[i] == "-" else i
    if j == n:
        return _Token(n, ran_out=True)
    if text[j] == "0":
        j += 1
    elif text[j].isascii() and text[j].isdigit():
        j = _digits_end(text, j + 1)
    else:
        return _Token(j, bad=True)
    for marks in (".", "eE"):
        if j < n and text[j] in marks:
            j += 1
            if marks == "eE" and j < n and text[j] in "+-":
                j += 1
            if j == n:
                return _Token(n, ran_out=True)
            if not (text[j].isascii() and text[j].isdigit()):
                return _Token(j, bad=True)
            j = _digits_end(text, j)
    return _Token(j, ran_out=j == n)


def _digits_end(text: str, j: int) -> int:
    m = _DIGITS.match(text, j)
    assert m is not None
    return m.end()


def literal_token(text: str, i: int) -> _Token:
    word = _LITERALS[text[i]]
    for k, c in enumerate(word):
        if i + k == len(text):
            return _Token(i + k, ran_out=True)
        if text[i + k] != c:
            return _Token(i + k, bad=True)
    return _Token(i + len(word))


def _scalar(text: str, i: int) -> Optional[_Token]:
    """The scalar that starts at ``i`` (None: no value starts with that character)."""
    c = text[i]
    if c == '"':
        return string_token(text, i)
    if c == "-" or (c.isascii() and c.isdigit()):
        return number_token(text, i)
    if c in _LITERALS:
        return literal_token(text, i)
    return None


def scan_value(text: str, start: int, memo: Optional[dict[Any, Any]] = None) -> JsonScan:
    """Read the JSON value at ``start`` (leading whitespace allowed) as far as ``text`` goes.
    With a ``memo`` kept across calls on a growing text (each call's text extends the last
    one's), the scan goes on from where the last one stopped instead of from ``start``."""
    reader = memo.get(("json", start)) if memo is not None else None
    if reader is None:
        reader = _Reader(JsonScan(stop=len(text)), start)
        if memo is not None:
            memo[("json", start)] = reader
    return reader.run(text)


@dataclass
class _Reader:
    """A scan in progress: where reading goes on, the open containers, what comes next."""

    scan: JsonScan
    i: int
    stack: list[str] = field(default_factory=list)  # the open containers, "{" or "["
    step: _Step = _Step.VALUE

    def run(self, text: str) -> JsonScan:
        scan = self.scan
        while scan.end is None and not scan.broken:
            self.i = skip_ws(text, self.i)
            if self.i == len(text):
                scan.stop = len(text)
                break  # a valid prefix so far
            if not self._read(text, self.i):
                scan.stop = len(text)  # a token cut by the text's end: read again next time
                break
        return scan

    def _read(self, text: str, i: int) -> bool:
        """Read what the step expects at ``i`` (not whitespace); False when the text ran
        out inside a token. A bad character ends the scan as broken."""
        if self.step is _Step.VALUE:
            return self._value(text, i)
        if self.step in (_Step.FIRST_KEY, _Step.KEY):
            return self._key(text, i)
        if self.step is _Step.COLON:
            return self._colon(text, i)
        if self.step is _Step.FIRST_ITEM:
            return self._first_item(text, i)
        return self._after(text, i)

    def _value(self, text: str, i: int) -> bool:
        if self.stack == ["{"]:
            self.scan.members[-1].start = i
        if text[i] in "{[":
            self.stack.append(text[i])
            self.step = _Step.FIRST_KEY if text[i] == "{" else _Step.FIRST_ITEM
            self.i = i + 1
            return True
        token = _scalar(text, i)
        if token is None or token.bad:
            return self._break(token.end if token is not None else i)
        if token.ran_out:
            return False
        return self._ended(token.end)

    def _key(self, text: str, i: int) -> bool:
        if text[i] == "}" and self.step is _Step.FIRST_KEY:
            self.stack.pop()
            return self._ended(i + 1)
        if text[i] != '"':
            return self._break(i)
        token = string_token(text, i)
        if token.bad:
            return self._break(token.end)
        if token.ran_out:
            return False
        if self.stack == ["{"]:
            self.scan.members.append(Member(json.loads(text[i : token.end])))
        self.i, self.step = token.end, _Step.COLON
        return True

    def _colon(self, text: str, i: int) -> bool:
        if text[i] != ":":
            return self._break(i)
        self.i, self.step = i + 1, _Step.VALUE
        return True

    def _first_item(self, text: str, i: int) -> bool:
        if text[i] != "]":
            self.step = _Step.VALUE
            return True
        self.stack.pop()
        return self._ended(i + 1)

    def _after(self, text: str, i: int) -> bool:
        """After a value inside a container: a comma, or the container's closing bracket."""
        closer = "}" if self.stack[-1] == "{" else "]"
        if text[i] == ",":
            self.i, self.step = i + 1, (_Step.KEY if closer == "}" else _Step.VALUE)
            return True
        if text[i] != closer:
            return self._break(i)
        self.stack.pop()
        return self._ended(i + 1)

    def _ended(self, i: int) -> bool:
        """A value ended just before ``i`` (a scalar, or a container closed)."""
        self.i, self.step = i, _Step.AFTER
        if not self.stack:
            self.scan.stop = self.scan.end = i
        elif self.stack == ["{"]:
            self.scan.members[-1].end = i
        return True

    def _break(self, at: int) -> bool:
        self.scan.stop, self.scan.broken = at, True
        return True

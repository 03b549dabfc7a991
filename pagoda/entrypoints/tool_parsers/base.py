"""The pieces every tool-call format is made of: what a call is, how a format reads a text,
and the rule that turns what it read into a message's content and calls.

A format reads the answer so far into *pieces*, in order: text that surely is content and
calls (a name and its arguments as far as they go). Live (``final`` False) it holds back
anything that may still become a call, or a marker that opens one; at the end
(``final``) it holds nothing back: an opening that never became a call is content,
verbatim. ``assemble`` then makes the message: the calls, and as content the text pieces
that are more than whitespace (all of the text when there is no call). Invariant, for every
format: for a text and any extension of it, each live reading's content is a prefix of the
extension's, its calls are the extension's first calls with the same names, and each call's
arguments a prefix of the extension's. A stream sends the difference between readings, so
what it sends joins to exactly the finished message.

A call is *committed* once its name has been read: from then on it is a call, whatever
follows. If its arguments then break off (invalid JSON, the output cut), they stay as
written; a stream has already sent them.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from pagoda.entrypoints.tool_parsers.json_scan import skip_ws

Schemas = Mapping[str, Mapping[str, Any]]  # a tool's name -> its parameters' JSON schema


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text, as far as the output goes
    id: Optional[str] = None  # the id the model wrote for it (Mistral's [CALL_ID]), if any


Piece = Union[str, Call]


@dataclass(frozen=True)
class Output:
    """The text a format reads: the answer so far, whether it is complete, and the tools'
    schemas (formats that write arguments as text convert them by their declared types).

    ``memo``: what earlier readings of the same growing answer settled (a JSON scan's state,
    a call or parameter read whole), so that a stream does not read all of a long answer
    again for each token. It serves readings of texts that each extend the last, the last
    of them final; whoever reads another text gives a fresh one."""

    text: str
    final: bool
    schemas: Schemas
    memo: dict[Any, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: tuple[Call, ...]


# What a format's reader finds after a marker (or at the start of the answer).
@dataclass(frozen=True)
class NotCall:
    """No call: the text from the marker up to ``resume`` is content; reading goes on there."""

    resume: int


@dataclass(frozen=True)
class Pending:
    """May still become a call: held back (content, verbatim, if the answer ends so)."""


PENDING = Pending()


@dataclass(frozen=True)
class Calls:
    """Committed calls; ``end``: where content resumes after them, None when the calls take
    the rest of the text (still being written, or cut)."""

    calls: tuple[Call, ...]
    end: Optional[int]


Block = Union[NotCall, Pending, Calls]
Reader = Callable[[Output, int], Block]


def openai_id() -> str:
    """A call id as OpenAI spells them: ``call_`` and 24 hex digits."""
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class ToolFormat:
    """A model family's way of writing calls (one ``--tool-call-parser`` entry)."""

    read: Callable[[Output], list[Piece]]
    # Its markers are special tokens in some checkpoints: the answer is decoded with them.
    keeps_special_tokens: bool = False
    new_id: Callable[[], str] = openai_id

    def parse(self, out: Output, parallel: bool = True) -> Parsed:
        return assemble(self.read(out), out.final, parallel)


def render_json(value: Any) -> str:
    """``value`` as JSON text, non-ASCII characters as they are; escaped where the value
    holds a lone surrogate (a model that wrote ``\\ud800``), which UTF-8 cannot carry."""
    text = json.dumps(value, ensure_ascii=False)
    return text if encodable(text) else json.dumps(value)


def encodable(text: str) -> bool:
    """Whether ``text`` can go out as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def mistral_id() -> str:
    """Mistral's templates accept only nine alphanumeric characters as a call id."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def assemble(pieces: Sequence[Piece], final: bool, parallel: bool) -> Parsed:
    """The message: the calls (only the first without ``parallel``), and the text pieces
    between them that are more than whitespace; with no call, all of the text. Live, a
    whitespace-only piece is held back (a call may still follow it)."""
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif piece != "":
            merged.append(piece)
    calls = tuple(p for p in merged if isinstance(p, Call))
    texts = [p for p in merged if isinstance(p, str)]
    if final and not calls:
        return Parsed("".join(texts), ())
    return Parsed("".join(t for t in texts if t.strip()), calls if parallel else calls[:1])


# ------------------------------------------------------------------ how formats read
def read_marked(out: Output, markers: Sequence[str], readers: Sequence[Reader]) -> list[Piece]:
    """Content with calls anywhere, each opened by a marker (``readers[k]`` reads what
    follows ``markers[k]``)."""
    text = out.text
    # Where an earlier reading of the growing answer got to with every block decided.
    pos, settled = out.memo.get(("marked", tuple(markers)), (0, []))
    pieces: list[Piece] = list(settled)
    while True:
        hit = _first_marker(text, pos, markers)
        if hit is None:
            pieces.append(text[pos : len(text) if out.final else held_back(text, pos, markers)])
            return pieces
        at, k = hit
        pieces.append(text[pos:at])
        block = readers[k](out, at + len(markers[k]))
        if isinstance(block, Pending):
            if out.final:
                pieces.append(text[at:])
            return pieces
        if isinstance(block, NotCall):
            pieces.append(text[at : block.resume])
            pos = block.resume
        elif block.end is None:
            return pieces + list(block.calls)
        else:
            pieces.extend(block.calls)
            pos = block.end
        out.memo[("marked", tuple(markers))] = (pos, tuple(pieces))


def read_leading(out: Output, reader: Reader) -> list[Piece]:
    """Calls that can only open the answer (after whitespace); after them, content."""
    text = out.text
    start = skip_ws(text, 0)
    if start == len(text):
        return [text]
    block = reader(out, start)
    if isinstance(block, NotCall) or (isinstance(block, Pending) and out.final):
        return [text]
    if isinstance(block, Pending):
        return []
    rest = [] if block.end is None else [text[block.end :]]
    return [text[:start], *block.calls, *rest]


def held_back(text: str, pos: int, markers: Sequence[str]) -> int:
    """Where the sure text from ``pos`` ends in a live text: before a tail that may be the
    start of a marker."""
    keep = len(text)
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text) - pos), 0, -1):
            if text.endswith(marker[:k]):
                keep = min(keep, len(text) - k)
                break
    return keep


def _first_marker(text: str, pos: int, markers: Sequence[str]) -> Optional[tuple[int, int]]:
    """The earliest marker at or after ``pos``: (its index in the text, which marker)."""
    best: Optional[tuple[int, int]] = None
    for k, marker in enumerate(markers):
        at = text.find(marker, pos)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, k)
    return best


def expect(out: Output, i: int, word: str) -> Union[int, Pending, None]:
    """After optional whitespace at ``i``, ``word``: the index after it; PENDING while the
    text may still complete it (live); None when something else is there."""
    text = out.text
    j = skip_ws(text, i)
    if text.startswith(word, j):
        return j + len(word)
    if not out.final and word.startswith(text[j:]):
        return PENDING
    return None


def closed_by(out: Output, block: Calls, close: str) -> Calls:
    """Calls whose block ends with ``close`` (after optional whitespace): content resumes
    after it, or, when something else follows the calls, right after them."""
    assert block.end is not None
    after = expect(out, block.end, close)
    if isinstance(after, Pending):
        return Calls(block.calls, None)
    return Calls(block.calls, block.end if after is None else after)

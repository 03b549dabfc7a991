"""Tool calling, whatever API asked for it: a request's :class:`ToolPlan` (which tools, how
the calls are made), the calls read from a finished answer, and a :class:`ToolStream` that
reads a growing one into content and call deltas.

- ``auto``: the model writes what it likes; the ``--tool-call-parser`` format
  (``tool_parsers/``: hermes, llama3_json, pythonic, mistral, qwen3_coder, phi4_mini_json,
  gemma) finds the calls in the text, and what is not a call stays content.
- ``required`` or ``named``: the output is constrained (structured outputs) to a JSON array
  of ``{"name", "parameters"}`` calls of the given tools, or to the named function's
  arguments, so it always parses (vLLM does the same); the calls are read from that JSON
  whatever the model's own tool format is.
- ``parallel`` false: one call at most (the grammar of ``required`` allows one; under
  ``auto`` the calls after the first are dropped, as vLLM does).

Each dialect maps its own fields onto a plan (OpenAI's ``tools`` / ``tool_choice`` /
``parallel_tool_calls``: ``openai/chat_tools.py``) and renders calls and deltas its own way.
A streamed call's first :class:`ToolCallDelta` carries its index, id and name (and the
arguments written so far), later ones fragments of its arguments, sent as the model writes
them. Invariant: a stream sends the difference between readings of the answer so far, and a
format's reading of a text is never taken back by a longer one, so no text that may still
turn out to be (part of) a call is sent as content, and the deltas join to exactly the
calls and content of the non-streamed answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional, Sequence

from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.tool_parsers import (
    FORMATS,
    REQUIRED,
    Call,
    Output,
    Parsed,
    Schemas,
    ToolFormat,
    get_format,
    openai_id,
)
from pagoda.sampling import SamplingParams, StructuredOutputsParams

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolCall:
    """A call of a finished answer."""

    name: str
    arguments: str  # JSON text, as the model wrote it
    id: str = field(default_factory=openai_id)

    def to_json(self) -> dict[str, Any]:
        """The call in OpenAI's chat shape."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tools are handled."""

    mode: str  # "auto" | "required" | "named"
    tools: tuple[dict[str, Any], ...]  # the function definitions
    name: Optional[str] = None  # "named": the function
    parallel: bool = True
    parser: Optional[str] = None  # "auto": the text format

    def constraint(self) -> Optional[StructuredOutputsParams]:
        """The grammar of a required or named call (None for auto)."""
        if self.mode == "named":
            fn = next(t for t in self.tools if t["name"] == self.name)
            return StructuredOutputsParams(json=json.dumps(fn.get("parameters") or ANY_OBJECT))
        if self.mode == "required":
            call = {"anyOf": [_call_schema(t) for t in self.tools]}
            schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=json.dumps(schema))
        return None

    @property
    def format(self) -> Optional[ToolFormat]:
        """How the calls are read from the text (None: named, where the text is the
        arguments)."""
        if self.mode == "named":
            return None
        return REQUIRED if self.mode == "required" else get_format(self.parser or "hermes")

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the answer must be decoded with its special tokens (the format's markers
        are special tokens in some checkpoints: Mistral's [TOOL_CALLS], Hermes 2 Pro's)."""
        return self.format is not None and self.format.keeps_special_tokens

    @cached_property
    def schemas(self) -> Schemas:
        return {t["name"]: t.get("parameters") or ANY_OBJECT for t in self.tools}

    def parse(self, text: str, final: bool, memo: Optional[dict[Any, Any]] = None) -> Parsed:
        """The content and calls of the answer so far (``final``: it is complete; ``memo``:
        what reading this answer when it was shorter settled, see ``Output``)."""
        if self.format is None:
            assert self.name is not None
            return Parsed("", (Call(self.name, text),))
        out = Output(text, final, self.schemas, {} if memo is None else memo)
        return self.format.parse(out, self.parallel)

    def new_id(self) -> str:
        return openai_id() if self.format is None else self.format.new_id()

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """``params`` as this plan needs them: a required or named call's grammar, and the
        answer decoded with its special tokens where the format's markers are some."""
        if (constraint := self.constraint()) is not None:
            params = params.clone(structured_outputs=constraint)
        if self.keeps_special_tokens:  # the format's markers (vLLM too)
            params = params.clone(skip_special_tokens=False)
        return params

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them."""
        return [{"type": "function", "function": t} for t in self.tools]

    def extract(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished output."""
        parsed = self.parse(text, final=True)
        return parsed.content, [
            ToolCall(c.name, c.arguments, c.id or self.new_id()) for c in parsed.calls
        ]


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool["name"]},
            "parameters": tool.get("parameters") or ANY_OBJECT,
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


# ------------------------------------------------------------ streaming
@dataclass(frozen=True)
class ToolCallDelta:
    """What a stream sends of one call: its first delta carries ``id`` and ``name`` (and the
    arguments written so far), later ones only a fragment of its arguments."""

    index: int  # the call's position in the answer
    arguments: str
    id: Optional[str] = None
    name: Optional[str] = None

    @property
    def opens(self) -> bool:
        """Whether this is the call's first delta."""
        return self.id is not None

    def to_json(self) -> dict[str, Any]:
        """The delta in OpenAI's chat shape."""
        if self.opens:
            function = {"name": self.name, "arguments": self.arguments}
            return {"index": self.index, "id": self.id, "type": "function", "function": function}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class _SentCall:
    id: str
    arguments: int  # how much of its arguments went out


@dataclass
class ToolStream:
    """One streamed choice under a tool plan: what of its content and calls went out."""

    plan: ToolPlan
    sent_content: int = 0
    sent_calls: list[_SentCall] = field(default_factory=list)
    memo: dict[Any, Any] = field(default_factory=dict)  # what reading the answer settled
    last_text: str = ""

    @property
    def called(self) -> bool:
        return bool(self.sent_calls)

    def advance(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        """The content and the call deltas to send, given the answer so far."""
        if not text.startswith(self.last_text):  # not the same answer grown: read it anew
            self.memo = {}
        self.last_text = text
        parsed = self.plan.parse(text, final, self.memo)
        content = parsed.content[self.sent_content :]
        self.sent_content += len(content)
        deltas = [self._delta(i, call) for i, call in enumerate(parsed.calls)]
        return content, [d for d in deltas if d is not None]

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """:meth:`advance`, with the deltas in OpenAI's chat shape."""
        content, deltas = self.advance(text, final)
        return content, [d.to_json() for d in deltas]

    def _delta(self, index: int, call: Call) -> Optional[ToolCallDelta]:
        """A new call's first delta (its name and arguments so far), or the fragment of
        arguments written since the last one."""
        if index == len(self.sent_calls):
            self.sent_calls.append(_SentCall(call.id or self.plan.new_id(), len(call.arguments)))
            return ToolCallDelta(index, call.arguments, self.sent_calls[index].id, call.name)
        sent = self.sent_calls[index]
        fragment = call.arguments[sent.arguments :]
        if not fragment:
            return None
        sent.arguments = len(call.arguments)
        return ToolCallDelta(index, fragment)


# ------------------------------------------------------------ what every dialect checks
AUTO_NEEDS = 'tool_choice "auto" needs'  # what asks for the server's parser, in OpenAI's
# and Anthropic's words


def distinct_names(tools: Sequence[dict[str, Any]], what: str = "names") -> list[str]:
    """The tools' names; a 400 naming ``tools`` when two share one."""
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, f"tools must have distinct {what}", "tools")
    return names


def require_parser(parser: Optional[str], asked: str, param: str, alternative: str = "") -> str:
    """The server's tool-call parser; a 400 naming ``param`` when what was ``asked`` (a
    model choosing its calls itself) needs one and the server has none."""
    if parser is None:
        message = f"{asked} a server started with --tool-call-parser (one of {', '.join(FORMATS)})"
        raise ApiError(400, message + (f"; {alternative}" if alternative else ""), param)
    return parser

"""Tool calling on ``/v1/chat/completions``: OpenAI's ``tools``, ``tool_choice`` and
``parallel_tool_calls``.

- ``"none"``: the tools are left out of the prompt; the answer is text.
- ``"required"`` or a named function: the output is constrained (structured outputs) to a
  JSON array of ``{"name", "parameters"}`` calls of the given tools, or to the named
  function's arguments, so it always parses (vLLM does the same); the calls are read from
  that JSON whatever the model's own tool format is.
- ``"auto"``: the model writes what it likes; the ``--tool-call-parser`` format
  (``tool_parsers/``: hermes, llama3_json, pythonic, mistral, qwen3_coder, phi4_mini_json,
  gemma) finds the calls in the text, and what is not a call stays ``content``.
- ``parallel_tool_calls: false``: one call at most (the grammar of "required" allows one;
  under "auto" the calls after the first are dropped, as vLLM does).

Streaming follows OpenAI: a call's first delta carries ``index``, ``id``, ``type`` and
``function.name``, later ones ``function.arguments`` fragments, sent as the model writes
them. Invariant: a stream sends the difference between readings of the answer so far, and
a format's reading of a text is never taken back by a longer one, so no text that may still
turn out to be (part of) a call is sent as ``content`` and the deltas join to exactly the
non-streamed message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

from pagoda.entrypoints.openai.errors import ApiError
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.tool_parsers import (
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
from pagoda.sampling import StructuredOutputsParams

PARSERS = tuple(FORMATS)
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=openai_id)

    def to_json(self) -> dict[str, Any]:
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


def plan_for(req: ChatCompletionRequest, parser: Optional[str]) -> Optional[ToolPlan]:
    """The request's tool plan (None: no tools, or ``tool_choice`` "none"); ApiError naming
    the field when the request is inconsistent."""
    tools = tuple(t.function.model_dump(by_alias=True, exclude_none=True) for t in req.tools or [])
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none" or not tools:
        if not isinstance(choice, str) or choice not in ("none", "auto"):
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        return None
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools must have distinct function names", "tools")
    constrained = req.response_format is not None and req.response_format.type != "text"
    if choice != "auto" and (constrained or req.structured_outputs is not None):
        raise ApiError(
            400,
            f"tool_choice {_choice_name(choice)!r} constrains the output "
            "itself; it cannot be combined with response_format or "
            "structured_outputs",
            "tool_choice",
        )
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, str):
        if choice == "auto" and parser is None:
            raise ApiError(
                400,
                'tool_choice "auto" needs a server started with '
                f"--tool-call-parser (one of {', '.join(PARSERS)}); "
                '"required" or a named function work without one',
                "tool_choice",
            )
        return ToolPlan(choice, tools, parallel=parallel, parser=parser)
    name = choice.function.name
    if name not in names:
        raise ApiError(
            400, f"tool_choice names {name!r}, which is not in tools", "tool_choice.function.name"
        )
    return ToolPlan("named", tools, name=name, parallel=parallel)


def _choice_name(choice: Any) -> str:
    return choice if isinstance(choice, str) else "function"


# ------------------------------------------------------------ streaming
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

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """The content and the tool-call deltas to send, given the answer so far."""
        if not text.startswith(self.last_text):  # not the same answer grown: read it anew
            self.memo = {}
        self.last_text = text
        parsed = self.plan.parse(text, final, self.memo)
        content = parsed.content[self.sent_content :]
        self.sent_content += len(content)
        deltas = [self._delta(i, call) for i, call in enumerate(parsed.calls)]
        return content, [d for d in deltas if d is not None]

    def _delta(self, index: int, call: Call) -> Optional[dict[str, Any]]:
        """A new call's first delta (its name and arguments so far), or the fragment of
        arguments written since the last one."""
        if index == len(self.sent_calls):
            self.sent_calls.append(_SentCall(call.id or self.plan.new_id(), len(call.arguments)))
            function = {"name": call.name, "arguments": call.arguments}
            return {"index": index, "id": self.sent_calls[index].id, "type": "function",
                    "function": function}  # fmt: skip
        sent = self.sent_calls[index]
        fragment = call.arguments[sent.arguments :]
        if not fragment:
            return None
        sent.arguments = len(call.arguments)
        return {"index": index, "function": {"arguments": fragment}}

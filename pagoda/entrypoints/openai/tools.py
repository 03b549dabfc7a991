"""Tool calling on ``/v1/chat/completions``: OpenAI's ``tools`` and ``tool_choice``.

- ``"none"``: the tools are left out of the prompt; the answer is text.
- ``"required"`` or a named function: the output is constrained (structured outputs) to a
  JSON array of ``{"name", "parameters"}`` calls of the given tools, or to the named
  function's arguments, so it always parses (vLLM does the same); the calls are built from
  that JSON whatever the model's own tool format is.
- ``"auto"``: the model writes what it likes; a ``--tool-call-parser`` (the model family's
  format: ``hermes`` for ``<tool_call>{...}</tool_call>`` as Hermes and Qwen write it,
  ``llama3_json`` for Llama 3.x's bare ``{"name", "parameters"}`` objects) finds the calls in
  the text, and what is not a call stays ``content``.

Streaming follows OpenAI: a call's first delta carries ``index``, ``id``, ``type`` and
``function.name``, later ones ``function.arguments`` fragments. Invariant: no text that may
still turn out to be (part of) a call is ever sent as ``content``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from pagoda.entrypoints.openai.errors import ApiError
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.sampling import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json")
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

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

    def extract(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished output."""
        if self.mode == "named":
            assert self.name is not None
            return "", [ToolCall(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:  # cut by max_tokens: no call to give
                return text, []
            return "", [ToolCall(i["name"], json.dumps(i["parameters"])) for i in items]
        return parse_calls(self.parser or "hermes", text)

    def safe_len(self, text: str) -> int:
        """How much of a live text is surely content (auto): a possible call is held back."""
        if self.mode != "auto":
            return 0
        if self.parser == "llama3_json":
            stripped = text.lstrip()
            if stripped.startswith(("{", "<|python_tag|>")) or "<|python_tag|>".startswith(
                stripped
            ):
                return 0
            return len(text)
        start = text.find(HERMES_OPEN)
        if start >= 0:
            return start
        for k in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(HERMES_OPEN[:k]):
                return len(text) - k
        return len(text)


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


# -------------------------------------------------------------- parsers
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*" + re.escape(HERMES_CLOSE), re.S)


def parse_calls(parser: str, text: str) -> tuple[str, list[ToolCall]]:
    """The calls in a model's text and what remains as content (unparseable calls stay
    content, verbatim)."""
    if parser == "llama3_json":
        return _parse_llama3(text)
    calls, content, last = [], [], 0
    for m in _HERMES.finditer(text):
        call = _call_from(m.group(1), "arguments")
        if call is None:
            continue
        content.append(text[last : m.start()])
        calls.append(call)
        last = m.end()
    content.append(text[last:])
    # The text before the first call verbatim (a stream has sent it as it came); later
    # pieces only if they are more than the whitespace between calls.
    return content[0] + "".join(c for c in content[1:] if c.strip()), calls


def _parse_llama3(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return text, []
        call = _call_from(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\n;":
            pos += 1
    return "", calls


def _call_from(raw: Any, args_key: str) -> Optional[ToolCall]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return None
    args = raw.get(args_key, raw.get("arguments", raw.get("parameters", {})))
    return ToolCall(raw["name"], args if isinstance(args, str) else json.dumps(args))


# ------------------------------------------------------------ streaming
@dataclass
class ToolStream:
    """One streamed choice under a tool plan: what has gone out."""

    plan: ToolPlan
    sent_content: int = 0
    named_id: Optional[str] = None
    sent_args: int = 0

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]], bool]:
        """(content to send, tool-call deltas to send, whether the choice made calls)."""
        if self.plan.mode == "named":
            return self._named(text, finished)
        if not finished:
            end = self.plan.safe_len(text)
            content = text[self.sent_content : end] if end > self.sent_content else ""
            self.sent_content = max(self.sent_content, end)
            return content, [], False
        content, calls = self.plan.extract(text)
        rest = content[self.sent_content :] if len(content) > self.sent_content else ""
        deltas = [{"index": i, **c.to_json()} for i, c in enumerate(calls)]
        return rest, deltas, bool(calls)

    def _named(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]], bool]:
        deltas: list[dict[str, Any]] = []
        if self.named_id is None:
            self.named_id = f"call_{uuid.uuid4().hex[:24]}"
            deltas.append(
                {
                    "index": 0,
                    "id": self.named_id,
                    "type": "function",
                    "function": {"name": self.plan.name, "arguments": ""},
                }
            )
        fragment = text[self.sent_args :]
        self.sent_args = len(text)
        if fragment:
            deltas.append({"index": 0, "function": {"arguments": fragment}})
        return "", deltas, True

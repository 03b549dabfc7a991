"""Ollama's answers: one JSON object, or a stream of them as NDJSON (one object a line,
``application/x-ndjson``), for ``/api/chat`` (``message``) and ``/api/generate``
(``response``, ``thinking``).

Every object has ``model``, ``created_at`` (RFC 3339, UTC) and ``done``; the last has
``done: true``, ``done_reason`` (``stop`` or ``length``: a model that called tools stopped)
and the timings in nanoseconds, from the engine's own (``RequestOutput.metrics``):
``total_duration`` from arrival to the last token, ``load_duration`` 0 (the model is always
loaded), ``prompt_eval_duration`` from arrival to the first token (the wait in the queue
included: the engine stamps a prompt's first schedule and its first token at the end of the
same step), ``eval_duration`` from the first token to the last, with ``prompt_eval_count``
(the prompt's tokens) and ``eval_count`` (the answer's). A streamed tool call is sent whole,
its arguments an object, in the object before the last (Ollama's arguments are objects, not
JSON text). An engine that dies mid-stream ends it with ``{"error": ...}``.

Invariant: a stream's contents (and thinkings) joined are the non-streamed answer's, its
calls are its calls, and its last object's counts and reason are the same.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Optional

from fastapi.responses import StreamingResponse

from pagoda.engine.outputs import RequestOutput
from pagoda.entrypoints.answer import TOOL_CALLS, Answer, AnswerStreams, Delta, final_answers
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import FrontDoor, Outputs, Submission
from pagoda.entrypoints.ollama.errors import error_body
from pagoda.entrypoints.tools import ToolCall

NDJSON = "application/x-ndjson"
NS = 1_000_000_000


def created_at() -> str:
    """Now, as Ollama writes it: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def done_reason(finish_reason: Optional[str]) -> Optional[str]:
    """The engine's finish reason in Ollama's terms (calling tools is stopping)."""
    return "stop" if finish_reason == TOOL_CALLS else finish_reason


def call_json(index: int, name: str, arguments: str) -> dict[str, Any]:
    """A call in Ollama's shape: its arguments an object (as written, when they are not
    one: a call cut short)."""
    try:
        parsed: Any = json.loads(arguments)
    except ValueError:
        parsed = arguments
    return {"function": {"index": index, "name": name, "arguments": parsed}}


def timings(out: Optional[RequestOutput], prompt_tokens: int, tokens: int) -> dict[str, int]:
    """The last object's counts and durations (nanoseconds) from the engine's clock."""
    found = {"total_duration": 0, "load_duration": 0, "prompt_eval_duration": 0}
    found.update(eval_duration=0, prompt_eval_count=prompt_tokens, eval_count=tokens)
    if out is None:
        return found
    m = out.metrics
    end = m.finished_time if m.finished_time is not None else time.monotonic()
    first = m.first_token_time if m.first_token_time is not None else end
    found["total_duration"] = _ns(end - m.arrival_time)
    found["prompt_eval_duration"] = _ns(first - m.arrival_time)
    found["eval_duration"] = _ns(end - first)
    return found


def _ns(seconds: float) -> int:
    return max(0, int(seconds * NS))


@dataclass(frozen=True)
class Shape:
    """How one endpoint's objects look: chat's ``message``, or generate's ``response``."""

    model: str
    chat: bool
    show_thinking: bool = True

    def body(self, content: str, thinking: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.chat:
            fields: dict[str, Any] = {"response": content}
            if thinking and self.show_thinking:
                fields["thinking"] = thinking
            return fields
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking and self.show_thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        return {"message": message}

    def object(self, body: dict[str, Any], done: bool) -> dict[str, Any]:
        return {"model": self.model, "created_at": created_at(), **body, "done": done}

    def last(
        self,
        body: dict[str, Any],
        reason: Optional[str],
        out: Optional[RequestOutput],
        prompt_tokens: int,
        tokens: int,
    ) -> dict[str, Any]:
        last = self.object(body, True)
        last["done_reason"] = done_reason(reason)
        last.update(timings(out, prompt_tokens, tokens))
        return last

    def empty(self) -> dict[str, Any]:
        """The answer to a request with nothing to answer (no messages, no prompt)."""
        return self.last(self.body("", "", []), "stop", None, 0, 0)


# ---------------------------------------------------------------- whole
def whole(shape: Shape, sub: Submission, outputs: Outputs) -> dict[str, Any]:
    """The one object of a request that is not streamed."""
    answers = list(final_answers(sub.request, outputs))
    if not answers:  # the request was aborted before any output (the engine stopped)
        return shape.last(shape.body("", "", []), "abort", None, sub.request.num_prompt_tokens, 0)
    _, out, a = answers[0]
    body = shape.body(a.content, a.reasoning, _calls(a))
    return shape.last(body, a.finish_reason, out, sub.request.num_prompt_tokens, len(a.token_ids))


def _calls(a: Answer) -> list[dict[str, Any]]:
    return [call_json(i, c.name, c.arguments) for i, c in enumerate(a.tool_calls)]


# ---------------------------------------------------------------- streamed
@dataclass
class _Calls:
    """A streamed choice's calls, gathered from their deltas until the answer ends."""

    calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        for d in delta.tool_calls:
            if d.opens:
                self.calls.append(ToolCall(d.name or "", d.arguments))
            else:
                self.calls[d.index].arguments += d.arguments

    def json(self) -> list[dict[str, Any]]:
        return [call_json(i, c.name, c.arguments) for i, c in enumerate(self.calls)]


def response(lines: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    return StreamingResponse(_encoded(lines), media_type=NDJSON)


async def _encoded(lines: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async for obj in lines:
        yield json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"


async def streamed(door: FrontDoor, sub: Submission, shape: Shape) -> AsyncIterator[dict[str, Any]]:
    """A request's objects as its output grows: new content and thinking, the calls when
    the answer ends, then the last object."""
    answers, calls = AnswerStreams(sub.request), _Calls()
    try:
        async with door.stream(sub) as outputs:
            async for i, out in outputs:
                for comp, stream in answers.live(i, out):
                    delta = stream.feed(comp)
                    if delta is None:
                        continue
                    calls.add(delta)
                    if delta.content or (delta.reasoning and shape.show_thinking):
                        yield shape.object(shape.body(delta.content, delta.reasoning, []), False)
                    if delta.finish_reason is None:
                        continue
                    if calls.calls:
                        yield shape.object(shape.body("", "", calls.json()), False)
                    prompt = sub.request.num_prompt_tokens
                    body = shape.body("", "", [])
                    yield shape.last(body, delta.finish_reason, out, prompt, stream.num_generated)
    except ApiError as e:  # the engine died
        yield error_body(e)

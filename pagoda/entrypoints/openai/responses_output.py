"""The Responses API's output: a :class:`Turn` (what the model answered: thinking, text,
calls) as the ``response`` object's ``output`` items, and the object around them.

Items come in the order reasoning, message, function calls: a ``reasoning`` item when the
model thought (its ``content`` the thinking as ``reasoning_text``; its ``summary`` the same
text when ``reasoning.summary`` asked for one, since no separate summary is written), a
``message`` with one ``output_text`` part when there is text or nothing else, and one
``function_call`` item per call. ``status`` is ``completed``, or ``incomplete`` with
``incomplete_details.reason: "max_output_tokens"`` when the answer was cut by the limit.

Invariant: a streamed answer (``responses_stream.py``) and the same answer not streamed have
the same items, built here from the same turn, and the same object around them.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pagoda.engine.outputs import CompletionOutput
from pagoda.entrypoints.front_door import ApiRequest, Usage
from pagoda.entrypoints.openai.responses_input import assistant_turn, seal_thinking
from pagoda.entrypoints.openai.responses_protocol import ResponsesRequest

LENGTH = "length"
FAILED = ("error", "abort")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Call:
    call_id: str
    name: str
    arguments: str
    item_id: str = field(default_factory=lambda: new_id("fc"))


@dataclass
class Turn:
    """What one answer holds, and its items' ids (fixed when the turn starts, so a stream's
    items keep theirs)."""

    reasoning: str = ""
    content: str = ""
    calls: list[Call] = field(default_factory=list)
    finish_reason: Optional[str] = None
    reasoning_id: str = field(default_factory=lambda: new_id("rs"))
    message_id: str = field(default_factory=lambda: new_id("msg"))

    @property
    def status(self) -> str:
        if self.finish_reason in FAILED:
            return "failed"
        return "incomplete" if self.finish_reason == LENGTH else "completed"

    @property
    def item_status(self) -> str:
        return "completed" if self.status == "completed" else "incomplete"

    @property
    def has_message(self) -> bool:
        return bool(self.content) or not self.calls

    def history(self) -> dict[str, Any]:
        """The turn as the conversation's next request reads it."""
        calls = [(c.call_id, c.name, c.arguments) for c in self.calls]
        return assistant_turn(self.content, self.reasoning, calls)


@dataclass(frozen=True)
class Shape:
    """What the request asked of the items' shape."""

    summary: bool  # reasoning.summary: the thinking as the summary too
    sealed: bool  # include reasoning.encrypted_content

    @staticmethod
    def of(req: ResponsesRequest) -> Shape:
        r = req.reasoning
        summary = r is not None and (r.summary or r.generate_summary) is not None
        return Shape(summary, "reasoning.encrypted_content" in (req.include or []))


# ------------------------------------------------------------------ items
def reasoning_item(turn: Turn, shape: Shape, status: str) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": turn.reasoning_id,
        "type": "reasoning",
        "summary": [summary_part(turn.reasoning)] if shape.summary else [],
        "content": [thought_part(turn.reasoning)],
        "status": status,
    }
    if shape.sealed:
        item["encrypted_content"] = seal_thinking(turn.reasoning)
    return item


def thought_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def summary_part(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(turn: Turn, status: str, parts: bool = True) -> dict[str, Any]:
    return {
        "id": turn.message_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [text_part(turn.content)] if parts else [],
    }


def call_item(call: Call, status: str, arguments: Optional[str] = None) -> dict[str, Any]:
    return {
        "id": call.item_id,
        "type": "function_call",
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
        "status": status,
    }


def output_items(turn: Turn, shape: Shape) -> list[dict[str, Any]]:
    """The finished turn's items: reasoning, message, calls."""
    status = turn.item_status
    items = [reasoning_item(turn, shape, status)] if turn.reasoning else []
    if turn.has_message:
        items.append(message_item(turn, status))
    return items + [call_item(c, status) for c in turn.calls]


# ------------------------------------------------------------------ the object
@dataclass(frozen=True)
class Job:
    """One request: its id, when it was made, what it asked, and what went to the engine."""

    id: str
    req: ResponsesRequest
    request: ApiRequest
    conversation: list[dict[str, Any]]  # without the instructions, ending with the input
    owner: Optional[str]
    shape: Shape
    created_at: int = field(default_factory=lambda: int(time.time()))


def response_object(
    job: Job,
    status: str,
    output: list[dict[str, Any]],
    usage: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The ``response`` object, with the request's settings echoed as OpenAI echoes them."""
    req, params = job.req, job.request.sampling
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    error = {"code": "server_error", "message": "the answer failed"} if status == "failed" else None
    return {
        "id": job.id,
        "object": "response",
        "created_at": job.created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": None,
        "model": req.model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": _reasoning(req),
        "service_tier": "default",
        "store": req.store is not False,
        "temperature": params.temperature,
        "text": _text(req),
        "tool_choice": _tool_choice(req),
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "top_logprobs": 0,
        "top_p": params.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def usage_object(usage: Usage, reasoning_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def reasoning_tokens(tokenizer: Any, request: ApiRequest, comp: CompletionOutput) -> int:
    """The answer's tokens up to the end of its thinking (its text re-tokenized up to the
    closing tag, at most the tokens generated; none when nothing was split off)."""
    thinking = request.thinking
    if thinking is None or not thinking.split(comp.text).reasoning:
        return 0
    end = comp.text.find(thinking.format.end)
    thought = comp.text if end < 0 else comp.text[: end + len(thinking.format.end)]
    return min(len(comp.token_ids), len(tokenizer.encode(thought, add_special_tokens=False)))


def _reasoning(req: ResponsesRequest) -> dict[str, Any]:
    r = req.reasoning
    if r is None:
        return {"effort": None, "summary": None}
    return {"effort": r.effort, "summary": r.summary or r.generate_summary}


def _text(req: ResponsesRequest) -> dict[str, Any]:
    text: dict[str, Any] = {"format": {"type": "text"}}
    if req.text is not None:
        if req.text.format is not None:
            text["format"] = req.text.format.model_dump(by_alias=True, exclude_none=True)
        text["verbosity"] = req.text.verbosity or "medium"
    return text


def _tool_choice(req: ResponsesRequest) -> Any:
    choice = req.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump(exclude_none=True)

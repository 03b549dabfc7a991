"""The Responses API streamed: server-sent events (``event:`` and ``data:`` lines), as
OpenAI sends them and the SDK's ``client.responses.stream(...)`` accumulates them.

``response.created`` and ``response.in_progress`` first; then each item as the answer writes
it: ``response.output_item.added``, for a reasoning item ``response.reasoning_text.delta``
(and ``response.reasoning_summary_text.delta`` when a summary was asked), for the message
``response.content_part.added`` and ``response.output_text.delta``, for a call
``response.function_call_arguments.delta``; each item's ``.done`` events once the answer has
ended (the reasoning item's as soon as the answer goes on past it); last
``response.completed`` (or ``response.incomplete``, ``response.failed``) with the whole
object. An engine that dies mid-stream sends an ``error`` event, then ``response.failed``.

Invariant: every event carries a ``sequence_number`` one above the last; the deltas of an
item join to exactly the text of its ``.done`` event, and the final object's items are the
items the same answer has unstreamed (``responses_output.py``), in the order they were
added.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable, Optional

from pagoda.engine.outputs import RequestOutput
from pagoda.entrypoints.answer import AnswerStreams, Delta
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import FrontDoor, Submission, Usage
from pagoda.entrypoints.openai.responses_output import (
    Call,
    Job,
    Turn,
    call_item,
    message_item,
    reasoning_item,
    response_object,
    summary_part,
    text_part,
    thought_part,
)

REASONING = "response.reasoning_text"
SUMMARY = "response.reasoning_summary_text"


class ResponseEvents:
    """One streamed response: what has been added, and the next sequence number."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.turn = Turn()
        self.seq = 0
        self.order: list[str] = []  # the items added: "reasoning", "message", call item ids
        self.reasoning_open = False

    # ---------------------------------------------------------------- framing
    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    def index(self, key: str) -> int:
        return self.order.index(key)

    def add(self, key: str, item: dict[str, Any]) -> str:
        self.order.append(key)
        return self.event("response.output_item.added", output_index=self.index(key), item=item)

    # ---------------------------------------------------------------- the start
    def start(self) -> list[str]:
        progress = response_object(self.job, "in_progress", [])
        return [
            self.event("response.created", response=progress),
            self.event("response.in_progress", response=progress),
        ]

    # ---------------------------------------------------------------- deltas
    def delta(self, delta: Delta) -> list[str]:
        events: list[str] = []
        if delta.reasoning:
            events += self._thought(delta.reasoning)
        if delta.content or delta.tool_calls:
            events += self._close_reasoning()
        if delta.content:
            events += self._text(delta.content)
        for call in delta.tool_calls:
            events += self._call(call.index, call.arguments, call.id, call.name)
        self.turn.finish_reason = delta.finish_reason or self.turn.finish_reason
        return events

    def _thought(self, text: str) -> list[str]:
        turn, events = self.turn, []
        if not self.reasoning_open and "reasoning" not in self.order:
            self.reasoning_open = True
            events.append(self.add("reasoning", self._reasoning_item("in_progress", "")))
            if self.job.shape.summary:
                events.append(self._summary_event("added", part=summary_part("")))
        turn.reasoning += text
        ids = self._item_fields("reasoning")
        events.append(self.event(f"{REASONING}.delta", content_index=0, delta=text, **ids))
        if self.job.shape.summary:
            events.append(self.event(f"{SUMMARY}.delta", summary_index=0, delta=text, **ids))
        return events

    def _text(self, text: str) -> list[str]:
        events = [] if "message" in self.order else self._open_message()
        self.turn.content += text
        events.append(
            self.event(
                "response.output_text.delta",
                content_index=0,
                delta=text,
                logprobs=[],
                **self._item_fields("message"),
            )
        )
        return events

    def _open_message(self) -> list[str]:
        item = message_item(self.turn, "in_progress", parts=False)
        return [
            self.add("message", item),
            self.event(
                "response.content_part.added",
                content_index=0,
                part=text_part(""),
                **self._item_fields("message"),
            ),
        ]

    def _call(
        self, index: int, arguments: str, call_id: Optional[str], name: Optional[str]
    ) -> list[str]:
        events: list[str] = []
        if call_id is not None:  # the call's first delta
            assert name is not None
            call = Call(call_id, name, "")
            self.turn.calls.append(call)
            events.append(self.add(call.item_id, call_item(call, "in_progress")))
        call = self.turn.calls[index]
        if arguments:
            call.arguments += arguments
            events.append(
                self.event(
                    "response.function_call_arguments.delta",
                    delta=arguments,
                    **self._item_fields(call.item_id, call.item_id),
                )
            )
        return events

    # ---------------------------------------------------------------- the end
    def finish(self, usage: Optional[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
        """Every item's ``.done`` events, then the whole object (returned too)."""
        events = self._close_reasoning(self.turn.item_status)
        if self.turn.has_message and "message" not in self.order:
            events += self._open_message()  # an empty answer still has its message
        if "message" in self.order:
            events += self._close_message()
        for call in self.turn.calls:
            events += self._close_call(call)
        response = response_object(self.job, self.turn.status, self.items(), usage)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}
        events.append(self.event(kind.get(self.turn.status, "response.failed"), response=response))
        return events, response

    def items(self) -> list[dict[str, Any]]:
        """The finished items, in the order they were added."""
        status = self.turn.item_status
        made: dict[str, dict[str, Any]] = {c.item_id: call_item(c, status) for c in self.turn.calls}
        made["message"] = message_item(self.turn, status)
        made["reasoning"] = self._reasoning_item(status, self.turn.reasoning)
        return [made[key] for key in self.order]

    def _close_reasoning(self, status: str = "completed") -> list[str]:
        """The reasoning item's ``.done`` events: the answer went on past it (or ended)."""
        if not self.reasoning_open:
            return []
        self.reasoning_open = False
        text, ids = self.turn.reasoning, self._item_fields("reasoning")
        events = [self.event(f"{REASONING}.done", content_index=0, text=text, **ids)]
        if self.job.shape.summary:
            events.append(self.event(f"{SUMMARY}.done", summary_index=0, text=text, **ids))
            events.append(self._summary_event("done", part=summary_part(text)))
        item = self._reasoning_item(status, text)
        events.append(
            self.event("response.output_item.done", output_index=ids["output_index"], item=item)
        )
        return events

    def _close_message(self) -> list[str]:
        text, ids = self.turn.content, self._item_fields("message")
        status = self.turn.item_status
        return [
            self.event("response.output_text.done", content_index=0, text=text, logprobs=[], **ids),
            self.event("response.content_part.done", content_index=0, part=text_part(text), **ids),
            self.event(
                "response.output_item.done",
                output_index=ids["output_index"],
                item=message_item(self.turn, status),
            ),
        ]

    def _close_call(self, call: Call) -> list[str]:
        ids = self._item_fields(call.item_id, call.item_id)
        return [
            self.event(
                "response.function_call_arguments.done",
                name=call.name,
                arguments=call.arguments,
                **ids,
            ),
            self.event(
                "response.output_item.done",
                output_index=ids["output_index"],
                item=call_item(call, self.turn.item_status),
            ),
        ]

    def failed(self, e: ApiError) -> list[str]:
        """An engine that died mid-answer: the error, then the object, failed."""
        self.turn.finish_reason = "error"
        response = response_object(self.job, "failed", self.items())
        response["error"] = {"code": e.code or "server_error", "message": e.message}
        return [
            self.event("error", code=e.code, message=e.message, param=e.param),
            self.event("response.failed", response=response),
        ]

    # ---------------------------------------------------------------- helpers
    def _reasoning_item(self, status: str, text: str) -> dict[str, Any]:
        item = reasoning_item(self.turn, self.job.shape, status)
        item["content"] = [thought_part(text)] if text else []
        return item

    def _summary_event(self, phase: str, part: dict[str, Any]) -> str:
        return self.event(
            f"response.reasoning_summary_part.{phase}",
            summary_index=0,
            part=part,
            **self._item_fields("reasoning"),
        )

    def _item_fields(self, key: str, item_id: Optional[str] = None) -> dict[str, Any]:
        ids = {"reasoning": self.turn.reasoning_id, "message": self.turn.message_id}
        return {"item_id": item_id or ids[key], "output_index": self.index(key)}


async def response_events(
    door: FrontDoor,
    sub: Submission,
    events: ResponseEvents,
    usage_of: Callable[[Usage, Optional[RequestOutput]], dict[str, Any]],
    keep: Callable[[Turn, dict[str, Any]], None],
) -> AsyncIterator[str]:
    """The stream of one response; ``keep`` stores the finished object (``store``)."""
    answers = AnswerStreams(sub.request)
    final: Optional[RequestOutput] = None
    for line in events.start():
        yield line
    try:
        async with door.stream(sub) as outputs:
            async for i, out in outputs:
                for comp, stream in answers.live(i, out):
                    delta = stream.feed(comp)
                    for line in events.delta(delta) if delta is not None else []:
                        yield line
                if out.finished:
                    final = out
    except ApiError as e:  # the engine died
        for line in events.failed(e):
            yield line
        return
    usage = usage_of(Usage.of(sub.request, [final]), final)
    closing, response = events.finish(usage)
    keep(events.turn, response)
    for line in closing:
        yield line

"""A streamed message as Anthropic's server-sent events (``event: <type>`` then
``data: {...}``): ``message_start`` (the message with no content, and its usage), a
``ping``, then per content block ``content_block_start``, its deltas (``thinking_delta``
then a ``signature_delta`` before the thinking block stops; ``text_delta``;
``input_json_delta`` fragments of a call's input) and ``content_block_stop``, then
``message_delta`` (the stop reason and sequence, the final usage) and ``message_stop``. An
engine that dies mid-stream ends it with an ``error`` event.

Blocks are numbered in the order they open: thinking, text, then each call (a call opens
its ``tool_use`` block and stops the call before it). The thinking block stops when
anything else opens; the text block stays open until the message ends, so that text the
model writes after a call (the tool parser's content) joins the same block.

``message_start`` goes out with the first output, when the prompt's prefix-cache hits are
known, so its usage is already the final one's input side.

Invariant: the events accumulate (as the ``anthropic`` SDK's stream accumulator does) to
the non-streamed message (``blocks.py``) for the same answer, ids apart: the deltas are
``answer.py``'s, which join to that answer.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Optional

from pagoda.engine.outputs import RequestOutput
from pagoda.entrypoints.answer import AnswerStreams, Delta
from pagoda.entrypoints.anthropic.blocks import (
    Reply,
    signature,
    stop_of,
    tool_use_id,
    usage_json,
)
from pagoda.entrypoints.anthropic.errors import error_body
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import FrontDoor, Submission, Usage


def event(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class BlockWriter:
    """The content-block events of one streamed message."""

    def __init__(self, shows_thinking: bool = True) -> None:
        self.shows_thinking = shows_thinking  # false: thinking blocks send no text
        self.num_blocks = 0
        self.open: set[int] = set()
        self.thinking: Optional[int] = None  # the thinking block, while open
        self.thought = ""
        self.text: Optional[int] = None
        self.tool: Optional[int] = None  # the last call's block, while open
        self.calls: dict[int, int] = {}  # a call's index in the answer -> its block

    def feed(self, d: Delta) -> list[str]:
        """The events of one delta: new reasoning, then content, then calls."""
        events: list[str] = []
        if d.reasoning:
            if self.thinking is None:
                block = {"type": "thinking", "thinking": "", "signature": ""}
                self.thinking = self._start(block, events)
            self.thought += d.reasoning
            if self.shows_thinking:
                thinking = {"type": "thinking_delta", "thinking": d.reasoning}
                events.append(_delta(self.thinking, thinking))
        if d.content:
            if self.text is None:
                self._stop_thinking(events)
                self.text = self._start({"type": "text", "text": ""}, events)
            events.append(_delta(self.text, {"type": "text_delta", "text": d.content}))
        for call in d.tool_calls:
            if call.opens:
                self._stop_thinking(events)
                if self.tool is not None:
                    self._stop(self.tool, events)
                use = {
                    "type": "tool_use",
                    "id": tool_use_id(),
                    "name": call.name or "",
                    "input": {},
                }
                self.tool = self.calls[call.index] = self._start(use, events)
            if call.arguments:
                fragment = {"type": "input_json_delta", "partial_json": call.arguments}
                events.append(_delta(self.calls[call.index], fragment))
        return events

    def finish(self) -> list[str]:
        """The stops of the blocks still open, in order."""
        events: list[str] = []
        self._stop_thinking(events)
        for index in sorted(self.open):
            self._stop(index, events)
        return events

    def _start(self, block: dict[str, Any], events: list[str]) -> int:
        index = self.num_blocks
        self.num_blocks += 1
        self.open.add(index)
        events.append(
            event({"type": "content_block_start", "index": index, "content_block": block})
        )
        return index

    def _stop(self, index: int, events: list[str]) -> None:
        if index in self.open:
            self.open.discard(index)
            events.append(event({"type": "content_block_stop", "index": index}))

    def _stop_thinking(self, events: list[str]) -> None:
        if self.thinking is None or self.thinking not in self.open:
            return
        events.append(
            _delta(self.thinking, {"type": "signature_delta", "signature": signature(self.thought)})
        )
        self._stop(self.thinking, events)


def _delta(index: int, delta: dict[str, Any]) -> str:
    return event({"type": "content_block_delta", "index": index, "delta": delta})


async def message_events(door: FrontDoor, sub: Submission, reply: Reply) -> AsyncIterator[str]:
    """Every event of the message ``sub`` answers, as the engine makes it."""
    message = _Message(sub, reply)
    try:
        async with door.stream(sub) as outputs:
            async for i, out in outputs:
                for e in message.output(i, out):
                    yield e
        for e in message.end():
            yield e
    except ApiError as e:  # the engine died
        yield event(error_body(e))


class _Message:
    """One streamed message: what went out of it, and how it ended."""

    def __init__(self, sub: Submission, reply: Reply) -> None:
        self.sub, self.reply = sub, reply
        self.answers = AnswerStreams(sub.request)
        self.writer = BlockWriter(reply.shows_thinking)
        self.started = False
        self.cached = 0  # the prompt's prefix-cache hits, told by its first output
        self.ended: tuple[Optional[str], Optional[str | int]] = (None, None)

    def output(self, prompt_index: int, out: RequestOutput) -> list[str]:
        """The events of a new output: the message's start with the first, then the blocks'."""
        events: list[str] = []
        if not self.started:
            self.cached = out.num_cached_tokens
            events += [event(self._start(self._usage())), event({"type": "ping"})]
            self.started = True
        for comp, stream in self.answers.live(prompt_index, out):
            delta = stream.feed(comp)
            if delta is None:
                continue
            events += self.writer.feed(delta)
            if delta.finish_reason is not None:
                self.ended = (delta.finish_reason, comp.stop_reason)
        return events

    def end(self) -> list[str]:
        """The blocks' stops, the stop reason with the final usage, the message's stop."""
        usage = self._usage()
        events = [] if self.started else [event(self._start(usage))]
        events += self.writer.finish()
        reason, sequence = stop_of(*self.ended, self.reply.context_bound)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        events.append(event({"type": "message_delta", "delta": delta, "usage": usage_json(usage)}))
        events.append(event({"type": "message_stop"}))
        return events

    def _usage(self) -> Usage:
        request = self.sub.request
        return Usage(request.num_prompt_tokens, self.answers.num_generated, self.cached)

    def _start(self, usage: Usage) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": self.sub.id,
            "type": "message",
            "role": "assistant",
            "model": self.reply.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage_json(usage), "output_tokens": 0},
        }
        return {"type": "message_start", "message": message}

"""A choice's answer, whatever API asked for it: what the engine's cumulative output means.

The engine gives, per choice, a growing text with its token ids and logprobs. Under a
reasoning parser (``reasoning.py``) the text is thinking, then content; under a tool plan
(``tools.py``) the content may hold calls. :func:`final_answer` reads a finished output into
an :class:`Answer`; an :class:`AnswerStream` reads a live one into :class:`Delta` s, what is
new since the last delta. A dialect only renders these.

Finish reasons are the engine's (``stop``, ``length``, ``abort``, ``error``) and
``tool_calls``: the model stopped after calling tools (a call cut by ``max_tokens`` is
still ``length``).

Invariant: the deltas of a choice join to exactly its non-streamed answer: contents
concatenated are its content, reasonings its reasoning, each call's deltas (the first with
its id and name, then fragments) its call, logprobs and token ids appended are its own, and
the last delta's finish reason is its finish reason. ``ReasoningStream`` and ``ToolStream``
hold back what may still change, and the engine's live text holds back what may become a
stop string, so nothing a delta sent is ever taken back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from pagoda.core.outputs import TokenLogprobs
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.entrypoints.front_door import ApiRequest, Outputs
from pagoda.entrypoints.reasoning import ReasoningStream, Thinking
from pagoda.entrypoints.tools import ToolCall, ToolCallDelta, ToolPlan, ToolStream

TOOL_CALLS = "tool_calls"  # the finish reason of a model that stopped after calling tools


@dataclass(frozen=True)
class Answer:
    """One finished choice."""

    index: int  # the choice: i * n + j for completion j of prompt i
    content: str  # after the thinking; without the calls when there are calls
    reasoning: str  # the thinking ("" when none was split off)
    tool_calls: list[ToolCall]
    finish_reason: Optional[str]
    stop_reason: Optional[str | int]  # the stop string or token id that ended it
    logprobs: list[TokenLogprobs]
    token_ids: list[int]


@dataclass(frozen=True)
class Delta:
    """What is new in one streamed choice since its last delta."""

    index: int
    first: bool  # the choice's first delta (sent even if empty)
    content: str
    reasoning: str
    tool_calls: list[ToolCallDelta]
    logprobs: list[TokenLogprobs]
    text_offset: int  # how much of the text went out before this delta
    token_ids: list[int]
    finish_reason: Optional[str]  # set on the choice's last delta


def final_answer(
    index: int,
    comp: CompletionOutput,
    thinking: Optional[Thinking] = None,
    tools: Optional[ToolPlan] = None,
) -> Answer:
    """A finished choice: its thinking split off, then its calls read from the rest."""
    content, thought = comp.text, ""
    if thinking is not None:
        parts = thinking.split(comp.text)
        content, thought = parts.content, parts.reasoning
    calls: list[ToolCall] = []
    reason = comp.finish_reason
    if tools is not None:  # parsed whatever ended the answer, as a stream sends it
        rest, calls = tools.extract(content)
        if calls:
            content = rest
            reason = TOOL_CALLS if reason == "stop" else reason
    return Answer(
        index,
        content,
        thought,
        calls,
        reason,
        comp.stop_reason,
        list(comp.logprobs or []),
        list(comp.token_ids),
    )


def final_answers(
    request: ApiRequest, outputs: Outputs
) -> Iterator[tuple[int, RequestOutput, Answer]]:
    """Every finished choice of a request, in choice order, with its prompt's index and
    output."""
    for i, out in enumerate(outputs):
        for comp in out.outputs if out is not None else []:
            assert out is not None
            index = request.choice_index(i, comp.index)
            yield i, out, final_answer(index, comp, request.thinking, request.tools)


class AnswerStream:
    """What one streamed choice has sent; :meth:`feed` it each newer cumulative output."""

    def __init__(
        self, index: int, thinking: Optional[Thinking] = None, tools: Optional[ToolPlan] = None
    ) -> None:
        self.index = index
        self.reasoning: Optional[ReasoningStream] = (
            thinking.stream() if thinking is not None else None
        )
        self.tools = ToolStream(tools) if tools is not None else None
        self.text_len = 0  # of the text, what went out
        self.num_logprobs = 0
        self.num_tokens = 0
        self.num_generated = 0  # tokens generated so far (sent or not)
        self.started = False
        self.finished = False

    def feed(self, comp: CompletionOutput) -> Optional[Delta]:
        """What is new in ``comp``; None when nothing is (and the first delta went out)."""
        self.num_generated = len(comp.token_ids)
        end = len(comp.text)  # a live text holds back what may start a stop string
        text = comp.text[self.text_len : end]
        entries = (comp.logprobs or [])[self.num_logprobs :]
        if not text and not entries and comp.finish_reason is None and self.started:
            return None
        content, thought, calls, reason = self._read(comp, text)
        delta = Delta(
            self.index,
            not self.started,
            content,
            thought,
            calls,
            list(entries),
            self.text_len,
            list(comp.token_ids[self.num_tokens :]),
            reason,
        )
        self.text_len = max(self.text_len, end)
        self.num_logprobs += len(entries)
        self.num_tokens += len(delta.token_ids)
        self.started, self.finished = True, comp.finish_reason is not None
        return delta

    def _read(
        self, comp: CompletionOutput, text: str
    ) -> tuple[str, str, list[ToolCallDelta], Optional[str]]:
        """The new content, reasoning and call deltas, and the finish reason: the thinking
        first (under a reasoning parser), then the calls in the content after it."""
        final = comp.finish_reason is not None
        content, thought, answer = text, "", comp.text
        if self.reasoning is not None:
            thought, content = self.reasoning.feed(comp.text, final)
            answer = self.reasoning.content
        calls: list[ToolCallDelta] = []
        reason = comp.finish_reason
        if self.tools is not None:  # once the answer has ended, nothing is held back
            content, calls = self.tools.advance(answer, final)
            reason = TOOL_CALLS if reason == "stop" and self.tools.called else reason
        return content, thought, calls, reason


class AnswerStreams:
    """The streamed choices of one request, made as their outputs first come."""

    def __init__(self, request: ApiRequest) -> None:
        self.request = request
        self.choices: dict[int, AnswerStream] = {}

    def choice(self, index: int) -> AnswerStream:
        stream = self.choices.get(index)
        if stream is None:
            req = self.request
            stream = self.choices[index] = AnswerStream(index, req.thinking, req.tools)
        return stream

    def live(
        self, prompt_index: int, out: RequestOutput
    ) -> Iterator[tuple[CompletionOutput, AnswerStream]]:
        """The completions of ``out`` whose choice has not finished, with its stream."""
        for comp in out.outputs:
            stream = self.choice(self.request.choice_index(prompt_index, comp.index))
            if not stream.finished:
                yield comp, stream

    @property
    def num_generated(self) -> int:
        """Tokens generated so far, over every choice."""
        return sum(s.num_generated for s in self.choices.values())

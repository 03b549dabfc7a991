"""Reasoning models, whatever API serves them: the thinking a model writes between tags
(``<think>…</think>``: Qwen3, DeepSeek-R1, QwQ) is split from the rest of its answer, which
is the content; tools and structured outputs apply to the answer after the thinking
(``--reasoning-parser``, vLLM's names). OpenAI's chat returns the thinking as
``message.reasoning_content`` and ``message.reasoning`` (vLLM's two names).

Where a conversation starts is read from the end of its prompt: a template that opened the
thinking (DeepSeek-R1's ``<think>\\n``) starts the answer inside it; one that closed it
(Qwen3 with ``enable_thinking: false``: ``<think>\\n\\n</think>\\n\\n``) starts it in the
content; otherwise the format's own default holds.

The split is a function of the text so far: streaming sends what it has of the final split
and holds back a tail that may still become a tag (or the newlines a tag trims), so the
streamed deltas join to exactly the non-streamed message. Invariant: no text is sent as
reasoning or content that the finished answer would put elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Optional

from pagoda.sampling import SamplingParams

PROMPT_TAIL_TOKENS = 8  # how near its end a prompt's tag must be to say where the answer starts


class Start(Enum):
    REASONING = "reasoning"  # the prompt opened the thinking
    CONTENT = "content"  # the prompt closed it (thinking off): all of the answer is content
    DEFAULT = "default"  # the format's default


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str
    end: str
    opened_by_template: bool  # DeepSeek-R1's templates end the prompt inside the thinking


FORMATS = {
    "qwen3": ReasoningFormat("qwen3", "<think>", "</think>", opened_by_template=False),
    "deepseek_r1": ReasoningFormat("deepseek_r1", "<think>", "</think>", opened_by_template=True),
}


@dataclass(frozen=True)
class Split:
    reasoning: str
    content: str
    ended: bool  # the thinking is over (the answer's content has begun, or there is none)


def prompt_start(fmt: ReasoningFormat, prompt_tail: str) -> Start:
    """Where the answer starts, from the last few tokens of the prompt (as text)."""
    opened, closed = prompt_tail.rfind(fmt.start), prompt_tail.rfind(fmt.end)
    if closed > opened:
        return Start.CONTENT
    if opened >= 0:
        return Start.REASONING
    return Start.DEFAULT


def split(fmt: ReasoningFormat, text: str, start: Start, final: bool) -> Split:
    """``text`` (the answer so far) as reasoning and content. Live (``final`` False), only
    what cannot change as the text grows: a possible tag, or newlines a tag would trim, are
    held back."""
    if start is Start.CONTENT:
        return Split("", text, True)
    begin = 0
    if start is Start.DEFAULT and not fmt.opened_by_template:
        opening = text.find(fmt.start)
        if opening < 0:
            if final:
                return Split("", text, True)
            sure = text[: _safe_len(text, (fmt.start,))]
            if not sure.strip():  # only whitespace so far: the tag may still follow it
                return Split("", "", False)
            return Split("", sure, False)
        if text[:opening].strip():  # text before the tag: an answer that quotes it
            return Split("", text, True)
        begin = opening + len(fmt.start)
    elif text.startswith(fmt.start):  # a template that opened it, and a model that did too
        begin = len(fmt.start)
    elif not final and fmt.start.startswith(text):
        return Split("", "", False)  # that opening tag may be on its way
    return _from(fmt, text, begin, final)


def _from(fmt: ReasoningFormat, text: str, begin: int, final: bool) -> Split:
    """The split of a text whose thinking starts at ``begin``."""
    closing = text.find(fmt.end, begin)
    if closing < 0:
        thought = text[begin:]
        if not final:
            thought = thought[: _safe_len(thought, (fmt.end,))].rstrip("\n")
        return Split(thought.strip("\n") if final else thought.lstrip("\n"), "", final)
    reasoning = text[begin:closing].strip("\n")
    content = text[closing + len(fmt.end) :].lstrip("\n")
    if not final and not content:
        return Split(reasoning, "", False)  # the newlines after the tag may still come
    return Split(reasoning, content, True)


def _safe_len(text: str, tags: tuple[str, ...]) -> int:
    """How much of ``text`` cannot be the start of any of ``tags`` as more text arrives."""
    keep = len(text)
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:k]):
                keep = min(keep, len(text) - k)
                break
    return keep


class ReasoningStream:
    """What one streamed choice has sent of its reasoning and content."""

    def __init__(self, fmt: ReasoningFormat, start: Start) -> None:
        self.fmt, self.start = fmt, start
        self.sent_reasoning = 0
        self.sent_content = 0
        self.content = ""  # the answer's content so far (what tools parse)

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        """The new reasoning and the new content since the last call."""
        parts = split(self.fmt, text, self.start, final)
        reasoning = parts.reasoning[self.sent_reasoning :]
        content = parts.content[self.sent_content :]
        self.sent_reasoning += len(reasoning)
        self.sent_content += len(content)
        self.content = parts.content
        return reasoning, content


@dataclass(frozen=True)
class Thinking:
    """A request's reasoning: the model's format, where its answer starts (read from the
    prompt), and whether the reasoning is returned (OpenAI chat's ``include_reasoning``)."""

    format: ReasoningFormat
    start: Start
    include: bool = True

    def split(self, text: str) -> Split:
        """A finished answer's reasoning and content."""
        return split(self.format, text, self.start, final=True)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.format, self.start)

    def constrain_answer(self, params: SamplingParams) -> SamplingParams:
        """A constrained answer of a reasoning model: the grammar holds after the thinking
        (none when the prompt closed the thinking: then it holds from the first token)."""
        so = params.structured_outputs
        if so is None or self.start is Start.CONTENT:
            return params
        tags = (self.format.start, self.format.end)
        return params.clone(structured_outputs=replace(so, reasoning_tags=tags))


def get_format(name: Optional[str]) -> Optional[ReasoningFormat]:
    if name is None:
        return None
    if name not in FORMATS:
        raise ValueError(f"unknown reasoning parser {name!r}; one of {sorted(FORMATS)}")
    return FORMATS[name]

"""An Anthropic conversation as the model's chat template takes it (OpenAI's message shape,
which every template reads):

- ``system`` (a string or text blocks) is a first ``system`` message, and a ``system``
  message among the messages stays one;
- a message's text blocks are joined, one line each, into its ``content``;
- an assistant's ``tool_use`` block is an entry of its ``tool_calls`` (the input as an
  object, as templates take arguments), its ``thinking`` blocks its ``reasoning_content``
  (which templates that show earlier reasoning read); ``redacted_thinking`` holds no text
  and is dropped;
- a user's ``tool_result`` block is a ``role: "tool"`` message with the ``tool_call_id``
  it answers (its text prefixed ``Error:`` when ``is_error``), in the order the blocks come;
- ``image`` and ``document`` blocks are refused by name (the served models read text only).

Invariant: a conversation the OpenAI route would send in the same words renders to the same
template input (so to the same tokens, and the prefix cache serves both), and every block
either reaches the template, is dropped as documented, or is refused naming where it was.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pagoda.entrypoints.anthropic.protocol import (
    Conversation,
    DocumentBlock,
    ImageBlock,
    Message,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from pagoda.entrypoints.errors import ApiError

TEXT_JOIN = "\n"  # between the text blocks of one message


def template_messages(conv: Conversation) -> list[dict[str, Any]]:
    """The conversation's messages as the chat template takes them."""
    out: list[dict[str, Any]] = []
    system = _system_text(conv.system)
    if system is not None:
        out.append({"role": "system", "content": system})
    called: set[str] = set()
    for i, m in enumerate(conv.messages):
        out += _message(m, f"messages[{i}]", called)
    return out


def _system_text(system: Union[str, list[TextBlock], None]) -> Optional[str]:
    if system is None or isinstance(system, str):
        return system
    return TEXT_JOIN.join(b.text for b in system) if system else None


def _message(m: Message, where: str, called: set[str]) -> list[dict[str, Any]]:
    """One Anthropic message as one or more template messages (tool results apart)."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    if m.role == "assistant":
        return [_assistant(m, where, called)]
    if m.role == "system":
        return [_system(m, where)]
    return _user(m, where, called)


def _system(m: Message, where: str) -> dict[str, Any]:
    """A system message among the messages: text blocks only."""
    for j, b in enumerate(m.content):
        if not isinstance(b, TextBlock):
            _refuse(b, f"{where}.content[{j}]", "a system message")
    texts = [b.text for b in m.content if isinstance(b, TextBlock)]
    return {"role": "system", "content": TEXT_JOIN.join(texts)}


def _assistant(m: Message, where: str, called: set[str]) -> dict[str, Any]:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(m.content):
        at = f"{where}.content[{j}]"
        if isinstance(b, TextBlock):
            texts.append(b.text)
        elif isinstance(b, ThinkingBlock):
            thoughts.append(b.thinking)
        elif isinstance(b, ToolUseBlock):
            called.add(b.id)
            fn = {"name": b.name, "arguments": b.input}
            calls.append({"id": b.id, "type": "function", "function": fn})
        elif not isinstance(b, RedactedThinkingBlock):
            _refuse(b, at, "an assistant message")
    msg: dict[str, Any] = {"role": "assistant", "content": TEXT_JOIN.join(texts)}
    if thoughts:
        msg["reasoning_content"] = TEXT_JOIN.join(thoughts)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user(m: Message, where: str, called: set[str]) -> list[dict[str, Any]]:
    """Text blocks in a row make one user message; each tool result its own tool message."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, b in enumerate(m.content):
        at = f"{where}.content[{j}]"
        if isinstance(b, TextBlock):
            texts.append(b.text)
            continue
        if not isinstance(b, ToolResultBlock):
            _refuse(b, at, "a user message")
            continue
        if texts:
            out.append({"role": "user", "content": TEXT_JOIN.join(texts)})
            texts = []
        out.append(_tool_result(b, at, called))
    if texts or not out:
        out.append({"role": "user", "content": TEXT_JOIN.join(texts)})
    return out


def _tool_result(b: ToolResultBlock, at: str, called: set[str]) -> dict[str, Any]:
    if b.tool_use_id not in called:
        raise ApiError(
            400,
            f"{at}.tool_use_id: {b.tool_use_id!r} answers no tool_use block of an earlier "
            "assistant message",
            f"{at}.tool_use_id",
        )
    text = b.content if isinstance(b.content, str) else ""
    if isinstance(b.content, list):
        for k, part in enumerate(b.content):
            if not isinstance(part, TextBlock):
                _refuse(part, f"{at}.content[{k}]", "a tool result")
        text = TEXT_JOIN.join(p.text for p in b.content if isinstance(p, TextBlock))
    if b.is_error:
        text = f"Error: {text}"
    return {"role": "tool", "content": text, "tool_call_id": b.tool_use_id}


def _refuse(block: Any, at: str, where: str) -> None:
    kind = getattr(block, "type", type(block).__name__)
    if isinstance(block, (ImageBlock, DocumentBlock)):
        message = f"{at}: {kind} blocks are not supported: the served model reads text only"
    else:
        message = f"{at}: a {kind} block cannot be in {where}"
    raise ApiError(400, message, f"{at}.type")

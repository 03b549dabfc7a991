"""The Responses API's ``input`` -> the chat messages the model's template renders.

``input`` is a string (one user message) or a list of items, read in order after the
conversation a ``previous_response_id`` names:

- a message (``type: "message"``, or just ``role`` and ``content``): ``user``, ``system``,
  ``developer`` or ``assistant``, its content a string or text parts (``input_text``,
  ``output_text``);
- a ``function_call`` (a call the assistant made): joins the assistant turn before it, as
  chat templates take calls (one assistant message with its ``tool_calls``);
- a ``function_call_output``: a ``tool`` message answering a call of the conversation;
- a ``reasoning`` item: the thinking of the assistant turn that follows it, given to the
  template as ``reasoning_content`` (its ``encrypted_content`` when this server made it,
  else its content or its summary).

Invariant: every ``function_call_output`` answers a ``function_call`` the conversation
holds (else a 400 naming its ``call_id``), and every refusal names the item and field as the
client wrote them (``input[2].content[0].type``).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Optional

from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.openai.responses_protocol import Content, ContentPart, InputItem

Message = dict[str, Any]  # a chat message as templates take it
ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
THOUGHT_PARTS = ("reasoning_text", "summary_text", "text")
SEALED = "pagoda-thinking:"  # how this server's "encrypted" reasoning starts (not encrypted)


def read_input(given: str | list[InputItem], history: list[Message]) -> list[Message]:
    """The conversation: ``history`` (a previous response's) then ``given``'s items."""
    if isinstance(given, str):
        return [*history, {"role": "user", "content": given}]
    if not given and not history:
        raise ApiError(400, "input needs at least one item", "input")
    reader = _Reader(history)
    for i, item in enumerate(given):
        reader.item(f"input[{i}]", item)
    return reader.messages


def seal_thinking(text: str) -> str:
    """A reasoning item's ``encrypted_content``: the thinking, to be sent back as it is.
    It is encoded, not encrypted: this server keeps no secret for it."""
    return SEALED + base64.b64encode(text.encode()).decode()


def unseal_thinking(sealed: str) -> Optional[str]:
    """The thinking of an ``encrypted_content`` this server made (None: another's)."""
    if not sealed.startswith(SEALED):
        return None
    try:
        return base64.b64decode(sealed[len(SEALED) :], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def assistant_turn(content: str, reasoning: str, calls: list[tuple[str, str, str]]) -> Message:
    """The answer's own turn, as the next request's history holds it (``calls``: call id,
    name, arguments)."""
    turn: Message = {"role": "assistant", "content": content}
    if reasoning:
        turn["reasoning_content"] = reasoning
    if calls:
        turn["tool_calls"] = [_tool_call(i, n, a) for i, n, a in calls]
    return turn


class _Reader:
    """The messages so far, the calls they hold (call id -> name), and a reasoning item's
    thinking waiting for the assistant turn it belongs to."""

    def __init__(self, history: list[Message]) -> None:
        self.messages: list[Message] = [dict(m) for m in history]
        self.calls: dict[str, str] = {
            c["id"]: c["function"]["name"] for m in history for c in m.get("tool_calls") or []
        }
        self.thinking: Optional[str] = None

    def item(self, where: str, item: InputItem) -> None:
        kind = item.type or ("message" if item.role is not None else None)
        if kind == "message":
            self._message(where, item)
        elif kind == "function_call":
            self._call(where, item)
        elif kind == "function_call_output":
            self._output(where, item)
        elif kind == "reasoning":
            self.thinking = _thinking(where, item)
        elif kind is None:
            raise ApiError(400, "an input item needs a type (or a role)", f"{where}.type")
        else:
            raise ApiError(
                400,
                f"input items of type {kind!r} are not supported by this server (messages, "
                "function_call, function_call_output and reasoning items are)",
                f"{where}.type",
            )

    def _message(self, where: str, item: InputItem) -> None:
        if item.role not in ROLES:
            raise ApiError(
                400,
                f"a message's role is one of {', '.join(ROLES)}, got {item.role!r}",
                f"{where}.role",
            )
        if item.content is None:
            raise ApiError(400, "a message needs content", f"{where}.content")
        message: Message = {"role": item.role, "content": _text(item.content, f"{where}.content")}
        if item.role == "assistant":
            self._assistant(message)
        else:
            self.thinking = None  # a reasoning item belongs to the assistant turn after it
            self.messages.append(message)

    def _call(self, where: str, item: InputItem) -> None:
        for name in ("call_id", "name", "arguments"):
            if getattr(item, name) is None:
                raise ApiError(400, f"a function_call item needs {name}", f"{where}.{name}")
        assert item.call_id is not None and item.name is not None and item.arguments is not None
        call = _tool_call(item.call_id, item.name, item.arguments)
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant" and self.thinking is None:
            last["tool_calls"] = [*last.get("tool_calls", []), call]  # its text came first
        else:
            self._assistant({"role": "assistant", "content": "", "tool_calls": [call]})
        self.calls[item.call_id] = item.name

    def _output(self, where: str, item: InputItem) -> None:
        if item.call_id is None:
            raise ApiError(400, "a function_call_output item needs call_id", f"{where}.call_id")
        if item.call_id not in self.calls:
            raise ApiError(
                400,
                f"call_id {item.call_id!r} matches no function_call in the conversation",
                f"{where}.call_id",
            )
        if item.output is None:
            raise ApiError(400, "a function_call_output item needs output", f"{where}.output")
        self.thinking = None
        self.messages.append(
            {
                "role": "tool",
                "tool_call_id": item.call_id,
                "name": self.calls[item.call_id],
                "content": _text(item.output, f"{where}.output"),
            }
        )

    def _assistant(self, message: Message) -> None:
        if self.thinking:
            message["reasoning_content"] = self.thinking
        self.thinking = None
        self.messages.append(message)


def _text(content: Content, where: str, kinds: tuple[str, ...] = TEXT_PARTS) -> str:
    if isinstance(content, str):
        return content
    return "".join(_part_text(part, f"{where}[{j}]", kinds) for j, part in enumerate(content))


def _part_text(part: ContentPart, where: str, kinds: tuple[str, ...]) -> str:
    if part.type not in kinds:
        raise ApiError(
            400,
            f"content parts of type {part.type!r} are not supported by this server (it reads "
            f"{', '.join(kinds)})",
            f"{where}.type",
        )
    if part.text is None:
        raise ApiError(400, f"a {part.type} part needs text", f"{where}.text")
    return part.text


def _thinking(where: str, item: InputItem) -> Optional[str]:
    """A reasoning item's thinking: this server's sealed copy, else its text."""
    if item.encrypted_content is not None:
        unsealed = unseal_thinking(item.encrypted_content)
        if unsealed is not None:
            return unsealed
    content = item.content if isinstance(item.content, list) else None
    for parts, name in ((content, "content"), (item.summary, "summary")):
        if parts:
            return "\n".join(
                _part_text(p, f"{where}.{name}[{j}]", THOUGHT_PARTS) for j, p in enumerate(parts)
            )
    return None


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A call as chat templates take it (its arguments as an object when they are JSON)."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}

"""Pydantic models of Anthropic's Messages API: what a request may hold, strictly typed.

Under the field policy (``field_policy.py``): a field no model declares is accepted and
reported; the fields that cannot change the answer (``metadata``, ``service_tier``,
``cache_control``, ``inference_geo``, ``speed``, ``diagnostics``, the ids of a user or a
workspace, ``output_config.effort``, a thinking block's ``signature``, a text block's
``citations``) are declared and ignored; the ones that would and that pagoda does not serve
(``mcp_servers``, ``container``) are refused with a 400 naming them unless their value asks
for nothing. ``output_config.format`` (and the older ``output_format``) is served: the
answer is constrained to its JSON schema. Content blocks are told apart by their
``type``; an ``image`` or ``document`` block is declared so that it can be refused by name
(the served models read text only), and a server tool (``web_search_…``, ``bash_…``) is
refused by name when the tools are planned (``tool_choice.py``).

Invariant: every request field is used, declared as ignored, refused by name, or reported.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pagoda.entrypoints.field_policy import Tolerant


def _empty(value: Any) -> bool:
    return value in (None, [], {})


# field -> the values that ask for nothing (accepted, and they change nothing)
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "mcp_servers": _empty,  # remote MCP servers the API would call itself
    "container": _empty,  # the code-execution tool's container
}


class TextBlock(Tolerant):
    type: Literal["text"]
    text: str
    cache_control: Any = None  # prompt caching is automatic here (the prefix cache)
    citations: Any = None  # what an earlier answer cited: not part of the conversation


class ImageBlock(Tolerant):
    """Declared to be refused by name: the served models read text only."""

    type: Literal["image"]
    source: Any = None
    cache_control: Any = None


class DocumentBlock(Tolerant):
    """Declared to be refused by name: the served models read text only."""

    type: Literal["document"]
    source: Any = None
    title: Any = None
    context: Any = None
    citations: Any = None
    cache_control: Any = None


class ToolUseBlock(Tolerant):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: Any = None


ToolResultPart = Annotated[Union[TextBlock, ImageBlock, DocumentBlock], Field(discriminator="type")]


class ToolResultBlock(Tolerant):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[ToolResultPart], None] = None
    is_error: Optional[bool] = None
    cache_control: Any = None


class ThinkingBlock(Tolerant):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None  # pagoda's signatures sign nothing: not checked


class RedactedThinkingBlock(Tolerant):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    Union[
        TextBlock,
        ImageBlock,
        DocumentBlock,
        ToolUseBlock,
        ToolResultBlock,
        ThinkingBlock,
        RedactedThinkingBlock,
    ],
    Field(discriminator="type"),
]


class Message(Tolerant):
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[ContentBlock]]


class Tool(Tolerant):
    """A client tool (``type`` absent or ``custom``), or a server tool (``web_search_…``,
    ``bash_…``), which is refused by name when the tools are planned."""

    name: str = Field(min_length=1, max_length=128)
    type: Optional[str] = None
    description: Optional[str] = None
    input_schema: Optional[dict[str, Any]] = None
    cache_control: Any = None


class ToolChoice(Tolerant):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None


class ThinkingConfig(Tolerant):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Optional[int] = None
    display: Optional[Literal["summarized", "omitted"]] = None  # omitted: signature only


class JsonOutputFormat(Tolerant):
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Tolerant):
    format: Optional[JsonOutputFormat] = None
    effort: Any = None  # how hard a Claude model tries: the served model has no such knob


class Conversation(Tolerant):
    """What both endpoints render: the model, the system prompt, the messages, the tools."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: Union[str, list[TextBlock], None] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[ThinkingConfig] = None


class MessagesRequest(Conversation):
    max_tokens: int  # required, as Anthropic requires it
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stream: Optional[bool] = False
    output_config: Optional[OutputConfig] = None
    output_format: Optional[JsonOutputFormat] = None  # the beta's name of output_config.format
    # Accepted and ignored: they cannot change the answer.
    metadata: Any = None
    service_tier: Any = None
    cache_control: Any = None  # prompt caching is automatic here (the prefix cache)
    inference_geo: Any = None
    speed: Any = None
    diagnostics: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None
    # Not served, refused unless they ask for nothing (UNSUPPORTED).
    mcp_servers: Any = None
    container: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: Any) -> Any:
        if not UNSUPPORTED[info.field_name](value):
            raise ValueError(f"{info.field_name} is not supported by this server (docs/server.md)")
        return value


class CountTokensRequest(Conversation):
    """``/v1/messages/count_tokens``: the conversation alone."""


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail

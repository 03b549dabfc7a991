"""Pydantic models of OpenAI's Responses API (``POST /v1/responses``): what a request may
hold, strictly typed, under the field policy (``field_policy.py``).

Input items are read with one flat model per kind of thing (an item, a content part, a tool)
whose ``type`` is checked by the dialect module (``responses.py``), so that a refusal names
the item as the client wrote it (``input[2].type``) instead of pydantic's union members.

Invariant: every field of the API is here, as used, accepted and ignored (it cannot change
the answer: ``user``, ``service_tier``, ...) or refused unless its value asks for nothing
(:data:`REFUSED`: ``background``, ``conversation``, ``prompt``, ``truncation: "auto"``, ...);
a field no model declares is accepted and reported by the field policy.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from pydantic import ConfigDict, Field, field_validator

from pagoda.entrypoints.field_policy import Tolerant

MAX_TOOLS = 128
MAX_METADATA_KEYS = 16  # OpenAI's bounds on metadata (it is stored with the response)
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def _empty(value: Any) -> bool:
    return value in (None, False, [], {})


# include values this server fills: the thinking, given back to be sent again (not encrypted).
INCLUDABLE = ("reasoning.encrypted_content",)

# field -> the values that ask for nothing (accepted, and change nothing).
REFUSED: dict[str, Callable[[Any], bool]] = {
    "background": _empty,  # answers are computed while the request waits; no cancel route
    "conversation": lambda v: v is None,  # no Conversations API: previous_response_id chains
    "prompt": lambda v: v is None,  # no stored prompt templates
    "truncation": lambda v: v in (None, "disabled"),
    "top_logprobs": lambda v: v in (None, 0),
    "max_tool_calls": lambda v: v is None,
}


class ContentPart(Tolerant):
    """A part of a message's content: ``input_text`` / ``output_text`` (and a reasoning
    item's ``reasoning_text`` / ``summary_text``); other types are refused by name."""

    type: str
    text: Optional[str] = None
    annotations: Optional[list[Any]] = None  # an output_text sent back: nothing to render
    logprobs: Optional[list[Any]] = None


Content = Union[str, list[ContentPart]]


class InputItem(Tolerant):
    """One item of ``input``: a message (``type`` "message" or none, with ``role``), a
    ``function_call``, a ``function_call_output`` or a ``reasoning`` item; what each needs
    is checked by ``responses.py``."""

    type: Optional[str] = None
    role: Optional[str] = None
    content: Optional[Content] = None
    # function_call
    call_id: Optional[str] = None
    name: Optional[str] = None
    arguments: Optional[str] = None
    # function_call_output
    output: Optional[Content] = None
    # reasoning
    summary: Optional[list[ContentPart]] = None
    encrypted_content: Optional[str] = None
    # what an output item sent back carries beside its meaning
    id: Optional[str] = None
    status: Optional[str] = None
    phase: Any = None


class FunctionTool(Tolerant):
    """A tool in Responses' flat form: ``{"type": "function", "name", "parameters"}``;
    another type (a built-in tool) is refused by name."""

    type: str
    name: Optional[str] = Field(default=None, min_length=1, max_length=64, pattern=r"^[\w.-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema
    strict: Optional[bool] = None


class ToolChoiceObject(Tolerant):
    """``{"type": "function", "name": ...}``; another type (a built-in tool's) is refused."""

    type: str
    name: Optional[str] = None


class TextFormat(Tolerant):
    """``text.format``: plain text, any JSON object, or JSON matching ``schema``."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = Field(default=None, min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(Tolerant):
    format: Optional[TextFormat] = None
    verbosity: Optional[str] = None  # only the default ("medium") is served

    @field_validator("verbosity")
    @classmethod
    def _default_verbosity(cls, value: Optional[str]) -> Optional[str]:
        if value not in (None, "medium"):
            raise ValueError("text.verbosity other than medium is not supported by this server")
        return value


class ReasoningConfig(Tolerant):
    effort: Optional[str] = None  # given to the chat template as reasoning_effort
    summary: Optional[str] = None  # any value: the whole thinking is the summary
    generate_summary: Optional[str] = None  # the older name of summary


class StreamOptions(Tolerant):
    include_obfuscation: Optional[bool] = None  # no obfuscation padding is sent


class ResponsesRequest(Tolerant):
    model: str
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    tools: Optional[list[FunctionTool]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceObject, None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    metadata: Optional[dict[str, str]] = None  # echoed back, stored with the response
    include: Optional[list[str]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    store: Optional[bool] = True
    previous_response_id: Optional[str] = Field(default=None, min_length=1, max_length=256)
    # Accepted and ignored: they cannot change the answer (echoed where the object has them).
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    service_tier: Optional[str] = None
    # Refused unless they ask for nothing (REFUSED).
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    truncation: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None

    @field_validator(*REFUSED)
    @classmethod
    def _refuse(cls, value: Any, info: Any) -> Any:
        if not REFUSED[info.field_name](value):
            raise ValueError(
                f"{info.field_name} is not supported by this server; its answer would not "
                "honour it (docs/server.md)"
            )
        return value

    @field_validator("include")
    @classmethod
    def _includable(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        for name in value or []:
            if name not in INCLUDABLE:
                raise ValueError(
                    f"include {name!r} is not supported by this server (it fills "
                    f"{', '.join(INCLUDABLE)})"
                )
        return value

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        if value is None:
            return value
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_KEYS} keys")
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS or len(text) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(
                    f"metadata keys are at most {MAX_METADATA_KEY_CHARS} characters, values "
                    f"at most {MAX_METADATA_VALUE_CHARS}"
                )
        return value

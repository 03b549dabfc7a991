"""Pydantic models of the OpenAI-compatible API: what a request may hold, strictly typed.

Strict mode: a string is not a number and a bool is not an int, as in OpenAI's API. Value
ranges are checked by :class:`pagoda.sampling.SamplingParams`, whose errors name the field.

No field is silently dropped: a field a model does not declare is refused with a 400 naming
it (``extra="forbid"``), since it might change what the answer must be. The fields OpenAI's
clients send that cannot change the answer (``metadata``, ``store``, ...) are declared and
ignored. The ones that would and that pagoda does not support yet (tools, a logit bias,
vLLM's older guided-decoding fields and beam search) are declared in :data:`UNSUPPORTED` and
refused unless their value asks for nothing (an empty ``tools`` list, ``tool_choice``
"none", ...). ``response_format`` and vLLM's ``structured_outputs`` are served
(``structured.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPTS_PER_REQUEST = 64


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def _empty(value: Any) -> bool:
    return value in (None, False, [], {})


# field -> the values that ask for nothing (those are accepted, and change nothing).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": _empty,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "functions": _empty,
    "function_call": lambda v: v in (None, "none", "auto"),
    "guided_json": _empty,
    "guided_regex": _empty,
    "guided_choice": _empty,
    "guided_grammar": _empty,
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": _empty,
    "allowed_token_ids": lambda v: v is None,
    "bad_words": _empty,
    "prompt_logprobs": lambda v: v is None,
}


class StreamOptions(_Strict):
    include_usage: Optional[bool] = False


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: OpenAI's structured outputs."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputsField(_Strict):
    """vLLM's ``structured_outputs``: exactly one of these (checked by the engine's
    :class:`pagoda.sampling.StructuredOutputsParams`)."""

    json_: Union[dict[str, Any], str, None] = Field(default=None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class SamplingFields(_Strict):
    """Fields both endpoints share, OpenAI's and the usual extensions (vLLM's names)."""

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    # extensions
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: Optional[str] = Field(default=None, min_length=1, max_length=256)
    # disaggregated prefill (pagoda router): validated by the engine
    kv_transfer_params: Optional[dict[str, Any]] = None
    # Accepted and ignored: they cannot change the answer.
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None  # only means something with tools, refused below
    # Constrained decoding (entrypoints/openai/structured.py, engine/structured.py).
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string) -> bias
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsField] = None
    # Not supported yet, refused unless empty (see UNSUPPORTED and the module docstring).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    best_of: Any = None
    use_beam_search: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    prompt_logprobs: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: Any) -> Any:
        if not UNSUPPORTED[info.field_name](value):
            raise ValueError(
                f"{info.field_name} is not supported by this server yet; its "
                "answer would not honour it (docs/server.md)"
            )
        return value


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    suffix: Optional[str] = None


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(_Strict):
    role: Role
    content: Union[str, list[TextContentPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None


class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

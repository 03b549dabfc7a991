"""Pydantic models of the OpenAI-compatible API: what a request may hold, strictly typed.

Strict mode: a string is not a number and a bool is not an int, as in OpenAI's API. Value
ranges are checked by :class:`pagoda.sampling.SamplingParams`, whose errors name the field.

No field is silently dropped (``entrypoints/field_policy.py``, the table in docs/server.md):
a field no model declares is accepted and reported (``x-pagoda-ignored-fields``; refused
under ``--strict-fields``). The fields clients send that cannot change the answer
(``metadata``, ``store``, the keys an SDK leaves on an assistant message it sends back) are
declared and ignored. The ones that would and that pagoda does not support yet (OpenAI's old
``functions``, beam search, ...) are declared in :data:`UNSUPPORTED` and refused unless their
value asks for nothing. ``response_format``, vLLM's ``structured_outputs``
(``structured.py``), ``logit_bias`` and, on chat, ``tools`` (``tools.py``) are served.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pagoda.entrypoints.field_policy import Tolerant

MAX_PROMPTS_PER_REQUEST = 64


class _Strict(Tolerant):
    """Strict types; undeclared fields reported, not refused (field_policy.py)."""


def _empty(value: Any) -> bool:
    return value in (None, False, [], {})


# field -> the values that ask for nothing (those are accepted, and change nothing).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": _empty,
    "function_call": lambda v: v in (None, "none", "auto"),
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": _empty,
    # SGLang's, which vllm-router sends on every request it forwards (false: changes nothing)
    "no_stop_trim": _empty,
    "return_hidden_states": _empty,
    # OpenAI's, for what this server has no model or tool for
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "web_search_options": lambda v: v is None,
    "verbosity": lambda v: v is None,
    # vLLM's, not implemented yet: the prompt, its template or the tokens would differ
    "chat_template": lambda v: v is None,
    "add_special_tokens": lambda v: v is None,
    "documents": _empty,
    "mm_processor_kwargs": _empty,
    "length_penalty": lambda v: v in (None, 1, 1.0),
    "spaces_between_special_tokens": lambda v: v in (None, True),
    "logits_processors": _empty,
    "prompt_embeds": lambda v: v is None,
    "return_tokens_as_token_ids": _empty,
    "guided_whitespace_pattern": lambda v: v is None,
    "vllm_xargs": _empty,
}


class StreamOptions(_Strict):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False  # vLLM's: usage on every chunk so far


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: OpenAI's structured outputs."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
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
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    # vLLM's other keys: what would change the grammar is refused unless it asks for nothing
    disable_fallback: Optional[bool] = None  # one backend here: nothing to fall back from
    disable_any_whitespace: Optional[bool] = None
    disable_additional_properties: Optional[bool] = None
    whitespace_pattern: Optional[str] = None
    structural_tag: Optional[str] = None

    @field_validator(
        "disable_any_whitespace",
        "disable_additional_properties",
        "whitespace_pattern",
        "structural_tag",
    )
    @classmethod
    def _refuse_grammar_options(cls, value: Any, info: Any) -> Any:
        if not _empty(value):
            raise ValueError(f"{info.field_name} is not supported by this server yet")
        return value


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
    prompt_cache_key: Any = None  # OpenAI's cache routing hint (the prefix cache needs none)
    safety_identifier: Any = None
    prediction: Any = None  # OpenAI's predicted output: a latency hint, never the answer
    request_id: Any = None  # vLLM's: pagoda names its requests itself
    # vLLM's: the prompt tokens' logprobs (this many top tokens each), not streamed
    prompt_logprobs: Optional[int] = None
    # vLLM's: keep only the last k prompt tokens (-1: as many as the context allows)
    truncate_prompt_tokens: Optional[int] = None
    # vLLM's: the prompt's and each choice's token ids beside the text
    return_token_ids: Optional[bool] = None
    # vLLM's: lower is served first (a server started with --scheduling-policy priority)
    priority: Optional[int] = None
    # vLLM's: only these tokens may be sampled; these words are never generated
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    # vLLM's older spellings of structured_outputs (structured.py maps them)
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None  # pagoda has one backend (llguidance)
    # Constrained decoding (entrypoints/openai/structured.py, engine/structured.py).
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string) -> bias
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsField] = None
    # Not supported yet, refused unless empty (see UNSUPPORTED and the module docstring).
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    use_beam_search: Any = None
    no_stop_trim: Any = None
    return_hidden_states: Any = None
    audio: Any = None
    modalities: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    chat_template: Any = None
    add_special_tokens: Any = None
    documents: Any = None
    mm_processor_kwargs: Any = None
    length_penalty: Any = None
    spaces_between_special_tokens: Any = None
    logits_processors: Any = None
    prompt_embeds: Any = None
    return_tokens_as_token_ids: Any = None
    guided_whitespace_pattern: Any = None
    vllm_xargs: Any = None

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


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# Chat's tool fields, on /v1/completions: accepted only when they ask for nothing.
_COMPLETION_NO_TOOLS: dict[str, Callable[[Any], bool]] = {
    "tools": _empty,
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,  # means nothing without tools
}


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_completion_tokens: Optional[int] = None  # chat's name, which some clients send here
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    @field_validator(*_COMPLETION_NO_TOOLS)
    @classmethod
    def _refuse_tools(cls, value: Any, info: Any) -> Any:
        if not _COMPLETION_NO_TOOLS[info.field_name](value):
            raise ValueError(f"{info.field_name} is for /v1/chat/completions")
        return value


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON text, as the API returned it
    parsed_arguments: Any = None  # the openai SDK's parse() leaves it: the same arguments


class ToolCallMessage(_Strict):
    id: str
    type: Literal["function"]
    function: ToolCallFunction
    index: Optional[int] = None  # a streamed call's position, kept by clients that merge deltas


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(_Strict):
    role: Role
    content: Union[str, list[TextContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallMessage]] = None  # assistant: the calls it made
    tool_call_id: Optional[str] = None  # tool: which call this answers
    # An earlier turn's reasoning, as reasoning parsers return it (vLLM's two names): given
    # to the chat template as ``reasoning_content``, which templates that show it read.
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    # What the openai SDK leaves on an assistant message it sends back (``model_dump()``,
    # ``parse()``): none of it is part of the conversation a template renders.
    refusal: Optional[str] = None
    annotations: Optional[list[Any]] = None
    audio: Any = None
    parsed: Any = None
    function_call: Any = None  # OpenAI's legacy function calling: only null is accepted

    @field_validator("function_call")
    @classmethod
    def _refuse_legacy_call(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("a legacy function_call message is not supported: use tool_calls")
        return value

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates take it (a call's arguments as an object)."""
        msg: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            msg["name"] = self.name
        reasoning = self.reasoning_content or self.reasoning
        if reasoning:
            msg["reasoning_content"] = reasoning
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _json_or_text(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        return msg

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[Tool]] = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    # The chat template (vLLM's): its variables (``enable_thinking``...), whether it adds
    # the assistant's turn, or continues the last (assistant) message instead
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    reasoning_effort: Optional[str] = None  # given to the template, as vLLM does
    # Under --reasoning-parser: whether the reasoning is returned (vLLM's
    # include_reasoning), and SGLang's switches (vllm-router sends them on every chat
    # request): separate_reasoning false keeps the whole answer as content.
    include_reasoning: Optional[bool] = None
    separate_reasoning: Optional[bool] = None
    stream_reasoning: Optional[bool] = None
    # vLLM's: the last message prepended to the answer (refused when true; completions
    # serve their own echo)
    echo: Any = None

    @field_validator("echo")
    @classmethod
    def _refuse_continue(cls, value: Any, info: Any) -> Any:
        if not _empty(value):
            raise ValueError(f"{info.field_name} is not supported by this server yet")
        return value


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

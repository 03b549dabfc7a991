"""Pydantic models of Ollama's requests (``/api/chat``, ``/api/generate``, ``/api/show``),
strictly typed under the field policy (``field_policy.py``).

Each field is used, declared and ignored (reported: ``keep_alive``, the options that are
load-time settings in Ollama), or refused with a 400 naming it when pagoda cannot honour it
(``suffix``, ``context``, ``template``, ``images``, ``logprobs``): a refused field is
accepted only with a value that asks for nothing. A field no model declares is accepted
and reported. Invariant: no field that would change the answer is dropped unnamed.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from pydantic import Field, field_validator

from pagoda.entrypoints.field_policy import Tolerant

Think = Union[bool, Literal["low", "medium", "high"]]
Format = Union[Literal["", "json"], dict[str, Any]]


def _empty(value: Any) -> bool:
    return value in (None, False, "", [], {})


# field -> the values that ask for nothing; any other value is refused by name.
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (_empty, "fill-in-the-middle is not supported by this server"),
    "context": (_empty, "this server keeps no context tokens between requests; send the text"),
    "template": (_empty, "this server renders the model's own chat template only"),
    "images": (_empty, "the served model reads text only"),
    "logprobs": (_empty, "logprobs are not served on the Ollama API yet"),
    "top_logprobs": (_empty, "logprobs are not served on the Ollama API yet"),
}

# Ollama's options that set up the runner (or a sampler pagoda does not have): accepted,
# changing nothing, reported as ignored.
IGNORED_OPTIONS = (
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "numa",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_keep",
    "typical_p",
    "tfs_z",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "penalize_newline",
)


def _refuse(value: Any, name: str) -> Any:
    asks_nothing, why = REFUSED[name]
    if not asks_nothing(value):
        raise ValueError(f"{name} is not supported: {why}")
    return value


class Options(Tolerant):
    """``options``: the sampling ones used, the load-time ones ignored (reported)."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    num_predict: Optional[int] = None  # -1 or -2: until the context is full
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    repeat_penalty: Optional[float] = None
    repeat_last_n: Optional[int] = None  # -1: the whole context, as pagoda's sampler does
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    # IGNORED_OPTIONS
    num_ctx: Any = None
    num_batch: Any = None
    num_gpu: Any = None
    main_gpu: Any = None
    num_thread: Any = None
    numa: Any = None
    low_vram: Any = None
    f16_kv: Any = None
    logits_all: Any = None
    vocab_only: Any = None
    use_mmap: Any = None
    use_mlock: Any = None
    embedding_only: Any = None
    num_keep: Any = None
    typical_p: Any = None
    tfs_z: Any = None
    mirostat: Any = None
    mirostat_tau: Any = None
    mirostat_eta: Any = None
    penalize_newline: Any = None

    def ignored(self) -> list[str]:
        """The load-time options this request set (``options.num_ctx``, ...)."""
        return [f"options.{n}" for n in IGNORED_OPTIONS if getattr(self, n) is not None]


class ToolFunction(Tolerant):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema


class Tool(Tolerant):
    type: Literal["function"] = "function"
    function: ToolFunction


class CalledFunction(Tolerant):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)  # an object, not JSON text
    index: Optional[int] = None


class ToolCall(Tolerant):
    function: CalledFunction


class Message(Tolerant):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: Optional[str] = None  # an earlier turn's, given to the template
    images: Optional[list[str]] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_name: Optional[str] = None  # a tool message: the tool it answers

    @field_validator("images")
    @classmethod
    def _refuse_images(cls, value: Any) -> Any:
        return _refuse(value, "images")

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates take it."""
        msg: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:
            msg["reasoning_content"] = self.thinking
        if self.tool_name:
            msg["name"] = self.tool_name
        if self.tool_calls:
            msg["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in self.tool_calls
            ]
        return msg


class GenerationFields(Tolerant):
    """What ``/api/chat`` and ``/api/generate`` share."""

    model: str  # required, as Ollama requires it
    stream: bool = True
    format: Optional[Format] = None
    options: Optional[Options] = None
    think: Optional[Think] = None
    keep_alive: Union[str, float, None] = None  # the model is always loaded: ignored
    logprobs: Any = None
    top_logprobs: Any = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _refuse_fields(cls, value: Any, info: Any) -> Any:
        return _refuse(value, info.field_name)

    def ignored(self) -> list[str]:
        """The declared fields that change nothing, as this request set them."""
        found = ["keep_alive"] if self.keep_alive is not None else []
        return found + (self.options.ignored() if self.options is not None else [])


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(default_factory=list)
    tools: Optional[list[Tool]] = Field(default=None, max_length=128)


class GenerateRequest(GenerationFields):
    prompt: str = ""
    system: Optional[str] = None
    raw: bool = False
    suffix: Any = None
    context: Any = None
    template: Any = None
    images: Any = None

    @field_validator("suffix", "context", "template", "images")
    @classmethod
    def _refuse_prompt_fields(cls, value: Any, info: Any) -> Any:
        return _refuse(value, info.field_name)


class ShowRequest(Tolerant):
    model: Optional[str] = None
    name: Optional[str] = None  # Ollama's older spelling of model
    verbose: Optional[bool] = None  # Ollama's: the tokenizer's tables too (not given here)

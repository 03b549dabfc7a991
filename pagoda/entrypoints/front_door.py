"""The one path from every API dialect to the engine: admission, cancellation, usage, errors.

A dialect module (``openai/completions.py``, ``openai/chat.py``, ...) turns its HTTP request
into one :class:`ApiRequest`, made once at the edge: the prompts as token ids (and text,
if the client gave text), ``SamplingParams``, the LoRA adapter its ``model`` names (the
door's ``AdapterCatalog``), cache salt, priority, ``kv_transfer_params``, the arrival time,
the tool plan and the thinking, and how the engine's field names read in the request's own
terms. The :class:`FrontDoor` then

- **submits** it, one engine request per prompt (``{id}-{i}``): admission control answers
  429 (``QueueFullError``), the engine's ``ValueError`` becomes a 400 naming the request's
  field, a dead engine a 503, all as :class:`~pagoda.entrypoints.errors.ApiError`;
- **collects** the last output of each prompt, racing the client's ``http.disconnect``
  (None when the client left first), or **streams** the outputs of all its prompts merged
  as they come (``async with door.stream(sub) as outputs``);
- counts the **usage** (prompt, completion and prefix-cached tokens).

What the outputs mean (content, reasoning, tool calls) is ``answer.py``'s; how they look on
the wire is the dialect's. Invariant: every engine request a submission made is finished or
aborted when its HTTP exchange ends: a refused submission aborts those it already added, a
client that goes away aborts them at once, a stream aborts them when it is left, however it
is left.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping, Optional, Protocol

from fastapi import Request
from fastapi.responses import Response

from pagoda.engine.async_engine import (
    AsyncEngine,
    Engine,
    EngineDeadError,
    QueueFullError,
    RequestStream,
)
from pagoda.engine.outputs import RequestOutput
from pagoda.entrypoints import reasoning
from pagoda.entrypoints.adapters import AdapterCatalog, LoRAServing, forget_when_idle
from pagoda.entrypoints.errors import ApiError, engine_dead, engine_value_error, queue_full
from pagoda.entrypoints.reasoning import Thinking
from pagoda.entrypoints.tools import ToolPlan
from pagoda.lora_request import LoRARequest
from pagoda.pooling_params import PoolingParams
from pagoda.request import EngineRequest
from pagoda.sampling import SamplingParams

if TYPE_CHECKING:
    from pagoda.engine.served_model import RunnerKind
    from pagoda.models.config import ModelArch

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up first
Outputs = list[Optional[RequestOutput]]  # the last output of each prompt (None: aborted)


class ServedEngine(Engine, Protocol):
    """What the HTTP layer reads of the engine, on top of what the engine thread needs
    (``LLMEngine`` has all of it)."""

    tokenizer: Any  # a transformers tokenizer, or the token-id one
    arch: ModelArch
    max_model_len: int
    runner_kind: RunnerKind  # "generate" or "pooling" (--runner)
    pooling_tasks: frozenset[str]  # what a pooling model serves: embed, classify, score

    @property
    def class_labels(self) -> tuple[str, ...]: ...  # a classifier's class names, by index

    def encode(self, text: str) -> list[int]: ...

    def encode_pair(self, query: str, doc: str) -> tuple[list[int], list[int]]: ...

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: Optional[list[dict[str, Any]]] = None,
        **template_kwargs: Any,
    ) -> list[int]: ...


# ------------------------------------------------------------ the request
@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: Optional[str] = None  # the prompt as the client wrote it, when it was text
    token_type_ids: Optional[list[int]] = None  # a cross-encoder's (query, document) pair


@dataclass(frozen=True)
class FieldNames:
    """How the engine's names read in a request's own terms: ``renames`` (engine field ->
    request field, e.g. ``structured_outputs.json`` -> ``response_format.json_schema.schema``)
    and the field that holds the prompt (``prompt``, ``messages``, ``input``)."""

    renames: Mapping[str, str] = field(default_factory=dict)
    prompt: str = "prompt"

    def error(self, e: ValueError) -> ApiError:
        """The engine's 400, naming the request's field."""
        error = engine_value_error(e, self.renames)
        if error.param == "prompt":  # the field, not the message: it says what was wrong
            error.param = self.prompt
        return error


@dataclass(frozen=True)
class ApiRequest:
    """What one HTTP request asks of the engine, whatever its dialect."""

    prompts: list[Prompt]  # one engine request each, with params.n completions each
    params: SamplingParams | PoolingParams  # generate text, or pool one vector (embeddings)
    arrival: float  # time.monotonic() when the request came in (TTFT counts from it)
    cache_salt: Optional[str] = None  # the request's own, else its API key's
    priority: int = 0
    kv_transfer_params: Optional[dict[str, Any]] = None  # disaggregated prefill (router)
    tools: Optional[ToolPlan] = None
    thinking: Optional[Thinking] = None  # under --reasoning-parser
    names: FieldNames = field(default_factory=FieldNames)
    lora: Optional[LoRARequest] = None  # the adapter ``model`` named (None: the base)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def sampling(self) -> SamplingParams:
        """A generating request's params (every route but the pooling ones)."""
        assert isinstance(self.params, SamplingParams), "a pooling request samples nothing"
        return self.params

    def choice_index(self, prompt_index: int, completion_index: int) -> int:
        """Choice ``i * n + j`` is completion ``j`` of prompt ``i``."""
        return prompt_index * self.params.n + completion_index


@dataclass
class Submission:
    """An ApiRequest the engine took: its id and one stream per prompt."""

    id: str
    request: ApiRequest
    streams: list[RequestStream]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @staticmethod
    def of(request: ApiRequest, outputs: Outputs) -> Usage:
        """A finished request's usage: every completion's tokens, every prompt's hits."""
        done = [o for o in outputs if o is not None]
        completion = sum(len(c.token_ids) for o in done for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in done)
        return Usage(request.num_prompt_tokens, completion, cached)


# ------------------------------------------------------------ the door
class FrontDoor:
    """The served model and the engine behind every dialect's routes."""

    def __init__(
        self,
        async_engine: AsyncEngine[ServedEngine],
        model_names: list[str],
        tool_call_parser: Optional[str] = None,
        reasoning_parser: Optional[str] = None,
        adapters: Optional[AdapterCatalog] = None,
    ) -> None:
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.tokenizer = self.engine.tokenizer
        self.model_names = model_names
        self.tool_call_parser = tool_call_parser  # the text format of "auto" tool calls
        self.reasoning = reasoning.get_format(reasoning_parser)  # thinking tags, if any
        self.adapters = adapters or AdapterCatalog(LoRAServing(), model_names, None)
        self._forgetting: set[asyncio.Task[None]] = set()  # unloaded adapters' weights

    # ------------------------------------------------------- building requests
    def check_model(self, model: Optional[str]) -> Optional[LoRARequest]:
        """What a request's ``model`` selects: the base (None; also when it names none) or
        one of the LoRA adapters; 404 naming it when it is neither."""
        if model is None or model in self.model_names:
            return None
        lora = self.adapters.get(model)
        if lora is None:
            raise ApiError(404, self.adapters.unknown_model(model), "model", "model_not_found")
        return lora

    def top_k(self, top_k: Optional[int]) -> Optional[int]:
        """A top_k of the vocabulary's size or more keeps every token: it is top-k off (0).
        Said so here because the sampler cannot take a k past int64 (it kills the step)."""
        if top_k is not None and top_k >= self.engine.arch.vocab_size:
            return 0
        return top_k

    def thinking(self, prompt_ids: list[int], include: bool = True) -> Optional[Thinking]:
        """How an answer to this prompt splits into reasoning and content (None: the server
        has no reasoning parser); where it starts is read from the end of the prompt."""
        if self.reasoning is None:
            return None
        tail = self.tokenizer.decode(prompt_ids[-reasoning.PROMPT_TAIL_TOKENS :])
        start = reasoning.prompt_start(self.reasoning, tail)
        return Thinking(self.reasoning, start, include=include)

    def conversation_request(
        self,
        ids: list[int],
        params: SamplingParams,
        arrival: float,
        names: FieldNames,
        cache_salt: Optional[str] = None,
        tools: Optional[ToolPlan] = None,
        include_thinking: bool = True,
        lora: Optional[LoRARequest] = None,
    ) -> ApiRequest:
        """One rendered conversation's request: the tool plan's constraint on ``params``,
        then, under a reasoning parser, the answer's grammar moved after the thinking."""
        if tools is not None:
            params = tools.sampling(params)
        thinking = self.thinking(ids, include=include_thinking)
        if thinking is not None:
            params = thinking.constrain_answer(params)
        return ApiRequest(
            [Prompt(ids)],
            params,
            arrival,
            cache_salt=cache_salt,
            tools=tools,
            thinking=thinking,
            names=names,
            lora=lora,
        )

    def retire(self, lora: LoRARequest) -> None:
        """An adapter no longer served (unloaded, or replaced): its weights leave the
        engine once no request runs under it (``adapters.forget_when_idle``)."""
        task = asyncio.ensure_future(forget_when_idle(self.async_engine, lora.lora_int_id))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    # ------------------------------------------------------- serving them
    async def submit(self, request_id: str, request: ApiRequest) -> Submission:
        """Queue every prompt (``{request_id}-{i}``); on any failure, abort those queued."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(request.prompts):
                streams.append(await self._add(f"{request_id}-{i}", prompt, request))
        except BaseException as e:
            _abort(self.async_engine, streams)
            converted = _admission_error(e, request.names)
            if converted is e:
                raise
            raise converted from e
        return Submission(request_id, request, streams)

    async def _add(self, request_id: str, prompt: Prompt, request: ApiRequest) -> RequestStream:
        return await self.async_engine.add_request(
            EngineRequest(
                request_id,
                prompt.ids,
                request.params,
                prompt=prompt.text,
                arrival_time=request.arrival,
                cache_salt=request.cache_salt,
                kv_transfer_params=request.kv_transfer_params,
                priority=request.priority,
                token_type_ids=prompt.token_type_ids,
                lora_request=request.lora,
            )
        )

    async def collect(self, sub: Submission, raw: Request) -> Optional[Outputs]:
        """The last output of each prompt; None when the client went away first (or this
        handler was cancelled): its requests are aborted at once."""
        collect = asyncio.ensure_future(asyncio.gather(*(_last(s) for s in sub.streams)))
        gone = asyncio.ensure_future(wait_for_disconnect(raw))
        try:
            racing: set[asyncio.Future[Any]] = {collect, gone}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            left = not collect.done()  # the client left, or this handler was cancelled
            if left:
                collect.cancel()
                collect.add_done_callback(_retrieve)
                self.abort(sub)
        if left:
            return None
        try:
            outputs: Outputs = collect.result()
            return outputs
        except EngineDeadError as e:
            raise engine_dead(e, 500) from None

    def stream(self, sub: Submission) -> OutputStream:
        """The outputs of every prompt as they come; leaving the ``async with`` aborts what
        has not finished."""
        return OutputStream(self, sub)

    def abort(self, sub: Submission) -> None:
        _abort(self.async_engine, sub.streams)


class OutputStream:
    """``async with door.stream(sub) as outputs``: ``(prompt index, output)`` pairs, merged
    as they come; an engine that dies raises ApiError 500 ``engine_dead``. Leaving the block
    (the end, an error, the client gone) aborts the requests still running, at once."""

    def __init__(self, door: FrontDoor, sub: Submission) -> None:
        self.door, self.sub = door, sub

    async def __aenter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._outputs()

    async def __aexit__(
        self,
        kind: Optional[type[BaseException]],
        error: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.door.abort(self.sub)  # no await: runs even in a cancelled task

    async def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            async for item in _merge(self.sub.streams):
                yield item
        except EngineDeadError as e:
            raise engine_dead(e, 500) from None


def client_closed() -> Response:
    """What a request whose client went away gets (nobody reads it)."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


# ---------------------------------------------------------------- helpers
def _admission_error(e: BaseException, names: FieldNames) -> BaseException:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return queue_full(e)
    if isinstance(e, EngineDeadError):
        return engine_dead(e, 503)
    if isinstance(e, ValueError):
        return names.error(e)
    return e


def _abort(async_engine: AsyncEngine[ServedEngine], streams: list[RequestStream]) -> None:
    for s in streams:
        if not s.finished:
            async_engine.abort(s.request_id)


async def wait_for_disconnect(raw: Request) -> None:
    """Returns when the client has gone (the body was read already)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a cancelled future's outcome as seen (asyncio logs unseen exceptions)."""
    if not fut.cancelled():
        fut.exception()


async def _last(stream: RequestStream) -> Optional[RequestOutput]:
    last = None
    async for out in stream:
        last = out
    return last


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come: (stream index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001 - re-raised on the consumer side
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()

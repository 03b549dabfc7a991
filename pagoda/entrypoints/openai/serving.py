"""The completions and chat endpoints: request -> SamplingParams + token ids -> engine -> JSON/SSE.

One HTTP request may hold several prompts (completions) and ``n`` completions each; choice
``i * n + j`` is completion ``j`` of prompt ``i``. Streams send only what is new since the
last event (text, logprobs, finish_reason); a client that goes away aborts its requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Protocol, Union, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.core.outputs import TokenLogprobs
from pagoda.engine.async_engine import (
    AsyncEngine,
    Engine,
    EngineDeadError,
    QueueFullError,
    RequestStream,
)
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.entrypoints.openai import reasoning, tools
from pagoda.entrypoints.openai.errors import ApiError, error_body, param_from_message
from pagoda.entrypoints.openai.protocol import (
    MAX_PROMPTS_PER_REQUEST,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from pagoda.entrypoints.openai.structured import error_renames, structured_params
from pagoda.sampling import SamplingParams

if TYPE_CHECKING:
    from pagoda.models.config import ModelArch

SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams)) + (
    "prompt",
    "kv_transfer_params",
    "priority",
)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up first
Prompt = tuple[Optional[str], list[int]]  # (text if given as text, token ids)


@dataclass
class _Choice:
    """What a stream has already sent for one choice."""

    text_len: int = 0
    num_logprobs: int = 0
    finished: bool = False
    started: bool = False
    tools: Optional[tools.ToolStream] = None  # chat with tools: what of them went out
    reasoning: Optional[reasoning.ReasoningStream] = None  # chat: reasoning and content sent
    echoed: Optional[int] = None  # echo: the length of the prompt text sent before the text
    num_tokens: int = 0  # return_token_ids: the token ids sent so far


@dataclass(frozen=True)
class Echo:
    """``echo`` on /v1/completions: each choice's text (and logprobs) starts with its prompt's;
    ``only``: ``max_tokens`` 0, the prompt scored and nothing generated (lm-eval's
    log-likelihood requests ask for one token and drop it; both work)."""

    only: bool = False


@dataclass(frozen=True)
class Thinking:
    """A chat request's reasoning: the model's format, where its answer starts (read from
    the prompt), and whether the reasoning is returned (``include_reasoning``)."""

    format: reasoning.ReasoningFormat
    start: reasoning.Start
    include: bool = True

    def split(self, text: str) -> reasoning.Split:
        return reasoning.split(self.format, text, self.start, final=True)


@dataclass
class _Job:
    """One HTTP request in flight: its engine streams and what it has sent."""

    kind: str  # "completion" | "chat"
    response_id: str
    model: str
    n: int
    streams: list[RequestStream]
    prompts: list[Prompt]
    logprobs: Optional[int]
    include_usage: bool = False
    tools: Optional[tools.ToolPlan] = None
    echo: Optional[Echo] = None  # completions: the prompt goes before each choice's text
    prompt_logprobs: Optional[int] = None  # vLLM's field: the prompt's logprobs, its format
    return_token_ids: bool = False  # vLLM's: token ids beside the text
    continuous_usage: bool = False  # vLLM's: every chunk carries the usage so far
    generated: dict[int, int] = field(default_factory=dict)  # choice -> tokens so far
    reasoning: Optional[Thinking] = None  # chat under --reasoning-parser
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[int, _Choice] = field(default_factory=dict)

    def choice(self, index: int) -> _Choice:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _Choice()
            if self.tools is not None:
                state.tools = tools.ToolStream(self.tools)
            if self.reasoning is not None:
                state.reasoning = reasoning.ReasoningStream(
                    self.reasoning.format, self.reasoning.start
                )
        return state


class ServedEngine(Engine, Protocol):
    """What the HTTP layer reads of the engine, on top of what the engine thread needs
    (``LLMEngine`` has all of it)."""

    tokenizer: Any  # a transformers tokenizer, or the token-id one
    arch: ModelArch
    max_model_len: int

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: Optional[list[dict[str, Any]]] = None,
        **template_kwargs: Any,
    ) -> list[int]: ...


class OpenAIServing:
    def __init__(
        self,
        async_engine: AsyncEngine,
        model_names: list[str],
        tool_call_parser: Optional[str] = None,
        reasoning_parser: Optional[str] = None,
    ) -> None:
        self.async_engine = async_engine
        self.tool_call_parser = tool_call_parser  # the text format of "auto" tool calls
        self.reasoning = reasoning.get_format(reasoning_parser)  # thinking tags, if any
        # AsyncEngine types its engine by what its thread calls (Engine); a server is always
        # built over a full engine (an LLMEngine), which is a ServedEngine as well.
        self.engine = cast(ServedEngine, async_engine.engine)
        self.model_names = model_names
        self.tokenizer = self.engine.tokenizer

    # ------------------------------------------------------------ endpoints
    async def create_completion(
        self, req: CompletionRequest, raw: Request, cache_salt: Optional[str]
    ) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        max_name = (
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        )
        max_tokens = getattr(req, max_name)
        echo = Echo(only=max_tokens == 0) if req.echo else None
        params = self.sampling_params(
            req,
            1 if echo is not None and echo.only else max_tokens,
            DEFAULT_COMPLETION_MAX_TOKENS,
            req.logprobs,
            max_name,
            "logprobs",
            _prompt_logprobs_needed(req.prompt_logprobs, req.logprobs if echo else None),
        )
        prompts = self.truncated(self.completion_prompts(req.prompt), req.truncate_prompt_tokens)
        return await self._serve(
            "completion",
            "cmpl",
            req,
            params,
            prompts,
            raw,
            cache_salt,
            "prompt",
            arrival,
            echo=echo,
        )

    async def create_chat_completion(
        self, req: ChatCompletionRequest, raw: Request, cache_salt: Optional[str]
    ) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        max_name = (
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        )
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(
            req, max_tokens, None, logprobs, max_name, "top_logprobs", req.prompt_logprobs
        )
        plan = tools.plan_for(req, self.tool_call_parser)
        if plan is not None and (constraint := plan.constraint()) is not None:
            params = params.clone(structured_outputs=constraint)
        if plan is not None and plan.keeps_special_tokens:  # the format's markers (vLLM too)
            params = params.clone(skip_special_tokens=False)
        defs = [{"type": "function", "function": t} for t in plan.tools] if plan else None
        ids = self.chat_prompt(req.messages, defs, template_kwargs(req))
        prompts = self.truncated([(None, ids)], req.truncate_prompt_tokens)
        thinking = self._thinking(req, prompts[0][1])
        if thinking is not None and thinking.start is not reasoning.Start.CONTENT:
            params = _grammar_after_thinking(params, thinking.format)
        return await self._serve(
            "chat",
            "chatcmpl",
            req,
            params,
            prompts,
            raw,
            cache_salt,
            "messages",
            arrival,
            plan,
            thinking=thinking,
        )

    def _thinking(self, req: ChatCompletionRequest, prompt: list[int]) -> Optional[Thinking]:
        """How this request's answer is split (None: the server has no reasoning parser,
        or the request asks for none with SGLang's ``separate_reasoning: false``)."""
        if self.reasoning is None or req.separate_reasoning is False:
            return None
        tail = self.tokenizer.decode(prompt[-reasoning.PROMPT_TAIL_TOKENS :])
        start = reasoning.prompt_start(self.reasoning, tail)
        return Thinking(self.reasoning, start, include=req.include_reasoning is not False)

    # ---------------------------------------------------------- validation
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model not in self.model_names:
            raise ApiError(
                404,
                f"The model {model!r} does not exist; this server serves {self.model_names[0]!r}",
                "model",
                "model_not_found",
            )

    def sampling_params(
        self,
        req: SamplingFields,
        max_tokens: Optional[int],
        default_max: Optional[int],
        logprobs: Optional[int],
        max_name: str,
        logprobs_name: str,
        prompt_logprobs: Optional[int] = None,
    ) -> SamplingParams:
        if req.stream and req.prompt_logprobs is not None:
            raise ApiError(400, "prompt_logprobs cannot be streamed", "prompt_logprobs")
        values: dict[str, Any] = dict(
            prompt_logprobs=prompt_logprobs,
            n=req.n,
            seed=req.seed,
            stop=req.stop or [],
            stop_token_ids=req.stop_token_ids or [],
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            max_tokens=max_tokens if max_tokens is not None else default_max,
        )
        optional = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": self._top_k(req.top_k),
            "min_p": req.min_p,
            "repetition_penalty": req.repetition_penalty,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
        }
        values.update({k: v for k, v in optional.items() if v is not None})
        values["logit_bias"] = _logit_bias(req.logit_bias)
        values["allowed_token_ids"] = req.allowed_token_ids
        values["bad_words"] = req.bad_words or []
        try:
            values["structured_outputs"] = structured_params(req)
        except ValueError as e:
            raise _bad_request(e, error_renames(req), "structured_outputs") from None
        try:
            return SamplingParams(**values)
        except ValueError as e:
            raise _bad_request(e, {"max_tokens": max_name, "logprobs": logprobs_name}) from None

    def _top_k(self, top_k: Optional[int]) -> Optional[int]:
        """A top_k of the vocabulary's size or more keeps every token: it is top-k off (0).
        Said so here because the sampler cannot take a k past int64 (it kills the step)."""
        if top_k is not None and top_k >= self.engine.arch.vocab_size:
            return 0
        return top_k

    def completion_prompts(self, prompt: Union[str, list]) -> list[Prompt]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise ApiError(400, "prompt must not be empty", "prompt")
        if len(items) > MAX_PROMPTS_PER_REQUEST:
            raise ApiError(
                400,
                f"prompt holds {len(items)} prompts; at most {MAX_PROMPTS_PER_REQUEST}",
                "prompt",
            )
        out: list[Prompt] = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise ApiError(400, "prompt must not be empty", "prompt")
                out.append((item, self.engine.encode(item)))
            else:
                out.append((None, list(item)))
        return out

    def truncated(self, prompts: list[Prompt], keep: Optional[int]) -> list[Prompt]:
        """vLLM's ``truncate_prompt_tokens``: each prompt's last ``keep`` tokens (-1: as many
        as the context holds, less one for the answer); a cut prompt has no text of its own."""
        if keep is None:
            return prompts
        limit = self.engine.max_model_len - 1
        if keep == -1:
            keep = limit
        if not 1 <= keep <= limit:
            raise ApiError(
                400,
                f"truncate_prompt_tokens must be -1 or in [1, {limit}], got {keep}",
                "truncate_prompt_tokens",
            )
        return [(text, ids) if len(ids) <= keep else (None, ids[-keep:]) for text, ids in prompts]

    def chat_prompt(
        self,
        messages: list[ChatMessage],
        tool_defs: Optional[list[dict[str, Any]]] = None,
        template_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[int]:
        for i, m in enumerate(messages):
            if m.tool_calls and m.role != "assistant":
                raise ApiError(
                    400, "only assistant messages carry tool_calls", f"messages[{i}].tool_calls"
                )
            if m.role == "tool" and m.tool_call_id is None:
                raise ApiError(
                    400,
                    "a tool message needs the tool_call_id it answers",
                    f"messages[{i}].tool_call_id",
                )
        if (template_kwargs or {}).get("continue_final_message") and (
            messages[-1].role != "assistant"
        ):
            raise ApiError(
                400,
                "continue_final_message needs the last message to be the assistant's",
                "continue_final_message",
            )
        try:
            return self.engine.encode_chat(
                [m.to_template() for m in messages], tool_defs, **(template_kwargs or {})
            )
        except Exception as e:  # noqa: BLE001 - a template may reject any conversation
            raise ApiError(
                400, f"messages could not be rendered with the chat template: {e}", "messages"
            ) from None

    # ------------------------------------------------------------- serving
    async def _serve(
        self,
        kind: str,
        id_prefix: str,
        req: SamplingFields,
        params: SamplingParams,
        prompts: list[Prompt],
        raw: Request,
        cache_salt: Optional[str],
        prompt_name: str,
        arrival: float,
        plan: Optional[tools.ToolPlan] = None,
        echo: Optional[Echo] = None,
        thinking: Optional[Thinking] = None,
    ) -> Response:
        """Queue every prompt (TTFT counts from ``arrival``), then stream or collect."""
        response_id = f"{id_prefix}-{uuid.uuid4().hex}"
        salt = req.cache_salt or cache_salt
        streams = await self._submit(
            response_id,
            prompts,
            params,
            salt,
            prompt_name,
            req.kv_transfer_params,
            arrival,
            error_renames(req),
            req.priority or 0,
        )
        options = req.stream_options
        include_usage = bool(options and options.include_usage)
        job = _Job(
            kind,
            response_id,
            req.model,
            params.n,
            streams,
            prompts,
            params.logprobs,
            include_usage,
            plan,
            echo,
            req.prompt_logprobs,
            bool(req.return_token_ids),
            include_usage and bool(options and options.continuous_usage_stats),
            reasoning=thinking,
        )
        if req.stream:
            return StreamingResponse(
                self._sse(job),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await self._complete(job, raw)

    async def _submit(
        self,
        response_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        salt: Optional[str],
        prompt_name: str,
        kv_transfer_params: Optional[dict],
        arrival: float,
        renames: Optional[dict[str, str]] = None,
        priority: int = 0,
    ) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                streams.append(
                    await self.async_engine.add_request(
                        f"{response_id}-{i}",
                        ids,
                        params,
                        prompt=text,
                        cache_salt=salt,
                        arrival_time=arrival,
                        kv_transfer_params=kv_transfer_params,
                        priority=priority,
                    )
                )
        except BaseException as e:
            self._abort_all(streams)
            converted = _as_api_error(e, prompt_name, renames or {})
            if converted is e:
                raise
            raise converted from e
        return streams

    def _abort_all(self, streams: list[RequestStream]) -> None:
        for s in streams:
            if not s.finished:
                self.async_engine.abort(s.request_id)

    async def _complete(self, job: _Job, raw: Request) -> Response:
        collect = asyncio.ensure_future(asyncio.gather(*(_last(s) for s in job.streams)))
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
                self._abort_all(job.streams)
        if left:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        try:
            outputs = collect.result()
        except EngineDeadError as e:
            raise ApiError(500, str(e), code="engine_dead") from None
        return JSONResponse(self._full_response(job, outputs))

    # ---------------------------------------------------------- responses
    def _full_response(self, job: _Job, outputs: list[Optional[RequestOutput]]) -> dict:
        choices = []
        for i, out in enumerate(outputs):
            for comp in out.outputs if out is not None else []:
                assert out is not None
                choices.append(self._full_choice(job, i, out, comp))
        obj = "text_completion" if job.kind == "completion" else "chat.completion"
        response = {
            "id": job.response_id,
            "object": obj,
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": self._usage(job, outputs),
        }
        kv = next(
            (
                o.kv_transfer_params
                for o in outputs
                if o is not None and getattr(o, "kv_transfer_params", None)
            ),
            None,
        )
        if kv is not None:
            response["kv_transfer_params"] = kv  # a prefill instance: where the KV waits
        if job.kind == "chat" and job.prompt_logprobs is not None and outputs[0] is not None:
            response["prompt_logprobs"] = self._vllm_prompt_logprobs(job, outputs[0])
        if job.kind == "chat" and job.return_token_ids:
            response["prompt_token_ids"] = job.prompts[0][1]
        return response

    def _full_choice(
        self, job: _Job, prompt_index: int, out: RequestOutput, comp: CompletionOutput
    ) -> dict:
        index = prompt_index * job.n + comp.index
        logprobs = self._logprobs(job, comp.logprobs or [], 0) if job.logprobs is not None else None
        reason = comp.finish_reason
        if job.kind == "completion":
            text = comp.text
            if job.echo is not None:
                text, logprobs = self._echoed(job, prompt_index, out, comp.text, comp.logprobs)
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": reason,
                "stop_reason": comp.stop_reason,
            }
            if job.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._vllm_prompt_logprobs(job, out)
            if job.return_token_ids:
                choice["prompt_token_ids"] = job.prompts[prompt_index][1]
                choice["token_ids"] = list(comp.token_ids)
            return choice
        text, thought = comp.text, None
        if job.reasoning is not None:
            parts = job.reasoning.split(comp.text)
            text, thought = parts.content, parts.reasoning
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if job.tools is not None:  # parsed whatever ended the answer, as a stream sends it
            content, calls = job.tools.extract(text)
            if calls:
                message = {
                    "role": "assistant",
                    "content": content or None,
                    "tool_calls": [c.to_json() for c in calls],
                }
                reason = "tool_calls" if reason == "stop" else reason
        if thought:
            if not message["content"]:
                message["content"] = None  # all of it was thinking (cut by max_tokens)
            if job.reasoning is not None and job.reasoning.include:
                message["reasoning_content"] = message["reasoning"] = thought
        choice = {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": reason,
            "stop_reason": comp.stop_reason,
        }
        if job.return_token_ids:
            choice["token_ids"] = list(comp.token_ids)
        return choice

    def _echoed(
        self,
        job: _Job,
        prompt_index: int,
        out: RequestOutput,
        text: str,
        entries: Optional[list[TokenLogprobs]],
    ) -> tuple[str, Optional[dict]]:
        """A completion choice's text and logprobs with its prompt's before them (``echo``):
        the prompt's tokens each with its logprob given what precedes it (the first has none,
        as in OpenAI's legacy API)."""
        assert job.echo is not None
        given, ids = job.prompts[prompt_index]
        head = given if given is not None else self.tokenizer.decode(ids)
        if job.echo.only:
            text, entries = "", []
        if job.logprobs is None:
            return head + text, None
        prompt = self._prompt_token_logprobs(ids, out.prompt_logprobs, job.logprobs)
        tail = self._logprobs(job, entries or [], len(head))
        assert tail is not None
        return head + text, {key: prompt[key] + tail[key] for key in prompt}

    def _prompt_token_logprobs(
        self, ids: list[int], entries: Optional[list[Optional[TokenLogprobs]]], k: int
    ) -> dict[str, list]:
        """The legacy completions ``logprobs`` object of a prompt's tokens."""
        if entries is None or any(e is None for e in entries[1:]):
            raise RuntimeError("the engine returned no logprobs for some prompt tokens")
        tokens = [self._token_str(t) for t in ids]
        offsets, at = [], 0
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        scored = [e for e in entries[1:] if e is not None]
        return {
            "tokens": tokens,
            "token_logprobs": [None, *(e.logprob for e in scored)],
            "top_logprobs": [None, *(self._top_with_chosen(e, k) for e in scored)],
            "text_offset": offsets,
        }

    def _top_with_chosen(self, e: TokenLogprobs, k: int) -> dict[str, float]:
        """The ``k`` most likely tokens and the chosen one (OpenAI's legacy API: up to k + 1
        entries), best first; a string two ids decode to keeps the likelier logprob."""
        top: dict[str, float] = {}
        for t, lp in e.top[:k]:
            top.setdefault(self._token_str(t), lp)
        top.setdefault(self._token_str(e.token_id), e.logprob)
        return top

    def _vllm_prompt_logprobs(self, job: _Job, out: RequestOutput) -> list[Optional[dict]]:
        """vLLM's ``prompt_logprobs``: per prompt token (the first: null), the token and the
        ``prompt_logprobs`` most likely ones, by id: {logprob, rank, decoded_token}."""
        assert job.prompt_logprobs is not None
        k = job.prompt_logprobs
        result: list[Optional[dict]] = []
        for e in out.prompt_logprobs or []:
            if e is None:
                result.append(None)
                continue
            ranked = [(t, lp, r) for r, (t, lp) in enumerate(e.top[:k], start=1)]
            entry = {str(t): self._ranked(lp, r, t) for t, lp, r in ranked}
            entry.setdefault(str(e.token_id), self._ranked(e.logprob, e.rank, e.token_id))
            result.append(entry)
        return result

    def _ranked(self, logprob: float, rank: int, token_id: int) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": self._token_str(token_id)}

    def _usage(self, job: _Job, outputs: list[Optional[RequestOutput]]) -> dict:
        prompt = sum(len(ids) for _, ids in job.prompts)
        completion = 0
        if job.echo is None or not job.echo.only:  # an echo of the prompt alone generates none
            completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in outputs if o is not None)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _logprobs(
        self, job: _Job, entries: list[TokenLogprobs], text_offset: int
    ) -> Optional[dict]:
        if job.kind == "chat":
            return {"content": [self._chat_logprob(e) for e in entries]}
        tokens = [self._token_str(e.token_id) for e in entries]
        offsets = []
        for tok in tokens:
            offsets.append(text_offset)
            text_offset += len(tok)
        k = job.logprobs or 0
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [self._top_with_chosen(e, k) for e in entries],
            "text_offset": offsets,
        }

    def _chat_logprob(self, e: TokenLogprobs) -> dict:
        tok = self._token_str(e.token_id)
        return {
            "token": tok,
            "logprob": e.logprob,
            "bytes": list(tok.encode("utf-8")),
            "top_logprobs": [
                {
                    "token": (s := self._token_str(t)),
                    "logprob": lp,
                    "bytes": list(s.encode("utf-8")),
                }
                for t, lp in e.top
            ],
        }

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ------------------------------------------------------------ streaming
    async def _sse(self, job: _Job) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in _merge(job.streams):
                for chunk in self._delta_chunks(job, i, out):
                    yield _sse_data(chunk)
                if out.finished:
                    finals[i] = out
            if job.include_usage:
                outs = [finals.get(i) for i in range(len(job.streams))]
                yield _sse_data(self._chunk(job, [], usage=self._usage(job, outs)))
        except EngineDeadError as e:
            yield _sse_data(error_body(500, str(e), code="engine_dead"))
        finally:
            self._abort_all(job.streams)
        yield "data: [DONE]\n\n"

    def _delta_chunks(self, job: _Job, prompt_index: int, out: RequestOutput) -> list[dict]:
        chunks = []
        for comp in out.outputs:
            index = prompt_index * job.n + comp.index
            state = job.choice(index)
            if state.finished:
                continue
            if job.echo is not None and state.echoed is None:
                if not comp.token_ids and comp.finish_reason is None:
                    continue  # the prompt (and its logprobs) is still being computed
                chunks.append(self._chunk(job, [self._echo_choice(job, index, prompt_index, out)]))
                state.echoed = len(chunks[-1]["choices"][0]["text"])
            job.generated[index] = len(comp.token_ids)
            first = not state.started
            choice = self._delta_choice(job, index, state, comp)
            if choice is None:
                continue
            chunk = self._chunk(job, [choice])
            if job.return_token_ids:
                self._add_token_ids(job, chunk, state, comp, first, out.prompt_token_ids)
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _add_token_ids(
        job: _Job,
        chunk: dict,
        state: _Choice,
        comp: CompletionOutput,
        first: bool,
        prompt_ids: list[int],
    ) -> None:
        """``return_token_ids`` on a stream: each chunk's new token ids on its choice, and
        the prompt's with the choice's first chunk (on the choice for completions, on the
        chunk for chat, as vLLM places them)."""
        choice = chunk["choices"][0]
        new = [] if job.echo is not None and job.echo.only else comp.token_ids[state.num_tokens :]
        choice["token_ids"] = list(new)
        state.num_tokens += len(new)
        if first:
            (choice if job.kind == "completion" else chunk)["prompt_token_ids"] = prompt_ids

    def _delta_choice(
        self, job: _Job, index: int, state: _Choice, comp: CompletionOutput
    ) -> Optional[dict]:
        reason = comp.finish_reason
        end = len(comp.text)  # a live text holds back what may start a stop string
        text = comp.text[state.text_len : end]
        entries = (comp.logprobs or [])[state.num_logprobs :]
        if job.echo is not None and job.echo.only:
            text, entries = "", []  # the prompt alone was asked for: its token is not sent
        if not text and not entries and reason is None and state.started:
            return None
        offset = state.text_len + (state.echoed or 0)
        logprobs = self._logprobs(job, entries, offset) if job.logprobs is not None else None
        state.text_len = max(state.text_len, end)
        state.num_logprobs += len(entries)
        state.finished = reason is not None
        if job.kind == "completion":
            state.started = True
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        delta, reason = self._chat_delta(job, state, comp, text, reason)
        if not state.started:
            delta["role"] = "assistant"
            state.started = True
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def _chat_delta(
        self, job: _Job, state: _Choice, comp: CompletionOutput, text: str, reason: Optional[str]
    ) -> tuple[dict[str, Any], Optional[str]]:
        """A chat delta: the new reasoning (under a reasoning parser), then the new content
        or, with tools, the content that surely is content and the calls."""
        content_so_far, thought = comp.text, ""
        if state.reasoning is not None:
            thought, text = state.reasoning.feed(comp.text, final=reason is not None)
            content_so_far = state.reasoning.content
        delta: dict[str, Any] = {"content": text}
        if state.tools is not None:
            delta, reason = self._tool_delta(state.tools, content_so_far, reason)
        if thought and job.reasoning is not None and job.reasoning.include:
            delta = {"reasoning_content": thought, "reasoning": thought, **delta}
            if not delta["content"]:
                delta["content"] = None
        return delta, reason

    def _echo_choice(self, job: _Job, index: int, prompt_index: int, out: RequestOutput) -> dict:
        """A streamed completion choice's first chunk under ``echo``: its prompt's text (and
        logprobs), before anything generated."""
        text, logprobs = self._echoed(job, prompt_index, out, "", [])
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    @staticmethod
    def _tool_delta(
        stream: tools.ToolStream, answer: str, reason: Optional[str]
    ) -> tuple[dict[str, Any], Optional[str]]:
        """A chat delta under tools: the content that surely is content, then the calls
        and their arguments as far as they are written (``answer``: the answer's text so
        far, after any reasoning). Once it has ended (stop or length), nothing is held."""
        content, calls = stream.feed(answer, final=reason is not None)
        delta: dict[str, Any] = {"content": content}
        if calls:
            delta["tool_calls"] = calls
        return delta, ("tool_calls" if reason == "stop" and stream.called else reason)

    def _chunk(self, job: _Job, choices: list[dict], usage: Optional[dict] = None) -> dict:
        obj = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
        chunk = {
            "id": job.response_id,
            "object": obj,
            "created": job.created,
            "model": job.model,
            "choices": choices,
        }
        if job.include_usage:
            chunk["usage"] = usage
            if usage is None and job.continuous_usage:
                chunk["usage"] = self._usage_so_far(job)
        return chunk

    @staticmethod
    def _usage_so_far(job: _Job) -> dict:
        """vLLM's ``continuous_usage_stats``: the request's usage at this chunk."""
        prompt = sum(len(ids) for _, ids in job.prompts)
        generated = 0 if job.echo is not None and job.echo.only else sum(job.generated.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": generated,
            "total_tokens": prompt + generated,
        }


# ---------------------------------------------------------------- helpers
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


RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "tokenize", "chat_template", "documents")


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    """What the chat template is rendered with beyond the messages and tools: vLLM's
    ``chat_template_kwargs`` (``enable_thinking``, ...), ``reasoning_effort`` (given to the
    template as vLLM gives it), ``add_generation_prompt`` and ``continue_final_message``."""
    kwargs = dict(req.chat_template_kwargs or {})
    for key in kwargs:
        if key in RESERVED_TEMPLATE_KWARGS or key in ("add_generation_prompt",):
            raise ApiError(
                400,
                f"chat_template_kwargs.{key} is set by the request itself",
                f"chat_template_kwargs.{key}",
            )
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    add_prompt = req.add_generation_prompt is not False
    if req.continue_final_message:
        if "add_generation_prompt" in req.model_fields_set and add_prompt:
            raise ApiError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        kwargs["continue_final_message"], add_prompt = True, False
    kwargs["add_generation_prompt"] = add_prompt
    return kwargs


def _grammar_after_thinking(
    params: SamplingParams, fmt: reasoning.ReasoningFormat
) -> SamplingParams:
    """A constrained answer of a reasoning model: the grammar holds after the thinking."""
    so = params.structured_outputs
    if so is None:
        return params
    return params.clone(structured_outputs=replace(so, reasoning_tags=(fmt.start, fmt.end)))


def _prompt_logprobs_needed(asked: Optional[int], echoed: Optional[int]) -> Optional[int]:
    """How many top tokens the engine keeps per prompt token: what ``prompt_logprobs`` asks,
    or what ``logprobs`` asks of an echoed prompt, whichever is more (None: neither)."""
    wanted = [k for k in (asked, echoed) if k is not None]
    return max(wanted) if wanted else None


def _logit_bias(raw: Optional[dict[str, float]]) -> dict[int, float]:
    """OpenAI's ``logit_bias`` has token ids as JSON object keys, so strings."""
    if not raw:
        return {}
    bias: dict[int, float] = {}
    for key, value in raw.items():
        if not key.isdigit() or len(key) > 12:
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        bias[int(key)] = value
    return bias


def _sse_data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _bad_request(
    e: ValueError, renames: dict[str, str], default_param: Optional[str] = None
) -> ApiError:
    """A 400 for a ValueError whose message starts with the engine's name of the field,
    told in the client's terms (``renames``: engine name -> request name)."""
    message = str(e)
    param = param_from_message(message, SAMPLING_FIELDS)
    if param is not None and param in renames:
        message, param = renames[param] + message[len(param) :], renames[param]
    return ApiError(400, message, param or default_param)


def _as_api_error(
    e: BaseException, prompt_name: str, renames: Optional[dict[str, str]] = None
) -> BaseException:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, EngineDeadError):
        return ApiError(503, str(e), code="engine_dead")
    if isinstance(e, ValueError):
        error = _bad_request(e, renames or {})
        if error.param == "prompt":  # the field, not the message: it says what was wrong
            error.param = prompt_name
        return error
    return e

"""OpenAI's ``POST /v1/chat/completions``: messages in, assistant messages out (JSON, or SSE
chunks of ``delta`` s).

The messages are rendered with the model's chat template (vLLM's ``chat_template_kwargs``,
``add_generation_prompt``, ``continue_final_message``), tools become a plan
(``chat_tools.py``) and, under ``--reasoning-parser``, the thinking is split off; all of it
goes to the engine as one ApiRequest (``front_door.py``). The answers (``answer.py``) are
rendered here: ``message.content``, ``tool_calls``, ``reasoning_content`` and ``reasoning``
(vLLM's two names), ``finish_reason: "tool_calls"``; vLLM's ``prompt_logprobs`` and
``return_token_ids`` beside them.

Invariant: a streamed choice's deltas join to exactly its non-streamed message (the role on
the first, content, reasoning and each call's arguments concatenated), as ``answer.py``
keeps it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.engine.outputs import RequestOutput
from pagoda.entrypoints.answer import Answer, AnswerStreams, Delta, final_answers
from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import (
    ApiRequest,
    Outputs,
    Prompt,
    ServedEngine,
    Submission,
    Usage,
    client_closed,
)
from pagoda.entrypoints.openai.chat_tools import plan_for
from pagoda.entrypoints.openai.envelope import Envelope, kv_transfer_params, sse, sse_response
from pagoda.entrypoints.openai.errors import OPENAI
from pagoda.entrypoints.openai.logprobs import Logprobs
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from pagoda.entrypoints.openai.sampling import (
    Asked,
    engine_request,
    max_tokens_name,
    sampling_params,
    truncated,
)
from pagoda.entrypoints.reasoning import Thinking

RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "tokenize", "chat_template", "documents")


def endpoint(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/chat/completions``."""
    serving = ChatCompletions(ctx)

    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await serving.create(body, raw), ignored)

    return Endpoint(chat_completions, OPENAI, OPENAI.error_responses(400, 401, 404, 413, 429, 503))


@dataclass
class _Job:
    """One request in flight: what it asked beyond the engine request."""

    sub: Submission
    envelope: Envelope
    logprobs: bool  # chat's logprobs (with top_logprobs: the engine's k)
    prompt_logprobs: Optional[int] = None  # vLLM's
    return_token_ids: bool = False  # vLLM's: token ids beside the message
    answers: Optional[AnswerStreams] = None

    @property
    def request(self) -> ApiRequest:
        return self.sub.request

    @property
    def shows_reasoning(self) -> bool:
        """Whether the thinking is returned (vLLM's ``include_reasoning``)."""
        thinking = self.request.thinking
        return thinking is not None and thinking.include


class ChatCompletions:
    def __init__(self, ctx: ServerContext) -> None:
        self.door = ctx.door
        self.logprobs = Logprobs(ctx.door.tokenizer)

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        request = self.engine_request(req, raw, arrival)
        sub = await self.door.submit(f"chatcmpl-{uuid.uuid4().hex}", request)
        job = _Job(
            sub,
            Envelope.of(req, sub.id, "chat.completion", "chat.completion.chunk"),
            request.sampling.logprobs is not None,
            req.prompt_logprobs,
            bool(req.return_token_ids),
        )
        if req.stream:
            job.answers = AnswerStreams(request)
            chunks, usage = partial(self._new_chunks, job), partial(Usage.of, request)
            return sse_response(sse(self.door, sub, job.envelope, chunks, usage))
        outputs = await self.door.collect(sub, raw)
        if outputs is None:
            return client_closed()
        return JSONResponse(self._response(job, outputs))

    # ------------------------------------------------------------ the request
    def engine_request(
        self, req: ChatCompletionRequest, raw: Request, arrival: float
    ) -> ApiRequest:
        lora = self.door.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        max_name = max_tokens_name(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        asked = Asked(
            getattr(req, max_name), max_name, logprobs, "top_logprobs", req.prompt_logprobs
        )
        params = sampling_params(req, asked, self.door)
        plan = plan_for(req, self.door.tool_call_parser)
        if plan is not None:
            params = plan.sampling(params)
        defs = plan.template_tools() if plan is not None else None
        ids = chat_prompt(self.door.engine, req.messages, defs, template_kwargs(req))
        prompts = truncated(
            [Prompt(ids)], req.truncate_prompt_tokens, self.door.engine.max_model_len
        )
        thinking = self._thinking(req, prompts[0].ids)
        if thinking is not None:
            params = thinking.constrain_answer(params)
        return engine_request(
            req, raw, prompts, params, arrival, "messages", plan, thinking, lora=lora
        )

    def _thinking(self, req: ChatCompletionRequest, prompt: list[int]) -> Optional[Thinking]:
        """How this request's answer is split (None: the server has no reasoning parser,
        or the request asks for none with SGLang's ``separate_reasoning: false``)."""
        if req.separate_reasoning is False:
            return None
        return self.door.thinking(prompt, include=req.include_reasoning is not False)

    # ------------------------------------------------------------ the whole answer
    def _response(self, job: _Job, outputs: Outputs) -> dict[str, Any]:
        choices = [self._choice(job, a) for _, _, a in final_answers(job.request, outputs)]
        response = job.envelope.response(choices, Usage.of(job.request, outputs))
        kv = kv_transfer_params(outputs)
        if kv is not None:
            response["kv_transfer_params"] = kv  # a prefill instance: where the KV waits
        if job.prompt_logprobs is not None and outputs[0] is not None:
            response["prompt_logprobs"] = self.logprobs.vllm_prompt(outputs[0], job.prompt_logprobs)
        if job.return_token_ids:
            response["prompt_token_ids"] = job.request.prompts[0].ids
        return response

    def _choice(self, job: _Job, a: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": a.content}
        if a.tool_calls:
            message = {
                "role": "assistant",
                "content": a.content or None,
                "tool_calls": [c.to_json() for c in a.tool_calls],
            }
        if a.reasoning:
            if not message["content"]:
                message["content"] = None  # all of it was thinking (cut by max_tokens)
            if job.shows_reasoning:
                message["reasoning_content"] = message["reasoning"] = a.reasoning
        choice = {
            "index": a.index,
            "message": message,
            "logprobs": self.logprobs.chat(a.logprobs) if job.logprobs else None,
            "finish_reason": a.finish_reason,
            "stop_reason": a.stop_reason,
        }
        if job.return_token_ids:
            choice["token_ids"] = a.token_ids
        return choice

    # ------------------------------------------------------------ streaming
    def _new_chunks(self, job: _Job, prompt_index: int, out: RequestOutput) -> list[dict]:
        assert job.answers is not None
        chunks = []
        for comp, stream in job.answers.live(prompt_index, out):
            delta = stream.feed(comp)
            if delta is not None:
                chunks.append(self._delta_chunk(job, delta, out))
        return chunks

    def _delta_chunk(self, job: _Job, delta: Delta, out: RequestOutput) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": delta.index,
            "delta": self._delta_message(job, delta),
            "logprobs": self.logprobs.chat(delta.logprobs) if job.logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        chunk = job.envelope.chunk([choice], so_far=self._so_far(job))
        if job.return_token_ids:  # vLLM places the prompt's on the chunk, with the first
            choice["token_ids"] = delta.token_ids
            if delta.first:
                chunk["prompt_token_ids"] = out.prompt_token_ids
        return chunk

    @staticmethod
    def _delta_message(job: _Job, delta: Delta) -> dict[str, Any]:
        """The new reasoning (under a reasoning parser), then the new content or, with
        tools, the content that surely is content and the calls; the role first time."""
        message: dict[str, Any] = {"content": delta.content}
        if delta.tool_calls:
            message["tool_calls"] = [c.to_json() for c in delta.tool_calls]
        if delta.reasoning and job.shows_reasoning:
            message = {
                "reasoning_content": delta.reasoning,
                "reasoning": delta.reasoning,
                **message,
            }
            if not message["content"]:
                message["content"] = None
        if delta.first:
            message["role"] = "assistant"
        return message

    @staticmethod
    def _so_far(job: _Job) -> Usage:
        """vLLM's ``continuous_usage_stats``: the request's usage at this chunk."""
        assert job.answers is not None
        return Usage(job.request.num_prompt_tokens, job.answers.num_generated)


# ---------------------------------------------------------------- the prompt
def chat_prompt(
    engine: ServedEngine,
    messages: list[ChatMessage],
    tool_defs: Optional[list[dict[str, Any]]] = None,
    template_kwargs: Optional[dict[str, Any]] = None,
) -> list[int]:
    """The conversation's token ids, rendered with the model's chat template."""
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
    if (template_kwargs or {}).get("continue_final_message") and (messages[-1].role != "assistant"):
        raise ApiError(
            400,
            "continue_final_message needs the last message to be the assistant's",
            "continue_final_message",
        )
    try:
        return engine.encode_chat(
            [m.to_template() for m in messages], tool_defs, **(template_kwargs or {})
        )
    except Exception as e:  # noqa: BLE001 - a template may reject any conversation
        raise ApiError(
            400, f"messages could not be rendered with the chat template: {e}", "messages"
        ) from None


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

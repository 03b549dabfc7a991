"""Anthropic's ``POST /v1/messages`` (a message, or its SSE events) and
``POST /v1/messages/count_tokens``, over the front door every dialect shares.

The conversation is rendered with the model's chat template (``conversation.py``; the tools
as the template takes them, ``tool_choice.py``), and becomes one ApiRequest:
``max_tokens`` (required; a ceiling, cut to the room the context leaves after the prompt,
where the answer then stops with ``model_context_window_exceeded``), ``stop_sequences``,
``temperature``, ``top_p``, ``top_k``, ``output_config.format`` (a JSON schema the answer
is constrained to), the tool plan and, under ``--reasoning-parser``, the thinking.

``thinking`` sets the template's ``enable_thinking`` switch (``enabled``: true,
``disabled``: false, ``adaptive`` and ``between_tools``: the template's default;
``display: omitted`` returns thinking blocks with their signature and no text);
``budget_tokens`` must be below ``max_tokens``, as Anthropic requires, and does not bound
the thinking on its own: ``max_tokens`` bounds thinking and answer together. A
conversation that ends with an assistant message is continued (Anthropic's prefill), not
answered anew. ``count_tokens`` renders exactly as a message would, so its count is the
message's ``input_tokens + cache_read_input_tokens``.

Invariant: a streamed message accumulates to the non-streamed one (``stream.py``), and every
error is in Anthropic's shape, naming the field (``errors.py``).
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.entrypoints.answer import final_answers
from pagoda.entrypoints.anthropic.blocks import (
    Reply,
    content_blocks,
    message_id,
    stop_of,
    usage_json,
)
from pagoda.entrypoints.anthropic.conversation import template_messages
from pagoda.entrypoints.anthropic.errors import ANTHROPIC
from pagoda.entrypoints.anthropic.protocol import (
    Conversation,
    CountTokensRequest,
    JsonOutputFormat,
    MessagesRequest,
)
from pagoda.entrypoints.anthropic.stream import message_events
from pagoda.entrypoints.anthropic.tool_choice import plan_for
from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported, tenant_salt
from pagoda.entrypoints.errors import ApiError, engine_value_error
from pagoda.entrypoints.front_door import (
    ApiRequest,
    FieldNames,
    FrontDoor,
    Outputs,
    Usage,
    client_closed,
)
from pagoda.entrypoints.tools import ToolPlan
from pagoda.sampling import SamplingParams, StructuredOutputsParams

RENAMES = {"stop": "stop_sequences"}  # the engine's field -> the request's
SO_JSON = "structured_outputs.json"
ERRORS = (400, 401, 404, 413, 429, 500, 503)


def endpoint(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/messages``."""
    serving = Messages(ctx.door)

    async def messages(body: MessagesRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await serving.create(body, raw), ignored)

    return Endpoint(messages, ANTHROPIC, ANTHROPIC.error_responses(*ERRORS))


def count_tokens(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/messages/count_tokens``."""
    serving = Messages(ctx.door)

    async def count(body: CountTokensRequest) -> Response:
        ignored = ctx.policy.check(body)
        ctx.door.check_model(body.model)
        ids, _ = serving.prompt(body)
        return reported(JSONResponse({"input_tokens": len(ids)}), ignored)

    return Endpoint(count, ANTHROPIC, ANTHROPIC.error_responses(400, 401, 404, 413))


class Messages:
    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    async def create(self, req: MessagesRequest, raw: Request) -> Response:
        request = self.engine_request(req, raw, time.monotonic())
        sub = await self.door.submit(message_id(), request)
        reply = Reply(req.model, shows_thinking(req), request.sampling.max_tokens != req.max_tokens)
        if req.stream:
            return StreamingResponse(
                message_events(self.door, sub, reply),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        outputs = await self.door.collect(sub, raw)
        if outputs is None:
            return client_closed()
        return JSONResponse(self._message(sub.id, reply, request, outputs))

    # ------------------------------------------------------------ the request
    def engine_request(self, req: MessagesRequest, raw: Request, arrival: float) -> ApiRequest:
        lora = self.door.check_model(req.model)
        ids, plan = self.prompt(req)
        params, renames = self._sampling(req, self.door.engine.max_model_len - len(ids))
        if plan is not None:
            _one_constraint(req, plan, params)
        names = FieldNames(renames, "messages")
        salt = tenant_salt(raw)
        return self.door.conversation_request(ids, params, arrival, names, salt, plan, lora=lora)

    def prompt(self, req: Conversation) -> tuple[list[int], Optional[ToolPlan]]:
        """The conversation's token ids (as the chat template renders it) and tool plan."""
        plan = plan_for(req, self.door.tool_call_parser)
        messages = template_messages(req)
        tools = plan.template_tools() if plan is not None else None
        try:
            ids = self.door.engine.encode_chat(messages, tools, **template_kwargs(req))
        except Exception as e:  # noqa: BLE001 - a template may reject any conversation
            raise ApiError(
                400, f"messages could not be rendered with the chat template: {e}", "messages"
            ) from None
        return ids, plan

    def _sampling(self, req: MessagesRequest, room: int) -> tuple[SamplingParams, dict[str, str]]:
        """The engine's sampling parameters, and how its field names read in the request.
        ``max_tokens`` is a ceiling: cut to the ``room`` the context leaves after the prompt
        (clients such as Claude Code ask for more than a local model's context holds)."""
        thinking = req.thinking
        if thinking is not None and thinking.type == "enabled":
            budget = thinking.budget_tokens
            if budget is None:
                raise ApiError(
                    400,
                    "thinking.budget_tokens is required when thinking is enabled",
                    "thinking.budget_tokens",
                )
            if not 0 < budget < req.max_tokens:
                raise ApiError(
                    400,
                    f"thinking.budget_tokens must be positive and below max_tokens "
                    f"({req.max_tokens}), got {budget}",
                    "thinking.budget_tokens",
                )
        max_tokens = min(req.max_tokens, room) if room > 0 else req.max_tokens
        values: dict[str, Any] = {"max_tokens": max_tokens, "stop": req.stop_sequences or []}
        optional = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": self.door.top_k(req.top_k),
        }
        values.update({k: v for k, v in optional.items() if v is not None})
        fmt, name = output_format(req)
        renames = {**RENAMES, SO_JSON: f"{name}.schema"}
        try:
            if fmt is not None:
                values["structured_outputs"] = StructuredOutputsParams(json=json.dumps(fmt.schema_))
            return SamplingParams(**values), renames
        except ValueError as e:
            raise engine_value_error(e, renames, name) from None

    # ------------------------------------------------------------ the answer
    @staticmethod
    def _message(
        msg_id: str, reply: Reply, request: ApiRequest, outputs: Outputs
    ) -> dict[str, Any]:
        answer = next((a for _, _, a in final_answers(request, outputs)), None)
        blocks: list[dict[str, Any]] = []  # none when aborted before any output
        reason, sequence = stop_of("abort", None)
        if answer is not None:
            reason, sequence = stop_of(
                answer.finish_reason, answer.stop_reason, reply.context_bound
            )
            blocks = content_blocks(answer, reply.shows_thinking)
        return {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": blocks,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage_json(Usage.of(request, outputs)),
        }


def _one_constraint(req: MessagesRequest, plan: ToolPlan, params: SamplingParams) -> None:
    """A forced call (``any``, ``tool``) is a grammar: it cannot take a schema as well."""
    if params.structured_outputs is not None and plan.mode != "auto":
        kind = req.tool_choice.type if req.tool_choice is not None else plan.mode
        raise ApiError(
            400,
            f"tool_choice {kind!r} constrains the output itself; it cannot be combined "
            f"with {output_format(req)[1]}",
            "tool_choice",
        )


def output_format(req: MessagesRequest) -> tuple[Optional[JsonOutputFormat], str]:
    """The JSON schema the answer is constrained to (``output_config.format``, or the
    beta's ``output_format``), and the field that gave it."""
    if req.output_config is not None and req.output_config.format is not None:
        return req.output_config.format, "output_config.format"
    return req.output_format, "output_format"


def shows_thinking(req: MessagesRequest) -> bool:
    """Whether thinking blocks carry their text (``display: omitted``: the signature only)."""
    return req.thinking is None or req.thinking.display != "omitted"


def template_kwargs(req: Conversation) -> dict[str, Any]:
    """The template's switches: the generation prompt (or, after an assistant message, its
    continuation) and ``enable_thinking`` as ``thinking`` asks."""
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    if req.messages[-1].role == "assistant":
        kwargs = {"add_generation_prompt": False, "continue_final_message": True}
    if req.thinking is not None and req.thinking.type in ("enabled", "disabled"):
        kwargs["enable_thinking"] = req.thinking.type == "enabled"
    return kwargs

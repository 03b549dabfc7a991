"""Ollama's ``POST /api/chat``: messages in, the assistant's message out (one object, or
NDJSON as it grows), with ``thinking`` under a reasoning parser and ``tool_calls`` under a
tool-call parser.

Ollama has no ``tool_choice``: tools given mean the model may call them (``auto``), read
from its text by the server's ``--tool-call-parser``; without one, tools are a 400 naming
``tools``. Calls in the history and in the answer have Ollama's shape, arguments as objects.
No messages: nothing to generate, answered at once (Ollama loads the model then).

Invariant: the streamed contents, thinkings and calls join to the non-streamed message
(``reply.py``).
"""

from __future__ import annotations

from typing import Optional

from fastapi import Request
from fastapi.responses import Response

from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.ollama.errors import OLLAMA
from pagoda.entrypoints.ollama.models import adapter_of, resolve
from pagoda.entrypoints.ollama.options import report
from pagoda.entrypoints.ollama.protocol import ChatRequest
from pagoda.entrypoints.ollama.reply import Shape
from pagoda.entrypoints.ollama.serving import Serving
from pagoda.entrypoints.tools import ToolPlan, distinct_names, require_parser

ERRORS = (400, 401, 404, 413, 429, 503)


def endpoint(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /api/chat``."""
    serving = Serving(ctx)

    async def chat(body: ChatRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body) + report(body.ignored())
        return reported(await create(serving, body, raw), ignored)

    return Endpoint(chat, OLLAMA, OLLAMA.error_responses(*ERRORS))


async def create(serving: Serving, req: ChatRequest, raw: Request) -> Response:
    model = resolve(serving.ctx, req.model)
    shape = Shape(model, chat=True, show_thinking=req.think is not False)
    plan = tool_plan(req, serving.door.tool_call_parser)
    kwargs = serving.template_kwargs(req.think)
    if not req.messages:
        return serving.nothing(req, shape)
    messages = [m.to_template() for m in req.messages]
    ids = serving.chat_ids(messages, plan, kwargs, "messages")
    lora = adapter_of(serving.ctx, model)
    request = serving.engine_request(req, raw, ids, "messages", plan, lora)
    return await serving.answer(req, request, shape, raw)


def tool_plan(req: ChatRequest, parser: Optional[str]) -> Optional[ToolPlan]:
    """Tools given: the model may call them, read by the server's tool-call parser."""
    if not req.tools:
        return None
    tools = tuple(t.function.model_dump(exclude_none=True) for t in req.tools)
    distinct_names(tools, "function names")
    require_parser(parser, "tools need", "tools")
    return ToolPlan("auto", tools, parser=parser)

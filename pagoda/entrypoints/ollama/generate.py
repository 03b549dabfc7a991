"""Ollama's ``POST /api/generate``: a prompt in, its completion out (one object, or NDJSON
as it grows), with ``thinking`` under a reasoning parser.

The prompt (after ``system``, when given) is rendered as a user turn with the model's chat
template, as Ollama renders it with its template; ``raw: true`` sends it as it is, untouched
(``system`` is then refused: nothing would render it). ``template`` (a Go template),
``suffix`` (fill-in-the-middle), ``context`` (an earlier answer's tokens) and ``images`` are
refused by name. The last object has no ``context``. An empty prompt: nothing to generate,
answered at once (Ollama loads the model then).

Invariant: the streamed responses and thinkings join to the non-streamed answer's
(``reply.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.ollama.errors import OLLAMA
from pagoda.entrypoints.ollama.models import adapter_of, resolve
from pagoda.entrypoints.ollama.options import report
from pagoda.entrypoints.ollama.protocol import GenerateRequest
from pagoda.entrypoints.ollama.reply import Shape
from pagoda.entrypoints.ollama.serving import Serving

ERRORS = (400, 401, 404, 413, 429, 503)


def endpoint(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /api/generate``."""
    serving = Serving(ctx)

    async def generate(body: GenerateRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body) + report(body.ignored())
        return reported(await create(serving, body, raw), ignored)

    return Endpoint(generate, OLLAMA, OLLAMA.error_responses(*ERRORS))


async def create(serving: Serving, req: GenerateRequest, raw: Request) -> Response:
    model = resolve(serving.ctx, req.model)
    shape = Shape(model, chat=False, show_thinking=req.think is not False)
    kwargs = serving.template_kwargs(req.think)
    if req.raw and req.system:
        raise ApiError(400, "system is not used with raw: the prompt is sent as it is", "system")
    if not req.prompt:
        return serving.nothing(req, shape)
    if req.raw:
        ids = serving.door.engine.encode(req.prompt)
    else:
        ids = serving.chat_ids(_messages(req), None, kwargs, "prompt")
    lora = adapter_of(serving.ctx, model)
    request = serving.engine_request(req, raw, ids, "prompt", lora=lora)
    return await serving.answer(req, request, shape, raw)


def _messages(req: GenerateRequest) -> list[dict[str, Any]]:
    system = [{"role": "system", "content": req.system}] if req.system else []
    return system + [{"role": "user", "content": req.prompt}]

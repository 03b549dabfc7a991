"""What ``/api/chat`` and ``/api/generate`` share: ``think`` as the chat template's switch
and the reasoning split, the prompt rendered with the chat template, the engine request,
and its answer (one object, or NDJSON) through the front door.

``think`` (true, false, or an effort: ``low``, ``medium``, ``high``) is given to the
template as ``enable_thinking`` (and ``reasoning_effort``); the thinking is split off by the
server's ``--reasoning-parser`` and returned as ``thinking`` unless ``think`` is false.
Asking for thinking from a server without a reasoning parser is a 400 naming ``think``.

Invariant: every engine request submitted here is finished or aborted when its HTTP
exchange ends (the front door's), and a bad request is a 4xx naming its field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.entrypoints.dialect import ServerContext, tenant_salt
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import ApiRequest, FieldNames, client_closed
from pagoda.entrypoints.ollama import reply
from pagoda.entrypoints.ollama.options import RENAMES, sampling_params
from pagoda.entrypoints.ollama.protocol import GenerationFields, Think
from pagoda.entrypoints.ollama.reply import Shape
from pagoda.entrypoints.tools import ToolPlan
from pagoda.lora_request import LoRARequest


class Serving:
    """One server's Ollama generation: requests in, answers out."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.door = ctx.door

    def template_kwargs(self, think: Optional[Think]) -> dict[str, Any]:
        """What the chat template is rendered with beyond the messages and tools."""
        if think is None:
            return {}
        if think is not False and self.door.reasoning is None:
            raise ApiError(
                400,
                "think needs a server started with --reasoning-parser (qwen3 or deepseek_r1)",
                "think",
            )
        kwargs: dict[str, Any] = {"enable_thinking": think is not False}
        if isinstance(think, str):
            kwargs["reasoning_effort"] = think
        return kwargs

    def chat_ids(
        self,
        messages: list[dict[str, Any]],
        plan: Optional[ToolPlan],
        kwargs: dict[str, Any],
        field: str,
    ) -> list[int]:
        """The conversation's token ids, rendered with the model's chat template."""
        tools = plan.template_tools() if plan is not None else None
        try:
            return self.door.engine.encode_chat(
                messages, tools, add_generation_prompt=True, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - a template may reject any conversation
            raise ApiError(
                400, f"{field} could not be rendered with the chat template: {e}", field
            ) from None

    def engine_request(
        self,
        req: GenerationFields,
        raw: Request,
        ids: list[int],
        field: str,
        plan: Optional[ToolPlan] = None,
        lora: Optional[LoRARequest] = None,
    ) -> ApiRequest:
        arrival = time.monotonic()
        params = sampling_params(req, self.door)
        names = FieldNames(RENAMES, field)
        salt, include = tenant_salt(raw), req.think is not False
        return self.door.conversation_request(
            ids, params, arrival, names, salt, plan, include, lora
        )

    async def answer(
        self, req: GenerationFields, request: ApiRequest, shape: Shape, raw: Request
    ) -> Response:
        """Submit the request; its answer streamed (NDJSON) or whole."""
        sub = await self.door.submit(f"ollama-{uuid.uuid4().hex}", request)
        if req.stream:
            return reply.response(reply.streamed(self.door, sub, shape))
        outputs = await self.door.collect(sub, raw)
        if outputs is None:
            return client_closed()
        return JSONResponse(reply.whole(shape, sub, outputs))

    @staticmethod
    def nothing(req: GenerationFields, shape: Shape) -> Response:
        """The answer to a request with nothing to generate (Ollama loads the model then;
        pagoda's is always loaded), streamed or not as asked."""
        last = shape.empty()
        if req.stream:
            return reply.response(_one(last))
        return JSONResponse(last)


async def _one(obj: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield obj

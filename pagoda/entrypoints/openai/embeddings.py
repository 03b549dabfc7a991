"""OpenAI's ``POST /v1/embeddings``: texts or token ids in, one embedding each out.

``input`` is a text, a list of texts, a list of token ids or a list of token-id lists (what
LangChain's ``OpenAIEmbeddings`` sends by default), at most
:data:`~pagoda.entrypoints.pooling.MAX_POOLING_INPUTS`; ``encoding_format`` ``float`` or
``base64`` (the little-endian float32 bytes, what the ``openai`` client asks for and decodes);
``dimensions`` keeps the first k dimensions of a Matryoshka model, then normalizes (refused
by name for a model without them); vLLM's ``truncate_prompt_tokens``, ``normalize`` and
``priority``. Usage counts the prompt tokens.

Invariant: ``data[i]`` is the embedding of ``input[i]``, and its base64 form decodes to the
same float32 values as its float form.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any, Literal, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.front_door import Usage, client_closed
from pagoda.entrypoints.openai.errors import OPENAI
from pagoda.entrypoints.openai.protocol import _Strict
from pagoda.entrypoints.pooling import check_serves, pool, pooling_params, prompts_of

ROUTE = "/v1/embeddings"


class EmbeddingRequest(_Strict):
    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None  # OpenAI's end-user id: accepted, changes nothing
    # vLLM's
    truncate_prompt_tokens: Optional[int] = None
    normalize: Optional[bool] = None
    priority: int = 0


def endpoint(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/embeddings``."""

    async def embeddings(body: EmbeddingRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await create(ctx, body, raw), ignored)

    return Endpoint(embeddings, OPENAI, OPENAI.error_responses(400, 401, 404, 413, 429, 503))


async def create(ctx: ServerContext, req: EmbeddingRequest, raw: Request) -> Response:
    door = ctx.door
    lora = door.check_model(req.model)
    check_serves(door, "embed", ROUTE)
    params = pooling_params(
        "embed",
        dimensions=req.dimensions,
        normalize=req.normalize,
        truncate_prompt_tokens=req.truncate_prompt_tokens,
    )
    created = int(time.time())
    prompts = prompts_of(door, req.input, "input")
    pooled = await pool(door, "embd", prompts, params, raw, lora=lora)
    if pooled is None:
        return client_closed()
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(v.tolist(), req.encoding_format)}
        for i, v in enumerate(pooled.vectors)
    ]
    return JSONResponse(_body(req.model or door.model_names[0], data, pooled.usage, created))


def _encoded(values: list[float], encoding_format: str) -> Any:
    if encoding_format == "float":
        return values
    packed = struct.pack(f"<{len(values)}f", *values)  # little-endian float32
    return base64.b64encode(packed).decode("ascii")


def _body(model: str, data: list[dict[str, Any]], usage: Usage, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "model": model,
        "created": created,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }

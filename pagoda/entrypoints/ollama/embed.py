"""Ollama's ``POST /api/embed`` (and the older ``/api/embeddings``) on a pooling model.

``/api/embed``: ``input`` a text or a list of texts, ``embeddings`` one L2-normalized vector
each (as Ollama gives them), ``truncate`` (default true) cutting a text to the model's
context instead of refusing it, ``dimensions`` for a Matryoshka model, and the durations
and ``prompt_eval_count`` Ollama reports. ``/api/embeddings``: one ``prompt``, one
``embedding``, not normalized (Ollama's older route). A server of a generation model
refuses both with a 400 naming ``--runner pooling``.

Invariant: ``embeddings[i]`` is the embedding of ``input[i]``.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.field_policy import Tolerant
from pagoda.entrypoints.front_door import client_closed
from pagoda.entrypoints.ollama.errors import OLLAMA
from pagoda.entrypoints.ollama.models import adapter_of, resolve
from pagoda.entrypoints.pooling import check_serves, pool, pooling_params, prompts_of

ERRORS = OLLAMA.error_responses(400, 401, 404, 413, 429, 503)


class EmbedRequest(Tolerant):
    model: Optional[str] = None
    input: Union[str, list[str]]
    truncate: bool = True
    dimensions: Optional[int] = None
    options: Optional[dict[str, Any]] = None  # runner settings in Ollama: nothing to set here
    keep_alive: Optional[Union[str, int, float]] = None  # the model is never unloaded


class EmbeddingsRequest(Tolerant):
    model: Optional[str] = None
    prompt: str
    options: Optional[dict[str, Any]] = None
    keep_alive: Optional[Union[str, int, float]] = None


def embed(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /api/embed``."""

    async def ollama_embed(body: EmbedRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await _embed(ctx, body, raw), ignored)

    return Endpoint(ollama_embed, OLLAMA, ERRORS)


def embeddings(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /api/embeddings`` (Ollama's older route)."""

    async def ollama_embeddings(body: EmbeddingsRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await _embeddings(ctx, body, raw), ignored)

    return Endpoint(ollama_embeddings, OLLAMA, ERRORS)


async def _embed(ctx: ServerContext, req: EmbedRequest, raw: Request) -> Response:
    model = resolve(ctx, req.model)
    door = ctx.door
    check_serves(door, "embed", "/api/embed")
    start = time.monotonic()
    keep = door.engine.max_model_len if req.truncate else None
    params = pooling_params(
        "embed", dimensions=req.dimensions, normalize=True, truncate_prompt_tokens=keep
    )
    prompts = prompts_of(door, req.input, "input")
    pooled = await pool(door, "embed", prompts, params, raw, lora=adapter_of(ctx, model))
    if pooled is None:
        return client_closed()
    return JSONResponse(
        {
            "model": model,
            "embeddings": [v.tolist() for v in pooled.vectors],
            "total_duration": _ns(time.monotonic() - start),
            "load_duration": 0,
            "prompt_eval_count": pooled.usage.prompt_tokens,
        }
    )


async def _embeddings(ctx: ServerContext, req: EmbeddingsRequest, raw: Request) -> Response:
    lora = adapter_of(ctx, resolve(ctx, req.model))
    door = ctx.door
    check_serves(door, "embed", "/api/embeddings")
    if not req.prompt:
        raise ApiError(400, "prompt must not be empty", "prompt")
    params = pooling_params("embed", normalize=False)
    prompts = prompts_of(door, req.prompt, "prompt")
    pooled = await pool(door, "embed", prompts, params, raw, lora=lora)
    if pooled is None:
        return client_closed()
    return JSONResponse({"embedding": pooled.vectors[0].tolist()})


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)

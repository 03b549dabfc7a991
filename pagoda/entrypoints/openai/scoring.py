"""Relevance scores: ``POST /v1/rerank`` and ``/rerank`` (the Jina / Cohere shape, as vLLM and
llama.cpp serve it) and vLLM's ``POST /score`` (and ``/v1/score``).

A cross-encoder (a model serving task ``score``) reads each (query, document) pair
tokenized together, with its segments, and gives one score; an embedding model embeds the
query and the documents and scores by cosine similarity, as vLLM does. Rerank sorts the
documents by score (``top_n`` keeps the best n; ``return_documents`` adds their text);
score pairs ``text_1`` with ``text_2`` one to one, or one ``text_1`` with every ``text_2``.

Invariant: every result's ``index`` is its document's position in the request, and its
score is the same whichever route or pairing asked for it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Sequence, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import FrontDoor, Prompt, Usage, client_closed
from pagoda.entrypoints.openai.errors import OPENAI
from pagoda.entrypoints.openai.protocol import _Strict
from pagoda.entrypoints.pooling import (
    MAX_POOLING_INPUTS,
    check_serves,
    cosine,
    pair_prompts,
    pool,
    pooling_params,
    serves,
)
from pagoda.lora_request import LoRARequest

ERRORS = OPENAI.error_responses(400, 401, 404, 413, 429, 503)


class RerankDocument(_Strict):
    text: str


class RerankRequest(_Strict):
    model: Optional[str] = None
    query: str
    documents: list[Union[str, RerankDocument]]
    top_n: Optional[int] = None  # None or 0: every document
    return_documents: bool = True
    # vLLM's
    truncate_prompt_tokens: Optional[int] = None
    priority: int = 0


class ScoreRequest(_Strict):
    model: Optional[str] = None
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    # vLLM's
    truncate_prompt_tokens: Optional[int] = None
    priority: int = 0


# ------------------------------------------------------------------ endpoints
def rerank(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/rerank`` and ``/rerank``."""

    async def rerank(body: RerankRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await _rerank(ctx.door, body, raw), ignored)

    return Endpoint(rerank, OPENAI, ERRORS)


def score(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /score`` and ``/v1/score``."""

    async def score(body: ScoreRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await _score(ctx.door, body, raw), ignored)

    return Endpoint(score, OPENAI, ERRORS)


# ------------------------------------------------------------------ rerank
async def _rerank(door: FrontDoor, req: RerankRequest, raw: Request) -> Response:
    lora = door.check_model(req.model)
    docs = [d if isinstance(d, str) else d.text for d in req.documents]
    _check_texts([req.query], "query")
    _check_texts(docs, "documents")
    if req.top_n is not None and req.top_n < 0:
        raise ApiError(400, f"top_n must be 0 or more, got {req.top_n}", "top_n")
    queries = [req.query] * len(docs)
    scored = await _relevance(door, queries, docs, req.truncate_prompt_tokens, raw, lora)
    if scored is None:
        return client_closed()
    scores, usage = scored
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    if req.top_n:
        order = order[: req.top_n]
    results = [
        _rerank_result(i, scores[i], docs[i] if req.return_documents else None) for i in order
    ]
    return JSONResponse(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "object": "list",
            "model": req.model or door.model_names[0],
            "results": results,
            "usage": _usage(usage),
        }
    )


def _rerank_result(index: int, value: float, text: Optional[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"index": index, "relevance_score": value}
    if text is not None:
        result["document"] = {"text": text}
    return result


# ------------------------------------------------------------------ score
async def _score(door: FrontDoor, req: ScoreRequest, raw: Request) -> Response:
    lora = door.check_model(req.model)
    firsts = [req.text_1] if isinstance(req.text_1, str) else list(req.text_1)
    seconds = [req.text_2] if isinstance(req.text_2, str) else list(req.text_2)
    _check_texts(firsts, "text_1")
    _check_texts(seconds, "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)  # one to many
    elif len(firsts) != len(seconds):
        raise ApiError(
            400,
            f"text_1 and text_2 must be as long as each other (one to one) or text_1 a single "
            f"text (one to many); got {len(firsts)} and {len(seconds)}",
            "text_2",
        )
    created = int(time.time())
    scored = await _relevance(door, firsts, seconds, req.truncate_prompt_tokens, raw, lora)
    if scored is None:
        return client_closed()
    scores, usage = scored
    return JSONResponse(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": created,
            "model": req.model or door.model_names[0],
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": _usage(usage),
        }
    )


# ------------------------------------------------------------------ shared
def _check_texts(texts: Sequence[str], field: str) -> None:
    if not texts:
        raise ApiError(400, f"{field} must not be empty", field)
    if len(texts) > MAX_POOLING_INPUTS:
        raise ApiError(
            400, f"{field} holds {len(texts)} texts; at most {MAX_POOLING_INPUTS} a request", field
        )
    for i, text in enumerate(texts):
        if not text:
            where = field if len(texts) == 1 else f"{field}[{i}]"
            raise ApiError(400, f"{where} must not be an empty string", where)


async def _relevance(
    door: FrontDoor,
    queries: list[str],
    docs: list[str],
    truncate: Optional[int],
    raw: Request,
    lora: Optional[LoRARequest] = None,
) -> Optional[tuple[list[float], Usage]]:
    """The score of each (query, document) pair: a cross-encoder's, else the cosine of the
    two embeddings. None when the client left."""
    if serves(door, "score"):
        params = pooling_params("score", truncate_prompt_tokens=truncate)
        pairs = pair_prompts(door, queries, docs)
        pooled = await pool(door, "score", pairs, params, raw, lora=lora)
        if pooled is None:
            return None
        return [float(v.reshape(-1)[0]) for v in pooled.vectors], pooled.usage
    check_serves(door, "embed", "scoring")
    return await _cosine_scores(door, queries, docs, truncate, raw, lora)


async def _cosine_scores(
    door: FrontDoor,
    queries: list[str],
    docs: list[str],
    truncate: Optional[int],
    raw: Request,
    lora: Optional[LoRARequest],
) -> Optional[tuple[list[float], Usage]]:
    """Each distinct text embedded once (a rerank's query once, not per document)."""
    texts = list(dict.fromkeys([*queries, *docs]))
    where = {text: i for i, text in enumerate(texts)}
    prompts = [Prompt(door.engine.encode(t), t) for t in texts]
    params = pooling_params("embed", truncate_prompt_tokens=truncate)
    pooled = await pool(door, "score", prompts, params, raw, lora=lora)
    if pooled is None:
        return None
    vectors = pooled.vectors
    scores = [
        cosine(vectors[where[q]], vectors[where[d]]) for q, d in zip(queries, docs, strict=True)
    ]
    return scores, pooled.usage


def _usage(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}

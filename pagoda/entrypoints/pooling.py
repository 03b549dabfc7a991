"""Pooling requests at the edge, for every dialect: texts or token ids in, one vector each out.

The embedding, rerank, score and classify routes (OpenAI's and vLLM's shapes in
``openai/embeddings.py`` and ``openai/scoring.py``, Ollama's in ``ollama/embed.py``) share
what is here: the check that the served model pools for the task asked (a 400 naming
``--runner pooling`` or the task, before anything is queued), the inputs turned into
prompts (a list of texts or of token-id lists, bounded), a (query, document) pair tokenized
together for a cross-encoder, one submission through the front door for all of a request's
inputs, and cosine similarity for rerank and score on an embedding model (what vLLM does
when the model has no cross-encoder head).

Invariant: a pooling route queues nothing it cannot serve, and every request it queued is
finished or aborted when its HTTP exchange ends (the front door's rule).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from fastapi import Request

from pagoda.entrypoints.dialect import tenant_salt
from pagoda.entrypoints.errors import ApiError, engine_value_error
from pagoda.entrypoints.front_door import ApiRequest, FieldNames, FrontDoor, Prompt, Usage
from pagoda.lora_request import LoRARequest
from pagoda.pooling_params import PoolingParams, PoolingTask

MAX_POOLING_INPUTS = 2048  # inputs per request (OpenAI's limit for embeddings)
NOT_POOLING = "model_not_pooling"
TASK_NOT_SERVED = "task_not_supported"

Inputs = Union[str, list[str], list[int], list[list[int]]]


@dataclass(frozen=True)
class Pooled:
    """A pooling request's results, in input order, and its usage."""

    vectors: list[torch.Tensor]
    usage: Usage


def pooling_params(task: PoolingTask, **fields: Any) -> PoolingParams:
    """The request's pooling params; a bad value is a 400 naming its field."""
    try:
        return PoolingParams(task, **fields)
    except ValueError as e:
        raise engine_value_error(e, {}) from None


def check_serves(door: FrontDoor, task: PoolingTask, route: str) -> None:
    """A 400 unless the served model pools for ``task``, naming what to change."""
    engine = door.engine
    name = door.model_names[0]
    if engine.runner_kind != "pooling":
        raise ApiError(
            400,
            f"{route} needs a pooling model: model {name!r} is served for text generation; "
            "serve an embedding or reranking model with --runner pooling",
            "model",
            NOT_POOLING,
        )
    if task not in engine.pooling_tasks:
        served = ", ".join(sorted(engine.pooling_tasks)) or "nothing"
        raise ApiError(
            400,
            f"{route} needs a model that serves task {task!r}; model {name!r} serves {served}",
            "model",
            TASK_NOT_SERVED,
        )


def serves(door: FrontDoor, task: PoolingTask) -> bool:
    return door.engine.runner_kind == "pooling" and task in door.engine.pooling_tasks


def prompts_of(door: FrontDoor, inputs: Inputs, field: str) -> list[Prompt]:
    """``input`` as OpenAI takes it: a text, a list of texts, a list of token ids, or a list
    of token-id lists; each becomes one prompt. Empty inputs are refused by name."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ApiError(400, f"{field} must not be empty", field)
    if all(isinstance(t, int) for t in inputs):
        return [_ids_prompt(list(inputs), field)]  # type: ignore[arg-type]
    if len(inputs) > MAX_POOLING_INPUTS:
        raise ApiError(
            400,
            f"{field} holds {len(inputs)} inputs; at most {MAX_POOLING_INPUTS} a request",
            field,
        )
    prompts = []
    for i, item in enumerate(inputs):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            if not item:
                raise ApiError(400, f"{where} must not be an empty string", where)
            prompts.append(Prompt(door.engine.encode(item), item))
        elif isinstance(item, list):
            prompts.append(_ids_prompt(item, where))
        else:
            raise ApiError(400, f"{where} must be a text or a list of token ids", where)
    return prompts


def _ids_prompt(ids: list[int], where: str) -> Prompt:
    if not ids:
        raise ApiError(400, f"{where} must not be an empty list of token ids", where)
    return Prompt(ids)


def pair_prompts(door: FrontDoor, queries: Sequence[str], docs: Sequence[str]) -> list[Prompt]:
    """Each (query, document) pair as one cross-encoder prompt, with its segments."""
    prompts = []
    for query, doc in zip(queries, docs, strict=True):
        ids, types = door.engine.encode_pair(query, doc)
        prompts.append(Prompt(ids, None, types))
    return prompts


async def pool(
    door: FrontDoor,
    prefix: str,
    prompts: list[Prompt],
    params: PoolingParams,
    raw: Request,
    names: Optional[FieldNames] = None,
    lora: Optional[LoRARequest] = None,
) -> Optional[Pooled]:
    """Every prompt through the engine in one submission (under the LoRA adapter the
    request's ``model`` named, if any); None when the client left."""
    request = ApiRequest(
        prompts,
        params,
        time.monotonic(),
        cache_salt=tenant_salt(raw),
        names=names or FieldNames(prompt="input"),
        lora=lora,
    )
    sub = await door.submit(f"{prefix}-{uuid.uuid4().hex}", request)
    outputs = await door.collect(sub, raw)
    if outputs is None:
        return None
    done = [o for o in outputs if o is not None]
    vectors = []
    for out in done:
        assert out.pooled is not None, f"request {out.request_id} finished without a vector"
        vectors.append(out.pooled)
    # The tokens the engine read: a truncated prompt counts its kept tokens.
    usage = Usage(sum(o.num_prompt_tokens for o in done), 0, sum(o.num_cached_tokens for o in done))
    return Pooled(vectors, usage)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine similarity of two embeddings (rerank and score on an embedding model)."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))

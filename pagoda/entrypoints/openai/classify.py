"""vLLM's ``POST /classify``: texts in, each text's class probabilities and its label out.

For a sequence-classification model (a model serving task ``classify``): ``probs`` are the
head's outputs after its activation (softmax over the classes, or sigmoid for one label or
a multi-label head), ``label`` the name of the most probable class as the checkpoint's
``id2label`` gives it.

Invariant: ``data[i]`` is the classification of ``input[i]``.
"""

from __future__ import annotations

import time
import uuid
from typing import Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.front_door import FrontDoor, client_closed
from pagoda.entrypoints.openai.errors import OPENAI
from pagoda.entrypoints.openai.protocol import _Strict
from pagoda.entrypoints.pooling import check_serves, pool, pooling_params, prompts_of


class ClassifyRequest(_Strict):
    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    # vLLM's
    truncate_prompt_tokens: Optional[int] = None
    priority: int = 0


def endpoint(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /classify`` and ``/v1/classify``."""

    async def classify(body: ClassifyRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await _classify(ctx.door, body, raw), ignored)

    return Endpoint(classify, OPENAI, OPENAI.error_responses(400, 401, 404, 413, 429, 503))


async def _classify(door: FrontDoor, req: ClassifyRequest, raw: Request) -> Response:
    lora = door.check_model(req.model)
    check_serves(door, "classify", "/classify")
    params = pooling_params("classify", truncate_prompt_tokens=req.truncate_prompt_tokens)
    created = int(time.time())
    prompts = prompts_of(door, req.input, "input")
    pooled = await pool(door, "classify", prompts, params, raw, lora=lora)
    if pooled is None:
        return client_closed()
    labels = door.engine.class_labels
    data = []
    for i, probs in enumerate(pooled.vectors):
        values = probs.tolist()
        best = max(range(len(values)), key=values.__getitem__)
        label = labels[best] if best < len(labels) else f"LABEL_{best}"
        data.append({"index": i, "label": label, "probs": values, "num_classes": len(values)})
    tokens = pooled.usage.prompt_tokens
    return JSONResponse(
        {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": created,
            "model": req.model or door.model_names[0],
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )

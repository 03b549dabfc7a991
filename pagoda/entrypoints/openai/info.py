"""The server's routes beside generation, each a route-table handler: the model cards
(``/v1/models``, vLLM's card: the base, then each LoRA adapter with the base as its
``parent``), ``/version``, vLLM's ``/tokenize``, ``/detokenize`` and
``/tokenizer_info``, ``/health`` (503 once the engine has died) and ``/metrics``
(Prometheus). Errors are OpenAI's shape."""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import pagoda
from pagoda.entrypoints.adapters import Entry
from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import ServedEngine
from pagoda.entrypoints.openai.chat import chat_prompt
from pagoda.entrypoints.openai.errors import OPENAI, error_response
from pagoda.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest

ERRORS = (400, 401, 404, 413, 429, 503)


# ---------------------------------------------------------------- models
def models(ctx: ServerContext) -> Endpoint:
    async def models() -> dict:
        adapters = [_adapter_card(ctx, e) for e in ctx.door.adapters.entries()]
        return {"object": "list", "data": [_card(ctx), *adapters]}

    return Endpoint(models, OPENAI)


def model(ctx: ServerContext) -> Endpoint:
    async def model(model_id: str) -> dict:
        if ctx.door.check_model(model_id) is None:
            return _card(ctx)
        entry = ctx.door.adapters.entry(model_id)
        assert entry is not None  # check_model found it
        return _adapter_card(ctx, entry)

    return Endpoint(model, OPENAI, OPENAI.error_responses(404))


def _card(ctx: ServerContext) -> dict[str, Any]:
    """The served model as vLLM's ``ModelCard`` describes it: ``root`` is what it was loaded
    from (``vllm bench serve`` without ``--model`` reads it), ``parent`` the base model of an
    adapter (none: this is the base), ``permission`` OpenAI's old permission object."""
    config = ctx.config
    root = config.model_root or config.model_names[0]
    return _model_card(ctx, config.model_names[0], root, None, ctx.created)


def _adapter_card(ctx: ServerContext, entry: Entry) -> dict[str, Any]:
    """A LoRA adapter's card, as vLLM's: ``root`` its path, ``parent`` the base's name."""
    lora = entry.lora
    return _model_card(ctx, lora.lora_name, lora.lora_path, entry.parent, entry.created)


def _model_card(
    ctx: ServerContext, name: str, root: str, parent: Optional[str], created: int
) -> dict[str, Any]:
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "pagoda",
        "root": root,
        "parent": parent,
        "max_model_len": ctx.door.engine.max_model_len,
        "permission": [
            {
                "id": f"modelperm-{digest}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


# ---------------------------------------------------------------- server
def version(ctx: ServerContext) -> Endpoint:
    async def version() -> dict:
        return {"version": pagoda.__version__}

    return Endpoint(version, OPENAI)


def health(ctx: ServerContext) -> Endpoint:
    async def health() -> Response:
        if ctx.async_engine.is_dead:
            return error_response(503, "the engine has died", code="engine_dead")
        return JSONResponse({"status": "ok"})

    return Endpoint(health, OPENAI, OPENAI.error_responses(503))


def metrics(ctx: ServerContext) -> Endpoint:
    async def prometheus_metrics() -> Response:
        if ctx.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Endpoint(prometheus_metrics, OPENAI)


# ---------------------------------------------------------------- tokenizer
def tokenizer_info(ctx: ServerContext) -> Endpoint:
    async def tokenizer_info() -> dict:
        return _tokenizer_info(ctx.door.engine)

    return Endpoint(tokenizer_info, OPENAI)


def tokenize(ctx: ServerContext) -> Endpoint:
    async def tokenize(body: TokenizeRequest) -> Response:
        ignored = ctx.policy.check(body)
        return reported(JSONResponse(_tokenize(ctx, body)), ignored)

    return Endpoint(tokenize, OPENAI, OPENAI.error_responses(*ERRORS))


def detokenize(ctx: ServerContext) -> Endpoint:
    engine = ctx.door.engine

    async def detokenize(body: DetokenizeRequest) -> Response:
        ignored = ctx.policy.check(body)
        ctx.door.check_model(body.model)
        vocab = engine.arch.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens must be in [0, {vocab}); got {bad[:3]}", "tokens")
        return reported(JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)}), ignored)

    return Endpoint(detokenize, OPENAI, OPENAI.error_responses(*ERRORS))


def _tokenizer_info(engine: ServedEngine) -> dict[str, Any]:
    """vLLM's ``GET /tokenizer_info``: what a remote client needs to tokenize as the server
    does (lm-eval's remote tokenizer reads the special tokens and the chat template; it
    tokenizes through /tokenize and /detokenize)."""
    tok = engine.tokenizer
    info: dict[str, Any] = {
        "tokenizer_class": type(tok).__name__,
        "model_max_length": engine.max_model_len,
        "chat_template": getattr(engine, "chat_template", None),
    }
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        info[name] = value if isinstance(value, str) else None
    return info


def _tokenize(ctx: ServerContext, body: TokenizeRequest) -> dict:
    ctx.door.check_model(body.model)
    engine = ctx.door.engine
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt or messages", "prompt")
    if body.prompt is not None:
        ids = list(engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
    else:
        assert body.messages is not None  # exactly one of the two is given (checked above)
        ids = chat_prompt(engine, body.messages)
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

"""``pagoda serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over an AsyncEngine.

Every bad request is answered with an OpenAI-style error naming the field (400, 401, 404,
413, 429), never a 500; only a dead engine answers 5xx. See docs/server.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pagoda
from pagoda.engine.async_engine import AdmissionLimits, AsyncEngine, EngineDeadError
from pagoda.engine.metrics import EngineMetrics
from pagoda.entrypoints.field_policy import (
    IGNORED_FIELDS_HEADER,
    UNKNOWN_FIELD_CODE,
    FieldPolicy,
    UnknownFieldError,
    header_value,
)
from pagoda.entrypoints.openai.args import DEFAULT_MAX_BODY_BYTES
from pagoda.entrypoints.openai.errors import ApiError, error_response, is_union_tag, loc_to_param
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
)
from pagoda.entrypoints.openai.serving import OpenAIServing

if TYPE_CHECKING:
    from pagoda.config import EngineArgs
    from pagoda.engine.llm_engine import LLMEngine

logger = logging.getLogger("pagoda.server")

# /inspect is the inspector's static page (no data): its data routes take the key.
OPEN_PATHS = (
    "/health",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/inspect",
)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


@dataclass(frozen=True)
class CorsConfig:
    """vLLM's CORS flags (``--allowed-origins`` and friends), given to Starlette's middleware."""

    allowed_origins: tuple[str, ...]
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False


@dataclass(frozen=True)
class ServerConfig:
    model_names: tuple[str, ...]
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    enable_debug_endpoints: bool = False
    tool_call_parser: Optional[str] = None
    enable_inspector: bool = True  # GET /inspect and its data routes (docs/inspector.md)
    inspector_show_text: bool = False
    strict_fields: bool = False  # undeclared fields refused (400), not reported
    model_root: Optional[str] = None  # what the model was loaded from (a path or Hub id)
    cors: Optional[CorsConfig] = None  # None: no CORS headers (browsers refuse other origins)
    reasoning_parser: Optional[str] = None  # the model's thinking tags (reasoning.py)


def cache_salt_for_key(key: str) -> str:
    """Each API key is a tenant: its requests share cached prefixes only with each other."""
    return "key-" + hashlib.sha256(b"pagoda-cache-salt\x00" + key.encode()).hexdigest()[:32]


# -------------------------------------------------------------- middleware
class BodyLimitMiddleware:
    """413 for a body over the limit (by Content-Length, or counted as it arrives); the
    app then gets the body replayed, and later receive() calls (disconnects) pass through."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if _content_length(scope) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = error_response(
            413, f"request body is over {self.max_bytes} bytes", "body", "request_too_large"
        )
        await resp(scope, receive, send)


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every path but /health and /metrics; compared with
    hmac.compare_digest against every key, so the time does not tell which byte differed.
    The matched key's cache salt goes into ``scope["state"]["cache_salt"]``."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        key = self._match(_bearer(scope))
        if key is None:
            resp = error_response(
                401,
                "invalid or missing API key (Authorization: Bearer ...)",
                "authorization",
                "invalid_api_key",
            )
            return await resp(scope, receive, send)
        scope.setdefault("state", {})["cache_salt"] = cache_salt_for_key(key.decode())
        await self.app(scope, receive, send)

    def _match(self, given: bytes) -> Optional[bytes]:
        found = None
        for key in self.keys:
            if hmac.compare_digest(given, key):
                found = key
        return found


def _bearer(scope: Scope) -> bytes:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


# ----------------------------------------------------------------- errors
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_response(e.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(UnknownFieldError)
    async def unknown_field(_: Request, e: UnknownFieldError) -> JSONResponse:
        return error_response(400, str(e), e.param, UNKNOWN_FIELD_CODE)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(503, str(e), code="engine_dead")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return error_response(500, f"internal error: {type(e).__name__}")


def _validation_response(errors: Sequence[dict[str, Any]]) -> JSONResponse:
    if not errors:
        return error_response(400, "invalid request")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {err.get('msg')}", "body", "invalid_json")
    param = loc_to_param(err.get("loc", ()))
    if err.get("type") == "missing":
        message = f"{param} is required"
    elif any(is_union_tag(p) for p in err.get("loc", ())[1:]):
        message = f"{param}: wrong type or value (got {_short(err.get('input'))})"
    else:
        message = f"{param or 'body'}: {err.get('msg')}"
        if "input" in err and err["type"] != "model_attributes_type":
            message += f" (got {_short(err['input'])})"
    return error_response(400, message, param or "body")


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------- routes
def build_app(
    async_engine: AsyncEngine, config: ServerConfig, metrics: Optional[EngineMetrics] = None
) -> FastAPI:
    serving = OpenAIServing(
        async_engine, list(config.model_names), config.tool_call_parser, config.reasoning_parser
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="pagoda", version="0.1.0", lifespan=lifespan)
    _install_error_handlers(app)
    policy = FieldPolicy(config.strict_fields)
    _add_generation_routes(app, serving, policy)
    _add_info_routes(app, serving, config, metrics, policy)
    if config.enable_debug_endpoints:
        _add_debug_routes(app, async_engine)
    _add_inspector(app, async_engine, config)
    if config.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=config.api_keys)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.cors is not None:  # outermost: a preflight is answered before the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors.allowed_origins),
            allow_methods=list(config.cors.allowed_methods),
            allow_headers=list(config.cors.allowed_headers),
            allow_credentials=config.cors.allow_credentials,
            expose_headers=[IGNORED_FIELDS_HEADER],
        )
    return app


def _add_inspector(app: FastAPI, async_engine: AsyncEngine, config: ServerConfig) -> None:
    inspector = getattr(async_engine.engine, "inspector", None)  # fakes in tests have none
    if not config.enable_inspector or inspector is None:
        return
    from pagoda.entrypoints.openai.inspector import add_inspector_routes

    inspector.show_text = config.inspector_show_text
    add_inspector_routes(app, async_engine, inspector)


def _salt(raw: Request) -> Optional[str]:
    return raw.scope.get("state", {}).get("cache_salt")


def _add_generation_routes(app: FastAPI, serving: OpenAIServing, policy: FieldPolicy) -> None:
    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        ignored = policy.check(body)
        return _reported(await serving.create_completion(body, raw, _salt(raw)), ignored)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        ignored = policy.check(body)
        return _reported(await serving.create_chat_completion(body, raw, _salt(raw)), ignored)


def _reported(response: Response, ignored: list[str]) -> Response:
    """``response`` with the request's undeclared fields named in its header."""
    if ignored:
        response.headers[IGNORED_FIELDS_HEADER] = header_value(ignored)
    return response


def _add_info_routes(
    app: FastAPI,
    serving: OpenAIServing,
    config: ServerConfig,
    metrics: Optional[EngineMetrics],
    policy: FieldPolicy,
) -> None:
    engine = serving.engine
    created = int(time.time())

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if serving.async_engine.is_dead:
            return error_response(503, "the engine has died", code="engine_dead")
        return JSONResponse({"status": "ok"})

    def card() -> dict[str, Any]:
        return model_card(config, created, engine.max_model_len)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", responses={404: {"model": ErrorResponse}})
    async def model(model_id: str) -> dict:
        serving.check_model(model_id)
        return card()

    @app.get("/version")
    async def version() -> dict:
        return {"version": pagoda.__version__}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return _tokenizer_info(engine)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        if metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> Response:
        ignored = policy.check(body)
        return _reported(JSONResponse(_tokenize(serving, body)), ignored)

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> Response:
        ignored = policy.check(body)
        serving.check_model(body.model)
        vocab = engine.arch.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens must be in [0, {vocab}); got {bad[:3]}", "tokens")
        return _reported(JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)}), ignored)


def model_card(config: ServerConfig, created: int, max_model_len: int) -> dict[str, Any]:
    """The served model as vLLM's ``ModelCard`` describes it: ``root`` is what it was loaded
    from (``vllm bench serve`` without ``--model`` reads it), ``parent`` the base model of an
    adapter (none here), ``permission`` OpenAI's old permission object."""
    digest = hashlib.sha256(config.model_names[0].encode()).hexdigest()[:24]
    return {
        "id": config.model_names[0],
        "object": "model",
        "created": created,
        "owned_by": "pagoda",
        "root": config.model_root or config.model_names[0],
        "parent": None,
        "max_model_len": max_model_len,
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


def _tokenizer_info(engine: Any) -> dict[str, Any]:
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


def _tokenize(serving: OpenAIServing, body: TokenizeRequest) -> dict:
    serving.check_model(body.model)
    engine = serving.engine
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt or messages", "prompt")
    if body.prompt is not None:
        ids = list(engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
    else:
        assert body.messages is not None  # exactly one of the two is given (checked above)
        ids = serving.chat_prompt(body.messages)
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}


def _add_debug_routes(app: FastAPI, async_engine: AsyncEngine) -> None:
    """Off unless --enable-debug-endpoints: engine internals for tests and operators."""

    @app.get("/debug/state")
    async def debug_state() -> dict:
        return await async_engine.call(_engine_state)

    @app.post("/debug/fault")
    async def debug_fault() -> dict:
        async_engine.inject_fault()
        return {"status": "the next engine step will raise"}


def _engine_state(engine: Any) -> dict:
    """Runs on the engine thread."""
    try:
        engine.check_invariants()
        broken = None
    except AssertionError as e:
        broken = str(e) or "an invariant does not hold"
    stats = engine.stats().scheduler
    return {
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "num_unfinished": int(engine.has_unfinished_requests()),
        "num_free_blocks": stats.num_free_blocks,
        "num_blocks": stats.num_blocks,
        "invariants_ok": broken is None,
        "invariant_error": broken,
    }


# -------------------------------------------------------------------- CLI
def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    import uvicorn

    app = build_app_from_args(ns, engine_args)
    # Everything alive now (the model, the tokenizer, the app) lives until exit: move it out of
    # the collector's generations, so the full collections that serving sets off do not walk
    # it each time (one cost about 190 ms on the bundled model: docs/inspector.md).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level, timeout_graceful_shutdown=5
    )
    return 0


def build_app_from_args(ns: argparse.Namespace, engine_args: EngineArgs) -> FastAPI:
    """Load the engine as the options say, log what is served, and build the app."""
    import torch

    from pagoda.engine.llm_engine import LLMEngine

    if logging.getLogger("pagoda").getEffectiveLevel() > logging.INFO:
        logging.getLogger("pagoda").setLevel(logging.INFO)  # say what is being served
    threads: list[int] = []

    def make_engine() -> LLMEngine:
        # On the engine's own thread (AsyncEngine.on_own_thread), where every torch kernel
        # of the server runs: torch's thread count is that thread's OpenMP setting.
        if ns.num_threads is not None:
            torch.set_num_threads(ns.num_threads)
        threads.append(torch.get_num_threads())
        return LLMEngine(dataclasses.replace(engine_args, serving=True))

    metrics = EngineMetrics()
    async_engine = AsyncEngine.on_own_thread(make_engine, metrics=metrics)
    engine = async_engine.engine
    assert isinstance(engine, LLMEngine)  # the one make_engine built
    max_tokens = ns.max_queued_prompt_tokens or engine.num_blocks * engine.block_size
    async_engine.limits = AdmissionLimits(ns.max_queued_requests, max_tokens)
    config = _server_config(ns, engine, engine_args)
    metrics.add_vllm_names(config.model_names[0])
    logger.info(
        "pagoda serve: model %s (%s), dtype %s, KV cache %d blocks x %d = %d tokens, "
        "max_model_len %d, %d torch threads, listening on http://%s:%d",
        config.model_names[0],
        engine_args.model or "bundled",
        engine.dtype,
        engine.num_blocks,
        engine.block_size,
        engine.num_blocks * engine.block_size,
        engine.max_model_len,
        threads[0],
        ns.host,
        ns.port,
    )
    return build_app(async_engine, config, metrics)


def _server_config(
    ns: argparse.Namespace, engine: LLMEngine, engine_args: EngineArgs
) -> ServerConfig:
    env_key = os.environ.get("PAGODA_API_KEY")
    keys = tuple(ns.api_key or ([env_key] if env_key else []))
    names = (ns.served_model_name or engine.model_name, engine.model_name, engine_args.model)
    return ServerConfig(
        tuple(dict.fromkeys(n for n in names if n)),
        keys,
        ns.max_request_body_bytes,
        ns.enable_debug_endpoints,
        ns.tool_call_parser,
        ns.enable_inspector,
        ns.inspector_show_text,
        ns.strict_fields,
        _model_root(engine_args),
        cors_config(ns),
        ns.reasoning_parser,
    )


def _model_root(engine_args: EngineArgs) -> str:
    """What the model was loaded from, as vLLM's card's ``root`` says it: the ``--model``
    given (a path, a Hub id, a .gguf file), or the bundled model's file. ``vllm bench serve``
    without ``--model`` loads its tokenizer from it."""
    if engine_args.model:
        return engine_args.model
    from pagoda.models.loader import default_model_path

    return default_model_path()


def cors_config(ns: argparse.Namespace) -> Optional[CorsConfig]:
    """CORS as the flags ask; off (None) unless ``--allowed-origins`` names an origin."""
    if not ns.allowed_origins:
        return None
    return CorsConfig(
        tuple(ns.allowed_origins),
        tuple(ns.allowed_methods),
        tuple(ns.allowed_headers),
        ns.allow_credentials,
    )

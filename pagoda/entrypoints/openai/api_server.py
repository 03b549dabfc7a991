"""``pagoda serve``: the HTTP server (FastAPI + uvicorn) over an AsyncEngine, for every API
dialect it speaks (OpenAI's today).

The app is built from the route table (``entrypoints/routes.py``): each route's handler
factory makes its endpoint (``dialect.py``), over one front door to the engine
(``front_door.py``). Around them sit what every dialect shares: the body limit (413), the
API keys (401, and each key's cache salt), CORS, and the error handlers, which render each
error in the shape of the dialect that owns the route. Every bad request is answered with
an error naming the field (400, 401, 404, 413, 429), never a 500; only a dead engine
answers 5xx. See docs/server.md and docs/architecture.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda import envs
from pagoda.engine.async_engine import AdmissionLimits, AsyncEngine, EngineDeadError
from pagoda.engine.metrics import EngineMetrics
from pagoda.entrypoints import errors
from pagoda.entrypoints.adapters import AdapterCatalog, LoRAServing
from pagoda.entrypoints.dialect import Dialect, ServerContext, resolve
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.field_policy import IGNORED_FIELDS_HEADER, FieldPolicy, UnknownFieldError
from pagoda.entrypoints.front_door import FrontDoor, ServedEngine
from pagoda.entrypoints.openai.args import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_RESPONSES_STORE_BYTES,
    DEFAULT_RESPONSES_STORE_ENTRIES,
)
from pagoda.entrypoints.openai.errors import OPENAI
from pagoda.entrypoints.routes import ROUTES

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
DEFAULT_DIALECT = OPENAI  # the error shape of a path no route matches
Render = Callable[[Scope, ApiError], Response]  # an error, in the shape of its route's dialect


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
    responses_store_entries: int = DEFAULT_RESPONSES_STORE_ENTRIES  # /v1/responses' store
    responses_store_bytes: int = DEFAULT_RESPONSES_STORE_BYTES
    lora: LoRAServing = LoRAServing()  # the LoRA adapters served, and runtime loads


def cache_salt_for_key(key: str) -> str:
    """Each API key is a tenant: its requests share cached prefixes only with each other."""
    return "key-" + hashlib.sha256(b"pagoda-cache-salt\x00" + key.encode()).hexdigest()[:32]


# -------------------------------------------------------------- middleware
class BodyLimitMiddleware:
    """413 for a body over the limit (by Content-Length, or counted as it arrives); the
    app then gets the body replayed, and later receive() calls (disconnects) pass through."""

    def __init__(self, app: ASGIApp, max_bytes: int, render: Render) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.render = render

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
        message = f"request body is over {self.max_bytes} bytes"
        resp = self.render(scope, ApiError(413, message, "body", "request_too_large"))
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
    """``Authorization: Bearer KEY`` (or Anthropic's ``x-api-key: KEY``) on every path but
    /health and /metrics; compared with
    hmac.compare_digest against every key, so the time does not tell which byte differed.
    The matched key's cache salt goes into ``scope["state"]["cache_salt"]``."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], render: Render) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        key = self._match(_bearer(scope)) or self._match(_x_api_key(scope))
        if key is None:
            message = "invalid or missing API key (Authorization: Bearer ... or x-api-key)"
            error = ApiError(401, message, "authorization", "invalid_api_key")
            return await self.render(scope, error)(scope, receive, send)
        scope.setdefault("state", {})["cache_salt"] = cache_salt_for_key(key.decode())
        await self.app(scope, receive, send)

    def _match(self, given: bytes) -> Optional[bytes]:
        found = None
        for key in self.keys:
            if hmac.compare_digest(given, key):
                found = key
        return found


def _x_api_key(scope: Scope) -> bytes:
    """Anthropic's header for the key (its SDK and Claude Code send it)."""
    for name, value in scope.get("headers", []):
        if name == b"x-api-key":
            return value.strip()
    return b""


def _bearer(scope: Scope) -> bytes:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


class JsonBodyMiddleware:
    """A POST body sent with another Content-Type (or none) to a route whose dialect reads
    every body as JSON (``Dialect.json_any_content_type``: Ollama's) is passed on as JSON."""

    def __init__(self, app: ASGIApp, owners: Owners) -> None:
        self.app = app
        self.owners = owners

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not _is_json(scope):
            if self.owners.dialect(scope).json_any_content_type:
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


# ----------------------------------------------------------------- errors
class Owners:
    """Which dialect owns each route, so that an error is rendered in its shape: by the
    route a request matched (fully, or by path only: a 405), else the default dialect."""

    def __init__(self) -> None:
        self.routes: list[tuple[BaseRoute, Dialect]] = []

    def add(self, route: BaseRoute, dialect: Dialect) -> None:
        self.routes.append((route, dialect))

    def dialect(self, scope: Scope) -> Dialect:
        for route, dialect in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return dialect
        return DEFAULT_DIALECT

    def render(self, scope: Scope, error: ApiError) -> Response:
        return self.dialect(scope).render_error(error)


def _install_error_handlers(app: FastAPI, owners: Owners) -> None:
    def render(request: Request, error: ApiError) -> Response:
        return owners.render(request.scope, error)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return render(request, e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        return render(request, errors.validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        return render(request, ApiError(e.status_code, str(e.detail), headers=e.headers))

    @app.exception_handler(UnknownFieldError)
    async def unknown_field(request: Request, e: UnknownFieldError) -> Response:
        return render(request, errors.unknown_field(e))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError) -> Response:
        return render(request, errors.engine_dead(e, 503))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> Response:
        logger.exception("unexpected error while serving a request")
        return render(request, ApiError(500, f"internal error: {type(e).__name__}"))


# ----------------------------------------------------------------- routes
def build_app(
    async_engine: AsyncEngine[ServedEngine],
    config: ServerConfig,
    metrics: Optional[EngineMetrics] = None,
) -> FastAPI:
    names = list(config.model_names)
    adapters = AdapterCatalog(config.lora, names, async_engine.engine.arch)
    adapters.add_modules()  # before the server listens: a bad adapter stops the start
    door = FrontDoor(
        async_engine, names, config.tool_call_parser, config.reasoning_parser, adapters
    )
    ctx = ServerContext(async_engine, door, config, FieldPolicy(config.strict_fields), metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="pagoda", version="0.1.0", lifespan=lifespan)
    owners = _add_routes(app, ctx)
    _install_error_handlers(app, owners)
    app.add_middleware(JsonBodyMiddleware, owners=owners)
    if config.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=config.api_keys, render=owners.render)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, render=owners.render)
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


def _add_routes(app: FastAPI, ctx: ServerContext) -> Owners:
    """Every route of the table whose handler makes an endpoint (an optional part that is
    off makes none), and which dialect owns it."""
    owners = Owners()
    for route in ROUTES:
        endpoint = resolve(route.handler)(ctx)
        if endpoint is None:
            if not route.optional:
                raise RuntimeError(f"{route.handler} made no endpoint for {route.path}")
            continue
        app.add_api_route(
            route.path,
            endpoint.call,
            methods=[route.method],
            responses=dict(endpoint.responses) or None,
            include_in_schema=endpoint.include_in_schema,
        )
        owners.add(app.router.routes[-1], endpoint.dialect)
    return owners


# -------------------------------------------------------------------- CLI
def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    import uvicorn

    app = build_app_from_args(ns, engine_args)
    # Everything alive now (the model, the tokenizer, the app) lives until exit: move it out of
    # the collector's generations, so the full collections that serving sets off do not walk
    # it each time (what one costs: docs/inspector.md).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level, timeout_graceful_shutdown=5
    )
    return 0


def build_app_from_args(ns: argparse.Namespace, engine_args: EngineArgs) -> FastAPI:
    """Load the engine as the options say, log what is served, and build the app."""
    import torch

    from pagoda.engine.build import build_engine
    from pagoda.engine.llm_engine import LLMEngine

    if logging.getLogger("pagoda").getEffectiveLevel() > logging.INFO:
        logging.getLogger("pagoda").setLevel(logging.INFO)  # say what is being served
    threads: list[int] = []

    def make_engine() -> ServedEngine:
        # On the engine's own thread (AsyncEngine.on_own_thread), where every torch kernel
        # of the server runs: torch's thread count is that thread's OpenMP setting.
        if ns.num_threads is not None:
            torch.set_num_threads(ns.num_threads)
        threads.append(torch.get_num_threads())
        return build_engine(dataclasses.replace(engine_args, serving=True))

    metrics = EngineMetrics()
    async_engine = AsyncEngine.on_own_thread(make_engine, metrics=metrics)
    engine = async_engine.engine
    assert isinstance(engine, LLMEngine)  # the one make_engine built
    max_tokens = ns.max_queued_prompt_tokens or engine.num_blocks * engine.block_size
    async_engine.limits = AdmissionLimits(ns.max_queued_requests, max_tokens)
    config = _server_config(ns, engine, engine_args)
    metrics.add_vllm_names(config.model_names[0])
    app = build_app(async_engine, config, metrics)  # reads the --lora-modules adapters
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
    return app


def _server_config(
    ns: argparse.Namespace, engine: LLMEngine, engine_args: EngineArgs
) -> ServerConfig:
    env_key = envs.API_KEY()
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
        responses_store_entries=ns.responses_store_entries,
        responses_store_bytes=ns.responses_store_bytes,
        lora=lora_serving(ns, engine_args),
    )


def lora_serving(ns: argparse.Namespace, engine_args: EngineArgs) -> LoRAServing:
    """The LoRA flags: adapters to read at start, and whether (and from where) runtime
    loads are taken (``--allow-runtime-lora``, or vLLM's environment switch)."""
    return LoRAServing(
        engine_args.enable_lora,
        engine_args.max_lora_rank,
        tuple(getattr(ns, "lora_modules", None) or ()),
        bool(getattr(ns, "allow_runtime_lora", False)) or envs.ALLOW_RUNTIME_LORA_UPDATING(),
        tuple(getattr(ns, "lora_allowed_dir", None) or ()),
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

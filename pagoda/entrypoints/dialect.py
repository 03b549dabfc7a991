"""What a dialect module gives ``pagoda serve``, and what it is given.

Each route of the table (``routes.py``) names its handler as ``"module:factory"``. The
server imports it, calls ``factory(ctx)`` with the :class:`ServerContext` (the front door to
the engine, the server's config, the field policy, the metrics) and registers the
:class:`Endpoint` it returns: the function FastAPI calls (its parameters say what it reads,
a typed body, the raw ``Request``), the :class:`Dialect` that renders the route's errors,
and its OpenAPI extras. A factory returns None for an optional part that is off (debug
endpoints without their flag, the inspector when disabled).

Invariant: an error on a route is rendered by the dialect that owns it, wherever it was
raised (a body that fails validation, a field the policy refuses, the engine, a missing
key); a path no route matches gets the default dialect's shape (OpenAI's).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.field_policy import IGNORED_FIELDS_HEADER, FieldPolicy, header_value
from pagoda.entrypoints.front_door import FrontDoor, ServedEngine

if TYPE_CHECKING:
    from pagoda.engine.async_engine import AsyncEngine
    from pagoda.engine.metrics import EngineMetrics
    from pagoda.entrypoints.openai.api_server import ServerConfig


@dataclass(frozen=True)
class Dialect:
    """An API pagoda speaks, as far as the shared path needs to know it."""

    name: str  # "openai", ...
    render_error: Callable[[ApiError], Response]  # the error in this API's own shape
    error_model: Optional[type[BaseModel]] = None  # that shape, for the OpenAPI schema
    # Bodies read as JSON whatever their Content-Type says (Ollama's server does; its docs'
    # `curl -d '{...}'` examples send a form type).
    json_any_content_type: bool = False

    def error_responses(self, *statuses: int) -> dict[int | str, dict[str, Any]]:
        """OpenAPI's ``responses`` for these statuses, in this dialect's error shape."""
        if self.error_model is None:
            return {}
        return {status: {"model": self.error_model} for status in statuses}


@dataclass(frozen=True)
class Endpoint:
    """A route's handler, as its factory made it for one server."""

    call: Callable[..., Awaitable[Any]]  # FastAPI reads its parameters (body model, Request)
    dialect: Dialect
    responses: Mapping[int | str, dict[str, Any]] = field(default_factory=dict)
    include_in_schema: bool = True


@dataclass
class ServerContext:
    """What every handler factory of one ``pagoda serve`` app is given."""

    async_engine: AsyncEngine[ServedEngine]
    door: FrontDoor
    config: ServerConfig
    policy: FieldPolicy
    metrics: Optional[EngineMetrics] = None
    created: int = field(default_factory=lambda: int(time.time()))  # the model card's time


Factory = Callable[[ServerContext], Optional[Endpoint]]


def resolve(handler: str) -> Factory:
    """The factory a route names: ``"pagoda.entrypoints.openai.chat:endpoint"``."""
    module, _, name = handler.partition(":")
    factory: Factory = getattr(importlib.import_module(module), name)
    return factory


# ---------------------------------------------------------------- helpers for handlers
def tenant_salt(raw: Request) -> Optional[str]:
    """The cache salt of the request's API key (ApiKeyMiddleware), if keys are on."""
    salt: Optional[str] = raw.scope.get("state", {}).get("cache_salt")
    return salt


def reported(response: Response, ignored: list[str]) -> Response:
    """``response`` with the request's undeclared fields named in its header (the field
    policy's, ``field_policy.py``)."""
    if ignored:
        response.headers[IGNORED_FIELDS_HEADER] = header_value(ignored)
    return response

"""Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}`` with a
status code, and :data:`ANTHROPIC`, the dialect of the Messages routes.

The status is the shared path's (``entrypoints/errors.py``); its type is Anthropic's name
for it: 400 ``invalid_request_error``, 401 ``authentication_error``, 403
``permission_error``, 404 ``not_found_error``, 413 ``request_too_large``, 429
``rate_limit_error`` (admission control: the queue is full), 500 and 503 ``api_error`` (a
dead engine is a failure of the server, not a load it could shed later), 529
``overloaded_error``. Anthropic's shape has no ``param``, so the field is named in the
message.

Invariant: every error on these routes, mid-stream too, is in this shape and names the field
it is about.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from pagoda.entrypoints.anthropic.protocol import ErrorResponse
from pagoda.entrypoints.dialect import Dialect
from pagoda.entrypoints.errors import ApiError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def message_of(e: ApiError) -> str:
    """The message, naming the field when it does not already."""
    if e.param and e.param not in e.message:
        return f"{e.param}: {e.message}"
    return e.message


def error_body(e: ApiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(e.status), "message": message_of(e)}}


def render(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


ANTHROPIC = Dialect("anthropic", render, ErrorResponse)

"""OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with a status
code, and :data:`OPENAI`, the dialect of every route that answers that way (and of paths no
route matches)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from fastapi.responses import JSONResponse

from pagoda.entrypoints.dialect import Dialect
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.openai.protocol import ErrorResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


def error_body(
    status: int, message: str, param: Optional[str] = None, code: Optional[str] = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: Optional[str] = None,
    code: Optional[str] = None,
    headers: Optional[Mapping[str, str]] = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, param, code), status_code=status, headers=headers
    )


def render(e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code, e.headers)


def stream_error(e: ApiError) -> dict[str, Any]:
    """The error event a stream ends with (then ``[DONE]``)."""
    return error_body(e.status, e.message, e.param, e.code)


OPENAI = Dialect("openai", render, ErrorResponse)

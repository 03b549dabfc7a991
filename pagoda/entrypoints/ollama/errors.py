"""Ollama's error shape: ``{"error": "message"}`` with the status code, and :data:`OLLAMA`,
the dialect of every ``/api/...`` route. The message always names the field it is about
(Ollama's shape has no ``param``): a message that does not name it is prefixed with it."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pagoda.entrypoints.dialect import Dialect
from pagoda.entrypoints.errors import ApiError


class ErrorResponse(BaseModel):
    error: str


def message(e: ApiError) -> str:
    """The error's message, naming its field."""
    if e.param and e.param != "body" and e.param not in e.message:
        return f"{e.param}: {e.message}"
    return e.message


def error_body(e: ApiError) -> dict[str, Any]:
    return {"error": message(e)}


def render(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


def not_found(model: str) -> ApiError:
    """Ollama's answer for a model it does not have."""
    return ApiError(404, f"model '{model}' not found", "model", "model_not_found")


OLLAMA = Dialect("ollama", render, ErrorResponse, json_any_content_type=True)

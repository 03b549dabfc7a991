"""Errors in one neutral form, whatever API a request came through.

Everything that can go wrong with a request is raised as an :class:`ApiError` (a status, a
message, the field it names, a code, extra headers), or converted to one here: FastAPI's
request-validation errors, the field policy's ``UnknownFieldError``, Starlette's HTTP errors,
the engine's ``ValueError`` (whose message starts with the engine's name of the field),
admission's ``QueueFullError`` and a dead engine. The dialect that owns the route renders
it in its own shape (OpenAI's ``{"error": {...}}``, ``openai/errors.py``).

Invariant: a bad request becomes a 4xx naming the field as the client spelled it; only a
dead engine, or a bug, is a 5xx.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any, Mapping, Optional, Sequence

from pagoda.engine.async_engine import EngineDeadError, QueueFullError
from pagoda.entrypoints.field_policy import UNKNOWN_FIELD_CODE, UnknownFieldError
from pagoda.pooling_params import PoolingParams
from pagoda.sampling import SamplingParams

# The engine's names for the fields its ValueErrors start with.
ENGINE_FIELDS = (
    tuple(f.name for f in fields(SamplingParams))
    + tuple(f.name for f in fields(PoolingParams))
    + ("prompt", "kv_transfer_params", "priority", "model")
)
ENGINE_DEAD = "engine_dead"
QUEUE_FULL = "queue_full"


class ApiError(Exception):
    """A request's failure, before any dialect has shaped it."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


# ------------------------------------------------------------ from the engine
def engine_value_error(
    e: ValueError, renames: Mapping[str, str], default_param: Optional[str] = None
) -> ApiError:
    """A 400 for a ValueError whose message starts with the engine's name of the field,
    told in the client's terms (``renames``: engine name -> request name)."""
    message = str(e)
    param = param_from_message(message, ENGINE_FIELDS)
    if param is not None and param in renames:
        message, param = renames[param] + message[len(param) :], renames[param]
    return ApiError(400, message, param or default_param)


def engine_dead(e: EngineDeadError, status: int) -> ApiError:
    """The engine died: 503 before a request was taken, 500 for one it was serving."""
    return ApiError(status, str(e), code=ENGINE_DEAD)


def queue_full(e: QueueFullError) -> ApiError:
    return ApiError(429, str(e), code=QUEUE_FULL, headers={"Retry-After": str(e.retry_after)})


def param_from_message(message: str, known: Sequence[str]) -> Optional[str]:
    """SamplingParams and the engine start their messages with the field's name."""
    first = message.split(" ", 1)[0].rstrip(":,")
    return first if first.split(".", 1)[0] in known else None


# ------------------------------------------------------------ from the HTTP layer
def unknown_field(e: UnknownFieldError) -> ApiError:
    return ApiError(400, str(e), e.param, UNKNOWN_FIELD_CODE)


def validation_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """FastAPI's request-validation errors (pydantic's, strict): the first, naming its field."""
    if not errors:
        return ApiError(400, "invalid request")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {err.get('msg')}", "body", "invalid_json")
    param = loc_to_param(err.get("loc", ()))
    if err.get("type") == "missing":
        message = f"{param} is required"
    elif any(is_union_tag(p) for p in err.get("loc", ())[1:]):
        message = f"{param}: wrong type or value (got {_short(err.get('input'))})"
    else:
        message = f"{param or 'body'}: {err.get('msg')}"
        if "input" in err and err["type"] != "model_attributes_type":
            message += f" (got {_short(err['input'])})"
    return ApiError(400, message, param or "body")


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def is_union_tag(part: Any) -> bool:
    """Pydantic puts the union member it tried into the loc: 'str', 'list[int]', ..."""
    text = str(part)
    return text in TYPE_TAGS or "[" in text or "-" in text


def loc_to_param(loc: Sequence[Any]) -> Optional[str]:
    """("body", "messages", 0, "role") -> "messages[0].role"; union tags dropped."""
    out = ""
    for p in loc:
        if p == "body" and not out:
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif not is_union_tag(p):
            out += ("." if out else "") + str(p)
    return out or None


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a status code."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


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


def param_from_message(message: str, known: Sequence[str]) -> Optional[str]:
    """SamplingParams and the engine start their messages with the field's name."""
    first = message.split(" ", 1)[0].rstrip(":,")
    return first if first.split(".", 1)[0] in known else None

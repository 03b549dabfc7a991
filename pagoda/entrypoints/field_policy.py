"""What the API does with a field it was sent: one policy for every dialect pagoda serves.

- A field a request model declares is **used** (validated strictly: a string is not a
  number), or declared as **ignored** because it cannot change the answer (``metadata``,
  ``store``, the keys an assistant message carries back), or **refused** with a 400 naming it
  when it would change the answer and pagoda does not implement it (``protocol.UNSUPPORTED``).
- A field no model declares, at any depth (the request, a message, a content part,
  ``stream_options``), is **accepted and reported**: a warning logged once per field name,
  and the response's ``x-pagoda-ignored-fields`` header listing where each one was.
  ``--strict-fields`` refuses those too (400 naming the first).
- ``null`` means the default wherever a field has one (clients send ``"n": null``).

Clients send fields no server declares (Open WebUI's ``num_ctx``, an SDK's newer keys on an
assistant message it sends back); vLLM forbade extras once and reverted it for that reason.
Invariant: a field is never dropped without being named, in a log line and in the answer.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger(__name__)

IGNORED_FIELDS_HEADER = "x-pagoda-ignored-fields"
UNKNOWN_FIELD_CODE = "unknown_field"
MAX_HEADER_FIELDS = 32  # the header names at most these, then how many more
MAX_NAME_CHARS = 128  # a name longer than this is cut (a header's size is bounded)
MAX_LOGGED_NAMES = 1000  # distinct names logged; a client inventing names cannot flood the log


class Tolerant(BaseModel):
    """A request model under the policy: strict types, undeclared fields kept aside (in
    ``model_extra``) to be reported, and ``null`` for a field with a default read as that
    default."""

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaulted = {
            field.alias or name
            for name, field in cls.model_fields.items()
            if not field.is_required() and field.get_default(call_default_factory=True) is not None
        }
        return {k: v for k, v in data.items() if not (v is None and k in defaulted)}


def unknown_fields(model: BaseModel, path: str = "") -> list[str]:
    """Where ``model`` (and the models inside it, through lists and dicts) holds fields its
    class does not declare: ``["num_ctx", "messages[1].refusal_v2"]``."""
    found = [_join(path, name) for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        found += _unknown_in(getattr(model, name), _join(path, name))
    return found


def _unknown_in(value: Any, path: str) -> list[str]:
    if isinstance(value, BaseModel):
        return unknown_fields(value, path)
    if isinstance(value, (list, tuple)):
        return [f for i, v in enumerate(value) for f in _unknown_in(v, f"{path}[{i}]")]
    return []


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class FieldPolicy:
    """The server's handling of undeclared fields (``--strict-fields`` or not)."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def check(self, request: BaseModel) -> list[str]:
        """The request's undeclared fields, logged (once per name); raises
        :class:`UnknownFieldError` for the first one under ``--strict-fields``."""
        found = unknown_fields(request)
        if found and self.strict:
            raise UnknownFieldError(_quoted(found[0]))
        for param in found:
            self._log_once(param)
        return found

    def _log_once(self, param: str) -> None:
        name = _leaf(param)
        with self._lock:
            if name in self._logged or len(self._logged) > MAX_LOGGED_NAMES:
                return
            self._logged.add(name)
            full = len(self._logged) > MAX_LOGGED_NAMES
        logger.warning(
            "ignored a field this server does not know: %s (reported in the %s header; "
            "--strict-fields refuses such requests)%s",
            _quoted(param),
            IGNORED_FIELDS_HEADER,
            f"; no more new names are logged after {MAX_LOGGED_NAMES}" if full else "",
        )


class UnknownFieldError(ValueError):
    def __init__(self, param: str) -> None:
        super().__init__(
            f"{param} is not a field this server knows (--strict-fields refuses undeclared fields)"
        )
        self.param = param


def _leaf(param: str) -> str:
    """``messages[1].refusal_v2`` -> ``refusal_v2``: what a field is called wherever it is."""
    return param.rsplit(".", 1)[-1].split("[", 1)[0]


def header_value(fields: list[str]) -> str:
    """The header's value: the fields' paths, comma-separated, each once, percent-encoded
    where a name is not plain ASCII (or holds a comma); past MAX_HEADER_FIELDS, ``+N more``."""
    unique = [_quoted(f) for f in dict.fromkeys(fields)]
    if len(unique) > MAX_HEADER_FIELDS:
        rest = len(unique) - MAX_HEADER_FIELDS
        unique = unique[:MAX_HEADER_FIELDS] + [f"+{rest} more"]
    return ",".join(unique)


def _quoted(param: str) -> str:
    """``param`` safe in a header and a log line (a name may be any JSON string)."""
    text = quote(param, safe="[]._-", errors="surrogatepass")
    return text if len(text) <= MAX_NAME_CHARS else text[:MAX_NAME_CHARS] + "..."

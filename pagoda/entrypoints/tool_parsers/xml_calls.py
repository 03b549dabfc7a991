"""Qwen3-Coder's XML tool calls (``qwen3_coder``), anywhere in the answer::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Oslo
    </parameter>
    </function>
    </tool_call>

(``<function=...>`` without the ``<tool_call>`` around it is read too.) A parameter's value is
its text between the tags less one newline at each end; it is converted by the type the
tool's JSON schema declares for it (``integer``, ``number``, ``boolean``, ``null``,
``object`` / ``array`` as JSON or a Python literal; ``type`` lists, ``anyOf`` / ``oneOf``
and ``enum`` values say which); a value that does not convert, or a parameter the schema
does not type, stays a string. A parameter whose closing tag is missing ends at the next
``<parameter=`` or ``</function>``.

The arguments are rendered as a JSON object, one member a parameter: the call goes out when
``<function=name>`` is read, then each parameter once its value is complete, then the
closing brace; the pieces join to exactly the finished call's arguments. Invariant: a
parameter is rendered only once its value can no longer change.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from pagoda.entrypoints.tool_parsers.base import (
    PENDING,
    Block,
    Call,
    Calls,
    NotCall,
    Output,
    Pending,
    Piece,
    closed_by,
    expect,
    read_marked,
    render_json,
)
from pagoda.entrypoints.tool_parsers.json_scan import skip_ws
from pagoda.entrypoints.tool_parsers.python_calls import PARSE_ERRORS, NotLiteral, literal

TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"
_VALUE_ENDS = (PARAMETER_END, PARAMETER, FUNCTION_END)
_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_JSON_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    type(None): "null",
    list: "array",
    dict: "object",
}


@dataclass(frozen=True)
class _Parameter:
    rendered: str  # '"key": value'
    end: int  # where reading goes on after it


def read_qwen3_coder(out: Output) -> list[Piece]:
    return read_marked(out, (TOOL_CALL, FUNCTION), (_wrapped, _function))


def _wrapped(out: Output, pos: int) -> Block:
    after = expect(out, pos, FUNCTION)
    if after is None:
        return NotCall(pos)
    if isinstance(after, Pending):
        return PENDING
    block = _function(out, after)
    if not isinstance(block, Calls) or block.end is None:
        return block
    return closed_by(out, block, TOOL_CALL_END)


def _function(out: Output, start: int) -> Block:
    """What follows ``<function=``: the name, then the parameters up to ``</function>``."""
    text = out.text
    close = text.find(">", start)
    written = text[start : close if close >= 0 else len(text)]
    if "<" in written or "\n" in written or (close >= 0 and not written.strip()):
        return NotCall(start)
    if close < 0:
        return NotCall(start) if out.final else PENDING
    name = written.strip()
    properties = _properties(out.schemas.get(name))
    rendered: list[str] = []
    i = close + 1
    while True:
        i = skip_ws(text, i)
        if text.startswith(FUNCTION_END, i):
            return Calls((Call(name, _render(rendered, True)),), i + len(FUNCTION_END))
        if text.startswith(PARAMETER, i):
            parameter = _parameter(out, i + len(PARAMETER), properties)
            if isinstance(parameter, _Parameter):
                rendered.append(parameter.rendered)
                i = parameter.end
                continue
            if parameter is None:  # a broken parameter ends the call
                return Calls((Call(name, _render(rendered, True)),), i)
        elif not (i == len(text) or _may_open(out, text[i:])):
            return Calls((Call(name, _render(rendered, True)),), i)
        return Calls((Call(name, _render(rendered, out.final)),), None)


def _may_open(out: Output, tail: str) -> bool:
    return not out.final and (PARAMETER.startswith(tail) or FUNCTION_END.startswith(tail))


def _parameter(
    out: Output, start: int, properties: Mapping[str, Any]
) -> Union[_Parameter, Pending, None]:
    """What follows ``<parameter=``: the key, ``>``, and the value up to its end."""
    key = ("parameter", start)
    if key in out.memo:
        return out.memo[key]  # settled by an earlier reading of the growing answer
    parameter = _read_parameter(out, start, properties)
    if not isinstance(parameter, Pending):
        out.memo[key] = parameter
    return parameter


def _read_parameter(
    out: Output, start: int, properties: Mapping[str, Any]
) -> Union[_Parameter, Pending, None]:
    text = out.text
    close = text.find(">", start)
    written = text[start : close if close >= 0 else len(text)]
    if "<" in written or "\n" in written or (close >= 0 and not written.strip()):
        return None
    if close < 0:
        return None if out.final else PENDING
    name = written.strip()
    ends = [(at, tag) for tag in _VALUE_ENDS if (at := text.find(tag, close + 1)) >= 0]
    if ends:
        at, tag = min(ends)
        after = at + len(tag) if tag == PARAMETER_END else at
    elif out.final:  # cut: the value as far as it goes
        at = after = len(text)
    else:
        return PENDING
    value = convert(_trim(text[close + 1 : at]), properties.get(name))
    return _Parameter(f"{render_json(name)}: {render_json(value)}", after)


def _render(members: list[str], closed: bool) -> str:
    return "{" + ", ".join(members) + ("}" if closed else "")


def _trim(value: str) -> str:
    """The value less the newline the template writes after the opening tag and before the
    closing one."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


# ------------------------------------------------------------------ schema types
def _properties(schema: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
    props = (schema or {}).get("properties")
    return props if isinstance(props, Mapping) else {}


def declared_types(schema: Any) -> set[str]:
    """The JSON types a parameter's schema allows (empty: it does not say). A schema is
    the client's: anything in it that is not what JSON Schema spells is ignored."""
    if not isinstance(schema, Mapping):
        return set()
    types = set(_strings(schema.get("type")))
    for key in ("anyOf", "oneOf"):
        for option in _listed(schema.get(key)):
            types |= declared_types(option)
    values = _listed(schema.get("enum")) + ([schema["const"]] if "const" in schema else [])
    return types | {_JSON_TYPES[type(v)] for v in values if type(v) in _JSON_TYPES}


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in _listed(value) if isinstance(v, str)]


def convert(value: str, schema: Any) -> Any:
    """``value`` as the first of the schema's types it reads as; else the string."""
    types = declared_types(schema)
    if "integer" in types and (number := _number(value)) is not None:
        if isinstance(number, int) or number.is_integer():
            return int(number)
    for kind in ("null", "boolean", "number", "object", "array"):
        if kind in types and (converted := _as(kind, value.strip())) is not None:
            return converted[0]
    return value


def _as(kind: str, value: str) -> Optional[tuple[Any]]:
    """``value`` read as ``kind``, in a 1-tuple (None: it does not read as one)."""
    if kind == "null":
        return (None,) if value.lower() == "null" else None
    if kind == "boolean":
        return (value.lower() == "true",) if value.lower() in ("true", "false") else None
    if kind == "number":
        number = _number(value)
        return None if number is None else (number,)
    parsed = _structure(value)
    wanted = dict if kind == "object" else list
    return (parsed,) if isinstance(parsed, wanted) else None


def _number(value: str) -> Union[int, float, None]:
    text = value.strip()
    if not _NUMBER.fullmatch(text):
        return None
    try:
        number = int(text) if _INTEGER.fullmatch(text) else float(text)
    except ValueError:  # more digits than Python converts
        return None
    return number if not isinstance(number, float) or number - number == 0 else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads' NaN and Infinity


def _structure(value: str) -> Any:
    """A JSON object or array, or the same written as a Python literal (None: neither)."""
    try:
        return json.loads(value, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        pass
    try:
        return literal(ast.parse(value, mode="eval").body)
    except (NotLiteral, *PARSE_ERRORS):
        return None

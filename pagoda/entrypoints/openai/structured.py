"""The API's constrained-decoding fields -> the engine's :class:`StructuredOutputsParams`.

Two spellings reach the same engine feature: OpenAI's ``response_format`` (``json_object``,
or ``json_schema`` with a schema) and vLLM's ``structured_outputs`` (``json``, ``regex``,
``choice``, ``grammar``, ``json_object``). Errors name the field as the client sent it.
"""

from __future__ import annotations

import json
from typing import Optional

from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.openai.protocol import SamplingFields, StructuredOutputsField
from pagoda.sampling import StructuredOutputsParams

# An engine message about structured_outputs.json names response_format's field instead.
RESPONSE_FORMAT_RENAMES = {
    "structured_outputs.json": "response_format.json_schema.schema",
    "structured_outputs.json_object": "response_format",
}


# vLLM's older fields, each one of structured_outputs' keys.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_params(req: SamplingFields) -> Optional[StructuredOutputsParams]:
    """The request's output constraint, None if it has none; ValueError (naming the
    engine's field, see :func:`error_renames`) or ApiError if it is malformed."""
    guided = _from_guided(req)  # raises where it meets structured_outputs
    fmt, so = req.response_format, req.structured_outputs or guided
    if fmt is not None and fmt.type != "text" and so is not None:
        raise ApiError(
            400,
            "response_format and structured_outputs cannot both constrain the output",
            "structured_outputs" if req.structured_outputs else _guided_given(req)[0],
        )
    if so is not None:
        return _from_structured_outputs(so)
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise ApiError(
                400,
                "response_format.json_schema needs type json_schema",
                "response_format.json_schema",
            )
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(
            400,
            "response_format of type json_schema needs json_schema.schema",
            "response_format.json_schema.schema",
        )
    return StructuredOutputsParams(json=json.dumps(fmt.json_schema.schema_))


def error_renames(req: SamplingFields) -> dict[str, str]:
    """How the engine's field names read in this request's terms."""
    fmt = req.response_format
    if fmt is not None and fmt.type != "text" and req.structured_outputs is None:
        return RESPONSE_FORMAT_RENAMES
    if req.structured_outputs is None and _guided_given(req):
        return {f"structured_outputs.{key}": name for name, key in GUIDED_FIELDS.items()}
    return {}


def _guided_given(req: SamplingFields) -> list[str]:
    return [name for name in GUIDED_FIELDS if getattr(req, name) is not None]


def _from_guided(req: SamplingFields) -> Optional[StructuredOutputsField]:
    """vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` as
    the ``structured_outputs`` they mean (at most one; not beside structured_outputs)."""
    given = _guided_given(req)
    if not given:
        return None
    if req.structured_outputs is not None or len(given) > 1:
        others = given[1:] or ["structured_outputs"]
        raise ApiError(400, f"{given[0]} cannot be combined with {others[0]}", given[0])
    key = GUIDED_FIELDS[given[0]]
    return StructuredOutputsField.model_validate({key: getattr(req, given[0])})


def _from_structured_outputs(so: StructuredOutputsField) -> StructuredOutputsParams:
    schema = so.json_
    return StructuredOutputsParams(
        json=json.dumps(schema) if isinstance(schema, dict) else schema,
        json_object=bool(so.json_object),
        regex=so.regex,
        choice=tuple(so.choice) if so.choice is not None else None,
        grammar=so.grammar,
    )

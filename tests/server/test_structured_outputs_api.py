"""Structured outputs through the official ``openai`` client against a live ``pagoda serve``:
``response_format`` (json_schema, json_object, and the SDK's ``parse()`` with a pydantic
model), vLLM's ``structured_outputs`` (json, regex, choice, grammar), streaming and not;
every output parses and validates. Bad grammars are a 400 naming the field, and the server
stays healthy with no block leaked."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pydantic
import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0},
        "coastal": {"type": "boolean"},
        "rivers": {"type": "array", "items": {"type": "string", "maxLength": 8},
                   "maxItems": 2},
        "climate": {"enum": ["dry", "wet", "mild"]},
    },
    "required": ["city", "population", "coastal", "rivers", "climate"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe a city as JSON."}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    size: int


def _json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema,
                                                  "strict": True}}


def _assert_healthy(server) -> None:
    state = httpx.get(server.url + "/debug/state").json()
    assert state["invariants_ok"], state
    assert state["num_free_blocks"] == state["num_blocks"], "a block leaked"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_json_schema_validates(client, model_name: str, temperature: float) -> None:
    out = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=300, temperature=temperature, seed=4, n=2,
        response_format=_json_format(SCHEMA))
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_json_schema_equals_the_non_streamed_answer(client, model_name: str) -> None:
    kw = dict(model=model_name, messages=CHAT, max_tokens=300, temperature=0,
              response_format=_json_format(SCHEMA))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stream=True, **kw) if c.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), SCHEMA)


def test_parse_with_a_pydantic_model(client, model_name: str) -> None:
    done = client.chat.completions.parse(model=model_name, messages=CHAT, max_tokens=200,
                                         temperature=0, response_format=City)
    city = done.choices[0].message.parsed
    assert isinstance(city, City) and len(city.name) <= 10


def test_json_object_and_completions(client, model_name: str) -> None:
    out = client.completions.create(model=model_name, prompt="A JSON object:", max_tokens=200,
                                    temperature=0, extra_body={"response_format":
                                                               {"type": "json_object"}})
    text = out.choices[0].text
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:                                   # a random model may not close a string in time
        assert out.choices[0].finish_reason == "length" and text.startswith("{")


@pytest.mark.parametrize("field, value, check", [
    ("regex", r"[A-Z][a-z]{2,6} [0-9]{2}", lambda t: re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{2}", t)),
    ("choice", ["north", "south", "east/west"], lambda t: t in ("north", "south", "east/west")),
    ("grammar", 'start: "x=" DIGIT+\nDIGIT: /[0-9]/', lambda t: re.fullmatch(r"x=[0-9]+", t)),
    ("json", SCHEMA, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
])
def test_vllm_structured_outputs(client, model_name: str, field: str, value, check) -> None:
    for stream in (False, True):
        kw = dict(model=model_name, messages=CHAT, max_tokens=40 if field != "json" else 300,
                  temperature=0, extra_body={"structured_outputs": {field: value}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kw) if c.choices)
        else:
            out = client.chat.completions.create(**kw).choices[0]
            assert out.finish_reason == "stop"
            text = out.message.content
        assert check(text), (field, text)


@pytest.mark.parametrize("body, param", [
    ({"response_format": _json_format({"type": "object", "properties": {
        "a": {"$ref": "#/$defs/missing"}}})}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
    ({"structured_outputs": {"json": "x" * 300_000}}, "structured_outputs.json"),
])
def test_bad_constraints_are_a_400_naming_the_field(server, model_name: str, body: dict,
                                                    param: str) -> None:
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": model_name, "messages": CHAT, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    _assert_healthy(server)

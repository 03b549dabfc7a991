"""The bundled SmolLM2-135M-Instruct behind ``pagoda serve``, through the official client: a
JSON-schema answer (``parse()`` with a pydantic model) and a required tool call, streaming
and not, all parse and validate."""
from __future__ import annotations

import json
from typing import Iterator

import httpx
import jsonschema
import pydantic
import pytest
from server_utils import ServerProcess, start_server

from pagoda.models.loader import default_model_path

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"], "additionalProperties": False}}}


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    population: int


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(default_model_path(), tmp_path_factory.mktemp("smol-logs"),
                       "--max-num-batched-tokens", "512")
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.fixture(scope="module")
def sclient(smol: ServerProcess):
    from openai import OpenAI

    with OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _model(smol: ServerProcess) -> str:
    return httpx.get(smol.url + "/v1/models").json()["data"][0]["id"]


def test_parse_a_city(smol, sclient) -> None:
    done = sclient.chat.completions.parse(
        model=_model(smol), max_tokens=80, temperature=0, response_format=City,
        messages=[{"role": "user", "content": "Name a big city and its population, as JSON."}])
    city = done.choices[0].message.parsed
    assert isinstance(city, City) and city.name
    kw = dict(model=_model(smol), max_tokens=200, temperature=0,
              response_format={"type": "json_schema", "json_schema": {
                  "name": "City", "schema": City.model_json_schema()}},
              messages=[{"role": "user", "content": "Name a big city and its population."}])
    whole = sclient.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), City.model_json_schema())
    text = "".join(c.choices[0].delta.content or ""
                   for c in sclient.chat.completions.create(stream=True, **kw) if c.choices)
    assert text == whole.message.content


def test_required_tool_call(smol, sclient) -> None:
    out = sclient.chat.completions.create(
        model=_model(smol), max_tokens=60, temperature=0, tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}]).choices[0]
    assert out.finish_reason == "tool_calls"
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments),
                        WEATHER["function"]["parameters"])

"""The field policy (pagoda/entrypoints/field_policy.py) on live servers: a field no request
model declares is served, changes nothing and is named (the x-pagoda-ignored-fields header,
one log line per name); --strict-fields refuses it with a 400 naming it; null means the
default; a known field pagoda does not implement stays a 400; what the openai SDK leaves on
an assistant message (model_dump(), parse()) goes back unchanged on the next turn."""
from __future__ import annotations

import json
from typing import Iterator, Literal

import httpx
import pytest
from pydantic import BaseModel
from server_utils import ServerProcess, start_server

HEADER = "x-pagoda-ignored-fields"
# Where clients put fields no server declares: Open WebUI's options at the top, LiteLLM's
# cache_control on a content part, keys on a message, a newer stream option.
UNKNOWN = {
    "num_ctx": 4096,
    "keep_alive": "5m",
    "messages[0].x_note": "kept by an agent framework",
    "messages[0].content[0].cache_control": {"type": "ephemeral"},
    "stream_options.x_future_option": True,
}


def _chat_body(model: str, unknown: bool, stream: bool = False) -> dict:
    part: dict = {"type": "text", "text": "Name a colour."}
    message: dict = {"role": "user", "content": [part]}
    body: dict = {"model": model, "messages": [message], "max_tokens": 6, "temperature": 0,
                  "ignore_eos": True, "stream": stream,
                  "stream_options": {"include_usage": True} if stream else None}
    if unknown:
        body.update(num_ctx=4096, keep_alive="5m")
        message["x_note"] = "kept by an agent framework"
        part["cache_control"] = {"type": "ephemeral"}
        if stream:
            body["stream_options"]["x_future_option"] = True
    return body


def _streamed_text(r: httpx.Response) -> str:
    chunks = [json.loads(line[6:]) for line in r.iter_lines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_unknown_fields_at_every_level_are_served_unchanged_and_named(server, model_name):
    url = server.url + "/v1/chat/completions"
    plain = httpx.post(url, json=_chat_body(model_name, unknown=False), timeout=60)
    extra = httpx.post(url, json=_chat_body(model_name, unknown=True), timeout=60)
    assert plain.status_code == extra.status_code == 200, extra.text
    assert HEADER not in plain.headers
    assert set(extra.headers[HEADER].split(",")) == set(UNKNOWN) - {"stream_options.x_future_option"}
    assert extra.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    with httpx.stream("POST", url, json=_chat_body(model_name, True, stream=True),
                      timeout=60) as r:
        assert r.status_code == 200
        assert set(r.headers[HEADER].split(",")) == set(UNKNOWN)
        assert _streamed_text(r) == plain.json()["choices"][0]["message"]["content"]


def test_each_unknown_name_is_logged_once(server, model_name):
    for _ in range(3):
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": model_name, "prompt": "hi", "max_tokens": 2, "x_logged_once_probe": 1})
        assert r.status_code == 200, r.text
        assert r.headers[HEADER] == "x_logged_once_probe"
    assert server.log().count("does not know: x_logged_once_probe") == 1


def test_null_means_the_default(server, model_name):
    nulls = {"n": None, "min_tokens": None, "ignore_eos": None, "skip_special_tokens": None,
             "include_stop_str_in_output": None, "stream": None, "stream_options": None,
             "logprobs": None, "top_logprobs": None, "temperature": None, "stop": None,
             "tools": None, "tool_choice": None, "response_format": None, "seed": None}
    base = {"model": model_name, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}
    r = httpx.post(server.url + "/v1/chat/completions", json={**base, **nulls}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and HEADER not in r.headers
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": model_name, "prompt": "hi", "max_tokens": 4, "echo": None, "suffix": None,
        "n": None, "logprobs": None, "best_of": None})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value", [
    ("verbosity", "low"), ("web_search_options", {}), ("modalities", ["text", "audio"]),
    ("length_penalty", 2.0), ("audio", {"voice": "alloy"}),
    ("chat_template", "{{ messages }}"), ("use_beam_search", True),
    ("guided_whitespace_pattern", " ")])
def test_a_known_field_not_implemented_is_still_refused(server, model_name, field, value):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == field


def test_a_legacy_function_call_message_is_refused(server, model_name):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": model_name, "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "user", "content": "and?"}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[1].function_call"


@pytest.fixture(scope="module")
def strict(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("strict"), "--strict-fields")
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.mark.parametrize("path", sorted(UNKNOWN))
def test_strict_fields_refuses_each_unknown_field_by_name(strict, path):
    model = httpx.get(strict.url + "/v1/models").json()["data"][0]["id"]
    body = _chat_body(model, unknown=True, stream=True)
    # keep only the field under test
    for other in set(UNKNOWN) - {path}:
        _remove(body, other)
    r = httpx.post(strict.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (path, "unknown_field")
    _remove(body, path)
    with httpx.stream("POST", strict.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200


def _remove(body: dict, path: str) -> None:
    node = body
    parts = path.replace("]", "").replace("[", ".").split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    del node[parts[-1]]


class City(BaseModel):  # closed values: the tiny random model's answer stays short
    name: Literal["Oslo", "Rome"]
    population: Literal[1, 2]


def test_sdk_messages_go_back_unchanged(client, model_name):
    """An agent's loop: the assistant message the openai SDK returned (model_dump() keeps
    refusal, annotations, audio, function_call; parse() adds parsed; a tool call's
    parsed_arguments), appended as it is, and the next turn served with nothing ignored."""
    import openai

    messages: list = [{"role": "user", "content": "Give me a city."}]
    parsed = client.chat.completions.parse(model=model_name, messages=messages,
                                           response_format=City, max_tokens=200,
                                           temperature=0)
    messages.append(parsed.choices[0].message.model_dump())
    assert {"refusal", "annotations", "audio", "function_call", "parsed"} <= set(messages[-1])
    messages.append({"role": "user", "content": "And one more, as a tool call."})
    tool = openai.pydantic_function_tool(City)
    called = client.chat.completions.parse(
        model=model_name, messages=messages, tools=[tool], temperature=0, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "City"}})
    message = called.choices[0].message
    assert message.tool_calls and message.tool_calls[0].function.parsed_arguments is not None
    messages.append(message.model_dump())
    call = messages[-1]["tool_calls"][0]
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": "noted"})
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=messages, max_tokens=4)
    assert raw.http_response.status_code == 200
    assert HEADER not in raw.headers
    assert raw.parse().choices[0].message.role == "assistant"

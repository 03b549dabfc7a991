"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) through the
official ``anthropic`` client against a live ``pagoda serve``: a message, its stream
accumulated by the SDK equal to it (greedy), stop sequences, tool_choice ``any`` / ``tool``
(grammar-constrained: inputs valid against their schema on a random model) and a
tool_result follow-up, token counts equal to the message's and the OpenAI route's, errors in
Anthropic's shape naming the field (the server alive and no KV block leaked after them),
``x-api-key``, thinking blocks on a scripted Qwen3 under ``--reasoning-parser qwen3``, and
a sensible answer from the bundled SmolLM2."""
from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import jsonschema
import pytest
from scripted_model import CALL, LEAD, REASONING, make_scripted_model
from server_utils import ServerProcess, start_pagoda_router, start_server

WEATHER = {"name": "get_weather", "description": "The weather in a city.", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "input_schema": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"], "additionalProperties": False}}
SCHEMAS = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
SYSTEM = "You answer briefly."
T0 = {"temperature": 0}  # greedy (the SDK's create() no longer takes temperature)


def _sdk(url: str, **kw: Any):
    import anthropic

    return anthropic.Anthropic(base_url=url, api_key=kw.pop("api_key", "unused"),
                               max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def aclient(server: ServerProcess):
    with _sdk(server.url) as c:
        yield c


def _dump(message: Any) -> dict:
    """A message as JSON, tool_use ids masked (each answer draws its own)."""
    data = message.model_dump(exclude_none=True) if not isinstance(message, dict) else message
    data = json.loads(json.dumps(data))
    for block in data["content"]:
        if block["type"] == "tool_use":
            assert block["id"].startswith("toolu_")
            block["id"] = "toolu_"
    usage = data["usage"]
    usage["prompt"] = usage.pop("input_tokens") + usage.pop("cache_read_input_tokens")
    data.pop("id")
    return data


def _healthy(url: str) -> None:
    state = httpx.get(url + "/debug/state").json()
    assert state["invariants_ok"] and state["num_unfinished"] == 0, state
    assert state["num_free_blocks"] == state["num_blocks"], "a block leaked"


# ------------------------------------------------------------------ messages
def test_create(aclient, model_name) -> None:
    msg = aclient.messages.create(model=model_name, max_tokens=12, extra_body=T0,
                                  system=SYSTEM, messages=ASK)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == model_name
    assert [b.type for b in msg.content] in (["text"], [])
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert 0 < msg.usage.output_tokens <= 12
    if msg.stop_reason == "max_tokens":
        assert msg.usage.output_tokens == 12
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 0
    assert msg.usage.cache_creation_input_tokens == 0


def test_stream_accumulates_to_the_message(aclient, model_name, server) -> None:
    kw = dict(model=model_name, max_tokens=16, extra_body=T0, system=[
        {"type": "text", "text": SYSTEM}], messages=ASK)
    whole = aclient.messages.create(**kw)
    with aclient.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    assert _dump(streamed) == _dump(whole)
    assert streamed.usage.cache_read_input_tokens > 0  # the same prompt again: cached
    # the raw events: Anthropic's sequence, each event's name its data's type
    body = {**kw, **kw.pop("extra_body"), "stream": True}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta",
                                                                     "message_stop"]
    assert datas[-2]["usage"]["output_tokens"] == whole.usage.output_tokens


def test_stop_sequences(aclient, model_name) -> None:
    kw = dict(model=model_name, max_tokens=24, extra_body=T0, messages=ASK)
    text = aclient.messages.create(**kw).content[0].text
    assert len(text) > 6, text
    stop = text[4:6]
    cut = aclient.messages.create(**kw, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    got = cut.content[0].text if cut.content else ""
    assert stop not in got and text.startswith(got)
    with aclient.messages.stream(**kw, stop_sequences=[stop]) as stream:
        assert _dump(stream.get_final_message()) == _dump(cut)


def test_max_tokens_past_the_context_is_a_ceiling(aclient, model_name, server) -> None:
    def prompt(k: int) -> list[dict]:
        return [{"role": "user", "content": "hello " * k}]

    one, hundred = (aclient.messages.count_tokens(model=model_name, messages=prompt(k))
                    .input_tokens for k in (1, 101))
    k = 1 + (1014 - one) * 100 // (hundred - one)  # about ten tokens of room left
    size = aclient.messages.count_tokens(model=model_name, messages=prompt(k)).input_tokens
    room = 1024 - size  # the tests' context length
    assert 0 < room < 40, room
    msg = aclient.messages.create(model=model_name, max_tokens=32000, messages=prompt(k),
                                  extra_body={"temperature": 1.0})
    assert msg.usage.output_tokens <= room
    assert msg.stop_reason in ("model_context_window_exceeded", "end_turn")
    if msg.stop_reason == "model_context_window_exceeded":
        assert msg.usage.output_tokens == room
    with aclient.messages.stream(model=model_name, max_tokens=32000, messages=prompt(k),
                                 extra_body=T0) as stream:
        assert stream.get_final_message().usage.output_tokens <= room
    _healthy(server.url)


def test_assistant_prefill_is_continued(aclient, model_name) -> None:
    kw = dict(model=model_name, max_tokens=8, extra_body=T0)
    whole = aclient.messages.create(**kw, messages=ASK).content[0].text
    prefill = aclient.messages.create(**kw, messages=[
        *ASK, {"role": "assistant", "content": "Sunny"}])
    assert prefill.content and prefill.content[0].text != whole


# ------------------------------------------------------------------ tools
def _tool_uses(msg: Any) -> list[Any]:
    return [b for b in msg.content if b.type == "tool_use"]


def test_tool_choice_any_then_a_result(aclient, model_name) -> None:
    # (with parallel calls allowed, the tiny random model never stops adding calls)
    kw = dict(model=model_name, max_tokens=200, extra_body=T0, tools=[WEATHER, TIME],
              tool_choice={"type": "any", "disable_parallel_tool_use": True}, messages=ASK)
    msg = aclient.messages.create(**kw)
    uses = _tool_uses(msg)
    assert msg.stop_reason == "tool_use" and len(uses) == 1, msg
    assert [b.type for b in msg.content] == ["tool_use"]
    for use in uses:
        assert use.id.startswith("toolu_") and isinstance(use.input, dict)
        jsonschema.validate(use.input, SCHEMAS[use.name])
    with aclient.messages.stream(**kw) as stream:
        assert _dump(stream.get_final_message()) == _dump(msg)
    results = [{"type": "tool_result", "tool_use_id": u.id, "content": "12 C, sunny"}
               for u in uses]
    follow = aclient.messages.create(
        model=model_name, max_tokens=8, extra_body=T0, tools=[WEATHER, TIME],
        tool_choice={"type": "none"}, messages=[
            *ASK, {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
            {"role": "user", "content": results}])
    assert follow.stop_reason in ("end_turn", "max_tokens") and not _tool_uses(follow)


def test_named_tool(aclient, model_name) -> None:
    kw = dict(model=model_name, max_tokens=120, extra_body=T0, tools=[WEATHER, TIME],
              messages=ASK, tool_choice={"type": "tool", "name": "get_time"})
    msg = aclient.messages.create(**kw)
    (use,) = _tool_uses(msg)
    assert use.name == "get_time" and msg.stop_reason == "tool_use"
    jsonschema.validate(use.input, SCHEMAS["get_time"])
    with aclient.messages.stream(**kw) as stream:
        assert _dump(stream.get_final_message()) == _dump(msg)


# ------------------------------------------------------------------ counting
def test_count_tokens_is_the_message_input(aclient, model_name, server) -> None:
    kw: dict[str, Any] = dict(model=model_name, system=SYSTEM, messages=ASK, tools=[WEATHER],
                              tool_choice={"type": "any"})
    counted = aclient.messages.count_tokens(**kw).input_tokens
    msg = aclient.messages.create(**kw, max_tokens=30, extra_body=T0)
    assert counted == msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 0
    assert aclient.messages.count_tokens(model=model_name, messages=ASK).input_tokens < counted
    r = httpx.post(server.url + "/v1/messages/count_tokens", json={**kw, "max_tokens": 3},
                   headers={"anthropic-version": "2023-06-01", "anthropic-beta": "x"})
    assert r.status_code == 200 and r.json() == {"input_tokens": counted}
    assert r.headers["x-pagoda-ignored-fields"] == "max_tokens"


def test_usage_equals_the_openai_route(aclient, client, model_name) -> None:
    msg = aclient.messages.create(model=model_name, max_tokens=10, extra_body=T0,
                                  system=SYSTEM, messages=ASK)
    chat = client.chat.completions.create(
        model=model_name, max_tokens=10, extra_body=T0,
        messages=[{"role": "system", "content": SYSTEM}, *ASK])
    prompt = msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert prompt == chat.usage.prompt_tokens
    assert msg.usage.output_tokens == chat.usage.completion_tokens
    assert (msg.content[0].text if msg.content else "") == chat.choices[0].message.content


# ------------------------------------------------------------------ errors
M = "MODEL"  # replaced by the served model's name
B = {"model": M, "max_tokens": 4, "messages": ASK}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
BAD_CASES = [
    # (body, status, error type, what the message names)
    ({"model": M, "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({**B, "max_tokens": "many"}, 400, "invalid_request_error", "max_tokens"),
    ({**B, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({**B, "messages": []}, 400, "invalid_request_error", "messages"),
    ({**B, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request_error",
     "messages[0].role"),
    ({**B, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request_error",
     "messages[0].content"),
    ({**B, "temperature": "hot"}, 400, "invalid_request_error", "temperature"),
    ({**B, "temperature": -1}, 400, "invalid_request_error", "temperature"),
    ({**B, "top_k": -3}, 400, "invalid_request_error", "top_k"),
    ({**B, "stop_sequences": [""]}, 400, "invalid_request_error", "stop_sequences"),
    ({**B, "stop_sequences": "x"}, 400, "invalid_request_error", "stop_sequences"),
    ({**B, "model": "claude-no-such"}, 404, "not_found_error", "model"),
    ({**B, "messages": [{"role": "user", "content": [IMAGE]}]}, 400, "invalid_request_error",
     "messages[0].content[0]"),
    ({**B, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     400, "invalid_request_error", "messages[0].content[0]"),
    ({**B, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400,
     "invalid_request_error", "messages[0].content"),
    ({**B, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400,
     "invalid_request_error", "tools[0].type"),
    ({**B, "tools": [{"type": "bash_20250124", "name": "bash"}]}, 400, "invalid_request_error",
     "bash_20250124"),
    ({**B, "tools": [{"name": "f"}]}, 400, "invalid_request_error", "tools[0].input_schema"),
    ({**B, "tools": [WEATHER]}, 400, "invalid_request_error", "--tool-call-parser"),
    ({**B, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, 400,
     "invalid_request_error", "tool_choice.name"),
    ({**B, "tool_choice": {"type": "any"}}, 400, "invalid_request_error", "tool_choice"),
    ({**B, "tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, 400,
     "invalid_request_error", "tool_choice.type"),
    ({**B, "messages": [*ASK, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_ghost", "content": "x"}]}]}, 400,
     "invalid_request_error", "toolu_ghost"),
    ({**B, "messages": [*ASK, {"role": "assistant", "content": [USE]}, {"role": "user",
      "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [IMAGE]}]}]},
     400, "invalid_request_error", "messages[2].content[0].content[0]"),
    ({**B, "messages": [{"role": "user", "content": [USE]}]}, 400, "invalid_request_error",
     "messages[0].content[0]"),
    ({**B, "thinking": {"type": "enabled"}}, 400, "invalid_request_error",
     "thinking.budget_tokens"),
    ({**B, "thinking": {"type": "enabled", "budget_tokens": 4}}, 400, "invalid_request_error",
     "thinking.budget_tokens"),
    ({**B, "mcp_servers": [{"url": "http://x"}]}, 400, "invalid_request_error", "mcp_servers"),
    ({**B, "messages": [{"role": "user", "content": "x" * 5000}]}, 400,
     "invalid_request_error", "messages"),
]


@pytest.mark.parametrize("body,status,kind,named", BAD_CASES,
                         ids=[f"{i}-{c[3]}" for i, c in enumerate(BAD_CASES)])
def test_bad_input(server, model_name, body, status, kind, named) -> None:
    body = json.loads(json.dumps(body).replace(f'"{M}"', json.dumps(model_name)))
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/messages", json={**body, "stream": stream},
                       timeout=30)
        assert r.status_code == status, r.text
        error = r.json()
        assert error["type"] == "error" and error["error"]["type"] == kind, error
        assert named in error["error"]["message"], error
    _healthy(server.url)


def test_bad_input_on_count_tokens_and_bad_json(server) -> None:
    r = httpx.post(server.url + "/v1/messages/count_tokens", json={"model": "zz",
                                                                   "messages": ASK})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(server.url + "/v1/messages", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"


def test_the_sdk_raises_the_typed_errors(aclient, model_name) -> None:
    import anthropic

    with pytest.raises(anthropic.NotFoundError) as e:
        aclient.messages.create(model="claude-nope", max_tokens=4, messages=ASK)
    assert "model" in str(e.value)
    with pytest.raises(anthropic.BadRequestError):
        aclient.messages.create(model=model_name, max_tokens=4, messages=[
            {"role": "user", "content": [IMAGE]}])


def test_unknown_fields_are_reported(server, model_name) -> None:
    r = httpx.post(server.url + "/v1/messages", timeout=30, json={
        "model": model_name, "max_tokens": 2, "metadata": {"user_id": "u"},
        "service_tier": "auto", "context_management": {}, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {
                "type": "ephemeral"}, "flavour": 1}]}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-pagoda-ignored-fields"] == ("context_management,"
                                                    "messages[0].content[0].flavour")


def test_output_config_format_constrains_the_answer(aclient, model_name) -> None:
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Bergen"]}},
              "required": ["city"], "additionalProperties": False}
    kw = dict(model=model_name, max_tokens=60, extra_body=T0, messages=ASK,
              output_config={"format": {"type": "json_schema", "schema": schema}})
    msg = aclient.messages.create(**kw)
    jsonschema.validate(json.loads(msg.content[0].text), schema)
    with aclient.messages.stream(**kw) as stream:
        assert _dump(stream.get_final_message()) == _dump(msg)
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as e:  # a schema that does not compile
        aclient.messages.create(model=model_name, max_tokens=4, messages=ASK, output_config={
            "format": {"type": "json_schema", "schema": {"type": "wat"}}})
    assert "output_config.format.schema" in str(e.value)
    with pytest.raises(anthropic.BadRequestError) as e:  # two constraints at once
        aclient.messages.create(**{**kw, "tools": [WEATHER], "tool_choice": {"type": "any"}})
    assert "tool_choice" in str(e.value)


# ------------------------------------------------------------------ keys
KEY = "sk-ant-test-key"


@pytest.fixture(scope="module")
def keyed(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("anthropic-key-logs"),
                       "--num-kv-blocks", "64", "--api-key", KEY)
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def test_x_api_key(keyed) -> None:
    import anthropic

    name = httpx.get(keyed.url + "/v1/models", headers={"x-api-key": KEY}).json()["data"][0]["id"]
    with _sdk(keyed.url, api_key=KEY) as c:  # the SDK's own header for its key
        assert c.messages.create(model=name, max_tokens=2, messages=ASK).type == "message"
    with _sdk(keyed.url, api_key=None, auth_token=KEY) as c:  # Authorization: Bearer
        assert c.messages.count_tokens(model=name, messages=ASK).input_tokens > 0
    with _sdk(keyed.url, api_key="sk-wrong") as c, pytest.raises(anthropic.AuthenticationError):
        c.messages.create(model=name, max_tokens=2, messages=ASK)
    r = httpx.post(keyed.url + "/v1/messages", json={"model": name, "max_tokens": 2,
                                                     "messages": ASK})
    assert r.status_code == 401
    assert r.json()["error"] == {"type": "authentication_error",
                                 "message": r.json()["error"]["message"]}
    assert "x-api-key" in r.json()["error"]["message"]



def test_x_api_key_passes_the_router(keyed, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The router passes Anthropic's key (and version header) on as the client sent them
    (raw headers: the SDK itself sends its key as Authorization)."""
    router = start_pagoda_router(tmp_path_factory.mktemp("anthropic-router"),
                                 "--replicas", keyed.url)
    try:
        name = httpx.get(keyed.url + "/v1/models", headers={"x-api-key": KEY}).json()
        body = {"model": name["data"][0]["id"], "max_tokens": 2, "messages": ASK}
        version = {"anthropic-version": "2023-06-01"}
        ok = httpx.post(router.url + "/v1/messages", json=body, timeout=60,
                        headers={"x-api-key": KEY, **version})
        assert ok.status_code == 200 and ok.json()["type"] == "message"
        wrong = httpx.post(router.url + "/v1/messages", json=body, timeout=60,
                           headers={"x-api-key": "sk-wrong", **version})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
    finally:
        router.stop()


# ------------------------------------------------------------------ thinking
@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    model = make_scripted_model(str(tmp_path_factory.mktemp("anthropic-qwen3")))
    srv = start_server(model, tmp_path_factory.mktemp("anthropic-thinking-logs"),
                       "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes")
    name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    yield srv, name
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def test_thinking_then_text(thinker) -> None:
    srv, name = thinker
    kw = dict(model=name, max_tokens=40, extra_body=T0, messages=ASK,
              thinking={"type": "enabled", "budget_tokens": 20})
    with _sdk(srv.url) as c:
        msg = c.messages.create(**kw)
        with c.messages.stream(**kw) as stream:
            streamed = stream.get_final_message()
    thinking, text = msg.content
    assert thinking.type == "thinking" and thinking.thinking == REASONING
    assert thinking.signature
    assert text.type == "text" and text.text == f"{LEAD}<tool_call>{json.dumps(CALL)}</tool_call>"
    assert msg.stop_reason == "end_turn"
    assert _dump(streamed) == _dump(msg)


def test_thinking_then_a_tool_call_and_back(thinker) -> None:
    srv, name = thinker
    tool = {"name": "get_weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    kw = dict(model=name, max_tokens=40, extra_body=T0, messages=ASK, tools=[tool])
    with _sdk(srv.url) as c:
        msg = c.messages.create(**kw)
        with c.messages.stream(**kw) as stream:
            streamed = stream.get_final_message()
        assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
        assert msg.content[1].text == LEAD and msg.stop_reason == "tool_use"
        assert (msg.content[2].name, msg.content[2].input) == (CALL["name"], CALL["arguments"])
        assert _dump(streamed) == _dump(msg)
        # the answer sent back (its thinking and call), with the call's result
        follow = c.messages.create(**{**kw, "messages": [
            *ASK, {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
            {"role": "user", "content": [{"type": "tool_result", "is_error": False,
                                          "tool_use_id": msg.content[2].id,
                                          "content": [{"type": "text", "text": "12 C"}]}]}]})
        assert follow.type == "message"


def test_thinking_disabled_is_the_template_switch(thinker) -> None:
    srv, name = thinker
    with _sdk(srv.url) as c:
        on = c.messages.create(model=name, max_tokens=40, extra_body=T0, messages=ASK)
        off = c.messages.create(model=name, max_tokens=40, extra_body=T0, messages=ASK,
                                thinking={"type": "disabled"})
        counted = c.messages.count_tokens(model=name, messages=ASK,
                                          thinking={"type": "disabled"}).input_tokens
    assert on.content[0].type == "thinking"
    assert [b.type for b in off.content] == ["text"] and off.content[0].text.startswith("<think>")
    prompt = off.usage.input_tokens + off.usage.cache_read_input_tokens
    assert counted == prompt > on.usage.input_tokens + on.usage.cache_read_input_tokens


def test_thinking_display_omitted_keeps_the_signature(thinker) -> None:
    srv, name = thinker
    kw = dict(model=name, max_tokens=40, extra_body=T0, messages=ASK,
              thinking={"type": "enabled", "budget_tokens": 20, "display": "omitted"})
    with _sdk(srv.url) as c:
        msg = c.messages.create(**kw)
        shown = c.messages.create(**{**kw, "thinking": {"type": "enabled", "budget_tokens": 20}})
        with c.messages.stream(**kw) as stream:
            streamed = stream.get_final_message()
    assert msg.content[0].type == "thinking" and msg.content[0].thinking == ""
    assert msg.content[0].signature == shown.content[0].signature
    assert _dump(streamed) == _dump(msg)


def test_thinking_events_in_order(thinker) -> None:
    srv, name = thinker
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    with httpx.stream("POST", srv.url + "/v1/messages", timeout=60, json={
            "model": name, "max_tokens": 40, "temperature": 0, "messages": ASK,
            "tools": [tool], "stream": True}) as r:
        datas = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [(d["type"], d.get("index"), (d.get("delta") or {}).get("type")) for d in datas]
    starts = [d["content_block"]["type"] for d in datas if d["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    signature = kinds.index(("content_block_delta", 0, "signature_delta"))
    assert kinds[signature + 1] == ("content_block_stop", 0, None)
    assert max(i for i, k in enumerate(kinds) if k[2] == "thinking_delta") < signature
    assert kinds[-2][0] == "message_delta" and datas[-2]["delta"]["stop_reason"] == "tool_use"


# ------------------------------------------------------------------ a dead engine
def test_an_engine_that_dies_mid_stream(tiny_model_dir: str,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    import asyncio

    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("anthropic-doomed-logs"),
                       "--num-kv-blocks", "128", "--enable-debug-endpoints")
    name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    body = {"model": name, "max_tokens": 900, "temperature": 0, "messages": ASK}

    async def scenario() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            plain = asyncio.ensure_future(c.post("/v1/messages", json=body))
            async with c.stream("POST", "/v1/messages", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                lines: list[str] = []
                async for line in r.aiter_lines():
                    if line and not lines:
                        await c.post("/debug/fault")  # the next step raises
                    if line:
                        lines.append(line)
            return lines, await plain

    try:
        lines, plain = asyncio.run(scenario())
        after = httpx.post(srv.url + "/v1/messages", json=body, timeout=30)
    finally:
        srv.stop()
    assert lines[-2] == "event: error"
    assert json.loads(lines[-1][6:])["error"]["type"] == "api_error"
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "api_error"
    assert after.status_code == 503 and after.json()["error"]["type"] == "api_error"


# ------------------------------------------------------------------ a real model
@pytest.mark.slow
def test_smollm2_answers_sensibly(tmp_path_factory: pytest.TempPathFactory) -> None:
    from pagoda.models.loader import default_model_path

    srv = start_server(default_model_path(), tmp_path_factory.mktemp("anthropic-smol-logs"),
                       "--max-num-batched-tokens", "512")
    try:
        name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        with _sdk(srv.url) as c:
            msg = c.messages.create(model=name, max_tokens=30, extra_body=T0,
                                    system="You are a helpful assistant.", messages=[
                                        {"role": "user", "content": "What is the capital of "
                                         "France? Answer in one word."}])
            with c.messages.stream(model=name, max_tokens=30, extra_body=T0,
                                   messages=[{"role": "user", "content": "Say hello."}]) as s:
                hello = s.get_final_message()
    finally:
        srv.stop()
    assert "Paris" in msg.content[0].text, msg
    assert msg.stop_reason == "end_turn"
    assert "hello" in hello.content[0].text.lower(), hello
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]

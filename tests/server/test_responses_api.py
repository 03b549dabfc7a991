"""OpenAI's Responses API (``/v1/responses``) against live ``pagoda serve`` processes, through
the official client and raw HTTP: whole and streamed answers (the stream's text and items
equal the unstreamed, greedy), usage equal to chat's for the same conversation, function
tools (required, named) and their outputs, ``previous_response_id`` chains, ``text.format``,
GET / DELETE of stored responses, each API key seeing only its own, bad input (4xx in
OpenAI's shape naming the field, the server alive and no KV block leaked), a reasoning
model's items (a scripted Qwen3), and the bundled SmolLM2 answering sensibly."""
from __future__ import annotations

import json
import time
from typing import Iterator

import httpx
import jsonschema
import pytest
from pydantic import Field
from scripted_model import CALL, LEAD, REASONING, make_scripted_model
from server_utils import ServerProcess, start_pagoda_router, start_server

from pagoda.models.loader import default_model_path

WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"], "additionalProperties": False}}
CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                         "population": {"type": "integer"}},
        "required": ["name", "population"], "additionalProperties": False}
KEYS = ("key-a", "key-b")


def _assert_healthy(server: ServerProcess) -> None:
    state = httpx.get(server.url + "/debug/state").json()
    assert state["invariants_ok"], state
    assert state["num_free_blocks"] == state["num_blocks"], "a block leaked"
    assert state["num_unfinished"] == 0, state


def _post(server: ServerProcess, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/responses", json=body, headers=headers, timeout=120)


def _events(server: ServerProcess, body: dict) -> list[dict]:
    """A streamed response's events, each checked against its ``event:`` line."""
    events, kind = [], None
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == kind
                events.append(event)
    return events


def _without_ids(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


# ---------------------------------------------------------------- answers
def test_create_matches_chat(server, client, model_name) -> None:
    """The same conversation through chat and responses: the same greedy text and usage."""
    out = client.responses.create(model=model_name, input="Hello there", temperature=0,
                                  max_output_tokens=8, instructions="Be brief.")
    chat = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=8,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello there"}])
    assert out.id.startswith("resp_") and out.object == "response"
    assert out.output_text and out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.usage.output_tokens == chat.usage.completion_tokens == 8
    assert out.usage.total_tokens == chat.usage.total_tokens
    assert out.usage.output_tokens_details.reasoning_tokens == 0
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.instructions == "Be brief." and out.max_output_tokens == 8
    assert out.temperature == 0 and out.tool_choice == "auto" and out.tools == []
    [message] = out.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []


def test_message_items_and_metadata(server, model_name) -> None:
    body = {"model": model_name, "max_output_tokens": 4, "temperature": 0,
            "metadata": {"run": "7"}, "user": "u1",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                      {"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
                      {"role": "developer", "content": "Go on."}]}
    r = _post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["metadata"] == {"run": "7"} and out["user"] == "u1"
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": model_name, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"},
                     {"role": "developer", "content": "Go on."}]}).json()
    assert out["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert out["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]


ORDER = ["response.created", "response.in_progress", "response.output_item.added",
         "response.content_part.added"]
CLOSE = ["response.output_text.done", "response.content_part.done",
         "response.output_item.done", "response.incomplete"]


def test_stream_events_join_to_the_answer(server, client, model_name) -> None:
    body = {"model": model_name, "input": "Tell me a story", "temperature": 0,
            "max_output_tokens": 12}
    whole = _post(server, body).json()
    events = _events(server, body)
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert kinds == ORDER + ["response.output_text.delta"] * len(deltas) + CLOSE
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    item_id = events[2]["item"]["id"]
    assert all(d["item_id"] == item_id and d["output_index"] == 0 and d["content_index"] == 0
               for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    assert text == whole["output"][0]["content"][0]["text"] and text
    assert events[-4]["text"] == text
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["id"] == events[0]["response"]["id"]
    assert _without_ids(final["output"]) == _without_ids(whole["output"])
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert final["usage"][key] == whole["usage"][key]
    # the SDK's stream helper accepts the sequence and accumulates the same text
    with client.responses.stream(model=model_name, input="Tell me a story", temperature=0,
                                 max_output_tokens=12) as stream:
        seen = list(stream)
    assert "".join(e.delta for e in seen if e.type == "response.output_text.delta") == text
    assert seen[-1].type == "response.incomplete" and seen[-1].response.output_text == text


def test_json_schema_format(server, client, model_name) -> None:
    fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
    out = client.responses.create(model=model_name, input="A city, as JSON", temperature=0,
                                  max_output_tokens=200, text={"format": fmt})
    assert out.status == "completed", out.output_text
    jsonschema.validate(json.loads(out.output_text), CITY)
    assert out.text.format.type == "json_schema"
    with client.responses.stream(model=model_name, input="A city, as JSON", temperature=0,
                                 max_output_tokens=200, text={"format": fmt}) as stream:
        final = stream.get_final_response()
    assert final.output_text == out.output_text and final.status == "completed"
    anything = client.responses.create(model=model_name, input="JSON please", temperature=0,
                                       max_output_tokens=200,
                                       text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(anything.output_text), dict)
    _assert_healthy(server)


# ---------------------------------------------------------------- tools
def _required_call(client, model_name: str, **kw):
    out = client.responses.create(model=model_name, input="Weather in Oslo?", tools=[WEATHER],
                                  tool_choice="required", parallel_tool_calls=False,
                                  temperature=0, max_output_tokens=200, **kw)
    calls = [o for o in out.output if o.type == "function_call"]
    assert out.status == "completed" and len(calls) == 1, out.output
    assert calls[0].name == "get_weather" and calls[0].status == "completed"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    return out, calls[0]


def test_required_tool_call_then_its_output(server, client, model_name) -> None:
    out, call = _required_call(client, model_name)
    assert call.call_id and call.id.startswith("fc_")
    follow = client.responses.create(
        model=model_name, previous_response_id=out.id, temperature=0, max_output_tokens=4,
        tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.previous_response_id == out.id
    chat = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=4,
        messages=[{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": call.call_id, "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens > out.usage.input_tokens
    # the same conversation sent whole, as a client that keeps no ids would
    again = client.responses.create(
        model=model_name, temperature=0, max_output_tokens=4, tools=[WEATHER],
        tool_choice="none", store=False,
        input=[{"role": "user", "content": "Weather in Oslo?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert again.usage.input_tokens == follow.usage.input_tokens
    assert again.output_text == follow.output_text
    _assert_healthy(server)


def test_named_tool_choice_and_streamed_call(server, client, model_name) -> None:
    choice = {"type": "function", "name": "get_weather"}
    body = {"model": model_name, "input": "Weather?", "tools": [WEATHER],
            "tool_choice": choice, "temperature": 0, "max_output_tokens": 200}
    whole = _post(server, body).json()
    [call] = whole["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["parameters"])
    events = _events(server, body)
    deltas = "".join(e["delta"] for e in events
                     if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert deltas == done["arguments"] == call["arguments"]
    assert events[-1]["type"] == "response.completed"
    assert _without_ids(events[-1]["response"]["output"]) == _without_ids(whole["output"])
    assert whole["tool_choice"] == choice


# ---------------------------------------------------------------- state
def test_previous_response_id_chains_the_conversation(server, client, model_name) -> None:
    first = client.responses.create(model=model_name, input="Hi", temperature=0,
                                    max_output_tokens=5, instructions="Be brief.")
    second = client.responses.create(model=model_name, input="And then?", temperature=0,
                                     max_output_tokens=5, previous_response_id=first.id)
    chat = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=5,
        messages=[{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": first.output_text},
                  {"role": "user", "content": "And then?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens  # instructions not carried
    assert second.usage.input_tokens > first.usage.output_tokens + 2
    assert second.output_text == chat.choices[0].message.content
    third = client.responses.create(model=model_name, input="More.", temperature=0,
                                    max_output_tokens=5, previous_response_id=second.id)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_get_and_delete(server, client, model_name) -> None:
    r = _post(server, {"model": model_name, "input": "Hi", "max_output_tokens": 3})
    made = r.json()
    got = httpx.get(f"{server.url}/v1/responses/{made['id']}")
    assert got.status_code == 200 and got.json() == made
    assert client.responses.retrieve(made["id"]).output_text == made["output"][0]["content"][0][
        "text"]
    gone = httpx.delete(f"{server.url}/v1/responses/{made['id']}")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    for method in ("GET", "DELETE"):
        missing = httpx.request(method, f"{server.url}/v1/responses/{made['id']}")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "response_id"
    unstored = _post(server, {"model": model_name, "input": "Hi", "max_output_tokens": 3,
                              "store": False}).json()
    assert unstored["store"] is False
    assert httpx.get(f"{server.url}/v1/responses/{unstored['id']}").status_code == 404
    chained = _post(server, {"model": model_name, "input": "x", "max_output_tokens": 3,
                             "previous_response_id": unstored["id"]})
    assert chained.status_code == 404
    assert chained.json()["error"]["param"] == "previous_response_id"


@pytest.fixture(scope="module")
def keyed(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("responses-keys"),
                       "--api-key", KEYS[0], "--api-key", KEYS[1])
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def test_each_key_sees_only_its_own(keyed) -> None:
    name = httpx.get(keyed.url + "/v1/models",
                     headers={"authorization": f"Bearer {KEYS[0]}"}).json()["data"][0]["id"]
    mine = _post(keyed, {"model": name, "input": "Hi", "max_output_tokens": 3}, KEYS[0])
    assert mine.status_code == 200, mine.text
    rid = mine.json()["id"]

    def ask(method: str, key: str, rid: str) -> httpx.Response:
        return httpx.request(method, f"{keyed.url}/v1/responses/{rid}",
                             headers={"authorization": f"Bearer {key}"})

    other, missing = ask("GET", KEYS[1], rid), ask("GET", KEYS[1], "resp_" + "0" * 24)
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["message"].replace(rid, "X") == missing.json()["error"][
        "message"].replace("resp_" + "0" * 24, "X")
    assert ask("DELETE", KEYS[1], rid).status_code == 404
    chained = _post(keyed, {"model": name, "input": "x", "previous_response_id": rid}, KEYS[1])
    assert chained.status_code == 404
    assert chained.json()["error"]["param"] == "previous_response_id"
    assert ask("GET", KEYS[0], rid).status_code == 200
    assert httpx.get(f"{keyed.url}/v1/responses/{rid}").status_code == 401
    assert _post(keyed, {"model": name, "input": "x", "previous_response_id": rid,
                         "max_output_tokens": 2}, KEYS[0]).status_code == 200


def test_behind_the_router(server, model_name: str,
                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """An INSTANCE route: relayed as it came, streamed too; with one instance its stored
    responses are found again through the router."""
    router = start_pagoda_router(tmp_path_factory.mktemp("responses-router"), "--replicas",
                                 server.url)
    try:
        body = {"model": model_name, "input": "Hi", "temperature": 0, "max_output_tokens": 4,
                "num_ctx": 1}
        direct = _post(server, body)
        routed = _post(router, body)
        assert routed.status_code == 200 and routed.headers["x-pagoda-ignored-fields"] == "num_ctx"
        assert routed.json()["output"][0]["content"] == direct.json()["output"][0]["content"]
        rid = routed.json()["id"]
        assert httpx.get(f"{router.url}/v1/responses/{rid}").json()["id"] == rid
        events = _events(router, body)
        assert events[-1]["type"] == "response.incomplete"
        assert httpx.delete(f"{router.url}/v1/responses/{rid}").status_code == 200
        bad = _post(router, {**body, "tools": [{"type": "mcp"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools[0].type"
    finally:
        router.stop()
    assert "Traceback (most recent call last)" not in router.log(), router.log()[-4000:]


def test_langchain_use_responses_api(server, model_name) -> None:
    """LangChain's ChatOpenAI on this API: a call, a JSON-schema answer, and a named tool
    call whose answer goes back with LangChain's own history items."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from pydantic import BaseModel

    class Town(BaseModel):
        name: str = Field(max_length=8)
        size: int = Field(ge=1, le=3)

    llm = langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1", api_key="unused", model=model_name, temperature=0,
        max_tokens=60, max_retries=0, use_responses_api=True)
    reply = llm.invoke("Name a river.")
    assert reply.text and reply.usage_metadata["output_tokens"] > 0
    town = llm.with_structured_output(Town, method="json_schema").invoke("A town?")
    assert isinstance(town, Town)
    tooled = llm.bind_tools([Town], tool_choice="Town", strict=True)
    question = HumanMessage("Which town should I visit?")
    ai = tooled.invoke([question])
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "Town", ai
    Town(**ai.tool_calls[0]["args"])
    follow = llm.invoke([question, ai, ToolMessage("noted", tool_call_id=ai.tool_calls[0]["id"])])
    assert isinstance(follow.text, str)


# ---------------------------------------------------------------- bad input
M = "MODEL"
BAD = [
    ({"input": "x"}, 400, "model"),
    ({"model": M}, 400, "input"),
    ({"model": "no-such-model", "input": "x"}, 404, "model"),
    ({"model": M, "input": []}, 400, "input"),
    ({"model": M, "input": 5}, 400, "input"),
    ({"model": M, "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"model": M, "input": "x", "max_output_tokens": 5000}, 400, "max_output_tokens"),
    ({"model": M, "input": "x", "temperature": -1.0}, 400, "temperature"),
    ({"model": M, "input": "x", "top_p": 0.0}, 400, "top_p"),
    ({"model": M, "input": "x " * 3000}, 400, "input"),
    ({"model": M, "input": [{"role": "tool", "content": "x"}]}, 400, "input[0].role"),
    ({"model": M, "input": [{"role": "user"}]}, 400, "input[0].content"),
    ({"model": M, "input": [{"content": "x"}]}, 400, "input[0].type"),
    ({"model": M, "input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0].type"),
    ({"model": M, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x"}]}]}, 400, "input[0].content[0].type"),
    ({"model": M, "input": [{"type": "function_call_output", "call_id": "nope",
                             "output": "x"}]}, 400, "input[0].call_id"),
    ({"model": M, "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400,
     "input[0].call_id"),
    ({"model": M, "input": "x", "previous_response_id": "resp_nope"}, 404,
     "previous_response_id"),
    ({"model": M, "input": "x", "tools": [{"type": "web_search_preview"}]}, 400,
     "tools[0].type"),
    ({"model": M, "input": "x", "tools": [{"type": "code_interpreter"}]}, 400, "tools[0].type"),
    ({"model": M, "input": "x", "tools": [{"type": "function"}]}, 400, "tools[0].name"),
    ({"model": M, "input": "x", "tools": [WEATHER, WEATHER], "tool_choice": "required"}, 400,
     "tools"),
    ({"model": M, "input": "x", "tools": [WEATHER]}, 400, "tool_choice"),  # auto: no parser
    ({"model": M, "input": "x", "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": M, "input": "x", "tools": [WEATHER],
      "tool_choice": {"type": "function", "name": "other"}}, 400, "tool_choice.name"),
    ({"model": M, "input": "x", "tools": [WEATHER],
      "tool_choice": {"type": "file_search"}}, 400, "tool_choice.type"),
    ({"model": M, "input": "x", "tool_choice": "required", "tools": [
        {**WEATHER, "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}]},
     400, "tools"),
    ({"model": M, "input": "x", "tools": [WEATHER], "tool_choice": "required",
      "text": {"format": {"type": "json_object"}}}, 400, "tool_choice"),
    ({"model": M, "input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}},
     400, "text.format.schema"),
    ({"model": M, "input": "x", "text": {"format": {"type": "json_schema", "name": "a",
                                                    "schema": {"type": 7}}}},
     400, "text.format.schema"),
    ({"model": M, "input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format.type"),
    ({"model": M, "input": "x", "background": True}, 400, "background"),
    ({"model": M, "input": "x", "conversation": "conv_1"}, 400, "conversation"),
    ({"model": M, "input": "x", "prompt": {"id": "pmpt_1"}}, 400, "prompt"),
    ({"model": M, "input": "x", "truncation": "auto"}, 400, "truncation"),
    ({"model": M, "input": "x", "include": ["file_search_call.results"]}, 400, "include"),
    ({"model": M, "input": "x", "metadata": {"k": 5}}, 400, "metadata.k"),
    ({"model": M, "input": "x", "stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[c[2] for c in BAD])
def test_bad_input(server, model_name: str, body: dict, status: int, param: str) -> None:
    sent = {k: (model_name if v == M else v) for k, v in body.items()}
    for stream in (False, True):
        r = _post(server, {**sent, "stream": True} if stream and "stream" not in sent else sent)
        assert r.status_code == status, (stream, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"] and error["type"], error
    _assert_healthy(server)
    ok = _post(server, {"model": model_name, "input": "ok", "max_output_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["output_tokens"] == 2


def test_unknown_fields_are_reported(server, model_name: str) -> None:
    r = _post(server, {"model": model_name, "input": "x", "max_output_tokens": 2,
                       "num_ctx": 4, "reasoning": {"effort": "low", "new_knob": 1}})
    assert r.status_code == 200, r.text
    assert r.headers["x-pagoda-ignored-fields"] == "num_ctx,reasoning.new_knob"
    assert r.json()["reasoning"]["effort"] == "low"


def test_client_leaving_a_stream_leaks_nothing(server, model_name: str) -> None:
    with httpx.stream("POST", server.url + "/v1/responses", timeout=60, json={
            "model": model_name, "input": "x", "max_output_tokens": 500, "stream": True}) as r:
        for line in r.iter_lines():
            if "output_text.delta" in line:
                break
    for _ in range(100):  # the abort reaches the engine at its next step
        if httpx.get(server.url + "/debug/state").json()["num_unfinished"] == 0:
            break
        time.sleep(0.05)
    _assert_healthy(server)


# ---------------------------------------------------------------- a reasoning model
@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    model = make_scripted_model(str(tmp_path_factory.mktemp("responses-qwen3")))
    srv = start_server(model, tmp_path_factory.mktemp("responses-reasoning-logs"),
                       "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes")
    name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    yield srv, name
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


TOOL = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_reasoning_items(thinker) -> None:
    srv, name = thinker
    body = {"model": name, "input": "What is the weather in Oslo?", "tools": [TOOL],
            "temperature": 0, "max_output_tokens": 40, "reasoning": {"summary": "auto"},
            "include": ["reasoning.encrypted_content"]}
    whole = _post(srv, body).json()
    reasoning, message, call = whole["output"]
    assert reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": REASONING}]
    assert reasoning["summary"] == [{"type": "summary_text", "text": REASONING}]
    assert message["content"][0]["text"] == LEAD
    assert call["name"] == CALL["name"] and json.loads(call["arguments"]) == CALL["arguments"]
    assert whole["status"] == "completed"
    assert 0 < whole["usage"]["output_tokens_details"]["reasoning_tokens"] < whole["usage"][
        "output_tokens"]
    events = _events(srv, body)
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert thought == REASONING
    final = events[-1]["response"]
    assert _without_ids(final["output"]) == _without_ids(whole["output"])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    # the thinking sent back (sealed) reaches the template as the turn's reasoning
    follow = _post(srv, {"model": name, "tools": [TOOL], "max_output_tokens": 5, "input": [
        {"role": "user", "content": "What is the weather in Oslo?"}, reasoning, message, call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}]})
    assert follow.status_code == 200, follow.text


def test_reasoning_effort_reaches_the_template(thinker) -> None:
    srv, name = thinker
    plain = _post(srv, {"model": name, "input": "Hi", "max_output_tokens": 2}).json()
    effort = _post(srv, {"model": name, "input": "Hi", "max_output_tokens": 2,
                         "reasoning": {"effort": "high"}}).json()
    assert effort["usage"]["input_tokens"] > plain["usage"]["input_tokens"]
    assert effort["reasoning"]["effort"] == "high"


# ---------------------------------------------------------------- the bundled model
@pytest.mark.slow
def test_smollm2_answers_sensibly(tmp_path_factory: pytest.TempPathFactory) -> None:
    from openai import OpenAI

    srv = start_server(default_model_path(), tmp_path_factory.mktemp("responses-smol"),
                       "--max-num-batched-tokens", "512")
    try:
        with OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            name = c.models.list().data[0].id
            out = c.responses.create(model=name, input="What is the capital of France?",
                                     temperature=0, max_output_tokens=40)
            assert "Paris" in out.output_text, out.output_text
            more = c.responses.create(model=name, input="And of Italy?", temperature=0,
                                      max_output_tokens=40, previous_response_id=out.id)
            assert "Rome" in more.output_text, more.output_text
    finally:
        srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]

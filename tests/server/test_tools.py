"""Tool calling through the official ``openai`` client against a live ``pagoda serve`` started
with ``--tool-call-parser hermes`` and a ``--chat-template`` that renders tools: tool_choice
required (one and several tools, parallel or not), named, auto (a call, and plain text) and
none; streaming deltas reassembled equal the non-streamed answer; a follow-up with the
tool's result in the history is rendered and served."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import jsonschema
import pytest
from server_utils import ServerProcess, start_server

TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
CHAT = [{"role": "user", "content": "What is the weather in Oslo?"}]
HERMES_CALL = (r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{2,8}", '
               r'"unit": "C"\}\}</tool_call>')


@pytest.fixture(scope="module")
def tool_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("tool-logs")
    template = Path(logs) / "template.jinja"
    template.write_text(TEMPLATE)
    srv = start_server(tiny_model_dir, logs, "--num-kv-blocks", "256",
                       "--tool-call-parser", "hermes", "--chat-template", str(template))
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.fixture(scope="module")
def tclient(tool_server: ServerProcess):
    from openai import OpenAI

    with OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0,
                timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tmodel(tool_server: ServerProcess) -> str:
    return httpx.get(tool_server.url + "/v1/models").json()["data"][0]["id"]


def _validate(calls) -> None:
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _streamed(tclient, **kw) -> tuple[str, list[dict], str]:
    """Content, calls (name, arguments) and finish_reason, reassembled from the deltas."""
    content, calls, reason = "", {}, None
    for chunk in tclient.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert call["id"] is None, "a call's id came twice"
                call["id"] = tc.id
                assert tc.function.name, "the first delta of a call names its function"
            call["name"] += (tc.function.name or "") if tc.id else ""
            call["arguments"] += tc.function.arguments or ""
        reason = choice.finish_reason or reason
    assert "<tool_call>" not in content, "call text leaked into content"
    return content, [calls[i] for i in sorted(calls)], reason


# (With parallel calls allowed, the tiny random model never stops adding calls: the one
# answer with several calls below is written in the hermes format, under "auto".)
@pytest.mark.parametrize("tools", [[WEATHER], [WEATHER, TIME]])
def test_required_calls_parse_and_stream_the_same(tclient, tmodel, tools) -> None:
    kw = dict(model=tmodel, messages=CHAT, tools=tools, tool_choice="required", max_tokens=200,
              temperature=0, parallel_tool_calls=False)
    out = tclient.chat.completions.create(**kw).choices[0]
    assert out.finish_reason == "tool_calls" and len(out.message.tool_calls) == 1
    _validate(out.message.tool_calls)
    content, calls, reason = _streamed(tclient, **kw)
    assert reason == "tool_calls" and not content
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in out.message.tool_calls]


def test_named_tool_choice(tclient, tmodel) -> None:
    kw = dict(model=tmodel, messages=CHAT, tools=[WEATHER, TIME], max_tokens=120,
              temperature=0.7, seed=3,
              tool_choice={"type": "function", "function": {"name": "get_time"}})
    out = tclient.chat.completions.create(**kw).choices[0]
    assert out.finish_reason == "tool_calls"
    (call,) = out.message.tool_calls
    assert call.function.name == "get_time"
    _validate([call])
    content, calls, reason = _streamed(tclient, **kw)
    assert reason == "tool_calls" and [(c["name"], c["arguments"]) for c in calls] == [
        ("get_time", call.function.arguments)]


def test_auto_finds_a_hermes_call_and_keeps_text_as_content(tclient, tmodel) -> None:
    # The tiny random model writes no calls of its own: a regex makes it write one.
    forced = dict(model=tmodel, messages=CHAT, tools=[WEATHER], max_tokens=300, temperature=0,
                  extra_body={"structured_outputs": {"regex": r"Sure\. " + HERMES_CALL}})
    out = tclient.chat.completions.create(**forced).choices[0]
    assert out.finish_reason == "tool_calls"
    assert out.message.content == "Sure. "
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather"
    _validate([call])
    content, calls, reason = _streamed(tclient, **forced)
    assert (content, reason) == ("Sure. ", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", call.function.arguments)]
    plain = tclient.chat.completions.create(model=tmodel, messages=CHAT, tools=[WEATHER],
                                            max_tokens=8, temperature=0).choices[0]
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")


def test_auto_with_parallel_calls(tclient, tmodel) -> None:
    two = HERMES_CALL + r"\n" + HERMES_CALL.replace("get_weather", "get_time").replace(
        r'"city": "[a-z]{2,8}", "unit": "C"', r'"zone": "[A-Z]{3}"')
    kw = dict(model=tmodel, messages=CHAT, tools=[WEATHER, TIME], max_tokens=400,
              temperature=0, extra_body={"structured_outputs": {"regex": two}})
    out = tclient.chat.completions.create(**kw).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    assert [c.function.name for c in out.message.tool_calls] == ["get_weather", "get_time"]
    _validate(out.message.tool_calls)
    assert len({c.id for c in out.message.tool_calls}) == 2
    content, calls, reason = _streamed(tclient, **kw)
    assert (content, reason) == ("", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in out.message.tool_calls]
    # parallel_tool_calls false: the first call alone, streamed or not (as vLLM does)
    one = tclient.chat.completions.create(parallel_tool_calls=False, **kw).choices[0]
    first = out.message.tool_calls[0].function
    assert one.finish_reason == "tool_calls" and one.message.content is None
    assert [(c.function.name, c.function.arguments) for c in one.message.tool_calls] == [
        (first.name, first.arguments)]
    content, calls, reason = _streamed(tclient, parallel_tool_calls=False, **kw)
    assert (content, reason) == ("", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in one.message.tool_calls]


def test_none_answers_in_text_without_the_tools_in_the_prompt(tool_server, tclient,
                                                              tmodel) -> None:
    out = tclient.chat.completions.create(model=tmodel, messages=CHAT, tools=[WEATHER],
                                          tool_choice="none", max_tokens=8, temperature=0)
    assert out.choices[0].message.tool_calls is None
    with_tools = tclient.chat.completions.create(
        model=tmodel, messages=CHAT, tools=[WEATHER], tool_choice="required", max_tokens=1)
    assert with_tools.usage.prompt_tokens > out.usage.prompt_tokens   # <tools> rendered


def test_a_follow_up_with_the_tool_result(tool_server, tclient, tmodel) -> None:
    first = tclient.chat.completions.create(model=tmodel, messages=CHAT, tools=[WEATHER],
                                            tool_choice="required", max_tokens=200,
                                            temperature=0, parallel_tool_calls=False
                                            ).choices[0].message
    history = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in
                                                              first.tool_calls]},
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 21 C"},
    ]
    out = tclient.chat.completions.create(model=tmodel, messages=history, tools=[WEATHER],
                                          tool_choice="none", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    ids = httpx.post(tool_server.url + "/tokenize", json={"messages": history}).json()["tokens"]
    text = httpx.post(tool_server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "sunny, 21 C" in text and '"name": "get_weather"' in text

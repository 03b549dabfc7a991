"""Tool-call formats end to end: for hermes, pythonic and qwen3_coder, a scripted Qwen3
(tests/scripted_model.py) whose greedy answer is that format's calls of get_weather and
get_time, served by ``pagoda serve --tool-call-parser FORMAT`` and driven with the official
``openai`` client, streaming and not: the calls parse (Qwen3-Coder's values by the tool's
schema), the text around them is content, ``parallel_tool_calls: false`` returns the first
call only, the streamed deltas join to exactly the non-streamed message (also for an answer
cut inside a call), and the message sent back with the tools' results serves a next turn.
Then a model writing the JSON list of ``tool_choice: "required"``, and a Mistral one whose
markers are special tokens.

(Whether a call's arguments leave the server in several chunks depends on how fast the
client reads: the server sends the newest output it has. That they are sent as they are
written is tested on the same scripts token by token, in tests/unit/test_tool_parsers.py.)
"""
from __future__ import annotations

import json
import re
from typing import Iterator

import httpx
import pytest
from scripted_model import (MISTRAL_SCRIPT, MISTRAL_SPECIAL, REQUIRED_SCRIPT, TOOL_SCRIPTS,
                            make_scripted_model)
from server_utils import ServerProcess, start_server

ASK = [{"role": "user", "content": "What is the weather in Oslo, and the time in CET?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]},
                                     "days": {"type": "integer"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
# What each script's calls are (name, arguments) and the content around them.
EXPECTED = {
    "hermes": ("Let me check. ", [("get_weather", '{"city": "Oslo", "unit": "C"}'),
                                  ("get_time", '{"zone": "CET"}')]),
    "pythonic": (None, [("get_weather", '{"city": "Oslo", "unit": "C"}'),
                        ("get_time", '{"zone": "CET"}')]),
    "qwen3_coder": ("Checking both.\n", [
        ("get_weather", '{"city": "Oslo", "unit": "C", "days": 3}'),  # days: an integer
        ("get_time", '{"zone": "CET"}')]),
}


@pytest.fixture(scope="module", params=sorted(TOOL_SCRIPTS))
def served(request, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, ServerProcess, str]]:
    fmt = request.param
    model = make_scripted_model(str(tmp_path_factory.mktemp(f"scripted-{fmt}")),
                                TOOL_SCRIPTS[fmt])
    srv = start_server(model, tmp_path_factory.mktemp(f"{fmt}-logs"), "--tool-call-parser", fmt)
    name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    yield fmt, srv, name
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.fixture(scope="module")
def fclient(served):
    from openai import OpenAI

    _, srv, _ = served
    with OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _ask(served, **kw) -> dict:
    _, _, name = served
    return {"model": name, "messages": ASK, "tools": [WEATHER, TIME], "temperature": 0,
            "max_tokens": 60, **kw}


def _streamed(client, **kw) -> tuple[str, list[tuple[str, str]], list[str], str]:
    """Content, calls (name, arguments) and ids joined from the deltas, and the finish
    reason; each call's first delta names it, later ones carry only arguments."""
    content, calls, ids, reason = "", {}, [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            if tc.id is not None:
                assert tc.index == len(calls) and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.function.name, tc.function.arguments or ""]
                ids.append(tc.id)
            else:
                assert tc.function.name is None and tc.index in calls
                calls[tc.index][1] += tc.function.arguments
        reason = choice.finish_reason or reason
    return content, [tuple(calls[i]) for i in sorted(calls)], ids, reason


def _calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_the_calls_parse_and_the_rest_is_content(served, fclient):
    fmt = served[0]
    content, calls = EXPECTED[fmt]
    out = fclient.chat.completions.create(**_ask(served)).choices[0]
    assert out.finish_reason == "tool_calls"
    assert out.message.content == content and _calls(out.message) == calls
    assert len({c.id for c in out.message.tool_calls}) == 2
    for (_, arguments), call in zip(calls, out.message.tool_calls):
        assert json.loads(call.function.arguments) == json.loads(arguments)


@pytest.mark.parametrize("parallel", [True, False])
def test_streamed_deltas_join_to_the_message(served, fclient, parallel):
    kw = _ask(served, parallel_tool_calls=parallel)
    message = fclient.chat.completions.create(**kw).choices[0].message
    content, calls, ids, reason = _streamed(fclient, **kw)
    assert reason == "tool_calls"
    assert (content, calls) == (message.content or "", _calls(message))
    assert len(set(ids)) == len(ids) == (2 if parallel else 1)


def test_parallel_tool_calls_false_returns_the_first_call(served, fclient):
    fmt = served[0]
    out = fclient.chat.completions.create(**_ask(served, parallel_tool_calls=False)).choices[0]
    assert out.finish_reason == "tool_calls"
    assert out.message.content == EXPECTED[fmt][0]
    assert _calls(out.message) == EXPECTED[fmt][1][:1]


# max_tokens that cut each script inside its first call, and what is left of it: a JSON
# call keeps the arguments written so far, an XML one the parameters complete so far, and a
# Python call that never closed is no call (its text is content).
CUT = {"hermes": (4, "Let me check. ", [("get_weather", '{"city": ')]),
       "pythonic": (1, '[get_weather(city="Oslo", ', []),
       "qwen3_coder": (3, "Checking both.\n", [("get_weather", '{"city": "Oslo"}')])}


def test_an_answer_cut_inside_a_call_streams_what_it_returns(served, fclient):
    fmt = served[0]
    max_tokens, content, calls = CUT[fmt]
    kw = _ask(served, max_tokens=max_tokens)
    out = fclient.chat.completions.create(**kw).choices[0]
    assert out.finish_reason == "length"
    assert (out.message.content, _calls(out.message)) == (content, calls)
    streamed, streamed_calls, ids, reason = _streamed(fclient, **kw)
    assert (streamed, streamed_calls, reason) == (content or "", calls, "length")
    assert len(ids) == len(calls)


def test_the_message_goes_back_with_the_results(served, fclient):
    first = fclient.chat.completions.create(**_ask(served)).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "sunny" if i == 0 else "12:00"}
        for i, c in enumerate(first.tool_calls)]
    again = fclient.chat.completions.create(**{**_ask(served), "messages": history})
    assert again.choices[0].finish_reason == "tool_calls"  # the script, once more


@pytest.fixture(scope="module")
def required_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A scripted model whose answer is the JSON list tool_choice "required" asks for."""
    model = make_scripted_model(str(tmp_path_factory.mktemp("scripted-required")),
                                REQUIRED_SCRIPT)
    srv = start_server(model, tmp_path_factory.mktemp("required-logs"))
    yield srv.url, httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def test_required_calls_stream_their_arguments_as_written(required_server):
    from openai import OpenAI

    url, name = required_server
    # One tool: with two, llguidance forces the bytes both calls share ('[{"name": "get_')
    # in the tokenizer's own split, which the scripted tokens are not.
    kw = {"model": name, "messages": ASK, "tools": [WEATHER], "temperature": 0,
          "max_tokens": 60, "tool_choice": "required", "parallel_tool_calls": False}
    with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        out = client.chat.completions.create(**kw).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None
        assert _calls(out.message) == [("get_weather", '{"city": "Oslo", "unit": "C"}')]
        assert _streamed(client, **kw)[:2] == ("", _calls(out.message))


def test_mistral_markers_are_special_tokens_and_still_read(tmp_path_factory):
    """[TOOL_CALLS] and [ARGS] are special tokens, which decoding skips by default: the
    mistral parser decodes the answer with them, so the call is found, with a Mistral id."""
    from openai import OpenAI

    model = make_scripted_model(str(tmp_path_factory.mktemp("scripted-mistral")),
                                MISTRAL_SCRIPT, special=MISTRAL_SPECIAL)
    srv = start_server(model, tmp_path_factory.mktemp("mistral-logs"),
                       "--tool-call-parser", "mistral")
    try:
        name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        kw = {"model": name, "messages": ASK, "tools": [WEATHER], "temperature": 0,
              "max_tokens": 60}
        with OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                    timeout=60) as client:
            out = client.chat.completions.create(**kw).choices[0]
            assert out.finish_reason == "tool_calls" and out.message.content == "Checking. "
            assert _calls(out.message) == [("get_weather", '{"city": "Oslo", "unit": "C"}')]
            assert re.fullmatch(r"[A-Za-z0-9]{9}", out.message.tool_calls[0].id)
            content, calls, ids, reason = _streamed(client, **kw)
            assert (content, calls, reason) == ("Checking. ", _calls(out.message), "tool_calls")
            assert re.fullmatch(r"[A-Za-z0-9]{9}", ids[0])
            plain = client.chat.completions.create(**{**kw, "tool_choice": "none"}).choices[0]
            assert plain.message.content == 'Checking. get_weather{"city": "Oslo", "unit": "C"}'
    finally:
        srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]

"""A reasoning model behind ``pagoda serve --reasoning-parser qwen3 --tool-call-parser
hermes``: a scripted Qwen3 (tests/scripted_model.py) writes ``<think>R</think>`` then an
answer with a tool call. The reasoning goes to reasoning_content / reasoning, the content is
the answer alone, streamed deltas join to the same message, tool calls and structured
outputs apply after the thinking, and the chat template's switches (chat_template_kwargs,
reasoning_effort, continue_final_message) reach the template."""
from __future__ import annotations

import json
from typing import Iterator

import httpx
import jsonschema
import pytest
from scripted_model import CALL, LEAD, REASONING, make_scripted_model
from server_utils import ServerProcess, start_server

ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ANSWER = f"{LEAD}<tool_call>{json.dumps(CALL)}</tool_call>"


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    model = make_scripted_model(str(tmp_path_factory.mktemp("scripted-qwen3")))
    srv = start_server(model, tmp_path_factory.mktemp("reasoning-logs"),
                       "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes")
    name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    yield srv, name
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def _chat(thinker, **body) -> dict:
    srv, name = thinker
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
        "model": name, "messages": ASK, "max_tokens": 40, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _streamed(thinker, **body) -> tuple[dict, str]:
    """The deltas of a streamed answer joined field by field, and its finish reason."""
    srv, name = thinker
    joined: dict = {}
    reason = ""
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60, json={
            "model": name, "messages": ASK, "max_tokens": 40, "temperature": 0,
            "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            reason = choice["finish_reason"] or reason
            for key, value in choice["delta"].items():
                if key == "tool_calls":
                    joined.setdefault(key, []).extend(value)
                elif isinstance(value, str):
                    joined[key] = joined.get(key, "") + value
    return joined, reason


def test_reasoning_is_split_from_the_answer(thinker):
    message = _chat(thinker)["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == REASONING
    assert message["content"] == ANSWER
    streamed, reason = _streamed(thinker)
    assert streamed["reasoning_content"] == streamed["reasoning"] == REASONING
    assert streamed["content"] == ANSWER and reason == "stop"


def test_include_reasoning_false_drops_it(thinker):
    message = _chat(thinker, include_reasoning=False)["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"] == ANSWER
    streamed, _ = _streamed(thinker, include_reasoning=False)
    assert "reasoning" not in streamed and streamed["content"] == ANSWER


def test_tool_calls_are_parsed_from_the_answer_after_the_thinking(thinker):
    choice = _chat(thinker, tools=[WEATHER])["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == REASONING and message["content"] == LEAD
    call = message["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == (CALL["name"], CALL["arguments"])
    streamed, reason = _streamed(thinker, tools=[WEATHER])
    assert reason == "tool_calls" and streamed["reasoning"] == REASONING
    assert streamed["content"] == LEAD
    assert streamed["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_schema_constrains_the_answer_not_the_thinking(thinker):
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Bergen"]}},
              "required": ["city"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    message = _chat(thinker, response_format=fmt)["choices"][0]["message"]
    assert message["reasoning_content"] == REASONING
    jsonschema.validate(json.loads(message["content"]), schema)
    streamed, _ = _streamed(thinker, response_format=fmt)
    assert streamed["reasoning"] == REASONING and streamed["content"] == message["content"]


def test_thinking_off_in_the_template_leaves_the_answer_as_content(thinker):
    on = _chat(thinker)
    off = _chat(thinker, chat_template_kwargs={"enable_thinking": False})
    # the template closed an empty think block in the prompt: the answer is all content
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"]
    message = off["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"].startswith("<think>")
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"],
              "additionalProperties": False}
    constrained = _chat(thinker, chat_template_kwargs={"enable_thinking": False},
                        response_format={"type": "json_schema", "json_schema": {
                            "name": "n", "schema": schema}})["choices"][0]["message"]
    jsonschema.validate(json.loads(constrained["content"]), schema)  # no thinking first


def test_reasoning_effort_reaches_the_template(thinker):
    plain = _chat(thinker)["usage"]["prompt_tokens"]
    assert _chat(thinker, reasoning_effort="low")["usage"]["prompt_tokens"] > plain


def test_continue_final_message_resumes_inside_the_thinking(thinker):
    """An assistant prefill that opened the thinking: the prompt ends in <think>, so the
    answer starts inside it."""
    messages = ASK + [{"role": "assistant", "content": "<think>"}]
    out = _chat(thinker, messages=messages, continue_final_message=True,
                add_generation_prompt=False)
    message = out["choices"][0]["message"]
    assert message["reasoning_content"] == REASONING and message["content"] == ANSWER
    implicit = _chat(thinker, messages=messages, continue_final_message=True)
    assert implicit["choices"][0]["message"] == message


def test_litellm_hosted_vllm_with_reasoning_effort_and_its_message_sent_back(thinker,
                                                                           monkeypatch):
    """LiteLLM's ``hosted_vllm/`` provider, as agents run it: reasoning_effort sent, the
    reasoning read back, and the message it returned appended for the next turn."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    litellm = pytest.importorskip("litellm", reason="litellm is in the test extra")
    srv, name = thinker
    kw = dict(model=f"hosted_vllm/{name}", api_base=srv.url + "/v1", api_key="unused",
              temperature=0, max_tokens=40)
    first = litellm.completion(messages=ASK, reasoning_effort="low", **kw)
    message = first.choices[0].message
    assert message.reasoning_content == REASONING and message.content == ANSWER
    history = ASK + [message.model_dump(exclude_none=True),
                     {"role": "user", "content": "And tomorrow?"}]
    second = litellm.completion(messages=history, **kw)
    assert second.choices[0].message.reasoning_content == REASONING

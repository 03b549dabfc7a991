"""Ollama's API (``/api/...``) on ``pagoda serve``, through the official ``ollama`` client
and raw httpx: the model's listing, card and state, chat and generate streamed and whole
(the stream joins to the whole answer; the counts are the OpenAI route's), ``format``,
``options`` (seed, num_predict), ``think`` and tools on a scripted Qwen3, a table of bad
input (4xx, ``{"error"}`` naming the field, no leaked KV block), and the bundled SmolLM2
answering sensibly."""
from __future__ import annotations

import json
import time
from typing import Iterator

import httpx
import jsonschema
import ollama
import pytest
from scripted_model import CALL, LEAD, REASONING, make_scripted_model
from server_utils import ServerProcess, start_server

from pagoda.models.loader import default_model_path

ASK = [{"role": "user", "content": "Tell me about the quick brown fox."}]
GREEDY = {"temperature": 0, "num_predict": 12}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITY = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Bergen"]}},
        "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def oc(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def _joined(chunks: Iterator) -> tuple[str, str, list, object]:
    """A streamed chat's contents, thinkings and calls joined, and its last chunk."""
    content, thinking, calls, last = "", "", [], None
    for chunk in chunks:
        content += chunk.message.content or ""
        thinking += chunk.message.thinking or ""
        calls += chunk.message.tool_calls or []
        last = chunk
    assert last is not None and last.done
    return content, thinking, calls, last


def _assert_clean(server: ServerProcess) -> None:
    state = httpx.get(server.url + "/debug/state", timeout=30).json()
    assert state["invariants_ok"] and state["num_unfinished"] == 0, state
    assert state["num_free_blocks"] == state["num_blocks"], "a KV block leaked"


# ---------------------------------------------------------------- the model
def test_list_show_ps_version_and_root(server, oc, model_name) -> None:
    listed = oc.list().models
    assert [m.model for m in listed] == [f"{model_name}:latest"]
    details = listed[0].details
    assert details.family == "llama" and details.format == "safetensors"
    assert details.parameter_size and details.quantization_level == "F32"
    assert listed[0].size and listed[0].size > 0 and listed[0].modified_at is not None
    shown = oc.show(model_name)
    assert shown.capabilities == ["completion"]  # no tool-call or reasoning parser
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 1024
    assert shown.template and shown.details.family == "llama"
    assert oc.show(f"{model_name}:latest").modelinfo == shown.modelinfo
    loaded = oc.ps().models
    assert [m.model for m in loaded] == [f"{model_name}:latest"]
    assert loaded[0].context_length == 1024
    assert httpx.get(server.url + "/api/version").json()["version"] == "0.12.0"
    root = httpx.get(server.url + "/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert httpx.head(server.url + "/").status_code == 200


# ---------------------------------------------------------------- chat
def test_chat_stream_joins_to_the_whole_answer_and_counts_as_openai(oc, client,
                                                                     model_name) -> None:
    whole = oc.chat(model=model_name, messages=ASK, options=GREEDY, stream=False)
    content, _, _, last = _joined(oc.chat(model=model_name, messages=ASK, options=GREEDY,
                                          stream=True))
    assert whole.message.role == "assistant" and content == whole.message.content
    openai = client.chat.completions.create(model=model_name, messages=ASK, max_tokens=12,
                                            temperature=0)
    assert whole.message.content == openai.choices[0].message.content
    for answer in (whole, last):
        assert answer.done and answer.done_reason in ("stop", "length")
        assert answer.eval_count == openai.usage.completion_tokens
        assert answer.prompt_eval_count == openai.usage.prompt_tokens
        assert answer.total_duration >= answer.eval_duration > 0
        assert answer.load_duration == 0 and answer.created_at


def test_num_predict_cuts_with_length(oc, model_name) -> None:
    out = oc.chat(model=model_name, messages=ASK, stream=False,
                  options={"temperature": 0, "num_predict": 3, "stop": []})
    assert (out.done_reason, out.eval_count) == ("length", 3)
    *_, last = _joined(oc.chat(model=model_name, messages=ASK, stream=True,
                               options={"temperature": 0, "num_predict": 3}))
    assert (last.done_reason, last.eval_count) == ("length", 3)


def test_seed_reproduces_at_temperature_one(oc, model_name) -> None:
    def text(seed: int) -> str:
        return oc.chat(model=model_name, messages=ASK, stream=False, options={
            "temperature": 1, "seed": seed, "num_predict": 16}).message.content

    assert text(7) == text(7)
    assert len({text(s) for s in range(1, 5)}) > 1


def test_format_json_schema_and_json(oc, model_name) -> None:
    out = oc.chat(model=model_name, messages=ASK, format=CITY, stream=False,
                  options={"temperature": 0, "num_predict": 200})
    assert out.done_reason == "stop", out.message.content
    jsonschema.validate(json.loads(out.message.content), CITY)
    content, *_ = _joined(oc.chat(model=model_name, messages=ASK, format=CITY, stream=True,
                                  options={"temperature": 0, "num_predict": 200}))
    assert content == out.message.content
    anything = oc.generate(model=model_name, prompt="fox", format="json", stream=False,
                           options={"temperature": 0, "num_predict": 300})
    assert anything.done_reason == "stop", anything.response
    assert isinstance(json.loads(anything.response), dict)


def test_unknown_and_load_time_options_are_reported(server, model_name) -> None:
    r = httpx.post(server.url + "/api/chat", timeout=60, json={
        "model": model_name, "messages": ASK, "stream": False, "keep_alive": "5m",
        "options": {"num_ctx": 4096, "num_gpu": 1, "temperature": 0, "num_predict": 2},
        "brand_new": 1})
    assert r.status_code == 200, r.text
    reported = r.headers["x-pagoda-ignored-fields"].split(",")
    assert set(reported) == {"brand_new", "keep_alive", "options.num_ctx", "options.num_gpu"}


# ---------------------------------------------------------------- generate
def test_generate_with_system_is_the_chat_templates_turn(oc, client, model_name) -> None:
    out = oc.generate(model=model_name, prompt="fox", system="Be brief.", stream=False,
                      options=GREEDY)
    openai = client.chat.completions.create(
        model=model_name, max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fox"}])
    assert out.response == openai.choices[0].message.content
    assert out.prompt_eval_count == openai.usage.prompt_tokens
    assert not out.context  # no context tokens are kept between requests
    streamed = "".join(c.response for c in oc.generate(model=model_name, prompt="fox",
                                                       system="Be brief.", options=GREEDY,
                                                       stream=True))
    assert streamed == out.response


def test_generate_raw_sends_the_prompt_as_is(oc, client, model_name) -> None:
    out = oc.generate(model=model_name, prompt="The quick brown", raw=True, stream=False,
                      options=GREEDY)
    plain = client.completions.create(model=model_name, prompt="The quick brown",
                                      max_tokens=12, temperature=0)
    assert out.response == plain.choices[0].text
    assert out.prompt_eval_count == plain.usage.prompt_tokens


def test_nothing_to_generate_is_answered_at_once(oc, model_name) -> None:
    out = oc.generate(model=model_name, prompt="", stream=False)
    assert out.done and out.response == "" and out.eval_count == 0
    chat = oc.chat(model=model_name, messages=[], stream=False)
    assert chat.done and chat.message.content == ""


# ---------------------------------------------------------------- bad input
M = "MODEL"  # replaced by the served model's name
BAD = [
    # (path, body, status, what the error must name)
    ("/api/chat", {"messages": ASK}, 400, "model"),
    ("/api/chat", {"model": "no-such:latest", "messages": ASK}, 404, "model 'no-such:latest'"),
    ("/api/chat", {"model": M, "messages": "hi"}, 400, "messages"),
    ("/api/chat", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/api/chat", {"model": M, "messages": ASK, "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ("/api/chat", {"model": M, "messages": ASK, "options": {"temperature": -1}}, 400,
     "options.temperature"),
    ("/api/chat", {"model": M, "messages": ASK, "options": {"top_p": 2}}, 400, "options.top_p"),
    ("/api/chat", {"model": M, "messages": ASK, "options": {"num_predict": 0}}, 400,
     "options.num_predict"),
    ("/api/chat", {"model": M, "messages": ASK, "options": {"num_predict": 5000}}, 400,
     "options.num_predict"),
    ("/api/chat", {"model": M, "messages": ASK, "options": {"repeat_penalty": 1.1,
                                                             "repeat_last_n": 64}}, 400,
     "options.repeat_last_n"),
    ("/api/chat", {"model": M, "messages": ASK, "options": {"seed": "x"}}, 400, "options.seed"),
    ("/api/chat", {"model": M, "messages": ASK, "options": {"stop": [""]}}, 400, "options.stop"),
    ("/api/chat", {"model": M, "messages": ASK, "format": "yaml"}, 400, "format"),
    ("/api/chat", {"model": M, "messages": ASK, "format": {"type": "nonsense"}}, 400, "format"),
    ("/api/chat", {"model": M, "messages": ASK, "stream": "yes"}, 400, "stream"),
    ("/api/chat", {"model": M, "messages": ASK, "think": True}, 400, "think"),
    ("/api/chat", {"model": M, "messages": ASK, "think": "maximal"}, 400, "think"),
    ("/api/chat", {"model": M, "messages": ASK, "tools": [WEATHER]}, 400, "tools"),
    ("/api/chat", {"model": M, "messages": ASK, "logprobs": True}, 400, "logprobs"),
    ("/api/chat", {"model": M, "messages": [{"role": "user", "content": "x",
                                             "images": ["aGk="]}]}, 400, "images"),
    ("/api/chat", {"model": M, "messages": [{"role": "user", "content": "fox " * 2000}]}, 400,
     "messages"),
    ("/api/generate", {"model": M, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/generate", {"model": M, "prompt": "x", "context": [1, 2]}, 400, "context"),
    ("/api/generate", {"model": M, "prompt": "x", "template": "{{ .Prompt }}"}, 400,
     "template"),
    ("/api/generate", {"model": M, "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"model": M, "prompt": "x", "raw": True, "system": "s"}, 400, "system"),
    ("/api/generate", {"model": M, "prompt": 5}, 400, "prompt"),
    ("/api/generate", {"model": M, "prompt": "x " * 3000, "raw": True}, 400, "prompt"),
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope'"),
    ("/api/show", {"model": "nope"}, 404, "model 'nope'"),
    ("/api/embed", {"model": M, "input": "x"}, 400, "--runner pooling"),
    ("/api/embeddings", {"model": M, "prompt": "x"}, 400, "--runner pooling"),
]


@pytest.mark.parametrize(("path", "body", "status", "named"), BAD,
                         ids=[f"{p}-{n}" for p, _, _, n in BAD])
def test_bad_input_is_a_4xx_naming_the_field(server, model_name, path, body, status,
                                             named) -> None:
    body = {k: (model_name if v == M else v) for k, v in body.items()}
    for stream in (False, True):
        sent = {**body, "stream": stream} if "stream" not in body else body
        r = httpx.post(server.url + path, json=sent, timeout=60)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert list(r.json()) == ["error"] and named in r.json()["error"], r.text
    ok = httpx.post(server.url + "/api/generate", timeout=60, json={
        "model": model_name, "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    assert ok.status_code == 200 and ok.json()["done"]
    _assert_clean(server)


def test_the_client_raises_the_error(oc) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model="missing-model", messages=ASK)
    assert e.value.status_code == 404 and "missing-model" in e.value.error


def test_a_client_leaving_a_stream_frees_its_blocks(server, model_name) -> None:
    with httpx.stream("POST", server.url + "/api/generate", timeout=60, json={
            "model": model_name, "prompt": "a long story", "options": {"num_predict": 800}}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        first = json.loads(next(r.iter_lines()))
        assert first["done"] is False and first["model"] == model_name
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/debug/state").json()["num_unfinished"]:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.1)
    _assert_clean(server)


KEY = "ollama-test-key"


@pytest.fixture(scope="module")
def tight(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerProcess]:
    """A key, small bodies, and no room in the queue: every generation is refused."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("ollama-tight-logs"),
                       "--max-queued-requests", "0", "--api-key", KEY,
                       "--max-request-body-bytes", "20000")
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def test_401_413_and_429_have_ollamas_shape(tight) -> None:
    url, auth = tight.url, {"Authorization": f"Bearer {KEY}"}
    denied = httpx.get(url + "/api/tags")
    assert denied.status_code == 401 and list(denied.json()) == ["error"]
    oc = ollama.Client(host=url, headers=auth)
    name = oc.list().models[0].model
    big = httpx.post(url + "/api/chat", headers=auth, json={
        "model": name, "messages": [{"role": "user", "content": "x" * 30000}]})
    assert big.status_code == 413 and "body" in big.json()["error"]
    for stream in (False, True):
        refused = httpx.post(url + "/api/chat", headers=auth, timeout=60, json={
            "model": name, "messages": ASK, "stream": stream})
        assert refused.status_code == 429 and list(refused.json()) == ["error"]
        assert "queued" in refused.json()["error"]
        assert refused.headers["Retry-After"].isdigit()
    with pytest.raises(ollama.ResponseError) as e:
        oc.generate(model=name, prompt="hi", stream=False)
    assert e.value.status_code == 429


# ---------------------------------------------------------------- think and tools
@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ollama.Client, str]]:
    model = make_scripted_model(str(tmp_path_factory.mktemp("ollama-qwen3")))
    srv = start_server(model, tmp_path_factory.mktemp("ollama-reasoning-logs"),
                       "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes")
    name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    yield ollama.Client(host=srv.url, timeout=120), name
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


ANSWER = f"{LEAD}<tool_call>{json.dumps(CALL)}</tool_call>"
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def test_think_returns_the_thinking(thinker) -> None:
    oc, name = thinker
    assert oc.show(name).capabilities == ["completion", "tools", "thinking"]
    out = oc.chat(model=name, messages=WEATHER_ASK, think=True, stream=False,
                  options={"temperature": 0})
    assert out.message.thinking == REASONING and out.message.content == ANSWER
    content, thinking, _, last = _joined(oc.chat(model=name, messages=WEATHER_ASK, think=True,
                                                 stream=True, options={"temperature": 0}))
    assert (thinking, content) == (REASONING, ANSWER) and last.done_reason == "stop"
    gen = oc.generate(model=name, prompt="What is the weather in Oslo?", think=True,
                      stream=False, options={"temperature": 0})
    assert gen.thinking == REASONING and gen.response == ANSWER
    off = oc.chat(model=name, messages=WEATHER_ASK, think=False, stream=False,
                  options={"temperature": 0})
    # the template closed an empty think block: all the answer is content
    assert off.message.thinking is None and off.message.content.startswith("<think>")


def test_tools_give_calls_with_object_arguments(thinker) -> None:
    oc, name = thinker
    out = oc.chat(model=name, messages=WEATHER_ASK, tools=[WEATHER], stream=False,
                  options={"temperature": 0})
    assert out.done_reason == "stop" and out.message.content == LEAD
    assert out.message.thinking == REASONING
    [call] = out.message.tool_calls
    assert (call.function.name, dict(call.function.arguments)) == (CALL["name"],
                                                                   CALL["arguments"])
    content, thinking, calls, _ = _joined(oc.chat(model=name, messages=WEATHER_ASK,
                                                  tools=[WEATHER], stream=True,
                                                  options={"temperature": 0}))
    assert (content, thinking) == (LEAD, REASONING)
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        (CALL["name"], CALL["arguments"])]
    follow_up = WEATHER_ASK + [
        {"role": "assistant", "content": LEAD, "tool_calls": [{"function": CALL}]},
        {"role": "tool", "content": "12 C, rain", "tool_name": "get_weather"}]
    again = oc.chat(model=name, messages=follow_up, tools=[WEATHER], stream=False,
                    options={"temperature": 0, "num_predict": 4})
    assert again.done and again.prompt_eval_count > out.prompt_eval_count


# ---------------------------------------------------------------- the bundled model
@pytest.mark.slow
def test_smollm2_answers_sensibly(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start_server(default_model_path(), tmp_path_factory.mktemp("ollama-smol-logs"),
                       "--max-num-batched-tokens", "512")
    try:
        oc = ollama.Client(host=srv.url, timeout=120)
        name = oc.list().models[0].model
        out = oc.chat(model=name, stream=False, options={"temperature": 0, "num_predict": 40},
                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in out.message.content, out.message.content
        assert oc.show(name).details.family == "llama"
    finally:
        srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None])
def test_a_body_is_json_whatever_its_content_type(server, model_name, content_type) -> None:
    """Ollama's docs post with `curl -d '{...}'` (a form type): Ollama reads JSON anyway, and
    so do its routes here; OpenAI's routes still want JSON's type."""
    body = json.dumps({"model": model_name, "stream": False, "messages": ASK,
                       "options": {"num_predict": 2}}).encode()
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(server.url + "/api/chat", content=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True and r.json()["message"]["role"] == "assistant"
    openai = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers)
    assert openai.status_code == 400

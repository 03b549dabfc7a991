"""Every bad request gets its 4xx and an OpenAI-style error naming the field, never a 5xx;
the engine serves a normal request right after each. Also 401 (API keys), 413 and 429."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from server_utils import metric_values, start_server

CTX = 1024
M = "MODEL"   # replaced by the served model's name
CHAT = [{"role": "user", "content": "hi"}]

COMPLETION_CASES = [
    # (body, status, param)
    ({"prompt": "x"}, 400, "model"),
    ({"model": M}, 400, "prompt"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ({"model": M, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": M, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": M, "prompt": "x", "max_tokens": CTX}, 400, "max_tokens"),
    ({"model": M, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": M, "prompt": [7] * CTX}, 400, "prompt"),
    ({"model": M, "prompt": [7] * (CTX + 50)}, 400, "prompt"),
    ({"model": M, "prompt": ""}, 400, "prompt"),
    ({"model": M, "prompt": []}, 400, "prompt"),
    ({"model": M, "prompt": [1, 2, 100000]}, 400, "prompt"),
    ({"model": M, "prompt": [1, -2]}, 400, "prompt"),
    ({"model": M, "prompt": {"text": "x"}}, 400, "prompt"),
    ({"model": M, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": M, "prompt": "x", "n": 100000}, 400, "n"),
    ({"model": M, "prompt": "x", "n": 2.5}, 400, "n"),
    ({"model": M, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": M, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": M, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": M, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": M, "prompt": "x", "top_k": -3}, 400, "top_k"),
    ({"model": M, "prompt": "x", "presence_penalty": 9}, 400, "presence_penalty"),
    ({"model": M, "prompt": "x", "frequency_penalty": -9}, 400, "frequency_penalty"),
    ({"model": M, "prompt": "x", "stop": [str(i) for i in range(40)]}, 400, "stop"),
    ({"model": M, "prompt": "x", "stop": ["y" * 5000]}, 400, "stop"),
    ({"model": M, "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": M, "prompt": "x", "stop": 5}, 400, "stop"),
    ({"model": M, "prompt": "x", "logprobs": 1000}, 400, "logprobs"),
    ({"model": M, "prompt": "x", "seed": "abc"}, 400, "seed"),
    ({"model": M, "prompt": "x", "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens"),
    ({"model": M, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": M, "prompt": "x", "guided_choice": []}, 400, "guided_choice"),
    ({"model": M, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": M, "prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({"model": M, "prompt": "x", "kv_transfer_params": "remote"}, 400, "kv_transfer_params"),
    ({"model": M, "prompt": "x", "kv_transfer_params": {"do_remote_decode": True}}, 400,
     "kv_transfer_params.do_remote_decode"),     # this instance is no prefill instance
]

CHAT_CASES = [
    ({"model": M}, 400, "messages"),
    ({"model": M, "messages": []}, 400, "messages"),
    ({"model": M, "messages": "hello"}, 400, "messages"),
    ({"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": M, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ({"model": M, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": M, "messages": CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ({"model": M, "messages": CHAT, "max_tokens": CTX * 2}, 400, "max_tokens"),
    ({"model": M, "messages": [{"role": "user", "content": "fox " * 2000}]}, 400, "messages"),
    ({"model": M, "messages": CHAT, "logprobs": True, "top_logprobs": 500}, 400,
     "top_logprobs"),
    ({"model": M, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": M, "messages": CHAT, "temperature": float("nan")}, 400, "temperature"),
    ({"model": "gpt-nope", "messages": CHAT}, 404, "model"),
    # Fields that change what the answer must be, not supported yet: refused, never dropped.
    # Tools (served: tests/server/test_tools.py), malformed or inconsistent.
    ({"model": M, "messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tool_choice"),          # "auto" by default, and this server has no parser
    ({"model": M, "messages": CHAT, "tools": [{"type": "function", "function": {}}]},
     400, "tools[0].function.name"),
    ({"model": M, "messages": CHAT, "tools": [{"type": "function", "function": {
        "name": "a b"}}]}, 400, "tools[0].function.name"),
    ({"model": M, "messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": M, "messages": CHAT, "tool_choice": {"type": "function", "function": {
        "name": "g"}}, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tool_choice.function.name"),
    ({"model": M, "messages": CHAT, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f"}}],
      "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    ({"model": M, "messages": [{"role": "tool", "content": "42"}]}, 400,
     "messages[0].tool_call_id"),
    ({"model": M, "messages": CHAT, "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ({"model": M, "messages": CHAT, "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ({"model": M, "messages": CHAT, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"model": M, "messages": CHAT, "logit_bias": {"5": "up"}}, 400, "logit_bias.5"),
    # (response_format and structured_outputs are served: tests/server/test_structured_outputs_api.py)
    ({"model": M, "messages": CHAT, "guided_json": {"type": 12}}, 400, "guided_json"),
    ({"model": M, "messages": CHAT, "reasoning_effort": 3}, 400, "reasoning_effort"),
    ({"model": M, "messages": CHAT, "chat_template_kwargs": {"tools": []}}, 400,
     "chat_template_kwargs.tools"),
    ({"model": M, "messages": CHAT, "continue_final_message": True}, 400,
     "continue_final_message"),
    ({"model": M, "messages": [{"role": "user", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     400, "messages[0].tool_calls"),
    # The legacy function-calling fields, and content this text-only model cannot read.
    ({"model": M, "messages": CHAT, "functions": [{"name": "f", "parameters": {}}]}, 400,
     "functions"),
    ({"model": M, "messages": CHAT, "function_call": {"name": "f"}}, 400, "function_call"),
    ({"model": M, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400,
     "messages[0].content"),
    ({"model": M, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, 400,
     "messages[0].content"),
    # A schema that is JSON but not a JSON schema.
    ({"model": M, "messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 12}}}}, 400, "response_format.json_schema.schema"),
]


# Valid but extreme: served (200), and the engine lives on.
EXTREME_CASES = [
    {"top_k": 10**30}, {"top_k": 2**63}, {"seed": 2**64 - 1}, {"seed": -(2**63)},
    {"temperature": 1e308}, {"temperature": 1e-300}, {"top_p": 1e-300}, {"min_p": 1.0},
    {"repetition_penalty": 1e308}, {"repetition_penalty": 1e-300},
    {"stop_token_ids": [10**30]}, {"presence_penalty": 2, "frequency_penalty": -2},
    {"logprobs": 20, "top_k": 1}, {"min_tokens": 4, "max_tokens": 4},
    # The unsupported fields' values that ask for nothing, and fields that change nothing.
    {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {},
     "best_of": 1, "metadata": {"k": "v"}, "store": False},
]


def _fill(body: dict, model: str) -> dict:
    return {k: (model if v == M else v) for k, v in body.items()}


def _check_error(resp: httpx.Response, status: int, param: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    assert err["message"] and err["type"]


def _assert_still_serves(url: str, model: str) -> None:
    resp = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "ok",
                                                     "max_tokens": 3, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3


def _post_raw(url: str, path: str, body: dict) -> httpx.Response:
    # allow_nan: NaN goes out as the (non-standard) NaN literal, as some clients send it
    return httpx.post(url + path, content=json.dumps(body, allow_nan=True),
                      headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("body, status, param", COMPLETION_CASES)
def test_bad_completion(server, model_name: str, body: dict, status: int, param: str) -> None:
    _check_error(_post_raw(server.url, "/v1/completions", _fill(body, model_name)), status,
                 param)
    _assert_still_serves(server.url, model_name)


@pytest.mark.parametrize("body, status, param", CHAT_CASES)
def test_bad_chat(server, model_name: str, body: dict, status: int, param: str) -> None:
    _check_error(_post_raw(server.url, "/v1/chat/completions", _fill(body, model_name)),
                 status, param)
    _assert_still_serves(server.url, model_name)


POOLING_ROUTES = [
    ("/v1/embeddings", {"input": "x"}),
    ("/v1/rerank", {"query": "q", "documents": ["d"]}),
    ("/score", {"text_1": "a", "text_2": "b"}),
    ("/classify", {"input": "x"}),
]


@pytest.mark.parametrize("path, body", POOLING_ROUTES)
def test_pooling_routes_name_the_runner_on_a_generation_model(server, model_name: str,
                                                               path: str, body: dict) -> None:
    resp = _post_raw(server.url, path, {"model": model_name, **body})
    _check_error(resp, 400, "model")
    assert "--runner pooling" in resp.json()["error"]["message"]
    _assert_still_serves(server.url, model_name)


@pytest.mark.parametrize("extra", EXTREME_CASES)
def test_extreme_values_are_served(server, model_name: str, extra: dict) -> None:
    resp = _post_raw(server.url, "/v1/completions", {"model": model_name, "prompt": [5, 6, 7],
                                                      "max_tokens": 4, **extra})
    assert resp.status_code == 200, resp.text
    _assert_still_serves(server.url, model_name)


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"null", b'"text"',
                                     b'{"model": "x", "prompt": "a"'])
def test_malformed_body(server, model_name: str, content: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        resp = httpx.post(server.url + path, content=content,
                          headers={"content-type": "application/json"})
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json()["error"]["param"] == "body"
    _assert_still_serves(server.url, model_name)


def test_oversized_body_is_413(server, model_name: str) -> None:
    big = json.dumps({"model": model_name, "prompt": "a" * (5 * 1024 * 1024)})
    resp = httpx.post(server.url + "/v1/completions", content=big,
                      headers={"content-type": "application/json"})
    _check_error(resp, 413, "body")
    _assert_still_serves(server.url, model_name)


def test_bad_tokenize_and_detokenize(server, model_name: str) -> None:
    _check_error(httpx.post(server.url + "/detokenize", json={"tokens": [1, 10**9]}), 400,
                 "tokens")
    _check_error(httpx.post(server.url + "/detokenize", json={"tokens": "abc"}), 400, "tokens")
    _check_error(httpx.post(server.url + "/tokenize", json={}), 400, "prompt")
    _check_error(httpx.post(server.url + "/tokenize", json={"prompt": "a", "model": "zz"}), 404,
                 "model")
    assert httpx.get(server.url + "/no/such/path").status_code == 404
    _assert_still_serves(server.url, model_name)


# ------------------------------------------------- API keys and admission control
KEYS = ("key-alpha", "key-beta")


@pytest.fixture(scope="module")
def tight_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """One sequence at a time, at most 2 queued requests / 40 queued prompt tokens, keys."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("tight-logs"),
                       "--num-kv-blocks", "128", "--max-num-seqs", "1",
                       "--max-queued-requests", "2", "--max-queued-prompt-tokens", "40",
                       "--api-key", KEYS[0], "--api-key", KEYS[1])
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_key(tight_server) -> None:
    url = tight_server.url
    body = {"model": "tiny", "prompt": [3, 4, 5], "max_tokens": 2}
    assert httpx.get(url + "/health").status_code == 200       # open
    _check_error(httpx.post(url + "/v1/completions", json=body), 401, "authorization")
    _check_error(httpx.post(url + "/v1/completions", json=body, headers=_auth("key-alph")),
                 401, "authorization")
    _check_error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic key-alpha"}),
                 401, "authorization")
    model = httpx.get(url + "/v1/models", headers=_auth(KEYS[1])).json()["data"][0]["id"]
    for key in KEYS:
        resp = httpx.post(url + "/v1/completions", json={**body, "model": model},
                          headers=_auth(key))
        assert resp.status_code == 200, resp.text


def test_key_derived_cache_salt_differs_per_key() -> None:
    from pagoda.entrypoints.openai.api_server import cache_salt_for_key

    salts = {cache_salt_for_key(k) for k in (*KEYS, "x")}
    assert len(salts) == 3
    assert cache_salt_for_key(KEYS[0]) == cache_salt_for_key(KEYS[0])
    assert KEYS[0] not in cache_salt_for_key(KEYS[0])


def _wait_waiting(url: str, n: int) -> None:
    for _ in range(600):
        if metric_values(url)["pagoda:num_requests_waiting"] == n:
            return
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"never saw {n} waiting requests")


def test_admission_control_429(tight_server) -> None:
    url, headers = tight_server.url, _auth(KEYS[0])
    model = httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]

    def body(n_prompt: int, max_tokens: int, stream: bool = False) -> dict:
        return {"model": model, "prompt": [9] * n_prompt, "max_tokens": max_tokens,
                "ignore_eos": True, "stream": stream}

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:
            async with c.stream("POST", "/v1/completions", json=body(4, 900, True)) as long:
                lines = long.aiter_lines()
                await anext(lines)                      # it runs: the one sequence slot
                queued = asyncio.ensure_future(c.post("/v1/completions", json=body(30, 4)))
                await asyncio.to_thread(_wait_waiting, url, 1)
                by_tokens = await c.post("/v1/completions", json=body(20, 4))
                _check_error(by_tokens, 429, None)
                assert "prompt tokens" in by_tokens.json()["error"]["message"]
                assert by_tokens.headers["Retry-After"].isdigit()
                queued2 = asyncio.ensure_future(c.post("/v1/completions", json=body(5, 4)))
                await asyncio.to_thread(_wait_waiting, url, 2)
                by_count = await c.post("/v1/completions", json=body(1, 4))
                _check_error(by_count, 429, None)
                assert "requests queued" in by_count.json()["error"]["message"]
            # the long stream is closed: the queued requests run
            return [(await queued).status_code, (await queued2).status_code]

    assert asyncio.run(scenario()) == [200, 200]
    m = metric_values(url)
    assert m["pagoda:num_requests_waiting"] == 0


def test_each_api_key_is_its_own_prefix_cache_tenant(tight_server) -> None:
    url = tight_server.url
    model = httpx.get(url + "/v1/models", headers=_auth(KEYS[0])).json()["data"][0]["id"]
    body = {"model": model, "prompt": list(range(100, 150)), "max_tokens": 2}

    def cached(key: str, **extra: object) -> int:
        resp = httpx.post(url + "/v1/completions", json={**body, **extra}, headers=_auth(key))
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(KEYS[0])
    assert cached(KEYS[0]) == 48
    assert cached(KEYS[1]) == 0                       # the other key does not share it
    assert cached(KEYS[1], cache_salt="shared") == 0  # an explicit salt wins over the key's
    assert cached(KEYS[0], cache_salt="shared") == 48

"""Admission control and hang-ups for the APIs beside OpenAI's chat: a full queue answers 429
in each API's own shape (streamed or not, with Retry-After), and a client that leaves a stream
of Anthropic's or the Responses API aborts its request at once (nothing left running, every
block free). Ollama's are in test_ollama_api.py."""
from __future__ import annotations

import time
from typing import Iterator

import httpx
import pytest
from server_utils import ServerProcess, metric_values, start_server

ASK = [{"role": "user", "content": "hi"}]


def bodies(model: str) -> dict[str, dict]:
    return {
        "/v1/responses": {"model": model, "input": "hi", "max_output_tokens": 4},
        "/v1/messages": {"model": model, "max_tokens": 4, "messages": ASK},
        "/v1/chat/completions": {"model": model, "max_tokens": 4, "messages": ASK},
    }


def error_kind(path: str, body: dict) -> str:
    """The error's type, wherever the API puts it."""
    if path == "/v1/messages":
        assert body["type"] == "error"
    return body["error"]["type"]


PATHS = ("/v1/responses", "/v1/messages", "/v1/chat/completions")


@pytest.fixture(scope="module")
def full(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[ServerProcess]:
    """No room in the queue: every generation is refused."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("admission-logs"),
                       "--max-queued-requests", "0")
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_a_429_in_each_apis_shape(full, path: str, stream: bool) -> None:
    model = httpx.get(full.url + "/v1/models").json()["data"][0]["id"]
    r = httpx.post(full.url + path, json={**bodies(model)[path], "stream": stream}, timeout=60)
    assert r.status_code == 429, r.text
    assert error_kind(path, r.json()) == "rate_limit_error"
    assert r.headers["Retry-After"].isdigit()


LONG = {"/v1/responses": {"input": "a long story", "max_output_tokens": 800},
        "/v1/messages": {"max_tokens": 800, "messages": [{"role": "user", "content": "story"}]}}


@pytest.mark.parametrize("path", sorted(LONG))
def test_a_client_leaving_a_stream_aborts_it(server, model_name: str, path: str) -> None:
    body = {"model": model_name, "stream": True, "temperature": 1.0, **LONG[path]}
    aborted = 'pagoda:request_success_total{finished_reason="abort"}'
    before = metric_values(server.url)[aborted]
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):  # the first event has come
            pass
    deadline = time.monotonic() + 30
    while (state := httpx.get(server.url + "/debug/state").json())["num_unfinished"]:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.1)
    assert state["invariants_ok"] and state["num_free_blocks"] == state["num_blocks"], state
    assert metric_values(server.url)[aborted] == before + 1  # aborted, not run to its end

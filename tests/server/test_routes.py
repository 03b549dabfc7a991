"""One route table (pagoda/entrypoints/routes.py): ``pagoda serve`` serves exactly its
routes, and behind ``pagoda router`` every one of them answers as the instance does (the
instance's own views included: tokenizer, inspector, debug state), with the instance's
headers (x-pagoda-ignored-fields) relayed, streamed or not."""
from __future__ import annotations

import json
from typing import Iterator

import httpx
import pytest
from server_utils import ServerProcess, start_pagoda_router

from pagoda.entrypoints.routes import ROUTES, Routing


@pytest.fixture(scope="module")
def router(server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_pagoda_router(tmp_path_factory.mktemp("routes"), "--replicas", server.url)
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def test_the_server_serves_exactly_the_table(server):
    """The session server has every optional part on (debug endpoints, the inspector)."""
    spec = httpx.get(server.url + "/openapi.json").json()
    served = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    served.add(("GET", "/inspect"))  # the inspector's page, kept out of the schema
    table = {(r.method, r.path.replace(":path}", "}")) for r in ROUTES}
    assert served == table


BODIES = {"/tokenize": {"prompt": "hello there"}, "/detokenize": {"tokens": [5, 6, 7]}}
# Anthropic's routes need the model's name in their bodies: test_anthropic_routes below
ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
# The Responses API's need a body and a stored id: test_responses_routes below
RESPONSES_ROUTES = ("/v1/responses", "/v1/responses/{response_id}")
# Ollama's generation routes answer with a clock (created_at, durations), its embedding
# routes with a 400: test_ollama_routes below
OLLAMA_ROUTES = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
# a pooling model's routes: on this (generation) server, a 400 naming --runner pooling
POOLING_ROUTES = ("/v1/embeddings", "/v1/rerank", "/rerank", "/v2/rerank", "/score",
                  "/v1/score", "/classify", "/v1/classify")


@pytest.mark.parametrize("route", [r for r in ROUTES if r.routing is Routing.INSTANCE
                                   and r.path not in ("/inspect/events", "/debug/fault",
                                                      *ANTHROPIC_ROUTES, *RESPONSES_ROUTES,
                                                      *OLLAMA_ROUTES, *POOLING_ROUTES)],
                         ids=lambda r: r.path)
def test_each_instance_route_answers_behind_the_router(server, router, model_name, route):
    path = route.path.replace("{model_id:path}", model_name)
    kw = {"json": BODIES.get(route.path, {})} if route.method == "POST" else {}
    direct = httpx.request(route.method, server.url + path, timeout=30, **kw)
    routed = httpx.request(route.method, router.url + path, timeout=30, **kw)
    assert direct.status_code == routed.status_code == 200, (path, routed.text[:300])
    assert routed.headers["content-type"] == direct.headers["content-type"]
    if route.path in ("/inspect/state", "/debug/state"):  # live views: the same shape
        assert routed.json().keys() == direct.json().keys()
    else:
        assert routed.content == direct.content


@pytest.mark.parametrize("path", POOLING_ROUTES)
def test_pooling_routes_answer_alike_behind_the_router(server, router, model_name, path):
    body = {"model": model_name, "input": "x", "query": "q", "documents": ["d"],
            "text_1": "a", "text_2": "b"}
    direct = httpx.post(server.url + path, json=body, timeout=30)
    routed = httpx.post(router.url + path, json=body, timeout=30)
    assert direct.status_code == routed.status_code == 400, routed.text
    assert routed.content == direct.content and "--runner pooling" in routed.text


def test_the_inspector_stream_and_a_chosen_instance(router):
    with httpx.stream("GET", router.url + "/inspect/events?instance=0", timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])
    assert httpx.get(router.url + "/v1/models?instance=7").status_code == 200  # no 7th: any


def test_instance_headers_are_relayed(router, model_name):
    body = {"model": model_name, "prompt": "hi", "max_tokens": 2, "num_ctx": 8}
    whole = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
    assert whole.status_code == 200 and whole.headers["x-pagoda-ignored-fields"] == "num_ctx"
    with httpx.stream("POST", router.url + "/v1/completions", timeout=60,
                      json={**body, "stream": True}) as r:
        assert r.headers["x-pagoda-ignored-fields"] == "num_ctx"
    bad = httpx.post(router.url + "/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_anthropic_routes_answer_behind_the_router(server, router, model_name):
    """/v1/messages (its stream too) and /v1/messages/count_tokens, proxied as they came."""
    body = {"model": model_name, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]}
    count = {"model": model_name, "messages": body["messages"]}
    direct = httpx.post(server.url + "/v1/messages/count_tokens", json=count, timeout=30)
    routed = httpx.post(router.url + "/v1/messages/count_tokens", json=count, timeout=30)
    assert direct.status_code == routed.status_code == 200 and routed.content == direct.content
    direct = httpx.post(server.url + "/v1/messages", json=body, timeout=60).json()
    routed = httpx.post(router.url + "/v1/messages", json=body, timeout=60).json()
    assert routed["content"] == direct["content"] and routed["id"] != direct["id"]
    with httpx.stream("POST", router.url + "/v1/messages", json={**body, "stream": True},
                      timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "event: message_start" and events[-1] == "event: message_stop"
    bad = httpx.post(router.url + "/v1/messages", json=count, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_responses_routes_answer_behind_the_router(server, router, model_name):
    """/v1/responses (its stream too), then GET and DELETE of the stored response, proxied
    as they came (one instance: the response is stored where the router sends them)."""
    body = {"model": model_name, "input": "hi", "max_output_tokens": 4, "temperature": 0}
    direct = httpx.post(server.url + "/v1/responses", json=body, timeout=60).json()
    routed = httpx.post(router.url + "/v1/responses", json=body, timeout=60).json()
    assert routed["output"][0]["content"] == direct["output"][0]["content"]
    with httpx.stream("POST", router.url + "/v1/responses", json={**body, "stream": True},
                      timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "event: response.created" and events[-1] == "event: response.incomplete"
    url = f"{router.url}/v1/responses/{routed['id']}"
    assert httpx.get(url, timeout=30).json() == routed
    assert httpx.delete(url, timeout=30).status_code == 200
    assert httpx.get(url, timeout=30).status_code == 404


def test_ollama_routes_answer_behind_the_router(server, router, model_name):
    """/api/chat and /api/generate (NDJSON too) and the embedding routes' 400, proxied as
    they came."""
    options = {"temperature": 0, "num_predict": 4}
    chat = {"model": model_name, "messages": [{"role": "user", "content": "hi"}],
            "stream": False, "options": options}
    direct = httpx.post(server.url + "/api/chat", json=chat, timeout=60).json()
    routed = httpx.post(router.url + "/api/chat", json=chat, timeout=60).json()
    assert routed["message"] == direct["message"] and routed["eval_count"] == direct["eval_count"]
    generate = {"model": model_name, "prompt": "hi", "options": options}
    with httpx.stream("POST", router.url + "/api/generate", json=generate, timeout=60) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] and not any(line["done"] for line in lines[:-1])
    whole = httpx.post(server.url + "/api/generate", json={**generate, "stream": False},
                       timeout=60).json()
    assert "".join(line["response"] for line in lines) == whole["response"]
    for path in ("/api/embed", "/api/embeddings"):
        body = {"model": model_name, "input": "x", "prompt": "x"}
        bad = httpx.post(router.url + path, json=body, timeout=30)
        assert bad.status_code == 400 and "--runner pooling" in bad.json()["error"]

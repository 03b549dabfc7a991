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
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def test_the_server_serves_exactly_the_table(server):
    """The session server has every optional part on (debug endpoints, the inspector)."""
    spec = httpx.get(server.url + "/openapi.json").json()
    served = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    served.add(("GET", "/inspect"))  # the inspector's page, kept out of the schema
    table = {(r.method, r.path.replace(":path}", "}")) for r in ROUTES}
    assert served == table


BODIES = {"/tokenize": {"prompt": "hello there"}, "/detokenize": {"tokens": [5, 6, 7]}}


@pytest.mark.parametrize("route", [r for r in ROUTES if r.routing is Routing.INSTANCE
                                   and r.path not in ("/inspect/events", "/debug/fault")],
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

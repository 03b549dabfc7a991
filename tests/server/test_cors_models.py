"""The rest of the surface clients probe: /v1/models as vLLM's ModelCard (root, parent,
permission), GET /v1/models/{id} (the openai client's models.retrieve), GET /version, and
CORS with vLLM's flags: off by default, and with --allowed-origins a page of that origin in
headless Chromium calls the API (its preflight never needs the key) while a page of another
origin is refused by the browser."""
from __future__ import annotations

import http.server
import json
import threading
from typing import Any, Iterator

import httpx
import pytest
from server_utils import ServerProcess, free_port, start_server

import pagoda

KEY = "cors-test-key"


def test_models_are_vllm_model_cards(server, model_name, tiny_model_dir, client):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["id"] == model_name and card["object"] == "model"
    assert card["root"] == tiny_model_dir and card["parent"] is None
    assert card["permission"][0]["object"] == "model_permission"
    assert card["max_model_len"] == 1024
    one = httpx.get(f"{server.url}/v1/models/{model_name}")
    assert one.status_code == 200 and one.json() == card
    assert client.models.retrieve(model_name).id == model_name
    missing = httpx.get(server.url + "/v1/models/no-such-model")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/version").json() == {"version": pagoda.__version__}


def test_cors_is_off_by_default(server, model_name):
    origin = "http://127.0.0.1:9"
    r = httpx.post(server.url + "/v1/completions", headers={"origin": origin}, json={
        "model": model_name, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(server.url + "/v1/completions", headers={
        "origin": origin, "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        body = b"<!doctype html><title>client</title>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origins() -> Iterator[list[str]]:
    """Two page servers: the allowed origin and another one."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
               for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()


@pytest.fixture(scope="module")
def cors_server(tiny_model_dir, tmp_path_factory, origins) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("cors"), "--api-key", KEY,
                       "--allowed-origins", json.dumps([origins[0]]))
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def test_a_preflight_needs_no_key(cors_server, origins):
    pre = httpx.options(cors_server.url + "/v1/chat/completions", headers={
        "origin": origins[0], "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == origins[0]
    denied = httpx.options(cors_server.url + "/v1/chat/completions", headers={
        "origin": origins[1], "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in denied.headers


FETCH = """async ([url, key, model]) => {
  try {
    const r = await fetch(url + "/v1/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({model, max_tokens: 3, num_ctx: 2048,
                            messages: [{role: "user", content: "hi"}]})});
    const body = await r.json();
    return {status: r.status, object: body.object,
            ignored: r.headers.get("x-pagoda-ignored-fields")};
  } catch (e) { return {blocked: String(e)}; }
}"""


def test_a_page_of_the_allowed_origin_calls_the_api_in_chromium(cors_server, origins):
    from test_inspector_browser import chromium_path

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    model = httpx.get(cors_server.url + "/v1/models",
                      headers={"authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            results = []
            for origin in origins:
                page = browser.new_page()
                page.goto(origin + "/")
                results.append(page.evaluate(FETCH, [cors_server.url, KEY, model]))
        finally:
            browser.close()
    allowed, other = results
    assert allowed == {"status": 200, "object": "chat.completion", "ignored": "num_ctx"}
    assert "blocked" in other, other

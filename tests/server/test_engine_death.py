"""An exception inside a model step fails the requests in flight with an error, turns /health
to 503, refuses new requests with 503, is logged with its traceback, and hangs nothing."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from server_utils import start_server


@pytest.fixture(scope="module")
def doomed_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("doomed-logs"),
                       "--num-kv-blocks", "128", "--enable-debug-endpoints")
    yield srv
    srv.stop()


def test_step_exception_fails_requests_and_health(doomed_server) -> None:
    url = doomed_server.url
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "doomed", "max_tokens": 900, "ignore_eos": True}

    async def scenario() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            plain = asyncio.ensure_future(c.post("/v1/completions", json=body))
            async with c.stream("POST", "/v1/completions",
                                json={**body, "stream": True}) as resp:
                assert resp.status_code == 200
                lines = []
                async for line in resp.aiter_lines():
                    if line and not lines:
                        await c.post("/debug/fault")     # the next step raises
                    if line:
                        lines.append(line)
            return lines, await plain

    lines, plain = asyncio.run(scenario())
    assert lines[-1] == "data: [DONE]"
    assert '"engine_dead"' in lines[-2] and '"error"' in lines[-2]
    assert plain.status_code == 500
    assert plain.json()["error"]["code"] == "engine_dead"

    health = httpx.get(url + "/health")
    assert health.status_code == 503
    after = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2})
    assert after.status_code == 503
    assert after.json()["error"]["code"] == "engine_dead"
    metrics = httpx.get(url + "/metrics").text
    assert "pagoda:engine_alive 0.0" in metrics
    assert doomed_server.proc.poll() is None            # still up, answering 503s
    log = doomed_server.log()
    assert "Traceback" in log and "fault injected" in log
    doomed_server.stop()
    assert doomed_server.proc.returncode is not None

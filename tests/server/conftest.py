"""Fixtures for the server tests: a tiny random model and live ``pagoda serve`` processes."""
from __future__ import annotations

from typing import Iterator

import httpx
import pytest
from server_utils import ServerProcess, start_server
from tiny_models import make_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """The main server: roomy limits, debug endpoints on (GET /debug/state)."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"),
                       "--num-kv-blocks", "512", "--max-num-seqs", "64",
                       "--max-num-batched-tokens", "512", "--enable-debug-endpoints")
    yield srv
    srv.stop()
    # Nothing the tests sent, bad input and hang-ups included, may raise inside the server.
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def model_name(server: ServerProcess) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]

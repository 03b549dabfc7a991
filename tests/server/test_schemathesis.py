"""Schemathesis fuzzes every operation of the server's OpenAPI schema: no answer is a 5xx."""
from __future__ import annotations

import collections
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from server_utils import start_server

MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """A short context keeps fuzzed max_tokens / n cheap. No debug endpoints."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("fuzz-logs"),
                       "--num-kv-blocks", "256", "--max-model-len", "64")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def test_no_server_errors(fuzz_server) -> None:
    """Each operation gets MAX_EXAMPLES generated requests, valid and invalid alike. A random
    model name would only ever meet the 404, so generated bodies name the served model."""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    model = httpx.get(fuzz_server.url + "/v1/models").json()["data"][0]["id"]
    statuses: collections.Counter = collections.Counter()

    def name_the_model(case: Any) -> Any:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        return case

    def fuzz_one(op: Any) -> None:
        @given(case=op.as_strategy().map(name_the_model))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            response = case.call(timeout=60)
            statuses[(op.path, response.status_code // 100)] += 1
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()

    for op in operations:
        fuzz_one(op)
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= {
        path for path, _ in statuses}
    assert not [key for key in statuses if key[1] == 5]
    assert statuses[("/v1/chat/completions", 2)] > 0    # the fuzzing reached the engine
    assert fuzz_server.proc.poll() is None

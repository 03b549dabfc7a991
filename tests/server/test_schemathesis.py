"""Schemathesis fuzzes every operation of the server's OpenAPI schema: no answer is a 5xx,
the engine lives on, and no KV block leaks. Half the generated bodies are brought within the
server's limits (the served model's name, a few tokens, small n) so that they reach the
engine; the other half stay as generated, to probe validation. ``PAGODA_FUZZ_EXAMPLES=N``
runs N cases an operation (CI: 40); the counts of answers by status are printed and written
to ``$PAGODA_FUZZ_JSON`` when set."""
from __future__ import annotations

import collections
import json
import os
import random
import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from server_utils import start_server, wait_until_idle

MAX_EXAMPLES = int(os.environ.get("PAGODA_FUZZ_EXAMPLES", "40"))
# field -> (low, high): the values a realistic request holds, clamped into
LIMITS = {"max_tokens": (1, 8), "max_completion_tokens": (1, 8), "max_output_tokens": (1, 8),
          "num_predict": (1, 8), "n": (1, 3),
          "logprobs": (0, 5), "top_logprobs": (0, 5), "prompt_logprobs": (0, 3),
          "truncate_prompt_tokens": (1, 32), "min_tokens": (0, 2)}


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """A short context keeps fuzzed max_tokens / n cheap. No debug endpoints."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("fuzz-logs"),
                       "--num-kv-blocks", "256", "--max-model-len", "256")
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


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
            if random.Random(repr(sorted(case.body))).random() < 0.5:
                _within_limits(case.body)
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

    started = time.monotonic()
    for op in operations:
        fuzz_one(op)
    _report(statuses, time.monotonic() - started)
    assert set(GENERATING) | {"/tokenize", "/detokenize", "/api/show"} <= {
        path for path, _ in statuses}
    assert not [key for key in statuses if key[1] == 5]
    for path in GENERATING:  # the fuzzing reached the engine through every dialect
        assert statuses[(path, 2)] >= MAX_EXAMPLES // 5, statuses
    assert fuzz_server.proc.poll() is None
    assert httpx.get(fuzz_server.url + "/health").status_code == 200
    metrics = wait_until_idle(fuzz_server.url)
    assert metrics["pagoda:engine_alive"] == 1
    assert metrics["pagoda:kv_cache_free_blocks"] == metrics["pagoda:kv_cache_total_blocks"]


# The fields a realistic request keeps (the others, generated at random, are nearly always
# inconsistent: a grammar and a guided field at once, logit_bias keys that are not ids, ...).
REALISTIC = ("model", "prompt", "messages", "stream", "stream_options", "seed", "stop",
             "temperature", "top_p", "presence_penalty", "frequency_penalty", "echo",
             "return_token_ids", "ignore_eos", "skip_special_tokens", "user", "metadata",
             "input", "system", "options", *LIMITS)
OLLAMA_OPTIONS = ("num_predict", "seed", "temperature", "top_p", "stop")
TINY_VOCAB = 384  # tests/tiny_models.py
# The routes that generate, one or two per dialect: each must reach the engine.
GENERATING = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages",
              "/api/chat", "/api/generate")


def _within_limits(body: dict) -> None:
    """Keep the fields of a realistic request and bring them within the server's limits:
    prompts and messages short and well formed, a few tokens, small n."""
    for key in [k for k in body if k not in REALISTIC]:
        del body[key]
    if "options" in body:  # Ollama's sampling fields
        options = body["options"] if isinstance(body["options"], dict) else {}
        body["options"] = {k: v for k, v in options.items() if k in OLLAMA_OPTIONS}
    for fields in (body, body.get("options", {})):
        for key, (low, high) in LIMITS.items():
            value = fields.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                fields[key] = min(max(value, low), high)
        for key in ("temperature", "top_p"):
            value = fields.get(key)
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                fields[key] = 0.5
    if "prompt" in body:
        body["prompt"] = _short_prompt(body["prompt"])
    if "input" in body:  # the Responses API's
        body["input"] = _short_prompt(body["input"]) if isinstance(body["input"], str) else "hi"
    if isinstance(body.get("messages"), list):
        body["messages"] = [{"role": "user", "content": _short_text(m)} for m in
                            body["messages"][:3]] or [{"role": "user", "content": "hi"}]


def _short_prompt(prompt: Any) -> Any:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [t % TINY_VOCAB for t in prompt[:16]]
    if isinstance(prompt, list) and prompt:
        return [_short_prompt(p) for p in prompt[:3]]
    text = prompt if isinstance(prompt, str) else ""
    return text[:32] or "hi"


def _short_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    return (content if isinstance(content, str) else "")[:32] or "hi"


def _report(statuses: collections.Counter, seconds: float) -> None:
    rows = {f"{path} {status}xx": n for (path, status), n in sorted(statuses.items())}
    print(f"fuzzed {sum(statuses.values())} cases in {seconds:.0f} s:",
          json.dumps(rows, indent=1))
    out = os.environ.get("PAGODA_FUZZ_JSON")
    if out:
        with open(out, "w") as f:
            json.dump({"cases_per_operation": MAX_EXAMPLES, "seconds": seconds,
                       "statuses": rows}, f, indent=1)

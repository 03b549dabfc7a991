"""Speculative decoding behind ``pagoda serve --speculative-config``: through the official
client, streaming and not, the answers equal a server without speculation's (fp32, greedy),
and /metrics counts drafts with vLLM's names."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Iterator

import httpx
import pytest
from server_utils import REPO, ServerProcess, start_server

SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 4})
LOOP = "one two three four five six one two three four five six one two three four"


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("spec-logs"),
                       "--num-kv-blocks", "256", "--speculative-config", SPEC)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def _answers(url: str, model: str) -> list[tuple[str, str]]:
    from openai import OpenAI

    out = []
    with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        for i in range(3):
            kw = dict(model=model, max_tokens=40, temperature=0,
                      messages=[{"role": "user", "content": f"{LOOP} {i}"}])
            whole = c.chat.completions.create(**kw).choices[0].message.content
            streamed = "".join(ch.choices[0].delta.content or "" for ch in
                               c.chat.completions.create(stream=True, **kw) if ch.choices)
            assert streamed == whole
            out.append((whole, streamed))
    return out


def test_answers_equal_a_server_without_speculation(spec_server, server, model_name):
    assert _answers(spec_server.url, model_name) == _answers(server.url, model_name)
    metrics = httpx.get(spec_server.url + "/metrics").text
    drafts = re.search(r"^pagoda:spec_decode_num_drafts_total (\S+)$", metrics, re.M)
    assert drafts and float(drafts.group(1)) > 0, metrics
    assert "pagoda:spec_decode_num_accepted_tokens_total" in metrics
    assert "pagoda:spec_decode_mean_acceptance_length" in metrics


def test_a_bad_speculative_config_stops_the_cli_with_a_message(tiny_model_dir: str):
    for value, words in (("{not json", "not valid JSON"),
                         ('{"method": "ngram", "draft": 1}', "unknown key")):
        proc = subprocess.run(
            [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--model",
             tiny_model_dir, "--speculative-config", value], cwd=REPO, capture_output=True,
            text=True, timeout=120)
        assert proc.returncode != 0 and words in proc.stderr, proc.stderr[-2000:]

"""Speculative decoding behind ``pagoda serve --speculative-config``: through the official
client, streaming and not, the answers equal a server without speculation's (fp32, greedy),
and /metrics counts drafts, and accepted drafts, with vLLM's names."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Iterator

import httpx
import pytest
from server_utils import REPO, ServerProcess, start_server

from pagoda.config import SpeculativeConfig
from pagoda.spec_decode.ngram import NgramIndex

# Not adaptive: every step drafts what the proposer finds (the cost model could decline).
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
LOOP = "one two three four five six one two three four five six one two three four"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("spec-logs"),
                       "--num-kv-blocks", "256", "--speculative-config", json.dumps(SPEC))
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{LOOP} {i}"}]


def _answers(url: str, model: str) -> list[tuple[str, str]]:
    from openai import OpenAI

    out = []
    with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        for i in range(3):
            kw = dict(model=model, max_tokens=MAX_TOKENS, temperature=0, messages=_messages(i))
            whole = c.chat.completions.create(**kw).choices[0].message.content
            streamed = "".join(ch.choices[0].delta.content or "" for ch in
                               c.chat.completions.create(stream=True, **kw) if ch.choices)
            assert streamed == whole
            out.append((whole, streamed))
    return out


def _surely_drafted(prompt: list[int], output: list[int]) -> list[int]:
    """The output indexes whose token prompt lookup drafts first from the tokens before it.

    Each such index j (1 <= j < max_tokens: index 0 comes from the prefill) makes an
    accepted draft certain on a server that verifies every draft it finds: a step that
    starts at j drafts output[j] first, which greedy decoding then samples; and a step that
    started earlier and reached past j got there through accepted drafts.
    """
    config = SpeculativeConfig.from_mapping(SPEC)
    tokens = prompt + output
    found = []
    for j in range(1, min(len(output), MAX_TOKENS)):
        index = NgramIndex(config.lookup_min, config.lookup_max)
        index.extend(tokens[: len(prompt) + j])
        draft = index.propose(config.num_tokens)
        if draft and draft[0] == output[j]:
            found.append(j)
    return found


@pytest.mark.usefixtures("one_thread")
def test_answers_equal_a_server_without_speculation(spec_server, server, model_name,
                                                    tiny_model_dir):
    from pagoda import LLM, SamplingParams

    answers = _answers(spec_server.url, model_name)
    assert answers == _answers(server.url, model_name)
    # The same model offline, with the servers' settings, gives the token ids: the tiny
    # model falls into a loop that prompt lookup drafts, so some draft must be accepted.
    llm = LLM(tiny_model_dir, dtype="float32", block_size=16, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    for i, (whole, _) in enumerate(answers):
        out = llm.chat(_messages(i), params)[0]
        assert out.outputs[0].text == whole
        assert _surely_drafted(list(out.prompt_token_ids), list(out.outputs[0].token_ids))
    metrics = httpx.get(spec_server.url + "/metrics").text
    drafts = re.search(r"^pagoda:spec_decode_num_drafts_total (\S+)$", metrics, re.M)
    assert drafts and float(drafts.group(1)) > 0, metrics
    accepted = re.search(r"^pagoda:spec_decode_num_accepted_tokens_total (\S+)$", metrics, re.M)
    assert accepted and float(accepted.group(1)) > 0, metrics
    assert "pagoda:spec_decode_mean_acceptance_length" in metrics


def test_a_bad_speculative_config_stops_the_cli_with_a_message(tiny_model_dir: str):
    for value, words in (("{not json", "not valid JSON"),
                         ('{"method": "ngram", "draft": 1}', "unknown key")):
        proc = subprocess.run(
            [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--model",
             tiny_model_dir, "--speculative-config", value], cwd=REPO, capture_output=True,
            text=True, timeout=120)
        assert proc.returncode != 0 and words in proc.stderr, proc.stderr[-2000:]

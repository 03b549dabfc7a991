"""Scoring through the API, as evaluation harnesses do: ``echo`` on /v1/completions (the
prompt's text and, with ``logprobs``, its tokens' logprobs before the completion's, streamed
or not; ``max_tokens: 0`` scores the prompt alone), vLLM's ``prompt_logprobs`` on both
endpoints, batches of token-id prompts, and ``GET /tokenizer_info``. The prompt logprobs are
transformers' own (fp32, the server's dtype in these tests)."""
from __future__ import annotations

import json

import httpx
import pytest
import torch
import transformers

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def hf(tiny_model_dir: str):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                             dtype=torch.float32).eval()


def _ids(server, text: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", json={"prompt": text}).json()["tokens"]


def _hf_prompt_logprobs(hf, ids: list[int]) -> list[float]:
    """Each prompt token's logprob given the ones before it (the first has none)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    lps = torch.log_softmax(logits, dim=-1)
    return [lps[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _complete(server, body: dict) -> dict:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_puts_the_prompt_before_the_text(server, model_name):
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    plain = _complete(server, body)["choices"][0]["text"]
    echoed = _complete(server, {**body, "echo": True})
    assert echoed["choices"][0]["text"] == PROMPT + plain
    assert echoed["usage"]["completion_tokens"] == 5


def test_echo_logprobs_are_the_prompt_tokens_then_the_completion(server, model_name, hf):
    ids = _ids(server, PROMPT)
    out = _complete(server, {"model": model_name, "prompt": PROMPT, "max_tokens": 3,
                             "temperature": 0, "ignore_eos": True, "echo": True,
                             "logprobs": 2})
    lp = out["choices"][0]["logprobs"]
    n = len(ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == pytest.approx(_hf_prompt_logprobs(hf, ids), abs=1e-4)
    for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:],
                                   lp["top_logprobs"][1:]):
        assert top[token] == logprob  # the chosen token is listed (OpenAI: up to k + 1)
        assert 1 <= len(top) <= 3 and max(top.values()) >= logprob
    # text_offset indexes the echoed text: each token's string starts where it says
    text = out["choices"][0]["text"]
    for token, offset in zip(lp["tokens"][n:], lp["text_offset"][n:]):
        assert text[offset:offset + len(token)] == token


def test_max_tokens_zero_scores_the_prompt_alone(server, model_name, hf):
    ids = _ids(server, PROMPT)
    out = _complete(server, {"model": model_name, "prompt": ids, "max_tokens": 0,
                             "temperature": 0, "echo": True, "logprobs": 1})
    choice = out["choices"][0]
    assert choice["text"] == httpx.post(server.url + "/detokenize",
                                        json={"tokens": ids}).json()["prompt"]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        _hf_prompt_logprobs(hf, ids), abs=1e-4)
    assert out["usage"]["completion_tokens"] == 0
    assert choice["finish_reason"] == "length"


def test_a_batch_of_token_id_prompts_is_scored_each(server, model_name, hf):
    """lm-eval's log-likelihood request: several token-id prompts, one token each, echo."""
    prompts = [_ids(server, t) for t in (PROMPT, "Paged attention keeps blocks", "a b c d")]
    out = _complete(server, {"model": model_name, "prompt": prompts, "max_tokens": 1,
                             "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234})
    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert len(choices) == 3
    for ids, choice in zip(prompts, choices):
        got = choice["logprobs"]["token_logprobs"][1:len(ids)]
        assert got == pytest.approx(_hf_prompt_logprobs(hf, ids), abs=1e-4)


@pytest.mark.parametrize("max_tokens", [6, 0])
def test_echo_streams_the_prompt_first_and_the_same_text(server, model_name, max_tokens):
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "echo": True, "logprobs": 1}
    whole = _complete(server, body)["choices"][0]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["text"] == PROMPT
    assert "".join(c["text"] for c in choices) == whole["text"]
    merged = [v for c in choices if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    assert merged == whole["logprobs"]["token_logprobs"]
    offsets = [v for c in choices if c["logprobs"] for v in c["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]
    assert choices[-1]["finish_reason"] == whole["finish_reason"] == "length"


def test_vllm_prompt_logprobs_on_both_endpoints(server, model_name, hf):
    ids = _ids(server, PROMPT)
    out = _complete(server, {"model": model_name, "prompt": ids, "max_tokens": 2,
                             "prompt_logprobs": 2})
    entries = out["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token, want, entry in zip(ids[1:], _hf_prompt_logprobs(hf, ids), entries[1:]):
        assert entry[str(token)]["logprob"] == pytest.approx(want, abs=1e-4)
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:2] == [1, 2] and len(entry) <= 3
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    chat = r.json()["prompt_logprobs"]
    assert chat[0] is None and all(len(e) == 1 for e in chat[1:])
    assert len(chat) == r.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, param", [
    ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
    ({"prompt_logprobs": 99}, "prompt_logprobs"),
    ({"echo": True, "logprobs": 99}, "logprobs")])
def test_scoring_refusals_name_the_field(server, model_name, body, param):
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": model_name, "prompt": PROMPT, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_echo_is_refused_by_name(server, model_name):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": model_name, "messages": [{"role": "user", "content": "hi"}], "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text


def test_tokenizer_info(server, tiny_model_dir):
    info = httpx.get(server.url + "/tokenizer_info").json()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["model_max_length"] == 1024
    assert isinstance(info["tokenizer_class"], str)

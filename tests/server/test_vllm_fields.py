"""vLLM's extension fields that clients send to any vLLM-compatible server, served as vLLM
serves them: the older ``guided_*`` spellings of structured outputs, ``max_completion_tokens``
on /v1/completions, ``truncate_prompt_tokens``, ``return_token_ids`` (streamed too) and
``stream_options.continuous_usage_stats``."""
from __future__ import annotations

import json

import httpx
import pytest


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def _chunks(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("guided, structured", [
    ({"guided_choice": ["red", "green", "blue"]}, {"choice": ["red", "green", "blue"]}),
    ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, {"regex": "[0-9]{3}-[a-z]{2}"}),
    ({"guided_json": {"type": "object", "properties": {"n": {"type": "integer"}},
                      "required": ["n"], "additionalProperties": False}},
     {"json": {"type": "object", "properties": {"n": {"type": "integer"}},
               "required": ["n"], "additionalProperties": False}})])
def test_guided_fields_are_structured_outputs(server, model_name, guided, structured):
    base = {"model": model_name, "prompt": "Answer:", "max_tokens": 40, "temperature": 0}
    old = _post(server, "/v1/completions", {**base, **guided})
    new = _post(server, "/v1/completions", {**base, "structured_outputs": structured})
    assert old.status_code == new.status_code == 200, old.text
    assert old.json()["choices"][0]["text"] == new.json()["choices"][0]["text"]
    assert "x-pagoda-ignored-fields" not in old.headers


@pytest.mark.parametrize("body, param", [
    ({"guided_regex": "(", "max_tokens": 5}, "guided_regex"),
    ({"guided_choice": ["a"], "guided_regex": "b", "max_tokens": 5}, "guided_regex"),
    ({"guided_choice": ["a"], "structured_outputs": {"regex": "b"}, "max_tokens": 5},
     "guided_choice"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 5000}, "truncate_prompt_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens")])
def test_refusals_name_the_field_as_sent(server, model_name, body, param):
    r = _post(server, "/v1/completions", {"model": model_name, "prompt": "x", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_max_completion_tokens_on_completions(server, model_name):
    r = _post(server, "/v1/completions", {"model": model_name, "prompt": "hi",
                                          "max_completion_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, model_name):
    ids = list(range(10, 40))
    base = {"model": model_name, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    cut = _post(server, "/v1/completions", {**base, "prompt": ids,
                                            "truncate_prompt_tokens": 8}).json()
    tail = _post(server, "/v1/completions", {**base, "prompt": ids[-8:]}).json()
    assert cut["usage"]["prompt_tokens"] == 8
    assert cut["choices"][0]["text"] == tail["choices"][0]["text"]
    whole = _post(server, "/v1/completions", {**base, "prompt": ids,
                                              "truncate_prompt_tokens": -1}).json()
    assert whole["usage"]["prompt_tokens"] == len(ids)
    chat = _post(server, "/v1/chat/completions", {**base, "truncate_prompt_tokens": 5,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 5


def test_return_token_ids_whole_and_streamed(server, model_name):
    ids = [5, 17, 42, 99, 7]
    body = {"model": model_name, "prompt": ids, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    whole = _post(server, "/v1/completions", body).json()["choices"][0]
    assert whole["prompt_token_ids"] == ids and len(whole["token_ids"]) == 5
    # the ids are the answer's: fed back as a prompt's continuation, greedy repeats them
    again = _post(server, "/v1/completions", {**body, "prompt": ids + whole["token_ids"][:2],
                                              "max_tokens": 3}).json()["choices"][0]
    assert again["token_ids"] == whole["token_ids"][2:]
    choices = [c["choices"][0] for c in _chunks(server, "/v1/completions", body)]
    assert choices[0]["prompt_token_ids"] == ids
    assert [t for c in choices for t in c["token_ids"]] == whole["token_ids"]
    chat = {"model": model_name, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "messages": [{"role": "user", "content": "hi"}]}
    reply = _post(server, "/v1/chat/completions", chat).json()
    assert len(reply["prompt_token_ids"]) == reply["usage"]["prompt_tokens"]
    assert len(reply["choices"][0]["token_ids"]) == 4
    chunks = _chunks(server, "/v1/chat/completions", chat)
    assert chunks[0]["prompt_token_ids"] == reply["prompt_token_ids"]
    streamed = [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"]]
    assert streamed == reply["choices"][0]["token_ids"]


def test_continuous_usage_counts_up_on_every_chunk(server, model_name):
    chunks = _chunks(server, "/v1/completions", {
        "model": model_name, "prompt": "hi", "max_tokens": 6, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"] is not None for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    prompt = chunks[-1]["usage"]["prompt_tokens"]
    assert all(c["usage"]["total_tokens"] == prompt + c["usage"]["completion_tokens"]
               for c in chunks)


def test_allowed_token_ids_and_bad_words(server, model_name):
    base = {"model": model_name, "prompt": [5, 17, 42, 99, 7], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    allowed = list(range(40, 50))
    got = _post(server, "/v1/completions", {**base, "allowed_token_ids": allowed}).json()
    assert set(got["choices"][0]["token_ids"]) <= set(allowed)

    def ids(text: str) -> list[int]:
        return httpx.post(server.url + "/tokenize", json={"prompt": text,
                                                        "add_special_tokens": False}
                          ).json()["tokens"]

    fox, the = ids(" fox"), ids(" the")
    assert len(fox) == len(the) == 1
    sampled = {**base, "temperature": 1.0, "seed": 3, "max_tokens": 40,
               "allowed_token_ids": fox + the}
    free = _post(server, "/v1/completions", sampled).json()["choices"][0]["token_ids"]
    assert fox[0] in free and the[0] in free  # left alone, it writes both words
    got = _post(server, "/v1/completions", {**sampled, "bad_words": ["fox"]})
    assert got.status_code == 200, got.text
    assert set(got.json()["choices"][0]["token_ids"]) == set(the)
    r = _post(server, "/v1/completions", {**base, "allowed_token_ids": [10**8]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids", r.text


def test_priority_needs_the_priority_policy(server, model_name):
    base = {"model": model_name, "prompt": "hi", "max_tokens": 2}
    assert _post(server, "/v1/completions", {**base, "priority": 0}).status_code == 200
    r = _post(server, "/v1/completions", {**base, "priority": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text

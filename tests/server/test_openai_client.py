"""The official ``openai`` client against a live ``pagoda serve``: both endpoints, streaming
and not, n > 1, stop, seeds, logprobs, usage, and greedy text equal to the offline API's."""
from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Paged attention keeps", "def f(x):"]
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def offline(tiny_model_dir: str) -> LLM:
    return LLM(tiny_model_dir, dtype="float32", num_kv_blocks=256, max_model_len=1024)


def test_models_lists_the_served_model(client, model_name: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]


def test_completion_greedy_equals_offline(client, model_name: str, offline: LLM) -> None:
    want = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12,
                                                    ignore_eos=True))
    got = client.completions.create(model=model_name, prompt=PROMPTS, max_tokens=12,
                                    temperature=0, extra_body=IGNORE_EOS)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [o.text for o in want]
    assert all(c.finish_reason == "length" for c in got.choices)
    assert got.usage.completion_tokens == 36
    assert got.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)
    assert got.usage.total_tokens == got.usage.prompt_tokens + 36
    assert got.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_greedy_equals_offline(client, model_name: str, offline: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a river."}]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10,
                                                 ignore_eos=True))[0]
    got = client.chat.completions.create(model=model_name, messages=messages, max_tokens=10,
                                         temperature=0, extra_body=IGNORE_EOS)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == 10


def test_token_id_prompt(client, model_name: str, offline: LLM) -> None:
    ids = [5, 17, 42, 99, 7]
    want = offline.generate([ids], SamplingParams(temperature=0, max_tokens=6,
                                                  ignore_eos=True))[0]
    got = client.completions.create(model=model_name, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body=IGNORE_EOS)
    assert got.choices[0].text == want.text
    assert got.usage.prompt_tokens == 5


def test_completion_stream_matches_non_stream(client, model_name: str) -> None:
    kwargs = dict(model=model_name, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                  extra_body=IGNORE_EOS)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_stream_matches_non_stream(client, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "hello"}],
                  max_tokens=15, temperature=0, extra_body=IGNORE_EOS)
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(stream=True, **kwargs)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage


def test_n_completions_with_seed_are_reproducible(client, model_name: str) -> None:
    kwargs = dict(model=model_name, prompt=PROMPTS[1], max_tokens=12, temperature=1.0,
                  n=3, seed=1234, extra_body=IGNORE_EOS)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1, "n samples should differ from each other"
    assert a.usage.completion_tokens == 36
    other = client.completions.create(**{**kwargs, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_n_streaming_chat_has_every_index(client, model_name: str) -> None:
    stream = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2,
        temperature=0.8, seed=3, stream=True, stream_options={"include_usage": True},
        extra_body=IGNORE_EOS)
    texts: dict[int, str] = {0: "", 1: ""}
    finished = set()
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert usage.completion_tokens == 16
    # Each index streams its own completion: the same texts as the non-streaming call with
    # the same seed gives per index.
    whole = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2,
        temperature=0.8, seed=3, extra_body=IGNORE_EOS)
    assert texts == {c.index: c.message.content for c in whole.choices}


def test_stop_string_ends_text(client, model_name: str) -> None:
    base = client.completions.create(model=model_name, prompt=PROMPTS[2], max_tokens=24,
                                     temperature=0, extra_body=IGNORE_EOS).choices[0].text
    assert len(base) > 6
    stop = base[3:5]
    got = client.completions.create(model=model_name, prompt=PROMPTS[2], max_tokens=24,
                                    temperature=0, stop=[stop], extra_body=IGNORE_EOS)
    choice = got.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == base[:base.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_name, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop],
        stream=True, extra_body=IGNORE_EOS))
    assert streamed == choice.text


def test_completion_logprobs(client, model_name: str) -> None:
    got = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=5,
                                    temperature=0, logprobs=3, extra_body=IGNORE_EOS)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0.0
        assert 1 <= len(top) <= 3
        # greedy: the sampled token is the most likely one
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)
    assert lp.text_offset[0] == 0


def test_chat_logprobs(client, model_name: str) -> None:
    got = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2, extra_body=IGNORE_EOS)
    content = got.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_tokenize_detokenize_round_trip(server, model_name: str) -> None:
    import httpx

    ids = httpx.post(server.url + "/tokenize", json={"model": model_name,
                                                     "prompt": "The quick brown fox"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert "The quick brown fox" in text["prompt"]
    chat = httpx.post(server.url + "/tokenize", json={
        "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 0


def test_prefix_cache_hits_show_in_usage_and_respect_cache_salt(client, model_name: str
                                                                ) -> None:
    prompt = list(range(40, 90))          # 50 tokens: three full 16-token blocks

    def cached(**extra: object) -> int:
        got = client.completions.create(model=model_name, prompt=prompt, max_tokens=2,
                                        temperature=0, extra_body=extra)
        return got.usage.prompt_tokens_details.cached_tokens

    cached(cache_salt="tenant-a")
    assert cached(cache_salt="tenant-a") == 48
    assert cached(cache_salt="tenant-b") == 0


def test_logit_bias_equals_offline(client, model_name: str, offline: LLM) -> None:
    want = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5,
                                                       ignore_eos=True,
                                                       logit_bias={7: 100.0, 9: -100.0}))
    got = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=5,
                                    temperature=0, logit_bias={"7": 100, "9": -100},
                                    extra_body=IGNORE_EOS)
    assert got.choices[0].text == want[0].text
    assert want[0].token_ids == [7] * 5

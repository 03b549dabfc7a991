"""pagoda's prefill and decode instances behind vllm-router's prefill/decode mode
(``--vllm-pd-disaggregation --kv-connector nixl``): the router asks the prefill instance
for one token with ``kv_transfer_params`` and hands the answer's parameters to the decode
instance, which pulls the KV by NIXL. Greedy answers, streaming and not, completions and
chat, equal a colocated engine's; the KV really moves; a forged parameter set is still
refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_utils import metric_values, start_server, start_vllm_router  # noqa: E402
from tiny_models import make_model  # noqa: E402

pytest.importorskip("nixl")

SECRET = "vllm-router-pd-secret"
KV_ARGS = ("--kv-secret", SECRET, "--num-kv-blocks", "256", "--max-num-seqs", "16")
PROMPTS = ["The paged KV cache keeps the keys and values of every token in blocks, " * 3,
           "one two three four five six seven eight nine ten eleven twelve thirteen " * 3]


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    model = make_model(str(tmp_path_factory.mktemp("tiny")), "llama")
    logs = tmp_path_factory.mktemp("logs")
    prefill = start_server(model, logs, "--kv-role", "prefill", *KV_ARGS)
    decode = start_server(model, logs, "--kv-role", "decode", *KV_ARGS)
    router = start_vllm_router(logs, "--vllm-pd-disaggregation", "--kv-connector", "nixl",
                               "--prefill", prefill.url, "--decode", decode.url,
                               "--policy", "round_robin")
    yield model, prefill, decode, router
    router.stop()
    for srv in (prefill, decode):
        srv.stop()
        assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-3000:]


def _sse_text(r: httpx.Response, key: str) -> str:
    text = ""
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += (choice["delta"].get("content") or "") if key == "delta" else (
                    choice.get("text") or "")
    return text


def test_answers_equal_colocated_and_the_kv_moves(pd):
    from pagoda import LLM, SamplingParams

    model, prefill, decode, router = pd
    llm = LLM(model, dtype="float32", block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    want = [o.text for o in llm.generate(PROMPTS, params)]
    chat = [{"role": "user", "content": PROMPTS[0]}]
    want_chat = llm.chat(chat, params)[0].text
    name = httpx.get(decode.url + "/v1/models").json()["data"][0]["id"]
    pulled = metric_values(decode.url)["pagoda:kv_blocks_pulled_total"]
    for prompt, text in zip(PROMPTS, want):
        body = {"model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        r = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == text
        with httpx.stream("POST", router.url + "/v1/completions", timeout=60,
                          json={**body, "stream": True}) as s:
            assert s.status_code == 200 and _sse_text(s, "text") == text
    body = {"model": name, "messages": chat, "max_tokens": 10, "temperature": 0}
    r = httpx.post(router.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want_chat
    with httpx.stream("POST", router.url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True}) as s:
        assert s.status_code == 200 and _sse_text(s, "delta") == want_chat
    # 2 prompts x 2 + chat x 2 requests, each prompt several full blocks: all pulled.
    assert metric_values(decode.url)["pagoda:kv_blocks_pulled_total"] - pulled >= 6 * 2


def test_forged_params_are_still_refused(pd):
    _, prefill, decode, _ = pd
    name = httpx.get(decode.url + "/v1/models").json()["data"][0]["id"]
    r = httpx.post(prefill.url + "/v1/completions", timeout=60, json={
        "model": name, "prompt": PROMPTS[0], "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                               "remote_engine_id": None, "remote_block_ids": None,
                               "remote_host": None, "remote_port": None}})
    assert r.status_code == 200, r.text
    params = r.json()["kv_transfer_params"]
    forged = {**params, "remote_block_ids": list(reversed(params["remote_block_ids"]))}
    r = httpx.post(decode.url + "/v1/completions", timeout=60, json={
        "model": name, "prompt": PROMPTS[0], "max_tokens": 4, "kv_transfer_params": forged})
    assert r.status_code == 400, r.text

"""The whole disaggregated path over HTTP: `pagoda router` in front of a `pagoda serve
--kv-role prefill` and a `--kv-role decode` process (KV moved by NIXL between them). The
official openai client gets the same greedy text as the offline colocated engine; a dead
prefill instance is retried around; with none up the decode instance runs colocated."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_utils import (  # noqa: E402
    REPO, ServerProcess, free_port, metric_values, start_on_free_port, start_server)
from tiny_models import make_model  # noqa: E402

pytest.importorskip("nixl")

SECRET = "router-test-secret"
KV_ARGS = ("--kv-secret", SECRET, "--num-kv-blocks", "256", "--max-num-seqs", "16")
PROMPTS = ["The paged KV cache keeps", "Continuous batching means that",
           "one two three four five six seven eight nine ten eleven twelve thirteen"]


def start_router(prefill: list[str], decode: list[str], log_dir: Path,
                 *extra: str) -> tuple[subprocess.Popen, str]:
    def launch(port: int) -> ServerProcess:
        cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "router", "--port", str(port),
               "--prefill", *prefill, "--decode", *decode, *extra]
        log_path = log_dir / f"router-{port}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ))
        return ServerProcess(proc, port, log_path)

    router = start_on_free_port(launch, "pagoda router")
    return router.proc, router.url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = make_model(str(tmp_path_factory.mktemp("tiny")), "llama")
    logs = tmp_path_factory.mktemp("logs")
    prefill = start_server(model, logs, "--kv-role", "prefill", *KV_ARGS)
    decode = start_server(model, logs, "--kv-role", "decode", *KV_ARGS)
    router, url = start_router([prefill.url], [decode.url], logs)
    yield model, prefill, decode, url
    router.terminate()
    router.wait(timeout=10)
    for srv in (prefill, decode):
        srv.stop()
        assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-3000:]


@pytest.fixture(scope="module")
def colocated(cluster):
    from pagoda import LLM, SamplingParams

    llm = LLM(cluster[0], dtype="float32", block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    return {p: o.text for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}


def wait_idle_with_all_blocks_free(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = metric_values(url)
        if (m["pagoda:num_requests_running"] == 0
                and m["pagoda:kv_cache_free_blocks"] == m["pagoda:kv_cache_total_blocks"]):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


def openai_client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def model_id(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def test_completions_through_the_router_match_colocated(cluster, colocated):
    _, prefill, decode, url = cluster
    client = openai_client(url)
    name = model_id(url)
    for prompt in PROMPTS:
        out = client.completions.create(model=name, prompt=prompt, max_tokens=12,
                                        temperature=0)
        assert out.choices[0].text == colocated[prompt]
        assert out.usage.completion_tokens == 12
    stream = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == colocated[PROMPTS[0]]
    # Every prompt's KV went through a lease that the decode side's pull released.
    m = metric_values(prefill.url)
    assert m["pagoda:kv_cache_free_blocks"] == m["pagoda:kv_cache_total_blocks"]


def test_chat_n_and_stop_through_the_router(cluster):
    _, _, decode, url = cluster
    client = openai_client(url)
    name = model_id(url)
    messages = [{"role": "user", "content": "Say something about blocks."}]
    direct = openai_client(decode.url).chat.completions.create(
        model=name, messages=messages, max_tokens=10, temperature=0)
    routed = client.chat.completions.create(model=name, messages=messages, max_tokens=10,
                                            temperature=0, n=2)
    assert [c.message.content for c in routed.choices] == [direct.choices[0].message.content] * 2
    text = direct.choices[0].message.content
    if len(text) > 3:
        stop = text[2:4]
        cut = client.chat.completions.create(model=name, messages=messages, max_tokens=10,
                                             temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop"
        assert stop not in cut.choices[0].message.content


def test_bad_request_gets_the_instance_error(cluster):
    url = cluster[3]
    r = httpx.post(url + "/v1/completions", json={"model": model_id(url), "prompt": "x",
                                                  "temperature": -1})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400


def test_dead_prefill_is_retried_and_none_up_runs_colocated(cluster, colocated,
                                                            tmp_path_factory):
    model, prefill, decode, _ = cluster
    logs = tmp_path_factory.mktemp("router-logs")
    dead = f"http://127.0.0.1:{free_port()}"
    # A long health interval: the router still believes in `doomed` when it is gone.
    doomed = start_server(model, logs, "--kv-role", "prefill", *KV_ARGS)
    router, url = start_router([doomed.url, prefill.url], [decode.url], logs,
                               "--health-interval", "3600")
    try:
        doomed.stop()
        out = openai_client(url).completions.create(model=model_id(url), prompt=PROMPTS[1],
                                                    max_tokens=12, temperature=0)
        assert out.choices[0].text == colocated[PROMPTS[1]]
        assert metric_values(url)["pagoda_router_prefill_retries_total"] >= 1
    finally:
        router.terminate()
        router.wait(timeout=10)
    router, url = start_router([dead], [decode.url], logs)
    try:
        out = openai_client(url).completions.create(model=model_id(url), prompt=PROMPTS[2],
                                                    max_tokens=12, temperature=0)
        assert out.choices[0].text == colocated[PROMPTS[2]]
        assert metric_values(url)["pagoda_router_colocated_fallbacks_total"] == 1
    finally:
        router.terminate()
        router.wait(timeout=10)


LONG_PROMPT = " ".join(f"word{i}" for i in range(60))


def test_forged_params_get_400_and_nothing_breaks(cluster, colocated):
    _, prefill, decode, url = cluster
    name = model_id(url)
    body = {"model": name, "prompt": LONG_PROMPT, "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}}
    params = httpx.post(prefill.url + "/v1/completions", json=body).json()["kv_transfer_params"]
    for change in ({"remote_host": "10.1.2.3"}, {"remote_port": 9}, {"remote_block_ids": [0]},
                   {"remote_num_tokens": 3}, {"signature": "00" * 32}, {"remote_engine_id": ""},
                   {"do_remote_decode": True}):
        r = httpx.post(decode.url + "/v1/completions",
                       json={"model": name, "prompt": LONG_PROMPT, "max_tokens": 4,
                             "kv_transfer_params": {**params, **change}})
        assert r.status_code == 400, (change, r.text)
        assert "kv_transfer_params" in r.json()["error"]["message"]
    r = httpx.post(decode.url + "/v1/completions",
                   json={"model": name, "prompt": "another prompt", "max_tokens": 4,
                         "kv_transfer_params": params})
    assert r.status_code == 400 and "signature" in r.json()["error"]["message"]
    # The genuine parameters still work afterwards, and the decode instance is healthy.
    r = httpx.post(decode.url + "/v1/completions",
                   json={"model": name, "prompt": LONG_PROMPT, "max_tokens": 4,
                         "temperature": 0, "kv_transfer_params": params})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert metric_values(decode.url)["pagoda:kv_blocks_pulled_total"] > 0


def test_a_lease_nobody_pulls_expires(cluster, tmp_path_factory):
    model = cluster[0]
    prefill = start_server(model, tmp_path_factory.mktemp("lease"), "--kv-role", "prefill",
                           *KV_ARGS, "--kv-lease-seconds", "1")
    try:
        body = {"model": model_id(prefill.url), "prompt": LONG_PROMPT, "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True}}
        assert httpx.post(prefill.url + "/v1/completions", json=body).status_code == 200
        m = metric_values(prefill.url)
        assert m["pagoda:kv_leases_active"] == 1
        assert m["pagoda:kv_cache_free_blocks"] < m["pagoda:kv_cache_total_blocks"]
        deadline = time.monotonic() + 10
        while metric_values(prefill.url)["pagoda:kv_leases_expired_total"] < 1:
            assert time.monotonic() < deadline, "the lease never expired"
            time.sleep(0.1)
        m = metric_values(prefill.url)
        assert m["pagoda:kv_leases_active"] == 0
        assert m["pagoda:kv_cache_free_blocks"] == m["pagoda:kv_cache_total_blocks"]
    finally:
        prefill.stop()


# A prompt that keeps a prefill instance with a tiny token budget busy for many steps.
HELD_PROMPT = " ".join(f"w{i}" for i in range(160))


def wait_running(url: str, timeout_s: float = 30.0) -> None:
    """Until the instance has a request in its engine (here: a prefill under way)."""
    deadline = time.monotonic() + timeout_s
    while metric_values(url)["pagoda:num_requests_running"] < 1:
        assert time.monotonic() < deadline, "the prefill never started"
        time.sleep(0.01)


def test_killing_the_prefill_instance_mid_run(cluster, colocated, tmp_path_factory):
    """The prefill instance dies while it computes a prompt (held there by a budget of 8
    tokens a step): that request still gets exactly the colocated text, through the
    decode instance, and everything after it too."""
    import concurrent.futures

    from pagoda import LLM, SamplingParams

    model, _, decode, _ = cluster
    held_ref = LLM(model, dtype="float32", block_size=16).generate(
        HELD_PROMPT, SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert len(held_ref.prompt_token_ids) > 400       # over 50 steps of 8 tokens
    logs = tmp_path_factory.mktemp("kill")
    victim = start_server(model, logs, "--kv-role", "prefill", *KV_ARGS,
                          "--max-num-batched-tokens", "8")
    router, url = start_router([victim.url], [decode.url], logs, "--health-interval", "0.5")
    name = model_id(url)

    def ask(prompt: str) -> str:
        try:
            r = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": name, "prompt": prompt, "max_tokens": 12,
                                 "temperature": 0})
        except httpx.HTTPError as e:
            return f"transport error: {e}"
        return r.json()["choices"][0]["text"] if r.status_code == 200 else f"{r.status_code}"

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(ask, HELD_PROMPT)
            wait_running(victim.url)
            victim.proc.kill()
            assert held.result(timeout=90) == held_ref.text
        m = metric_values(url)
        assert m["pagoda_router_prefill_retries_total"] == 1     # the failed prefill
        assert m["pagoda_router_colocated_fallbacks_total"] == 1  # then run on decode
        # Afterwards the router sends everything to the decode instance, which is healthy
        # and holds no block.
        for prompt in PROMPTS:
            assert ask(prompt) == colocated[prompt]
        assert httpx.get(decode.url + "/health").status_code == 200
        wait_idle_with_all_blocks_free(decode.url)
    finally:
        router.terminate()
        router.wait(timeout=10)
        victim.stop()


def test_bench_disagg_tiny_run(cluster, tmp_path):
    from pagoda.entrypoints.cli import main

    out = tmp_path / "disagg.json"
    rc = main(["bench", "disagg", "--serve-model", cluster[0], "--dataset", "random",
               "--num-prompts", "6", "--input-len", "40", "--output-len", "6",
               "--request-rate", "20", "--log-dir", str(tmp_path / "logs"), "--json", str(out),
               "--transfer-tokens", "40", "--transfer-repeats", "2",
               "--plot", str(tmp_path / "plots")])
    assert rc == 0
    import json

    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "disagg-itl-cdf.png", "disagg-throughput.png", "disagg-ttft-cdf.png"]

    report = json.loads(out.read_text())
    colo, disagg = report["colocated"], report["disaggregated"]
    assert colo["completed"] == disagg["completed"] == 6
    kv = disagg["kv_transfer"]
    assert kv["pulls"] >= 1 and kv["bytes"] > 0 and kv["gb_per_s"] > 0
    assert kv["load_failures"] == 0
    raw = report["raw_transfer"]
    assert len(raw["ms"]) == 2 and raw["gb_per_s"] > 0
    # 39 tokens pulled = 3 blocks of 16; x K and V x 2 layers x (16 tokens x 2 KV heads x
    # head size 16 x 2 or 4 bytes: bf16, the default where the CPU has it, else fp32).
    assert raw["bytes"] in (3 * 2 * 2 * (16 * 2 * 16 * b) for b in (2, 4))


def test_concurrent_requests_and_cancellation_through_the_router(cluster, colocated):
    import concurrent.futures

    _, prefill, decode, url = cluster
    client = openai_client(url)
    name = model_id(url)

    def ask(prompt: str) -> str:
        stream = client.completions.create(model=name, prompt=prompt, max_tokens=12,
                                           temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        prompts = PROMPTS * 4
        for prompt, text in zip(prompts, pool.map(ask, prompts)):
            assert text == colocated[prompt]
    # A client that goes away mid-stream: the router closes the decode stream, the decode
    # instance aborts the request and frees its blocks.
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": name, "prompt": PROMPTS[0], "max_tokens": 500,
                            "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break
    m = wait_idle_with_all_blocks_free(decode.url)
    assert m['pagoda:request_success_total{finished_reason="abort"}'] >= 1

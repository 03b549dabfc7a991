"""LoRA adapters through ``pagoda serve`` (issue 37, the API part): two adapters written by peft
for the tiny Llama, served with ``--lora-modules``; the official openai, anthropic and ollama
clients select each by ``model``, and its greedy tokens equal transformers + peft on the same
prompt ids (the base's too), in one batch and streamed. ``/v1/models`` lists the adapters with
the base as parent. At runtime (``--allow-runtime-lora``, ``--lora-allowed-dir``): a load is
used, an unload answers 404 after, a load and an unload while a request streams under the
unloaded adapter leave that stream whole; a bad adapter is a 400 naming its tensor with the
server still healthy; paths outside the allowed directory are refused; a server without the
opt-in refuses both routes; a bad ``--lora-modules`` adapter stops the start; ``pagoda router``
sends a load to every instance."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest
from server_utils import (COMMON_ARGS, REPO, ServerProcess, metric_values, start_pagoda_router,
                          start_server)
from tiny_lora import make_adapter, peft_model
from tiny_models import hf_greedy

BASE = "tiny-base"  # --served-model-name
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [120, 8, 8, 301, 66, 12, 190, 42, 9, 77, 5]]
NEW = 10  # tokens generated per request
LONG = 300  # tokens of the request an unload runs beside
CHAT = [{"role": "user", "content": "Write a query for the orders table."}]
ENGINE_ARGS = ("--max-num-batched-tokens", "256", "--num-kv-blocks", "256",
               "--max-num-seqs", "16", "--served-model-name", BASE)


class Adapters:
    """The adapters' directories and the reference tokens (transformers + peft)."""

    def __init__(self, root: Path, base: str) -> None:
        self.base = base
        self.allowed = root / "allowed"
        self.outside = root / "outside"
        self.sql = make_adapter(base, str(self.allowed / "sql"), r=8, seed=11)
        self.chat = make_adapter(base, str(self.allowed / "chat"), r=16, targets=ALL, seed=12)
        self.fresh = make_adapter(base, str(self.allowed / "fresh"), r=8,
                                  targets=["o_proj", "down_proj", "up_proj"], seed=13)
        self.bad = str(self.allowed / "bad")
        _break(self.sql, self.bad)
        shutil.copytree(self.sql, self.outside / "sql")
        os.symlink(self.outside / "sql", self.allowed / "link")  # a way out of the directory
        self._models: dict[Optional[str], Any] = {}

    def reference(self, adapter: Optional[str], prompt: list[int], n: int = NEW) -> list[int]:
        """Greedy tokens of transformers (+ peft with ``adapter``), exactly ``n`` long."""
        if adapter not in self._models:
            if adapter is None:
                import torch
                import transformers
                self._models[None] = transformers.AutoModelForCausalLM.from_pretrained(
                    self.base, dtype=torch.float32)
            else:
                self._models[adapter] = peft_model(self.base, adapter)
        return hf_greedy(self._models[adapter], prompt, n)


def _break(src: str, dst: str) -> None:
    """A copy of the adapter at ``src`` whose first q_proj lora_A lost a column."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    file = os.path.join(dst, "adapter_model.safetensors")
    tensors = load_file(file)
    key = next(k for k in sorted(tensors) if "q_proj.lora_A" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, file)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    return Adapters(tmp_path_factory.mktemp("lora"), tiny_model_dir)


@pytest.fixture(scope="module")
def lora_server(adapters: Adapters, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    chat = json.dumps({"name": "chat", "path": adapters.chat, "base_model_name": BASE})
    srv = start_server(adapters.base, tmp_path_factory.mktemp("lora-logs"), *ENGINE_ARGS,
                       "--lora-modules", f"sql={adapters.sql}", chat, "--max-loras", "2",
                       "--max-cpu-loras", "3", "--max-lora-rank", "16", "--allow-runtime-lora",
                       "--lora-allowed-dir", str(adapters.allowed))
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.fixture(scope="module")
def oai(lora_server: ServerProcess):
    from openai import OpenAI

    with OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0,
                timeout=120) as c:
        yield c


def _ids(choice: Any) -> list[int]:
    return choice.model_extra["token_ids"]


def _exact(n: int = NEW) -> dict[str, Any]:
    """Greedy, exactly ``n`` tokens (vLLM's min_tokens, as transformers' min_new_tokens)."""
    return dict(max_tokens=n, temperature=0,
                extra_body={"min_tokens": n, "return_token_ids": True})


def _load(url: str, name: str, path: str, **extra: Any) -> httpx.Response:
    return httpx.post(url + "/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": name, "lora_path": path, **extra})


def _unload(url: str, name: str) -> httpx.Response:
    return httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


# ---------------------------------------------------------------- selecting adapters
def test_completions_select_each_adapter_in_one_batch(oai, adapters) -> None:
    """The base and both adapters, each prompt, sent at once (they share steps): each
    answer is transformers + peft's for its adapter."""
    models = {BASE: None, "sql": adapters.sql, "chat": adapters.chat}
    jobs = [(name, p) for name in models for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(
            lambda job: oai.completions.create(model=job[0], prompt=job[1], **_exact()), jobs))
    for (name, prompt), answer in zip(jobs, answers):
        assert answer.model == name
        assert _ids(answer.choices[0]) == adapters.reference(models[name], prompt), name
    assert _ids(answers[2].choices[0]) != _ids(answers[0].choices[0])  # the adapter did act


def test_streamed_completion_and_chat_under_an_adapter(oai, adapters) -> None:
    stream = oai.completions.create(model="chat", prompt=PROMPTS[1], stream=True, **_exact())
    streamed = [t for chunk in stream for c in chunk.choices for t in _ids(c)]
    assert streamed == adapters.reference(adapters.chat, PROMPTS[1])
    whole = oai.chat.completions.create(model="sql", messages=CHAT, **_exact())
    prompt = whole.model_extra["prompt_token_ids"]
    assert _ids(whole.choices[0]) == adapters.reference(adapters.sql, prompt)
    chunks = oai.chat.completions.create(model="sql", messages=CHAT, stream=True, **_exact())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_models_list_the_adapters_with_the_base_as_parent(oai, lora_server, adapters) -> None:
    cards = httpx.get(lora_server.url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards[:3]] == [BASE, "sql", "chat"]
    assert cards[0]["parent"] is None and cards[0]["root"] == adapters.base
    for card, path in zip(cards[1:3], (adapters.sql, adapters.chat)):
        assert card["root"] == path and card["parent"] == BASE and card["object"] == "model"
    assert oai.models.retrieve("sql").model_extra["parent"] == BASE
    assert {m.id for m in oai.models.list()} >= {BASE, "sql", "chat"}


def test_anthropic_and_ollama_select_an_adapter_by_model(oai, lora_server) -> None:
    import anthropic
    import ollama

    openai_text = {
        m: oai.chat.completions.create(model=m, messages=CHAT, max_tokens=NEW, temperature=0
                                       ).choices[0].message.content for m in ("sql", BASE)}
    assert openai_text["sql"] != openai_text[BASE]
    with anthropic.Anthropic(base_url=lora_server.url, api_key="unused", max_retries=0,
                             timeout=120) as ac:
        message = ac.messages.create(model="sql", messages=CHAT, max_tokens=NEW,
                                     extra_body={"temperature": 0})
    assert message.model == "sql" and message.content[0].text == openai_text["sql"]
    oc = ollama.Client(host=lora_server.url, timeout=120)
    answer = oc.chat(model="sql", messages=CHAT, options={"temperature": 0, "num_predict": NEW})
    assert answer.message.content == openai_text["sql"]
    listed = {m.model: m for m in oc.list().models}
    assert listed["sql:latest"].details.parent_model == f"{BASE}:latest"
    assert listed["sql:latest"].size and listed["chat:latest"].size > listed["sql:latest"].size


def test_an_unknown_model_is_a_404_naming_it_in_each_dialect(lora_server) -> None:
    url, ask = lora_server.url, {"messages": CHAT, "max_tokens": 2, "model": "sql-v2"}
    openai = httpx.post(url + "/v1/chat/completions", json=ask, timeout=30)
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "model_not_found"
    assert "'sql-v2'" in openai.json()["error"]["message"]
    assert "'sql'" in openai.json()["error"]["message"]  # the adapters it serves
    claude = httpx.post(url + "/v1/messages", json=ask, timeout=30)
    assert claude.status_code == 404 and claude.json()["error"]["type"] == "not_found_error"
    assert "sql-v2" in claude.json()["error"]["message"]
    olla = httpx.post(url + "/api/chat", json={**ask, "stream": False}, timeout=30)
    assert olla.status_code == 404 and olla.json() == {"error": "model 'sql-v2' not found"}


# ---------------------------------------------------------------- runtime updates
def test_load_use_unload_then_404(oai, lora_server, adapters) -> None:
    url = lora_server.url
    loaded = _load(url, "fresh", adapters.fresh)
    assert loaded.status_code == 200
    assert loaded.text == "Success: LoRA adapter 'fresh' added successfully."
    card = httpx.get(url + "/v1/models/fresh").json()
    assert card["parent"] == BASE and card["root"] == os.path.realpath(adapters.fresh)
    answer = oai.completions.create(model="fresh", prompt=PROMPTS[0], **_exact())
    assert _ids(answer.choices[0]) == adapters.reference(adapters.fresh, PROMPTS[0])
    again = _load(url, "fresh", adapters.sql)
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    assert "already been loaded" in again.json()["error"]["message"]
    assert _load(url, "fresh", adapters.sql, load_inplace=True).status_code == 200  # vLLM's
    answer = oai.completions.create(model="fresh", prompt=PROMPTS[0], **_exact())
    assert _ids(answer.choices[0]) == adapters.reference(adapters.sql, PROMPTS[0])
    assert _unload(url, "fresh").text == "Success: LoRA adapter 'fresh' removed successfully."
    gone = httpx.post(url + "/v1/completions", json={"model": "fresh", "prompt": "hi"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    missing = _unload(url, "fresh")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert _load(url, "fresh", adapters.fresh).status_code == 200  # the name again: a new id
    assert _unload(url, "fresh").status_code == 200
    ids = re.findall(r": loaded LoRA adapter 'fresh' \(id (\d+)\)", lora_server.log())
    assert len(ids) == 3 and len(set(ids)) == 3


def test_unload_and_load_while_a_request_streams_under_the_adapter(oai, lora_server,
                                                                   adapters) -> None:
    """The stream under the unloaded adapter goes on, every token still peft's, even with
    the adapter's files deleted: its weights stay in the engine until it is done."""
    url, copy = lora_server.url, str(adapters.allowed / "busy")
    shutil.copytree(adapters.fresh, copy)
    assert _load(url, "busy", copy).status_code == 200
    busy_id = re.findall(r": loaded LoRA adapter 'busy' \(id (\d+)\)", lora_server.log())[-1]
    dropped = f"LoRA adapter id {busy_id}: its weights left the engine"
    stream = oai.completions.create(model="busy", prompt=PROMPTS[1], stream=True,
                                    **_exact(LONG))
    tokens = _ids(next(iter(stream)).choices[0])
    assert _unload(url, "busy").status_code == 200
    shutil.rmtree(copy)
    assert _load(url, "other", adapters.chat).status_code == 200
    assert dropped not in lora_server.log()
    assert metric_values(url)["pagoda:num_requests_running"] == 1  # still under way
    refused = httpx.post(url + "/v1/completions", json={"model": "busy", "prompt": "hi"})
    assert refused.status_code == 404
    other = oai.completions.create(model="other", prompt=PROMPTS[0], **_exact())
    tokens += [t for chunk in stream for c in chunk.choices for t in _ids(c)]
    assert tokens == adapters.reference(adapters.fresh, PROMPTS[1], LONG)
    assert _ids(other.choices[0]) == adapters.reference(adapters.chat, PROMPTS[0])
    assert _unload(url, "other").status_code == 200
    deadline = time.monotonic() + 10
    while dropped not in lora_server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dropped in lora_server.log()
    assert httpx.get(url + "/health").status_code == 200


def test_a_bad_adapter_is_a_400_naming_its_tensor_and_the_server_goes_on(oai, lora_server,
                                                                        adapters) -> None:
    bad = _load(lora_server.url, "broken", adapters.bad)
    error = bad.json()["error"]
    assert bad.status_code == 400 and error["param"] == "lora_path"
    assert re.search(r"q_proj\.lora_A\.weight has shape \(8, \d+\)", error["message"]), error
    assert httpx.get(lora_server.url + "/health").status_code == 200
    assert "broken" not in {m.id for m in oai.models.list()}
    answer = oai.completions.create(model="sql", prompt=PROMPTS[0], **_exact())
    assert _ids(answer.choices[0]) == adapters.reference(adapters.sql, PROMPTS[0])


def test_paths_outside_the_allowed_directory_are_refused(lora_server, adapters) -> None:
    url = lora_server.url
    for path in (str(adapters.outside / "sql"), str(adapters.allowed / "link"),
                 str(adapters.allowed / ".." / "outside" / "sql"), adapters.base):
        refused = _load(url, "escape", path)
        assert refused.status_code == 400, path
        assert refused.json()["error"]["code"] == "lora_path_not_allowed"
    absent = _load(url, "escape", str(adapters.allowed / "nothing-here"))
    assert absent.status_code == 404 and absent.json()["error"]["param"] == "lora_path"


def test_the_router_sends_a_load_to_its_instances(lora_server, adapters,
                                                  tmp_path_factory) -> None:
    router = start_pagoda_router(tmp_path_factory.mktemp("lora-router"), "--replicas",
                                 lora_server.url)
    try:
        assert _load(router.url, "routed", adapters.sql).status_code == 200
        body = {"model": "routed", "prompt": PROMPTS[0], **_exact()}
        body.update(body.pop("extra_body"))
        answer = httpx.post(router.url + "/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["token_ids"] == adapters.reference(adapters.sql, PROMPTS[0])
        twice = _load(router.url, "routed", adapters.sql)
        assert twice.status_code == 400 and twice.json()["error"]["param"] == "lora_name"
        assert _unload(router.url, "routed").status_code == 200
    finally:
        router.stop()


# ---------------------------------------------------------------- refusals at start
def test_without_the_opt_in_runtime_updates_are_refused(adapters, tmp_path_factory) -> None:
    env_name = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
    saved = os.environ.pop(env_name, None)
    try:
        srv = start_server(adapters.base, tmp_path_factory.mktemp("lora-off"), *ENGINE_ARGS,
                           "--enable-lora", "--lora-allowed-dir", str(adapters.allowed))
    finally:
        if saved is not None:
            os.environ[env_name] = saved
    try:
        for refused in (_load(srv.url, "sql", adapters.sql), _unload(srv.url, "sql")):
            assert refused.status_code == 404
            assert "--allow-runtime-lora" in refused.json()["error"]["message"]
        assert [c["id"] for c in httpx.get(srv.url + "/v1/models").json()["data"]] == [BASE]
    finally:
        srv.stop()


def test_a_bad_startup_adapter_stops_the_start_with_its_message(adapters) -> None:
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--model", adapters.base,
           "--port", "9", *COMMON_ARGS, *ENGINE_ARGS, "--lora-modules",
           f"broken={adapters.bad}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--lora-modules broken={adapters.bad}" in done.stderr
    assert "q_proj.lora_A.weight has shape" in done.stderr


# ---------------------------------------------------------------- flags
def test_lora_module_flags_and_the_vllm_switch(monkeypatch) -> None:
    from pagoda.config import EngineArgs
    from pagoda.entrypoints.adapters import AdapterCatalog, LoRAServing
    from pagoda.entrypoints.cli import build_parser
    from pagoda.entrypoints.openai.api_server import lora_serving
    from pagoda.entrypoints.openai.args import LoRAModule

    ns = build_parser().parse_args([
        "serve", "--lora-modules", "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}',
        "--lora-modules", "c=hub/id", "--lora-allowed-dir", "/d", "--lora-allowed-dir", "/e"])
    assert ns.lora_modules == [LoRAModule("a", "/x"), LoRAModule("b", "/y", "m"),
                               LoRAModule("c", "hub/id")]
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    serving = lora_serving(ns, EngineArgs(enable_lora=True))
    assert serving.allowed_dirs == ("/d", "/e") and not serving.allow_runtime
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", " True ")
    assert lora_serving(ns, EngineArgs(enable_lora=True)).allow_runtime
    for bad in ("a", "=x", '{"name": "a"}', '{"name": "a", "path": "/x", "rank": 8}'):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--lora-modules", bad])
    for module, why in ((LoRAModule("x", "/x", "other"), "base_model_name 'other' is not"),
                        (LoRAModule("m", "/x"), "'m' is the base model's name")):
        catalog = AdapterCatalog(LoRAServing(True, modules=(module,)), ["m", "/m"], None)
        with pytest.raises(ValueError, match=why):
            catalog.add_modules()

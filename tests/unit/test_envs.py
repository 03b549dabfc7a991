"""pagoda/envs.py: every environment switch declared once, read when called (so a test's
``monkeypatch.setenv`` before building an engine takes effect), never per step, and nowhere
else (read from the source with ``ast``); docs/envs.md holds its table."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from runner_driver import run_greedy

from pagoda import envs
from pagoda.models.loader import load_model
from pagoda.models.prepare import prepare_model
from pagoda.worker.model_runner import ModelRunner

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")

# Modules that touch os.environ for something other than reading a switch of pagoda's.
RAW_ENVIRON: dict[str, str] = {
    "pagoda.envs": "the one reader",
    "pagoda.kernels.ext": "puts the ninja it found on PATH for torch's extension builder",
    "pagoda.bench.vllm_peer": "the vLLM peer's subprocess environment",
    "pagoda.bench.procs": "the instances' subprocess environment",
    "pagoda.bench.kv_accuracy": "sets PAGODA_INT4_MAX_ROWS (envs.INT4_MAX_ROWS.name) for the "
                                "engine it builds, then restores it",
}


def environ_users() -> set[str]:
    """Modules that name ``os.environ`` or call ``os.getenv`` / ``getenv``."""
    users = set()
    for path in sorted((REPO / "pagoda").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")) or (
                    isinstance(node, ast.Name) and node.id in ("environ", "getenv")):
                parts = path.relative_to(REPO).with_suffix("").parts
                users.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return users


def test_no_module_reads_the_environment_but_envs():
    assert environ_users() - set(RAW_ENVIRON) == set()


def test_the_exceptions_still_touch_it():
    assert set(RAW_ENVIRON) - environ_users() == set()


def test_the_docs_hold_the_table():
    assert envs.table() in (REPO / "docs" / "envs.md").read_text()


def test_names_are_unique_and_the_old_constants_follow_them():
    from pagoda.attention import backend, cpu_attention
    from pagoda.kernels import cpu_fused
    from pagoda.kv_transfer import side_channel
    from pagoda.models import cpu_int4, cpu_linear

    assert len({v.name for v in envs.ALL}) == len(envs.ALL)
    assert cpu_fused.FUSED_ENV == envs.FUSED.name == "PAGODA_FUSED"
    assert cpu_attention.AMX_ENV == envs.AMX.name == "PAGODA_AMX"
    assert backend.ATTENTION_BACKEND_ENV == envs.ATTENTION_REFERENCE.name == "PAGODA_ATTENTION"
    assert cpu_int4.MAX_ROWS_ENV == envs.INT4_MAX_ROWS.name == "PAGODA_INT4_MAX_ROWS"
    assert cpu_linear.PACKED_LINEAR_ENV == envs.PACKED_LINEAR.name == "PAGODA_PACKED_LINEAR"
    assert side_channel.SECRET_ENV == envs.KV_SECRET.name == "PAGODA_KV_SECRET"


@pytest.mark.parametrize("var, raw, want", [
    (envs.FUSED, None, True), (envs.FUSED, "0", False), (envs.FUSED, "1", True),
    (envs.FUSED, "", True),
    (envs.AMX, None, True), (envs.AMX, "0", False),
    (envs.ATTENTION_REFERENCE, None, False), (envs.ATTENTION_REFERENCE, "torch", True),
    (envs.ATTENTION_REFERENCE, "triton", False),
    (envs.PACKED_LINEAR, None, None), (envs.PACKED_LINEAR, "1", True),
    (envs.PACKED_LINEAR, "0", False), (envs.PACKED_LINEAR, "yes", None),
    (envs.INT4_MAX_ROWS, None, None), (envs.INT4_MAX_ROWS, "0", 0),
    (envs.INT4_MAX_ROWS, "12", 12),
    (envs.TRITON_INTERPRET, None, False), (envs.TRITON_INTERPRET, "1", True),
    (envs.KV_SECRET, None, None), (envs.KV_SECRET, "s", "s"),
])
def test_each_switch_is_read_when_called(monkeypatch, var, raw, want):
    if raw is None:
        monkeypatch.delenv(var.name, raising=False)
    else:
        monkeypatch.setenv(var.name, raw)
    assert var() == want


def test_directories_default_under_the_home_cache(monkeypatch):
    monkeypatch.delenv(envs.EXT_DIR.name, raising=False)
    monkeypatch.delenv(envs.CACHE_DIR.name, raising=False)
    assert envs.EXT_DIR() == Path.home() / ".cache" / "pagoda" / "ext"
    assert envs.CACHE_DIR() == Path.home() / ".cache" / "pagoda"
    monkeypatch.setenv(envs.EXT_DIR.name, "/tmp/x")
    assert envs.EXT_DIR() == Path("/tmp/x")


def test_a_row_limit_that_is_not_a_number_raises(monkeypatch):
    monkeypatch.setenv(envs.INT4_MAX_ROWS.name, "many")
    with pytest.raises(ValueError):
        envs.INT4_MAX_ROWS()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_reads_no_switch(monkeypatch, dtype):
    """Built, the runner and its model step without reading any switch (the sampler's fused
    argmax included: chosen with the ops, when the runner is built)."""
    model = load_model(None, dtype, CPU, load_format="dummy", model_preset="tiny-qwen3").model
    prompts = [[7, 8, 9, 10, 11], list(range(40, 77))]
    want = run_greedy(ModelRunner(prepare_model(model, CPU, dtype), 16, 16), prompts, 3)
    runner = ModelRunner(prepare_model(model, CPU, dtype), 16, 16)

    def read(self):
        raise AssertionError(f"{self.name} read during a step")

    monkeypatch.setattr(envs.EnvVar, "__call__", read)
    assert run_greedy(runner, prompts, 3) == want


def test_the_servers_key_comes_from_the_flag_or_else_pagoda_api_key(monkeypatch):
    from types import SimpleNamespace

    from pagoda.config import EngineArgs
    from pagoda.entrypoints import cli
    from pagoda.entrypoints.openai.api_server import _server_config

    engine, args = SimpleNamespace(model_name="m"), EngineArgs(model="m")

    def keys(*argv: str) -> tuple:
        ns = cli.build_parser().parse_args(["serve", "--model", "m", *argv])
        return _server_config(ns, engine, args).api_keys

    monkeypatch.delenv(envs.API_KEY.name, raising=False)
    assert keys() == ()
    monkeypatch.setenv(envs.API_KEY.name, "from-env")
    assert keys() == ("from-env",)
    assert keys("--api-key", "a", "--api-key", "b") == ("a", "b")

"""``--quantization int4`` through the engine, on tiny random models: with every step on the
4-bit weights (``PAGODA_INT4_MAX_ROWS`` above any step's rows), greedy output in fp32 is
token-identical to transformers in fp32 on a checkpoint whose linear weights were replaced by
what the 4-bit codes stand for, in every scheduling mode; with the row limit of the timing or
a small one, decode steps take the 4-bit weights and prefill steps the dense ones, and a
step's drafts (speculative decoding) do not count: its verified rows run the weights its
decode rows would have run, so greedy output is unchanged by speculation."""
from __future__ import annotations

import os
import random
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pagoda import LLM, SamplingParams
from pagoda.models import cpu_int4
from spec_oracle import with_oracle
from tiny_models import TINY_VOCAB, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "qwen2", "qwen3"]     # qwen2: biases on q/k/v; qwen3: q/k norms
PROMPT_LENS = [3, 17, 40, 64]
MAX_TOKENS = [24, 9, 17, 30]
MODES = {
    "default": {},
    "budget7": dict(max_num_batched_tokens=7),
    "preempt": dict(block_size=8, num_kv_blocks=12, max_num_batched_tokens=32),
}


def dequantized_copy(src: str, dst: str) -> str:
    """``src`` with every projection weight replaced by ``dequantize(quantize(w))``."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            tensors[name] = cpu_int4.dequantize(*cpu_int4.quantize(w)).to(w.dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    family = request.param
    path = make_model(str(tmp_path_factory.mktemp(family)), family, seed=11)
    ref_path = dequantized_copy(path, str(tmp_path_factory.mktemp(family) / "dequantized"))
    rng = random.Random(3)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS)]
    plain = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert refs != [hf_greedy(plain, p, m) for p, m in zip(prompts, MAX_TOKENS)], \
        "the 4-bit rounding must change the answer, or this test cannot tell the forms apart"
    return path, prompts, refs


def run(path: str, prompts: list[list[int]], **kwargs) -> tuple[LLM, list[list[int]]]:
    llm = LLM(path, dtype="float32", quantization="int4", **kwargs)
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS], use_tqdm=False)
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks
    return llm, [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("mode", list(MODES))
def test_every_step_on_int4_matches_transformers_on_the_dequantized_weights(case, mode,
                                                                           monkeypatch):
    path, prompts, refs = case
    monkeypatch.setenv(cpu_int4.MAX_ROWS_ENV, str(1 << 20))
    llm, got = run(path, prompts, **MODES[mode])
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, cpu_int4.Int4Linear)]
    assert len(layers) == 4 * llm.engine.arch.num_layers
    assert got == refs


def spy_paths(layer: cpu_int4.Int4Linear) -> tuple[list[int], list[tuple[int, str]]]:
    """Record each call of ``layer`` (its rows) and each form it ran (rows, "int4" or
    "dense"): the 4-bit kernel's and the dense layer's own calls, not the routing rule."""
    calls: list[int] = []
    paths: list[tuple[int, str]] = []

    def record(module: torch.nn.Module, name: str, log: list) -> None:
        forward = module.forward

        def spy(x: torch.Tensor) -> torch.Tensor:
            log.append((x.shape[0], name) if name else x.shape[0])
            return forward(x)

        module.forward = spy

    record(layer, "", calls)
    record(layer.int4, "int4", paths)
    record(layer.dense, "dense", paths)
    return calls, paths


def test_small_steps_take_int4_and_large_ones_dense(case, monkeypatch):
    path, prompts, refs = case
    monkeypatch.setenv(cpu_int4.MAX_ROWS_ENV, "4")
    llm = LLM(path, dtype="float32", quantization="int4")
    calls, paths = spy_paths(llm.engine.runner.model.layers[0].mlp.down_proj)
    llm.generate(prompts, [greedy(m) for m in MAX_TOKENS], use_tqdm=False)
    assert len(paths) == len(calls), "a call ran both forms, or neither"
    assert {name for _, name in paths} == {"int4", "dense"}
    assert all((name == "int4") == (n <= 4) for n, name in paths), paths
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_speculation_verifies_on_the_weights_decode_runs(case, monkeypatch):
    """A verified row of 1 + 6 rows runs the 4-bit weights, as its decode row of one would
    (steps of at most 4 rows without drafts take them): greedy output with drafts (the
    answer itself, a third wrong) equals int4's without, which differs from dense weights'
    in these tiny models (the ``case`` fixture checks that)."""
    path, prompts, _ = case
    monkeypatch.setenv(cpu_int4.MAX_ROWS_ENV, "4")
    params = [greedy(m) for m in MAX_TOKENS]
    want = LLM(path, dtype="float32", quantization="int4").generate(prompts, params)
    config = {"method": "ngram", "num_speculative_tokens": 6, "adaptive": False}
    llm = LLM(path, dtype="float32", quantization="int4", speculative_config=config)
    calls, paths = spy_paths(llm.engine.runner.model.layers[0].mlp.down_proj)
    with_oracle(llm, prompts, want, error=0.3)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    stats = llm.engine.stats().scheduler.spec
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert len(paths) == len(calls)
    assert any(name == "int4" and n > 4 for n, name in paths), "no verify step on 4 bits"
    llm.engine.check_invariants()


def test_a_zero_limit_leaves_the_model_dense(case, monkeypatch):
    path = case[0]
    monkeypatch.setenv(cpu_int4.MAX_ROWS_ENV, "0")
    llm = LLM(path, dtype="float32", quantization="int4")
    assert llm.engine.runner.int4_max_rows == 0
    assert not any(isinstance(m, cpu_int4.Int4Linear) for m in llm.engine.runner.model.modules())

"""``--load-format dummy``: presets with the published shapes, random weights, no files."""
from __future__ import annotations

import json

import pytest
import torch

from pagoda.models.loader import TokenIdTokenizer, load_model, model_class
from pagoda.models.presets import preset_arch, preset_config, preset_names
from pagoda.models.prepare import prepare_model
from pagoda.worker.model_runner import ModelRunner
from runner_driver import run_greedy

CPU = torch.device("cpu")

# Parameter counts of the published checkpoints (embeddings included, tied ones once).
PUBLISHED_PARAMS = {
    "qwen3-0.6b": 596_049_920,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "gemma-3-1b": 999_885_952,
    "gemma-2-2b": 2_614_341_888,
}
# Non-embedding parameters Qwen3-0.6B's model card gives: 0.44B.
QWEN3_06B_NON_EMBEDDING = 440_401_920


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_has_the_published_parameter_count(name):
    arch = preset_arch(name)
    with torch.device("meta"):
        model = model_class(arch)(arch, 16)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_qwen3_preset_shapes():
    arch = preset_arch("qwen3-0.6b")
    assert (arch.model_type, arch.qk_norm, arch.tie_word_embeddings) == ("qwen3", True, True)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (16, 8, 128)
    assert arch.rope_theta == 1e6 and arch.vocab_size == 151936
    assert arch.num_params_non_embedding == QWEN3_06B_NON_EMBEDDING
    llama8b = preset_arch("llama-3.1-8b")
    assert llama8b.rope_scaling["rope_type"] == "llama3" and not llama8b.tie_word_embeddings


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="qwen3-0.6b"):
        preset_config("gpt-5")
    assert "llama-3.1-8b" in preset_names()


def test_preset_needs_dummy_load_format():
    with pytest.raises(ValueError, match="--load-format dummy"):
        load_model(None, torch.float32, CPU, load_format="auto", model_preset="tiny-qwen3")
    with pytest.raises(ValueError, match="--model-preset"):
        load_model(None, torch.float32, CPU, load_format="dummy")


def test_dummy_weights_are_seeded_and_finite():
    a = load_model(None, torch.float32, CPU, load_format="dummy", model_preset="tiny-llama",
                   seed=3).model
    b = load_model(None, torch.float32, CPU, load_format="dummy", model_preset="tiny-llama",
                   seed=3).model
    c = load_model(None, torch.float32, CPU, load_format="dummy", model_preset="tiny-llama",
                   seed=4).model
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["layers.0.mlp.down_proj.weight"], pc["layers.0.mlp.down_proj.weight"])
    assert all(torch.isfinite(p).all() for p in pa.values())
    assert torch.equal(pa["norm.weight"], torch.ones_like(pa["norm.weight"]))


def test_token_id_tokenizer_decodes_ids_and_refuses_text():
    tok = TokenIdTokenizer()
    assert tok.decode([5, 17]) == " 5 17"
    with pytest.raises(ValueError, match="token ids"):
        tok.encode("hello")


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])
def test_dummy_model_decodes_greedily_on_cpu(preset):
    """A few greedy steps through the paged runner equal recomputing the whole sequence
    from scratch each step (the KV cache is used, and used right)."""
    loaded = load_model(None, torch.float32, CPU, load_format="dummy", model_preset=preset)
    assert loaded.name == f"dummy:{preset}"
    prompts = [[7, 8, 9, 10, 11], list(range(40, 77)), [300]]
    steps = 6
    runner = ModelRunner(prepare_model(loaded.model, CPU, torch.float32), 64, 16)
    got = run_greedy(runner, prompts, steps)
    assert all(len(g) == steps for g in got)
    for prompt, tokens in zip(prompts, got):
        seq = list(prompt)
        for want in tokens:
            fresh = ModelRunner(prepare_model(loaded.model, CPU, torch.float32), 8, 16)
            seq.append(run_greedy(fresh, [seq], 1)[0][0])
            assert seq[-1] == want


def test_engine_loads_a_dummy_preset():
    """``LLM(load_format="dummy", model_preset=...)`` end to end, token-id prompts. Needs the
    engine to forward load_format / model_preset to load_model (docs/cuda_backend.md)."""
    from pagoda import LLM, SamplingParams

    llm = LLM(load_format="dummy", model_preset="tiny-qwen3", dtype="float32",
              num_kv_blocks=32)
    assert llm.engine.model_name == "dummy:tiny-qwen3", (
        "the engine ignored load_format/model_preset: see 'Engine wiring' in "
        "docs/cuda_backend.md")
    outs = llm.generate([[5, 6, 7], list(range(50, 90))],
                        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5]
    assert outs[0].text == "".join(f" {t}" for t in outs[0].token_ids)


def test_profile_step_runs_a_full_budget_forward():
    """The step the CUDA KV budget is sized after (worker/kv_cache.py) runs on any device."""
    from pagoda.worker.kv_cache import profile_activation_bytes, run_profile_step

    model = load_model(None, torch.float32, CPU, load_format="dummy",
                       model_preset="tiny-qwen3").model
    logits = run_profile_step(model, 40, 8, 16, torch.float32, CPU)
    assert logits.shape == (8, 512) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert profile_activation_bytes(model, 40, 8, 16, torch.float32, CPU) == 0


def test_config_json_alone_gives_token_ids_not_an_empty_tokenizer(tmp_path):
    """transformers builds an empty tokenizer from a config.json's model type; a directory
    without tokenizer files must give the token-id tokenizer instead."""
    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny-qwen3")))
    loaded = load_model(str(tmp_path), torch.float32, CPU, load_format="dummy")
    assert isinstance(loaded.tokenizer, TokenIdTokenizer)
    assert loaded.tokenizer.decode([300, 5]) == " 300 5"

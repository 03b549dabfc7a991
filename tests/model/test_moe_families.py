"""Mixture-of-experts families (Qwen3-MoE, Mixtral; models/moe.py): greedy fp32 tokens equal
transformers' through chunked prefill, prefix caching and preemption; the grouped expert
computation equals a token-by-token one; bf16 stays within bf16 rounding of transformers;
unsupported variants are refused at load."""
import json
import os
import random

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.models import moe
from pagoda.models.config import ModelArch, UnsupportedModelError
from pagoda.models.loader import load_model
from pagoda.models.presets import preset_arch
from tiny_models import TINY_VOCAB, greedy, hf_greedy, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Qwen3-MoE with a dense first layer among sparse ones (mlp_only_layers), and with
# decoder_sparse_step 2 (layers 1 and 3 sparse); Mixtral as published (every layer sparse).
CASES = {
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-dense0": ("qwen3_moe", dict(mlp_only_layers=[0], norm_topk_prob=False)),
    "qwen3_moe-step2": ("qwen3_moe", dict(decoder_sparse_step=2, num_hidden_layers=4)),
    "mixtral": ("mixtral", {}),
}
PROMPT_LENS = [3, 17, 40, 64]
MAX_TOKENS = [24, 9, 17, 30]
MODES = {
    "default": {},
    "budget7": dict(max_num_batched_tokens=7),
    "no-chunked": dict(enable_chunked_prefill=False, max_num_batched_tokens=8),
    "block1": dict(block_size=1, max_num_batched_tokens=13),
    # 12 blocks x 8 tokens cannot hold all four requests at once: forces preemption.
    "preempt": dict(block_size=8, num_kv_blocks=12, max_num_batched_tokens=32),
    "preempt-nocache": dict(block_size=8, num_kv_blocks=12, max_num_batched_tokens=32,
                            enable_prefix_caching=False),
    "async": dict(async_scheduling=True, max_num_batched_tokens=7),
}


@pytest.fixture(scope="module", params=list(CASES))
def moe_case(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    seed = 20 + list(CASES).index(request.param)
    path = make_model(str(tmp_path_factory.mktemp(request.param)), family, seed=seed, **overrides)
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS)]
    return path, prompts, refs


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(moe_case, mode):
    path, prompts, refs = moe_case
    llm = LLM(path, dtype="float32", **MODES[mode])
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == refs
    if "preempt" in mode:
        assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_invariants()


def test_layers_sparse_where_the_config_says(tmp_path):
    path = make_model(str(tmp_path), "qwen3_moe", decoder_sparse_step=2, num_hidden_layers=4,
                      mlp_only_layers=[3])
    model = load_model(path, torch.float32, torch.device("cpu")).model
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "SparseMoE", "MLP", "MLP"]
    assert not model.cuda_graph_safe  # the expert counts are read on the host


def naive_moe(layer: moe.SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition."""
    weights, experts = moe.route(layer.gate(x), layer.top_k, layer.renormalize)
    out = torch.zeros_like(x)
    i = layer.intermediate_size
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist()):
            gate_up = layer.gate_up[e] @ x[t]
            h = torch.nn.functional.silu(gate_up[:i]) * gate_up[i:]
            out[t] += w * (layer.down[e] @ h)
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_experts_equal_token_by_token(renormalize):
    arch = preset_arch("tiny-qwen3-moe")
    arch = ModelArch(**{**arch.__dict__, "norm_topk_prob": renormalize})
    layer = moe.SparseMoE(arch)
    gen = torch.Generator().manual_seed(0)
    for p in layer.parameters():
        p.data.normal_(0.0, 0.1, generator=gen)
    for tokens in (1, 3, 50):
        x = torch.randn(tokens, arch.hidden_size, generator=gen)
        torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-6)
    weights, _ = moe.route(layer.gate(x), layer.top_k, layer.renormalize)
    assert torch.allclose(weights.sum(-1), torch.ones(50)) == renormalize


def test_bf16_stays_within_rounding_of_transformers(tmp_path):
    """bf16 (the fused CPU ops where the CPU has bf16, else the reference): each token pagoda
    picks is transformers' bf16 top choice, or within a few bf16 rounding steps of it, with
    transformers scoring pagoda's own sequence (the bar of test_bf16.py)."""
    path = make_model(str(tmp_path), "qwen3_moe", seed=5)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (5, 33)]
    llm = LLM(path, dtype="bfloat16", max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    for prompt, out in zip(prompts, outs):
        tokens = out.token_ids
        assert len(tokens) == 16
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
        top = logits.max(-1).values
        chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
        step = torch.exp2(torch.floor(torch.log2(top.abs().clamp_min(1e-3))) - 7)
        assert ((top - chosen) / step).max() <= 4, tokens


def test_active_params_count_the_routed_experts_only():
    """Qwen3-30B-A3B: 3.3B active parameters, of which 2.7B outside the embeddings; the
    fewer-layer preset is the same per layer."""
    arch, short = preset_arch("qwen3-30b-a3b"), preset_arch("qwen3-30b-a3b-4l")
    assert 2.6e9 < arch.num_params_non_embedding < 2.9e9
    assert short.num_params_non_embedding * arch.num_layers == (
        arch.num_params_non_embedding * short.num_layers)


def _config(tmp_path, **changes):
    path = make_model(str(tmp_path), "qwen3_moe")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def test_shared_experts_refused(tmp_path):
    path = _config(tmp_path, shared_expert_intermediate_size=64)
    with pytest.raises(UnsupportedModelError, match="shared experts"):
        LLM(path, dtype="float32")
    with pytest.raises(UnsupportedModelError, match="qwen2_moe"):
        ModelArch.from_hf_config({"model_type": "qwen2_moe"})


def test_missing_expert_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_model(str(tmp_path), "qwen3_moe")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights: \['layers.1.mlp.gate_up'\]"):
        load_model(path, torch.float32, torch.device("cpu"))


def test_packed_experts_match_transformers(moe_case, monkeypatch):
    """PAGODA_PACKED_LINEAR=1: each expert's matrices in oneDNN's packed form (where this CPU
    and torch can pack the dtype), the stacks emptied; tokens still transformers'."""
    from pagoda.models.cpu_linear import packing_supported

    if not packing_supported(torch.float32):
        pytest.skip("oneDNN cannot pack fp32 weights here")
    monkeypatch.setenv("PAGODA_PACKED_LINEAR", "1")
    path, prompts, refs = moe_case
    llm = LLM(path, dtype="float32", max_num_batched_tokens=7)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, moe.SparseMoE)]
    assert layers and all(m.packed is not None and m.gate_up.numel() == 0 for m in layers)
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == refs

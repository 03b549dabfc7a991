"""Phi-3 / Phi-4 (model_type phi3): the fused qkv_proj / gate_up_proj checkpoint tensors,
partial rotary (Phi-4-mini rotates 0.75 of each head) and LongRoPE, whose short or long
factors pagoda picks once per engine from max_model_len (models/llama.py RotaryEmbedding).
Greedy fp32 tokens equal transformers' through chunked prefill, prefix caching and
preemption, within the regime pagoda supports: short factors where max_model_len fits the
original context, long factors for sequences longer than it (where transformers takes them
for the whole sequence)."""
import copy
import random

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.models.config import ModelArch, UnsupportedModelError
from pagoda.models.llama import RotaryEmbedding, partial_rotary_order
from tiny_models import ENGINE_MODES, TINY_VOCAB, greedy, hf_greedy, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

# head_dim 16: 0.75 rotates 12 dims, 6 frequencies.
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}
PARTIAL = dict(partial_rotary_factor=0.75)
# name: (config overrides, max_model_len, prompt lengths)
CASES = {
    "phi3": ({}, None, [3, 17, 40, 64]),
    "partial": (PARTIAL, None, [3, 17, 40, 64]),
    # max_model_len 128 = the original context: the short factors, as transformers there.
    "longrope-short": (dict(PARTIAL, max_position_embeddings=512,
                            original_max_position_embeddings=128, rope_scaling=LONGROPE),
                       128, [3, 17, 40, 64]),
    # max_model_len 512 > 32: the long factors, as transformers for sequences beyond 32.
    "longrope-long": (dict(PARTIAL, max_position_embeddings=512,
                           original_max_position_embeddings=32, rope_scaling=LONGROPE),
                      512, [33, 40, 47, 64]),
}
MAX_TOKENS = [24, 9, 17, 30]
MODES = ENGINE_MODES


@pytest.fixture(scope="module", params=list(CASES))
def phi_case(request, tmp_path_factory):
    overrides, max_model_len, lens = CASES[request.param]
    seed = 40 + list(CASES).index(request.param)
    path = make_model(str(tmp_path_factory.mktemp(request.param)), "phi3", seed=seed,
                      **copy.deepcopy(overrides))  # transformers completes rope dicts in place
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in lens]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS)]
    return path, max_model_len, prompts, refs


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(phi_case, mode):
    path, max_model_len, prompts, refs = phi_case
    llm = LLM(path, dtype="float32", max_model_len=max_model_len, **MODES[mode])
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == refs
    if "preempt" in mode:
        assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_invariants()


@pytest.mark.parametrize("long", [False, True])
def test_rope_table_equals_transformers(tmp_path, long):
    """pagoda's cos/sin rows, the head dims put back in order, are transformers' (attention
    factor included) for a sequence within / beyond the original context."""
    overrides = dict(PARTIAL, max_position_embeddings=512, original_max_position_embeddings=32,
                     rope_scaling=LONGROPE)
    path = make_model(str(tmp_path), "phi3", **copy.deepcopy(overrides))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    arch = ModelArch.from_hf_config(hf.config.to_dict())
    assert arch.rope_scaling["attention_factor"] == pytest.approx(hf.model.rotary_emb.attention_scaling)
    rope = RotaryEmbedding(arch, 512)
    rope.set_context_len(512 if long else 32)
    assert rope.long_factors == long
    seq = 100 if long else 32
    positions = torch.arange(seq)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, seq, 64), positions)
    # Undo the layout: dim order[j] of the original head sits at j.
    back = torch.argsort(partial_rotary_order(arch.head_dim, arch.rotary_dim))
    r = arch.rotary_dim
    assert torch.equal(rope.cos[:seq][:, back][:, :r], cos[0])
    assert torch.equal(rope.sin[:seq][:, back][:, :r], sin[0])
    assert torch.equal(rope.cos[:seq][:, back][:, r:], torch.ones(seq, arch.head_dim - r))
    assert not rope.sin[:seq][:, back][:, r:].any()


def test_partial_rotary_order_pairs_rotary_dims():
    order = partial_rotary_order(128, 96)
    assert sorted(order.tolist()) == list(range(128))
    for j in range(48):  # rotate-half pairs (j, j + 64) are the rotary pairs (i, i + 48)
        assert (order[j].item(), order[j + 64].item()) == (j, j + 48)
    assert (order[48:64] >= 96).all() and (order[112:] >= 96).all()


def test_bf16_stays_within_rounding_of_transformers(tmp_path):
    """bf16 with partial rotary and LongRoPE (the fused CPU ops where the CPU has bf16): each
    token is transformers' bf16 top choice or within a few bf16 steps of it, transformers
    scoring pagoda's own sequence."""
    path = make_model(str(tmp_path), "phi3", seed=6, **copy.deepcopy(CASES["longrope-short"][0]))
    rng = random.Random(6)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (5, 33)]
    llm = LLM(path, dtype="bfloat16", max_model_len=128, max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    for prompt, out in zip(prompts, outs):
        tokens = out.token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
        top = logits.max(-1).values
        chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
        step = torch.exp2(torch.floor(torch.log2(top.abs().clamp_min(1e-3))) - 7)
        assert ((top - chosen) / step).max() <= 4, tokens


def test_unsupported_variants_refused():
    base = dict(model_type="qwen3", vocab_size=64, hidden_size=64, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        ModelArch.from_hf_config(dict(base, partial_rotary_factor=0.5))
    phi = dict(base, model_type="phi3", max_position_embeddings=512,
               rope_scaling=copy.deepcopy(LONGROPE))
    with pytest.raises(UnsupportedModelError, match="original_max_position_embeddings"):
        ModelArch.from_hf_config(phi)
    su = dict(phi, original_max_position_embeddings=128,
              rope_scaling=dict(copy.deepcopy(LONGROPE), type="su"))
    assert ModelArch.from_hf_config(su).rope_scaling["rope_type"] == "longrope"

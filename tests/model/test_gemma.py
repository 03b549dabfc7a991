"""Gemma 2 and Gemma 3 (text), models/gemma.py: greedy fp32 tokens equal transformers' through
chunked prefill, prefix caching (a second pass over shared prefixes) and preemption, with
windows short enough (8 tokens) that every prompt slides, soft-caps and a query scalar that
change the answer, Gemma 3's local RoPE base and linearly scaled global RoPE; with
speculative decoding too (sync, and async with a small sliding pool), and over an fp8 cache
the C++ kernels equal the PyTorch reference. Also: the sliding window is what makes the
match (without it the tokens differ), the configs' windows are read as transformers reads
them, and what is not supported is refused by name."""
import copy
import random

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.attention.cpu_attention import ATTENTION_BACKEND_ENV
from pagoda.engine.inspector import snapshot_json
from pagoda.models.config import ModelArch, UnsupportedModelError, layer_windows
from spec_oracle import with_oracle_tokens
from tiny_models import ENGINE_MODES, TINY_VOCAB, greedy, hf_greedy, make_model

from native import needs_ext
from test_bf16 import assert_teacher_forced

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (family, config overrides)
CASES = {
    "gemma2": ("gemma2", {}),
    "gemma2-tied": ("gemma2", dict(tie_word_embeddings=True)),
    "gemma3": ("gemma3_text", {}),
    "gemma3-linear-rope": ("gemma3_text", dict(rope_scaling={"rope_type": "linear",
                                                             "factor": 4.0})),
}
PROMPT_LENS = [3, 17, 40, 64]
MAX_TOKENS = [24, 9, 17, 30]
# The sliding layers' KV apart in a pool of their own (core/sliding_kv.py): on by default
# here (the engine sizes it); "sliding-tight" makes that pool small enough that it preempts
# and evicts, "one-pool" keeps every layer in one pool. The preempt modes' 14-block pool is
# too small to gain from a second pool: one pool there.
MODES = {
    **ENGINE_MODES,
    "sliding-tight": dict(block_size=4, num_kv_blocks=64, num_sliding_kv_blocks=9,
                          max_num_batched_tokens=8),
    "one-pool": dict(disable_hybrid_kv_cache_manager=True),
}
ONE_POOL = {"preempt", "preempt-nocache", "one-pool"}


def prompts_for(seed: int) -> list[list[int]]:
    """Random prompts; the last two share a 30-token prefix (a prefix-cache hit in a second
    pass, and within a pass once the first is cached)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    prompts[3][:30] = prompts[2][:30]
    return prompts


@pytest.fixture(scope="module", params=list(CASES))
def gemma_case(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    seed = 60 + list(CASES).index(request.param)
    path = make_model(str(tmp_path_factory.mktemp(request.param)), family, seed=seed,
                      **copy.deepcopy(overrides))
    prompts = prompts_for(seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
    return path, prompts, refs


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(gemma_case, mode):
    path, prompts, refs = gemma_case
    llm = LLM(path, dtype="float32", **MODES[mode])
    params = [greedy(m) for m in MAX_TOKENS]
    for _ in range(2):  # the second pass starts from cached prefixes (where caching is on)
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == refs
    if "preempt" in mode or mode == "sliding-tight":
        assert llm.engine.scheduler.num_preemptions > 0
    sliding = llm.engine.kv.sliding
    assert (sliding is None) == (mode in ONE_POOL)
    counters = snapshot_json(llm.engine.inspect(), [])["counters"]
    if sliding is not None:  # blocks went back as windows moved on; stats and inspector say so
        assert sliding.num_freed > 0
        assert counters["sliding_pool"] == {"num_blocks": sliding.pool.num_blocks,
                                            "num_free_blocks": sliding.pool.num_blocks,
                                            "num_freed": sliding.num_freed}
    else:
        assert counters["sliding_pool"] is None
    llm.engine.check_invariants()


def test_the_window_is_what_makes_the_match(gemma_case, monkeypatch):
    """With every layer attending to its whole context, some prompt's tokens differ from
    transformers': the test above can see a missing window."""
    path, prompts, refs = gemma_case
    llm = LLM(path, dtype="float32", disable_hybrid_kv_cache_manager=True)  # one table
    for layer in llm.engine.runner.model.layers:
        monkeypatch.setattr(layer.self_attn, "window", 0)
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] != refs


def test_layer_windows_as_transformers_reads_them():
    """Explicit layer_types; Gemma 2's alternation and Gemma 3's pattern when a (transformers
    4) config has no layer_types; Mistral and Phi-3 slide in every layer; Qwen2 only with
    use_sliding_window; no window, no sliding."""
    base = dict(num_hidden_layers=6, sliding_window=16)
    assert layer_windows(dict(base, model_type="gemma2")) == (16, 0, 16, 0, 16, 0)
    assert layer_windows(dict(base, model_type="gemma3_text")) == (16, 16, 16, 16, 16, 0)
    assert layer_windows(dict(base, model_type="gemma3_text", sliding_window_pattern=3)) == (
        16, 16, 0, 16, 16, 0)
    types = ["full_attention", "sliding_attention"] * 3
    assert layer_windows(dict(base, model_type="gemma3_text", layer_types=types)) == (
        0, 16, 0, 16, 0, 16)
    assert layer_windows(dict(base, model_type="mistral")) == (16,) * 6
    assert layer_windows(dict(base, model_type="phi3")) == (16,) * 6
    assert layer_windows(dict(base, model_type="qwen2", use_sliding_window=False)) == ()
    assert layer_windows(dict(base, model_type="llama")) == ()
    assert layer_windows(dict(base, model_type="mistral", sliding_window=None)) == ()
    with pytest.raises(UnsupportedModelError, match="layer types"):
        layer_windows(dict(base, model_type="qwen3", layer_types=["chunked_attention"] * 6))


def test_gemma3_rope_bases_and_scale_from_either_config_form():
    """transformers 4's keys (rope_theta, rope_local_base_freq, rope_scaling) and 5's nested
    rope_parameters give the same arch."""
    common = dict(model_type="gemma3_text", vocab_size=10, hidden_size=8, intermediate_size=8,
                  num_hidden_layers=2, num_attention_heads=2, head_dim=4, sliding_window=4,
                  query_pre_attn_scalar=256)
    old = ModelArch.from_hf_config(dict(common, rope_theta=1e6, rope_local_base_freq=1e4,
                                        rope_scaling={"rope_type": "linear", "factor": 8.0}))
    new = ModelArch.from_hf_config(dict(common, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    for arch in (old, new):
        assert (arch.rope_theta, arch.rope_local_theta) == (1e6, 1e4)
        assert arch.rope_scaling == {"rope_type": "linear", "factor": 8.0}
        assert arch.attention_scale == 256**-0.5 and arch.hidden_act == "gelu_pytorch_tanh"
        assert arch.layer_windows == (4, 4)


@pytest.mark.parametrize("config, feature", [
    (dict(model_type="gemma3", text_config={}), "multimodal Gemma 3"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), "bidirectional"),
    (dict(model_type="gemma2", hidden_activation="relu"), "hidden_act"),
])
def test_unsupported_variants_are_refused_by_name(config, feature):
    full = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2, head_dim=4)
    with pytest.raises(UnsupportedModelError, match=feature):
        ModelArch.from_hf_config({**full, **config})


# ----------------------------------------------------------------- bf16 on the CPU kernels
BF16_CASES = {"gemma2-d16": ("gemma2", 16), "gemma3-d32": ("gemma3_text", 32)}
BF16_MODES = {"default": {}, "chunked": dict(max_num_batched_tokens=7, block_size=4),
              "prefix": dict(block_size=8)}


@pytest.fixture(scope="module", params=list(BF16_CASES))
def bf16_case(request, tmp_path_factory):
    family, head_dim = BF16_CASES[request.param]
    path = make_model(str(tmp_path_factory.mktemp(request.param)), family, seed=7,
                      head_dim=head_dim)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return path, hf


@needs_ext
@pytest.mark.parametrize("mode", list(BF16_MODES))
def test_bf16_on_the_cpu_kernels_agrees_with_transformers(bf16_case, mode, amx):
    """bf16 through the C++ decode kernel with windows and soft-caps, and the AMX prefill
    kernel (head dim 32) or the reference prefill: every token transformers' top choice in
    bf16 or within a few rounding steps of it (tests/model/test_bf16.py's bar)."""
    path, hf = bf16_case
    prompts = prompts_for(9)
    llm = LLM(path, dtype="bfloat16", **BF16_MODES[mode])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for _ in range(2 if mode == "prefix" else 1):
        assert_teacher_forced(hf, prompts, llm.generate(prompts, params))
    llm.engine.check_invariants()


# Speculation: sync, and async scheduling (the next step scheduled, and every window slid,
# while a verified row's drafts are in flight) with the sliding pool small enough that the
# blocks given back are soon handed out again.
SPEC_MODES = {
    "sync": {},
    "async-tight": dict(async_scheduling=True, block_size=4, num_kv_blocks=64,
                        num_sliding_kv_blocks=9, max_num_batched_tokens=12),
}


@pytest.mark.parametrize("mode", list(SPEC_MODES))
def test_speculative_decoding_keeps_the_tokens(gemma_case, mode):
    """Drafts verified through the windowed, soft-capped layers and rolled back, and the
    tokens stay transformers'. The drafts are transformers' own output with a third of
    the tokens wrong (tests/spec_oracle.py), so runs are accepted and rejected."""
    path, prompts, _ = gemma_case
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    repetitive = [prompts[1][:12] * 3, prompts[2][:10] * 4 + prompts[0], prompts[3]]
    refs = [hf_greedy(hf, p, 40) for p in repetitive]
    config = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    llm = LLM(path, dtype="float32", speculative_config=config, **SPEC_MODES[mode])
    with_oracle_tokens(llm, repetitive, refs, error=0.3)
    outs = llm.generate(repetitive, greedy(40))
    assert [o.token_ids for o in outs] == refs
    stats = llm.engine.stats().scheduler.spec
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert llm.engine.kv.sliding is not None and llm.engine.kv.sliding.num_freed > 0
    llm.engine.check_invariants()


FP8_MODES = ("default", "sliding-tight", "one-pool")


@needs_ext
@pytest.mark.parametrize("mode", FP8_MODES)
def test_fp8_kv_kernels_match_the_reference_backend(gemma_case, mode, monkeypatch):
    """An fp8 (e4m3) KV cache, the sliding layers' pool included, under fp32 weights: the C++
    kernels (windows, soft-caps, the sliding tables' holes) and the PyTorch reference read
    the same rounded K/V, so their greedy tokens are identical, a second pass over cached
    prefixes included (test_fp8_kv_engine.py's bar: the rounding moves the answer away from
    transformers', so they are not the bar). Its log-probabilities differ from an fp32
    cache's: the rounding is in effect."""
    path, prompts, _ = gemma_case
    params = [SamplingParams(temperature=0.0, max_tokens=m, min_tokens=m, logprobs=0)
              for m in MAX_TOKENS]

    def run(kv_cache_dtype: str) -> tuple[list, list]:
        llm = LLM(path, dtype="float32", kv_cache_dtype=kv_cache_dtype, **MODES[mode])
        caches = llm.engine.runner.kv_caches
        want = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.float32
        assert caches and all(c.dtype == want for c in caches)
        assert (llm.engine.kv.sliding is None) == (mode in ONE_POOL)
        passes = [llm.generate(prompts, params) for _ in range(2)]
        if mode == "sliding-tight":
            assert llm.engine.scheduler.num_preemptions > 0
        llm.engine.check_invariants()
        assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks
        tokens = [[o.outputs[0].token_ids for o in outs] for outs in passes]
        return tokens, [o.outputs[0].cumulative_logprob for o in passes[0]]

    ours, logprobs = run("fp8")
    assert logprobs != run("auto")[1], "the e4m3 rounding changed nothing"
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "torch")
    assert run("fp8")[0] == ours


def test_a_sliding_pool_too_small_for_one_request_is_refused(gemma_case):
    """An explicit pool below one request's window and step would leave it waiting forever."""
    path, _, _ = gemma_case
    with pytest.raises(ValueError, match="num_sliding_kv_blocks 5 is below what one request "
                                         "needs: 6 blocks for a 8-token window"):
        LLM(path, dtype="float32", block_size=4, num_sliding_kv_blocks=5,
            max_num_batched_tokens=8)

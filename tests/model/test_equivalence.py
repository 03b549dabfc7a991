"""Greedy output of the paged engine is token-identical to Hugging Face transformers, in
every scheduling mode: chunked prefill on/off and with odd budgets, block sizes 1 and 16,
requests that join and finish at different steps, forced preemption, and async scheduling."""
import random

import pytest
import torch
import transformers

from pagoda import LLM
from pagoda.request import EngineRequest
from tiny_models import TINY_VOCAB, greedy, hf_greedy, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
PROMPT_LENS = [3, 17, 40, 64]
MAX_TOKENS = [24, 9, 17, 30]


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request, tmp_path_factory):
    family = request.param
    path = make_model(str(tmp_path_factory.mktemp(family)), family, seed=FAMILIES.index(family))
    rng = random.Random(7)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS)]
    return path, prompts, refs


MODES = {
    "default": {},
    "budget1": dict(max_num_batched_tokens=1),
    "budget7": dict(max_num_batched_tokens=7),
    "budget64": dict(max_num_batched_tokens=64),
    "no-chunked": dict(enable_chunked_prefill=False, max_num_batched_tokens=8),
    "block1": dict(block_size=1, max_num_batched_tokens=13),
    "block16": dict(block_size=16, max_num_batched_tokens=29),
    # 12 blocks x 8 tokens cannot hold all four requests at once: forces preemption.
    "preempt": dict(block_size=8, num_kv_blocks=12, max_num_batched_tokens=32),
    # The same without prefix caching: recompute after preemption starts from nothing.
    "preempt-nocache": dict(block_size=8, num_kv_blocks=12, max_num_batched_tokens=32,
                            enable_prefix_caching=False),
    # Async scheduling: decodes run on tokens still in flight (one step ahead of the reads).
    "async": dict(async_scheduling=True),
    "async-budget7": dict(async_scheduling=True, max_num_batched_tokens=7),
    "async-preempt": dict(async_scheduling=True, block_size=8, num_kv_blocks=12,
                          max_num_batched_tokens=32),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(family_case, mode):
    path, prompts, refs = family_case
    llm = LLM(path, dtype="float32", **MODES[mode])
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref
        assert out.finish_reason == "length"
    if "preempt" in mode:
        assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_requests_joining_mid_run_match(family_case):
    """Requests arrive while others decode; each still matches its solo reference."""
    path, prompts, refs = family_case
    llm = LLM(path, dtype="float32", max_num_batched_tokens=16, block_size=4)
    engine = llm.engine
    done = {}
    pending = list(enumerate(zip(prompts, MAX_TOKENS)))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            i, (p, m) = pending.pop(0)
            engine.add_request(EngineRequest(str(i), p, greedy(m)))
        for out in engine.step() if engine.has_unfinished_requests() else []:
            if out.finished:
                done[int(out.request_id)] = out.token_ids
        step += 1
    assert [done[i] for i in range(len(prompts))] == refs


# Mistral slides every layer's window (sliding_window; v0.1's 4,096 never binds on these
# prompts): a window of 8 tokens binds on all but the shortest, through chunked prefill,
# preemption, async scheduling and speculation (every layer's KV in the one pool).
MISTRAL_WINDOW = 8
MISTRAL_MODES = {
    "default": {},
    "budget7": dict(max_num_batched_tokens=7, block_size=4),
    "preempt": dict(block_size=8, num_kv_blocks=12, max_num_batched_tokens=32),
    "async": dict(async_scheduling=True, max_num_batched_tokens=7),
    "spec": dict(speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                     "adaptive": False}),
}


@pytest.fixture(scope="module")
def mistral_case(tmp_path_factory):
    rng = random.Random(8)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    refs = {}
    for window in (MISTRAL_WINDOW, None):
        path = make_model(str(tmp_path_factory.mktemp(f"mistral-w{window}")), "mistral",
                          seed=21, sliding_window=window)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        refs[window] = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
        if window:
            windowed = path
    # Same weights (same seed): the window alone changes transformers' answer.
    assert refs[MISTRAL_WINDOW] != refs[None], "the window must change the answer"
    return windowed, prompts, refs[MISTRAL_WINDOW]


@pytest.mark.parametrize("mode", list(MISTRAL_MODES))
def test_mistral_sliding_window_matches_transformers(mistral_case, mode):
    from spec_oracle import with_oracle_tokens

    path, prompts, refs = mistral_case
    llm = LLM(path, dtype="float32", **MISTRAL_MODES[mode])
    assert llm.engine.arch.sliding_window == MISTRAL_WINDOW
    if mode == "spec":
        with_oracle_tokens(llm, prompts, refs, error=0.3)
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == refs
    if mode == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    if mode == "spec":
        stats = llm.engine.stats().scheduler.spec
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks

"""Prefix caching changes what is computed, never what is generated: greedy tokens with
caching on equal Hugging Face transformers' (and caching off), across shared prefixes of
several lengths, fully cached prompts, same-step sharing, chunked prefill on and off,
eviction and preemption, n > 1 and multi-turn reuse of generated tokens."""
import random

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.request import EngineRequest
from tiny_models import TINY_VOCAB, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 8
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def case(request, tmp_path_factory):
    path = make_model(str(tmp_path_factory.mktemp(request.param)), request.param, seed=3)
    rng = random.Random(11)
    prefix = [rng.randrange(3, TINY_VOCAB) for _ in range(45)]
    prompts = [
        prefix[:16] + [5, 6, 7],          # shares 2 full blocks (aligned prefix of 16)
        prefix[:21] + [9] * 4,            # shares 2 blocks and 5 tokens of a third
        prefix[:32],                      # a prompt that is a block-aligned prefix of others
        prefix + [11, 12],                # the longest
        prefix[:32],                      # the same prompt again: fully cached
        prefix[:21],                      # contained in the longest, not aligned
        prefix[:23] + [prefix[23] % 300 + 3, 4, 4],  # diverges at a block's last token
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    refs = {tuple(p): hf_greedy(hf, p) for p in prompts}
    return path, prompts, refs, hf


def hf_greedy(model, prompt, max_tokens=MAX_TOKENS):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy(max_tokens=MAX_TOKENS, n=1):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, n=n)


MODES = {
    "default": dict(),
    "budget5": dict(max_num_batched_tokens=5),
    "no-chunked": dict(enable_chunked_prefill=False, max_num_batched_tokens=16),
    # 10 blocks x 8 tokens: the requests evict each other's prefixes and get preempted.
    "tiny-pool": dict(num_kv_blocks=10, max_num_batched_tokens=24),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
def test_greedy_with_prefix_hits_matches_transformers(case, mode, together):
    path, prompts, refs, _ = case
    llm = LLM(path, dtype="float32", block_size=BLOCK, **MODES[mode])
    if together:
        outs = llm.generate(prompts, greedy())
    else:
        outs = [llm.generate(p, greedy())[0] for p in prompts]
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == refs[tuple(prompt)]
        assert out.num_cached_tokens % BLOCK == 0
        assert out.num_cached_tokens <= len(prompt) - 1
    engine = llm.engine
    assert engine.prefix_cache_hits > 0
    if not together and mode != "tiny-pool":
        # Sequential runs on a roomy pool hit every full block computed before.
        assert [o.num_cached_tokens for o in outs] == [0, 16, 16, 32, 24, 16, 16]
    if mode == "tiny-pool":
        assert engine.kv.pool.num_evictions > 0
    engine.check_invariants()
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


def test_caching_off_computes_everything(case):
    path, prompts, refs, _ = case
    llm = LLM(path, dtype="float32", block_size=BLOCK, enable_prefix_caching=False)
    outs = [llm.generate(p, greedy())[0] for p in prompts]
    assert [o.token_ids for o in outs] == [refs[tuple(p)] for p in prompts]
    assert all(o.num_cached_tokens == 0 for o in outs)
    assert llm.engine.prefix_cache_queries == 0 and llm.engine.kv.pool.num_cached_blocks == 0


def test_preemption_with_caching_matches(case):
    path, prompts, refs, _ = case
    llm = LLM(path, dtype="float32", block_size=BLOCK, num_kv_blocks=9,
              max_num_batched_tokens=64)
    outs = llm.generate(prompts[:4], greedy(24))
    assert llm.engine.scheduler.num_preemptions > 0
    hf = case[3]
    for prompt, out in zip(prompts[:4], outs):
        assert out.token_ids == hf_greedy(hf, prompt, 24)
    llm.engine.check_invariants()


def test_n_siblings_share_through_the_cache(case):
    path, prompts, refs, _ = case
    llm = LLM(path, dtype="float32", block_size=BLOCK)
    out = llm.generate(prompts[3], greedy(n=3))[0]
    assert [c.token_ids for c in out.outputs] == [refs[tuple(prompts[3])]] * 3
    # Siblings 1 and 2 start on the 5 full prompt blocks sibling 0 computed.
    assert llm.engine.prefix_cache_hits == 2 * 40
    params = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=MAX_TOKENS)
    sampled_on = llm.generate(prompts[3], params)[0]
    off = LLM(path, dtype="float32", block_size=BLOCK, enable_prefix_caching=False)
    sampled_off = off.generate(prompts[3], params)[0]
    assert [c.token_ids for c in sampled_on.outputs] == [c.token_ids for c in sampled_off.outputs]


def test_next_turn_reuses_generated_tokens(case):
    path, prompts, _, hf = case
    llm = LLM(path, dtype="float32", block_size=BLOCK)
    first = llm.generate(prompts[0], greedy(20))[0]
    # The next turn: the conversation so far plus a new message. Everything but the last
    # sampled token (whose K/V was never computed) is in the cache.
    history = prompts[0] + first.token_ids
    turn2 = history + [7, 8, 9]
    second = llm.generate(turn2, greedy())[0]
    assert second.num_cached_tokens == (len(history) - 1) // BLOCK * BLOCK
    assert second.num_cached_tokens > len(prompts[0])      # output blocks were reused
    assert second.token_ids == hf_greedy(hf, turn2)


def test_salt_isolation_and_reset(case):
    path, prompts, refs, _ = case
    llm = LLM(path, dtype="float32", block_size=BLOCK)
    engine = llm.engine

    def run(rid, salt=None):
        engine.add_request(EngineRequest(rid, prompts[3], greedy(), cache_salt=salt))
        while True:
            for out in engine.step():
                if out.finished:
                    return out

    assert run("a", "tenant-a").num_cached_tokens == 0
    assert run("b", "tenant-b").num_cached_tokens == 0
    assert run("c").num_cached_tokens == 0
    again = run("d", "tenant-a")
    assert again.num_cached_tokens == 40 and again.token_ids == refs[tuple(prompts[3])]
    assert llm.reset_prefix_cache() > 0
    assert run("e", "tenant-a").num_cached_tokens == 0
    with pytest.raises(ValueError, match="cache_salt"):
        engine.add_request(EngineRequest("f", prompts[3], greedy(), cache_salt=""))

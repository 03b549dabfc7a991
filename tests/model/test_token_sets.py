"""vLLM's ``allowed_token_ids`` and ``bad_words`` through the whole engine on a tiny model:
only allowed tokens are sampled, greedy or not; a bad word's tokens never appear, and the
answer is the unconstrained one up to where the word would have been written; the same with
async scheduling (the last token in flight) and speculative decoding (drafts before the
position)."""
from __future__ import annotations

import random

import pytest

from pagoda import LLM, SamplingParams
from tiny_models import TINY_VOCAB, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = {"default": {}, "async": dict(async_scheduling=True),
         "spec": dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                          "prompt_lookup_min": 1, "adaptive": False})}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_token_sets")), "llama", seed=3)


@pytest.fixture(scope="module", params=list(MODES))
def llm(request, tiny):
    return LLM(tiny, dtype="float32", **MODES[request.param])


def _prompts(k: int) -> list[list[int]]:
    rng = random.Random(5)
    base = [rng.randrange(3, TINY_VOCAB) for _ in range(6)]
    return [base * 3 + [rng.randrange(3, TINY_VOCAB)] for _ in range(k)]  # repeats: drafts


def _contains(tokens: list[int], seq: list[int]) -> bool:
    return any(tokens[i:i + len(seq)] == seq for i in range(len(tokens) - len(seq) + 1))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_only_allowed_tokens_are_sampled(llm, temperature):
    allowed = list(range(40, 60)) + [200]
    outs = llm.generate(_prompts(3), SamplingParams(
        temperature=temperature, seed=1, max_tokens=20, ignore_eos=True,
        allowed_token_ids=allowed))
    for out in outs:
        assert len(out.outputs[0].token_ids) == 20
        assert set(out.outputs[0].token_ids) <= set(allowed), out.outputs[0].token_ids


def test_a_bad_word_is_never_written_and_nothing_else_changes(llm):
    prompts = _prompts(3)
    plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24,
                                                 ignore_eos=True))
    for prompt, want in zip(prompts, plain):
        tokens = want.outputs[0].token_ids
        banned = tokens[6:8]  # two tokens the answer writes
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                bad_words_token_ids=[banned])
        got = llm.generate([prompt], params)[0].outputs[0].token_ids
        assert not _contains(got, banned), (got, banned)
        first = next(i for i in range(len(tokens) - 1) if tokens[i:i + 2] == banned)
        assert got[:first + 1] == tokens[:first + 1]  # the same answer up to the word
        assert got[first + 1] != banned[1]
    spec = llm.engine.stats().scheduler.spec
    assert spec is None or spec.num_draft_tokens > 0  # the spec mode verified drafts here


def test_bad_words_are_tokenized_as_written_and_after_a_space(tiny):
    llm = LLM(tiny, dtype="float32")
    params = SamplingParams(bad_words=["fox", " brown"], max_tokens=2)
    engine_params = llm.engine.intake._with_bad_word_ids(params)
    tok = llm.engine.tokenizer
    for text in ("fox", " fox", " brown"):
        assert tok.encode(text, add_special_tokens=False) in engine_params.bad_words_token_ids
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[""])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate([[5, 6]], SamplingParams(allowed_token_ids=[10**9]))
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])

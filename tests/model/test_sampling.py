"""Sampling through the whole engine on a tiny random model, and the sampler on crafted logits:
seeds, top-k / top-p / min-p, penalties, min_tokens, stops, n > 1 and logprobs."""
import json
import math
import random
import shutil

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.request import EngineRequest
from pagoda.worker.sampler import (
    SamplingRow,
    _apply_penalties,
    _filtered_probs,
    sample_tokens,
    token_logprobs,
)
from tiny_models import TINY_VOCAB, make_model


def sample(logits, rows):
    """The runner's two halves in one call: tokens, then their logprobs."""
    tokens, raw = sample_tokens(logits, rows)
    ids = tokens.tolist()
    return ids, token_logprobs(raw, ids, rows)


EOS = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_sampling")), "llama", seed=0)


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, dtype="float32")


@pytest.fixture(scope="module")
def hf(tiny):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


def rand_prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(n)]


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def assert_clean(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    engine.check_invariants()
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


def hf_logprobs(hf, token_ids):
    """(len, V) log-probabilities of the next token at every position, float32."""
    with torch.no_grad():
        logits = hf(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


# ------------------------------------------------------------------------------- seeds
TARGET = rand_prompt(12, 100)
TARGET_PARAMS = SamplingParams(temperature=0.8, seed=123, max_tokens=20, ignore_eos=True)
OTHERS = [rand_prompt(n, 200 + n) for n in (5, 17, 9, 23, 3, 14)]
OTHER_PARAMS = [
    SamplingParams(temperature=1.0, seed=1, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=2, top_p=0.9, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=1.2, top_k=20, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=123, n=2, max_tokens=15, ignore_eos=True),  # same seed
    SamplingParams(temperature=0.9, min_p=0.05, max_tokens=20, ignore_eos=True),
]


def run_manually(engine, requests):
    """add_request everything, step to the end; returns outputs and max preemptions seen."""
    done, preemptions = {}, {rid: 0 for rid, _, _ in requests}
    for rid, prompt, params in requests:
        engine.add_request(EngineRequest(rid, prompt, params))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        for req in engine.scheduler.requests.values():
            rid = req.request_id.split(":")[0]
            preemptions[rid] = max(preemptions[rid], req.num_preemptions)
        engine.check_invariants()
    return done, preemptions


def test_seeded_sampling_independent_of_batch_and_preemption(tiny, llm):
    alone = llm.generate(TARGET, TARGET_PARAMS)[0].token_ids
    assert len(alone) == 20
    assert llm.generate(TARGET, TARGET_PARAMS)[0].token_ids == alone  # rerun

    prompts = OTHERS[:3] + [TARGET] + OTHERS[3:]
    params = OTHER_PARAMS[:3] + [TARGET_PARAMS] + OTHER_PARAMS[3:]
    batched = llm.generate(prompts, params)
    assert batched[3].token_ids == alone
    n2_alone = [c.token_ids for c in llm.generate(OTHERS[4], OTHER_PARAMS[4])[0].outputs]
    assert [c.token_ids for c in batched[5].outputs] == n2_alone
    assert_clean(llm)

    # Tiny step budget and a KV cache too small for everyone: chunked prefill + preemption.
    small = LLM(tiny, dtype="float32", max_num_batched_tokens=5, num_kv_blocks=14, block_size=4)
    reqs = [(f"o{i}", p, sp) for i, (p, sp) in enumerate(zip(OTHERS, OTHER_PARAMS))]
    reqs.append(("target", TARGET, TARGET_PARAMS))  # newest: the first to be preempted
    done, preemptions = run_manually(small.engine, reqs)
    assert preemptions["target"] > 0
    assert preemptions["o4"] > 0
    assert done["target"].token_ids == alone
    assert [c.token_ids for c in done["o4"].outputs] == n2_alone
    assert_clean(small)


def test_different_seeds_give_different_outputs(llm):
    params = [SamplingParams(temperature=1.5, seed=s, max_tokens=30, ignore_eos=True)
              for s in range(5)]
    outs = [o.token_ids for o in llm.generate([TARGET] * 5, params)]
    assert len({tuple(o) for o in outs}) == 5
    # Unseeded requests differ from each other too.
    free = llm.generate([TARGET] * 2, SamplingParams(temperature=1.5, max_tokens=30,
                                                     ignore_eos=True))
    assert free[0].token_ids != free[1].token_ids


# -------------------------------------------------------------------- filters == greedy
def test_degenerate_filters_equal_greedy(llm):
    prompts = [rand_prompt(n, 300 + n) for n in (4, 11, 19)]
    ref = [o.token_ids for o in llm.generate(prompts, greedy(20))]
    variants = [
        SamplingParams(temperature=1.0, top_k=1, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=2.0, top_k=1, seed=3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=0.999, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=1.0, seed=9, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1e-7, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, seed=5, top_k=3, top_p=0.5, max_tokens=20,
                       ignore_eos=True),  # greedy ignores the filters and the seed
    ]
    outs = llm.generate([p for _ in variants for p in prompts],
                        [v for v in variants for _ in prompts])
    for i, out in enumerate(outs):
        assert out.token_ids == ref[i % len(prompts)], variants[i // len(prompts)]
    assert_clean(llm)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_samples_lie_in_top_k(llm, k):
    params = SamplingParams(temperature=3.0, top_k=k, logprobs=k, seed=k, max_tokens=40,
                            ignore_eos=True)
    out = llm.generate(TARGET, params)[0].outputs[0]
    assert len(out.logprobs) == 40
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok
        assert lp.rank <= k
        assert tok in [t for t, _ in lp.top]
    if k > 1:
        assert len({lp.rank for lp in out.logprobs}) > 1  # it did not just pick the argmax
    # Without top-k, the same hot temperature does leave the top k.
    free = SamplingParams(temperature=3.0, logprobs=0, seed=k, max_tokens=40, ignore_eos=True)
    ranks = [lp.rank for lp in llm.generate(TARGET, free)[0].outputs[0].logprobs]
    assert max(ranks) > k


# ------------------------------------------------------------------- sampler statistics
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
N_ROWS = 20000


def rows_for(params, n=N_ROWS, token_ids=(7,), num_prompt=1, stop_ids=()):
    return [SamplingRow(params, list(token_ids), num_prompt, list(stop_ids)) for _ in range(n)]


def frequencies(params, probs=PROBS, n=N_ROWS):
    torch.manual_seed(1234)
    logits = probs.log().expand(n, -1).contiguous()
    tokens, _ = sample(logits, rows_for(params, n))
    return torch.bincount(torch.tensor(tokens), minlength=len(probs)).double() / n


def assert_follows(freq, expected, n=N_ROWS, z=4.5):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    expected = expected / expected.sum()
    se = (expected * (1 - expected) / n).sqrt()
    for f, e, s in zip(freq.tolist(), expected.tolist(), se.tolist()):
        if e == 0.0:
            assert f == 0.0, (freq, expected)
        else:
            assert abs(f - e) <= z * s, (freq, expected)


def test_sampling_follows_distribution():
    assert_follows(frequencies(SamplingParams(temperature=1.0)), PROBS)


def test_temperature_sharpens_and_flattens():
    assert_follows(frequencies(SamplingParams(temperature=0.5)), PROBS ** 2)
    assert_follows(frequencies(SamplingParams(temperature=2.0)), PROBS ** 0.5)


def test_top_p_truncates_nucleus():
    # Mass before the third token is 0.8 >= 0.75: only the first two remain, renormalized.
    assert_follows(frequencies(SamplingParams(temperature=1.0, top_p=0.75)), [0.5, 0.3, 0, 0])
    # 0.85: the third is needed to reach it (0.8 < 0.85); the fourth is not.
    assert_follows(frequencies(SamplingParams(temperature=1.0, top_p=0.85)),
                   [0.5, 0.3, 0.15, 0])
    assert_follows(frequencies(SamplingParams(temperature=1.0, top_p=0.4)), [1, 0, 0, 0])


def test_top_k_truncates():
    assert_follows(frequencies(SamplingParams(temperature=1.0, top_k=2)), [0.5, 0.3, 0, 0])
    assert_follows(frequencies(SamplingParams(temperature=1.0, top_k=3)), [0.5, 0.3, 0.15, 0])


def test_min_p_truncates():
    # Keep tokens with p >= 0.25 * 0.5 = 0.125.
    assert_follows(frequencies(SamplingParams(temperature=1.0, min_p=0.25)), [0.5, 0.3, 0.15, 0])
    assert_follows(frequencies(SamplingParams(temperature=1.0, min_p=0.5)), [0.5, 0.3, 0, 0])


def test_seeded_rows_follow_distribution():
    n = 4000
    logits = PROBS.log().expand(n, -1).contiguous()
    rows = [SamplingRow(SamplingParams(temperature=1.0, seed=s), [7], 1, []) for s in range(n)]
    tokens, _ = sample(logits, rows)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).double() / n
    assert_follows(freq, PROBS, n=n)
    # Same seed, same output index: same token; the sibling index changes the stream.
    again, _ = sample(logits[:50], rows[:50])
    assert again == tokens[:50]
    sib = [SamplingRow(r.params, [7], 1, [], seed_offset=1) for r in rows[:200]]
    assert sample(logits[:200], sib)[0] != tokens[:200]


def test_mixed_batch_rows_are_independent():
    """Each row is filtered by its own params, whatever its neighbours ask for."""
    torch.manual_seed(0)
    n = 6000
    kinds = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=1),
             SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.75)]
    rows = [SamplingRow(kinds[i % 4], [7], 1, []) for i in range(n)]
    logits = PROBS.log().expand(n, -1).contiguous()
    tokens = torch.tensor(sample(logits, rows)[0])
    m = n // 4
    assert_follows(torch.bincount(tokens[0::4], minlength=4).double() / m, PROBS, n=m)
    assert tokens[1::4].eq(0).all() and tokens[2::4].eq(0).all()
    assert_follows(torch.bincount(tokens[3::4], minlength=4).double() / m, [0.5, 0.3, 0, 0], n=m)


def test_top_p_one_keeps_the_tail_in_a_mixed_batch():
    """A row with top_p=1 next to a row with top_p<1: float rounding of the cumulative mass
    (1 - 2e-9 == 1.0 in fp32) must not drop its tail."""
    logits = torch.tensor([[0.0, -20.0, -20.0], [0.0, -20.0, -20.0]])
    probs = _filtered_probs(logits, [SamplingParams(top_p=1.0), SamplingParams(top_p=0.5)])
    assert (probs[0] > 0).all()
    assert probs[1].tolist() == [1.0, 0.0, 0.0]


def test_top_k_one_is_argmax_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]]).expand(500, -1).contiguous()
    tokens, _ = sample(logits, rows_for(SamplingParams(temperature=1.0, top_k=1), 500))
    assert set(tokens) == {1}


def test_sample_does_not_modify_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    copy = logits.clone()
    p = SamplingParams(temperature=0.0, min_tokens=3, repetition_penalty=1.5)
    sample(logits, [SamplingRow(p, [1, 3], 1, [1])])
    p = SamplingParams(temperature=0.0, min_tokens=3)
    sample(logits, [SamplingRow(p, [2], 1, [1])])
    assert torch.equal(logits, copy)


# ---------------------------------------------------------------------------- penalties
def pick(logits, params, token_ids, num_prompt, stop_ids=()):
    logits = torch.tensor([logits], dtype=torch.float32)
    return sample(logits, [SamplingRow(params, list(token_ids), num_prompt, list(stop_ids))])[0][0]


def test_repetition_penalty_demotes_seen_token():
    logits = [2.0, 1.5, -1.0, 0.5]
    assert pick(logits, greedy(5), [3, 0], 1) == 0
    assert pick(logits, greedy(5, repetition_penalty=1.2), [3, 0], 1) == 0   # 2/1.2 > 1.5
    assert pick(logits, greedy(5, repetition_penalty=1.5), [3, 0], 1) == 1   # 2/1.5 < 1.5
    # Prompt tokens count too (the token is in the prompt only).
    assert pick(logits, greedy(5, repetition_penalty=1.5), [0, 3], 1) == 1
    # Negative logits are multiplied (made more negative), not divided.
    neg = [-1.0, -1.5, -3.0, -4.0]
    assert pick(neg, greedy(5, repetition_penalty=2.0), [0], 1) == 1       # -2 < -1.5
    assert pick(neg, greedy(5, repetition_penalty=1.4), [0], 1) == 0       # -1.4 > -1.5
    # A penalty < 1 rewards repeats.
    assert pick(logits, greedy(5, repetition_penalty=0.5), [3, 2], 1) == 0
    assert pick([1.0, 1.5, 0.9, 0.0], greedy(5, repetition_penalty=0.5), [2], 1) == 2


def test_penalty_values_exact():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    # prompt [3, 1], outputs [0, 0, 2, 0]
    ids, num_prompt = [3, 1, 0, 0, 2, 0], 2
    p = greedy(5, presence_penalty=0.5, frequency_penalty=0.25)
    out = _apply_penalties(logits, [SamplingRow(p, ids, num_prompt, [])])
    # presence/frequency look at outputs only: token 0 three times, token 2 once.
    expected = torch.tensor([[2.0 - 0.5 - 0.75, -1.0, 0.5 - 0.5 - 0.25, 3.0, 1.0]])
    torch.testing.assert_close(out, expected)
    p = greedy(5, repetition_penalty=2.0)
    out = _apply_penalties(logits, [SamplingRow(p, ids, num_prompt, [])])
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.25, 1.5, 1.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]]))  # not in place
    # Negative presence/frequency penalties reward repeats.
    p = greedy(5, presence_penalty=-1.0, frequency_penalty=-0.5)
    out = _apply_penalties(logits, [SamplingRow(p, ids, num_prompt, [])])
    torch.testing.assert_close(out, torch.tensor([[4.5, -1.0, 2.0, 3.0, 1.0]]))


@pytest.mark.parametrize("pending", [9, 7, 2], ids=["new-token", "repeated-output",
                                                    "prompt-token"])
def test_penalties_count_a_token_still_in_flight(pending):
    """Async scheduling: the last output token may exist only on the device (the step that
    sampled it is in flight). Penalties must come out as if it were in the history."""
    p = SamplingParams(temperature=0.0, repetition_penalty=1.7, presence_penalty=0.4,
                       frequency_penalty=0.3)
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(pending))
    history = [1, 2, 3, 7, 7]                   # prompt 1 2 3, outputs 7 7
    known = SamplingRow(p, history + [pending], 3, [])
    in_flight = SamplingRow(p, list(history), 3, [], pending_token=torch.tensor([pending]))
    assert in_flight.num_output_tokens == known.num_output_tokens == 3
    assert torch.equal(_apply_penalties(logits, [in_flight]), _apply_penalties(logits, [known]))
    assert not torch.equal(_apply_penalties(logits, [SamplingRow(p, list(history), 3, [])]),
                           _apply_penalties(logits, [known]))


def test_presence_and_frequency_change_greedy_choice():
    logits = [1.0, 0.6, 0.2]
    outs = [0]  # token 0 generated once, prompt [2]
    assert pick(logits, greedy(5, presence_penalty=0.3), [2] + outs, 1) == 0   # 0.7 > 0.6
    assert pick(logits, greedy(5, presence_penalty=0.5), [2] + outs, 1) == 1   # 0.5 < 0.6
    three = [0, 0, 0]
    assert pick(logits, greedy(5, frequency_penalty=0.1), [2] + three, 1) == 0  # 0.7
    assert pick(logits, greedy(5, frequency_penalty=0.2), [2] + three, 1) == 1  # 0.4
    # Prompt occurrences do not count for presence / frequency.
    assert pick(logits, greedy(5, presence_penalty=2.0), [0, 0, 5], 2) == 0


def test_penalized_sampling_rows_mixed_with_plain():
    logits = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    rows = [SamplingRow(greedy(5, repetition_penalty=2.0), [0], 1, []),
            SamplingRow(greedy(5), [0], 1, [])]
    assert sample(logits, rows)[0] == [1, 0]


def test_repetition_penalty_reduces_repeats_in_generation(llm):
    prompts = [rand_prompt(n, 400 + n) for n in (3, 8, 15)]
    plain = llm.generate(prompts, greedy(40))
    pen = llm.generate(prompts, greedy(40, repetition_penalty=1.5))
    plain_distinct = sum(len(set(o.token_ids)) for o in plain)
    pen_distinct = sum(len(set(o.token_ids)) for o in pen)
    assert pen_distinct > plain_distinct
    freq = llm.generate(prompts, greedy(40, frequency_penalty=2.0))
    assert sum(len(set(o.token_ids)) for o in freq) > plain_distinct


# --------------------------------------------------------------------------- min_tokens
def test_min_tokens_masks_eos_and_stop_ids_direct():
    logits = [0.0, 5.0, 4.0, 3.0, 1.0]  # EOS (1) best, then stop token 2, then 3
    p = greedy(10, min_tokens=3)
    p = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=3)
    for n_out, expected in [(0, 3), (1, 3), (2, 3), (3, 1), (7, 1)]:
        ids = [4] + [0] * n_out
        assert pick(logits, p, ids, 1, stop_ids=[1, 2]) == expected
    # Sampling rows are masked too: EOS and the stop token are never drawn.
    probs = torch.tensor([0.01, 0.9, 0.08, 0.01])
    rows = [SamplingRow(SamplingParams(temperature=1.0, min_tokens=2), [5], 1, [1, 2])
            for _ in range(2000)]
    tokens, _ = sample(probs.log().expand(2000, -1).contiguous(), rows)
    assert 1 not in tokens and 2 not in tokens
    assert set(tokens) == {0, 3}


# ------------------------------------------------------------------------------ stopping
@pytest.fixture(scope="module")
def greedy_ref(llm):
    """A prompt, its 30-token greedy continuation and the continuation's text."""
    out = llm.generate(TARGET, greedy(30))[0]
    return out.token_ids, out.text


def test_stop_token_ids_and_min_tokens(llm, greedy_ref):
    ids, _ = greedy_ref
    t0 = ids[0]
    out = llm.generate(TARGET, greedy(30, stop_token_ids=[t0]))[0]
    assert out.token_ids == [t0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == t0
    # min_tokens masks it: no stop before min_tokens tokens.
    out = llm.generate(TARGET, greedy(30, stop_token_ids=[t0], min_tokens=6))[0]
    assert len(out.token_ids) >= 6
    assert t0 not in out.token_ids[:6]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == t0 and t0 not in out.token_ids[:-1]
    else:
        assert len(out.token_ids) == 30
    # A stop token later in the greedy run ends it there.
    later = next(t for t in ids[3:] if t not in ids[:3])
    k = ids.index(later)
    out = llm.generate(TARGET, greedy(30, stop_token_ids=[later, 999 % TINY_VOCAB]))[0]
    assert out.token_ids == ids[:k + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == later
    assert_clean(llm)


def clean_substring(text, length=2, min_start=3):
    """A (start, substring) of text without replacement characters, first occurring there."""
    for i in range(min_start, len(text) - length):
        s = text[i:i + length]
        if "\ufffd" not in s and text.find(s) == i:
            return i, s
    # The model, prompt and greedy run are fixed: no such substring means they changed.
    pytest.fail(f"no usable substring of length {length} from {min_start} in {text!r}")


def test_stop_strings(llm, greedy_ref):
    ids, text = greedy_ref
    i, s = clean_substring(text)
    out = llm.generate(TARGET, greedy(30, stop=[s]))[0]
    assert out.text == text[:i]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == s
    assert ids[:len(out.token_ids)] == out.token_ids
    assert len(out.token_ids) < 30
    out = llm.generate(TARGET, greedy(30, stop=[s], include_stop_str_in_output=True))[0]
    assert out.text == text[:i + len(s)]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == s
    # Earliest of several stop strings wins; one that never appears does not matter.
    j, s2 = clean_substring(text, 3, min_start=i + 3)
    out = llm.generate(TARGET, greedy(30, stop=["never-appears", s2, s]))[0]
    assert out.text == text[:i] and out.outputs[0].stop_reason == s
    assert_clean(llm)


def test_max_tokens_gives_length(llm, greedy_ref):
    ids, _ = greedy_ref
    out = llm.generate(TARGET, greedy(7))[0]
    assert out.token_ids == ids[:7] and out.finish_reason == "length"
    assert out.outputs[0].stop_reason is None
    out = llm.generate(TARGET, greedy(1))[0]
    assert out.token_ids == ids[:1] and out.finish_reason == "length"


@pytest.fixture(scope="module")
def eos_models(tiny, llm, greedy_ref, tmp_path_factory):
    """Copies of the tiny model whose config names the first greedy token as EOS: alone, and
    as the second of two EOS ids."""
    t0 = greedy_ref[0][0]
    paths = {}
    for name, eos in (("single", t0), ("double", [EOS, t0])):
        path = str(tmp_path_factory.mktemp(f"eos_{name}"))
        shutil.copytree(tiny, path, dirs_exist_ok=True)
        with open(f"{path}/config.json") as f:
            config = json.load(f)
        config["eos_token_id"] = eos
        with open(f"{path}/config.json", "w") as f:
            json.dump(config, f)
        paths[name] = path
    return t0, paths


def test_eos_stops_and_ignore_eos_continues(eos_models, greedy_ref):
    t0, paths = eos_models
    llm = LLM(paths["single"], dtype="float32")
    assert llm.engine.arch.eos_token_ids[0] == t0
    out = llm.generate(TARGET, SamplingParams(temperature=0.0, max_tokens=30))[0]
    assert out.token_ids == [t0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason is None
    out = llm.generate(TARGET, greedy(30))[0]  # ignore_eos
    assert out.token_ids == greedy_ref[0] and out.finish_reason == "length"
    # min_tokens masks EOS: the run goes on past where it would have stopped.
    out = llm.generate(TARGET, SamplingParams(temperature=0.0, max_tokens=30, min_tokens=5))[0]
    assert len(out.token_ids) >= 5 and t0 not in out.token_ids[:5]
    assert_clean(llm)


def test_any_of_several_eos_ids_stops(eos_models):
    t0, paths = eos_models
    llm = LLM(paths["double"], dtype="float32")
    assert t0 in llm.engine.arch.eos_token_ids
    out = llm.generate(TARGET, SamplingParams(temperature=0.0, max_tokens=30))[0]
    assert out.token_ids == [t0] and out.finish_reason == "stop"


def test_stop_string_on_last_token_reports_stop(llm, greedy_ref, tiny):
    ids, _ = greedy_ref
    tok = llm.tokenizer
    for n in range(4, 30):
        text_n = tok.decode(ids[:n], skip_special_tokens=True)
        s = text_n[-2:]
        if ("\ufffd" not in s and text_n.find(s) == len(text_n) - 2
                and s not in tok.decode(ids[:n - 1], skip_special_tokens=True)):
            break
    else:
        pytest.skip("no suitable stop string")
    out = llm.generate(TARGET, greedy(n, stop=[s]))[0]
    assert out.text == text_n[:-2]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == s


def test_min_tokens_holds_back_stop_strings(llm, greedy_ref):
    """A stop string cannot end the first min_tokens outputs: a match must end after their
    text; the first such match ends the output, as without min_tokens."""
    ids, text = greedy_ref
    min_tokens = 25
    i, s = clean_substring(text, min_start=1)
    plain = llm.generate(TARGET, greedy(30, stop=[s]))[0]
    assert plain.text == text[:i] and len(plain.token_ids) < min_tokens   # it would stop early
    out = llm.generate(TARGET, greedy(30, stop=[s], min_tokens=min_tokens))[0]
    held = len(llm.tokenizer.decode(ids[:min_tokens]).rstrip("\ufffd"))
    later = text.find(s, max(0, held - len(s) + 1))       # the first match ending past it
    assert len(out.token_ids) >= min_tokens and out.token_ids == ids[:len(out.token_ids)]
    if later < 0:
        assert out.text == text and out.finish_reason == "length"
    else:
        assert out.text == text[:later]
        assert out.finish_reason == "stop" and out.outputs[0].stop_reason == s
    assert_clean(llm)


def test_stop_token_text_not_in_output(llm, greedy_ref):
    ids, _ = greedy_ref
    k = next(k for k in range(1, 30) if "\ufffd" not in llm.tokenizer.decode(ids[k:k + 1]))
    out = llm.generate(TARGET, greedy(30, stop_token_ids=[ids[k]]))[0]
    assert out.token_ids[-1] == ids[k]
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1])


# ----------------------------------------------------------------------------------- n > 1
def test_n_sampled_completions(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    out = llm.generate(TARGET, params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert out.token_ids == out.outputs[0].token_ids
    again = llm.generate(TARGET, params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert_clean(llm)


def test_n_greedy_completions_identical(llm, greedy_ref):
    out = llm.generate(TARGET, SamplingParams(n=3, temperature=0.0, max_tokens=30,
                                              ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == greedy_ref[0] for c in out.outputs)
    assert all(c.text == greedy_ref[1] for c in out.outputs)
    assert_clean(llm)


def test_n_siblings_share_prompt_blocks(tiny):
    small = LLM(tiny, dtype="float32", block_size=4)
    engine = small.engine
    prompt = rand_prompt(40, 500)
    ref = small.generate(prompt, greedy(10))[0].token_ids
    params = SamplingParams(n=3, temperature=0.0, max_tokens=10, ignore_eos=True)
    engine.add_request(EngineRequest("g", prompt, params))
    max_ref, result = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result = out
        max_ref = max(max_ref, max(engine.kv.pool.ref_counts))
        engine.check_invariants()
    assert max_ref == 3   # all three children held the full prompt blocks at once
    assert [c.token_ids for c in result.outputs] == [ref] * 3
    assert_clean(small)
    # Sampled siblings share too, and stay distinct.
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    engine.add_request(EngineRequest("s", prompt, params))
    max_ref = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result = out
        max_ref = max(max_ref, max(engine.kv.pool.ref_counts))
    assert max_ref >= 2
    assert len({tuple(c.token_ids) for c in result.outputs}) == 3
    assert_clean(small)


# ------------------------------------------------------------------------------- logprobs
def test_greedy_logprobs_match_transformers(llm, hf):
    prompt = rand_prompt(9, 600)
    out = llm.generate(prompt, greedy(12, logprobs=3))[0].outputs[0]
    ref = hf_logprobs(hf, prompt + out.token_ids)
    assert len(out.logprobs) == 12
    total = 0.0
    for j, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert lp.token_id == tok
        assert lp.rank == 1 and lp.logprob <= 0
        assert len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.top[0][1] == lp.logprob
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert abs(lp.logprob - row[tok].item()) < 1e-4
        vals, idx = row.topk(3)
        assert [t for t, _ in lp.top] == idx.tolist()
        for (_, v), rv in zip(lp.top, vals.tolist()):
            assert abs(v - rv) < 1e-4
        total += lp.logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_sampled_logprobs_match_transformers(llm, hf):
    prompt = rand_prompt(6, 601)
    params = SamplingParams(temperature=1.3, seed=11, max_tokens=15, ignore_eos=True, logprobs=2)
    out = llm.generate(prompt, params)[0].outputs[0]
    ref = hf_logprobs(hf, prompt + out.token_ids)
    for j, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + j]
        # Raw logprobs: of the model's distribution, before temperature.
        assert lp.token_id == tok and lp.logprob <= 0
        assert abs(lp.logprob - row[tok].item()) < 1e-4
        assert lp.rank == int((row > row[tok]).sum()) + 1
        assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
        if lp.rank <= 2:
            assert lp.top[lp.rank - 1][0] == tok
    assert any(lp.rank > 1 for lp in out.logprobs)
    # logprobs=0: the sampled token only.
    out0 = llm.generate(prompt, params.clone(logprobs=0))[0].outputs[0]
    assert out0.token_ids == out.token_ids
    assert all(lp.top == [] for lp in out0.logprobs)
    assert [lp.logprob for lp in out0.logprobs] == [lp.logprob for lp in out.logprobs]
    none = llm.generate(prompt, params.clone(logprobs=None))[0].outputs[0]
    assert none.logprobs is None and none.cumulative_logprob is None


@pytest.mark.parametrize("engine_kw", [{}, dict(max_num_batched_tokens=5),
                                       dict(max_num_batched_tokens=7, block_size=4)])
def test_prompt_logprobs_match_transformers(tiny, hf, engine_kw):
    prompt = rand_prompt(23, 700)
    llm = LLM(tiny, dtype="float32", **engine_kw)
    outs = llm.generate([prompt, rand_prompt(5, 701)],
                        [greedy(3, prompt_logprobs=2), greedy(3)])
    plp = outs[0].prompt_logprobs
    assert outs[1].prompt_logprobs is None
    ref = hf_logprobs(hf, prompt)
    assert len(plp) == len(prompt)
    assert plp[0] is None
    for i in range(1, len(prompt)):
        lp, row = plp[i], ref[i - 1]
        assert lp.token_id == prompt[i]
        assert abs(lp.logprob - row[prompt[i]].item()) < 1e-4
        assert lp.rank == int((row > row[prompt[i]]).sum()) + 1
        assert [t for t, _ in lp.top] == row.topk(2).indices.tolist()
        for (_, v), rv in zip(lp.top, row.topk(2).values.tolist()):
            assert abs(v - rv) < 1e-4
    assert_clean(llm)


def test_prompt_logprobs_with_n_and_preemption(tiny, hf):
    prompt = rand_prompt(18, 702)
    llm = LLM(tiny, dtype="float32", max_num_batched_tokens=6, block_size=4, num_kv_blocks=16)
    params = [SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=16, ignore_eos=True,
                             prompt_logprobs=1)] + [greedy(20)] * 3
    outs = llm.generate([prompt] + [rand_prompt(15, 710 + i) for i in range(3)], params)
    assert llm.engine.scheduler.num_preemptions > 0
    ref = hf_logprobs(hf, prompt)
    plp = outs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for i in range(1, len(prompt)):
        assert plp[i].token_id == prompt[i]
        assert abs(plp[i].logprob - ref[i - 1, prompt[i]].item()) < 1e-4
    assert len(outs[0].outputs) == 2
    assert_clean(llm)


def test_logprobs_of_penalized_rows_are_raw(llm, hf):
    """Logprobs report the model's distribution, not the penalized one."""
    prompt = rand_prompt(7, 800)
    out = llm.generate(prompt, greedy(10, logprobs=1, repetition_penalty=1.8))[0].outputs[0]
    ref = hf_logprobs(hf, prompt + out.token_ids)
    for j, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(lp.logprob - ref[len(prompt) - 1 + j, tok].item()) < 1e-4
        assert math.isfinite(lp.logprob)


def test_huge_top_k_keeps_every_token_and_the_engine_lives(tmp_path):
    from tiny_models import make_model

    from pagoda import LLM, SamplingParams

    llm = LLM(make_model(str(tmp_path / "m"), "llama"), dtype="float32")
    huge = SamplingParams(temperature=1.0, top_k=2 ** 64, seed=3, max_tokens=5)
    off = SamplingParams(temperature=1.0, top_k=0, seed=3, max_tokens=5)
    a, b = llm.generate([[5, 6, 7]] * 2, [huge, off])
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5
    assert llm.generate([5, 6], SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_logit_bias_bans_and_forces_tokens(llm):
    prompt = rand_prompt(10, 77)
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6,
                                               ignore_eos=True))[0].token_ids
    banned = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                 logit_bias={base[0]: -100.0}))[0].token_ids
    assert banned[0] != base[0]
    forced = llm.generate(prompt, SamplingParams(temperature=0.9, seed=1, max_tokens=6,
                                                 ignore_eos=True, logit_bias={7: 100.0}))[0]
    assert forced.token_ids == [7] * 6
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(prompt, SamplingParams(logit_bias={TINY_VOCAB + 5: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})

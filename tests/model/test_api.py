"""The offline API (LLM.generate / LLM.chat), its outputs and errors, and the CLI."""
import random

import pytest

from pagoda import LLM, SamplingParams
from pagoda.entrypoints import cli
from tiny_models import TINY_VOCAB, make_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_api")), "llama", seed=1)


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, dtype="float32", max_model_len=64)


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def rand_prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(n)]


def assert_clean(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    engine.check_invariants()
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


@pytest.fixture(scope="module")
def refs(llm):
    """Solo greedy outputs for a few prompts, to compare batched runs with."""
    prompts = ["hello", "The quick brown fox", rand_prompt(9, 1), rand_prompt(4, 2)]
    return prompts, [llm.generate(p, greedy(6))[0].token_ids for p in prompts]


# --------------------------------------------------------------------------- prompt forms
def test_prompt_forms(llm, refs):
    prompts, ref = refs
    tok = llm.tokenizer
    out = llm.generate("hello", greedy(6))
    assert len(out) == 1 and out[0].token_ids == ref[0]
    assert out[0].prompt == "hello"
    assert out[0].prompt_token_ids == tok.encode("hello")

    out = llm.generate(prompts[2], greedy(6))  # one prompt of token ids
    assert len(out) == 1 and out[0].token_ids == ref[2]
    assert out[0].prompt is None and out[0].prompt_token_ids == prompts[2]

    out = llm.generate(["hello", "The quick brown fox"], greedy(6))
    assert [o.token_ids for o in out] == ref[:2]
    assert [o.prompt for o in out] == ["hello", "The quick brown fox"]

    out = llm.generate([prompts[2], prompts[3]], greedy(6))
    assert [o.token_ids for o in out] == ref[2:]

    out = llm.generate(tuple(prompts[2]), greedy(6))
    assert out[0].token_ids == ref[2]
    assert llm.generate([], greedy(6)) == []
    assert_clean(llm)


def test_outputs_in_prompt_order(llm, refs):
    prompts, ref = refs
    # The first prompt runs longest and finishes last; results still come in prompt order.
    lengths = [12, 2, 7, 4]
    params = [greedy(m) for m in lengths]
    outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == lengths
    for o, r, m in zip(outs, ref, lengths):
        assert o.token_ids[:min(m, 6)] == r[:min(m, 6)]
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    assert_clean(llm)


def test_per_prompt_params_length_mismatch(llm):
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], [greedy(3)])
    assert_clean(llm)


# ------------------------------------------------------------------------- output fields
def test_request_output_fields(llm):
    tok = llm.tokenizer
    out = llm.generate("The quick brown fox", greedy(8))[0]
    assert isinstance(out.text, str)
    assert len(out.token_ids) == 8 and all(isinstance(t, int) for t in out.token_ids)
    assert out.finished and out.finish_reason == "length"
    assert out.num_prompt_tokens == len(tok.encode("The quick brown fox"))
    assert out.time_to_first_token is not None and out.time_to_first_token > 0
    assert out.time_per_output_token is not None and out.time_per_output_token > 0
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.e2e_latency >= out.time_to_first_token
    c = out.outputs[0]
    assert c.index == 0 and c.text == out.text and c.token_ids == out.token_ids
    decoded = tok.decode(out.token_ids, skip_special_tokens=True)
    assert decoded.startswith(out.text)
    if not decoded.endswith("\ufffd"):
        assert out.text == decoded

    one = llm.generate("hello", greedy(1))[0]
    assert len(one.token_ids) == 1 and one.time_to_first_token > 0
    assert one.time_per_output_token is None


def test_chat_applies_template(llm):
    tok = llm.tokenizer
    msgs = [{"role": "user", "content": "hi there"}]
    out = llm.chat(msgs, greedy(5))
    assert len(out) == 1
    expected_ids = tok.encode("user: hi there\nassistant:", add_special_tokens=False)
    assert out[0].prompt_token_ids == expected_ids
    assert out[0].token_ids == llm.generate(expected_ids, greedy(5))[0].token_ids

    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}],
             msgs]
    outs = llm.chat(convs, greedy(3))
    assert [o.prompt_token_ids for o in outs] == [
        tok.encode("system: be brief\nuser: a\nassistant:", add_special_tokens=False),
        expected_ids]
    assert_clean(llm)


# --------------------------------------------------------------------------------- errors
def check_usable(llm, refs):
    prompts, ref = refs
    assert_clean(llm)
    assert llm.generate(prompts[2], greedy(6))[0].token_ids == ref[2]
    assert_clean(llm)


@pytest.mark.parametrize("prompt,params,words", [
    ("", greedy(3), ["prompt", "empty"]),
    ([], greedy(3), ["prompt", "empty"]),
    ([[]], greedy(3), ["prompt", "empty"]),
    ([5, TINY_VOCAB], greedy(3), ["token", str(TINY_VOCAB)]),
    ([5, -1], greedy(3), ["token"]),
    ([5, 7.0], greedy(3), ["token"]),
    ([3] * 64, greedy(1), ["prompt", "64"]),
    ([3] * 100, SamplingParams(max_tokens=None), ["prompt", "100"]),
    ([3] * 60, greedy(5), ["max_tokens", "64"]),
    ([3] * 10, greedy(55), ["max_tokens", "64"]),
])
def test_bad_input_raises_and_engine_stays_usable(llm, refs, prompt, params, words):
    if prompt == []:
        # An empty list is "no prompts", not an empty prompt.
        assert llm.generate(prompt, params) == []
        check_usable(llm, refs)
        return
    with pytest.raises(ValueError) as info:
        llm.generate(prompt, params)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    check_usable(llm, refs)


def test_bad_prompt_in_batch_aborts_the_others(llm, refs):
    prompts, ref = refs
    with pytest.raises(ValueError, match="token"):
        llm.generate([prompts[2], prompts[3], [1, 2, 10_000]], greedy(4))
    check_usable(llm, refs)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([prompts[2], prompts[3]], [greedy(4), greedy(100)])
    check_usable(llm, refs)


def test_max_tokens_none_runs_to_the_context(llm):
    out = llm.generate([3] * 50, SamplingParams(temperature=0.0, max_tokens=None,
                                                ignore_eos=True))[0]
    assert len(out.token_ids) == 14 and out.finish_reason == "length"
    out = llm.generate([3] * 50, greedy(14))[0]
    assert len(out.token_ids) == 14
    assert_clean(llm)


def test_unknown_engine_kwarg(tiny):
    with pytest.raises(TypeError, match="not_an_option"):
        LLM(tiny, dtype="float32", not_an_option=1)


def test_bad_engine_values(tiny):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny, dtype="float32", max_model_len=100_000)
    with pytest.raises(ValueError, match="block_size"):
        LLM(tiny, dtype="float32", block_size=0)


# ------------------------------------------------------------------------------------ CLI
def test_cli_generate(tiny, capsys):
    rc = cli.main(["generate", "--model", tiny, "--prompt", "hello", "--max-tokens", "5",
                   "--dtype", "float32"])
    assert rc == 0
    captured = capsys.readouterr()
    expected = LLM(tiny, dtype="float32").generate(
        "hello", SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert captured.out == expected.text + "\n"
    assert f"{len(expected.token_ids)} tokens" in captured.err
    assert "finish_reason=" in captured.err


def test_cli_chat_and_errors(tiny, capsys):
    rc = cli.main(["generate", "--model", tiny, "--prompt", "hi", "--chat", "--max-tokens", "3",
                   "--dtype", "float32", "--temperature", "0.7", "--sample-seed", "4"])
    assert rc == 0
    captured = capsys.readouterr()
    # The CLI's answer is the chat answer of the API with the same sampling.
    expected = LLM(tiny, dtype="float32").chat(
        [{"role": "user", "content": "hi"}],
        SamplingParams(temperature=0.7, seed=4, max_tokens=3))[0]
    assert captured.out == expected.text + "\n"
    assert f"{len(expected.token_ids)} tokens" in captured.err
    assert f"finish_reason={expected.finish_reason}" in captured.err
    rc = cli.main(["generate", "--model", tiny + "-missing", "--prompt", "hi", "--dtype",
                   "float32"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    rc = cli.main(["generate", "--model", tiny, "--prompt", "hi", "--dtype", "float32",
                   "--max-tokens", "0"])
    assert rc == 2
    assert "max_tokens" in capsys.readouterr().err


def test_request_too_big_for_kv_cache_is_ignored(tiny):
    small = LLM(tiny, dtype="float32", num_kv_blocks=2, block_size=4)
    outs = small.generate([[5] * 20, [6] * 3], greedy(3))
    assert outs[0].finish_reason == "length" and outs[0].token_ids == []
    assert "KV" in outs[0].outputs[0].finish_detail
    assert outs[0].time_to_first_token is None
    assert len(outs[1].token_ids) == 3
    assert_clean(small)


def test_cli_request_that_cannot_fit(tiny, capsys):
    rc = cli.main(["generate", "--model", tiny, "--prompt", "hello world foo bar",
                   "--max-tokens", "5", "--dtype", "float32", "--num-kv-blocks", "1",
                   "--block-size", "2"])
    assert rc == 0
    assert "finish_reason=length" in capsys.readouterr().err


def test_bool_token_id_rejected(llm):
    with pytest.raises(ValueError, match="token"):
        llm.generate([True, 5, 6], greedy(2))

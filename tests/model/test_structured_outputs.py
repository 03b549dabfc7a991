"""Structured outputs in the engine (engine/structured.py): every constrained output parses
and validates, in greedy and sampled decoding, with n > 1; constrained greedy is
token-identical under chunked prefill, preemption, prefix-cache hits and async scheduling;
a grammar that allows everything changes nothing; bad grammars are a ValueError naming the
field, and nothing leaks."""

import json
import random
import re

import jsonschema
import pytest

from pagoda import LLM, SamplingParams
from pagoda.sampling import StructuredOutputsParams
from tiny_models import make_model

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["id", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "tags", "owner"],
    "additionalProperties": False,
}
SPECIAL = {0, 1, 2}  # <s>, </s>, <pad> of the tiny tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_structured")), "llama", seed=5)


TOKENIZER = None


@pytest.fixture(scope="module")
def llm(tiny):
    global TOKENIZER
    llm = LLM(tiny, dtype="float32")
    TOKENIZER = llm.tokenizer
    return llm


WORDS = "the cat sat on a mat while quick brown foxes jump over lazy dogs all day".split()


def prompts(k, n=12, seed=0):
    """Token ids of ASCII text: every prompt ends on a whole character (random ids may end
    mid-character, and the detokenizer would join those bytes to the output's text)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(n + i)) for i in range(k)]
    return [TOKENIZER.encode(t) for t in texts]


def json_params(**kw):
    kw.setdefault("max_tokens", 200)
    return SamplingParams(structured_outputs=StructuredOutputsParams(json=json.dumps(SCHEMA)),
                          **kw)


def assert_clean(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    engine.check_invariants()
    assert engine.kv.pool.num_free_blocks == engine.num_blocks
    assert not engine.structured, "a matcher outlived its request"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_json_output_validates(llm, temperature):
    params = json_params(temperature=temperature, seed=3, n=2)
    outs = llm.generate(prompts(6), params)
    for out in outs:
        for comp in out.outputs:
            assert comp.finish_reason == "stop", comp.text
            jsonschema.validate(json.loads(comp.text), SCHEMA)
    assert_clean(llm)


def test_json_object_regex_choice_and_lark(llm):
    cases = [
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,5}"),
         lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t) is not None),
        (StructuredOutputsParams(choice=("yes", "no", "a#b-c (d)")),
         lambda t: t in ("yes", "no", "a#b-c (d)")),
        (StructuredOutputsParams(grammar='start: "n=" NUM ";"\nNUM: /[1-9][0-9]{0,3}/'),
         lambda t: re.fullmatch(r"n=[1-9][0-9]{0,3};", t) is not None),
    ]
    for spec, ok in cases:
        stopped = 0
        for temperature in (0.0, 1.2):
            params = SamplingParams(temperature=temperature, seed=7, max_tokens=100,
                                    structured_outputs=spec)
            for out in llm.generate(prompts(3, seed=1), params):
                if out.finish_reason == "length":   # an open-ended grammar, a random model
                    assert len(out.token_ids) == 100
                    continue
                assert out.finish_reason == "stop" and ok(out.text), (spec, out.text)
                stopped += 1
        assert stopped >= 1, f"{spec}: no output ended by its grammar"
    assert_clean(llm)


def test_cut_by_max_tokens_ends_with_length(llm):
    out = llm.generate(prompts(1)[0], json_params(temperature=0.0, max_tokens=5))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert_clean(llm)


def test_a_grammar_that_allows_every_text_changes_nothing(llm):
    """Any valid UTF-8 text, greedy: the same tokens as without a grammar, wherever the
    unconstrained output is such a text (a random model also emits lone bytes that no
    character grammar allows, and special tokens)."""
    free = StructuredOutputsParams(regex=r"[\s\S]*")
    compared = 0
    for prompt in prompts(24, seed=2):
        plain = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10))[0]
        raw = llm.tokenizer.convert_tokens_to_string(
            llm.tokenizer.convert_ids_to_tokens(plain.token_ids))
        if set(plain.token_ids) & SPECIAL or "\ufffd" in raw:
            continue
        constrained = llm.generate(prompt, SamplingParams(
            temperature=0.0, max_tokens=10, structured_outputs=free))[0]
        assert constrained.token_ids == plain.token_ids
        compared += 1
    assert compared >= 2, "too few prompts whose free output is plain text"
    assert_clean(llm)


def _greedy_json_tokens(llm, ps):
    return [o.token_ids for o in llm.generate(ps, json_params(temperature=0.0))]


def test_constrained_greedy_is_identical_under_chunking_preemption_and_cache_hits(tiny, llm):
    ps = prompts(6, n=40)
    ps += [ps[0][:32] + p[:8] for p in ps[1:3]]          # share a 2-block prefix with ps[0]
    want = _greedy_json_tokens(llm, ps)
    # 80 blocks of 4 hold any one request (prompt + 200 tokens), not all eight at once.
    tight = LLM(tiny, dtype="float32", block_size=4, num_kv_blocks=80,
                max_num_batched_tokens=16, enable_prefix_caching=True)
    assert _greedy_json_tokens(tight, ps) == want
    assert tight.engine.scheduler.num_preemptions > 0, "the test did not preempt"
    assert tight.engine.prefix_cache_hits > 0, "the test hit no cached prefix"
    assert_clean(tight)


def test_async_scheduling_gives_the_same_tokens(tiny, llm):
    ps = prompts(4, seed=4)
    async_llm = LLM(tiny, dtype="float32", async_scheduling=True)
    mixed = [json_params(temperature=0.0), SamplingParams(temperature=0.0, max_tokens=30),
             json_params(temperature=0.9, seed=5), json_params(temperature=0.0)]
    want = [o.token_ids for o in llm.generate(ps, mixed)]
    got = async_llm.generate(ps, mixed)
    assert [o.token_ids for o in got] == want
    for out, params in zip(got, mixed):
        if params.structured_outputs is not None:
            jsonschema.validate(json.loads(out.text), SCHEMA)
    assert_clean(async_llm)


@pytest.mark.parametrize("spec, field, words", [
    (StructuredOutputsParams(json="{not json"), "structured_outputs.json", "not valid JSON"),
    (StructuredOutputsParams(json='{"properties": {"a": {"$ref": "#/defs/none"}}}'),
     "structured_outputs.json", "/defs/none"),
    (StructuredOutputsParams(regex="(unclosed"), "structured_outputs.regex", "unclosed"),
    (StructuredOutputsParams(grammar="start: missing_rule"), "structured_outputs.grammar",
     "missing_rule"),
])
def test_bad_grammars_are_refused_naming_the_field(llm, spec, field, words):
    with pytest.raises(ValueError, match=re.escape(field)) as err:
        llm.generate([5, 6, 7], SamplingParams(structured_outputs=spec))
    assert words in str(err.value)
    assert_clean(llm)
    assert llm.generate([5, 6, 7], SamplingParams(max_tokens=3))[0].finish_reason == "length"


def test_structured_outputs_params_take_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=("b",))
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice=())


def test_bf16_outputs_validate_too(tiny, llm):
    """bf16 on the CPU takes the fused greedy paths (no logits) for plain requests: a
    constrained row must leave them for the masked logits, in a batch with plain rows."""
    bf16 = LLM(tiny, dtype="bfloat16")
    ps = prompts(4, seed=6)
    mixed = [json_params(temperature=0.0), SamplingParams(temperature=0.0, max_tokens=20),
             json_params(temperature=0.8, seed=2), json_params(temperature=0.0)]
    for out, params in zip(bf16.generate(ps, mixed), mixed):
        if params.structured_outputs is not None:
            assert out.finish_reason == "stop"
            jsonschema.validate(json.loads(out.text), SCHEMA)
    assert_clean(bf16)

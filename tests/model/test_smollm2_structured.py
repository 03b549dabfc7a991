"""Structured outputs and tool grammars on the bundled SmolLM2-135M-Instruct (a real model,
a real 49152-token byte-level BPE vocabulary): JSON-schema answers validate, a choice is one
of its strings, and constrained greedy decoding is the same under chunked prefill."""
import json

import jsonschema
import pytest

from pagoda import LLM, SamplingParams
from pagoda.sampling import StructuredOutputsParams

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20},
                      "minItems": 1, "maxItems": 3},
        "role": {"enum": ["engineer", "artist", "teacher"]},
    },
    "required": ["name", "age", "languages", "role"],
    "additionalProperties": False,
}
ASKS = ["Invent a software engineer.", "Describe a painter from Lisbon.",
        "A teacher who speaks three languages.", "Make up a person."]


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="bfloat16")


def _chat(llm, params):
    return llm.chat([[{"role": "user", "content": f"{a} Answer in JSON."}] for a in ASKS],
                    params)


def test_json_schema_answers_validate(llm):
    spec = StructuredOutputsParams(json=json.dumps(SCHEMA))
    for params in (SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=spec),
                   SamplingParams(temperature=0.8, seed=1, max_tokens=120,
                                  structured_outputs=spec)):
        for out in _chat(llm, params):
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), SCHEMA)


def test_choice(llm):
    spec = StructuredOutputsParams(choice=("positive", "negative", "neutral"))
    outs = llm.chat([[{"role": "user", "content": "Sentiment of: I love this!"}]],
                    SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=spec))
    assert outs[0].text in ("positive", "negative", "neutral")


def test_constrained_greedy_is_the_same_under_chunked_prefill():
    """In fp32, where chunking changes no rounding that matters (as in test_smollm2.py)."""
    spec = StructuredOutputsParams(json=json.dumps(SCHEMA))
    params = SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=spec)
    want = [o.token_ids for o in _chat(LLM(None, dtype="float32"), params)]
    chunked = LLM(None, dtype="float32", max_num_batched_tokens=16)
    assert [o.token_ids for o in _chat(chunked, params)] == want


def test_bench_structured_times_the_masks_the_engine_computes(llm):
    """bench structured's MaskTimer wraps what the engine core calls: one time per request
    and step (an instrumentation that wrapped a method the engine no longer called would
    time nothing)."""
    from pagoda.bench.structured import MaskTimer

    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=json.dumps(SCHEMA)))
    with MaskTimer(llm.engine.structured) as masks:
        outs = _chat(llm, params)
    steps = sum(len(o.outputs[0].token_ids) for o in outs)
    assert steps == 6 * len(ASKS)
    assert len(masks.seconds) >= steps and all(s > 0 for s in masks.seconds)
    assert "bitmasks" not in vars(llm.engine.structured)  # restored

"""Priority scheduling through the engine (``scheduling_policy="priority"``): requests queued
together finish in priority order, and each one's greedy tokens are those it has alone; the
default policy refuses a priority by name."""
from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.request import EngineRequest
from tiny_models import make_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_priority")), "llama", seed=4)


def test_requests_finish_in_priority_order_with_their_own_tokens(tiny):
    llm = LLM(tiny, dtype="float32", scheduling_policy="priority", max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = {"c": [7, 8, 9], "a": [10, 11, 12, 13], "b": [14, 15]}
    want = {rid: llm.generate([p], params)[0].outputs[0].token_ids for rid, p in prompts.items()}
    engine = llm.engine
    for rid, prio in (("c", 3), ("a", 1), ("b", 2)):
        engine.add_request(EngineRequest(rid, prompts[rid], params, priority=prio))
    order, got = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                got[out.request_id] = out.outputs[0].token_ids
    assert order == ["a", "b", "c"]
    assert got == want


def test_the_default_policy_refuses_a_priority(tiny):
    llm = LLM(tiny, dtype="float32")
    with pytest.raises(ValueError, match="^priority 2 needs"):
        llm.engine.add_request(EngineRequest("x", [5, 6], SamplingParams(max_tokens=2), priority=2))

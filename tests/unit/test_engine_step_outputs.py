"""LLMEngine.step: streaming outputs every step, or (final_only) just the finished ones, with
the same final results either way."""
import pytest

from pagoda.request import EngineRequest
from pagoda.entrypoints.llm import LLM
from pagoda.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(load_format="dummy", model_preset="tiny-llama", device="cpu", dtype="float32",
               num_kv_blocks=64)


def run(llm, final_only: bool):
    engine = llm.engine
    lens = {"a": 3, "b": 7, "c": 1}
    for rid, n in lens.items():
        engine.add_request(EngineRequest(rid, [10 + len(rid), 20, 30 + n], SamplingParams(
            temperature=0.0, max_tokens=n, ignore_eos=True, stop=[" 9999"])))
    seen: dict[str, list] = {rid: [] for rid in lens}
    while engine.has_unfinished_requests():
        for out in engine.step(final_only=final_only):
            seen[out.request_id].append(out)
    for rid, n in lens.items():
        assert seen[rid][-1].finished and len(seen[rid][-1].outputs[0].token_ids) == n
        assert all(not o.finished for o in seen[rid][:-1])
    return seen


def test_final_only_returns_each_request_once_with_the_same_result(llm):
    streamed = run(llm, final_only=False)
    final = run(llm, final_only=True)
    for rid in streamed:
        assert len(final[rid]) == 1
        a, b = streamed[rid][-1].outputs[0], final[rid][0].outputs[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert len(streamed["b"]) == 7             # one output per generated token when streaming
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_a_live_text_holds_back_what_may_start_a_stop_string(llm):
    """A streamed text never shows a tail that a stop string could still cut, and is always
    a prefix of the final text (the stop string here never completes, so nothing is cut)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request(EngineRequest("learn", [11, 22, 33], params))
    full = []
    while engine.has_unfinished_requests():
        full += engine.step(final_only=True)
    text = full[-1].outputs[0].text
    ids = full[-1].outputs[0].token_ids
    piece = engine.tokenizer.decode(ids[2:3])         # the third token's text
    stop = piece + "\u2603"                              # starts like it, never completes
    engine.add_request(EngineRequest("live", [11, 22, 33], SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, stop=[stop])))
    streamed = []
    while engine.has_unfinished_requests():
        streamed += [o.outputs[0] for o in engine.step()]
    assert streamed[-1].text == text and streamed[-1].finish_reason == "length"
    assert all(text.startswith(c.text) for c in streamed)
    third = next(c for c in streamed if len(c.token_ids) == 3)
    assert not third.text.endswith(piece) and text.startswith(third.text + piece)

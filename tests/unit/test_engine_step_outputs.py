"""LLMEngine.step: streaming outputs every step, or (final_only) just the finished ones, with
the same final results either way."""
import pytest

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
        engine.add_request(rid, [10 + len(rid), 20, 30 + n], SamplingParams(
            temperature=0.0, max_tokens=n, ignore_eos=True, stop=[" 9999"]))
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

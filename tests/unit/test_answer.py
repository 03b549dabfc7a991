"""The dialect-neutral answer (pagoda/entrypoints/answer.py): whatever the answer (thinking,
content, hermes tool calls), however the engine's cumulative outputs cut it, the streamed
deltas join to exactly the non-streamed answer. And the route table: every handler it names
resolves (pagoda/entrypoints/routes.py, dialect.py)."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from pagoda.core.outputs import TokenLogprobs
from pagoda.engine.outputs import CompletionOutput
from pagoda.entrypoints.answer import TOOL_CALLS, AnswerStream, final_answer
from pagoda.entrypoints.dialect import resolve
from pagoda.entrypoints.reasoning import FORMATS, Start, Thinking
from pagoda.entrypoints.routes import ROUTES
from pagoda.entrypoints.tools import ToolPlan

FN = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}
PIECES = ["<think>", "</think>", "\n", "hm", " ok", "<tool_call>", "</tool_call>",
          '{"name": "f", ', '"arguments": {"x": ', "1}}", "<tool", "_call>", "done"]


def _output(pieces: list[str], n: int, reason=None) -> CompletionOutput:
    """The engine's cumulative output after ``n`` tokens (one piece each)."""
    logprobs = [TokenLogprobs(i, -0.5 * i, 1) for i in range(n)]
    return CompletionOutput(0, "".join(pieces[:n]), list(range(n)), reason, logprobs=logprobs)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=12),
       cuts=st.lists(st.integers(0, 12), max_size=6),
       thinking=st.sampled_from([None, Start.DEFAULT, Start.REASONING, Start.CONTENT]),
       tools=st.booleans(), reason=st.sampled_from(["stop", "length"]))
def test_deltas_join_to_the_final_answer(pieces, cuts, thinking, tools, reason):
    think = Thinking(FORMATS["qwen3"], thinking) if thinking is not None else None
    plan = ToolPlan("auto", (FN,), parser="hermes") if tools else None
    stream = AnswerStream(3, think, plan)
    deltas = []
    for n in sorted({c for c in cuts if c < len(pieces)}):
        deltas.append(stream.feed(_output(pieces, n)))
    deltas.append(stream.feed(_output(pieces, len(pieces), reason)))
    sent = [d for d in deltas if d is not None]
    final = final_answer(3, _output(pieces, len(pieces), reason), think, plan)

    assert sent[0].first and not any(d.first for d in sent[1:])
    assert [d.finish_reason for d in sent[:-1]] == [None] * (len(sent) - 1)
    assert sent[-1].finish_reason == final.finish_reason
    assert "".join(d.content for d in sent) == final.content
    assert "".join(d.reasoning for d in sent) == final.reasoning
    assert [t for d in sent for t in d.token_ids] == final.token_ids
    assert [e for d in sent for e in d.logprobs] == final.logprobs
    calls: dict[int, list[str]] = {}
    for d in sent:
        for c in d.tool_calls:
            if c.opens:
                assert c.index == len(calls)
                calls[c.index] = [c.name, c.arguments]
            else:
                calls[c.index][1] += c.arguments
    assert list(calls.values()) == [[c.name, c.arguments] for c in final.tool_calls]
    assert final.finish_reason == (TOOL_CALLS if final.tool_calls and reason == "stop"
                                   else reason)


def test_an_unchanged_output_sends_nothing_after_the_first_delta():
    stream = AnswerStream(0)
    assert stream.feed(_output(["a"], 0)) is not None  # the first, even empty
    assert stream.feed(_output(["a"], 0)) is None
    delta = stream.feed(_output(["a", "b"], 2))
    assert (delta.content, delta.token_ids, delta.text_offset) == ("ab", [0, 1], 0)


def test_every_route_names_a_factory():
    for route in ROUTES:
        assert callable(resolve(route.handler)), route

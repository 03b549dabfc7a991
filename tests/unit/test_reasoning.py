"""The reasoning parsers (pagoda/entrypoints/reasoning.py): the split of finished
answers as Qwen3 and DeepSeek-R1 write them, where the prompt says the answer starts, and
that streaming any answer in any chunks sends exactly the finished split."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pagoda.entrypoints.reasoning import (
    FORMATS, ReasoningStream, Start, prompt_start, split)

QWEN3, R1 = FORMATS["qwen3"], FORMATS["deepseek_r1"]


@pytest.mark.parametrize("fmt, start, text, reasoning, content", [
    (QWEN3, Start.DEFAULT, "<think>\nLet me see.\n</think>\n\nParis.", "Let me see.", "Paris."),
    (QWEN3, Start.DEFAULT, "Paris.", "", "Paris."),
    (QWEN3, Start.DEFAULT, "<think>\ncut short", "cut short", ""),
    (QWEN3, Start.DEFAULT, "It is written <think> like this.", "", "It is written <think> like this."),
    (QWEN3, Start.CONTENT, "<think>x</think>y", "", "<think>x</think>y"),
    (QWEN3, Start.REASONING, "x</think>y", "x", "y"),
    (R1, Start.DEFAULT, "I think.\n</think>\n\nYes.", "I think.", "Yes."),
    (R1, Start.DEFAULT, "<think>I think.</think>Yes.", "I think.", "Yes."),
    (R1, Start.DEFAULT, "never closed", "never closed", ""),
    (R1, Start.CONTENT, "plain", "", "plain"),
])
def test_finished_answers_split(fmt, start, text, reasoning, content):
    parts = split(fmt, text, start, final=True)
    assert (parts.reasoning, parts.content) == (reasoning, content)


@pytest.mark.parametrize("tail, start", [
    ("<|im_start|>assistant\n", Start.DEFAULT),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", Start.CONTENT),
    ("<｜Assistant｜><think>\n", Start.REASONING),
    ("</think> then <think>\n", Start.REASONING)])
def test_the_prompt_says_where_the_answer_starts(tail, start):
    assert prompt_start(QWEN3, tail) is start


PIECES = ["<think>", "</think>", "\n", "\n\n", "a", "b c", "<", "</", "think", ">", " ", "<th"]


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=14),
       cuts=st.lists(st.integers(0, 60), max_size=8),
       fmt=st.sampled_from([QWEN3, R1]), start=st.sampled_from(list(Start)))
def test_streamed_deltas_join_to_the_finished_split(pieces, cuts, fmt, start):
    text = "".join(pieces)
    stream = ReasoningStream(fmt, start)
    reasoning = content = ""
    for cut in sorted(c for c in cuts if c < len(text)):
        r, c = stream.feed(text[:cut], final=False)
        reasoning, content = reasoning + r, content + c
    r, c = stream.feed(text, final=True)
    final = split(fmt, text, start, final=True)
    assert (reasoning + r, content + c) == (final.reasoning, final.content)

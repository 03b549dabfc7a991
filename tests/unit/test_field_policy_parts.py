"""The field policy's pieces (pagoda/entrypoints/field_policy.py): where undeclared fields
are found, how they are named in a header whatever their names hold, strict mode, logging
once, and null read as the default."""
from __future__ import annotations

import logging
from typing import Optional

import pytest

from pagoda.entrypoints.field_policy import (
    MAX_HEADER_FIELDS, FieldPolicy, Tolerant, UnknownFieldError, header_value, unknown_fields)


class Part(Tolerant):
    text: str


class Message(Tolerant):
    role: str
    content: list[Part] = []


class Body(Tolerant):
    messages: list[Message]
    n: int = 1
    flag: bool = False
    note: Optional[str] = None


def _body() -> Body:
    return Body.model_validate({
        "messages": [{"role": "user", "content": [{"text": "a"}]},
                     {"role": "user", "content": [{"text": "b", "cache_control": {}}],
                      "x": 1}],
        "num_ctx": 8})


def test_unknown_fields_are_found_at_every_depth_with_their_paths():
    assert unknown_fields(_body()) == ["num_ctx", "messages[1].x",
                                      "messages[1].content[0].cache_control"]
    assert unknown_fields(Body.model_validate({"messages": []})) == []


def test_null_means_the_default_but_a_required_field_stays_required():
    body = Body.model_validate({"messages": [], "n": None, "flag": None, "note": None})
    assert (body.n, body.flag, body.note) == (1, False, None)
    with pytest.raises(ValueError):
        Body.model_validate({"messages": None})
    with pytest.raises(ValueError):  # strict types stay strict
        Body.model_validate({"messages": [], "n": "2"})


def test_the_header_is_ascii_whatever_the_names_hold_and_bounded():
    value = header_value(["a", "caf\u00e9", "x,y", "\ud800lone", "a"])
    value.encode("latin-1")  # a header must encode; this raises if it does not
    assert value.split(",") == ["a", "caf%C3%A9", "x%2Cy", "%ED%A0%80lone"]
    many = header_value([f"f{i}" for i in range(MAX_HEADER_FIELDS + 5)]).split(",")
    assert len(many) == MAX_HEADER_FIELDS + 1 and many[-1] == "+5 more"
    assert len(header_value(["y" * 10_000])) < 200


def test_strict_refuses_the_first_and_tolerant_logs_each_name_once(caplog):
    with pytest.raises(UnknownFieldError) as e:
        FieldPolicy(strict=True).check(_body())
    assert e.value.param == "num_ctx"
    policy = FieldPolicy()
    with caplog.at_level(logging.WARNING, logger="pagoda.entrypoints.field_policy"):
        for _ in range(3):
            assert policy.check(_body()) == unknown_fields(_body())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # num_ctx, x, cache_control: each once
    assert sum("num_ctx" in line for line in lines) == 1

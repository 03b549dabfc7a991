"""SamplingParams validation: every invalid value raises ValueError naming its field."""
import math

import pytest

from pagoda.sampling import MAX_LOGPROBS, MAX_N, MAX_STOP_STRING_LEN, MAX_STOP_STRINGS, \
    SamplingParams

INVALID = [
    ("n", 0),
    ("n", -1),
    ("n", MAX_N + 1),
    ("n", True),
    ("n", 2.0),
    ("n", "3"),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -math.inf),
    ("temperature", "1.0"),
    ("temperature", None),
    ("temperature", True),
    ("temperature", 10**400),    # an int too large for a float
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.0001),
    ("top_p", math.nan),
    ("top_p", math.inf),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", "5"),
    ("top_k", True),
    ("top_k", -1.0),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf),
    ("presence_penalty", -2.01),
    ("presence_penalty", 2.01),
    ("presence_penalty", math.nan),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", math.inf),
    ("frequency_penalty", -10**400),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", "3"),
    ("max_tokens", 3.0),
    ("max_tokens", True),
    ("min_tokens", -1),
    ("min_tokens", "1"),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", "2"),
    ("logprobs", True),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", MAX_LOGPROBS + 1),
    ("seed", "7"),
    ("seed", 1.5),
    ("seed", 2**64),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["3"]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 5),
    ("stop_token_ids", 0),       # a bare id, not a list: must not silently become []
    ("stop_token_ids", {3}),
    ("stop", 5),
    ("stop", 0),
    ("stop", {"a": 1}),
    ("seed", True),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_naming_field(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    SamplingParams(max_tokens=5, min_tokens=5)
    SamplingParams(max_tokens=None, min_tokens=50)


def test_too_many_stop_strings():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)])


@pytest.mark.parametrize("stop", ["", [""], ["ok", ""], ["x" * (MAX_STOP_STRING_LEN + 1)], [3]])
def test_bad_stop_strings(stop):
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=stop)


def test_longest_stop_string_is_fine():
    assert SamplingParams(stop=["x" * MAX_STOP_STRING_LEN]).stop == ["x" * MAX_STOP_STRING_LEN]


def test_stop_string_becomes_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams().stop == []


def test_top_k_minus_one_disables():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=0).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5


@pytest.mark.parametrize("kwargs", [
    dict(n=1), dict(n=MAX_N), dict(temperature=0.0), dict(temperature=0), dict(temperature=2.5),
    dict(top_p=1.0), dict(top_p=1e-6), dict(top_k=1), dict(top_k=10_000), dict(min_p=0.0),
    dict(min_p=1.0), dict(repetition_penalty=1e-3), dict(repetition_penalty=2.0),
    dict(presence_penalty=-2.0), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0),
    dict(frequency_penalty=2.0), dict(seed=0), dict(seed=-5), dict(seed=2**64 - 1),
    dict(max_tokens=1), dict(max_tokens=None), dict(min_tokens=0), dict(logprobs=0),
    dict(logprobs=MAX_LOGPROBS), dict(prompt_logprobs=0), dict(prompt_logprobs=MAX_LOGPROBS),
    dict(stop_token_ids=[0, 5]), dict(stop=["\n", "END"]), dict(ignore_eos=True),
])
def test_valid_values_construct(kwargs):
    p = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        if k != "top_k":
            assert getattr(p, k) == v


def test_greedy_property():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-45).greedy  # would overflow logits / temperature
    assert not SamplingParams(temperature=0.5).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_clone_revalidates():
    p = SamplingParams(max_tokens=8, stop="x")
    q = p.clone(max_tokens=9)
    assert q.max_tokens == 9 and q.stop == ["x"] and p.max_tokens == 8
    with pytest.raises(ValueError, match="max_tokens"):
        p.clone(max_tokens=0)

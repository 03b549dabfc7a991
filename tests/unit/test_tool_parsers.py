"""Tool-call parsing (entrypoints/tools.py, entrypoints/tool_parsers/): every --tool-call-parser
format on outputs as models write them (several calls, text around them, malformed calls
left as text, partial text held back), parallel_tool_calls false, the JSON scanner under
the JSON formats, Qwen3-Coder's schema conversions, the grammars of required and named
tool_choice, and that streaming any output in any chunks sends deltas that join to exactly
the non-streamed message, for every format."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings, strategies as st
from scripted_model import TOOL_SCRIPTS

from pagoda.entrypoints.tool_parsers import FORMATS, REQUIRED, Output
from pagoda.entrypoints.tool_parsers.json_scan import scan_value
from pagoda.entrypoints.tool_parsers.xml_calls import convert
from pagoda.entrypoints.tools import ToolPlan, ToolStream

FN = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array"}, "where": {"type": "object"}, "zip": {"type": "string"},
    "scale": {"enum": [1, 2]}, "limit": {"anyOf": [{"type": "number"}, {"type": "null"}]}}}}
SCHEMAS = {t["name"]: t["parameters"] for t in (FN, WEATHER)}


def parse(fmt: str, text: str, final: bool = True) -> tuple[str, list[tuple[str, str]]]:
    parsed = FORMATS[fmt].parse(Output(text, final, SCHEMAS))
    return parsed.content, [(c.name, c.arguments) for c in parsed.calls]


def calls_as_json(calls: list[tuple[str, str]]) -> list[tuple[str, object]]:
    return [(name, json.loads(args)) for name, args in calls]


# ------------------------------------------------------------------ finished answers
WHOLE = [
    # hermes: Qwen2.5 / Qwen3 write a newline inside the tags, Hermes none
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
     "Let me check.\n", [("f", {"x": 1}), ("get_weather", {"city": "Oslo"})]),
    ("hermes", '<tool_call>\n{"arguments": {"x": 2}, "name": "f"}\n</tool_call>\nDone.',
     "\nDone.", [("f", {"x": 2})]),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', "", [("f", {})]),
    ("hermes", '<tool_call>{"name": "f", "name": "g", "arguments": {"x": 1}, "parameters": '
     '{"x": 2}}</tool_call>', "", [("f", {"x": 1})]),  # the first of each, as a stream reads
    ("hermes", "<tool_call>{not json}</tool_call> after", "<tool_call>{not json}</tool_call> after",
     []),
    ("hermes", '<tool_call>{"nom": "f"}</tool_call>', '<tool_call>{"nom": "f"}</tool_call>', []),
    ("hermes", "Say <tool_call> to call.", "Say <tool_call> to call.", []),
    ("hermes", '<tool_call>{"name": "", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "", "arguments": {}}</tool_call>', []),  # a call names a function
    ("hermes", "no calls here", "no calls here", []),
    # llama3_json: Llama 3.1-3.3, the python tag kept (special tokens are not skipped)
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": 2}}; '
     '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("f", {"x": 2}), ("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '\n{"name": "f", "arguments": {"x": 3}}', "", [("f", {"x": 3})]),
    ("llama3_json", '{"result": 4}', '{"result": 4}', []),
    ("llama3_json", "The answer is {4}.", "The answer is {4}.", []),
    # pythonic: Llama 3.2 / Llama 4 / Gemma 3 (JSON's literals accepted inside the call)
    ("pythonic", '[get_weather(city="Oslo", days=3, hours=[1, 2], metric=true), f(x=-1)]', "",
     [("get_weather", {"city": "Oslo", "days": 3, "hours": [1, 2], "metric": True}),
      ("f", {"x": -1})]),
    ("pythonic", "<|python_start|>[f(x=1)]<|python_end|>", "", [("f", {"x": 1})]),
    ("pythonic", "[f(x=None, y=(1, 2), z={'a': 'b'}), f()] All done.", " All done.",
     [("f", {"x": None, "y": [1, 2], "z": {"a": "b"}}), ("f", {})]),
    ("pythonic", "[f(x=1),]", "", [("f", {"x": 1})]),  # a trailing comma, as Python allows
    ("pythonic", "[f(x=1),, f()]", ",, f()]", [("f", {"x": 1})]),
    ("pythonic", "[1, 2, 3]", "[1, 2, 3]", []),
    ("pythonic", "[f(1)]", "[f(1)]", []),  # a positional argument names no parameter
    ("pythonic", '[f(__import__("os").system("true"))]', '[f(__import__("os").system("true"))]',
     []),
    ("pythonic", "[f(x=open('/etc/passwd'))]", "[f(x=open('/etc/passwd'))]", []),
    ("pythonic", "I think [f(x=1)] works.", "I think [f(x=1)] works.", []),
    # mistral: v11+ name[ARGS]{...} (and [CALL_ID]), before v11 a JSON list
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]f[ARGS]{"x": 1}',
     "Sure.", [("get_weather", {"city": "Oslo"}), ("f", {"x": 1})]),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}, {"name": "f", '
     '"arguments": {"x": 2}}]', "", [("f", {"x": 1}), ("f", {"x": 2})]),
    ("mistral", "[TOOL_CALLS]not a call, really", "[TOOL_CALLS]not a call, really", []),
    # qwen3_coder: values converted by the schema's types
    ("qwen3_coder", "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
     "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\nFalse\n</parameter>\n"
     "<parameter=zip>\n03106\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
     "<function=f>\n<parameter=x>\n7\n</parameter>\n</function>\n</tool_call>", "I'll look.\n",
     [("get_weather", {"city": "Oslo", "days": 3, "metric": False, "zip": "03106"}),
      ("f", {"x": 7})]),
    ("qwen3_coder", "<tool_call>\n<function=f>\n<parameter=x>\n1\n<parameter=y>\ntwo\n"
     "</function>\n</tool_call>", "", [("f", {"x": 1, "y": "two"})]),  # </parameter> missing
    ("qwen3_coder", "<function=f>\n</function>", "", [("f", {})]),
    ("qwen3_coder", "<function=>\n</function>", "<function=>\n</function>", []),
    ("qwen3_coder", "<tool_call>\nnot a function\n</tool_call>",
     "<tool_call>\nnot a function\n</tool_call>", []),
    # phi4_mini_json
    ("phi4_mini_json", 'functools[{"name": "f", "arguments": {"x": 1}}, {"name": "get_weather", '
     '"arguments": {"city": "Oslo"}}]', "", [("f", {"x": 1}), ("get_weather", {"city": "Oslo"})]),
    ("phi4_mini_json", "functools are handy", "functools are handy", []),
    # gemma: ```tool_code fences, a call a line or a list
    ("gemma", 'I will check.\n```tool_code\nget_weather(city="Oslo")\nf(x=2)\n```\nOne moment.',
     "I will check.\n\nOne moment.", [("get_weather", {"city": "Oslo"}), ("f", {"x": 2})]),
    ("gemma", "```tool_code\n[f(x=1), f(x=2)]\n```", "", [("f", {"x": 1}), ("f", {"x": 2})]),
    ("gemma", "```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
    ("gemma", "```tool_code\nprint(f(x=1))\n```", "```tool_code\nprint(f(x=1))\n```", []),
]


@pytest.mark.parametrize("fmt, text, content, calls", WHOLE)
def test_finished_answers(fmt, text, content, calls):
    got_content, got_calls = parse(fmt, text)
    assert got_content == content
    assert calls_as_json(got_calls) == calls


def test_json_arguments_are_the_text_the_model_wrote():
    """Verbatim (spacing, key order, escapes): never re-serialised, so a stream's fragments
    join to them."""
    args = '{ "city" :"Z\\u00fcrich",\n  "days": 1.50e1 }'
    for fmt, text in [("hermes", f'<tool_call>{{"name": "f", "arguments": {args}}}</tool_call>'),
                      ("llama3_json", f'{{"name": "f", "parameters": {args}}}'),
                      ("mistral", f"[TOOL_CALLS]f[ARGS]{args}"),
                      ("phi4_mini_json", f'functools[{{"name": "f", "arguments": {args}}}]')]:
        assert parse(fmt, text) == ("", [("f", args)]), fmt


@pytest.mark.parametrize("text, calls", [
    # a call whose name was read is a call from then on: its arguments stay as written
    ('<tool_call>{"name": "f", "arguments": {"x": 1,', [("f", '{"x": 1,')]),
    ('<tool_call>{"name": "f", "argu', [("f", "{}")]),
    ('<tool_call>{"name": "f", "arguments": {"x": tru', [("f", '{"x": tru')]),
])
def test_a_call_cut_or_broken_after_its_name_keeps_what_was_written(text, calls):
    assert parse("hermes", text) == ("", calls)


def test_a_broken_call_ends_where_its_json_does_and_the_rest_is_content():
    content, calls = parse("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1}} oops'
                                     "</tool_call>")
    assert (content, calls) == (" oops</tool_call>", [("f", '{"x": 1}')])
    content, calls = parse("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1}'
                                     "</tool_call>Bye")  # the outer } forgotten
    assert (content, calls) == ("Bye", [("f", '{"x": 1}')])


@pytest.mark.parametrize("fmt, text, content, calls", [
    ("hermes", "Hello <tool", "Hello ", []),
    ("hermes", 'Hello <tool_call>{"name": "get_wea', "Hello ", []),  # the name may go on
    ("hermes", 'Hello <tool_call>{"name": "f"', "Hello ", [("f", "")]),  # the call goes out
    ("hermes", 'Hello <tool_call>{"name": "f", "arguments": {"x": 1', "Hello ", [("f", '{"x": 1')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1}}\n\n', "", [("f", '{"x": 1}')]),
    ("llama3_json", "  ", "", []),
    ("llama3_json", "<|python", "", []),
    ("llama3_json", "Sure", "Sure", []),
    ("pythonic", '[get_weather(city="Oslo"), f(x=', "", [("get_weather", '{"city": "Oslo"}')]),
    ("pythonic", "[f", "", []),
    ("mistral", "Hi [TOOL_CA", "Hi ", []),
    ("mistral", "[TOOL_CALLS]get_weather[AR", "", []),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Os', "", [("get_weather", '{"city": "Os')]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nOs", "",
     [("get_weather", "{")]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
     "<parameter=days>\n3", "", [("get_weather", '{"city": "Oslo"')]),
    ("phi4_mini_json", "Use functo", "Use ", []),
    ("gemma", "Let me see.\n```tool", "Let me see.\n", []),
    ("gemma", '```tool_code\nget_weather(city="Oslo")\nf(', "",
     [("get_weather", '{"city": "Oslo"}')]),
])
def test_live_text_holds_back_what_may_still_be_a_call(fmt, text, content, calls):
    assert parse(fmt, text, final=False) == (content, calls)


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = ('Checking. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> and '
            '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')
    one = ToolPlan("auto", (FN, WEATHER), parallel=False, parser="hermes")
    content, calls = one.extract(text)
    assert content == "Checking.  and " and [(c.name, c.arguments) for c in calls] == [
        ("f", '{"x": 1}')]
    both = ToolPlan("auto", (FN, WEATHER), parser="hermes").extract(text)[1]
    assert [c.name for c in both] == ["f", "get_weather"]
    assert streamed(one, text, [20, 60, 90]) == ("Checking.  and ", [("f", '{"x": 1}')])


def test_a_stream_reads_anew_a_text_that_is_not_the_last_one_grown():
    """What a stream keeps of earlier readings (a JSON scan's state) holds for a growing
    answer only."""
    plan = ToolPlan("auto", (FN,), parser="hermes")
    stream = ToolStream(plan)
    stream.feed('<tool_call>{"name": "f", "arguments": {"x": 1}}', final=False)
    other = '<tool_call>{"name": "get_weather", "arguments": {}}'
    stream.feed(other, final=False)
    assert plan.parse(other, False, stream.memo) == plan.parse(other, False)


def test_mistral_call_ids():
    """Mistral's templates take nine alphanumeric characters as an id; a [CALL_ID] the
    model wrote is kept."""
    plan = ToolPlan("auto", (FN,), parser="mistral")
    _, calls = plan.extract('[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{"x": 1}')
    assert re.fullmatch(r"[A-Za-z0-9]{9}", calls[0].id) and calls[1].id == "a1B2c3D4e"
    assert ToolPlan("auto", (FN,), parser="hermes").extract(
        '<tool_call>{"name": "f"}</tool_call>')[1][0].id.startswith("call_")


@pytest.mark.parametrize("value, schema, converted", [
    ("3", {"type": "integer"}, 3),
    ("3.0", {"type": "integer"}, 3),
    ("3.5", {"type": "number"}, 3.5),
    ("03106", {"type": "string"}, "03106"),
    ("03106", None, "03106"),  # a parameter the schema does not type stays a string
    ("True", {"type": "boolean"}, True),
    ("null", {"anyOf": [{"type": "number"}, {"type": "null"}]}, None),
    ("2", {"anyOf": [{"type": "number"}, {"type": "null"}]}, 2),
    ("2", {"enum": [1, 2]}, 2),
    ('{"a": [1, 2]}', {"type": "object"}, {"a": [1, 2]}),
    ("{'a': True}", {"type": "object"}, {"a": True}),  # a Python literal, read by ast
    ("[1, 2]", {"type": ["array", "null"]}, [1, 2]),
    ("soon", {"type": "integer"}, "soon"),  # does not convert: stays as written
    ("nan", {"type": "number"}, "nan"),
    ("1" * 5000, {"type": "integer"}, "1" * 5000),  # beyond int()'s digits: a string
    ("[1, 2", {"type": "array"}, "[1, 2"),
])
def test_qwen3_coder_values_follow_the_schema(value, schema, converted):
    assert convert(value, schema) == converted


# ------------------------------------------------------------------ the JSON scanner
@pytest.mark.parametrize("text, stop, end, broken", [
    ('{"a": [1, 2.5e-3, true, null, "x\\"y"]}', 38, 38, False),
    ('{"a": 1} trailing', 8, 8, False),
    ('{"a": 1.', 8, None, False),
    ('{"a": 1.x', 8, None, True),
    ('{"a": 01', 7, None, True),
    ('{"a": tru', 9, None, False),
    ('{"a": trux', 9, None, True),
    ('{"a": "\\u00', 11, None, False),
    ('{"a": "\\x', 8, None, True),
    ('{"a": "line\nbreak"}', 11, None, True),
    ('{"a" 1}', 5, None, True),
    ("[1, 2,]", 6, None, True),
])
def test_the_scanner_knows_the_longest_valid_prefix(text, stop, end, broken):
    scan = scan_value(text, 0)
    assert (scan.stop, scan.end, scan.broken) == (stop, end, broken)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                    allow_infinity=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.text(max_size=3), inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(value=JSON, indent=st.sampled_from([None, 0, 2]), ascii=st.booleans(),
       tail=st.text(max_size=4))
def test_the_scanner_ends_valid_json_where_it_ends(value, indent, ascii, tail):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii)
    scan = scan_value(text + tail, 0)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and tail[:1] in set("0123456789.eE+-"):
        return  # a number at the top level goes on into such a tail
    assert scan.end == len(text) or (number and not tail and scan.end is None)
    members = scan.members if isinstance(value, dict) else []
    assert [json.loads(text[m.start:m.end]) for m in members] == (
        list(value.values()) if isinstance(value, dict) else [])


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet='{}[]:,"\\ 0123456789.-eE+truefalsn\nxu', max_size=30))
def test_the_scanner_never_takes_back_a_prefix(text):
    full = scan_value(text, 0)
    for cut in range(len(text) + 1):
        part = scan_value(text[:cut], 0)
        if cut <= full.stop:  # a prefix of the valid prefix is valid, and goes as far
            assert part.stop == cut and not part.broken or part.end == full.end
        else:
            assert (part.stop, part.broken) == (full.stop, full.broken)
    if full.end is not None:
        json.loads(text[:full.end])


# ------------------------------------------------------------------ streaming
def streamed(plan: ToolPlan, text: str, cuts) -> tuple[str, list[tuple[str, str]]]:
    """Feed ``text`` cut at ``cuts``, then whole and finished: the content and the calls
    the deltas join to (checking each call's first delta carries its id, type and name)."""
    stream = ToolStream(plan)
    content, calls = "", {}
    for cut in sorted({c for c in cuts if c < len(text)}) + [len(text)]:
        piece, deltas = stream.feed(text[:cut], final=cut == len(text))
        content += piece
        for d in deltas:
            i = d["index"]
            if "id" in d:
                assert i == len(calls) and d["type"] == "function" and d["function"]["name"]
                calls[i] = [d["function"]["name"], d["function"]["arguments"]]
            else:
                assert i in calls and set(d) == {"index", "function"}
                assert set(d["function"]) == {"arguments"}
                calls[i][1] += d["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)]


# What models write, in fragments a random concatenation of which is any mix of calls,
# text, markers cut short and malformed JSON.
FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", '{"name": "f", "arguments": ', '{"x": [1, "a]"]}',
               "}", '{"name": 5}', '"', "{", "\n", " ", "text", "<tool", "_call>", ",", ": ",
               '"name"', '"arguments"', "1.5", "tru", "e", '<tool_call>{"name": "f"}</tool_call>'],
    "llama3_json": ["<|python_tag|>", "<|python", '{"name": "f", "parameters": ', '{"x": 1}',
                    "}", "; ", "{", '"', "text", " ", "\n", '{"name": "g", "arguments": {}}',
                    "[", "null", ","],
    "pythonic": ["[", "]", "f(", "x=", "1", ")", ", ", '"a)"', "'b'", "g()", "<|python_start|>",
                 "<|python_end|>", "text", " ", "\n", "(", "#", "None", '"""', "\\"],
    "mistral": ["[TOOL_CALLS]", "[TOOL_", "f", "[ARGS]", "[CALL_ID]", "abc", '{"x": 1}', "{",
                "}", "[", "]", '{"name": "f", "arguments": {}}', ", ", "text", " ", '"'],
    "qwen3_coder": ["<tool_call>", "</tool_call>", "\n", "<function=f>", "<function=",
                    "get_weather>", "<parameter=x>", "<parameter=days>", "3", "Oslo",
                    "</parameter>", "</function>", "<param", "</func", "text", " ", "<", ">"],
    "phi4_mini_json": ["functools", "func", "[", "]", '{"name": "f", "arguments": ', '{"x": 1}',
                       "}", ", ", "text", " ", '"', "{"],
    "gemma": ["```tool_code", "```", "```tool", "\n", "f(x=1)", "g(", ")", "[", "]", ", ",
              "text", " ", "'", "y=[1, 2]", "print(", "#"],
}
REQUIRED_FRAGMENTS = ["[", "]", '{"name": "f", "parameters": ', '{"x": 1}', "}", ", ", " ", '"',
                      "{", "x"]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=250, deadline=None)
@given(data=st.data(), parallel=st.booleans())
def test_streamed_deltas_join_to_the_finished_message(fmt, data, parallel):
    """For every format, any output streamed in any chunks: the content and each call's
    name and arguments joined from the deltas are the non-streamed message's."""
    pieces = data.draw(st.lists(st.sampled_from(FRAGMENTS[fmt]), max_size=12))
    text = "".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, max(len(text) - 1, 0)), max_size=10))
    plan = ToolPlan("auto", (FN, WEATHER), parallel=parallel, parser=fmt)
    content, calls = plan.extract(text)
    assert streamed(plan, text, cuts) == (content, [(c.name, c.arguments) for c in calls])


@settings(max_examples=250, deadline=None)
@given(pieces=st.lists(st.sampled_from(REQUIRED_FRAGMENTS), max_size=12),
       cuts=st.lists(st.integers(0, 120), max_size=10))
def test_required_and_named_stream_the_same(pieces, cuts):
    text = "".join(pieces)
    for plan in (ToolPlan("required", (FN,)), ToolPlan("named", (FN,), name="f")):
        content, calls = plan.extract(text)
        assert streamed(plan, text, cuts) == (content, [(c.name, c.arguments) for c in calls])


# Calls whose names or values hold a lone surrogate (UTF-8 cannot carry one), nest deeply,
# spell numbers Python will not convert, or NaN; and schemas that are not JSON Schema.
NASTY = ['<tool_call>{"name": "\\ud800", "arguments": {}}</tool_call>', '{"name": "\\udfff"}',
         '[f(x="\\ud800")]', "[f(x=" + "[" * 3000 + "])]", "[f(x=" + "1" * 5000 + ")]",
         '<tool_call><function=f>\n<parameter=x>\n{"a": "\\ud800"}\n</parameter></function>',
         "<function=f><parameter=x>" + "[" * 3000 + "</parameter></function>",
         "<function=f><parameter=x>" + "1" * 5000 + "</parameter></function>",
         "<function=f><parameter=x>NaN</parameter><parameter=y>{\"a\": NaN}</parameter>",
         '[TOOL_CALLS]f[ARGS]{"x": "\\ud800"}', "```tool_code\nf(x='\\ud800')\n```"]
SCHEMA_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                             | st.sampled_from(["integer", "number", "object", "array", "null"]),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                 st.sampled_from(["type", "anyOf", "oneOf", "enum", "const",
                                                  "properties"]), inner, max_size=3),
                             max_leaves=8)


ANY_TYPE = {"type": ["integer", "number", "boolean", "null", "object", "array"]}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("text", NASTY)
def test_nasty_answers_read_into_utf8_text(fmt, text):
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"x": ANY_TYPE,
                                                                         "y": ANY_TYPE}}}
    content, calls = ToolPlan("auto", (tool,), parser=fmt).extract(text)
    for string in [content] + [c.name for c in calls] + [c.arguments for c in calls]:
        string.encode("utf-8")
    for call in calls:
        json.loads(call.arguments, parse_constant=pytest.fail)  # and it is JSON, NaN-free


@settings(max_examples=300, deadline=None)
@given(value=st.sampled_from(["1", "2.5", "null", "true", "[1]", '{"a": 1}', "x"]),
       schema=SCHEMA_VALUES)
def test_a_schema_of_any_shape_converts_without_error(value, schema):
    json.loads(json.dumps(convert(value, schema)))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40) | st.lists(st.sampled_from(FRAGMENTS["hermes"] + FRAGMENTS[
    "pythonic"] + FRAGMENTS["qwen3_coder"] + NASTY), max_size=6).map("".join),
       x=SCHEMA_VALUES, y=SCHEMA_VALUES)
def test_any_answer_and_any_schema_read_into_utf8_text(fmt, text, x, y):
    """Never an error (a 500), whatever the model wrote and the client declared: every
    name, argument and content string can go out as UTF-8."""
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"x": x, "y": y}}}
    content, calls = ToolPlan("auto", (tool,), parser=fmt).extract(text)
    for string in [content] + [c.name for c in calls] + [c.arguments for c in calls]:
        string.encode("utf-8")


@pytest.mark.parametrize("fmt", sorted(TOOL_SCRIPTS))
def test_arguments_stream_as_the_model_writes_them(fmt):
    """The scripted models of the server tests, fed a token at a time: each call goes out
    before the answer ends, JSON arguments fragment by fragment, Qwen3-Coder's parameter by
    parameter, a Python call whole."""
    script = TOOL_SCRIPTS[fmt]
    stream = ToolStream(ToolPlan("auto", (FN, WEATHER), parser=fmt))
    sent: list[tuple[int, dict]] = []  # (tokens so far, delta)
    for n in range(1, len(script) + 1):
        sent += [(n, d) for d in stream.feed("".join(script[:n]), final=n == len(script))[1]]
    first_call_done = {"hermes": 6, "pythonic": 2, "qwen3_coder": 6}[fmt]
    firsts = [n for n, d in sent if d["index"] == 0]
    assert firsts and max(firsts) <= first_call_done < len(script)
    fragments = [d for _, d in sent if d["index"] == 0 and d["function"]["arguments"]]
    assert len(fragments) == {"hermes": 3, "pythonic": 1, "qwen3_coder": 5}[fmt]


def test_required_arguments_stream_too():
    stream = ToolStream(ToolPlan("required", (FN,)))
    script = ['[{"name": "f", ', '"parameters": {"x": ', "1", "2}", "}]"]
    deltas = [stream.feed("".join(script[:n]), final=n == len(script))[1]
              for n in range(1, len(script) + 1)]
    assert [[(d["function"].get("name"), d["function"]["arguments"]) for d in ds]
            for ds in deltas] == [
        [("f", "")], [(None, '{"x": ')], [(None, "1")], [(None, "2}")], []]


# ------------------------------------------------------------------ required and named
def test_required_and_named_grammars():
    one = json.loads(ToolPlan("required", (FN,), parallel=False).constraint().json)
    assert one["maxItems"] == 1 and one["minItems"] == 1
    assert one["items"]["anyOf"][0]["properties"]["name"] == {"const": "f"}
    many = json.loads(ToolPlan("required", (FN,)).constraint().json)
    assert "maxItems" not in many
    named = json.loads(ToolPlan("named", (FN,), name="f").constraint().json)
    assert named == FN["parameters"]
    assert ToolPlan("auto", (FN,), parser="hermes").constraint() is None
    content, calls = ToolPlan("required", (FN,)).extract('[{"name": "f", "parameters": {"x": 3}}]')
    assert content == "" and calls[0].name == "f" and calls[0].arguments == '{"x": 3}'
    assert REQUIRED.parse(Output("[1]", True, {})).content == "[1]"


def test_which_formats_keep_special_tokens():
    keep = {name for name, fmt in FORMATS.items() if fmt.keeps_special_tokens}
    assert keep == {"hermes", "mistral"}
    assert not ToolPlan("required", (FN,)).keeps_special_tokens
    assert ToolPlan("auto", (FN,), parser="mistral").keeps_special_tokens

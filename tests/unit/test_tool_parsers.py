"""Tool-call parsing (entrypoints/openai/tools.py): the hermes and llama3_json formats, text
around calls kept as content, malformed calls left as text, and the grammars of required and
named tool_choice."""
import json

from pagoda.entrypoints.openai.tools import ToolPlan, parse_calls

FN = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}


def test_hermes_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    content, calls = parse_calls("hermes", text)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert parse_calls("hermes", "<tool_call>{not json}</tool_call>") == (
        "<tool_call>{not json}</tool_call>", [])
    assert parse_calls("hermes", "no calls here") == ("no calls here", [])


def test_llama3_json_calls():
    content, calls = parse_calls("llama3_json",
                                 '<|python_tag|>{"name": "f", "parameters": {"x": 2}}; '
                                 '{"name": "g", "parameters": {}}')
    assert content == "" and [c.name for c in calls] == ["f", "g"]
    assert json.loads(calls[0].arguments) == {"x": 2}
    assert parse_calls("llama3_json", "The answer is 4.") == ("The answer is 4.", [])
    assert parse_calls("llama3_json", '{"name": "f", "parameters": {"x"') == (
        '{"name": "f", "parameters": {"x"', [])


def test_live_text_holds_back_what_may_start_a_call():
    plan = ToolPlan("auto", (FN,), parser="hermes")
    assert plan.safe_len("Hello <tool") == len("Hello ")
    assert plan.safe_len("Hello <tool_call>{") == len("Hello ")
    assert plan.safe_len("Hello there") == len("Hello there")
    llama = ToolPlan("auto", (FN,), parser="llama3_json")
    assert llama.safe_len('  {"name"') == 0 and llama.safe_len("Sure") == 4


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
    assert content == "" and calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 3}

"""One prefix cache under every dialect: a conversation sent through Anthropic's
``/v1/messages`` and then, in the same words, through OpenAI's ``/v1/chat/completions`` (or
the other way round) renders to the same tokens, so the second request reads the first's
prompt from the prefix cache (on by default: the session server does not turn it off),
all of it but the last partial block."""
from __future__ import annotations

import uuid

import httpx
import pytest
from server_utils import ServerProcess

def _conversation() -> tuple[str, list[dict], list[dict], list[dict]]:
    """A new conversation (nothing of it cached yet) in both dialects: Anthropic's
    (system apart, a tool_use and its tool_result) and OpenAI's (system first, tool_calls,
    a tool message)."""
    tag = uuid.uuid4().hex
    # The tag first: two conversations differ from their first block on (a tag later in the
    # text would leave a first block two conversations share, read from the cache).
    system = f"{tag}: " + "You are a terse assistant. " * 8  # a few KV blocks
    ask = "What is the weather in Oslo?"
    anthropic_messages = [
        {"role": "user", "content": ask},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 C"}]},
    ]
    openai_messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": ask},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "12 C"},
    ]
    tools = [{"name": "get_weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    return system, anthropic_messages, openai_messages, tools


def _anthropic(server: ServerProcess, model: str, system: str, messages: list[dict],
               tools: list[dict]) -> dict:
    r = httpx.post(server.url + "/v1/messages", timeout=60, json={
        "model": model, "max_tokens": 2, "system": system, "messages": messages,
        "tools": tools, "tool_choice": {"type": "none"}})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def _openai(client, model: str, messages: list[dict]):
    openai_tools = [{"type": "function", "function": {"name": "get_weather"}}]
    return client.chat.completions.create(model=model, max_tokens=2, messages=messages,
                                          tools=openai_tools, tool_choice="none").usage


def _all_full_blocks(prompt: int) -> int:
    """What the cache holds of a prompt rendered alike: every full block before its last
    token (the tests' block size is 16), so a rendering that differed anywhere before the
    last block would read less."""
    return (prompt - 1) // 16 * 16


@pytest.mark.parametrize("first", ["anthropic", "openai"])
def test_the_other_dialect_reads_the_cached_prompt(server, client, model_name, first) -> None:
    system, a_messages, o_messages, tools = _conversation()
    if first == "anthropic":
        first_usage = _anthropic(server, model_name, system, a_messages, tools)
        assert first_usage["cache_read_input_tokens"] == 0  # a new conversation
        prompt = first_usage["input_tokens"]
        second = _openai(client, model_name, o_messages)
        assert second.prompt_tokens == prompt
        assert second.prompt_tokens_details.cached_tokens == _all_full_blocks(prompt)
    else:
        first_usage = _openai(client, model_name, o_messages)
        assert first_usage.prompt_tokens_details.cached_tokens == 0
        usage = _anthropic(server, model_name, system, a_messages, tools)
        assert usage["input_tokens"] + usage["cache_read_input_tokens"] == (
            first_usage.prompt_tokens)
        assert usage["cache_read_input_tokens"] == _all_full_blocks(first_usage.prompt_tokens)

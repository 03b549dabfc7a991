"""The Responses API's store (pagoda/entrypoints/openai/response_store.py): bounded in entries
and bytes (the oldest evicted first, an entry alone over the bytes never kept), each entry
seen and deleted only by its owner; and the input items read into chat messages."""
from __future__ import annotations

import pytest

from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.openai.response_store import ResponseStore, StoredResponse
from pagoda.entrypoints.openai.responses_input import read_input, seal_thinking, unseal_thinking
from pagoda.entrypoints.openai.responses_protocol import InputItem


def _entry(owner: str | None, text: str = "x") -> StoredResponse:
    return StoredResponse.of(owner, {"id": "r", "text": text},
                             [{"role": "user", "content": text}])


def test_entries_bound_evicts_the_oldest() -> None:
    store = ResponseStore(max_entries=3, max_bytes=10**6)
    for i in range(5):
        assert store.put(f"r{i}", _entry(None))
    assert len(store) == 3
    assert store.get("r0", None) is None and store.get("r1", None) is None
    assert all(store.get(f"r{i}", None) is not None for i in (2, 3, 4))


def test_bytes_bound_evicts_until_it_fits() -> None:
    one = _entry(None, "y" * 100).size
    store = ResponseStore(max_entries=100, max_bytes=3 * one)
    for i in range(4):
        store.put(f"r{i}", _entry(None, "y" * 100))
    assert len(store) == 3 and store.bytes == 3 * one and store.get("r0", None) is None
    assert not store.put("big", _entry(None, "y" * (4 * one)))  # alone over the bound
    assert store.get("big", None) is None and len(store) == 3
    assert store.put("r9", _entry(None, "y" * 150))  # larger than one: the two oldest go
    assert store.bytes <= 3 * one and store.get("r9", None) is not None
    assert store.get("r1", None) is None and store.get("r2", None) is None


def test_owners_see_only_their_own() -> None:
    store = ResponseStore()
    store.put("r", _entry("key-a"))
    assert store.get("r", "key-b") is None and store.get("r", None) is None
    assert not store.delete("r", "key-b")
    assert store.get("r", "key-a") is not None
    assert store.delete("r", "key-a") and store.get("r", "key-a") is None
    assert store.bytes == 0


def test_put_again_replaces() -> None:
    store = ResponseStore()
    store.put("r", _entry(None, "a"))
    store.put("r", _entry(None, "bb"))
    assert len(store) == 1 and store.bytes == _entry(None, "bb").size


def _items(*items: dict) -> list[InputItem]:
    return [InputItem.model_validate(i) for i in items]


def test_calls_join_their_turn_and_outputs_must_answer_one() -> None:
    history = [{"role": "user", "content": "hi"}]
    messages = read_input(_items(
        {"type": "reasoning", "summary": [], "encrypted_content": seal_thinking("hmm")},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
    ), history)
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "hmm",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "done"},
    ]
    assert history == [{"role": "user", "content": "hi"}]  # not changed
    with pytest.raises(ApiError) as e:
        read_input(_items({"type": "function_call_output", "call_id": "c2", "output": "x"}),
                   messages)
    assert e.value.param == "input[0].call_id"
    follow = read_input(_items({"type": "function_call_output", "call_id": "c1",
                                "output": "again"}), messages)
    assert follow[-1]["content"] == "again"
    # a call joining a turn of the history leaves the stored history as it was
    stored = [{"role": "user", "content": "hi"}, messages[1]]
    more = read_input(_items({"type": "function_call", "call_id": "c3", "name": "g",
                              "arguments": "{}"}), stored)
    assert len(more[1]["tool_calls"]) == 2 and len(stored[1]["tool_calls"]) == 1


def test_sealed_thinking_round_trips() -> None:
    assert unseal_thinking(seal_thinking("ünïcode thought")) == "ünïcode thought"
    assert unseal_thinking("gAAAAB-someone-elses") is None
    assert unseal_thinking("pagoda-thinking:%%%") is None

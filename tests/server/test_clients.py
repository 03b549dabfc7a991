"""LangChain's ChatOpenAI against a live ``pagoda serve``, as applications use it: a plain
call, ``with_structured_output`` (a JSON schema), and ``bind_tools`` with the tool's answer
sent back for a second turn (LangChain's own assistant and tool messages)."""
from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel

langchain_openai = pytest.importorskip("langchain_openai",
                                       reason="langchain-openai is in the test extra")


class City(BaseModel):
    """A city and its size class (closed values: the tiny model's answer stays short)."""

    name: Literal["Oslo", "Rome"]
    size: Literal[1, 2]


def _chat(server, model_name: str):
    return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused",
                                       model=model_name, temperature=0, max_tokens=60,
                                       max_retries=0)


def test_invoke(server, model_name):
    reply = _chat(server, model_name).invoke("Name a river.")
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"]
    assert reply.usage_metadata["output_tokens"] > 0


def test_with_structured_output(server, model_name):
    city = _chat(server, model_name).with_structured_output(City).invoke("Give me a city.")
    assert isinstance(city, City)


def test_bind_tools_and_the_tool_answer_sent_back(server, model_name):
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = _chat(server, model_name).bind_tools([City], tool_choice="City", strict=True)
    question = HumanMessage("Which city should I visit?")
    ai = llm.invoke([question])
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "City", ai
    City(**ai.tool_calls[0]["args"])  # the arguments follow the tool's schema
    answer = ToolMessage("noted", tool_call_id=ai.tool_calls[0]["id"])
    follow = _chat(server, model_name).invoke([question, ai, answer])
    assert isinstance(follow.content, str)

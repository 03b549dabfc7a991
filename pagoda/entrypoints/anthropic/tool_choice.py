"""Anthropic's tool fields -> the request's :class:`~pagoda.entrypoints.tools.ToolPlan`.

- ``tool_choice`` ``none`` (or no tools): no plan; the tools are left out of the prompt.
- ``auto`` (the default with tools): the model writes calls in its own format, read by the
  server's ``--tool-call-parser`` (a 400 says so when the server has none).
- ``any``: constrained by the grammar to calls of the tools (OpenAI's ``required``);
  ``tool`` with a ``name``: to that tool's input (OpenAI's named function).
- ``disable_parallel_tool_use: true``: one call at most.

A tool's ``input_schema`` is its parameters' JSON schema. A server tool (a ``type`` other
than ``custom``: ``web_search_…``, ``bash_…``, ``text_editor_…``, ``computer_…``) is
refused by name: this server runs no tools itself. Invariant: every inconsistency is a 400
naming the field.
"""

from __future__ import annotations

from typing import Any, Optional

from pagoda.entrypoints.anthropic.protocol import Conversation, Tool
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.tools import AUTO_NEEDS, ToolPlan, distinct_names, require_parser

CLIENT_TOOL_TYPES = (None, "custom")


def plan_for(req: Conversation, parser: Optional[str]) -> Optional[ToolPlan]:
    """The request's tool plan (None: no tools, or ``tool_choice`` none)."""
    tools = tuple(_definition(t, i) for i, t in enumerate(req.tools or []))
    choice = req.tool_choice
    kind = choice.type if choice is not None else ("auto" if tools else "none")
    if kind == "none" or not tools:
        if kind not in ("none", "auto"):
            raise ApiError(400, f"tool_choice {kind!r} needs tools", "tool_choice")
        return None
    names = distinct_names(tools)
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    if kind == "auto":
        require_parser(parser, AUTO_NEEDS, "tool_choice", '"any" or "tool" work without one')
        return ToolPlan("auto", tools, parallel=parallel, parser=parser)
    if kind == "any":
        return ToolPlan("required", tools, parallel=parallel)
    assert choice is not None
    if choice.name is None:
        raise ApiError(400, 'tool_choice of type "tool" needs a name', "tool_choice.name")
    if choice.name not in names:
        raise ApiError(
            400, f"tool_choice names {choice.name!r}, which is not in tools", "tool_choice.name"
        )
    return ToolPlan("named", tools, name=choice.name, parallel=parallel)


def _definition(tool: Tool, i: int) -> dict[str, Any]:
    """A client tool as a function definition (what ToolPlan and templates take)."""
    if tool.type not in CLIENT_TOOL_TYPES:
        raise ApiError(
            400,
            f"tools[{i}]: the server tool {tool.type!r} is not supported; this server runs "
            "no tools itself (give client tools an input_schema)",
            f"tools[{i}].type",
        )
    if tool.input_schema is None:
        raise ApiError(400, f"tools[{i}].input_schema is required", f"tools[{i}].input_schema")
    fn: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        fn["description"] = tool.description
    fn["parameters"] = tool.input_schema
    return fn

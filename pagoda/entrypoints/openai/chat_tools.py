"""OpenAI's tool fields on ``/v1/chat/completions`` -> the request's :class:`ToolPlan`.

- ``tool_choice: "none"`` (or no tools): no plan; the tools are left out of the prompt.
- ``"auto"`` (the default with tools): the model writes calls in its own format, read by
  the server's ``--tool-call-parser``.
- ``"required"`` or ``{"type": "function", "function": {"name": ...}}``: the output is
  constrained to calls (any of the tools, or the named one's arguments).
- ``parallel_tool_calls: false``: one call at most.

What a plan does is ``entrypoints/tools.py``'s; this module only reads OpenAI's spelling of
it, and refuses (400, naming the field) what does not hold together.
"""

from __future__ import annotations

from typing import Any, Optional

from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.tools import AUTO_NEEDS, ToolPlan, distinct_names, require_parser


def plan_for(req: ChatCompletionRequest, parser: Optional[str]) -> Optional[ToolPlan]:
    """The request's tool plan (None: no tools, or ``tool_choice`` "none"); ApiError naming
    the field when the request is inconsistent."""
    tools = tuple(t.function.model_dump(by_alias=True, exclude_none=True) for t in req.tools or [])
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none" or not tools:
        if not isinstance(choice, str) or choice not in ("none", "auto"):
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        return None
    names = distinct_names(tools, "function names")
    constrained = req.response_format is not None and req.response_format.type != "text"
    if choice != "auto" and (constrained or req.structured_outputs is not None):
        raise ApiError(
            400,
            f"tool_choice {_choice_name(choice)!r} constrains the output "
            "itself; it cannot be combined with response_format or "
            "structured_outputs",
            "tool_choice",
        )
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, str):
        if choice == "auto":
            require_parser(
                parser, AUTO_NEEDS, "tool_choice", '"required" or a named function work without one'
            )
        return ToolPlan(choice, tools, parallel=parallel, parser=parser)
    name = choice.function.name
    if name not in names:
        raise ApiError(
            400, f"tool_choice names {name!r}, which is not in tools", "tool_choice.function.name"
        )
    return ToolPlan("named", tools, name=name, parallel=parallel)


def _choice_name(choice: Any) -> str:
    return choice if isinstance(choice, str) else "function"

"""OpenAI's Responses API: ``POST /v1/responses`` (an answer, whole or streamed),
``GET`` and ``DELETE /v1/responses/{response_id}`` (the stored ones).

A request's ``instructions`` (a system message first), the conversation its
``previous_response_id`` names (``response_store.py``) and its ``input`` items
(``responses_input.py``) are rendered with the model's chat template; its function
``tools`` / ``tool_choice`` / ``parallel_tool_calls`` become a tool plan (``tools.py``), its
``text.format`` an output grammar, ``reasoning.effort`` the template's ``reasoning_effort``;
all of it goes to the engine as one ApiRequest (``front_door.py``). The answer
(``answer.py``) becomes the response's items (``responses_output.py``) or its events
(``responses_stream.py``); with ``store`` (the default) the response and its conversation
are kept for ``GET`` and the next ``previous_response_id``, under the caller's API key.

Invariant: a key sees only its own stored responses (another's is a 404 like a missing
one), every refusal is a 4xx in OpenAI's shape naming the field, and a streamed response's
items equal the same answer's unstreamed.
"""

from __future__ import annotations

import json
import time
import weakref
from functools import partial
from typing import Any, Callable, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.engine.outputs import RequestOutput
from pagoda.entrypoints.answer import final_answers
from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported, tenant_salt
from pagoda.entrypoints.errors import ApiError, engine_value_error
from pagoda.entrypoints.front_door import (
    ApiRequest,
    FieldNames,
    FrontDoor,
    Outputs,
    Usage,
    client_closed,
)
from pagoda.entrypoints.openai.envelope import sse_response
from pagoda.entrypoints.openai.errors import OPENAI
from pagoda.entrypoints.openai.response_store import ResponseStore, StoredResponse
from pagoda.entrypoints.openai.responses_input import read_input
from pagoda.entrypoints.openai.responses_output import (
    Call,
    Job,
    Shape,
    Turn,
    new_id,
    output_items,
    reasoning_tokens,
    response_object,
    usage_object,
)
from pagoda.entrypoints.openai.responses_protocol import FunctionTool, ResponsesRequest
from pagoda.entrypoints.openai.responses_stream import ResponseEvents, response_events
from pagoda.entrypoints.tools import AUTO_NEEDS, ToolPlan, distinct_names, require_parser
from pagoda.sampling import SamplingParams, StructuredOutputsParams

UsageOf = Callable[[Usage, Optional[RequestOutput]], dict[str, Any]]
_STORES: weakref.WeakKeyDictionary[FrontDoor, ResponseStore] = weakref.WeakKeyDictionary()
FORMAT_RENAMES = {
    "structured_outputs.json": "text.format.schema",
    "structured_outputs.json_object": "text.format",
}


def store_of(ctx: ServerContext) -> ResponseStore:
    """The server's one store, shared by its three routes."""
    store = _STORES.get(ctx.door)
    if store is None:
        config = ctx.config
        store = ResponseStore(config.responses_store_entries, config.responses_store_bytes)
        _STORES[ctx.door] = store
    return store


# ---------------------------------------------------------------- the routes
def endpoint(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/responses``."""
    serving = Responses(ctx)

    async def create_response(body: ResponsesRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await serving.create(body, raw), ignored)

    return Endpoint(create_response, OPENAI, OPENAI.error_responses(400, 401, 404, 413, 429, 503))


def retrieve(ctx: ServerContext) -> Endpoint:
    """``GET /v1/responses/{response_id}``: a stored response, as it was answered."""
    store = store_of(ctx)

    async def get_response(response_id: str, raw: Request) -> Response:
        entry = store.get(response_id, tenant_salt(raw))
        if entry is None:
            raise _not_found(response_id, "response_id")
        return JSONResponse(entry.response)

    return Endpoint(get_response, OPENAI, OPENAI.error_responses(401, 404))


def delete(ctx: ServerContext) -> Endpoint:
    """``DELETE /v1/responses/{response_id}``: forget a stored response."""
    store = store_of(ctx)

    async def delete_response(response_id: str, raw: Request) -> Response:
        if not store.delete(response_id, tenant_salt(raw)):
            raise _not_found(response_id, "response_id")
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    return Endpoint(delete_response, OPENAI, OPENAI.error_responses(401, 404))


def _not_found(response_id: str, param: str) -> ApiError:
    return ApiError(404, f"no response with id {response_id!r} is stored", param, "not_found")


# ---------------------------------------------------------------- serving
class Responses:
    def __init__(self, ctx: ServerContext) -> None:
        self.door = ctx.door
        self.store = store_of(ctx)

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        job = self.job(req, raw, time.monotonic())
        sub = await self.door.submit(job.id, job.request)
        if req.stream:
            events = ResponseEvents(job)
            keep = partial(self._keep, job)
            return sse_response(response_events(self.door, sub, events, self._usage(job), keep))
        outputs = await self.door.collect(sub, raw)
        if outputs is None:
            return client_closed()
        turn, final = _turn(job.request, outputs)
        usage = self._usage(job)(Usage.of(job.request, outputs), final)
        response = response_object(job, turn.status, output_items(turn, job.shape), usage)
        self._keep(job, turn, response)
        return JSONResponse(response)

    def _usage(self, job: Job) -> UsageOf:
        """The response's usage from the engine's counts and the finished output."""
        tokenizer = self.door.tokenizer

        def usage(counts: Usage, final: Optional[RequestOutput]) -> dict[str, Any]:
            comp = final.outputs[0] if final is not None and final.outputs else None
            thought = reasoning_tokens(tokenizer, job.request, comp) if comp is not None else 0
            return usage_object(counts, thought)

        return usage

    def _keep(self, job: Job, turn: Turn, response: dict[str, Any]) -> None:
        if job.req.store is not False:
            conversation = [*job.conversation, turn.history()]
            self.store.put(job.id, StoredResponse.of(job.owner, response, conversation))

    # ------------------------------------------------------------ the request
    def job(self, req: ResponsesRequest, raw: Request, arrival: float) -> Job:
        lora = self.door.check_model(req.model)
        owner = tenant_salt(raw)
        conversation = read_input(req.input, self._history(req, owner))
        plan = tool_plan(req, self.door.tool_call_parser)
        params = sampling_params(req)
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        defs = plan.template_tools() if plan is not None else None
        ids = self._render([*system, *conversation], defs, template_kwargs(req))
        names = FieldNames(_renames(plan, params), "input")
        request = self.door.conversation_request(
            ids, params, arrival, names, owner, plan, lora=lora
        )
        return Job(new_id("resp"), req, request, conversation, owner, Shape.of(req))

    def _history(self, req: ResponsesRequest, owner: Optional[str]) -> list[dict[str, Any]]:
        """The conversation ``previous_response_id`` names (404 if it is not the caller's)."""
        if req.previous_response_id is None:
            return []
        entry = self.store.get(req.previous_response_id, owner)
        if entry is None:
            raise _not_found(req.previous_response_id, "previous_response_id")
        return entry.conversation

    def _render(
        self,
        messages: list[dict[str, Any]],
        tool_defs: Optional[list[dict[str, Any]]],
        kwargs: dict[str, Any],
    ) -> list[int]:
        try:
            return self.door.engine.encode_chat(messages, tool_defs, **kwargs)
        except Exception as e:  # noqa: BLE001 - a template may reject any conversation
            raise ApiError(
                400, f"input could not be rendered with the chat template: {e}", "input"
            ) from None


def _renames(plan: Optional[ToolPlan], params: SamplingParams) -> dict[str, str]:
    """How the engine's names read in this request's terms: the grammar is the tools' (a
    required or named call) or ``text.format``'s."""
    renames = {"max_tokens": "max_output_tokens"}
    if plan is not None and plan.constraint() is not None:
        renames["structured_outputs.json"] = "tools"
    elif params.structured_outputs is not None:
        renames.update(FORMAT_RENAMES)
    return renames


def _turn(request: ApiRequest, outputs: Outputs) -> tuple[Turn, Optional[RequestOutput]]:
    """The finished answer (the one choice of the one prompt), and its output."""
    for _, out, a in final_answers(request, outputs):
        calls = [Call(c.id, c.name, c.arguments) for c in a.tool_calls]
        return Turn(a.reasoning, a.content, calls, a.finish_reason), out
    return Turn(finish_reason="abort"), None


# ---------------------------------------------------------------- the fields
def sampling_params(req: ResponsesRequest) -> SamplingParams:
    values: dict[str, Any] = {
        "max_tokens": req.max_output_tokens,
        "structured_outputs": text_constraint(req),
    }
    if req.temperature is not None:
        values["temperature"] = req.temperature
    if req.top_p is not None:
        values["top_p"] = req.top_p
    try:
        return SamplingParams(**values)
    except ValueError as e:
        raise engine_value_error(e, {"max_tokens": "max_output_tokens", **FORMAT_RENAMES}) from None


def text_constraint(req: ResponsesRequest) -> Optional[StructuredOutputsParams]:
    """``text.format``'s grammar: none for text, any JSON object, or the schema's JSON."""
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.schema_ is None:
        raise ApiError(400, "text.format of type json_schema needs schema", "text.format.schema")
    return StructuredOutputsParams(json=json.dumps(fmt.schema_))


def template_kwargs(req: ResponsesRequest) -> dict[str, Any]:
    """The chat template's variables: the assistant's turn opened, and ``reasoning.effort``
    given as ``reasoning_effort`` (as chat's field is)."""
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    if req.reasoning is not None and req.reasoning.effort is not None:
        kwargs["reasoning_effort"] = req.reasoning.effort
    return kwargs


def tool_plan(req: ResponsesRequest, parser: Optional[str]) -> Optional[ToolPlan]:
    """The request's tool plan (None: no tools, or ``tool_choice`` "none"); a 400 naming the
    field for a built-in tool, or a choice that does not hold together."""
    tools = tuple(_function(i, t) for i, t in enumerate(req.tools or []))
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if not isinstance(choice, str):
        if choice.type != "function":
            raise ApiError(
                400,
                f"tool_choice of type {choice.type!r} is not supported by this server "
                "(function tools only)",
                "tool_choice.type",
            )
        if choice.name is None:
            raise ApiError(400, "a function tool_choice needs name", "tool_choice.name")
    if choice == "none" or not tools:
        if choice not in ("none", "auto"):
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        return None
    names = distinct_names(tools)
    if choice != "auto" and text_constraint(req) is not None:
        raise ApiError(
            400,
            "a required or named tool_choice constrains the output itself; it cannot be "
            "combined with text.format",
            "tool_choice",
        )
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, str):
        if choice == "auto":
            require_parser(
                parser, AUTO_NEEDS, "tool_choice", '"required" or a named function work without one'
            )
        return ToolPlan(choice, tools, parallel=parallel, parser=parser)
    if choice.name not in names:
        raise ApiError(
            400, f"tool_choice names {choice.name!r}, which is not in tools", "tool_choice.name"
        )
    return ToolPlan("named", tools, name=choice.name, parallel=parallel)


def _function(i: int, tool: FunctionTool) -> dict[str, Any]:
    """A function tool as a plan takes it; a built-in tool is refused by name."""
    if tool.type != "function":
        raise ApiError(
            400,
            f"the built-in tool {tool.type!r} is not supported by this server (only function "
            "tools: the client runs them)",
            f"tools[{i}].type",
        )
    if tool.name is None:
        raise ApiError(400, "a function tool needs name", f"tools[{i}].name")
    fn = tool.model_dump(exclude_none=True, exclude={"type"})
    return {k: v for k, v in fn.items() if k in ("name", "description", "parameters", "strict")}

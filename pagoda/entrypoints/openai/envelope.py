"""What every OpenAI answer carries around its choices, and how a stream of them is sent.

A whole answer is ``{id, object, created, model, choices, usage}``; a stream sends chunks
``{id, object, created, model, choices}`` as server-sent events (``data: {...}``), each with
``usage`` (null) when ``stream_options.include_usage`` asks for it (vLLM's
``continuous_usage_stats``: the usage so far), then a last chunk with no choices and the
usage, then ``data: [DONE]``. An engine that dies mid-stream ends it with an error event,
then ``[DONE]``.

Invariant: every chunk of a stream has the same id, object, created and model, and the
whole answer the same id and created as its stream would have.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from fastapi.responses import StreamingResponse

from pagoda.engine.outputs import RequestOutput
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import FrontDoor, Outputs, Submission, Usage
from pagoda.entrypoints.openai.errors import stream_error
from pagoda.entrypoints.openai.protocol import SamplingFields

DONE = "data: [DONE]\n\n"
ChunksOf = Callable[[int, RequestOutput], list[dict[str, Any]]]  # a new output's chunks


@dataclass(frozen=True)
class Envelope:
    id: str
    object: str  # the whole answer's: "text_completion", "chat.completion"
    chunk_object: str  # a stream chunk's: "text_completion", "chat.completion.chunk"
    model: str
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's: every chunk carries the usage so far
    created: int = field(default_factory=lambda: int(time.time()))

    @staticmethod
    def of(
        req: SamplingFields, response_id: str, obj: str, chunk_object: Optional[str] = None
    ) -> Envelope:
        options = req.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options and options.continuous_usage_stats)
        return Envelope(response_id, obj, chunk_object or obj, req.model, include_usage, continuous)

    def response(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_json(usage),
        }

    def chunk(
        self,
        choices: list[dict[str, Any]],
        usage: Optional[Usage] = None,
        so_far: Optional[Usage] = None,
    ) -> dict[str, Any]:
        """A stream chunk: ``usage`` on the last, ``so_far`` on the others when asked."""
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage_json(usage) if usage is not None else None
            if usage is None and self.continuous_usage and so_far is not None:
                chunk["usage"] = usage_so_far_json(so_far)
        return chunk


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def usage_so_far_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def kv_transfer_params(outputs: Outputs) -> Optional[dict]:
    """A prefill instance's answer: where the prompt's KV waits (the first prompt's)."""
    return next(
        (
            o.kv_transfer_params
            for o in outputs
            if o is not None and getattr(o, "kv_transfer_params", None)
        ),
        None,
    )


# ---------------------------------------------------------------- streaming
def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def sse(
    door: FrontDoor,
    sub: Submission,
    envelope: Envelope,
    chunks_of: ChunksOf,
    usage_of: Callable[[Outputs], Usage],
) -> AsyncIterator[str]:
    """The events of a stream: each new output's chunks, the usage, ``[DONE]``."""
    finals: dict[int, RequestOutput] = {}
    try:
        async with door.stream(sub) as outputs:
            async for i, out in outputs:
                for chunk in chunks_of(i, out):
                    yield sse_data(chunk)
                if out.finished:
                    finals[i] = out
        if envelope.include_usage:
            outs = [finals.get(i) for i in range(len(sub.streams))]
            yield sse_data(envelope.chunk([], usage=usage_of(outs)))
    except ApiError as e:  # the engine died
        yield sse_data(stream_error(e))
    yield DONE


def sse_data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

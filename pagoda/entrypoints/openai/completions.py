"""OpenAI's ``POST /v1/completions``: prompts in, text choices out (JSON, or SSE chunks).

One request may hold several prompts and ``n`` completions each; choice ``i * n + j`` is
completion ``j`` of prompt ``i``. Beyond OpenAI's fields: ``echo`` (each choice's text and
logprobs start with its prompt's; with ``max_tokens: 0`` the prompt alone is scored, as
lm-eval asks), vLLM's ``prompt_logprobs``, ``return_token_ids``, ``continuous_usage_stats``.
The request becomes one ApiRequest (``front_door.py``); the answers (``answer.py``) are
rendered here.

Invariant: a streamed choice's texts (the echoed prompt first) join to the non-streamed
choice's text, and its logprobs' tokens and values to the non-streamed ones.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.core.outputs import TokenLogprobs
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.entrypoints.answer import Answer, AnswerStreams, Delta, final_answers
from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.front_door import (
    ApiRequest,
    Outputs,
    Prompt,
    Submission,
    Usage,
    client_closed,
)
from pagoda.entrypoints.openai.envelope import (
    Envelope,
    kv_transfer_params,
    sse,
    sse_response,
)
from pagoda.entrypoints.openai.errors import OPENAI
from pagoda.entrypoints.openai.logprobs import Logprobs
from pagoda.entrypoints.openai.protocol import MAX_PROMPTS_PER_REQUEST, CompletionRequest
from pagoda.entrypoints.openai.sampling import (
    Asked,
    engine_request,
    max_tokens_name,
    sampling_params,
    truncated,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def endpoint(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/completions``."""
    serving = Completions(ctx)

    async def completions(body: CompletionRequest, raw: Request) -> Response:
        ignored = ctx.policy.check(body)
        return reported(await serving.create(body, raw), ignored)

    return Endpoint(completions, OPENAI, OPENAI.error_responses(400, 401, 404, 413, 429, 503))


@dataclass(frozen=True)
class Echo:
    """``echo``: each choice's text (and logprobs) starts with its prompt's; ``only``:
    ``max_tokens`` 0, the prompt scored and nothing generated (lm-eval's log-likelihood
    requests ask for one token and drop it; both work)."""

    only: bool = False


@dataclass
class _Job:
    """One request in flight: what it asked beyond the engine request, and what its stream
    has sent."""

    sub: Submission
    envelope: Envelope
    logprobs: Optional[int]  # the legacy object's k (None: no logprobs)
    echo: Optional[Echo] = None
    prompt_logprobs: Optional[int] = None  # vLLM's
    return_token_ids: bool = False  # vLLM's: token ids beside the text
    answers: Optional[AnswerStreams] = None
    echoed: dict[int, int] = field(default_factory=dict)  # choice -> prompt text sent

    @property
    def request(self) -> ApiRequest:
        return self.sub.request

    @property
    def generates_nothing(self) -> bool:
        """``echo`` with ``max_tokens`` 0: the one token generated is not the answer's."""
        return self.echo is not None and self.echo.only


class Completions:
    def __init__(self, ctx: ServerContext) -> None:
        self.door = ctx.door
        self.logprobs = Logprobs(ctx.door.tokenizer)

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        request, echo = self.engine_request(req, raw, arrival)
        sub = await self.door.submit(f"cmpl-{uuid.uuid4().hex}", request)
        job = _Job(
            sub,
            Envelope.of(req, sub.id, "text_completion"),
            request.sampling.logprobs,
            echo,
            req.prompt_logprobs,
            bool(req.return_token_ids),
        )
        if req.stream:
            job.answers = AnswerStreams(request)
            chunks, usage = partial(self._new_chunks, job), partial(self._usage, job)
            return sse_response(sse(self.door, sub, job.envelope, chunks, usage))
        outputs = await self.door.collect(sub, raw)
        if outputs is None:
            return client_closed()
        return JSONResponse(self._response(job, outputs))

    # ------------------------------------------------------------ the request
    def engine_request(
        self, req: CompletionRequest, raw: Request, arrival: float
    ) -> tuple[ApiRequest, Optional[Echo]]:
        lora = self.door.check_model(req.model)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        max_name = max_tokens_name(req)
        max_tokens = getattr(req, max_name)
        echo = Echo(only=max_tokens == 0) if req.echo else None
        asked = Asked(
            1 if echo is not None and echo.only else max_tokens,
            max_name,
            req.logprobs,
            "logprobs",
            _prompt_logprobs_needed(req.prompt_logprobs, req.logprobs if echo else None),
            DEFAULT_COMPLETION_MAX_TOKENS,
        )
        params = sampling_params(req, asked, self.door)
        prompts = truncated(
            self.prompts(req.prompt), req.truncate_prompt_tokens, self.door.engine.max_model_len
        )
        return engine_request(req, raw, prompts, params, arrival, "prompt", lora=lora), echo

    def prompts(self, prompt: Union[str, list]) -> list[Prompt]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise ApiError(400, "prompt must not be empty", "prompt")
        if len(items) > MAX_PROMPTS_PER_REQUEST:
            raise ApiError(
                400,
                f"prompt holds {len(items)} prompts; at most {MAX_PROMPTS_PER_REQUEST}",
                "prompt",
            )
        out: list[Prompt] = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise ApiError(400, "prompt must not be empty", "prompt")
                out.append(Prompt(self.door.engine.encode(item), item))
            else:
                out.append(Prompt(list(item)))
        return out

    # ------------------------------------------------------------ the whole answer
    def _response(self, job: _Job, outputs: Outputs) -> dict[str, Any]:
        choices = [
            self._choice(job, i, out, a) for i, out, a in final_answers(job.request, outputs)
        ]
        response = job.envelope.response(choices, self._usage(job, outputs))
        kv = kv_transfer_params(outputs)
        if kv is not None:
            response["kv_transfer_params"] = kv  # a prefill instance: where the KV waits
        return response

    def _choice(self, job: _Job, prompt_index: int, out: RequestOutput, a: Answer) -> dict:
        k = job.logprobs
        logprobs = self.logprobs.legacy(a.logprobs, 0, k or 0) if k is not None else None
        text = a.content
        if job.echo is not None:
            text, logprobs = self._echoed(job, prompt_index, out, a.content, a.logprobs)
        choice = {
            "index": a.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": a.finish_reason,
            "stop_reason": a.stop_reason,
        }
        if job.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.logprobs.vllm_prompt(out, job.prompt_logprobs)
        if job.return_token_ids:
            choice["prompt_token_ids"] = job.request.prompts[prompt_index].ids
            choice["token_ids"] = a.token_ids
        return choice

    def _echoed(
        self,
        job: _Job,
        prompt_index: int,
        out: RequestOutput,
        text: str,
        entries: list[TokenLogprobs],
    ) -> tuple[str, Optional[dict]]:
        """A choice's text and logprobs with its prompt's before them (``echo``)."""
        prompt = job.request.prompts[prompt_index]
        head = prompt.text if prompt.text is not None else self.door.tokenizer.decode(prompt.ids)
        if job.generates_nothing:
            text, entries = "", []
        if job.logprobs is None:
            return head + text, None
        scored = self.logprobs.legacy_prompt(prompt.ids, out.prompt_logprobs, job.logprobs)
        tail = self.logprobs.legacy(entries, len(head), job.logprobs)
        return head + text, {key: scored[key] + tail[key] for key in scored}

    @staticmethod
    def _usage(job: _Job, outputs: Outputs) -> Usage:
        counted = Usage.of(job.request, outputs)
        # an echo of the prompt alone generates none
        return replace(counted, completion_tokens=0) if job.generates_nothing else counted

    # ------------------------------------------------------------ streaming
    def _new_chunks(self, job: _Job, prompt_index: int, out: RequestOutput) -> list[dict]:
        assert job.answers is not None
        chunks = []
        for comp, stream in job.answers.live(prompt_index, out):
            if job.echo is not None and stream.index not in job.echoed:
                if not comp.token_ids and comp.finish_reason is None:
                    continue  # the prompt (and its logprobs) is still being computed
                chunks.append(self._echo_chunk(job, stream.index, prompt_index, out))
                job.echoed[stream.index] = len(chunks[-1]["choices"][0]["text"])
            delta = stream.feed(comp)
            if delta is None or self._held(job, delta):
                continue
            chunks.append(self._delta_chunk(job, delta, comp, out))
        return chunks

    @staticmethod
    def _held(job: _Job, delta: Delta) -> bool:
        """Under ``echo`` with ``max_tokens`` 0 the generated token is not sent: a delta
        that is neither the choice's first nor its last has nothing to say."""
        return job.generates_nothing and not delta.first and delta.finish_reason is None

    def _echo_chunk(self, job: _Job, index: int, prompt_index: int, out: RequestOutput) -> dict:
        """A streamed choice's first chunk under ``echo``: its prompt's text (and logprobs),
        before anything generated."""
        text, logprobs = self._echoed(job, prompt_index, out, "", [])
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
        return job.envelope.chunk([choice], so_far=self._so_far(job))

    def _delta_chunk(
        self, job: _Job, delta: Delta, comp: CompletionOutput, out: RequestOutput
    ) -> dict:
        text, entries = delta.content, delta.logprobs
        if job.generates_nothing:
            text, entries = "", []  # the prompt alone was asked for: its token is not sent
        logprobs = None
        if job.logprobs is not None:
            offset = delta.text_offset + job.echoed.get(delta.index, 0)
            logprobs = self.logprobs.legacy(entries, offset, job.logprobs)
        choice: dict[str, Any] = {
            "index": delta.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }
        chunk = job.envelope.chunk([choice], so_far=self._so_far(job))
        if job.return_token_ids:  # vLLM places the prompt's on the choice's first chunk
            choice["token_ids"] = [] if job.generates_nothing else delta.token_ids
            if delta.first:
                choice["prompt_token_ids"] = out.prompt_token_ids
        return chunk

    @staticmethod
    def _so_far(job: _Job) -> Usage:
        """vLLM's ``continuous_usage_stats``: the request's usage at this chunk."""
        assert job.answers is not None
        generated = 0 if job.generates_nothing else job.answers.num_generated
        return Usage(job.request.num_prompt_tokens, generated)


def _prompt_logprobs_needed(asked: Optional[int], echoed: Optional[int]) -> Optional[int]:
    """How many top tokens the engine keeps per prompt token: what ``prompt_logprobs`` asks,
    or what ``logprobs`` asks of an echoed prompt, whichever is more (None: neither)."""
    wanted = [k for k in (asked, echoed) if k is not None]
    return max(wanted) if wanted else None

"""OutputProcessor: from the core's token ids to what a user asked for.

It owns every piece of a user request's state that the scheduler does not need: its n
completions joined into one output (n > 1 runs as n sibling core requests, which the scheduler
holds and releases), each completion's text (incremental detokenizing, stop strings, and the
hold-back of a live stream), logprobs, timings, and the :class:`RequestOutput` it yields. It
never calls the core: what the core must do in turn (finish a request a stop string ended)
comes back in :class:`Processed`.
A pooling request has no completion: its one output comes when it finishes, with its pooled
vector (``RequestOutput.pooled``) and ``outputs`` empty (or, when it ended without a vector,
aborted or too long for the KV cache, one completion holding why).
Invariant: a completion's text as streamed is always a prefix of its final text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from pagoda.core.outputs import EngineCoreOutput, TokenLogprobs
from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.inspector import RequestDetail
from pagoda.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagoda.request import Request
from pagoda.sampling import SamplingParams


@dataclass
class _Child:
    """One of a user request's n completions."""

    index: int
    request: Request
    detok: IncrementalDetokenizer
    logprobs: Optional[list[TokenLogprobs]] = None
    # Its output tokens: the core's, up to a stop string that ended it inside a run of
    # several (speculative decoding), after which the core's tokens are dropped.
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    finish_detail: Optional[str] = None
    stop_reason: Optional[str | int] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class _Group:
    """A user request: its prompt and its children (one per completion)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    children: list[_Child] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    pooling: bool = False  # a pooling request: one output, when finished
    pooled: Optional[torch.Tensor] = None  # its vector, once computed

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


@dataclass
class Processed:
    """One step's results, and what the core must do about them."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stopped: list[tuple[str, str]] = field(default_factory=list)  # (core id, stop string)


class OutputProcessor:
    def __init__(
        self, tokenizer: Any, issue_kv_params: Optional[Callable[[Request], Optional[dict]]] = None
    ) -> None:
        """``issue_kv_params``: a prefill instance's signed ``kv_transfer_params`` for a
        finished request (None when colocated)."""
        self.tokenizer = tokenizer
        self._issue_kv_params = issue_kv_params
        self._groups: dict[str, _Group] = {}
        self._child_group: dict[str, tuple[_Group, _Child]] = {}
        self.num_generation_tokens = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    def add(
        self, request_id: str, prompt: Optional[str], requests: list[Request], arrival_time: float
    ) -> None:
        """A user request and its n core requests."""
        first = requests[0]
        params = first.sampling_params
        group = _Group(
            request_id, prompt, list(first.prompt_token_ids), params, RequestMetrics(arrival_time)
        )
        group.pooling = first.is_pooling
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None] * first.num_prompt_tokens
        for i, req in enumerate(requests):
            detok = IncrementalDetokenizer(
                self.tokenizer,
                first.prompt_token_ids,
                params.stop,
                params.include_stop_str_in_output,
                params.skip_special_tokens,
                params.min_tokens,
            )
            child = _Child(i, req, detok, [] if params.logprobs is not None else None)
            group.children.append(child)
            self._child_group[req.request_id] = (group, child)
        self._groups[request_id] = group

    def details(self, show_text: bool) -> dict[str, RequestDetail]:
        """Per live core request: its timings, and with ``show_text`` its prompt and the
        text generated so far (for the inspector)."""
        out = {}
        for rid, (group, child) in self._child_group.items():
            out[rid] = RequestDetail(
                group.metrics.first_scheduled_time,
                child.first_token_time,
                group.prompt if show_text else None,
                child.detok.stream_text if show_text else None,
            )
        return out

    def abort(self, request_id: str, now: float) -> list[str]:
        """Forget a user request; returns the core ids still live, for the core to end."""
        group = self._groups.get(request_id)
        if group is None:
            return []
        live = [c.request.request_id for c in group.children if c.finish_reason is None]
        for child in group.children:
            if child.finish_reason is None:
                child.finish_reason, child.finished_time = "abort", now
        self._forget(group)
        return live

    def process(
        self,
        outs: list[EngineCoreOutput],
        scheduled: dict[str, int],
        now: float,
        final_only: bool = False,
    ) -> Processed:
        """Apply a step's core outputs. Returns an output for every user request that
        changed, or with ``final_only`` (offline generation) only for those that finished: a
        streaming output copies the tokens so far, which for every running request at every
        step costs host time a GPU step waits on."""
        done = Processed()
        self._mark_scheduled(scheduled, now)
        touched: dict[str, _Group] = {}
        for out in outs:
            group, child = self._child_group[out.request_id]
            self._apply(group, child, out, now, done)
            touched[group.request_id] = group
        for group in touched.values():
            finished = group.finished
            if finished or not (final_only or group.pooling):
                done.outputs.append(self._make_output(group))
            if finished:
                self._forget(group)
        return done

    def _mark_scheduled(self, scheduled: dict[str, int], now: float) -> None:
        for rid in scheduled:
            group, _ = self._child_group[rid]
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now

    def _apply(
        self, group: _Group, child: _Child, out: EngineCoreOutput, now: float, done: Processed
    ) -> None:
        if out.prompt_logprobs is not None and group.prompt_logprobs is not None:
            start, entries = out.prompt_logprobs
            for j, lp in enumerate(entries):
                group.prompt_logprobs[start + 1 + j] = lp
        if out.pooled is not None:
            assert isinstance(out.pooled, torch.Tensor)  # made by the runner
            group.pooled = out.pooled
            child.first_token_time = group.metrics.first_token_time = now  # its one result
        if out.new_token_ids:
            self._take_tokens(group, child, out, now, done)
        if out.finish_reason is not None:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
            child.finish_detail = out.finish_detail or child.request.finish_detail
            child.finished_time = now

    def _take_tokens(
        self, group: _Group, child: _Child, out: EngineCoreOutput, now: float, done: Processed
    ) -> None:
        if child.first_token_time is None:
            child.first_token_time = now
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
        text_tokens = _text_tokens(child, out)
        stop_str = child.detok.update(text_tokens)
        if stop_str is not None:
            if out.finish_reason is None:
                done.stopped.append((out.request_id, stop_str))
            out.finish_reason, out.stop_reason = "stop", stop_str
            if child.detok.num_taken < len(text_tokens):  # completed inside a run: cut it
                out.new_token_ids = out.new_token_ids[: child.detok.num_taken]
        new = out.new_token_ids
        self.num_generation_tokens += len(new)
        child.token_ids.extend(new)
        if child.logprobs is not None and out.logprobs is not None:
            child.logprobs.extend(out.logprobs[: len(new)])

    def _make_output(self, group: _Group) -> RequestOutput:
        completions = [_completion(c) for c in group.children]
        tpot = None
        c0 = group.children[0]
        if c0.finished_time and c0.first_token_time and len(c0.token_ids) > 1:
            tpot = (c0.finished_time - c0.first_token_time) / (len(c0.token_ids) - 1)
        finished = group.finished
        if finished:
            group.metrics.finished_time = max(c.finished_time or 0.0 for c in group.children)
        kv_params = (
            self._issue_kv_params(c0.request)
            if finished and self._issue_kv_params is not None
            else None
        )
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_token_ids,
            [] if group.pooled is not None else completions,
            finished,
            group.metrics,
            tpot,
            group.prompt_logprobs,
            c0.request.num_cached_tokens or 0,
            kv_params,
            group.pooled,
        )

    def _forget(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        for child in group.children:
            self._child_group.pop(child.request.request_id, None)


def _text_tokens(child: _Child, out: EngineCoreOutput) -> list[int]:
    """The tokens whose text joins the output: a stop token (a stop_token_ids entry or EOS)
    that ended the request stays in token_ids but not in the text."""
    params = child.request.sampling_params
    if out.finish_reason == "stop" and not params.include_stop_str_in_output:
        last = out.new_token_ids[-1]
        if last in params.stop_token_ids or last in child.request.eos_token_ids:
            return out.new_token_ids[:-1]
    return out.new_token_ids


def _completion(child: _Child) -> CompletionOutput:
    ids = list(child.token_ids)
    cumulative = sum(lp.logprob for lp in child.logprobs) if child.logprobs is not None else None
    text = child.detok.text if child.finish_reason is not None else child.detok.stream_text
    return CompletionOutput(
        child.index,
        text,
        ids,
        child.finish_reason,
        child.stop_reason,
        child.finish_detail,
        list(child.logprobs) if child.logprobs is not None else None,
        cumulative,
    )

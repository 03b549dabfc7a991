"""Scheduler: continuous batching (Orca, OSDI'22) with chunked prefill (Sarathi-Serve, OSDI'24).

Every step it hands out a token budget: running requests first (decodes, then continuing
prefill chunks), then waiting requests in arrival order. A prompt longer than what is left of
the budget is computed in chunks over several steps while decodes keep running. When blocks
run out, the most recently admitted running request is preempted (its blocks freed, its
tokens recomputed later). With prefix caching, a request being admitted starts on the longest
run of its full blocks already in the cache (SGLang's RadixAttention idea, by block hash), and
cached free blocks are evicted before anyone is preempted. Invariant: a live request is in exactly one of waiting / running,
and only running requests hold blocks.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Optional

from pagoda.config import SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.outputs import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput,
                                 NewRequestData, SchedulerOutput)
from pagoda.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}    # every live request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # in admission order: last = newest
        self._runner_knows: set[str] = set()      # ids the model runner holds state for
        self._finished_ids: set[str] = set()      # to tell the runner at the next step
        self._preempted_ids: set[str] = set()
        self._pending: list[EngineCoreOutput] = []  # finished outside a step (ignored, aborted)
        self._seed_offsets: dict[str, int] = {}
        self.num_preemptions = 0
        self.prefix_cache_queries = 0   # tokens of admitted requests looked up in the cache
        self.prefix_cache_hits = 0      # of those, tokens found there

    # ------------------------------------------------------------------ intake
    def add_request(self, request: Request, seed_offset: int = 0) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._seed_offsets[request.request_id] = seed_offset
        if self._can_never_fit(request):
            self._finish(request, RequestStatus.FINISHED_IGNORED, self._too_big_detail(request))
            return
        self.waiting.append(request)

    def add_request_first(self, request: Request, seed_offset: int = 0) -> None:
        """Queue at the front (n > 1 siblings that arrived with a request already running)."""
        self.add_request(request, seed_offset)
        if self.waiting and self.waiting[-1] is request:
            self.waiting.rotate(1)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus,
                        stop_reason: Optional[str | int] = None) -> None:
        """End live requests from outside a step: aborts, and stop strings found by the engine."""
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            request.stop_reason = stop_reason
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            self._finish(request, status, emit=False)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.config.step_token_budget
        scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        budget = self._schedule_running(budget, scheduled, new_blocks)
        self._schedule_waiting(budget, scheduled, new_blocks)
        return self._make_output(scheduled, new_blocks)

    def _schedule_running(self, budget: int, scheduled: dict[str, int],
                          new_blocks: dict[str, list[int]]) -> int:
        # Decodes first (one token each), then continuing prefill chunks; stable in admission order.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        for request in order:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            blocks = self._allocate_or_preempt(request, num_new, scheduled, new_blocks)
            if blocks is None:
                # Preemption may have un-scheduled requests: their tokens return to the budget.
                budget = self.config.step_token_budget - sum(scheduled.values())
                continue
            scheduled[request.request_id] = num_new
            new_blocks[request.request_id] = blocks
            budget -= num_new
        return self.config.step_token_budget - sum(scheduled.values())

    def _allocate_or_preempt(self, request: Request, num_new: int, scheduled: dict[str, int],
                             new_blocks: dict[str, list[int]]) -> Optional[list[int]]:
        """Allocate slots, preempting the newest running requests until they fit.

        Returns None when ``request`` itself had to go (preempted, or finished because it
        cannot fit even alone).
        """
        while True:
            blocks = self.kv.allocate_slots(request, num_new)
            if blocks is not None:
                return blocks
            if self.running == [request]:
                self.running.remove(request)
                self._finish(request, RequestStatus.FINISHED_LENGTH,
                             "the KV cache is full even with this request alone "
                             f"({self.kv.pool.num_blocks} blocks)")
                return None
            victim = self.running[-1]
            self._preempt(victim, scheduled, new_blocks)
            if victim is request:
                return None

    def _preempt(self, request: Request, scheduled: dict[str, int],
                 new_blocks: dict[str, list[int]]) -> None:
        """Recompute-style preemption: free the blocks, rewind, queue at the front."""
        self.running.remove(request)
        scheduled.pop(request.request_id, None)  # un-schedule it if it went earlier this step
        new_blocks.pop(request.request_id, None)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        if request.request_id in self._runner_knows:
            self._runner_knows.discard(request.request_id)
            self._preempted_ids.add(request.request_id)

    def _schedule_waiting(self, budget: int, scheduled: dict[str, int],
                          new_blocks: dict[str, list[int]]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._can_never_fit(request):
                self.waiting.popleft()
                self._finish(request, RequestStatus.FINISHED_LENGTH, self._too_big_detail(request))
                continue
            computed_blocks = self._computed_prefix(request)
            num_computed = len(computed_blocks) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            blocks = self.kv.allocate_slots(request, num_new, computed_blocks)
            if blocks is None:
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed
            self._count_prefix_hit(request, num_computed)
            scheduled[request.request_id] = num_new
            new_blocks[request.request_id] = blocks
            budget -= num_new

    def _computed_prefix(self, request: Request) -> list[int]:
        """Blocks whose KV a request being admitted can start on: a prefix-cache hit, or
        (with caching off) the prompt blocks an n > 1 sibling has computed."""
        if request.sampling_params.prompt_logprobs is not None:
            return []  # it needs the logits of every prompt position
        if self.kv.enable_prefix_caching:
            return self.kv.get_computed_blocks(request)
        donor = self.requests.get(request.prefix_donor) if request.prefix_donor else None
        if donor is None or donor.status is not RequestStatus.RUNNING:
            return []
        return self.kv.sibling_blocks(request, donor)

    def _count_prefix_hit(self, request: Request, num_computed: int) -> None:
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_computed  # first admission only, as reported
        if self.kv.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_computed

    def _can_never_fit(self, request: Request) -> bool:
        return self.kv.num_blocks_for(request.num_tokens + 1) > self.kv.pool.num_blocks

    def _too_big_detail(self, request: Request) -> str:
        return (f"the request needs {self.kv.num_blocks_for(request.num_tokens + 1)} KV blocks "
                f"but the cache has only {self.kv.pool.num_blocks}")

    def _make_output(self, scheduled: dict[str, int],
                     new_blocks: dict[str, list[int]]) -> SchedulerOutput:
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        for rid in scheduled:
            request = self.requests[rid]
            if rid in self._runner_knows:
                cached_reqs.append(CachedRequestData(rid, new_blocks[rid],
                                                     request.num_computed_tokens))
                continue
            self._runner_knows.add(rid)
            new_reqs.append(NewRequestData(
                request_id=rid, token_ids=list(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens,
                sampling_params=request.sampling_params, eos_token_ids=request.eos_token_ids,
                block_ids=list(self.kv.block_ids(rid)),
                num_computed_tokens=request.num_computed_tokens,
                seed_offset=self._seed_offsets.get(rid, 0)))
        output = SchedulerOutput(new_reqs, cached_reqs, scheduled,
                                 finished_request_ids=self._finished_ids,
                                 preempted_request_ids=self._preempted_ids)
        self._finished_ids, self._preempted_ids = set(), set()
        return output

    # ------------------------------------------------------------------ update
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs, self._pending = self._pending, []
        for rid, num_new in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += num_new
            out = self._process_sample(request, runner_output)
            prompt_lp = runner_output.prompt_logprobs.get(rid)
            if prompt_lp is not None:
                out = out or EngineCoreOutput(rid, [])
                out.prompt_logprobs = prompt_lp
            if out is not None:
                outputs.append(out)
        return outputs

    def _process_sample(self, request: Request,
                        runner_output: ModelRunnerOutput) -> Optional[EngineCoreOutput]:
        token = runner_output.sampled_token_ids.get(request.request_id)
        if token is None:
            return None
        request.append_output_token(token)
        out = EngineCoreOutput(request.request_id, [token],
                               logprobs=runner_output.logprobs.get(request.request_id))
        status = self._stop_status(request, token)
        if status is not None:
            self.running.remove(request)
            self._finish(request, status, emit=False)
            out.finish_reason = request.status.finish_reason
            out.stop_reason = request.stop_reason
        return out

    def _stop_status(self, request: Request, token: int) -> Optional[RequestStatus]:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token in request.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus, detail: Optional[str] = None,
                emit: bool = True) -> None:
        """Free everything a request holds and forget it."""
        request.status = status
        request.finish_detail = detail
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._seed_offsets.pop(request.request_id, None)
        if request.request_id in self._runner_knows:
            self._runner_knows.discard(request.request_id)
            self._finished_ids.add(request.request_id)
        if emit:
            self._pending.append(EngineCoreOutput(
                request.request_id, [], finish_reason=status.finish_reason,
                finish_detail=detail))

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        live = set(self.requests)
        in_waiting = {r.request_id for r in self.waiting}
        in_running = {r.request_id for r in self.running}
        assert len(in_waiting) == len(self.waiting), "a request is queued twice"
        assert not in_waiting & in_running, "a request is both waiting and running"
        assert in_waiting | in_running == live, "a live request is neither waiting nor running"
        assert set(self.kv.req_blocks) <= in_running, "a request that is not running holds blocks"

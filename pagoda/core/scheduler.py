"""Scheduler: continuous batching (Orca, OSDI'22) with chunked prefill (Sarathi-Serve, OSDI'24).

Every step it hands out a token budget: running requests first (decodes, then continuing
prefill chunks), then waiting requests in arrival order. A prompt longer than what is left of
the budget is computed in chunks over several steps while decodes keep running. When blocks
run out, the most recently admitted running request is preempted (its blocks freed, its
tokens recomputed later). With prefix caching, a request being admitted starts on the longest
run of its full blocks already in the cache (SGLang's RadixAttention idea, by block hash), and
cached free blocks are evicted before anyone is preempted. Invariant: a live request is in exactly one of waiting / running,
and only running requests hold blocks.

Scheduling a token advances ``num_computed_tokens`` at once, and a request that will sample
gets a placeholder for its next token. So the next step can be scheduled before this one's
tokens are read (async scheduling, see ``LLMEngine``): a decode whose token is a placeholder
is scheduled like any other, its input read on the device from the step before.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Iterable, Optional

from pagoda.config import KVTransferConfig, SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager, cdiv
from pagoda.core.outputs import (CachedRequestData, EngineCoreOutput, KVEvents, KVLoad,
                                 ModelRunnerOutput, NewRequestData, SchedulerOutput)
from pagoda.kv_transfer.leases import LeaseTable
from pagoda.kv_transfer.params import RemotePrefill
from pagoda.request import Request, RequestStatus

logger = logging.getLogger(__name__)

LEASE_HOLDER_PREFIX = "lease:"  # block-table key of a finished request's leased blocks


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
        # Disaggregated prefill (None when colocated): see the "remote KV" section below.
        self.kv_transfer: Optional[KVTransferConfig] = None
        self.kv_address: tuple[str, int] = ("", 0)   # our side channel, for decode instances
        self.leases: Optional[LeaseTable] = None
        self.loading: dict[str, Request] = {}     # waiting for remote KV; they hold blocks
        self._kv_loads: list[KVLoad] = []
        self._kv_releases: list[RemotePrefill] = []
        self._lease_counter = 0
        self.num_kv_load_failures = 0

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
            if request.status is RequestStatus.WAITING_FOR_REMOTE_KV:
                self._abort_loading(request, status)
                continue
            self._dequeue(request)
            self._finish(request, status, emit=False)

    def _dequeue(self, request: Request) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def take_pending_outputs(self) -> list[EngineCoreOutput]:
        """Outputs of requests finished outside a step (e.g. a failed remote KV pull)."""
        outputs, self._pending = self._pending, []
        return outputs

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
        self.expire_leases()
        budget = self.config.step_token_budget
        scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        budget = self._schedule_running(budget, scheduled, new_blocks)
        self._schedule_waiting(budget, scheduled, new_blocks)
        output = self._make_output(scheduled, new_blocks)
        self._advance(scheduled)
        return output

    def _advance(self, scheduled: dict[str, int]) -> None:
        """The scheduled tokens count as computed from now on; a request that reaches its
        end samples, and holds a placeholder for that token until the output is read."""
        for rid, num_new in scheduled.items():
            request = self.requests[rid]
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens_with_placeholders:
                request.num_output_placeholders += 1

    def _schedule_running(self, budget: int, scheduled: dict[str, int],
                          new_blocks: dict[str, list[int]]) -> int:
        # Decodes first (one token each), then continuing prefill chunks; stable in admission order.
        order = sorted(self.running,
                       key=lambda r: r.num_tokens_with_placeholders - r.num_computed_tokens > 1)
        for request in order:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING or self._ends_in_flight(request):
                continue  # preempted earlier in this step, or its last token is in flight
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens,
                          budget)
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

    def _ends_in_flight(self, request: Request) -> bool:
        """Async scheduling: the token in flight is the request's last by length (max_tokens
        or the context), so nothing after it is worth computing."""
        if not request.num_output_placeholders:
            return False
        return (request.num_output_tokens + request.num_output_placeholders >= request.max_tokens
                or request.num_tokens_with_placeholders >= self.config.max_model_len)

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
        while self.waiting and budget > 0 and self._num_seqs < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_output_placeholders:
                break  # preempted with a token in flight: readmitted once it is read
            if self._can_never_fit(request):
                self.waiting.popleft()
                self._finish(request, RequestStatus.FINISHED_LENGTH, self._too_big_detail(request))
                continue
            computed_blocks = self._computed_prefix(request)
            if self._wants_remote_kv(request, computed_blocks):
                if not self._start_remote_load(request, computed_blocks):
                    break  # no blocks for it yet: FCFS, as for any request
                continue
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

    @property
    def _num_seqs(self) -> int:
        return len(self.running) + len(self.loading)

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
                                 preempted_request_ids=self._preempted_ids,
                                 kv_loads=self._kv_loads, kv_releases=self._kv_releases)
        self._finished_ids, self._preempted_ids = set(), set()
        self._kv_loads, self._kv_releases = [], []
        return output

    # ------------------------------------------------------------------ update
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Take in a step's sampled tokens (the scheduled tokens were counted as computed
        when scheduled). A request preempted since still takes its token."""
        outputs, self._pending = self._pending, []
        for rid in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(rid)
            if request is None:
                continue  # finished (aborted, stopped) while the step ran
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
        request.num_output_placeholders -= 1
        request.append_output_token(token)
        out = EngineCoreOutput(request.request_id, [token],
                               logprobs=runner_output.logprobs.get(request.request_id))
        status = self._stop_status(request, token)
        if status is not None:
            self._dequeue(request)
            self._finish(request, status, emit=False)
            out.finish_reason = request.status.finish_reason
            out.stop_reason = request.stop_reason
            out.kv_transfer_params = request.kv_transfer_out
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
        if self._leases_blocks(request, status):
            self._hold_lease(request)
        else:
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
        in_loading = {rid for rid, r in self.loading.items() if not r.is_finished}
        assert in_waiting | in_running | in_loading == live, \
            "a live request is neither waiting, running nor loading"
        holders = in_running | set(self.loading) | {LEASE_HOLDER_PREFIX + lid
                                                    for lid in (self.leases.ids()
                                                                if self.leases else [])}
        assert set(self.kv.req_blocks) <= holders, "blocks held by no running, loading or lease"
        assert not in_running & set(self.loading), "a request both running and loading"

    # --------------------------------------------------------------- remote KV
    # Disaggregated prefill. A decode instance admits a request whose prompt KV lies on a
    # prefill instance by giving it blocks and a KVLoad instead of tokens to compute; it waits
    # in `loading` until the connector reports the pull, then runs its last prompt token
    # (for the logits) like any request. A prefill instance holds a finished request's
    # blocks under a lease until the decode side has pulled them.

    def enable_kv_transfer(self, config: KVTransferConfig, address: tuple[str, int]) -> None:
        self.kv_transfer = config
        self.kv_address = address
        if config.kv_role == "prefill":
            self.leases = LeaseTable(config.lease_seconds)

    def _wants_remote_kv(self, request: Request, computed_blocks: list[int]) -> bool:
        kt = request.kv_transfer
        if kt is None or kt.remote_prefill is None:
            return False
        missing = request.num_prompt_tokens - 1 - len(computed_blocks) * self.kv.block_size
        if missing < self.kv.block_size:
            # The local prefix cache holds all but a partial block: computing those few
            # tokens here is cheaper than a round trip to the prefill instance.
            self._kv_releases.append(kt.remote_prefill)
            request.kv_transfer = None
            return False
        return True

    def _start_remote_load(self, request: Request, computed_blocks: list[int]) -> bool:
        """Give the request blocks for all but its last prompt token, and a KVLoad to fill
        those the local prefix cache does not already hold."""
        bs = self.kv.block_size
        target = request.num_prompt_tokens - 1          # the last one is computed here
        hit = len(computed_blocks)
        remote = request.kv_transfer.remote_prefill
        problem = self._remote_mismatch(remote, target)
        if problem is not None:
            self._move_to_loading(request)
            self._remote_kv_failed(request.request_id, problem)
            return True
        if self.kv.allocate_slots(request, target - hit * bs, computed_blocks,
                                  name_blocks=False) is None:
            return False
        end = cdiv(target, bs)
        self._kv_loads.append(KVLoad(request.request_id, remote,
                                     self.kv.block_ids(request.request_id)[hit:end],
                                     list(remote.block_ids[hit:end])))
        self._move_to_loading(request)
        self._count_prefix_hit(request, hit * bs)
        return True

    def _move_to_loading(self, request: Request) -> None:
        self.waiting.popleft()
        self.loading[request.request_id] = request
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV

    def _remote_mismatch(self, remote: RemotePrefill, target: int) -> Optional[str]:
        if remote.num_tokens < target:
            return (f"the remote prefill computed {remote.num_tokens} tokens, the prompt "
                    f"needs {target}")
        if len(remote.block_ids) < cdiv(target, self.kv.block_size):
            return f"{len(remote.block_ids)} remote blocks cannot hold {target} tokens"
        return None

    def apply_kv_events(self, events: KVEvents) -> None:
        for rid in events.loaded:
            self._remote_kv_arrived(rid)
        for rid, why in events.failed.items():
            self._remote_kv_failed(rid, why)
        for lease_id in events.released:
            self._end_lease(lease_id)

    def _remote_kv_arrived(self, request_id: str) -> None:
        request = self.loading.pop(request_id, None)
        if request is None:
            return
        if request.is_finished:          # aborted while its blocks were being filled
            self.kv.free(request)
            return
        request.kv_transfer = None
        target = request.num_prompt_tokens - 1
        request.num_computed_tokens = target
        self.kv.name_blocks(request, target)   # cacheable only now that the KV is in
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _remote_kv_failed(self, request_id: str, why: str) -> None:
        request = self.loading.pop(request_id, None)
        if request is None:
            return
        self.num_kv_load_failures += 1
        self.kv.free(request)            # the transfer no longer writes: the blocks may go
        if request.kv_transfer is not None and request.kv_transfer.remote_prefill is not None:
            self._kv_releases.append(request.kv_transfer.remote_prefill)
        if request.is_finished:
            return
        request.kv_transfer = None
        request.num_computed_tokens = 0
        if self.kv_transfer is not None and self.kv_transfer.load_failure == "fail":
            self._finish(request, RequestStatus.FINISHED_ERROR,
                         f"pulling the prompt's KV from the prefill instance failed: {why}")
            return
        logger.warning("request %s: remote KV pull failed (%s); computing the prompt here",
                       request_id, why)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _abort_loading(self, request: Request, status: RequestStatus) -> None:
        """A transfer may still be writing the request's blocks: it keeps them (in
        ``loading``) until the connector reports the load ended, then frees them."""
        request.status = status
        self.requests.pop(request.request_id, None)
        self._seed_offsets.pop(request.request_id, None)

    def _leases_blocks(self, request: Request, status: RequestStatus) -> bool:
        kt = request.kv_transfer
        return (self.leases is not None and kt is not None and kt.do_remote_decode
                and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
                and bool(self.kv.block_ids(request.request_id)))

    def _hold_lease(self, request: Request) -> None:
        self._lease_counter += 1
        lease_id = f"{request.request_id}#{self._lease_counter}"
        blocks = self.kv.block_ids(request.request_id)
        self.kv.rename_holder(request.request_id, LEASE_HOLDER_PREFIX + lease_id)
        self.leases.add(lease_id)
        first = request.output_token_ids[0] if request.output_token_ids else None
        host, port = self.kv_address
        request.kv_transfer_out = RemotePrefill(
            self.kv_transfer.engine_id, lease_id, tuple(blocks), request.num_computed_tokens,
            host, port, first)

    def expire_leases(self) -> None:
        if self.leases is None:
            return
        for lease_id in self.leases.pop_expired():
            logger.warning("lease %s expired before a decode instance pulled it", lease_id)
            self.kv.free_holder(LEASE_HOLDER_PREFIX + lease_id)

    def _end_lease(self, lease_id: str) -> None:
        if self.leases is not None and self.leases.release(lease_id):
            self.kv.free_holder(LEASE_HOLDER_PREFIX + lease_id)

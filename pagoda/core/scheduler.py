"""Scheduler: continuous batching (Orca, OSDI'22) with chunked prefill (Sarathi-Serve, OSDI'24).

Every step it hands out a token budget: running requests first (decodes, then continuing
prefill chunks), then waiting requests in arrival order (or, with the ``priority`` policy,
by each request's priority, then arrival). A prompt longer than what is left of
the budget is computed in chunks over several steps while decodes keep running. When blocks
run out, the most recently admitted running request is preempted (its blocks freed, its
tokens recomputed later); with the ``priority`` policy, the running request of the lowest
priority (the latest among equals), and a waiting request may preempt running ones of
strictly lower priority to be admitted. With prefix caching, a request being admitted
starts on the longest run of its full blocks already in the cache (SGLang's RadixAttention
idea, by block hash), and cached free blocks are evicted before anyone is preempted.

Invariant: a live request is in exactly one of waiting / running / loading (disaggregated
prefill: its prompt KV is being pulled), and blocks are held only by running and loading
requests and by leases (a prefill instance keeps a finished request's blocks until a decode
instance has pulled them).

A pooling request (an embedding, a score) is a prompt without decode: it is chunked, packed
and prefix-cached like any prompt, and the step that computes its last prompt token ends it,
its pooled vector taken in place of a sampled token and its blocks freed at once.

With speculative decoding (``pagoda/spec_decode/``), decode rows may also take draft tokens
with the budget left at the end; a verified row's rejected drafts are rolled back through
``num_computed_tokens`` when its tokens are read, and the blocks that held only them freed.

Scheduling a token advances ``num_computed_tokens`` at once, and a request that will sample
gets a placeholder for its next token. So the next step can be scheduled before this one's
tokens are read (async scheduling, see ``engine/core.py``): a decode whose token is a placeholder
is scheduled like any other, its input read on the device from the step before.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Iterable, Optional, Sequence

from pagoda.config import SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagoda.core.remote_kv import LEASE_HOLDER_PREFIX, KVEvents, RemoteKV
from pagoda.core.snapshot import (
    BLOCK_LEASED,
    BLOCK_LOADING,
    LeaseSnapshot,
    RequestSnapshot,
    SchedulerSnapshot,
    StepTokens,
)
from pagoda.core.stats import SchedulerStats
from pagoda.request import Request, RequestStatus
from pagoda.spec_decode.policy import StepShape
from pagoda.spec_decode.speculator import Speculator

logger = logging.getLogger(__name__)

SHORT_SCAN = 64  # waiting requests the short-prefill pass looks at, from the head


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        spec: Optional[Speculator] = None,
        remote: Optional[RemoteKV] = None,
    ) -> None:
        """``spec``: speculative decoding's speculator; ``remote``: disaggregated prefill's
        KV leases and loads (its role's; both None when off)."""
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}  # every live request
        self._held: dict[str, list[Request]] = {}  # n > 1: siblings waiting on the first
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: last = newest
        self._runner_knows: set[str] = set()  # ids the model runner holds state for
        self._finished_ids: set[str] = set()  # to tell the runner at the next step
        self._preempted_ids: set[str] = set()
        # Finished outside a step (too big, a failed remote load): the engine takes them.
        self._pending: list[EngineCoreOutput] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of admitted requests looked up in the cache
        self.prefix_cache_hits = 0  # of those, tokens found there
        # Disaggregated prefill (None when colocated): see the "remote KV" section below.
        self.remote = remote
        self.spec = spec  # speculative decoding, when enabled

    # ------------------------------------------------------------------ intake
    def add_request(self, request: Request, siblings: Sequence[Request] = ()) -> None:
        """Queue a request. n > 1: its ``siblings`` (same prompt) are held until it has
        computed the prompt (its first token, or its end), then queued at the front, in
        order, so that they admit on its blocks instead of computing the prompt again."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if siblings:
            self._held[request.request_id] = list(siblings)
        self._add(request)

    def _add(self, request: Request, first: bool = False) -> None:
        self.requests[request.request_id] = request
        if self._can_never_fit(request):
            self._finish(request, RequestStatus.FINISHED_IGNORED, self._too_big_detail(request))
            return
        self._enqueue(request)
        if first and not self._by_priority:
            self.waiting.rotate(1)

    def _release_siblings(self, request: Request, status: Optional[RequestStatus]) -> None:
        """The held siblings of ``request``, which has computed the prompt (or ended): to
        the front of the queue; dropped if it was aborted (the user request was)."""
        siblings = self._held.pop(request.request_id, None)
        if siblings is None or status is RequestStatus.FINISHED_ABORTED:
            return
        for sibling in reversed(siblings):
            self._add(sibling, first=True)

    @property
    def _by_priority(self) -> bool:
        return self.config.policy == "priority"

    def _enqueue(self, request: Request, front: bool = False) -> None:
        """Into the waiting queue: at the back (or the front: preempted) in arrival order,
        or in (priority, arrival) order under the priority policy."""
        if not self._by_priority:
            (self.waiting.appendleft if front else self.waiting.append)(request)
            return
        key = _priority_key(request)
        at = next((i for i, r in enumerate(self.waiting) if _priority_key(r) > key), None)
        self.waiting.insert(len(self.waiting) if at is None else at, request)

    def finish_requests(
        self,
        request_ids: Iterable[str],
        status: RequestStatus,
        stop_reason: Optional[str | int] = None,
    ) -> None:
        """End live requests from outside a step: aborts, and stop strings found by the engine."""
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            request.stop_reason = stop_reason
            self._release_siblings(request, status)
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
        """Outputs of requests finished outside a step (too big for the cache, a failed
        remote KV pull): the engine core takes them once per step, after the KV events."""
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

    def make_stats(self) -> SchedulerStats:
        """A snapshot of the queues, the block pool and the counters (metrics, /debug)."""
        pool = self.kv.pool
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_loading=len(self.loading),
            num_waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in self.waiting),
            num_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            kv_usage=self.kv.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_kv_load_failures=self.remote.num_load_failures if self.remote else 0,
            spec=self.spec.stats.copy() if self.spec is not None else None,
            **self._sliding_stats(),
        )

    def _sliding_stats(self) -> dict[str, int]:
        sliding = self.kv.sliding
        if sliding is None:
            return {}
        return {
            "num_sliding_blocks": sliding.pool.num_blocks,
            "num_free_sliding_blocks": sliding.pool.num_free_blocks,
            "num_sliding_blocks_freed": sliding.num_freed,
        }

    def inspect(self) -> SchedulerSnapshot:
        """Every live request with its block table, every lease, and the block pool block
        by block (leased and loading blocks painted as such), for the inspector."""
        leases = tuple(
            LeaseSnapshot(holder[len(LEASE_HOLDER_PREFIX) :], tuple(blocks))
            for holder, blocks in self.kv.req_blocks.items()
            if holder.startswith(LEASE_HOLDER_PREFIX)
        )
        loading = [b for rid in self.loading for b in self.kv.block_ids(rid)]
        overlays = {BLOCK_LEASED: [b for lease in leases for b in lease.block_ids]}
        overlays[BLOCK_LOADING] = loading
        order = [*self.running, *self.loading.values(), *self.waiting]
        return SchedulerSnapshot(
            self.kv.pool.snapshot(overlays),
            self.kv.block_size,
            self.config.step_token_budget,
            self.config.max_num_seqs,
            self.kv.enable_prefix_caching,
            tuple(self._request_snapshot(r) for r in order if not r.is_finished),
            leases,
        )

    def _request_snapshot(self, request: Request) -> RequestSnapshot:
        return RequestSnapshot(
            request.request_id,
            request.status.value,
            request.num_computed_tokens,
            request.num_tokens,
            request.num_prompt_tokens,
            request.num_output_tokens,
            request.max_tokens,
            request.num_cached_tokens,
            request.num_preemptions,
            tuple(self.kv.block_ids(request.request_id)),
            request.arrival_time,
        )

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.config.step_token_budget
        preemptions = self.num_preemptions
        scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        if self.kv.sliding is not None:  # the sliding layers' blocks behind every window go
            for request in self.running:
                self.kv.slide(request)
        budget = self._schedule_running(budget, scheduled, new_blocks, decodes_only=True)
        budget = self._admit_short(budget, scheduled, new_blocks)
        budget = self._schedule_running(budget, scheduled, new_blocks)
        self._schedule_waiting(budget, scheduled, new_blocks)
        self._schedule_drafts(scheduled, new_blocks)
        output = self._make_output(scheduled, new_blocks)
        output.step_tokens = self._step_tokens(scheduled, self.num_preemptions - preemptions)
        self._advance(scheduled)
        output.kv_cache_events = self.kv.take_events()
        return output

    def _advance(self, scheduled: dict[str, int]) -> None:
        """The scheduled tokens count as computed from now on; a request that reaches its
        end (and its drafts') samples, and holds a placeholder for that token until the
        output is read."""
        for rid, num_new in scheduled.items():
            request = self.requests[rid]
            request.num_computed_tokens += num_new
            end = request.num_tokens_with_placeholders + len(request.spec_token_ids)
            if request.num_computed_tokens == end:
                request.num_output_placeholders += 1

    def _schedule_running(
        self,
        budget: int,
        scheduled: dict[str, int],
        new_blocks: dict[str, list[int]],
        decodes_only: bool = False,
    ) -> int:
        """Decodes first (one token each), then continuing prefill chunks; stable in admission
        order. ``decodes_only``: the first pass of a step (short prefills are admitted before
        the second takes the prefill chunks)."""
        order = sorted(self.running, key=lambda r: self._remaining(r) > 1)
        for request in order:
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING or self._waits_for_token(request):
                continue  # preempted earlier in this step, or waits for its token in flight
            if request.request_id in scheduled:
                continue  # the first pass took it
            remaining = self._remaining(request)
            if decodes_only and remaining > 1:
                break  # (sorted: the rest are prefill chunks)
            num_new = self._chunk(remaining, budget)
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

    def _step_tokens(self, scheduled: dict[str, int], preemptions: int) -> StepTokens:
        """The step's tokens by kind (before ``_advance``: ``num_computed_tokens`` is where
        each row starts). One token after the prompt is a decode; more, or inside the
        prompt, is a prefill chunk, or recompute for a request preempted before."""
        decode = prefill = recompute = spec = 0
        for rid, num_new in scheduled.items():
            request = self.requests[rid]
            drafts = len(request.spec_token_ids)
            num_new -= drafts
            spec += drafts
            if num_new == 1 and request.num_computed_tokens >= request.num_prompt_tokens:
                decode += 1
            elif request.num_preemptions:
                recompute += num_new
            else:
                prefill += num_new
        return StepTokens(
            decode,
            prefill,
            recompute,
            spec,
            self.config.step_token_budget,
            preemptions,
            len(self.running),
            len(self.waiting),
            len(self.loading),
        )

    def _waits_for_token(self, request: Request) -> bool:
        """Async scheduling: a request whose token in flight ends it by length, or whose
        grammar (structured outputs) needs that token to say what may follow, is not
        scheduled again until the token is read; nor is one that speculation would rather
        give drafts at the step after (they need its last token)."""
        if not request.num_output_placeholders:
            return False
        return (
            request.is_pooling  # its pooled vector is in flight: nothing follows it
            or request.sampling_params.structured_outputs is not None
            or bool(request.spec_token_ids)  # how many tokens it gains is not known yet
            or self._ends_in_flight(request)
            or (self.spec is not None and self.spec.worth_waiting(request))
        )

    def _ends_in_flight(self, request: Request) -> bool:
        """Async scheduling: the token in flight is the request's last by length (max_tokens
        or the context), so nothing after it is worth computing."""
        if not request.num_output_placeholders:
            return False
        return (
            request.num_output_tokens + request.num_output_placeholders >= request.max_tokens
            or request.num_tokens_with_placeholders >= self.config.max_model_len
        )

    def _allocate_or_preempt(
        self,
        request: Request,
        num_new: int,
        scheduled: dict[str, int],
        new_blocks: dict[str, list[int]],
    ) -> Optional[list[int]]:
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
                self._finish(
                    request,
                    RequestStatus.FINISHED_LENGTH,
                    "the KV cache is full even with this request alone "
                    f"({self.kv.pool.num_blocks} blocks)",
                )
                return None
            victim = self._victim()
            self._preempt(victim, scheduled, new_blocks)
            if victim is request:
                return None

    def _victim(self) -> Request:
        """Whom to preempt: the newest running request, or under the priority policy the
        one of the lowest priority (the latest among equals)."""
        if self._by_priority:
            return max(self.running, key=_priority_key)
        return self.running[-1]

    def _room_by_priority(
        self, request: Request, scheduled: dict[str, int], new_blocks: dict[str, list[int]]
    ) -> bool:
        """Priority policy: preempt the lowest-priority running request if it is strictly
        below ``request`` (which the KV cache cannot take now); whether one was."""
        if not self._by_priority or not self.running:
            return False
        victim = self._victim()
        if victim.priority <= request.priority:
            return False
        self._preempt(victim, scheduled, new_blocks)
        return True

    def _preempt(
        self, request: Request, scheduled: dict[str, int], new_blocks: dict[str, list[int]]
    ) -> None:
        """Recompute-style preemption: free the blocks, rewind, queue at the front."""
        self.running.remove(request)
        scheduled.pop(request.request_id, None)  # un-schedule it if it went earlier this step
        new_blocks.pop(request.request_id, None)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request, front=True)
        if request.request_id in self._runner_knows:
            self._runner_knows.discard(request.request_id)
            self._preempted_ids.add(request.request_id)

    @staticmethod
    def _remaining(request: Request) -> int:
        return request.num_tokens_with_placeholders - request.num_computed_tokens

    def _chunk(self, remaining: int, budget: int) -> int:
        """How much of a prefill with ``remaining`` tokens to schedule with ``budget`` left:
        all of it where it fits, or where what a cut would leave is short (one step fewer
        to its first token, for a step at most ``short_prefill_tokens`` past the budget);
        else the budget."""
        if remaining <= budget or (budget > 0 and self._is_short(remaining - budget)):
            return remaining
        return budget

    # ------------------------------------------------------- short prefills first
    # A prompt with little left to compute (a prefix-cache hit, a short turn) would wait
    # behind every longer prompt ahead of it, for a few tokens of work. So prefills of at
    # most ``short_prefill_tokens`` go first: after the decodes, before any prefill chunk,
    # admitted past the head of the queue (FCFS only), within half the step's budget. A
    # head may be passed ``max_num_seqs`` times; then the queue holds behind it.
    def _is_short(self, remaining: int) -> bool:
        limit = self.config.short_prefill_tokens
        return limit is not None and remaining <= limit

    def _admit_short(
        self, budget: int, scheduled: dict[str, int], new_blocks: dict[str, list[int]]
    ) -> int:
        """Admit waiting requests whose prompt, after its cached prefix, is short; returns
        the budget left."""
        if self.config.short_prefill_tokens is None or self._by_priority or not self.waiting:
            return budget
        room = min(budget, self.config.step_token_budget // 2)
        head = self.waiting[0]
        for request in list(itertools.islice(self.waiting, SHORT_SCAN)):
            if room <= 0 or self._num_seqs >= self.config.max_num_seqs:
                break
            if request is not head and head.short_passes >= self.config.max_num_seqs:
                break
            if not self._may_pass(request):
                continue
            computed_blocks = self._computed_prefix(request)
            num_computed = len(computed_blocks) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            if not self._is_short(num_new) or num_new > room:
                continue
            blocks = self.kv.allocate_slots(request, num_new, computed_blocks)
            if blocks is None:
                break  # no blocks: nobody else passes either
            if request is not head:
                head.short_passes += 1
            self.waiting.remove(request)
            self._start(request, num_computed, num_new, blocks, scheduled, new_blocks)
            room -= num_new
            budget -= num_new
        return budget

    def _may_pass(self, request: Request) -> bool:
        """A waiting request that may be admitted by the short-prefill pass."""
        return (
            not request.num_output_placeholders
            and self._adapter_fits(request)
            and (request.kv_transfer is None or request.kv_transfer.remote_prefill is None)
            and not self._can_never_fit(request)
        )

    def _start(
        self,
        request: Request,
        num_computed: int,
        num_new: int,
        blocks: list[int],
        scheduled: dict[str, int],
        new_blocks: dict[str, list[int]],
    ) -> None:
        """A request taken off the queue starts running on ``num_computed`` cached tokens."""
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_computed
        self._count_prefix_hit(request, num_computed)
        scheduled[request.request_id] = num_new
        new_blocks[request.request_id] = blocks

    def _schedule_waiting(
        self, budget: int, scheduled: dict[str, int], new_blocks: dict[str, list[int]]
    ) -> None:
        while self.waiting and budget > 0 and self._num_seqs < self.config.max_num_seqs:
            request = self._next_waiting()
            if request is None:
                break  # the head waits for an adapter to leave, and may be passed no more
            if request.num_output_placeholders:
                break  # preempted with a token in flight: readmitted once it is read
            if self._can_never_fit(request):
                self.waiting.remove(request)
                self._finish(request, RequestStatus.FINISHED_LENGTH, self._too_big_detail(request))
                continue
            computed_blocks = self._computed_prefix(request)
            if self.remote is not None and self.remote.wants_load(request, computed_blocks):
                if not self._admit_remote(request, computed_blocks):
                    break  # no blocks for it yet: FCFS, as for any request
                continue
            num_computed = len(computed_blocks) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = self._chunk(num_new, budget)
            blocks = self.kv.allocate_slots(request, num_new, computed_blocks)
            if blocks is None:
                if self._room_by_priority(request, scheduled, new_blocks):
                    budget = self.config.step_token_budget - sum(scheduled.values())
                    continue  # a lower-priority request gave its blocks back: try again
                break  # strict order: nobody overtakes the head of the queue
            self._take_waiting(request)
            self._start(request, num_computed, num_new, blocks, scheduled, new_blocks)
            budget -= num_new

    # ------------------------------------------------------------ LoRA adapters
    # At most ``max_loras`` distinct adapters run at once (the model holds that many). The
    # head of the queue, when its adapter would be one too many, waits; a later request
    # whose adapter is already running (or that runs the base) may pass it, at most
    # ``max_num_seqs`` times per head. After that the queue holds behind it until a
    # running adapter's last request ends, so no adapter's requests wait forever.
    def _next_waiting(self) -> Optional[Request]:
        """The waiting request to admit next: the head, or one that may pass it."""
        head = self.waiting[0]
        if self._adapter_fits(head):
            return head
        if head.lora_passes >= self.config.max_num_seqs:
            return None
        running = self._running_adapters()
        for request in itertools.islice(self.waiting, 1, None):
            if request.lora is None or request.lora.lora_int_id in running:
                return request
        return None

    def _take_waiting(self, request: Request) -> None:
        head = self.waiting[0]
        if request is head:
            self.waiting.popleft()
            return
        head.lora_passes += 1
        self.waiting.remove(request)

    def _adapter_fits(self, request: Request) -> bool:
        if request.lora is None or self.config.max_loras is None:
            return True
        running = self._running_adapters()
        return request.lora.lora_int_id in running or len(running) < self.config.max_loras

    def runs_adapter(self, lora_int_id: int) -> bool:
        """Whether a live request (waiting, running, loading, or held as an n > 1 sibling)
        runs under the adapter."""
        held = (r for siblings in self._held.values() for r in siblings)
        return any(
            r.lora is not None and r.lora.lora_int_id == lora_int_id
            for r in itertools.chain(self.requests.values(), held)
        )

    def _running_adapters(self) -> set[int]:
        return {r.lora.lora_int_id for r in self.running if r.lora is not None}

    def _schedule_drafts(self, scheduled: dict[str, int], new_blocks: dict[str, list[int]]) -> None:
        """Speculative decoding: with the budget the step's own tokens left, drafts for the
        decode rows the speculator picks. A draft that finds no free block is dropped;
        nobody is preempted for one."""
        if self.spec is None:
            return
        budget = self.config.step_token_budget - sum(scheduled.values())
        rows = [self.requests[rid] for rid, n in scheduled.items() if n == 1]
        rows = [r for r in rows if r.num_computed_tokens == r.num_tokens - 1]  # last token known
        if budget <= 0 or not rows:
            return
        plan = self.spec.plan(rows, budget, self._step_shape(scheduled), self.config.max_model_len)
        for rid, drafts in plan.items():
            request = self.requests[rid]
            blocks = self.kv.allocate_slots(request, 1 + len(drafts))
            if blocks is None:
                continue
            new_blocks[rid].extend(blocks)
            scheduled[rid] += len(drafts)
            request.spec_token_ids = drafts

    def _step_shape(self, scheduled: dict[str, int]) -> StepShape:
        samples = context = 0
        for rid, n in scheduled.items():
            request = self.requests[rid]
            end = request.num_computed_tokens + n
            samples += end == request.num_tokens_with_placeholders
            context += end if n == 1 else 0
        return StepShape(sum(scheduled.values()), samples, context)

    @property
    def _num_seqs(self) -> int:
        return len(self.running) + len(self.loading)

    def _computed_prefix(self, request: Request) -> list[int]:
        """Blocks whose KV a request being admitted can start on: a prefix-cache hit, or
        (with caching off) the prompt blocks an n > 1 sibling has computed."""
        if request.sampling_params.prompt_logprobs is not None or request.reads_every_row:
            return []  # it needs the logits (or the pooled rows) of every prompt position
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
        return (
            f"the request needs {self.kv.num_blocks_for(request.num_tokens + 1)} KV blocks "
            f"but the cache has only {self.kv.pool.num_blocks}"
        )

    def _make_output(
        self, scheduled: dict[str, int], new_blocks: dict[str, list[int]]
    ) -> SchedulerOutput:
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        for rid in scheduled:
            request = self.requests[rid]
            if rid in self._runner_knows:
                kept = len(self.kv.block_ids(rid)) - len(new_blocks[rid])
                cached_reqs.append(
                    CachedRequestData(
                        rid,
                        new_blocks[rid],
                        request.num_computed_tokens,
                        kept,
                        self.kv.sliding_block_ids(rid)[kept:],
                    )
                )
                continue
            self._runner_knows.add(rid)
            new_reqs.append(
                NewRequestData(
                    request_id=rid,
                    token_ids=list(request.all_token_ids),
                    num_prompt_tokens=request.num_prompt_tokens,
                    sampling_params=request.sampling_params,
                    eos_token_ids=request.eos_token_ids,
                    block_ids=list(self.kv.block_ids(rid)),
                    num_computed_tokens=request.num_computed_tokens,
                    sliding_block_ids=list(self.kv.sliding_block_ids(rid)),
                    seed_offset=request.seed_offset,
                    pooling_params=request.pooling_params,
                    token_type_ids=request.token_type_ids,
                    lora=request.lora,
                )
            )
        output = SchedulerOutput(
            new_reqs,
            cached_reqs,
            scheduled,
            finished_request_ids=self._finished_ids,
            preempted_request_ids=self._preempted_ids,
            spec_token_ids={
                rid: self.requests[rid].spec_token_ids
                for rid in scheduled
                if self.requests[rid].spec_token_ids
            },
        )
        self._finished_ids, self._preempted_ids = set(), set()
        if self.remote is not None:
            output.kv_loads, self.remote.loads = self.remote.loads, []
            output.kv_releases, self.remote.releases = self.remote.releases, []
        return output

    # ------------------------------------------------------------------ update
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Take in a step's sampled tokens (the scheduled tokens were counted as computed
        when scheduled). A request preempted since still takes its token."""
        outputs: list[EngineCoreOutput] = []
        for rid in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(rid)
            if request is None:
                continue  # finished (aborted, stopped) while the step ran
            if request.is_pooling:
                pooled = self._process_pooled(request, runner_output)
                if pooled is not None:
                    outputs.append(pooled)
                continue
            out = self._process_sample(request, runner_output)
            prompt_lp = runner_output.prompt_logprobs.get(rid)
            if prompt_lp is not None:
                out = out or EngineCoreOutput(rid, [])
                out.prompt_logprobs = prompt_lp
            if out is not None:
                outputs.append(out)
        return outputs

    def _process_sample(
        self, request: Request, runner_output: ModelRunnerOutput
    ) -> Optional[EngineCoreOutput]:
        """Take the request's new tokens (one, or accepted drafts and one more), up to the
        first that ends it: tokens after an EOS, a stop token or ``max_tokens`` are dropped,
        as if they had been sampled one step at a time."""
        tokens = runner_output.sampled_token_ids.get(request.request_id)
        if tokens is None:
            return None
        request.num_output_placeholders -= 1
        self._roll_back_drafts(request, len(tokens) - 1)
        status = None
        for i, token in enumerate(tokens):
            request.append_output_token(token)
            status = self._stop_status(request, token)
            if status is not None:
                tokens = tokens[: i + 1]
                break
        self._release_siblings(request, status)
        logprobs = runner_output.logprobs.get(request.request_id)
        out = EngineCoreOutput(
            request.request_id, tokens, logprobs=logprobs[: len(tokens)] if logprobs else None
        )
        if status is not None:
            self._dequeue(request)
            self._finish(request, status, emit=False)
            out.finish_reason = request.status.finish_reason
            out.stop_reason = request.stop_reason
            out.kv_transfer_params = request.kv_transfer_out
        return out

    def _process_pooled(
        self, request: Request, runner_output: ModelRunnerOutput
    ) -> Optional[EngineCoreOutput]:
        """A pooling request whose last prompt row ran: it ends with its pooled vector, and
        its blocks go back (full ones stay in the prefix cache)."""
        if request.request_id not in runner_output.pooled:
            return None  # a chunk before its last
        request.num_output_placeholders -= 1
        self._dequeue(request)
        self._finish(request, RequestStatus.FINISHED_STOPPED, emit=False)
        return EngineCoreOutput(
            request.request_id,
            [],
            finish_reason=request.status.finish_reason,
            pooled=runner_output.pooled[request.request_id],
        )

    def _roll_back_drafts(self, request: Request, num_accepted: int) -> None:
        """A verified row: its rejected drafts' KV is garbage from now on. The counter moves
        back over them (the next step overwrites their slots) and blocks that held only
        them are freed. A request preempted meanwhile has nothing left to roll back.

            before   | ... last | d1  d2  d3  d4 |      num_computed_tokens after the drafts
            after    | ... last | d1  d2 | b                accepted d1 d2, then sampled b
                                          ^ num_computed_tokens (b is computed next step)
        """
        drafts, request.spec_token_ids = request.spec_token_ids, []
        if not drafts:
            return
        assert self.spec is not None  # only the speculator makes drafts
        self.spec.observe(request.request_id, len(drafts), num_accepted)
        if request.status is RequestStatus.RUNNING:
            request.num_computed_tokens -= len(drafts) - num_accepted
            self.kv.trim(request)

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

    def _finish(
        self,
        request: Request,
        status: RequestStatus,
        detail: Optional[str] = None,
        emit: bool = True,
    ) -> None:
        """Free everything a request holds and forget it."""
        request.status = status
        request.finish_detail = detail
        self._release_siblings(request, status)
        if self.spec is not None:
            self.spec.finish(request)
        if self.remote is not None and self.remote.should_lease(request, status):
            self.remote.hold_lease(request)
        else:
            self.kv.free(request)
        self.requests.pop(request.request_id, None)
        if request.request_id in self._runner_knows:
            self._runner_knows.discard(request.request_id)
            self._finished_ids.add(request.request_id)
        if emit:
            self._pending.append(
                EngineCoreOutput(
                    request.request_id, [], finish_reason=status.finish_reason, finish_detail=detail
                )
            )

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        self.kv.check_windows(self.running)
        live = set(self.requests)
        in_waiting = {r.request_id for r in self.waiting}
        in_running = {r.request_id for r in self.running}
        assert len(in_waiting) == len(self.waiting), "a request is queued twice"
        assert not in_waiting & in_running, "a request is both waiting and running"
        in_loading = {rid for rid, r in self.loading.items() if not r.is_finished}
        assert in_waiting | in_running | in_loading == live, (
            "a live request is neither waiting, running nor loading"
        )
        holders = in_running | (self.remote.holders() if self.remote is not None else set())
        assert set(self.kv.req_blocks) <= holders, "blocks held by no running, loading or lease"
        assert not in_running & set(self.loading), "a request both running and loading"
        assert set(self._held) <= live, "n > 1 siblings held for a request that has ended"
        if self.config.max_loras is not None:
            assert len(self._running_adapters()) <= self.config.max_loras, "too many adapters"

    # --------------------------------------------------------------- remote KV
    # Disaggregated prefill (core/remote_kv.py holds the state): requests move between
    # waiting, loading and running here; RemoteKV does the rest.

    @property
    def loading(self) -> dict[str, Request]:
        return self.remote.loading if self.remote is not None else {}

    def _admit_remote(self, request: Request, computed_blocks: list[int]) -> bool:
        """Admit the head of the queue into ``loading``; False if there are no blocks yet."""
        assert self.remote is not None
        if not self.remote.start_load(request, computed_blocks):
            return False
        self.waiting.popleft()
        self._count_prefix_hit(request, len(computed_blocks) * self.kv.block_size)
        return True

    def apply_kv_events(self, events: KVEvents) -> None:
        if self.remote is None:
            return
        for rid in events.loaded:
            request = self.remote.arrived(rid)
            if request is not None:
                request.status = RequestStatus.RUNNING
                self.running.append(request)
        for rid, why in events.failed.items():
            request = self.remote.failed(rid, why)
            if request is not None:
                self._requeue_failed_load(request, why)
        for lease_id in [*events.released, *events.expired]:
            self.remote.end_lease(lease_id)

    def _requeue_failed_load(self, request: Request, why: str) -> None:
        assert self.remote is not None
        if self.remote.config.load_failure == "fail":
            self._finish(
                request,
                RequestStatus.FINISHED_ERROR,
                f"pulling the prompt's KV from the prefill instance failed: {why}",
            )
            return
        logger.warning(
            "request %s: remote KV pull failed (%s); computing the prompt here",
            request.request_id,
            why,
        )
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _abort_loading(self, request: Request, status: RequestStatus) -> None:
        """A transfer may still be writing the request's blocks: it keeps them (in
        ``loading``) until the connector reports the load ended, then frees them."""
        request.status = status
        self.requests.pop(request.request_id, None)

    def take_new_leases(self) -> list[str]:
        """Prefill: leases created since the last call, for the connector to guard."""
        if self.remote is None:
            return []
        leases, self.remote.new_leases = self.remote.new_leases, []
        return leases


def _priority_key(request: Request) -> tuple[int, float]:
    """The priority policy's order: lower priority values first, then earlier arrivals."""
    return (request.priority, request.arrival_time)

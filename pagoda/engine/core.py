"""EngineCore: one step of the engine in ids and counts: schedule -> run -> update.

It owns the scheduler, the model runner, the KV connector (disaggregated prefill) and the
step in flight. Each step it hands the connector the transfers the scheduler decided, runs the
model, takes the sampled tokens into the scheduler, and reports the connector's events back
to it. Text, n > 1 and the user's view of a request live above it (``output_processor.py``);
pacing (sleeping while only KV pulls are in flight, the no-progress watchdog) lives in the
loops that call it (``pacing.py``).

With async scheduling (on by default on CUDA) the host works one step ahead of the device:
it schedules and launches step N+1, then reads step N's tokens and updates the requests
while the device runs N+1, so the host's time per step hides behind the device's instead of
adding to it:

    host    | sched N+1, launch N+1 | read N, update, detokenize | sched N+2, launch N+2 | ...
    device  |  ... step N ...      |          step N+1                | step N+2 ...

A request that step N ends (EOS, a stop string) has had one more token computed by N+1,
which is dropped; an end by length is known in advance and costs nothing.
Invariant: every scheduled step is read exactly once, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from pagoda.core.kv_events import KVCacheEvent
from pagoda.core.outputs import EngineCoreOutput, SchedulerOutput
from pagoda.core.scheduler import Scheduler
from pagoda.core.snapshot import StepTokens
from pagoda.engine.structured import StructuredOutputs
from pagoda.kv_transfer.base import KVConnectorWorker
from pagoda.request import Request, RequestStatus
from pagoda.worker.model_runner import StepHandle, StepRunner

FAULT_MESSAGE = "fault injected by /debug/fault: the model step failed"


@dataclass
class CoreStep:
    """What one core step did."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    scheduled: dict[str, int] = field(default_factory=dict)  # request id -> tokens computed
    progressed: bool = False  # anything scheduled, read, finished or transferred
    waiting_for_kv: bool = False  # requests wait for remote KV pulls still in flight
    tokens: StepTokens = field(default_factory=StepTokens)  # what it scheduled, by kind


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: StepRunner,
        connector: Optional[KVConnectorWorker],
        async_scheduling: bool,
        structured: Optional[StructuredOutputs] = None,
        publish_kv_events: Optional[Callable[[list[KVCacheEvent]], None]] = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.connector = connector
        self.async_scheduling = async_scheduling
        self.structured = structured  # the matchers of constrained requests
        self._in_flight: Optional[tuple[SchedulerOutput, StepHandle]] = None
        self._fault_next_step = False
        # KV cache events (core/kv_events.py): where a read step's events go, when published.
        self.publish_kv_events = publish_kv_events

    def step(self) -> CoreStep:
        sched = self.scheduler.schedule()
        self._send_kv(sched)
        self._mask_tokens(sched)
        outputs, read = self._execute(sched)
        received = self._receive_kv()
        outputs.extend(self.scheduler.take_pending_outputs())  # finished outside the step
        self._advance_grammars(outputs)
        self._drop_in_flight_if_idle()
        progressed = bool(outputs) or read or received or not sched.is_empty or sched.has_kv_work
        return CoreStep(
            outputs,
            sched.num_scheduled_tokens,
            progressed,
            waiting_for_kv=bool(self.scheduler.loading),
            tokens=sched.step_tokens,
        )

    # ------------------------------------------------------------------- run
    def _execute(self, sched: SchedulerOutput) -> tuple[list[EngineCoreOutput], bool]:
        """Run the model on ``sched`` and take in sampled tokens: this step's, or with async
        scheduling the step in flight's, read after this one is launched. Returns the
        outputs and whether a step launched earlier was read."""
        if self._fault_next_step:
            self._fault_next_step = False
            raise RuntimeError(FAULT_MESSAGE)
        if not self.async_scheduling:
            return self._update(sched, self.runner.launch(sched)), False
        previous, self._in_flight = self._in_flight, None
        handle = self.runner.launch(sched)
        if not sched.is_empty:
            self._in_flight = (sched, handle)
        else:
            self._publish(sched.kv_cache_events)  # nothing runs: nothing to wait for
        if previous is None:
            return [], False
        return self._update(*previous), True

    def _update(self, sched: SchedulerOutput, handle: StepHandle) -> list[EngineCoreOutput]:
        outputs = self.scheduler.update_from_output(sched, self.runner.collect(handle))
        self._publish(sched.kv_cache_events)  # the step has run: its blocks hold their KV
        return outputs

    def _publish(self, events: list[KVCacheEvent]) -> None:
        if events and self.publish_kv_events is not None:
            self.publish_kv_events(events)

    def publish_pending_kv_events(self) -> None:
        """Events made outside a step (a prefix-cache reset), now, unless a step in flight
        holds earlier ones (then the next step carries them, in order)."""
        if self._in_flight is None:
            self._publish(self.scheduler.kv.take_events())

    def _drop_in_flight_if_idle(self) -> None:
        """No request is live: the step in flight holds only dropped tokens; read it so the
        engine goes idle with nothing pending."""
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests():
            self._update(*self._in_flight)
            self._in_flight = None

    @property
    def has_step_in_flight(self) -> bool:
        return self._in_flight is not None

    def inject_fault(self) -> None:
        """Make the next step raise, as a failing model would (tests engine death)."""
        self._fault_next_step = True

    # -------------------------------------------------------------- requests
    def add_request(self, request: Request, siblings: Sequence[Request] = ()) -> None:
        """Queue a request (and its n > 1 siblings, which the scheduler holds until it has
        computed the prompt); their grammars are compiled now."""
        for r in (request, *siblings):
            self._add_grammar(r)
        self.scheduler.add_request(request, siblings)

    def _add_grammar(self, request: Request) -> None:
        spec = request.sampling_params.structured_outputs
        if spec is not None:
            assert self.structured is not None, "structured outputs are not enabled"
            self.structured.add(request.request_id, spec)

    def finish_stopped(self, stopped: list[tuple[str, str]]) -> None:
        """End requests a stop string ended (found in the text, above the core)."""
        for request_id, stop_str in stopped:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_STOPPED, stop_str)
            self._forget_grammar(request_id)
        self._drop_in_flight_if_idle()

    def abort(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        for rid in request_ids:
            self._forget_grammar(rid)

    def _forget_grammar(self, request_id: str) -> None:
        if self.structured is not None:
            self.structured.remove(request_id)

    # ------------------------------------------------------- structured outputs
    def _mask_tokens(self, sched: SchedulerOutput) -> None:
        """The allowed-token masks of the constrained requests that sample in ``sched``
        (with async scheduling they are never scheduled with a token in flight, so the one
        placeholder is this step's): one mask, or with drafts one per position, each after
        the drafts before it."""
        if not self.structured:
            return
        for rid in sched.num_scheduled_tokens:
            if self.structured.has(rid) and self.scheduler.requests[rid].num_output_placeholders:
                drafts = sched.spec_token_ids.get(rid, [])
                sched.allowed_tokens[rid] = self.structured.bitmasks(rid, drafts)

    def _advance_grammars(self, outputs: list[EngineCoreOutput]) -> None:
        """Each constrained request's matcher takes its new tokens; a grammar now complete
        ends the request ("stop"), one that refused a token ends it with an error. Tokens
        after the one that ended it (the rest of an accepted run) are dropped."""
        if not self.structured:
            return
        for out in outputs:
            rid = out.request_id
            for i, token in enumerate(out.new_token_ids):
                ok, complete = self.structured.accept(rid, token)
                if complete or not ok:
                    self._end_by_grammar(out, ok, i + 1)
                    break
            if out.finish_reason is not None:
                self.structured.remove(rid)

    def _end_by_grammar(self, out: EngineCoreOutput, ok: bool, num_tokens: int) -> None:
        out.new_token_ids = out.new_token_ids[:num_tokens]
        if out.logprobs is not None:
            out.logprobs = out.logprobs[:num_tokens]
        if out.finish_reason is not None:
            return  # ended by the scheduler at that very token
        status = RequestStatus.FINISHED_STOPPED if ok else RequestStatus.FINISHED_ERROR
        self.scheduler.finish_requests([out.request_id], status)
        out.finish_reason = status.finish_reason
        if not ok:
            out.finish_detail = "the sampled token broke the request's grammar"

    # ------------------------------------------------------------ KV transfer
    def _send_kv(self, sched: SchedulerOutput) -> None:
        if self.connector is not None:
            if sched.kv_loads:
                self.connector.start_loads(sched.kv_loads)
            if sched.kv_releases:
                self.connector.release_remote(sched.kv_releases)

    def _receive_kv(self) -> bool:
        """Guard the leases this step created, and take in finished pulls and ended leases.
        True if anything moved."""
        if self.connector is None:
            return False
        self.connector.hold_leases(self.scheduler.take_new_leases())
        events = self.connector.poll()
        self.scheduler.apply_kv_events(events)
        return events.any

    def poll_kv_transfers(self) -> None:
        """For an idle server loop: take in finished transfers and ended leases even when no
        request is running (a prefill instance's leases outlive its requests)."""
        if self.connector is not None:
            self.scheduler.apply_kv_events(self.connector.poll())

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()
            self.connector = None

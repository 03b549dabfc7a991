"""LLMEngine: the step loop. schedule -> run the model -> update requests -> detokenize.

It also turns one user request with n > 1 into n sibling requests: the first computes the
prompt, the others join once it has, starting on its full prompt blocks.

With async scheduling (on by default on CUDA) the host works one step ahead of the device:
it schedules and launches step N+1, then reads step N's tokens and updates the requests
while the device runs N+1, so the host's time per step hides behind the device's instead of
adding to it:

    host    | sched N+1, launch N+1 | read N, update, detokenize | sched N+2, launch N+2 | ...
    device  |  ... step N ...      |          step N+1                | step N+2 ...

A request that step N ends (EOS, a stop string) has had one more token computed by N+1,
which is dropped; an end by length is known in advance and costs nothing.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pagoda.config import DEFAULT_KV_CACHE_GIB, CacheConfig, EngineArgs
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.outputs import EngineCoreOutput, SchedulerOutput, TokenLogprobs
from pagoda.core.scheduler import Scheduler
from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagoda.kv_transfer.base import KVConnectorWorker
from pagoda.kv_transfer.params import (KVTransferRequest, RemotePrefill,
                                       parse_kv_transfer_params)
from pagoda.engine import cpu_budget
from pagoda.models.cpu_int4 import resolve_quantization
from pagoda.models.loader import load_model, resolve_dtype, resolve_kv_cache_dtype
from pagoda.request import Request, RequestStatus
from pagoda.sampling import SamplingParams
from pagoda.utils import cdiv
from pagoda.worker.kv_cache import (GIB, cuda_kv_budget, num_blocks_for_memory,
                                    profile_activation_bytes)
from pagoda.worker.model_runner import ModelRunner, StepHandle

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN_CAP = 8192
KV_POLL_INTERVAL_S = 0.001


@dataclass
class _Child:
    """One of a user request's n completions."""
    index: int
    request: Request
    detok: IncrementalDetokenizer
    logprobs: Optional[list[TokenLogprobs]] = None
    finish_reason: Optional[str] = None
    finish_detail: Optional[str] = None
    stop_reason: Optional[str | int] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class _Group:
    """A user request: its prompt, its children, and siblings waiting to join."""
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    children: list[_Child] = field(default_factory=list)
    deferred: list[Request] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None

    @property
    def finished(self) -> bool:
        return not self.deferred and all(c.finish_reason is not None for c in self.children)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.device = _resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, self.dtype, self.device,
                                               dtype_auto=args.dtype in (None, "auto"))
        self.quantization = resolve_quantization(args.quantization, self.device, self.dtype)
        torch.manual_seed(args.seed)
        loaded = load_model(args.model, self.dtype, self.device, max_positions=None,
                            load_format=args.load_format, model_preset=args.model_preset,
                            seed=args.seed)
        self.model_name = loaded.name
        self.arch = loaded.arch
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        self.max_model_len = args.max_model_len or min(
            self.arch.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
        if self.max_model_len > self.arch.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {self.arch.max_position_embeddings}")
        cache = args.cache_config()
        # CUDA: the peak of a worst-case step comes out of the KV budget (0 elsewhere).
        self._activation_bytes = profile_activation_bytes(
            loaded.model, args.token_budget, args.max_num_seqs, cache.block_size,
            self.dtype, self.device)
        self.num_blocks = cache.num_blocks or self._blocks_for_budget(cache)
        self.block_size = cache.block_size
        # The model's identity enters every prefix-cache hash (it matters once KV crosses
        # engines, as in disaggregated prefill; within one engine the model never changes).
        self.kv = KVCacheManager(self.num_blocks, cache.block_size, args.enable_prefix_caching,
                                 model_key=self._model_key())
        self.scheduler = Scheduler(args.scheduler_config(self.max_model_len), self.kv)
        self.runner = ModelRunner(loaded.model, self.num_blocks, cache.block_size, self.dtype,
                                  self.device, kv_dtype=self.kv_dtype, max_num_seqs=args.max_num_seqs,
                                  max_model_len=self.max_model_len,
                                  enforce_eager=args.enforce_eager,
                                  quantization=self.quantization)
        self.kv_connector = self._start_kv_transfer(args)
        self.async_scheduling = (self.device.type == "cuda" if args.async_scheduling is None
                                 else args.async_scheduling)
        self._in_flight: Optional[tuple[SchedulerOutput, StepHandle]] = None
        self._groups: dict[str, _Group] = {}
        self._child_group: dict[str, tuple[_Group, _Child]] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        if args.serving and args.max_num_batched_tokens is None and self.device.type == "cpu":
            budget = cpu_budget.serving_budget(self)   # runs a step: the engine is complete
            self.scheduler.config = args.scheduler_config(self.max_model_len, budget)
        logger.info("engine: %s, %s on %s, KV cache %d blocks x %d tokens = %d tokens",
                    self.model_name, self.dtype, self.device, self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size)

    def _model_key(self) -> str:
        """What a cached block's KV depends on besides its tokens (in every prefix hash)."""
        key = f"{self.model_name}:{self.dtype}"
        if self.quantization is not None:   # decode steps' KV comes from the 4-bit weights
            key = f"{key}:{self.quantization}"
        return key if self.kv_dtype == self.dtype else f"{key}:kv-{self.kv_dtype}"

    def _blocks_for_budget(self, cache: CacheConfig) -> int:
        if self.device.type == "cuda":
            budget = cuda_kv_budget(cache.gpu_memory_utilization, self.device,
                                    self._activation_bytes)
        else:
            budget = int((cache.kv_cache_memory_gib or DEFAULT_KV_CACHE_GIB) * GIB)
        n = num_blocks_for_memory(self.arch, cache.block_size, self.kv_dtype, budget)
        # More blocks than the longest sequences of a full batch could use is waste.
        cap = cdiv(self.max_model_len, cache.block_size) * self.args.max_num_seqs
        return min(n, cap)

    def _start_kv_transfer(self, args: EngineArgs) -> Optional[KVConnectorWorker]:
        """Disaggregated prefill: the NIXL connector and its side channel (roles prefill and
        decode); None when colocated."""
        if args.kv_role == "both":
            return None
        from pagoda.kv_transfer.nixl import NixlConnector
        from pagoda.kv_transfer.side_channel import resolve_secret

        self.engine_id = uuid.uuid4().hex
        config = args.kv_transfer_config(self.engine_id)
        self.scheduler.enable_kv_transfer(config, ("", 0))
        self._kv_secret = resolve_secret(args.kv_secret)
        connector = NixlConnector(config, self._kv_secret, self.runner.kv_caches,
                                  self.kv.model_key, self.scheduler.leases)
        self.scheduler.kv_address = connector.address
        return connector

    # ------------------------------------------------------------------ intake
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, prompt: Optional[str] = None,
                    arrival_time: Optional[float] = None,
                    cache_salt: Optional[str] = None,
                    kv_transfer_params: Optional[dict] = None) -> None:
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._validate_prompt(prompt_token_ids, params)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError("cache_salt must be a non-empty string")
        kv_transfer = self._validate_kv_transfer(kv_transfer_params, params, prompt_token_ids)
        max_tokens = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        now = time.monotonic() if arrival_time is None else arrival_time
        group = _Group(request_id, prompt, list(prompt_token_ids), params, RequestMetrics(now))
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None] * len(prompt_token_ids)
        for i in range(params.n):
            cid = request_id if params.n == 1 else f"{request_id}:{i}"
            donor = None if i == 0 else group.children[0].request.request_id
            req = Request(cid, prompt_token_ids, params, self.arch.eos_token_ids, max_tokens, now,
                          donor, cache_salt, kv_transfer if i == 0 else None)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                           params.include_stop_str_in_output,
                                           params.skip_special_tokens, params.min_tokens)
            child = _Child(i, req, detok, [] if params.logprobs is not None else None)
            group.children.append(child)
            self._child_group[cid] = (group, child)
            if i > 0:
                group.deferred.append(req)  # joins when the first child has its prompt
        self._groups[request_id] = group
        self.scheduler.add_request(group.children[0].request, seed_offset=0)
        self.num_prompt_tokens += len(prompt_token_ids)

    def _validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_token_ids
               if type(t) is not int or not 0 <= t < vocab]  # type(): bools are not ids
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:3]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; the context length is "
                             f"{self.max_model_len}, leaving no room to generate")
        if params.max_tokens is not None and (
                len(prompt_token_ids) + params.max_tokens > self.max_model_len):
            raise ValueError(f"max_tokens {params.max_tokens} + prompt {len(prompt_token_ids)} "
                             f"tokens exceeds the context length {self.max_model_len}")

    def _validate_kv_transfer(self, raw: Optional[dict], params: SamplingParams,
                              prompt_token_ids: list[int]) -> Optional[KVTransferRequest]:
        kv_transfer = parse_kv_transfer_params(raw)
        if kv_transfer is None:
            return None
        role = self.args.kv_role
        if kv_transfer.do_remote_decode and role != "prefill":
            raise ValueError(f"kv_transfer_params.do_remote_decode needs an instance started "
                             f"with --kv-role prefill (this one is {role!r})")
        if kv_transfer.do_remote_decode and params.n != 1:
            raise ValueError("n must be 1 with kv_transfer_params.do_remote_decode")
        if kv_transfer.remote_prefill is not None and role != "decode":
            raise ValueError(f"kv_transfer_params.do_remote_prefill needs an instance started "
                             f"with --kv-role decode (this one is {role!r})")
        if kv_transfer.remote_prefill is not None:
            self._check_remote_prefill(kv_transfer.remote_prefill, prompt_token_ids)
        return kv_transfer

    def _check_remote_prefill(self, remote: RemotePrefill, prompt_token_ids: list[int]) -> None:
        """Only parameters a prefill instance issued, for this very prompt, are taken: a
        client can neither point this instance at an address nor at blocks of its choosing."""
        if not remote.verify(self._kv_secret, prompt_token_ids):
            raise ValueError("kv_transfer_params.signature does not match: the parameters were "
                             "not issued for this prompt by a prefill instance sharing this "
                             "instance's --kv-secret, or were altered")
        if remote.num_tokens != len(prompt_token_ids):
            raise ValueError(f"kv_transfer_params.remote_num_tokens is {remote.num_tokens}, the "
                             f"prompt has {len(prompt_token_ids)} tokens")
        if len(remote.block_ids) != cdiv(remote.num_tokens, self.block_size):
            raise ValueError(f"kv_transfer_params.remote_block_ids has {len(remote.block_ids)} "
                             f"blocks for {remote.num_tokens} tokens of {self.block_size}")

    def abort_request(self, request_id: str) -> None:
        group = self._groups.get(request_id)
        if group is None:
            return
        ids = [c.request.request_id for c in group.children if c.finish_reason is None]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        group.deferred.clear()
        now = time.monotonic()
        for child in group.children:
            if child.finish_reason is None:
                child.finish_reason, child.finished_time = "abort", now
        self._forget(group)

    def has_unfinished_requests(self) -> bool:
        """Requests live, or a step in flight still to be read."""
        return bool(self._groups) or self._in_flight is not None

    # -------------------------------------------------------------------- step
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One iteration. Returns an output for every request that changed in it, or with
        ``final_only`` (offline generation) only for those that finished: a streaming
        output copies the tokens so far, which for every running request at every step
        costs the host time a GPU step waits on."""
        sched = self.scheduler.schedule()
        self._start_transfers(sched)
        core_outs, read_previous = self._run(sched)
        core_outs.extend(self.scheduler.take_pending_outputs())
        transfers_moved = self._poll_transfers(core_outs)
        progress = (not sched.is_empty or read_previous or bool(core_outs)
                    or bool(sched.kv_loads) or transfers_moved)
        if not progress and self.scheduler.loading:
            time.sleep(KV_POLL_INTERVAL_S)  # only KV pulls in flight: do not spin
            return []
        if not progress and self._groups:
            raise RuntimeError("the scheduler made no progress with requests pending: "
                               f"{self.scheduler.num_waiting} waiting, "
                               f"{self.scheduler.num_running} running")
        now = time.monotonic()
        self._mark_scheduled(sched.num_scheduled_tokens, now)
        touched: dict[str, _Group] = {}
        for out in core_outs:
            group, child = self._child_group[out.request_id]
            self._apply(group, child, out, now)
            touched[group.request_id] = group
        results = []
        for group in touched.values():
            finished = group.finished
            if finished or not final_only:
                results.append(self._make_output(group))
            if finished:
                self._forget(group)
        if not self._groups and self._in_flight is not None:
            self._read(self._in_flight)   # only dropped tokens of finished requests: go idle
            self._in_flight = None
        return results

    def _run(self, sched: SchedulerOutput) -> tuple[list[EngineCoreOutput], bool]:
        """Run the model on ``sched`` and take in sampled tokens: this step's, or with async
        scheduling the step in flight's, read after this one is launched. Returns the
        outputs and whether a step launched earlier was read."""
        if not self.async_scheduling:
            return self.scheduler.update_from_output(sched, self.runner.execute_model(sched)), False
        previous, self._in_flight = self._in_flight, None
        handle = self.runner.launch(sched)
        if not sched.is_empty:
            self._in_flight = (sched, handle)
        outs = self._read(previous) if previous is not None else []
        return outs, previous is not None

    def _read(self, launched: tuple[SchedulerOutput, StepHandle]) -> list[EngineCoreOutput]:
        sched, handle = launched
        return self.scheduler.update_from_output(sched, self.runner.collect(handle))

    def _mark_scheduled(self, scheduled: dict[str, int], now: float) -> None:
        for rid in scheduled:
            group, _ = self._child_group[rid]
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now

    def _apply(self, group: _Group, child: _Child, out: EngineCoreOutput, now: float) -> None:
        if out.prompt_logprobs is not None and group.prompt_logprobs is not None:
            start, entries = out.prompt_logprobs
            for j, lp in enumerate(entries):
                group.prompt_logprobs[start + 1 + j] = lp
        if out.new_token_ids:
            self.num_generation_tokens += len(out.new_token_ids)
            if child.first_token_time is None:
                child.first_token_time = now
                if group.metrics.first_token_time is None:
                    group.metrics.first_token_time = now
            if child.logprobs is not None and out.logprobs is not None:
                child.logprobs.append(out.logprobs)
            stop_str = child.detok.update(self._text_tokens(child, out))
            if stop_str is not None:
                if out.finish_reason is None:
                    self.scheduler.finish_requests([out.request_id],
                                                   RequestStatus.FINISHED_STOPPED, stop_str)
                out.finish_reason, out.stop_reason = "stop", stop_str
        if child.index == 0 and group.deferred and (out.new_token_ids or out.finish_reason):
            self._release_siblings(group)
        if out.finish_reason is not None:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
            child.finish_detail = out.finish_detail or child.request.finish_detail
            child.finished_time = now

    @staticmethod
    def _text_tokens(child: _Child, out: EngineCoreOutput) -> list[int]:
        """The tokens whose text joins the output: a stop token (a stop_token_ids entry or
        EOS) that ended the request stays in token_ids but not in the text."""
        params = child.request.sampling_params
        if out.finish_reason == "stop" and not params.include_stop_str_in_output:
            last = out.new_token_ids[-1]
            if last in params.stop_token_ids or last in child.request.eos_token_ids:
                return out.new_token_ids[:-1]
        return out.new_token_ids

    def _release_siblings(self, group: _Group) -> None:
        """The first child has computed the prompt: its siblings may now share its blocks."""
        for i, req in reversed(list(enumerate(group.deferred, start=1))):
            self.scheduler.add_request_first(req, seed_offset=i)
        group.deferred.clear()

    def _make_output(self, group: _Group) -> RequestOutput:
        completions = [self._completion(c) for c in group.children]
        tpot = None
        c0 = group.children[0]
        if c0.finished_time and c0.first_token_time and c0.request.num_output_tokens > 1:
            tpot = (c0.finished_time - c0.first_token_time) / (c0.request.num_output_tokens - 1)
        finished = group.finished
        if finished:
            group.metrics.finished_time = max(c.finished_time or 0.0 for c in group.children)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions,
                             finished, group.metrics, tpot, group.prompt_logprobs,
                             c0.request.num_cached_tokens or 0, self._issued_params(group))

    @staticmethod
    def _completion(child: _Child) -> CompletionOutput:
        ids = list(child.request.output_token_ids)
        cumulative = (sum(lp.logprob for lp in child.logprobs)
                      if child.logprobs is not None else None)
        return CompletionOutput(child.index, child.detok.text, ids, child.finish_reason,
                                child.stop_reason, child.finish_detail,
                                list(child.logprobs) if child.logprobs is not None else None,
                                cumulative)

    def _forget(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        for child in group.children:
            self._child_group.pop(child.request.request_id, None)

    # ------------------------------------------------------------ prefix cache
    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens of admitted requests looked up in the prefix cache."""
        return self.scheduler.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, the tokens whose KV was found cached."""
        return self.scheduler.prefix_cache_hits

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (requests running keep theirs); returns how many."""
        return self.kv.reset_prefix_cache()

    # ------------------------------------------------------------- KV transfer
    def _start_transfers(self, sched: SchedulerOutput) -> None:
        if self.kv_connector is not None:
            if sched.kv_loads:
                self.kv_connector.start_loads(sched.kv_loads)
            if sched.kv_releases:
                self.kv_connector.release_remote(sched.kv_releases)

    def _poll_transfers(self, core_outs: list[EngineCoreOutput]) -> bool:
        """Take in finished pulls and released leases; requests that failed for good join
        ``core_outs``. True if anything moved."""
        if self.kv_connector is None:
            return False
        events = self.kv_connector.poll()
        self.scheduler.apply_kv_events(events)
        failed = self.scheduler.take_pending_outputs()
        core_outs.extend(failed)
        return events.any or bool(failed)

    def _issued_params(self, group: _Group) -> Optional[dict]:
        """Prefill role: the signed kv_transfer_params of a finished request's lease."""
        remote = group.children[0].request.kv_transfer_out
        if remote is None:
            return None
        return remote.signed(self._kv_secret, group.prompt_token_ids).to_json()

    def poll_kv_transfers(self) -> None:
        """For an idle server loop: expire leases and take in finished transfers even when
        no request is running (a prefill instance's leases outlive its requests)."""
        if self.kv_connector is not None:
            self.scheduler.expire_leases()
            self.scheduler.apply_kv_events(self.kv_connector.poll())

    def close(self) -> None:
        if self.kv_connector is not None:
            self.kv_connector.close()
            self.kv_connector = None

    # ----------------------------------------------------------------- helpers
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        if not self.chat_template:
            raise ValueError(f"model {self.model_name!r} has no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False, chat_template=self.chat_template)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat template's text already holds any BOS it wants: add no special tokens."""
        text = self.apply_chat_template(messages)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available")
    return dev

"""ModelRunner: SchedulerOutput -> tensors -> one forward pass -> sampled tokens.

It keeps a small state per request (its tokens and block table) so the scheduler only sends
what changed. Each step's batch puts decode-form requests (one query token) first, then
prefill chunks; see ``pagoda.attention.metadata``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.attention.metadata import AttentionMetadata, PrefillChunk
from pagoda.core.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput
from pagoda.models.llama import LlamaForCausalLM
from pagoda.sampling import SamplingParams
from pagoda.worker.kv_cache import allocate_kv_cache
from pagoda.worker.sampler import SamplingRow, prompt_token_logprobs, sample


@dataclass
class CachedRequestState:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    stop_ids: list[int]            # EOS + stop tokens, masked until min_tokens
    seed_offset: int = 0


@dataclass
class StepBatch:
    input_ids: torch.Tensor        # (T,)
    positions: torch.Tensor        # (T,)
    attn: AttentionMetadata
    logits_indices: list[int] = field(default_factory=list)   # last row of each sampler
    samplers: list[str] = field(default_factory=list)
    prompt_rows: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # row, pos, count


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_caches = allocate_kv_cache(model.arch, num_blocks, block_size, dtype, device)
        self.states: dict[str, CachedRequestState] = {}

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput()
        batch = self._prepare_inputs(sched)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)
        output = ModelRunnerOutput()
        if batch.samplers:
            self._sample(hidden, batch, output)
        if batch.prompt_rows:
            self._prompt_logprobs(hidden, batch, output)
        return output

    # ------------------------------------------------------------------ states
    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids | sched.preempted_request_ids:
            self.states.pop(rid, None)
        for new in sched.new_requests:
            self.states[new.request_id] = self._new_state(new)
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    @staticmethod
    def _new_state(new: NewRequestData) -> CachedRequestState:
        p = new.sampling_params
        stop_ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids.extend(new.eos_token_ids)
        return CachedRequestState(new.request_id, list(new.token_ids), new.num_prompt_tokens, p,
                                  list(new.block_ids), new.num_computed_tokens, stop_ids,
                                  new.seed_offset)

    # ------------------------------------------------------------------ inputs
    def _prepare_inputs(self, sched: SchedulerOutput) -> StepBatch:
        counts = sched.num_scheduled_tokens
        decodes = [rid for rid, n in counts.items() if n == 1]
        prefills = [rid for rid, n in counts.items() if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        samplers: list[str] = []
        prompt_rows: dict[str, tuple[int, int, int]] = {}
        chunks: list[PrefillChunk] = []
        bs = self.block_size
        for rid in decodes + prefills:
            state, n = self.states[rid], counts[rid]
            start, row = state.num_computed_tokens, len(input_ids)
            input_ids.extend(state.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(state.block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
            if n > 1:
                chunks.append(PrefillChunk(row, n, start + n, self._block_table(state, start + n)))
            if start + n == len(state.token_ids):
                logits_indices.append(row + n - 1)
                samplers.append(rid)
            if state.params.prompt_logprobs is not None and start < state.num_prompt_tokens - 1:
                prompt_rows[rid] = (row, start, min(start + n, state.num_prompt_tokens - 1) - start)
        tables, seq_lens, max_len = self._decode_tables(decodes)
        attn = AttentionMetadata(
            slot_mapping=self._tensor(slots), num_decode_tokens=len(decodes),
            decode_block_tables=tables, decode_seq_lens=seq_lens, decode_max_seq_len=max_len,
            prefills=chunks, block_size=bs)
        return StepBatch(self._tensor(input_ids), self._tensor(positions), attn,
                         logits_indices, samplers, prompt_rows)

    def _block_table(self, state: CachedRequestState, num_tokens: int) -> torch.Tensor:
        num_blocks = -(-num_tokens // self.block_size)
        return self._tensor(state.block_ids[:num_blocks])

    def _decode_tables(self, decodes: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not decodes:
            empty = self._tensor([])
            return empty.view(0, 0), empty, 0
        seq_lens = [self.states[rid].num_computed_tokens + 1 for rid in decodes]
        max_len = max(seq_lens)
        width = -(-max_len // self.block_size)
        rows = [self.states[rid].block_ids[:width] for rid in decodes]
        padded = [r + [0] * (width - len(r)) for r in rows]
        return self._tensor(padded), self._tensor(seq_lens), max_len

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    # ---------------------------------------------------------------- sampling
    def _sample(self, hidden: torch.Tensor, batch: StepBatch, output: ModelRunnerOutput) -> None:
        logits = self.model.compute_logits(hidden[batch.logits_indices])   # (S, V)
        rows = [self._sampling_row(self.states[rid]) for rid in batch.samplers]
        tokens, logprobs = sample(logits, rows)
        for rid, token, lp in zip(batch.samplers, tokens, logprobs):
            self.states[rid].token_ids.append(token)
            output.sampled_token_ids[rid] = token
            if lp is not None:
                output.logprobs[rid] = lp

    @staticmethod
    def _sampling_row(state: CachedRequestState) -> SamplingRow:
        return SamplingRow(state.params, state.token_ids, state.num_prompt_tokens,
                           state.stop_ids, state.seed_offset)

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: StepBatch,
                         output: ModelRunnerOutput) -> None:
        for rid, (row, pos, count) in batch.prompt_rows.items():
            state = self.states[rid]
            logprobs = torch.log_softmax(
                self.model.compute_logits(hidden[row:row + count]).float(), dim=-1)  # (count, V)
            next_tokens = state.token_ids[pos + 1:pos + 1 + count]
            output.prompt_logprobs[rid] = (
                pos, prompt_token_logprobs(logprobs, next_tokens, state.params.prompt_logprobs))


"""ModelRunner: SchedulerOutput -> tensors -> one forward pass -> sampled tokens.

It keeps a small state per request (its tokens and block table) so the scheduler only sends
what changed. Each step's batch puts decode-form requests (one query token) first, then
prefill chunks; see ``pagoda.attention.metadata``.

A step's integer inputs are gathered on the host into one buffer (pinned on CUDA) and
copied with a single transfer (asynchronous on CUDA; none on the CPU, where the views are of
the buffer itself), on every device alike: one input path. Nothing in a step waits for the
GPU except reading the sampled tokens (argmax and sampling run on the device). Decode-only
steps on CUDA replay a CUDA graph (``cuda_graph.py``) unless ``enforce_eager``.

Pooling requests (embeddings, scores; ``pooler.py``) sample nothing: each chunk's hidden rows
go to the request's :class:`PoolingState`, and the step with its last prompt row finishes it
into the step's ``pooled`` output instead of a token.

Speculative decoding: a decode row with k drafts becomes k + 1 decode rows of the same
request, at consecutive positions, each attending to the tokens up to its own (the whole
batch's K/V is written before any row attends), so the decode kernels and CUDA graphs take
them as they are. Every position samples, as it would without speculation, and
``spec_verify.accept`` keeps the drafts up to the first one that differs from its sample.

A step is ``launch`` (queue the forward and the sampling) then ``collect`` (read the sampled
tokens). Between the two the engine may launch the next step (async scheduling): a decode
whose input token the step in flight samples reads it from that step's device tensor:

    step N     launch ......... collect            tokens of N on the host
    step N+1              launch .......... collect
                          ^ its decode rows take N's tokens on the device
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Protocol

import torch

from pagoda.attention import backend
from pagoda.attention.metadata import (
    AttentionMetadata,
    ChunkSpan,
    PackedPrefills,
    PrefillChunk,
    packed_lists,
)
from pagoda.config import DEFAULT_MAX_NUM_SEQS
from pagoda.core.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput
from pagoda.kernels import cpu_fused
from pagoda.lora_request import LoRARequest
from pagoda.models.pooling import PoolingState
from pagoda.models.prepare import PreparedModel
from pagoda.pooling_params import PoolingParams
from pagoda.sampling import SamplingParams
from pagoda.utils import cdiv
from pagoda.worker.cuda_graph import DecodeGraphs
from pagoda.worker.host_buffer import IntPart, pack_ints, to_device
from pagoda.worker.kv_cache import allocate_kv_cache
from pagoda.worker.pooler import Pooler
from pagoda.worker.sampler import (
    SamplingRow,
    greedy_from_hidden,
    prompt_token_logprobs,
    sample_tokens,
    token_logprobs,
)
from pagoda.worker.spec_verify import accept

logger = logging.getLogger(__name__)


@dataclass
class CachedRequestState:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    stop_ids: list[int]  # EOS + stop tokens, masked until min_tokens
    seed_offset: int = 0
    num_pending: int = 0  # sampled by a launched step, not yet collected (0 or 1)
    sliding_ids: list[int] = field(default_factory=list)  # the sliding layers' table, if apart
    sampled_row: int = 0  # its row among the last launched step's sampled tokens
    pooling_params: Optional[PoolingParams] = None  # a pooling request: pools, never samples
    pool: Optional[PoolingState] = None  # its rows pooled so far (pooling requests)
    lora: Optional[LoRARequest] = None  # the adapter it runs under (None: the base)


@dataclass
class StepBatch:
    """A step's model inputs on the device."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    attn: AttentionMetadata
    logits_index_tensor: Optional[torch.Tensor] = None  # (S,) the rows that sample


@dataclass
class HostInputs:
    """A step's inputs as Python lists, before they become tensors on the device."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)  # the rows that sample
    samplers: list[str] = field(default_factory=list)  # their request ids
    # Speculative decoding: request id -> its drafts; its rows sample at every position.
    drafts: dict[str, list[int]] = field(default_factory=dict)
    # prompt logprobs: row, position, count
    prompt_rows: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    decode_seq_lens: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)  # unpadded, per decode row
    chunks: list[ChunkSpan] = field(default_factory=list)  # the prefill chunks
    # Decode rows whose input token is still on the device, and its row in the last
    # launched step's sampled tokens.
    placeholder_rows: list[int] = field(default_factory=list)
    placeholder_sources: list[int] = field(default_factory=list)
    allowed_tokens: dict[str, list[bytes]] = field(default_factory=dict)  # structured outputs
    # Pooling requests' chunks: (request id, first row, rows, whether its prompt ends there).
    pool_chunks: list[tuple[str, int, int, bool]] = field(default_factory=list)
    # The sliding layers' slots, decode tables and chunks when their KV is apart.
    sliding: Optional["HostInputs"] = None
    # The step's requests in batch order (ModelRunner._row_order), chosen once.
    order: tuple[list[str], list[str], list[str]] = ([], [], [])


def rows_without_drafts(host: HostInputs) -> int:
    """The rows the step would have without its drafts, which pick the weights of the
    quantized forms (``--quantization int4``, models/cpu_int4.py; int8 layers and output
    projection, models/cpu_int8.py): a verified row runs on what its decode row would have
    run on. Set for every step, so the output projection, whose input is only the sampled
    rows, counts the step's rows as the layers do."""
    return len(host.input_ids) - sum(len(d) for d in host.drafts.values())


@dataclass
class StepHandle:
    """A launched step. Its sampled tokens stay on the device until ``collect``."""

    samplers: list[str] = field(default_factory=list)  # request ids, one per token
    rows: list[SamplingRow] = field(default_factory=list)
    drafts: dict[str, list[int]] = field(default_factory=dict)  # verified this step
    tokens: Optional[torch.Tensor] = None  # (S,) on the device
    host_tokens: Optional[torch.Tensor] = None  # (S,) pinned copy (CUDA)
    ready: Optional[torch.cuda.Event] = None  # recorded after that copy
    raw_logprobs: Optional[torch.Tensor] = None  # (S, V) when a row wants logprobs
    output: ModelRunnerOutput = field(default_factory=ModelRunnerOutput)

    def read_tokens(self) -> list[int]:
        """The one wait for the device in a step."""
        if self.ready is not None:
            assert self.host_tokens is not None  # the copy ``ready`` was recorded after
            self.ready.synchronize()
            return self.host_tokens.tolist()
        assert self.tokens is not None  # read only for a step that sampled
        return self.tokens.tolist()


class StepRunner(Protocol):
    """What the engine core runs a step on: this module's ModelRunner, or an encoder's
    (``encoder_runner.py``)."""

    def launch(self, sched: SchedulerOutput) -> StepHandle: ...

    def collect(self, handle: StepHandle) -> ModelRunnerOutput: ...

    def forget_requests(self) -> None: ...


@dataclass
class _Group:
    """One KV pool's attention inputs of a step, laid out for the packed buffer:

    [ slots | seq_lens | decode tables (D x W) | chunk starts (N + 1) | context lens (N)
      | chunk tables (N x Wp) ]
    """

    NUM_PARTS = 6
    host: HostInputs
    block_size: int
    max_len: int  # the longest decode row's context
    width: int  # decode tables' columns
    chunk_width: int  # chunk tables' columns
    parts: list[IntPart]

    @staticmethod
    def of(host: HostInputs, block_size: int) -> _Group:
        max_len = max(host.decode_seq_lens, default=0)
        width = cdiv(max_len, block_size)
        starts, context_lens, blocks = packed_lists(host.chunks)
        chunk_width = max((len(b) for b in blocks), default=0)
        parts: list[IntPart] = [
            host.slots,
            host.decode_seq_lens,
            (host.decode_tables, width),
            starts,
            context_lens,
            (blocks, chunk_width),
        ]
        return _Group(host, block_size, max_len, width, chunk_width, parts)

    def metadata(self, views: list[torch.Tensor]) -> AttentionMetadata:
        """The group's AttentionMetadata over its views of the copied buffer."""
        slots, seq_lens, tables, chunk_starts, ctx_lens, chunk_tables = views
        chunks = self.host.chunks
        chunk_tables = chunk_tables.view(len(chunks), self.chunk_width)  # (N, Wp)
        packed = (
            PackedPrefills(chunk_starts, ctx_lens, chunk_tables, max(c.query_len for c in chunks))
            if chunks
            else None
        )
        return AttentionMetadata(
            slot_mapping=slots,
            num_decode_tokens=len(self.host.decode_seq_lens),
            decode_block_tables=tables.view(len(self.host.decode_seq_lens), self.width),
            decode_seq_lens=seq_lens,
            decode_max_seq_len=self.max_len,
            prefills=[
                PrefillChunk(c.row, c.query_len, c.context_len, chunk_tables[i, : len(c.blocks)])
                for i, c in enumerate(chunks)
            ],
            block_size=self.block_size,
            packed_prefills=packed,
        )


class ModelRunner:
    def __init__(
        self,
        prepared: PreparedModel,
        num_blocks: int,
        block_size: int,
        *,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_model_len: Optional[int] = None,
        enforce_eager: bool = False,
        sliding_num_blocks: Optional[int] = None,
        pooler: Optional[Pooler] = None,
    ) -> None:
        """Run steps of ``prepared``'s model (``models/prepare.py``: its weights, int4 routes
        and ops are final) over a KV cache of ``num_blocks`` blocks it allocates; ``pooler``:
        what its pooling requests' pooled rows become (a pooling model)."""
        model, device = prepared.model, prepared.device
        dtype, kv_dtype = prepared.dtype, prepared.kv_dtype
        self.model = model
        self.block_size = block_size
        self.device = device
        self.int4_route = prepared.int4_route  # speculation: verified rows count as one
        self.int4_max_rows = prepared.int4_max_rows
        self.lora = prepared.lora  # the adapter slots (--enable-lora), else None
        # Sliding layers' KV apart, in a pool of its own (core/sliding_kv.py): the CPU path.
        self.sliding = sliding_num_blocks is not None
        self.is_cuda = device.type == "cuda"
        assert not (self.sliding and self.is_cuda), "sliding-layer tables are built on the CPU"
        self.kv_caches = allocate_kv_cache(
            model.arch, num_blocks, block_size, kv_dtype, device, sliding_num_blocks
        )
        self.states: dict[str, CachedRequestState] = {}
        self.pooler = pooler
        # Greedy rows' argmax on the fused CPU kernel: chosen here, with the ops (PAGODA_FUSED).
        self.fused_sampling = cpu_fused.enabled_for(device, dtype)
        # --deterministic: greedy rows always through the row-tiled output projection.
        self.deterministic = prepared.deterministic
        self.graphs: Optional[DecodeGraphs] = None
        self._last_tokens: Optional[torch.Tensor] = None  # the last launch's samples (S,)
        if self.is_cuda and not enforce_eager and self.lora is None:
            self.graphs = self._capture_graphs(
                min(max_num_seqs, num_blocks), max_model_len or model.rope.max_positions
            )

    def _capture_graphs(self, max_num_seqs: int, max_model_len: int) -> Optional[DecodeGraphs]:
        """CUDA graphs need the Triton kernels (they skip padded rows' KV writes)."""
        if not backend.use_triton(self.device):
            logger.warning("CUDA graphs off: the Triton attention backend is not in use")
            return None
        if not self.model.cuda_graph_safe:
            logger.warning("CUDA graphs off: the MoE layers count tokens per expert on the host")
            return None
        graphs = DecodeGraphs(
            self.model, self.kv_caches, self.block_size, max_num_seqs, max_model_len, self.device
        )
        graphs.capture()
        return graphs

    @property
    def cuda_graph_sizes(self) -> list[int]:
        """The decode batch sizes with a captured graph (empty: eager)."""
        return list(self.graphs.sizes) if self.graphs is not None else []

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One step, start to end."""
        return self.collect(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> StepHandle:
        """Queue the step's forward pass and sampling; wait for nothing (prompt logprobs
        aside, which are read here)."""
        self._update_states(sched)
        if sched.is_empty:
            self._last_tokens = None
            return StepHandle()
        host = self._gather_inputs(sched)
        self.int4_route.rows = rows_without_drafts(host)
        if self.lora is not None:
            self._set_adapters(sched, host)
        logits_index: Optional[torch.Tensor] = None  # (S,) on the device
        if self._graph_fits(host):
            assert self.graphs is not None  # _graph_fits checked it
            hidden = self.graphs.run(
                host.input_ids,
                host.positions,
                host.slots,
                host.decode_seq_lens,
                host.decode_tables,
                fill=partial(self._fill_placeholders, host),
            )  # (B, E)
            if host.samplers and len(host.logits_indices) != len(host.input_ids):
                logits_index = to_device(host.logits_indices, torch.int64, self.device)
        else:
            batch = self._batch(host)
            self._fill_placeholders(host, batch.input_ids)
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)
            logits_index = batch.logits_index_tensor
        handle = StepHandle()
        if host.samplers:
            self._sample(hidden, host, logits_index, handle)
        self._last_tokens = handle.tokens
        if host.pool_chunks:
            self._pool(hidden, host.pool_chunks, handle.output)
        if host.prompt_rows:
            self._prompt_logprobs(hidden, host.prompt_rows, handle.output)
        return handle

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """Read a launched step's sampled tokens into the requests' states and the output:
        each request's one token, or its accepted drafts and the sample after them."""
        output = handle.output
        for rid, pooled in output.pooled.items():
            assert isinstance(pooled, torch.Tensor)
            output.pooled[rid] = pooled.cpu()  # the step's only wait when nothing samples
        if not handle.samplers:
            return output
        tokens = handle.read_tokens()
        logprobs = (
            token_logprobs(handle.raw_logprobs, tokens, handle.rows)
            if handle.raw_logprobs is not None
            else None
        )
        row = 0
        while row < len(tokens):  # a request's rows are consecutive
            rid = handle.samplers[row]
            drafts = handle.drafts.get(rid, [])
            new = accept(drafts, tokens[row : row + len(drafts) + 1])
            state = self.states.get(rid)
            if state is not None and state.num_pending:  # else finished or preempted since
                state.token_ids.extend(new)
                state.num_pending -= 1
            output.sampled_token_ids[rid] = new
            if logprobs is not None and logprobs[row] is not None:
                output.logprobs[rid] = logprobs[row : row + len(new)]  # type: ignore[assignment]
            row += len(drafts) + 1
        return output

    def _graph_fits(self, host: HostInputs) -> bool:
        return (
            self.graphs is not None
            and not host.chunks
            and len(host.input_ids) <= self.graphs.max_batch_size
        )

    # ------------------------------------------------------------------ states
    def forget_requests(self) -> None:
        """Drop every request's state (after calibration steps, whose scheduler is gone)."""
        self.states.clear()

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids | sched.preempted_request_ids:
            self.states.pop(rid, None)
        for new in sched.new_requests:
            self.states[new.request_id] = self._new_state(new)
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            if cached.num_kept_blocks is not None:  # rolled-back drafts freed the rest
                del state.block_ids[cached.num_kept_blocks :]
                del state.sliding_ids[cached.num_kept_blocks :]
            state.block_ids.extend(cached.new_block_ids)
            state.sliding_ids.extend(cached.new_sliding_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _new_state(self, new: NewRequestData) -> CachedRequestState:
        p = new.sampling_params
        stop_ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids.extend(new.eos_token_ids)
        pool = None
        if new.pooling_params is not None:
            assert self.pooler is not None, "a pooling request on a generation model"
            pool = PoolingState(self.pooler.pooling_type)
        return CachedRequestState(
            new.request_id,
            list(new.token_ids),
            new.num_prompt_tokens,
            p,
            list(new.block_ids),
            new.num_computed_tokens,
            stop_ids,
            new.seed_offset,
            sliding_ids=list(new.sliding_block_ids),
            pooling_params=new.pooling_params,
            pool=pool,
            lora=new.lora,
        )

    # ------------------------------------------------------------------ inputs
    def _row_order(self, sched: SchedulerOutput) -> tuple[list[str], list[str], list[str]]:
        """The step's requests in batch order: verified drafts, decodes, prefill chunks;
        with LoRA on, the decodes grouped by adapter (fewer segments for ``punica``)."""
        counts, drafts = sched.num_scheduled_tokens, sched.spec_token_ids
        decodes = [rid for rid, n in counts.items() if n == 1]
        prefills = [rid for rid, n in counts.items() if n > 1 and rid not in drafts]
        if self.lora is not None:
            decodes.sort(key=self._adapter_id)
        return list(drafts), decodes, prefills

    def _adapter_id(self, rid: str) -> int:
        lora = self.states[rid].lora
        return 0 if lora is None else lora.lora_int_id

    def _set_adapters(self, sched: SchedulerOutput, host: HostInputs) -> None:
        """The step's rows of each adapter, in batch order, for the adapted linears; the
        adapters of every live request stay resident (``lora/slots.py``)."""
        assert self.lora is not None
        rows: list[tuple[int, int, LoRARequest]] = []
        row = 0
        for group in host.order:
            for rid in group:
                n, lora = sched.num_scheduled_tokens[rid], self.states[rid].lora
                if lora is not None:
                    rows.append((row, n, lora))
                row += n
        live = {s.lora.lora_int_id for s in self.states.values() if s.lora is not None}
        self.lora.set_step(rows, live)

    def _gather_inputs(self, sched: SchedulerOutput) -> HostInputs:
        counts, drafts = sched.num_scheduled_tokens, sched.spec_token_ids
        order = self._row_order(sched)
        _, decodes, prefills = order
        host = HostInputs(allowed_tokens=sched.allowed_tokens, drafts=drafts, order=order)
        bs = self.block_size
        for rid in drafts:
            self._add_verify_rows(host, rid, drafts[rid])
        for rid in decodes:  # the hot loop of a large decode batch: one token each
            state = self.states[rid]
            pos, row, blocks = state.num_computed_tokens, len(host.input_ids), state.block_ids
            if pos < len(state.token_ids):
                host.input_ids.append(state.token_ids[pos])
            else:  # sampled by the step in flight: filled in on the device
                host.input_ids.append(0)
                host.placeholder_rows.append(row)
                host.placeholder_sources.append(state.sampled_row)
            host.positions.append(pos)
            host.slots.append(blocks[pos // bs] * bs + pos % bs)
            host.decode_seq_lens.append(pos + 1)
            num_blocks = pos // bs + 1
            # The list itself when it is exactly the context's blocks: read within this step.
            host.decode_tables.append(blocks if len(blocks) == num_blocks else blocks[:num_blocks])
            self._note_sampling(host, rid, state, row, pos, 1)
        for rid in prefills:
            state, n = self.states[rid], counts[rid]
            start, row = state.num_computed_tokens, len(host.input_ids)
            host.input_ids.extend(state.token_ids[start : start + n])
            host.positions.extend(range(start, start + n))
            host.slots.extend(
                state.block_ids[p // bs] * bs + p % bs for p in range(start, start + n)
            )
            num_blocks = cdiv(start + n, bs)
            host.chunks.append(ChunkSpan(row, n, start + n, state.block_ids[:num_blocks]))
            self._note_sampling(host, rid, state, row, start, n)
        if self.sliding:
            host.sliding = self._gather_sliding(sched, host)
        return host

    def _gather_sliding(self, sched: SchedulerOutput, host: HostInputs) -> HostInputs:
        """The sliding layers' slots and tables for the rows ``_gather_inputs`` laid out, in
        the same order, from each request's sliding table (holes before the window, which
        no kernel reads)."""
        bs, counts = self.block_size, sched.num_scheduled_tokens
        verify, decodes, prefills = host.order
        out = HostInputs()
        for rid in verify + decodes:
            state = self.states[rid]
            for p in range(state.num_computed_tokens, state.num_computed_tokens + counts[rid]):
                out.slots.append(state.sliding_ids[p // bs] * bs + p % bs)
                out.decode_tables.append(state.sliding_ids[: p // bs + 1])
        for rid, chunk in zip(prefills, host.chunks, strict=True):
            state, start = self.states[rid], self.states[rid].num_computed_tokens
            ids = state.sliding_ids
            out.slots.extend(ids[p // bs] * bs + p % bs for p in range(start, start + counts[rid]))
            out.chunks.append(chunk._replace(blocks=ids[: len(chunk.blocks)]))
        out.decode_seq_lens = host.decode_seq_lens
        return out

    def _add_verify_rows(self, host: HostInputs, rid: str, drafts: list[int]) -> None:
        """Speculative decoding: the request's last token and its drafts, as decode rows at
        consecutive positions, each one sampling. The last token is known (a request with
        a token in flight gets no drafts)."""
        state, bs = self.states[rid], self.block_size
        pos, blocks = state.num_computed_tokens, state.block_ids
        assert pos == len(state.token_ids) - 1 and not state.num_pending, "drafts need the token"
        for i, token in enumerate([state.token_ids[pos], *drafts]):
            p = pos + i
            host.logits_indices.append(len(host.input_ids))
            host.samplers.append(rid)
            host.input_ids.append(token)
            host.positions.append(p)
            host.slots.append(blocks[p // bs] * bs + p % bs)
            host.decode_seq_lens.append(p + 1)
            host.decode_tables.append(blocks[: p // bs + 1])

    @staticmethod
    def _note_sampling(
        host: HostInputs, rid: str, state: CachedRequestState, row: int, start: int, n: int
    ) -> None:
        """Rows ``[row, row + n)`` hold positions ``[start, start + n)`` of ``rid``: the last
        samples if it reaches the end of the known tokens; prompt rows may want logprobs; a
        pooling request's rows are pooled instead."""
        if state.pool is not None:
            host.pool_chunks.append((rid, row, n, start + n == state.num_prompt_tokens))
            return
        if start + n == len(state.token_ids) + state.num_pending:
            host.logits_indices.append(row + n - 1)
            host.samplers.append(rid)
        if state.params.prompt_logprobs is not None and start < state.num_prompt_tokens - 1:
            host.prompt_rows[rid] = (
                row,
                start,
                min(start + n, state.num_prompt_tokens - 1) - start,
            )

    def _fill_placeholders(self, host: HostInputs, input_ids: torch.Tensor) -> None:
        """Write into a step's input ids (T,) the tokens its placeholder rows take from the
        last launched step's samples, on the device (queued after that step)."""
        if not host.placeholder_rows:
            return
        assert self._last_tokens is not None, "a placeholder without a step in flight"
        n = len(host.placeholder_rows)
        idx = to_device(
            host.placeholder_rows + host.placeholder_sources, torch.int64, self.device
        )  # (2n,): one copy
        input_ids.index_copy_(0, idx[:n], self._last_tokens.index_select(0, idx[n:]))

    def _batch(self, host: HostInputs) -> StepBatch:
        """Every integer input of the step in one host buffer (pinned on CUDA), one copy,
        then views on the device:

            [ input_ids | positions | logits idx | attention group | sliding group ]

        where an attention group (``_Group``) is the slots, decode lengths and tables and the
        prefill chunks of one KV pool: the sliding layers' own pool, when theirs is apart,
        is a second group."""
        groups = [_Group.of(host, self.block_size)]
        if host.sliding is not None:
            groups.append(_Group.of(host.sliding, self.block_size))
        parts: list[IntPart] = [host.input_ids, host.positions, host.logits_indices]
        for group in groups:
            parts += group.parts
        buf, sizes = pack_ints(parts, pin=self.device.type == "cuda")
        views = list(buf.to(self.device, non_blocking=True).split(sizes))
        input_ids, positions, logits_idx = views[:3]
        metas = [
            group.metadata(views[3 + i * _Group.NUM_PARTS : 3 + (i + 1) * _Group.NUM_PARTS])
            for i, group in enumerate(groups)
        ]
        attn = metas[0]
        if len(metas) > 1:
            attn.sliding = metas[1]
        return StepBatch(input_ids, positions, attn, logits_idx)

    # ---------------------------------------------------------------- sampling
    def _sample(
        self,
        hidden: torch.Tensor,
        host: HostInputs,
        logits_index: Optional[torch.Tensor],
        handle: StepHandle,
    ) -> None:
        """hidden: (T, E). The tokens stay on the device; on CUDA a pinned copy is queued
        for ``collect`` to read (the one host-device sync of a step)."""
        if len(host.logits_indices) == hidden.shape[0]:
            rows = hidden  # every row samples, in order
        elif logits_index is not None:
            rows = hidden[logits_index]  # (S, E), index already on the device
        else:
            rows = hidden[host.logits_indices]
        sampling_rows = self._sampling_rows(host)
        fused = self.fused_sampling
        tokens = greedy_from_hidden(
            rows,
            self.model.output_weight,
            sampling_rows,
            self.model.packed_head,
            fused=fused,
            invariant=self.deterministic,
        )
        if tokens is None:
            logits = self.model.compute_logits(rows)  # (S, V)
            tokens, handle.raw_logprobs = sample_tokens(logits, sampling_rows, fused=fused)
        for i, rid in enumerate(host.samplers):
            state = self.states[rid]
            if i == 0 or host.samplers[i - 1] != rid:  # a request's first sampled row
                state.num_pending += 1
                state.sampled_row = i
        handle.samplers, handle.rows, handle.tokens = host.samplers, sampling_rows, tokens
        handle.drafts = host.drafts
        if self.device.type == "cuda":
            handle.host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            handle.host_tokens.copy_(tokens, non_blocking=True)
            handle.ready = torch.cuda.Event()
            handle.ready.record()

    def _sampling_rows(self, host: HostInputs) -> list[SamplingRow]:
        """One per sampled position: a verified request's j-th position samples as if its
        first j drafts were already its tokens (penalties, min_tokens, the seed's output
        index, the grammar's mask after them)."""
        rows: list[SamplingRow] = []
        j = 0  # the row's position among its request's sampled rows
        for i, rid in enumerate(host.samplers):
            j = j + 1 if i and host.samplers[i - 1] == rid else 0
            masks = host.allowed_tokens.get(rid)
            allowed = masks[j] if masks is not None and j < len(masks) else None
            drafts = host.drafts[rid][:j] if j else []
            rows.append(self._sampling_row(self.states[rid], allowed, drafts))
        return rows

    def _sampling_row(
        self,
        state: CachedRequestState,
        allowed: Optional[bytes] = None,
        drafts: Optional[list[int]] = None,
    ) -> SamplingRow:
        """Penalties count a token still in flight from its slot in the last step's samples
        (a view: nothing is copied or waited for)."""
        pending = None
        if state.num_pending:
            assert self._last_tokens is not None  # the last launch sampled its token
            pending = self._last_tokens[state.sampled_row : state.sampled_row + 1]  # (1,)
        return SamplingRow(
            state.params,
            state.token_ids,
            state.num_prompt_tokens,
            state.stop_ids,
            state.seed_offset,
            pending,
            allowed,
            drafts or [],
        )

    def _pool(
        self,
        hidden: torch.Tensor,
        chunks: list[tuple[str, int, int, bool]],
        output: ModelRunnerOutput,
    ) -> None:
        """hidden: (T, E). Each pooling request's rows join its pooled state; those whose
        prompt ended here are finished into ``output.pooled`` (on the device until
        ``collect``)."""
        done: list[tuple[str, CachedRequestState]] = []
        for rid, row, n, last in chunks:
            state = self.states[rid]
            assert state.pool is not None  # only pooling requests have pool chunks
            state.pool.add(hidden[row : row + n])  # (n, E)
            if last:
                done.append((rid, state))
        if not done:
            return
        assert self.pooler is not None  # pooling requests exist only on a pooling model
        pooled = torch.stack([s.pool.result() for _, s in done if s.pool is not None])
        params = [s.pooling_params for _, s in done if s.pooling_params is not None]
        for (rid, _), result in zip(done, self.pooler.finish(pooled, params), strict=True):
            output.pooled[rid] = result

    def _prompt_logprobs(
        self,
        hidden: torch.Tensor,
        prompt_rows: dict[str, tuple[int, int, int]],
        output: ModelRunnerOutput,
    ) -> None:
        for rid, (row, pos, count) in prompt_rows.items():
            state = self.states[rid]
            logprobs = torch.log_softmax(
                self.model.compute_logits(hidden[row : row + count]).float(), dim=-1
            )  # (count, V)
            next_tokens = state.token_ids[pos + 1 : pos + 1 + count]
            num_top = state.params.prompt_logprobs
            assert num_top is not None  # only such requests have prompt rows
            output.prompt_logprobs[rid] = (
                pos,
                prompt_token_logprobs(logprobs, next_tokens, num_top),
            )

"""The physical KV cache: per layer one preallocated tensor of blocks (PagedAttention).

Layout per layer: (2, num_blocks, block_size, num_kv_heads, head_dim), K then V. The block
ids the scheduler hands out index the second dimension of every layer's tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from pagoda.attention.metadata import AttentionMetadata, PrefillChunk
from pagoda.models.base import CausalLM
from pagoda.models.config import ModelArch
from pagoda.utils import cdiv

GIB = 1 << 30


def bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * elem


def split_for_sliding(
    arch: ModelArch, block_size: int, dtype: torch.dtype, memory_bytes: int, sliding_blocks: int
) -> int:
    """Blocks of the full-attention layers' pool when the sliding layers take
    ``sliding_blocks`` of their own out of ``memory_bytes`` (0 if that leaves nothing)."""
    full, sliding = layer_counts(arch)
    per_layer = bytes_per_block(arch, block_size, dtype) // arch.num_layers
    left = memory_bytes - sliding * sliding_blocks * per_layer
    return max(left // (full * per_layer), 0) if full else 0


def num_blocks_for_memory(
    arch: ModelArch, block_size: int, dtype: torch.dtype, memory_bytes: int
) -> int:
    n = memory_bytes // bytes_per_block(arch, block_size, dtype)
    if n < 1:
        raise ValueError(
            f"the KV cache budget ({memory_bytes / GIB:.3f} GiB) holds no block "
            f"of {block_size} tokens"
        )
    return int(n)


def cuda_kv_budget(utilization: float, device: torch.device, activation_bytes: int = 0) -> int:
    """Bytes for the KV cache on CUDA: ``utilization`` of the device's memory, less what is in
    use now (the weights) and ``activation_bytes`` (a step's peak, see
    :func:`profile_activation_bytes`)."""
    free, total = torch.cuda.mem_get_info(device)
    reserve = (1.0 - utilization) * total
    return int(max(0.0, free - reserve - activation_bytes))


def profile_activation_bytes(
    model: CausalLM,
    num_tokens: int,
    num_seqs: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """CUDA: the peak memory one worst-case step allocates beyond what is allocated now, by
    running it: a forward pass over ``num_tokens`` prompt tokens (the step's token budget) and
    the logits of ``num_seqs`` rows in fp32 (the sampler's copy). Its scratch KV cache (just
    enough blocks for the pass) is counted too, a slight overestimate. Returns 0 off CUDA."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_profile_step(model, num_tokens, num_seqs, block_size, dtype, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return int(peak)


@torch.inference_mode()
def run_profile_step(
    model: CausalLM,
    num_tokens: int,
    num_seqs: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """One prefill chunk of ``num_tokens`` tokens over a scratch cache, then ``num_seqs`` rows
    of logits in fp32. Returns the logits (num_seqs, V)."""
    num_blocks = cdiv(num_tokens, block_size)
    caches = allocate_kv_cache(model.arch, num_blocks, block_size, dtype, device)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)  # (T,)
    positions = torch.arange(num_tokens, dtype=torch.int64, device=device)  # (T,)
    table = torch.arange(num_blocks, dtype=torch.int64, device=device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    meta = AttentionMetadata(
        slot_mapping=positions,
        num_decode_tokens=0,
        decode_block_tables=empty.view(0, 0),
        decode_seq_lens=empty,
        decode_max_seq_len=0,
        prefills=[PrefillChunk(0, num_tokens, num_tokens, table)],
        block_size=block_size,
    )
    hidden = model(ids, positions, caches, meta)  # (T, E)
    rows = hidden[-min(num_seqs, num_tokens) :]  # (S, E)
    return model.compute_logits(rows).float()  # (S, V)


def allocate_kv_cache(
    arch: ModelArch,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_num_blocks: Optional[int] = None,
) -> list[torch.Tensor]:
    """One tensor per layer; a sliding-window layer's has ``sliding_num_blocks`` blocks when
    those layers' KV is kept apart (core/sliding_kv.py), else ``num_blocks`` like the rest."""

    def shape(layer: int) -> tuple[int, ...]:
        n = sliding_num_blocks if sliding_num_blocks and arch.window(layer) else num_blocks
        return (2, n, block_size, arch.num_kv_heads, arch.head_dim)

    # Zeroed, not empty: padded decode slots are masked, but 0 * NaN would still poison.
    return [torch.zeros(shape(i), dtype=dtype, device=device) for i in range(arch.num_layers)]


def layer_counts(arch: ModelArch) -> tuple[int, int]:
    """(full-attention layers, sliding-window layers)."""
    sliding = sum(1 for i in range(arch.num_layers) if arch.window(i))
    return arch.num_layers - sliding, sliding

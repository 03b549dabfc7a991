"""The physical KV cache: per layer one preallocated tensor of blocks (PagedAttention).

Layout per layer: (2, num_blocks, block_size, num_kv_heads, head_dim), K then V. The block
ids the scheduler hands out index the second dimension of every layer's tensor.
"""
from __future__ import annotations

import torch

from pagoda.models.config import ModelArch

GIB = 1 << 30


def bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * elem


def num_blocks_for_memory(arch: ModelArch, block_size: int, dtype: torch.dtype,
                          memory_bytes: int) -> int:
    n = memory_bytes // bytes_per_block(arch, block_size, dtype)
    if n < 1:
        raise ValueError(f"the KV cache budget ({memory_bytes / GIB:.3f} GiB) holds no block "
                         f"of {block_size} tokens")
    return int(n)


def cuda_kv_budget(utilization: float, device: torch.device) -> int:
    """Bytes for the KV cache on CUDA: a fraction of what is free after loading the model."""
    free, total = torch.cuda.mem_get_info(device)
    reserve = (1.0 - utilization) * total
    return int(max(0.0, free - reserve))


def allocate_kv_cache(arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[torch.Tensor]:
    # Zeroed, not empty: padded decode slots are masked, but 0 * NaN would still poison.
    shape = (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]

"""How many KV blocks the engine holds, and whether the sliding-window layers get a pool of
their own: one pure function, :func:`plan_pools`, from the model's shapes, the flags and the
memory budget (bytes, measured by the caller) to a :class:`KVPlan`.

One pool holds every layer's KV unless the model has both kinds of layer (Gemma 2/3) and the
split pays (``core/sliding_kv.py``): then the sliding layers' pool is sized for what
``max_num_seqs`` requests' windows plus one step can hold at once (so it never runs short
before the full layers' pool does, and scheduling behaves as with one pool), and the full
layers get what is left of the budget. No split with ``--disable-hybrid-kv-cache-manager``,
with KV transfer or on CUDA (they take one table), or where the sliding layers' blocks would
cost as much as they save.

Invariant: the plan depends only on its arguments (no device, no model), and a pool is never
larger than a full batch of the longest sequences could use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagoda.core.sliding_kv import sliding_pool_blocks
from pagoda.models.config import ModelArch
from pagoda.utils import cdiv
from pagoda.worker.kv_cache import layer_counts, num_blocks_for_memory, split_for_sliding


@dataclass(frozen=True)
class KVRequest:
    """What the plan is asked: the flags that size the KV cache."""

    block_size: int
    max_model_len: int
    max_num_seqs: int
    token_budget: int  # tokens a step schedules at most
    num_blocks: Optional[int] = None  # --num-kv-blocks: the pool's size outright
    num_sliding_blocks: Optional[int] = None  # --num-sliding-kv-blocks
    hybrid: bool = True  # False: --disable-hybrid-kv-cache-manager
    one_table: bool = False  # KV transfer or CUDA: every layer in one pool


@dataclass(frozen=True)
class KVPlan:
    num_blocks: int  # of the pool every layer (or every full-attention layer) uses
    sliding_blocks: Optional[int] = None  # of the sliding layers' own pool (None: one pool)


def block_cap(req: KVRequest) -> int:
    """More blocks than the longest sequences of a full batch could use is waste."""
    return cdiv(req.max_model_len, req.block_size) * req.max_num_seqs


def plan_pools(
    arch: ModelArch, kv_dtype: torch.dtype, req: KVRequest, memory: Optional[int]
) -> KVPlan:
    """The pools for ``memory`` bytes of KV (None: ``req.num_blocks`` sizes the pool)."""
    if req.num_blocks is not None:
        num_blocks, memory = req.num_blocks, None
    else:
        assert memory is not None, "a KV budget or a block count"
        n = num_blocks_for_memory(arch, req.block_size, kv_dtype, memory)
        num_blocks = min(n, block_cap(req))
    full, sliding = layer_counts(arch)
    if not (full and sliding and req.hybrid) or req.one_table:
        return KVPlan(num_blocks)
    window = arch.sliding_window
    if req.num_sliding_blocks is not None:
        least = sliding_pool_blocks(window, req.block_size, 1, req.token_budget)
        if req.num_sliding_blocks < least:  # else a request could wait forever
            raise ValueError(
                f"num_sliding_kv_blocks {req.num_sliding_blocks} is below what one request "
                f"needs: {least} blocks for a {window}-token window and a "
                f"{req.token_budget}-token step"
            )
        return KVPlan(num_blocks, req.num_sliding_blocks)
    wanted = sliding_pool_blocks(window, req.block_size, req.max_num_seqs, req.token_budget)
    if memory is None:  # an exact pool size: the second pool only where it is smaller
        return KVPlan(num_blocks, wanted if wanted < num_blocks else None)
    split = split_for_sliding(arch, req.block_size, kv_dtype, memory, wanted)
    if split <= num_blocks:  # the window's blocks take as much as they save
        return KVPlan(num_blocks)
    return KVPlan(min(split, block_cap(req)), wanted)

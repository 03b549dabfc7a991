"""KVCacheManager: per-request block tables on top of the BlockPool (PagedAttention).

A request's block table covers its first ``len(blocks) * block_size`` token positions;
token ``i`` lives in block ``blocks[i // block_size]`` at offset ``i % block_size``.
Invariant: a request holds exactly ``ceil(tokens it has scheduled / block_size)`` blocks.
"""
from __future__ import annotations

from typing import Optional

from pagoda.core.block_pool import BlockPool
from pagoda.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[int]] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def allocate_slots(self, request: Request, num_new_tokens: int) -> Optional[list[int]]:
        """Make room for ``num_new_tokens`` more tokens; return the newly added block ids,
        or None (allocating nothing) when the pool is short.

            |<------- computed ------->|<--- new --->|
            [ block 0 ][ block 1 ][ bl|ock 2 ][ block 3 ]  <- blocks after this call
                                      ^ num_computed_tokens
        """
        blocks = self.req_blocks.setdefault(request.request_id, [])
        needed = self.num_blocks_for(request.num_computed_tokens + num_new_tokens) - len(blocks)
        if needed <= 0:
            return []
        if needed > self.pool.num_free_blocks:
            return None
        new_blocks = self.pool.allocate(needed)
        blocks.extend(new_blocks)
        return new_blocks

    def share_prefix(self, request: Request, donor_blocks: list[int], num_tokens: int) -> int:
        """Let a new request start on the first full blocks of a sibling's prompt (n > 1).

        Shares whole blocks only, and never the block of the last prompt token, which the
        request must compute itself to get its logits. Returns the tokens now computed.
        """
        assert not self.req_blocks.get(request.request_id), "share_prefix on a request with blocks"
        num_full = min((num_tokens - 1) // self.block_size, len(donor_blocks))
        if num_full <= 0:
            return 0
        shared = donor_blocks[:num_full]
        self.pool.share(shared)
        self.req_blocks[request.request_id] = list(shared)
        return num_full * self.block_size

    def free(self, request: Request) -> None:
        """Give back all of the request's blocks, tail first."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.release(reversed(blocks))

    def check_invariants(self) -> None:
        self.pool.check_invariants(self.req_blocks)

"""Chained block hashes for prefix caching (SGLang's RadixAttention, Zheng et al. 2024, and
vLLM's automatic prefix caching, done per block over a hash chain instead of a radix tree).

A full block of ``block_size`` tokens is named by the hash of (its parent block's hash, its
token ids, extra keys). Invariant: two blocks have the same hash only if every token before
and inside them is the same and they were computed under the same root (model identity and
``cache_salt``), so their KV is the same and one may stand in for the other.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Optional, Sequence

BlockHash = bytes
HASH_BYTES = 32  # blake2b-256: collisions are not a practical concern


def _digest(*parts: bytes) -> BlockHash:
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    for part in parts:
        h.update(struct.pack("<Q", len(part)))  # length-prefixed: the encoding is unambiguous
        h.update(part)
    return h.digest()


def root_hash(
    model_key: str, cache_salt: Optional[str] = None, adapter: Optional[str] = None
) -> BlockHash:
    """The parent of a request's first block: the extra keys every chain starts from.

    The model identity keeps two models' KV apart; ``cache_salt`` keeps tenants apart (the
    same prompt under another salt shares nothing); the LoRA adapter (``LoRARequest.
    cache_key``) keeps adapters apart, and from the base. They enter through the first block,
    and the chain carries them to every later one.
    """
    salt = b"" if cache_salt is None else b"\x01" + cache_salt.encode("utf-8")
    if adapter is None:  # the base model's chains hash as they did before adapters
        return _digest(b"pagoda-prefix-root-v1", model_key.encode("utf-8"), salt)
    lora = b"\x02" + adapter.encode("utf-8")
    return _digest(b"pagoda-prefix-root-v1", model_key.encode("utf-8"), salt, lora)


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """hash(parent, token ids): the name of one full block. Token ids are encoded as
    little-endian uint32 (vocabularies are far below 2**32), so the bytes are canonical."""
    return _digest(parent, struct.pack(f"<{len(token_ids)}I", *token_ids))


def extend_block_hashes(
    hashes: list[BlockHash],
    root: BlockHash,
    token_ids: Sequence[int],
    block_size: int,
    num_tokens: Optional[int] = None,
) -> None:
    """Append the hashes of the full blocks among the first ``num_tokens`` (default: all)
    of ``token_ids`` that are not yet in ``hashes``.

    ``hashes`` belongs to one request and only grows: tokens never change once known.
    """
    num_tokens = len(token_ids) if num_tokens is None else min(num_tokens, len(token_ids))
    num_full = num_tokens // block_size
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)

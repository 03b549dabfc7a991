"""What each instance behind ``pagoda router`` holds in its prefix cache, as the router knows it:
the two indexes of its cache-aware policy (SGLang's cache-aware router, Zheng et al. 2024,
approximates it from the text it has routed; llm-d's precise scorer and vllm-router's
``kv_aware`` learn it from the instances' KV events).

- :class:`ApproxPrefixIndex`: the text the router has sent to each instance, cut into chunks
  of ``CHUNK_CHARS`` characters named by a hash chain (a chunk's name depends on everything
  before it, like a KV block's), kept least recently used first and capped in size, so old
  traffic ages out as the instance's own cache would evict it.
- :class:`EventPrefixIndex`: each instance's cached blocks, from its ``BlockStored`` /
  ``BlockRemoved`` / ``AllBlocksCleared`` events. Blocks are named again here by a chain of
  their token ids (under the chain's cache salt), so a request's tokens, cut into blocks,
  look up the same names.

Both answer "how long a prefix of this request does each instance hold" (chunks or tokens).
Invariant: an instance's names only ever come from what was sent to it (approximate) or
from its own events (precise); dropping an instance (it died) forgets all of them.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import Counter, OrderedDict
from typing import Any, Optional, Sequence

CHUNK_CHARS = 64
DEFAULT_CAPACITY = 200_000  # chunks remembered per instance (about 12 MB of text)


def _name(parent: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(parent + data, digest_size=16).digest()


def text_chunk_names(text: str) -> list[bytes]:
    """The chain names of ``text``'s full chunks."""
    names, parent = [], b""
    raw = text.encode("utf-8")
    size = CHUNK_CHARS
    for start in range(0, len(raw) - size + 1, size):
        parent = _name(parent, raw[start : start + size])
        names.append(parent)
    return names


def token_block_names(
    tokens: Sequence[int], block_size: int, salt: Optional[str] = None
) -> list[bytes]:
    """The chain names of the full blocks of ``tokens`` (root: the cache salt)."""
    names, parent = [], _salt_root(salt)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        parent = _name(parent, struct.pack(f"<{len(block)}I", *block))
        names.append(parent)
    return names


def _salt_root(salt: Optional[str]) -> bytes:
    return b"" if salt is None else _name(b"salt", salt.encode("utf-8"))


def request_text(body: dict[str, Any]) -> str:
    """What a request's prompt is made of, as text: the prompt, or the messages' roles and
    contents in order (the chat template adds the same text around the same messages)."""
    if "messages" in body:
        parts = []
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                parts.append(f"<{m.get('role')}>{_content_text(m.get('content'))}")
        return "".join(parts)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else repr(prompt)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else repr(content)


def _leading(names: Sequence[bytes], held: Any) -> int:
    """How many of ``names``, from the first, ``held`` contains."""
    n = 0
    for name in names:
        if name not in held:
            break
        n += 1
    return n


class ApproxPrefixIndex:
    """The chunks of text routed to each instance, least recently used first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._held: dict[str, OrderedDict[bytes, None]] = {}

    def match(self, instance: str, names: Sequence[bytes]) -> int:
        return _leading(names, self._held.get(instance, {}))

    def routed(self, instance: str, names: Sequence[bytes]) -> None:
        """The request went to ``instance``: its chunks are (or will be) cached there."""
        held = self._held.setdefault(instance, OrderedDict())
        for name in names:
            held[name] = None
            held.move_to_end(name)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def drop(self, instance: str) -> None:
        self._held.pop(instance, None)

    def size(self, instance: str) -> int:
        return len(self._held.get(instance, {}))


class EventPrefixIndex:
    """Each instance's cached blocks, from its KV events. Thread-safe: subscribers apply
    events from their threads while the router reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # instance -> (engine hash -> our name), and how many engine hashes carry each name
        # (one token chain can be cached under several salts, or twice after a race).
        self._names: dict[str, dict[int, bytes]] = {}
        self._held: dict[str, Counter[bytes]] = {}
        self.block_size: Optional[int] = None

    def apply(self, instance: str, events: list[dict[str, Any]]) -> None:
        with self._lock:
            names = self._names.setdefault(instance, {})
            held = self._held.setdefault(instance, Counter())
            for event in events:
                kind = event.get("type")
                if kind == "BlockStored":
                    self._stored(names, held, event)
                elif kind == "BlockRemoved":
                    for h in event.get("block_hashes") or []:
                        name = names.pop(h, None)
                        if name is not None:
                            held[name] -= 1
                            if held[name] <= 0:
                                del held[name]
                elif kind == "AllBlocksCleared":
                    names.clear()
                    held.clear()

    def _stored(self, names: dict[int, bytes], held: Counter[bytes], event: dict) -> None:
        size = int(event["block_size"])
        self.block_size = size
        parent_hash = event.get("parent_block_hash")
        if parent_hash is None:
            extra = event.get("extra_keys") or [None]
            parent = _salt_root(extra[0][0] if extra and extra[0] else None)
        elif parent_hash in names:
            parent = names[parent_hash]
        else:
            return  # its chain's start was missed: nothing here can be matched
        tokens = event["token_ids"]
        for i, h in enumerate(event["block_hashes"]):
            block = tokens[i * size : (i + 1) * size]
            parent = _name(parent, struct.pack(f"<{len(block)}I", *block))
            if h not in names:
                names[h] = parent
                held[parent] += 1

    def match(self, instance: str, names: Sequence[bytes]) -> int:
        with self._lock:
            return _leading(names, self._held.get(instance, {}))

    def drop(self, instance: str) -> None:
        with self._lock:
            self._names.pop(instance, None)
            self._held.pop(instance, None)

    def size(self, instance: str) -> int:
        with self._lock:
            return len(self._held.get(instance, {}))

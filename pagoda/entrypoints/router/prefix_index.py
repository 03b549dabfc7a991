"""What each instance behind ``pagoda router`` holds in its prefix cache, as the router knows it:
the two indexes of its cache-aware policy (SGLang's cache-aware router, Zheng et al. 2024,
approximates it from the text it has routed; llm-d's precise scorer and vllm-router's
``kv_aware`` learn it from the instances' KV events).

- :class:`ApproxPrefixIndex`: the text the router has sent to each instance, cut into chunks
  of ``CHUNK_CHARS`` characters named by a hash chain (a chunk's name depends on everything
  before it, like a KV block's), kept least recently used first and capped in size, so old
  traffic ages out as the instance's own cache would evict it.
- :class:`EventPrefixIndex`: each instance's cached blocks, from its ``BlockStored`` /
  ``BlockRemoved`` / ``AllBlocksCleared`` events, per KV cache group (a sliding-window
  group's blocks count only where the window before a hit reads them, as in the engine).
  Blocks are named again here by a chain of their token ids (under the chain's cache
  salt), so a request's tokens, cut into blocks, look up the same names.

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


class _Group:
    """One KV cache group of an instance, as its events describe it: the names of the
    blocks it holds, and the window of a sliding-window group (None: full attention)."""

    def __init__(self) -> None:
        self.names: dict[int, bytes] = {}  # engine hash -> our name
        # How many engine hashes carry each name (one token chain can be cached under
        # several salts, or twice after a race).
        self.held: Counter[bytes] = Counter()
        self.window: Optional[int] = None

    def add(self, h: int, name: bytes) -> None:
        if h not in self.names:
            self.names[h] = name
            self.held[name] += 1

    def remove(self, h: int) -> Optional[bytes]:
        name = self.names.pop(h, None)
        if name is not None:
            self.held[name] -= 1
            if self.held[name] <= 0:
                del self.held[name]
        return name


class _Instance:
    """An instance's groups, and the blocks stored before their parent: a block names its
    chain through its parent's name, and can come first (two requests computed the parent
    side by side and the copy that had the name was evicted; a request ran through a cache
    reset; a replay's whole-cache batch holds a block whose parent is gone). Such a block
    waits, and is named when its parent is stored (then it can be hit again)."""

    def __init__(self) -> None:
        self.groups: dict[int, _Group] = {}
        # parent's hash -> (group, hash, packed tokens) of the blocks waiting for it
        self.pending: dict[int, list[tuple[int, int, bytes]]] = {}
        self.waiting: dict[tuple[int, int], int] = {}  # (group, hash) -> its parent's hash

    def name_of(self, h: int) -> Optional[bytes]:
        for group in self.groups.values():  # a hash names one chain, in every group
            if h in group.names:
                return group.names[h]
        return None

    def store(
        self, g: int, h: int, parent: Optional[int], parent_name: Optional[bytes], data: bytes
    ) -> None:
        """Block ``h`` of group ``g`` (its tokens packed in ``data``), child of ``parent``
        (None: the first of a chain, whose parent's name is the salt's)."""
        if parent_name is None:
            assert parent is not None
            if (g, h) not in self.waiting:
                self.waiting[(g, h)] = parent
                self.pending.setdefault(parent, []).append((g, h, data))
            return
        todo = [(g, h, _name(parent_name, data))]
        while todo:  # the block, then whatever waited for it
            g, h, name = todo.pop()
            self.groups[g].add(h, name)
            for child_g, child, child_data in self.pending.pop(h, []):
                del self.waiting[(child_g, child)]
                todo.append((child_g, child, _name(name, child_data)))

    def remove(self, g: int, hashes: list[int]) -> None:
        group = self.groups.get(g)
        for h in hashes:
            if group is not None:
                group.remove(h)
            parent = self.waiting.pop((g, h), None)
            if parent is not None:
                rest = [e for e in self.pending[parent] if (e[0], e[1]) != (g, h)]
                if rest:
                    self.pending[parent] = rest
                else:
                    del self.pending[parent]

    def clear(self) -> None:
        self.groups.clear()
        self.pending.clear()
        self.waiting.clear()


class EventPrefixIndex:
    """Each instance's cached blocks, from its KV events. Thread-safe: subscribers apply
    events from their threads while the router reads.

    Events may name KV cache groups (vLLM's ``group_idx``; none: group 0). A prefix hit of
    ``k`` blocks needs blocks ``[0, k)`` in every full-attention group and, in a
    sliding-window group, the blocks the window before position ``k x block_size`` reads:
    the engine's rule (``core/sliding_kv.py``), so the router expects the hit the engine
    will find, not the full layers' alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, _Instance] = {}
        self.block_size: Optional[int] = None

    def apply(self, instance: str, events: list[dict[str, Any]]) -> None:
        with self._lock:
            inst = self._instances.setdefault(instance, _Instance())
            for event in events:
                kind = event.get("type")
                if kind == "BlockStored":
                    self._stored(inst, event)
                elif kind == "BlockRemoved":
                    inst.remove(event.get("group_idx") or 0, event.get("block_hashes") or [])
                elif kind == "AllBlocksCleared":
                    inst.clear()

    def _stored(self, inst: _Instance, event: dict) -> None:
        size = int(event["block_size"])
        self.block_size = size
        g = event.get("group_idx") or 0
        group = inst.groups.setdefault(g, _Group())
        if event.get("kv_cache_spec_kind") == "sliding_window":
            group.window = event.get("kv_cache_spec_sliding_window")
        parent = event.get("parent_block_hash")
        extra = event.get("extra_keys") or [None]
        root = _salt_root(extra[0][0] if extra and extra[0] else None)
        tokens = event["token_ids"]
        for i, h in enumerate(event["block_hashes"]):
            block = tokens[i * size : (i + 1) * size]
            data = struct.pack(f"<{len(block)}I", *block)
            parent_name = root if parent is None else inst.name_of(parent)
            inst.store(g, h, parent, parent_name, data)
            parent = h

    def match(self, instance: str, names: Sequence[bytes]) -> int:
        """How many of ``names``, from the first, the instance can start a request on."""
        with self._lock:
            inst = self._instances.get(instance)
            if inst is None or not inst.groups or self.block_size is None:
                return 0
            groups = list(inst.groups.values())
            full = [g for g in groups if g.window is None]
            k = min((_leading(names, g.held) for g in full), default=len(names))
            changed = True
            while changed:  # each sliding group may cut k; a cut one re-checks the others
                changed = False
                for g in groups:
                    if g.window is not None:
                        cut = _window_hit(names, g.held, k, g.window, self.block_size)
                        changed, k = changed or cut < k, cut
            return k

    def drop(self, instance: str) -> None:
        with self._lock:
            self._instances.pop(instance, None)

    def size(self, instance: str) -> int:
        """Blocks held in the full-attention groups."""
        with self._lock:
            inst = self._instances.get(instance)
            groups = inst.groups.values() if inst is not None else []
            return sum(len(g.held) for g in groups if g.window is None)

    def hashes(self, instance: str, group_idx: int = 0) -> set[int]:
        """The engine hashes of a group's blocks, those waiting for a parent left out."""
        with self._lock:
            inst = self._instances.get(instance)
            group = inst.groups.get(group_idx) if inst is not None else None
            return set(group.names) if group is not None else set()


def _window_hit(names: Sequence[bytes], held: Any, k: int, window: int, block_size: int) -> int:
    """The longest hit of at most ``k`` blocks whose window is held: a missing block ``j``
    rules out every hit whose window covers it (core/sliding_kv.py's ``hit_blocks``)."""
    while k > 0:
        first = max(k * block_size - window + 1, 0) // block_size
        missing = [j for j in range(first, k) if names[j] not in held]
        if not missing:
            return k
        k = missing[-1]
    return 0

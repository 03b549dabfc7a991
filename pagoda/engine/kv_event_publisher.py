"""KV cache events over ZeroMQ, in vLLM's wire format, for KV-aware routers.

Each engine step's events (``core/kv_events.py``) go out as one batch, msgpack-encoded as
vLLM 0.32 encodes its ``KVEventBatch`` (msgspec structs): the batch an array
``[ts, events, data_parallel_rank]``, each event a map tagged by ``"type"``
(``"BlockStored"``, ``"BlockRemoved"``, ``"AllBlocksCleared"``) with vLLM's field names, and
fields at their default (None) left out where vLLM's struct gives them a default. A PUB
socket sends ``(topic, sequence number as 8 big-endian bytes, payload)``; a ROUTER socket
(the replay endpoint) answers a request ``(start sequence number)`` with every buffered batch
from there, ``(seq, payload)`` each, then ``(-1, b"")``.

Invariant: publishing never blocks the engine: :meth:`KVEventPublisher.publish` numbers and
encodes the batch, keeps it for replay and hands it to the sending thread through a bounded
queue; a full queue or a full socket drops the message, never the engine's time, and the
sequence numbers let a subscriber see the gap and ask for a replay.

Sequence numbers start at 0 in every process, as vLLM's do: a subscriber that sees them go
back knows the instance restarted (its cache is gone). A replay asked from a batch older
than the buffer cannot be answered batch for batch; it is answered with one batch in their
place, numbered as the last of them, that clears and stores again every block cached at
that point (``core/kv_events.py``'s ``CachedBlocks``, kept by replaying each batch as it
leaves the buffer), then the buffered batches. A subscriber applying it in order ends with
exactly the engine's cache; it is a batch of vLLM's own events, so any consumer can.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional

import msgpack
import zmq

from pagoda.config import KVEventsConfig
from pagoda.core.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CachedBlocks,
    KVCacheEvent,
)

logger = logging.getLogger(__name__)

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)
POLL_S = 0.05  # the sending thread's wait for work, between looks at the replay socket


def encode_event(event: KVCacheEvent) -> dict[str, Any]:
    """One event as vLLM's msgspec struct encodes it (tag first, its fields in order)."""
    if isinstance(event, BlockStored):
        out: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": event.block_hashes,
            "parent_block_hash": event.parent_block_hash,
            "token_ids": event.token_ids,
            "block_size": event.block_size,
            "lora_id": event.lora_id,  # vLLM's deprecated field, still required
            "medium": event.medium,
            "lora_name": event.lora_name,
        }
        if event.extra_keys is not None:
            out["extra_keys"] = [list(k) if k is not None else None for k in event.extra_keys]
        _put_group(out, event.group_idx)
        if event.kv_cache_spec_kind is not None:
            out["kv_cache_spec_kind"] = event.kv_cache_spec_kind
        if event.kv_cache_spec_sliding_window is not None:
            out["kv_cache_spec_sliding_window"] = event.kv_cache_spec_sliding_window
        return out
    if isinstance(event, BlockRemoved):
        out = {"type": "BlockRemoved", "block_hashes": event.block_hashes, "medium": event.medium}
        _put_group(out, event.group_idx)
        return out
    assert isinstance(event, AllBlocksCleared)
    return {"type": "AllBlocksCleared"}


def _put_group(out: dict[str, Any], group_idx: Optional[int]) -> None:
    if group_idx is not None:  # vLLM leaves a field at its default (None) out
        out["group_idx"] = group_idx


def encode_batch(ts: float, events: list[KVCacheEvent], data_parallel_rank: int = 0) -> bytes:
    """A ``KVEventBatch``: ``[ts, [event, ...], data_parallel_rank]``."""
    return msgpack.packb([ts, [encode_event(e) for e in events], data_parallel_rank])


@dataclass
class PublisherStats:
    num_published: int = 0  # batches numbered and kept for replay: the next one's number
    num_batches: int = 0  # batches sent
    num_dropped: int = 0  # batches the queue or the socket had no room for
    num_replays: int = 0  # replay requests answered
    num_snapshots: int = 0  # of them answered from before the buffer (the cache again)


class _Buffered(NamedTuple):
    seq: int
    payload: bytes
    events: list[KVCacheEvent]  # replayed into the base state when the batch leaves


class KVEventPublisher:
    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0) -> None:
        self.config = config
        self.data_parallel_rank = data_parallel_rank
        self.stats = PublisherStats()
        self._topic = config.topic.encode("utf-8")
        self._replay_buffer: deque[_Buffered] = deque()
        self._base = CachedBlocks()  # the cache before the buffer's first batch
        self._buffer_lock = threading.Lock()
        self._queue: queue.Queue[Optional[tuple[int, bytes]]] = queue.Queue(
            maxsize=config.max_queue_size
        )
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.bind(config.endpoint)
        self._replay: Optional[zmq.Socket] = None
        if config.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.bind(config.replay_endpoint)
        # The bound addresses (a port 0 endpoint gets its real port), read before the
        # sending thread owns the sockets.
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = (
            self._replay.getsockopt_string(zmq.LAST_ENDPOINT) if self._replay else None
        )
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        logger.info(
            "KV events: publishing on %s%s",
            self.endpoint,
            f", replay on {self.replay_endpoint}" if self.replay_endpoint else "",
        )

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Number, encode and queue a step's events (the engine thread; never blocks)."""
        if not events:
            return
        seq = self.stats.num_published
        payload = encode_batch(time.time(), events, self.data_parallel_rank)
        with self._buffer_lock:
            self._replay_buffer.append(_Buffered(seq, payload, events))
            if len(self._replay_buffer) > self.config.buffer_steps:
                self._base.apply(self._replay_buffer.popleft().events)
            self.stats.num_published = seq + 1
        try:
            self._queue.put_nowait((seq, payload))
        except queue.Full:
            self.stats.num_dropped += 1

    def make_stats(self) -> PublisherStats:
        """The counters now (a copy)."""
        return replace(self.stats)

    def close(self) -> None:
        if not self._running:
            return
        self._running = False
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=2.0)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()

    # ---------------------------------------------------------------- thread
    def _run(self) -> None:
        while self._running:
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is None:
                return
            self._send(*item)

    def _send(self, seq: int, payload: bytes) -> None:
        try:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
            self.stats.num_batches += 1
        except zmq.Again:  # the high-water mark: the subscriber will see the gap
            self.stats.num_dropped += 1

    def _serve_replay(self) -> None:
        """A request ``[client, b"", start seq]``: the buffered batches from there, then the
        end marker."""
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            logger.warning("KV events: a malformed replay request (%d frames)", len(frames))
            return
        client, _, start_bytes = frames
        start = int.from_bytes(start_bytes, "big")
        batches = self._replay_from(start)
        self.stats.num_replays += 1  # before the answer: a client that has it sees the count
        for seq, payload in batches:
            self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_OF_REPLAY, b""))

    def _replay_from(self, start: int) -> list[tuple[int, bytes]]:
        """The batches from ``start`` on: the buffered ones, after the cache as of the one
        before the buffer when ``start`` is older than the buffer."""
        with self._buffer_lock:
            batches = [(b.seq, b.payload) for b in self._replay_buffer if b.seq >= start]
            first = self._replay_buffer[0].seq if self._replay_buffer else 0
            base = self._base.copy() if start < first else None  # (a dict copy: quick)
        if base is None:
            return batches
        self.stats.num_snapshots += 1
        events = base.as_events()  # outside the lock: the engine never waits on this
        return [(first - 1, encode_batch(time.time(), events, self.data_parallel_rank))] + batches

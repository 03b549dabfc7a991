"""A subscriber to one instance's KV cache events (vLLM's wire format, as
``engine/kv_event_publisher.py`` publishes it), feeding ``pagoda router``'s precise index.

A thread reads ``(topic, seq, payload)`` from a SUB socket and applies the batches in sequence
order, each once. What it applies must end as the instance's cache, through four things that
break a plain stream:

- **A late start or a gap** (a dropped message): the batches from the first one missing are
  asked of the replay endpoint, at connection (what was cached before the router came up)
  and whenever the numbers jump.
- **A gap longer than the replay buffer**: the replay then begins after the batch asked
  for. pagoda's publisher begins it with a batch that clears and stores again the whole
  cache, which is applied like any other. A publisher without one (vLLM's) begins with the
  oldest batch it kept: the index is cleared before it, so it never keeps a block the
  instance may have evicted meanwhile, and holds less than the instance until blocks are
  stored again.
- **A restart**: a new process numbers its batches from 0 again. The connection dropping
  (the socket monitor) or a number at or below one already received live clears the index
  and starts again from batch 0, as vllm-router does when the numbers go back.
- **An outside reason to doubt the index** (the router saw the instance fail):
  :meth:`KVEventSubscriber.resync` clears it and asks for everything again.

Invariant: the index only holds blocks of the batches applied since the last clear, applied
in order, and after a clear the next batch applied starts from what the instance holds (its
batch 0, or a replay's first batch), so it never claims a block the instance does not have
for longer than the events take to arrive.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

logger = logging.getLogger("pagoda.router")

POLL_MS = 100
REPLAY_TIMEOUT_MS = 2000
END_OF_REPLAY = -1
CLEARED = {"type": "AllBlocksCleared"}
# Why the index was cleared and rebuilt (the counter's labels).
RESYNC_RESTART = "restart"  # the numbers went back: a new process
RESYNC_DISCONNECT = "disconnect"  # the connection dropped
RESYNC_WHOLE = "whole_cache"  # past the replay buffer: its whole-cache batch instead
RESYNC_LOST = "lost"  # batches nothing could give
RESYNC_ASKED = "asked"  # resync(): the router saw the instance fail
RESYNC_REASONS = (RESYNC_RESTART, RESYNC_DISCONNECT, RESYNC_WHOLE, RESYNC_LOST, RESYNC_ASKED)


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """A ``KVEventBatch`` ``[ts, [event, ...], rank]``: its events (maps tagged by "type")."""
    batch = msgpack.unpackb(payload, strict_map_key=False)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch")
    return [e for e in batch[1] if isinstance(e, dict)]


def _clears_first(payload: bytes) -> bool:
    try:
        events = decode_batch(payload)
    except (ValueError, msgpack.UnpackException):
        return False
    return bool(events) and events[0].get("type") == "AllBlocksCleared"


@dataclass
class SubscriberStats:
    next_seq: Optional[int]  # the batch expected next (None: whatever comes)
    connected: bool
    num_batches: int  # batches applied
    num_replayed: int  # of them from the replay endpoint
    num_gaps: int  # jumps in the live numbers
    resyncs: dict[str, int] = field(default_factory=dict)  # clears, by reason


class KVEventSubscriber:
    def __init__(
        self,
        endpoint: str,
        apply: Callable[[list[dict[str, Any]]], None],
        replay_endpoint: Optional[str] = None,
        topic: str = "",
    ) -> None:
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self._apply = apply
        self._topic = topic.encode("utf-8")
        # The sequence number expected next: 0 with a replay endpoint (a late joiner asks for
        # what it missed), else whatever comes first.
        self.next_seq: Optional[int] = self._first_seq()
        self._last_live: Optional[int] = None  # the last number the live stream brought
        self.connected = False
        self.num_batches = self.num_gaps = self.num_replayed = 0
        # Every reason from the start: another thread reads it while this one counts.
        self.resyncs: Counter[str] = Counter({reason: 0 for reason in RESYNC_REASONS})
        self._resync_asked = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events-sub", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0 + REPLAY_TIMEOUT_MS / 1000)

    def resync(self) -> None:
        """Clear the index and ask for every batch again (any thread; done by the
        subscriber's, at its next look)."""
        self._resync_asked.set()

    def stats(self) -> SubscriberStats:
        return SubscriberStats(
            self.next_seq,
            self.connected,
            self.num_batches,
            self.num_replayed,
            self.num_gaps,
            dict(self.resyncs),
        )

    def _first_seq(self) -> Optional[int]:
        return 0 if self.replay_endpoint else None

    # ---------------------------------------------------------------- thread
    def _run(self) -> None:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if self._resync_asked.is_set():
                    self._resync_asked.clear()
                    self._restart(RESYNC_ASKED)
                    self._catch_up(ctx)
                ready = dict(poller.poll(POLL_MS))
                if monitor in ready:
                    self._on_monitor(ctx, recv_monitor_message(monitor))
                if sub in ready:
                    self._on_live(ctx, sub.recv_multipart())
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            ctx.term()

    def _on_monitor(self, ctx: zmq.Context, message: Mapping[str, object]) -> None:
        """Connected: catch up from the replay endpoint. Disconnected: the instance may be
        gone, and its cache with it."""
        if message["event"] == zmq.EVENT_CONNECTED:
            self.connected = True
            self._catch_up(ctx)
        elif message["event"] == zmq.EVENT_DISCONNECTED:
            self.connected = False
            self._restart(RESYNC_DISCONNECT)

    def _on_live(self, ctx: zmq.Context, frames: list[bytes]) -> None:
        if len(frames) != 3:
            return
        seq = int.from_bytes(frames[1], "big")
        if self._last_live is not None and seq <= self._last_live:
            logger.warning(
                "KV events from %s: batch %d after %d: the instance restarted",
                self.endpoint,
                seq,
                self._last_live,
            )
            self._restart(RESYNC_RESTART)
        self._last_live = seq
        if self.next_seq is not None and seq > self.next_seq:
            self.num_gaps += 1
            self._replay(ctx, self.next_seq, seq)
        self._take(seq, frames[2])

    def _restart(self, reason: str) -> None:
        """Forget the index and the numbers: the next batch applied is the instance's 0, or
        a replay's first."""
        self._apply([CLEARED])
        self.resyncs[reason] += 1
        self.next_seq = self._first_seq()
        self._last_live = None

    def _catch_up(self, ctx: zmq.Context) -> None:
        """Everything from the batch expected next, from the replay endpoint (if any)."""
        if self.replay_endpoint is not None and self.next_seq is not None:
            self._replay(ctx, self.next_seq, None)

    def _take(self, seq: int, payload: bytes) -> bool:
        if self.next_seq is not None and seq < self.next_seq:
            return False  # seen already (a replay overlapping the live stream)
        try:
            events = decode_batch(payload)
        except (ValueError, msgpack.UnpackException) as e:
            logger.warning("KV events from %s: a batch that does not decode: %s", self.endpoint, e)
        else:
            self._apply(events)
        self.next_seq = seq + 1
        self.num_batches += 1
        return True

    def _replay(self, ctx: zmq.Context, start: int, until: Optional[int]) -> None:
        """Every batch from ``start`` the replay endpoint has, in order (the live stream's
        copies of those past ``until`` are then skipped as seen). Batches before ``until``
        it cannot give are lost: the index is cleared and holds only what comes after, never
        a block the instance may no longer have."""
        if self.replay_endpoint is not None:
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(self.replay_endpoint)
            try:
                dealer.send_multipart([b"", start.to_bytes(8, "big")])
                while dealer.poll(REPLAY_TIMEOUT_MS):
                    frames = dealer.recv_multipart()
                    seq = int.from_bytes(frames[-2], "big", signed=True)
                    if seq == END_OF_REPLAY:
                        break
                    self._replayed(seq, frames[-1])
            finally:
                dealer.close(linger=0)
        have = self.next_seq if self.next_seq is not None else start
        if until is not None and have < until:
            self._lost(have, until)

    def _replayed(self, seq: int, payload: bytes) -> None:
        if self.next_seq is not None and seq > self.next_seq:
            self._past_buffer(self.next_seq, seq, payload)
        if self._take(seq, payload):
            self.num_replayed += 1

    def _past_buffer(self, start: int, seq: int, payload: bytes) -> None:
        """The replay begins at ``seq``, after ``start``: the buffer no longer holds the
        batches between. Its first batch is pagoda's batch of the whole cache (it begins by
        clearing), or another publisher's first left: then they are lost."""
        if not _clears_first(payload):
            self._lost(start, seq)
            return
        logger.info(
            "KV events from %s: batches %d..%d are past the replay buffer; the index is "
            "the whole cache as of batch %d",
            self.endpoint,
            start,
            seq - 1,
            seq,
        )
        self.resyncs[RESYNC_WHOLE] += 1
        self.next_seq = seq

    def _lost(self, start: int, until: Optional[int]) -> None:
        """Batches ``[start, until)`` cannot be had: clear, and go on from ``until``."""
        if until is None or until <= start:
            return
        logger.warning(
            "KV events from %s: batches %d..%d lost; the index starts again from %d",
            self.endpoint,
            start,
            until - 1,
            until,
        )
        self._apply([CLEARED])
        self.resyncs[RESYNC_LOST] += 1
        self.next_seq = until

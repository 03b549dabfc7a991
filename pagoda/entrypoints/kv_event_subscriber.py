"""A subscriber to one instance's KV cache events (vLLM's wire format, as
``engine/kv_event_publisher.py`` publishes it), feeding ``pagoda router``'s precise index.

A thread reads ``(topic, seq, payload)`` from a SUB socket. The sequence numbers must follow
one another; on a gap (a dropped message, or the subscriber joined late) it asks the replay
endpoint, when there is one, for every batch from the first one missing, applies those it
has not seen, and goes on. Invariant: batches are applied in sequence order, each once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

import msgpack
import zmq

logger = logging.getLogger("pagoda.router")

POLL_MS = 100
REPLAY_TIMEOUT_MS = 2000
END_OF_REPLAY = -1


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """A ``KVEventBatch`` ``[ts, [event, ...], rank]``: its events (maps tagged by "type")."""
    batch = msgpack.unpackb(payload, strict_map_key=False)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch")
    return [e for e in batch[1] if isinstance(e, dict)]


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
        self.next_seq: Optional[int] = 0 if replay_endpoint else None
        self.num_batches = self.num_gaps = self.num_replayed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events-sub", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(self.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        try:
            while not self._stop.is_set():
                if not sub.poll(POLL_MS):
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big")
                if self.next_seq is not None and seq > self.next_seq:
                    self.num_gaps += 1
                    self._replay(ctx, self.next_seq, seq)
                self._take(seq, frames[2])
        finally:
            sub.close(linger=0)
            ctx.term()

    def _take(self, seq: int, payload: bytes) -> None:
        if self.next_seq is not None and seq < self.next_seq:
            return  # seen already (a replay overlapping the live stream)
        try:
            events = decode_batch(payload)
        except (ValueError, msgpack.UnpackException) as e:
            logger.warning("KV events from %s: a batch that does not decode: %s", self.endpoint, e)
        else:
            self._apply(events)
        self.next_seq = seq + 1
        self.num_batches += 1

    def _replay(self, ctx: zmq.Context, start: int, until: int) -> None:
        """Batches [start, until) from the replay endpoint, in order (none without one)."""
        if self.replay_endpoint is None:
            logger.warning(
                "KV events from %s: batches %d..%d lost (no replay endpoint)",
                self.endpoint,
                start,
                until - 1,
            )
            return
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        try:
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while dealer.poll(REPLAY_TIMEOUT_MS):
                frames = dealer.recv_multipart()
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == END_OF_REPLAY:
                    break
                if seq < until:
                    self._take(seq, frames[-1])
                    self.num_replayed += 1
        finally:
            dealer.close(linger=0)

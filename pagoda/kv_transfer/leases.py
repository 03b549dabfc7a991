"""Leases on a prefill instance: the blocks of a finished ``do_remote_decode`` request stay
allocated until the decode instance has pulled them or the lease runs out.

The engine thread creates, expires and releases leases; the side channel's thread pins them
(extends one just before a decode instance reads). Invariant: once ``pin`` has answered
True, the lease cannot expire before the new deadline, so the blocks under it are not freed
while the reader is within its transfer timeout.
"""

from __future__ import annotations

import threading
import time
from typing import Optional


class LeaseTable:
    def __init__(self, lease_seconds: float) -> None:
        if not lease_seconds > 0:
            raise ValueError(f"kv_lease_seconds must be > 0, got {lease_seconds}")
        self.lease_seconds = lease_seconds
        self._deadlines: dict[str, float] = {}
        self._lock = threading.Lock()
        self.num_expired = 0
        self.num_released = 0

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._deadlines

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._deadlines)

    def add(self, request_id: str, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._deadlines[request_id] = now + self.lease_seconds

    def pin(self, request_id: str, seconds: float, now: Optional[float] = None) -> bool:
        """Keep a live lease at least ``seconds`` more; False if it is gone."""
        now = time.monotonic() if now is None else now
        with self._lock:
            deadline = self._deadlines.get(request_id)
            if deadline is None:
                return False
            self._deadlines[request_id] = max(deadline, now + seconds)
            return True

    def release(self, request_id: str) -> bool:
        """The reader is done: end the lease. False if there was none."""
        with self._lock:
            found = self._deadlines.pop(request_id, None) is not None
        self.num_released += found
        return found

    def pop_expired(self, now: Optional[float] = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [rid for rid, d in self._deadlines.items() if d <= now]
            for rid in expired:
                del self._deadlines[rid]
        self.num_expired += len(expired)
        return expired

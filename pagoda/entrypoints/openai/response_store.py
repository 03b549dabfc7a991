"""The Responses API's stored responses (``store: true``): each response object with the
conversation that led to it, for ``GET`` / ``DELETE /v1/responses/{id}`` and for a later
request's ``previous_response_id``.

The store lives in the server's memory (lost on restart, one per instance behind the
router) and is bounded twice, in entries and in bytes (each entry's JSON size): adding past
either bound evicts the oldest entries first; an entry alone over the byte bound is not
kept. Each entry belongs to the API key that made it (its cache salt; None when the server
has no keys).

Invariant: an entry is seen only by its owner: a lookup by another owner finds nothing,
exactly as for an id never stored; and the store never holds more than its bounds.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from pagoda.entrypoints.openai.args import (
    DEFAULT_RESPONSES_STORE_BYTES,
    DEFAULT_RESPONSES_STORE_ENTRIES,
)

DEFAULT_MAX_ENTRIES = DEFAULT_RESPONSES_STORE_ENTRIES
DEFAULT_MAX_BYTES = DEFAULT_RESPONSES_STORE_BYTES


@dataclass(frozen=True)
class StoredResponse:
    """A response as it was answered, and its conversation: the chat messages (without the
    instructions, which a chained request gives anew) ending with the response's own turn."""

    owner: Optional[str]
    response: dict[str, Any]
    conversation: list[dict[str, Any]]
    size: int  # bytes, as counted against the bound

    @staticmethod
    def of(
        owner: Optional[str], response: dict[str, Any], conversation: list[dict[str, Any]]
    ) -> StoredResponse:
        size = len(json.dumps(response)) + len(json.dumps(conversation))
        return StoredResponse(owner, response, conversation, size)


class ResponseStore:
    """Stored responses by id, oldest first."""

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, entry: StoredResponse) -> bool:
        """Keep ``entry`` (evicting the oldest to make room); False when it alone is over
        the bounds and is not kept."""
        if entry.size > self.max_bytes or self.max_entries < 1:
            return False
        with self._lock:
            self._drop(response_id)
            while self._entries and (
                len(self._entries) >= self.max_entries or self.bytes + entry.size > self.max_bytes
            ):
                self._drop(next(iter(self._entries)))
            self._entries[response_id] = entry
            self.bytes += entry.size
        return True

    def get(self, response_id: str, owner: Optional[str]) -> Optional[StoredResponse]:
        """The entry, if it is there and ``owner``'s."""
        with self._lock:
            entry = self._entries.get(response_id)
        return entry if entry is not None and entry.owner == owner else None

    def delete(self, response_id: str, owner: Optional[str]) -> bool:
        """Forget the entry; False when there is none of ``owner``'s."""
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.owner != owner:
                return False
            self._drop(response_id)
        return True

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size

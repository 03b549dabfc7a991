"""The connector interface of disaggregated prefill (DistServe OSDI'24, Splitwise, Mooncake):
prefill and decode run on different instances, and a request's prompt KV moves between them.

The scheduler side (pure Python, in ``core/scheduler.py`` and ``kv_transfer/leases.py``)
decides *what* moves: which local blocks a decode instance fills from which remote blocks,
and how long a prefill instance keeps finished requests' blocks. A worker-side connector
moves the bytes and reports back. Invariant: a local block being written by a transfer is
held by its request and never handed to anyone else until the transfer has ended.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from pagoda.core.outputs import KVEvents, KVLoad
from pagoda.kv_transfer.params import RemotePrefill


class KVConnectorWorker(ABC):
    """Moves KV blocks between instances. NIXL is the real one (kv_transfer/nixl.py)."""

    @abstractmethod
    def start_loads(self, loads: list[KVLoad]) -> None:
        """Begin pulling each load's remote blocks into its local blocks (asynchronously)."""

    @abstractmethod
    def release_remote(self, remotes: list[RemotePrefill]) -> None:
        """Tell prefill instances we will not pull these (their leases may end now)."""

    @abstractmethod
    def poll(self) -> KVEvents:
        """Loads that ended (pulled, or failed and no longer writing), and leases that a
        decode instance released since the last poll."""

    @property
    @abstractmethod
    def address(self) -> tuple[str, int]:
        """Where decode instances reach this instance's side channel."""

    @abstractmethod
    def close(self) -> None:
        """Stop background threads; pending loads are abandoned."""

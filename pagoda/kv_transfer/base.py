"""The connector interface of disaggregated prefill (DistServe OSDI'24, Splitwise, Mooncake):
prefill and decode run on different instances, and a request's prompt KV moves between them.

The scheduler side (pure Python, ``core/remote_kv.py``) decides *what* moves: which local
blocks a decode instance fills from which remote blocks, and which finished requests' blocks a
prefill instance keeps under a lease. A connector moves the bytes, owns everything its own
threads touch (lease deadlines, which a decode instance's pin extends from the side channel's
thread) and reports back through typed :class:`KVEvents`. This package depends on
``pagoda.core``, never the reverse. Invariant: a local block being written by a transfer is
held by its request and never handed to anyone else until the transfer has ended.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from pagoda.core.remote_kv import KVEvents, KVLoad, RemotePrefill


@dataclass(frozen=True)
class KVTransferStats:
    """Totals since start, for metrics."""

    num_blocks_pulled: int = 0  # decode: blocks whose pull started
    num_pulls_done: int = 0  # decode: pulls completed
    bytes_pulled: int = 0
    pull_seconds: float = 0.0  # from posting each completed pull to seeing it done
    num_leases: int = 0  # prefill: leases alive now
    num_leases_expired: int = 0
    num_leases_released: int = 0


class KVConnectorWorker(ABC):
    """Moves KV blocks between instances. NIXL is the real one (kv_transfer/nixl.py)."""

    @abstractmethod
    def start_loads(self, loads: list[KVLoad]) -> None:
        """Begin pulling each load's remote blocks into its local blocks (asynchronously)."""

    @abstractmethod
    def release_remote(self, remotes: list[RemotePrefill]) -> None:
        """Tell prefill instances we will not pull these (their leases may end now)."""

    @abstractmethod
    def hold_leases(self, lease_ids: list[str]) -> None:
        """Prefill: guard these new leases (their blocks wait for a decode instance) until
        released or expired; both come back through :meth:`poll`."""

    @abstractmethod
    def poll(self) -> KVEvents:
        """Loads that ended (pulled, or failed and no longer writing), and leases that a
        decode instance released or that expired since the last poll."""

    @abstractmethod
    def stats(self) -> KVTransferStats:
        """Counters since start."""

    @property
    @abstractmethod
    def address(self) -> tuple[str, int]:
        """Where decode instances reach this instance's side channel."""

    @abstractmethod
    def close(self) -> None:
        """Stop background threads; pending loads are abandoned."""

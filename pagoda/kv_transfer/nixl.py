"""The NIXL connector: a decode instance READs a request's prompt KV blocks straight from a
prefill instance's KV pool into its own, over NIXL's UCX backend (the transfer engine vLLM,
SGLang and Dynamo use). No bytes pass through Python.

Each instance registers its per-layer KV tensors with a NIXL agent. Before its first pull
from a prefill instance, a decode instance asks that instance's side channel for its agent
metadata and KV layout, and refuses to pull if the two are not compatible (model, dtype,
block size, layers, KV heads, head size). Before each pull it pins the request's lease, so
the blocks cannot be freed while it reads; the READ carries a notification that tells the
prefill instance to end the lease when the data has landed.
Invariant: a load is reported (loaded or failed) only once NIXL no longer writes its blocks.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from pagoda.config import KVTransferConfig
from pagoda.core.remote_kv import KVEvents, KVLoad, RemotePrefill
from pagoda.kv_transfer import side_channel
from pagoda.kv_transfer.base import KVConnectorWorker, KVTransferStats
from pagoda.kv_transfer.leases import LeaseTable

logger = logging.getLogger(__name__)

RELEASE_PREFIX = b"pagoda-release:"
PROGRESS_DELAY_US = 1000  # the NIXL progress thread's sleep between polls
PIN_MARGIN_S = 5.0  # a pin outlives the reader's transfer timeout by this much
MEMORY_TYPE = {"cpu": "DRAM", "cuda": "VRAM"}


@dataclass(frozen=True)
class KVLayout:
    """What a peer must agree on before reading our blocks, and where they are."""

    model_key: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_bytes: int
    memory_type: str
    layer_addrs: tuple[int, ...]

    @classmethod
    def of(cls, kv_caches: list[torch.Tensor], model_key: str) -> "KVLayout":
        first = kv_caches[0]  # (2, num_blocks, block_size, Hkv, D)
        _, num_blocks, block_size, heads, dim = first.shape
        for t in kv_caches:
            if not t.is_contiguous() or t.shape != first.shape:
                raise ValueError("KV cache tensors must be contiguous and of one shape")
        block_bytes = block_size * heads * dim * first.element_size()
        return cls(
            model_key,
            str(first.dtype).removeprefix("torch."),
            block_size,
            len(kv_caches),
            heads,
            dim,
            num_blocks,
            block_bytes,
            MEMORY_TYPE[first.device.type],
            tuple(t.data_ptr() for t in kv_caches),
        )

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "KVLayout":
        return cls(**{**raw, "layer_addrs": tuple(raw["layer_addrs"])})

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layer_addrs": list(self.layer_addrs)}

    def mismatch(self, other: "KVLayout") -> Optional[str]:
        """Why KV blocks of ``other`` cannot stand in for ours; None if they can."""
        for name in ("dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "model_key"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"incompatible KV layout: {name} is {theirs!r} there, {mine!r} here"
        return None

    def block_addr(self, layer: int, half: int, block: int) -> int:
        """Address of K (half 0) or V (half 1) of ``block`` in ``layer``."""
        return self.layer_addrs[layer] + (half * self.num_blocks + block) * self.block_bytes


@dataclass
class _Remote:
    agent_name: str
    layout: KVLayout


@dataclass
class _Pull:
    handle: Any
    deadline: float
    started: float
    num_bytes: int


class NixlConnector(KVConnectorWorker):
    def __init__(
        self, config: KVTransferConfig, secret: bytes, kv_caches: list[torch.Tensor], model_key: str
    ) -> None:
        self.config = config
        self._secret = secret
        # Prefill: lease deadlines, extended by pins from the side channel's thread.
        self._leases = LeaseTable(config.lease_seconds) if config.kv_role == "prefill" else None
        self.layout = KVLayout.of(kv_caches, model_key)
        self.agent = _make_agent(f"pagoda-{config.engine_id}")
        self._registered = self.agent.register_memory(kv_caches)
        self._remotes: dict[str, _Remote] = {}
        self._pulls: dict[str, _Pull] = {}
        self._events = KVEvents()
        self.num_blocks_pulled = 0
        # Finished pulls: bytes, and seconds from posting the READ to seeing it done (an
        # upper bound: completion is noticed at the next poll, after the step running).
        self.num_pulls_done = 0
        self.bytes_pulled = 0
        self.pull_seconds = 0.0
        self._peer_releases: queue.SimpleQueue[str] = queue.SimpleQueue()  # from the channel
        self._notifier = ThreadPoolExecutor(1, thread_name_prefix="pagoda-kv-release")
        self._server = side_channel.SideChannelServer(
            config.side_channel_host, config.side_channel_port, secret, self._answer
        )
        logger.info(
            "KV transfer (%s): NIXL agent %s, side channel %s:%d",
            config.kv_role,
            self.agent.name,
            *self.address,
        )

    @property
    def address(self) -> tuple[str, int]:
        return self._server.host, self._server.port

    # ----------------------------------------------------------- prefill side
    def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        """The side channel's handler (runs on its thread)."""
        op = message.get("op")
        if op == "hello":
            return {
                "ok": True,
                "engine_id": self.config.engine_id,
                "agent_metadata": self.agent.get_agent_metadata(),
                "layout": self.layout.to_json(),
            }
        if op == "pin":
            if self._leases is None:
                return {
                    "ok": False,
                    "error": "this instance holds no leases (not a prefill instance)",
                }
            pinned = self._leases.pin(
                str(message.get("lease_id")), float(message.get("seconds", 0))
            )
            return {"ok": pinned, "error": None if pinned else "no such lease (expired?)"}
        if op == "release":
            self._peer_releases.put(str(message.get("lease_id")))  # freed on the engine thread
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _released_leases(self) -> list[str]:
        released = []
        while not self._peer_releases.empty():
            released.append(self._peer_releases.get_nowait())
        for messages in self.agent.get_new_notifs().values():
            for msg in messages:
                if msg.startswith(RELEASE_PREFIX):
                    released.append(msg[len(RELEASE_PREFIX) :].decode("utf-8", "replace"))
        return released

    # ------------------------------------------------------------ decode side
    def release_remote(self, remotes: list[RemotePrefill]) -> None:
        for remote in remotes:
            self._notifier.submit(self._send_release, remote)

    def _send_release(self, remote: RemotePrefill) -> None:
        """Off the engine thread: a slow or dead peer must not stall the step loop (its
        lease then simply expires)."""
        try:
            side_channel.call(
                remote.host,
                remote.port,
                self._secret,
                {"op": "release", "lease_id": remote.lease_id},
            )
        except side_channel.SideChannelError as e:
            logger.info("could not release lease %s early (it will expire): %s", remote.lease_id, e)

    def start_loads(self, loads: list[KVLoad]) -> None:
        for load in loads:
            try:
                self._start(load)
            except Exception as e:  # noqa: BLE001 - any failure is this load's, not the engine's
                logger.warning("KV pull for %s could not start: %s", load.request_id, e)
                self._events.failed[load.request_id] = str(e)

    def _start(self, load: KVLoad) -> None:
        remote = self._remote(load.remote)
        timeout = self.config.transfer_timeout_seconds
        pin = side_channel.call(
            load.remote.host,
            load.remote.port,
            self._secret,
            {"op": "pin", "lease_id": load.remote.lease_id, "seconds": timeout + PIN_MARGIN_S},
        )
        if not pin.get("ok"):
            raise RuntimeError(f"the prefill instance no longer holds the KV: {pin.get('error')}")
        local_descs, remote_descs = self._descriptors(load, remote.layout)
        mem = self.layout.memory_type
        handle = self.agent.initialize_xfer(
            "READ",
            self.agent.get_xfer_descs(local_descs, mem),
            self.agent.get_xfer_descs(remote_descs, remote.layout.memory_type),
            remote.agent_name,
            RELEASE_PREFIX + load.remote.lease_id.encode("utf-8"),
        )
        state = self.agent.transfer(handle)
        if state == "ERR":
            self.agent.release_xfer_handle(handle)
            raise RuntimeError("NIXL refused the transfer")
        now = time.monotonic()
        num_bytes = 2 * self.layout.num_layers * self.layout.block_bytes * len(load.local_block_ids)
        self._pulls[load.request_id] = _Pull(handle, now + timeout, now, num_bytes)
        self.num_blocks_pulled += len(load.local_block_ids)

    def _remote(self, prefill: RemotePrefill) -> _Remote:
        """The prefill instance's agent, after a handshake and a compatibility check."""
        known = self._remotes.get(prefill.engine_id)
        if known is not None:
            return known
        hello = side_channel.call(prefill.host, prefill.port, self._secret, {"op": "hello"})
        if hello.get("engine_id") != prefill.engine_id:
            raise RuntimeError(
                f"{prefill.host}:{prefill.port} is engine "
                f"{hello.get('engine_id')!r}, not {prefill.engine_id!r}"
            )
        layout = KVLayout.from_json(hello["layout"])
        problem = self.layout.mismatch(layout)
        if problem is not None:
            logger.error("refusing KV from engine %s: %s", prefill.engine_id, problem)
            raise RuntimeError(problem)
        name = self.agent.add_remote_agent(hello["agent_metadata"])
        remote = _Remote(name.decode() if isinstance(name, bytes) else name, layout)
        self._remotes[prefill.engine_id] = remote
        return remote

    def _descriptors(self, load: KVLoad, there: KVLayout) -> tuple[list, list]:
        """(address, length, device) lists, one entry per run of consecutive blocks on both
        sides, per layer and K/V half: local[i] <- remote[i]."""
        here, size = self.layout, self.layout.block_bytes
        runs = _runs(load.local_block_ids, load.remote_block_ids)
        local, remote = [], []
        for layer in range(here.num_layers):
            for half in (0, 1):
                for lo, ro, n in runs:
                    local.append((here.block_addr(layer, half, lo), n * size, 0))
                    remote.append((there.block_addr(layer, half, ro), n * size, 0))
        return local, remote

    # --------------------------------------------------------------- polling
    def poll(self) -> KVEvents:
        now = time.monotonic()
        for rid, pull in list(self._pulls.items()):
            state = self.agent.check_xfer_state(pull.handle)
            if state == "DONE":
                self.agent.release_xfer_handle(pull.handle)
                del self._pulls[rid]
                self._events.loaded.append(rid)
                self.num_pulls_done += 1
                self.bytes_pulled += pull.num_bytes
                self.pull_seconds += now - pull.started
            elif state == "ERR":
                self._end_failed(rid, pull, "NIXL reported a transfer error")
            elif now > pull.deadline:
                self._end_failed(
                    rid, pull, f"timed out after {self.config.transfer_timeout_seconds:.1f} s"
                )
        if self._leases is not None:
            for lease_id in self._released_leases():
                if self._leases.release(lease_id):
                    self._events.released.append(lease_id)
            self._events.expired.extend(self._expired_leases())
        events, self._events = self._events, KVEvents()
        return events

    def hold_leases(self, lease_ids: list[str]) -> None:
        if not lease_ids:
            return
        if self._leases is None:
            raise RuntimeError("leases are held by prefill instances only")
        for lease_id in lease_ids:
            self._leases.add(lease_id)

    def _expired_leases(self) -> list[str]:
        assert self._leases is not None
        expired = self._leases.pop_expired()
        for lease_id in expired:
            logger.warning("lease %s expired before a decode instance pulled it", lease_id)
        return expired

    def _end_failed(self, rid: str, pull: _Pull, why: str) -> None:
        try:
            self.agent.release_xfer_handle(pull.handle)  # cancels it if still in flight
        except Exception:  # noqa: BLE001 - still writing: keep it and try again next poll
            return
        del self._pulls[rid]
        self._events.failed[rid] = why

    def stats(self) -> KVTransferStats:
        leases = self._leases
        return KVTransferStats(
            num_blocks_pulled=self.num_blocks_pulled,
            num_pulls_done=self.num_pulls_done,
            bytes_pulled=self.bytes_pulled,
            pull_seconds=self.pull_seconds,
            num_leases=len(leases) if leases is not None else 0,
            num_leases_expired=leases.num_expired if leases is not None else 0,
            num_leases_released=leases.num_released if leases is not None else 0,
        )

    def close(self) -> None:
        self._notifier.shutdown(wait=True)
        self._server.close()
        try:
            self.agent.deregister_memory(self._registered)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def _make_agent(name: str) -> Any:
    """A NIXL agent (UCX backend) whose progress thread sleeps PROGRESS_DELAY_US between
    polls. NIXL's Python wrapper fixes that delay at 0: a busy loop that keeps most of a core
    busy even when the instance is idle. The wrapper builds its config from
    ``nixlBind.nixlAgentConfig``; for the one call, that class is swapped for a subclass that
    keeps our delay (a millisecond at most added to a transfer's progress)."""
    import nixl._api as api

    base = api.nixlBind.nixlAgentConfig

    class _SleepyProgress(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, key: str, value: Any) -> None:
            super().__setattr__(key, PROGRESS_DELAY_US if key == "pthrDelay" else value)

    api.nixlBind.nixlAgentConfig = _SleepyProgress
    try:
        return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
    finally:
        api.nixlBind.nixlAgentConfig = base


def _runs(local: list[int], remote: list[int]) -> list[tuple[int, int, int]]:
    """Split paired block lists into (local start, remote start, length) runs in which both
    sides are consecutive, so one descriptor covers each run."""
    runs: list[tuple[int, int, int]] = []
    for lo, ro in zip(local, remote, strict=True):
        if runs:
            l0, r0, n = runs[-1]
            if lo == l0 + n and ro == r0 + n:
                runs[-1] = (l0, r0, n + 1)
                continue
        runs.append((lo, ro, 1))
    return runs

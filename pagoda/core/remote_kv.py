"""The scheduler's side of disaggregated prefill (DistServe OSDI'24, Splitwise ISCA'24): the
typed messages of ``kv_transfer_params``, their one validator, and the state a scheduler keeps
for requests whose prompt KV moves between instances.

A decode instance admits a request whose prompt KV lies on a prefill instance by giving it
blocks and a :class:`KVLoad` instead of tokens to compute; the request waits in ``loading``
until the connector reports the pull, then runs its last prompt token (for the logits) like any
request. A prefill instance holds a finished request's blocks under a lease until the decode
side has pulled them (or the lease runs out: the connector, which owns the deadlines, says so).
Invariant: a block a transfer may still write stays held by its request (``loading``), and a
leased block stays held until the connector reports the lease ended.

On the wire the messages are plain JSON objects; these classes parse them, and every error
names the field that was wrong. Pure Python: ``kv_transfer/`` (the connector that moves the
bytes) depends on this module, never the reverse.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from pagoda.config import KVTransferConfig
from pagoda.request import RequestStatus
from pagoda.utils import cdiv

if TYPE_CHECKING:
    from pagoda.core.kv_cache_manager import KVCacheManager
    from pagoda.request import Request

MAX_PORT = 65535
LEASE_HOLDER_PREFIX = "lease:"  # block-table key of a finished request's leased blocks


@dataclass(frozen=True)
class RemotePrefill:
    """Where a request's prompt KV lies on a prefill instance, for a decode instance to pull.

    ``num_tokens`` prompt tokens were computed there into ``block_ids`` (block i holds tokens
    ``[i * block_size, (i + 1) * block_size)``), held under lease ``lease_id`` until pulled
    (``remote_request_id`` on the wire, the name vLLM's connector uses)."""

    engine_id: str
    lease_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    host: str
    port: int
    first_token_id: Optional[int] = None
    signature: str = ""

    def to_json(self) -> dict[str, Any]:
        """The ``kv_transfer_params`` a prefill instance returns (and a decode one takes)."""
        return {
            "do_remote_prefill": True,
            "remote_engine_id": self.engine_id,
            "remote_request_id": self.lease_id,
            "remote_block_ids": list(self.block_ids),
            "remote_num_tokens": self.num_tokens,
            "remote_host": self.host,
            "remote_port": self.port,
            "first_token_id": self.first_token_id,
            "signature": self.signature,
        }

    def signed(self, secret: bytes, prompt_token_ids: Sequence[int]) -> "RemotePrefill":
        return replace(self, signature=self._mac(secret, prompt_token_ids))

    def verify(self, secret: bytes, prompt_token_ids: Sequence[int]) -> bool:
        """True if a prefill instance holding ``secret`` issued these parameters for exactly
        this prompt. Clients cannot forge them, so they cannot make a decode instance
        connect to an address of their choosing or read blocks that are not theirs."""
        return hmac.compare_digest(self.signature, self._mac(secret, prompt_token_ids))

    def _mac(self, secret: bytes, prompt_token_ids: Sequence[int]) -> str:
        prompt = hashlib.sha256(json.dumps(list(prompt_token_ids)).encode()).hexdigest()
        fields = [
            self.engine_id,
            self.lease_id,
            list(self.block_ids),
            self.num_tokens,
            self.host,
            self.port,
            self.first_token_id,
            prompt,
        ]
        body = json.dumps(fields, separators=(",", ":")).encode()
        return hmac.new(secret, b"pagoda-kv-params-v1\x00" + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class KVTransferRequest:
    """What a request asks: run the prompt here and keep its KV for a remote decode
    (``do_remote_decode``), or start from KV computed elsewhere (``remote_prefill``)."""

    do_remote_decode: bool = False
    remote_prefill: Optional[RemotePrefill] = None


def parse_kv_transfer_params(raw: Any) -> Optional[KVTransferRequest]:
    """Validate a request's ``kv_transfer_params``; ValueError naming the field if bad."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError("kv_transfer_params must be an object")
    decode = _bool(raw, "do_remote_decode")
    prefill = _bool(raw, "do_remote_prefill")
    if decode and prefill:
        raise ValueError(
            "kv_transfer_params: do_remote_decode and do_remote_prefill cannot both be true"
        )
    if not prefill:
        return KVTransferRequest(do_remote_decode=decode)
    block_ids = raw.get("remote_block_ids")
    if (
        not isinstance(block_ids, list)
        or not block_ids
        or not all(_is_int(b) and b >= 0 for b in block_ids)
    ):
        raise ValueError(
            "kv_transfer_params.remote_block_ids must be a non-empty list of "
            "block ids (integers >= 0)"
        )
    first = raw.get("first_token_id")
    if first is not None and not (_is_int(first) and first >= 0):
        raise ValueError("kv_transfer_params.first_token_id must be an integer >= 0")
    signature = raw.get("signature", "")
    if not isinstance(signature, str):
        raise ValueError("kv_transfer_params.signature must be a string")
    remote = RemotePrefill(
        engine_id=_str(raw, "remote_engine_id"),
        lease_id=_str(raw, "remote_request_id"),
        block_ids=tuple(block_ids),
        num_tokens=_int(raw, "remote_num_tokens", 1),
        host=_str(raw, "remote_host"),
        port=_int(raw, "remote_port", 1, MAX_PORT),
        first_token_id=first,
        signature=signature,
    )
    return KVTransferRequest(remote_prefill=remote)


def _bool(raw: Mapping, name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"kv_transfer_params.{name} must be a boolean")
    return value


def _str(raw: Mapping, name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"kv_transfer_params.{name} must be a non-empty string")
    return value


def _int(raw: Mapping, name: str, lo: int, hi: Optional[int] = None) -> int:
    value = raw.get(name)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < lo
        or (hi is not None and value > hi)
    ):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"kv_transfer_params.{name} must be an integer {bound}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_remote_prefill(
    remote: RemotePrefill, prompt_token_ids: Sequence[int], block_size: int, secret: bytes
) -> None:
    """The one check of a decode request's ``remote_prefill``, at intake: only parameters a
    prefill instance issued, for this very prompt, are taken (a client can neither point this
    instance at an address nor at blocks of its choosing), and they must cover the prompt.
    ValueError naming the field otherwise."""
    if not remote.verify(secret, prompt_token_ids):
        raise ValueError(
            "kv_transfer_params.signature does not match: the parameters were "
            "not issued for this prompt by a prefill instance sharing this "
            "instance's --kv-secret, or were altered"
        )
    if remote.num_tokens != len(prompt_token_ids):
        raise ValueError(
            f"kv_transfer_params.remote_num_tokens is {remote.num_tokens}, the "
            f"prompt has {len(prompt_token_ids)} tokens"
        )
    if len(remote.block_ids) != cdiv(remote.num_tokens, block_size):
        raise ValueError(
            f"kv_transfer_params.remote_block_ids has {len(remote.block_ids)} "
            f"blocks for {remote.num_tokens} tokens of {block_size}"
        )


# ------------------------------------------------------ scheduler <-> connector
@dataclass
class KVLoad:
    """Decode side: fill ``local_block_ids`` from a prefill instance's blocks."""

    request_id: str
    remote: RemotePrefill
    local_block_ids: list[int]
    remote_block_ids: list[int]  # same length: local_block_ids[i] <- remote_block_ids[i]


@dataclass
class KVEvents:
    """What the KV connector reports after a step."""

    loaded: list[str] = field(default_factory=list)  # loads done: the KV is in place
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why (no longer writing)
    released: list[str] = field(default_factory=list)  # leases a decode instance is done with
    expired: list[str] = field(default_factory=list)  # leases nobody pulled in time

    @property
    def any(self) -> bool:
        return bool(self.loaded or self.failed or self.released or self.expired)


class RemoteKV:
    """The scheduler's remote-KV state: requests loading, leases held, and the messages for
    the connector (loads to start, remote leases to release, new leases to guard). The
    scheduler moves requests between its queues; this class owns everything else."""

    def __init__(
        self, config: KVTransferConfig, kv: KVCacheManager, address: tuple[str, int]
    ) -> None:
        self.config = config
        self.kv = kv
        self.address = address  # our side channel, for decode instances
        self.loading: dict[str, Request] = {}  # waiting for remote KV; they hold blocks
        self.leases: set[str] = set()  # prefill: lease ids holding blocks
        self.loads: list[KVLoad] = []  # for the next SchedulerOutput
        self.releases: list[RemotePrefill] = []  # ... remote leases we will not pull
        self.new_leases: list[str] = []  # for the connector, which owns deadlines
        self._lease_counter = 0
        self.num_load_failures = 0

    # ------------------------------------------------------------ decode side
    def wants_load(self, request: Request, computed_blocks: list[int]) -> bool:
        """Whether admitting ``request`` means pulling KV: not when the local prefix cache
        holds all but a partial block (computing those few tokens here is cheaper than a
        round trip; the prefill instance is told to end its lease)."""
        kt = request.kv_transfer
        if kt is None or kt.remote_prefill is None:
            return False
        missing = request.num_prompt_tokens - 1 - len(computed_blocks) * self.kv.block_size
        if missing < self.kv.block_size:
            self.releases.append(kt.remote_prefill)
            request.kv_transfer = None
            return False
        return True

    def start_load(self, request: Request, computed_blocks: list[int]) -> bool:
        """Give the request blocks for all but its last prompt token (computed here, for the
        logits) and a KVLoad for those the local cache lacks; False if no blocks yet."""
        assert request.kv_transfer is not None and request.kv_transfer.remote_prefill is not None
        remote = request.kv_transfer.remote_prefill
        bs, hit = self.kv.block_size, len(computed_blocks)
        target = request.num_prompt_tokens - 1
        if (
            self.kv.allocate_slots(request, target - hit * bs, computed_blocks, name_blocks=False)
            is None
        ):
            return False
        end = cdiv(target, bs)
        self.loads.append(
            KVLoad(
                request.request_id,
                remote,
                self.kv.block_ids(request.request_id)[hit:end],
                list(remote.block_ids[hit:end]),
            )
        )
        self.loading[request.request_id] = request
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        return True

    def arrived(self, request_id: str) -> Optional[Request]:
        """A load ended well: the request, its blocks named and computed up to its last
        prompt token, ready to run; None if it was aborted meanwhile (blocks freed)."""
        request = self.loading.pop(request_id, None)
        if request is None:
            return None
        if request.is_finished:
            self.kv.free(request)
            return None
        request.kv_transfer = None
        request.num_computed_tokens = request.num_prompt_tokens - 1
        self.kv.name_blocks(request, request.num_computed_tokens)  # cacheable only now
        return request

    def failed(self, request_id: str, why: str) -> Optional[Request]:
        """A load failed (and no longer writes): the request, its blocks freed and rewound to
        compute its prompt; None if it was aborted meanwhile."""
        request = self.loading.pop(request_id, None)
        if request is None:
            return None
        self.num_load_failures += 1
        self.kv.free(request)
        if request.kv_transfer is not None and request.kv_transfer.remote_prefill is not None:
            self.releases.append(request.kv_transfer.remote_prefill)
        if request.is_finished:
            return None
        request.kv_transfer = None
        request.num_computed_tokens = 0
        return request

    # ----------------------------------------------------------- prefill side
    def should_lease(self, request: Request, status: RequestStatus) -> bool:
        kt = request.kv_transfer
        return (
            self.config.kv_role == "prefill"
            and kt is not None
            and kt.do_remote_decode
            and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
            and bool(self.kv.block_ids(request.request_id))
        )

    def hold_lease(self, request: Request) -> None:
        """Keep a finished request's blocks under a new lease, and say where they wait."""
        self._lease_counter += 1
        lease_id = f"{request.request_id}#{self._lease_counter}"
        blocks = self.kv.block_ids(request.request_id)
        self.kv.rename_holder(request.request_id, LEASE_HOLDER_PREFIX + lease_id)
        self.leases.add(lease_id)
        self.new_leases.append(lease_id)
        first = request.output_token_ids[0] if request.output_token_ids else None
        host, port = self.address
        request.kv_transfer_out = RemotePrefill(
            self.config.engine_id,
            lease_id,
            tuple(blocks),
            request.num_computed_tokens,
            host,
            port,
            first,
        )

    def end_lease(self, lease_id: str) -> None:
        """Released by the decode side or expired: the blocks go (unknown ids are ignored)."""
        if lease_id in self.leases:
            self.leases.discard(lease_id)
            self.kv.free_holder(LEASE_HOLDER_PREFIX + lease_id)

    def holders(self) -> set[str]:
        """Block-table keys this state accounts for (for the scheduler's invariants)."""
        return set(self.loading) | {LEASE_HOLDER_PREFIX + lid for lid in self.leases}

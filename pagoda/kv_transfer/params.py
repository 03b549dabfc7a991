"""The typed messages of disaggregated prefill: what a client (the router) asks of each
instance in ``kv_transfer_params``, and what a prefill instance hands back.

On the wire they are plain JSON objects; these classes parse them, and every error names the
field that was wrong. No torch here: the scheduler side uses them.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

MAX_PORT = 65535


@dataclass(frozen=True)
class RemotePrefill:
    """Where a request's prompt KV lies on a prefill instance, for a decode instance to pull.

    ``num_tokens`` prompt tokens were computed there into ``block_ids`` (block i holds tokens
    ``[i * block_size, (i + 1) * block_size)``), held under a lease until pulled."""
    engine_id: str
    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    host: str
    port: int
    first_token_id: Optional[int] = None
    signature: str = ""

    def to_json(self) -> dict[str, Any]:
        """The ``kv_transfer_params`` a prefill instance returns (and a decode one takes)."""
        return {"do_remote_prefill": True, "remote_engine_id": self.engine_id,
                "remote_request_id": self.request_id, "remote_block_ids": list(self.block_ids),
                "remote_num_tokens": self.num_tokens, "remote_host": self.host,
                "remote_port": self.port, "first_token_id": self.first_token_id,
                "signature": self.signature}

    def signed(self, secret: bytes, prompt_token_ids: Sequence[int]) -> "RemotePrefill":
        return replace(self, signature=self._mac(secret, prompt_token_ids))

    def verify(self, secret: bytes, prompt_token_ids: Sequence[int]) -> bool:
        """True if a prefill instance holding ``secret`` issued these parameters for exactly
        this prompt. Clients cannot forge them, so they cannot make a decode instance
        connect to an address of their choosing or read blocks that are not theirs."""
        return hmac.compare_digest(self.signature, self._mac(secret, prompt_token_ids))

    def _mac(self, secret: bytes, prompt_token_ids: Sequence[int]) -> str:
        prompt = hashlib.sha256(json.dumps(list(prompt_token_ids)).encode()).hexdigest()
        fields = [self.engine_id, self.request_id, list(self.block_ids), self.num_tokens,
                  self.host, self.port, self.first_token_id, prompt]
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
        raise ValueError("kv_transfer_params: do_remote_decode and do_remote_prefill "
                         "cannot both be true")
    if not prefill:
        return KVTransferRequest(do_remote_decode=decode)
    block_ids = raw.get("remote_block_ids")
    if (not isinstance(block_ids, list) or not block_ids
            or not all(_is_int(b) and b >= 0 for b in block_ids)):
        raise ValueError("kv_transfer_params.remote_block_ids must be a non-empty list of "
                         "block ids (integers >= 0)")
    first = raw.get("first_token_id")
    if first is not None and not (_is_int(first) and first >= 0):
        raise ValueError("kv_transfer_params.first_token_id must be an integer >= 0")
    signature = raw.get("signature", "")
    if not isinstance(signature, str):
        raise ValueError("kv_transfer_params.signature must be a string")
    remote = RemotePrefill(
        engine_id=_str(raw, "remote_engine_id"), request_id=_str(raw, "remote_request_id"),
        block_ids=tuple(block_ids), num_tokens=_int(raw, "remote_num_tokens", 1),
        host=_str(raw, "remote_host"), port=_int(raw, "remote_port", 1, MAX_PORT),
        first_token_id=first, signature=signature)
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
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"kv_transfer_params.{name} must be an integer {bound}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

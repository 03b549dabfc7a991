"""The side channel of disaggregated prefill: a small authenticated request/reply service
over ZeroMQ through which a decode instance learns a prefill instance's NIXL agent and KV
layout, and pins a request's lease before pulling its blocks.

Messages are msgpack maps, never pickle. Each one (request and reply) is signed with
HMAC-SHA256 under a shared secret and carries a timestamp; a message with a bad signature or
a stale timestamp is dropped. Invariant: a handler only ever sees authenticated messages.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from typing import Any, Callable, Optional

import msgpack
import zmq

from pagoda import envs

logger = logging.getLogger(__name__)

SECRET_ENV = envs.KV_SECRET.name
MAX_CLOCK_SKEW_S = 60.0
POLL_INTERVAL_MS = 100
DEFAULT_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class SideChannelError(RuntimeError):
    """The peer could not be reached, or did not answer as it should."""


def resolve_secret(secret: Optional[str]) -> bytes:
    """The shared secret: the argument, else $PAGODA_KV_SECRET; an error if neither is set."""
    value = secret or envs.KV_SECRET()
    if not value:
        raise ValueError(
            f"disaggregated prefill needs a shared secret: pass --kv-secret or set "
            f"${SECRET_ENV} (the same on every prefill and decode instance)"
        )
    return value.encode("utf-8")


def seal(secret: bytes, message: dict[str, Any]) -> bytes:
    body = msgpack.packb({**message, "ts": time.time()}, use_bin_type=True)
    mac = hmac.new(secret, body, hashlib.sha256).digest()
    return msgpack.packb({"body": body, "mac": mac}, use_bin_type=True)


def open_sealed(secret: bytes, data: bytes) -> dict[str, Any]:
    """The message inside ``data``; SideChannelError if it is malformed, forged or stale."""
    try:
        envelope = msgpack.unpackb(data, raw=False)
        body, mac = envelope["body"], envelope["mac"]
        if not isinstance(body, bytes) or not isinstance(mac, bytes):
            raise TypeError("body and mac must be bytes")
    except Exception as e:  # noqa: BLE001 - any malformed input is the same refusal
        raise SideChannelError(f"malformed side-channel message: {e}") from None
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise SideChannelError("side-channel message failed authentication (wrong secret?)")
    message = msgpack.unpackb(body, raw=False)
    if not isinstance(message, dict) or abs(time.time() - message.get("ts", 0)) > MAX_CLOCK_SKEW_S:
        raise SideChannelError("side-channel message is stale or malformed")
    return message


class SideChannelServer:
    """Answers sealed requests on ``tcp://host:port`` in a background thread."""

    def __init__(self, host: str, port: int, secret: bytes, handler: Handler) -> None:
        self._secret = secret
        self._handler = handler
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        if port == 0:
            self.port = self._socket.bind_to_random_port(f"tcp://{host}")
        else:
            self._socket.bind(f"tcp://{host}:{port}")
            self.port = port
        self.host = host
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name="pagoda-kv-side-channel", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(POLL_INTERVAL_MS):
                continue
            data = self._socket.recv()
            self._socket.send(self._answer(data))
        self._socket.close()

    def _answer(self, data: bytes) -> bytes:
        try:
            request = open_sealed(self._secret, data)
        except SideChannelError as e:
            logger.warning("side channel: refused a message: %s", e)
            return b""  # unauthenticated peers learn nothing
        try:
            reply = self._handler(request)
        except Exception as e:  # noqa: BLE001 - the peer gets the error, the thread lives
            logger.exception("side channel: handler failed")
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return seal(self._secret, reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def call(
    host: str,
    port: int,
    secret: bytes,
    message: dict[str, Any],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Send one sealed request and return the verified reply."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        socket.connect(f"tcp://{host}:{port}")
        socket.send(seal(secret, message))
        data = socket.recv()
    except zmq.ZMQError as e:
        raise SideChannelError(f"side channel {host}:{port} did not answer: {e}") from None
    finally:
        socket.close()
    if not data:
        raise SideChannelError(
            f"side channel {host}:{port} refused the request (the shared secrets differ?)"
        )
    return open_sealed(secret, data)

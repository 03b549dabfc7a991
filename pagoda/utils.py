"""Small helpers shared by every layer (torch-free, so ``pagoda.core`` may import them)."""

from __future__ import annotations

import socket
import subprocess
from typing import Optional, Sequence


def cdiv(a: int, b: int) -> int:
    """The ceiling of a / b for positive b: how many blocks of b hold a items."""
    return -(-a // b)


def read_chat_template(template: Optional[str]) -> Optional[str]:
    """``--chat-template``: a file's contents, or the template's text itself."""
    if not template:
        return None
    if "{" not in template:  # a Jinja template has tags; a path has none
        try:
            with open(template, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"chat_template: cannot read {template!r}: {e}") from None
    return template


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_processes(procs: Sequence[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """SIGTERM every process still running, then wait for each; kill what outlives it."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()

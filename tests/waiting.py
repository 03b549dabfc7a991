"""Waiting on a condition with a deadline: how the tests synchronise with threads and
processes (a sleep that hopes the other side has finished is a flake on a loaded machine).

The deadline only bounds a failure: a condition that holds returns at once, however slow the
machine, and one that never holds fails with what was awaited and the last value seen."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")
POLL_S = 0.02


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str,
             poll_s: float = POLL_S) -> T:
    """Call ``predicate`` until it returns something true and return that; after
    ``timeout_s`` seconds without, fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout_s} s for {what}; last: {value!r}")
        time.sleep(poll_s)

"""Small helpers shared by every layer (torch-free, so ``pagoda.core`` may import them)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """The ceiling of a / b for positive b: how many blocks of b hold a items."""
    return -(-a // b)

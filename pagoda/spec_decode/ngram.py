"""Prompt lookup decoding (Saxena, 2023; vLLM's ``ngram`` method): the draft is what followed
the last earlier occurrence of the sequence's last n tokens, in its own prompt and output.

Indexed incrementally: each token a sequence gains adds one entry per n-gram size, so a
proposal is a few dictionary lookups however long the sequence is, never a scan.
Invariant: the index maps each n-gram (min_n <= n <= max_n) of ``tokens[:len - 1]`` to the
position just after its latest occurrence whose follower is known; the sequence's own last
n-gram is entered only once a token follows it, so a lookup never finds itself.
"""

from __future__ import annotations


class NgramIndex:
    """One sequence's n-gram index (its prompt and output so far)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.tokens: list[int] = []
        self._follower: dict[tuple[int, ...], int] = {}  # n-gram -> position after it

    def extend(self, tokens: list[int]) -> None:
        """Take the sequence's tokens (the whole sequence; only the new tail is indexed)."""
        start = len(self.tokens)
        self.tokens.extend(tokens[start:])
        seq, follower = self.tokens, self._follower
        # The n-grams that end at position end - 1 gain a follower once position end exists.
        for end in range(max(start, 1), len(seq)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                follower[tuple(seq[end - n : end])] = end

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest recurring suffix (longest n first)."""
        seq = self.tokens
        for n in range(min(self.max_n, len(seq)), self.min_n - 1, -1):
            after = self._follower.get(tuple(seq[len(seq) - n :]))
            if after is not None:
                return _copy(seq, after, k)
        return []


def _copy(seq: list[int], start: int, k: int) -> list[int]:
    """``k`` tokens copied from ``seq[start:]`` onto its end, the copy reading what it has
    written when it runs past the end (as LZ77 does): a loop of period p < k keeps going.

        seq   a b c a b |            start = 3 (after the earlier "a b")
        draft           c a b c a    (k = 5)
    """
    out: list[int] = []
    n = len(seq)
    for i in range(k):
        src = start + i
        out.append(seq[src] if src < n else out[src - n])
    return out

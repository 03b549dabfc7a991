"""Suffix decoding (Oliaro et al., "SuffixDecoding: Extreme Speculative Decoding for Emerging
AI Applications", 2024; vLLM's ``suffix`` method): drafts from a suffix structure over the
request's own prompt and output, and over the outputs of recent requests.

Both structures are a :class:`SuffixTrie`: every substring of at most ``max_depth`` tokens of
the sequences it holds, as a trie whose nodes count the occurrences. A draft starts at the
node of the longest suffix of the request's tokens that occurred before, and follows the most
frequent child while the product of the children's frequencies (an estimate of the chance
that the draft is accepted so far) stays above ``min_token_prob``; its length is at most
``max_spec_factor`` times the match's, so a short, weak match proposes little.

Invariant: a node's count is the number of (sequence, start position) pairs whose substring
passes through it, so a child's share of its siblings' counts is how often that token
followed. Built incrementally: a token appended to a held sequence extends its last
``max_depth`` suffixes by one node each, never rebuilding anything.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

ROOT = 0


@dataclass
class Draft:
    tokens: list[int]
    probs: list[float]  # the estimated chance that tokens[: i + 1] are all accepted

    @property
    def score(self) -> float:
        """The expected number of accepted tokens."""
        return sum(self.probs)


class SuffixTrie:
    """Substrings (up to ``max_depth`` tokens) of the sequences it holds, with counts."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._kids: list[Optional[dict[int, int]]] = [None]  # node -> {token: child}
        self._count: list[int] = [0]
        self._free: list[int] = []

    @property
    def num_nodes(self) -> int:
        return len(self._count) - len(self._free) - 1

    def append(self, tails: list[int], token: int) -> list[int]:
        """A held sequence grows by ``token``. ``tails[i]`` is the node of its last ``i + 1``
        tokens; returns the new tails (each old one extended, plus the token alone)."""
        new = [self._step(ROOT, token)]
        for node in tails[: self.max_depth - 1]:
            new.append(self._step(node, token))
        return new

    def add(self, tokens: list[int]) -> None:
        tails: list[int] = []
        for t in tokens:
            tails = self.append(tails, t)

    def remove(self, tokens: list[int]) -> None:
        """Take out a sequence added with :meth:`add` (every substring it counted)."""
        for start in range(len(tokens)):
            node, path = ROOT, []
            for t in tokens[start : start + self.max_depth]:
                kids = self._kids[node]
                assert kids is not None and t in kids, "removing a sequence never added"
                path.append((node, t))
                node = kids[t]
            for parent, t in path:
                child = (self._kids[parent] or {})[t]
                self._count[child] -= 1
                if self._count[child] == 0:
                    self._drop(parent, t, child)
                    break  # its whole subtree counted only this substring: gone with it

    def count(self, node: int) -> int:
        return self._count[node]

    def walk(self, tokens: list[int]) -> Optional[int]:
        """The node of ``tokens`` from the root, None if they never occurred."""
        node = ROOT
        for t in tokens:
            kids = self._kids[node]
            if kids is None or t not in kids:
                return None
            node = kids[t]
        return node

    def longest_match(self, context: list[int], max_len: int) -> tuple[int, int]:
        """(node, length) of the longest suffix of ``context`` (at most ``max_len`` tokens)
        that occurs here with a token after it; (ROOT, 0) if none. Occurring is monotone in
        the length (a suffix occurs wherever a longer one does), so a binary search."""
        lo, hi, best = 0, min(max_len, len(context)), ROOT
        while lo < hi:
            mid = (lo + hi + 1) // 2
            node = self.walk(context[len(context) - mid :])
            if node is not None and self._kids[node]:
                lo, best = mid, node
            else:
                hi = mid - 1
        return best, lo

    def draft(self, node: int, k: int, min_prob: float) -> Draft:
        """Follow the most frequent child from ``node`` while the running product of the
        children's shares stays >= ``min_prob``, for at most ``k`` tokens. Shares are taken
        among the children, so an occurrence with nothing after it yet (the request's own
        suffix) does not count against them."""
        tokens: list[int] = []
        probs: list[float] = []
        prob = 1.0
        while len(tokens) < k:
            kids = self._kids[node]
            if not kids:
                break
            total, best, best_count = 0, -1, 0
            for t, child in kids.items():
                c = self._count[child]
                total += c
                if c > best_count:
                    best, best_count = t, c
            prob *= best_count / total
            if prob < min_prob:
                break
            tokens.append(best)
            probs.append(prob)
            node = kids[best]
        return Draft(tokens, probs)

    def _step(self, node: int, token: int) -> int:
        kids = self._kids[node]
        if kids is None:
            kids = self._kids[node] = {}
        child = kids.get(token)
        if child is None:
            child = kids[token] = self._new_node()
        self._count[child] += 1
        return child

    def _new_node(self) -> int:
        if self._free:
            return self._free.pop()
        self._kids.append(None)
        self._count.append(0)
        return len(self._count) - 1

    def _drop(self, parent: int, token: int, node: int) -> None:
        """Unlink ``node`` (count 0) and recycle it and its subtree (all count 0 too)."""
        kids = self._kids[parent]
        assert kids is not None  # ``node`` is one of them
        del kids[token]
        stack = [node]
        while stack:
            n = stack.pop()
            kids = self._kids[n]
            if kids:
                stack.extend(kids.values())
            self._kids[n] = None
            self._count[n] = 0
            self._free.append(n)


class RequestSuffixes:
    """One request's tokens (prompt and output so far) in its own trie."""

    def __init__(self, max_depth: int) -> None:
        self.trie = SuffixTrie(max_depth)
        self.tokens: list[int] = []
        self._tails: list[int] = []

    def extend(self, tokens: list[int]) -> None:
        """Take the sequence's tokens (the whole sequence; only the new tail is added)."""
        for t in tokens[len(self.tokens) :]:
            self._tails = self.trie.append(self._tails, t)
            self.tokens.append(t)

    def longest_match(self, max_len: int) -> tuple[int, int]:
        """(node, length) of the longest suffix (at most ``max_len`` tokens) that occurred
        earlier too: its tail node counts the suffix's own occurrence, so one more means an
        earlier one."""
        tails = self._tails[: min(max_len, self.trie.max_depth - 1)]
        lo, hi = 0, len(tails)
        while lo < hi:  # occurring twice is monotone in the length, like occurring at all
            mid = (lo + hi + 1) // 2
            if self.trie.count(tails[mid - 1]) >= 2:
                lo = mid
            else:
                hi = mid - 1
        return (tails[lo - 1], lo) if lo else (ROOT, 0)


class GlobalSuffixes:
    """The outputs of the most recent finished requests (at most ``max_requests``, the
    oldest evicted first) in one trie."""

    def __init__(self, max_depth: int, max_requests: int) -> None:
        self.trie = SuffixTrie(max_depth)
        self.max_requests = max_requests
        self._held: OrderedDict[str, list[int]] = OrderedDict()

    def add(self, request_id: str, output: list[int]) -> None:
        if self.max_requests <= 0 or not output:
            return
        self.remove(request_id)
        self._held[request_id] = list(output)
        self.trie.add(output)
        while len(self._held) > self.max_requests:
            _, oldest = self._held.popitem(last=False)
            self.trie.remove(oldest)

    def remove(self, request_id: str) -> None:
        tokens = self._held.pop(request_id, None)
        if tokens is not None:
            self.trie.remove(tokens)

    def __len__(self) -> int:
        return len(self._held)

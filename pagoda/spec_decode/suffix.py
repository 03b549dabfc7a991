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
from typing import Callable, Optional, Protocol

ROOT = 0


@dataclass
class Draft:
    tokens: list[int]
    probs: list[float]  # the estimated chance that tokens[: i + 1] are all accepted

    @property
    def score(self) -> float:
        """The expected number of accepted tokens."""
        return sum(self.probs)


TOKEN_BITS = 21  # an edge's key: parent << TOKEN_BITS | token (vocabularies < 2M tokens)
NONE = -1


class SuffixTrie:
    """Substrings (up to ``max_depth`` tokens) of the sequences it holds, with counts: the
    reference, in Python. The engine uses the same trie in C++
    (``kernels/csrc/suffix_trie.cpp``, the same interface) where its extension is built: a
    token appended costs ``max_depth`` dictionary steps, far cheaper there
    (docs/speculative_decoding.md).

    Flat arrays indexed by node id, and one dictionary of edges keyed by (parent, token)
    packed in an int. Each node keeps the sum of its children's counts and its most
    frequent child, updated as counts grow, so a draft never scans a node's children.
    (Removing a sequence can leave a node's "most frequent" child behind its siblings until
    they grow again, or unset when it goes: the global trie's drafts follow the children as
    they last led.) Held sequences (``extend``, by an id) keep their tails: the nodes of
    their last 1..max_depth tokens.
    """

    def __init__(self, max_depth: int) -> None:
        if max_depth < 1:
            raise ValueError("max_depth must be >= 1")
        self.max_depth = max_depth
        self._edges: dict[int, int] = {}  # parent << TOKEN_BITS | token -> child
        self._count = [0]  # node -> occurrences of its substring
        self._kids_total = [0]  # node -> sum of its children's counts
        self._best = [NONE]  # node -> its most frequent child
        self._best_token = [NONE]  # the token that leads to it
        self._free: list[int] = []
        self._tails: dict[int, list[int]] = {}  # held sequence -> its tails

    @property
    def num_nodes(self) -> int:
        return len(self._count) - len(self._free) - 1

    def extend(self, seq: int, tokens: list[int]) -> None:
        """Held sequence ``seq`` grows by ``tokens``."""
        tails = self._tails.get(seq, [])
        for t in tokens:
            tails = self._append(tails, t)
        self._tails[seq] = tails

    def forget(self, seq: int) -> None:
        """Stop holding ``seq``'s tails (its counts stay)."""
        self._tails.pop(seq, None)

    def add(self, tokens: list[int]) -> None:
        """A whole sequence, its tails not kept."""
        tails: list[int] = []
        for t in tokens:
            tails = self._append(tails, t)

    def remove(self, tokens: list[int]) -> None:
        """Take out a sequence added with :meth:`add` (every substring it counted)."""
        for start in range(len(tokens)):
            path, node = [], ROOT
            for t in tokens[start : start + self.max_depth]:
                child = self._edges.get(node << TOKEN_BITS | t)
                if child is None:
                    raise ValueError("removing a sequence never added")
                path.append((node, t, child))
                node = child
            for i, (parent, _, child) in enumerate(path):
                self._count[child] -= 1
                self._kids_total[parent] -= 1
                if self._count[child] == 0:  # counted only this substring: so is the rest
                    if self._best[parent] == child:
                        self._best[parent] = self._best_token[parent] = NONE
                    for p, tok, c in path[i:]:
                        del self._edges[p << TOKEN_BITS | tok]
                        self._free_node(c)
                    break

    def count(self, node: int) -> int:
        return self._count[node]

    def own_match(self, seq: int, max_len: int) -> tuple[int, int]:
        """(node, length) of the longest suffix of held sequence ``seq`` (at most
        ``max_len`` tokens) that occurred earlier too: its tail node counts the suffix's own
        occurrence, so one more means an earlier one. Occurring twice is monotone in the
        length (a suffix occurs wherever a longer one does), so a binary search."""
        tails = self._tails.get(seq, [])
        lo, hi = 0, min(max_len, len(tails), self.max_depth - 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._count[tails[mid - 1]] >= 2:
                lo = mid
            else:
                hi = mid - 1
        return (tails[lo - 1], lo) if lo else (ROOT, 0)

    def longest_match(self, context: list[int], max_len: int) -> tuple[int, int]:
        """(node, length) of the longest suffix of ``context`` (at most ``max_len`` tokens)
        that occurs here with a token after it; (ROOT, 0) if none. A binary search, as in
        :meth:`own_match`."""
        lo, hi, best = 0, min(max_len, len(context)), ROOT
        while lo < hi:
            mid = (lo + hi + 1) // 2
            node = self._walk(context[len(context) - mid :])
            if node is not None and self._kids_total[node]:
                lo, best = mid, node
            else:
                hi = mid - 1
        return best, lo

    def draft(self, node: int, k: int, min_prob: float) -> tuple[list[int], list[float]]:
        """Follow the most frequent child from ``node`` while the running product of the
        children's shares stays >= ``min_prob``, for at most ``k`` tokens: the tokens and
        the products. Shares are taken among the children, so an occurrence with nothing
        after it yet (the request's own suffix) does not count against them."""
        tokens: list[int] = []
        probs: list[float] = []
        prob = 1.0
        while len(tokens) < k:
            child = self._best[node]
            if child == NONE:
                break
            prob *= self._count[child] / self._kids_total[node]
            if prob < min_prob:
                break
            tokens.append(self._best_token[node])
            probs.append(prob)
            node = child
        return tokens, probs

    def edges(self) -> list[tuple[int, int, int]]:
        """(parent, token, child) of every edge (for tests and inspection)."""
        mask = (1 << TOKEN_BITS) - 1
        return [(key >> TOKEN_BITS, key & mask, c) for key, c in self._edges.items()]

    def _append(self, tails: list[int], token: int) -> list[int]:
        """``tails[i]`` is the node of a sequence's last ``i + 1`` tokens; returns them after
        ``token`` (each old one extended, plus the token alone)."""
        if not 0 <= token < 1 << TOKEN_BITS:
            raise ValueError("token id out of the trie's range")
        edges, count, total = self._edges, self._count, self._kids_total
        best, best_token = self._best, self._best_token
        new = []
        for node in (ROOT, *tails[: self.max_depth - 1]):
            key = node << TOKEN_BITS | token
            child = edges.get(key)
            if child is None:
                child = edges[key] = self._new_node()
            c = count[child] = count[child] + 1
            total[node] += 1
            b = best[node]
            if b == NONE or c > count[b]:
                best[node], best_token[node] = child, token
            new.append(child)
        return new

    def _walk(self, tokens: list[int]) -> Optional[int]:
        node = ROOT
        for t in tokens:
            child = self._edges.get(node << TOKEN_BITS | t)
            if child is None:
                return None
            node = child
        return node

    def _new_node(self) -> int:
        if self._free:
            return self._free.pop()
        self._count.append(0)
        self._kids_total.append(0)
        self._best.append(NONE)
        self._best_token.append(NONE)
        return len(self._count) - 1

    def _free_node(self, node: int) -> None:
        self._count[node] = self._kids_total[node] = 0
        self._best[node] = self._best_token[node] = NONE
        self._free.append(node)


def check_trie(trie: Trie) -> None:
    """A trie's invariants (tests): each node's children's counts sum to its kids_total
    (hence its draft shares) and never pass its own count."""
    sums: dict[int, int] = {}
    for parent, _, child in trie.edges():
        assert trie.count(child) > 0, "an edge to a node of count 0"
        sums[parent] = sums.get(parent, 0) + trie.count(child)
    for node, total in sums.items():
        assert node == ROOT or total <= trie.count(node), f"node {node}: kids outnumber it"


class Trie(Protocol):
    """What the proposers need of a trie: :class:`SuffixTrie` or its C++ twin."""

    @property
    def num_nodes(self) -> int: ...

    def extend(self, seq: int, tokens: list[int]) -> None: ...

    def forget(self, seq: int) -> None: ...

    def add(self, tokens: list[int]) -> None: ...

    def remove(self, tokens: list[int]) -> None: ...

    def count(self, node: int) -> int: ...

    def own_match(self, seq: int, max_len: int) -> tuple[int, int]: ...

    def longest_match(self, context: list[int], max_len: int) -> tuple[int, int]: ...

    def draft(self, node: int, k: int, min_prob: float) -> tuple[list[int], list[float]]: ...

    def edges(self) -> list[tuple[int, int, int]]: ...


TrieFactory = Callable[[int], Trie]  # max_depth -> an empty trie


class RequestSuffixes:
    """One request's tokens (prompt and output so far) in its own trie."""

    def __init__(self, max_depth: int, make_trie: TrieFactory = SuffixTrie) -> None:
        self.trie = make_trie(max_depth)
        self.max_depth = max_depth
        self.num_tokens = 0

    def extend(self, tokens: list[int]) -> None:
        """Take the sequence's tokens (the whole sequence; only the new tail is added)."""
        if len(tokens) > self.num_tokens:
            self.trie.extend(0, tokens[self.num_tokens :])
            self.num_tokens = len(tokens)

    def longest_match(self, max_len: int) -> tuple[int, int]:
        return self.trie.own_match(0, max_len)

    def draft(self, node: int, k: int, min_prob: float) -> Draft:
        return Draft(*self.trie.draft(node, k, min_prob))


class GlobalSuffixes:
    """The outputs of the most recent finished requests (at most ``max_requests``, the
    oldest evicted first) in one trie."""

    def __init__(
        self, max_depth: int, max_requests: int, make_trie: TrieFactory = SuffixTrie
    ) -> None:
        self.trie = make_trie(max_depth)
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

    def longest_match(self, context: list[int], max_len: int) -> tuple[int, int]:
        return self.trie.longest_match(context, max_len)

    def draft(self, node: int, k: int, min_prob: float) -> Draft:
        return Draft(*self.trie.draft(node, k, min_prob))

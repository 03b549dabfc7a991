"""Verifying drafts (speculative decoding; Leviathan et al., ICML'23, and Chen et al., 2023,
for drafts from a model; here the drafts are model-free, ``pagoda/spec_decode/``).

Each of a verified row's k + 1 positions is sampled exactly as it would be without
speculation: the same logits processing, the same grammar mask, the same seeded noise for
the same output index. A draft is accepted while it equals the sample at its position; the
first sample that differs (or the sample after the last draft) is kept too, and everything
after it dropped. So greedy output is token-identical to decoding one token per step, and so
is a seeded request's.

For a deterministic draft token x this is standard speculative rejection sampling: x is
accepted with probability p(x), the chance that the sample is x, and when it is not, the
sample is distributed as p restricted to tokens other than x and renormalised, which is the
residual distribution norm(max(0, p - q)) for q = the point mass on x. Invariant: the tokens
returned are a prefix of the drafts followed by one sampled token.
"""

from __future__ import annotations


def accept(drafts: list[int], samples: list[int]) -> list[int]:
    """``samples[j]`` was sampled at the position after ``drafts[:j]``; returns the new
    tokens: the drafts that matched, then the first sample that did not match (or the
    sample after the last draft).

        drafts    d1 d2 d3 d4
        samples   d1 d2 x  .  .      ->  d1 d2 x
    """
    assert len(samples) == len(drafts) + 1, "one sample per draft, and one more"
    for j, draft in enumerate(drafts):
        if samples[j] != draft:
            return samples[: j + 1]
    return list(samples)

"""The structured-outputs mask (worker/sampler._mask_disallowed): the C++ kernel and the
tensor-op fallback give the same logits, for fp32 and bf16, a vocabulary that is not a
multiple of 32, rows with and without masks; the caller's logits are never written."""
import random

import pytest
import torch

from pagoda.kernels import ext
from pagoda.sampling import SamplingParams
from pagoda.worker import sampler
from pagoda.worker.sampler import SamplingRow, _mask_disallowed, sample_tokens
from tests.native import needs_ext


def _rows(n, vocab, masked, seed=0):
    rng = random.Random(seed)
    words = (vocab + 31) // 32
    rows = []
    for i in range(n):
        allowed = None
        if i in masked:
            bits = [rng.random() < 0.3 for _ in range(words * 32)]
            bits[rng.randrange(vocab)] = True             # at least one allowed token
            allowed = b"".join(
                int("".join("1" if b else "0" for b in reversed(bits[w * 32:(w + 1) * 32])),
                    2).to_bytes(4, "little")
                for w in range(words))
        rows.append(SamplingRow(SamplingParams(temperature=0.0), [1, 2], 2, [], allowed=allowed))
    return rows


def _expected(logits, rows):
    out = logits.clone()
    for i, r in enumerate(rows):
        if r.allowed is None:
            continue
        bits = int.from_bytes(r.allowed, "little")
        for v in range(logits.shape[1]):
            if not (bits >> v) & 1:
                out[i, v] = float("-inf")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_ext), False])
def test_mask_matches_the_bits(dtype, native, monkeypatch):
    if native:  # a machine that can build the extension must have it: a failure, no skip
        ext.require_extension()
    else:
        monkeypatch.setattr(sampler, "_native", lambda logits: None)
    vocab = 203                                           # not a multiple of 32
    rows = _rows(5, vocab, masked={0, 2, 3})
    logits = torch.randn(5, vocab).to(dtype)
    before = logits.clone()
    got = _mask_disallowed(logits, rows)
    assert torch.equal(logits, before), "the caller's logits were written"
    assert torch.equal(got, _expected(logits, rows))


def test_greedy_under_masks_picks_the_best_allowed_token():
    vocab = 97
    rows = _rows(4, vocab, masked={1, 3}, seed=3)
    logits = torch.randn(4, vocab)
    tokens, _ = sample_tokens(logits, rows)
    for i, r in enumerate(rows):
        if r.allowed is None:
            assert tokens[i] == logits[i].argmax()
        else:
            bits = int.from_bytes(r.allowed, "little")
            best = max((v for v in range(vocab) if (bits >> v) & 1), key=lambda v: logits[i, v])
            assert tokens[i] == best


def test_sampled_rows_never_draw_a_forbidden_token():
    vocab = 64
    rows = _rows(3, vocab, masked={0, 1, 2}, seed=5)
    rows = [SamplingRow(SamplingParams(temperature=1.0, seed=i), r.token_ids, 2, [],
                        allowed=r.allowed) for i, r in enumerate(rows)]
    for trial in range(20):
        tokens, _ = sample_tokens(torch.randn(3, vocab) * 3, rows)
        for i, r in enumerate(rows):
            assert (int.from_bytes(r.allowed, "little") >> int(tokens[i])) & 1

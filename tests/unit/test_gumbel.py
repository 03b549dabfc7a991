"""The Gumbel-max sampler (worker/gumbel.py, kernels/csrc/gumbel_sample.cpp) against its
PyTorch reference and against the distribution it must draw from. Fresh random inputs each run
(the seed is printed; PAGODA_TEST_SEED replays)."""
from __future__ import annotations

import math

import pytest
import torch

from pagoda.kernels import ext
from pagoda.worker import gumbel
from tests.native import needs_ext


def _ext():
    mod = ext.extension()
    assert mod is not None, ext.unavailable_reason()
    return mod


def kernel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.empty(keys.numel(), vocab)
    _ext().gumbel_noise(out, keys)
    return out


def kernel_draw(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _ext().gumbel_argmax(out, logits, keys)
    return out


def test_uniforms_are_exact_odd_multiples_inside_the_open_interval(random_seed):
    u = gumbel.uniforms(gumbel.random_keys(8), 4096)
    scaled = u.double() * 2 ** 24
    assert torch.equal(scaled, scaled.round()) and (scaled.long() % 2 == 1).all()
    assert u.min() > 0 and u.max() < 1
    # Standard uniform: mean 1/2, variance 1/12 (32768 draws: 6 standard errors).
    assert abs(u.double().mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / u.numel())


@needs_ext
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000, 49152])
def test_kernel_noise_matches_the_reference(random_seed, vocab):
    keys = gumbel.random_keys(5)
    ours, ref = kernel_noise(keys, vocab), gumbel.noise(keys, vocab)
    assert torch.isfinite(ours).all()
    # The kernel's log is a polynomial: within a few fp32 ulps of torch.log's result.
    assert torch.allclose(ours, ref, rtol=1e-5, atol=2e-6), (ours - ref).abs().max()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [3, 16, 37, 5000])
def test_kernel_draw_is_the_argmax_of_logits_plus_its_noise(random_seed, dtype, vocab):
    rows = 9
    base = torch.randn(rows, vocab + 7) * 4
    logits = base.to(dtype)[:, 3:3 + vocab]          # a row stride that is not the width
    assert logits.stride(0) != vocab
    masked = torch.rand(rows, vocab) < 0.3
    masked[:, 0] = False                              # every row keeps a token
    logits = logits.masked_fill(masked, float("-inf"))
    keys = gumbel.random_keys(rows)
    expected = (logits.float() + kernel_noise(keys, vocab)).argmax(dim=-1)
    got = kernel_draw(logits, keys)
    assert torch.equal(got, expected)
    assert not masked.gather(1, got[:, None]).any()


@needs_ext
def test_kernel_degenerate_rows():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[-inf] * 20,                   # nothing left: 0, as argmax of -inf
                           [nan] * 19 + [0.0],            # NaN is never drawn
                           [-inf] * 18 + [5.0, -inf],     # one token left: always it
                           [0.0] * 20])
    keys = gumbel.random_keys(4)
    got = kernel_draw(logits, keys).tolist()
    assert got[0] == 0 and got[1] == 19 and got[2] == 18
    assert 0 <= got[3] < 20


@needs_ext
def test_a_rows_draw_does_not_depend_on_its_batch(random_seed):
    logits = torch.randn(6, 300)
    keys = gumbel.random_keys(6)
    alone = [kernel_draw(logits[i:i + 1].contiguous(), keys[i:i + 1]).item() for i in range(6)]
    perm = torch.randperm(6)
    shuffled = kernel_draw(logits[perm], keys[perm])
    assert kernel_draw(logits, keys).tolist() == alone
    assert shuffled.tolist() == [alone[i] for i in perm.tolist()]


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of Pearson's statistic (Wilson-Hilferty normal approximation)."""
    n = counts.sum().item()
    expected = probs.double() * n
    stat = ((counts.double() - expected) ** 2 / expected).sum().item()
    k = probs.numel() - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("path", [pytest.param("kernel", marks=needs_ext), "reference"])
def test_draws_follow_the_softmax(random_seed, path, monkeypatch):
    """40000 rows with distinct keys sample a 12-token distribution: Pearson's test must not
    reject at p < 1e-6 (a right-tailed exponential noise, for one, fails it by far)."""
    if path == "kernel":
        ext.require_extension()  # built wherever it can be: a failure, no skip
    else:
        monkeypatch.setattr(gumbel, "_ext", lambda logits: None)
    logits = torch.randn(12) * 1.5
    logits[3] = float("-inf")
    probs = torch.softmax(logits, dim=0)
    n = 40000
    tokens = gumbel.draw(logits.expand(n, -1).contiguous(), gumbel.random_keys(n))
    counts = torch.bincount(tokens, minlength=12)
    assert counts[3] == 0
    keep = probs > 0
    assert _chi_square_p_value(counts[keep], probs[keep]) > 1e-6, (counts, probs * n)


def test_the_chi_square_check_rejects_a_wrong_sampler(random_seed):
    """The check above can fail: exponential noise in place of Gumbel is rejected."""
    logits = torch.randn(12) * 1.5
    probs = torch.softmax(logits, dim=0)
    n = 40000
    wrong = logits + -torch.log(gumbel.uniforms(gumbel.random_keys(n), 12))
    counts = torch.bincount(wrong.argmax(dim=-1), minlength=12)
    assert _chi_square_p_value(counts, probs) < 1e-6


@needs_ext
def test_kernel_and_reference_draw_the_same_tokens(random_seed):
    """Same keys, same tokens, apart from near-exact ties of the top two scores."""
    logits = torch.randn(64, 2000) * 3
    keys = gumbel.random_keys(64)
    ours = kernel_draw(logits, keys)
    scores = logits + gumbel.noise(keys, 2000)
    ref = scores.argmax(dim=-1)
    top2 = scores.topk(2, dim=-1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < 1e-4
    assert torch.equal(ours[~near_tie], ref[~near_tie])

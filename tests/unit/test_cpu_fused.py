"""The fused bf16 CPU kernels against the reference ops they replace (models/llama.py with
PAGODA_FUSED=0): same roundings, so nearly every element is bit-identical."""
import pytest
import torch
import torch.nn.functional as F

from pagoda.kernels import cpu_fused
from pagoda.models.llama import RMSNorm
from pagoda.models.ops import rotate as _rotate

from native import needs_ext

pytestmark = [needs_ext, pytest.mark.usefixtures("random_seed")]
BF16 = torch.bfloat16


def mostly_identical(out: torch.Tensor, ref: torch.Tensor, min_equal: float = 0.99) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=1e-2)
    equal = (out == ref).float().mean().item()
    assert equal >= min_equal, f"only {equal:.4f} of the elements are bit-identical"


def reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight.data = weight
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("rows, dim", [(1, 64), (37, 576), (300, 960)])
def test_rms_norm_and_residual_add(rows, dim):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, dim, generator=g) * 3).to(BF16)
    w = (torch.rand(dim, generator=g) + 0.5).to(BF16)
    mostly_identical(cpu_fused.rms_norm(x, w, 1e-5), reference_norm(x, w, 1e-5))
    residual = torch.randn(rows, dim, generator=g).to(BF16)
    expected_residual = residual + x
    out = cpu_fused.add_rms_norm(residual, x, w, 1e-5)
    assert torch.equal(residual, expected_residual)         # updated in place, exactly
    mostly_identical(out, reference_norm(expected_residual, w, 1e-5))


def test_rope_in_place_on_strided_views_is_exact():
    g = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim = 23, 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(BF16)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.reshape(tokens, heads, dim), k.reshape(tokens, kv_heads, dim)  # strided views
    freqs = torch.outer(torch.arange(100.0), torch.rand(dim // 2, generator=g))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.randint(0, 100, (tokens,), generator=g)
    c = cos[positions].unsqueeze(1).to(BF16)
    s = sin[positions].unsqueeze(1).to(BF16)
    ref_q, ref_k = _rotate(q.clone(), c, s), _rotate(k.clone(), c, s)
    untouched_v = qkv[:, (heads + kv_heads) * dim:].clone()
    cpu_fused.rope_(q, k, cos, sin, positions)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], untouched_v)


def test_silu_mul():
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(50, 2 * 1536, generator=g) * 4).to(BF16)
    gate, up = gate_up.split(1536, dim=-1)
    mostly_identical(cpu_fused.silu_mul(gate_up), F.silu(gate) * up, min_equal=0.999)


@pytest.mark.parametrize("rows, inter", [(1, 40), (50, 1536), (300, 6912)])
def test_gelu_tanh_mul(rows, inter):
    """GeGLU (Gemma) against PyTorch's tanh-approximated GELU times up, over the range where
    the approximation's tanh saturates and where it is linear; odd widths take the scalar tail."""
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(BF16)
    gate, up = gate_up.split(inter, dim=-1)
    ref = F.gelu(gate, approximate="tanh") * up
    mostly_identical(cpu_fused.gelu_tanh_mul(gate_up), ref, min_equal=0.999)


def test_bad_inputs_raise_instead_of_crashing():
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_fused.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)
    x = torch.randn(3, 2, 8).to(BF16)
    with pytest.raises(RuntimeError, match="position"):
        cpu_fused.rope_(x, x.clone(), torch.ones(4, 8), torch.ones(4, 8),
                        torch.tensor([0, 1, 9]))


def test_argmax_matches_torch_including_ties_and_infinities():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 1000 + 7, generator=g).to(BF16)
    logits[3, :] = 0.0                          # all equal: index 0
    logits[4, 500] = logits[4, 900] = 100.0     # tie: the first wins
    logits[5, -1] = 50.0                        # the max in the tail past the 16-lane body
    logits[6, :] = float("-inf")
    logits[7, 10] = float("nan")                # NaN wins, as in torch
    assert torch.equal(cpu_fused.argmax(logits), logits.argmax(-1))
    strided = torch.randn(8, 64, generator=g).to(BF16)[:, ::2]
    with pytest.raises(RuntimeError, match="contiguous rows"):
        cpu_fused.argmax(strided)


@pytest.mark.parametrize("rows", [1, 7, 16, 37])
def test_greedy_tokens_from_transposed_logits_match_row_argmax(rows):
    """weight @ hidden.T and a column argmax: the same tokens as argmax(hidden @ weight.T),
    including ties, -inf rows, NaN and maxima in the tail columns past the 16-lane body."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    vocab, dim = 3000 + 5, 64
    weight = torch.randn(vocab, dim, generator=g).to(BF16)
    hidden = torch.randn(rows, dim, generator=g).to(BF16)
    want = F.linear(hidden, weight).argmax(-1)
    assert torch.equal(cpu_fused.greedy_tokens(hidden, weight), want)
    logits = torch.randn(rows, vocab, generator=g).to(BF16)
    logits[0, 100] = logits[0, 2900] = 80.0      # tie across the threads' vocabulary ranges
    if rows > 3:
        logits[1, :] = float("-inf")
        logits[2, 2000] = float("nan")
        logits[3, :] = 1.0
    out = torch.empty(rows, dtype=torch.int64)
    cpu_fused._ext().argmax_cols(out, logits.t().contiguous())
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("rows", [1, 8, 9, 20])
def test_greedy_from_hidden_takes_the_packed_head_for_one_row(rows):
    """Up to PACKED_HEAD_MAX_ROWS rows the packed projection and a row argmax give the tokens,
    beyond them ``greedy_tokens``; both the argmax of hidden @ weight.T, up to ties within the
    bf16 rounding of the logits."""
    from pagoda.models import cpu_linear
    from pagoda.sampling import SamplingParams
    from pagoda.worker import sampler

    if not cpu_linear.packing_supported(BF16):
        pytest.skip("this CPU cannot pack bf16 weights")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    weight = torch.randn(2000, 64, generator=g).to(BF16)
    hidden = torch.randn(rows, 64, generator=g).to(BF16)
    head = cpu_linear.PackedLinear.of(weight)
    calls = []

    def spy(x):
        calls.append(x.shape[0])
        return head(x)

    row = sampler.SamplingRow(SamplingParams(temperature=0.0), [1, 2], 2, [])
    got = sampler.greedy_from_hidden(hidden, weight, [row] * rows, spy)
    exact = F.linear(hidden.float(), weight.float())          # fp32: bf16 products are exact
    top = exact.max(-1).values
    chosen = exact[torch.arange(rows), got]
    assert (chosen >= top - 2 ** -7 * top.abs()).all()         # within the bf16 output's rounding
    assert calls == ([rows] if rows <= sampler.PACKED_HEAD_MAX_ROWS else [])


@pytest.mark.parametrize("rows", [1, 20, 128, 129])
def test_greedy_from_hidden_takes_a_kernel_head_to_more_rows(rows):
    """An output projection on pagoda's bf16 kernel serves greedy up to KERNEL_HEAD_MAX_ROWS
    rows (beyond them ``greedy_tokens``); the argmax of hidden @ weight.T either way, up to
    ties within the bf16 rounding of the logits."""
    from pagoda.models import cpu_bf16
    from pagoda.sampling import SamplingParams
    from pagoda.worker import sampler

    if not cpu_bf16.kernel_native():
        pytest.skip("the bf16 kernel runs its portable loop here: never a head")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    weight = torch.randn(2000, 64, generator=g).to(BF16)
    hidden = torch.randn(rows, 64, generator=g).to(BF16)
    calls = []

    class Spy(cpu_bf16.InvariantLinear):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    row = sampler.SamplingRow(SamplingParams(temperature=0.0), [1, 2], 2, [])
    got = sampler.greedy_from_hidden(hidden, weight, [row] * rows, Spy(weight))
    exact = F.linear(hidden.float(), weight.float())
    top = exact.max(-1).values
    chosen = exact[torch.arange(rows), got]
    assert (chosen >= top - 2 ** -7 * top.abs()).all()
    assert calls == ([rows] if rows <= sampler.KERNEL_HEAD_MAX_ROWS else [])

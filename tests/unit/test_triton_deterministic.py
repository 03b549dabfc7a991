"""--deterministic on the Triton kernels (issue 39; docs/deterministic.md), under
TRITON_INTERPRET=1 on CPU tensors (on a GPU, tests/gpu/ runs them compiled).

The pieces: the invariant product (kernels/triton_gemm.py) gives each row what it gets alone at
any number of rows; the invariant attention (triton_attention.paged_attention_invariant) gives
each query row what it gets alone, whether its keys were cached or written in this step. Then a
tiny engine whose kernels are all Triton's (linears, attention, fused norms / RoPE / SiLU, the
output projection) repeats a request's tokens and logprobs to the bit among random batch-mates,
under chunk budgets, after a prefix hit, after preemption and with ngram speculation; and a mutant product whose
sum over K is cut by the number of rows is caught by the same comparison.
"""

from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (on a GPU, "
                "tests/gpu/ covers this path)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from tiny_models import TINY_VOCAB, hf_greedy, make_model  # noqa: E402

from pagoda import LLM, SamplingParams  # noqa: E402
from pagoda.attention import backend, triton_attention  # noqa: E402
from pagoda.attention.metadata import AttentionMetadata, PrefillChunk  # noqa: E402
from pagoda.kernels import triton_fused, triton_gemm  # noqa: E402
from pagoda.models import batch_invariant  # noqa: E402

ROWS = [1, 2, 3, 17, 64, 65, 130]
NEW_TOKENS = 12
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}


# ------------------------------------------------------------------------------- the product
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(200, 150), (96, 64)], ids=["ragged", "whole-tiles"])
def test_invariant_product_gives_each_row_what_it_gets_alone(dtype, shape):
    gen = torch.Generator().manual_seed(3)
    n, k = shape
    weight = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(max(ROWS), k, generator=gen).to(dtype)
    full = triton_gemm.invariant_linear(x, weight, bias)
    for m in ROWS:
        assert torch.equal(triton_gemm.invariant_linear(x[:m], weight, bias), full[:m]), m
    for i in (0, 1, 63, 64, 129):
        alone = triton_gemm.invariant_linear(x[i : i + 1], weight, bias)
        assert torch.equal(alone[0], full[i]), i
        # the row's place in a tile does not matter either
        assert torch.equal(triton_gemm.invariant_linear(x[i].expand(5, k), weight, bias)[3], full[i])
    # and it is the product: fp32 to rounding, 16-bit rounded from an fp32 sum
    ref = F.linear(x.float(), weight.float(), bias.float())
    if dtype == torch.float32:
        assert torch.allclose(full, ref, rtol=1e-5, atol=1e-4)
    else:
        assert (full == ref.to(dtype)).float().mean() > 0.99
        assert torch.allclose(full.float(), ref, rtol=2 ** -7, atol=1e-2)


def test_invariant_product_refuses_what_does_not_multiply():
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="do not multiply"):
        triton_gemm.invariant_linear(torch.zeros(3, 15), w)
    with pytest.raises(ValueError, match="float32"):
        triton_gemm.invariant_linear(torch.zeros(3, 16, dtype=torch.bfloat16), w)
    assert triton_gemm.invariant_linear(torch.zeros(0, 16), w).shape == (0, 8)


# ----------------------------------------------------------------------------- the attention
def random_cache(lens: list[int], block: int, kv_heads: int, dim: int, gen, dtype):
    """A cache holding sequences of ``lens`` tokens in scattered blocks, and their tables."""
    num_blocks = sum(-(-n // block) for n in lens) + 1
    kv = torch.randn(2, num_blocks, block, kv_heads, dim, generator=gen).to(dtype)
    width = max(-(-n // block) for n in lens)
    ids = iter(torch.randperm(num_blocks - 1, generator=gen).add(1).tolist())
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for b, n in enumerate(lens):
        for j in range(-(-n // block)):
            tables[b, j] = next(ids)
    return kv, tables


@pytest.mark.parametrize(
    "dtype,window,softcap",
    [(torch.bfloat16, 0, 0.0), (torch.float32, 0, 0.0), (torch.bfloat16, 200, 30.0)],
    ids=["bf16", "fp32", "bf16-window-cap"],
)
def test_invariant_attention_gives_each_row_what_it_gets_alone(dtype, window, softcap):
    """A decode row alone, among others (some long enough for several parts), and as a
    prefill chunk's row whose keys are written in this very step: the same bits; and it is
    attention (an fp64 reference)."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block = 6, 2, 32, 16
    lens = [530, 1, 37, 300, 257]
    kv, tables = random_cache(lens, block, kv_heads, dim, gen, dtype)
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens)
    scale = dim**-0.5
    options = dict(window=window, softcap=softcap, key_split=triton_attention.KEY_SPLIT)

    def attend(rows: list[int]) -> torch.Tensor:
        return triton_attention.paged_decode_attention(
            q[rows], kv, tables[rows], seq_lens[rows], scale, **options
        )

    together = attend(list(range(len(lens))))
    for b in range(len(lens)):
        assert torch.equal(attend([b]), together[b : b + 1]), lens[b]
    assert torch.equal(attend([3, 0, 3, 1])[2], together[3])
    for b, n in enumerate(lens):
        lo = max(0, n - window) if window else 0
        pos = torch.arange(lo, n)
        blocks = tables[b, pos // block]
        k = kv[0][blocks, pos % block].double()  # (n, Hkv, D)
        v = kv[1][blocks, pos % block].double()
        qg = q[b].double().view(kv_heads, heads // kv_heads, dim)  # (Hkv, G, D)
        scores = torch.einsum("hgd,nhd->hgn", qg, k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        ref = torch.einsum("hgn,nhd->hgd", scores.softmax(-1), v).reshape(heads, dim)
        assert torch.allclose(together[b].double(), ref, atol=2e-2), n

    # sequence 3 (300 tokens) as a prefill chunk of its last 45 tokens over 255 cached ones:
    # each chunk row equals that row decoded alone over the same keys
    chunk = 45
    new_k = kv[0][tables[3, torch.arange(255, 300) // block], torch.arange(255, 300) % block]
    new_v = kv[1][tables[3, torch.arange(255, 300) // block], torch.arange(255, 300) % block]
    slots = tables[3, torch.arange(255, 300) // block] * block + torch.arange(255, 300) % block
    qc = torch.randn(chunk, heads, dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, tables.shape[1], dtype=torch.int64),
        decode_seq_lens=torch.zeros(0, dtype=torch.int64),
        decode_max_seq_len=0,
        prefills=[PrefillChunk(0, chunk, 300, tables[3])],
        block_size=block,
    )
    got = triton_attention.paged_attention_invariant(
        qc, new_k, new_v, kv, meta, scale, window=window, softcap=softcap
    )
    for i in (0, 20, 44):
        alone = triton_attention.paged_decode_attention(
            qc[i : i + 1], kv, tables[3:4], torch.tensor([256 + i]), scale, **options
        )
        assert torch.equal(got[i], alone[0]), i


# ---------------------------------------------------------------------------- a tiny engine
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_ops_give_each_row_what_it_gets_alone(dtype):
    """The fused norm (after a residual add), q/k norm + RoPE and SiLU·up run a program per
    row (or per row and column block): a row's bits do not depend on the others'."""
    gen = torch.Generator().manual_seed(2)
    rows, hidden, heads, dim = 9, 64, 4, 16
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    res = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = torch.rand(hidden, generator=gen).to(dtype)
    gate_up = torch.randn(rows, 2 * hidden, generator=gen).to(dtype)
    q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
    k = torch.randn(rows, heads // 2, dim, generator=gen).to(dtype)
    angles = torch.arange(32.0)[:, None] * torch.rand(dim // 2, generator=gen)[None, :]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    positions = torch.randint(0, 32, (rows,), generator=gen)
    qw, kw = torch.rand(dim, generator=gen).to(dtype), torch.rand(dim, generator=gen).to(dtype)

    def ops_of(r: slice) -> list[torch.Tensor]:
        qr, kr = q[r].clone(), k[r].clone()
        triton_fused.qk_norm_rope_(qr, kr, positions[r], cos, sin, qw, kw, 1e-6)
        return [
            triton_fused.rms_norm(x[r], w, 1e-6, residual=res[r].clone()),
            triton_fused.silu_mul(gate_up[r]),
            qr,
            kr,
        ]

    together = ops_of(slice(0, rows))
    for i in (0, 4, 8):
        for got, want in zip(ops_of(slice(i, i + 1)), together):
            assert torch.equal(got[0], want[i]), i


@pytest.fixture
def on_triton(monkeypatch):
    """The kernels CUDA takes under the switch: the invariant product for the linears and
    the output projection, and the invariant attention (the fused decoder ops stay the
    CPU's, per row too: the interpreter's per-row programs would take minutes here)."""
    monkeypatch.setattr(backend, "use_triton", lambda device: True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("llama")), "llama", seed=5)


TARGET = [random.Random(7).randrange(3, TINY_VOCAB) for _ in range(30)]


def greedy(logprobs: bool = True) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0 if logprobs else None
    )


def run(llm: LLM, prompt: list[int], mates_seed=None, n: int = 4) -> tuple:
    """The target's (tokens, cumulative logprob), alone or at a random place among ``n``
    random batch-mates (prompts of 3-40 tokens, greedy and sampled, random lengths)."""
    if mates_seed is None:
        out = llm.generate([prompt], greedy())[0].outputs[0]
        return out.token_ids, out.cumulative_logprob
    rng = random.Random(mates_seed)
    mates = [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(n)]
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 0.8]),
            seed=rng.randrange(1000),
            max_tokens=rng.randrange(2, NEW_TOKENS),
            ignore_eos=True,
        )
        for _ in range(n)
    ]
    at = rng.randrange(n + 1)
    prompts = mates[:at] + [prompt] + mates[at:]
    out = llm.generate(prompts, params[:at] + [greedy()] + params[at:])[at].outputs[0]
    return out.token_ids, out.cumulative_logprob


def triton_forms(llm: LLM) -> tuple[str, set[str]]:
    """The attention backend's name and the kinds of linear a built engine runs (``lm_head``
    is kept only as the weight the output projection, ``packed_head``, was made from)."""
    model = llm.engine.runner.model
    kinds = {
        type(m).__name__
        for name, m in model.named_modules()
        if "Linear" in type(m).__name__ and not name.endswith("lm_head")
    }
    return model.attention.name, kinds | {type(model.packed_head).__name__}


@pytest.mark.usefixtures("one_thread", "on_triton")
def test_tiny_engine_on_triton_kernels_every_mode_equals_alone(tiny):
    import transformers

    fp32 = LLM(tiny, dtype="float32", deterministic=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    assert run(fp32, TARGET)[0] == hf_greedy(hf, TARGET, NEW_TOKENS)

    llm = LLM(tiny, dtype="bfloat16", deterministic=True)
    assert triton_forms(llm) == ("triton-invariant", {"TritonInvariantLinear"})
    alone = run(llm, TARGET)
    assert run(llm, TARGET, mates_seed=4) == alone
    again = llm.generate([TARGET], greedy())[0]  # the prompt's blocks are cached now
    assert again.num_cached_tokens > 0
    assert (again.outputs[0].token_ids, again.outputs[0].cumulative_logprob) == alone
    chunked = LLM(tiny, dtype="bfloat16", deterministic=True, max_num_batched_tokens=7,
                  block_size=4)
    assert run(chunked, TARGET, mates_seed=5, n=2) == alone
    # 12 blocks of 8 tokens cannot hold the target and its mates at once: preemption
    small = LLM(tiny, dtype="bfloat16", deterministic=True, block_size=8, num_kv_blocks=12,
                max_num_batched_tokens=32)
    assert run(small, TARGET, mates_seed=6) == alone
    assert small.engine.scheduler.num_preemptions > 0
    spec = LLM(tiny, dtype="bfloat16", deterministic=True, speculative_config=NGRAM)
    assert run(spec, TARGET + TARGET[:12]) == run(llm, TARGET + TARGET[:12])
    assert spec.engine.stats().scheduler.spec.num_draft_tokens > 0  # k + 1 rows were verified


def rows_dependent_product(self, x: torch.Tensor) -> torch.Tensor:
    """The invariant product with its sum over K cut in two at a place set by the number of
    rows, each half rounded to the dtype, then added (what a GEMM library's split-K may do)."""
    cut = x.shape[1] // (2 if x.shape[0] % 2 else 3)
    first = triton_gemm.invariant_linear(x[:, :cut].contiguous(), self.weight[:, :cut].contiguous())
    rest = triton_gemm.invariant_linear(
        x[:, cut:].contiguous(), self.weight[:, cut:].contiguous(), self.bias
    )
    return first + rest


@pytest.mark.usefixtures("one_thread", "on_triton")
def test_a_rows_dependent_product_is_caught(tiny, monkeypatch):
    monkeypatch.setattr(batch_invariant.TritonInvariantLinear, "forward", rows_dependent_product)
    llm = LLM(tiny, dtype="bfloat16", deterministic=True)
    alone = run(llm, TARGET)
    among = [run(llm, TARGET, mates_seed=s) for s in (4, 5)]
    assert any(a != alone for a in among), "the batch-invariance check missed the mutant"

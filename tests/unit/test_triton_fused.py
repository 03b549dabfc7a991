"""The Triton fused decoder ops (kernels/triton_fused.py) against the model's reference ops
(llama.py with the fused paths off), under TRITON_INTERPRET=1 on the CPU (compiled on a GPU).

Fresh random inputs each run (the seed is in every failure message). fp32 must agree to
rounding noise; bf16 keeps the reference's roundings, so elements may differ only where an
fp32 sum's order tips a rounding (one bf16 step, in a small fraction of elements).
"""
from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from pagoda.kernels import cpu_fused  # noqa: E402
from pagoda.kernels import triton_fused as tf  # noqa: E402
from pagoda.models import ops  # noqa: E402
from pagoda.models.llama import Attention, RMSNorm, RotaryEmbedding  # noqa: E402
from pagoda.models.presets import preset_arch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """The reference (unfused) ops in llama.py, whatever this machine has (modules built
    on their own run them: only a model's bind_ops chooses others)."""
    monkeypatch.setattr(cpu_fused, "enabled", lambda x: False)


def seeded() -> tuple[int, torch.Generator]:
    seed = random.SystemRandom().randrange(1 << 31)
    return seed, torch.Generator().manual_seed(seed)


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def assert_close(got: torch.Tensor, want: torch.Tensor, seed: int) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, seed
    assert torch.isfinite(got).all(), f"seed {seed}: non-finite output"
    g, w = got.float(), want.float()
    if got.dtype == torch.float32:
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
        return
    differ = g != w
    # one bf16 step is 2^-7 relative to the value (2^-8 to 2^-7 of its magnitude)
    assert ((g - w).abs() <= w.abs() * 2 ** -7 + 1e-6).all(), f"seed {seed}: beyond one step"
    assert differ.float().mean() < 0.02, f"seed {seed}: {differ.float().mean():.3%} differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 1024])
def test_rms_norm(dtype, hidden):
    seed, gen = seeded()
    norm = RMSNorm(hidden, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    norm = norm.to(DEVICE, dtype)
    x = rand(gen, 7, hidden, dtype=dtype, scale=3.0)
    assert_close(tf.rms_norm(x, norm.weight, norm.eps), norm(x), seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_in_place(dtype):
    seed, gen = seeded()
    hidden = 96
    norm = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    x = rand(gen, 5, hidden, dtype=dtype)
    residual = rand(gen, 5, hidden, dtype=dtype, scale=4.0)
    want_out, want_res = norm.add_forward(x, residual.clone())
    got_res = residual.clone()
    got_out = tf.rms_norm(x, norm.weight, norm.eps, residual=got_res)
    assert torch.equal(got_res, want_res), f"seed {seed}: the residual sum is one rounding"
    assert_close(got_out, want_out, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])
def test_qk_norm_rope_in_place_on_views_of_qkv(dtype, preset):
    """q and k are views into the fused QKV projection's output, as in the model; v (the
    rest of the buffer) must not change."""
    seed, gen = seeded()
    arch = preset_arch(preset)
    if not tf.rope_supported(arch.head_dim):
        pytest.skip(f"head dim {arch.head_dim}")
    rope = RotaryEmbedding(arch, 512)
    rope.build(DEVICE)
    attn = Attention(arch, rope)
    if attn.q_norm is not None:
        with torch.no_grad():
            attn.q_norm.weight.copy_(torch.rand(arch.head_dim, generator=gen) + 0.5)
            attn.k_norm.weight.copy_(torch.rand(arch.head_dim, generator=gen) + 0.5)
    attn = attn.to(DEVICE, dtype)
    tokens = 9
    qkv = rand(gen, tokens, attn.q_size + 2 * attn.kv_size, dtype=dtype, scale=2.0)
    positions = torch.randint(0, 512, (tokens,), generator=gen).to(DEVICE)

    def split(buf):
        q, k, v = buf.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        return (q.reshape(tokens, attn.num_heads, attn.head_dim),
                k.reshape(tokens, attn.num_kv_heads, attn.head_dim), v)

    want_q, want_k = attn._norm_rope(positions, *split(qkv.clone())[:2])
    buf = qkv.clone()
    q, k, v = split(buf)
    assert q.data_ptr() == buf.data_ptr() and not q.is_contiguous()   # really views
    norms = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
    tf.qk_norm_rope_(q, k, positions, rope.cos, rope.sin, *norms, arch.rms_norm_eps)
    assert_close(q, want_q, seed)
    assert_close(k, want_k, seed)
    assert torch.equal(v, split(qkv)[2]), f"seed {seed}: v was written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [96, 1536, 3072])
def test_silu_mul(dtype, inter):
    seed, gen = seeded()
    gate_up = rand(gen, 6, 2 * inter, dtype=dtype, scale=3.0)
    gate, up = gate_up.split(inter, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    assert_close(tf.silu_mul(gate_up), want, seed)


def test_empty_batches_and_bad_shapes():
    x = torch.empty(0, 64, device=DEVICE)
    assert tf.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)
    assert tf.silu_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)
    assert not tf.rope_supported(96) and tf.rope_supported(128)
    q = torch.zeros(2, 4, 96, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        tf.qk_norm_rope_(q, q[:, :2], torch.zeros(2, dtype=torch.int64, device=DEVICE),
                         torch.zeros(8, 96, device=DEVICE), torch.zeros(8, 96, device=DEVICE),
                         None, None, 0.0)


def test_dispatch_is_cuda_16_bit_only(monkeypatch):
    monkeypatch.undo()          # the real dispatch
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ops.select(cpu, torch.float32, 64) is ops.REFERENCE
    assert ops.select(cpu, torch.bfloat16, 64).name != "triton"
    # The CUDA side of the choice, on any machine: the dispatch reads only the device type
    # and dtype, so it takes the branch a GPU model would.
    monkeypatch.delenv(cpu_fused.FUSED_ENV, raising=False)
    assert ops.select(cuda, torch.bfloat16, 64).name == "triton"
    assert ops.select(cuda, torch.float16, 64).name == "triton"
    assert ops.select(cuda, torch.float32, 64) is ops.REFERENCE              # fp32: reference
    monkeypatch.setenv(cpu_fused.FUSED_ENV, "0")
    assert ops.select(cuda, torch.bfloat16, 64) is ops.REFERENCE             # turned off

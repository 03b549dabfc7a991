"""The weight-only int8 kernel (kernels/csrc/int8_gemm.cpp) against the fp32 product of the
dequantized weights, on every path this CPU runs (each forced in turn), groups of 16 and 32,
with and without offsets, int8 codes and 4-bit codes two a byte, 1..17 rows, an output width that is no multiple of the 16-row
block, bf16 and fp32 inputs; padding (of the packed weight, of x's rows, of out's rows)
poisoned with NaN. A mutant weight (one group's scale of one row changed) must fail the same
comparison. Fresh random inputs every run (seed shown)."""
from __future__ import annotations

import random
from typing import Optional

import gguf
import numpy as np
import pytest
import torch

from pagoda.kernels import cpu_int8, ext
from pagoda.models.quantized import QuantizedTensor, dequantize

pytestmark = pytest.mark.skipif(not ext.available(), reason="C++ extension unavailable")

N, K = 37, 96  # 3 blocks of 16, the last one partial


@pytest.fixture
def seed() -> int:
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    return s


def random_q(
    n: int, k: int, bits: int, group: int, offset: bool, unsigned: bool = False
) -> QuantizedTensor:
    """Random codes over the whole range of ``bits``: unsigned with an offset below 8 bits
    (as Q5_K stores them) or when asked, else signed (Q6_K's q - 32; Q8_0's -127..127;
    -128..127 with an offset); random positive scales (and offsets)."""
    if (offset or unsigned) and bits < 8:
        lo, hi = 0, (1 << bits) - 1
    else:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        lo += bits == 8 and not offset  # Q8_0
    codes = torch.randint(lo, hi + 1, (n, k), dtype=torch.int16)
    codes.view(-1)[:2] = torch.tensor([lo, hi])  # both ends used
    scale = torch.rand(n, k // group) * 0.02 + 1e-3
    off = torch.randn(n, k // group) * 0.05 if offset else None
    return QuantizedTensor(codes.to(torch.int8), scale, off, group, bits, "test")


def q8_0_from_weights(w: torch.Tensor) -> QuantizedTensor:
    """A weight (N, K) as llama.cpp's Q8_0 stores it: per 32, d = amax / 127 kept in fp16,
    q = round(w / d) (ggml multiplies by 1 / d)."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // 32, 32)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    codes = (blocks * inv[..., None]).round().to(torch.int8).reshape(n, k)
    return QuantizedTensor(codes, d.half().float(), None, 32, 8, "Q8_0")


def bound(x: torch.Tensor, q: QuantizedTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Per element: fp32 sums in another order (relative to the sum of |terms|) and, for bf16
    out, one rounding of the result."""
    ref = x.float() @ dequantize(q).T
    terms = x.float().abs() @ dequantize(q).abs().T
    rounding = 2.0**-8 if out_dtype == torch.bfloat16 else 0.0
    return 1e-5 * terms + rounding * ref.abs() + 1e-30


def poisoned(packed: cpu_int8.PackedInt8) -> cpu_int8.PackedInt8:
    """The same weight with NaN scales (and offsets) and extreme codes in the padding rows."""
    n, blocks = packed.out_features, packed.codes.shape[0]
    rows = torch.arange(blocks * cpu_int8.BLOCK) >= n  # (blocks * 16,)
    pad = rows.view(blocks, cpu_int8.BLOCK)
    codes = packed.codes.clone()
    if packed.nibbles:  # (blocks, K/4, 16 rows, 2 parities) of shared bytes
        codes.view(blocks, -1, cpu_int8.BLOCK, 2).permute(0, 2, 1, 3)[pad] = 0xFF
    else:
        codes.permute(0, 2, 1, 3)[pad] = -128
    scale = packed.scale.clone()
    scale.transpose(1, 2)[pad] = float("nan")
    offset = None
    if packed.offset is not None:
        offset = packed.offset.clone()
        offset.transpose(1, 2)[pad] = float("nan")
    return cpu_int8.PackedInt8(
        codes, scale, offset, n, packed.in_features, packed.group, packed.code_bias
    )


def run(
    x: torch.Tensor,
    packed: cpu_int8.PackedInt8,
    isa: str,
    out_pad: int = 5,
    code_bias: Optional[int] = None,
) -> torch.Tensor:
    """The kernel into the first N columns of a NaN-filled (T, N + out_pad) buffer; the
    padding must stay NaN (nothing past column N written). ``code_bias``: the packed one
    unless given (-1: the AVX512-BF16 path's widening to fp32 even for small codes)."""
    buf = torch.full((x.shape[0], packed.out_features + out_pad), float("nan"), dtype=x.dtype)
    out = buf[:, : packed.out_features]
    bias = packed.code_bias if code_bias is None else code_bias
    ext.require_extension().int8_linear(
        out, x, packed.codes, packed.scale, packed.offset, packed.group, cpu_int8.ISAS[isa], bias
    )
    assert buf[:, packed.out_features :].isnan().all()
    return out


def rows_of(x: torch.Tensor, pad: int = 6) -> torch.Tensor:
    """x as the first K columns of a wider NaN-padded buffer (the kernel must not read past
    K); the stride stays even, as the bf16 path needs."""
    buf = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), dtype=x.dtype)
    buf[:, : x.shape[1]] = x
    return buf[:, : x.shape[1]]


PATHS = ["portable", "avx2", "avx512", "avx512_bf16"]


def skip_unless(isa: str, dtype: torch.dtype) -> None:
    if isa not in cpu_int8.isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    if isa == "avx512_bf16" and dtype != torch.bfloat16:
        pytest.skip("the vdpbf16ps path takes bf16 inputs")


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "bits,group,offset,nibbles",
    [
        (8, 32, False, False),
        (6, 16, False, False),
        (5, 32, True, False),
        (8, 16, True, False),
        (4, 32, True, True),  # Q4_1 / Q4_K, two a byte
        (4, 16, False, True),  # unsigned 4-bit codes without an offset
    ],
)
def test_every_path_computes_the_dequantized_product(
    seed, isa, dtype, bits, group, offset, nibbles
):
    skip_unless(isa, dtype)
    q = random_q(N, K, bits, group, offset, unsigned=nibbles)
    packed = poisoned(cpu_int8.pack(q.codes, q.scale, q.offset, group, nibbles))
    assert packed.nibbles == nibbles
    assert (packed.code_bias >= 0) == (bits < 8)  # the small-code trick for up to 7 bits
    for code_bias in {packed.code_bias, -1}:
        for rows in range(1, 18):
            x = torch.randn(rows, K).to(dtype)
            got = run(rows_of(x), packed, isa, code_bias=code_bias)
            ref = x.float() @ dequantize(q).T
            assert got.dtype == dtype and got.shape == (rows, N)
            err = (got.float() - ref).abs()
            assert (err <= bound(x, q, dtype)).all(), (seed, code_bias, rows, err.max().item())


@pytest.mark.parametrize("nibbles", [False, True])
@pytest.mark.parametrize("isa", PATHS)
def test_a_mutant_scale_fails_the_comparison(seed, isa, nibbles):
    """One row's scale of one group swapped with its neighbour's: the comparison catches it."""
    dtype = torch.bfloat16
    skip_unless(isa, dtype)
    q = random_q(N, K, 4 if nibbles else 8, 32, False, unsigned=nibbles)
    scale = q.scale.clone()
    scale[20, 0], scale[20, 1] = q.scale[20, 1] * 1.5, q.scale[20, 0]
    mutant = cpu_int8.pack(q.codes, scale, None, 32, nibbles)
    x = torch.randn(3, K).to(dtype)
    err = (run(x, mutant, isa).float() - x.float() @ dequantize(q).T).abs()
    assert not (err <= bound(x, q, dtype)).all(), seed
    assert (err[:, :20] <= bound(x, q, dtype)[:, :20]).all(), seed  # ... and only row 20


def test_the_best_path_is_the_default(seed):
    q = random_q(N, K, 8, 32, True)
    packed = cpu_int8.pack(q.codes, q.scale, q.offset, 32)
    x = torch.randn(4, K).to(torch.bfloat16)
    best = cpu_int8.isas()[-1]
    assert torch.equal(cpu_int8.linear(x, packed), cpu_int8.linear(x, packed, best)), seed


def test_non_contiguous_rows_are_copied(seed):
    q = random_q(N, K, 8, 32, False)
    packed = cpu_int8.pack(q.codes, q.scale, q.offset, 32)
    x = torch.randn(K, 3).t()
    err = (cpu_int8.linear(x, packed) - x @ dequantize(q).T).abs()
    assert (err <= bound(x, q, torch.float32)).all(), seed


def test_bad_inputs_are_refused():
    q = random_q(N, K, 8, 32, False)
    packed = cpu_int8.pack(q.codes, q.scale, None, 32)
    if "avx512_bf16" in cpu_int8.isas():
        with pytest.raises(RuntimeError, match="avx512_bf16 path takes bf16"):
            cpu_int8.linear(torch.randn(1, K), packed, "avx512_bf16")
    with pytest.raises(RuntimeError, match="disagree"):
        cpu_int8.linear(torch.randn(1, K + 32), packed)
    with pytest.raises(ValueError, match="group 24"):
        cpu_int8.pack(q.codes, q.scale, None, 24)
    with pytest.raises(ValueError, match="0..15"):
        cpu_int8.pack(q.codes, q.scale, None, 32, nibbles=True)


def test_q8_0_helper_matches_gguf(seed):
    """The test helper is llama.cpp's Q8_0: its dequantized values equal those of the gguf
    package's own quantizer, bit for bit."""
    w = torch.randn(8, 64) * 0.1
    w[0, :32] = 0.0  # an all-zero block
    q = q8_0_from_weights(w)
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(dequantize(q).numpy(), want.astype(np.float32)), seed


def test_packing_keeps_every_code(seed):
    q = random_q(N, K, 8, 16, True)
    p = cpu_int8.pack(q.codes, q.scale, q.offset, 16)
    unpacked = p.codes.transpose(1, 2).reshape(-1, K)[:N]
    assert torch.equal(unpacked, q.codes)
    assert torch.equal(p.scale.transpose(1, 2).reshape(-1, K // 16)[:N], q.scale)
    offset: Optional[torch.Tensor] = p.offset
    assert offset is not None and q.offset is not None
    assert torch.equal(offset.transpose(1, 2).reshape(-1, K // 16)[:N], q.offset)
    assert p.nbytes() == p.codes.nbytes + 2 * p.scale.nbytes
    four = random_q(N, K, 4, 32, True)
    halved = cpu_int8.pack(four.codes, four.scale, four.offset, 32, nibbles=True)
    shared = halved.codes.view(-1, K // 4, 32)  # (blocks, K/4, 32): pairs 2q and 2q + 1
    pairs = torch.stack([shared & 15, shared >> 4], dim=2)  # (blocks, K/4, 2, 32)
    unpacked = pairs.view(-1, K // 2, cpu_int8.BLOCK, 2).transpose(1, 2).reshape(-1, K)[:N]
    assert torch.equal(unpacked.to(torch.int8), four.codes)
    assert halved.codes.nbytes * 2 == cpu_int8.pack(four.codes, four.scale, None, 32).codes.nbytes


def test_4bit_codes_signed_by_group_run_two_a_byte(seed):
    """Q4_0's signed codes (q - 8) stacked with unsigned ones (a fused projection of mixed
    shards): each signed group is stored shifted with an exact offset, and the product is the
    dequantized weights'."""
    from pagoda.models.cpu_int8 import Int8Weight

    signed = random_q(16, K, 4, 32, False)  # -8..7, no offset (Q4_0)
    unsigned = random_q(N - 16, K, 4, 32, True)  # 0..15 with offsets (Q4_1)
    q = QuantizedTensor(torch.cat([signed.codes, unsigned.codes]),
                        torch.cat([signed.scale, unsigned.scale]),
                        torch.cat([torch.zeros_like(signed.scale), unsigned.offset]),
                        32, 4, "Q4_0+Q4_1")
    layer = Int8Weight(q, torch.bfloat16)
    assert layer.packed.nibbles
    x = torch.randn(3, K).to(torch.bfloat16)
    err = (layer(x).float() - x.float() @ dequantize(q).T).abs()
    assert (err <= bound(x, q, torch.bfloat16)).all(), seed

"""GGUF matrices kept as the file stores them (models/gguf_codes.py, quantized.py): codes,
scales and offsets read from each block format dequantize to the ``gguf`` package's values bit
for bit; the 4-bit kernel takes a file's own codes (cpu_int4.Int4Weight.from_quantized); the
K-quant writer (bench/write_kquant.py) writes what ``gguf`` reads; --quantization auto
resolves as documented."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from pagoda.bench.write_kquant import q4_k_m_type, quantize_q4_k, quantize_q6_k
from pagoda.config import EngineArgs
from pagoda.models import cpu_int4
from pagoda.models.gguf_codes import CODE_TYPES, quantized_tensor
from pagoda.models.gguf_loader import dequantize as loader_dequantize
from pagoda.models.quantized import QuantizedTensor, concat_rows, dequantize

# Byte offsets of each block's fp16 fields (scales, mins): kept finite in random blocks.
FP16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
               Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
BITS = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q4_K: 4, Q.Q5_K: 5, Q.Q6_K: 6}
CPU = torch.device("cpu")


def random_blocks(qtype: Q, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random codes and scales in ``qtype``'s layout: random bytes, fp16 fields made finite."""
    rng = np.random.default_rng(seed)
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * type_size), dtype=np.uint8)
    view = raw.reshape(-1, type_size)
    for off in FP16_FIELDS[qtype]:
        field = rng.uniform(-2, 2, (view.shape[0], 1)).astype(np.float16)
        view[:, off:off + 2] = field.view(np.uint8)
    return raw


def stored(qtype: Q, rows: int = 6, blocks_per_row: int = 3, seed: int = 0) -> tuple[QuantizedTensor, np.ndarray]:
    raw = random_blocks(qtype, rows, blocks_per_row, seed)
    cols = gguf.GGML_QUANT_SIZES[qtype][0] * blocks_per_row
    return quantized_tensor(raw, qtype, (rows, cols)), raw


def test_every_required_type_has_codes() -> None:
    assert set(BITS) == CODE_TYPES


@pytest.mark.parametrize("qtype", sorted(BITS, key=int), ids=lambda q: q.name)
def test_codes_dequantize_to_gguf_reference_bit_for_bit(qtype: Q) -> None:
    q, raw = stored(qtype, seed=int(qtype))
    want = gguf.quants.dequantize(raw, qtype)
    got = dequantize(q)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(loader_dequantize(raw, qtype, want.shape).numpy(), want)
    assert q.bits == BITS[qtype] and q.source == qtype.name and q.codes.dtype == torch.int8
    signed = q.offset is None
    low, high = (-(1 << (q.bits - 1)), (1 << (q.bits - 1)) - 1) if signed else (0, (1 << q.bits) - 1)
    assert low <= int(q.codes.min()) and int(q.codes.max()) <= high
    assert (q.offset is None) == (qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q6_K))


def test_a_wrong_code_is_seen() -> None:
    """Mutant: one code off by one no longer matches the reference."""
    q, raw = stored(Q.Q4_K)
    codes = q.codes.clone()
    codes[2, 37] += 1 if codes[2, 37] < 15 else -1
    bad = QuantizedTensor(codes, q.scale, q.offset, q.group, q.bits, q.source)
    assert not np.array_equal(dequantize(bad).numpy(), gguf.quants.dequantize(raw, Q.Q4_K))


def test_rows_permute_codes_scales_and_offsets_alike() -> None:
    q, _ = stored(Q.Q4_1)
    index = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(dequantize(q.rows(index)), dequantize(q)[index])


@pytest.mark.parametrize("types", [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.Q4_0, Q.Q4_1), (Q.Q8_0, Q.Q6_K, Q.Q5_1)],
                         ids=lambda t: "+".join(q.name for q in t))
def test_concat_rows_stacks_the_dequantized_shards(types: tuple[Q, ...]) -> None:
    parts = [stored(t, rows=4 + i, blocks_per_row=1 if t in (Q.Q4_K, Q.Q6_K) else 8, seed=i)[0]
             for i, t in enumerate(types)]
    both = concat_rows(parts)
    assert both.group == min(p.group for p in parts) and both.bits == max(p.bits for p in parts)
    assert torch.equal(dequantize(both), torch.cat([dequantize(p) for p in parts]))


# --------------------------------------------------------------------------- the 4-bit kernel

def narrow_q4_k(rows: int, cols: int, seed: int) -> QuantizedTensor:
    """Q4_K blocks whose groups use codes 3..11 only (as a K-quant's fitted groups may): a
    re-rounding between each group's min and max would spread them over 0..15."""
    raw = random_blocks(Q.Q4_K, rows, cols // 256, seed).reshape(-1, 144)
    rng = np.random.default_rng(seed)
    codes = rng.integers(3, 12, size=(raw.shape[0], 4, 2, 32), dtype=np.uint8)
    raw[:, 16:144] = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(-1, 128)
    return quantized_tensor(raw, Q.Q4_K, (rows, cols))


def int4_reference(w: cpu_int4.Int4Weight, n: int, k: int) -> torch.Tensor:
    """The fp32 weights the kernel's form holds: (q - 8) * scale + zero from its packing."""
    codes = cpu_int4.unpack_codes(w.packed, n, k)
    scale, zero = w.scale_zeros.float().permute(2, 1, 0)
    return cpu_int4.dequantize(codes, scale, zero)


@pytest.mark.parametrize("kind", ["Q4_K", "Q4_0", "Q4_0+Q4_1"])
def test_int4_weight_runs_the_file_codes(kind: str) -> None:
    if kind == "Q4_K":
        q = narrow_q4_k(32, 512, 1)
    elif kind == "Q4_0":
        q = stored(Q.Q4_0, rows=32, blocks_per_row=8)[0]
    else:
        q = concat_rows([stored(Q.Q4_0, 16, 8, 2)[0], stored(Q.Q4_1, 16, 8, 3)[0]])
    n, k = q.shape
    want = dequantize(q)
    w = cpu_int4.Int4Weight.from_quantized(q, torch.float32)
    codes = cpu_int4.unpack_codes(w.packed, n, k).to(torch.int16)
    file_codes = q.codes.to(torch.int16)
    shift = (file_codes.view(n, -1, 32).amin(-1, keepdim=True) < 0) * 8
    assert torch.equal(codes, (file_codes.view(n, -1, 32) + shift).view(n, k))
    torch.testing.assert_close(int4_reference(w, n, k), want, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(n + k))
    x[3] = float("nan")  # a poisoned row stays in its row
    got = w(x)
    assert got[3].isnan().all() and not got[[0, 1, 2, 4]].isnan().any()
    rows = [0, 1, 2, 4]
    ref = F.linear(x[rows].double(), want.double())
    # fp32 sums in another order: errors scale with the terms, not with their (cancelling) sum
    scale = F.linear(x[rows].abs().double(), want.abs().double())
    assert ((got[rows].double() - ref).abs() <= 1e-5 * scale + 1e-6).all()


def test_rerounding_q4_k_is_not_the_file() -> None:
    """Mutant: rounding the dequantized Q4_K weights to 16 levels per group (what int4 did
    before) changes the codes and the weights."""
    q = narrow_q4_k(32, 512, 4)
    n, k = q.shape
    rerounded = cpu_int4.Int4Weight.from_dense(dequantize(q), torch.float32)
    assert not torch.equal(cpu_int4.unpack_codes(rerounded.packed, n, k).to(torch.int8), q.codes)
    assert (int4_reference(rerounded, n, k) - dequantize(q)).abs().max() > 1e-3


def test_int4_refuses_wider_codes() -> None:
    with pytest.raises(ValueError, match="Q6_K"):
        cpu_int4.Int4Weight.from_quantized(stored(Q.Q6_K, 16, 2)[0], torch.float32)
    assert not cpu_int4.runs_as_int4(stored(Q.Q5_0, 16, 2)[0])
    assert cpu_int4.runs_as_int4(stored(Q.Q4_1, 16, 2)[0])


# --------------------------------------------------------------------------- the writer

@pytest.mark.parametrize(("quantize", "qtype", "tol"), [(quantize_q4_k, Q.Q4_K, 0.25), (quantize_q6_k, Q.Q6_K, 0.06)],
                         ids=["Q4_K", "Q6_K"])
def test_k_quant_writer_is_read_by_gguf(quantize, qtype: Q, tol: float) -> None:
    x = np.random.default_rng(5).standard_normal((6, 512)).astype(np.float32)
    x[1] = 0.0  # a constant row
    x[2] = np.abs(x[2]) + 1  # a row without negatives: Q4_K's min is 0
    raw = quantize(x)
    back = gguf.quants.dequantize(raw, qtype)
    assert np.abs(back - x).max() <= tol * np.abs(x).max()
    assert np.array_equal(back[1], np.zeros(512, dtype=np.float32))
    np.testing.assert_array_equal(dequantize(quantized_tensor(raw, qtype, x.shape)).numpy(), back)


def test_q4_k_m_mix_and_fallbacks() -> None:
    assert q4_k_m_type("blk.5.attn_q.weight", (256, 512), 30, True) == Q.Q4_K
    assert q4_k_m_type("blk.0.attn_v.weight", (256, 512), 30, True) == Q.Q6_K
    assert q4_k_m_type("blk.4.ffn_down.weight", (256, 512), 30, True) == Q.Q4_K
    assert q4_k_m_type("blk.5.ffn_down.weight", (256, 512), 30, True) == Q.Q6_K  # (5 - 3) % 3 == 2
    assert q4_k_m_type("token_embd.weight", (100, 512), 30, True) == Q.Q6_K
    assert q4_k_m_type("token_embd.weight", (100, 512), 30, False) == Q.Q4_K
    assert q4_k_m_type("blk.5.attn_q.weight", (576, 576), 30, True) == Q.Q5_0  # 576 % 256
    assert q4_k_m_type("output.weight", (100, 576), 30, False) == Q.Q8_0
    assert q4_k_m_type("blk.5.attn_norm.weight", (576,), 30, False) is None


# --------------------------------------------------------------------------- --quantization

def test_auto_resolves_per_device_and_determinism() -> None:
    resolve = cpu_int4.resolve_quantization
    assert EngineArgs().quantization == "auto"
    assert resolve("auto", CPU, torch.float32) == "auto"
    assert resolve("auto", CPU, torch.bfloat16) == "auto"
    assert resolve("auto", CPU, torch.float32, deterministic=True) is None
    assert resolve("auto", torch.device("cuda"), torch.bfloat16) is None
    assert resolve("auto", CPU, torch.float16) is None
    assert resolve("none", CPU, torch.float32) is None
    assert resolve("int4", CPU, torch.float32) == "int4"
    with pytest.raises(ValueError, match="int8"):
        resolve("int8", CPU, torch.float32)
    assert EngineArgs(deterministic=True).is_deterministic()  # auto is not refused
    with pytest.raises(ValueError, match="int4"):
        EngineArgs(deterministic=True, quantization="int4").is_deterministic()

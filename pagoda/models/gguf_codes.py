"""GGUF block formats read as what they store: each block's integer codes with the scale (and
offset) of each group of consecutive weights, ggml's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 and the
K-quants Q4_K / Q5_K / Q6_K, as a :class:`~pagoda.models.quantized.QuantizedTensor`.

Invariant: ``scale * code`` rounded, then ``+ offset`` rounded, in fp32, is ggml's own
dequantization of the block bit for bit (the loader's numpy dequantizers of these types are
this very product, and tests hold both to the ``gguf`` package's).

The layouts, per block (bytes):

    Q8_0  d | 32 x int8                                   w = d * q
    Q4_0  d | 16 bytes: q[j] low nibble, q[j + 16] high     w = d * (q - 8)
    Q4_1  d m | as Q4_0                                     w = d * q + m
    Q5_0  d | 4 bytes of fifth bits | as Q4_0               w = d * (q - 16)
    Q5_1  d m | fifth bits | as Q4_0                        w = d * q + m
    Q4_K  d dmin | 12 bytes: eight 6-bit (sc, mn) | 128 bytes of nibbles, groups of 32
          w = (d * sc) * q - (dmin * mn)
    Q5_K  as Q4_K with 32 bytes of fifth bits before the nibbles
    Q6_K  128 bytes low nibbles | 64 bytes of 2-bit highs | 16 x int8 sc | d, groups of 16
          w = (d * sc) * (q - 32)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import gguf
import numpy as np
import torch

from pagoda.models.quantized import QuantizedTensor

Q = gguf.GGMLQuantizationType

# codes (blocks, block) as int8, scale and offset (blocks, groups) as fp32 (offset: None).
Codes = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]


def fp16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """fp16 field at byte ``start`` of every block, as float32 of shape (n, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles then high nibbles of each block's packed bytes (ggml Q4/Q5 order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def bit_field(packed: np.ndarray, n: int) -> np.ndarray:
    """Bit i of a little-endian bit field, for i < n; shape (blocks, n)."""
    words = packed.copy().view("<u4")
    return ((words >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs packed into 12 bytes (Q4_K / Q5_K), as float32."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([s0 & 63, (s2 & 0x0F) | ((s0 >> 6) << 4)], axis=1)
    mn = np.concatenate([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _signed(q: np.ndarray, bias: int) -> np.ndarray:
    return q.astype(np.int8) - np.int8(bias)


def _q8_0(b: np.ndarray) -> Codes:
    return b[:, 2:].view(np.int8), fp16_field(b, 0), None


def _q4_0(b: np.ndarray) -> Codes:
    return _signed(nibbles(b[:, 2:]), 8), fp16_field(b, 0), None


def _q4_1(b: np.ndarray) -> Codes:
    return nibbles(b[:, 4:]).view(np.int8), fp16_field(b, 0), fp16_field(b, 2)


def _q5_0(b: np.ndarray) -> Codes:
    q = nibbles(b[:, 6:]) | (bit_field(b[:, 2:6], 32) << 4)
    return _signed(q, 16), fp16_field(b, 0), None


def _q5_1(b: np.ndarray) -> Codes:
    q = nibbles(b[:, 8:]) | (bit_field(b[:, 4:8], 32) << 4)
    return q.view(np.int8), fp16_field(b, 0), fp16_field(b, 2)


def _k_groups(b: np.ndarray, q: np.ndarray) -> Codes:
    """Q4_K / Q5_K: codes (n, 256), scale d * sc and offset -(dmin * mn) per 32."""
    sc, mn = k_scale_min(b[:, 4:16])
    return q.reshape(-1, 256).view(np.int8), fp16_field(b, 0) * sc, -(fp16_field(b, 2) * mn)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> (n, 8, 32): group 2i the low nibbles of bytes 32i.., group 2i + 1 the
    high ones."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b: np.ndarray) -> Codes:
    return _k_groups(b, _k_nibbles(b[:, 16:144]))


def _q5_k(b: np.ndarray) -> Codes:
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _k_groups(b, _k_nibbles(b[:, 48:176]) | (high << 4))


def _q6_k(b: np.ndarray) -> Codes:
    """Two halves of 128: low nibbles (2, 64 bytes: quarters 0 and 1 low, 2 and 3 high), the
    2-bit highs (2, 32 bytes: quarter s at bits 2s); scales per 16."""
    ql = b[:, 0:128].reshape(-1, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    q = _signed(low | (high << 4), 32).reshape(-1, 256)
    return q, fp16_field(b, 208) * b[:, 192:208].view(np.int8), None


# type -> (reader, weights per scale, bits of a code)
_READERS: dict[Q, tuple[Callable[[np.ndarray], Codes], int, int]] = {
    Q.Q8_0: (_q8_0, 32, 8),
    Q.Q4_0: (_q4_0, 32, 4),
    Q.Q4_1: (_q4_1, 32, 4),
    Q.Q5_0: (_q5_0, 32, 5),
    Q.Q5_1: (_q5_1, 32, 5),
    Q.Q4_K: (_q4_k, 32, 4),
    Q.Q5_K: (_q5_k, 32, 5),
    Q.Q6_K: (_q6_k, 16, 6),
}
CODE_TYPES: frozenset[Q] = frozenset(_READERS)


def block_codes(blocks: np.ndarray, qtype: Q) -> Codes:
    """The codes, scales and offsets of ``blocks`` (n, type_size) uint8 of ``qtype``."""
    return _READERS[qtype][0](blocks)


def dequantize_blocks(blocks: np.ndarray, qtype: Q) -> np.ndarray:
    """``scale * code + offset`` of every block: (n, block) float32."""
    codes, scale, offset = block_codes(blocks, qtype)
    n, block = codes.shape
    group = _READERS[qtype][1]
    w = scale[:, :, None] * codes.reshape(n, block // group, group)
    if offset is not None:
        w = w + offset[:, :, None]
    return w.reshape(n, block)


def quantized_tensor(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> QuantizedTensor:
    """A 2-D tensor's raw ggml data of ``qtype`` (rows of whole blocks) as a QuantizedTensor
    of the logical (rows, columns) ``shape``."""
    qtype = Q(qtype)
    if qtype not in _READERS:
        raise ValueError(f"no codes for ggml type {qtype.name}")
    if len(shape) != 2:
        raise ValueError(f"quantized tensors are matrices, not of shape {tuple(shape)}")
    reader, group, bits = _READERS[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if cols % block or data.size != math.prod(shape) // block * type_size:
        raise ValueError(f"{qtype.name} data of {data.size} bytes does not hold shape {shape}")
    codes, scale, offset = reader(data.reshape(-1, type_size))
    groups = cols // group

    def fp32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(rows, groups))

    return QuantizedTensor(
        torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, cols)),
        fp32(scale),
        None if offset is None else fp32(offset),
        group,
        bits,
        qtype.name,
    )

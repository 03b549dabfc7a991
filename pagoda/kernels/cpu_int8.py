"""The weight-only int8 linear on the CPU (``kernels/csrc/int8_gemm.cpp``): ``x @ W.T`` for
``W = scale * code + offset`` with int8 codes and an fp32 scale (and offset) per group of 16
or 32 inputs, as quantized files store them (GGUF's Q8_0 and K-quants), activations left as
they are.

Codes of 4 bits (0..15) may be packed two a byte (``nibbles``): half the bytes a product
reads, unpacked in registers by the same kernel.

Invariant: :func:`pack` lays the codes out in blocks of ``BLOCK`` output rows, inputs in pairs
(``(blocks, K / 2, BLOCK, 2)`` int8, or for 4-bit codes ``(blocks, K / 2, BLOCK)`` uint8:
pairs 2q and 2q + 1 share 32 bytes, the first in the low nibbles), the rows past N zero;
:func:`linear` computes the dequantized weights' product in fp32 sums, rounded once to the
input's dtype, whichever path runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagoda.kernels import ext

BLOCK = 16  # output rows per packed block
GROUPS = (16, 32)  # inputs per scale the kernel takes
# The kernel's paths by name -> the number it takes (0: the best this CPU runs).
ISAS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3, "avx512_bf16": 4}


@dataclass(frozen=True)
class PackedInt8:
    """An (N, K) weight in the kernel's layout: ``codes`` (blocks, K / 2, BLOCK, 2) int8 (or
    (blocks, K / 2, BLOCK) uint8, 4-bit codes two a byte), ``scale`` and ``offset``
    (blocks, K / group, BLOCK) fp32 (``offset`` None: zero)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: Optional[torch.Tensor]
    out_features: int
    in_features: int
    group: int
    # >= 0: every code plus this lies in 0..127, which lets the AVX512-BF16 path make bf16
    # of the codes in two integer ops (int8_gemm.cpp, tile_bf16_small); -1: not so.
    code_bias: int = -1

    @property
    def nibbles(self) -> bool:
        """Whether the codes are 4-bit, two a byte."""
        return self.codes.dim() == 3

    def nbytes(self) -> int:
        """Bytes one product reads."""
        extra = 0 if self.offset is None else self.offset.nbytes
        return self.codes.nbytes + self.scale.nbytes + extra


def available() -> bool:
    """True when the C++ extension (and so this kernel) is built."""
    return ext.available()


def isas() -> list[str]:
    """The paths this CPU runs, best last (``portable`` always)."""
    numbers = ext.require_extension().int8_isas()
    return [name for name, n in ISAS.items() if n in numbers]


def pack(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: Optional[torch.Tensor],
    group: int,
    nibbles: bool = False,
) -> PackedInt8:
    """codes (N, K) int8, scale and offset (N, K // group) -> the kernel's layout; ``nibbles``:
    two codes a byte (every code must be in 0..15)."""
    n, k = codes.shape
    if nibbles and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("int8: codes two a byte must lie in 0..15")
    if group not in GROUPS or k % group:
        raise ValueError(f"int8: group {group} must be one of {GROUPS} and divide K={k}")
    blocks = -(-n // BLOCK)
    pad = blocks * BLOCK - n

    def grouped(t: torch.Tensor) -> torch.Tensor:  # (N, G) -> (blocks, G, BLOCK)
        t = torch.nn.functional.pad(t.to(torch.float32), (0, 0, 0, pad))
        return t.view(blocks, BLOCK, k // group).transpose(1, 2).contiguous()

    padded = torch.nn.functional.pad(codes.to(torch.int8), (0, 0, 0, pad))  # (blocks*B, K)
    packed = padded.view(blocks, BLOCK, k // 2, 2).transpose(1, 2).contiguous()
    if nibbles:  # input pairs 2q (low nibble) and 2q + 1 (high) share 32 bytes
        if k % 4:
            raise ValueError(f"int8: codes two a byte need K={k} a multiple of 4")
        pairs = packed.to(torch.uint8).view(blocks, k // 4, 2, 2 * BLOCK)
        shared = pairs[:, :, 0] | (pairs[:, :, 1] << 4)  # (blocks, K/4, 32)
        packed = shared.reshape(blocks, k // 2, BLOCK).contiguous()
    return PackedInt8(
        packed,
        grouped(scale),
        None if offset is None else grouped(offset),
        n,
        k,
        group,
        small_code_bias(codes),
    )


def small_code_bias(codes: torch.Tensor) -> int:
    """The smallest b >= 0 with every code + b in 0..127, or -1 where there is none."""
    if not codes.numel():
        return 0
    bias = max(0, -int(codes.min()))
    return bias if int(codes.max()) + bias <= 127 else -1


def linear(x: torch.Tensor, w: PackedInt8, isa: str = "auto") -> torch.Tensor:
    """x (T, K) fp32 or bf16 -> (T, N) of x's dtype; ``isa`` forces a path (tests)."""
    x = x if x.stride(-1) == 1 and x.stride(0) % 2 == 0 else x.contiguous()
    out = torch.empty(x.shape[0], w.out_features, dtype=x.dtype)
    ext.require_extension().int8_linear(
        out, x, w.codes, w.scale, w.offset, w.group, ISAS[isa], w.code_bias
    )
    return out

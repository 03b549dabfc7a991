"""A bf16 linear layer on pagoda's own GEMM kernel (``kernels/csrc/invariant_gemm.cpp``).

The kernel keeps one fp32 accumulator per output element and sums over K in one fixed order,
whatever the number of rows, so a row's result never depends on its batch: what
``--deterministic`` needs (``batch_invariant.py``). Where the CPU has AVX512-BF16 it is also
faster than oneDNN's bf16 GEMM on some CPUs (a row of one costs one row, and no library
blocking), so ``cpu_linear.pack_model`` times it beside oneDNN's forms at load and takes it
where it is faster at every row count timed (docs/models.md).

Invariant: ``InvariantLinear(w, b)(x)[i]`` depends only on ``x[i]``, ``w`` and ``b``, and
equals ``x[i] @ w.T + b`` up to fp32 summation order (tests/model/test_deterministic.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagoda.kernels import ext

KERNEL_COLUMNS = 32  # output columns per block of the packed weight


class InvariantLinear(nn.Module):
    """A bf16 linear on the C++ kernel, its weight packed for it once. ``portable``: the
    kernel's portable loop even where AVX512-BF16 is compiled in (for tests)."""

    def __init__(
        self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, portable: bool = False
    ) -> None:
        super().__init__()
        self.packed = pack_weight(weight.detach())  # (N/32, K/2, 32) int32
        self.out_features, self.in_features = weight.shape
        padded = torch.zeros(self.packed.shape[0] * self.packed.shape[2], dtype=torch.float32)
        if bias is not None:
            padded[: self.out_features] = bias.detach().float()
        self.bias32 = padded  # (N rounded up to 32,) fp32
        self.portable = portable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) bf16 -> (T, N) bf16."""
        if x.stride(-1) != 1 or x.stride(0) % 2:
            x = x.contiguous()
        out = x.new_empty(x.shape[0], self.out_features)
        ext.require_extension().invariant_linear(
            out, x, self.packed, self.bias32, portable=self.portable
        )
        return out


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16, K even -> (ceil(N / 32), K / 2, 32) int32: blocks of 32 output columns, k
    in pairs, word [b, p, j] = (w[32 b + j, 2 p], w[32 b + j, 2 p + 1]) (what vdpbf16ps reads);
    zero columns past N."""
    n, k = weight.shape
    pairs = weight.contiguous().view(torch.int32)  # (N, K/2)
    pairs = nn.functional.pad(pairs, (0, 0, 0, -n % KERNEL_COLUMNS))  # (N rounded up, K/2)
    return pairs.view(-1, KERNEL_COLUMNS, k // 2).transpose(1, 2).contiguous()


def kernel_takes(dtype: torch.dtype, in_features: int) -> bool:
    """Whether :class:`InvariantLinear` takes a layer: bf16, an even K, the extension built."""
    return dtype == torch.bfloat16 and in_features % 2 == 0 and ext.available()


def kernel_native() -> bool:
    """Whether the kernel runs on AVX512-BF16 here (else its portable loop, which is slow:
    never a candidate for speed)."""
    mod = ext.extension()
    return mod is not None and bool(mod.invariant_gemm_native())

"""Batch-invariant linear layers (``--deterministic``): a row's result does not depend
on how many rows the step has (the batch-invariance of Thinking Machines' "Defeating
Nondeterminism in LLM Inference", 2025, and vLLM's ``VLLM_BATCH_INVARIANT``, here on the CPU).

A GEMM library picks its blocking, its kernel for the row tail and its split of the reduction
by the shape of the call, so the same row can round differently at M = 1 and at M = 3 (measured
on a Zen 4, docs/deterministic.md: oneDNN's bf16 product with K = 1536 at M = 3, 10, 15; MKL's
fp32 one at every M > 1). Two remedies, chosen per layer when the model is prepared:

- bf16 (where the C++ extension is built): ``cpu_bf16.InvariantLinear``, pagoda's own kernel
  (``kernels/csrc/invariant_gemm.cpp``), whose sum over K is one fp32 accumulator per output
  element, in a fixed order, at every M: invariant by construction, and a row of one costs one.
- on CUDA (any dtype): :class:`TritonInvariantLinear`, one Triton kernel of fixed tiles whose
  sum over K runs in order into one fp32 accumulator per element (``kernels/triton_gemm.py``).
- otherwise (fp32): :class:`RowTiledLinear`. Every call is cut into tiles of exactly
  ``ROW_TILE`` rows (the last one padded with zero rows), each one GEMM call of one shape, so
  every row goes through the same kernel with the same reduction order::

    x (T, K):  [ t0 .. t7 | t8 .. t15 | t16 t17 0 0 0 0 0 0 ]   T = 18, ROW_TILE = 8
                 tile 0      tile 1      tile 2 (padded)
               each tile: (8, K) @ (K, N), one call of one shape

Invariant: row ``i`` of either layer's output depends only on ``x[i]`` and the weights (for
``RowTiledLinear``, also the row's place in its tile, ``i % ROW_TILE``, which the tests check
does not matter on the CPU they run on: tests/model/test_deterministic.py), never on T.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagoda.models.base import ExpertLayer, Modules
from pagoda.models.cpu_bf16 import InvariantLinear, kernel_takes
from pagoda.models.cpu_linear import PackedLinear

ROW_TILE = 8  # rows per GEMM call: a decode step of one row pays 8 (docs/deterministic.md)


class RowTiledLinear(nn.Module):
    """``inner`` (an ``nn.Linear`` or a ``PackedLinear``) called on fixed tiles of rows."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N)."""
        rows = x.shape[0]
        pad = -rows % ROW_TILE
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])  # (T + pad, K)
        tiles = [self.inner(tile) for tile in x.split(ROW_TILE)]  # each (ROW_TILE, N)
        out = tiles[0] if len(tiles) == 1 else torch.cat(tiles)
        return out[:rows]


class TritonInvariantLinear(nn.Module):
    """A linear on the batch-invariant Triton product (``kernels/triton_gemm.py``), for CUDA
    (and CPU tensors under ``TRITON_INTERPRET=1``, in the tests)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.weight = weight.detach().contiguous()  # (N, K)
        self.bias = bias.detach() if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N)."""
        from pagoda.kernels.triton_gemm import invariant_linear

        return invariant_linear(x, self.weight, self.bias)


class PlainHead(nn.Module):
    """The output projection (V, E) as a module, where it is not packed."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.head_weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, E) -> (T, V)."""
        return nn.functional.linear(x, self.head_weight)


def invariant_linears(
    model: Modules, head: nn.Module, head_weight: torch.Tensor, triton: bool = False
) -> nn.Module:
    """Replace each linear layer of ``model`` (plain or packed; not ``lm_head``, which
    ``output_weight`` reads: the returned head stands for it) by its batch-invariant form:
    with ``triton`` (CUDA), :class:`TritonInvariantLinear` (layers must be plain); else
    :class:`InvariantLinear` where :func:`kernel_takes` it (from the plain weight), else
    :class:`RowTiledLinear` around it. ``head`` is the output projection as it is (packed or
    :class:`PlainHead`), ``head_weight`` its (V, E) weight. Raises ValueError for a mixture of
    experts (a step's rows per expert vary with the batch; the experts are not covered)."""
    if any(isinstance(m, ExpertLayer) for m in model.modules()):
        raise ValueError("--deterministic does not take mixture-of-experts models yet")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, PackedLinear) and name != "lm_head":
                setattr(parent, name, _invariant(child, triton))
    if triton:
        return TritonInvariantLinear(head_weight)
    if kernel_takes(head_weight.dtype, head_weight.shape[1]):
        return InvariantLinear(head_weight)
    return RowTiledLinear(head)


def _invariant(layer: nn.Module, triton: bool) -> nn.Module:
    weight = getattr(layer, "weight", None)
    bias = getattr(layer, "bias", None)
    if triton and isinstance(layer, nn.Linear):
        return TritonInvariantLinear(layer.weight, bias)
    if isinstance(weight, torch.Tensor) and kernel_takes(weight.dtype, weight.shape[1]):
        return InvariantLinear(weight, bias)
    return RowTiledLinear(layer)

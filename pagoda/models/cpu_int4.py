"""4-bit weights for small decode batches on the CPU (``--quantization int4``).

A decode step of a few rows is bound by reading the weights: batch-1 decode reads every
linear weight to make one token. Groups of 32 weights stored as 4-bit codes with a scale and
a zero per group (the layout of llama.cpp's Q4_1, ``w = (q - 8) * scale + zero`` in PyTorch's
int4 convention) read a quarter of bf16's bytes. PyTorch's CPU kernel for them
(``_weight_int4pack_mm_for_cpu``) widens the codes in registers and is 3-4x faster than the
packed bf16 GEMM at one row, but it does not block over rows: from about 8 rows on it is the
slower one. So each linear layer keeps both forms and a step takes the 4-bit one only when it
has at most ``max_rows`` rows, a number timed at load on this machine (as cpu_linear times
weight packing). Prefill chunks and large decode batches run the dense weights unchanged.

The codes are made from the loaded weights by rounding each group to 16 levels between its
minimum and maximum. For a GGUF Q4_0/Q4_1 tensor (the bundled model) that recovers the file's
own codes and scales, so the 4-bit form computes what the file stores; for a bf16 or fp32
checkpoint it is a real 4-bit rounding with a cost in accuracy (docs/benchmarks.md measures it).

Invariant: an ``Int4Linear`` of at most ``max_rows`` rows computes ``x @ dequantize(W).T``
(fp32 sums, the model's dtype out); above that, exactly what the dense layer computes.
``PAGODA_INT4_MAX_ROWS`` sets the row limit instead of timing it (0: never the 4-bit form).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.models.cpu_linear import best_seconds

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int4")
GROUP = 32  # weights per scale/zero pair (llama.cpp's Q4_0/Q4_1 block)
LEVELS = 15  # codes 0..15
MAX_ROWS_ENV = "PAGODA_INT4_MAX_ROWS"
TIMING_ROWS = (1, 2, 4, 6, 8, 12, 16)  # candidate row limits, timed in this order
TIMING_BYTES = 64 << 20  # dense weights of one shape timed in turn: cold in cache
MIN_SPEEDUP = 1.1  # the 4-bit form must beat the dense one by this at a row count


def resolve_quantization(
    name: Optional[str], device: torch.device, dtype: torch.dtype
) -> Optional[str]:
    """--quantization: None/"none" for the checkpoint's weights as loaded, or "int4"."""
    if name in (None, "none"):
        return None
    if name not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization {name!r}; choose from {list(QUANTIZATIONS)}")
    if device.type != "cpu":
        raise ValueError(f"quantization {name!r} is CPU-only for now (device {device})")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"quantization {name!r} needs bfloat16 or float32 weights, not {dtype}")
    return name


def bytes_per_weight(dtype: torch.dtype, group: int = GROUP) -> float:
    """Bytes the 4-bit form reads per weight: half a byte of code, a scale and a zero per
    group in the input's dtype."""
    return 0.5 + 2 * dtype.itemsize / group


def quantize(
    weight: torch.Tensor, group: int = GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weights -> codes (N, K) int32 in [0, 15], scale and zero (N, K // group) fp32,
    with ``w ~ (q - 8) * scale + zero``: each group's minimum maps to code 0, its maximum to 15."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group}")
    w = weight.detach().float().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = (hi - lo) / LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: all codes 0
    codes = torch.round((w - lo[..., None]) / safe[..., None]).clamp_(0, LEVELS)
    zero = lo + 8 * scale
    return codes.to(torch.int32).reshape(n, k), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The fp32 weights that codes, scale and zero of :func:`quantize` stand for."""
    n, k = codes.shape
    groups = scale.shape[1]
    q = codes.float().reshape(n, groups, k // groups)
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


class Int4Weight(nn.Module):
    """A weight in the layout of ``_weight_int4pack_mm_for_cpu``, for inputs of ``dtype``."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        codes, scale, zero = quantize(weight)
        self.group = weight.shape[1] // scale.shape[1]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # (K // group, N, 2): the kernel's scale-and-zero layout, in the input's dtype.
        self.scale_zeros = torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N); the kernel takes only contiguous rows."""
        return torch._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.packed, self.group, self.scale_zeros
        )


class Int4Linear(nn.Module):
    """A linear layer with a dense and a 4-bit form of its weight; the 4-bit one serves inputs
    of at most ``max_rows`` rows (0 until :func:`choose_max_rows` sets it)."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.int4 = Int4Weight(dense.weight, dense.weight.dtype)
        self.dense = dense  # cpu_linear.pack_model may replace it by a packed layer
        self.bias = None if dense.bias is None else dense.bias.detach()
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.max_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N)."""
        if x.shape[0] > self.max_rows:
            return self.dense(x)
        y = self.int4(x)
        return y if self.bias is None else y + self.bias


def attach_int4(model: nn.Module) -> list[Int4Linear]:
    """Wrap every ``nn.Linear`` of the model in an ``Int4Linear`` (before weight packing, which
    then packs each one's dense form), but the output projection and layers whose input width
    is not a multiple of ``GROUP`` (they stay dense)."""
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head" and child.in_features % GROUP == 0:
                layer = Int4Linear(child)
                setattr(parent, name, layer)
                wrapped.append(layer)
    return wrapped


def detach_int4(model: nn.Module) -> None:
    """Put every ``Int4Linear``'s dense form back in its place (their 4-bit weights freed)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int4Linear):
                setattr(parent, name, child.dense)


def time_max_rows(layers: list[Int4Linear], dtype: torch.dtype) -> int:
    """The largest of ``TIMING_ROWS`` up to which the 4-bit form of ``layers`` (one shape) is
    ``MIN_SPEEDUP`` times faster than their dense form at every row count timed (0: not even
    at one row)."""
    best = 0
    for rows in TIMING_ROWS:
        x = torch.randn(rows, layers[0].in_features, dtype=dtype)
        dense_s = best_seconds([functools.partial(m.dense, x) for m in layers])
        int4_s = best_seconds([functools.partial(m.int4, x) for m in layers])
        logger.debug("int4 at %d rows: %.2fx dense", rows, dense_s / int4_s)
        if dense_s < MIN_SPEEDUP * int4_s:
            break
        best = rows
    return best


def choose_max_rows(layers: list[Int4Linear], dtype: torch.dtype) -> int:
    """Set every layer's row limit: ``PAGODA_INT4_MAX_ROWS``, or timed on the largest layers'
    final dense form (packed or not) against their 4-bit one. Returns the limit."""
    if not layers:
        return 0
    forced = os.environ.get(MAX_ROWS_ENV)
    if forced is not None:
        max_rows = int(forced)
    else:
        shape = max(((m.out_features, m.in_features) for m in layers), key=lambda s: s[0] * s[1])
        same = [m for m in layers if (m.out_features, m.in_features) == shape]
        count = max(1, min(len(same), TIMING_BYTES // (shape[0] * shape[1] * dtype.itemsize)))
        max_rows = time_max_rows(same[:count], dtype)
    for m in layers:
        m.max_rows = max_rows
    logger.info(
        "int4 weights for steps of at most %d rows (%s)",
        max_rows,
        MAX_ROWS_ENV if forced is not None else "timed on this CPU",
    )
    return max_rows


def reference_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the 4-bit form of ``weight`` computes, in fp32 (for tests)."""
    return F.linear(x.float(), dequantize(*quantize(weight)))

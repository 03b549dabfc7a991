"""int8 weights for small decode steps on the CPU: a quantized file's own codes, run as stored.

A step of a few rows is bound by reading the weights. A tensor a GGUF file stores as Q8_0 (8-bit
codes, a scale per 32) or as a K-quant of 5 or 6 bits (a scale, and for Q5_K an offset, per
group of 16 or 32) is kept here as those int8 codes and fp32 scales (``QuantizedTensor``, the
loader's contract), about 1.1 bytes a weight against bf16's 2, and multiplied by a kernel that
widens the codes in registers (``kernels/cpu_int8.py``) with the activations as they are, so it
computes the file's dequantized weights' product. As with ``--quantization int4``
(``cpu_int4.py``), each linear keeps a dense form beside it for steps of more rows than the
int8 form is faster at (``max_rows``, timed at load on this CPU), and the output projection
(:class:`Int8Head`; the bundled model's tied embedding is Q8_0) switches the same way, for the
sampler's greedy path and for the logits alike. The embedding lookup stays dense.

Invariant: an ``Int8Linear`` (``Int8Head``) of a step of at most ``max_rows`` rows computes
``x @ dequantize(q).T`` (fp32 sums, the input's dtype out); above that, exactly what its dense
form computes. The rows are counted by the shared ``Int4Route`` (the step's rows without its
drafts, where the runner sets it), so speculation runs a verified row on the weights its
decode row would have run on. ``PAGODA_INT4_MAX_ROWS`` sets the limit of both quantized
forms instead of timing it (0: never the int8 form).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import envs
from pagoda.kernels import cpu_int8
from pagoda.models.base import CausalLM, Modules
from pagoda.models.cpu_int4 import (
    TIMING_BYTES,
    Int4Route,
    Int4Weight,
    RoutedLinear,
    choose_routed_max_rows,
    log_limit,
    time_max_rows,
)
from pagoda.models.cpu_linear import best_seconds
from pagoda.models.quantized import QuantizedTensor, dequantize

logger = logging.getLogger(__name__)

FOUR_BIT_ROWS = (1, 4)  # the row counts the two 4-bit kernels are timed at


def supported(q: QuantizedTensor) -> bool:
    """Whether the kernel takes ``q``: codes of at most 8 bits in groups of 16 or 32 (4-bit
    ones, as the 4-bit kernel's, two a byte)."""
    return q.bits <= 8 and q.group in cpu_int8.GROUPS and q.shape[1] % q.group == 0


class Int8Weight(nn.Module):
    """A quantized weight in the int8 kernel's layout, for inputs of ``dtype``."""

    def __init__(self, q: QuantizedTensor, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"int8: inputs must be bfloat16 or float32, not {dtype}")
        if not supported(q):
            raise ValueError(f"int8: no kernel for {q.source} (bits {q.bits}, group {q.group})")
        self.dtype = dtype
        self.packed = _pack(q)
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N)."""
        return cpu_int8.linear(x, self.packed)

    def bytes_per_weight(self) -> float:
        """Bytes a product reads per weight: the code, its share of the scales (and offsets)."""
        return self.packed.nbytes() / (self.out_features * self.in_features)


def _pack(q: QuantizedTensor) -> cpu_int8.PackedInt8:
    """``q`` in the kernel's layout; 4-bit codes two a byte, a group of Q4_0's signed ones
    (q - 8) as ``q`` with an offset of ``-8 * scale`` (exact: a power of two times the scale),
    group by group as ``Int4Weight.from_quantized`` shifts them (stacked shards may mix)."""
    if q.bits > 4:
        return cpu_int8.pack(q.codes, q.scale, q.offset, q.group)
    n, k = q.shape
    grouped = q.codes.view(n, k // q.group, q.group)
    shift = torch.where(grouped.amin(-1) < 0, 8, 0)  # (N, groups)
    if not shift.any():
        return cpu_int8.pack(q.codes, q.scale, q.offset, q.group, nibbles=True)
    codes = (grouped.to(torch.int16) + shift[..., None]).to(torch.int8).view(n, k)  # 0..15
    offset = -shift * q.scale if q.offset is None else q.offset - shift * q.scale
    return cpu_int8.pack(codes, q.scale, offset, q.group, nibbles=True)


def four_bit_here(stored: list[QuantizedTensor], dtype: torch.dtype) -> bool:
    """Whether 4-bit codes (``cpu_int4.runs_as_int4``) run faster on this kernel, two a byte,
    than on the 4-bit kernel: timed at load on the largest shape's tensors (cold, in turn) at
    the decode steps' row counts (``PAGODA_INT8_FOR_4BIT`` decides instead where set); False
    where the extension is not built."""
    if not stored or not cpu_int8.available() or dtype not in (torch.bfloat16, torch.float32):
        return False
    forced = envs.INT8_FOR_4BIT()
    if forced is not None:
        return forced
    shape = max((q.shape for q in stored), key=lambda s: s[0] * s[1])
    same = [q for q in stored if q.shape == shape]
    timed = same[: max(1, TIMING_BYTES // (shape[0] * shape[1] // 2))]
    ours = [Int8Weight(q, dtype) for q in timed]
    theirs = [Int4Weight.from_quantized(q, dtype) for q in timed]
    ratios = []
    for rows in FOUR_BIT_ROWS:
        x = torch.randn(rows, shape[1], dtype=dtype)
        ratios.append(
            best_seconds([functools.partial(f, x) for f in theirs])
            / best_seconds([functools.partial(f, x) for f in ours])
        )
    here = sum(ratios) / len(ratios) > 1.0
    logger.info(
        "4-bit codes %s: int8 kernel (two a byte) %s x the 4-bit kernel at %s rows -> %s",
        shape,
        "/".join(f"{r:.2f}" for r in ratios),
        "/".join(str(r) for r in FOUR_BIT_ROWS),
        "int8 kernel" if here else "4-bit kernel",
    )
    return here


class Int8Linear(RoutedLinear):
    """A linear layer with a dense and an int8 form of its weight; the int8 one serves steps
    of at most ``max_rows`` rows (0 until :func:`choose_int8_max_rows` sets it), counted by
    ``route``."""

    def __init__(
        self, dense: nn.Module, q: QuantizedTensor, route: Optional[Int4Route] = None
    ) -> None:
        super().__init__()
        weight = dense.weight
        assert isinstance(weight, torch.Tensor)
        if tuple(weight.shape) != q.shape:
            raise ValueError(f"int8: codes {q.shape} for a weight {tuple(weight.shape)}")
        self.int8 = Int8Weight(q, weight.dtype)
        self.dense = dense  # cpu_linear.pack_model may replace it by a packed layer
        bias = getattr(dense, "bias", None)
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = q.shape
        self.max_rows = 0
        self.route = route if route is not None else Int4Route()

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return self.int8(x)


class Int8Head(nn.Module):
    """The output projection (V, E) with an int8 form for steps of at most ``max_rows`` rows
    (counted as ``Int8Linear`` counts them) and its dense one otherwise: ``dense`` (the packed
    projection) where there is one, else ``F.linear`` with ``weight``. It takes the model's
    ``packed_head`` place, so ``compute_logits`` and the sampler's greedy path both run it."""

    def __init__(
        self,
        q: QuantizedTensor,
        weight: torch.Tensor,
        dense: Optional[nn.Module],
        route: Optional[Int4Route] = None,
    ) -> None:
        super().__init__()
        if tuple(weight.shape) != q.shape:
            raise ValueError(f"int8 head: codes {q.shape} for a weight {tuple(weight.shape)}")
        self.int8 = Int8Weight(q, weight.dtype)
        self.weight = weight
        self.dense = dense
        self.max_rows = 0
        self.route = route if route is not None else Int4Route()

    def quantized(self, rows: int) -> bool:
        """Whether a call with ``rows`` input rows runs the int8 form."""
        counted = rows if self.route.rows is None else self.route.rows
        return counted <= self.max_rows

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) if self.dense is None else self.dense(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (S, E) -> logits (S, V) in x's dtype."""
        return self.int8(x) if self.quantized(x.shape[0]) else self.dense_forward(x)


def choose_int8_max_rows(layers: list[Int8Linear], dtype: torch.dtype) -> int:
    """:func:`cpu_int4.choose_routed_max_rows` for the int8 layers."""
    return choose_routed_max_rows(layers, dtype, "int8 weights")


def install_int8_head(
    model: CausalLM, q: QuantizedTensor, route: Optional[Int4Route] = None
) -> Optional[Int8Head]:
    """Give ``model`` the int8 form of its output projection ``q`` (after weight packing:
    the packed projection, if any, stays its dense form), with a row limit from
    ``PAGODA_INT4_MAX_ROWS`` or timed here; where the limit is 0 nothing changes. Returns
    the head, or None. Not for ``--deterministic`` (whose head must stay batch-invariant)."""
    weight = model.output_weight
    if weight.device.type != "cpu" or not supported(q):
        return None
    head = Int8Head(q, weight, model.packed_head, route)
    forced = envs.INT4_MAX_ROWS()
    if forced is not None:
        head.max_rows = forced
    else:
        dense, int8 = [head.dense_forward], [head.int8]
        head.max_rows = time_max_rows(dense, int8, q.shape[1], weight.dtype)
    log_limit(f"int8 output projection {q.shape}", head.max_rows, forced is not None)
    if not head.max_rows:
        return None
    model.packed_head = head
    return head


def attach_int8(
    model: Modules, tensors: dict[str, QuantizedTensor], route: Optional[Int4Route] = None
) -> list[Int8Linear]:
    """Wrap each ``nn.Linear`` whose qualified name (``layers.0.mlp.down_proj``) has a
    supported tensor in ``tensors`` in an ``Int8Linear`` routed by ``route`` (before weight
    packing, which then packs each one's dense form)."""
    wrapped = []
    named = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
    for name, module in named.items():
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            q = tensors.get(full)
            if type(child) is nn.Linear and q is not None and supported(q):
                layer = Int8Linear(child, q, route)
                setattr(module, child_name, layer)
                wrapped.append(layer)
    return wrapped


def reference_linear(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """What the int8 form of ``q`` computes, in fp32 (for tests)."""
    return F.linear(x.float(), dequantize(q))

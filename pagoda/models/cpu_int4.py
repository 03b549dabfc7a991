"""4-bit weights for small decode batches on the CPU (``--quantization int4``).

A decode step of a few rows is bound by reading the weights: batch-1 decode reads every
linear weight to make one token. Groups of 32 weights stored as 4-bit codes with a scale and
a zero per group (the layout of llama.cpp's Q4_1, ``w = (q - 8) * scale + zero`` in PyTorch's
int4 convention) read a quarter of bf16's bytes. PyTorch's CPU kernel for them
(``_weight_int4pack_mm_for_cpu``) widens the codes in registers and is several times faster
than the packed bf16 GEMM at one row, but it does not block over rows: from a handful of rows
on it is the slower one (docs/models.md has the measurements). So each linear layer keeps
both forms and a step takes the 4-bit one only when it has at most ``max_rows`` rows, a
number timed when the model is prepared on this machine (as cpu_linear times weight
packing). Prefill chunks and large decode batches run the dense weights unchanged.

A GGUF matrix stored with 4-bit codes in groups of 32 (Q4_0, Q4_1, Q4_K: the bundled model's)
brings its own codes, scales and offsets (``Int4Weight.from_quantized``), so the 4-bit form
computes what the file stores. Other weights are rounded here, each group to 16 levels
between its minimum and maximum: for a bf16 or fp32 checkpoint a real 4-bit rounding with a
cost in accuracy (docs/benchmarks.md measures it); for a Q4_0/Q4_1 matrix it would recover the
file's codes, for a Q4_K one (whose groups need not span all 16 levels) it would not.

Invariant: an ``Int4Linear`` of at most ``max_rows`` rows computes ``x @ dequantize(W).T``
(fp32 sums, the model's dtype out); above that, exactly what the dense layer computes.
``PAGODA_INT4_MAX_ROWS`` sets the row limit instead of timing it (0: never the 4-bit form).

Speculative decoding counts a step's rows without its drafts (``Int4Route``): a request's
k + 1 verified rows run the weights its one decode row would have run, so speculation
leaves greedy output as it was (the two forms are different models; a step that switched
between them with its draft count would change the answer).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import envs
from pagoda.models.base import ExpertLayer, Modules
from pagoda.models.cpu_linear import best_seconds
from pagoda.models.quantized import QuantizedTensor

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "int4")
GROUP = 32  # weights per scale/zero pair (llama.cpp's Q4_0/Q4_1 block)
LEVELS = 15  # codes 0..15
MAX_ROWS_ENV = envs.INT4_MAX_ROWS.name
TIMING_ROWS = (1, 2, 4, 6, 8, 12, 16)  # candidate row limits, timed in this order
TIMING_BYTES = 64 << 20  # dense weights of one shape timed in turn: cold in cache
MIN_SPEEDUP = 1.1  # the 4-bit form must beat the dense one by this at a row count


def resolve_quantization(
    name: Optional[str],
    device: torch.device,
    dtype: torch.dtype,
    deterministic: bool = False,
) -> Optional[str]:
    """--quantization: None/"none" for the checkpoint's weights as loaded (dequantized), "auto"
    for a GGUF's quantized matrices run as the file stores them (on the CPU with bf16 or fp32
    weights, not under ``deterministic``: else it is "none"; a checkpoint without quantized
    matrices has nothing to keep), or "int4"."""
    if name in (None, "none"):
        return None
    if name not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization {name!r}; choose from {list(QUANTIZATIONS)}")
    if name == "auto":
        runs = device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
        return "auto" if runs and not deterministic else None
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
    with ``w ~ (q - 8) * scale + zero``: each group's minimum maps to code 0, its maximum to 15.
    (In place on an fp32 copy: loading a MoE model quantizes every expert matrix.)"""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group}")
    w = weight.detach().to(torch.float32, copy=True).reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = (hi - lo) / LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: all codes 0
    codes = w.sub_(lo[..., None]).div_(safe[..., None]).round_().clamp_(0, LEVELS)
    zero = lo + 8 * scale
    return codes.to(torch.int32).reshape(n, k), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The fp32 weights that codes, scale and zero of :func:`quantize` stand for."""
    n, k = codes.shape
    groups = scale.shape[1]
    q = codes.float().reshape(n, groups, k // groups)
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


class Int4Weight(nn.Module):
    """A weight in the layout of ``_weight_int4pack_mm_for_cpu``, for inputs of ``dtype``:
    codes (N, K) in [0, 15] with ``w = (q - 8) * scale + zero`` per group of ``GROUP``."""

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.group = codes.shape[1] // scale.shape[1]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # (K // group, N, 2): the kernel's scale-and-zero layout, in the input's dtype.
        self.scale_zeros = torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
        """``weight`` rounded to 16 levels between each group's minimum and maximum."""
        return cls(*quantize(weight), dtype)

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, dtype: torch.dtype) -> Int4Weight:
        """A file's own 4-bit codes in groups of ``GROUP`` (Q4_0, Q4_1, Q4_K), not rounded
        again: ``scale * c + offset = (q - 8) * scale + zero`` with ``q = c + shift`` and
        ``zero = offset + (8 - shift) * scale``, ``shift`` 8 for a group of signed codes
        (Q4_0's ``c = q - 8``), else 0."""
        if q.bits != 4 or q.group != GROUP:
            raise ValueError(f"int4: {q.source} codes of {q.bits} bits in groups of {q.group}")
        n, k = q.shape
        codes = q.codes.view(n, k // GROUP, GROUP).to(torch.int32)
        shift = torch.where(codes.amin(-1) < 0, 8, 0)  # (N, groups)
        codes = codes + shift[..., None]
        if codes.min() < 0 or codes.max() > LEVELS:
            raise ValueError(f"int4: {q.source} codes outside a 4-bit range")
        offset = torch.zeros_like(q.scale) if q.offset is None else q.offset
        zero = offset + (8 - shift) * q.scale
        return cls(codes.view(n, k), q.scale, zero, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N); the kernel takes only contiguous rows."""
        return torch._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.packed, self.group, self.scale_zeros
        )


def runs_as_int4(q: QuantizedTensor) -> bool:
    """Whether a file's codes fit the 4-bit kernel as they are (4 bits, groups of GROUP)."""
    return q.bits == 4 and q.group == GROUP


class Int4Route:
    """The row count that picks the weights of a step, shared by a model's ``Int4Linear``
    layers: ``None`` (each layer's input rows), or the step's rows without its drafts
    (set by the model runner for a step that verifies drafts)."""

    def __init__(self) -> None:
        self.rows: Optional[int] = None


class RoutedLinear(nn.Module):
    """A linear layer with its dense form and a smaller one (``small``: 4-bit here, int8 in
    cpu_int8.py) that serves steps of at most ``max_rows`` rows, counted by ``route``."""

    dense: nn.Module
    bias: Optional[torch.Tensor]
    in_features: int
    out_features: int
    max_rows: int
    route: Int4Route

    def small(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N)."""
        rows = x.shape[0] if self.route.rows is None else self.route.rows
        if rows > self.max_rows:
            return self.dense(x)
        y = self.small(x)
        return y if self.bias is None else y + self.bias


class Int4Linear(RoutedLinear):
    """A linear layer with a dense and a 4-bit form of its weight; the 4-bit one serves steps
    of at most ``max_rows`` rows (0 until :func:`choose_max_rows` sets it), counted by
    ``route``."""

    def __init__(
        self,
        dense: nn.Linear,
        route: Optional[Int4Route] = None,
        stored: Optional[QuantizedTensor] = None,
    ) -> None:
        """``stored``: the checkpoint's own 4-bit codes of the weight (runs_as_int4), else
        the dense weight is rounded to 4 bits here."""
        super().__init__()
        dtype = dense.weight.dtype
        self.int4 = (
            Int4Weight.from_dense(dense.weight, dtype)
            if stored is None
            else Int4Weight.from_quantized(stored, dtype)
        )
        self.dense = dense  # cpu_linear.pack_model may replace it by a packed layer
        self.bias = None if dense.bias is None else dense.bias.detach()
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.max_rows = 0
        self.route = route if route is not None else Int4Route()

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return self.int4(x)


def attach_int4(
    model: Modules,
    route: Optional[Int4Route] = None,
    stored: Optional[Mapping[str, QuantizedTensor]] = None,
) -> list[Int4Linear]:
    """Wrap every ``nn.Linear`` of the model in an ``Int4Linear`` routed by ``route``
    (before weight packing, which then packs each one's dense form), but the output
    projection and layers whose input width is not a multiple of ``GROUP`` (they stay
    dense). A layer whose checkpoint codes ``stored`` holds (by module name) in a 4-bit
    form runs those; the others are rounded to 4 bits. MoE experts loaded dense are
    converted to their 4-bit form only (the loader quantizes them as they load when it is
    told); they hold no dense form to switch to."""
    for module in model.modules():
        if isinstance(module, ExpertLayer):
            module.quantize_experts()
    stored = stored or {}
    wrapped = []
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head" and child.in_features % GROUP == 0:
                q = stored.get(f"{path}.{name}" if path else name)
                layer = Int4Linear(child, route, q if q is not None and runs_as_int4(q) else None)
                setattr(parent, name, layer)
                wrapped.append(layer)
    return wrapped


def detach_int4(model: Modules) -> None:
    """Put every ``Int4Linear``'s dense form back in its place (their 4-bit weights freed)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int4Linear):
                setattr(parent, name, child.dense)


def time_max_rows(
    dense: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    small: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    in_features: int,
    dtype: torch.dtype,
) -> int:
    """The largest of ``TIMING_ROWS`` up to which the small forms (4-bit or int8) are
    ``MIN_SPEEDUP`` times faster than the dense ones (each list one shape, timed in turn) at
    every row count timed (0: not even at one row)."""
    best = 0
    for rows in TIMING_ROWS:
        x = torch.randn(rows, in_features, dtype=dtype)
        dense_s = best_seconds([functools.partial(f, x) for f in dense])
        small_s = best_seconds([functools.partial(f, x) for f in small])
        logger.debug("small form at %d rows: %.2fx dense", rows, dense_s / small_s)
        if dense_s < MIN_SPEEDUP * small_s:
            break
        best = rows
    return best


def choose_routed_max_rows(layers: Sequence[RoutedLinear], dtype: torch.dtype, what: str) -> int:
    """Set every layer's row limit: ``PAGODA_INT4_MAX_ROWS``, or timed on the largest layers'
    final dense form (packed or not) against their small one. Returns the limit."""
    if not layers:
        return 0
    forced = envs.INT4_MAX_ROWS()
    if forced is not None:
        max_rows = forced
    else:
        shape = max(((m.out_features, m.in_features) for m in layers), key=lambda s: s[0] * s[1])
        same = [m for m in layers if (m.out_features, m.in_features) == shape]
        count = max(1, min(len(same), TIMING_BYTES // (shape[0] * shape[1] * dtype.itemsize)))
        timed = same[:count]
        max_rows = time_max_rows(
            [m.dense for m in timed], [m.small for m in timed], shape[1], dtype
        )
    for m in layers:
        m.max_rows = max_rows
    log_limit(what, max_rows, forced is not None)
    return max_rows


def log_limit(what: str, max_rows: int, forced: bool) -> None:
    logger.info(
        "%s for steps of at most %d rows (%s)",
        what,
        max_rows,
        MAX_ROWS_ENV if forced else "timed on this CPU",
    )


def choose_max_rows(layers: list[Int4Linear], dtype: torch.dtype) -> int:
    """:func:`choose_routed_max_rows` for the 4-bit layers."""
    return choose_routed_max_rows(layers, dtype, "int4 weights")


def reference_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the 4-bit form of ``weight`` computes, in fp32 (for tests)."""
    return F.linear(x.float(), dequantize(*quantize(weight)))


# Experts of mixture-of-experts layers (models/moe.py) in 4-bit form only.
#
# A MoE model's experts are nearly all of its bytes (Qwen3-30B-A3B: 29 of 30.5 B weights), so
# with ``--quantization int4`` they are held only as 4-bit codes with their scales, never
# also dense. A product of at most ``max_rows`` rows (a decode step gives each active expert
# a few) runs the 4-bit kernel; a larger one (a prefill chunk's) dequantizes that expert's
# matrix to the model's dtype and runs a dense GEMM, since the kernel does not block over rows.
# Both compute ``x @ dequantize(W).T``; the row limit is timed at load on this CPU
# (:func:`choose_expert_max_rows`) or set by ``PAGODA_INT4_MAX_ROWS``.

EXPERT_TIMING_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # candidate row limits for the experts


def int4_shape_supported(out_features: int, in_features: int) -> bool:
    """The kernel's packing needs rows in multiples of 16, inputs in whole groups."""
    return out_features % 16 == 0 and in_features % GROUP == 0


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) int32 in [0, 15] -> (N, K // 2) uint8 in the kernel's layout (which is
    the CPU's: 64-row blocks with AVX-512, 32 with AVX2)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


@functools.lru_cache(maxsize=None)
def unpack_order(out_features: int, in_features: int) -> torch.Tensor:
    """For the packed form of an (N, K) matrix: the index into its nibbles (each byte's low
    then high nibble, bytes in memory order) of every code in row-major order, (N * K,).
    Learned from the packing itself (codes that spell their own index in base 16, one digit
    per pass), so it holds for whatever layout this CPU's kernel uses."""
    n = out_features * in_features
    index = torch.arange(n, dtype=torch.int64)
    source = torch.zeros(n, dtype=torch.int64)  # nibble -> the code index it holds
    shift = 0
    while n > 1 << shift:
        digit = ((index >> shift) & LEVELS).to(torch.int32).reshape(out_features, in_features)
        source |= _nibbles(pack_codes(digit)).to(torch.int64) << shift
        shift += 4
    order = torch.empty_like(source)
    order[source] = index
    return order.to(torch.int32)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., B) uint8 -> (2 * numel,) uint8: each byte's low nibble, then its high one."""
    return torch.stack([packed & LEVELS, packed >> 4], -1).reshape(-1)


@functools.lru_cache(maxsize=None)
def packing_block() -> Optional[int]:
    """The rows of one block of this CPU's packed layout where it is the plain one: bytes
    (N / B, K, B / 2), the low nibble from row j of the block, the high one from row j + B / 2
    (64 with AVX-512, 32 with AVX2); None for any other (then codes are unpacked by
    :func:`unpack_order`)."""
    for block in (64, 32):
        codes = torch.randint(0, LEVELS + 1, (block, 2 * GROUP), dtype=torch.int32)
        plain = (codes[: block // 2] | codes[block // 2 :] << 4).t().to(torch.uint8)
        if torch.equal(pack_codes(codes).view(2 * GROUP, block // 2), plain):
            return block
    return None


def unpack_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: (N, K // 2) uint8 -> codes (N, K) uint8."""
    order = unpack_order(out_features, in_features)
    return _nibbles(packed).index_select(0, order).view(out_features, in_features)


class Int4Stack(nn.Module):
    """One matrix of every expert, (N, out, in) stacked, in 4-bit form: ``packed`` (N, out,
    in // 2) uint8 and ``scale_zeros`` (N, in // GROUP, out, 2) in the model's dtype (each
    expert's slice is what ``_weight_int4pack_mm_for_cpu`` reads)."""

    packed: torch.Tensor
    scale_zeros: torch.Tensor

    def __init__(self, num_experts: int, out_features: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        if not int4_shape_supported(out_features, in_features):
            raise ValueError(f"int4: no 4-bit kernel for ({out_features}, {in_features}) weights")
        self.num_experts, self.out_features, self.in_features = (
            num_experts,
            out_features,
            in_features,
        )
        packed = torch.empty(num_experts, out_features, in_features // 2, dtype=torch.uint8)
        groups = in_features // GROUP
        scale_zeros = torch.empty(num_experts, groups, out_features, 2, dtype=dtype)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_zeros", scale_zeros, persistent=False)
        self.max_rows = 0

    @torch.no_grad()
    def store(self, expert: int, weight: torch.Tensor) -> None:
        """Quantize one expert's (out, in) weight, as the model's dtype holds it (what dense
        experts would hold), into its slot."""
        codes, scale, zero = quantize(weight.to(self.scale_zeros.dtype))
        self.packed[expert].copy_(pack_codes(codes))
        self.scale_zeros[expert].copy_(torch.stack([scale.t(), zero.t()], -1))

    def dequantized(self, expert: int) -> torch.Tensor:
        """One expert's weight, transposed: (in, out) in the model's dtype, ``dequantize`` of
        its codes (in fp32, with the scales the kernel reads) rounded once."""
        n, k = self.out_features, self.in_features
        block = packing_block()
        sz = self.scale_zeros[expert].float()  # (groups, out, 2)
        groups = k // GROUP
        if block is None or n % block:
            codes = unpack_codes(self.packed[expert], n, k)
            scale, zero = sz.permute(2, 1, 0)  # 2 x (out, groups)
            return dequantize(codes, scale, zero).to(self.scale_zeros.dtype).t()
        # The packed bytes are (out / block, in, block / 2): the low nibbles of a block's
        # bytes are its first block / 2 rows, the high ones the rest. Read in this order they
        # are the transpose, block by block: (in, out) = (groups, GROUP, out), whose scales
        # broadcast over GROUP.
        blocks = self.packed[expert].view(n // block, k, block // 2)
        codes = torch.cat([blocks & LEVELS, blocks >> 4], -1)  # (out / block, in, block)
        w = torch.empty(groups, GROUP, n, dtype=torch.float32, device=codes.device)
        w.view(k, n // block, block).copy_(codes.transpose(0, 1))
        w.sub_(8).mul_(sz[:, None, :, 0]).add_(sz[:, None, :, 1])  # (q - 8) * scale + zero
        return w.view(k, n).to(self.scale_zeros.dtype)

    def forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x (R, in) -> (R, out)."""
        if x.shape[0] > self.max_rows:
            return x @ self.dequantized(expert)
        return self.kernel(expert, x)

    def kernel(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.packed[expert], GROUP, self.scale_zeros[expert]
        )


class Int4Experts(nn.Module):
    """The experts of one MoE layer in 4-bit form: ``gate_up`` (N, 2I, E) and ``down`` (N, E,
    I) as :class:`Int4Stack` s. Loading takes one checkpoint matrix at a time: an expert's
    gate rows wait (as loaded) for its up rows, then both are quantized and packed."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up = Int4Stack(num_experts, 2 * intermediate_size, hidden_size, dtype)
        self.down = Int4Stack(num_experts, hidden_size, intermediate_size, dtype)
        self._halves: dict[int, dict[int, torch.Tensor]] = {}  # expert -> {half: rows}

    def load(self, expert: int, half: Optional[int], weight: torch.Tensor) -> None:
        """One expert's matrix from a checkpoint: down (E, I) if ``half`` is None, else its
        gate (0) or up (1) rows (I, E)."""
        if half is None:
            self.down.store(expert, weight)
            return
        halves = self._halves.setdefault(expert, {})
        halves[half] = weight
        if len(halves) == 2:
            del self._halves[expert]
            self.gate_up.store(expert, torch.cat([halves[0], halves[1]]))

    @property
    def waiting(self) -> int:
        """Experts whose gate or up rows came without the other half yet."""
        return len(self._halves)

    def set_max_rows(self, max_rows: int) -> None:
        self.gate_up.max_rows = self.down.max_rows = max_rows


def int4_experts(model: Modules) -> list[Int4Experts]:
    return [m for m in model.modules() if isinstance(m, Int4Experts)]


def time_expert_max_rows(experts: Int4Experts, dtype: torch.dtype) -> int:
    """The largest of ``EXPERT_TIMING_ROWS`` at which the 4-bit kernel over the experts'
    gate_up and down products was faster than dequantizing each matrix and a dense GEMM, on as
    many of this layer's experts as hold ``TIMING_BYTES`` of dense weights (0: at none). Every
    count is timed: the kernel's time grows with the rows and the dequantization's does not,
    so a win at some count stands for the smaller ones too, whatever noise said there."""
    stacks = (experts.gate_up, experts.down)
    dense_bytes = sum(s.out_features * s.in_features for s in stacks) * dtype.itemsize
    count = max(1, min(experts.gate_up.num_experts, TIMING_BYTES // dense_bytes))
    best = 0
    for rows in EXPERT_TIMING_ROWS:
        kernel: list[Callable[[], torch.Tensor]] = []
        dense: list[Callable[[], torch.Tensor]] = []
        for s in stacks:
            x = torch.randn(rows, s.in_features, dtype=dtype)
            for e in range(count):
                kernel.append(functools.partial(s.kernel, e, x))
                dense.append(functools.partial(_dequantized_linear, s, e, x))
        kernel_s, dense_s = best_seconds(kernel), best_seconds(dense)
        logger.debug(
            "int4 experts at %d rows: kernel %.2fx dequantize + GEMM", rows, dense_s / kernel_s
        )
        if kernel_s <= dense_s:
            best = rows
    return best


def _dequantized_linear(stack: Int4Stack, expert: int, x: torch.Tensor) -> torch.Tensor:
    return x @ stack.dequantized(expert)


def choose_expert_max_rows(experts: list[Int4Experts], dtype: torch.dtype) -> int:
    """Set every MoE layer's row limit for the 4-bit kernel: ``PAGODA_INT4_MAX_ROWS``, or
    timed on the first layer's experts. Returns the limit."""
    if not experts:
        return 0
    forced = envs.INT4_MAX_ROWS()
    max_rows = forced if forced is not None else time_expert_max_rows(experts[0], dtype)
    for layer in experts:
        layer.set_max_rows(max_rows)
    logger.info(
        "int4 experts: the 4-bit kernel for at most %d rows an expert, else dequantized (%s)",
        max_rows,
        MAX_ROWS_ENV if forced is not None else "timed on this CPU",
    )
    return max_rows

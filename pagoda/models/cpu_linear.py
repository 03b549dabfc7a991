"""Linear layers on the CPU with their weights packed once, at load, for oneDNN.

A GEMM library handed a plain (N, K) weight re-lays it out into its blocked format on every
call. For the small-M products of decode steps that repacking streams the whole weight an
extra time and costs about as much as the product itself; packing once at load removes it
(vLLM's CPU backend does the same with oneDNN; docs/models.md has what it saves).

Whether packing pays depends on the CPU and dtype (oneDNN's bf16 packing needs AVX-512 or
AVX-NE-CONVERT; torch's own bf16 path may already be fast), so it is chosen per weight shape
on this machine at load by timing both forms on the model's own weights, every layer's in
turn (64 MiB of them: cold in cache, as in a step), at a decode and a prefill-chunk row
count.
``PAGODA_PACKED_LINEAR=1`` packs without timing where it is supported, ``=0`` never packs.

A third form for bf16 where the CPU has AVX512-BF16: pagoda's own GEMM kernel
(``cpu_bf16.InvariantLinear``). It is timed beside the other two, also at a larger row count
(``KERNEL_ROWS``, one weight), and taken only where it is faster than the form otherwise chosen
at every row count timed (``PAGODA_BF16_KERNEL`` forces it on or off).

Invariant: a packed layer computes ``x @ W.T + b`` as ``F.linear`` does, up to the order of
the fp32 sums (the tests hold it to the same greedy tokens as transformers in fp32).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import envs
from pagoda.models import cpu_bf16
from pagoda.models.base import ExpertLayer, Modules
from pagoda.utils import cdiv

logger = logging.getLogger(__name__)

PACKED_LINEAR_ENV = envs.PACKED_LINEAR.name  # "1": always, "0": never, unset: timed
TIMING_ROWS = (1, 32)  # a decode step's rows and a small prefill chunk's
TIMING_REPEATS = 3
TIMING_BYTES = 64 << 20  # weights of one shape timed in turn: more than a last-level cache
MIN_SPEEDUP = 1.1  # packed must beat plain by this to be chosen
KERNEL_ROWS = 128  # a large decode step's (or prefill chunk's) rows: the kernel must win there too


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight in oneDNN's blocked layout (no ``weight`` parameter)."""

    def __init__(
        self,
        packed: torch.Tensor,
        bias: Optional[torch.Tensor],
        out_features: int,
        in_features: int,
    ) -> None:
        super().__init__()
        self.packed, self.bias = packed, bias
        self.out_features, self.in_features = out_features, in_features

    @classmethod
    def of(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "PackedLinear":
        return cls(pack_weight(weight), None if bias is None else bias.detach(), *weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N)."""
        return packed_linear(x, self.packed, self.bias)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``F.linear`` with a weight from :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> oneDNN's packed form (the row-count hint only picks the blocking)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(TIMING_ROWS))


def packing_supported(dtype: torch.dtype) -> bool:
    """True when this torch build and CPU can pack weights of ``dtype``."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        PackedLinear.of(torch.zeros(16, 16, dtype=dtype))(torch.zeros(2, 16, dtype=dtype))
    except RuntimeError:  # e.g. bf16 without AVX-512: "bf16 path needs the cpu support ..."
        return False
    return True


def best_seconds(fns: list[Callable[[], torch.Tensor]]) -> float:
    """Best of a few passes over ``fns`` (each weight once per pass: cold in cache, as in a
    step); also times the 4-bit forms of cpu_int4."""
    for fn in fns:
        fn()
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        for fn in fns:
            fn()
        best = min(best, time.perf_counter() - start)
    return best


def packing_pays(weights: list[torch.Tensor], packed: list[torch.Tensor]) -> tuple[bool, float]:
    """Time plain and packed products over every weight of one shape; (choose packed,
    plain time / packed time)."""
    n, k = weights[0].shape
    plain_s = packed_s = 0.0
    for rows in TIMING_ROWS:
        x = torch.randn(rows, k, dtype=weights[0].dtype)
        plain_s += best_seconds([functools.partial(F.linear, x, w) for w in weights])
        packed_s += best_seconds([functools.partial(packed_linear, x, p) for p in packed])
    ratio = plain_s / packed_s
    return ratio >= MIN_SPEEDUP, ratio


def _linears(model: Modules) -> dict[tuple[int, int], list[tuple[nn.Module, str]]]:
    """Every ``nn.Linear`` of the model but the output projection (``lm_head``, see
    :func:`pack_model`), grouped by weight shape: (parent, attribute name)."""
    groups: dict[tuple[int, int], list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and name != "lm_head":
                n, k = child.weight.shape
                groups.setdefault((n, k), []).append((parent, name))
    return groups


def pack_model(
    model: Modules, head_weight: Optional[torch.Tensor] = None, always: bool = False
) -> Optional[nn.Module]:
    """Replace the model's linear layers by packed ones, or by pagoda's bf16 kernel, where that
    pays (or as ``PAGODA_PACKED_LINEAR`` / ``PAGODA_BF16_KERNEL`` say; ``always``: packed for
    oneDNN without timing unless the first says "0", as ``--deterministic`` asks for layers its
    kernel does not take). ``head_weight``: the output projection (V, E), which may be tied to
    the embedding; returns its faster form (packed or the kernel's) where one pays, else None."""
    forced = envs.PACKED_LINEAR()  # True: always, False: never, None: where timing says
    if forced is None and always:
        forced = True
    dtype = next(model.parameters()).dtype
    packing = forced is not False and packing_supported(dtype)
    kernel = _kernel_choice(dtype, always or forced is not None)
    if not packing and kernel is False:
        return None
    for places in _linears(model).values():
        layers = [getattr(parent, name) for parent, name in places]
        weights = [layer.weight.detach() for layer in layers]
        form, packed = _layer_form(weights, forced, packing, kernel)
        if form == "plain":
            continue
        # The weights packed for timing are kept; the rest are packed one at a time, so the
        # model is never held twice.
        for i, ((parent, name), layer) in enumerate(zip(places, layers, strict=True)):
            done = packed[i] if i < len(packed) else None
            setattr(parent, name, _in_form(layer.weight, layer.bias, form, done))
    if packing:
        _pack_experts(model, forced)
    if head_weight is None:
        return None
    head_form, packed = _layer_form([head_weight.detach()], forced, packing, kernel)
    if head_form == "plain":
        return None
    return _in_form(head_weight, None, head_form, packed[0] if packed else None)


def _kernel_choice(dtype: torch.dtype, onednn_forced: bool) -> Optional[bool]:
    """Whether the bf16 kernel is a candidate: False (never), True (always, untimed), None
    (timed). Never where it would run its portable loop; where oneDNN's form is forced
    (``PAGODA_PACKED_LINEAR`` set, or ``--deterministic`` asking for fixed tiles), only if
    ``PAGODA_BF16_KERNEL=1`` asks for it."""
    if not (cpu_bf16.kernel_takes(dtype, 2) and cpu_bf16.kernel_native()):
        return False
    wanted = envs.BF16_KERNEL()
    if wanted is None and onednn_forced:
        return False
    return False if wanted is False else wanted


def _layer_form(
    weights: list[torch.Tensor],
    forced: Optional[bool],
    packing: bool,
    kernel: Optional[bool],
) -> tuple[str, list[torch.Tensor]]:
    """ "plain", "packed" or "kernel" for the weights of one shape (N, K), timed on enough of
    them to overflow the last-level cache, each in turn (cold, as in a step); and the first
    weights' packed forms where timing packed them."""
    shape = (weights[0].shape[0], weights[0].shape[1])
    if kernel and shape[1] % 2 == 0:
        return "kernel", []
    timed = weights[: cdiv(TIMING_BYTES, weights[0].numel() * weights[0].element_size())]
    form = "packed" if packing and forced else "plain"
    packed: list[torch.Tensor] = []
    if packing and forced is None:
        packed = [pack_weight(w) for w in timed]
        pays, ratio = packing_pays(timed, packed)
        form = "packed" if pays else "plain"
        logger.info(
            "linear %s x%d (%s): packed %.2fx plain -> %s",
            shape,
            len(weights),
            weights[0].dtype,
            ratio,
            form,
        )
    if kernel is None and shape[1] % 2 == 0:
        theirs = [
            functools.partial(packed_linear, packed=p)
            if form == "packed"
            else functools.partial(F.linear, weight=w)
            for w, p in itertools.zip_longest(timed, packed)
        ]
        if _kernel_wins(timed, theirs, form):
            return "kernel", []
    return form, packed


def _kernel_wins(
    weights: list[torch.Tensor], theirs: Sequence[Callable[..., torch.Tensor]], form: str
) -> bool:
    """Whether the bf16 kernel beats ``theirs`` (``weights`` in ``form``) at every row count
    timed (TIMING_ROWS over all of ``weights``, KERNEL_ROWS on the first)."""
    shape = (weights[0].shape[0], weights[0].shape[1])
    mine = [cpu_bf16.InvariantLinear(w) for w in weights]
    ratios = []
    for rows, count in [(r, len(weights)) for r in TIMING_ROWS] + [(KERNEL_ROWS, 1)]:
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        ours = best_seconds([functools.partial(f, x) for f in mine[:count]])
        other = best_seconds([functools.partial(f, x) for f in theirs[:count]])
        ratios.append(other / ours)
    wins = min(ratios) > 1.0
    logger.info(
        "linear %s: bf16 kernel %s x %s at %s rows -> %s",
        shape,
        "/".join(f"{r:.2f}" for r in ratios),
        form,
        "/".join(str(r) for r in (*TIMING_ROWS, KERNEL_ROWS)),
        "kernel" if wins else form,
    )
    return wins


def _in_form(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    form: str,
    packed: Optional[torch.Tensor] = None,
) -> nn.Module:
    """The linear layer ``x @ weight.T + bias`` in ``form`` ("packed", from ``packed`` where
    given, or "kernel")."""
    bias = None if bias is None else bias.detach()
    if form == "kernel":
        return cpu_bf16.InvariantLinear(weight, bias)
    packed = pack_weight(weight) if packed is None else packed
    return PackedLinear(packed, bias, weight.shape[0], weight.shape[1])


def _pack_experts(model: Modules, forced: Optional[bool]) -> None:
    """The experts of MoE layers (models/moe.py), packed one matrix at a time where that pays:
    timed as the linear layers are, on the first layer's experts."""
    layers = [m for m in model.modules() if isinstance(m, ExpertLayer) and m.int4 is None]
    if not layers:
        return
    if not forced:
        gate_up, down = layers[0].expert_matrices()
        ratios = []
        for weights in (gate_up, down):
            timed = weights[: cdiv(TIMING_BYTES, weights[0].numel() * weights[0].element_size())]
            ratios.append(packing_pays(timed, [pack_weight(w) for w in timed])[1])
        pays = min(ratios) >= MIN_SPEEDUP
        logger.info(
            "experts x%d a layer (%s): packed %.2fx / %.2fx plain (gate_up / down) -> %s",
            len(gate_up),
            gate_up[0].dtype,
            *ratios,
            "packed" if pays else "plain",
        )
        if not pays:
            return
    for layer in layers:
        layer.pack_experts(pack_weight)

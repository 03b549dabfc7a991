"""Micro-benchmark of the weight-only int8 linear (``kernels/cpu_int8.py``, Q8_0-like weights:
int8 codes, an fp32 scale per 32) against the dense bf16 linear packed for oneDNN
(``models/cpu_linear.py``) and the 4-bit kernel of ``--quantization int4``
(``models/cpu_int4.py``), at the row counts of decode steps.

Invariant of the measurement: every form runs the same inputs in one process, interleaved
(A B C A B C ...), each on enough copies of its weight to overflow the last-level cache (64 MiB
of bf16), one call per copy in turn, so every call reads its weight from memory, as a decode
step does; the table gives medians per call. GB/s is the bytes of weight (with scales and
zeros) one call reads over its time.

Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, k/v 192, vocabulary 49152) as
separate (N, K) products: q/o, k/v, gate or up, down, and the output projection.

Run: ``python -m pagoda.bench.int8_kernels [--json PATH]`` (bf16, torch threads = 2).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from pagoda.bench.common import machine_info, write_json
from pagoda.bench.lora_kernels import cpu_kind
from pagoda.kernels import cpu_int8 as int8_kernel
from pagoda.kernels import ext
from pagoda.models import cpu_int4, cpu_linear
from pagoda.models.cpu_int8 import Int8Weight
from pagoda.models.quantized import QuantizedTensor

SHAPES = [  # (name, N, K)
    ("q/o", 576, 576),
    ("k/v", 192, 576),
    ("gate/up", 1536, 576),
    ("down", 576, 1536),
    ("head", 49152, 576),
]
ROWS = (1, 2, 4, 8, 16)
COLD_BYTES = 64 << 20  # bf16 weights of a shape timed in turn: more than a last-level cache
FORMS = ("dense", "int4", "int8")


@dataclass
class Row:
    shape: str
    n: int
    k: int
    rows: int
    dense_ms: float
    int4_ms: float
    int8_ms: float
    dense_gbs: float
    int4_gbs: float
    int8_gbs: float
    int8_vs_dense: float  # dense_ms / int8_ms
    int8_vs_int4: float  # int4_ms / int8_ms


def q8_0_like(w: torch.Tensor) -> QuantizedTensor:
    """Q8_0's form of ``w``: per 32, d = amax / 127, codes round(w / d)."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // 32, 32)
    d = blocks.abs().amax(-1).clamp_min(1e-12) / 127
    codes = (blocks / d[..., None]).round().to(torch.int8).reshape(n, k)
    return QuantizedTensor(codes, d, None, 32, 8, "Q8_0")


@dataclass
class Forms:
    """Copies of one shape's weight in each form, and the bytes one call of each reads."""

    calls: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]
    nbytes: dict[str, float]


def make_forms(n: int, k: int, dtype: torch.dtype) -> Forms:
    copies = max(2, -(-COLD_BYTES // (n * k * 2)))
    calls: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {f: [] for f in FORMS}
    nbytes: dict[str, float] = {}
    for _ in range(copies):
        w = (torch.randn(n, k) * 0.05).to(dtype)
        calls["dense"].append(cpu_linear.PackedLinear.of(w))
        calls["int4"].append(cpu_int4.Int4Weight.from_dense(w, dtype))
        int8 = Int8Weight(q8_0_like(w), dtype)
        calls["int8"].append(int8)
        nbytes["int8"] = int8.packed.nbytes()
    nbytes["dense"] = n * k * dtype.itemsize
    nbytes["int4"] = n * k * cpu_int4.bytes_per_weight(dtype)
    return Forms(calls, nbytes)


def interleaved_medians(
    fns: dict[str, Callable[[], None]], repeats: int, min_seconds: float
) -> dict[str, float]:
    """Median seconds of each, timed in turn (one warm-up each first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times[FORMS[0]]) < repeats or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(
    shape: tuple[str, int, int], forms: Forms, rows: int, dtype: torch.dtype, repeats: int,
    min_seconds: float,
) -> Row:  # fmt: skip
    name, n, k = shape
    x = torch.randn(rows, k).to(dtype)

    def every_copy(form: str) -> Callable[[], None]:
        def run() -> None:
            for call in forms.calls[form]:
                call(x)

        return run

    with torch.inference_mode():
        total = interleaved_medians({f: every_copy(f) for f in FORMS}, repeats, min_seconds)
    ms = {f: 1e3 * total[f] / len(forms.calls[f]) for f in FORMS}
    gbs = {f: forms.nbytes[f] / (ms[f] * 1e-3) / 1e9 for f in FORMS}
    return Row(
        name, n, k, rows, ms["dense"], ms["int4"], ms["int8"], gbs["dense"], gbs["int4"],
        gbs["int8"], ms["dense"] / ms["int8"], ms["int4"] / ms["int8"],
    )  # fmt: skip


def format_table(rows: Sequence[Row]) -> str:
    head = (
        f"{'shape':<8} {'N':>6} {'K':>5} {'T':>3} {'dense ms':>9} {'int4 ms':>8} "
        f"{'int8 ms':>8} {'dense GB/s':>10} {'int4 GB/s':>9} {'int8 GB/s':>9} "
        f"{'int8 x dense':>12} {'int8 x int4':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.shape:<8} {r.n:>6} {r.k:>5} {r.rows:>3} {r.dense_ms:>9.4f} {r.int4_ms:>8.4f} "
            f"{r.int8_ms:>8.4f} {r.dense_gbs:>10.1f} {r.int4_gbs:>9.1f} {r.int8_gbs:>9.1f} "
            f"{r.int8_vs_dense:>12.2f} {r.int8_vs_int4:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m pagoda.bench.int8_kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    p.add_argument("--shapes", nargs="+", choices=[s[0] for s in SHAPES], help="default: all")
    p.add_argument("--repeats", type=int, default=11, help="timed passes of each, at least")
    p.add_argument("--min-seconds", type=float, default=0.3, help="per shape and rows")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not int8_kernel.available():
        raise SystemExit(f"the C++ kernel is unavailable: {ext.unavailable_reason()}")
    if not cpu_linear.packing_supported(torch.bfloat16):
        raise SystemExit("this CPU cannot pack bf16 weights for oneDNN")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cpu = cpu_kind()
    isa = int8_kernel.isas()[-1]
    print(
        f"int8 weights (Q8_0-like) against packed dense and 4-bit, {args.dtype}, torch "
        f"threads {torch.get_num_threads()}; CPU: {cpu['model_name']} (avx512f "
        f"{cpu['avx512f']}, avx512_bf16 {cpu['avx512_bf16']}, amx {cpu['amx']}); int8 path "
        f"{isa if dtype == torch.bfloat16 or isa != 'avx512_bf16' else 'avx512'}"
    )
    rows = []
    for shape in SHAPES:
        if args.shapes and shape[0] not in args.shapes:
            continue
        forms = make_forms(shape[1], shape[2], dtype)
        for t in args.rows:
            rows.append(measure(shape, forms, t, dtype, args.repeats, args.min_seconds))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        del forms
    print(format_table(rows))
    if args.json:
        report = {
            "bench": "int8_kernels",
            "args": vars(args),
            "cpu": cpu,
            "machine": machine_info(),
            "int8_isas": int8_kernel.isas(),
            "rows": [asdict(r) for r in rows],
        }
        write_json(args.json, report)


if __name__ == "__main__":
    main()

"""Micro-benchmark of the grouped LoRA delta on the CPU (Punica's SGMV, Chen et al., MLSys'24):
the reference ``punica.grouped_torch`` (two matmuls a segment) against the C++ kernel
(``kernels/cpu_lora.py``: one call a linear, every segment).

Invariant of the measurement: both run the same inputs in the same process, interleaved (A B A
B ...), and the table gives medians, so a load that comes and goes skews both alike. Work per
call is ``2 x T x R x (K + N)`` FLOP (shrink and expand); GFLOP/s is also given as a fraction of
the machine's limit, the best bf16 (or ``--dtype``) ``torch`` matmul rate (``bench/flops.py``).

Shapes are SmolLM2-135M's fused linears (hidden 576, intermediate 1536) with one adapter of rank
``--rank`` r on every projection: qkv (576 -> 960, R = 3r), o (576 -> 576, R = r), gate_up
(576 -> 3072, R = 2r), down (1536 -> 576, R = r). Workloads: decode, T = 64 rows in 4 segments
of 16 and T = 256 in 8 of 32; prefill, T = 512 in 2 segments of 256. Each segment has its own
slot; one more slot is resident and unused.

Run: ``python -m pagoda.bench.lora_kernels [--json PATH]`` (bf16, rank 16, torch threads = 2).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from pagoda.bench import flops
from pagoda.bench.common import machine_info, write_json
from pagoda.kernels import cpu_lora, ext
from pagoda.lora.punica import LoRABatch, grouped_torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HIDDEN, INTERMEDIATE, HEAD_DIM, HEADS, KV_HEADS = 576, 1536, 64, 9, 3
# (name, K, N, R as a multiple of the rank)
LINEARS = [
    ("qkv", HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, 3),
    ("o", HIDDEN, HIDDEN, 1),
    ("gate_up", HIDDEN, 2 * INTERMEDIATE, 2),
    ("down", INTERMEDIATE, HIDDEN, 1),
]
# (name, T rows, G segments of T / G rows)
WORKLOADS = [("decode", 64, 4), ("decode", 256, 8), ("prefill", 512, 2)]


@dataclass
class Row:
    workload: str
    linear: str
    k: int
    n: int
    r: int
    t: int
    g: int
    torch_ms: float
    cpp_ms: float
    speedup: float  # torch_ms / cpp_ms
    torch_gflops: float
    cpp_gflops: float
    cpp_of_limit: float  # cpp GFLOP/s / the machine's matmul GFLOP/s


@dataclass
class Inputs:
    out: torch.Tensor  # (T, N)
    x: torch.Tensor  # (T, K)
    a: torch.Tensor  # (G + 1, R, K)
    b: torch.Tensor  # (G + 1, N, R)
    batch: LoRABatch


def make_inputs(t: int, g: int, k: int, n: int, r: int, dtype: torch.dtype) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, k, generator=gen).to(dtype)
    a = (torch.randn(g + 1, r, k, generator=gen) / k**0.5).to(dtype)
    b = (torch.randn(g + 1, n, r, generator=gen) / r**0.5).to(dtype)
    out = torch.randn(t, n, generator=gen).to(dtype)
    batch = LoRABatch()
    rows = t // g
    batch.set([(i * rows, rows, i + 1) for i in range(g)])  # slot 0 resident, unused
    return Inputs(out, x, a, b, batch)


def interleaved_medians(
    first: Callable[[], None], second: Callable[[], None], repeats: int, min_seconds: float
) -> tuple[float, float]:
    """Median seconds of each, timed alternately (one warm-up each first)."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < repeats or time.perf_counter() - start < min_seconds:
        for fn, into in ((first, times[0]), (second, times[1])):
            t0 = time.perf_counter()
            fn()
            into.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(
    workload: tuple[str, int, int],
    linear: tuple[str, int, int, int],
    rank: int,
    dtype: torch.dtype,
    repeats: int,
    min_seconds: float,
    limit: float,
) -> Row:
    name, t, g = workload
    lin, k, n, mult = linear
    r = rank * mult
    p = make_inputs(t, g, k, n, r, dtype)
    ref, ours = (
        lambda: grouped_torch(p.out, p.x, p.a, p.b, p.batch),
        lambda: cpu_lora.lora_sgmv(p.out, p.x, p.a, p.b, p.batch),
    )
    with torch.inference_mode():
        t_ref, t_cpp = interleaved_medians(ref, ours, repeats, min_seconds)
    work = 2.0 * t * r * (k + n)
    return Row(
        name, lin, k, n, r, t, g, t_ref * 1e3, t_cpp * 1e3, t_ref / t_cpp,
        work / t_ref / 1e9, work / t_cpp / 1e9, work / t_cpp / limit,
    )  # fmt: skip


def cpu_kind() -> dict[str, object]:
    """lscpu's model name and whether the CPU has AVX-512 (and its bf16 dot) and AMX."""
    flags = _cpu_flags()
    return {
        "model_name": _lscpu_model(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": any(f.startswith("amx") for f in flags),
    }


def _lscpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "?"
    models = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if "Model name" in ln]
    return models[0] if models else "?"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def format_table(rows: Sequence[Row]) -> str:
    head = (
        f"{'workload':<8} {'T':>4} {'G':>2} {'linear':<8} {'K':>5} {'N':>5} {'R':>3} "
        f"{'torch ms':>9} {'C++ ms':>8} {'x':>6} {'torch GF/s':>10} {'C++ GF/s':>9} {'C++ %lim':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.workload:<8} {r.t:>4} {r.g:>2} {r.linear:<8} {r.k:>5} {r.n:>5} {r.r:>3} "
            f"{r.torch_ms:>9.3f} {r.cpp_ms:>8.3f} {r.speedup:>6.2f} {r.torch_gflops:>10.1f} "
            f"{r.cpp_gflops:>9.1f} {100 * r.cpp_of_limit:>7.1f}%"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m pagoda.bench.lora_kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rank", type=int, default=16, help="adapter rank r (qkv R=3r, gate_up 2r)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21, help="timed calls of each, at least")
    p.add_argument("--min-seconds", type=float, default=0.5, help="per shape, at least")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not cpu_lora.available():
        raise SystemExit(f"the C++ kernel is unavailable: {ext.unavailable_reason()}")
    dtype = DTYPES[args.dtype]
    cpu = cpu_kind()
    limit = flops.best(flops.measure(dtype, [])).flops_per_s
    print(
        f"grouped LoRA delta, {args.dtype}, rank {args.rank}, torch threads "
        f"{torch.get_num_threads()}; CPU: {cpu['model_name']} (avx512f {cpu['avx512f']}, "
        f"avx512_bf16 {cpu['avx512_bf16']}, amx {cpu['amx']}); kernel isa "
        f"{ext.require_extension().lora_isa()}; limit {limit / 1e9:.1f} GFLOP/s "
        f"({args.dtype} torch matmul {'x'.join(map(str, flops.SQUARE))})"
    )
    rows = [
        measure(w, lin, args.rank, dtype, args.repeats, args.min_seconds, limit)
        for w in WORKLOADS
        for lin in LINEARS
    ]
    print(format_table(rows))
    if args.json:
        report = {
            "bench": "lora_kernels",
            "args": vars(args),
            "cpu": cpu,
            "machine": machine_info(),
            "kernel_isa": ext.require_extension().lora_isa(),
            "limit_flops_per_s": limit,
            "rows": [asdict(r) for r in rows],
        }
        write_json(args.json, report)


if __name__ == "__main__":
    main()

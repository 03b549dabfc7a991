"""Micro-benchmark of paged decode attention (PagedAttention, Kwon et al., SOSP'23) on the CPU:
the torch reference (``torch_ref.decode_attention``: gather the padded context, batched
matmuls) against the C++ kernel (``cpu_decode``: reads each needed K/V row once straight from
the blocks, flash-decoding style online softmax in fp32).

Invariant of the workload: every sequence's block table is a random, non-contiguous set of
block ids (as after a while of serving), and only tokens ``[0, seq_len)`` count. Decode is
memory-bound on reading K/V, so besides the time per call the table reports the effective
bandwidth: the K/V bytes a decode step actually needs (``sum(seq_lens) x Hkv x D x 2 (K and V)
x element size``) divided by the time.

Run: ``python -m pagoda.bench.attention`` (SmolLM2 shapes: H=9, Hkv=3, D=64, block size 16,
bf16, context lengths uniform in 64..800, torch threads = 2). By default every call reads the
same cache, which may then sit in the last-level cache for the smaller batches; ``--layers 8``
cycles through 8 caches, as a model's layers do, so K/V come from DRAM. Times are medians; the
load average is printed before and after, since other jobs on the machine skew them.
``--window W`` (a sliding window: each query reads only its last W tokens, so the bandwidth
counts those) and ``--softcap C`` (scores capped to C * tanh(s / C)) time those options.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from pagoda.attention import cpu_decode
from pagoda.attention.metadata import AttentionMetadata
from pagoda.attention.torch_ref import decode_attention
from pagoda.kernels import ext
from pagoda.utils import cdiv

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Case:
    """One decode step's attention inputs; ``kv_caches`` holds one cache per layer (same block
    tables), cycled through call after call."""

    q: torch.Tensor
    kv_caches: list[torch.Tensor]
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    meta: AttentionMetadata
    scale: float
    window: int = 0
    softcap: float = 0.0

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.kv_caches[0]

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V that the step must read."""
        _, _, _, num_kv_heads, head_dim = self.kv_cache.shape
        lens = self.seq_lens.clamp(max=self.window) if self.window else self.seq_lens
        return int(lens.sum()) * num_kv_heads * head_dim * 2 * self.kv_cache.element_size()


def make_case(
    batch: int,
    min_len: int,
    max_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    layers: int = 1,
    window: int = 0,
    softcap: float = 0.0,
) -> Case:
    """Random queries and cache(s); each sequence's blocks are drawn at random from the pool."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(min_len, max_len + 1, (batch,), generator=gen, dtype=torch.int64)
    blocks_per_seq = [cdiv(int(n), block_size) for n in seq_lens]
    width = max(blocks_per_seq)
    num_blocks = sum(blocks_per_seq) + 1  # block 0 stays the padding block
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    block_tables = torch.zeros(batch, width, dtype=torch.int64)
    start = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = perm[start : start + n]
        start += n
    kv_caches = [
        torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
        for _ in range(layers)
    ]
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64),
        num_decode_tokens=batch,
        decode_block_tables=block_tables,
        decode_seq_lens=seq_lens,
        decode_max_seq_len=int(seq_lens.max()),
        prefills=[],
        block_size=block_size,
    )
    scale = 1.0 / math.sqrt(head_dim)
    return Case(q, kv_caches, block_tables, seq_lens, meta, scale, window, softcap)


def time_call(fn: Callable[[], object], repeats: int, min_seconds: float = 0.3) -> float:
    """Median seconds per call: one warm-up, then at least ``repeats`` runs and ``min_seconds``."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (
        time.perf_counter() - start < min_seconds and len(times) < 50 * repeats
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cycled_calls(case: Case) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """The kernel and the torch reference on ``case`` as argument-free calls; every call, of
    either, reads the next of ``case.kv_caches`` in turn."""
    calls = [0]

    def next_cache() -> torch.Tensor:
        calls[0] += 1
        return case.kv_caches[calls[0] % len(case.kv_caches)]

    def kernel() -> torch.Tensor:
        return _kernel(case, next_cache())

    def ref() -> torch.Tensor:
        return _reference(case, next_cache())

    return kernel, ref


def _kernel(case: Case, kv: torch.Tensor) -> torch.Tensor:
    return cpu_decode.paged_decode_attention(
        case.q,
        kv,
        case.block_tables,
        case.seq_lens,
        case.scale,
        window=case.window,
        softcap=case.softcap,
    )


def _reference(case: Case, kv: torch.Tensor) -> torch.Tensor:
    return decode_attention(
        case.q,
        kv,
        case.meta.decode_block_tables,
        case.meta.decode_seq_lens,
        case.meta.decode_max_seq_len,
        case.scale,
        window=case.window,
        softcap=case.softcap,
    )


def run(
    batch_sizes: Sequence[int],
    min_len: int,
    max_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    repeats: int,
    skip_ref: bool = False,
    layers: int = 1,
    window: int = 0,
    softcap: float = 0.0,
) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    for batch in batch_sizes:
        case = make_case(
            batch,
            min_len,
            max_len,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            dtype,
            seed=batch,
            layers=layers,
            window=window,
            softcap=softcap,
        )
        kernel, ref = _cycled_calls(case)
        t_ker = time_call(kernel, repeats)
        row = {
            "batch": batch,
            "tokens": int(case.seq_lens.sum()),
            "kv_mb": case.kv_bytes / 1e6,
            "kernel_ms": t_ker * 1e3,
            "kernel_gbs": case.kv_bytes / t_ker / 1e9,
        }
        if not skip_ref:
            t_ref = time_call(ref, repeats)
            kv = case.kv_cache
            diff = _kernel(case, kv).float() - _reference(case, kv).float()
            err = diff.abs().max().item()
            row.update(
                ref_ms=t_ref * 1e3,
                ref_gbs=case.kv_bytes / t_ref / 1e9,
                speedup=t_ref / t_ker,
                max_abs_diff=err,
            )
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, float]]) -> str:
    has_ref = bool(rows) and "ref_ms" in rows[0]
    head = f"{'B':>5} {'tokens':>8} {'KV MB':>8} "
    if has_ref:
        head += f"{'ref ms':>9} {'ref GB/s':>9} "
    head += f"{'kernel ms':>10} {'kern GB/s':>10}"
    if has_ref:
        head += f" {'speedup':>8} {'max|diff|':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['batch']:>5} {r['tokens']:>8} {r['kv_mb']:>8.1f} "
        if has_ref:
            line += f"{r['ref_ms']:>9.3f} {r['ref_gbs']:>9.2f} "
        line += f"{r['kernel_ms']:>10.3f} {r['kernel_gbs']:>10.2f}"
        if has_ref:
            line += f" {r['speedup']:>7.1f}x {r['max_abs_diff']:>10.2e}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m pagoda.bench.attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch-sizes", default="1,16,64,128,256")
    p.add_argument("--context", default="64:800", help="min:max context length (uniform)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-ref", action="store_true", help="time only the kernel")
    p.add_argument(
        "--layers",
        type=int,
        default=1,
        help="cycle through this many caches (as a model's layers do), so that K/V "
        "come from DRAM rather than from the last call's cache lines",
    )
    p.add_argument("--window", type=int, default=0, help="sliding window (0: none)")
    p.add_argument("--softcap", type=float, default=0.0, help="score soft cap (0: none)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not ext.available():
        raise SystemExit(f"the C++ kernel is unavailable: {ext.unavailable_reason()}")
    lo, hi = (int(x) for x in args.context.split(":"))
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    info = ext.build_info()
    print(
        f"paged decode attention: H={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
        f"block_size={args.block_size} {args.dtype} context {lo}..{hi}, "
        f"torch threads={torch.get_num_threads()}, caches cycled={args.layers}, "
        f"window={args.window} softcap={args.softcap}, "
        f"kernel isa: {info['isa']}"
    )
    print(f"load average before: {_loadavg()}")
    rows = run(
        batch_sizes,
        lo,
        hi,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.block_size,
        DTYPES[args.dtype],
        args.repeats,
        skip_ref=args.no_ref,
        layers=args.layers,
        window=args.window,
        softcap=args.softcap,
    )
    print(format_table(rows))
    print(f"load average after: {_loadavg()}")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()

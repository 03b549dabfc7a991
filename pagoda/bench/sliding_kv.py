"""What freeing the KV blocks behind every sliding window saves: one long prompt through a
model with sliding-window layers (Gemma 2/3), with the sliding layers' KV in a pool of its
own (core/sliding_kv.py) and with every layer in one pool (``--disable-hybrid-kv-cache-
manager``), each in a fresh process.

    python -m pagoda.bench.sliding_kv --model-preset gemma-3-1b --prompt-len 16384 \\
        --kv-cache-memory 0.5 [--json sliding.json]

For each mode it prints the tokens the cache can hold (the full-attention layers' pool), the
KV bytes allocated, the peak KV bytes the request held (used blocks of each pool at their
layers' bytes per block), whether the prompt ran or was refused as too long for the cache,
the prefill and decode times, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from typing import Any, Optional

MODES = ("hybrid", "one-pool")


def run_one(ns: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One mode, in this process: the long prompt, then ``--output-len`` greedy tokens."""
    from pagoda import LLM, SamplingParams
    from pagoda.worker.kv_cache import layer_counts

    llm = LLM(
        load_format="dummy",
        model_preset=ns.model_preset,
        dtype=ns.dtype,
        kv_cache_memory=ns.kv_cache_memory,
        max_model_len=ns.prompt_len + ns.output_len + 1,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        disable_hybrid_kv_cache_manager=mode == "one-pool",
    )
    engine = llm.engine
    kv, arch = engine.kv, engine.arch
    full_layers, sliding_layers = layer_counts(arch)
    caches = engine.runner.kv_caches
    per_layer_block = caches[0][:, 0].numel() * caches[0].element_size()  # one block, one layer
    if kv.sliding is None:
        full_layers, sliding_layers = arch.num_layers, 0
    peak = {"full": 0, "sliding": 0}
    schedule = engine.scheduler.schedule

    def tracked() -> Any:
        out = schedule()
        peak["full"] = max(peak["full"], kv.pool.num_used_blocks)
        if kv.sliding is not None:
            peak["sliding"] = max(peak["sliding"], kv.sliding.pool.num_used_blocks)
        return out

    engine.scheduler.schedule = tracked
    rng = random.Random(0)
    prompt = [rng.randrange(10, arch.vocab_size - 10) for _ in range(ns.prompt_len)]
    start = time.perf_counter()
    first = llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    prefill_s = time.perf_counter() - start
    ran = first[0].outputs[0].finish_reason == "length" and len(first[0].outputs[0].token_ids) == 1
    decode_s: Optional[float] = None
    if ran and ns.output_len > 1:  # the prefix is cached: this measures the decode steps
        params = SamplingParams(max_tokens=ns.output_len, ignore_eos=True, temperature=0.0)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        decode_s = time.perf_counter() - start
    return {
        "mode": mode,
        "prompt_len": ns.prompt_len,
        "ran": ran,
        "finish": first[0].outputs[0].finish_reason,
        "cache_tokens": kv.pool.num_blocks * kv.block_size,
        "sliding_pool_blocks": kv.sliding.pool.num_blocks if kv.sliding is not None else 0,
        "kv_bytes_allocated": sum(c.numel() * c.element_size() for c in caches),
        "peak_kv_bytes_held": per_layer_block
        * (peak["full"] * full_layers + peak["sliding"] * sliding_layers),
        "peak_blocks": peak,
        "blocks_freed": kv.sliding.num_freed if kv.sliding is not None else 0,
        "prefill_s": prefill_s,
        "second_pass_s": decode_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-preset", default="gemma-3-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=16384)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--kv-cache-memory", type=float, default=0.5, help="GiB, both modes")
    p.add_argument("--max-num-seqs", type=int, default=4, help="sizes the sliding pool")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="the prompt's chunk: the sliding layers hold its window plus one chunk",
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    ns = parse_args(argv)
    if ns.one:  # the child: one mode, its result as JSON on the last line
        print(json.dumps(run_one(ns, ns.one)))
        return 0
    rows = []
    for mode in ns.modes:
        cmd = [sys.executable, "-m", "pagoda.bench.sliding_kv", *(argv or sys.argv[1:])]
        done = subprocess.run([*cmd, "--one", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    mib = 1 << 20
    print(
        f"{'mode':<10} {'ran':>4} {'cache tokens':>13} {'KV alloc MiB':>13} "
        f"{'KV held MiB':>12} {'prefill s':>10} {'RSS MiB':>8}"
    )
    for r in rows:
        print(
            f"{r['mode']:<10} {str(r['ran']):>4} {r['cache_tokens']:>13} "
            f"{r['kv_bytes_allocated'] / mib:>13.1f} {r['peak_kv_bytes_held'] / mib:>12.1f} "
            f"{r['prefill_s']:>10.1f} {r['peak_rss_mib']:>8.0f}"
        )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

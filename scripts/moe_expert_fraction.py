"""The fraction of a MoE model's generate time spent in its sparse layers (router, grouped
experts and their scatter back), with dummy weights of a preset:

    .venv/bin/python scripts/moe_expert_fraction.py --model-preset qwen3-30b-a3b-4l

On the CPU every op runs synchronously, so wall-clock time around ``SparseMoE.forward`` is the
time spent there. Also reports the mean number of active experts per sparse layer call.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pagoda import LLM, SamplingParams
from pagoda.models import moe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-preset", default="qwen3-30b-a3b-4l")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    ns = p.parse_args()

    spent = {"moe": 0.0, "calls": 0, "active": 0}
    forward = moe.SparseMoE.forward

    def timed(self: moe.SparseMoE, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = forward(self, x)
        spent["moe"] += time.perf_counter() - start
        spent["calls"] += 1
        return out

    route = moe.route

    def counting(logits: torch.Tensor, top_k: int, renormalize: bool):
        weights, experts = route(logits, top_k, renormalize)
        spent["active"] += int(experts.unique().numel())
        return weights, experts

    llm = LLM(None, load_format="dummy", model_preset=ns.model_preset, dtype=ns.dtype)
    vocab = llm.engine.arch.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(ns.input_len)] for _ in range(ns.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    moe.SparseMoE.forward = timed  # type: ignore[method-assign]
    moe.route = counting
    start = time.perf_counter()
    llm.generate(prompts, params)
    total = time.perf_counter() - start
    moe.SparseMoE.forward = forward  # type: ignore[method-assign]
    moe.route = route
    tokens = ns.num_prompts * ns.output_len
    print(
        f"preset {ns.model_preset}, dtype {llm.engine.dtype}, {ns.num_prompts} prompts x "
        f"{ns.input_len} in / {ns.output_len} out"
    )
    print(f"generate: {total:.2f} s, {tokens / total:.1f} output tok/s")
    print(
        f"sparse MoE layers: {spent['moe']:.2f} s = {100 * spent['moe'] / total:.1f} % "
        f"({spent['calls']} calls, {spent['active'] / max(1, spent['calls']):.1f} active "
        f"experts per call)"
    )


if __name__ == "__main__":
    main()

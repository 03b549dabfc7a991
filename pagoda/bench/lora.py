"""``pagoda bench lora``: what serving LoRA adapters costs, offline, against the base alone.

The workload is ``bench throughput``'s (random token-id prompts, uniform input and output
lengths, greedy, ``ignore_eos``; W1 by default). Random rank-``--rank`` PEFT adapters over
every adaptable linear (q/k/v/o, gate/up/down) of the model are written to a temporary
directory, the files a user would download. Each round runs, one after the other on the same
workload: the base model on an engine without LoRA, then an engine with ``--enable-lora``
(``--max-loras`` = the most adapters asked) with the requests spread round robin over 0, 1,
4 and 8 distinct adapters (``--adapters``). Printed per configuration: output tokens/s per
round, the median, and the median over the base's: the cost of the adapters.

With ``--compare vllm``, vLLM's CPU backend (``bench/vllm_peer.py``, its own venv) runs in a
child with LoRA on (the same ``--max-loras`` and rank) on the same weights, prompts and adapter
files; in each round, after each pagoda configuration, vLLM runs the same adapter spread, and
the table adds vLLM's median and pagoda / vLLM.

Every run starts from an empty prefix cache (the same prompts under another adapter spread
would otherwise hit the last run's blocks). Invariant: a run counts only when every request
produced its full output length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Optional, Sequence

import torch
from safetensors.torch import save_file

from pagoda.bench.common import (
    check_outputs,
    greedy_params,
    machine_info,
    make_workload,
    parse_len_range,
    print_machine,
    row,
    warm_up,
    write_json,
)
from pagoda.bench.throughput import SETTLE_S, start_vllm, vllm_dtype
from pagoda.bench.vllm_peer import VllmPeer
from pagoda.lora.adapter import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, targets_for
from pagoda.lora_request import LoRARequest
from pagoda.models.config import ModelArch

BASE = "base (no LoRA)"


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=128)
    g.add_argument("--input-len", default="64:512", help="prompt tokens, MIN:MAX (uniform)")
    g.add_argument("--output-len", default="64:256", help="output tokens, MIN:MAX (uniform)")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument(
        "--adapters",
        default="0,1,4,8",
        help="distinct adapters the requests are spread over, one run each (comma list)",
    )
    g.add_argument("--rank", type=int, default=16, help="the adapters' rank")
    g.add_argument("--rounds", type=int, default=2, help="rounds of every configuration")
    g.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    g.add_argument("--compare", choices=["none", "vllm"], default="none")
    g.add_argument("--vllm-venv", default=None, help="vLLM's venv (default .venv-vllm)")
    g.add_argument("--vllm-dtype", default=None, help="vLLM's dtype (default: pagoda's)")
    g.add_argument("--vllm-enforce-eager", action="store_true")


def write_adapter(arch: ModelArch, path: str, rank: int, seed: int) -> str:
    """A random PEFT adapter of ``rank`` over every adaptable linear of ``arch``."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules = set()
    for layer_path, target in targets_for(arch).items():
        parent = layer_path.rpartition(".")[0]
        for name, rows in zip(target.shard_names, target.shards, strict=True):
            key = f"{PEFT_PREFIX}model.{parent}.{name}"
            a = torch.randn(rank, target.in_features, generator=gen) / target.in_features**0.5
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.01
            modules.add(name)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": sorted(modules), "task_type": "CAUSAL_LM"}  # fmt: skip
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f)
    return path


def timed_run(llm: Any, prompts: list[list[int]], outs: list[int], loras: Sequence[Any]) -> float:
    params = [greedy_params(n) for n in outs]
    llm.reset_prefix_cache()  # every run computes every prompt (no hits from the last one)
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False, lora_request=list(loras))
    elapsed = time.perf_counter() - start
    check_outputs(results, outs)
    return elapsed


def spread(adapters: list[LoRARequest], n: int) -> list[Optional[LoRARequest]]:
    """Request i runs under adapter i mod len(adapters) (none: the base)."""
    return [adapters[i % len(adapters)] if adapters else None for i in range(n)]


def main(ns: argparse.Namespace) -> int:
    from pagoda.entrypoints.cli import engine_args_from
    from pagoda.entrypoints.llm import LLM

    counts = [int(c) for c in ns.adapters.split(",")]
    if ns.rounds < 1 or any(c < 0 for c in counts):
        raise ValueError("--rounds must be >= 1 and --adapters counts >= 0")
    engine_args = engine_args_from(ns)
    base = LLM(**vars(engine_args))
    arch = base.engine.arch
    lora = LLM(
        **{
            **vars(engine_args),
            "enable_lora": True,
            "max_loras": max(max(counts), 1),
            "max_lora_rank": ns.rank,
        }  # fmt: skip
    )
    print_machine(machine_info())
    work = make_workload(
        ns.num_prompts,
        parse_len_range(ns.input_len, "--input-len"),
        parse_len_range(ns.output_len, "--output-len"),
        arch.vocab_size,
        ns.data_seed,
    )
    print(row("workload", f"{ns.num_prompts} prompts, in {ns.input_len}, out {ns.output_len}"))
    print(row("adapters", f"rank {ns.rank}, every q/k/v/o/gate/up/down; {counts}"))
    with tempfile.TemporaryDirectory(prefix="pagoda-lora-bench-") as tmp:
        adapters = [
            LoRARequest(f"bench-{i}", i + 1, write_adapter(arch, f"{tmp}/a{i}", ns.rank, i))
            for i in range(max(counts))
        ]
        warm_up(base, arch.vocab_size)
        warm_up(lora, arch.vocab_size)
        peer = start_peer(ns, lora, engine_args, work, max(max(counts), 1))
        try:
            rates, vllm_rates = run_rounds(ns, base, lora, peer, work, adapters, counts)
        finally:
            if peer is not None:
                peer.close()
    report = summarize(rates, vllm_rates)
    if ns.json:
        write_json(ns.json, {"machine": machine_info(), "args": vars(ns), "runs": report})
    return 0


Rates = dict[str, list[float]]


def run_rounds(
    ns: argparse.Namespace,
    base: Any,
    lora: Any,
    peer: Optional[VllmPeer],
    work: Any,
    adapters: list[LoRARequest],
    counts: list[int],
) -> tuple[Rates, Rates]:
    """Every configuration once a round, pagoda then (with a peer) vLLM on the same spread."""
    out_tokens = sum(work.output_lens)
    rates: Rates = {c: [] for c in [BASE] + [f"{c} adapters" for c in counts]}
    vllm_rates: Rates = {f"{c} adapters": [] for c in counts} if peer is not None else {}
    for r in range(ns.rounds):
        elapsed = timed_run(base, work.prompts, work.output_lens, [None] * ns.num_prompts)
        rates[BASE].append(out_tokens / elapsed)
        print(row(f"round {r + 1} {BASE}", f"{rates[BASE][-1]:.1f} output tok/s"))
        for c in counts:
            config, loras = f"{c} adapters", spread(adapters[:c], ns.num_prompts)
            elapsed = timed_run(lora, work.prompts, work.output_lens, loras)
            rates[config].append(out_tokens / elapsed)
            print(row(f"round {r + 1} {config}", f"{out_tokens / elapsed:.1f} output tok/s"))
            if peer is not None:
                time.sleep(SETTLE_S)
                specs = [(x.lora_name, x.lora_int_id, x.lora_path) if x else None for x in loras]
                v = peer.run_round(specs)
                vllm_rates[config].append(out_tokens / v.elapsed_s)
                print(row(f"round {r + 1} {config} vLLM", f"{vllm_rates[config][-1]:.1f}"))
                time.sleep(SETTLE_S)
    return rates, vllm_rates


def start_peer(
    ns: argparse.Namespace, lora: Any, engine_args: Any, work: Any, max_loras: int
) -> Optional[VllmPeer]:
    """vLLM's CPU backend with LoRA on, loaded and warmed up (None without --compare)."""
    if ns.compare != "vllm":
        return None
    dtype = vllm_dtype(ns, lora.engine.dtype)
    return start_vllm(ns, lora.engine, engine_args, work, dtype, max_loras, ns.rank)


def summarize(rates: Rates, vllm_rates: Rates) -> dict[str, dict]:
    base = statistics.median(rates[BASE])
    head = f"{'configuration':<20} {'output tok/s (rounds)':<32} {'median':>8} {'vs base':>8}"
    print("\n" + head + ("  vLLM median  pagoda/vLLM" if vllm_rates else ""))
    report = {}
    for config, values in rates.items():
        med = statistics.median(values)
        rounds = " / ".join(f"{v:.1f}" for v in values)
        line = f"{config:<20} {rounds:<32} {med:>8.1f} {med / base:>8.3f}"
        report[config] = {"output_tokens_per_s": values, "median": med, "vs_base": med / base}
        if config in vllm_rates:
            vmed = statistics.median(vllm_rates[config])
            line += f"  {vmed:>11.1f}  {med / vmed:>11.3f}"
            report[config]["vllm"] = {"output_tokens_per_s": vllm_rates[config], "median": vmed}
        print(line)
    return report

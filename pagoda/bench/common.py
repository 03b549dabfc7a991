"""What the benchmarks share: random token-id workloads, warm-up and output checks, the
machine's description and matmul limits, the report's rows and JSON, and transformers'
model of what pagoda loaded (the peer's weights)."""

from __future__ import annotations

import json
import os
import platform
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from pagoda.bench import flops
from pagoda.sampling import SamplingParams

LABEL_WIDTH = 21
TOKEN_MARGIN = 100  # keep random ids this far from both ends of the vocab (special tokens)
WARMUP_PROMPT_LEN = 16
WARMUP_OUTPUT_LEN = 4


@dataclass(frozen=True)
class Workload:
    """Random prompts (token ids) and the exact number of tokens each must produce."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def prefix(self, n: int) -> "Workload":
        return Workload(self.prompts[:n], self.output_lens[:n])


def parse_len_range(text: str, name: str) -> tuple[int, int]:
    """``"N"`` -> (N, N); ``"LO:HI"`` -> (LO, HI); ValueError naming ``name`` otherwise."""
    parts = str(text).strip().split(":")
    if len(parts) not in (1, 2):
        raise ValueError(f"{name}: expected N or LO:HI, got {text!r}")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{name}: expected integers as N or LO:HI, got {text!r}") from None
    lo, hi = values[0], values[-1]
    if lo < 1:
        raise ValueError(f"{name}: lengths must be >= 1, got {text!r}")
    if lo > hi:
        raise ValueError(f"{name}: LO must be <= HI, got {text!r}")
    return lo, hi


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """[lo, hi) of ids to draw from: away from the ends, where special tokens live."""
    margin = min(TOKEN_MARGIN, vocab_size // 4)
    return margin, vocab_size - margin


def make_workload(
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
    seed: int,
) -> Workload:
    """Deterministic in ``seed``: the same prompts for pagoda and for HF."""
    rng = random.Random(seed)
    lo, hi = token_id_range(vocab_size)
    prompts, outs = [], []
    for _ in range(num_prompts):
        n = rng.randint(*input_len)
        prompts.append([rng.randrange(lo, hi) for _ in range(n)])
        outs.append(rng.randint(*output_len))
    return Workload(prompts, outs)


def greedy_params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def warm_up(llm: Any, vocab_size: int) -> None:
    """Two short untimed requests: first-call allocations and kernel choices."""
    lo, _ = token_id_range(vocab_size)
    prompts = [
        [lo + i for i in range(WARMUP_PROMPT_LEN)],
        [lo + 2 * i for i in range(WARMUP_PROMPT_LEN // 2)],
    ]
    llm.generate(prompts, greedy_params(WARMUP_OUTPUT_LEN), use_tqdm=False)


def check_outputs(outputs: Sequence[Any], expected: Sequence[int]) -> None:
    """Every request must produce exactly its output length."""
    for i, (out, want) in enumerate(zip(outputs, expected, strict=True)):
        got = len(out.outputs[0].token_ids)
        if got != want:
            raise RuntimeError(
                f"request {i} produced {got} tokens, expected {want} "
                f"(finish_reason={out.outputs[0].finish_reason})"
            )


def row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return f"{label:<{LABEL_WIDTH}}: {value}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


def print_machine(info: dict) -> None:
    print("== machine ==")
    print(row("cpus / torch threads", f"{info['cpu_count']} / {info['torch_threads']}"))
    print(row("load average (1 min)", f"{info['load_average'][0]:.2f} at start"))


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")


def measure_limits(arch: Any, engine_args: Any, engine_dtype: torch.dtype) -> dict:
    """Matmul FLOP/s in bf16, fp32 and the engine's dtype, for the square and model shapes."""
    shapes = flops.model_matmul_shapes(arch, engine_args.token_budget, engine_args.max_num_seqs)
    out = {}
    for dtype in dict.fromkeys([torch.bfloat16, torch.float32, engine_dtype]):
        results = flops.measure(dtype, shapes)
        top = flops.best(results)
        out[dtype_name(dtype)] = {
            "best_flops_per_s": top.flops_per_s,
            "best_shape": top.label,
            "shapes": {r.label: r.flops_per_s for r in results},
        }
    return out


def print_limits(
    limits: dict, engine_dtype: torch.dtype, read_bytes_per_s: Optional[float] = None
) -> None:
    print("== matmul FLOP/s (torch, best of shapes) ==")
    for name, m in limits.items():
        print(
            row(
                f"{name} GFLOP/s",
                f"{m['best_flops_per_s'] / 1e9:.1f}  (best shape {m['best_shape']})",
            )
        )
    print(row("limit dtype", dtype_name(engine_dtype)))
    if read_bytes_per_s is not None:
        print(
            row("memory read GB/s", f"{read_bytes_per_s / 1e9:.1f}  (sum of a 1 GiB fp32 buffer)")
        )


def hf_model_path(model: Optional[str], gguf_file: Optional[str] = None) -> str:
    """The files pagoda loads for ``--model`` (a Hub id: in huggingface_hub's cache), for
    the peers to load the same."""
    from pagoda.models.hub import resolve_model
    from pagoda.models.loader import default_model_path

    return resolve_model(model or default_model_path(), gguf_file).path


def load_hf_model(path: str, dtype: torch.dtype) -> Any:
    """transformers' model for a directory or a .gguf file, in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        directory, name = os.path.split(os.path.abspath(path))
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=dtype, **_dense_gguf_kwargs()
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def _dense_gguf_kwargs() -> dict:
    """Ask transformers to unpack GGUF weights into dense ``dtype`` ones, as pagoda does
    (newer versions can keep them packed and compute through a quantized kernel)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def random_hf_model(config: dict, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' model of a preset's shapes with random weights (``--load-format dummy``):
    the peer for a benchmark that has no checkpoint either."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.to(dtype).eval()

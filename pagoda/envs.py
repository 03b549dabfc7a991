"""Every environment variable pagoda reads, declared once: its name, type, default and what it
does (the table in docs/envs.md is this file's, in words).

Each is an :class:`EnvVar`; calling it reads the environment *now* and returns the typed value
(``envs.FUSED()`` -> bool). Nothing reads ``os.environ`` for a switch anywhere else. A switch
is read when the piece it configures is built (a model's ops and attention backend in
``bind_ops``, the runner's sampler path, the packing and int4 row limits when the model is
prepared by ``models/prepare.py``, the C++ extension on its first load), never per step:
tests set one with ``monkeypatch.setenv`` before building an engine. ``TRITON_INTERPRET`` is
the exception in timing only: it is read when the Triton kernel modules are imported, the
moment triton itself reads it to decorate them.

Invariant: an unset variable gives the default; a variable set to a value the switch does not
name behaves as documented for "anything else" (nothing is refused here, except a row limit
that is not an integer, which raises when the model is loaded).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One environment variable. ``parse`` maps its raw value (None: unset) to the typed one;
    ``type`` and ``default`` are how docs/envs.md states them."""

    name: str
    type: str
    default: str
    doc: str
    parse: Callable[[Optional[str]], T]

    def __call__(self) -> T:
        """The value now (read on every call: call it once, when the piece is built)."""
        return self.parse(os.environ.get(self.name))


def _on_unless_zero(raw: Optional[str]) -> bool:
    return raw != "0"


def _is_one(raw: Optional[str]) -> bool:
    return raw == "1"


def _true_or_one(raw: Optional[str]) -> bool:
    """vLLM's reading of its boolean switches: "1" or "true" (any case, spaces trimmed)."""
    return (raw or "").strip().lower() in ("1", "true")


def _is_torch(raw: Optional[str]) -> bool:
    return raw == "torch"


def _raw(raw: Optional[str]) -> Optional[str]:
    return raw


def _optional_int(raw: Optional[str]) -> Optional[int]:
    return None if raw is None else int(raw)


def _forced(raw: Optional[str]) -> Optional[bool]:
    """'1' -> True (always), '0' -> False (never), anything else -> None (decided by timing)."""
    return {"1": True, "0": False}.get(raw or "")


def _cache_root(raw: Optional[str]) -> Path:
    return Path(raw or os.path.join("~", ".cache", "pagoda")).expanduser()


def _ext_dir(raw: Optional[str]) -> Path:
    return Path(raw or os.path.join(os.path.expanduser("~"), ".cache", "pagoda", "ext"))


# ------------------------------------------------------------------------- kernels and model
FUSED: EnvVar[bool] = EnvVar(
    "PAGODA_FUSED",
    "bool",
    "on",
    '"0" keeps the reference decoder ops and the sampler\'s torch argmax instead of the fused '
    "kernels (C++ on CPU bf16, Triton on CUDA 16-bit); anything else: fused where they apply. "
    "Read when the model's ops and the runner are built.",
    _on_unless_zero,
)
ATTENTION_REFERENCE: EnvVar[bool] = EnvVar(
    "PAGODA_ATTENTION",
    "str",
    "unset",
    '"torch" forces the PyTorch reference attention on every device (no C++, no Triton '
    "kernels); anything else is ignored. Read when the model's attention backend is chosen.",
    _is_torch,
)
AMX: EnvVar[bool] = EnvVar(
    "PAGODA_AMX",
    "bool",
    "on",
    '"0" keeps bf16 prefill chunks off the AMX tiles even where the CPU has them (on the '
    "AVX512-BF16 kernel where the CPU has it, else the reference SDPA); anything else: the AMX "
    "kernel where the CPU, OS and build allow it. Read when the attention backend is chosen.",
    _on_unless_zero,
)
BF16_ATTENTION: EnvVar[bool] = EnvVar(
    "PAGODA_BF16_ATTENTION",
    "bool",
    "on",
    '"0" keeps bf16 prefill chunks on the reference SDPA where AMX does not take them; '
    "anything else: the prefill kernel with its products on AVX512-BF16 where the CPU and "
    "build have it. Read when the attention backend is chosen.",
    _on_unless_zero,
)
PACKED_LINEAR: EnvVar[Optional[bool]] = EnvVar(
    "PAGODA_PACKED_LINEAR",
    "bool or unset",
    "unset (timed)",
    '"1" packs the CPU linear layers (and MoE experts, output projection) for oneDNN\'s GEMM '
    'without timing, where the CPU supports it; "0" never packs; anything else: packed where '
    "timing at load says it pays.",
    _forced,
)
BF16_KERNEL: EnvVar[Optional[bool]] = EnvVar(
    "PAGODA_BF16_KERNEL",
    "bool or unset",
    "unset (timed)",
    '"1" runs the bf16 linear layers (and output projection) on pagoda\'s own GEMM kernel '
    '(invariant_gemm.cpp) without timing, where the CPU has AVX512-BF16; "0" never does '
    "(oneDNN or torch, as PAGODA_PACKED_LINEAR says); anything else: the kernel where timing "
    "at load finds it faster than oneDNN's forms at every row count timed. Ignored under "
    "--deterministic, which always runs bf16 layers on it.",
    _forced,
)
INT8_FOR_4BIT: EnvVar[Optional[bool]] = EnvVar(
    "PAGODA_INT8_FOR_4BIT",
    "bool or unset",
    "unset (timed)",
    'Under --quantization auto, a GGUF\'s 4-bit codes (Q4_0, Q4_1, Q4_K): "1" runs them on '
    'the int8 kernel, two codes a byte; "0" on torch\'s 4-bit kernel; anything else: the one '
    "timing at load finds faster on this CPU.",
    _forced,
)
INT4_MAX_ROWS: EnvVar[Optional[int]] = EnvVar(
    "PAGODA_INT4_MAX_ROWS",
    "int or unset",
    "unset (timed)",
    "With --quantization int4, and for the int8 layers and output projection of a quantized "
    "GGUF: the most rows a step may have to run the 4-bit (int8) kernel (dense GEMM above it; "
    "0: never the quantized form); unset: timed on this CPU at load. Must be an integer.",
    _optional_int,
)
BATCH_INVARIANT: EnvVar[bool] = EnvVar(
    "VLLM_BATCH_INVARIANT",
    "bool",
    "off",
    "vLLM's switch, the same as --deterministic (docs/deterministic.md): every kernel computes "
    "a row the same way whatever else the step holds (batch-invariant linears and attention). "
    '"1" or "true" (any case): on; anything else: off. Read when the model is prepared.',
    _true_or_one,
)
EXT_DIR: EnvVar[Path] = EnvVar(
    "PAGODA_EXT_DIR",
    "path",
    "~/.cache/pagoda/ext",
    "Where the C++ extension (pagoda/kernels/csrc) is built and cached, one folder per hash of "
    "its sources, flags, torch, Python and CPU. Read on the extension's first load.",
    _ext_dir,
)
TRITON_INTERPRET: EnvVar[bool] = EnvVar(
    "TRITON_INTERPRET",
    "bool",
    "off",
    'Triton\'s own switch: "1" runs the Triton kernels in its interpreter on CPU tensors '
    "(the tests). pagoda reads it when its Triton modules are imported (as triton does) to "
    "work around the interpreter's bf16 roundings; set it before importing triton.",
    _is_one,
)

# ------------------------------------------------------------------------------ the server
KV_SECRET: EnvVar[Optional[str]] = EnvVar(
    "PAGODA_KV_SECRET",
    "str",
    "unset",
    "Disaggregated prefill: the secret shared by every prefill and decode instance, signing "
    "the side channel's messages, where --kv-secret is not given (one of them is required).",
    _raw,
)
API_KEY: EnvVar[Optional[str]] = EnvVar(
    "PAGODA_API_KEY",
    "str",
    "unset",
    "pagoda serve: the API key clients must send (Authorization: Bearer, or x-api-key), "
    "where --api-key is not given.",
    _raw,
)
ALLOW_RUNTIME_LORA_UPDATING: EnvVar[bool] = EnvVar(
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
    "bool",
    "off",
    "pagoda serve: vLLM's switch, the same as --allow-runtime-lora: POST "
    "/v1/load_lora_adapter and /v1/unload_lora_adapter are taken (a 404 without it), loads "
    'only from --lora-allowed-dir. "1" or "true" (any case): on; anything else: off.',
    _true_or_one,
)

# -------------------------------------------------------------------------------- benchmarks
CACHE_DIR: EnvVar[Path] = EnvVar(
    "PAGODA_CACHE_DIR",
    "path",
    "~/.cache/pagoda",
    "Benchmarks' cache: GGUF files converted for the vLLM peer, and its log.",
    _cache_root,
)
VLLM_VENV: EnvVar[Optional[str]] = EnvVar(
    "VLLM_VENV",
    "path",
    "unset (.venv-vllm)",
    "pagoda bench --compare vllm: the virtualenv the vLLM peer runs in, where --vllm-venv is "
    "not given.",
    _raw,
)

ALL: tuple[EnvVar[Any], ...] = (
    FUSED,
    ATTENTION_REFERENCE,
    AMX,
    BF16_ATTENTION,
    PACKED_LINEAR,
    BF16_KERNEL,
    INT8_FOR_4BIT,
    INT4_MAX_ROWS,
    BATCH_INVARIANT,
    EXT_DIR,
    TRITON_INTERPRET,
    KV_SECRET,
    API_KEY,
    ALLOW_RUNTIME_LORA_UPDATING,
    CACHE_DIR,
    VLLM_VENV,
)


def table() -> str:
    """The declarations as a markdown table (docs/envs.md holds it; a test keeps them equal)."""
    rows = ["| variable | type | default | what it does |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.type} | {v.default} | {v.doc} |" for v in ALL]
    return "\n".join(rows)

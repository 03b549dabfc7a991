"""Load GGUF checkpoints (llama/mistral, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3) as
Hugging Face style config and weights.

Parses the GGUF container itself, dequantizes ggml block formats with vectorized numpy, undoes
what llama.cpp's converter did to the tensors (the llama Q/K row permutation, Gemma's 1 + w
norm weights, experts stacked per layer), rebuilds the HF config from the metadata as llama.cpp
reads it, and builds a fast tokenizer from the GGUF vocabulary. Asked to (``codes``), it also
keeps each matrix stored in a format with codes as the file stores it (gguf_codes.py), for
``--quantization auto`` to run.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import gguf
import numpy as np
import torch

from pagoda.models.gguf_codes import (
    CODE_TYPES,
    dequantize_blocks,
    fp16_field,
    quantized_tensor,
)
from pagoda.models.quantized import QuantizedTensor
from pagoda.utils import cdiv

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Q = gguf.GGMLQuantizationType


class GGUFError(ValueError):
    """A GGUF file (or part of it) that this loader cannot handle."""


@dataclass
class GGUFCheckpoint:
    config: dict
    tensors: dict[str, torch.Tensor]
    chat_template: str | None
    path: str
    # With ``codes``: each matrix the file stores in a format with codes (gguf_codes.py), as
    # stored, by HF name, its rows in the order of ``tensors`` (MoE experts excluded).
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- container parsing

_SCALAR_FMT = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass
class _TensorInfo:
    name: str
    ggml_type: int
    ne: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


class _Cursor:
    """Sequential little-endian reader over a bytes-like buffer."""

    def __init__(self, buf: Any, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        if vtype not in _SCALAR_FMT:
            raise GGUFError(f"unknown GGUF metadata value type {vtype} at byte {self.pos}")
        return self.unpack(_SCALAR_FMT[vtype])

    def array(self) -> list:
        vtype, count = self.unpack("<I"), self.unpack("<Q")
        if vtype in _SCALAR_FMT:  # numeric arrays in one go
            dt = np.dtype(_SCALAR_FMT[vtype])
            out = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += dt.itemsize * count
            return out.tolist()
        return [self.value(vtype) for _ in range(count)]


class _GGUFFile:
    """Metadata and tensor directory of a GGUF file; tensor bytes stay memory-mapped."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except GGUFError:
            raise
        except (struct.error, ValueError) as e:
            raise GGUFError(f"{path}: truncated or corrupt GGUF header ({e})") from e

    def _parse(self) -> None:
        path, cur = self.path, _Cursor(self._mm)
        if bytes(self._mm[:4]) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic {bytes(self._mm[:4])!r})")
        cur.pos = 4
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise GGUFError(
                f"{path}: unsupported GGUF version {self.version} (need 2 or 3, little-endian)"
            )
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.fields[key] = cur.value(cur.unpack("<I"))
        self.tensors = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = int(self.fields.get("general.alignment", 32))
        self.data_start = cdiv(cur.pos, align) * align

    @staticmethod
    def _tensor_info(cur: _Cursor) -> _TensorInfo:
        name = cur.string()
        ne = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
        return _TensorInfo(name, cur.unpack("<I"), ne, cur.unpack("<Q"))

    def raw(self, info: _TensorInfo) -> np.ndarray:
        """The tensor's bytes (a read-only view of the mapped file)."""
        qtype = _qtype(info.ggml_type, info.name)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(info.ne) // block * type_size
        if self.data_start + info.offset + nbytes > len(self._mm):
            raise GGUFError(f"tensor {info.name!r} runs past the end of {self.path}")
        return np.frombuffer(
            self._mm, dtype=np.uint8, count=nbytes, offset=self.data_start + info.offset
        )


def _qtype(type_id: int, tensor: str) -> Q:
    try:
        return Q(type_id)
    except ValueError:
        raise GGUFError(f"tensor {tensor!r} has unknown ggml type id {type_id}") from None


# --------------------------------------------------------------------------- dequantization


def _deq_f32(b: np.ndarray) -> np.ndarray:
    return b.view(np.float32).copy()


def _deq_f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _deq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit fields of 2x32 packed bytes in ggml's K-quant order; shape (n, 16, 16)."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 16, 16)


def _deq_q2_k(b: np.ndarray) -> np.ndarray:
    sc = b[:, 0:16]
    dl = fp16_field(b, 80) * (sc & 0x0F).astype(np.float32)
    ml = fp16_field(b, 82) * (sc >> 4).astype(np.float32)
    return dl[:, :, None] * _crumbs(b[:, 16:80]) - ml[:, :, None]


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """Sixteen signed 6-bit scales packed into 12 bytes (Q3_K)."""
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).repeat(4)[None, :]
    high = (np.tile(s[:, 8:12], 4) >> shifts) & 3
    return (low | (high << 4)).astype(np.float32) - 32


def _deq_q3_k(b: np.ndarray) -> np.ndarray:
    dl = fp16_field(b, 108) * _q3_k_scales(b[:, 96:108])
    hbit = (b[:, None, 0:32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = _crumbs(b[:, 32:96]).astype(np.int8) - (4 * (1 - hbit)).astype(np.int8).reshape(-1, 16, 16)
    return dl[:, :, None] * q


_DEQUANT: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: _deq_f32,
    Q.F16: _deq_f16,
    Q.BF16: _deq_bf16,
    Q.Q2_K: _deq_q2_k,
    Q.Q3_K: _deq_q3_k,
    # The formats with codes: their scale * code + offset (gguf_codes.py).
    **{qtype: functools.partial(dequantize_blocks, qtype=qtype) for qtype in CODE_TYPES},
}
SUPPORTED_QTYPES: frozenset[Q] = frozenset(_DEQUANT)


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode raw ggml data into a float32 tensor of the logical (row-major) `shape`."""
    qtype = Q(qtype)
    if qtype not in _DEQUANT:
        raise GGUFError(f"unsupported ggml quantization type {qtype.name}")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n = math.prod(shape)
    if n % block or data.size != n // block * type_size:
        raise GGUFError(
            f"{qtype.name} data of {data.size} bytes does not hold shape {tuple(shape)}"
        )
    values = _DEQUANT[qtype](data.reshape(-1, type_size))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class _Arch:
    """A llama.cpp architecture: its HF model type and class, the GGUF block tensors it may hold
    (GGUF name -> HF module), and the transforms llama.cpp's converter applied to them."""

    model_type: str
    hf_class: str
    block_names: dict[str, str]
    permuted_qk: bool = False  # Q/K rows interleaved for llama.cpp's RoPE (llama only)
    norm_offset: float = 0.0  # Gemma: each RMSNorm weight stored as w + 1
    experts: bool = False  # stacked expert tensors blk.N.ffn_{gate,up,down}_exps


_ATTENTION = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LLAMA_BLOCK = {**_ATTENTION, "ffn_norm": "post_attention_layernorm", **_MLP}
# Gemma's sandwich norms: llama.cpp's ffn_norm is the norm before the MLP.
_GEMMA_BLOCK = {
    **_ATTENTION,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    **_MLP,
}

_PHI3_BLOCK = {
    **_ATTENTION,
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}

_ARCHS = {
    "llama": _Arch("llama", "LlamaForCausalLM", _LLAMA_BLOCK, permuted_qk=True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCK, **_QK_NORM}),
    # Every layer sparse (llama.cpp's graph has no dense layers for it): router + experts.
    "qwen3moe": _Arch(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        {
            **_ATTENTION,
            **_QK_NORM,
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate_inp": "mlp.gate",
        },
        experts=True,
    ),
    # Phi-3 keeps HF's fused tensors: attn_qkv (or separate q/k/v), and ffn_up holding the
    # gate rows then the up rows (there is no ffn_gate).
    "phi3": _Arch("phi3", "Phi3ForCausalLM", _PHI3_BLOCK),
    "gemma2": _Arch("gemma2", "Gemma2ForCausalLM", _GEMMA_BLOCK, norm_offset=1.0),
    "gemma3": _Arch(
        "gemma3_text", "Gemma3ForCausalLM", {**_GEMMA_BLOCK, **_QK_NORM}, norm_offset=1.0
    ),
}


def _arch_of(fields: dict[str, Any]) -> tuple[str, _Arch]:
    arch = fields.get("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(f"unsupported GGUF architecture {arch!r} (supported: {sorted(_ARCHS)})")
    return arch, _ARCHS[arch]


# --------------------------------------------------------------------------- names, permutation

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IGNORED = re.compile(
    r"rope_freqs\.weight|rope_factors_(long|short)\.weight"
    r"|blk\.\d+\.attn_rot_embd(\.weight)?"
)
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")
# Stacked experts (experts, out, in); gate_up: gate rows then up rows per expert.
_EXPERTS_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight")


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF parameter name for a GGUF tensor of architecture `arch`; None for
    known-irrelevant tensors. Stacked expert tensors have no single name (split_experts)."""
    if _IGNORED.fullmatch(gguf_name):
        return None
    block_names = _ARCHS[arch].block_names
    if m := _BLOCK_RE.fullmatch(gguf_name):
        if m.group(2) in block_names:
            return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"
    elif (m := _TOP_RE.fullmatch(gguf_name)) and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise GGUFError(f"unknown GGUF tensor {gguf_name!r} for architecture {arch!r}")


def split_experts(gguf_name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stacked expert tensor (experts, out, in) -> each expert's HF matrix (views of `w`):
    ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``."""
    m = _EXPERTS_RE.fullmatch(gguf_name)
    if m is None or w.dim() != 3:
        raise GGUFError(f"{gguf_name!r} of shape {tuple(w.shape)} is not a stacked expert tensor")
    layer, kind = m.groups()
    parts = {kind: w}
    if kind == "gate_up":
        if w.shape[1] % 2:
            raise GGUFError(f"{gguf_name!r}: an odd number of gate_up rows ({w.shape[1]})")
        gate, up = w.split(w.shape[1] // 2, dim=1)
        parts = {"gate": gate, "up": up}
    return {
        f"model.layers.{layer}.mlp.experts.{e}.{matrix}_proj.weight": expert
        for matrix, stacked in parts.items()
        for e, expert in enumerate(stacked.unbind(0))
    }


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K row permutation (interleaved RoPE back to rotate-half)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- config


def _short_float(x: float) -> float:
    """A float32 metadata value in its shortest decimal form (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _uniform(value: Any, key: str) -> Any:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"per-layer values for {key} are not supported: {value[:8]}...")
        return value[0]
    return value


def _model_type(arch: str, fields: dict[str, Any]) -> tuple[str, str]:
    names = f"{fields.get('general.name', '')} {fields.get('general.basename', '')}".lower()
    if arch == "llama" and "mistral" in names:
        return "mistral", "MistralForCausalLM"
    return _ARCHS[arch].model_type, _ARCHS[arch].hf_class


def _head_dim(
    fields: dict[str, Any], arch: str, q_rows: int | None, n_head: int, hidden: int
) -> int:
    if (key_length := fields.get(f"{arch}.attention.key_length")) is not None:
        return int(key_length)
    return (q_rows or hidden) // n_head


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Recover HF llama3 rope_scaling from llama.cpp's per-frequency `rope_freqs` factors.

    Assumes low_freq_factor = 1 (true of all Llama 3.x); solves for the rest from the
    smoothly interpolated band, falling back to the Llama 3.1 defaults if it is too narrow.
    All-ones factors (no scaling) give None.
    """
    f = np.asarray(factors, dtype=np.float64)
    factor = float(f.max())
    if factor <= 1.0:
        return None
    inv_wavelen = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    mid = (f > 1 + 1e-4) & (f < factor - 1e-4)
    scaling = {
        "rope_type": "llama3",
        "factor": _short_float(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if mid.sum() >= 2:
        smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_wavelen[mid], smooth, 1)
        high = 1 - 1 / intercept
        scaling["high_freq_factor"] = round(float(high), 3)
        scaling["original_max_position_embeddings"] = int(round(slope * (high - 1)))
    return scaling


def _rope_scaling(
    fields: dict[str, Any], arch: str, rope_freqs: np.ndarray | None, theta: float, head_dim: int
) -> dict | None:
    kind = fields.get(f"{arch}.rope.scaling.type")
    factor = fields.get(f"{arch}.rope.scaling.factor")
    original = fields.get(f"{arch}.rope.scaling.original_context_length")
    if kind in ("linear", "yarn") and factor:
        out = {"rope_type": kind, "factor": _short_float(factor)}
        if original:
            out["original_max_position_embeddings"] = int(original)
        return out
    if rope_freqs is not None:
        return llama3_rope_scaling(rope_freqs, theta, head_dim)
    return None


class _Meta:
    """The file's metadata under its architecture's prefix, and its tensor directory."""

    def __init__(self, g: _GGUFFile) -> None:
        self.fields = g.fields
        self.arch = _arch_of(g.fields)[0]
        self.tensors = {t.name: t for t in g.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        key = f"{self.arch}.{key}"
        return _uniform(self.fields.get(key, default), key)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.arch} GGUF without {self.arch}.{key}")
        return value

    def has(self, tensor: str) -> bool:
        return tensor in self.tensors


def _build_config(g: _GGUFFile, tensors: dict[str, np.ndarray]) -> dict:
    """The HF config dict; `tensors` holds the small metadata tensors read up front
    (rope_freqs, rope_factors_long / _short)."""
    meta = _Meta(g)
    arch, fields = meta.arch, meta.fields
    n_head = int(meta.require("attention.head_count"))
    hidden = int(meta.require("embedding_length"))
    q = meta.tensors.get("blk.0.attn_q.weight")
    head_dim = _head_dim(fields, arch, q.shape[0] if q else None, n_head, hidden)
    theta = _short_float(meta.get("rope.freq_base", 10000.0))
    model_type, cls = _model_type(arch, fields)
    vocab = meta.get("vocab_size") or len(fields.get("tokenizer.ggml.tokens", ()))
    vocab = vocab or meta.tensors["token_embd.weight"].shape[0]
    config = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta.get("feed_forward_length", 0)),
        "num_hidden_layers": int(meta.require("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": _short_float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(
            fields, arch, tensors.get("rope_freqs.weight"), theta, head_dim
        ),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(meta.get("context_length", 2048)),
        "tie_word_embeddings": not meta.has("output.weight"),
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _end_of_generation(fields),
        "attention_bias": meta.has("blk.0.attn_q.bias") or meta.has("blk.0.attn_qkv.bias"),
    }
    extra = _FAMILY_CONFIG.get(arch)
    return {**config, **extra(meta, config, tensors)} if extra else config


def _end_of_generation(fields: dict[str, Any]) -> int | list[int] | None:
    """EOS, with the end-of-turn / end-of-message tokens llama.cpp also stops at (Gemma's
    <end_of_turn>: HF configs list it beside EOS) where the file names them."""
    ids = [
        fields[f"tokenizer.ggml.{key}_token_id"]
        for key in ("eos", "eot", "eom")
        if f"tokenizer.ggml.{key}_token_id" in fields
    ]
    ids = list(dict.fromkeys(ids))
    return ids[0] if len(ids) == 1 else (ids or None)


def _moe_config(meta: _Meta, config: dict, tensors: dict[str, np.ndarray]) -> dict:
    """Qwen3-MoE: expert counts and width; llama.cpp always renormalises the top-k weights
    (HF norm_topk_prob) unless the file says expert_weights_norm = false."""
    gating = meta.get("expert_gating_func")
    if gating not in (None, gguf.ExpertGatingFuncType.SOFTMAX.value):
        raise GGUFError(f"{meta.arch}: unsupported expert gating function {gating} (softmax only)")
    if meta.get("expert_shared_count") or meta.get("expert_shared_feed_forward_length"):
        raise GGUFError(f"{meta.arch}: shared experts are not supported")
    width = meta.get("expert_feed_forward_length")
    if width is None:  # an expert's down projection is (hidden, width)
        down = next(
            (t for n, t in meta.tensors.items() if n.endswith("ffn_down_exps.weight")), None
        )
        if down is None:
            raise GGUFError(f"{meta.arch} GGUF without expert tensors (blk.N.ffn_down_exps)")
        width = down.shape[-1]
    return {
        "num_experts": int(meta.require("expert_count")),
        "num_experts_per_tok": int(meta.require("expert_used_count")),
        "moe_intermediate_size": int(width),
        "norm_topk_prob": bool(meta.get("expert_weights_norm", True)),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "intermediate_size": config["intermediate_size"] or int(width),
    }


def _phi3_config(meta: _Meta, config: dict, tensors: dict[str, np.ndarray]) -> dict:
    """Phi-3 / Phi-4: partial rotary (rope.dimension_count of head_dim), the sliding window
    (0: none), and LongRoPE from the rope_factors_long / _short tensors."""
    head_dim = config["head_dim"]
    rotary = int(meta.get("rope.dimension_count", head_dim))
    original = meta.get("rope.scaling.original_context_length")
    window = meta.get("attention.sliding_window")
    out: dict[str, Any] = {
        "partial_rotary_factor": rotary / head_dim,
        "sliding_window": int(window) if window else None,
    }
    if original:
        out["original_max_position_embeddings"] = int(original)
    long, short = tensors.get("rope_factors_long.weight"), tensors.get("rope_factors_short.weight")
    if long is None and short is None:
        return out
    if long is None or short is None or not original:
        raise GGUFError(
            f"{meta.arch}: LongRoPE needs rope_factors_long, rope_factors_short and "
            "rope.scaling.original_context_length"
        )
    scaling = {
        "rope_type": "longrope",
        "short_factor": [_short_float(x) for x in short.reshape(-1)],
        "long_factor": [_short_float(x) for x in long.reshape(-1)],
        "original_max_position_embeddings": int(original),
    }
    attn = meta.get("rope.scaling.attn_factor")
    if attn is not None and not math.isclose(
        attn, _longrope_attention(config["max_position_embeddings"], int(original)), rel_tol=1e-6
    ):
        scaling["attention_factor"] = _short_float(attn)
    return {**out, "rope_scaling": scaling}


def _longrope_attention(context: int, original: int) -> float:
    """LongRoPE's default attention factor (transformers' and llama.cpp's converter's)."""
    factor = context / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


# llama.cpp's Gemma graphs scale the queries by 1/sqrt(hidden / heads) in the 27B models (which
# it recognises by their layer count), else by 1/sqrt(head_dim).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Layers per sliding-window period (the last of each is global), as llama.cpp fixes them.
_GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA3_LOCAL_THETA = 10000.0


def _gemma_config(meta: _Meta, config: dict, tensors: dict[str, np.ndarray]) -> dict:
    """Gemma 2 / 3 (text): GeGLU, the query scale, soft-caps, which layers slide, and
    Gemma 3's RoPE base for its sliding layers."""
    arch, n_layers = meta.arch, config["num_hidden_layers"]
    scale = meta.get("attention.scale")
    if scale:
        scalar: float = _short_float(1.0 / float(scale) ** 2)
    elif n_layers == _GEMMA_27B_LAYERS[arch]:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    else:
        scalar = config["head_dim"]
    window = meta.get("attention.sliding_window")
    pattern = meta.fields.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        period = int(pattern or _GEMMA_SWA_PATTERN[arch])
        sliding = [(i + 1) % period != 0 for i in range(n_layers)]
    if len(sliding) != n_layers:
        raise GGUFError(f"{arch}: sliding_window_pattern lists {len(sliding)} of {n_layers} layers")
    soft_attn, soft_final = meta.get("attn_logit_softcapping"), meta.get("final_logit_softcapping")
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(window) if window else None,
        "layer_types": [
            "sliding_attention" if slides and window else "full_attention" for slides in sliding
        ],
        "attn_logit_softcapping": _short_float(soft_attn) if soft_attn else None,
        "final_logit_softcapping": _short_float(soft_final) if soft_final else None,
    }
    if arch == "gemma3":
        local = meta.get("rope.freq_base_swa", _GEMMA3_LOCAL_THETA)
        out["rope_local_base_freq"] = _short_float(local)
        if meta.get("rope.freq_base") is None:
            out["rope_theta"] = 1_000_000.0  # transformers' Gemma 3 default
    return out


_FAMILY_CONFIG: dict[str, Callable[[_Meta, dict, dict[str, np.ndarray]], dict]] = {
    "qwen3moe": _moe_config,
    "phi3": _phi3_config,
    "gemma2": _gemma_config,
    "gemma3": _gemma_config,
}


# --------------------------------------------------------------------------- loading


def _read_tensor(g: _GGUFFile, info: _TensorInfo) -> torch.Tensor:
    qtype = _qtype(info.ggml_type, info.name)
    if qtype not in _DEQUANT:
        raise GGUFError(f"tensor {info.name!r} uses unsupported quantization type {qtype.name}")
    return dequantize(g.raw(info), qtype, info.shape)


def _fix_layout(name: str, w: torch.Tensor, config: dict, spec: _Arch) -> torch.Tensor:
    """Undo the converter's transforms: llama's Q/K row permutation (qwen, phi3 and gemma
    GGUFs are not permuted), Gemma's +1 on every RMSNorm weight."""
    if spec.norm_offset and name.endswith("norm.weight"):
        return w - spec.norm_offset
    heads = _permuted_heads(name, config, spec)
    return w if heads is None else unpermute_rows(w, heads)


def _permuted_heads(name: str, config: dict, spec: _Arch) -> int | None:
    """The heads over which llama.cpp's converter permuted this tensor's rows (None: not)."""
    if not spec.permuted_qk:
        return None
    if ".self_attn.q_proj." in name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in name:
        return int(config["num_key_value_heads"])
    return None


def _read_codes(
    g: _GGUFFile, info: _TensorInfo, name: str, config: dict, spec: _Arch
) -> QuantizedTensor | None:
    """The matrix as the file stores it, rows unpermuted as :func:`_fix_layout` does (None
    where its type has no codes, or it is not a matrix)."""
    qtype = _qtype(info.ggml_type, info.name)
    if qtype not in CODE_TYPES or len(info.shape) != 2:
        return None
    q = quantized_tensor(g.raw(info), qtype, info.shape)
    heads = _permuted_heads(name, config, spec)
    return q if heads is None else q.rows(unpermute_rows(torch.arange(q.shape[0]), heads))


# Small tensors the config is built from (read before the others).
_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def load_gguf(path: str, dtype: torch.dtype = torch.float32, codes: bool = False) -> GGUFCheckpoint:
    """Read a GGUF file into an HF config and HF-named tensors of `dtype`, one tensor at a time;
    with ``codes``, also each quantized matrix as the file stores it (``quantized``)."""
    g = _GGUFFile(path)
    arch, spec = _arch_of(g.fields)
    small = {t.name: _read_tensor(g, t).numpy() for t in g.tensors if t.name in _CONFIG_TENSORS}
    config = _build_config(g, small)
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    for info in g.tensors:
        if spec.experts and _EXPERTS_RE.fullmatch(info.name):
            w = _read_tensor(g, info)
            tensors.update(split_experts(info.name, w if dtype == torch.float32 else w.to(dtype)))
            continue
        name = hf_tensor_name(info.name, arch)
        if name is not None:
            w = _fix_layout(name, _read_tensor(g, info), config, spec)
            tensors[name] = w if dtype == torch.float32 else w.to(dtype)
            q = _read_codes(g, info, name, config, spec) if codes else None
            if q is not None:
                quantized[name] = q
    template = g.fields.get("tokenizer.chat_template")
    return GGUFCheckpoint(config, tensors, template, path, quantized)


# --------------------------------------------------------------------------- tokenizer

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex ("" = GPT-2's built-in byte-level regex). Others use
# transformers.
_PRE_SPLITS = {
    "smollm": "",
    "gpt-2": "",
    "gpt2": "",
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character mapping."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return mapping


def _byte_level_backend(fields: dict[str, Any], split: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    letters = set(alphabet.values())

    def spell(token: str) -> str:  # tokens outside the byte alphabet are respelled byte by byte
        if set(token) <= letters:
            return token
        return "".join(alphabet[c] for c in token.encode("utf-8"))

    vocab = {spell(t): i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in fields.get("tokenizer.ggml.merges", [])]
    tk = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split:
        to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        cut = pre_tokenizers.Split(Regex(split), behavior="isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence([cut, to_bytes])
    tk.decoder = decoders.ByteLevel()
    return tk


def _marked_tokens(fields: dict[str, Any], kind: int) -> list[str]:
    """Tokens of one llama.cpp token_type (3 = control, 4 = user-defined) spelled in the byte
    alphabet."""
    letters = set(_byte_alphabet().values())
    types = fields.get("tokenizer.ggml.token_type") or ()
    # strict=False: a file without token types has none (then no token is marked).
    return [
        t
        for t, k in zip(fields["tokenizer.ggml.tokens"], types, strict=False)
        if k == kind and set(t) <= letters
    ]


def _fast_byte_level_tokenizer(fields: dict[str, Any], split: str) -> PreTrainedTokenizerBase:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tk = _byte_level_backend(fields, split)
    control = [AddedToken(t, special=True, normalized=False) for t in _marked_tokens(fields, 3)]
    tk.add_special_tokens(control)
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in _marked_tokens(fields, 4)]
    )
    tokens = fields["tokenizer.ggml.tokens"]
    named = {
        f"{role}_token": tokens[fields[f"tokenizer.ggml.{key}"]]
        for role, key in (
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"),
        )
        if f"tokenizer.ggml.{key}" in fields
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        extra_special_tokens=control,
        **named,
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
    )


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A fast tokenizer for the GGUF's vocabulary, with its special tokens and chat template:
    byte-level BPE built here; SentencePiece vocabularies (tokenizer.ggml.model "llama": Gemma,
    Phi-3, Llama 2) and the rest by transformers' GGUF converters, which know each
    architecture's variant (Gemma's unprefixed text and merge order, Phi-3's normalizer)."""
    fields = _GGUFFile(path).fields
    split = _PRE_SPLITS.get(fields.get("tokenizer.ggml.pre", "gpt2"))
    if fields.get("tokenizer.ggml.model") == "gpt2" and split is not None:
        return _fast_byte_level_tokenizer(fields, split)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
    )

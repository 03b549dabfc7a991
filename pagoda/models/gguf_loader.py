"""Load GGUF checkpoints (llama/mistral, qwen2, qwen3) as Hugging Face style weights.

Parses the GGUF container itself, dequantizes ggml block formats with vectorized numpy,
undoes llama.cpp's Q/K row permutation, and builds a fast tokenizer from the GGUF vocabulary.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import gguf
import numpy as np
import torch

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


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """fp16 field at byte `start` of every block, as float32 of shape (n, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles then high nibbles of each block's packed bytes (ggml Q4/Q5 order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, n: int) -> np.ndarray:
    """Bit i of a little-endian bit field, for i < n; shape (blocks, n)."""
    words = packed.copy().view("<u4")
    return ((words >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def _deq_f32(b: np.ndarray) -> np.ndarray:
    return b.view(np.float32).copy()


def _deq_f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _deq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * b[:, 2:].view(np.int8)


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8))


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _nibbles(b[:, 4:]) + _f16(b, 2)


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b, 0) * (q.astype(np.int8) - np.int8(16))


def _deq_q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _f16(b, 0) * q + _f16(b, 2)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs packed into 12 bytes (Q4_K / Q5_K)."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([s0 & 63, (s2 & 0x0F) | ((s0 >> 6) << 4)], axis=1)
    mn = np.concatenate([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """d*scale*q - dmin*min over eight 32-wide sub-blocks; q has shape (n, 8, 32)."""
    sc, mn = _k_scale_min(b[:, 4:16])
    return (_f16(b, 0) * sc)[:, :, None] * q - (_f16(b, 2) * mn)[:, :, None]


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    return _k_affine(b, q)


def _deq_q5_k(b: np.ndarray) -> np.ndarray:
    qs = b[:, 48:176].reshape(-1, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _k_affine(b, low | (high << 4))


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit fields of 2x32 packed bytes in ggml's K-quant order; shape (n, 16, 16)."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 16, 16)


def _deq_q2_k(b: np.ndarray) -> np.ndarray:
    sc = b[:, 0:16]
    dl = _f16(b, 80) * (sc & 0x0F).astype(np.float32)
    ml = _f16(b, 82) * (sc >> 4).astype(np.float32)
    return dl[:, :, None] * _crumbs(b[:, 16:80]) - ml[:, :, None]


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """Sixteen signed 6-bit scales packed into 12 bytes (Q3_K)."""
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).repeat(4)[None, :]
    high = (np.tile(s[:, 8:12], 4) >> shifts) & 3
    return (low | (high << 4)).astype(np.float32) - 32


def _deq_q3_k(b: np.ndarray) -> np.ndarray:
    dl = _f16(b, 108) * _q3_k_scales(b[:, 96:108])
    hbit = (b[:, None, 0:32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = _crumbs(b[:, 32:96]).astype(np.int8) - (4 * (1 - hbit)).astype(np.int8).reshape(-1, 16, 16)
    return dl[:, :, None] * q


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, 0:128].reshape(-1, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    dl = _f16(b, 208) * b[:, 192:208].view(np.int8)
    return dl[:, :, None] * q.reshape(-1, 16, 16)


_DEQUANT: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: _deq_f32,
    Q.F16: _deq_f16,
    Q.BF16: _deq_bf16,
    Q.Q8_0: _deq_q8_0,
    Q.Q4_0: _deq_q4_0,
    Q.Q4_1: _deq_q4_1,
    Q.Q5_0: _deq_q5_0,
    Q.Q5_1: _deq_q5_1,
    Q.Q2_K: _deq_q2_k,
    Q.Q3_K: _deq_q3_k,
    Q.Q4_K: _deq_q4_k,
    Q.Q5_K: _deq_q5_k,
    Q.Q6_K: _deq_q6_k,
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


# --------------------------------------------------------------------------- names, permutation

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_IGNORED = re.compile(
    r"rope_freqs\.weight|rope_factors_(long|short)\.weight"
    r"|blk\.\d+\.attn_rot_embd(\.weight)?"
)
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF parameter name for a GGUF tensor; None for known-irrelevant tensors."""
    if _IGNORED.fullmatch(gguf_name):
        return None
    if m := _BLOCK_RE.fullmatch(gguf_name):
        if m.group(2) in _BLOCK_NAMES:
            return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    elif (m := _TOP_RE.fullmatch(gguf_name)) and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise GGUFError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K row permutation (interleaved RoPE back to rotate-half)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- config

_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


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
    return _ARCHS[arch]


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


def _build_config(g: _GGUFFile, rope_freqs: np.ndarray | None) -> dict:
    fields = g.fields
    arch = fields.get("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(f"unsupported GGUF architecture {arch!r} (supported: {sorted(_ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        return _uniform(fields.get(f"{arch}.{key}", default), f"{arch}.{key}")

    names = {t.name: t for t in g.tensors}
    n_head, hidden = int(get("attention.head_count")), int(get("embedding_length"))
    q = names.get("blk.0.attn_q.weight")
    head_dim = _head_dim(fields, arch, q.shape[0] if q else None, n_head, hidden)
    theta = _short_float(get("rope.freq_base", 10000.0))
    model_type, cls = _model_type(arch, fields)
    vocab = get("vocab_size") or len(fields.get("tokenizer.ggml.tokens", ()))
    vocab = vocab or names["token_embd.weight"].shape[0]
    return {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": _short_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(fields, arch, rope_freqs, theta, head_dim),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in names,
    }


# --------------------------------------------------------------------------- loading


def _read_tensor(g: _GGUFFile, info: _TensorInfo) -> torch.Tensor:
    qtype = _qtype(info.ggml_type, info.name)
    if qtype not in _DEQUANT:
        raise GGUFError(f"tensor {info.name!r} uses unsupported quantization type {qtype.name}")
    return dequantize(g.raw(info), qtype, info.shape)


def _fix_layout(name: str, w: torch.Tensor, config: dict) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation (llama arch only; qwen GGUFs are not permuted)."""
    if config["model_type"] not in ("llama", "mistral"):
        return w
    if ".self_attn.q_proj." in name:
        return unpermute_rows(w, config["num_attention_heads"])
    if ".self_attn.k_proj." in name:
        return unpermute_rows(w, config["num_key_value_heads"])
    return w


def load_gguf(path: str, dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Read a GGUF file into an HF config and HF-named tensors of `dtype`, one tensor at a time."""
    g = _GGUFFile(path)
    freqs = next((t for t in g.tensors if t.name == "rope_freqs.weight"), None)
    config = _build_config(g, _read_tensor(g, freqs).numpy() if freqs else None)
    tensors: dict[str, torch.Tensor] = {}
    for info in g.tensors:
        name = hf_tensor_name(info.name)
        if name is not None:
            w = _fix_layout(name, _read_tensor(g, info), config)
            tensors[name] = w if dtype == torch.float32 else w.to(dtype)
    return GGUFCheckpoint(config, tensors, g.fields.get("tokenizer.chat_template"), path)


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
    """A fast tokenizer for the GGUF's vocabulary, with its special tokens and chat template."""
    fields = _GGUFFile(path).fields
    split = _PRE_SPLITS.get(fields.get("tokenizer.ggml.pre", "gpt2"))
    if fields.get("tokenizer.ggml.model") == "gpt2" and split is not None:
        return _fast_byte_level_tokenizer(fields, split)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
    )

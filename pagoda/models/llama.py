"""The Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3) over a paged KV cache.

One module covers the family: Qwen2 adds a bias to the QKV projection, Qwen3 adds an RMSNorm
over each head of q and k before RoPE. Shapes: T = tokens in the step (all requests packed),
H / Hkv = query / KV heads, D = head_dim, E = hidden size.
"""
from __future__ import annotations

import functools
import math
import os
from types import ModuleType
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.attention.metadata import AttentionMetadata
from pagoda.attention.backend import paged_attention
from pagoda.models import cpu_fused
from pagoda.models.config import ModelArch


def gpu_fused(x: torch.Tensor) -> Optional[ModuleType]:
    """The Triton fused ops (``triton_fused.py``) for a 16-bit CUDA tensor, else None."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    return _triton_fused_module()


@functools.lru_cache(maxsize=None)
def _triton_fused_module() -> Optional[ModuleType]:
    from pagoda.attention.backend import triton_available

    if os.environ.get(cpu_fused.FUSED_ENV) == "0" or not triton_available():
        return None
    from pagoda.models import triton_fused

    return triton_fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and cpu_fused.enabled(x):
            return cpu_fused.rms_norm(x, self.weight, self.eps)
        if x.dim() == 2 and (gpu := gpu_fused(x)) is not None:
            return gpu.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32, as the reference implementation does, then scale in x's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, x: torch.Tensor,
                    residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + x, and its norm: returns (RMSNorm(residual + x), residual + x). The fused
        kernel adds into ``residual`` in place and normalises in the same pass."""
        if x.dim() == 2 and cpu_fused.enabled(x):
            return cpu_fused.add_rms_norm(residual, x, self.weight, self.eps), residual
        if x.dim() == 2 and (gpu := gpu_fused(x)) is not None:
            return gpu.rms_norm(x, self.weight, self.eps, residual=residual), residual
        residual = residual + x
        return self(residual), residual


def rope_inv_freq(arch: ModelArch, device: torch.device) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama-3 style frequency-dependent scaling if asked."""
    d = arch.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    inv_freq = 1.0 / (arch.rope_theta ** exponents)
    s = arch.rope_scaling
    if not s:
        return inv_freq
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly.
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table for every position."""

    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        self.arch, self.max_positions = arch, max_positions
        self.build(torch.device("cpu"))

    def build(self, device: torch.device) -> None:
        """(Re)compute the fp32 table on ``device``. Plain attributes, not buffers, so that
        casting the model to bf16 leaves the table in fp32."""
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, rope_inv_freq(self.arch, device))  # (P, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)                       # (P, D)
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cpu_fused.enabled(q):
            cpu_fused.rope_(q, k, self.cos, self.sin, positions)      # in place
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)            # (T, 1, D)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in x's dtype (as the reference implementation does)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_heads, arch.num_kv_heads, arch.head_dim)
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=arch.attention_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.rope = rope
        self.scale = arch.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)                                        # (T, (H + 2Hkv) D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)               # (T, H, D)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)            # (T, Hkv, D)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = self._norm_rope(positions, q, k)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)      # (T, H, D)
        return self.o_proj(o.reshape(t, self.q_size))                 # (T, E)

    def _norm_rope(self, positions: torch.Tensor, q: torch.Tensor,
                   k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's RMSNorm over each head of q and k (when the model has it), then RoPE."""
        gpu = gpu_fused(q)
        if gpu is not None and gpu.rope_supported(self.head_dim):      # one kernel, in place
            qw, kw, eps = ((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
                           if self.q_norm is not None else (None, None, 0.0))
            gpu.qk_norm_rope_(q, k, positions, self.rope.cos, self.rope.sin, qw, kw, eps)
            return q, k
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rope(positions, q, k)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_fused.enabled(x):
            return self.down_proj(cpu_fused.silu_mul(self.gate_up_proj(x)))
        if (gpu := gpu_fused(x)) is not None:
            return self.down_proj(gpu.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # (T, I) each
        return self.down_proj(F.silu(gate) * up)                      # (T, E)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, rope)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], positions: torch.Tensor,
                kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (T, E), not yet added to ``residual`` (the running
        sum of the residual stream; None in the first layer, where x is the embedding).
        Returns (this layer's MLP output, residual): each add is fused into the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        attn = self.self_attn(h, positions, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(attn, residual)
        return self.mlp(h), residual


# Checkpoint names that land in a fused parameter: (fused name, which shard).
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.rope = rope = RotaryEmbedding(arch, max_positions)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, rope) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = (None if arch.tie_word_embeddings
                        else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False))
        # The output projection with its weight packed for the CPU's GEMM, where that pays
        # (models/cpu_linear.py; set by the model runner).
        self.packed_head: Optional[nn.Module] = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,). Returns final hidden states (T, E)."""
        x = self.embed_tokens(input_ids)                              # (T, E)
        residual: Optional[torch.Tensor] = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, kv_cache, meta)
        return self.norm.add_forward(x, residual)[0]

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, E): the output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, E) -> logits (N, V) in the model's dtype (the sampler upcasts)."""
        if self.packed_head is not None:
            return self.packed_head(hidden)
        return F.linear(hidden, self.output_weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the fused parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._param_name(name)
            if target is None:
                continue
            param_name, shard = target
            if param_name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            self._copy_into(params[param_name], param_name, shard, tensor, name)
            loaded.add(param_name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")

    def _param_name(self, name: str) -> Optional[tuple[str, Optional[int]]]:
        if name.startswith("model."):
            name = name[len("model."):]
        if "rotary_emb" in name:
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: the embedding is the output projection
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in _FUSED:
                fused, shard = _FUSED[part]
                return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
        return name, None

    def _copy_into(self, param: torch.Tensor, param_name: str, shard: Optional[int],
                   tensor: torch.Tensor, source: str) -> None:
        if shard is None:
            dest = param.data
        else:
            sizes = ([self.layers[0].self_attn.q_size] + [self.layers[0].self_attn.kv_size] * 2
                     if "qkv_proj" in param_name else [self.arch.intermediate_size] * 2)
            offset = sum(sizes[:shard])
            dest = param.data.narrow(0, offset, sizes[shard])
        if dest.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(dest.shape)}")
        dest.copy_(tensor)

"""The Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3, and the mixture-of-experts
Qwen3-MoE and Mixtral) over a paged KV cache.

One module covers the family: Qwen2 adds a bias to the QKV projection, Qwen3 adds an RMSNorm
over each head of q and k before RoPE; the MoE models replace the MLP of their sparse layers
with ``moe.SparseMoE``. Shapes: T = tokens in the step (all requests packed),
H / Hkv = query / KV heads, D = head_dim, E = hidden size.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Mapping, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.attention import backend
from pagoda.attention.backend import AttentionBackend
from pagoda.attention.metadata import AttentionMetadata
from pagoda.models import moe, ops
from pagoda.models.config import ModelArch
from pagoda.models.ops import DecoderOps
from pagoda.models.quantized import QuantizedTensor, concat_rows


class RMSNorm(nn.Module):
    ops: DecoderOps = ops.REFERENCE  # until the model binds its own (bind_ops)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, E) -> (T, E)."""
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + x, and its norm: returns (RMSNorm(residual + x), residual + x). The fused
        kernels add into ``residual`` in place and normalise in the same pass."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(arch: ModelArch, device: torch.device, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (R/2,) over the rotary dims R (the head dim unless partial), with
    Llama-3 style frequency-dependent scaling, linear scaling (every frequency divided by the
    factor), or LongRoPE's per-frequency factors (its long ones if ``long``), if the config
    asks."""
    d = arch.rotary_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    s = arch.rope_scaling
    if s and s["rope_type"] == "longrope":
        factors = s["long_factor" if long else "short_factor"]
        scale = torch.tensor(factors, dtype=torch.float32, device=device)
        return 1.0 / (scale * arch.rope_theta**exponents)
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    if not s:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
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


def partial_rotary_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Where each head dim comes from when a partial rotary's dims are laid out for a full-width
    rotate-half table: (D,) source indices. Rotate-half over R dims pairs i with i + R/2; over
    D dims, i with i + D/2. So the first half takes the rotary dims [0, R/2) then half the
    pass-through dims, the second half [R/2, R) then the other half; the table holds cos 1 and
    sin 0 for the pass-through pairs. q and k are permuted alike, so q.k is unchanged."""
    half, rhalf, rest = head_dim // 2, rotary_dim // 2, (head_dim - rotary_dim) // 2
    first = list(range(rhalf)) + list(range(rotary_dim, rotary_dim + rest))
    second = list(range(rhalf, rotary_dim)) + list(range(rotary_dim + rest, head_dim))
    assert len(first) == len(second) == half
    return torch.tensor(first + second)


class RotaryEmbedding(nn.Module):
    """The cos/sin table of rotate-half RoPE for every position (the rotation itself is an op
    of the model's ops set, ``ops.py``).

    LongRoPE (Phi-3): transformers takes the short factors while a sequence fits the original
    context and recomputes everything with the long factors once it is longer; a paged KV
    cache cannot re-rotate keys it holds, so the choice is made once per engine: the long
    factors for every position when the engine's context (``max_model_len``,
    ``set_context_len``) exceeds ``original_max_position_embeddings``, else the short ones."""

    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        self.arch, self.max_positions = arch, max_positions
        self.context_len = max_positions
        self.build(torch.device("cpu"))

    @property
    def long_factors(self) -> bool:
        s = self.arch.rope_scaling
        return bool(
            s
            and s["rope_type"] == "longrope"
            and self.context_len > s["original_max_position_embeddings"]
        )

    def set_context_len(self, context_len: int) -> None:
        """The longest sequence the engine will run; rebuilds a LongRoPE table if the choice of
        factors changes."""
        long = self.long_factors
        self.context_len = context_len
        if self.long_factors != long:
            self.build(self.cos.device)

    def build(self, device: torch.device) -> None:
        """(Re)compute the fp32 table on ``device``. Plain attributes, not buffers, so that
        casting the model to bf16 leaves the table in fp32."""
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, rope_inv_freq(self.arch, device, self.long_factors))
        s = self.arch.rope_scaling
        scale = s["attention_factor"] if s and s["rope_type"] == "longrope" else 1.0
        cos, sin = freqs.cos() * scale, freqs.sin() * scale  # (P, R/2)
        pad = (self.arch.head_dim - self.arch.rotary_dim) // 2  # pass-through pairs
        if pad:
            cos = torch.cat([cos, cos.new_ones(cos.shape[0], pad)], dim=-1)
            sin = torch.cat([sin, sin.new_zeros(sin.shape[0], pad)], dim=-1)
        self.cos, self.sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


class Attention(nn.Module):
    ops: DecoderOps = ops.REFERENCE  # until the model binds its own (bind_ops)
    attention: AttentionBackend = backend.TORCH

    def __init__(self, arch: ModelArch, rope: RotaryEmbedding, layer: int = 0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_heads,
            arch.num_kv_heads,
            arch.head_dim,
        )
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.qkv_proj = nn.Linear(
            arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.rope = rope
        self.scale = arch.attention_scale
        # Sliding window (Mistral, Phi-3, Gemma's local layers) and score soft-cap (Gemma 2).
        self.window, self.softcap = arch.window(layer), arch.attn_logit_softcapping

    def bind(self, decoder_ops: DecoderOps, attention: AttentionBackend) -> None:
        self.ops, self.attention = decoder_ops, attention

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (H + 2Hkv) D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = self._norm_rope(positions, q, k)
        meta = meta.for_window(self.window)  # a sliding layer's own tables, when apart
        o = self.attention.forward(
            q, k, v, kv_cache, meta, self.scale, window=self.window, softcap=self.softcap
        )  # (T, H, D)
        return self.o_proj(o.reshape(t, self.q_size))  # (T, E)

    def _norm_rope(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's RMSNorm over each head of q and k (when the model has it), then RoPE."""
        rope = self.rope
        if self.q_norm is None:
            return self.ops.rope(positions, q, k, rope.cos, rope.sin)
        assert self.k_norm is not None  # built with q_norm (arch.qk_norm)
        return self.ops.qk_norm_rope(
            positions,
            q,
            k,
            rope.cos,
            rope.sin,
            self.q_norm.weight,
            self.k_norm.weight,
            self.q_norm.eps,
        )


class MLP(nn.Module):
    ops: DecoderOps = ops.REFERENCE  # until the model binds its own (bind_ops)

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.geglu = arch.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        h = self.ops.gelu_tanh_mul(gate_up) if self.geglu else self.ops.silu_mul(gate_up)
        return self.down_proj(h)  # (T, E)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rope: RotaryEmbedding, index: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, rope, index)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp: Union[MLP, moe.SparseMoE] = (
            moe.SparseMoE(arch) if arch.is_moe_layer(index) else MLP(arch)
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor],
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (T, E), not yet added to ``residual`` (the running
        sum of the residual stream; None in the first layer, where x is the embedding).
        Returns (this layer's MLP output, residual): each add is fused into the next norm."""
        h, residual = self.input_norm(x, residual)
        attn = self.self_attn(h, positions, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(attn, residual)
        return self.mlp(h), residual

    def input_norm(
        self, x: torch.Tensor, residual: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the attention's input, the residual stream): the previous layer's output added to
        the stream and normalised (in the first layer, x is the stream)."""
        if residual is None:
            return self.input_layernorm(x), x
        return self.input_layernorm.add_forward(x, residual)

    def bind(self, decoder_ops: DecoderOps, attention: AttentionBackend) -> None:
        """The per-head q/k norms are not bound: ``ops.qk_norm_rope`` does them."""
        self.input_layernorm.ops = self.post_attention_layernorm.ops = decoder_ops
        self.self_attn.bind(decoder_ops, attention)
        self.mlp.ops = decoder_ops


def _strip_prefix(name: str) -> str:
    """``model.layers.0...`` -> ``layers.0...``."""
    return name[len("model.") :] if name.startswith("model.") else name


# Checkpoint names that land in a fused parameter: (fused name, which shard).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.rope = RotaryEmbedding(arch, max_positions)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = (
            None
            if arch.tie_word_embeddings
            else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        )
        # The output projection with its weight packed for the CPU's GEMM, where that pays
        # (models/cpu_linear.py; set by the model runner).
        self.packed_head: Optional[nn.Module] = None
        self.ops: DecoderOps = ops.REFERENCE  # the reference until bind_ops
        self.attention: AttentionBackend = backend.TORCH

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: (T,). Returns final hidden states (T, E)."""
        x = self.embed(input_ids)  # (T, E)
        residual: Optional[torch.Tensor] = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):  # one cache a layer
            x, residual = layer(x, residual, positions, kv_cache, meta)
        assert residual is not None  # set by the first layer
        return self.norm.add_forward(x, residual)[0]

    def make_layer(self, arch: ModelArch, index: int) -> nn.Module:
        return DecoderLayer(arch, self.rope, index)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def build_rope(self, device: torch.device) -> None:
        """(Re)compute the RoPE tables on ``device``."""
        self.rope.build(device)

    def bind_ops(
        self,
        device: torch.device,
        dtype: torch.dtype,
        kv_dtype: Optional[torch.dtype] = None,
        deterministic: bool = False,
    ) -> None:
        """Choose, once, the decoder ops and the attention backend for weights of ``dtype`` on
        ``device`` over a KV cache of ``kv_dtype`` (default: ``dtype``), reading the switches
        (PAGODA_FUSED, PAGODA_ATTENTION, PAGODA_AMX) now; the forward then asks nothing. The
        loader binds for the model's dtype, the model runner again for its cache's.
        ``deterministic``: the batch-invariant attention (``backend.select``)."""
        head_dim = self.arch.head_dim
        self.bind(
            ops.select(device, dtype, head_dim),
            backend.select(device, dtype, kv_dtype or dtype, head_dim, deterministic),
        )

    def bind(self, decoder_ops: DecoderOps, attention: AttentionBackend) -> None:
        """Run every layer with these implementations (tests bind the Triton ones on CPU
        tensors, as on a GPU)."""
        self.ops, self.attention = decoder_ops, attention
        self.norm.ops = decoder_ops
        for layer in self.layers:
            cast(DecoderLayer, layer).bind(decoder_ops, attention)

    @property
    def cuda_graph_safe(self) -> bool:
        """False for MoE models: a sparse layer reads its experts' token counts on the host
        (models/moe.py), which a CUDA graph capture cannot do."""
        return self.arch.num_experts == 0

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
        """Copy checkpoint tensors (Hugging Face names) into the fused parameters (and each
        expert's matrices into its slice of the stacked expert parameters)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        expert_parts: Counter[str] = Counter()
        for name, tensor in weights:
            expert = moe.expert_param_name(_strip_prefix(name))
            if expert is not None:
                param_name, index, matrix = expert
                if param_name not in params or index >= self.arch.num_experts:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
                layer = cast(moe.SparseMoE, self.get_submodule(param_name.rpartition(".")[0]))
                layer.load_expert(index, matrix, tensor, name)  # dense, or quantized (int4)
                expert_parts[param_name] += 1
                continue
            target = self._param_name(name)
            if target is None:
                continue
            param_name, shard = target
            if param_name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            self._copy_into(params[param_name], param_name, shard, tensor, name)
            loaded.add(param_name)
        n = self.arch.num_experts
        loaded.update(p for p, c in expert_parts.items() if c == (2 * n if "gate_up" in p else n))
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")
        if self.arch.rotary_dim != self.arch.head_dim:
            self._permute_partial_rotary()

    @torch.no_grad()
    def _permute_partial_rotary(self) -> None:
        """Lay out each q and k head's dims for the full-width RoPE table
        (``partial_rotary_order``): the rows of the q and k projections, permuted alike."""
        rows = self._qkv_rotary_rows()
        for layer in self.layers:
            attn = cast(DecoderLayer, layer).self_attn
            for param in (attn.qkv_proj.weight, attn.qkv_proj.bias):
                if param is not None:
                    param.data.copy_(param.data[rows])

    def _qkv_rotary_rows(self) -> torch.Tensor:
        """The qkv projection's rows in the order ``_permute_partial_rotary`` lays them."""
        arch = self.arch
        order = partial_rotary_order(arch.head_dim, arch.rotary_dim)
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        rows = torch.arange(q_size + 2 * kv_size)
        q, k, _ = rows.split([q_size, kv_size, kv_size])
        for part, heads in ((q, arch.num_heads), (k, arch.num_kv_heads)):
            by_head = part.view(heads, arch.head_dim)
            by_head.copy_(by_head[:, order])
        return rows

    def quantized_linears(
        self, tensors: Mapping[str, QuantizedTensor]
    ) -> dict[str, QuantizedTensor]:
        """A file's quantized matrices (HF names) keyed by the module whose weight they are
        (``layers.0.self_attn.qkv_proj``, ``embed_tokens``), in that weight's layout: a fused
        module's shards concatenated in order (only when the file quantized all of them), the
        partial-rotary row order applied. Expert matrices are left out."""
        shards: dict[str, dict[int, QuantizedTensor]] = {}
        for name, q in tensors.items():
            target = self._param_name(name)
            if target is None or moe.expert_param_name(_strip_prefix(name)) is not None:
                continue
            param, shard = target
            if param.endswith(".weight"):
                shards.setdefault(param.removesuffix(".weight"), {})[shard or 0] = q
        out = {}
        for module, parts in shards.items():
            fused = module.rpartition(".")[2]
            count = sum(f == fused for f, _ in _FUSED.values()) or 1
            if sorted(parts) == list(range(count)):
                out[module] = concat_rows([parts[i] for i in range(count)])
        if self.arch.rotary_dim != self.arch.head_dim:
            rows = self._qkv_rotary_rows()
            out = {m: q.rows(rows) if m.endswith("qkv_proj") else q for m, q in out.items()}
        return out

    def set_context_len(self, context_len: int) -> None:
        """The engine's ``max_model_len``, which chooses LongRoPE's factors (RotaryEmbedding)."""
        self.rope.set_context_len(context_len)

    def _param_name(self, name: str) -> Optional[tuple[str, Optional[int]]]:
        name = _strip_prefix(name)
        if "rotary_emb" in name:
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: the embedding is the output projection
        parts = name.split(".")
        if len(parts) > 2 and parts[2] == "block_sparse_moe":  # Mixtral's name for the MoE MLP
            parts[2] = "mlp"
        for i, part in enumerate(parts):
            if part in _FUSED:
                fused, shard = _FUSED[part]
                return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard
        return ".".join(parts), None

    def _copy_into(
        self,
        param: torch.Tensor,
        param_name: str,
        shard: Optional[int],
        tensor: torch.Tensor,
        source: str,
    ) -> None:
        if shard is None:
            dest = param.data
        else:
            attn = cast(DecoderLayer, self.layers[0]).self_attn
            sizes = (
                [attn.q_size] + [attn.kv_size] * 2
                if "qkv_proj" in param_name
                else [self.arch.intermediate_size] * 2
            )
            offset = sum(sizes[:shard])
            dest = param.data.narrow(0, offset, sizes[shard])
        if dest.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(dest.shape)}"
            )
        dest.copy_(tensor)

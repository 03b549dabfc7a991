"""Gemma 2 and Gemma 3 (text) decoders (Gemma Team, "Gemma 2: Improving Open Language Models at a
Practical Size", 2024; "Gemma 3 Technical Report", 2025) over the paged KV cache.

What differs from the Llama family (``llama.py``), and where it is handled:
- sliding-window layers interleaved with global ones (Gemma 2: every other layer, window 4096;
  Gemma 3: five of every six, window 512 or 1024): each layer's window goes to the attention
  backend (``ModelArch.layer_windows``, ``Attention.window``), and the sliding layers' KV is
  kept in a pool of its own whose blocks go back as they fall out of every window
  (``core/sliding_kv.py``);
- soft-capping: c * tanh(x / c) on the attention scores (Gemma 2, in the backend) and on the
  final logits (:meth:`GemmaForCausalLM.compute_logits`);
- sandwich norms: RMSNorm after attention and around the MLP, each weight applied as (1 + w):
  folded into the weight once at load (:func:`fold_norm_weight`);
- GeGLU MLP (``ops.gelu_tanh_mul``), embeddings scaled by sqrt(hidden) rounded to the model's
  dtype, attention scaled by ``query_pre_attn_scalar`` ** -0.5;
- Gemma 3: per-head q/k RMSNorm (as Qwen3, with (1 + w)), and its sliding layers rotate with
  their own RoPE base (``rope_local_base_freq``, 10 000) while the global ones use
  ``rope_theta`` (1 000 000, linearly scaled in the larger models).

Invariant: in fp32 every layer computes what transformers' Gemma2/Gemma3 modules compute, so
greedy tokens match token for token (tests/model/test_gemma.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator, Optional, cast

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend
from pagoda.attention.metadata import AttentionMetadata
from pagoda.models.config import ModelArch
from pagoda.models.llama import DecoderLayer, LlamaForCausalLM, RMSNorm, RotaryEmbedding
from pagoda.models.ops import DecoderOps


def is_norm_weight(name: str) -> bool:
    """A Gemma RMSNorm weight (stored as w, applied as 1 + w)."""
    return name.endswith("norm.weight")


def fold_norm_weight(tensor: torch.Tensor) -> torch.Tensor:
    """1 + w, in fp32 (then cast once to the model's dtype as it is copied in)."""
    return tensor.float() + 1.0


class GemmaDecoderLayer(DecoderLayer):
    """Llama's layer with Gemma's sandwich norms: x + post_attn(attn(in(x))), then
    h + post_ff(mlp(pre_ff(h))). As in Llama's, each residual add is fused into the next norm:
    the layer returns (post_ff(mlp(...)), the residual stream without it)."""

    def __init__(self, arch: ModelArch, rope: RotaryEmbedding, index: int) -> None:
        super().__init__(arch, rope, index)
        self.pre_feedforward_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor],
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_norm(x, residual)
        attn = self.post_attention_layernorm(self.self_attn(h, positions, kv_cache, meta))
        h, residual = self.pre_feedforward_layernorm.add_forward(attn, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual

    def bind(self, decoder_ops: DecoderOps, attention: AttentionBackend) -> None:
        super().bind(decoder_ops, attention)
        self.pre_feedforward_layernorm.ops = self.post_feedforward_layernorm.ops = decoder_ops


class GemmaForCausalLM(LlamaForCausalLM):
    @property
    def local_rope(self) -> Optional[RotaryEmbedding]:
        """Gemma 3's sliding layers' RoPE table (None in Gemma 2: one table for all)."""
        return cast(Optional[RotaryEmbedding], self._modules.get("rope_local"))

    def make_layer(self, arch: ModelArch, index: int) -> nn.Module:
        """Gemma 3's sliding layers rotate with their own base and no scaling (the table is
        made with the first of them)."""
        if not (arch.rope_local_theta and arch.window(index)):
            return GemmaDecoderLayer(arch, self.rope, index)
        rope = self.local_rope
        if rope is None:
            local = replace(arch, rope_theta=arch.rope_local_theta, rope_scaling=None)
            rope = RotaryEmbedding(local, self.rope.max_positions)
            self.add_module("rope_local", rope)
        return GemmaDecoderLayer(arch, rope, index)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings times sqrt(hidden size), the factor rounded to the model's dtype first
        (as transformers does: 33.94 is 34.0 in bf16)."""
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.arch.hidden_size**0.5, dtype=x.dtype)

    def build_rope(self, device: torch.device) -> None:
        super().build_rope(device)
        if self.local_rope is not None:
            self.local_rope.build(device)

    def set_context_len(self, context_len: int) -> None:
        super().set_context_len(context_len)
        if self.local_rope is not None:
            self.local_rope.set_context_len(context_len)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits soft-capped at ``final_logit_softcapping`` (Gemma 2) where the config sets it."""
        logits = super().compute_logits(hidden)
        cap = self.arch.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Llama's loading, each RMSNorm weight w loaded as 1 + w."""
        super().load_weights(_folded(weights))


def _folded(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        yield name, fold_norm_weight(tensor) if is_norm_weight(name) else tensor

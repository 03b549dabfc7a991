"""ModelArch: the shape of a Llama-family decoder, read from a Hugging Face config dict."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

# model_type -> what differs from plain Llama.
SUPPORTED_MODEL_TYPES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
    "qwen3_moe": {"qk_norm": True},  # sparse MoE layers (models/moe.py)
    "mixtral": {},  # sparse MoE layers (models/moe.py)
    "phi3": {},  # fused qkv_proj / gate_up_proj in the checkpoint, LongRoPE, partial rotary
}

# Variants refused at load, by the config key that marks them: (key, the feature's name).
_REFUSED_KEYS = (
    ("shared_expert_intermediate_size", "shared experts (Qwen2-MoE style)"),
    ("n_shared_experts", "shared experts"),
)


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    # RoPE rotates the first rotary_dim of each head's head_dim (Phi-4-mini: 0.75 of 128).
    partial_rotary_factor: float = 1.0
    # Mixture of experts (0 experts: every layer dense). A layer i is sparse when i is not in
    # mlp_only_layers and (i + 1) % decoder_sparse_step == 0 (Qwen3-MoE's rule).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def num_params_non_embedding(self) -> int:
        """Weights of the transformer layers that each token pays for: in a MoE layer the
        router and the ``num_experts_per_tok`` experts a token runs through (active
        parameters), not every expert."""
        h = self.hidden_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        dense = 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok * 3 * h * self.moe_intermediate_size
        sparse = h * self.num_experts + experts  # the router and the routed experts
        return sum(
            attn + (sparse if self.is_moe_layer(i) else dense) for i in range(self.num_layers)
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArch":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures") or [model_type]
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                f"pagoda supports {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {act!r}; only 'silu'")
        for key, feature in _REFUSED_KEYS:
            if cfg.get(key):
                raise UnsupportedModelError(f"unsupported: {feature} ({key!r} in the config)")
        extra = SUPPORTED_MODEL_TYPES[model_type]
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope_theta, rope_scaling = _rope_params(cfg)
        partial = float(
            cfg.get("partial_rotary_factor")
            or (cfg.get("rope_parameters") or {}).get("partial_rotary_factor")
            or 1.0
        )
        if partial != 1.0 and extra.get("qk_norm"):
            raise UnsupportedModelError("unsupported: partial rotary with per-head q/k norms")
        rotary = int(head_dim * partial)
        if rotary % 2 or (head_dim - rotary) % 2:
            raise UnsupportedModelError(
                f"unsupported: partial rotary over {rotary} of {head_dim} head dims (odd)"
            )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", extra.get("attention_bias", False))),
            qk_norm=bool(extra.get("qk_norm", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            partial_rotary_factor=partial,
            **_moe_params(cfg),
        )


def _moe_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields: Qwen3-MoE's names (num_experts, moe_intermediate_size, norm_topk_prob)
    or Mixtral's (num_local_experts; the experts as wide as intermediate_size; the top-k
    always renormalised)."""
    model_type = cfg.get("model_type")
    if model_type == "mixtral":
        return dict(
            num_experts=_num_experts(cfg),
            num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["intermediate_size"],
            norm_topk_prob=True,
        )
    if model_type != "qwen3_moe":
        return {}
    step = cfg.get("decoder_sparse_step") or 1
    return dict(
        num_experts=_num_experts(cfg),
        num_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(step),
        mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
    )


def _num_experts(cfg: dict[str, Any]) -> int:
    """Published Qwen3-MoE configs say num_experts, Mixtral's and transformers 5's saves of
    either say num_local_experts."""
    return int(cfg.get("num_experts") or cfg["num_local_experts"])


def _rope_params(cfg: dict[str, Any]) -> tuple[float, Optional[dict]]:
    """rope_theta and rope_scaling, from either the old keys or transformers 5's rope_parameters
    (a longrope dict completed with the model-level keys it relies on)."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (
        params if params.get("rope_type", "default") != "default" else None
    )
    if scaling is None:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "longrope" or (cfg.get("model_type") == "phi3" and kind in ("su", "yarn")):
        # Phi-3's first 128k releases named LongRoPE "su" (or "yarn"); transformers reads both.
        return float(theta), _longrope_params(cfg, scaling)
    if kind != "llama3":
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {kind!r}; only 'llama3' and 'longrope'"
        )
    return float(theta), {**scaling, "rope_type": "llama3"}


def _longrope_params(cfg: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    """LongRoPE (Phi-3): per-frequency short and long factors, and the attention factor that
    scales cos and sin, by default sqrt(1 + ln(factor) / ln(original context)) with factor =
    max_position_embeddings / original_max_position_embeddings (as transformers computes it)."""
    original = scaling.get("original_max_position_embeddings") or cfg.get(
        "original_max_position_embeddings"
    )
    if not original:
        raise UnsupportedModelError(
            "longrope rope_scaling without original_max_position_embeddings"
        )
    factor = scaling.get("factor") or cfg.get("max_position_embeddings", original) / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "rope_type": "longrope",
        "short_factor": list(scaling["short_factor"]),
        "long_factor": list(scaling["long_factor"]),
        "original_max_position_embeddings": int(original),
        "attention_factor": float(attention),
    }

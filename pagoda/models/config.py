"""ModelArch: the shape of a decoder (the Llama family, Phi-3, the MoE models, Gemma 2/3), read
from a Hugging Face config dict."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from pagoda.models.registry import ENCODERS, FAMILIES, Family, Windows

# Activations of the gated MLP: SiLU (SwiGLU), or GELU's tanh approximation (GeGLU, Gemma).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# Variants refused at load, by the config key that marks them: (key, the feature's name).
_REFUSED_KEYS = (
    ("shared_expert_intermediate_size", "shared experts (Qwen2-MoE style)"),
    ("n_shared_experts", "shared experts"),
    ("use_bidirectional_attention", "bidirectional attention (EmbeddingGemma)"),
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
    # Sliding-window attention: layer i's query at position p sees keys (p - W_i, p], W_i =
    # layer_windows[i] (0, or no entry: the whole context).
    layer_windows: tuple[int, ...] = ()
    hidden_act: str = "silu"
    # Gemma: c * tanh(x / c) on the attention scores and on the final logits (0: off); the
    # attention scale is query_pre_attn_scalar ** -0.5 (0: head_dim); sliding layers rotate
    # with their own RoPE base (0: rope_theta).
    attn_logit_softcapping: float = 0.0
    final_logit_softcapping: float = 0.0
    query_pre_attn_scalar: float = 0.0
    rope_local_theta: float = 0.0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def family(self) -> Family:
        """The registry's row for this model type (``registry.py``)."""
        return FAMILIES[self.model_type]

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window (0: it attends to the whole context)."""
        return self.layer_windows[layer] if layer < len(self.layer_windows) else 0

    @property
    def sliding_window(self) -> int:
        """The widest window of a sliding layer (0 when no layer slides)."""
        return max(self.layer_windows, default=0)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

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
        if model_type == "gemma3":
            raise UnsupportedModelError(
                "unsupported: multimodal Gemma 3 checkpoints (model_type 'gemma3', with a vision "
                "tower); text-only ones (model_type 'gemma3_text', e.g. gemma-3-1b-it) load"
            )
        if model_type in ENCODERS:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is an encoder-only model: it embeds, scores and "
                "classifies (models/encoder_loader.py), it does not generate text"
            )
        family = FAMILIES.get(model_type)
        if family is None:
            archs = cfg.get("architectures") or [model_type]
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                f"pagoda supports {sorted(FAMILIES)}"
            )
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or family.activation
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported hidden_act {act!r}; only {ACTIVATIONS}")
        for key, feature in _REFUSED_KEYS:
            if cfg.get(key):
                raise UnsupportedModelError(f"unsupported: {feature} ({key!r} in the config)")
        extra = family.defaults
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
            layer_windows=layer_windows(cfg),
            hidden_act=act,
            **_moe_params(cfg),
            **(_gemma_params(cfg) if family.gemma else {}),
        )


def layer_windows(cfg: dict[str, Any]) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), as transformers decides it: from
    ``layer_types`` where the config lists them, else by the family's rule (every layer:
    Mistral, Mixtral, Phi-3; alternate layers from the first: Gemma 2; all but every
    ``sliding_window_pattern``-th: Gemma 3). Qwen2/3 slide only with ``use_sliding_window``."""
    window = cfg.get("sliding_window") or 0
    if not window or cfg.get("use_sliding_window") is False:
        return ()
    n = cfg["num_hidden_layers"]
    family = FAMILIES.get(cfg.get("model_type", ""))
    rule = family.windows if family is not None else Windows.NONE
    types = cfg.get("layer_types")
    if types is None and rule is Windows.ALL:
        types = ["sliding_attention"] * n
    elif types is None and rule is Windows.ALTERNATE:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    elif types is None and rule is Windows.PATTERN:
        pattern = cfg.get("sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if types is None:
        return ()
    if len(types) != n:
        raise UnsupportedModelError(f"layer_types lists {len(types)} layers, the model has {n}")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedModelError(f"unsupported layer types {sorted(unknown)}")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


def _gemma_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma's soft-caps, attention scale and Gemma 3's local RoPE base (from transformers
    4's ``rope_local_base_freq`` or 5's ``rope_parameters["sliding_attention"]``)."""
    local = cfg.get("rope_local_base_freq")
    per_type = cfg.get("rope_parameters") or {}
    if local is None and isinstance(per_type.get("sliding_attention"), dict):
        local = per_type["sliding_attention"].get("rope_theta")
    if cfg.get("model_type") == "gemma3_text" and local is None:
        local = 10000.0  # transformers' default for Gemma 3's sliding layers
    return dict(
        attn_logit_softcapping=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_logit_softcapping=float(cfg.get("final_logit_softcapping") or 0.0),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 0.0),
        rope_local_theta=float(local or 0.0),
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
    if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3, transformers 5)
        params = params["full_attention"]
    default = 1_000_000.0 if cfg.get("model_type") == "gemma3_text" else 10000.0
    theta = cfg.get("rope_theta", params.get("rope_theta", default))
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
    if kind == "linear":  # positions divided by factor (Gemma 3's global layers)
        return float(theta), {"rope_type": "linear", "factor": float(scaling["factor"])}
    if kind != "llama3":
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {kind!r}; only 'llama3', 'linear' and 'longrope'"
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

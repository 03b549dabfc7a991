"""EncoderArch: the shape of an encoder-only model (BERT, RoBERTa, XLM-RoBERTa), read from a
Hugging Face config dict, and what its head is (none, or a sequence classifier).

Invariant: a config this module accepts runs exactly as transformers runs it (absolute
positions, post-norm layers, one of :data:`ENCODER_ACTIVATIONS`); anything else is refused at
load with an :class:`UnsupportedModelError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pagoda.models.config import UnsupportedModelError
from pagoda.models.registry import ENCODERS, EncoderFamily

# hidden_act values the MLP runs ("gelu": exact erf GELU; the next two: its tanh form).
ENCODER_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
CLASSIFIER_SUFFIX = "ForSequenceClassification"


@dataclass(frozen=True)
class EncoderArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    hidden_act: str
    pad_token_id: Optional[int]
    num_labels: int = 0  # 0: no classifier head (an embedding model)
    architecture: str = ""

    @property
    def family(self) -> EncoderFamily:
        return ENCODERS[self.model_type]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        """What the position embedding's index adds to a token's 0-based position: RoBERTa
        numbers positions from ``pad_token_id + 1`` (fairseq's convention), BERT from 0."""
        if not self.family.positions_after_padding:
            return 0
        return (self.pad_token_id or 0) + 1

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the position table holds."""
        return self.max_position_embeddings - self.position_offset

    @property
    def num_params_non_embedding(self) -> int:
        """Weights each token pays for in the layers (attention and MLP matrices)."""
        h = self.hidden_size
        return self.num_layers * (4 * h * h + 2 * h * self.intermediate_size)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "EncoderArch":
        model_type = cfg.get("model_type", "")
        if model_type not in ENCODERS:
            raise UnsupportedModelError(
                f"unsupported encoder model_type {model_type!r}; pagoda runs {sorted(ENCODERS)}"
            )
        _check_supported(cfg)
        architecture = (cfg.get("architectures") or [""])[0]
        classifier = architecture.endswith(CLASSIFIER_SUFFIX)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            hidden_act=cfg.get("hidden_act", "gelu"),
            pad_token_id=cfg.get("pad_token_id"),
            num_labels=num_labels(cfg) if classifier else 0,
            architecture=architecture,
        )


def num_labels(cfg: dict[str, Any]) -> int:
    """A classifier's outputs: ``num_labels`` when saved, else as many as ``id2label`` names
    (transformers saves only the latter)."""
    if cfg.get("num_labels"):
        return int(cfg["num_labels"])
    return len(cfg.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})


def _check_supported(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_act", "gelu")
    if act not in ENCODER_ACTIVATIONS:
        raise UnsupportedModelError(
            f"unsupported hidden_act {act!r} for an encoder; only {ENCODER_ACTIVATIONS}"
        )
    positions = cfg.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise UnsupportedModelError(
            f"unsupported position_embedding_type {positions!r}; only 'absolute'"
        )
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise UnsupportedModelError("unsupported: an encoder run as a decoder ('is_decoder')")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise UnsupportedModelError("hidden_size is not a multiple of num_attention_heads")

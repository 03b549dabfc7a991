"""Which class runs each ``model_type``, and what its config leaves unsaid: one row a family.

A Hugging Face config names its family by ``model_type``; :data:`FAMILIES` maps it to the
decoder class that runs it (named ``"module:Class"``, imported by the loader when it builds
one, so this table imports nothing) and to what the config does not say but the family implies:
a default for a field the config may omit (``attention_bias``, ``qk_norm``, the MLP's
activation) and how its sliding windows are laid out when it has one. ``config.py`` reads the
table when it turns a config into a ``ModelArch``; ``loader.py`` builds the class it names.

Adding a Llama-like family is one row here (and its module, if its layers differ).
Encoder-only families (BERT, RoBERTa, XLM-RoBERTa) are rows of :data:`ENCODERS` beside it:
they run as pooling models only (``encoder_loader.py``), never through the decoder loader.
Invariant: a ``model_type`` not in the table is refused at load, naming the supported ones; a
type is in at most one of the two tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping


class Windows(Enum):
    """Where a family's ``sliding_window`` applies when the config lists no ``layer_types``."""

    NONE = "none"  # only as layer_types says (Qwen2/3 with use_sliding_window)
    ALL = "all"  # every layer (Mistral, Mixtral, Phi-3)
    ALTERNATE = "alternate"  # even layers slide (Gemma 2)
    PATTERN = "pattern"  # all but every sliding_window_pattern-th layer (Gemma 3)


@dataclass(frozen=True)
class Family:
    """One row: the class that runs the family and what its configs imply."""

    model_class: str  # "module:Class"
    defaults: Mapping[str, Any] = field(default_factory=dict)  # ModelArch fields implied
    activation: str = "silu"  # the gated MLP's, when the config names none
    windows: Windows = Windows.NONE
    gemma: bool = False  # Gemma's soft-caps, attention scale and local RoPE base are read


LLAMA = "pagoda.models.llama:LlamaForCausalLM"
GEMMA = "pagoda.models.gemma:GemmaForCausalLM"

FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA),
    "mistral": Family(LLAMA, windows=Windows.ALL),
    "qwen2": Family(LLAMA, {"attention_bias": True}),
    "qwen3": Family(LLAMA, {"qk_norm": True}),
    # sparse MoE layers (models/moe.py)
    "qwen3_moe": Family(LLAMA, {"qk_norm": True}),
    "mixtral": Family(LLAMA, windows=Windows.ALL),
    # fused qkv_proj / gate_up_proj in the checkpoint, LongRoPE, partial rotary
    "phi3": Family(LLAMA, windows=Windows.ALL),
    # Gemma (models/gemma.py): sandwich norms with (1 + w) weights, GeGLU, scaled embeddings,
    # sliding-window layers, soft-capped logits; Gemma 3 adds q/k norms and a local RoPE base.
    "gemma2": Family(GEMMA, activation="gelu_pytorch_tanh", windows=Windows.ALTERNATE, gemma=True),
    "gemma3_text": Family(
        GEMMA,
        {"qk_norm": True},
        activation="gelu_pytorch_tanh",
        windows=Windows.PATTERN,
        gemma=True,
    ),
}


@dataclass(frozen=True)
class EncoderFamily:
    """One encoder-only family: the class that runs it, the prefix its task checkpoints put
    before the encoder's weights, and whether its positions start after the padding index."""

    model_class: str  # "module:Class"
    weight_prefix: str  # "bert." in BertForSequenceClassification's checkpoints
    positions_after_padding: bool = False  # RoBERTa: position ids start at pad_token_id + 1


BERT = "pagoda.models.bert:BertEncoder"
ROBERTA = "pagoda.models.roberta:RobertaEncoder"

ENCODERS: dict[str, EncoderFamily] = {
    # bge, all-MiniLM, e5, gte, ms-marco cross-encoders: post-norm, GELU, absolute positions
    "bert": EncoderFamily(BERT, "bert."),
    "roberta": EncoderFamily(ROBERTA, "roberta.", positions_after_padding=True),
    "xlm-roberta": EncoderFamily(ROBERTA, "roberta.", positions_after_padding=True),
}

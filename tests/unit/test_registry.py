"""models/registry.py: every family row names a class that exists and has the CausalLM members
the runner uses; what a row implies reaches ModelArch; an unknown type is refused by name."""
from __future__ import annotations

import pytest

from pagoda.models.base import CausalLM
from pagoda.models.config import ModelArch, UnsupportedModelError
from pagoda.models.loader import model_class
from pagoda.models.registry import FAMILIES, Windows

MEMBERS = [name for name in dir(CausalLM) if not name.startswith("_")] + ["__call__"]


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def config(model_type: str, **extra) -> dict:
    moe = MOE if model_type in ("qwen3_moe", "mixtral") else {}
    return dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, **moe, **extra)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_row_builds_a_class_with_the_interface(model_type: str) -> None:
    arch = ModelArch.from_hf_config(config(model_type))
    cls = model_class(arch)
    assert cls.__name__ == FAMILIES[model_type].model_class.rpartition(":")[2]
    model = cls(arch, 16)
    missing = [m for m in MEMBERS + list(CausalLM.__annotations__) if not hasattr(model, m)]
    assert missing == []


def test_what_a_row_implies_reaches_the_arch() -> None:
    assert ModelArch.from_hf_config(config("qwen2")).attention_bias
    assert not ModelArch.from_hf_config(config("llama")).attention_bias
    assert ModelArch.from_hf_config(config("qwen3")).qk_norm
    assert ModelArch.from_hf_config(config("gemma2")).hidden_act == "gelu_pytorch_tanh"
    assert ModelArch.from_hf_config(config("gemma2", hidden_act="silu")).hidden_act == "silu"
    gemma = ModelArch.from_hf_config(config("gemma2", final_logit_softcapping=30.0))
    assert gemma.final_logit_softcapping == 30.0
    llama = ModelArch.from_hf_config(config("llama", final_logit_softcapping=30.0))
    assert llama.final_logit_softcapping == 0.0  # read for Gemma rows only
    assert ModelArch.from_hf_config(config("mistral", sliding_window=8)).layer_windows == (8,) * 4
    assert FAMILIES["gemma3_text"].windows is Windows.PATTERN


def test_an_unknown_type_is_refused_naming_the_supported_ones() -> None:
    with pytest.raises(UnsupportedModelError, match="'qwen3_moe'") as e:
        ModelArch.from_hf_config(config("falcon"))
    assert "falcon" in str(e.value)

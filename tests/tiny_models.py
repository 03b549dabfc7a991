"""Tiny random-weight checkpoints in Hugging Face format, made by the tests themselves."""
from __future__ import annotations

import os
from typing import Any

import torch

TINY_VOCAB = 384


def hf_greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``prompt``, exactly ``max_tokens`` long."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# Engine settings the families' equivalence tests run under: chunked prefill (a budget of 7),
# block size 1, preemption with and without prefix caching, async scheduling.
ENGINE_MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "budget7": dict(max_num_batched_tokens=7),
    "block1": dict(block_size=1, max_num_batched_tokens=13),
    "preempt": dict(block_size=8, num_kv_blocks=14, max_num_batched_tokens=32),
    "preempt-nocache": dict(block_size=8, num_kv_blocks=14, max_num_batched_tokens=32,
                            enable_prefix_caching=False),
    "async": dict(async_scheduling=True, max_num_batched_tokens=7),
}


def greedy(max_tokens: int) -> Any:
    """pagoda's greedy params for the same: min_tokens masks EOS until max_tokens, exactly as
    transformers' min_new_tokens does."""
    from pagoda import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "def f(x):\n    return x * 2  # numbers 0123456789",
    "Continuous batching schedules every iteration; chunked prefill slices long prompts.",
] * 20


def make_tokenizer(path: str) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences, saved with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)
    return fast


# 8 experts, 2 per token, narrower than the dense MLP (as Qwen3-MoE's are).
_MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                      norm_topk_prob=True),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48),
    "phi3": dict(pad_token_id=2, sliding_window=None),
    # A window of 8 so that the tests' prompts slide; soft-caps and a query scalar small
    # enough to change the answer.
    "gemma2": dict(head_dim=16, sliding_window=8, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, query_pre_attn_scalar=24, pad_token_id=2),
    "gemma3_text": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, pad_token_id=2,
                        sliding_window_pattern=2, rope_local_base_freq=100.0,
                        rope_theta=10000.0),
}


def make_model(path: str, family: str = "llama", seed: int = 0, **overrides: Any) -> str:
    """Save a tiny random model of ``family`` (llama, qwen2, qwen3, mistral, qwen3_moe,
    mixtral, phi3, gemma2, gemma3_text) to ``path``."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=0,
                  eos_token_id=1, tie_word_embeddings=False)
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[family]
    if family in ("qwen3", "qwen3_moe"):
        common.setdefault("head_dim", 32)
    for key, value in _MOE_DEFAULTS.get(family, {}).items():
        common.setdefault(key, value)
    config = config_cls(**common)
    model = model_cls(config)
    # Larger-than-init weights make the logits less flat, so greedy choices are not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
            elif family.startswith("gemma"):  # norms applied as 1 + w: w away from 0
                p.normal_(0.0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def linear_kinds(model: Any) -> set[type]:
    """The module types of every decoder layer's four linears (fused QKV, output, fused
    gate/up, down) of a llama-shaped engine model."""
    return {type(m) for layer in model.layers for m in (layer.self_attn.qkv_proj,
                                                        layer.self_attn.o_proj,
                                                        layer.mlp.gate_up_proj,
                                                        layer.mlp.down_proj)}

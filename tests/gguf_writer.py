"""Write a Hugging Face checkpoint directory as a GGUF file the way llama.cpp's
convert_hf_to_gguf.py does for the llama, qwen3moe, phi3, gemma2 and gemma3 architectures: tensor
names from gguf-py's TensorNameMap (llama.cpp's own table), its transforms (llama's Q/K rows
interleaved for its RoPE, experts stacked per layer, Gemma's RMSNorm weights stored as 1 + w,
Phi-3's LongRoPE factors as tensors), its
metadata keys, and its choice of types (norms, 1-D tensors and the router in F32; the rest in
the output type, F16 where a row does not fill whole quantization blocks; or a type per tensor,
as llama.cpp's quantize tool would have chosen, K-quants by pagoda.bench.write_kquant).

Used by tests/unit/test_gguf_families.py, tests/model/test_gguf_families_e2e.py and
tests/model/test_gguf_kquant.py; written
here from the converter's documented behaviour, no code of it copied."""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Any, Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

# HF model_type -> llama.cpp architecture
GGUF_ARCH = {"llama": "llama", "qwen3_moe": "qwen3moe", "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def read_checkpoint(hf_dir: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config (as transformers completes it, which is what the converter reads) and the
    tensors of a saved checkpoint."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir).to_dict()
    return config, load_file(os.path.join(hf_dir, "model.safetensors"))


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 rope_parameters (the full-attention entry where split by layer type)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get("full_attention", params)


def _stack_experts(tensors: dict[str, torch.Tensor], fuse: bool) -> dict[str, torch.Tensor]:
    """Per-expert matrices -> one (experts, out, in) tensor per layer and matrix, named as the
    converter names the merged tensor before mapping it; with ``fuse`` (the converter's
    fuse_gate_up_exps option) gate and up as one (experts, 2 * out, in) blk.N.ffn_gate_up_exps."""
    out, groups = {}, defaultdict(dict)
    for name, t in tensors.items():
        if m := _EXPERT.fullmatch(name):
            groups[(int(m.group(1)), m.group(3))][int(m.group(2))] = t
        else:
            out[name] = t
    for (layer, matrix), experts in groups.items():
        stacked = torch.stack([experts[e] for e in range(len(experts))])
        out[f"model.layers.{layer}.mlp.experts.{matrix}_proj.weight"] = stacked
    if fuse:
        for layer in sorted({layer for layer, _ in groups}):
            gate = out.pop(f"model.layers.{layer}.mlp.experts.gate_proj.weight")
            up = out.pop(f"model.layers.{layer}.mlp.experts.up_proj.weight")
            out[f"blk.{layer}.ffn_gate_up_exps.weight"] = torch.cat([gate, up], dim=1)
    return out


def _transform(model_type: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
               fuse_experts: bool) -> dict[str, torch.Tensor]:
    """The converter's modify_tensors / generate_extra_tensors, in HF names."""
    if model_type == "llama":  # rotate-half pairs (i, i + D/2) interleaved as (2i, 2i + 1)
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        out = dict(tensors)
        for name, t in tensors.items():
            kind = name.split(".")[-2]
            if kind in heads:
                n = heads[kind]
                out[name] = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
        return out
    if model_type == "qwen3_moe":
        return _stack_experts(tensors, fuse_experts)
    if model_type in ("gemma2", "gemma3_text"):
        # GemmaRMSNorm computes x * (1 + w): llama.cpp stores 1 + w; Gemma 2 drops lm_head.
        return {n: t + 1 if n.endswith("norm.weight") else t for n, t in tensors.items()
                if not (model_type == "gemma2" and n == "lm_head.weight")}
    if model_type == "phi3":
        out = dict(tensors)
        rope = _rope(config)
        if rope.get("long_factor"):
            out["rope_factors_long.weight"] = torch.tensor(rope["long_factor"], dtype=torch.float32)
            out["rope_factors_short.weight"] = torch.tensor(rope["short_factor"], dtype=torch.float32)
        return out
    raise ValueError(model_type)


def _gguf_name(name: str, names: gguf.TensorNameMap) -> str:
    if name.startswith(("rope_factors_", "blk.")):  # named by the converter itself
        return name
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ValueError(f"llama.cpp has no name for {name!r}")
    return mapped


def _stored(gguf_name: str, t: torch.Tensor, out_type: Q,
            types: Callable[[str], Q] | None = None) -> tuple[np.ndarray, Q]:
    """The converter's type choice: F32 for 1-D tensors, norms and the router; else out_type
    (or ``types(gguf_name)``), or F16 where a row does not split into whole blocks."""
    from pagoda.bench.write_kquant import quantize

    data = t.float().numpy()
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or ".ffn_gate_inp." in gguf_name:
        return data, Q.F32
    out_type = types(gguf_name) if types is not None else out_type
    if out_type == Q.F32:
        return data, Q.F32
    try:
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[out_type][0]:
            raise gguf.QuantError
        return quantize(data.reshape(-1, data.shape[-1]), out_type).reshape(*data.shape[:-1], -1), out_type
    except gguf.QuantError:
        return gguf.quants.quantize(data, Q.F16), Q.F16


def _metadata(w: gguf.GGUFWriter, model_type: str, config: dict[str, Any]) -> None:
    """The converter's set_gguf_parameters for each architecture."""
    c, rope = config, _rope(config)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if model_type == "phi3":  # Phi3MiniModel: no key_length, rotary dims, the window (0: none)
        original = c.get("original_max_position_embeddings") or rope["original_max_position_embeddings"]
        partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor")) or 1.0
        rope_dims = int(partial * c["hidden_size"]) // c["num_attention_heads"]
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_dimension_count(rope_dims)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(c.get("sliding_window") or 0)
        if rope.get("long_factor"):
            scale = c["max_position_embeddings"] / original
            attn = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
            w.add_rope_scaling_attn_factors(attn)
        return
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    if model_type == "llama":  # LlamaModel: the vocabulary size and the rotary dims
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_vocab_size(c["vocab_size"])
        w.add_rope_dimension_count(c["head_dim"])
    elif model_type == "qwen3_moe":
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_expert_count(c.get("num_experts") or c["num_local_experts"])
        w.add_expert_used_count(c["num_experts_per_tok"])
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    elif model_type == "gemma2":  # no rope base: llama.cpp's default 10000 is Gemma 2's
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
        w.add_sliding_window(c["sliding_window"])
    elif model_type == "gemma3_text":
        w.add_rope_freq_base(rope["rope_theta"])
        local = (c.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            w.add_rope_freq_base_swa(local)
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(c["final_logit_softcapping"])
        w.add_sliding_window(c["sliding_window"])


def add_bpe_vocab(w: gguf.GGUFWriter, hf_dir: str) -> None:
    """The directory's byte-level BPE tokenizer (tests/tiny_models.py) as GGUF vocabulary."""
    tok = json.load(open(os.path.join(hf_dir, "tokenizer.json")))
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    cfg = json.load(open(os.path.join(hf_dir, "tokenizer_config.json")))
    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                      ("pad", w.add_pad_token_id)):
        if cfg.get(f"{role}_token") in vocab:
            add(vocab[cfg[f"{role}_token"]])


def write_gguf(hf_dir: str, path: str, out_type: Q = Q.F32, fuse_experts: bool = False,
               types: Callable[[str], Q] | None = None) -> dict[str, np.ndarray]:
    """Convert ``hf_dir`` to ``path`` (``types``: each matrix's type by GGUF name, instead of
    ``out_type``). Returns what each stored tensor holds after the file's rounding (GGUF name
    -> float32 array, the converter's transforms included)."""
    config, tensors = read_checkpoint(hf_dir)
    model_type = config["model_type"]
    arch = GGUF_ARCH[model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny {model_type}")
    _metadata(w, model_type, config)
    add_bpe_vocab(w, hf_dir)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    stored = {}
    for name, t in _transform(model_type, config, tensors, fuse_experts).items():
        gname = _gguf_name(name, names)
        data, qtype = _stored(gname, t, out_type, types)
        w.add_tensor(gname, data, raw_dtype=None if qtype == Q.F32 else qtype)
        stored[gname] = data if qtype == Q.F32 else gguf.quants.dequantize(data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
